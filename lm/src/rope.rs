//! Rotary position embeddings, precomputed for the whole context.

use crate::error::{LmError, Result};
use candle_core::{DType, Device, Tensor};

/// cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
    max_positions: usize,
}

impl Rope {
    /// `theta_i = base^(-2i/head_dim)`, angle = position * theta_i.
    pub fn new(
        head_dim: usize,
        base: f64,
        max_positions: usize,
        interleaved: bool,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / base.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), &Device::Cpu)?;
        let t = Tensor::arange(0u32, max_positions as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = t.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            interleaved,
            max_positions,
        })
    }

    /// Rotates `x` whose rows sit at the absolute positions `positions`.
    ///
    /// # Shapes
    /// `x: (1, heads, seq, head_dim)`, `positions.len() == seq`.
    pub fn apply(&self, x: &Tensor, positions: &Positions) -> Result<Tensor> {
        let (cos, sin) = match positions {
            Positions::Range { start, len } => {
                if start + len > self.max_positions {
                    return Err(LmError::Invalid(format!(
                        "position {} is past the context of {} tokens",
                        start + len - 1,
                        self.max_positions
                    )));
                }
                (
                    self.cos.narrow(0, *start, *len)?,
                    self.sin.narrow(0, *start, *len)?,
                )
            }
            Positions::List(ids) => {
                if let Some(&p) = ids.iter().find(|&&p| p as usize >= self.max_positions) {
                    return Err(LmError::Invalid(format!(
                        "position {p} is past the context of {} tokens",
                        self.max_positions
                    )));
                }
                let idx = Tensor::new(ids.as_slice(), &Device::Cpu)?;
                (
                    self.cos.index_select(&idx, 0)?,
                    self.sin.index_select(&idx, 0)?,
                )
            }
        };
        let x = x.contiguous()?;
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        })
    }
}

/// Absolute positions of the query rows in a forward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positions {
    /// `start, start+1, ..., start+len-1`.
    Range { start: usize, len: usize },
    /// Arbitrary ascending positions (block 2 run on selected rows only).
    List(Vec<u32>),
}

impl Positions {
    pub fn len(&self) -> usize {
        match self {
            Positions::Range { len, .. } => *len,
            Positions::List(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Positions::Range { start, len } => (*start as u32..(*start + *len) as u32).collect(),
            Positions::List(v) => v.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rotates_adjacent_pairs_and_halves_rotates_halves() {
        // head_dim 4, position 1: angles (1, 1/sqrt(base)) for pair 0 and pair 1.
        let base = 100.0f64;
        let x = Tensor::new(&[[[[1f32, 2., 3., 4.]]]], &Device::Cpu).unwrap();
        let pos = Positions::Range { start: 1, len: 1 };
        let a0 = 1.0f32;
        let a1 = (1.0 / base.powf(0.5)) as f32;
        let ri = Rope::new(4, base, 4, true)
            .unwrap()
            .apply(&x, &pos)
            .unwrap();
        let ri: Vec<f32> = ri.flatten_all().unwrap().to_vec1().unwrap();
        let want_i = [
            1. * a0.cos() - 2. * a0.sin(),
            1. * a0.sin() + 2. * a0.cos(),
            3. * a1.cos() - 4. * a1.sin(),
            3. * a1.sin() + 4. * a1.cos(),
        ];
        let rh = Rope::new(4, base, 4, false)
            .unwrap()
            .apply(&x, &pos)
            .unwrap();
        let rh: Vec<f32> = rh.flatten_all().unwrap().to_vec1().unwrap();
        let want_h = [
            1. * a0.cos() - 3. * a0.sin(),
            2. * a1.cos() - 4. * a1.sin(),
            3. * a0.cos() + 1. * a0.sin(),
            4. * a1.cos() + 2. * a1.sin(),
        ];
        for i in 0..4 {
            assert!(
                (ri[i] - want_i[i]).abs() < 1e-5,
                "interleaved {ri:?} vs {want_i:?}"
            );
            assert!(
                (rh[i] - want_h[i]).abs() < 1e-5,
                "halves {rh:?} vs {want_h:?}"
            );
        }
    }

    #[test]
    fn position_past_context_is_an_error() {
        let r = Rope::new(4, 100.0, 4, true).unwrap();
        let x = Tensor::zeros((1, 1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(r.apply(&x, &Positions::Range { start: 3, len: 2 }).is_err());
    }
}
