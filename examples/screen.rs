//! Describe a screenshot (window title, controls and their text).
//!
//!     cargo run --release --example screen -- assets/images/screen.png
//!
//! Text for now; a typed description (JSON following a schema) comes with guided generation.

use afm::fusion::AskOptions;
use afm::lm::GenerateOptions;
use anyhow::Result;
use std::io::Write;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: screen SCREENSHOT"))?;
    let vlm = afm::models::load_default_vlm()?;
    let img = afm::vision::load_image(path.as_ref(), &afm::vision::ImageLimits::default())?;
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 48,
            ..Default::default()
        },
        // A screenshot's text needs resolution: the model's full budget (its default).
        max_image_tokens: None,
    };
    let answer = vlm.describe_screen(&img, &opts, &mut |piece| {
        print!("{piece}");
        std::io::stdout().flush().is_ok()
    })?;
    println!();
    eprintln!(
        "{} image tokens, {} tokens generated",
        answer.plan.image_tokens, answer.generation.stats.generated_tokens
    );
    Ok(())
}
