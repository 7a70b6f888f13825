//! The frozen language model zero-shot on `afm eval`'s questions: SmolLM2-135M-Instruct
//! (the LM afm-tiny is trained against, never trained here) answers every held-out question
//! with the image's **ground-truth description as text** where afm-tiny puts its image tokens.
//! This is the zero-shot half of the reference: it shows how the untrained LM reads and
//! answers, not a bound (afm-tiny's trained adapter also steers the answer's form, which is
//! why a lenient "contains the answer" score is printed next to exact match, and
//! `prompt_oracle.rs` is the trained half).
//!
//! ```text
//! cargo run --release -p afm-train --example text_oracle -- LM.gguf [PER_BAR] [--json FILE]
//! ```
//!
//! The questions and the exact-match grading are `afm eval`'s (`afm_train::eval`, 200 per bar
//! by default; the easy-VQA bar needs `scripts/fetch_easy_vqa.sh`). Two prompts:
//!
//! * `same format`: afm-tiny's prompt (`afm_train::prompt`) with the caption text in place of
//!   the image placeholders: `{caption}\n{question}` as the user turn of SmolLM2's ChatML;
//! * `instructed`: the same, with the system turn "Answer the question about the described
//!   image with a single word or number.", the LM's best chance at afm-tiny's answer form.
//!
//! Scores per bar: exact match (trimmed answer == expected, `afm eval`'s rule) and `contains`
//! (the expected answer occurs in the output as a whole word, case-insensitive; an upper bound
//! that forgives the form). The captions hold titles, button labels, shapes, colours and
//! counts (as number words for scenes), so the title/button, easy-VQA and scene bars are
//! answerable from them; the `other` bar's fields, list items and positions mostly are not.

use afm_lm::chat::{end_of_turn_ids, render_chat, Message};
use afm_lm::generate::{generate, GenerateOptions};
use afm_lm::load::Checkpoint;
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::eval::{contains_answer, evaluate, Bar, EvalSpec, Report};
use afm_train::Split;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const INSTRUCTION: &str =
    "Answer the question about the described image with a single word or number.";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: text_oracle LM.gguf [PER_BAR] [--json FILE]";
    let mut pos = vec![];
    let mut json: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--json" {
            json = Some(it.next().ok_or(usage)?.into());
        } else {
            pos.push(a.clone());
        }
    }
    let lm_path = PathBuf::from(pos.first().ok_or(usage)?);
    let per_bar: usize = match pos.get(1) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("PER_BAR must be a number, got `{s}`"))?,
        None => 200,
    };
    let ck = Checkpoint::load(&lm_path)?;
    let stops = end_of_turn_ids(&ck.tokenizer);
    let easy = EasyVqa::open(&data_dir(Path::new(".")), Split::HeldOut).ok();
    let mut bars = Bar::ALL.to_vec();
    if easy.is_none() {
        eprintln!("easy-VQA data not found (scripts/fetch_easy_vqa.sh): its bar is skipped");
        bars.retain(|&b| b != Bar::EasyVqa);
    }
    let spec = EvalSpec { per_bar, bars };
    let mut out = serde_json::Map::new();
    for (name, system) in [("same format", None), ("instructed", Some(INSTRUCTION))] {
        let t0 = Instant::now();
        let report: Report = evaluate(
            &spec,
            easy.as_ref(),
            &mut |sample, questions| {
                questions
                    .iter()
                    .map(|q| {
                        let mut msgs = vec![];
                        if let Some(s) = system {
                            msgs.push(Message::system(s));
                        }
                        msgs.push(Message::user(format!("{}\n{q}", sample.caption)));
                        let text = render_chat(&ck.tokenizer, &msgs)?;
                        let ids = ck.tokenizer.encode(&text)?;
                        let opts = GenerateOptions {
                            max_new_tokens: 16,
                            stop_tokens: stops.clone(),
                            ..Default::default()
                        };
                        let g = generate(&ck.model, &ck.tokenizer, &ids, &opts, &mut |_| true)?;
                        Ok(g.text)
                    })
                    .collect()
            },
            &mut |_, _| {},
        )
        .map_err(|e| e.to_string())?;
        println!(
            "\n## {name} ({} questions in {:.0} s)\n",
            report.answers.len(),
            t0.elapsed().as_secs_f64()
        );
        println!("| bar | exact | contains | target |\n|---|---:|---:|---:|");
        let mut by_cat: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        for b in &report.bars {
            let gs: Vec<_> = report.answers.iter().filter(|g| g.bar == b.bar).collect();
            let n = gs.len().max(1) as f64;
            let contains = gs
                .iter()
                .filter(|g| contains_answer(&g.answer, &g.expected))
                .count();
            println!(
                "| {} | {:.1}% ({}/{}) | {:.1}% | {} |",
                b.label,
                100.0 * b.score.fraction(),
                b.score.correct,
                b.score.total,
                100.0 * contains as f64 / n,
                b.target
                    .map(|t| format!("{:.0}%", 100.0 * t))
                    .unwrap_or_else(|| "--".into())
            );
            for g in gs {
                let cat = serde_json::to_value(g.category)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                let e = by_cat.entry(cat).or_default();
                e.0 += g.correct as usize;
                e.1 += contains_answer(&g.answer, &g.expected) as usize;
                e.2 += 1;
            }
        }
        let cats: Vec<String> = by_cat
            .iter()
            .map(|(c, (x, k, n))| format!("{c} {x}/{k}/{n}"))
            .collect();
        println!("\nper category (exact/contains/total): {}", cats.join(", "));
        for g in report.answers.iter().take(6) {
            println!(
                "  e.g. {:?} -> {:?} (expected {:?})",
                g.question, g.answer, g.expected
            );
        }
        out.insert(name.into(), serde_json::to_value(&report)?);
    }
    if let Some(p) = json {
        serde_json::to_writer_pretty(std::fs::File::create(&p)?, &out)?;
        eprintln!("answers written to {}", p.display());
    }
    Ok(())
}
