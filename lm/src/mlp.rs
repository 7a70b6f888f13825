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
        let mut h = vec![0f32; t * inner];
        for (row, hr) in gu.chunks_exact(2 * inner).zip(h.chunks_exact_mut(inner)) {
            let (g, u) = row.split_at(inner);
            silu_mul(g, u, hr);
        }
        self.down.forward(&h, t)
    }
}

/// `h = silu(g) * u = g / (1 + exp(-g)) * u`, with [`crate::kernels::exp`] (plain arithmetic
/// that vectorises), compiled for the level in use ([`crate::isa::vectorized`]: ymm at AVX2,
/// zmm at AVX-512), the same numbers at every level. With the C library's `expf`, one value at
/// a time, this was about a twentieth of a 4-sequence decode step, run on one thread while the
/// other waited; at AVX2 width on an AVX-512 CPU it was 1.1% of the 3.1B model's decode (0.6% at
/// AVX-512 width, `perf` on an Intel Xeon).
///
/// # Shapes
/// `g, u, h: (inner)`.
fn silu_mul(g: &[f32], u: &[f32], h: &mut [f32]) {
    crate::isa::vectorized(
        #[inline(always)]
        || silu_mul_body(g, u, h),
    )
}

#[inline(always)]
fn silu_mul_body(g: &[f32], u: &[f32], h: &mut [f32]) {
    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
        *h = g / (1.0 + crate::kernels::exp(-g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SiLU at every level gives the same numbers as the plain loop, and stays within a
    /// few units in the last place of the C library's `expf` version.
    #[test]
    fn silu_mul_is_the_same_at_every_level_and_close_to_libm() {
        let g: Vec<f32> = (0..3001)
            .map(|i| (i as f32 - 1500.0) * 0.0137)
            .chain([-100.0, 100.0, 0.0, -0.0])
            .collect();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i as f32) * 0.77).sin()).collect();
        let mut fast = vec![0f32; g.len()];
        silu_mul(&g, &u, &mut fast);
        let mut plain = vec![0f32; g.len()];
        silu_mul_body(&g, &u, &mut plain);
        assert_eq!(
            fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        for ((&f, &g), &u) in fast.iter().zip(&g).zip(&u) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (f - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1e-30),
                "{g}: {f} vs {want}"
            );
        }
    }
}
