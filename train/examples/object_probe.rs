//! Probe: does a ViT know an object's shape when its patches are taken together?
//!
//! ```text
//! cargo run --release -p afm-train --example object_probe -- VISION_DIR [TRAIN] [TEST]
//! ```
//!
//! A per-patch shape head asks every patch of an object for its shape, the flat inside of a
//! large shape included; scene questions need the shape of each object. So this probe pools
//! the encoder's patch features over each object group of a view (the patches whose
//! colour and shape labels are the same) and fits linear softmax probes
//! ([`afm_train::linprobe`]) for the group's shape and colour on `TRAIN` (default 480)
//! training views, and measures them on `TEST` (default 240) unseen views of the training split (its sizes) and of the held-out split (other
//! canvas sizes, larger shapes). Prints accuracy with the majority class as the floor.
use afm_train::linprobe::linear_probe;
use afm_train::perceive::{batch, init_params, patch_features, PerceiveConfig, ViewSource, GRID};
use afm_train::perceive::{COLOURS, SHAPES};
use afm_train::Split;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

type Groups = (Vec<Vec<f32>>, Vec<u32>, Vec<u32>);

/// Pooled features of every (colour, shape) group of `views` views, with their labels.
fn groups(
    cfg: &PerceiveConfig,
    enc: &std::collections::HashMap<String, Tensor>,
    split: Split,
    start: u64,
    views: usize,
) -> Result<Groups, Box<dyn std::error::Error>> {
    let (mut feats, mut shape, mut colour) = (vec![], vec![], vec![]);
    let mut done = 0;
    while done < views {
        let k = 24.min(views - done);
        let b = batch(cfg, split, start + done as u64, k, None)?;
        let f = patch_features(&cfg.vision, enc, &b.pixels)?;
        let d = f.dim(1)?;
        let f: Vec<f32> = f.flatten_all()?.to_vec1()?;
        for (i, l) in b.labels.iter().enumerate() {
            let mut g: BTreeMap<(u32, u32), (Vec<f32>, usize)> = BTreeMap::new();
            for p in 0..GRID * GRID {
                if l.shape[p] == 0 {
                    continue;
                }
                let e = g
                    .entry((l.colour[p], l.shape[p]))
                    .or_insert((vec![0f32; d], 0));
                let row = &f[(i * GRID * GRID + p) * d..(i * GRID * GRID + p + 1) * d];
                e.0.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                e.1 += 1;
            }
            for ((c, s), (sum, n)) in g {
                feats.push(sum.iter().map(|x| x / n as f32).collect());
                colour.push(c);
                shape.push(s);
            }
        }
        done += k;
    }
    Ok((feats, shape, colour))
}

/// Accuracy of a linear probe fitted on `train` and measured on `test`, and the floor.
fn fit(
    train: &[Vec<f32>],
    ytr: &[u32],
    test: &[Vec<f32>],
    yte: &[u32],
    classes: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let d = train[0].len();
    let to = |x: &[Vec<f32>]| Tensor::from_vec(x.concat(), (x.len(), d), &Device::Cpu);
    Ok(linear_probe(&to(train)?, ytr, &to(test)?, yte, classes)?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = a.first() else {
        return Err("usage: object_probe VISION_DIR [TRAIN] [TEST]".into());
    };
    let ntr: usize = a.get(1).map(|s| s.parse()).transpose()?.unwrap_or(480);
    let nte: usize = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(240);
    let dir = Path::new(dir);
    let mut cfg = PerceiveConfig::afm_tiny();
    cfg.vision = afm_vision::VisionConfig::from_file(&dir.join("config.json"))?;
    cfg.sources = vec![ViewSource::Scene];
    let enc = init_params(&cfg, Some(dir), None)?.with_prefix("vision.");
    let (ftr, str_, ctr) = groups(&cfg, &enc, Split::Train, 0, ntr)?;
    // later training-split scenes (the training sizes, unseen images) and the held-out split
    // (other canvas sizes and larger shapes)
    for (name, split, start) in [
        ("unseen training-split", Split::Train, 1_000_000),
        ("held-out", Split::HeldOut, 0),
    ] {
        let (fte, ste, cte) = groups(&cfg, &enc, split, start, nte)?;
        let (s, sf) = fit(&ftr, &str_, &fte, &ste, SHAPES.len())?;
        let (c, cf) = fit(&ftr, &ctr, &fte, &cte, COLOURS.len())?;
        println!(
            "{}: scene object groups, {} training / {} {name}: shape {:.1}% (floor {:.1}%), colour {:.1}% (floor {:.1}%)",
            dir.display(),
            ftr.len(),
            fte.len(),
            100.0 * s,
            100.0 * sf,
            100.0 * c,
            100.0 * cf
        );
    }
    Ok(())
}
