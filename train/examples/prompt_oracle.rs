//! A trained reference for issue 6's bars: what the frozen SmolLM2-135M-Instruct reaches on
//! `afm eval`'s questions when it is given **everything the image shows, as text** (the
//! sample's ground-truth description) and, in afm-tiny's 36 image-token slots, a **trained
//! soft prompt** that can teach it the answer form, as afm-tiny's adapter can.
//!
//! ```text
//! cargo run --release -p afm-train --example prompt_oracle -- LM.gguf [STEPS] [PER_BAR] [--json FILE]
//! ```
//!
//! * Sequences: afm-tiny's prompt format (`afm_train::prompt`) with the user turn
//!   `{36 placeholders}\n{caption}\n{question}`; the 36 placeholders take the soft prompt
//!   (36 x 576 trained values, the same for every sequence; started at N(0, 0.131), SmolLM2's
//!   token-embedding RMS). The LM is frozen, exactly as in `afm train adapter`.
//! * Training: the stage-2 data order (`pretrain::example`: scenes, screens, easy-VQA in turn,
//!   training split), one question per sequence picked as stage 2 picks it (no caption turn:
//!   the caption is in the prompt), STEPS (default 300) steps of 8, AdamW lr 5e-3 (warm-up
//!   20, cosine), no weight decay.
//! * Evaluation: `afm eval`'s questions and exact-match rule (`afm_train::eval`, PER_BAR per
//!   bar, default 200), greedy with the fast inference LM (the same GGUF, KV cache), 16 tokens.
//!
//! The reference tells the frozen LM everything the bars ask about. A bar it gets close to
//! is lost on afm-tiny's vision side; a bar it stays far below asks more of the frozen LM than
//! it does with perfect information (evidence, not a proof: image tokens are not limited to
//! what words can say). Figures: the repository README.

use afm_fusion::splice;
use afm_lm::generate::{generate_from_embeds, GenerateOptions};
use afm_lm::load::Checkpoint;
use afm_train::adapter_train::{pick, sequence_loss, FrozenLm, SMOLLM2_EMBEDDING_RMS};
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::eval::{evaluate, Bar, EvalSpec};
use afm_train::optim::{AdamW, AdamWConfig, Params};
use afm_train::pretrain::example;
use afm_train::prompt::PromptFormat;
use afm_train::runloop::lr_at;
use afm_train::Split;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const TOKENS: usize = 36;
const BATCH: usize = 8;
const NAME: &str = "soft_prompt";

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxErr> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: prompt_oracle LM.gguf [STEPS] [PER_BAR] [--json FILE]";
    let (mut pos, mut json) = (vec![], None::<PathBuf>);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--json" {
            json = Some(it.next().ok_or(usage)?.into());
        } else {
            pos.push(a.clone());
        }
    }
    let lm_path = PathBuf::from(pos.first().ok_or(usage)?);
    let num = |i: usize, default: usize| -> Result<usize, BoxErr> {
        match pos.get(i) {
            Some(s) => Ok(s.parse().map_err(|_| format!("not a number: `{s}`"))?),
            None => Ok(default),
        }
    };
    let (steps, per_bar) = (num(1, 300)?, num(2, 200)?);
    let lm = FrozenLm::from_gguf(&lm_path)?;
    let hidden = lm.hidden_size();
    let fmt = PromptFormat::new(&lm.tokenizer, afm_train::prompt::IMAGE_PLACEHOLDER)?;
    let ph = fmt.placeholder_id();
    let easy_train = EasyVqa::open(&data_dir(Path::new(".")), Split::Train).ok();
    let easy_test = EasyVqa::open(&data_dir(Path::new(".")), Split::HeldOut).ok();

    // the soft prompt, seeded
    let init = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        // Box-Muller
        let v: Vec<f32> = (0..TOKENS * hidden)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                SMOLLM2_EMBEDDING_RMS
                    * (-2.0 * u1.ln()).sqrt()
                    * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        Tensor::from_vec(v, (TOKENS, hidden), &candle_core::Device::Cpu)?
    };
    let params = Params::from_tensors(HashMap::from([(NAME.to_string(), init)]))?;
    let cfg = AdamWConfig {
        lr: 5e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(&params, cfg)?;
    let t0 = Instant::now();
    let mut window = vec![];
    for step in 0..steps {
        let mut examples = vec![];
        for i in 0..BATCH {
            let j = (step * BATCH + i) as u64;
            let s = example(j, Split::Train, easy_train.as_ref())?;
            let (q, a, _) = pick(&s, j, false)?;
            examples.push(fmt.example(&format!("{}\n{q}", s.caption), &a, TOKENS)?);
        }
        let soft = params.get(NAME).ok_or("no soft prompt")?;
        let img = soft.unsqueeze(0)?.repeat((BATCH, 1, 1))?;
        let loss = sequence_loss(&lm.model, &examples, ph, &img)?;
        let grads = loss.backward()?;
        opt.step(&params, &grads, lr_at(cfg.lr, 20, steps, step))?;
        window.push(loss.to_scalar::<f32>()?);
        if (step + 1) % 20 == 0 || step + 1 == steps {
            let mean = window.iter().sum::<f32>() / window.len() as f32;
            window.clear();
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "step {:>4}/{steps}  loss {mean:.3}  {:.2} seq/s  {:.0} s",
                step + 1,
                ((step + 1) * BATCH) as f64 / secs,
                secs
            );
        }
    }
    let train_secs = t0.elapsed().as_secs_f64();

    // evaluation with the fast inference model
    let ck = Checkpoint::load(&lm_path)?;
    let soft = params.get(NAME).ok_or("no soft prompt")?.detach();
    let stops = vec![fmt.end_of_turn_id()];
    let mut bars = Bar::ALL.to_vec();
    if easy_test.is_none() {
        bars.retain(|&b| b != Bar::EasyVqa);
    }
    let spec = EvalSpec { per_bar, bars };
    let t1 = Instant::now();
    let report = evaluate(
        &spec,
        easy_test.as_ref(),
        &mut |sample, questions| {
            questions
                .iter()
                .map(|q| {
                    let ids = fmt.prompt_ids(&format!("{}\n{q}", sample.caption), TOKENS)?;
                    let embeds = splice(&ck.model, &ids, ph, Some(&soft))?;
                    let opts = GenerateOptions {
                        max_new_tokens: 16,
                        stop_tokens: stops.clone(),
                        ..Default::default()
                    };
                    let g = generate_from_embeds(
                        &ck.model,
                        &ck.tokenizer,
                        &embeds,
                        &ids,
                        &opts,
                        &mut |_| true,
                    )?;
                    Ok(g.text)
                })
                .collect()
        },
        &mut |_, _| {},
    )?;
    println!(
        "\ntrained {steps} steps of {BATCH} in {train_secs:.0} s; {} questions answered in {:.0} s\n",
        report.answers.len(),
        t1.elapsed().as_secs_f64()
    );
    println!("| bar | exact match | target |\n|---|---:|---:|");
    for b in &report.bars {
        let cats: Vec<String> = b
            .by_category
            .iter()
            .map(|(c, s)| format!("{c} {}/{}", s.correct, s.total))
            .collect();
        println!(
            "| {} | {:.1}% ({}/{}: {}) | {} |",
            b.label,
            100.0 * b.score.fraction(),
            b.score.correct,
            b.score.total,
            cats.join(", "),
            b.target
                .map(|t| format!("{:.0}%", 100.0 * t))
                .unwrap_or_else(|| "--".into())
        );
    }
    for g in report.answers.iter().step_by(40) {
        println!(
            "  e.g. {:?} -> {:?} (expected {:?})",
            g.question, g.answer, g.expected
        );
    }
    if let Some(p) = json {
        serde_json::to_writer_pretty(std::fs::File::create(&p)?, &report)?;
        eprintln!("answers written to {}", p.display());
    }
    Ok(())
}
