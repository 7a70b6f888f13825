//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, no biases.

use crate::error::Result;
use crate::weights::WeightSource;
use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

impl Mlp {
    /// Loads `{prefix}.gate_proj.weight`, `{prefix}.up_proj.weight`, `{prefix}.down_proj.weight`.
    pub fn load(src: &WeightSource, prefix: &str, hidden: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            gate: src.matrix(&format!("{prefix}.gate_proj.weight"), inner, hidden)?,
            up: src.matrix(&format!("{prefix}.up_proj.weight"), inner, hidden)?,
            down: src.matrix(&format!("{prefix}.down_proj.weight"), hidden, inner)?,
        })
    }

    /// # Shapes
    /// `(1, t, hidden) -> (1, t, hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        let u = self.up.forward(x)?;
        Ok(self.down.forward(&(g * u)?)?)
    }
}
