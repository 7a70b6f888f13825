//! Ask a question about an image, then a follow-up about the same image. The second
//! request finds the image's embeddings in the pipeline's image cache and skips the vision
//! encoder.
//!
//!     cargo run --release --example vqa -- assets/images/scene.png "What shapes are there?" "What colour are they?"

use afm::fusion::{AskOptions, ChatMessage, Part};
use afm::lm::GenerateOptions;
use anyhow::Result;
use std::io::Write;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, question, follow_up] = args.as_slice() else {
        anyhow::bail!("usage: vqa IMAGE QUESTION FOLLOW_UP");
    };
    let vlm = afm::models::load_default_vlm()?;
    let img = afm::vision::load_image(image.as_ref(), &afm::vision::ImageLimits::default())?;
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 32,
            ..Default::default()
        },
        max_image_tokens: None,
    };
    // Stream each answer to stdout as it is generated.
    let mut print = |piece: &str| {
        print!("{piece}");
        std::io::stdout().flush().is_ok()
    };

    // First question: the image goes through the vision encoder and the adapter.
    println!("Q: {question}");
    print!("A: ");
    let first = vlm.ask(&img, question, &opts, &mut print)?;
    println!("\n   (image encoded in {:.0} ms)", first.encode_secs * 1e3);

    // Follow-up as a chat: the first turn and its answer, then the new question. The image
    // is the same pixels with the same budget, so `encode_image` returns the cached
    // embeddings (`from_cache`) instead of running the encoder again.
    let enc = vlm.encode_image(&img, opts.max_image_tokens)?;
    let chat = [
        ChatMessage::user(vec![Part::Image(enc.clone()), Part::Text(question.clone())]),
        ChatMessage::assistant(first.generation.text.trim()),
        ChatMessage::user(vec![Part::Text(follow_up.clone())]),
    ];
    println!("Q: {follow_up}");
    print!("A: ");
    vlm.chat(&chat, &opts.generate, &mut print)?;
    println!("\n   (image from cache: {})", enc.from_cache);
    anyhow::ensure!(enc.from_cache, "the follow-up re-encoded the image");
    Ok(())
}
