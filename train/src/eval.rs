//! The quality bars of issue 6 point 4, measured on the HELD-OUT split (what `afm eval`
//! prints).
//!
//! Three bars, each over the first `per_bar` questions of its kind met when walking the
//! held-out samples in index order (for generated samples every matching question of a sample
//! is taken before the next sample; for easy-VQA, whose images carry about ten correlated
//! questions each, image number `k` gives only its question number `k mod n`, so the questions
//! spread over `per_bar` images; nothing is chosen by how the model does):
//!
//! | bar | questions | target |
//! | --- | --- | --- |
//! | [`Bar::EasyVqa`] | the easy-VQA `test` folder, images by ascending id | 85% |
//! | [`Bar::TitlesButtons`] | held-out screenshots, [`QaCategory::Title`] and [`QaCategory::Button`] | 80% |
//! | [`Bar::SceneColourCount`] | held-out scenes, [`QaCategory::Colour`] and [`QaCategory::Count`] | 85% |
//!
//! plus, without a target, [`Bar::Other`]: the remaining categories of held-out screenshots and
//! scenes (fields, list items and counts, checkboxes, dialog messages, shapes, presence,
//! positions), so that the report shows what else the model reads.
//!
//! # Words never seen in training
//!
//! Some held-out titles and button labels are made with words that no training sample holds
//! ([`crate::vocab`]'s held-out words: about a third of the held-out screens' titles and of
//! their button labels). [`Bar::TitlesButtons`] also reports its exact matches over just its
//! questions whose expected answer holds such a word ([`crate::Qa::unseen`],
//! [`Graded::unseen`]): [`BarReport::unseen_words`], the line "with words never seen in
//! training" of `afm eval`. It is a slice of the bar's questions, not a selection of its own:
//! the bar takes the same questions as it would without it (index order), and the slice is
//! whichever of them have such a word (about a third), so it has fewer questions than the bar
//! and its count is part of the report. In the JSON report (`afm eval --json`) it is the
//! `titles_buttons` bar's `unseen_words` (`correct`, `total`; absent from the other bars), and
//! every answer has `unseen`.
//!
//! An answer counts when its trimmed text equals the expected answer exactly (the same rule as
//! the training run's held-out evaluation). The model is a closure from a sample (a model
//! reads only its image) and its questions to the answers (a model may encode the image once
//! for all of them). A bar that
//! ran out of questions (easy-VQA has 1,000 test images) reports how many it got
//! ([`BarReport::requested`]).

use crate::easy_vqa::EasyVqa;
use crate::{generate, QaCategory, Sample, Split, SynthKind};
use serde::Serialize;
use std::collections::BTreeMap;

/// One quality bar (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bar {
    EasyVqa,
    TitlesButtons,
    SceneColourCount,
    Other,
}

impl Bar {
    pub const ALL: [Bar; 4] = [
        Bar::EasyVqa,
        Bar::TitlesButtons,
        Bar::SceneColourCount,
        Bar::Other,
    ];

    /// The target exact-match fraction, `None` for [`Bar::Other`].
    pub fn target(self) -> Option<f64> {
        match self {
            Bar::EasyVqa => Some(0.85),
            Bar::TitlesButtons => Some(0.80),
            Bar::SceneColourCount => Some(0.85),
            Bar::Other => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Bar::EasyVqa => "easy-VQA test questions",
            Bar::TitlesButtons => "screens: titles and button labels read exactly",
            Bar::SceneColourCount => "scenes: colour and count questions",
            Bar::Other => "other screen and scene questions (no target)",
        }
    }

    /// Which bar a question of `sample` belongs to.
    fn of(sample: &Sample, c: QaCategory) -> Bar {
        use QaCategory::*;
        match (sample.kind, c) {
            (crate::Kind::EasyVqa, _) => Bar::EasyVqa,
            (crate::Kind::Screen, Title | Button) => Bar::TitlesButtons,
            (crate::Kind::Scene, Colour | Count) => Bar::SceneColourCount,
            _ => Bar::Other,
        }
    }
}

/// One answered question.
#[derive(Clone, Debug, Serialize)]
pub struct Graded {
    pub bar: Bar,
    pub category: QaCategory,
    /// `screen`, `scene` or `easy_vqa` and the sample's index in its held-out split.
    pub source: String,
    pub question: String,
    pub expected: String,
    pub answer: String,
    pub correct: bool,
    /// Whether `expected` holds a word never seen in training ([`crate::Qa::unseen`]).
    pub unseen: bool,
}

/// Exact-match counts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
}

impl Score {
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
    fn add(&mut self, ok: bool) {
        self.total += 1;
        self.correct += ok as usize;
    }
}

/// The figures of one bar.
#[derive(Clone, Debug, Serialize)]
pub struct BarReport {
    pub bar: Bar,
    pub label: &'static str,
    pub target: Option<f64>,
    pub score: Score,
    /// Questions asked for (`score.total` is less when the source ran out).
    pub requested: usize,
    /// Whether the target is met (`None` without a target or without questions).
    pub passed: Option<bool>,
    pub by_category: BTreeMap<String, Score>,
    /// For [`Bar::TitlesButtons`] only (absent from the JSON for the other bars): the
    /// exact matches over the bar's questions whose answer holds a word never seen in training
    /// (module docs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unseen_words: Option<Score>,
}

/// The whole evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub bars: Vec<BarReport>,
    pub answers: Vec<Graded>,
    /// [`crate::spread`] of the evaluated images' image tokens, when the caller measured it
    /// (`afm eval` does): near 0 means the model gives every image the same tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_token_spread: Option<Spread>,
    /// Captions of held-out images ([`evaluate_captions`]), when the caller asked for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captions: Option<CaptionReport>,
}

/// An image-token spread and how many images it is over.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub value: f32,
    pub images: usize,
}

impl Report {
    fn from_graded(answers: Vec<Graded>, bars: &[Bar], requested: usize) -> Report {
        let bars = bars
            .iter()
            .map(|&bar| {
                let mut score = Score::default();
                let mut by_category: BTreeMap<String, Score> = BTreeMap::new();
                for g in answers.iter().filter(|g| g.bar == bar) {
                    score.add(g.correct);
                    let name = serde_json::to_value(g.category)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("{:?}", g.category));
                    by_category.entry(name).or_default().add(g.correct);
                }
                let unseen_words = (bar == Bar::TitlesButtons).then(|| {
                    let mut s = Score::default();
                    for g in answers.iter().filter(|g| g.bar == bar && g.unseen) {
                        s.add(g.correct);
                    }
                    s
                });
                let passed = match (bar.target(), score.total) {
                    (Some(t), n) if n > 0 => Some(score.fraction() >= t),
                    _ => None,
                };
                BarReport {
                    bar,
                    label: bar.label(),
                    target: bar.target(),
                    score,
                    requested,
                    passed,
                    by_category,
                    unseen_words,
                }
            })
            .collect();
        Report {
            bars,
            answers,
            image_token_spread: None,
            captions: None,
        }
    }
}

/// Whether `expected` occurs in `answer` as whole words, ignoring case and punctuation: a
/// lenient grade that forgives the answer's form ("The answer is 4." for "4"), used next to
/// exact match by the reference baselines (`examples/text_oracle.rs`), never by the bars.
pub fn contains_answer(answer: &str, expected: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.to_lowercase()
            .split(|c: char| !c.is_alphanumeric() && !matches!(c, '_' | '/' | ':' | '.'))
            .map(|w| w.trim_matches('.'))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (a, e) = (words(answer), words(expected));
    !e.is_empty() && a.windows(e.len()).any(|w| w == e.as_slice())
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalSpec {
    /// Questions per bar.
    pub per_bar: usize,
    /// The bars to measure ([`Bar::EasyVqa`] needs `easy`).
    pub bars: Vec<Bar>,
}

/// Error of an evaluation: the model's or the data's.
pub type EvalError = Box<dyn std::error::Error + Send + Sync>;

/// Held-out sample `index` of `source` (`easy_vqa`, `screen`, else scenes); `None` past the
/// end of easy-VQA's test folder. `easy` must be given for `easy_vqa`.
fn held_out_sample(
    source: &str,
    index: u64,
    easy: Option<&EasyVqa>,
) -> Result<Option<Sample>, EvalError> {
    Ok(match source {
        "easy_vqa" => {
            let e = easy.ok_or("the easy-VQA source needs the easy-VQA test data")?;
            if index as usize >= e.len() {
                return Ok(None);
            }
            Some(e.get(index as usize)?)
        }
        "screen" => Some(generate(SynthKind::Screen, Split::HeldOut, index)),
        _ => Some(generate(SynthKind::Scene, Split::HeldOut, index)),
    })
}

/// Walks the held-out samples (module docs) and grades `answer(sample, questions)`, which
/// returns one answer per question (a model reads `sample.image`; the sample's other fields
/// are its ground truth, for reference baselines such as `examples/text_oracle.rs`). `progress(done, total)` is called after each sample.
pub fn evaluate(
    spec: &EvalSpec,
    easy: Option<&EasyVqa>,
    answer: &mut dyn FnMut(&Sample, &[String]) -> Result<Vec<String>, EvalError>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, EvalError> {
    if spec.per_bar == 0 {
        return Err("questions per bar must be at least 1".into());
    }
    if let Some(e) = easy {
        if e.split() != Split::HeldOut {
            return Err("easy-VQA must be its held-out (`test`) split".into());
        }
    }
    let want = |b: Bar| spec.bars.contains(&b);
    if want(Bar::EasyVqa) && easy.is_none() {
        return Err("the easy-VQA bar needs the easy-VQA test data".into());
    }
    let total = spec.per_bar * spec.bars.len();
    let mut graded: Vec<Graded> = Vec::with_capacity(total);
    let mut count: BTreeMap<Bar, usize> = BTreeMap::new();
    let full =
        |count: &BTreeMap<Bar, usize>, b: Bar| count.get(&b).copied().unwrap_or(0) >= spec.per_bar;

    // The sources in turn, each with the bars it can feed, kept to the wanted ones.
    let sources: Vec<(&str, Vec<Bar>)> = [
        ("easy_vqa", &[Bar::EasyVqa][..]),
        ("screen", &[Bar::TitlesButtons, Bar::Other]),
        ("scene", &[Bar::SceneColourCount, Bar::Other]),
    ]
    .into_iter()
    .map(|(source, bars)| (source, bars.iter().copied().filter(|&b| want(b)).collect()))
    .filter(|(_, feeds): &(&str, Vec<Bar>)| !feeds.is_empty())
    .collect();
    for (source, feeds) in sources {
        let mut index = 0u64;
        // `Other` is shared by screens and scenes: half from the screens, the rest from the
        // scenes.
        let cap = |b: Bar| {
            if b == Bar::Other && source == "screen" {
                spec.per_bar.div_ceil(2)
            } else {
                spec.per_bar
            }
        };
        // Every generated sample has questions of every bar it feeds; this bound only guards
        // against a generator that stopped asking them.
        let max_samples = 50 * spec.per_bar as u64 + 100;
        let mut local: BTreeMap<Bar, usize> = BTreeMap::new();
        loop {
            if feeds
                .iter()
                .all(|&b| local.get(&b).copied().unwrap_or(0) >= cap(b) || full(&count, b))
            {
                break;
            }
            if index >= max_samples {
                break;
            }
            let Some(sample) = held_out_sample(source, index, easy)? else {
                break;
            };
            let mut picked = vec![];
            let one = (source == "easy_vqa").then(|| index as usize % sample.qa.len().max(1));
            for (qi, qa) in sample.qa.iter().enumerate() {
                if one.is_some_and(|k| k != qi) {
                    continue;
                }
                let bar = Bar::of(&sample, qa.category);
                if !feeds.contains(&bar) {
                    continue;
                }
                let n = local.entry(bar).or_default();
                if *n >= cap(bar) || full(&count, bar) {
                    continue;
                }
                *n += 1;
                *count.entry(bar).or_default() += 1;
                picked.push((bar, qa));
            }
            if !picked.is_empty() {
                let questions: Vec<String> =
                    picked.iter().map(|(_, q)| q.question.clone()).collect();
                let got = answer(&sample, &questions)?;
                if got.len() != questions.len() {
                    return Err(format!(
                        "the model gave {} answers to {} questions",
                        got.len(),
                        questions.len()
                    )
                    .into());
                }
                for ((bar, qa), a) in picked.into_iter().zip(got) {
                    graded.push(Graded {
                        bar,
                        category: qa.category,
                        source: format!("{source} {}", sample.index),
                        question: qa.question.clone(),
                        expected: qa.answer.clone(),
                        correct: a.trim() == qa.answer.trim(),
                        answer: a,
                        unseen: qa.unseen,
                    });
                }
                progress(graded.len(), total);
            }
            index += 1;
        }
    }
    Ok(Report::from_graded(graded, &spec.bars, spec.per_bar))
}

/// Captions of held-out images against their reference captions: how close in words, and
/// whether the model gives different images different captions (a model that answers every
/// image with one stock caption has few distinct captions). `afm eval` prints it under the
/// bars; there is no target.
#[derive(Clone, Debug, Serialize)]
pub struct CaptionReport {
    /// Mean word F1 ([`word_f1`]) over every caption.
    pub mean_word_f1: f64,
    /// Captions equal to the reference (trimmed, case-insensitive).
    pub exact: Score,
    /// Different captions given, over captions asked.
    pub distinct: usize,
    pub total: usize,
    /// Mean word F1 per source (`scene`, `screen`, `easy_vqa`).
    pub by_source: BTreeMap<String, f64>,
    pub captions: Vec<GradedCaption>,
}

/// One caption.
#[derive(Clone, Debug, Serialize)]
pub struct GradedCaption {
    /// `screen`, `scene` or `easy_vqa` and the sample's index in its held-out split.
    pub source: String,
    pub expected: String,
    pub caption: String,
    pub word_f1: f64,
}

/// The lower-case words of `s` (letters and digits; everything else separates).
fn caption_words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Word F1 of `got` against `want`: the harmonic mean of the fractions of `got`'s words found
/// in `want` and of `want`'s words found in `got`, each word counted as often as it occurs in
/// both (multiset overlap); 1 for equal word lists, 0 with no word in common.
pub fn word_f1(got: &str, want: &str) -> f64 {
    let (g, w) = (caption_words(got), caption_words(want));
    if g.is_empty() || w.is_empty() {
        return (g.is_empty() && w.is_empty()) as u8 as f64;
    }
    let mut left: BTreeMap<&str, usize> = BTreeMap::new();
    for x in &w {
        *left.entry(x).or_default() += 1;
    }
    let mut common = 0usize;
    for x in &g {
        if let Some(n) = left.get_mut(x.as_str()) {
            if *n > 0 {
                *n -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (p, r) = (
        common as f64 / g.len() as f64,
        common as f64 / w.len() as f64,
    );
    2.0 * p * r / (p + r)
}

/// Captions of the first `per_source` held-out samples of each source (scenes, screens, and
/// easy-VQA when given), in index order, by `caption(sample)`; samples without a reference
/// caption are skipped. `progress(done, total)` after each.
pub fn evaluate_captions(
    per_source: usize,
    easy: Option<&EasyVqa>,
    caption: &mut dyn FnMut(&Sample) -> Result<String, EvalError>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CaptionReport, EvalError> {
    let sources: Vec<&str> = ["scene", "screen", "easy_vqa"]
        .into_iter()
        .filter(|&s| s != "easy_vqa" || easy.is_some())
        .collect();
    let total = per_source * sources.len();
    let mut out: Vec<GradedCaption> = Vec::with_capacity(total);
    for source in sources {
        let (mut index, mut taken) = (0usize, 0usize);
        while taken < per_source && index < 50 * per_source + 100 {
            let Some(sample) = held_out_sample(source, index as u64, easy)? else {
                break;
            };
            index += 1;
            if sample.caption.trim().is_empty() {
                continue;
            }
            let got = caption(&sample)?;
            out.push(GradedCaption {
                source: format!("{source} {}", sample.index),
                word_f1: word_f1(&got, &sample.caption),
                expected: sample.caption.clone(),
                caption: got,
            });
            taken += 1;
            progress(out.len(), total);
        }
    }
    let n = out.len();
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for c in &out {
        let src = c.source.split(' ').next().unwrap_or("").to_string();
        let e = sums.entry(src).or_default();
        e.0 += c.word_f1;
        e.1 += 1;
    }
    let by_source = sums
        .into_iter()
        .map(|(k, (sum, count))| (k, sum / count as f64))
        .collect();
    let mut exact = Score::default();
    for c in &out {
        exact.add(c.caption.trim().to_lowercase() == c.expected.trim().to_lowercase());
    }
    let distinct = out
        .iter()
        .map(|c| c.caption.trim().to_lowercase())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    Ok(CaptionReport {
        mean_word_f1: if n == 0 {
            0.0
        } else {
            out.iter().map(|c| c.word_f1).sum::<f64>() / n as f64
        },
        exact,
        distinct,
        total: n,
        by_source,
        captions: out,
    })
}

#[cfg(test)]
mod caption_tests {
    use super::*;

    #[test]
    fn word_f1_counts_shared_words() {
        assert_eq!(word_f1("A red circle.", "a red circle"), 1.0);
        assert_eq!(word_f1("A blue square.", "Two green stars"), 0.0);
        // 2 of 3 words right, 2 of 4 reference words found: p 2/3, r 1/2
        let f = word_f1("a red square", "a red circle here");
        assert!(
            (f - 2.0 * (2.0 / 3.0) * 0.5 / (2.0 / 3.0 + 0.5)).abs() < 1e-12,
            "{f}"
        );
        // repeated words count once per occurrence in both
        assert!((word_f1("red red red", "red") - 0.5).abs() < 1e-12);
        assert_eq!(word_f1("", ""), 1.0);
        assert_eq!(word_f1("", "a"), 0.0);
    }

    #[test]
    fn captions_grade_a_copying_model_perfectly_and_a_stock_caption_poorly() {
        let truth =
            evaluate_captions(6, None, &mut |s| Ok(s.caption.clone()), &mut |_, _| {}).unwrap();
        assert_eq!(truth.total, 12);
        assert_eq!(truth.exact.correct, 12);
        assert!((truth.mean_word_f1 - 1.0).abs() < 1e-12);
        assert!(truth.distinct > 6, "{}", truth.distinct);
        let stock = evaluate_captions(
            6,
            None,
            &mut |_| Ok("A green circle.".into()),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(stock.distinct, 1);
        assert!(stock.mean_word_f1 < 0.5, "{}", stock.mean_word_f1);
        assert_eq!(stock.by_source.len(), 2);
    }
}
