//! `afm caption`, `afm ask` and `afm screen`: a SmolVLM / Idefics3 checkpoint directory
//! (HF layout) or an afm-tiny export (`<run>/afm-tiny`, written by `afm train adapter`) over
//! one or many images, through the one pipeline (`afm::fusion::Vlm`) that
//! `afm::fusion::ModelDir` loads from the directory, whatever its kind. Without `--model`: the
//! embedded default model, the afm-tiny export committed in `assets/afm-tiny` and embedded
//! in the binary ([`afm::models::afm_tiny_dir`]: written to the data directory on first use).
//!
//! * A model that names an external language model (afm-tiny: the GGUF in its
//!   `config.json`, `lm.file`): it is looked for beside the model (the export directory, then
//!   the run directory), then, when it is the default SmolLM2 (same sha256), where `afm
//!   generate` keeps its default model; `--lm FILE` names it instead. Its sha256 must be the
//!   one recorded.
//! * `--image-max-tokens`: the image processor's budget, the same code path for every model;
//!   a budget below one tile is an error before anything runs, a downscale is reported on
//!   stderr and in the JSON (`downscale`), and a model whose images cost a fixed number of
//!   tokens (afm-tiny without a `tiling` section) says that the budget changes nothing.
//!
//! * `caption IMAGE... | DIR`: one model for the whole batch; `path: caption` lines, or one
//!   JSON object per image (`--jsonl`), or one JSON array (`--json`). An image that cannot be
//!   read or decoded is reported and the batch goes on; the exit code is non-zero at the end.
//! * `ask IMAGE QUESTION` / `screen IMAGE`: the answer streams to stdout, the figures (plan,
//!   encode time, prefill and decode tok/s) go to stderr as `afm generate` does.
//! * `--dry-run` reads only the checkpoint's configs and the image headers and prints each
//!   image's plan (tiles, image tokens, downscale).

use crate::{options, SamplingArgs};
use afm::fusion::session::attachment;
use afm::fusion::{AskOptions, ImagePlan, LmInfo, ModelDir, Processor, Vlm};
use afm::lm::{DeviceModel, GenerationOptions, Prompt, Session};
use afm::vision::{load_image, ImageLimits};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Extensions `caption DIR` picks up (compared case-insensitively).
pub(crate) const IMAGE_EXTENSIONS: &[&str] =
    &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Which model: `--model` and `--lm` (shared by `caption`, `ask`, `screen` and `eval`).
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A SmolVLM / Idefics3 checkpoint directory in its HF layout (config.json,
    /// *.safetensors, tokenizer.json, processor config), an afm-tiny export directory
    /// (`<run>/afm-tiny`), or a Hugging Face Hub id (`HuggingFaceTB/SmolVLM-256M-Instruct`,
    /// optionally `@revision`) fetched into the HF cache (HF_HOME, HF_ENDPOINT). Default:
    /// the embedded afm-tiny (`assets/afm-tiny`, carried by the binary).
    #[arg(long, value_name = "DIR|ID")]
    model: Option<PathBuf>,
    /// afm-tiny only (models that name an external language model): the language model GGUF
    /// (default: the file named in the export's config.json, beside the export, then the
    /// default-model location, fetched on first use when it is the default SmolLM2). Its
    /// sha256 must be the one the export records.
    #[arg(long, value_name = "FILE")]
    lm: Option<PathBuf>,
    /// Run the vision encoder's projections, MLP and attention scores, and a safetensors
    /// language model's projections, in int8 (weights per output channel, activations per
    /// row or per 32 inputs). About 2x faster image encoding on CPUs with AVX-512 VNNI;
    /// outputs move by a few percent (relative), so answers can differ from the default f32.
    /// Elsewhere it runs a slower portable loop.
    #[arg(long)]
    int8: bool,
    /// A LoRA adapter on the language model (an afm LoRA file, see `afm lora-import`), bound
    /// to that model's checkpoint by sha256: the afm-tiny export's GGUF, or a SmolVLM
    /// directory's safetensors. An afm-tiny export that carries its own `lora.safetensors`
    /// uses that one (and refuses a second).
    #[arg(long, value_name = "FILE")]
    lora: Option<PathBuf>,
    /// The language model's K/V cache: 8 = int8 with per-layer scales (the checkpoint's, or
    /// calibrated on a built-in text at load), 16 = f16, 32 = f32. Default: as the
    /// checkpoint says (8-bit when it stores KV scales, else f32); `afm serve`: 16 unless
    /// the checkpoint stores KV scales.
    #[arg(long, value_name = "8|16|32")]
    kv: Option<u32>,
    /// Set by `afm serve`: without `--kv`, f16 K/V unless the checkpoint stores KV scales.
    #[arg(skip)]
    pub(crate) prefer_f16_kv: bool,
}

/// Flags shared by `caption`, `ask` and `screen`.
#[derive(Args)]
pub(crate) struct VlmArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Budget of image tokens per image; a larger image is downscaled (and stderr says so).
    /// Default: the model's full resolution (afm-tiny with a `tiling` section: its
    /// `max_tokens`). afm-tiny without one spends a fixed number per image (one tile): the
    /// budget is only checked against it.
    #[arg(long, value_name = "N")]
    image_max_tokens: Option<usize>,
    /// Print each image's plan (tiles, image tokens, downscale) without running the model.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
pub(crate) struct CaptionArgs {
    /// Image files and/or directories (a directory: its images, not recursive, sorted).
    #[arg(required = true, value_name = "IMAGE|DIR")]
    images: Vec<PathBuf>,
    /// One JSON object per image and line (path, caption, token counts, plan, timings, error).
    #[arg(long, conflicts_with = "json")]
    jsonl: bool,
    /// One JSON array of the per-image objects, at the end.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: VlmArgs,
}

#[derive(Args)]
pub(crate) struct AskArgs {
    image: PathBuf,
    /// The question about the image.
    question: String,
    /// Answer with JSON valid against this JSON Schema (guided generation); prints the JSON.
    #[arg(long, value_name = "FILE.json")]
    schema: Option<PathBuf>,
    #[command(flatten)]
    common: VlmArgs,
}

#[derive(Args)]
pub(crate) struct ScreenArgs {
    /// A screenshot.
    image: PathBuf,
    /// Print a typed description as JSON (title, buttons, fields with values, list items,
    /// selected item), always valid: generated under its JSON Schema (SmolVLM), or afm-tiny's
    /// sentences put in its slots.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: VlmArgs,
}

impl VlmArgs {
    fn ask_options(&self) -> Result<AskOptions> {
        if self.image_max_tokens == Some(0) {
            bail!("--image-max-tokens must be at least 1");
        }
        crate::check_sampling(&self.sampling)?;
        let generate = options(&self.sampling);
        Ok(AskOptions {
            generate,
            max_image_tokens: self.image_max_tokens,
        })
    }

    fn open(&self) -> Result<(ModelDir, Processor)> {
        self.model.open()
    }

    fn load(&self, m: &ModelDir) -> Result<(Vlm<DeviceModel>, f64)> {
        self.model.load(m)
    }
}

impl ModelArgs {
    /// What `--model` names, as given (`None`: the default model).
    /// Loads a text-only language model (a GGUF file or a safetensors directory) with the
    /// same `--lora`, `--int8` and `--kv` as a vision-language model gets (`afm serve`).
    pub(crate) fn load_text(&self, path: &Path) -> Result<afm::lm::Checkpoint> {
        let opts = afm::lm::LoadOptions {
            lora: self.lora.clone(),
            ..Default::default()
        };
        let mut ck = afm::lm::Checkpoint::load_with(path, &opts)
            .with_context(|| format!("loading {}", path.display()))?;
        ck.model.set_int8(self.int8)?;
        if let Some(bits) = self.kv {
            let cal = ck.tokenizer.encode(afm::lm::kv8::CALIBRATION_TEXT)?;
            let from = ck.model.apply_kv_bits(bits, &cal)?;
            crate::report_kv(bits, from);
        } else if self.prefer_f16_kv && ck.model.prefer_f16_kv() {
            eprintln!("KV cache: f16 (--kv 32 keeps f32)");
        }
        Ok(ck)
    }

    pub(crate) fn model_path(&self) -> Option<&Path> {
        self.model.as_deref()
    }

    fn model_dir(&self) -> Result<PathBuf> {
        let Some(dir) = self.model.as_deref() else {
            return afm::models::afm_tiny_dir();
        };
        if let Some(id) = dir.to_str().and_then(afm::hub::parse) {
            return afm::hub::resolve(&id);
        }
        if !dir.is_dir() {
            if dir.exists() {
                bail!(
                    "--model {}: not a directory; point it at a SmolVLM/Idefics3 checkpoint \
                     directory (config.json, model.safetensors, tokenizer.json, processor config)",
                    dir.display()
                );
            }
            bail!("--model {}: no such directory", dir.display());
        }
        Ok(dir.to_path_buf())
    }

    /// The model directory and its image processor, from its configs alone (no weights):
    /// what `--dry-run` and the budget check need.
    pub(crate) fn open(&self) -> Result<(ModelDir, Processor)> {
        self.open_at(&self.model_dir()?)
    }

    /// [`Self::open`] on a directory already resolved (a Hub id fetched, for instance).
    pub(crate) fn open_at(&self, dir: &Path) -> Result<(ModelDir, Processor)> {
        let ctx = || format!("reading the model {}", dir.display());
        let m = ModelDir::open(dir).with_context(ctx)?;
        if self.lm.is_some() && m.external_lm().is_none() {
            bail!(
                "--lm applies to afm-tiny exports only (models that name an external language \
                 model); {} is a {} checkpoint, which carries its own language model",
                dir.display(),
                m.model_type()
            );
        }
        let p = m.image_processor().with_context(ctx)?;
        Ok((m, p))
    }

    /// The external language model of a model that names one (module docs).
    fn external_lm(&self, m: &ModelDir, info: &LmInfo) -> Result<PathBuf> {
        if let Some(p) = &self.lm {
            return Ok(p.clone());
        }
        let cands = m.lm_candidates();
        if let Some(p) = cands.iter().find(|p| p.is_file()) {
            return Ok(p.clone());
        }
        if info
            .sha256
            .eq_ignore_ascii_case(crate::default_model::GGUF_SHA256)
        {
            return crate::default_model::locate_or_fetch();
        }
        bail!(
            "the {} model {} needs the language model `{}` (sha256 {}); not found at {}; \
             pass --lm FILE",
            m.model_type(),
            m.path().display(),
            info.file,
            info.sha256,
            cands
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )
    }

    /// Loads the pipeline, whatever the model's kind; `--int8` applies to the vision encoder
    /// and to the language model's dense matrices (a GGUF's quantized blocks stay as they are).
    pub(crate) fn load(&self, m: &ModelDir) -> Result<(Vlm<DeviceModel>, f64)> {
        let t0 = Instant::now();
        if self.int8 && !afm::vision::int8::int8_kernel_is_fast() {
            eprintln!(
                "note: --int8: the int8 kernel in use ({}) is the portable loop (no AVX2): expect it to be slower than f32",
                afm::lm::isa::level().name()
            );
        }
        let lm = match m.external_lm() {
            Some(info) => Some(self.external_lm(m, info)?),
            None => None,
        };
        let mut vlm = m
            .load_with_lora(lm.as_deref(), self.lora.as_deref())
            .with_context(|| match &lm {
                Some(lm) => format!(
                    "loading the {} model {} with the language model {}",
                    m.model_type(),
                    m.path().display(),
                    lm.display()
                ),
                None => format!(
                    "loading the {} model {}",
                    m.model_type(),
                    m.path().display()
                ),
            })?;
        vlm.set_vision_int8(self.int8)?;
        vlm.set_lm_int8(self.int8)?;
        if let Some(bits) = self.kv {
            let from = vlm.set_lm_kv_bits(bits)?;
            crate::report_kv(bits, from);
        } else if self.prefer_f16_kv && vlm.prefer_lm_f16_kv() {
            eprintln!("KV cache: f16 (--kv 32 keeps f32)");
        }
        Ok((vlm, t0.elapsed().as_secs_f64()))
    }
}

/// A budget below one tile's tokens fits no image at all: say so once, not per image. For a
/// model whose images cost a fixed number of tokens, a budget that covers it changes
/// nothing: say that too.
fn check_budget(budget: Option<usize>, p: &Processor, model: &str) -> Result<()> {
    let Some(b) = budget else { return Ok(()) };
    let (n, t) = (p.min_image_tokens(), p.tile_size());
    if b < n {
        bail!(
            "--image-max-tokens {b} is below what one {model} image costs at the smallest size \
             ({n} tokens: one {t}x{t} tile)"
        );
    }
    if let Some(why) = p.budget_note() {
        eprintln!("note: --image-max-tokens does not apply to {model}: {why}");
    }
    Ok(())
}

/// `{path}: {message}` unless the message already names the path.
fn with_path(path: &Path, e: &anyhow::Error) -> String {
    let msg = crate::error_line(e);
    let p = path.display().to_string();
    if msg.contains(&p) {
        msg
    } else {
        format!("{p}: {msg}")
    }
}

/// Expands the command line's paths: files as given, directories to their images (sorted,
/// not recursive). A path that does not exist, or a directory without images, is an error
/// before any model is loaded.
pub(crate) fn collect_images(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        let meta = std::fs::metadata(a).with_context(|| format!("cannot read {}", a.display()))?;
        if !meta.is_dir() {
            out.push(a.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(a)
            .with_context(|| format!("cannot list the directory {}", a.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                    && p.is_file()
            })
            .collect();
        if found.is_empty() {
            bail!(
                "{}: no images in this directory (looked for {}; not recursive)",
                a.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// The plan of one image file from its header, for `--dry-run`.
fn plan_file(p: &Processor, path: &Path, budget: Option<usize>) -> Result<ImagePlan> {
    // the same limits as a real run, from the header alone
    let (w, h) = afm::vision::image_io::image_size_checked(path, &ImageLimits::default())?;
    Ok(p.plan(w, h, budget)?)
}

/// One image's line of `--jsonl` / element of `--json` (fields in this order; `null` when
/// not known: a failed image has only `path` and `error`, a dry run no caption or timings).
#[derive(Serialize, Default)]
struct Record {
    path: String,
    caption: Option<String>,
    generated_tokens: Option<usize>,
    prompt_tokens: Option<usize>,
    image_tokens: Option<usize>,
    tiles: Option<usize>,
    /// `Some(f)`: the image-token budget scaled the image to `f` of the model's full
    /// resolution.
    downscale: Option<f64>,
    plan: Option<String>,
    encode_ms: Option<f64>,
    prefill_ms: Option<f64>,
    prefill_tok_s: Option<f64>,
    decode_tok_s: Option<f64>,
    stop: Option<String>,
    error: Option<String>,
}

impl Record {
    fn planned(path: &Path, plan: &ImagePlan) -> Self {
        Self {
            path: path.display().to_string(),
            image_tokens: Some(plan.image_tokens),
            tiles: Some(plan.tiles),
            downscale: plan.downscale,
            plan: Some(plan.describe()),
            ..Default::default()
        }
    }
    fn failed(path: &Path, e: &anyhow::Error) -> Self {
        Self {
            path: path.display().to_string(),
            error: Some(crate::error_line(e)),
            ..Default::default()
        }
    }
}

/// How `caption` writes its results.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    Lines,
    JsonLines,
    JsonArray,
}

/// Writes one finished record; `Lines` mode uses `line` (`None`: nothing on stdout).
fn emit(
    fmt: Format,
    out: &mut impl Write,
    all: &mut Vec<Record>,
    record: Record,
    line: Option<String>,
) -> Result<()> {
    match fmt {
        Format::Lines => {
            if let Some(l) = line {
                writeln!(out, "{l}")?;
            }
        }
        Format::JsonLines => writeln!(out, "{}", serde_json::to_string(&record)?)?,
        Format::JsonArray => all.push(record),
    }
    out.flush()?;
    Ok(())
}

/// A caption on one line: newlines and other control characters become spaces, runs of
/// white space one space.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn cmd_caption(a: CaptionArgs) -> Result<()> {
    let c = &a.common;
    let fmt = if a.jsonl {
        Format::JsonLines
    } else if a.json {
        Format::JsonArray
    } else {
        Format::Lines
    };
    // everything that can be checked without the model, first
    let (model, processor) = c.open()?;
    let opts = c.ask_options()?;
    let images = collect_images(&a.images)?;
    let n = images.len();
    let mut out = std::io::stdout().lock();
    let mut all = Vec::new();
    let mut failed = 0usize;

    check_budget(c.image_max_tokens, &processor, model.model_type())?;
    if c.dry_run {
        for p in &images {
            match plan_file(&processor, p, c.image_max_tokens) {
                Ok(plan) => {
                    let line = format!("{}: {}", p.display(), plan.describe());
                    emit(
                        fmt,
                        &mut out,
                        &mut all,
                        Record::planned(p, &plan),
                        Some(line),
                    )?;
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("error: {}", with_path(p, &e));
                    emit(fmt, &mut out, &mut all, Record::failed(p, &e), None)?;
                }
            }
        }
        return finish(fmt, &mut out, &all, failed, n);
    }

    let (vlm, load_secs) = c.load(&model)?;
    let bar = if n > 1 {
        let b = ProgressBar::new(n as u64);
        b.set_style(
            ProgressStyle::with_template("captioning {bar:30} {pos}/{len} {elapsed} {msg}")
                .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let limits = ImageLimits::default();
    let t0 = Instant::now();
    let (mut gen_tokens, mut decode_secs) = (0usize, 0.0f64);
    for p in &images {
        bar.set_message(
            p.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let res = (|| -> Result<_> {
            let img = load_image(p, &limits)?;
            let plan = vlm.plan(img.width(), img.height(), opts.max_image_tokens)?;
            if plan.downscale.is_some() {
                bar.suspend(|| eprintln!("{}: {}", p.display(), plan.describe()));
            }
            Ok(vlm.caption(&img, &opts, &mut |_| true)?)
        })();
        match res {
            Ok(ans) => {
                let s = &ans.generation.stats;
                gen_tokens += s.generated_tokens.saturating_sub(1);
                decode_secs += s.decode_secs;
                let caption = one_line(&ans.generation.text);
                let record = Record {
                    caption: Some(caption.clone()),
                    generated_tokens: Some(s.generated_tokens),
                    prompt_tokens: Some(ans.prompt_tokens),
                    encode_ms: Some(ans.encode_secs * 1e3),
                    prefill_ms: Some(s.prefill_secs * 1e3),
                    prefill_tok_s: Some(s.prefill_tok_s()),
                    decode_tok_s: Some(s.decode_tok_s()),
                    stop: Some(format!("{:?}", s.stop)),
                    ..Record::planned(p, &ans.plan)
                };
                let line = format!("{}: {caption}", p.display());
                bar.suspend(|| emit(fmt, &mut out, &mut all, record, Some(line)))?;
            }
            Err(e) => {
                failed += 1;
                bar.suspend(|| {
                    eprintln!("error: {}", with_path(p, &e));
                    emit(fmt, &mut out, &mut all, Record::failed(p, &e), None)
                })?;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!(
        "load {:.2} s | {} of {} image(s) captioned in {:.2} s | decode {:.1} tok/s",
        load_secs,
        n - failed,
        n,
        t0.elapsed().as_secs_f64(),
        gen_tokens as f64 / decode_secs.max(1e-9)
    );
    finish(fmt, &mut out, &all, failed, n)
}

fn finish(
    fmt: Format,
    out: &mut impl Write,
    all: &[Record],
    failed: usize,
    n: usize,
) -> Result<()> {
    if fmt == Format::JsonArray {
        writeln!(out, "{}", serde_json::to_string_pretty(all)?)?;
        out.flush()?;
    }
    if failed > 0 {
        bail!("{failed} of {n} image(s) failed");
    }
    Ok(())
}

/// What `ask` and `screen` print.
enum Output<'a> {
    /// Free text, streamed.
    Text,
    /// JSON valid against a schema.
    Schema(&'a serde_json::Value),
    /// `screen --json`: the typed screen description.
    ScreenJson,
}

/// `ask` and `screen`: one image, the answer streamed to stdout.
fn answer(c: &VlmArgs, image: &Path, question: Option<&str>, output: Output) -> Result<()> {
    let (model, processor) = c.open()?;
    let opts = c.ask_options()?;
    let mut out = std::io::stdout().lock();
    if c.dry_run {
        check_budget(c.image_max_tokens, &processor, model.model_type())?;
        let plan = plan_file(&processor, image, c.image_max_tokens)
            .map_err(|e| anyhow!(with_path(image, &e)))?;
        writeln!(out, "{}: {}", image.display(), plan.describe())?;
        return Ok(());
    }
    // a bad image fails before the (slow) model load
    let img = load_image(image, &ImageLimits::default())?;
    check_budget(c.image_max_tokens, &processor, model.model_type())?;
    let (vlm, load_secs) = c.load(&model)?;
    let plan = vlm
        .plan(img.width(), img.height(), opts.max_image_tokens)
        .map_err(|e| anyhow!(with_path(image, &anyhow::Error::from(e))))?;
    if plan.downscale.is_some() {
        eprintln!("{}: {}", image.display(), plan.describe());
    }
    let gen_opts = GenerationOptions::from_generate_options(&opts.generate);
    match output {
        Output::Text => {}
        Output::ScreenJson => {
            let t0 = std::time::Instant::now();
            let d = vlm
                .describe_screen_typed(&img, opts.max_image_tokens, &gen_opts)
                .with_context(|| format!("describing {}", image.display()))?;
            writeln!(out, "{}", serde_json::to_string_pretty(&d)?)?;
            eprintln!(
                "load {:.2} s | {} | described in {:.2} s",
                load_secs,
                plan.describe(),
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        Output::Schema(schema) => {
            let mut s = Session::new(&vlm);
            s.options = gen_opts;
            let p = Prompt::default()
                .image(attachment(&img).with_max_tokens(opts.max_image_tokens))
                .then(question.unwrap_or_default());
            let (v, r) = s
                .respond_to_schema(p, schema)
                .with_context(|| format!("answering about {}", image.display()))?;
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
            eprintln!(
                "load {:.2} s | {} | prompt {} tok | generated {} tok | stop: {:?}",
                load_secs,
                plan.describe(),
                r.stats.prompt_tokens,
                r.stats.generated_tokens,
                r.stats.stop
            );
            return Ok(());
        }
    }
    let mut on_text = |piece: &str| {
        out.write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .is_ok()
    };
    let ans = match question {
        Some(q) => vlm.ask(&img, q, &opts, &mut on_text),
        None => vlm.describe_screen(&img, &opts, &mut on_text),
    }
    .with_context(|| format!("answering about {}", image.display()))?;
    writeln!(out)?;
    let s = &ans.generation.stats;
    eprintln!(
        "load {:.2} s | {} | encode {:.0} ms | prompt {} tok, prefill {:.1} tok/s | generated {} tok, decode {:.1} tok/s | stop: {:?}",
        load_secs,
        ans.plan.describe(),
        ans.encode_secs * 1e3,
        ans.prompt_tokens,
        s.prefill_tok_s(),
        s.generated_tokens,
        s.decode_tok_s(),
        s.stop
    );
    Ok(())
}

pub(crate) fn cmd_ask(a: AskArgs) -> Result<()> {
    if a.question.trim().is_empty() {
        bail!("the question is empty; ask something about the image");
    }
    let schema = a.schema.as_deref().map(crate::read_schema).transpose()?;
    let output = match &schema {
        Some(s) => Output::Schema(s),
        None => Output::Text,
    };
    answer(&a.common, &a.image, Some(&a.question), output)
}

pub(crate) fn cmd_screen(a: ScreenArgs) -> Result<()> {
    let output = if a.json {
        Output::ScreenJson
    } else {
        Output::Text
    };
    answer(&a.common, &a.image, None, output)
}

#[derive(Args)]
pub struct ReadArgs {
    /// Images (screenshots) whose text to read.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// An afm-tiny export with a `reader/`, or a `reader/` directory itself (default: the
    /// embedded afm-tiny's reader).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One JSON object per image: `{"file", "lines": [{"text", "x", "y", "w", "h", "boxed",
    /// "highlighted"}]}`.
    #[arg(long)]
    pub json: bool,
}

/// One line read by `afm read`.
#[derive(Serialize)]
struct ReadLineJson<'a> {
    text: &'a str,
    x: u32,
    y: u32,
    w: u32,
    h: u32,
    /// In a snug box of its own ground (a button-like control).
    boxed: bool,
    highlighted: bool,
}

/// One object found by `afm read` (in an image with no text, when the reader has
/// `shapes.json`).
#[derive(Serialize)]
struct ObjectJson<'a> {
    colour: &'a str,
    shape: &'a str,
    rgb: [u8; 3],
    x: u32,
    y: u32,
    w: u32,
    h: u32,
}

/// `afm read`: the text-line finder and reader alone, no language model: every line of text
/// in each image, top to bottom, with its box.
pub fn cmd_read(a: ReadArgs) -> Result<()> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => afm::models::afm_tiny_dir()?,
    };
    // a reader directory holds model.safetensors; an afm-tiny export holds it in reader/
    let rdir = if dir.join("model.safetensors").is_file() {
        dir.clone()
    } else {
        dir.join("reader")
    };
    if !rdir.join("config.json").is_file() {
        bail!(
            "--model {}: no text reader there (expected reader/config.json and reader/model.safetensors, as `afm train reader` writes)",
            dir.display()
        );
    }
    let sr = afm::fusion::vlm::ScreenReader::from_dir(&rdir)
        .with_context(|| format!("loading the text reader from {}", rdir.display()))?;
    let mut out = std::io::stdout().lock();
    for path in &a.images {
        let img = load_image(path, &ImageLimits::default())?;
        let t0 = Instant::now();
        let (lines, objects) = sr
            .read(&img)
            .with_context(|| format!("reading {}", path.display()))?;
        let objects_json: Vec<ObjectJson> = objects
            .iter()
            .map(|o| ObjectJson {
                colour: o.colour,
                shape: &o.shape,
                rgb: o.rgb,
                x: o.region.x,
                y: o.region.y,
                w: o.region.w,
                h: o.region.h,
            })
            .collect();
        if a.json {
            let l: Vec<ReadLineJson> = lines
                .iter()
                .map(|l| ReadLineJson {
                    text: &l.text,
                    x: l.region.x,
                    y: l.region.y,
                    w: l.region.w,
                    h: l.region.h,
                    boxed: l.boxed,
                    highlighted: l.highlighted,
                })
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::json!({"file": path.display().to_string(), "lines": l, "objects": objects_json})
            )?;
        } else {
            writeln!(out, "{}:", path.display())?;
            for l in &lines {
                let r = l.region;
                writeln!(
                    out,
                    "  {:>4},{:<4} {:>4}x{:<3} {}{}",
                    r.x,
                    r.y,
                    r.w,
                    r.h,
                    match (l.highlighted, l.boxed) {
                        (true, _) => "[box, highlighted] ",
                        (false, true) => "[box] ",
                        _ => "",
                    },
                    l.text
                )?;
            }
            for o in &objects_json {
                writeln!(
                    out,
                    "  {:>4},{:<4} {:>4}x{:<3} [object] {} {} (#{:02x}{:02x}{:02x})",
                    o.x, o.y, o.w, o.h, o.colour, o.shape, o.rgb[0], o.rgb[1], o.rgb[2]
                )?;
            }
        }
        eprintln!(
            "{}: {} lines read, {} objects found in {:.2} s",
            path.display(),
            lines.len(),
            objects.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
