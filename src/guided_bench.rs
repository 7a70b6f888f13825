//! `afm bench guided`: what the guided-generation mask costs on SmolLM2, in one run: the
//! mask's microseconds per token, and decode tok/s with and without the constraint over the
//! same model, prompt and token count (greedy, median of `--runs`).
//!
//! Both loops do the same work per token (one forward step, one greedy pick); the guided one
//! adds llguidance's mask, applying it to the logits, and advancing the parser. The separate
//! runs' speeds move by more than the target's 10% from run to run on a shared 2-core VM, so
//! the mask's time is also given as a share of the forward steps of the same guided runs.

use afm::lm::guided::GuideFactory;
use afm::lm::{ChatModel, Checkpoint, LanguageModel, LogitsFor, Message};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

use crate::bench::median;

#[derive(Args, Clone)]
pub struct GuidedBench {
    /// GGUF model (default: SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens decoded per run (the guided run stops earlier if its JSON completes).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

/// The schema the guided runs decode under: a long list of short records.
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "fruits": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 24},
                        "colour": {"type": "string", "enum": ["red", "green", "yellow", "orange", "purple", "brown"]},
                        "grams": {"type": "integer", "minimum": 1, "maximum": 2000}
                    },
                    "required": ["name", "colour", "grams"]
                },
                "maxItems": 100
            }
        },
        "required": ["fruits"]
    })
}

struct Run {
    tokens: usize,
    decode_secs: f64,
    mask_secs: f64,
}

pub fn bench_guided(a: &GuidedBench, model: PathBuf) -> Result<()> {
    anyhow::ensure!(
        a.runs >= 1 && a.new_tokens >= 2,
        "--runs >= 1 and --new-tokens >= 2"
    );
    let ck = Checkpoint::load(&model)?;
    let lm: &dyn LanguageModel = &ck.model;
    let t0 = Instant::now();
    let factory = GuideFactory::new(&ck.tokenizer, lm.info().vocab_size, &ck.stop_ids())?;
    let build_secs = t0.elapsed().as_secs_f64();
    let text = afm::lm::chat::render_chat(
        &ck.tokenizer,
        &[Message::user(
            "List as many fruits as you can as JSON, with colour and weight in grams.",
        )],
    )?;
    let prompt = ck.tokenizer.encode(&text)?;
    let schema = schema();
    let t1 = Instant::now();
    factory.json_schema(&schema)?;
    let compile_secs = t1.elapsed().as_secs_f64();

    let run = |guided: bool| -> Result<Run> {
        let mut guide = if guided {
            Some(factory.json_schema(&schema)?)
        } else {
            None
        };
        let mut cache = lm.new_cache();
        let mut row: Vec<f32> = lm
            .forward_tokens(&prompt, &mut cache, &LogitsFor::Last)?
            .squeeze(0)?
            .to_vec1()?;
        let (mut tokens, mut mask_secs) = (0, 0.0);
        let t = Instant::now();
        while tokens < a.new_tokens {
            let tm = Instant::now();
            if let Some(g) = guide.as_mut() {
                if g.is_stopped() {
                    break;
                }
                g.mask_logits(&mut row)?;
            }
            let next = afm::lm::sampling::argmax(&row);
            if let Some(g) = guide.as_mut() {
                let b = g.token_bytes(next);
                g.consume(next, &b)?;
                mask_secs += tm.elapsed().as_secs_f64();
            }
            tokens += 1;
            row = lm
                .forward_tokens(&[next], &mut cache, &LogitsFor::Last)?
                .squeeze(0)?
                .to_vec1()?;
        }
        Ok(Run {
            tokens,
            decode_secs: t.elapsed().as_secs_f64(),
            mask_secs,
        })
    };
    run(false)?; // warm-up
    let (mut plain, mut guided, mut mask_us, mut counts) = (vec![], vec![], vec![], vec![]);
    let mut share = vec![];
    for _ in 0..a.runs {
        let p = run(false)?;
        plain.push(p.tokens as f64 / p.decode_secs);
        let g = run(true)?;
        guided.push(g.tokens as f64 / g.decode_secs);
        mask_us.push(g.mask_secs * 1e6 / g.tokens.max(1) as f64);
        // the mask's time over the same run's forward steps: free of the run-to-run noise
        // of a shared machine, which moves the two separate runs' speeds by more than 10%
        share.push(g.mask_secs / (g.decode_secs - g.mask_secs).max(1e-9));
        counts.push(g.tokens);
    }
    let (p, g, m) = (
        median(&mut plain),
        median(&mut guided),
        median(&mut mask_us),
    );
    println!("model: {}", model.display());
    println!(
        "token trie + parser factory: {:.1} ms (once per model) | schema compile: {:.2} ms (once per request)",
        build_secs * 1e3,
        compile_secs * 1e3
    );
    println!(
        "guided runs: {:?} tokens (of {} asked; a run ends when its JSON completes)",
        counts, a.new_tokens
    );
    println!("mask per token (compute, apply, advance): {m:.1} us");
    println!("decode, unconstrained: {p:.1} tok/s");
    println!("decode, guided (JSON Schema): {g:.1} tok/s");
    println!(
        "guided / unconstrained: {:.3} ({:+.1}% time per token)",
        g / p,
        (p / g - 1.0) * 100.0
    );
    let sh = median(&mut share);
    println!(
        "within the guided runs: the mask adds {:+.1}% to the forward steps' time (target < 10%: {})",
        sh * 100.0,
        if sh < 0.10 { "met" } else { "missed" }
    );
    Ok(())
}
