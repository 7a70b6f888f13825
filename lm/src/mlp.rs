//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, no biases.

use crate::error::Result;
use crate::linear::Fused;
use crate::weights::WeightSource;

#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate and up, one fused matmul when their formats match.
    gate_up: Fused,
    down: Fused,
}

impl Mlp {
    /// Weight bytes one token's step reads.
    pub fn bytes_read(&self) -> usize {
        self.gate_up.bytes_read() + self.down.bytes_read()
    }

    /// [`crate::linear::Linear::set_int8`] on gate, up and down.
    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        self.gate_up.set_int8(on)?;
        self.down.set_int8(on)
    }

    /// Loads `{prefix}.gate_proj.weight`, `{prefix}.up_proj.weight`, `{prefix}.down_proj.weight`.
    pub fn load(src: &WeightSource, prefix: &str, hidden: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            gate_up: Fused::new(vec![
                (
                    src.projection(&format!("{prefix}.gate_proj.weight"), inner, hidden)?,
                    inner,
                ),
                (
                    src.projection(&format!("{prefix}.up_proj.weight"), inner, hidden)?,
                    inner,
                ),
            ])?,
            down: Fused::new(vec![(
                src.projection(&format!("{prefix}.down_proj.weight"), hidden, inner)?,
                hidden,
            )])?,
        })
    }

    /// The gate/up and down matrices, for LoRA ([`crate::lora::mlp_sites`] lists their parts
    /// in the same order).
    pub(crate) fn lora_fused(&mut self) -> [&mut Fused; 2] {
        [&mut self.gate_up, &mut self.down]
    }

    /// # Shapes
    /// `x: (t, hidden) -> (t, hidden)`.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        let gu = self.gate_up.forward(x, t)?;
        let inner = self.gate_up.outs()[0];
        let mut h = Vec::with_capacity(t * inner);
        for row in gu.chunks_exact(2 * inner) {
            let (g, u) = row.split_at(inner);
            h.extend(g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
        }
        self.down.forward(&h, t)
    }
}
