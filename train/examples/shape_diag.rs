//! Diagnostic: where a stage-1b run's shape head is right, by split and by source.
//!
//! ```text
//! cargo run --release -p afm-train --example shape_diag -- RUN_DIR [VIEWS]
//! ```
//!
//! Loads `RUN_DIR/vision` and `RUN_DIR/heads.safetensors` (a finished or `--export-now`
//! stage-1b run) and measures the run's own heads on `VIEWS` (default 96) views of scenes
//! and of easy-VQA, from the training split and the held-out split: colour and shape of
//! object patches, and the shape confusion (rows: truth, columns: prediction). A shape head
//! right on training views and wrong on held-out ones has learnt the training sizes, not
//! the shapes.
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::perceive::{
    batch, head_logits, init_params, metrics, patch_features, PerceiveConfig, ViewSource, GRID,
    SHAPES,
};
use afm_train::Split;
use candle_core::D;
use std::collections::HashMap;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = Path::new(
        args.first()
            .map(String::as_str)
            .unwrap_or("runs/perceive-scenes"),
    );
    let views: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(96);
    let root = std::env::current_dir()?;
    let easy_root = data_dir(&root);
    let (easy, easy_eval) = if easy_root.exists() {
        (
            Some(EasyVqa::open(&easy_root, Split::Train)?),
            Some(EasyVqa::open(&easy_root, Split::HeldOut)?),
        )
    } else {
        (None, None)
    };
    let mut cfg = PerceiveConfig::afm_tiny();
    cfg.vision = afm_vision::VisionConfig::from_file(&run.join("vision/config.json"))?;
    let enc = init_params(&cfg, Some(&run.join("vision")), None)?.with_prefix("vision.");
    let heads: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(run.join("heads.safetensors"), &candle_core::Device::Cpu)?;
    for (name, src) in [
        ("scene", ViewSource::Scene),
        ("easy-VQA", ViewSource::EasyVqa),
    ] {
        cfg.sources = vec![src];
        for split in [Split::Train, Split::HeldOut] {
            let e = if split == Split::Train {
                easy.as_ref()
            } else {
                easy_eval.as_ref()
            };
            let mut conf = vec![vec![0usize; SHAPES.len()]; SHAPES.len()];
            let (mut col, mut shp, mut n) = (0f32, 0f32, 0usize);
            let mut done = 0;
            while done < views {
                let k = 24.min(views - done);
                let b = batch(&cfg, split, done as u64, k, e)?;
                let f = patch_features(&cfg.vision, &enc, &b.pixels)?;
                let lg = head_logits(&f, &heads, "head.")?;
                let m = metrics(&lg, &b, &f, false)?;
                col += m.colour_acc;
                shp += m.shape_acc;
                n += 1;
                let pred = lg.shape.argmax(D::Minus1)?.to_vec1::<u32>()?;
                for (i, l) in b.labels.iter().enumerate() {
                    for p in 0..GRID * GRID {
                        let t = l.shape[p] as usize;
                        if t != 0 {
                            conf[t][pred[i * GRID * GRID + p] as usize] += 1;
                        }
                    }
                }
                done += k;
            }
            println!(
                "{name} {}: colour {:.1}%, shape {:.1}% of object patches ({views} views)",
                split.name(),
                100.0 * col / n as f32,
                100.0 * shp / n as f32
            );
            println!("  truth \\ predicted: {}", SHAPES.join(" "));
            for (t, row) in conf.iter().enumerate().skip(1) {
                if row.iter().sum::<usize>() > 0 {
                    println!("  {:>9}: {:?}", SHAPES[t], row);
                }
            }
        }
    }
    Ok(())
}
