//! The Idefics3 / SmolVLM connector (token-space pixel shuffle, then a linear projection), one
//! implementation of [`VisionAdapter`].

use crate::adapter::VisionAdapter;
use crate::error::{FusionError, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// Idefics3's connector: pixel shuffle by `scale` in token space (each `scale x scale` block
/// of patch features becomes one feature `scale^2` times as wide, in transformers' order),
/// then `modality_projection.proj` (no bias).
pub struct PixelShuffleConnector {
    scale: usize,
    /// `(vision_hidden * scale^2, lm_hidden)`, transposed from the stored `(out, in)`.
    proj_t: Tensor,
}

impl PixelShuffleConnector {
    /// Loads `{prefix}modality_projection.proj.weight (lm_hidden, vision_hidden * scale^2)`,
    /// with `prefix` = `model.connector.` in Idefics3 checkpoints.
    pub fn load(
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        scale: usize,
        vision_hidden: usize,
        lm_hidden: usize,
    ) -> Result<Self> {
        let name = format!("{prefix}modality_projection.proj.weight");
        let w = tensors
            .get(&name)
            .ok_or_else(|| FusionError::MissingTensor { name: name.clone() })?;
        let want = [lm_hidden, vision_hidden * scale * scale];
        if w.dims() != want {
            return Err(FusionError::ShapeMismatch {
                name,
                expected: want.to_vec(),
                got: w.dims().to_vec(),
            });
        }
        let w = afm_lm::weights::float_weight(w).map_err(|reason| {
            FusionError::Lm(afm_lm::LmError::BadTensor {
                name: name.clone(),
                reason,
            })
        })?;
        Ok(Self {
            scale,
            proj_t: w.t()?.contiguous()?,
        })
    }

    /// The pixel shuffle alone.
    ///
    /// # Shapes
    /// `x: (b, h*w, d)` -> `(b, h*w / s^2, d * s^2)`.
    pub fn pixel_shuffle(&self, x: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let (b, seq, d) = x.dims3()?;
        let (h, w) = grid;
        let s = self.scale;
        if h * w != seq || h % s != 0 || w % s != 0 {
            return Err(FusionError::Invalid(format!(
                "pixel shuffle by {s} needs a grid divisible by {s}; got {h}x{w} for {seq} tokens"
            )));
        }
        // transformers: view(b, h, w/s, d*s) -> permute(0,2,1,3) -> reshape(b, w/s, h/s, d*s*s)
        // -> permute(0,2,1,3) -> reshape(b, seq/s^2, d*s^2)
        Ok(x.reshape((b, h, w / s, d * s))?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b, w / s, h / s, d * s * s))?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b, seq / (s * s), d * s * s))?)
    }
}

impl VisionAdapter for PixelShuffleConnector {
    fn tokens_per_tile(&self, grid: (usize, usize)) -> Result<usize> {
        let s = self.scale;
        if !grid.0.is_multiple_of(s) || !grid.1.is_multiple_of(s) {
            return Err(FusionError::Invalid(format!(
                "a {}x{} patch grid does not divide by the pixel-shuffle factor {s}",
                grid.0, grid.1
            )));
        }
        Ok(grid.0 / s * (grid.1 / s))
    }

    fn forward(&self, x: &Tensor, grid: (usize, usize), registers: usize) -> Result<Tensor> {
        let x = x.narrow(1, registers, x.dim(1)? - registers)?;
        let y = self.pixel_shuffle(&x, grid)?;
        let (b, t, k) = y.dims3()?;
        Ok(y.reshape((b * t, k))?
            .matmul(&self.proj_t)?
            .reshape((b, t, ()))?)
    }
}
