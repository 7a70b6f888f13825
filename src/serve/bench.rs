//! `afm bench serve`: aggregate generation throughput of `afm serve` with 1, 4 and 8
//! concurrent streams, against llama.cpp's own OpenAI server (`llama-server`, built by
//! `scripts/build_llamacpp.sh`, with one slot per stream and continuous batching), or, when
//! that binary is absent, llama-cpp-python's `llama_cpp.server`, on the same GGUF, in one run. Both servers get the same requests over
//! loopback (non-streaming, greedy, `max_tokens` each); the figure is completion tokens over
//! wall time for all streams together. The last column gives the range, over the rounds, of
//! each round's afm figure against the same round's one stream: how much one run's scaling
//! moves on a noisy host.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ServeBench {
    /// The GGUF both servers load (default: SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent streams to measure, comma-separated.
    #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
    pub streams: Vec<usize>,
    /// New tokens per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Requests each stream sends, one after another.
    #[arg(long, default_value_t = 2)]
    pub requests: usize,
    /// Python with llama-cpp-python's server (`pip install 'llama-cpp-python[server]'`).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// llama.cpp's own `llama-server` (default: `$AFM_LLAMA_SERVER`, else
    /// `target/llama.cpp/bin/llama-server` if present; else llama-cpp-python's server).
    #[arg(long)]
    pub llama_server: Option<PathBuf>,
    /// Measure afm only.
    #[arg(long)]
    pub no_reference: bool,
    /// Rounds of measurement: each round measures every stream count once, in turn (so a
    /// host whose speed drifts moves all counts alike); the table gives each count's median.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Run `afm serve` with `--prefix-cache 64` (llama-server keeps its prompt cache on).
    #[arg(long)]
    pub prefix_cache: bool,
    /// K/V cache precision of afm (both the server and the model step alone): 8 stores
    /// int8 with calibrated per-layer scales (the paper's 8-bit cache), 16 f16 (`afm
    /// serve`'s default, as llama-server's), 32 f32.
    #[arg(long, value_parser = kv_bits)]
    pub kv: Option<u32>,
}

/// `--kv`: 8, 16 or 32.
fn kv_bits(s: &str) -> Result<u32, String> {
    match s {
        "8" | "16" | "32" => Ok(s.parse().unwrap_or_default()),
        _ => Err(format!("`{s}`: expected 8 (int8), 16 (f16) or 32 (f32)")),
    }
}

const PROMPTS: &[&str] = &[
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a bicycle works.",
    "Describe a walk through a busy city market.",
    "Write a long letter to a friend about your holidays.",
    "Explain how plants make food from sunlight, step by step.",
    "Tell the history of the printing press.",
    "Describe the life of a lighthouse keeper.",
    "Write a long poem about the sea at night.",
];

/// A server process started for the benchmark (killed when dropped).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn post(base: &str, body: &Value) -> Result<Value> {
    let r = ureq::post(&format!("{base}/v1/chat/completions"))
        .timeout(Duration::from_secs(600))
        .send_json(body.clone())
        .with_context(|| format!("POST {base}/v1/chat/completions"))?;
    Ok(r.into_json()?)
}

/// Completion tokens per second over `n` streams of `requests` requests each.
fn measure(base: &str, n: usize, a: &ServeBench) -> Result<(f64, usize)> {
    let t0 = Instant::now();
    let total = std::thread::scope(|s| -> Result<usize> {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || -> Result<usize> {
                    let mut toks = 0;
                    for r in 0..a.requests {
                        let p = PROMPTS[(i + r * n) % PROMPTS.len()];
                        let v = post(
                            base,
                            &json!({"messages": [{"role": "user", "content": p}],
                                    "max_tokens": a.max_tokens, "temperature": 0}),
                        )?;
                        toks += v["usage"]["completion_tokens"]
                            .as_u64()
                            .context("no usage.completion_tokens in the answer")?
                            as usize;
                    }
                    Ok(toks)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
            })
            .sum()
    })?;
    Ok((total as f64 / t0.elapsed().as_secs_f64(), total))
}

/// `a.repeat` rounds of [`measure`] over every stream count in turn: each count's median,
/// and every round's figure (`[count][round]`).
fn rounds(url: &str, a: &ServeBench, who: &str) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let mut got: Vec<Vec<f64>> = vec![Vec::new(); a.streams.len()];
    for _ in 0..a.repeat.max(1) {
        for (&n, g) in a.streams.iter().zip(got.iter_mut()) {
            let (tps, toks) = measure(url, n, a)?;
            eprintln!("  {who} {n} streams: {tps:7.1} tok/s ({toks} tokens)");
            g.push(tps);
        }
    }
    let medians = got.iter_mut().map(|g| crate::bench::median(g)).collect();
    Ok((medians, got))
}

/// The smallest and largest ratio of a count's figure to the 1-stream figure of the same
/// round (`None` without a 1-stream count): how far one run's scaling moves between rounds.
fn per_round_range(streams: &[usize], all: &[Vec<f64>], n: usize) -> Option<(f64, f64)> {
    let one = &all[streams.iter().position(|&s| s == 1)?];
    let this = &all[streams.iter().position(|&s| s == n)?];
    let r: Vec<f64> = this.iter().zip(one).map(|(t, o)| t / o).collect();
    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (!r.is_empty()).then_some((lo, hi))
}

fn start_afm(
    model: &PathBuf,
    threads: usize,
    prefix_cache: bool,
    kv: Option<u32>,
) -> Result<(Proc, String)> {
    let mut c = Command::new(std::env::current_exe()?)
        .args([
            "--threads",
            &threads.to_string(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--model")
        .arg(model)
        .args(["--max-batch", "8", "--max-concurrent", "64"])
        .args(
            prefix_cache
                .then_some(["--prefix-cache", "64"])
                .into_iter()
                .flatten(),
        )
        .args(
            kv.map(|b| ["--kv".to_string(), b.to_string()])
                .into_iter()
                .flatten(),
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting afm serve")?;
    let stderr = c.stderr.take().context("no stderr")?;
    let p = Proc(c);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line.split("listening on ").nth(1) {
                let _ = tx.send(a.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(300))
        .context("afm serve did not start")?;
    Ok((p, url))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts llama.cpp's own server: one slot per stream of the largest count measured, each
/// with a 2,048-token context, continuous batching on.
fn start_llama_server(
    exe: &PathBuf,
    model: &PathBuf,
    threads: usize,
    slots: usize,
) -> Result<(Proc, String)> {
    let port = free_port()?;
    let t = threads.to_string();
    let c = Command::new(exe)
        .arg("-m")
        .arg(model)
        .args(["-t", &t, "-tb", &t])
        .args(["-c", &(2048 * slots).to_string()])
        .args(["--parallel", &slots.to_string(), "--cont-batching"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    wait_ready(Proc(c), port, &exe.display().to_string(), "")
}

/// Polls `/v1/models` until the server answers; `exit_hint` ends the error when the process
/// exits first.
fn wait_ready(mut p: Proc, port: u16, what: &str, exit_hint: &str) -> Result<(Proc, String)> {
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if ureq::get(&format!("{url}/v1/models")).call().is_ok() {
            return Ok((p, url));
        }
        if let Some(st) = p.0.try_wait()? {
            bail!("{what} exited ({st}) before it answered{exit_hint}");
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("{what} did not answer within 300 s");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn start_llama(a: &ServeBench, model: &PathBuf, threads: usize) -> Result<(Proc, String)> {
    let port = free_port()?;
    let t = threads.to_string();
    let c = Command::new(&a.python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(model)
        .args([
            "--n_threads",
            &t,
            "--n_threads_batch",
            &t,
            "--n_ctx",
            "2048",
        ])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting `{} -m llama_cpp.server`", a.python))?;
    wait_ready(
        Proc(c),
        port,
        "llama_cpp.server",
        "; install it with `pip install 'llama-cpp-python[server]==0.3.36'` or pass --python / --no-reference",
    )
}

/// The model's own batched decode step ([`afm::lm::DeviceModel::forward_batch`]), in
/// process, without HTTP, scheduling or sampling: tokens per second with `n` sequences of a
/// 40-token prompt (about what the bench's chat prompts render to), over `steps` steps (the
/// requests' new tokens, so the steps cover the positions a served request does; attention
/// grows with them), median of 3. Its scaling is the most the server's can be.
fn model_step_tps(
    model: &std::path::Path,
    streams: &[usize],
    kv: Option<u32>,
    steps: usize,
) -> Result<(Vec<f64>, &'static str)> {
    use afm::lm::{LanguageModel, LogitsFor};
    let mut ck = afm::lm::Checkpoint::load_with(model, &Default::default())?;
    if let Some(bits) = kv {
        let cal = ck.tokenizer.encode(afm::lm::kv8::CALIBRATION_TEXT)?;
        ck.model.apply_kv_bits(bits, &cal)?;
    } else {
        // as `afm serve` without --kv
        ck.model.prefer_f16_kv();
    }
    let m = &ck.model;
    let kv_name = m.kv_store_name();
    let prompt: Vec<u32> = (0..40u32).map(|i| 100 + 37 * i).collect();
    let mut out = vec![];
    for &n in streams {
        let mut times = vec![];
        for _ in 0..3 {
            let mut caches = (0..n)
                .map(|_| -> Result<_> {
                    let mut c = m.new_cache();
                    m.forward_tokens(&prompt, &mut c, &LogitsFor::Last)?;
                    Ok(c)
                })
                .collect::<Result<Vec<_>>>()?;
            let ids: Vec<u32> = (0..n as u32).map(|i| 200 + i).collect();
            let t0 = Instant::now();
            for _ in 0..steps {
                let mut refs: Vec<&mut afm::lm::Cache> = caches.iter_mut().collect();
                m.forward_batch(&ids, &mut refs)?;
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        out.push((n * steps) as f64 / crate::bench::median(&mut times));
    }
    Ok((out, kv_name))
}

/// The CPU model and the kernels' ISA level ([`afm::lm::isa::describe_cpu`]).
fn cpu_line() -> String {
    afm::lm::isa::describe_cpu()
}

pub fn bench_serve(a: &ServeBench, threads: usize) -> Result<()> {
    anyhow::ensure!(
        !a.streams.is_empty() && a.streams.iter().all(|&n| n >= 1),
        "--streams: at least one count, each at least 1"
    );
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::default_model::locate_or_fetch()?,
    };
    eprintln!(
        "bench serve: {} | {threads} threads | {}",
        model.display(),
        cpu_line()
    );
    let (steps, kv_name) = model_step_tps(&model, &a.streams, a.kv, a.max_tokens.max(1))?;
    for (n, t) in a.streams.iter().zip(&steps) {
        eprintln!("  afm model step alone, {n} sequences: {t:7.1} tok/s");
    }
    let mut rows: Vec<(usize, f64, Option<f64>)> = Vec::new();
    let afm_rounds: Vec<Vec<f64>>;
    {
        let (_p, url) = start_afm(&model, threads, a.prefix_cache, a.kv)?;
        post(
            &url,
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        )?;
        let (medians, all) = rounds(&url, a, "afm      ")?;
        for (n, tps) in a.streams.iter().zip(medians) {
            rows.push((*n, tps, None));
        }
        afm_rounds = all;
    }
    let server = if a.no_reference {
        None
    } else {
        crate::bench::find_llama(&a.llama_server, "AFM_LLAMA_SERVER", "llama-server")
    };
    let reference = match &server {
        Some(p) => format!("llama.cpp `llama-server` ({})", p.display()),
        None => "llama.cpp server (llama-cpp-python)".to_string(),
    };
    if !a.no_reference {
        let slots = a.streams.iter().copied().max().unwrap_or(1);
        let (_p, url) = match &server {
            Some(exe) => start_llama_server(exe, &model, threads, slots)?,
            None => start_llama(a, &model, threads)?,
        };
        post(
            &url,
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        )?;
        for (r, tps) in rows.iter_mut().zip(rounds(&url, a, "llama.cpp")?.0) {
            r.2 = Some(tps);
        }
    }
    let single = rows.iter().find(|r| r.0 == 1).map(|r| r.1);
    println!(
        "afm serve (K/V {kv_name}) vs {reference}, {}, {} new tokens x {} requests per stream, median of {} rounds, {threads} threads",
        model
            .file_name()
            .map_or("".into(), |f| f.to_string_lossy().into_owned()),
        a.max_tokens,
        a.requests,
        a.repeat.max(1)
    );
    println!("{}", cpu_line());
    println!("| streams | afm tok/s | vs afm 1 stream | model step alone tok/s | vs 1 sequence | llama.cpp tok/s | afm / llama.cpp | vs 1 stream, per round |");
    println!("|---|---|---|---|---|---|---|---|");
    let step1 = a
        .streams
        .iter()
        .zip(&steps)
        .find(|r| *r.0 == 1)
        .map(|r| *r.1);
    for ((n, afm, llama), step) in rows.iter().zip(&steps) {
        println!(
            "| {n} | {afm:.1} | {} | {step:.1} | {} | {} | {} | {} |",
            single.map_or("-".into(), |s| format!("{:.2}x", afm / s)),
            step1.map_or("-".into(), |s| format!("{:.2}x", step / s)),
            llama.map_or("-".into(), |l| format!("{l:.1}")),
            llama.map_or("-".into(), |l| format!("{:.2}x", afm / l)),
            per_round_range(&a.streams, &afm_rounds, *n)
                .map_or("-".into(), |(lo, hi)| format!("{lo:.2}-{hi:.2}x")),
        );
    }
    Ok(())
}
