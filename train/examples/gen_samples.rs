//! Writes a few generated samples as PNGs plus their labels as JSONL, to look at:
//!
//! ```text
//! cargo run --release -p afm-train --example gen_samples -- OUT_DIR [N] [START]
//! ```
//!
//! For each split (train, held_out) and kind (screen, scene) it writes N samples starting at
//! index START (default 4 from 0) as `<kind>_<split>_<index>.png` (and N glyph sheets of the
//! training split, `glyphs_train_<index>.png`), and one JSON object per
//! sample (caption, questions, ground truth; no pixels) to `OUT_DIR/labels.jsonl`. When the
//! easy-VQA data is present (`scripts/fetch_easy_vqa.sh`) the first N test images are added.

use std::io::Write;
use std::path::PathBuf;

use afm_train::{easy_vqa, generate, EasyVqa, Sample, Split, SynthKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: gen_samples OUT_DIR [N] [START]")?,
    );
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    let start: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    std::fs::create_dir_all(&out)?;
    let mut jsonl = std::fs::File::create(out.join("labels.jsonl"))?;
    let mut write = |s: &Sample, name: String| -> Result<(), Box<dyn std::error::Error>> {
        s.image.save(out.join(&name))?;
        let mut v = serde_json::to_value(s.labels())?;
        v["file"] = name.into();
        writeln!(jsonl, "{v}")?;
        Ok(())
    };
    let t0 = std::time::Instant::now();
    let mut count = 0;
    for split in [Split::Train, Split::HeldOut] {
        for (kind, kname) in [(SynthKind::Screen, "screen"), (SynthKind::Scene, "scene")] {
            for i in start..start + n {
                let s = generate(kind, split, i);
                write(&s, format!("{kname}_{}_{i}.png", split.name()))?;
                count += 1;
            }
        }
    }
    // glyph sheets (a reading curriculum's views) exist in the training split only
    for i in start..start + n {
        let s = afm_train::glyphs::sheet(i, 0, afm_train::glyphs::DEFAULT_PX);
        write(&s, format!("glyphs_train_{i}.png"))?;
        count += 1;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = easy_vqa::data_dir(&root);
    match EasyVqa::open(&dir, Split::HeldOut) {
        Ok(set) => {
            for i in 0..(n as usize).min(set.len()) {
                let s = set.get(i)?;
                write(&s, format!("easy_vqa_test_{}.png", s.index))?;
                count += 1;
            }
        }
        Err(e) => eprintln!("easy-VQA skipped: {e}"),
    }
    println!(
        "wrote {count} samples to {} in {:.2} s",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
