//! RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`.

use crate::error::{LmError, Result};
use crate::weights::WeightSource;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Vec<f32>, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn load(src: &WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(src.tensor(name, &[dim])?.to_vec1::<f32>()?, eps))
    }

    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// Normalises every `dim`-long row of `x` into `out`.
    ///
    /// # Shapes
    /// `x: (rows, dim) -> out: (rows, dim)`, row-major.
    pub fn forward_into(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let d = self.weight.len();
        if !x.len().is_multiple_of(d) || out.len() != x.len() {
            return Err(LmError::Invalid(format!(
                "rms-norm over {d} values got {} inputs",
                x.len()
            )));
        }
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let ss = sum_of_squares(xr);
            let scale = 1.0 / (ss / d as f32 + self.eps).sqrt();
            for ((o, v), w) in or.iter_mut().zip(xr).zip(&self.weight) {
                *o = v * scale * w;
            }
        }
        Ok(())
    }

    /// # Shapes
    /// `(rows, dim) -> (rows, dim)`.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        self.forward_into(x, &mut out)?;
        Ok(out)
    }

    /// In place.
    pub fn forward_inplace(&self, x: &mut [f32]) -> Result<()> {
        let d = self.weight.len();
        if !x.len().is_multiple_of(d) {
            return Err(LmError::Invalid(format!(
                "rms-norm over {d} values got {} inputs",
                x.len()
            )));
        }
        for xr in x.chunks_exact_mut(d) {
            let ss = sum_of_squares(xr);
            let scale = 1.0 / (ss / d as f32 + self.eps).sqrt();
            for (v, w) in xr.iter_mut().zip(&self.weight) {
                *v = *v * scale * w;
            }
        }
        Ok(())
    }
}

/// `sum(x^2)` in 16 lanes (then the lanes in order, then the tail): a sum in one chain is
/// one dependent add per value that the compiler may not reorder, so it ran scalar (about 2%
/// of a 4-row decode step, on one thread while the other waited).
fn sum_of_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in chunks.remainder() {
        s += v * v;
    }
    s
}
