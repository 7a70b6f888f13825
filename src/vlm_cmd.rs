//! `afm caption`, `afm ask` and `afm screen`: a SmolVLM / Idefics3 checkpoint directory
//! (HF layout) or an afm-tiny export (`<run>/afm-tiny`, written by `afm train adapter`) over
//! one or many images. The pipeline is picked from the directory's `config.json`
//! (`model_type` `"afm-tiny"`, else Idefics3). Without `--model`: the embedded default model,
//! the afm-tiny export committed in `assets/afm-tiny` ([`DEFAULT_MODEL_DIR`]).
//!
//! * afm-tiny: the language model is the GGUF named in its `config.json` (`lm.file`), looked
//!   for beside the export (the export directory, then the run directory), then, when it is
//!   the default SmolLM2 (same sha256), where `afm generate` keeps its default model; `--lm
//!   FILE` names it instead. Its sha256 must be the one recorded. Every image is one tile
//!   (no tiling yet), so `--image-max-tokens` only checks that the budget covers that tile
//!   and says so.
//!
//! * `caption IMAGE... | DIR`: one model for the whole batch; `path: caption` lines, or one
//!   JSON object per image (`--jsonl`), or one JSON array (`--json`). An image that cannot be
//!   read or decoded is reported and the batch goes on; the exit code is non-zero at the end.
//! * `ask IMAGE QUESTION` / `screen IMAGE`: the answer streams to stdout, the figures (plan,
//!   encode time, prefill and decode tok/s) go to stderr as `afm generate` does.
//! * `--dry-run` reads only the checkpoint's configs and the image headers and prints each
//!   image's plan (tiles, image tokens, downscale).

use crate::{options, SamplingArgs};
use afm::fusion::afm_tiny::{self, AfmTinyConfig};
use afm::fusion::{AfmTiny, AskOptions, Idefics3Processor, ImagePlan, VisionLanguage, Vlm};
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

/// The embedded default model: the afm-tiny export committed under `assets/afm-tiny` of this
/// source tree (its vision and adapter weights; the language model it names is fetched on
/// first use). Found through the path the binary was built from, so `cargo run` and a binary
/// built from a clone work; a binary copied elsewhere needs `--model`.
pub(crate) const DEFAULT_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/afm-tiny");

/// Which model: `--model` and `--lm` (shared by `caption`, `ask`, `screen` and `eval`).
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A SmolVLM / Idefics3 checkpoint directory in its HF layout (config.json,
    /// *.safetensors, tokenizer.json, processor config), or an afm-tiny export directory
    /// (`<run>/afm-tiny`). Default: the embedded afm-tiny (`assets/afm-tiny`).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// afm-tiny only: the language model GGUF (default: the file named in the export's
    /// config.json, beside the export, then the default-model location, fetched on first use
    /// when it is the default SmolLM2). Its sha256 must be the one the export records.
    #[arg(long, value_name = "FILE")]
    lm: Option<PathBuf>,
    /// Run the vision encoder's projections, MLP and attention scores, and a safetensors
    /// language model's projections, in int8 (weights per output channel, activations per
    /// row or per 32 inputs). About 2x faster image encoding on CPUs with AVX-512 VNNI;
    /// outputs move by a few percent (relative), so answers can differ from the default f32.
    /// Elsewhere it runs a slower portable loop.
    #[arg(long)]
    int8: bool,
}

/// Flags shared by `caption`, `ask` and `screen`.
#[derive(Args)]
pub(crate) struct VlmArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Budget of image tokens per image; a larger image is downscaled in steps of one tile
    /// (and stderr says so). Default: the checkpoint's full resolution. afm-tiny spends a
    /// fixed number per image (one tile): the budget is only checked against it.
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
    #[command(flatten)]
    common: VlmArgs,
}

#[derive(Args)]
pub(crate) struct ScreenArgs {
    /// A screenshot.
    image: PathBuf,
    #[command(flatten)]
    common: VlmArgs,
}

impl VlmArgs {
    fn ask_options(&self) -> Result<AskOptions> {
        if self.image_max_tokens == Some(0) {
            bail!("--image-max-tokens must be at least 1");
        }
        let generate = options(&self.sampling);
        generate.sampling.validate()?;
        Ok(AskOptions {
            generate,
            max_image_tokens: self.image_max_tokens,
        })
    }

    fn planner(&self) -> Result<Planner> {
        self.model.planner()
    }

    fn load(&self, planner: &Planner) -> Result<(Box<dyn VisionLanguage>, f64)> {
        self.model.load(planner)
    }
}

impl ModelArgs {
    fn model_dir(&self) -> Result<&Path> {
        let Some(dir) = self.model.as_deref() else {
            let dir = Path::new(DEFAULT_MODEL_DIR);
            if !dir.join("config.json").is_file() {
                bail!(
                    "the embedded default model is not at {DEFAULT_MODEL_DIR} (this binary was \
                     built from a source tree that has since moved or lacks assets/afm-tiny); \
                     pass --model DIR: a SmolVLM/Idefics3 checkpoint directory or an afm-tiny \
                     export (<run>/afm-tiny from `afm train adapter`)"
                );
            }
            return Ok(dir);
        };
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
        Ok(dir)
    }

    /// The checkpoint's kind, from its `config.json` (an unreadable or absent config is
    /// left to the Idefics3 loader, whose errors name the missing files).
    pub(crate) fn planner(&self) -> Result<Planner> {
        let dir = self.model_dir()?;
        let afm_tiny = afm_tiny::is_afm_tiny(dir).unwrap_or(false);
        if afm_tiny {
            let cj = dir.join("config.json");
            let cfg = AfmTinyConfig::from_file(&cj)
                .with_context(|| format!("reading the afm-tiny export {}", dir.display()))?;
            return Ok(Planner::AfmTiny(Box::new(cfg)));
        }
        if self.lm.is_some() {
            bail!(
                "--lm applies to afm-tiny exports only; {} is a SmolVLM/Idefics3 checkpoint, \
                 which carries its own language model",
                dir.display()
            );
        }
        let ctx = || format!("reading the SmolVLM/Idefics3 checkpoint {}", dir.display());
        Ok(Planner::Idefics3(
            Idefics3Processor::for_checkpoint(dir).with_context(ctx)?.1,
        ))
    }

    /// The language model of an afm-tiny export (module docs).
    fn afm_tiny_lm(&self, dir: &Path, cfg: &AfmTinyConfig) -> Result<PathBuf> {
        if let Some(p) = &self.lm {
            return Ok(p.clone());
        }
        let cands = afm_tiny::lm_candidates(dir, cfg);
        if let Some(p) = cands.iter().find(|p| p.is_file()) {
            return Ok(p.clone());
        }
        if cfg
            .lm
            .sha256
            .eq_ignore_ascii_case(crate::default_model::GGUF_SHA256)
        {
            return crate::default_model::locate_or_fetch();
        }
        bail!(
            "the afm-tiny export {} needs the language model `{}` (sha256 {}); not found at {}; \
             pass --lm FILE",
            dir.display(),
            cfg.lm.file,
            cfg.lm.sha256,
            cands
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )
    }

    pub(crate) fn load(&self, planner: &Planner) -> Result<(Box<dyn VisionLanguage>, f64)> {
        let dir = self.model_dir()?;
        let t0 = Instant::now();
        if self.int8 && !afm::vision::int8::int8_kernel_is_fast() {
            eprintln!(
                "note: --int8: this CPU has no AVX-512 VNNI, so the int8 path runs a portable loop, slower than f32"
            );
        }
        let vlm: Box<dyn VisionLanguage> = match planner {
            Planner::AfmTiny(cfg) => {
                let lm = self.afm_tiny_lm(dir, cfg)?;
                let mut m = AfmTiny::load(dir, &lm).with_context(|| {
                    format!(
                        "loading the afm-tiny export {} with the language model {}",
                        dir.display(),
                        lm.display()
                    )
                })?;
                m.set_vision_int8(self.int8)?;
                Box::new(m)
            }
            Planner::Idefics3(_) => {
                let mut m = Vlm::load_idefics3(dir).with_context(|| {
                    format!("loading the SmolVLM/Idefics3 checkpoint {}", dir.display())
                })?;
                m.set_vision_int8(self.int8)?;
                m.set_lm_int8(self.int8)?;
                Box::new(m)
            }
        };
        Ok((vlm, t0.elapsed().as_secs_f64()))
    }
}

/// What an image costs, from the configs alone (no weights): `--dry-run` and the budget check.
pub(crate) enum Planner {
    Idefics3(Idefics3Processor),
    AfmTiny(Box<AfmTinyConfig>),
}

impl Planner {
    fn plan(&self, w: u32, h: u32, budget: Option<usize>) -> Result<ImagePlan> {
        Ok(match self {
            Planner::Idefics3(pre) => pre.plan(w, h, budget)?,
            Planner::AfmTiny(cfg) => afm_tiny::plan(cfg, w, h, budget)?,
        })
    }
}

/// A budget below one tile's tokens fits no image at all: say so once, not per image. For
/// afm-tiny, a budget that covers its one tile does not change anything: say that too.
fn check_budget(budget: Option<usize>, planner: &Planner) -> Result<()> {
    match (budget, planner) {
        (Some(b), Planner::Idefics3(pre)) if b < pre.image_seq_len => bail!(
            "--image-max-tokens {b} is below what one image costs at the smallest size \
             ({} tokens: one {}x{} tile)",
            pre.image_seq_len,
            pre.tile,
            pre.tile
        ),
        (Some(b), Planner::AfmTiny(cfg)) => {
            let (n, s) = (cfg.tokens_per_image, cfg.image_size);
            if b < n {
                bail!(
                    "--image-max-tokens {b} is below what afm-tiny spends on every image \
                     ({n} tokens: one {s}x{s} tile)"
                );
            }
            eprintln!(
                "note: --image-max-tokens does not apply to afm-tiny: every image is one \
                 {s}x{s} tile of {n} image tokens (tiling is not implemented yet)"
            );
            Ok(())
        }
        _ => Ok(()),
    }
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
fn plan_file(pre: &Planner, path: &Path, budget: Option<usize>) -> Result<ImagePlan> {
    let (w, h) = afm::vision::image_io::image_size(path)?;
    pre.plan(w, h, budget)
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
    /// `Some(f)`: the image-token budget lowered the longest edge to `f` of the checkpoint's.
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
    let planner = c.planner()?;
    let opts = c.ask_options()?;
    let images = collect_images(&a.images)?;
    let n = images.len();
    let mut out = std::io::stdout().lock();
    let mut all = Vec::new();
    let mut failed = 0usize;

    if c.dry_run {
        check_budget(c.image_max_tokens, &planner)?;
        for p in &images {
            match plan_file(&planner, p, c.image_max_tokens) {
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

    check_budget(c.image_max_tokens, &planner)?;
    let (vlm, load_secs) = c.load(&planner)?;
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

/// `ask` and `screen`: one image, the answer streamed to stdout.
fn answer(c: &VlmArgs, image: &Path, question: Option<&str>) -> Result<()> {
    let planner = c.planner()?;
    let opts = c.ask_options()?;
    let mut out = std::io::stdout().lock();
    if c.dry_run {
        check_budget(c.image_max_tokens, &planner)?;
        let plan = plan_file(&planner, image, c.image_max_tokens)
            .map_err(|e| anyhow!(with_path(image, &e)))?;
        writeln!(out, "{}: {}", image.display(), plan.describe())?;
        return Ok(());
    }
    // a bad image fails before the (slow) model load
    let img = load_image(image, &ImageLimits::default())?;
    check_budget(c.image_max_tokens, &planner)?;
    let (vlm, load_secs) = c.load(&planner)?;
    let plan = vlm
        .plan(img.width(), img.height(), opts.max_image_tokens)
        .map_err(|e| anyhow!(with_path(image, &anyhow::Error::from(e))))?;
    if plan.downscale.is_some() {
        eprintln!("{}: {}", image.display(), plan.describe());
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
    answer(&a.common, &a.image, Some(&a.question))
}

pub(crate) fn cmd_screen(a: ScreenArgs) -> Result<()> {
    answer(&a.common, &a.image, None)
}
