//! `afm eval`: the quality bars of the embedded default model (or any afm-tiny export or
//! SmolVLM checkpoint) on the held-out split: easy-VQA test accuracy, screenshot titles and
//! button labels read exactly, scene colour and count questions, and the other screen and
//! scene questions without a target; and the titles-and-buttons bar restricted to its questions
//! with words never seen in training, on a line of its own. Which questions, and how they are
//! graded: [`afm_train::eval`]. Greedy answers; the table goes to stdout, progress to stderr.

use crate::vlm_cmd::ModelArgs;
use afm::fusion::AskOptions;
use afm::lm::generate::GenerateOptions;
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::eval::{evaluate, evaluate_captions, Bar, EvalSpec, Report, Spread};
use afm_train::spread::{spread, token_mean};
use afm_train::Split;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Questions per bar.
    #[arg(long, default_value_t = 200, value_name = "N")]
    per_bar: usize,
    /// Leave the easy-VQA bar out (its data comes from `bash scripts/fetch_easy_vqa.sh`, into
    /// `models/easy-vqa` or `$AFM_EASY_VQA_DIR`).
    #[arg(long)]
    no_easy_vqa: bool,
    /// Also write the report with every question, expected and given answer as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Also caption this many held-out images of each source (scenes, screens, easy-VQA)
    /// and grade the captions against the references (word F1, distinct captions); 0: none.
    #[arg(long, default_value_t = 20, value_name = "N")]
    captions: usize,
}

/// Longest caption `afm eval` asks for, in tokens.
const CAPTION_TOKENS: usize = 48;

pub(crate) fn cmd_eval(a: &EvalArgs) -> Result<()> {
    if a.per_bar == 0 {
        bail!("--per-bar must be at least 1");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let mut bars: Vec<Bar> = Bar::ALL.to_vec();
    let easy = if a.no_easy_vqa {
        bars.retain(|&b| b != Bar::EasyVqa);
        None
    } else {
        // the current directory's models/easy-vqa (or $AFM_EASY_VQA_DIR), else the source
        // tree's, where the default model is found too
        let mut root = data_dir(&std::env::current_dir()?);
        if !root.exists() {
            let tree = data_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
            if tree.exists() {
                root = tree;
            }
        }
        if !root.exists() {
            bail!(
                "the easy-VQA test data is not at {}: run `bash scripts/fetch_easy_vqa.sh` \
                 (PyPI easy-vqa 1.0, sha256-checked), set AFM_EASY_VQA_DIR, or pass --no-easy-vqa",
                root.display()
            );
        }
        Some(EasyVqa::open(&root, Split::HeldOut).context("reading the easy-VQA test split")?)
    };
    // a bad --json path fails now, not after the run
    let json_file = match &a.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let (model, _) = a.model.open()?;
    let (vlm, load_secs) = a.model.load(&model)?;
    eprintln!(
        "loaded {} in {load_secs:.1} s; {} questions per bar, greedy, exact match",
        vlm.model_type(),
        a.per_bar
    );
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: a.max_tokens,
            ..Default::default()
        },
        max_image_tokens: None,
    };
    let spec = EvalSpec {
        per_bar: a.per_bar,
        bars: bars.clone(),
    };
    let bar = ProgressBar::new((spec.per_bar * bars.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} questions, {per_sec}, {eta} left")
            .expect("static template"),
    );
    let t0 = Instant::now();
    // every evaluated image's image tokens, averaged: their spread shows a collapse
    let mut means: Vec<Vec<f32>> = Vec::new();
    let mut report = evaluate(
        &spec,
        easy.as_ref(),
        &mut |sample, questions| {
            // encoded once here; `ask` finds it in the image cache
            let enc = vlm.encode_image(&sample.image, opts.max_image_tokens)?;
            means.push(token_mean(&enc.embeds)?);
            questions
                .iter()
                .map(|q| {
                    let ans = vlm.ask(&sample.image, q, &opts, &mut |_| true)?;
                    Ok(ans.generation.text)
                })
                .collect()
        },
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .map_err(|e| anyhow!("evaluation: {e}"))?;
    bar.finish_and_clear();
    report.image_token_spread = spread(&means).map(|value| Spread {
        value,
        images: means.len(),
    });
    let questions_secs = t0.elapsed().as_secs_f64();
    if a.captions > 0 {
        let cap_opts = AskOptions {
            generate: GenerateOptions {
                max_new_tokens: CAPTION_TOKENS,
                ..Default::default()
            },
            max_image_tokens: None,
        };
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} captions, {eta} left")
                .expect("static template"),
        );
        report.captions = Some(
            evaluate_captions(
                a.captions,
                easy.as_ref(),
                &mut |sample| {
                    Ok(vlm
                        .caption(&sample.image, &cap_opts, &mut |_| true)?
                        .generation
                        .text)
                },
                &mut |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            )
            .map_err(|e| anyhow!("captions: {e}"))?,
        );
        bar.finish_and_clear();
    }
    let secs = t0.elapsed().as_secs_f64();
    print!("{}", table(&report));
    eprintln!(
        "{} questions in {questions_secs:.0} s ({:.1} questions/s){}",
        report.answers.len(),
        report.answers.len() as f64 / questions_secs.max(1e-9),
        match &report.captions {
            Some(c) => format!(", {} captions in {:.0} s", c.total, secs - questions_secs),
            None => String::new(),
        }
    );
    if let (Some(path), Some(f)) = (&a.json, json_file) {
        serde_json::to_writer_pretty(std::io::BufWriter::new(f), &report)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// The label of the table's line for the questions with words never seen in training.
pub(crate) const UNSEEN_LINE: &str = "with words never seen in training";

/// The report as a plain-text table: one line per bar (exact matches, percentage, target,
/// PASS / BELOW), for the titles-and-buttons bar a line for its questions with words never
/// seen in training, then its categories.
pub(crate) fn table(r: &Report) -> String {
    let mut s = String::from("held-out split, exact match:\n");
    for b in &r.bars {
        let verdict = match (b.target, b.passed) {
            (Some(t), Some(true)) => format!("target {:.0}%  PASS", t * 100.0),
            (Some(t), _) => format!("target {:.0}%  BELOW", t * 100.0),
            (None, _) => String::new(),
        };
        s.push_str(&format!(
            "{:<50} {:>4}/{:<4} {:>6.1}%  {verdict}\n",
            b.label,
            b.score.correct,
            b.score.total,
            b.score.fraction() * 100.0
        ));
        if b.score.total < b.requested {
            s.push_str(&format!(
                "    (only {} of the {} questions asked for exist)\n",
                b.score.total, b.requested
            ));
        }
        if let Some(u) = &b.unseen_words {
            s.push_str(&format!(
                "  {:<48} {:>4}/{:<4} {:>6.1}%\n",
                UNSEEN_LINE,
                u.correct,
                u.total,
                u.fraction() * 100.0
            ));
        }
        for (c, sc) in &b.by_category {
            s.push_str(&format!(
                "    {:<46} {:>4}/{:<4} {:>6.1}%\n",
                c,
                sc.correct,
                sc.total,
                sc.fraction() * 100.0
            ));
        }
    }
    if let Some(c) = &r.captions {
        s.push_str(&format!(
            "{CAPTION_LINE}: mean word F1 {:.3} over {} captions ({}), {} exact, {} distinct (no target)\n",
            c.mean_word_f1,
            c.total,
            c.by_source
                .iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            c.exact.correct,
            c.distinct
        ));
        for g in c.captions.iter().take(3) {
            s.push_str(&format!(
                "    {}: \"{}\" (reference \"{}\")\n",
                g.source, g.caption, g.expected
            ));
        }
    }
    if let Some(sp) = &r.image_token_spread {
        s.push_str(&format!(
            "{SPREAD_LINE} over {} images: {:.3} (0 = every image gets the same tokens)\n",
            sp.images, sp.value
        ));
    }
    s
}

/// The start of the table's caption line.
pub(crate) const CAPTION_LINE: &str = "held-out captions";

/// The start of the table's image-token spread line.
pub(crate) const SPREAD_LINE: &str = "image-token spread";

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of a stand-in model that reads every title and button label but those with
    /// words never seen in training: the bar line, then the unseen-words line at 0%.
    #[test]
    fn the_table_reports_the_unseen_words_slice_on_its_own_line() {
        let spec = EvalSpec {
            per_bar: 40,
            bars: vec![Bar::TitlesButtons, Bar::SceneColourCount, Bar::Other],
        };
        let report = evaluate(
            &spec,
            None,
            &mut |sample, questions| {
                Ok(questions
                    .iter()
                    .map(|q| {
                        let qa = sample.qa.iter().find(|a| &a.question == q).unwrap();
                        if qa.unseen {
                            "?".to_string()
                        } else {
                            qa.answer.clone()
                        }
                    })
                    .collect())
            },
            &mut |_, _| {},
        )
        .unwrap();
        let t = table(&report);
        println!("{t}");
        let u = report.bars[0].unseen_words.unwrap();
        assert!(u.total > 0 && u.correct == 0, "{u:?}");
        let lines: Vec<&str> = t.lines().collect();
        let bar = lines
            .iter()
            .position(|l| l.starts_with(Bar::TitlesButtons.label()))
            .unwrap();
        let want = format!("  {UNSEEN_LINE:<48} {:>4}/{:<4} {:>6.1}%", 0, u.total, 0.0);
        assert_eq!(lines[bar + 1], want, "{t}");
        assert_eq!(t.matches(UNSEEN_LINE).count(), 1, "{t}");
    }
}
