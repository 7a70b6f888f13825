//! Diagnostic: can the ViT learn to read the characters of one fixed batch of screen crops?
//!
//! ```text
//! cargo run --release -p afm-train --example text_overfit -- VISION_DIR|fresh [LR] [STEPS] [VIEWS] [SCALE_LO] [SCALE_HI] [DUMP.png]
//! ```
//!
//! Starts from `VISION_DIR` (or a fresh encoder) with fresh heads and trains encoder and
//! heads on the same `VIEWS` (default 24) training-split crops around screen strings, drawn at
//! a scale in `SCALE_LO..SCALE_HI` (default 0.75..1.3, the reading runs' range), for `STEPS`
//! (default 60) steps of AdamW at `LR` (default 3e-4), with the character term only (fixed
//! slots, module docs of `afm_train::perceive`). Every 10 steps it prints the character
//! accuracy and the strings read exactly on those views, and on as many held-out views.
//! `DUMP.png`: writes the first view as the encoder sees it, and prints its character
//! labels patch by patch, to check the labels against the pixels by eye.
//!
//! Fitting one batch says whether the encoder and the labels can carry reading at all; the
//! held-out column says whether what it learns generalises, and how fast.
use afm_train::optim::{AdamW, AdamWConfig};
use afm_train::perceive::{
    batch, class_char, head_logits, init_params, loss, metrics, patch_features, Batch, LossWeights,
    PerceiveConfig, ViewSource, SLOTS,
};
use afm_train::Split;
use std::path::Path;

/// The patch grid's side (224 / 16).
const GRID: usize = 14;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = a.first() else {
        return Err("usage: text_overfit VISION_DIR|fresh [LR] [STEPS] [VIEWS] [SCALE_LO] [SCALE_HI] [DUMP.png]".into());
    };
    let num = |i: usize, d: f64| -> Result<f64, Box<dyn std::error::Error>> {
        Ok(a.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let lr = num(1, 3e-4)?;
    let steps = num(2, 60.0)? as usize;
    let views = num(3, 24.0)? as usize;
    let scale = (num(4, 0.75)? as f32, num(5, 1.3)? as f32);
    let mut cfg = PerceiveConfig::afm_tiny();
    let init = (dir != "fresh").then(|| Path::new(dir));
    if let Some(d) = init {
        cfg.vision = afm_vision::VisionConfig::from_file(&d.join("config.json"))?;
    }
    cfg.sources = vec![ViewSource::ScreenText];
    cfg.scale_range = scale;
    cfg.weights = LossWeights {
        chars: 2.0,
        ..LossWeights::none()
    };
    let params = init_params(&cfg, init, None)?;
    let adamw = AdamWConfig {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(&params, adamw)?;
    let train = batch(&cfg, Split::Train, 0, views, None)?;
    let held = batch(&cfg, Split::HeldOut, 0, views, None)?;
    if let Some(path) = a.get(6) {
        dump(&train, Path::new(path))?;
    }
    let measure = |b: &Batch| -> Result<(f32, f32, f32, usize), Box<dyn std::error::Error>> {
        let all = params.tensors();
        let f = patch_features(&cfg.vision, &params.with_prefix("vision."), &b.pixels)?;
        let lg = head_logits(&f.detach(), &all, "head.")?;
        let l = loss(&cfg.weights, &lg, &b.labels)?.to_scalar::<f32>()?;
        let m = metrics(&lg, b, &f.detach(), false)?;
        Ok((l, m.char_acc, m.string_exact, m.strings))
    };
    let t0 = std::time::Instant::now();
    for step in 0..=steps {
        if step % 10 == 0 || step == steps {
            let (tl, tc, ts, tn) = measure(&train)?;
            let (hl, hc, hs, hn) = measure(&held)?;
            println!(
                "step {step}: fitted batch loss {tl:.3}, characters {:.1}%, strings {:.1}% of {tn} | held-out loss {hl:.3}, characters {:.1}%, strings {:.1}% of {hn} ({:.0} s)",
                100.0 * tc,
                100.0 * ts,
                100.0 * hc,
                100.0 * hs,
                t0.elapsed().as_secs_f32()
            );
        }
        if step < steps {
            let all = params.tensors();
            let f = patch_features(&cfg.vision, &params.with_prefix("vision."), &train.pixels)?;
            let lg = head_logits(&f, &all, "head.")?;
            let g = loss(&cfg.weights, &lg, &train.labels)?.backward()?;
            opt.step(&params, &g, lr)?;
        }
    }
    Ok(())
}

/// Writes view 0 of `b` as a PNG (undoing the encoder's mean 0.5 / std 0.5) and prints its
/// character slots, one line per patch row that holds any, `|` between patches.
fn dump(b: &Batch, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let px = b.pixels.get(0)?.to_dtype(candle_core::DType::F32)?;
    let (c, h, w) = px.dims3()?;
    let v: Vec<f32> = px.flatten_all()?.to_vec1()?;
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let p: Vec<u8> = (0..c)
                .map(|k| ((v[k * h * w + y * w + x] * 0.5 + 0.5) * 255.0).clamp(0.0, 255.0) as u8)
                .collect();
            img.put_pixel(x as u32, y as u32, image::Rgb([p[0], p[1], p[2]]));
        }
    }
    img.save(path)?;
    let l = &b.labels[0];
    for r in 0..GRID {
        let cells: Vec<String> = (0..GRID)
            .map(|col| {
                let base = (r * GRID + col) * SLOTS;
                (0..SLOTS)
                    .filter_map(|s| class_char(l.chars[base + s]))
                    .collect()
            })
            .collect();
        if cells.iter().any(|s| !s.is_empty()) {
            println!("row {r:2}: |{}|", cells.join("|"));
        }
    }
    for (role, text, row, first, last) in &l.strings {
        println!("string (role {role}) {text:?}: row {row}, patches {first}..={last}");
    }
    println!("view 0 written to {}", path.display());
    Ok(())
}
