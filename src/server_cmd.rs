//! The server model (PT-MoE) in the CLI: `afm server-gen` writes a random-weight checkpoint of
//! any size (no public PT-MoE weights exist), `afm bench server` measures it.

use afm::lm::server_checkpoint::{
    gguf_tokenizer_metadata, write_server_gguf, write_server_safetensors,
};
use afm::lm::server_model::{random_server_tensors, ServerConfig, ServerModel};
use afm::lm::{LanguageModel, LogitsFor};
use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bench::median;

#[derive(Args, Clone)]
pub struct ServerGenArgs {
    /// Output: a directory (config.json + model.safetensors, f32) or a file ending in .gguf.
    #[arg(long)]
    pub out: PathBuf,
    /// Starting configuration: `tiny`, or `paper-small` (the paper's proportions scaled to
    /// ~0.41 B parameters).
    #[arg(long, default_value = "paper-small")]
    pub preset: String,
    /// Override config fields, e.g. `--set num_tracks=4 --set num_experts=16
    /// --set 'attention_pattern=["local","global"]'` (values are JSON; bare words are strings).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// GGUF weight type of the matrices (experts included; routers stay f32): f32, f16, q8_0,
    /// q4_0, q4_1, q4_k, q2_k ...
    #[arg(long, default_value = "q8_0")]
    pub quant: String,
    /// Copy the tokenizer from this GGUF (e.g. SmolLM2's) into a .gguf output; its vocabulary
    /// must fit the config's `vocab_size`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The preset with `--set` overrides applied and validated.
pub fn config_from(preset: &str, set: &[String]) -> Result<ServerConfig> {
    let base = ServerConfig::preset(preset)?;
    let mut v = serde_json::to_value(&base)?;
    for kv in set {
        let (k, val) = kv
            .split_once('=')
            .with_context(|| format!("--set `{kv}`: expected KEY=VALUE"))?;
        if v.get(k).is_none() {
            bail!("--set `{kv}`: `{k}` is not a server config field");
        }
        let parsed: serde_json::Value =
            serde_json::from_str(val).unwrap_or_else(|_| serde_json::Value::String(val.into()));
        v[k] = parsed;
    }
    Ok(ServerConfig::from_json(v)?)
}

pub fn parse_ggml_dtype(s: &str) -> Result<GgmlDType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        _ => bail!("unknown weight type `{s}` (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k .. q6_k)"),
    })
}

fn spinner(msg: &str) -> ProgressBar {
    let b = ProgressBar::new_spinner();
    b.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    b.set_message(msg.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

fn describe(cfg: &ServerConfig) -> String {
    let p = cfg.param_counts();
    format!(
        "{} tracks x {} layers (sync every {}), width {}, {} experts top-{}, window {}: {:.1} M parameters, {:.1} M active per token",
        cfg.num_tracks,
        cfg.num_layers_per_track,
        cfg.track_block_depth,
        cfg.hidden_size,
        cfg.num_experts,
        cfg.experts_per_token,
        cfg.sliding_window,
        p.total as f64 / 1e6,
        p.active as f64 / 1e6
    )
}

/// Writes a random-weight checkpoint of `cfg` to `out` (a directory, or a `.gguf` file).
fn write_checkpoint(
    cfg: &ServerConfig,
    out: &Path,
    quant: &str,
    tokenizer: Option<&Path>,
    seed: u64,
) -> Result<()> {
    let gguf = out.extension().is_some_and(|e| e == "gguf");
    let dtype = parse_ggml_dtype(quant)?;
    let extra = match tokenizer {
        Some(t) if gguf => {
            let md = gguf_tokenizer_metadata(t)?;
            let n = md
                .iter()
                .find(|(k, _)| k == "tokenizer.ggml.tokens")
                .and_then(|(_, v)| v.to_vec().ok().map(|v| v.len()))
                .unwrap_or(0);
            if n > cfg.vocab_size {
                bail!(
                    "the tokenizer of {} has {n} tokens, more than vocab_size = {}",
                    t.display(),
                    cfg.vocab_size
                );
            }
            md
        }
        Some(_) => bail!("--tokenizer copies GGUF tokenizer metadata: use a .gguf --out (for a directory, copy tokenizer.json into it)"),
        None => vec![],
    };
    let b = spinner("generating random weights");
    let t = random_server_tensors(cfg, seed)?;
    b.set_message(format!("writing {}", out.display()));
    if gguf {
        write_server_gguf(out, cfg, &t, dtype, &extra)?;
    } else {
        write_server_safetensors(out, cfg, &t)?;
    }
    b.finish_and_clear();
    Ok(())
}

pub fn cmd_server_gen(a: &ServerGenArgs) -> Result<()> {
    let cfg = config_from(&a.preset, &a.set)?;
    eprintln!("server model: {}", describe(&cfg));
    let t0 = Instant::now();
    write_checkpoint(&cfg, &a.out, &a.quant, a.tokenizer.as_deref(), a.seed)?;
    let bytes = if a.out.is_dir() {
        std::fs::metadata(a.out.join("model.safetensors"))?.len()
    } else {
        std::fs::metadata(&a.out)?.len()
    };
    eprintln!(
        "wrote {} ({:.1} MB) in {:.1} s",
        a.out.display(),
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args, Clone)]
pub struct ServerBench {
    /// A server checkpoint (directory or .gguf); default: the preset, generated in a
    /// temporary GGUF of type `--quant`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "paper-small")]
    pub preset: String,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long, default_value = "q8_0")]
    pub quant: String,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Hold one core with a background busy loop for the whole run.
    #[arg(long)]
    pub busy: bool,
}

/// Prefill seconds and decode tokens/s (greedy, medians over `runs`).
fn time_model(m: &ServerModel, ids: &[u32], new_tokens: usize, runs: usize) -> Result<(f64, f64)> {
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let mut c = m.new_cache();
        let t0 = Instant::now();
        let l = m.forward_tokens(ids, &mut c, &LogitsFor::Last)?;
        pre.push(t0.elapsed().as_secs_f64());
        let mut next = afm::lm::sampling::argmax(&l.flatten_all()?.to_vec1::<f32>()?);
        let t1 = Instant::now();
        for _ in 0..new_tokens {
            let l = m.forward_tokens(&[next], &mut c, &LogitsFor::Last)?;
            next = afm::lm::sampling::argmax(&l.flatten_all()?.to_vec1::<f32>()?);
        }
        dec.push(new_tokens as f64 / t1.elapsed().as_secs_f64());
    }
    Ok((median(&mut pre), median(&mut dec)))
}

pub fn bench_server(a: &ServerBench, threads: usize) -> Result<()> {
    // without --model: the preset, written to a temporary GGUF that is removed once loaded
    // (or once anything fails)
    let tmp = std::env::temp_dir().join(format!("afm-bench-server-{}", std::process::id()));
    let (path, what) = match &a.model {
        Some(p) => (p.clone(), p.display().to_string()),
        None => (
            tmp.join(format!("{}-{}.gguf", a.preset, a.quant)),
            format!("preset `{}` (random weights, {})", a.preset, a.quant),
        ),
    };
    let loaded = (|| -> Result<(ServerModel, f64)> {
        if a.model.is_none() {
            let cfg = config_from(&a.preset, &a.set)?;
            std::fs::create_dir_all(&tmp)?;
            write_checkpoint(&cfg, &path, &a.quant, None, 0)?;
        }
        let t0 = Instant::now();
        let m = ServerModel::load(&path).with_context(|| format!("loading {}", path.display()))?;
        Ok((m, t0.elapsed().as_secs_f64()))
    })();
    if a.model.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let (mut m, load_s) = loaded?;
    let cfg = m.config().clone();
    eprintln!(
        "bench server: {what}, loaded in {load_s:.1} s; {}; {threads} threads, {} prompt tokens, {} decoded tokens, median of {}",
        describe(&cfg),
        a.prompt_tokens,
        a.new_tokens,
        a.runs
    );
    if a.prompt_tokens + a.new_tokens > cfg.max_position_embeddings {
        bail!(
            "--prompt-tokens + --new-tokens = {} exceed the context of {}",
            a.prompt_tokens + a.new_tokens,
            cfg.max_position_embeddings
        );
    }
    let ids: Vec<u32> = (0..a.prompt_tokens)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let cpu = afm::lm::isa::describe_cpu();
    eprintln!("cpu: {cpu}");
    let _busy = crate::busy::maybe(a.busy);
    // the two modes alternate run by run, so that a change in the machine's load (other
    // programs) falls on both alike
    let (mut pp, mut dp, mut ps, mut ds) = (vec![], vec![], vec![], vec![]);
    for _ in 0..a.runs.max(1) {
        m.set_parallel_tracks(true);
        let (p, d) = time_model(&m, &ids, a.new_tokens, 1)?;
        pp.push(p);
        dp.push(d);
        m.set_parallel_tracks(false);
        let (p, d) = time_model(&m, &ids, a.new_tokens, 1)?;
        ps.push(p);
        ds.push(d);
    }
    let (pre_par, dec_par, pre_seq, dec_seq) = (
        median(&mut pp),
        median(&mut dp),
        median(&mut ps),
        median(&mut ds),
    );
    println!(
        "CPU: {cpu}{}\n",
        if a.busy {
            "; a background busy loop held one core"
        } else {
            ""
        }
    );

    let p = cfg.param_counts();
    let (sync_pt, sync_tp) = cfg.syncs_per_pass();
    println!("| server model | value |");
    println!("|---|---:|");
    println!("| parameters, total | {:.1} M |", p.total as f64 / 1e6);
    println!(
        "| parameters, active per token | {:.1} M ({:.1}%) |",
        p.active as f64 / 1e6,
        100.0 * p.active as f64 / p.total as f64
    );
    let mb = |b: usize| b as f64 / 1e6;
    for n in [1024, 4096, 16384, 32768] {
        if n > cfg.max_position_embeddings {
            continue;
        }
        println!(
            "| K/V cache at {n} tokens (f32), local/global pattern vs all-global | {:.1} MB vs {:.1} MB |",
            mb(cfg.kv_cache_bytes(n)),
            mb(cfg.kv_cache_bytes_all_global(n))
        );
    }
    let n = cfg.max_position_embeddings;
    let grow = |f: &dyn Fn(usize) -> usize| mb(f(n) - f(n - 1024));
    println!(
        "| K/V growth per 1k tokens past the window, pattern vs all-global | {:.2} MB vs {:.2} MB |",
        grow(&|t| cfg.kv_cache_bytes(t)),
        grow(&|t| cfg.kv_cache_bytes_all_global(t))
    );
    println!(
        "| synchronisation points per token: parallel tracks vs tensor parallel | {sync_pt} vs {sync_tp} (-{:.1}%) |",
        100.0 * (1.0 - sync_pt as f64 / sync_tp as f64)
    );
    println!(
        "| prefill {} tokens, tracks parallel / sequential | {:.1} / {:.1} tok/s ({:.2}x) |",
        a.prompt_tokens,
        a.prompt_tokens as f64 / pre_par,
        a.prompt_tokens as f64 / pre_seq,
        pre_seq / pre_par
    );
    println!(
        "| decode, tracks parallel / sequential | {dec_par:.1} / {dec_seq:.1} tok/s ({:.2}x) |",
        dec_par / dec_seq
    );
    println!(
        "| peak RSS | {:.0} MB |",
        crate::bench::peak_rss_kb() as f64 / 1024.0
    );
    println!(
        "| thread-pool synchronisation points (all runs), waits for a preempted thread | {} , {} |",
        afm::lm::par::barriers(),
        afm::lm::par::stalls()
    );
    Ok(())
}
