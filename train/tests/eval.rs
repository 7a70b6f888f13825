//! `afm_train::eval`: which held-out questions each quality bar takes, and the grading, with
//! stand-in models (an oracle that knows the held-out answers, a constant answer).

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
