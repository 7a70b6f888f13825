//! `afm train`: training runs with a progress bar (loss, examples/s, time left) and a held-out
//! evaluation after every epoch. Stage 1 (`afm train vit`) pretrains the Register-Window ViT;
//! the adapter stage builds on its output.

use afm_train::adapter_train::{AdapterTrainConfig, FrozenLm, Trainable};
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::pretrain::{run, PretrainConfig, TextTower};
use afm_train::runloop::Event;
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
    /// Stage 2: train the vision-language adapter (and fine-tune the ViT unless
    /// `--freeze-vit`) with the language model frozen, on captions and question/answer pairs
    /// of the generated data (+ easy-VQA). Writes `afm-tiny/` at the end.
    Adapter(AdapterArgs),
    /// Stage 1b: teach the ViT to perceive and read with per-patch targets from the
    /// generator (object colour, shape and centres; screen roles; characters of every string)
    /// on native-resolution tiles and overviews. Writes `vision/` and `heads.safetensors`.
    Perceive(PerceiveArgs),
    /// Linear probes on a frozen encoder's patch features (colour, shape, count, screen
    /// roles, characters; titles and buttons read at native scale), trained on the training
    /// split and measured on the held-out split: what a stage put into its features.
    Probe(ProbeArgs),
    /// Quality recovery of a quantized language model (`afm quantize --kv 16` output): a
    /// LoRA adapter trained briefly to match the unquantized teacher on a text.
    LoraRecover(crate::quantize_cmd::LoraRecoverArgs),
    /// The text-line reader: a small convolutional recogniser trained with CTC on lines cut
    /// from generated screens and lines drawn alone; reads held-out screens' strings after
    /// every epoch. Writes `reader/` (config.json, f16 model.safetensors).
    Reader(ReaderArgs),
}

#[derive(Args)]
pub struct ReaderArgs {
    /// Run directory (an existing run there is resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Settings: a preset (`afm-tiny`, `test-tiny`) or a config JSON file (a run's own
    /// `reader.json` works too).
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
    /// Do not train: write the export from the run's last checkpoint.
    #[arg(long)]
    pub export_now: bool,
}

#[derive(Args)]
pub struct ProbeArgs {
    /// The encoder: a `vision/` export.
    #[arg(long)]
    pub vision: PathBuf,
    /// Training views whose frozen features train the probes.
    #[arg(long, default_value_t = 480)]
    pub train_views: usize,
    /// Held-out views the probes are measured on.
    #[arg(long, default_value_t = 240)]
    pub eval_views: usize,
    /// Held-out screens whose title and first button are read.
    #[arg(long, default_value_t = 60)]
    pub reads: usize,
    /// Optimiser steps of the probes (one cached batch per step).
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Leave easy-VQA out even when `models/easy-vqa` holds it.
    #[arg(long)]
    pub no_easy_vqa: bool,
    /// The character probe reads with CTC (`"ctc": true` in a stage-1b run's weights):
    /// characters in any slots along a string's row, in order.
    #[arg(long)]
    pub ctc: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct PerceiveArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// A `vision/` export (stage 1) to start the encoder from (default: fresh weights).
    #[arg(long)]
    pub vision: Option<PathBuf>,
    /// A stage-1b `heads.safetensors` to start the heads from (default: fresh heads); its
    /// heads must have this config's shapes.
    #[arg(long)]
    pub init_heads: Option<PathBuf>,
    /// Do not train: write the export from the run's last checkpoint (a run stopped early).
    #[arg(long)]
    pub export_now: bool,
}

/// The flags every training stage has.
#[derive(Args)]
pub struct RunArgs {
    /// Run directory: checkpoints, the run's JSON file (settings, history) and, at the end,
    /// the export. An existing run there is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// Settings: a preset (`afm-tiny`, `test-tiny`) or a config JSON file (a run's own JSON
    /// file works too).
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
    /// The frozen language model (its tokenizer and embeddings for stage 1, the whole model
    /// for stage 2; default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub lm: Option<PathBuf>,
    /// Leave easy-VQA out even when `models/easy-vqa` holds it.
    #[arg(long)]
    pub no_easy_vqa: bool,
}

impl RunArgs {
    /// The preset named by `--config`, or the config read from that file (at `inner`, a JSON
    /// pointer, when the file is a run's own JSON), with the common overrides applied.
    fn settings<T: serde::de::DeserializeOwned>(
        &self,
        presets: &[(&str, fn() -> T)],
        inner: &str,
        what: &str,
        schedule: impl FnOnce(&mut T) -> (&mut usize, &mut usize, &mut usize, &mut f64),
    ) -> Result<T> {
        let mut c = match presets.iter().find(|(n, _)| *n == self.config) {
            Some((_, make)) => make(),
            None => {
                let path = &self.config;
                let names: Vec<&str> = presets.iter().map(|(n, _)| *n).collect();
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "--config {path}: not a preset ({}) nor a readable file",
                        names.join(", ")
                    )
                })?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))?;
                let v = v.pointer(inner).cloned().unwrap_or(v);
                serde_json::from_value(v).with_context(|| format!("{path}: not {what}"))?
            }
        };
        let (epochs, steps, batch, lr) = schedule(&mut c);
        for (flag, field) in [
            (self.epochs, epochs),
            (self.steps_per_epoch, steps),
            (self.batch_size, batch),
        ] {
            if let Some(x) = flag {
                *field = x;
            }
        }
        if let Some(x) = self.lr {
            *lr = x;
        }
        Ok(c)
    }

    fn lm_path(&self) -> Result<PathBuf> {
        match &self.lm {
            Some(p) => Ok(p.clone()),
            None => crate::default_model::locate_or_fetch(),
        }
    }
}

#[derive(Args)]
pub struct AdapterArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Stage-1 export (`<run>/vision`) to start the ViT from (default: fresh weights).
    #[arg(long)]
    pub vision: Option<PathBuf>,
    /// An export's `adapter.safetensors` to start the adapter from (default: fresh weights);
    /// with `--vision <export>/vision` a run continues from a whole earlier export.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// An afm LoRA file (e.g. an export's `lora.safetensors`) to start the LM's LoRA adapter
    /// from (default: fresh, B = 0); it must match the config's `lora` rank, alpha and targets.
    #[arg(long)]
    pub init_lora: Option<PathBuf>,
    /// Train the adapter only, the ViT frozen.
    #[arg(long)]
    pub freeze_vit: bool,
    /// Image placeholder token (default: the preset's, `<empty_output>` for SmolLM2).
    #[arg(long)]
    pub placeholder: Option<String>,
    /// Held-out questions answered (greedily) after every epoch.
    #[arg(long)]
    pub eval_questions: Option<usize>,
}

#[derive(Args)]
pub struct VitArgs {
    #[command(flatten)]
    pub run: RunArgs,
}

fn config(a: &VitArgs) -> Result<PretrainConfig> {
    let c = a.run.settings(
        &[
            (
                "afm-tiny",
                PretrainConfig::afm_tiny as fn() -> PretrainConfig,
            ),
            ("test-tiny", PretrainConfig::test_tiny),
        ],
        "/config",
        "a pretraining config",
        |c| {
            (
                &mut c.epochs,
                &mut c.steps_per_epoch,
                &mut c.batch_size,
                &mut c.adamw.lr,
            )
        },
    )?;
    c.validate()?;
    Ok(c)
}

pub fn cmd_train(cmd: TrainCmd) -> Result<()> {
    match cmd {
        TrainCmd::Vit(a) => train_vit(&a),
        TrainCmd::Adapter(a) => train_adapter(&a),
        TrainCmd::Perceive(a) => train_perceive(&a),
        TrainCmd::Probe(a) => train_probe(&a),
        TrainCmd::LoraRecover(a) => crate::quantize_cmd::cmd_lora_recover(&a),
        TrainCmd::Reader(a) => train_reader(&a),
    }
}

/// The progress display of a training run: a bar (steps, loss, speed, time left) on a
/// terminal; without one the bar is hidden and the same things go to stderr as plain lines
/// (every 5% of the run, the first steps and the last).
struct Progress {
    bar: ProgressBar,
    hidden: bool,
    total: usize,
    stop: usize,
    every: usize,
    ema: Option<f32>,
    /// What the run writes at the end (`encoder`, `afm-tiny`).
    export: &'static str,
}

impl Progress {
    fn new(total: usize, max_steps: Option<usize>, export: &'static str) -> Self {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps | {msg} | {elapsed_precise} elapsed, {eta_precise} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self {
            hidden: bar.is_hidden(),
            bar,
            total,
            stop: max_steps.unwrap_or(total).min(total),
            every: (total / 20).max(1),
            ema: None,
            export,
        }
    }

    fn say(&self, m: String) {
        if self.hidden {
            eprintln!("{m}")
        } else {
            self.bar.println(m)
        }
    }

    /// Shows every event but the epoch report, which it hands back for the stage to show.
    fn event<'a, R>(&mut self, e: &'a Event<R>) -> Option<&'a R> {
        match e {
            Event::Resumed { step } => {
                self.bar.set_position(*step as u64);
                self.bar.reset_eta();
                self.say(format!("resumed at step {step}"));
            }
            Event::Step {
                step,
                loss,
                lr,
                examples_per_s,
                data_s,
                ..
            } => {
                let l = self.ema.map_or(*loss, |m| 0.9 * m + 0.1 * loss);
                self.ema = Some(l);
                self.bar.set_position(*step as u64);
                let msg = format!(
                    "loss {l:.3} | {examples_per_s:.2} ex/s (data {data_s:.2} s/step) | lr {lr:.1e}"
                );
                if self.hidden && (step % self.every == 0 || *step == self.stop || *step <= 2) {
                    self.say(format!("step {step}/{}: {msg}", self.total));
                }
                self.bar.set_message(msg);
            }
            Event::Epoch(r) => return Some(r),
            Event::Saved { .. } => {}
            Event::Done { dir } => {
                self.say(format!("{} written to {}", self.export, dir.display()))
            }
        }
        None
    }

    /// Clears the bar and says where the run stopped.
    fn finish(self, step: usize, evaluated: bool) -> Result<()> {
        self.bar.finish_and_clear();
        if step < self.total {
            eprintln!(
                "stopped at step {step} of {}; run the same command to resume",
                self.total
            );
        } else if !evaluated {
            bail!("the run finished without an evaluation");
        }
        Ok(())
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

/// The easy-VQA train / test sets when `models/easy-vqa` holds them (a note otherwise).
fn open_easy_vqa(skip: bool) -> Result<(Option<EasyVqa>, Option<EasyVqa>)> {
    let root = std::env::current_dir()?;
    let easy_root = data_dir(&root);
    Ok(if skip || !easy_root.exists() {
        if !skip {
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
    })
}

fn train_vit(a: &VitArgs) -> Result<()> {
    keep_freed_memory();
    let cfg = config(a)?;
    let lm = a.run.lm_path()?;
    let text = TextTower::from_gguf(&lm).with_context(|| format!("loading {}", lm.display()))?;
    let (easy, easy_eval) = open_easy_vqa(a.run.no_easy_vqa)?;
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
    let mut progress = Progress::new(cfg.total_steps(), a.run.max_steps, "encoder");
    let st = run(
        &cfg,
        &text,
        &a.run.out,
        easy.as_ref(),
        easy_eval.as_ref(),
        a.run.max_steps,
        &mut |e| {
            if let Some(r) = progress.event(e) {
                progress.say(format!(
                    "epoch {}: train loss {:.3}, held-out loss {:.3}, held-out image->caption top-1 {:.1}% ({:.0} s so far)",
                    r.epoch,
                    r.train_loss,
                    r.eval_loss,
                    100.0 * r.eval_top1,
                    r.seconds
                ));
            }
        },
    )?;
    progress.finish(st.step, !st.history.is_empty())
}

fn adapter_config(a: &AdapterArgs) -> Result<AdapterTrainConfig> {
    let mut c = a.run.settings(
        &[
            (
                "afm-tiny",
                AdapterTrainConfig::afm_tiny as fn() -> AdapterTrainConfig,
            ),
            ("test-tiny", AdapterTrainConfig::test_tiny),
        ],
        "/config/train",
        "an adapter-training config",
        |c| {
            (
                &mut c.epochs,
                &mut c.steps_per_epoch,
                &mut c.batch_size,
                &mut c.adamw.lr,
            )
        },
    )?;
    if let Some(dir) = &a.vision {
        // the ViT's shape is the stage-1 export's
        let cj = dir.join("config.json");
        c.vision = afm::vision::VisionConfig::from_file(&cj)
            .with_context(|| format!("--vision {}: not a stage-1 export", dir.display()))?;
    }
    if a.freeze_vit {
        c.train_vit = false;
    }
    if let Some(x) = &a.placeholder {
        c.image_placeholder = x.clone();
    }
    if let Some(x) = a.eval_questions {
        c.eval_questions = x;
    }
    c.validate()?;
    Ok(c)
}

fn train_adapter(a: &AdapterArgs) -> Result<()> {
    keep_freed_memory();
    let cfg = adapter_config(a)?;
    let lm_path = a.run.lm_path()?;
    let mut lm =
        FrozenLm::from_gguf(&lm_path).with_context(|| format!("loading {}", lm_path.display()))?;
    afm_train::adapter_train::prepare_lora_from(&cfg, &mut lm, a.init_lora.as_deref())?;
    let lora_params: usize = lm.model.lora_vars().iter().map(|v| v.elem_count()).sum();
    let (easy, easy_eval) = open_easy_vqa(a.run.no_easy_vqa)?;
    let tr = Trainable::init_from(
        &cfg,
        lm.hidden_size(),
        a.vision.as_deref(),
        a.init_adapter.as_deref(),
    )?;
    let sources = match &cfg.train_sources {
        Some(src) => {
            use afm_train::pretrain::Source;
            if src.contains(&Source::EasyVqa) && easy.is_none() {
                bail!("`train_sources` names easy_vqa, but the easy-VQA data set is not here: run `bash scripts/fetch_easy_vqa.sh`, or leave easy_vqa out");
            }
            let names: Vec<&str> = src
                .iter()
                .map(|s| match s {
                    Source::Scene => "scenes",
                    Source::Screen => "screens",
                    Source::EasyVqa => "easy-VQA",
                })
                .collect();
            format!("training on {} only", names.join(", "))
        }
        None if easy.is_some() => "scenes, screens, easy-VQA".into(),
        None => "scenes, screens".into(),
    };
    eprintln!(
        "stage 2, adapter training against the frozen {} ({}): {:.2} M trainable parameters ({}{}); {} image tokens per view{}; {} epochs x {} steps of {} examples ({}), {} held-out questions per epoch",
        lm.info.file,
        &lm.info.sha256[..lm.info.sha256.len().min(12)],
        (tr.params.num_params() + lora_params) as f64 / 1e6,
        if cfg.train_vit { "ViT + adapter" } else { "adapter only, ViT frozen" },
        match &cfg.lora {
            Some(l) => format!(" + LoRA rank {} on the LM: {:.2} M", l.rank, lora_params as f64 / 1e6),
            None => String::new(),
        },
        cfg.tokens_per_image(),
        match &cfg.tiling {
            Some(t) => format!(", overview + {} px tiles up to {} tokens per image", t.tile, t.max_tokens),
            None => ", one view per image".into(),
        },
        cfg.epochs,
        cfg.steps_per_epoch,
        cfg.batch_size,
        sources,
        cfg.eval_questions
    );
    if cfg.data_offset > 0 {
        eprintln!(
            "training images start at example {} (`data_offset`), past those of earlier stages",
            cfg.data_offset
        );
    }
    drop(tr);
    let mut progress = Progress::new(cfg.total_steps(), a.run.max_steps, "afm-tiny");
    let st = afm_train::adapter_train::run_with(
        &cfg,
        &lm,
        afm_train::adapter_train::Inits {
            vision: a.vision.as_deref(),
            adapter: a.init_adapter.as_deref(),
            lora: a.init_lora.as_deref(),
        },
        &a.run.out,
        easy.as_ref(),
        easy_eval.as_ref(),
        a.run.max_steps,
        &mut |e| {
            if let Some(r) = progress.event(e) {
                let cats: Vec<String> = r
                    .per_category
                    .iter()
                    .map(|(k, (ok, n))| format!("{k} {ok}/{n}"))
                    .collect();
                let slots = r
                    .slot_accuracy
                    .map(|a| format!(", held-out caption-slot accuracy {:.1}%", 100.0 * a))
                    .unwrap_or_default();
                let spread = r
                    .image_token_spread
                    .map(|s| format!(", image-token spread {s:.3}"))
                    .unwrap_or_default();
                progress.say(format!(
                    "epoch {}: train loss {:.3}, held-out loss {:.3}, held-out exact match {:.1}% ({}){slots}{spread} ({:.0} s so far)",
                    r.epoch,
                    r.train_loss,
                    r.eval_loss,
                    100.0 * r.eval_accuracy,
                    cats.join(", "),
                    r.seconds
                ));
                for s in &r.samples {
                    progress.say(format!(
                        "  Q: {} | expected: {} | got: {}",
                        s.question, s.expected, s.got
                    ));
                }
            }
        },
    )?;
    progress.finish(st.step, !st.history.is_empty())
}

fn train_perceive(a: &PerceiveArgs) -> Result<()> {
    use afm_train::perceive::{self, PerceiveConfig};
    keep_freed_memory();
    let cfg = a.run.settings(
        &[
            (
                "afm-tiny",
                PerceiveConfig::afm_tiny as fn() -> PerceiveConfig,
            ),
            ("test-tiny", PerceiveConfig::test_tiny),
        ],
        "/config",
        "a stage-1b config",
        |c| {
            (
                &mut c.epochs,
                &mut c.steps_per_epoch,
                &mut c.batch_size,
                &mut c.adamw.lr,
            )
        },
    )?;
    cfg.validate()?;
    if a.export_now {
        let (dir, step) = perceive::export_checkpoint(&cfg, &a.run.out)
            .with_context(|| format!("exporting {}", a.run.out.display()))?;
        eprintln!(
            "encoder of step {step} of {} written to {}",
            cfg.total_steps(),
            dir.display()
        );
        return Ok(());
    }
    let (easy, easy_eval) = open_easy_vqa(a.run.no_easy_vqa)?;
    let params = perceive::init_params(&cfg, a.vision.as_deref(), a.init_heads.as_deref())?;
    eprintln!(
        "stage 1b, perceive and read: {:.2} M parameters (encoder{}); {} epochs x {} steps of {} views, eval on {} held-out batches and {} screens per epoch",
        params.num_params() as f64 / 1e6,
        match &a.vision {
            Some(v) => format!(" from {}", v.display()),
            None => " fresh".into(),
        } + &a
            .init_heads
            .as_ref()
            .map_or(String::new(), |h| format!(", heads from {}", h.display())),
        cfg.epochs,
        cfg.steps_per_epoch,
        cfg.batch_size,
        cfg.eval_batches,
        cfg.eval_reads
    );
    drop(params);
    let mut progress = Progress::new(cfg.total_steps(), a.run.max_steps, "encoder");
    let st = perceive::run(
        &cfg,
        &a.run.out,
        a.vision.as_deref(),
        a.init_heads.as_deref(),
        easy.as_ref(),
        easy_eval.as_ref(),
        a.run.max_steps,
        &mut |e| {
            if let Some(r) = progress.event(e) {
                let m = &r.eval;
                progress.say(format!(
                    "epoch {}: train loss {:.3}, held-out loss {:.3}; colour {:.1}%, shape {:.1}% (objects {:.1}%), count {:.1}%, role {:.1}%, characters {:.1}%, strings read exactly {:.1}% of {}; titles {}/{}, buttons {}/{} read exactly; feature spread {:.3} ({:.0} s so far)",
                    r.epoch,
                    r.train_loss,
                    m.loss,
                    100.0 * m.colour_acc,
                    100.0 * m.shape_acc,
                    100.0 * m.object_shape_acc,
                    100.0 * m.count_acc,
                    100.0 * m.role_acc,
                    100.0 * m.char_acc,
                    100.0 * m.string_exact,
                    m.strings,
                    r.read.titles_exact,
                    r.read.titles,
                    r.read.buttons_exact,
                    r.read.buttons,
                    m.feature_spread,
                    r.seconds
                ));
                for (want, got) in r.read.examples.iter().take(4) {
                    progress.say(format!("  read {want:?} as {got:?}"));
                }
            }
        },
    )?;
    progress.finish(st.step, !st.history.is_empty())
}

fn train_reader(a: &ReaderArgs) -> Result<()> {
    use afm_train::reader_train::{self, ReaderTrainConfig};
    keep_freed_memory();
    let run = RunArgs {
        out: a.out.clone(),
        config: a.config.clone(),
        epochs: a.epochs,
        steps_per_epoch: a.steps_per_epoch,
        batch_size: a.batch_size,
        lr: a.lr,
        max_steps: a.max_steps,
        lm: None,
        no_easy_vqa: true,
    };
    let cfg = run.settings(
        &[
            (
                "afm-tiny",
                ReaderTrainConfig::afm_tiny as fn() -> ReaderTrainConfig,
            ),
            ("test-tiny", ReaderTrainConfig::test_tiny),
        ],
        "/config",
        "a reader config",
        |c| {
            (
                &mut c.epochs,
                &mut c.steps_per_epoch,
                &mut c.batch_size,
                &mut c.adamw.lr,
            )
        },
    )?;
    cfg.validate()?;
    if a.export_now {
        let (dir, step) = reader_train::export_checkpoint(&cfg, &a.out)
            .with_context(|| format!("exporting {}", a.out.display()))?;
        eprintln!(
            "reader of step {step} of {} written to {}",
            cfg.total_steps(),
            dir.display()
        );
        return Ok(());
    }
    let n = reader_train::init_params(&cfg.model, cfg.seed)?.num_params();
    eprintln!(
        "text-line reader: {:.2} M parameters; {} epochs x {} steps of {} lines, {} held-out screens read per epoch",
        n as f64 / 1e6,
        cfg.epochs,
        cfg.steps_per_epoch,
        cfg.batch_size,
        cfg.eval_screens
    );
    let mut progress = Progress::new(cfg.total_steps(), a.max_steps, "reader");
    let st = reader_train::run(&cfg, &a.out, a.max_steps, &mut |e| {
        if let Some(r) = progress.event(e) {
            let f = &r.read;
            progress.say(format!(
                "epoch {}: train loss {:.3}; held-out titles {}/{}, buttons {}/{} read exactly ({:.1}%; unseen words {}/{}), strings {}/{}, character error rate {:.2}% ({:.0} s so far)",
                r.epoch,
                r.train_loss,
                f.titles_exact,
                f.titles,
                f.buttons_exact,
                f.buttons,
                100.0 * f.titles_buttons_exact(),
                f.unseen_exact,
                f.unseen,
                f.strings_exact,
                f.strings,
                100.0 * f.cer,
                r.seconds
            ));
            for (want, got) in &f.examples {
                progress.say(format!("  read {want:?} as {got:?}"));
            }
            let g = &r.found;
            progress.say(format!(
                "  end to end (lines found, then read): titles {}/{}, buttons {}/{} ({:.1}%; unseen words {}/{}), strings {}/{}, character error rate {:.2}%",
                g.titles_exact,
                g.titles,
                g.buttons_exact,
                g.buttons,
                100.0 * g.titles_buttons_exact(),
                g.unseen_exact,
                g.unseen,
                g.strings_exact,
                g.strings,
                100.0 * g.cer
            ));
            for (want, got) in &g.examples {
                progress.say(format!("  found and read {want:?} as {got:?}"));
            }
        }
    })?;
    progress.finish(st.step, !st.history.is_empty())
}

fn train_probe(a: &ProbeArgs) -> Result<()> {
    use afm_train::perceive::{self, PerceiveConfig};
    let mut cfg = PerceiveConfig::afm_tiny();
    cfg.eval_reads = a.reads;
    cfg.weights.ctc = a.ctc;
    // the encoder's own architecture (a stem, for example), read from its config
    cfg.vision = afm::vision::VisionConfig::from_file(&a.vision.join("config.json"))
        .with_context(|| format!("reading the encoder config in {}", a.vision.display()))?;
    let (easy, easy_eval) = open_easy_vqa(a.no_easy_vqa)?;
    let r = perceive::probe(
        &cfg,
        &a.vision,
        a.train_views,
        a.eval_views,
        a.steps,
        easy.as_ref(),
        easy_eval.as_ref(),
        &mut |m| eprintln!("{m}"),
    )
    .with_context(|| format!("probing {}", a.vision.display()))?;
    let m = &r.eval;
    println!(
        "linear probes on {} (frozen; {} training views, {} held-out views, {} steps, {:.0} s):",
        a.vision.display(),
        r.train_views,
        r.eval_views,
        r.steps,
        r.seconds
    );
    println!("  colour of object patches   {:5.1}%", 100.0 * m.colour_acc);
    println!("  shape of object patches    {:5.1}%", 100.0 * m.shape_acc);
    println!(
        "  shape of objects (pooled)  {:5.1}%",
        100.0 * m.object_shape_acc
    );
    println!("  object count per view      {:5.1}%", 100.0 * m.count_acc);
    println!("  screen role per patch      {:5.1}%", 100.0 * m.role_acc);
    if a.ctc {
        println!("  characters (1 - CER)       {:5.1}%", 100.0 * m.char_acc);
    } else {
        println!("  characters (text slots)    {:5.1}%", 100.0 * m.char_acc);
    }
    println!(
        "  strings read exactly       {:5.1}% of {}",
        100.0 * m.string_exact,
        m.strings
    );
    println!(
        "  titles read exactly        {}/{}; first buttons {}/{}",
        r.read.titles_exact, r.read.titles, r.read.buttons_exact, r.read.buttons
    );
    println!("  feature spread             {:.3}", m.feature_spread);
    for (want, got) in &r.read.examples {
        println!("    {want:?} read as {got:?}");
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
