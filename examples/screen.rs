//! Describe a screenshot as a typed value: window title, buttons, fields with their values,
//! list items and the selected one. It always parses (`afm screen --json` prints the same):
//! SmolVLM decodes under the type's JSON Schema; afm-tiny, the default, writes the sentences
//! it was trained on, which are put in the type's slots.
//!
//!     cargo run --release --example screen -- assets/images/screen.png

use afm::fusion::ScreenDescription;
use afm::lm::GenerationOptions;
use anyhow::Result;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: screen SCREENSHOT"))?;
    let vlm = afm::models::load_default_vlm()?;
    let img = afm::vision::load_image(path.as_ref(), &afm::vision::ImageLimits::default())?;
    // A screenshot's text needs resolution: the model's full budget (`None`, its default).
    let plan = vlm.plan(img.width(), img.height(), None)?;
    let d: ScreenDescription =
        vlm.describe_screen_typed(&img, None, &GenerationOptions::default())?;
    println!("{}", serde_json::to_string_pretty(&d)?);
    eprintln!(
        "{} image tokens; title {:?}, {} buttons, {} fields, {} list items",
        plan.image_tokens,
        d.title,
        d.buttons.len(),
        d.fields.len(),
        d.list_items.len()
    );
    Ok(())
}
