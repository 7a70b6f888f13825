//! Low-bit weight matrices on the AFM paper's symmetric grids, with our own kernels:
//!
//! * **2-bit weights** (`bits = 2`): every weight is `s * (q - 1.5)` with `q` in `0..4`, i.e.
//!   the paper's grid `{-1.5, -0.5, 0.5, 1.5} x s`, one f16 scale `s` per group of
//!   [`DEFAULT_GROUP`] = 32 consecutive inputs of a row. Why 32: it is the activation block
//!   of the kernels (one int8 activation scale per 32 inputs), so a block's integer dot
//!   product is scaled once, with no scale lookup inside a block; it costs 0.5 bit per
//!   weight (2.5 bits in all, under llama.cpp Q2_K's 2.625), and the grid has no zero point,
//!   so small groups matter more than in Q2_K (which also has a min per 16 values). Groups
//!   of 64, 128 and 256 are accepted too (2.25 / 2.125 / 2.06 bits), measured in
//!   `docs/quantization.md`.
//! * **4-bit tables** (`bits = 4`): `s * (q - 7.5)`, `q` in `0..16`, the same layout with
//!   nibbles: the paper's 4-bit embedding table, also the output head when tied.
//!
//! A matrix is used as `x @ W^T`. Activations are quantized per 32 inputs to int8
//! (`d = amax / 127`, round half to even) and each block's dot product is an integer
//! (unsigned weight codes x signed activations, exactly what AVX-512 VNNI's `vpdpbusd`
//! multiplies); the grid offset is folded out with the activation block sums:
//! `sum_b s_w * d_a * dot(q, a) - c * sum_g s_w[g] * sum_{b in g} d_a[b] * sum(a_b)`
//! (`c = 1.5` or `7.5`). [`LowBitMatrix::matmul`] picks, at run time, the AVX-512 VNNI kernel
//! (64 inputs per step), the AVX2 kernel (with the 256-bit VNNI instruction when present),
//! or the portable one; all compute the same integer sums and differ only in the order of
//! the f32 additions (tested).
//!
//! # Layout
//! Rows are padded with zero-scale weights to `kp` = a multiple of 64 (and of the group), so
//! that the kernels always read whole pairs of 32-value blocks. Within a row, each pair of
//! blocks (64 values `v[0..64]`) is packed as
//! * 2-bit: 16 bytes, byte `j` = `v[j] | v[j+16] << 2 | v[j+32] << 4 | v[j+48] << 6`;
//! * 4-bit: 32 bytes, byte `j` = `v[j] | v[j+32] << 4`;
//!
//! so that one broadcast load and one per-lane shift put 64 (or 32) values in natural order.
//! Scales: `kp / group` f16 per row, row-major. The GGUF form is in [`crate::gguf_write`].
//!
//! Where the CPU has AVX2 or AVX-512 VNNI, matrices are kept in memory with 16 rows
//! interleaved ([`groups`]: the same codes and scales, permuted at load), so that one vector
//! instruction serves 16 rows and no row ends in a horizontal sum; `AFM_LOWBIT_GROUPS=0`
//! keeps the row layout, to compare. [`LowBitMatrix::parts`] always gives the row layout.

use crate::error::{LmError, Result};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;
use std::borrow::Cow;

mod groups;

/// Inputs per activation block (and the smallest weight group).
pub const BLOCK: usize = 32;
/// The default weight group: one scale per 32 inputs (see the module docs).
pub const DEFAULT_GROUP: usize = 32;
const PAIR: usize = 64;

/// A `(rows, cols)` low-bit matrix (see the module docs for the format).
#[derive(Debug, Clone)]
pub struct LowBitMatrix {
    bits: u32,
    group: usize,
    rows: usize,
    cols: usize,
    kp: usize,
    qs: Vec<u8>,
    d: Vec<u16>,
    /// Rows `0 .. rows / 16 * 16` in the group layout ([`groups`]).
    grouped: bool,
}

/// Whether new matrices take the group layout: at kernel level AVX2 and up, unless
/// `AFM_LOWBIT_GROUPS=0`.
fn use_groups() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off =
        *OFF.get_or_init(|| std::env::var("AFM_LOWBIT_GROUPS").is_ok_and(|v| v.trim() == "0"));
    !off && crate::isa::level() >= crate::isa::Isa::Avx2
}

#[inline(always)]
fn h(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// The padded row width for `cols` inputs and groups of `group`.
fn padded(cols: usize, group: usize) -> usize {
    cols.div_ceil(group.max(PAIR)) * group.max(PAIR)
}

fn check_format(bits: u32, group: usize) -> Result<()> {
    if bits != 2 && bits != 4 {
        return Err(LmError::Invalid(format!(
            "low-bit matrices have 2 or 4 bits, not {bits}"
        )));
    }
    if !matches!(group, 32 | 64 | 128 | 256) {
        return Err(LmError::Invalid(format!(
            "low-bit group size {group}: expected 32, 64, 128 or 256"
        )));
    }
    Ok(())
}

/// The grid offset `c = (2^bits - 1) / 2`: a weight is `s * (q - c)`.
fn offset(bits: u32) -> f32 {
    ((1u32 << bits) - 1) as f32 / 2.0
}

/// Code `k` (0..64) of the pair of blocks at `p` (16 or 32 bytes).
#[inline(always)]
fn code(bits: u32, p: &[u8], k: usize) -> u8 {
    if bits == 2 {
        (p[k % 16] >> (2 * (k / 16))) & 3
    } else {
        (p[k % 32] >> (4 * (k / 32))) & 15
    }
}

/// Packs 64 codes into one pair (16 or 32 bytes).
fn pack_pair(bits: u32, codes: &[u8], out: &mut [u8]) {
    out.fill(0);
    for (k, &q) in codes.iter().enumerate() {
        if bits == 2 {
            out[k % 16] |= q << (2 * (k / 16));
        } else {
            out[k % 32] |= q << (4 * (k / 32));
        }
    }
}

impl LowBitMatrix {
    /// From packed codes and f16 scale bits in the layout of the module docs (as stored in
    /// GGUF), checking every size and that the scales are finite.
    pub fn from_parts(
        bits: u32,
        group: usize,
        rows: usize,
        cols: usize,
        qs: Vec<u8>,
        d: Vec<u16>,
    ) -> Result<Self> {
        check_format(bits, group)?;
        let kp = padded(cols, group);
        let (want_q, want_d) = (rows * kp * bits as usize / 8, rows * kp / group);
        if qs.len() != want_q || d.len() != want_d {
            return Err(LmError::Invalid(format!(
                "{bits}-bit matrix ({rows}, {cols}) with groups of {group} needs {want_q} code \
                 bytes and {want_d} scales, got {} and {}",
                qs.len(),
                d.len()
            )));
        }
        if let Some(bad) = d.iter().map(|&b| h(b)).find(|v| !v.is_finite()) {
            return Err(LmError::Invalid(format!(
                "{bits}-bit matrix scale {bad} is not finite"
            )));
        }
        let mut m = Self {
            bits,
            group,
            rows,
            cols,
            kp,
            qs,
            d,
            grouped: false,
        };
        m.set_grouped(use_groups());
        Ok(m)
    }

    /// Puts the whole groups of 16 rows in the group layout (`true`) or the row layout.
    fn set_grouped(&mut self, on: bool) {
        if on != self.grouped {
            let meta = self.gmeta();
            groups::permute(&meta, &mut self.qs, &mut self.d, self.rows, on);
            self.grouped = on;
        }
    }

    fn gmeta(&self) -> groups::Meta {
        groups::Meta {
            bits: self.bits,
            nb: self.kp / BLOCK,
            gpb: self.group / BLOCK,
            kp: self.kp,
        }
    }

    /// Rows in whole groups of the group layout (0 in the row layout).
    fn grouped_rows(&self) -> usize {
        if self.grouped {
            self.rows / groups::G * groups::G
        } else {
            0
        }
    }

    /// Row `r` in the row layout: packed codes and scales.
    fn row_parts(&self, r: usize) -> (Cow<'_, [u8]>, Cow<'_, [u16]>) {
        if r < self.grouped_rows() {
            let (codes, d) = groups::row_of(&self.gmeta(), &self.qs, &self.d, r);
            let pb = PAIR * self.bits as usize / 8;
            let mut qs = vec![0u8; self.kp * self.bits as usize / 8];
            for (p, out) in qs.chunks_exact_mut(pb).enumerate() {
                pack_pair(self.bits, &codes[p * PAIR..(p + 1) * PAIR], out);
            }
            return (Cow::Owned(qs), Cow::Owned(d));
        }
        let w = self.row(r);
        (Cow::Borrowed(w.qs), Cow::Borrowed(w.d))
    }

    /// Post-training quantization of a row-major `(rows, cols)` f32 matrix: per group, the
    /// scale minimising the squared error `sum_j w_j (x_j - s (q_j - c))^2` over a search of
    /// 15 starting scales (each refitted once by least squares given its codes), rounded to
    /// f16, then the nearest codes for the rounded scale. `importance` (length `cols`, e.g.
    /// the mean squared activation of each input on calibration text) weighs the inputs;
    /// `None` weighs them equally.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u32,
        group: usize,
        importance: Option<&[f32]>,
    ) -> Result<Self> {
        Self::quantize_with(w, rows, cols, bits, group, importance, 15)
    }

    /// [`LowBitMatrix::quantize`] with `candidates` starting scales (1: the single start
    /// `0.7 * amax / c` for 2 bits or `amax / c` for 4, refitted once: ~15x faster, for
    /// random-weight checkpoints whose quality does not matter).
    pub fn quantize_with(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u32,
        group: usize,
        importance: Option<&[f32]>,
        candidates: usize,
    ) -> Result<Self> {
        check_format(bits, group)?;
        if w.len() != rows * cols {
            return Err(LmError::Invalid(format!(
                "quantize: {} values for a ({rows}, {cols}) matrix",
                w.len()
            )));
        }
        if let Some(imp) = importance {
            if imp.len() != cols || imp.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(LmError::Invalid(format!(
                    "quantize: importance needs {cols} finite non-negative values"
                )));
            }
        }
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(LmError::Invalid(format!(
                "quantize: weight {bad} is not finite"
            )));
        }
        let kp = padded(cols, group);
        let (rb, ng) = (kp * bits as usize / 8, kp / group);
        let per_row: Vec<(Vec<u8>, Vec<u16>)> = (0..rows)
            .into_par_iter()
            .map(|r| {
                let mut x = vec![0f32; kp];
                x[..cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
                let mut codes = vec![0u8; kp];
                let mut d = vec![0u16; ng];
                for g in 0..ng {
                    let xs = &x[g * group..(g + 1) * group];
                    let imp = importance.map(|imp| {
                        let mut v = vec![0f32; group];
                        let lo = (g * group).min(cols);
                        let hi = ((g + 1) * group).min(cols);
                        v[..hi - lo].copy_from_slice(&imp[lo..hi]);
                        v
                    });
                    let s = best_scale(xs, imp.as_deref(), bits, candidates);
                    d[g] = f16::from_f32(s).to_bits();
                    let s = h(d[g]);
                    for (q, &v) in codes[g * group..(g + 1) * group].iter_mut().zip(xs) {
                        *q = nearest_code(v, s, bits);
                    }
                }
                let mut qs = vec![0u8; rb];
                let pb = PAIR * bits as usize / 8;
                for (p, out) in qs.chunks_exact_mut(pb).enumerate() {
                    pack_pair(bits, &codes[p * PAIR..(p + 1) * PAIR], out);
                }
                (qs, d)
            })
            .collect();
        let mut qs = Vec::with_capacity(rows * rb);
        let mut d = Vec::with_capacity(rows * ng);
        for (q, s) in per_row {
            qs.extend_from_slice(&q);
            d.extend_from_slice(&s);
        }
        Self::from_parts(bits, group, rows, cols, qs, d)
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn group(&self) -> usize {
        self.group
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The packed codes and the f16 scale bits in the row layout of the module docs (the
    /// GGUF payload).
    pub fn parts(&self) -> (Cow<'_, [u8]>, Cow<'_, [u16]>) {
        if !self.grouped {
            return (Cow::Borrowed(&self.qs), Cow::Borrowed(&self.d));
        }
        let mut m = self.clone();
        m.set_grouped(false);
        (Cow::Owned(m.qs), Cow::Owned(m.d))
    }

    /// Bytes of codes and scales.
    pub fn storage_bytes(&self) -> usize {
        self.qs.len() + 2 * self.d.len()
    }

    /// The matrix as f32, row-major `(rows, cols)`: the definition of the format.
    pub fn dequantize(&self) -> Vec<f32> {
        let ids: Vec<usize> = (0..self.rows).collect();
        self.rows_vec(&ids)
    }

    fn rows_vec(&self, ids: &[usize]) -> Vec<f32> {
        let c = offset(self.bits);
        let pb = PAIR * self.bits as usize / 8;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &r) in out.chunks_mut(self.cols.max(1)).zip(ids) {
            let (q, d) = self.row_parts(r);
            for (j, o) in o.iter_mut().enumerate() {
                let p = &q[(j / PAIR) * pb..(j / PAIR + 1) * pb];
                *o = h(d[j / self.group]) * (code(self.bits, p, j % PAIR) as f32 - c);
            }
        }
        out
    }

    /// Dequantized rows (embedding lookup); an id out of range is an error.
    ///
    /// # Shapes
    /// `ids.len() = t` -> `(t, cols)`.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(LmError::BadTokenId {
                id,
                vocab: self.rows,
            });
        }
        let idx: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        Ok(Tensor::from_vec(
            self.rows_vec(&idx),
            (ids.len(), self.cols),
            &Device::Cpu,
        )?)
    }

    /// Stacks matrices of the same format and width along the rows; `None` if they differ.
    pub fn concat_rows(ms: &[&LowBitMatrix]) -> Option<LowBitMatrix> {
        let f = ms.first()?;
        if ms
            .iter()
            .any(|m| m.bits != f.bits || m.group != f.group || m.cols != f.cols)
        {
            return None;
        }
        let aligned = ms[..ms.len() - 1]
            .iter()
            .all(|m| m.rows.is_multiple_of(groups::G));
        if ms.iter().any(|m| m.grouped) && !(aligned && ms.iter().all(|m| m.grouped)) {
            // regroup the row layout of the whole (the groups of the parts do not line up)
            let parts: Vec<_> = ms.iter().map(|m| m.parts()).collect();
            let rows = ms.iter().map(|m| m.rows).sum();
            let qs = parts.iter().flat_map(|p| p.0.iter().copied()).collect();
            let d = parts.iter().flat_map(|p| p.1.iter().copied()).collect();
            let mut m = Self::from_parts(f.bits, f.group, rows, f.cols, qs, d).ok()?;
            m.set_grouped(true);
            return Some(m);
        }
        Some(LowBitMatrix {
            bits: f.bits,
            group: f.group,
            rows: ms.iter().map(|m| m.rows).sum(),
            cols: f.cols,
            kp: f.kp,
            qs: ms.iter().flat_map(|m| m.qs.iter().copied()).collect(),
            d: ms.iter().flat_map(|m| m.d.iter().copied()).collect(),
            // all in the row layout, or all grouped with whole groups before the last part
            // (then the groups and the last part's tail rows follow one another as in the
            // group layout of the whole)
            grouped: f.grouped,
        })
    }

    /// `(m, cols) @ W^T -> (m, rows)` with the fastest kernels this CPU runs.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, kernels())
    }

    fn matmul_with(&self, x: &[f32], m: usize, kern: Kernels) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "low-bit matmul input size");
        let act = Act::new(x, m, self.cols, self.kp, self.group);
        let full = self.grouped_rows();
        let fill = |out: &mut [std::mem::MaybeUninit<f32>]| {
            if full > 0 {
                groups::matmul(
                    kern.groups,
                    &self.gmeta(),
                    &self.qs,
                    &self.d,
                    full / groups::G,
                    self.rows,
                    &act,
                    m,
                    out,
                );
            }
            // the rows in the row layout: all of them, or those past the last whole group
            crate::par::row_tiles(full, self.rows, m, out, |r0, nr, o| {
                self.tile(&kern, &act, r0, nr, m, o)
            });
        };
        // SAFETY: `fill` writes every element: the grouped rows `0..full` for every
        // activation row (`groups::matmul`), then every (row, activation row) past them.
        unsafe { crate::par::filled(m * self.rows, fill) }
    }

    fn meta(&self) -> Meta {
        Meta {
            bits: self.bits,
            nb: self.kp / BLOCK,
            gpb: self.group / BLOCK,
        }
    }

    /// Row `r` in the row layout (a row past the last whole group when grouped).
    fn row(&self, r: usize) -> WRow<'_> {
        debug_assert!(r >= self.grouped_rows());
        let rb = self.kp * self.bits as usize / 8;
        let ng = self.kp / self.group;
        WRow {
            qs: &self.qs[r * rb..(r + 1) * rb],
            d: &self.d[r * ng..(r + 1) * ng],
        }
    }

    /// Rows `r0..r0+nr` against all `m` activation rows into `o` (`(nr, m)`).
    fn tile(&self, k: &Kernels, act: &Act, r0: usize, nr: usize, m: usize, o: &mut [f32]) {
        let meta = self.meta();
        let ng = self.kp / self.group;
        let arow = |i: usize| ARow {
            qs: &act.qs[i * self.kp..(i + 1) * self.kp],
            d: &act.d[i * meta.nb..(i + 1) * meta.nb],
            sg: &act.sg[i * ng..(i + 1) * ng],
        };
        let mut r = 0;
        if m == 1 {
            let a = [arow(0)];
            while r + 4 <= nr {
                let w = [
                    self.row(r0 + r),
                    self.row(r0 + r + 1),
                    self.row(r0 + r + 2),
                    self.row(r0 + r + 3),
                ];
                let res = (k.k41)(&meta, &w, &a);
                for j in 0..4 {
                    o[r + j] = res[j][0];
                }
                r += 4;
            }
            while r < nr {
                o[r] = (k.k11)(&meta, &[self.row(r0 + r)], &a)[0][0];
                r += 1;
            }
            return;
        }
        while r < nr {
            let w = [self.row(r0 + r)];
            let mut i = 0;
            while i + 4 <= m {
                let a = [arow(i), arow(i + 1), arow(i + 2), arow(i + 3)];
                let res = (k.k14)(&meta, &w, &a);
                o[r * m + i..r * m + i + 4].copy_from_slice(&res[0]);
                i += 4;
            }
            while i < m {
                o[r * m + i] = (k.k11)(&meta, &w, &[arow(i)])[0][0];
                i += 1;
            }
            r += 1;
        }
    }
}

/// The least-squares scale of one group (see [`LowBitMatrix::quantize`]).
fn best_scale(x: &[f32], imp: Option<&[f32]>, bits: u32, candidates: usize) -> f32 {
    let c = offset(bits);
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if amax == 0.0 {
        return 0.0;
    }
    let wt = |j: usize| imp.map_or(1.0, |w| w[j]);
    let err = |s: f32| -> f32 {
        x.iter()
            .enumerate()
            .map(|(j, &v)| {
                let e = v - s * (nearest_code(v, s, bits) as f32 - c);
                wt(j) * e * e
            })
            .sum()
    };
    let (mut best, mut best_err) = (amax / c, f32::INFINITY);
    for i in 0..candidates.max(1) {
        let f = match (candidates, bits) {
            (0 | 1, 2) => 0.7,
            (0 | 1, _) => 1.0,
            _ => 0.4 + 0.05 * i as f32,
        };
        let s0 = amax / c * f;
        // refit: s = sum w x g / sum w g^2 for the codes of s0
        let (mut num, mut den) = (0f32, 0f32);
        for (j, &v) in x.iter().enumerate() {
            let g = nearest_code(v, s0, bits) as f32 - c;
            num += wt(j) * v * g;
            den += wt(j) * g * g;
        }
        for s in [s0, if den > 0.0 { num / den } else { s0 }] {
            if s > 0.0 && s.is_finite() {
                let e = err(s);
                if e < best_err {
                    (best, best_err) = (s, e);
                }
            }
        }
    }
    best
}

/// The code whose grid value `s * (q - c)` is nearest to `v`.
#[inline]
fn nearest_code(v: f32, s: f32, bits: u32) -> u8 {
    if s == 0.0 {
        return 0;
    }
    let top = ((1u32 << bits) - 1) as f32;
    (v / s + offset(bits)).round().clamp(0.0, top) as u8
}

/// Quantized activations: int8 per 32 inputs, per block `d`, per weight group
/// `sg = sum_{b in group} d_b * sum(q_b)`.
struct Act {
    qs: Vec<i8>,
    d: Vec<f32>,
    sg: Vec<f32>,
}

impl Act {
    fn new(x: &[f32], m: usize, cols: usize, kp: usize, group: usize) -> Self {
        let nb = kp / BLOCK;
        let ng = kp / group;
        let mut a = Act {
            qs: vec![0; m * kp],
            d: vec![0.0; m * nb],
            sg: vec![0.0; m * ng],
        };
        // At one activation row (a decode step) this runs on the calling thread alone while
        // the pool's workers wait, before every product. Whole blocks take the AVX2 form
        // (`kernels::round_block_avx2`) where the CPU has it; the rest, and blocks holding a
        // NaN or an infinity, a form that vectorises (`isa::vectorized`). Both give the
        // plain loop's values: the largest magnitude with NaNs passed over, codes rounded to
        // nearest even (a NaN product, from an infinite input, is 0). The vectorised form
        // alone was 2.2% of the 3.1B model's decode on an Intel Xeon (`perf`: its loop over
        // a 32-value block compiled to 8-lane steps and its lanes' maximum to a chain of
        // scalar steps); with the AVX2 form for whole blocks, 0.8%.
        #[cfg(target_arch = "x86_64")]
        let avx2 = crate::isa::level() >= crate::isa::Isa::Avx2;
        let work = |i: usize, q: &mut [i8], d: &mut [f32], sg: &mut [f32]| {
            let xr = &x[i * cols..(i + 1) * cols];
            for b in 0..nb {
                let lo = (b * BLOCK).min(cols);
                let hi = ((b + 1) * BLOCK).min(cols);
                let xb = &xr[lo..hi];
                let qb = &mut q[b * BLOCK..b * BLOCK + xb.len()];
                #[cfg(target_arch = "x86_64")]
                let fast = match (avx2, <&[f32; BLOCK]>::try_from(xb)) {
                    // SAFETY: `avx2` says the level in use, so the CPU, has AVX2.
                    (true, Ok(xa)) => unsafe { crate::kernels::round_block_avx2(xa) },
                    _ => None,
                };
                #[cfg(not(target_arch = "x86_64"))]
                let fast: Option<(f32, i32, [u8; BLOCK])> = None;
                let (amax, sum) = match fast {
                    Some((amax, sum, codes)) => {
                        for (o, c) in qb.iter_mut().zip(codes) {
                            *o = c as i8;
                        }
                        (amax, sum)
                    }
                    None => crate::isa::vectorized(
                        #[inline(always)]
                        || {
                            let amax = crate::kernels::max_of(xb, 0.0, f32::abs);
                            let id = crate::kernels::inverse_scale(amax);
                            let mut sum = 0i32;
                            for (o, &v) in qb.iter_mut().zip(xb) {
                                // small_int rounds to nearest even as it converts
                                let r = v * id;
                                let r = if r.is_nan() { 0.0 } else { r };
                                let qv = crate::kernels::small_int(r) as i32;
                                sum += qv;
                                *o = qv as i8;
                            }
                            (amax, sum)
                        },
                    ),
                };
                d[b] = amax / 127.0;
                sg[b * BLOCK / group] += d[b] * sum as f32;
            }
        };
        if m < 4 {
            for (i, ((q, d), sg)) in
                a.qs.chunks_mut(kp)
                    .zip(a.d.chunks_mut(nb))
                    .zip(a.sg.chunks_mut(ng))
                    .enumerate()
            {
                work(i, q, d, sg);
            }
        } else {
            a.qs.par_chunks_mut(kp)
                .zip(a.d.par_chunks_mut(nb))
                .zip(a.sg.par_chunks_mut(ng))
                .enumerate()
                .for_each(|(i, ((q, d), sg))| work(i, q, d, sg));
        }
        a
    }
}

/// What the kernels need to know about the matrix.
struct Meta {
    bits: u32,
    /// 32-value blocks per (padded) row: even.
    nb: usize,
    /// Blocks per weight group.
    gpb: usize,
}

/// One weight row: packed codes and f16 group scales.
#[derive(Clone, Copy)]
struct WRow<'a> {
    qs: &'a [u8],
    d: &'a [u16],
}

/// One activation row: int8 values, block scales, group sums.
#[derive(Clone, Copy)]
struct ARow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    sg: &'a [f32],
}

type K11 = fn(&Meta, &[WRow; 1], &[ARow; 1]) -> [[f32; 1]; 1];
type K41 = fn(&Meta, &[WRow; 4], &[ARow; 1]) -> [[f32; 1]; 4];
type K14 = fn(&Meta, &[WRow; 1], &[ARow; 4]) -> [[f32; 4]; 1];

/// The micro-kernels chosen for this CPU: `kRC` multiplies R weight rows by C activation rows.
#[derive(Clone, Copy)]
struct Kernels {
    k11: K11,
    k41: K41,
    k14: K14,
    /// For the rows in the group layout.
    groups: groups::GroupKernels,
}

/// Which kernel family [`LowBitMatrix::matmul`] runs on this CPU.
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available_512() {
            return "avx512-vnni";
        }
        if simd::available() {
            return if simd::vnni256() {
                "avx2+avx-vnni"
            } else {
                "avx2"
            };
        }
    }
    "portable"
}

fn kernels() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available_512() {
            return Kernels {
                k11: simd::k512::<1, 1>,
                k41: simd::k512::<4, 1>,
                k14: simd::k512::<1, 4>,
                groups: groups::GroupKernels::at(crate::isa::level()),
            };
        }
        if simd::available() {
            return Kernels {
                k11: simd::k256::<1, 1>,
                k41: simd::k256::<4, 1>,
                k14: simd::k256::<1, 4>,
                groups: groups::GroupKernels::at(crate::isa::level()),
            };
        }
    }
    scalar_kernels()
}

fn scalar_kernels() -> Kernels {
    Kernels {
        k11: scalar::<1, 1>,
        k41: scalar::<4, 1>,
        k14: scalar::<1, 4>,
        groups: groups::GroupKernels::portable(),
    }
}

/// The portable kernel: the reference arithmetic.
fn scalar<const R: usize, const C: usize>(m: &Meta, w: &[WRow; R], a: &[ARow; C]) -> [[f32; C]; R] {
    let c0 = offset(m.bits);
    let pb = PAIR * m.bits as usize / 8;
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut acc = 0f32;
            for b in 0..m.nb {
                let p = &w[r].qs[(b / 2) * pb..(b / 2 + 1) * pb];
                let y = &a[c].qs[b * BLOCK..(b + 1) * BLOCK];
                let mut dot = 0i32;
                for (j, &yv) in y.iter().enumerate() {
                    dot += code(m.bits, p, (b % 2) * BLOCK + j) as i32 * yv as i32;
                }
                acc += h(w[r].d[b / m.gpb]) * a[c].d[b] * dot as f32;
            }
            let corr: f32 = w[r].d.iter().zip(a[c].sg).map(|(&s, &g)| h(s) * g).sum();
            out[r][c] = acc - c0 * corr;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{offset, ARow, Meta, WRow, BLOCK};
    use std::arch::x86_64::*;

    use crate::isa::{level, Isa};

    /// AVX2 + FMA + F16C, unless `AFM_ISA` caps the level below it.
    pub fn available() -> bool {
        level() >= Isa::Avx2
    }

    /// AVX-512 F/BW/VL + VNNI, unless `AFM_ISA` caps the level below it.
    pub fn available_512() -> bool {
        level() >= Isa::Avx512
    }

    /// The 256-bit `vpdpbusd` in its AVX-512 VL encoding (AVX-VNNI alone has another
    /// encoding), unless `AFM_ISA` caps the level below AVX2-VNNI.
    pub fn vnni256() -> bool {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        level() >= Isa::Avx2Vnni
            && *V.get_or_init(|| {
                is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
            })
    }

    fn check<const R: usize, const C: usize>(m: &Meta, w: &[WRow; R], a: &[ARow; C]) {
        let pb = 64 * m.bits as usize / 8;
        assert!(m.nb.is_multiple_of(2) && m.gpb >= 1 && m.nb.is_multiple_of(m.gpb));
        for r in w {
            assert!(r.qs.len() == m.nb / 2 * pb && r.d.len() == m.nb / m.gpb);
        }
        for c in a {
            assert!(c.qs.len() == m.nb * BLOCK && c.d.len() == m.nb && c.sg.len() == m.nb / m.gpb);
        }
    }

    /// 64 inputs per step with the 512-bit `vpdpbusd`.
    pub fn k512<const R: usize, const C: usize>(
        m: &Meta,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        check(m, w, a);
        // SAFETY: `available_512()` was checked before these kernels were chosen; `check`
        // keeps every load below inside the slices (whole pairs of blocks).
        unsafe {
            if m.bits == 2 {
                lowbit_512::<R, C, 2>(m, w, a)
            } else {
                lowbit_512::<R, C, 4>(m, w, a)
            }
        }
    }

    /// One pair of blocks (64 codes) in natural order as 64 unsigned bytes.
    #[inline(always)]
    unsafe fn unpack_pair_512<const B: u32>(p: *const u8) -> __m512i {
        if B == 2 {
            let v = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
            let sh = _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6);
            _mm512_and_si512(_mm512_srlv_epi64(v, sh), _mm512_set1_epi8(3))
        } else {
            let v = _mm256_loadu_si256(p as *const __m256i);
            let mask = _mm256_set1_epi8(0x0F);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
        }
    }

    /// f16 bits to f32 with the F16C instruction.
    #[inline(always)]
    unsafe fn hx(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// `c * sum_g s[g] * sg[g]`, sixteen groups at a time.
    #[inline(always)]
    unsafe fn corr_512(d: &[u16], sg: &[f32]) -> f32 {
        let n = d.len().min(sg.len());
        let mut acc = _mm512_setzero_ps();
        let mut g = 0;
        while g + 16 <= n {
            let dv = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().add(g) as *const __m256i));
            acc = _mm512_fmadd_ps(dv, _mm512_loadu_ps(sg.as_ptr().add(g)), acc);
            g += 16;
        }
        let mut r = _mm512_reduce_add_ps(acc);
        while g < n {
            r += hx(d[g]) * sg[g];
            g += 1;
        }
        r
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn lowbit_512<const R: usize, const C: usize, const B: u32>(
        m: &Meta,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        let pb = 64 * B as usize / 8;
        let lo8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut b = 0;
        while b < m.nb {
            let mut qx = [_mm512_setzero_si512(); R];
            let mut dx = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let p = w[r].qs.as_ptr().add(b / 2 * pb);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(1024) as *const i8);
                qx[r] = unpack_pair_512::<B>(p);
                let (s0, s1) = (hx(w[r].d[b / m.gpb]), hx(w[r].d[(b + 1) / m.gpb]));
                dx[r] = _mm512_permutexvar_ps(
                    lo8,
                    _mm512_castps128_ps512(_mm_setr_ps(s0, s1, 0.0, 0.0)),
                );
            }
            for c in 0..C {
                let qy = _mm512_loadu_si512(a[c].qs.as_ptr().add(b * BLOCK) as *const _);
                let dy = _mm512_permutexvar_ps(
                    lo8,
                    _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(
                        a[c].d.as_ptr().add(b) as *const __m128i,
                    ))),
                );
                for r in 0..R {
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qx[r], qy);
                    acc[r][c] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dx[r], dy), acc[r][c]);
                }
            }
            b += 2;
        }
        let c0 = offset(B);
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]) - c0 * corr_512(w[r].d, a[c].sg);
            }
        }
        out
    }

    /// 32 inputs per step with AVX2 (and the 256-bit `vpdpbusd` when present).
    pub fn k256<const R: usize, const C: usize>(
        m: &Meta,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        check(m, w, a);
        // SAFETY: `available()` (AVX2, FMA, F16C) was checked before these kernels were
        // chosen, the VNNI variant only runs after its own check; `check` keeps every load
        // inside the slices.
        unsafe {
            match (m.bits, vnni256()) {
                (2, true) => lowbit_vnni::<R, C, 2>(m, w, a),
                (2, false) => lowbit_avx2::<R, C, 2>(m, w, a),
                (_, true) => lowbit_vnni::<R, C, 4>(m, w, a),
                (_, false) => lowbit_avx2::<R, C, 4>(m, w, a),
            }
        }
    }

    /// Block `b` (32 codes) as 32 unsigned bytes.
    #[inline(always)]
    unsafe fn unpack_block_256<const B: u32>(qs: *const u8, b: usize) -> __m256i {
        if B == 2 {
            let v =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.add(b / 2 * 16) as *const __m128i));
            let sh = if b.is_multiple_of(2) {
                _mm256_setr_epi64x(0, 0, 2, 2)
            } else {
                _mm256_setr_epi64x(4, 4, 6, 6)
            };
            _mm256_and_si256(_mm256_srlv_epi64(v, sh), _mm256_set1_epi8(3))
        } else {
            let v = _mm256_loadu_si256(qs.add(b / 2 * 32) as *const __m256i);
            let v = if b.is_multiple_of(2) {
                v
            } else {
                _mm256_srli_epi16(v, 4)
            };
            _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn corr(d: &[u16], sg: &[f32]) -> f32 {
        d.iter().zip(sg).map(|(&s, &g)| hx(s) * g).sum()
    }

    macro_rules! kernel256 {
        ($name:ident, $feat:literal, $dot:ident) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const R: usize, const C: usize, const B: u32>(
                m: &Meta,
                w: &[WRow; R],
                a: &[ARow; C],
            ) -> [[f32; C]; R] {
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                for b in 0..m.nb {
                    let mut qx = [_mm256_setzero_si256(); R];
                    let mut sx = [0f32; R];
                    for r in 0..R {
                        qx[r] = unpack_block_256::<B>(w[r].qs.as_ptr(), b);
                        sx[r] = hx(*w[r].d.get_unchecked(b / m.gpb));
                    }
                    for c in 0..C {
                        let qy =
                            _mm256_loadu_si256(a[c].qs.as_ptr().add(b * BLOCK) as *const __m256i);
                        let dy = *a[c].d.get_unchecked(b);
                        for r in 0..R {
                            let p = $dot(qx[r], qy);
                            let sc = _mm256_set1_ps(sx[r] * dy);
                            acc[r][c] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[r][c]);
                        }
                    }
                }
                let c0 = offset(B);
                let mut out = [[0f32; C]; R];
                for r in 0..R {
                    for c in 0..C {
                        out[r][c] = hsum(acc[r][c]) - c0 * corr(w[r].d, a[c].sg);
                    }
                }
                out
            }
        };
    }

    /// unsigned x signed bytes, 4-way sums into i32 lanes (no i16 saturation: codes <= 15).
    #[inline(always)]
    unsafe fn dot_avx2(x: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    }
    #[inline(always)]
    unsafe fn dot_vnni(x: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y)
    }

    kernel256!(lowbit_avx2, "avx2,fma,f16c", dot_avx2);
    kernel256!(lowbit_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_vnni);

    /// The AVX2 kernel without VNNI, whatever the CPU has (tests).
    #[cfg(test)]
    pub fn k256_plain<const R: usize, const C: usize>(
        m: &Meta,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        check(m, w, a);
        // SAFETY: callers check `available()` first; `check` bounds the loads.
        unsafe {
            if m.bits == 2 {
                lowbit_avx2::<R, C, 2>(m, w, a)
            } else {
                lowbit_avx2::<R, C, 4>(m, w, a)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The activation quantiser (vectorised at the level in use) gives the plain loop's
    /// codes, scales and group sums bit for bit: one and five rows (the serial and the
    /// parallel path), a ragged last block, all-zero blocks, a block too small for `127 /
    /// amax`, and NaN and infinite inputs.
    #[test]
    fn activation_rows_quantise_as_the_plain_loop() {
        let (cols, kp, group) = (200, 256, 64);
        for m in [1, 5] {
            let mut x = randn(m * cols, 7 + m as u64);
            x[3] = f32::NAN;
            x[40] = f32::INFINITY;
            x[70] = f32::NEG_INFINITY;
            x[96..128].iter_mut().for_each(|v| *v = 0.0);
            let tiny = x.len() - 5;
            x[tiny] *= 1e-30;
            // a whole block so small that 127 / amax overflows: codes 0
            x[160..192]
                .iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = (j as f32 - 15.5) * 1e-39);
            let a = Act::new(&x, m, cols, kp, group);
            let (nb, ng) = (kp / BLOCK, kp / group);
            let (mut qs, mut d, mut sg) =
                (vec![0i8; m * kp], vec![0f32; m * nb], vec![0f32; m * ng]);
            for i in 0..m {
                let xr = &x[i * cols..(i + 1) * cols];
                for b in 0..nb {
                    let xb = &xr[(b * BLOCK).min(cols)..((b + 1) * BLOCK).min(cols)];
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let id = 127.0 / amax;
                    let id = if amax > 0.0 && id.is_finite() {
                        id
                    } else {
                        0.0
                    };
                    let mut sum = 0i32;
                    for (j, v) in xb.iter().enumerate() {
                        let qv = (v * id).round_ties_even() as i32;
                        sum += qv;
                        qs[i * kp + b * BLOCK + j] = qv as i8;
                    }
                    d[i * nb + b] = amax / 127.0;
                    sg[i * ng + b * BLOCK / group] += d[i * nb + b] * sum as f32;
                }
            }
            assert_eq!(a.qs, qs, "codes, {m} rows");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.d), bits(&d), "scales, {m} rows");
            assert_eq!(bits(&a.sg), bits(&sg), "group sums, {m} rows");
        }
    }

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(1e-7);
                let u2: f32 = rng.random::<f32>();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    }

    /// The definition: `x @ dequantize(W)^T` with x rounded per block to int8 exactly as
    /// the kernels round it, in f64.
    fn definition(q: &LowBitMatrix, x: &[f32], m: usize) -> Vec<f64> {
        let (rows, cols) = q.dims();
        let w = q.dequantize();
        let mut xq = vec![0f64; x.len()];
        for i in 0..m {
            for blk in x[i * cols..(i + 1) * cols]
                .chunks(BLOCK)
                .zip(xq[i * cols..(i + 1) * cols].chunks_mut(BLOCK))
            {
                let (xb, ob) = blk;
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                for (o, v) in ob.iter_mut().zip(xb) {
                    *o = (v * id).round_ties_even() as f64 * (amax / 127.0) as f64;
                }
            }
        }
        let mut out = vec![0f64; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..cols)
                    .map(|j| xq[i * cols + j] * w[r * cols + j] as f64)
                    .sum();
            }
        }
        out
    }

    fn families() -> Vec<(&'static str, Kernels)> {
        let mut v = vec![("portable", scalar_kernels()), ("chosen", kernels())];
        #[cfg(target_arch = "x86_64")]
        {
            if simd::available() {
                let g = groups::GroupKernels::avx2().unwrap();
                v.push((
                    "avx2",
                    Kernels {
                        k11: simd::k256_plain::<1, 1>,
                        k41: simd::k256_plain::<4, 1>,
                        k14: simd::k256_plain::<1, 4>,
                        groups: g,
                    },
                ));
                v.push((
                    "avx2/vnni256",
                    Kernels {
                        k11: simd::k256::<1, 1>,
                        k41: simd::k256::<4, 1>,
                        k14: simd::k256::<1, 4>,
                        groups: groups::GroupKernels::avx2_vnni().unwrap_or(g),
                    },
                ));
            }
            if simd::available_512() {
                v.push((
                    "avx512",
                    Kernels {
                        k11: simd::k512::<1, 1>,
                        k41: simd::k512::<4, 1>,
                        k14: simd::k512::<1, 4>,
                        groups: groups::GroupKernels::avx512().unwrap(),
                    },
                ));
            }
        }
        v
    }

    /// Every kernel family this CPU has, in both layouts, on ragged shapes (widths that are
    /// not multiples of 64 or of the group, row counts that leave rows past the last group of
    /// 16, batch sizes that leave tails), against the definition; and the group layout's SIMD
    /// kernels equal its portable definition bit for bit.
    #[test]
    fn kernels_match_the_definition_on_ragged_shapes() {
        for (bits, group) in [(2, 32), (2, 64), (2, 128), (4, 32), (4, 64)] {
            for (cols, rows, m) in [
                (96, 70, 1),
                (32, 9, 5),
                (200, 13, 4),
                (576, 7, 9),
                (64, 1, 3),
                (576, 35, 1),
                (128, 48, 2),
                (320, 33, 3),
                (64, 16, 7),
                // runs of 4 rows, then one from row 4 (the one-row kernels at c0 > 0)
                (96, 32, 5),
            ] {
                let w = randn(rows * cols, 1 + cols as u64);
                let x = randn(m * cols, 7 + rows as u64);
                let mut q = LowBitMatrix::quantize(&w, rows, cols, bits, group, None).unwrap();
                let want = definition(&q, &x, m);
                let scale = want.iter().fold(0f64, |a, v| a.max(v.abs())).max(1.0);
                for grouped in [false, true] {
                    q.set_grouped(grouped);
                    let portable = q.matmul_with(&x, m, scalar_kernels());
                    for (name, k) in families() {
                        let got = q.matmul_with(&x, m, k);
                        for (g, e) in got.iter().zip(&want) {
                            assert!(
                                ((*g as f64) - e).abs() < 2e-5 * scale,
                                "{bits}-bit g{group} {name} grouped {grouped} ({rows},{cols}) \
                                 m {m}: {g} vs {e}"
                            );
                        }
                        if grouped {
                            // the grouped rows: bit for bit
                            let n = rows / groups::G * groups::G;
                            for i in 0..m {
                                assert_eq!(
                                    got[i * rows..i * rows + n],
                                    portable[i * rows..i * rows + n],
                                    "{bits}-bit g{group} {name} ({rows},{cols}) m {m}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The kernels' integer sums at their bounds: every code at its largest and every
    /// activation at +127 or -127, where a sum in i16 past 32,767 or a saturating
    /// `vpmaddubsw` would show (the 2-bit kernels add four times the odd fields' codes).
    #[test]
    fn kernels_are_exact_at_the_largest_codes_and_activations() {
        let (rows, cols) = (32, 256);
        for (bits, group) in [(2, 32), (2, 64), (4, 32)] {
            let qs = vec![0xFF; rows * cols * bits as usize / 8];
            let d = vec![0x3C00; rows * cols / group];
            let mut q = LowBitMatrix::from_parts(bits, group, rows, cols, qs, d).unwrap();
            let top = ((1u32 << bits) - 1) as f64 / 2.0;
            for (sign, m) in [(1f32, 1), (-1f32, 1), (1f32, 4), (-1f32, 3)] {
                let x = vec![sign; m * cols];
                // every weight is `top` and every input `sign`; the activation scale 1/127
                // rounds, so the sums agree to f32's precision (a wrapped or saturated sum
                // would be off by a third or more)
                let want = sign as f64 * top * cols as f64;
                for grouped in [false, true] {
                    q.set_grouped(grouped);
                    for (name, k) in families() {
                        for g in q.matmul_with(&x, m, k) {
                            assert!(
                                (g as f64 - want).abs() < 1e-5 * want.abs(),
                                "{bits}-bit g{group} {name} grouped {grouped} m {m}: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The group layout is a permutation: the row-layout parts, the dequantized matrix and
    /// the embedding rows are unchanged by it, and so is a concatenation of grouped matrices.
    #[test]
    fn the_group_layout_round_trips() {
        for (bits, group, rows, cols) in [(2, 32, 37, 96), (4, 32, 48, 576), (2, 64, 16, 200)] {
            let w = randn(rows * cols, 11);
            let mut q = LowBitMatrix::quantize(&w, rows, cols, bits, group, None).unwrap();
            q.set_grouped(false);
            let (qs, d) = q.parts();
            let (qs, d) = (qs.into_owned(), d.into_owned());
            let deq = q.dequantize();
            let emb = q
                .rows_f32(&[0, 13, (rows - 1) as u32])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            q.set_grouped(true);
            assert!(q.grouped && rows >= groups::G);
            assert_ne!(q.qs, qs, "grouped bytes differ from the row layout");
            let (gq, gd) = q.parts();
            assert_eq!((gq.as_ref(), gd.as_ref()), (qs.as_slice(), d.as_slice()));
            assert_eq!(q.dequantize(), deq);
            let e2 = q
                .rows_f32(&[0, 13, (rows - 1) as u32])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(e2, emb);
            q.set_grouped(false);
            assert_eq!(
                (q.qs.as_slice(), q.d.as_slice()),
                (qs.as_slice(), d.as_slice())
            );
            // a concatenation of a grouped and a row-layout matrix multiplies as the two do
            let mut a = q.clone();
            a.set_grouped(true);
            let b =
                LowBitMatrix::quantize(&randn(21 * cols, 12), 21, cols, bits, group, None).unwrap();
            let mut b = b;
            b.set_grouped(false);
            let c = LowBitMatrix::concat_rows(&[&a, &b]).unwrap();
            assert!(c.grouped);
            // grouped parts with whole groups: their bytes concatenated are the whole's
            // group layout, equal to regrouping the row layout of the whole
            let mut b16 =
                LowBitMatrix::quantize(&randn(32 * cols, 14), 32, cols, bits, group, None).unwrap();
            b16.set_grouped(true);
            let mut a2 = a.clone();
            if rows % groups::G == 0 {
                let fast = LowBitMatrix::concat_rows(&[&b16, &a2]).unwrap();
                a2.set_grouped(false);
                b16.set_grouped(false);
                let mut slow = LowBitMatrix::concat_rows(&[&b16, &a2]).unwrap();
                slow.set_grouped(true);
                assert!(fast.grouped);
                assert_eq!((&fast.qs, &fast.d), (&slow.qs, &slow.d));
            }
            let x = randn(3 * cols, 13);
            let (ya, yb, yc) = (a.matmul(&x, 3), b.matmul(&x, 3), c.matmul(&x, 3));
            for i in 0..3 {
                let both: Vec<f32> = ya[i * rows..(i + 1) * rows]
                    .iter()
                    .chain(&yb[i * 21..(i + 1) * 21])
                    .copied()
                    .collect();
                let got = &yc[i * (rows + 21)..(i + 1) * (rows + 21)];
                for (g, e) in got.iter().zip(&both) {
                    assert!((g - e).abs() < 1e-4 * e.abs().max(1.0), "{g} vs {e}");
                }
            }
        }
    }

    /// The codes lie on the paper's grid and PTQ is close to the weights it came from.
    #[test]
    fn quantize_uses_the_grid_and_is_near_the_weights() {
        let (rows, cols) = (16, 256);
        let w = randn(rows * cols, 3);
        let q = LowBitMatrix::quantize(&w, rows, cols, 2, 32, None).unwrap();
        let d = q.dequantize();
        let scales = q.parts().1.into_owned();
        for (g, chunk) in d.chunks(32).enumerate() {
            let s = h(scales[g]);
            for v in chunk {
                let k = v / s;
                assert!(
                    [-1.5f32, -0.5, 0.5, 1.5]
                        .iter()
                        .any(|c| (k - c).abs() < 1e-4),
                    "{k}"
                );
            }
        }
        let rel = |d: &[f32]| {
            let e: f32 = d.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum();
            let n: f32 = w.iter().map(|a| a * a).sum();
            (e / n).sqrt()
        };
        // the optimal 4-level quantizer of a Gaussian has relative RMS error ~0.34
        assert!(rel(&d) < 0.36, "2-bit {}", rel(&d));
        let q4 = LowBitMatrix::quantize(&w, rows, cols, 4, 32, None).unwrap();
        assert!(
            rel(&q4.dequantize()) < 0.1,
            "4-bit {}",
            rel(&q4.dequantize())
        );
        // rows read back as embeddings equal the dequantized matrix
        let r = q.rows_f32(&[3, 0]).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(r[0], d[3 * cols..4 * cols]);
        assert!(q.rows_f32(&[16]).is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(LowBitMatrix::quantize(&[0.0; 64], 1, 64, 3, 32, None).is_err());
        assert!(LowBitMatrix::quantize(&[0.0; 64], 1, 64, 2, 48, None).is_err());
        assert!(LowBitMatrix::quantize(&[0.0; 63], 1, 64, 2, 32, None).is_err());
        assert!(LowBitMatrix::quantize(&[f32::NAN; 64], 1, 64, 2, 32, None).is_err());
        assert!(LowBitMatrix::from_parts(2, 32, 1, 64, vec![0; 15], vec![0; 2]).is_err());
        let nan = f16::from_f32(f32::NAN).to_bits();
        assert!(LowBitMatrix::from_parts(2, 32, 1, 64, vec![0; 16], vec![nan, 0]).is_err());
        // an all-zero matrix quantizes to zero scales and multiplies to zero
        let z = LowBitMatrix::quantize(&[0.0; 128], 2, 64, 2, 32, None).unwrap();
        assert!(z.matmul(&[1.0; 64], 1).iter().all(|v| *v == 0.0));
    }

    #[test]
    fn importance_lowers_the_weighted_error() {
        let (rows, cols) = (8, 128);
        let w = randn(rows * cols, 5);
        let imp: Vec<f32> = (0..cols)
            .map(|j| if j % 7 == 0 { 50.0 } else { 1.0 })
            .collect();
        let werr = |q: &LowBitMatrix| -> f32 {
            let d = q.dequantize();
            d.iter()
                .zip(&w)
                .enumerate()
                .map(|(i, (a, b))| imp[i % cols] * (a - b) * (a - b))
                .sum()
        };
        let plain = LowBitMatrix::quantize(&w, rows, cols, 2, 32, None).unwrap();
        let weighted = LowBitMatrix::quantize(&w, rows, cols, 2, 32, Some(&imp)).unwrap();
        assert!(werr(&weighted) < werr(&plain));
    }
}
