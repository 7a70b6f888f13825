//! Generate from a server model (the paper's PT-MoE: parallel tracks, mixture of experts,
//! interleaved local/global attention) through the same `LanguageModel` trait as the
//! on-device model.
//!
//!     cargo run --release --example server_model -- [PT-MoE.gguf]
//!
//! Apple's weights are not public. Without an argument this writes a small random-weight
//! PT-MoE (`afm server-gen` does the same from the CLI) that borrows SmolLM2's tokenizer, so
//! its output is gibberish: the point is the API. Needs SmolLM2 on this machine for the
//! tokenizer (see `afm::models::smollm2_gguf`).

use afm::lm::server_checkpoint::{gguf_tokenizer_metadata, write_server_gguf};
use afm::lm::server_model::{random_server_tensors, ServerConfig};
use afm::lm::{generate, Checkpoint, GenerateOptions, LanguageModel, ServerCheckpoint, Tokenizer};
use anyhow::Result;
use candle_core::quantized::GgmlDType;
use std::path::PathBuf;

/// Works with any model behind the trait: dense, PT-MoE, or your own.
fn complete<M: LanguageModel>(name: &str, model: &M, tok: &Tokenizer, prompt: &str) -> Result<()> {
    let ids = tok.encode(prompt)?;
    let opts = GenerateOptions {
        max_new_tokens: 16,
        ..Default::default()
    };
    let g = generate(model, tok, &ids, &opts, &mut |_| true)?;
    let i = model.info();
    println!(
        "{name} ({} layers, hidden {}): {:?} ({} tokens)",
        i.num_layers, i.hidden_size, g.text, g.stats.generated_tokens
    );
    Ok(())
}

fn main() -> Result<()> {
    let smollm2 = afm::models::smollm2_gguf()?;
    let given = std::env::args().nth(1).map(PathBuf::from);
    let path = match &given {
        Some(p) => p.clone(),
        None => {
            // The `tiny` preset with SmolLM2's vocabulary, q8_0 weights, random but seeded.
            let mut cfg = ServerConfig::preset("tiny")?;
            cfg.vocab_size = 49152;
            let tensors = random_server_tensors(&cfg, 0)?;
            let p = std::env::temp_dir().join(format!("afm-ptmoe-{}.gguf", std::process::id()));
            write_server_gguf(
                &p,
                &cfg,
                &tensors,
                GgmlDType::Q8_0,
                &gguf_tokenizer_metadata(&smollm2)?,
            )?;
            p
        }
    };
    let server = ServerCheckpoint::load(&path)?;
    let c = server.model.config();
    println!(
        "PT-MoE: {} tracks x {} layers, {} experts (top {})",
        c.num_tracks, c.num_layers_per_track, c.num_experts, c.experts_per_token
    );
    complete(
        "server PT-MoE",
        &server.model,
        &server.tokenizer,
        "The sea is",
    )?;

    // The same function on the on-device dense model.
    let device = Checkpoint::load(&smollm2)?;
    complete(
        "on-device SmolLM2",
        &device.model,
        &device.tokenizer,
        "The sea is",
    )?;
    if given.is_none() {
        std::fs::remove_file(&path).ok();
    }
    Ok(())
}
