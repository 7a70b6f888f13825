//! Diagnostic: can the ViT learn the shapes of one fixed batch of scenes at all?
//!
//! ```text
//! cargo run --release -p afm-train --example shape_overfit -- VISION_DIR [LR] [STEPS] [VIEWS]
//! ```
//!
//! Starts from `VISION_DIR` with fresh heads and trains encoder and heads on the same
//! `VIEWS` (default 24) training-split scene views for `STEPS` (default 60) steps of AdamW at
//! `LR` (default 1e-4), with the shape and object terms only. Prints the per-patch and
//! per-object shape accuracy on those views every 10 steps. A model that cannot fit one
//! batch has a problem that more data will not fix.
use afm_train::optim::{AdamW, AdamWConfig};
use afm_train::perceive::{
    batch, head_logits, init_params, loss, metrics, patch_features, LossWeights, PerceiveConfig,
    ViewSource,
};
use afm_train::Split;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = a.first() else {
        return Err("usage: shape_overfit VISION_DIR [LR] [STEPS] [VIEWS]".into());
    };
    let lr: f64 = a.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1e-4);
    let steps: usize = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(60);
    let views: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(24);
    let dir = Path::new(dir);
    let mut cfg = PerceiveConfig::afm_tiny();
    cfg.vision = afm_vision::VisionConfig::from_file(&dir.join("config.json"))?;
    cfg.sources = vec![ViewSource::Scene];
    cfg.weights = LossWeights {
        shape: 1.0,
        background: 0.2,
        objects: 2.0,
        ..LossWeights::none()
    };
    let params = init_params(&cfg, Some(dir), None)?;
    let adamw = AdamWConfig {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(&params, adamw)?;
    let b = batch(&cfg, Split::Train, 0, views, None)?;
    for step in 0..=steps {
        let all = params.tensors();
        let f = patch_features(&cfg.vision, &params.with_prefix("vision."), &b.pixels)?;
        let lg = head_logits(&f, &all, "head.")?;
        let l = loss(&cfg.weights, &lg, &b.labels)?;
        if step % 10 == 0 {
            let m = metrics(&lg, &b, &f.detach(), false)?;
            println!(
                "step {step}: loss {:.3}, shape {:.1}% of patches, {:.1}% of objects",
                l.to_scalar::<f32>()?,
                100.0 * m.shape_acc,
                100.0 * m.object_shape_acc
            );
        }
        if step < steps {
            let g = l.backward()?;
            opt.step(&params, &g, lr)?;
        }
    }
    Ok(())
}
