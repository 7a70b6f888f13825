//! Typed answers: the model fills in a Rust type. Decoding is constrained to the type's JSON
//! Schema (derived by schemars), so the answer always parses, even from a 135M model.
//!
//!     cargo run --release --example respond_as -- "Describe a penguin."

use afm::lm::{Checkpoint, Session};
use serde::Deserialize;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Animal {
    #[schemars(length(max = 20))]
    name: String,
    #[schemars(range(min = 0, max = 8))]
    legs: u8,
    can_fly: bool,
    #[schemars(length(min = 1, max = 3), inner(length(max = 12)))]
    colours: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Describe a penguin.".into());
    // SmolLM2-135M-Instruct (`afm generate hello` fetches it once)
    let model = Checkpoint::load(&afm::models::smollm2_gguf()?)?;
    let mut session = Session::with_instructions(&model, "You describe animals.");
    // partial objects stream in while the answer is generated
    let animal: Animal = session.respond_as_streaming(prompt.as_str(), &mut |partial| {
        eprintln!("partial: {partial}");
        true
    })?;
    println!("{animal:#?}");
    // the session keeps the conversation (and its K/V cache) for a follow-up
    let other: Animal = session.respond_as("Now a sparrow.")?;
    println!("{other:#?}");
    for a in [&animal, &other] {
        let flies = if a.can_fly { "flies" } else { "does not fly" };
        let colours = a.colours.join(", ");
        println!("{}: {} legs, {flies}, {colours}", a.name, a.legs);
    }
    Ok(())
}
