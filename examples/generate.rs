//! Stream text from a language model, token by token.
//!
//!     cargo run --release --example generate -- "Write a haiku about the sea"
//!
//! Uses SmolLM2-135M-Instruct (found on this machine, see `afm::models::smollm2_gguf`), or
//! the GGUF / checkpoint directory named by AFM_LM.

use afm::lm::{generate, Checkpoint, GenerateOptions, Message, SamplingParams};
use anyhow::Result;
use std::io::Write;

fn main() -> Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Write a haiku about the sea".into());
    let path = match std::env::var_os("AFM_LM") {
        Some(p) => p.into(),
        None => afm::models::smollm2_gguf()?,
    };
    // Weights and tokenizer (with its chat template) from one file.
    let ck = Checkpoint::load(&path)?;
    let text = afm::lm::chat::render_chat(&ck.tokenizer, &[Message::user(prompt)])?;
    let ids = ck.tokenizer.encode(&text)?;

    // Sampling: temperature 0.7, nucleus 0.9, seeded so a run is reproducible.
    let opts = GenerateOptions {
        max_new_tokens: 64,
        sampling: SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: 42,
            ..Default::default()
        },
        ..Default::default()
    };
    // The callback gets each new piece of text; returning false stops generation.
    let g = generate(&ck.model, &ck.tokenizer, &ids, &opts, &mut |piece| {
        print!("{piece}");
        std::io::stdout().flush().is_ok()
    })?;
    println!();
    eprintln!(
        "{} tokens, {:.1} tok/s",
        g.stats.generated_tokens,
        g.stats.decode_tok_s()
    );
    Ok(())
}
