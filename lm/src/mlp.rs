//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, no biases.

use crate::error::Result;
use crate::weights::WeightSource;
use crate::linear::{Fused, Linear};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate and up, one fused matmul when their formats match.
    gate_up: Fused,
    down: Linear,
}

impl Mlp {
    /// Loads `{prefix}.gate_proj.weight`, `{prefix}.up_proj.weight`, `{prefix}.down_proj.weight`.
    pub fn load(src: &WeightSource, prefix: &str, hidden: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            gate_up: Fused::new(vec![
                (src.matrix(&format!("{prefix}.gate_proj.weight"), inner, hidden)?, inner),
                (src.matrix(&format!("{prefix}.up_proj.weight"), inner, hidden)?, inner),
            ])?,
            down: src.matrix(&format!("{prefix}.down_proj.weight"), hidden, inner)?,
        })
    }

    /// # Shapes
    /// `(1, t, hidden) -> (1, t, hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let g = candle_nn::ops::silu(&gu[0])?;
        self.down.forward(&(g * &gu[1])?)
    }
}
