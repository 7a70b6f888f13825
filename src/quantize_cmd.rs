//! `afm quantize` (a DeviceModel into the paper's formats), `afm device-gen` (a random-weight
//! checkpoint of the paper's full on-device configuration, straight into those formats) and
//! `afm bench quant` (bytes, load time, peak RSS, perplexity and prefill/decode speed of
//! several checkpoints, afm's and llama.cpp's, each in its own process, in one run).

use afm::lm::load::CheckpointFiles;
use afm::lm::perplexity;
use afm::lm::quantize::{quantize_checkpoint, write_random_gguf, QuantizeSpec};
use afm::lm::{DeviceModel, LanguageModel, LmConfig, LoadOptions, LogitsFor, Tokenizer};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// The model to convert: a .gguf file, or a directory (or .safetensors file) with
    /// config.json.
    input: PathBuf,
    /// The .gguf file to write (one file holds the whole quantized model).
    output: PathBuf,
    /// Bits of the projections (q/k/v/o, gate/up/down): 2 = the paper's grid
    /// {-1.5,-0.5,0.5,1.5} x a scale per --group inputs; 4 = Q4_1; 8 = Q8_0; 16 = F16; 32 = F32.
    #[arg(long, default_value_t = 2)]
    weights: u32,
    /// Bits of the embedding table (also the output head when tied): 4 = afm's 4-bit table
    /// (a scale per 32 values); 8 = Q8_0; 16 = F16; 32 = F32.
    #[arg(long, default_value_t = 4)]
    embeddings: u32,
    /// 8 = store per-layer K/V scales (the checkpoint's, or calibrated on a built-in text),
    /// so the model runs with the 8-bit KV cache; 16 (or 32) = no K/V scales (the model runs
    /// with an f32 cache, or f16 / int8 with `--kv 16` / `--kv 8` at run time).
    #[arg(long, default_value_t = 8)]
    kv: u32,
    /// Inputs per scale of the 2-bit weights (32, 64, 128 or 256).
    #[arg(long, default_value_t = afm::lm::lowbit::DEFAULT_GROUP)]
    group: usize,
    /// Fit the 2-bit scales to this text (UTF-8; not the text you evaluate on): each input
    /// column's rounding error weighs its mean squared activation on the text (an importance
    /// matrix). Also the text the 8-bit KV scales are calibrated on. Plain dense checkpoints
    /// (no KV sharing) only.
    #[arg(long, value_name = "FILE")]
    calibrate: Option<PathBuf>,
    /// Tokens of --calibrate used (the first ones).
    #[arg(long, default_value_t = 4096)]
    calibrate_tokens: usize,
    /// With --weights 2: projection kinds kept in Q4_1 instead (comma-separated: q, k, v, o,
    /// gate, up, down), a mixed file as llama.cpp's Q2_K keeps V and down projections at
    /// higher precision; e.g. `--q4 v,down`.
    #[arg(long, value_name = "PROJECTIONS")]
    q4: Option<String>,
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// The checkpoint's tokenizer without loading its weights (`None` if it has none).
fn tokenizer_of(path: &Path) -> Option<Tokenizer> {
    match CheckpointFiles::resolve(path).ok()? {
        CheckpointFiles::Gguf(p) => {
            let src = afm::lm::weights::WeightSource::from_gguf(&p).ok()?;
            Tokenizer::from_gguf(src.gguf_metadata()?).ok()
        }
        CheckpointFiles::Safetensors { dir, .. } => Tokenizer::from_dir(&dir).ok(),
    }
}

/// Token ids of the built-in KV calibration text (empty without a tokenizer).
fn calibration_ids(tok: Option<&Tokenizer>) -> Vec<u32> {
    tok.and_then(|t| t.encode(afm::lm::kv8::CALIBRATION_TEXT).ok())
        .unwrap_or_default()
}

pub(crate) fn cmd_quantize(a: &QuantizeArgs) -> Result<()> {
    let spec = QuantizeSpec {
        weights: a.weights,
        embeddings: a.embeddings,
        kv: a.kv,
        group: a.group,
        importance: a.calibrate.is_some(),
        q4_projections: match &a.q4 {
            Some(t) => afm::lm::quantize::projection_mask(
                &afm::lm::lora::parse_targets(t).context("--q4")?,
            ),
            None => 0,
        },
    };
    spec.validate()?;
    let tok = tokenizer_of(&a.input);
    let cal = match &a.calibrate {
        None => calibration_ids(tok.as_ref()),
        Some(f) => {
            let tok = tok.as_ref().with_context(|| {
                format!(
                    "--calibrate {}: {} has no tokenizer to read the text with",
                    f.display(),
                    a.input.display()
                )
            })?;
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("--calibrate: reading {}", f.display()))?;
            let mut ids = tok.encode(&text)?;
            if ids.is_empty() {
                bail!("--calibrate {}: the text has no tokens", f.display());
            }
            if ids.len() > a.calibrate_tokens {
                println!(
                    "calibration: the first {} of the {} tokens of {} (--calibrate-tokens)",
                    a.calibrate_tokens,
                    ids.len(),
                    f.display()
                );
                ids.truncate(a.calibrate_tokens);
            } else {
                println!("calibration: {} tokens of {}", ids.len(), f.display());
            }
            if a.weights != 2 {
                println!(
                    "note: --calibrate fits 2-bit scales only; with --weights {} it {}",
                    a.weights,
                    if a.kv == 8 {
                        "calibrates the 8-bit KV scales alone"
                    } else {
                        "is not used (--kv 16 stores no KV scales)"
                    }
                );
            }
            ids
        }
    };
    let t0 = Instant::now();
    let r = quantize_checkpoint(&a.input, &a.output, &spec, &cal).with_context(|| {
        format!(
            "quantizing {} into {}",
            a.input.display(),
            a.output.display()
        )
    })?;
    let w = match a.weights {
        2 if a.q4.is_some() => format!(
            "2-bit grid, a scale per {}, with {} in Q4_1",
            a.group,
            a.q4.as_deref().unwrap_or_default()
        ),
        2 => format!("2-bit grid, a scale per {}", a.group),
        4 => "Q4_1".into(),
        8 => "Q8_0".into(),
        b => format!("F{b}"),
    };
    let e = match a.embeddings {
        4 => "4-bit table".to_string(),
        8 => "Q8_0".into(),
        b => format!("F{b}"),
    };
    let kv = match r.kv_scales {
        "none" => "no KV scales (f32 at run time; `--kv 16` / `--kv 8` for f16 / int8)".to_string(),
        s => format!("8-bit, scales {s}"),
    };
    println!(
        "{}: {:.1} MB -> {}: {:.1} MB ({:.3}x the input, {:.2} bits per parameter; {} parameters)",
        a.input.display(),
        mb(r.bytes_in),
        a.output.display(),
        mb(r.bytes_out),
        r.bytes_out as f64 / r.bytes_in as f64,
        8.0 * r.bytes_out as f64 / r.params as f64,
        r.params
    );
    println!(
        "weights: {w}; embeddings: {e}; KV cache: {kv}; {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if tok.is_none() {
        eprintln!(
            "note: {} has no tokenizer this tool can carry into GGUF; the output loads as a \
             model without one",
            a.input.display()
        );
    }
    Ok(())
}

/// The paper's on-device model (AFMTextV7, ~3.1B parameters).
pub(crate) fn preset(name: &str) -> Result<LmConfig> {
    let (v, h, i, l, reuse, heads, kvh, hd, ctx) = match name {
        "afm-3b" => (153_600, 2048, 6656, 56, 21, 16, 2, 128, 4096),
        // the same shape, small (tests)
        "afm-small" => (512, 128, 352, 8, 3, 4, 2, 32, 256),
        _ => bail!("unknown preset `{name}` (afm-3b, afm-small)"),
    };
    Ok(LmConfig::from_json(serde_json::json!({
        "vocab_size": v, "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": l, "num_kv_reuse_layers": reuse,
        "num_attention_heads": heads, "num_key_value_heads": kvh, "head_dim": hd,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_interleaved": true,
        "qk_norm": true, "tie_word_embeddings": true, "max_position_embeddings": ctx
    }))?)
}

#[derive(Args)]
pub(crate) struct DeviceGenArgs {
    /// `afm-3b`: the paper's on-device model (56 layers, 35 with K/V and 21 reusing them;
    /// width 2048; 16 query heads and 2 K/V heads of 128; SwiGLU 6656; vocabulary 153,600;
    /// QK-norm; tied embeddings); `afm-small`: the same shape, small.
    #[arg(long, default_value = "afm-3b")]
    preset: String,
    /// The .gguf file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// As `afm quantize --weights` (2, 4, 8, 16, 32).
    #[arg(long, default_value_t = 2)]
    weights: u32,
    /// As `afm quantize --embeddings` (4, 8, 16, 32).
    #[arg(long, default_value_t = 4)]
    embeddings: u32,
    /// 8: store K/V scales (the 8-bit KV cache); 16 (or 32): none.
    #[arg(long, default_value_t = 8)]
    kv: u32,
    #[arg(long, default_value_t = afm::lm::lowbit::DEFAULT_GROUP)]
    group: usize,
    /// Copy the tokenizer of this GGUF (e.g. SmolLM2's) into the output, so `afm generate`
    /// runs it (its vocabulary must fit the preset's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub(crate) fn cmd_device_gen(a: &DeviceGenArgs) -> Result<()> {
    let cfg = preset(&a.preset)?;
    let spec = QuantizeSpec {
        weights: a.weights,
        embeddings: a.embeddings,
        kv: a.kv,
        group: a.group,
        importance: false,
        q4_projections: 0,
    };
    spec.validate()?;
    let extra = match &a.tokenizer {
        Some(t) => {
            let md = afm::lm::server_checkpoint::gguf_tokenizer_metadata(t)?;
            let n = md
                .iter()
                .find(|(k, _)| k == "tokenizer.ggml.tokens")
                .and_then(|(_, v)| v.to_vec().ok().map(|v| v.len()))
                .unwrap_or(0);
            if n > cfg.vocab_size {
                bail!(
                    "the tokenizer of {} has {n} tokens, more than the preset's {}",
                    t.display(),
                    cfg.vocab_size
                );
            }
            md
        }
        None => vec![],
    };
    let t0 = Instant::now();
    write_random_gguf(&a.out, &cfg, &spec, a.seed, 0.05, &extra)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let bytes = std::fs::metadata(&a.out)?.len();
    let params: usize = afm::lm::quantize::tensor_list(&cfg)
        .iter()
        .map(|(_, d, _)| d.iter().product::<usize>())
        .sum();
    println!(
        "{}: preset {} ({:.2}B parameters, random weights), {:.1} MB ({:.2} bits per parameter), \
         written in {:.1} s",
        a.out.display(),
        a.preset,
        params as f64 / 1e9,
        mb(bytes),
        8.0 * bytes as f64 / params as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct QuantBenchArgs {
    /// One checkpoint to measure, repeatable: `LABEL=afm:PATH` (afm; add `:kv8` for the
    /// 8-bit KV cache, `:kv16` for f16, `:kv32` for f32, `:lora=FILE` for an adapter) or
    /// `LABEL=llama:PATH` (llama.cpp through llama-cpp-python), or `LABEL=llama-bench:PATH`
    /// (speed only, from llama.cpp's own `llama-bench`: prefill of the prompt's length from
    /// an empty context, decode after as many tokens of context, fastest of `--speed-runs`).
    #[arg(long = "run", required = true)]
    runs: Vec<String>,
    /// A text file for perplexity (e.g. runs/text/luke.txt from scripts/fetch_kjv_text.sh);
    /// without it only speed and memory are measured.
    #[arg(long)]
    text: Option<PathBuf>,
    /// The checkpoint whose tokenizer cuts the text (default: the first afm run's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Tokens of the text scored (at most).
    #[arg(long, default_value_t = 24_576)]
    ppl_tokens: usize,
    /// Perplexity window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Speed runs per checkpoint (the fastest is reported).
    #[arg(long, default_value_t = 2)]
    speed_runs: usize,
    /// The label the ratios are taken against (default: the first run).
    #[arg(long)]
    baseline: Option<String>,
    /// Python with llama-cpp-python for `llama:` runs.
    #[arg(long, default_value = "python3")]
    python: String,
    /// llama.cpp's `llama-bench` for `llama-bench:` runs (default: `$AFM_LLAMA_BENCH`, else
    /// `target/llama.cpp/bin/llama-bench` if present).
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What one benchmark process reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct QuantReport {
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub engine: String,
    #[serde(default)]
    pub bytes: u64,
    pub load_s: f64,
    pub peak_rss_kb: u64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    #[serde(default)]
    pub ppl: Option<f64>,
    #[serde(default)]
    pub scored: usize,
    #[serde(default)]
    pub kv: String,
}

/// The input of a benchmark process.
#[derive(Serialize, Deserialize)]
struct WorkerInput {
    text: Vec<u32>,
    prompt: Vec<u32>,
    calibration: Vec<u32>,
    ctx: usize,
    new_tokens: usize,
    runs: usize,
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// One afm benchmark process (`afm bench-quant-worker`): load, speed, peak RSS, perplexity.
pub(crate) fn quant_worker(model: &Path, kv: Option<u32>, lora: Option<PathBuf>) -> Result<()> {
    let mut s = String::new();
    std::io::stdin().lock().read_to_string(&mut s)?;
    let inp: WorkerInput = serde_json::from_str(&s).context("reading the worker input")?;
    let t0 = Instant::now();
    let mut m = DeviceModel::load_with(
        model,
        &LoadOptions {
            lora,
            ..Default::default()
        },
    )?;
    let kv_desc = match kv {
        Some(b) => {
            let from = m.apply_kv_bits(b, &inp.calibration)?;
            match b {
                8 => format!("8-bit ({from})"),
                16 => "f16".into(),
                _ => "f32".into(),
            }
        }
        None => match m.stored_kv_scales() {
            Some(_) => "8-bit (checkpoint)".into(),
            None => "f32".into(),
        },
    };
    let load_s = t0.elapsed().as_secs_f64();
    let (mut best_p, mut best_d) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..inp.runs.max(1) {
        let mut cache = m.new_cache();
        let t0 = Instant::now();
        let l = m.forward_tokens(&inp.prompt, &mut cache, &LogitsFor::Last)?;
        let mut tok = argmax(&l.flatten_all()?.to_vec1::<f32>()?);
        let t1 = Instant::now();
        for _ in 0..inp.new_tokens {
            let l = m.forward_tokens(&[tok], &mut cache, &LogitsFor::Last)?;
            tok = argmax(&l.flatten_all()?.to_vec1::<f32>()?);
        }
        best_p = best_p.min((t1 - t0).as_secs_f64());
        best_d = best_d.min(t1.elapsed().as_secs_f64());
    }
    let peak = peak_rss_kb();
    let (ppl, scored) = if inp.text.is_empty() {
        (None, 0)
    } else {
        let n = perplexity::nll(&m, &inp.text, inp.ctx)?;
        (Some(n.perplexity()), n.count)
    };
    let r = QuantReport {
        load_s,
        peak_rss_kb: peak,
        prefill_tok_s: inp.prompt.len() as f64 / best_p,
        decode_tok_s: inp.new_tokens as f64 / best_d,
        ppl,
        scored,
        kv: kv_desc,
        ..Default::default()
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

struct RunSpec {
    label: String,
    engine: String,
    path: PathBuf,
    kv: Option<u32>,
    lora: Option<PathBuf>,
}

fn parse_run(s: &str) -> Result<RunSpec> {
    let (label, rest) = s.split_once('=').with_context(|| {
        format!("--run `{s}`: expected LABEL=afm:PATH, LABEL=llama:PATH or LABEL=llama-bench:PATH")
    })?;
    let mut parts = rest.split(':');
    let engine = parts.next().unwrap_or("").to_string();
    if !matches!(engine.as_str(), "afm" | "llama" | "llama-bench") {
        bail!("--run `{s}`: engine `{engine}` (afm, llama or llama-bench)");
    }
    let path = PathBuf::from(parts.next().unwrap_or(""));
    let (mut kv, mut lora) = (None, None);
    for p in parts {
        match p {
            "kv8" => kv = Some(8),
            "kv16" => kv = Some(16),
            "kv32" => kv = Some(32),
            _ if p.starts_with("lora=") => lora = Some(PathBuf::from(&p[5..])),
            _ => bail!("--run `{s}`: unknown option `{p}` (kv8, kv16, kv32, lora=FILE)"),
        }
    }
    if engine != "afm" && (kv.is_some() || lora.is_some()) {
        bail!("--run `{s}`: kv8 / lora apply to afm runs");
    }
    Ok(RunSpec {
        label: label.to_string(),
        engine,
        path,
        kv,
        lora,
    })
}

fn run_process(mut cmd: Command, input: &str) -> Result<QuantReport> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the benchmark process")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("benchmark process failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("parsing `{line}`"))
}

fn cpu_line() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{model}; afm kernels: 2-bit/4-bit {}, int8 KV {}",
        afm::lm::lowbit::kernel_name(),
        afm::lm::kv8::kernel_name()
    )
}

pub(crate) fn bench_quant(a: &QuantBenchArgs, threads: usize) -> Result<()> {
    let runs: Vec<RunSpec> = a.runs.iter().map(|s| parse_run(s)).collect::<Result<_>>()?;
    let tok_path = a.tokenizer.clone().or_else(|| {
        runs.iter()
            .find(|r| r.engine == "afm")
            .map(|r| r.path.clone())
    });
    let tok = tok_path.as_deref().and_then(tokenizer_of);
    let text = match &a.text {
        Some(p) => {
            let t = tok
                .as_ref()
                .context("--text needs a tokenizer (--tokenizer)")?;
            let s =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let mut ids = t.encode(&s)?;
            ids.truncate(a.ppl_tokens);
            ids
        }
        None => vec![],
    };
    // without a tokenizer (random-weight checkpoints): ids every vocabulary has
    let vocab_floor = 256u32;
    let prompt: Vec<u32> = match &tok {
        Some(t) => {
            let s = afm::lm::kv8::CALIBRATION_TEXT.repeat(1 + a.prompt_tokens / 100);
            let mut ids = t.encode(&s)?;
            ids.truncate(a.prompt_tokens);
            ids
        }
        None => (0..a.prompt_tokens as u32)
            .map(|i| (i * 7919 + 13) % vocab_floor)
            .collect(),
    };
    let n_prompt = prompt.len();
    let input = serde_json::to_string(&WorkerInput {
        calibration: calibration_ids(tok.as_ref()),
        text: text.clone(),
        prompt,
        ctx: a.ctx,
        new_tokens: a.new_tokens,
        runs: a.speed_runs,
    })?;
    let exe = std::env::current_exe()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_llamacpp_ppl.py");
    eprintln!(
        "{} text tokens (window {}), prompt {} tokens, {} new tokens, {threads} threads; {}",
        text.len(),
        a.ctx,
        a.prompt_tokens,
        a.new_tokens,
        cpu_line()
    );
    let mut reports = Vec::new();
    for r in &runs {
        eprintln!("measuring {} ({})...", r.label, r.path.display());
        if r.engine == "llama-bench" {
            let exe = crate::bench::find_llama(&a.llama_bench, "AFM_LLAMA_BENCH", "llama-bench")
                .context(
                    "a llama-bench: run needs llama.cpp's llama-bench (--llama-bench, \
                     $AFM_LLAMA_BENCH, or scripts/build_llamacpp.sh)",
                )?;
            let (p, d) = crate::bench::run_llama_bench(
                &exe,
                &r.path,
                threads,
                n_prompt,
                a.new_tokens,
                a.speed_runs.max(1),
            )
            .with_context(|| format!("run {}", r.label))?;
            let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            reports.push(QuantReport {
                label: r.label.clone(),
                engine: "llama-bench".into(),
                bytes: std::fs::metadata(&r.path).map(|m| m.len()).unwrap_or(0),
                prefill_tok_s: n_prompt as f64 / fastest(&p),
                decode_tok_s: a.new_tokens as f64 / fastest(&d),
                kv: "-".into(),
                ..Default::default()
            });
            continue;
        }
        let mut cmd = if r.engine == "afm" {
            let mut c = Command::new(&exe);
            c.arg("--threads")
                .arg(threads.to_string())
                .arg("bench-quant-worker")
                .arg("--model")
                .arg(&r.path);
            if let Some(k) = r.kv {
                c.arg("--kv").arg(k.to_string());
            }
            if let Some(l) = &r.lora {
                c.arg("--lora").arg(l);
            }
            c
        } else {
            let mut c = Command::new(&a.python);
            c.arg(&script).arg(&r.path).arg(threads.to_string());
            c
        };
        cmd.env("RAYON_NUM_THREADS", threads.to_string());
        let mut rep = run_process(cmd, &input).with_context(|| format!("run {}", r.label))?;
        rep.label = r.label.clone();
        rep.engine = if r.engine == "afm" {
            "afm".into()
        } else {
            "llama.cpp".into()
        };
        rep.bytes = std::fs::metadata(&r.path).map(|m| m.len()).unwrap_or(0);
        reports.push(rep);
    }
    let base = match &a.baseline {
        Some(b) => reports
            .iter()
            .find(|r| &r.label == b)
            .with_context(|| format!("--baseline {b}: no such run"))?
            .clone(),
        None => reports[0].clone(),
    };
    println!(
        "| run | engine | file MB | load s | peak RSS MB | perplexity | prefill tok/s | decode tok/s | decode vs {} | KV |",
        base.label
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {:.2}x | {} |",
            r.label,
            r.engine,
            mb(r.bytes),
            // llama-bench runs report speed only
            if r.engine == "llama-bench" {
                "-".into()
            } else {
                format!("{:.2}", r.load_s)
            },
            if r.engine == "llama-bench" {
                "-".into()
            } else {
                format!("{:.0}", r.peak_rss_kb as f64 / 1024.0)
            },
            r.ppl.map_or("-".into(), |p| format!("{p:.3}")),
            r.prefill_tok_s,
            r.decode_tok_s,
            r.decode_tok_s / base.decode_tok_s,
            r.kv
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&reports)?)?;
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct LoraRecoverArgs {
    /// The quantized GGUF the adapter is for (made with `--kv 16`).
    #[arg(long)]
    student: PathBuf,
    /// The unquantized model it learns from (any checkpoint of the same model).
    #[arg(long)]
    teacher: PathBuf,
    /// The training text (plain UTF-8), e.g. runs/text/acts.txt.
    #[arg(long)]
    text: PathBuf,
    /// The adapter file to write.
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save the run's state every this many steps (to OUT with the extension
    /// `.ckpt.safetensors`, beside a `.ckpt.json` of its settings): the same command run
    /// again goes on from there.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Stop after this many steps of the run (counted over the whole run), keeping the
    /// checkpoint; the adapter so far is written to OUT.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Start from this adapter (an earlier recovery's output for the same student, same
    /// rank and alpha) instead of a zero one: another schedule on top of a finished run.
    #[arg(long)]
    init: Option<PathBuf>,
}

pub(crate) fn cmd_lora_recover(a: &LoraRecoverArgs) -> Result<()> {
    let tok = tokenizer_of(&a.student)
        .or_else(|| tokenizer_of(&a.teacher))
        .context("neither checkpoint has a tokenizer to cut the text")?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let ids = tok.encode(&text)?;
    let cfg = afm_train::lora_recover::RecoverConfig {
        lora: afm::lm::lora::LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            ..Default::default()
        },
        steps: a.steps,
        seq: a.seq,
        lr: a.lr,
        seed: a.seed,
        checkpoint: Some(a.out.with_extension("ckpt.safetensors")),
        checkpoint_every: a.checkpoint_every,
        max_steps: a.max_steps,
        init: a.init.clone(),
    };
    if let Some(ck) = cfg.checkpoint.as_ref().filter(|p| p.exists()) {
        eprintln!("resuming from {}", ck.display());
    }
    let t0 = Instant::now();
    let mut ema: Option<f64> = None;
    let ad = afm_train::lora_recover::recover(&a.student, &a.teacher, &ids, &cfg, |s, l| {
        ema = Some(ema.map_or(l, |e| 0.9 * e + 0.1 * l));
        if s % 10 == 0 || s + 1 == a.steps {
            eprintln!(
                "step {}/{}: KL {l:.4} (ema {:.4}), {:.1} s",
                s + 1,
                a.steps,
                ema.unwrap_or(l),
                t0.elapsed().as_secs_f64()
            );
        }
    })?;
    ad.save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {} ({} tokens of {}, {} steps of {}, rank {}, {:.0} s)",
        a.out.display(),
        ids.len(),
        a.text.display(),
        a.steps,
        a.seq,
        a.rank,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
