//! Patch embedding (a stride-`p` convolution, computed as a matmul over flattened patches)
//! plus learned position embeddings, resized bicubically for grids other than the trained one,
//! as transformers' SigLIP `interpolate_pos_encoding` does. With a convolutional stem
//! (`stem.rs`) the patch embedding covers `p / 2^n` pixels of the stem's output instead.

use crate::config::VisionConfig;
use crate::error::{Result, VisionError};
use crate::stem::ConvStem;
use crate::weights::VisionWeights;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct Embeddings {
    /// The convolutional stem, if the config has one.
    stem: Option<ConvStem>,
    /// The image's patch side (the stem's output patch is `patch >> stem.len()`).
    image_patch: usize,
    /// Image channels.
    image_channels: usize,
    /// `(hidden, channels * p * p)`, flattened from the conv weight `(hidden, c, p, p)`
    /// (`c`, `p` after the stem).
    patch_w: Tensor,
    patch_b: Tensor,
    /// `(grid * grid, hidden)`
    pos: Tensor,
    grid: usize,
    patch: usize,
    /// Resized position tables per `(rows, cols)` grid.
    resized: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl Embeddings {
    /// Loads `embeddings.patch_embedding.weight (hidden, c, p, p)`,
    /// `embeddings.patch_embedding.bias (hidden)` and
    /// `embeddings.position_embedding.weight (grid^2, hidden)`; with a stem, its weights and
    /// a patch embedding over its output (`(hidden, c_last, p / 2^n, p / 2^n)`).
    pub fn load(w: &VisionWeights, cfg: &VisionConfig) -> Result<Self> {
        let (d, g) = (cfg.hidden_size, cfg.grid());
        let (c, p) = cfg.embed_input();
        let stem = match &cfg.stem {
            Some(ch) => Some(ConvStem::load(w, cfg.num_channels, ch)?),
            None => None,
        };
        let conv = w.get("embeddings.patch_embedding.weight", &[d, c, p, p])?;
        Ok(Self {
            stem,
            image_patch: cfg.patch_size,
            image_channels: cfg.num_channels,
            patch_w: conv.reshape((d, c * p * p))?,
            patch_b: w.get("embeddings.patch_embedding.bias", &[d])?,
            pos: w.get("embeddings.position_embedding.weight", &[g * g, d])?,
            grid: g,
            patch: p,
            resized: Mutex::new(HashMap::new()),
        })
    }

    /// # Shapes
    /// `pixels: (b, c, h, w)` with `h`, `w` multiples of the patch -> `(b, (h/p)*(w/p), hidden)`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        let ip = self.image_patch;
        if c != self.image_channels || h % ip != 0 || w % ip != 0 || h == 0 || w == 0 {
            return Err(VisionError::Invalid(format!(
                "pixels {:?}: need {} channels and sides that are positive multiples of the patch {ip}",
                pixels.dims(),
                self.image_channels
            )));
        }
        let x = match &self.stem {
            Some(s) => s.forward(pixels)?,
            None => pixels.clone(),
        };
        let pixels = &x;
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let x = patches
            .matmul(&self.patch_w.t()?)?
            .broadcast_add(&self.patch_b)?;
        let x = x.reshape((b, gh * gw, ()))?;
        let pos = self.position_table(gh, gw)?;
        Ok(x.broadcast_add(&pos)?)
    }

    /// The position table for a `gh x gw` grid.
    pub fn position_table(&self, gh: usize, gw: usize) -> Result<Tensor> {
        if (gh, gw) == (self.grid, self.grid) {
            return Ok(self.pos.clone());
        }
        let mut cache = self.resized.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&(gh, gw)) {
            return Ok(t.clone());
        }
        let d = self.pos.dim(1)?;
        let src: Vec<f32> = self.pos.flatten_all()?.to_vec1()?;
        let out = bicubic_resize(&src, self.grid, self.grid, d, gh, gw);
        let t = Tensor::from_vec(out, (gh * gw, d), &Device::Cpu)?;
        cache.insert((gh, gw), t.clone());
        Ok(t)
    }
}

/// PyTorch's cubic convolution weights (A = -0.75) for fractional offset `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Source index and weights for each output index, `align_corners = false`.
fn taps(inp: usize, out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|i| {
            let src = (i as f32 + 0.5) * scale - 0.5;
            let x0 = src.floor();
            let w = cubic_weights(src - x0);
            let idx = [-1i64, 0, 1, 2].map(|o| (x0 as i64 + o).clamp(0, inp as i64 - 1) as usize);
            (idx, w)
        })
        .collect()
}

/// Resizes a `(h, w, d)` grid (row-major, channels last) to `(oh, ow, d)` with bicubic
/// interpolation as `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`.
pub fn bicubic_resize(src: &[f32], h: usize, w: usize, d: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    // rows first: (oh, w, d)
    let mut tmp = vec![0f32; oh * w * d];
    for (oy, (iy, wy)) in ty.iter().enumerate() {
        for x in 0..w {
            let o = &mut tmp[(oy * w + x) * d..(oy * w + x + 1) * d];
            for k in 0..4 {
                let s = &src[(iy[k] * w + x) * d..(iy[k] * w + x + 1) * d];
                for (a, b) in o.iter_mut().zip(s) {
                    *a += wy[k] * b;
                }
            }
        }
    }
    let mut out = vec![0f32; oh * ow * d];
    for y in 0..oh {
        for (ox, (ix, wx)) in tx.iter().enumerate() {
            let o = &mut out[(y * ow + ox) * d..(y * ow + ox + 1) * d];
            for k in 0..4 {
                let s = &tmp[(y * w + ix[k]) * d..(y * w + ix[k] + 1) * d];
                for (a, b) in o.iter_mut().zip(s) {
                    *a += wx[k] * b;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity_and_weights_sum_to_one() {
        let src: Vec<f32> = (0..3 * 4 * 2).map(|i| i as f32).collect();
        assert_eq!(bicubic_resize(&src, 3, 4, 2, 3, 4), src);
        for t in [0.0, 0.25, 0.5, 0.9] {
            let s: f32 = cubic_weights(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
        // a constant grid stays constant at any size
        let c = vec![2.5f32; 4 * 4];
        assert!(bicubic_resize(&c, 4, 4, 1, 7, 3)
            .iter()
            .all(|v| (v - 2.5).abs() < 1e-5));
    }
}
