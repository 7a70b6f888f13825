//! `afm serve`: an OpenAI-compatible HTTP server over one loaded model, with continuous
//! batching ([`engine`]), the wire format ([`api`]), the routes and limits ([`http`]) and a
//! one-file web page (`page.html`, served at `/`).

pub mod api;
pub mod bench;
pub mod engine;
pub mod http;

use crate::vlm_cmd::ModelArgs;
use anyhow::{Context, Result};
use clap::Args;
use engine::Model;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Allow `image_url` parts that name local files, under this directory only.
    #[arg(long, value_name = "DIR")]
    allow_files: Option<PathBuf>,
    /// Largest request body, in bytes (a base64 image is 4/3 of its file).
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Largest decoded image, in pixels.
    #[arg(long, default_value_t = 16_000_000)]
    max_image_pixels: u64,
    /// Images per request at most.
    #[arg(long, default_value_t = 4)]
    max_images: usize,
    /// Largest `max_tokens` a request may ask for (and the default when it asks none: 256
    /// or this, the smaller).
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Requests in flight at most (running and queued); more get HTTP 429.
    #[arg(long, default_value_t = 32)]
    max_concurrent: usize,
    /// Requests decoded together in one batch at most (the rest wait in the queue).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Keep the K/V of recent text-only prompts (up to this many MB) and prefill only where
    /// a new prompt departs from one of them (the chat template's system prompt, earlier
    /// turns). Off by default: the reused positions were computed in a prefill of another
    /// length, whose float sums differ, so greedy answers can differ at near-ties from a
    /// cold start (as with llama.cpp's prompt cache). Requests with a `seed` are always
    /// prefilled cold, so that a seed reproduces its text.
    #[arg(long, value_name = "MB")]
    prefix_cache: Option<usize>,
}

/// The model `--model` names: a GGUF / safetensors language model (text only) or a
/// vision-language model directory (the default afm-tiny when none).
fn load(a: &ServeArgs) -> Result<(Model, String)> {
    let Some(given) = a.model.model_path() else {
        let (m, _) = a.model.open()?;
        let (vlm, _) = a.model.load(&m)?;
        return Ok((Model::Vision(Box::new(vlm)), "afm-tiny".into()));
    };
    let (path, name) = match given.to_str().and_then(afm::hub::parse) {
        Some(id) => (afm::hub::resolve(&id)?, id.repo.clone()),
        None => {
            let stem = if given.is_file() {
                given.file_stem()
            } else {
                given.file_name()
            };
            let name = stem.map_or("model".into(), |s| s.to_string_lossy().into_owned());
            (given.to_path_buf(), name)
        }
    };
    // A vision-language directory has an image processor config or is an afm-tiny export;
    // anything else is a language model (a GGUF file or a safetensors directory).
    let vision = path.is_dir()
        && (path.join("preprocessor_config.json").is_file()
            || path.join("processor_config.json").is_file()
            || afm::fusion::afm_tiny::is_afm_tiny(&path).unwrap_or(false));
    if !vision {
        return Ok((Model::Text(a.model.load_text(&path)?), name));
    }
    let (m, _) = a.model.open_at(&path)?;
    let (vlm, _) = a.model.load(&m)?;
    Ok((Model::Vision(Box::new(vlm)), name))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("afm serve: shutting down (finishing requests in flight)");
}

pub(crate) fn cmd_serve(mut a: ServeArgs) -> Result<()> {
    // f16 K/V by default, as llama-server keeps its cache: half the bytes every added
    // stream's attention reads per step
    a.model.prefer_f16_kv = true;
    anyhow::ensure!(a.max_batch >= 1, "--max-batch must be at least 1");
    anyhow::ensure!(a.max_concurrent >= 1, "--max-concurrent must be at least 1");
    anyhow::ensure!(a.max_tokens >= 1, "--max-tokens must be at least 1");
    let allow_files = match &a.allow_files {
        Some(d) => Some(
            std::fs::canonicalize(d).with_context(|| format!("--allow-files {}", d.display()))?,
        ),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let (model, name) = load(&a)?;
    eprintln!(
        "afm serve: loaded {name} ({}) in {:.1} s",
        if model.has_vision() {
            "vision-language"
        } else {
            "text"
        },
        t0.elapsed().as_secs_f64()
    );
    let limits = api::Limits {
        max_tokens: a.max_tokens,
        default_max_tokens: 256,
        max_image_pixels: a.max_image_pixels,
        max_images: a.max_images,
        allow_files,
    };
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let mut st = http::AppState::new(name, model.has_vision(), limits, a.max_concurrent, jobs_tx);
    // guided generation for `response_format` (a tokenizer it cannot read only disables that)
    st.guides = match afm::lm::guided::GuideFactory::new(
        model.tokenizer(),
        afm::lm::LanguageModel::info(model.lm()).vocab_size,
        model.tokenizer().eos_ids(),
    ) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("afm serve: response_format json_schema is off: {e}");
            None
        }
    };
    let state = Arc::new(st);
    let max_batch = a.max_batch;
    let prefixes = engine::PrefixCache::new(a.prefix_cache.unwrap_or(0).saturating_mul(1 << 20));
    let engine = std::thread::Builder::new()
        .name("afm-model".into())
        .spawn(move || engine::run(&model, jobs_rx, max_batch, prefixes))
        .context("starting the model thread")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let app = http::router(state.clone(), a.max_body_bytes);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        let addr = listener.local_addr()?;
        eprintln!("afm serve: listening on http://{addr} (web page at /, OpenAI API at /v1)");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")
    })?;
    // No more jobs: the model thread finishes what it runs and returns.
    state.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    engine
        .join()
        .map_err(|_| anyhow::anyhow!("the model thread panicked"))?;
    eprintln!("afm serve: stopped");
    Ok(())
}
