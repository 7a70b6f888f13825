//! `afm train`: training runs with a progress bar (loss, examples/s, time left) and a held-out
//! evaluation after every epoch. Stage 1 (`afm train vit`) pretrains the Register-Window ViT;
//! the adapter stage builds on its output.

use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::pretrain::{run, Event, PretrainConfig, TextTower};
use afm_train::Split;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TrainCmd {
    /// Stage 1: pretrain the Register-Window ViT (CLIP-style, against the frozen language
    /// model's embeddings of the captions) on generated scenes and screenshots (+ easy-VQA).
    Vit(VitArgs),
}

#[derive(Args)]
pub struct VitArgs {
    /// Run directory: checkpoints, `pretrain.json` (settings, history) and, at the end,
    /// `vision/` (the encoder). An existing run there is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// Settings: `afm-tiny` (the embedded default's encoder) or `test-tiny`; or a
    /// `pretrain.json` / config JSON file.
    #[arg(long, default_value = "afm-tiny")]
    pub config: String,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    /// Stop after this many steps in all (resume later with the same command).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// The language model whose tokenizer and input embeddings make the text side
    /// (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub lm: Option<PathBuf>,
    /// Leave easy-VQA out even when `models/easy-vqa` holds it.
    #[arg(long)]
    pub no_easy_vqa: bool,
}

fn config(a: &VitArgs) -> Result<PretrainConfig> {
    let mut c = match a.config.as_str() {
        "afm-tiny" => PretrainConfig::afm_tiny(),
        "test-tiny" => PretrainConfig::test_tiny(),
        path => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("--config {path}: not a preset (afm-tiny, test-tiny) nor a readable file")
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))?;
            // a run's pretrain.json holds the settings under `config`
            let v = v.get("config").cloned().unwrap_or(v);
            serde_json::from_value(v)
                .with_context(|| format!("{path}: not a pretraining config"))?
        }
    };
    if let Some(x) = a.epochs {
        c.epochs = x;
    }
    if let Some(x) = a.steps_per_epoch {
        c.steps_per_epoch = x;
    }
    if let Some(x) = a.batch_size {
        c.batch_size = x;
    }
    if let Some(x) = a.lr {
        c.adamw.lr = x;
    }
    c.validate()?;
    Ok(c)
}

pub fn cmd_train(cmd: TrainCmd) -> Result<()> {
    match cmd {
        TrainCmd::Vit(a) => train_vit(&a),
    }
}

/// Keeps freed memory in the process: a training step frees and reallocates the same large
/// activations and gradients, and every page handed back to the OS comes back zero-filled
/// through a page fault (~20% of a step, measured). mimalloc 2's `mi_option_purge_delay` has
/// no named constant in libmimalloc-sys ("not exposed for stability"): it is option 15.
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table, which mimalloc
    // reads with atomic loads; -1 means "never purge". No pointers are involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn train_vit(a: &VitArgs) -> Result<()> {
    keep_freed_memory();
    let cfg = config(a)?;
    let lm = match &a.lm {
        Some(p) => p.clone(),
        None => crate::default_model::locate_or_fetch()?,
    };
    let text = TextTower::from_gguf(&lm).with_context(|| format!("loading {}", lm.display()))?;
    let root = std::env::current_dir()?;
    let easy_root = data_dir(&root);
    let (easy, easy_eval) = if a.no_easy_vqa || !easy_root.exists() {
        if !a.no_easy_vqa {
            eprintln!(
                "note: {} not found, training without easy-VQA (run `bash scripts/fetch_easy_vqa.sh` to add it)",
                easy_root.display()
            );
        }
        (None, None)
    } else {
        (
            Some(EasyVqa::open(&easy_root, Split::Train)?),
            Some(EasyVqa::open(&easy_root, Split::HeldOut)?),
        )
    };
    let params = afm_train::pretrain::init_params(&cfg, text.width())?;
    eprintln!(
        "stage 1, ViT pretraining: {:.2} M parameters; {} epochs x {} steps of {} examples ({} sources), eval on {} held-out batches per epoch",
        params.num_params() as f64 / 1e6,
        cfg.epochs,
        cfg.steps_per_epoch,
        cfg.batch_size,
        if easy.is_some() { "scenes, screens, easy-VQA" } else { "scenes, screens" },
        cfg.eval_batches
    );
    drop(params);
    let total_steps = cfg.total_steps();
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps | {msg} | {elapsed_precise} elapsed, {eta_precise} left",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut ema: Option<f32> = None;
    // without a terminal the bar is hidden: say the same things as plain lines
    let hidden = bar.is_hidden();
    let say = |m: String| {
        if hidden {
            eprintln!("{m}")
        } else {
            bar.println(m)
        }
    };
    let every = (cfg.total_steps() / 20).max(1);
    let st = run(
        &cfg,
        &text,
        &a.out,
        easy.as_ref(),
        easy_eval.as_ref(),
        a.max_steps,
        &mut |e| {
            match e {
            Event::Resumed { step } => {
                bar.set_position(*step as u64);
                bar.reset_eta();
                say(format!("resumed at step {step}"));
            }
            Event::Step {
                step,
                loss,
                lr,
                examples_per_s,
                data_s,
                ..
            } => {
                let l = ema.map_or(*loss, |m| 0.9 * m + 0.1 * loss);
                ema = Some(l);
                bar.set_position(*step as u64);
                let msg = format!(
                    "loss {l:.3} | {examples_per_s:.1} ex/s (data {data_s:.2} s/step) | lr {lr:.1e}"
                );
                if hidden && (step % every == 0 || *step == total_steps) {
                    say(format!("step {step}/{total_steps}: {msg}"));
                }
                bar.set_message(msg);
            }
            Event::Epoch(r) => say(format!(
                "epoch {}: train loss {:.3}, held-out loss {:.3}, held-out image->caption top-1 {:.1}% ({:.0} s so far)",
                r.epoch,
                r.train_loss,
                r.eval_loss,
                100.0 * r.eval_top1,
                r.seconds
            )),
            Event::Saved { .. } => {}
            Event::Done { vision_dir } => {
                say(format!("encoder written to {}", vision_dir.display()))
            }
        }
        },
    )?;
    bar.finish_and_clear();
    if st.step < cfg.total_steps() {
        eprintln!(
            "stopped at step {} of {}; run the same command to resume",
            st.step,
            cfg.total_steps()
        );
    } else if st.history.is_empty() {
        bail!("the run finished without an evaluation");
    }
    Ok(())
}
