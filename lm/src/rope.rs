//! Rotary position embeddings: cos/sin tables precomputed for the first positions of the
//! context (at most [`TABLE_POSITIONS`]), computed on the fly, with the same arithmetic,
//! past them, so a huge configured context costs no memory until it is used.

use crate::error::{LmError, Result};

/// Positions whose angles are tabulated up front (8192 x 32 pairs = 2 MiB for head_dim 64).
pub const TABLE_POSITIONS: usize = 8192;

/// cos/sin tables for positions `0..min(max_positions, TABLE_POSITIONS)`; later positions
/// up to `max_positions` are computed when applied.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `theta_i`, `(head_dim / 2,)`
    inv: Vec<f32>,
    /// `(table positions, head_dim / 2)`
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
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
        let table = max_positions.min(TABLE_POSITIONS);
        let mut cos = Vec::with_capacity(table * half);
        let mut sin = Vec::with_capacity(table * half);
        for p in 0..table {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            inv,
            cos,
            sin,
            half,
            interleaved,
            max_positions,
        })
    }

    /// Rotates, in place, `rows` of `heads` vectors of `head_dim`; row `i` is at absolute
    /// position `positions[i]`.
    ///
    /// # Shapes
    /// `x: (rows, heads, head_dim)`, `positions.len() == rows`.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[usize]) -> Result<()> {
        let d = 2 * self.half;
        if x.len() != positions.len() * heads * d {
            return Err(LmError::Invalid(format!(
                "rope: {} values for {} rows x {heads} heads x {d}",
                x.len(),
                positions.len()
            )));
        }
        for (row, &p) in x.chunks_exact_mut(heads * d).zip(positions) {
            if p >= self.max_positions {
                return Err(LmError::Invalid(format!(
                    "position {p} is past the context of {} tokens",
                    self.max_positions
                )));
            }
            let (mut cb, mut sb) = (Vec::new(), Vec::new());
            let (c, s) = if (p + 1) * self.half <= self.cos.len() {
                (
                    &self.cos[p * self.half..(p + 1) * self.half],
                    &self.sin[p * self.half..(p + 1) * self.half],
                )
            } else {
                // past the table: the same angles, computed now
                for f in &self.inv {
                    let a = p as f32 * f;
                    cb.push(a.cos());
                    sb.push(a.sin());
                }
                (&cb[..], &sb[..])
            };
            for hv in row.chunks_exact_mut(d) {
                if self.interleaved {
                    for i in 0..self.half {
                        let (a, b) = (hv[2 * i], hv[2 * i + 1]);
                        hv[2 * i] = a * c[i] - b * s[i];
                        hv[2 * i + 1] = a * s[i] + b * c[i];
                    }
                } else {
                    for i in 0..self.half {
                        let (a, b) = (hv[i], hv[i + self.half]);
                        hv[i] = a * c[i] - b * s[i];
                        hv[i + self.half] = a * s[i] + b * c[i];
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rotates_adjacent_pairs_and_halves_rotates_halves() {
        // head_dim 4, position 1: angles (1, 1/sqrt(base)) for pair 0 and pair 1.
        let base = 100.0f64;
        let a0 = 1.0f32;
        let a1 = (1.0 / base.powf(0.5)) as f32;
        let mut ri = vec![1f32, 2., 3., 4.];
        Rope::new(4, base, 4, true)
            .unwrap()
            .apply(&mut ri, 1, &[1])
            .unwrap();
        let want_i = [
            1. * a0.cos() - 2. * a0.sin(),
            1. * a0.sin() + 2. * a0.cos(),
            3. * a1.cos() - 4. * a1.sin(),
            3. * a1.sin() + 4. * a1.cos(),
        ];
        let mut rh = vec![1f32, 2., 3., 4.];
        Rope::new(4, base, 4, false)
            .unwrap()
            .apply(&mut rh, 1, &[1])
            .unwrap();
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
    fn positions_past_the_table_match_the_tabulated_formula() {
        // a huge context allocates only the table
        let big = Rope::new(64, 10000.0, 1 << 40, true).unwrap();
        assert_eq!(big.cos.len(), TABLE_POSITIONS * 32);
        let small = Rope::new(64, 10000.0, TABLE_POSITIONS + 10, true).unwrap();
        let p = TABLE_POSITIONS + 5;
        let mut x: Vec<f32> = (0..64).map(|i| i as f32 * 0.1 - 3.0).collect();
        let mut y = x.clone();
        big.apply(&mut x, 1, &[p]).unwrap();
        // reference: the table entry a full-length table would hold
        let half = 32;
        for i in 0..half {
            let a = p as f32 * small.inv[i];
            let (c, s) = (a.cos(), a.sin());
            let (u, v) = (y[2 * i], y[2 * i + 1]);
            y[2 * i] = u * c - v * s;
            y[2 * i + 1] = u * s + v * c;
        }
        assert_eq!(x, y);
        assert!(small.apply(&mut x, 1, &[TABLE_POSITIONS + 10]).is_err());
    }

    #[test]
    fn position_past_context_is_an_error() {
        let r = Rope::new(4, 100.0, 4, true).unwrap();
        assert!(r.apply(&mut [0f32; 8], 1, &[3, 4]).is_err());
        assert!(r.apply(&mut [0f32; 7], 1, &[1, 2]).is_err());
    }
}
