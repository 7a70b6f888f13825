//! Caption a batch of images with one loaded model.
//!
//!     cargo run --release --example caption -- assets/images/scene.png assets/images/screen.png
//!
//! Uses the default model (afm-tiny, carried by the library, with SmolLM2 found on this
//! machine: run `afm generate hello` once, or set AFM_SMOLLM2_GGUF). Set AFM_MODEL=DIR to
//! use a SmolVLM / Idefics3 checkpoint directory instead.

use afm::fusion::{AskOptions, ModelDir};
use afm::lm::GenerateOptions;
use anyhow::{Context, Result};

fn main() -> Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!paths.is_empty(), "usage: caption IMAGE...");

    // Load the pipeline once: vision encoder + adapter + language model.
    let vlm = match std::env::var_os("AFM_MODEL") {
        Some(dir) => ModelDir::open(dir.as_ref())?.load(None)?,
        None => afm::models::load_default_vlm()?,
    };

    // Decode every image first (a bad file is an error naming it).
    let images = paths
        .iter()
        .map(|p| {
            afm::vision::load_image(p.as_ref(), &afm::vision::ImageLimits::default())
                .with_context(|| format!("reading {p}"))
        })
        .collect::<Result<Vec<_>>>()?;

    // Greedy decoding, at most 32 new tokens per caption.
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 32,
            ..Default::default()
        },
        max_image_tokens: None,
    };

    // One result per image, in order; a failing image does not stop the batch.
    let results = vlm.caption_many(&images, &opts, &mut |_, _| {});
    for (path, r) in paths.iter().zip(results) {
        match r {
            Ok(answer) => println!("{path}: {}", answer.generation.text.trim()),
            Err(e) => println!("{path}: error: {e}"),
        }
    }
    Ok(())
}
