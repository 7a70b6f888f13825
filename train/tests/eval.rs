//! `afm_train::eval`: which held-out questions each quality bar takes, the slice of the
//! titles-and-buttons bar with words never seen in training, and the grading, with stand-in
//! models (an oracle that knows the held-out answers, a constant answer).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use afm_train::eval::{evaluate, Bar, EvalSpec};
use afm_train::{generate, EasyVqa, QaCategory, Split, SynthKind};
use image::{Rgb, RgbImage};

/// A two-image easy-VQA `test` folder.
fn small_easy_vqa() -> EasyVqa {
    let d: PathBuf = std::env::temp_dir().join(format!("afm-train-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("test/images")).unwrap();
    std::fs::write(
        d.join("test/questions.json"),
        r#"[["what color is the shape?", "red", 0], ["is there a circle?", "yes", 0],
            ["what shape is present?", "triangle", 1]]"#,
    )
    .unwrap();
    for id in 0..2 {
        RgbImage::from_pixel(64, 64, Rgb([255, 0, 0]))
            .save(d.join(format!("test/images/{id}.png")))
            .unwrap();
    }
    EasyVqa::open(&d, Split::HeldOut).unwrap()
}

fn pixels_hash(img: &RgbImage) -> u64 {
    let mut h = DefaultHasher::new();
    img.as_raw().hash(&mut h);
    h.finish()
}

/// (image, question) -> expected answer over the first held-out samples (what an oracle
/// knows).
fn held_out_answers() -> HashMap<(u64, String), String> {
    let mut m = HashMap::new();
    for kind in [SynthKind::Screen, SynthKind::Scene] {
        for i in 0..60 {
            let s = generate(kind, Split::HeldOut, i);
            let h = pixels_hash(&s.image);
            for q in s.qa {
                m.insert((h, q.question), q.answer);
            }
        }
    }
    m
}

#[test]
fn bars_take_their_categories_from_the_held_out_split() {
    let easy = small_easy_vqa();
    let oracle = held_out_answers();
    let easy_answers: HashMap<&str, &str> = [
        ("what color is the shape?", "red"),
        ("is there a circle?", "yes"),
        ("what shape is present?", "triangle"),
    ]
    .into_iter()
    .collect();
    let spec = EvalSpec {
        per_bar: 12,
        bars: Bar::ALL.to_vec(),
    };
    let mut calls = 0;
    let report = evaluate(
        &spec,
        Some(&easy),
        &mut |s, qs| {
            calls += 1;
            let h = pixels_hash(&s.image);
            Ok(qs
                .iter()
                .map(|q| {
                    // padded with spaces: grading trims, like the training evaluation
                    let a = oracle
                        .get(&(h, q.clone()))
                        .map(String::as_str)
                        .or(easy_answers.get(q.as_str()).copied())
                        .unwrap_or("?");
                    format!(" {a}\n")
                })
                .collect())
        },
        &mut |_, _| {},
    )
    .unwrap();
    assert!(calls > 0);
    for b in &report.bars {
        // easy-VQA: one question per image, and the folder has two images
        let want = if b.bar == Bar::EasyVqa { 2 } else { 12 };
        assert_eq!(b.score.total, want, "{:?}", b.bar);
        assert_eq!(b.requested, 12);
        assert_eq!(b.score.correct, want, "oracle on {:?}", b.bar);
        assert_eq!(b.passed, b.target.map(|_| true));
    }
    for g in &report.answers {
        use QaCategory::*;
        match g.bar {
            Bar::TitlesButtons => {
                assert!(matches!(g.category, Title | Button));
                assert!(g.source.starts_with("screen "));
            }
            Bar::SceneColourCount => {
                assert!(matches!(g.category, Colour | Count));
                assert!(g.source.starts_with("scene "));
            }
            Bar::Other => {
                if g.source.starts_with("screen ") {
                    assert!(!matches!(g.category, Title | Button));
                } else {
                    assert!(g.source.starts_with("scene "));
                    assert!(!matches!(g.category, Colour | Count));
                }
            }
            Bar::EasyVqa => assert!(g.source.starts_with("easy_vqa ")),
        }
    }
    // the unseen-words slice: only the titles-and-buttons bar has one, and the oracle reads it
    for b in &report.bars {
        match b.bar {
            Bar::TitlesButtons => {
                let u = b
                    .unseen_words
                    .expect("titles-and-buttons reports its unseen slice");
                let n = report
                    .answers
                    .iter()
                    .filter(|g| g.bar == Bar::TitlesButtons && g.unseen)
                    .count();
                assert_eq!(u.total, n);
                assert!(u.total > 0 && u.total < b.score.total, "{u:?}");
                assert_eq!(u.correct, u.total);
            }
            _ => assert!(b.unseen_words.is_none(), "{:?}", b.bar),
        }
    }
    for g in &report.answers {
        assert_eq!(
            g.unseen,
            afm_train::vocab::has_held_out_word(&g.expected),
            "{g:?}"
        );
        if g.unseen {
            assert_eq!(g.bar, Bar::TitlesButtons, "{g:?}");
        }
    }
    let json = serde_json::to_value(&report).unwrap();
    let tb = json["bars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["bar"] == "titles_buttons")
        .unwrap();
    assert!(tb["unseen_words"]["total"].as_u64().unwrap() > 0, "{tb}");
    assert!(json["bars"][0].get("unseen_words").is_none(), "{json}");
    // screens and scenes feed the bar without a target half each
    let other: Vec<_> = report
        .answers
        .iter()
        .filter(|g| g.bar == Bar::Other)
        .collect();
    let from_screens = other
        .iter()
        .filter(|g| g.source.starts_with("screen "))
        .count();
    assert_eq!((from_screens, other.len() - from_screens), (6, 6));
    // easy-VQA: image k gives its question k mod n
    let easy: Vec<_> = report
        .answers
        .iter()
        .filter(|g| g.bar == Bar::EasyVqa)
        .collect();
    assert_eq!(easy[0].question, "what color is the shape?");
    assert_eq!(easy[1].question, "what shape is present?");
}

/// The titles-and-buttons bar takes the first `per_bar` title and button questions of the
/// held-out screens in index order whatever the model answers, the unseen-words slice is the
/// ones among them whose answer holds a held-out word, and a model that cannot read the unseen
/// words scores on the bar but not on the slice.
#[test]
fn the_unseen_words_slice_is_the_bars_own_questions_with_unseen_words() {
    let per_bar = 60;
    // the bar's questions, walked independently of `evaluate`
    let mut want = vec![];
    let mut i = 0;
    while want.len() < per_bar {
        let s = generate(SynthKind::Screen, Split::HeldOut, i);
        for q in &s.qa {
            if matches!(q.category, QaCategory::Title | QaCategory::Button) && want.len() < per_bar
            {
                want.push((i, q.question.clone(), q.answer.clone()));
            }
        }
        i += 1;
    }
    let oracle = held_out_answers();
    let spec = EvalSpec {
        per_bar,
        bars: vec![Bar::TitlesButtons],
    };
    // an oracle that answers "?" to every question whose answer holds an unseen word
    let report = evaluate(
        &spec,
        None,
        &mut |s, qs| {
            let h = pixels_hash(&s.image);
            Ok(qs
                .iter()
                .map(|q| {
                    let a = oracle[&(h, q.clone())].clone();
                    if afm_train::vocab::has_held_out_word(&a) {
                        "?".to_string()
                    } else {
                        a
                    }
                })
                .collect())
        },
        &mut |_, _| {},
    )
    .unwrap();
    let got: Vec<_> = report
        .answers
        .iter()
        .map(|g| (g.source.clone(), g.question.clone(), g.expected.clone()))
        .collect();
    let want: Vec<_> = want
        .into_iter()
        .map(|(i, q, a)| (format!("screen {i}"), q, a))
        .collect();
    assert_eq!(got, want);
    let b = &report.bars[0];
    let u = b.unseen_words.unwrap();
    let n_unseen = want
        .iter()
        .filter(|(_, _, a)| afm_train::vocab::has_held_out_word(a))
        .count();
    assert_eq!(u.total, n_unseen);
    // about a third of titles and button labels, fewer of the questions' answers
    assert!(u.total >= per_bar / 8 && u.total <= per_bar / 2, "{u:?}");
    assert_eq!(u.correct, 0);
    assert_eq!(b.score.correct, per_bar - n_unseen);
}

#[test]
fn a_constant_answer_fails_the_bars_and_wrong_counts_are_errors() {
    let spec = EvalSpec {
        per_bar: 10,
        bars: vec![Bar::TitlesButtons, Bar::SceneColourCount],
    };
    let r = evaluate(
        &spec,
        None,
        &mut |_img, qs| Ok(vec!["yes".to_string(); qs.len()]),
        &mut |_, _| {},
    )
    .unwrap();
    for b in &r.bars {
        assert_eq!(b.score.total, 10);
        assert!(b.score.correct < 10, "{:?}", b.bar);
        if let Some(u) = b.unseen_words {
            assert_eq!(u.correct, 0, "{:?}", b.bar);
        }
        assert_eq!(b.passed, Some(false));
    }
    let e = evaluate(&spec, None, &mut |_img, _qs| Ok(vec![]), &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("answers to"), "{e}");
    let e = evaluate(
        &EvalSpec {
            per_bar: 5,
            bars: vec![Bar::EasyVqa],
        },
        None,
        &mut |_img, qs| Ok(vec![String::new(); qs.len()]),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("easy-VQA"), "{e}");
}

#[test]
fn the_lenient_grade_matches_whole_words_only() {
    use afm_train::eval::contains_answer;
    assert!(contains_answer("The answer is 4.", "4"));
    assert!(contains_answer("It says \"Not Now\".", "not now"));
    assert!(contains_answer("The version is 0.14.14.", "0.14.14"));
    assert!(contains_answer(
        "It is /home/hana/Activity",
        "/home/hana/Activity"
    ));
    assert!(contains_answer("The time is 11:00.", "11:00"));
    assert!(!contains_answer("The answer is 14.", "4"));
    assert!(!contains_answer("Nothing", "no"));
    assert!(!contains_answer("anything", ""));
    assert!(!contains_answer("", "yes"));
}
