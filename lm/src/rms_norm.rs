//! RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`.

use crate::error::Result;
use crate::weights::WeightSource;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn load(src: &WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(src.tensor(name, &[dim])?, eps))
    }

    /// # Shapes
    /// `(..., dim) -> (..., dim)`; normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }
}
