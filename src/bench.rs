//! `afm bench`: speed figures measured next to the reference in the same run.
//!
//! * `afm bench lm`: prefill and decode tokens/s and peak RSS on a GGUF (default: the real
//!   SmolLM2-135M-Instruct Q4_1), ours and llama.cpp alternating, round by round: its own
//!   `llama-bench` (the anchor) and `llama-completion` (the former `llama-cli`) built by `scripts/build_llamacpp.sh`, and
//!   llama-cpp-python (`scripts/bench_llamacpp.py`); each engine in its own process so peak
//!   RSS is its own; prints medians, the ratios, the CPU model and ISA flags, and afm's
//!   thread-pool barriers per token. `--busy` adds a background load on one core.
//! * `afm bench kv-sharing`: prefill time of a random-weight AFM model with KV sharing (5:3)
//!   with the block-2 prefill shortcut on and off, and the KV-cache bytes with and without
//!   sharing.

use afm::lm::random::random_tensors;
use afm::lm::sampling::argmax;
use afm::lm::weights::WeightSource;
use afm::lm::{Checkpoint, DeviceModel, LanguageModel, LmConfig, LogitsFor, Message};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Prefill/decode tok/s and peak memory, ours vs llama.cpp, on a GGUF.
    Lm(LmBench),
    /// Prefill time with the KV-sharing shortcut on vs off, and KV-cache bytes.
    KvSharing(KvBench),
    /// The server model (PT-MoE): parameters total vs active, K/V bytes with the local/global
    /// pattern vs all-global, synchronisation points, prefill/decode tok/s with the tracks
    /// run in parallel vs one after another.
    Server(crate::server_cmd::ServerBench),
    /// Encode time per 512x512 tile for SigLIP-B/16-512, ours vs PyTorch.
    Vision(VisionBench),
    /// Time to first token and decode tok/s for one 512x512 image + a short question on a
    /// SmolVLM checkpoint, ours vs HF transformers.
    Vlm(VlmBench),
    /// Bytes, load time, peak RSS, perplexity and prefill/decode tok/s of several
    /// checkpoints (afm's 2-bit / 4-bit / 8-bit formats and llama.cpp's own), each in its
    /// own process, in one run.
    Quant(crate::quantize_cmd::QuantBenchArgs),
    /// `afm serve` aggregate tok/s at 1, 4 and 8 concurrent streams vs llama.cpp's server
    /// (llama-cpp-python) on the same GGUF.
    Serve(crate::serve::bench::ServeBench),
    /// The per-token cost of the guided-generation mask on SmolLM2: microseconds per token,
    /// and decode tok/s with and without a JSON Schema constraint, in one run.
    Guided(crate::guided_bench::GuidedBench),
}

#[derive(Args, Clone)]
pub struct VlmBench {
    /// A SmolVLM / Idefics3 checkpoint directory (e.g. the random full-size SmolVLM-256M from
    /// `python scripts/ref_hf_idefics3.py --full DIR`).
    #[arg(long)]
    pub model: PathBuf,
    /// Tokens decoded after the first.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Encode the image as one tile (no splitting) on both sides.
    #[arg(long)]
    pub no_split: bool,
    /// Python with torch and transformers installed.
    #[arg(long, default_value = "python3")]
    pub python: String,
    #[arg(long)]
    pub no_reference: bool,
    /// Run the vision encoder's projections and the language model's dense projections in
    /// int8 (`Vlm::set_vision_int8`, `Vlm::set_lm_int8`); the reference stays f32.
    #[arg(long)]
    pub int8: bool,
}

/// The benchmark image: 512x512, the same pattern as `scripts/bench_hf_smolvlm.py`.
fn bench_image() -> afm::vision::image::RgbImage {
    afm::vision::image::RgbImage::from_fn(512, 512, |x, y| {
        afm::vision::image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    })
}

pub fn bench_vlm(a: &VlmBench, threads: usize) -> Result<()> {
    use afm::fusion::{ChatMessage, Part, Vlm};
    let mut vlm =
        Vlm::load_idefics3(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    if a.no_split {
        vlm.processor_mut().do_image_splitting = false;
    }
    vlm.set_vision_int8(a.int8)?;
    vlm.set_lm_int8(a.int8)?;
    let img = bench_image();
    let plan = vlm.plan(512, 512, None)?;
    eprintln!(
        "bench vlm: {} ({}), vision encoder {}, {threads} threads, {} new tokens, {} runs",
        a.model.display(),
        plan.describe(),
        if a.int8 { "int8" } else { "f32" },
        a.new_tokens,
        a.runs
    );
    let mut ttft = Vec::new();
    let mut dec = Vec::new();
    let mut prompt_tokens = 0;
    let mut parts: Vec<[f64; 3]> = Vec::new();
    for i in 0..=a.runs {
        vlm.clear_image_cache(); // every run encodes
        let lm = vlm.lm();
        // image processing alone, for the breakdown: `encode_image` below does it again
        // inside the timed region
        let tp = Instant::now();
        let plan = vlm.plan(img.width(), img.height(), None)?;
        drop(vlm.processor().pixel_values(&img, &plan)?);
        let t_pre = tp.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let enc = vlm.encode_image(&img, None)?; // image processing + encoder + connector
        let t_enc = t0.elapsed().as_secs_f64();
        let msgs = [ChatMessage::user(vec![
            Part::Image(enc),
            Part::Text("What is in this image?".into()),
        ])];
        let (ids, embeds) = vlm.prepare(&msgs)?;
        let mut cache = lm.new_cache();
        let logits = lm.forward_embeds(&embeds, &mut cache, &LogitsFor::Last)?;
        let mut next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?) as u32;
        let t1 = Instant::now();
        if i > 0 {
            parts.push([t_pre, t_enc - t_pre, (t1 - t0).as_secs_f64() - t_enc]);
        }
        for _ in 0..a.new_tokens {
            let l = lm.forward_tokens(&[next], &mut cache, &LogitsFor::Last)?;
            next = argmax(&l.flatten_all()?.to_vec1::<f32>()?) as u32;
        }
        let t2 = Instant::now();
        prompt_tokens = ids.len();
        if i > 0 {
            ttft.push((t1 - t0).as_secs_f64());
            dec.push(a.new_tokens as f64 / (t2 - t1).as_secs_f64());
        }
    }
    let (ours_ttft, ours_dec) = (median(&mut ttft), median(&mut dec));
    let part = |k: usize| median(&mut parts.iter().map(|p| p[k]).collect::<Vec<_>>());
    eprintln!(
        "afm time to first token, medians: image processing {:.3} s, encoder + adapter {:.3} s, prompt + prefill + first token {:.3} s",
        part(0),
        part(1),
        part(2)
    );
    println!("CPU: {}\n", afm::lm::isa::describe_cpu());
    println!("| engine | time to first token | decode tok/s | prompt tokens |");
    println!("|---|---:|---:|---:|");
    println!(
        "| afm ({}) | {:.3} s | {ours_dec:.1} | {prompt_tokens} |",
        if a.int8 { "int8" } else { "f32" },
        ours_ttft
    );
    if a.no_reference {
        return Ok(());
    }
    let reference = torch_vlm(a, threads, false)?;
    let reference_q = match a.int8 {
        true => torch_vlm(a, threads, true)?,
        false => None,
    };
    for (r, what) in [
        (&reference, "f32"),
        (&reference_q, "dynamic int8 linear layers"),
    ] {
        if let Some(r) = r {
            println!(
                "| transformers (PyTorch {} CPU, {what}) | {:.3} s | {:.1} | {} |",
                r.torch, r.ttft, r.decode, r.prompt_tokens
            );
        }
    }
    println!();
    let ours = if a.int8 { "afm int8" } else { "afm" };
    if let Some(r) = &reference {
        println!(
            "{ours} / transformers f32: time to first token {:.2}x faster (target >= 2x), decode {:.2}x",
            r.ttft / ours_ttft,
            ours_dec / r.decode
        );
    }
    if let Some(r) = &reference_q {
        println!(
            "{ours} / transformers dynamic int8: time to first token {:.2}x faster, decode {:.2}x",
            r.ttft / ours_ttft,
            ours_dec / r.decode
        );
    }
    Ok(())
}

/// Medians of `scripts/bench_hf_smolvlm.py`.
struct TorchVlm {
    ttft: f64,
    decode: f64,
    prompt_tokens: usize,
    torch: String,
}

/// Runs `scripts/bench_hf_smolvlm.py` (f32, or with dynamic int8 linear layers); `None`
/// with a note when it did not run.
fn torch_vlm(a: &VlmBench, threads: usize, int8: bool) -> Result<Option<TorchVlm>> {
    #[derive(serde::Deserialize)]
    struct T {
        ttft: Vec<f64>,
        decode_tok_s: Vec<f64>,
        prompt_tokens: usize,
        torch: String,
    }
    let model = a.model.display().to_string();
    let t: Option<T> = run_reference(
        &a.python,
        "scripts/bench_hf_smolvlm.py",
        &[
            model,
            threads.to_string(),
            a.new_tokens.to_string(),
            a.runs.to_string(),
            if a.no_split { "0" } else { "1" }.to_string(),
            if int8 { "1" } else { "0" }.to_string(),
        ],
        "transformers",
    )?;
    Ok(t.map(|mut t| TorchVlm {
        ttft: median(&mut t.ttft),
        decode: median(&mut t.decode_tok_s),
        prompt_tokens: t.prompt_tokens,
        torch: t.torch,
    }))
}

/// Runs a reference script of `scripts/` with `python` and parses the JSON object on the
/// last line of its stdout; `None`, with a note naming `what`, when it did not run.
fn run_reference<T: serde::de::DeserializeOwned>(
    python: &str,
    script: &str,
    args: &[String],
    what: &str,
) -> Result<Option<T>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .stderr(Stdio::inherit())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout);
            Ok(Some(serde_json::from_str(
                line.lines().last().unwrap_or(""),
            )?))
        }
        _ => {
            eprintln!(
                "note: the {what} reference did not run: install torch and transformers into `{python}` or pass --python"
            );
            Ok(None)
        }
    }
}

#[derive(Args, Clone)]
pub struct VisionBench {
    /// Tiles per forward pass.
    #[arg(long, default_value_t = 1)]
    pub tiles: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Python with torch and transformers installed.
    #[arg(long, default_value = "python3")]
    pub python: String,
    #[arg(long)]
    pub no_reference: bool,
    /// Also time the int8 path (`VisionEncoder::set_int8`), and PyTorch with dynamic int8
    /// linear layers next to it.
    #[arg(long)]
    pub int8: bool,
    /// Hold one core with a background busy loop for the whole run, and time afm with one
    /// thread too (alternating with N threads).
    #[arg(long)]
    pub busy: bool,
}

/// Seconds per tile of `enc` on `x`: median of `runs` after one warm-up pass.
fn time_encoder(
    enc: &afm::vision::VisionEncoder,
    x: &candle_core::Tensor,
    runs: usize,
) -> Result<f64> {
    enc.forward(x)?; // warm-up
    let mut secs = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        enc.forward(x)?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    eprintln!(
        "runs: {:?}",
        secs.iter()
            .map(|s| (s * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    Ok(median(&mut secs) / x.dim(0)? as f64)
}

/// `scripts/bench_torch_siglip.py`'s seconds per tile and torch version, or `None` with a
/// note when it did not run.
fn torch_vision(a: &VisionBench, threads: usize, int8: bool) -> Result<Option<(f64, String)>> {
    #[derive(serde::Deserialize)]
    struct T {
        secs: Vec<f64>,
        torch: String,
    }
    let t: Option<T> = run_reference(
        &a.python,
        "scripts/bench_torch_siglip.py",
        &[
            threads.to_string(),
            a.tiles.to_string(),
            a.runs.to_string(),
            if int8 { "1" } else { "0" }.to_string(),
        ],
        "PyTorch",
    )?;
    Ok(t.map(|mut t| (median(&mut t.secs) / a.tiles as f64, t.torch)))
}

pub fn bench_vision(a: &VisionBench, threads: usize) -> Result<()> {
    use afm::vision::random::random_tensors;
    use afm::vision::weights::VisionWeights;
    use afm::vision::{VisionConfig, VisionEncoder};
    let cfg = VisionConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_channels: 3,
        image_size: 512,
        patch_size: 16,
        layer_norm_eps: 1e-6,
        hidden_act: "gelu_pytorch_tanh".into(),
        attention: Default::default(),
        stem: None,
    };
    eprintln!("bench vision: SigLIP-B/16-512 (random weights), {} tile(s) of 512x512 per pass, {threads} threads", a.tiles);
    let mut enc = VisionEncoder::new(&VisionWeights::from_tensors(random_tensors(&cfg, 0)?)?, cfg)?;
    let x =
        candle_core::Tensor::randn(0f32, 1.0, (a.tiles, 3, 512, 512), &candle_core::Device::Cpu)?;
    let cpu = afm::lm::isa::describe_cpu();
    eprintln!("cpu: {cpu}");
    println!(
        "CPU: {cpu}{}\n",
        if a.busy {
            "; a background busy loop held one core"
        } else {
            ""
        }
    );
    let _busy = crate::busy::maybe(a.busy);
    if a.busy && threads > 1 {
        // N threads and 1 thread, alternating
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
        let (mut n, mut o) = (Vec::new(), Vec::new());
        for _ in 0..a.runs.max(1) {
            n.push(time_encoder(&enc, &x, 1)?);
            o.push(one.install(|| time_encoder(&enc, &x, 1))?);
        }
        let (n, o) = (median(&mut n), median(&mut o));
        println!("| afm f32 on the busy machine | seconds per 512x512 tile |");
        println!("|---|---:|");
        println!("| {threads} threads | {n:.3} |");
        println!("| 1 thread | {o:.3} |");
        println!(
            "\nafm {threads} threads / 1 thread speed: {:.2}x (target >= 0.9x)\n",
            o / n
        );
    }
    let ours_s = time_encoder(&enc, &x, a.runs)?;
    let ours_q = if a.int8 {
        if !afm::vision::int8::int8_kernel_is_fast() {
            eprintln!(
                "note: the int8 kernel in use ({}) is the portable loop; expect it to be slower than f32",
                afm::lm::isa::level().name()
            );
        }
        enc.set_int8(true)?;
        Some(time_encoder(&enc, &x, a.runs)?)
    } else {
        None
    };
    println!("| engine | seconds per 512x512 tile |");
    println!("|---|---:|");
    println!("| afm (f32) | {ours_s:.3} |");
    if let Some(q) = ours_q {
        println!("| afm (int8) | {q:.3} |");
    }
    if a.no_reference {
        return Ok(());
    }
    let theirs = torch_vision(a, threads, false)?;
    let theirs_q = match a.int8 {
        true => torch_vision(a, threads, true)?,
        false => None,
    };
    if let Some((t, v)) = &theirs {
        println!("| PyTorch {v} (CPU, f32) | {t:.3} |");
    }
    if let Some((t, v)) = &theirs_q {
        println!("| PyTorch {v} (CPU, dynamic int8 linear layers) | {t:.3} |");
    }
    println!();
    if let Some((t, _)) = &theirs {
        println!(
            "afm f32 / PyTorch f32 speed: {:.2}x (target >= 1.0x)",
            t / ours_s
        );
        if let Some(q) = ours_q {
            println!("afm int8 / PyTorch f32 speed: {:.2}x", t / q);
        }
    }
    if let (Some((t, _)), Some(q)) = (&theirs_q, ours_q) {
        println!("afm int8 / PyTorch dynamic int8 speed: {:.2}x", t / q);
    }
    Ok(())
}

#[derive(Args, Clone)]
pub struct LmBench {
    /// GGUF model (default: SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Processes per engine (each runs `--runs` times; the median over all is reported).
    #[arg(long, default_value_t = 3)]
    pub processes: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Python with llama-cpp-python installed (`pip install llama-cpp-python==0.3.36`): the
    /// second reference (skipped when it does not import).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// llama.cpp's own `llama-bench` (the anchor), as built by `scripts/build_llamacpp.sh`
    /// (default: `$AFM_LLAMA_BENCH`, else `target/llama.cpp/bin/llama-bench` if present).
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// llama.cpp's one-shot command line, timed on the same prompt text: `llama-completion`
    /// (called `llama-cli` before late 2025; default: next to `llama-bench`).
    #[arg(long)]
    pub llama_completion: Option<PathBuf>,
    /// Skip the llama.cpp references.
    #[arg(long)]
    pub no_reference: bool,
    /// Hold one core with a background busy loop for the whole run, and time afm with one
    /// thread too: on a busy machine N threads should not be slower than one.
    #[arg(long)]
    pub busy: bool,
}

#[derive(Args, Clone)]
pub struct KvBench {
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub layers: usize,
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// What one engine process reports.
#[derive(serde::Deserialize, serde::Serialize, Default)]
pub struct RunReport {
    pub prefill_s: Vec<f64>,
    pub decode_s: Vec<f64>,
    pub peak_rss_kb: u64,
    /// Thread-pool synchronisation points per decoded token (afm only).
    #[serde(default)]
    pub barriers_per_token: f64,
    /// Read bandwidth (bytes/s) measured just before each run, when the worker measured it
    /// (afm only; empty otherwise).
    #[serde(default)]
    pub bandwidth: Vec<f64>,
    /// Per run: waits for a preempted pool thread (`par::stalls`), each followed by a
    /// period of jobs on one thread; they explain a slow run on a shared machine (afm only).
    #[serde(default)]
    pub stalls: Vec<u64>,
}

pub fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Zeroed `u64`s from the system allocator, not the binary's global one (mimalloc keeps
/// freed memory for reuse): a buffer this large is its own mapping, returned to the OS on
/// drop, so the process's RSS after a bandwidth probe is what it was before.
struct SystemBuf {
    ptr: std::ptr::NonNull<u64>,
    len: usize,
}

impl SystemBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::array::<u64>(len.max(1)).expect("probe buffer size")
    }

    fn new(len: usize) -> Self {
        use std::alloc::GlobalAlloc;
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (at least one u64).
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) } as *mut u64;
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u64] {
        // SAFETY: `ptr` holds `len` zero-initialised u64s (`new`), owned by `self` and
        // borrowed mutably once here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SystemBuf {
    fn drop(&mut self) {
        use std::alloc::GlobalAlloc;
        // SAFETY: allocated by `System` with this same layout in `new`, freed once.
        unsafe { std::alloc::System.dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len)) }
    }
}

/// Restarts this process's peak-RSS count (`VmHWM`) at its current RSS (Linux
/// `clear_refs`); false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Read bandwidth of this machine with `threads` threads, in bytes/s: each thread sums its
/// own slice of a 1 GiB buffer (far beyond any cache), best of three passes of each of three
/// loops: a plain one, and two that also prefetch 4 KiB ahead, into L1 and into L2. This is
/// the denominator of decode's bandwidth limit: a decode step has to read every weight once.
/// The prefetching loops are there because afm's kernels prefetch: on an Intel Xeon (family
/// 6 model 207) the plain loop read 20-24 GB/s where the prefetching ones read 27-30, and
/// the 3.1B model decoded at up to 107% of a limit taken from the plain loop alone.
pub fn read_bandwidth(threads: usize) -> f64 {
    const BYTES: usize = 1 << 30;
    let threads = threads.max(1);
    let per = BYTES / 8 / threads;
    let mut probe = SystemBuf::new(per * threads);
    let buf = probe.as_mut_slice();
    for (i, v) in buf.iter_mut().enumerate() {
        *v = i as u64;
    }
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..3 {
        for prefetch in [Prefetch::None, Prefetch::L1, Prefetch::L2] {
            let t0 = Instant::now();
            let total: u64 = std::thread::scope(|s| {
                let hs: Vec<_> = buf
                    .chunks(per)
                    .map(|c| s.spawn(move || sum_slice(c, prefetch)))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or(0))
                    .fold(0, u64::wrapping_add)
            });
            best = best.min(t0.elapsed().as_secs_f64());
            sink = sink.wrapping_add(total);
        }
    }
    std::hint::black_box(sink);
    (per * threads * 8) as f64 / best
}

/// What [`sum_slice`] prefetches.
#[derive(Clone, Copy)]
enum Prefetch {
    None,
    L1,
    L2,
}

/// The wrapping sum of `c`, in 8 independent lanes so that the loop vectorises at any ISA;
/// with a prefetch, each 64-byte line is preceded by a prefetch of the line 4 KiB ahead into
/// that cache level (x86-64; elsewhere the plain loop).
fn sum_slice(c: &[u64], prefetch: Prefetch) -> u64 {
    const AHEAD: usize = 4096;
    let mut acc = [0u64; 8];
    for ch in c.chunks_exact(8) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            let p = ch.as_ptr().cast::<u8>().wrapping_add(AHEAD).cast::<i8>();
            // SAFETY: a prefetch never faults and changes nothing but timing, whatever the
            // address.
            unsafe {
                match prefetch {
                    Prefetch::L1 => _mm_prefetch::<_MM_HINT_T0>(p),
                    Prefetch::L2 => _mm_prefetch::<_MM_HINT_T1>(p),
                    Prefetch::None => {}
                }
            }
        }
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a = a.wrapping_add(x);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = prefetch;
    acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// Decode against the bandwidth limit, run by run.
#[derive(Debug, PartialEq)]
pub(crate) struct BandwidthShares {
    pub runs: usize,
    /// Lowest and highest read bandwidth, GB/s.
    pub gbps: (f64, f64),
    /// Lowest and highest limit, tok/s.
    pub limit: (f64, f64),
    /// Lowest, median and highest share of its run's limit.
    pub share: (f64, f64, f64),
}

/// Each run's decode speed (`tokens / decode_s[i]`) as a share of its limit (`bandwidth[i] /
/// weight_bytes` tokens/s; bandwidth in bytes/s).
pub(crate) fn bandwidth_shares(
    bandwidth: &[f64],
    decode_s: &[f64],
    tokens: f64,
    weight_bytes: usize,
) -> BandwidthShares {
    let wb = weight_bytes.max(1) as f64;
    let mut share: Vec<f64> = bandwidth
        .iter()
        .zip(decode_s)
        .map(|(&bw, &s)| (tokens / s) / (bw / wb))
        .collect();
    let lo_hi = |v: &[f64]| {
        v.iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            })
    };
    let (blo, bhi) = lo_hi(bandwidth);
    let (slo, shi) = lo_hi(&share);
    BandwidthShares {
        runs: share.len(),
        gbps: (blo / 1e9, bhi / 1e9),
        limit: (blo / wb, bhi / wb),
        share: (slo, median(&mut share), shi),
    }
}

/// The middle value (upper middle for an even count), sorting `v`; NaN when empty.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Child process: reads token ids on stdin, measures, prints a `RunReport` line.
/// With `bandwidth`, the machine's read bandwidth is measured just before each run (the
/// limit of that run's decode): a shared machine's bandwidth can move by 2x over minutes (32
/// to 66 GB/s on the development VM), so one reading at the start can be far from the one a
/// run met. The probe's gigabyte is not the model's: the peak-RSS count restarts after each
/// probe (the load's peak is kept), and without that restart nothing is probed.
pub fn worker(
    model: &std::path::Path,
    new_tokens: usize,
    runs: usize,
    bandwidth: bool,
) -> Result<()> {
    let mut input = String::new();
    std::io::stdin().lock().read_to_string(&mut input)?;
    let ids: Vec<u32> = serde_json::from_str(&input).context("reading token ids")?;
    let m = DeviceModel::load(model)?;
    let mut rep = RunReport::default();
    let mut peak = peak_rss_kb();
    let probe = bandwidth && reset_peak_rss();
    for _ in 0..runs {
        if probe {
            rep.bandwidth.push(read_bandwidth(afm::lm::par::threads()));
            reset_peak_rss();
        }
        let mut cache = m.new_cache();
        let t0 = Instant::now();
        let l = m.forward_tokens(&ids, &mut cache, &LogitsFor::Last)?;
        let mut tok = argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
        let t1 = Instant::now();
        let b0 = afm::lm::par::barriers();
        let s0 = afm::lm::par::stalls();
        for _ in 0..new_tokens.saturating_sub(1) {
            let l = m.forward_tokens(&[tok], &mut cache, &LogitsFor::Last)?;
            tok = argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
        }
        rep.prefill_s.push((t1 - t0).as_secs_f64());
        rep.decode_s.push(t1.elapsed().as_secs_f64());
        rep.stalls.push(afm::lm::par::stalls() - s0);
        rep.barriers_per_token =
            (afm::lm::par::barriers() - b0) as f64 / new_tokens.saturating_sub(1).max(1) as f64;
        peak = peak.max(peak_rss_kb());
    }
    rep.peak_rss_kb = peak;
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

fn run_child(mut cmd: Command, ids_json: &str) -> Result<RunReport> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(ids_json.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("benchmark process failed ({})", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let line = line.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("parsing benchmark output `{line}`"))
}

/// A chat prompt cut to exactly `n` tokens.
fn prompt_ids(ck: &Checkpoint, n: usize) -> Result<Vec<u32>> {
    let text = "Explain, step by step and with examples, how a small language model running on a phone \
        can answer questions about a screenshot: what the vision encoder does, how image tokens reach \
        the language model, why the key-value cache matters for speed, and what limits memory. "
        .repeat(1 + n / 40);
    let chat = afm::lm::chat::render_chat(&ck.tokenizer, &[Message::user(text)])?;
    let ids = ck.tokenizer.encode(&chat)?;
    if ids.len() < n {
        bail!("could not build a {n}-token prompt");
    }
    Ok(ids[..n].to_vec())
}

/// `llama-bench` to use: the flag, `$AFM_LLAMA_BENCH`, or the default build
/// directory of `scripts/build_llamacpp.sh`, if the file exists.
pub(crate) fn find_llama(flag: &Option<PathBuf>, env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/llama.cpp/bin")
        .join(name);
    p.exists().then_some(p)
}

/// llama-bench's samples over `runs` repetitions, in seconds for our token counts: prefill of `n_prompt` tokens from an empty
/// context, and decode of `n_gen` tokens after `n_prompt` tokens of context (`-d`), as afm's
/// decode runs after the prompt.
pub(crate) fn run_llama_bench(
    exe: &std::path::Path,
    model: &std::path::Path,
    threads: usize,
    n_prompt: usize,
    n_gen: usize,
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let out = Command::new(exe)
        .arg("-m")
        .arg(model)
        .args([
            "-p",
            &n_prompt.to_string(),
            "-n",
            "0",
            "-t",
            &threads.to_string(),
        ])
        .args(["-r", &runs.to_string(), "-o", "json"])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let out2 = Command::new(exe)
        .arg("-m")
        .arg(model)
        .args([
            "-p",
            "0",
            "-n",
            &n_gen.to_string(),
            "-d",
            &n_prompt.to_string(),
        ])
        .args([
            "-t",
            &threads.to_string(),
            "-r",
            &runs.to_string(),
            "-o",
            "json",
        ])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() || !out2.status.success() {
        bail!("{} failed ({}, {})", exe.display(), out.status, out2.status);
    }
    // tok/s samples -> seconds for our token counts
    let samples = |o: &[u8], want_gen: bool| -> Result<Vec<f64>> {
        let v: serde_json::Value = serde_json::from_slice(o).context("parsing llama-bench JSON")?;
        let t = v
            .as_array()
            .and_then(|a| {
                a.iter().find(|t| {
                    let g = t["n_gen"].as_u64().unwrap_or(0);
                    (g > 0) == want_gen
                })
            })
            .context("llama-bench printed no matching test")?;
        let n = if want_gen { n_gen } else { n_prompt } as f64;
        let ts = t["samples_ts"]
            .as_array()
            .context("llama-bench JSON has no samples_ts")?;
        Ok(ts
            .iter()
            .filter_map(|x| x.as_f64())
            .map(|tps| n / tps)
            .collect())
    };
    Ok((samples(&out.stdout, false)?, samples(&out2.stdout, true)?))
}

/// `llama-completion` (the former `llama-cli`) on the same prompt text (greedy, `n_gen` tokens): prompt-eval and eval times
/// from its `llama_perf_context_print` lines, in seconds for our token counts.
fn run_llama_completion(
    exe: &std::path::Path,
    model: &std::path::Path,
    threads: usize,
    prompt: &str,
    n_gen: usize,
) -> Result<(f64, f64, usize)> {
    let out = Command::new(exe)
        .arg("-m")
        .arg(model)
        .args([
            "-p",
            prompt,
            "-n",
            &n_gen.to_string(),
            "-t",
            &threads.to_string(),
        ])
        .args(["--temp", "0", "-no-cnv", "--ignore-eos", "-c", "2048"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let err = String::from_utf8_lossy(&out.stderr);
    // "... prompt eval time =  123.45 ms /   100 tokens (...)" and "...  eval time = ..."
    let parse = |key: &str| -> Option<(f64, usize)> {
        let l = err.lines().find(|l| l.contains(key))?;
        let rest = l.split_once('=')?.1;
        let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
        let n: usize = rest
            .split('/')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some((ms / 1e3, n))
    };
    let (pf, n_prompt) =
        parse("prompt eval time").context("llama-completion printed no prompt eval time")?;
    let (dc, n_dec) = err
        .lines()
        .find(|l| l.contains(" eval time") && !l.contains("prompt"))
        .and_then(|l| {
            let rest = l.split_once('=')?.1;
            let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
            let n: usize = rest
                .split('/')
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((ms / 1e3, n))
        })
        .context("llama-completion printed no eval time")?;
    // per-token times scaled to our decode count
    let dc = dc / n_dec.max(1) as f64 * (n_gen.saturating_sub(1)) as f64;
    Ok((pf, dc, n_prompt))
}

pub fn bench_lm(a: &LmBench, threads: usize, model: PathBuf) -> Result<()> {
    let ck = Checkpoint::load(&model)?;
    let ids = prompt_ids(&ck, a.prompt_tokens)?;
    let prompt_text = ck.tokenizer.decode(&ids, false)?;
    let weight_bytes = ck.model.weight_bytes_per_token();
    drop(ck);
    let ids_json = serde_json::to_string(&ids)?;
    let exe = std::env::current_exe()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_llamacpp.py");
    let mut python = !a.no_reference;
    if python {
        let ok = Command::new(&a.python)
            .args(["-c", "import llama_cpp"])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!(
                "note: `{} -c 'import llama_cpp'` failed: the llama-cpp-python reference is skipped \
                 (install it with `pip install llama-cpp-python==0.3.36`, CMAKE_ARGS=-DGGML_NATIVE=ON, \
                 or pass --python)",
                a.python
            );
            python = false;
        }
    }
    let lbench = if a.no_reference {
        None
    } else {
        find_llama(&a.llama_bench, "AFM_LLAMA_BENCH", "llama-bench")
    };
    let lcli = if a.no_reference {
        None
    } else {
        a.llama_completion.clone().or_else(|| {
            let p = lbench.as_ref()?.with_file_name("llama-completion");
            p.exists().then_some(p)
        })
    };
    if lbench.is_none() && !a.no_reference {
        eprintln!(
            "note: no llama-bench: build it with `scripts/build_llamacpp.sh` (or pass --llama-bench)"
        );
    }
    let cpu = afm::lm::isa::describe_cpu();
    eprintln!(
        "bench: {} | {} prompt tokens, {} new tokens, {threads} threads, {} processes x {} runs per engine\ncpu: {cpu}",
        model.display(),
        ids.len(),
        a.new_tokens,
        a.processes,
        a.runs
    );
    // On a busy machine, measured before the busy loop starts: the machine's own bandwidth.
    // Otherwise each worker measures it before each run, and this probe is only the fallback.
    let busy_bandwidth = a.busy.then(|| read_bandwidth(threads));
    let _busy = crate::busy::maybe(a.busy);
    let one_thread_too = a.busy && threads > 1;
    let mut ours = RunReport::default();
    let mut ours1 = RunReport::default();
    let mut lb = RunReport::default();
    let mut lc = RunReport::default();
    let mut py = RunReport::default();
    let run_afm = |t: usize, into: &mut RunReport, p: usize| -> Result<()> {
        let mut c = Command::new(&exe);
        c.args(["--threads", &t.to_string(), "bench-worker", "--model"])
            .arg(&model)
            .args([
                "--new-tokens",
                &a.new_tokens.to_string(),
                "--runs",
                &a.runs.to_string(),
            ]);
        // on a busy machine the probe would measure the busy loop: the reading before it
        // started stands
        if !a.busy {
            c.arg("--bandwidth");
        }
        let r = run_child(c, &ids_json)?;
        eprintln!(
            "  afm ({t} threads) process {p}: prefill {:?} s, decode {:?} s, {:.1} barriers/token, \
             waits for a preempted thread in each decode {:?}",
            r.prefill_s, r.decode_s, r.barriers_per_token, r.stalls
        );
        if r.bandwidth.len() == r.decode_s.len() {
            into.bandwidth.extend(r.bandwidth);
        }
        into.prefill_s.extend(r.prefill_s);
        into.decode_s.extend(r.decode_s);
        into.peak_rss_kb = into.peak_rss_kb.max(r.peak_rss_kb);
        into.barriers_per_token = r.barriers_per_token;
        Ok(())
    };
    for p in 0..a.processes {
        run_afm(threads, &mut ours, p)?;
        if one_thread_too {
            run_afm(1, &mut ours1, p)?;
        }
        if let Some(lbx) = &lbench {
            match run_llama_bench(lbx, &model, threads, ids.len(), a.new_tokens - 1, a.runs) {
                Ok((pf, dc)) => {
                    eprintln!("  llama-bench round {p}: prefill {pf:?} s, decode {dc:?} s");
                    lb.prefill_s.extend(pf);
                    lb.decode_s.extend(dc);
                }
                Err(e) => eprintln!("  llama-bench failed: {e:#}"),
            }
        }
        if let Some(lcx) = &lcli {
            match run_llama_completion(lcx, &model, threads, &prompt_text, a.new_tokens) {
                Ok((pf, dc, n)) => {
                    eprintln!("  llama-completion round {p}: prefill {pf:.3} s ({n} tokens), decode {dc:.3} s");
                    // scaled to our prompt length (its tokenizer may add a BOS)
                    lc.prefill_s.push(pf * ids.len() as f64 / n.max(1) as f64);
                    lc.decode_s.push(dc);
                }
                Err(e) => eprintln!("  llama-completion failed: {e:#}"),
            }
        }
        if python {
            let mut c = Command::new(&a.python);
            c.arg(&script).arg(&model).args([
                threads.to_string(),
                a.new_tokens.to_string(),
                a.runs.to_string(),
            ]);
            let r = run_child(c, &ids_json)?;
            eprintln!(
                "  llama-cpp-python process {p}: prefill {:?} s, decode {:?} s",
                r.prefill_s, r.decode_s
            );
            py.prefill_s.extend(r.prefill_s);
            py.decode_s.extend(r.decode_s);
            py.peak_rss_kb = py.peak_rss_kb.max(r.peak_rss_kb);
        }
    }
    let n = ids.len() as f64;
    let d = (a.new_tokens - 1) as f64;
    let row = |name: &str, r: &mut RunReport| -> (f64, f64) {
        let pf = n / median(&mut r.prefill_s);
        let dc = d / median(&mut r.decode_s);
        let rss = if r.peak_rss_kb > 0 {
            format!("{:.0} MB", r.peak_rss_kb as f64 / 1024.0)
        } else {
            "n/a".into()
        };
        let bar = if r.barriers_per_token > 0.0 {
            format!("{:.0}", r.barriers_per_token)
        } else {
            "n/a".into()
        };
        println!("| {name} | {pf:.1} | {dc:.1} | {rss} | {bar} |");
        (pf, dc)
    };
    println!(
        "CPU: {cpu}{}",
        if a.busy {
            "; a background busy loop held one core"
        } else {
            ""
        }
    );
    println!(
        "{} prompt tokens, {} decoded, {threads} threads, medians of {} runs\n",
        ids.len(),
        a.new_tokens - 1,
        a.processes * a.runs
    );
    println!("| engine | prefill tok/s | decode tok/s | peak RSS | barriers/token |");
    println!("|---|---:|---:|---:|---:|");
    // each run against the bandwidth measured just before it (before `row` sorts the runs)
    let per_run = (!ours.bandwidth.is_empty() && ours.bandwidth.len() == ours.decode_s.len())
        .then(|| bandwidth_shares(&ours.bandwidth, &ours.decode_s, d, weight_bytes));
    let (p1, d1) = row(&format!("afm ({threads} threads)"), &mut ours);
    let mut ratios = Vec::new();
    let mb = weight_bytes as f64 / 1e6;
    match per_run {
        Some(b) => ratios.push(format!(
            "bandwidth limit: {mb:.1} MB of weights read per token, {:.2}-{:.2} GB/s read bandwidth \
             ({threads} threads, measured before each of the {} runs) -> {:.1}-{:.1} tok/s; afm decodes \
             at {:.0}% of it (median over the runs, each against the bandwidth measured before it; \
             {:.0}-{:.0}%)",
            b.gbps.0,
            b.gbps.1,
            b.runs,
            b.limit.0,
            b.limit.1,
            100.0 * b.share.1,
            100.0 * b.share.0,
            100.0 * b.share.2
        )),
        None => {
            let bandwidth = busy_bandwidth.unwrap_or_else(|| read_bandwidth(threads));
            let limit = bandwidth / weight_bytes.max(1) as f64;
            ratios.push(format!(
                "bandwidth limit: {mb:.1} MB of weights read per token, {:.2} GB/s read bandwidth ({threads} threads) \
                 -> {limit:.1} tok/s; afm decodes at {:.0}% of it",
                bandwidth / 1e9,
                100.0 * d1 / limit
            ))
        }
    }
    if one_thread_too {
        let (p0, d0) = row("afm (1 thread)", &mut ours1);
        ratios.push(format!(
            "afm {threads} threads / 1 thread on the busy machine: prefill {:.2}x, decode {:.2}x (target >= 0.9x)",
            p1 / p0,
            d1 / d0
        ));
    }
    if !lb.decode_s.is_empty() {
        let (p2, d2) = row("llama.cpp `llama-bench`", &mut lb);
        ratios.push(format!(
            "afm / llama-bench: prefill {:.2}x (target >= 1.5x), decode {:.2}x (target >= 1.3x)",
            p1 / p2,
            d1 / d2
        ));
    }
    if !lc.decode_s.is_empty() {
        let (p2, d2) = row("llama.cpp `llama-completion`", &mut lc);
        ratios.push(format!(
            "afm / llama-completion: prefill {:.2}x, decode {:.2}x",
            p1 / p2,
            d1 / d2
        ));
    }
    if !py.decode_s.is_empty() {
        let (p2, d2) = row("llama-cpp-python", &mut py);
        ratios.push(format!(
            "afm / llama-cpp-python: prefill {:.2}x, decode {:.2}x",
            p1 / p2,
            d1 / d2
        ));
    }
    println!();
    for r in ratios {
        println!("{r}");
    }
    Ok(())
}

pub fn bench_kv(a: &KvBench) -> Result<()> {
    let heads = (a.hidden / 128).max(1);
    let cfg = LmConfig {
        vocab_size: 8192,
        hidden_size: a.hidden,
        intermediate_size: a.hidden * 13 / 4,
        num_hidden_layers: a.layers,
        num_attention_heads: heads,
        num_key_value_heads: Some((heads / 8).max(1)),
        head_dim: Some(a.hidden / heads),
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        max_position_embeddings: a.prompt_tokens.max(1) + 16,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        num_kv_reuse_layers: 0,
        qk_norm: true,
        rope_interleaved: true,
        kv_quant: true,
    }
    .with_block_ratio(5, 3)?;
    eprintln!(
        "bench kv-sharing: random AFM model, {} layers ({} block 2), hidden {}, {} heads / {} KV heads, {} prompt tokens",
        cfg.num_hidden_layers,
        cfg.num_kv_reuse_layers,
        cfg.hidden_size,
        heads,
        cfg.num_kv_heads(),
        a.prompt_tokens
    );
    let mut m = DeviceModel::from_source(
        &WeightSource::from_tensors(random_tensors(&cfg, 0)?),
        cfg.clone(),
    )?;
    let ids: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| (i * 7919) % 8192)
        .collect();
    let time = |m: &DeviceModel| -> Result<(f64, usize)> {
        let mut ts = Vec::new();
        let mut bytes = 0;
        for _ in 0..a.runs {
            let mut c = m.new_cache();
            let t0 = Instant::now();
            m.forward_tokens(&ids, &mut c, &LogitsFor::Last)?;
            ts.push(t0.elapsed().as_secs_f64());
            bytes = c.used_bytes();
        }
        Ok((median(&mut ts), bytes))
    };
    m.set_prefill_shortcut(true);
    let (on, bytes_shared) = time(&m)?;
    m.set_prefill_shortcut(false);
    let (off, _) = time(&m)?;
    let full_cfg = LmConfig {
        num_kv_reuse_layers: 0,
        ..cfg.clone()
    };
    let full = DeviceModel::from_source(
        &WeightSource::from_tensors(random_tensors(&full_cfg, 0)?),
        full_cfg,
    )?;
    let (plain, bytes_full) = time(&full)?;
    println!(
        "| prefill of {} tokens | time to first token |",
        a.prompt_tokens
    );
    println!("|---|---:|");
    println!(
        "| 5:3 sharing, block 2 on the last position only | {:.1} ms |",
        on * 1e3
    );
    println!(
        "| 5:3 sharing, block 2 on every position | {:.1} ms |",
        off * 1e3
    );
    println!(
        "| no sharing (all layers with K/V) | {:.1} ms |",
        plain * 1e3
    );
    println!(
        "\nprefill shortcut: {:.1}% less time than block 2 on every position; \
         KV cache {} vs {} bytes without sharing (-{:.1}%)",
        100.0 * (1.0 - on / off),
        bytes_shared,
        bytes_full,
        100.0 * (1.0 - bytes_shared as f64 / bytes_full as f64)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bandwidth probe's three loops read every word: the same sum, on a slice whose
    /// length is not a multiple of the 8 lanes (the tail is left out by all three alike).
    #[test]
    fn the_probe_loops_sum_every_word() {
        let v: Vec<u64> = (0..100_003u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let want = v[..100_000].iter().fold(0u64, |a, &b| a.wrapping_add(b));
        for p in [Prefetch::None, Prefetch::L1, Prefetch::L2] {
            assert_eq!(sum_slice(&v, p), want);
        }
    }

    #[test]
    fn each_run_is_held_to_the_bandwidth_measured_before_it() {
        // 1 GB per token; runs of 10 tokens at 10, 20 and 25 tok/s against 20, 25 and 50 GB/s
        let b = bandwidth_shares(&[20e9, 25e9, 50e9], &[1.0, 0.5, 0.4], 10.0, 1_000_000_000);
        assert_eq!(b.runs, 3);
        assert_eq!(b.gbps, (20.0, 50.0));
        assert_eq!(b.limit, (20.0, 50.0));
        // 10/20, 20/25, 25/50; one reading of 20 GB/s would have put the median run at 100%
        assert_eq!(b.share, (0.5, 0.5, 0.8));
        let one = bandwidth_shares(&[30e9], &[2.0], 40.0, 1_000_000_000);
        assert_eq!(
            (one.runs, one.share),
            (1, (20.0 / 30.0, 20.0 / 30.0, 20.0 / 30.0))
        );
    }
}
