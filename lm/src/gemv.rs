//! A few activation rows times a dense f32 matrix stored `(in, out)` row-major
//! ([`crate::linear::Linear::Dense`]): the decode step of f32 checkpoints (SmolVLM's language
//! model, SmolLM2 from safetensors).
//!
//! gemm (candle's f32 matmul) runs a one-row product through its general blocked path, and
//! a decode step is all such products: SmolVLM-256M's f32 decode read its 538 MB of weights
//! per token at about 13.6 GB/s on an Intel Xeon whose memory gives 29 (`perf`: 74% of the
//! time in gemm). Here each task streams whole rows of the matrix: rows `i0 .. i0 + ROWS` and
//! a chunk of columns, summed into a partial row that stays in L1; the partial rows of a
//! chunk are then added in the order of their rows.
//!
//! The order of the sums depends only on the shapes, never on the thread count: every output
//! is `((p_0 + p_1) + ...) + p_last`, where `p_b` sums `x[i] * w[i][j]` over block `b`'s rows
//! in order, from 0. Products and sums are rounded one at a time (no fused multiply-add).

use crate::par::par_chunks_mut;
use std::ops::Range;

/// Rows of the matrix one task sums (one partial row per block of them): the partial rows
/// cost 2 x 4 bytes per output and block against 4 x `ROWS` bytes of weights, about 3%.
const ROWS: usize = 64;

/// The widest chunk of columns one task takes (4 KiB of each weight row).
const MAX_COLS: usize = 1024;

/// The largest reduction of partial rows (values added) the calling thread does alone.
const SERIAL_REDUCE: usize = 1 << 15;

/// `x @ w` for `m` activation rows.
///
/// # Shapes
/// `x: (m, inp)`, `w: (inp, out)` row-major -> `(m, out)`.
///
/// # Panics
/// When the slices are not `m * inp` and `inp * out` long.
pub fn matmul(x: &[f32], m: usize, w: &[f32], inp: usize, out: usize) -> Vec<f32> {
    assert!(
        x.len() == m * inp && w.len() == inp * out,
        "gemv: x has {} values for ({m}, {inp}), w {} for ({inp}, {out})",
        x.len(),
        w.len()
    );
    if m == 0 || out == 0 || inp == 0 {
        return vec![0.0; m * out];
    }
    // at least four chunks of columns, for two threads' claims to even out
    let cw = out.div_ceil(4).next_multiple_of(16).min(MAX_COLS);
    let nc = out.div_ceil(cw);
    let nb = inp.div_ceil(ROWS);
    // partial rows, (nb, nc, m, cw)
    let mut part = vec![0f32; nb * nc * m * cw];
    par_chunks_mut(&mut part, m * cw, |t, p| {
        let (b, c) = (t / nc, t % nc);
        let cols = c * cw..((c + 1) * cw).min(out);
        block(
            x,
            m,
            inp,
            w,
            out,
            b * ROWS..((b + 1) * ROWS).min(inp),
            cols,
            p,
            cw,
        );
    });
    let mut y = vec![0f32; m * out];
    let reduce = |r: usize, c: usize, ys: &mut [f32]| {
        for b in 0..nb {
            let p = &part[((b * nc + c) * m + r) * cw..][..ys.len()];
            if b == 0 {
                ys.copy_from_slice(p);
            } else {
                crate::isa::vectorized(
                    #[inline(always)]
                    || ys.iter_mut().zip(p).for_each(|(a, v)| *a += v),
                );
            }
        }
    };
    for (r, yr) in y.chunks_exact_mut(out).enumerate() {
        if nb * out <= SERIAL_REDUCE {
            yr.chunks_mut(cw)
                .enumerate()
                .for_each(|(c, ys)| reduce(r, c, ys));
        } else {
            par_chunks_mut(yr, cw, |c, ys| reduce(r, c, ys));
        }
    }
    y
}

/// Output rows one task of [`matmul_t`] takes.
const T_ROWS: usize = 64;

/// `x @ w^T` for `m` activation rows, with `w` stored `(out, inp)` row-major (a tied
/// embedding matrix as the output head, [`crate::linear::Linear::Candle`]): one dot product
/// per output ([`dot16`]), tasks of [`T_ROWS`] outputs. The order of the sums depends only on
/// `inp`.
///
/// # Shapes
/// `x: (m, inp)`, `w: (out, inp)` row-major -> `(m, out)`.
///
/// # Panics
/// When the slices are not `m * inp` and `out * inp` long.
pub fn matmul_t(x: &[f32], m: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    assert!(
        x.len() == m * inp && w.len() == out * inp,
        "gemv: x has {} values for ({m}, {inp}), w {} for ({out}, {inp})",
        x.len(),
        w.len()
    );
    if m == 0 || out == 0 {
        return vec![0.0; m * out];
    }
    // (out, m), then transposed
    let mut yt = vec![0f32; out * m];
    par_chunks_mut(&mut yt, T_ROWS * m, |t, ys| {
        crate::isa::vectorized(
            #[inline(always)]
            || {
                for (k, yj) in ys.chunks_exact_mut(m).enumerate() {
                    let j = t * T_ROWS + k;
                    let wj = &w[j * inp..(j + 1) * inp];
                    for (r, v) in yj.iter_mut().enumerate() {
                        *v = dot16(&x[r * inp..(r + 1) * inp], wj);
                    }
                }
            },
        )
    });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * out];
    for (j, yj) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in yj.iter().enumerate() {
            y[r * out + j] = v;
        }
    }
    y
}

/// `sum(a[k] * b[k])`: 16 lane sums (lane `k % 16` over the whole 16-wide chunks), added
/// lane 0 first, then the tail in order. The same order at every vector width.
#[inline(always)]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (u, v) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += u[l] * v[l];
        }
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    for (u, v) in ra.iter().zip(rb) {
        s += u * v;
    }
    s
}

/// The partial rows of one task: `p[r * cw + (j - cols.start)] = sum over i in rows of
/// x[r][i] * w[i][j]`, for `j` in `cols`.
#[allow(clippy::too_many_arguments)]
fn block(
    x: &[f32],
    m: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    p: &mut [f32],
    cw: usize,
) {
    let n = cols.len();
    crate::isa::vectorized(
        #[inline(always)]
        || {
            for i in rows {
                let wi = &w[i * out + cols.start..][..n];
                for r in 0..m {
                    let xi = x[r * inp + i];
                    let pr = &mut p[r * cw..r * cw + n];
                    for (a, &v) in pr.iter_mut().zip(wi) {
                        *a += xi * v;
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::matmul;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The definition, in the documented order: per block of 64 rows a partial sum from 0,
    /// the partials added in order.
    fn definition(x: &[f32], m: usize, w: &[f32], inp: usize, out: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * out];
        for r in 0..m {
            for j in 0..out {
                let mut total = 0f32;
                for (b, i0) in (0..inp).step_by(64).enumerate() {
                    let mut s = 0f32;
                    for i in i0..(i0 + 64).min(inp) {
                        s += x[r * inp + i] * w[i * out + j];
                    }
                    total = if b == 0 { s } else { total + s };
                }
                y[r * out + j] = total;
            }
        }
        y
    }

    /// Ragged shapes (widths not multiples of 16 or 64, one row, one column, more rows than
    /// one block, outputs past one chunk, the serial and the parallel reduction): the
    /// definition bit for bit, and close to an f64 product.
    #[test]
    fn equals_the_definition_bit_for_bit() {
        for (m, inp, out) in [
            (1, 576, 576),
            (1, 1, 1),
            (3, 65, 17),
            (1, 200, 5000),
            (4, 130, 1031),
            (2, 1536, 576),
            (1, 70, 40_000),
        ] {
            let x = values(m * inp, 1);
            let w = values(inp * out, 7);
            let got = matmul(&x, m, &w, inp, out);
            let want = definition(&x, m, &w, inp, out);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "({m}, {inp}) x ({inp}, {out})");
            for r in 0..m {
                for j in (0..out).step_by(97) {
                    let e: f64 = (0..inp)
                        .map(|i| x[r * inp + i] as f64 * w[i * out + j] as f64)
                        .sum();
                    let g = got[r * out + j] as f64;
                    assert!((g - e).abs() < 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
                }
            }
        }
    }

    /// The transposed form: its definition (16 lane sums, then the tail) bit for bit, on
    /// ragged widths, one and several rows, outputs past one task.
    #[test]
    fn transposed_equals_its_definition_bit_for_bit() {
        for (m, inp, out) in [
            (1, 576, 1000),
            (3, 17, 5),
            (1, 5, 130),
            (4, 100, 64),
            (2, 33, 129),
        ] {
            let x = values(m * inp, 3);
            let w = values(out * inp, 9);
            let got = super::matmul_t(&x, m, &w, out, inp);
            for r in 0..m {
                for j in 0..out {
                    let (a, b) = (&x[r * inp..(r + 1) * inp], &w[j * inp..(j + 1) * inp]);
                    let mut lanes = [0f32; 16];
                    let whole = inp / 16 * 16;
                    for k in 0..whole {
                        lanes[k % 16] += a[k] * b[k];
                    }
                    let mut s = 0f32;
                    for v in lanes {
                        s += v;
                    }
                    for k in whole..inp {
                        s += a[k] * b[k];
                    }
                    assert_eq!(
                        got[r * out + j].to_bits(),
                        s.to_bits(),
                        "({m}, {inp}, {out}) {r} {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_shapes_give_zeros() {
        assert_eq!(matmul(&[], 0, &[1.0; 6], 2, 3), Vec::<f32>::new());
        assert_eq!(matmul(&[], 2, &[], 0, 3), vec![0.0; 6]);
    }
}
