//! Seeded random-weight vision towers in the documented layout (tests, benchmarks, and the
//! starting point of training).

use crate::config::VisionConfig;
use crate::error::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// A small deterministic generator (SplitMix64) so fixtures do not depend on a crate's
/// version of its random streams.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn uniform(rng: &mut SplitMix, shape: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| offset + scale * rng.next()).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Every tensor of `cfg`, named `vision_model.…` as a SiglipVisionModel saves them.
pub fn random_tensors(cfg: &VisionConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    cfg.validate()?;
    let mut rng = SplitMix(seed);
    let (d, i, c, p, g) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_channels,
        cfg.patch_size,
        cfg.grid(),
    );
    let mut m = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        m.insert(format!("vision_model.{name}"), t);
    };
    let w = 0.08f32;
    put(
        "embeddings.patch_embedding.weight".into(),
        uniform(&mut rng, &[d, c, p, p], w, 0.0)?,
    );
    put(
        "embeddings.patch_embedding.bias".into(),
        uniform(&mut rng, &[d], w, 0.0)?,
    );
    put(
        "embeddings.position_embedding.weight".into(),
        uniform(&mut rng, &[g * g, d], 0.5, 0.0)?,
    );
    if cfg.num_registers() > 0 {
        put(
            "embeddings.register_tokens".into(),
            uniform(&mut rng, &[cfg.num_registers(), d], 0.5, 0.0)?,
        );
    }
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("encoder.layers.{l}");
        for ln in ["layer_norm1", "layer_norm2"] {
            put(
                format!("{pre}.{ln}.weight"),
                uniform(&mut rng, &[d], 0.1, 1.0)?,
            );
            put(
                format!("{pre}.{ln}.bias"),
                uniform(&mut rng, &[d], 0.1, 0.0)?,
            );
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(
                format!("{pre}.self_attn.{proj}.weight"),
                uniform(&mut rng, &[d, d], w, 0.0)?,
            );
            put(
                format!("{pre}.self_attn.{proj}.bias"),
                uniform(&mut rng, &[d], w, 0.0)?,
            );
        }
        put(
            format!("{pre}.mlp.fc1.weight"),
            uniform(&mut rng, &[i, d], w, 0.0)?,
        );
        put(
            format!("{pre}.mlp.fc1.bias"),
            uniform(&mut rng, &[i], w, 0.0)?,
        );
        put(
            format!("{pre}.mlp.fc2.weight"),
            uniform(&mut rng, &[d, i], w, 0.0)?,
        );
        put(
            format!("{pre}.mlp.fc2.bias"),
            uniform(&mut rng, &[d], w, 0.0)?,
        );
    }
    put(
        "post_layernorm.weight".into(),
        uniform(&mut rng, &[d], 0.1, 1.0)?,
    );
    put(
        "post_layernorm.bias".into(),
        uniform(&mut rng, &[d], 0.1, 0.0)?,
    );
    Ok(m)
}
