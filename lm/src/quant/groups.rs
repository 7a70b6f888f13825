//! Q4_1 and Q8_0 weights with rows interleaved in groups of [`G`], for the AVX-512 VNNI
//! kernels (and the AVX2 ones, which take the 16 rows as two halves of 8).
//!
//! In the row layout ([`super::QMatrix`]) every product of one weight row with one activation
//! row ends in a 16-lane vector that is scaled (`d_w * d_x` per pair of blocks) and summed
//! horizontally, so a step's cost grows with every activation row a batch adds. Here 16
//! weight rows share each 512-bit register: lane `i` of a `vpdpbusd` holds row `i`'s running
//! integer dot product, one block's 32 products in 8 instructions against broadcast
//! activation bytes, and one convert + one FMA scales all 16 rows' block sums at once (their
//! 16 `d` and 16 `m` are one vector). No horizontal sums: the 16 lanes are the 16 outputs.
//!
//! # Layout
//! The same bytes as the row layout, permuted. Rows `0 .. rows / G * G` form groups; group
//! `g`, block `b` holds `16 * G` quant bytes at `(g * nb + b) * 16 * G`: for `l` in `0..4`,
//! row `i` in `0..G`, byte `t` in `0..4`, at `l * 4 * G + i * 4 + t`, the byte
//! `e(8l + t) | e(8l + 4 + t) << 4`, where `e(k)` is the `k`-th 4-bit value of row
//! `g * G + i`'s block `b`. So a 64-byte load `l` gives, masked, values `8l .. 8l + 4` of all
//! 16 rows (four bytes each, one lane per row) and, shifted, values `8l + 4 .. 8l + 8`. The
//! block scales `d` and mins `m` of the group sit at `(g * nb + b) * G + i`. Rows past the
//! last whole group keep the row layout at their usual offsets.
//!
//! Q8_0 groups hold `32 * G` bytes per block: for `l` in `0..8`, at `l * 4 * G + i * 4 + t`,
//! value `4l + t` of row `i` (signed). `vpdpbusd` multiplies unsigned by signed bytes, so
//! the activations enter as `x + 128` and each row-block's sum of weights `sum_k q_k` (an
//! i16, kept in the `m` array, which Q8_0 has no other use for) takes `128 * sum_k q_k` off
//! the integer dot product: `sum (x + 128) q - 128 sum q = sum x q`, exactly.

use super::{Act, QKind, QK};

/// Rows per group: one 512-bit lane of 4 bytes per row.
pub(super) const G: usize = 16;

/// The `k`-th 4-bit value (`0..32`) of a Q4_1 block's 16 quant bytes.
#[inline(always)]
fn nib(q: &[u8], k: usize) -> u8 {
    if k < 16 {
        q[k] & 0x0F
    } else {
        q[k - 16] >> 4
    }
}

/// Offset of quant byte `(l, i, t)` inside a group's block.
#[inline(always)]
fn at(l: usize, i: usize, t: usize) -> usize {
    l * 4 * G + i * 4 + t
}

/// Quant bytes of one block of one row.
fn qb(kind: QKind) -> usize {
    kind.qs_bytes()
}

/// Row `i`'s block in the group's form, from the row layout's quant bytes.
fn put_block(kind: QKind, dst: &mut [u8], i: usize, blk: &[u8]) {
    match kind {
        QKind::Q4_1 => {
            for l in 0..4 {
                for t in 0..4 {
                    dst[at(l, i, t)] = nib(blk, 8 * l + t) | nib(blk, 8 * l + 4 + t) << 4;
                }
            }
        }
        QKind::Q8_0 => {
            for l in 0..8 {
                dst[l * 4 * G + i * 4..l * 4 * G + i * 4 + 4]
                    .copy_from_slice(&blk[4 * l..4 * l + 4]);
            }
        }
    }
}

/// Row `i`'s block in the row layout's form, from the group's quant bytes.
fn get_block(kind: QKind, src: &[u8], i: usize) -> [u8; 32] {
    let mut out = [0u8; 32];
    match kind {
        QKind::Q4_1 => {
            let mut e = [0u8; 32];
            for l in 0..4 {
                for t in 0..4 {
                    let v = src[at(l, i, t)];
                    e[8 * l + t] = v & 0x0F;
                    e[8 * l + 4 + t] = v >> 4;
                }
            }
            for k in 0..16 {
                out[k] = e[k] | e[k + 16] << 4;
            }
        }
        QKind::Q8_0 => {
            for l in 0..8 {
                out[4 * l..4 * l + 4]
                    .copy_from_slice(&src[l * 4 * G + i * 4..l * 4 * G + i * 4 + 4]);
            }
        }
    }
    out
}

/// The sums of weights `sum_k q_k` of every Q8_0 row-block (row layout order), as i16 bits.
pub(super) fn q8_sums(qs: &[u8]) -> Vec<u16> {
    qs.chunks_exact(32)
        .map(|b| b.iter().map(|&q| q as i8 as i16).sum::<i16>() as u16)
        .collect()
}

/// Permutes the first `rows / G * G` rows of a row-layout matrix into groups (`m`: Q4_1
/// mins, or Q8_0 weight sums from [`q8_sums`]).
pub(super) fn interleave(
    kind: QKind,
    qs: &mut [u8],
    d: &mut [u16],
    m: &mut [u16],
    rows: usize,
    nb: usize,
) {
    permute(kind, (qs, d, m), rows, nb, true)
}

/// The inverse of [`interleave`].
pub(super) fn deinterleave(
    kind: QKind,
    qs: &mut [u8],
    d: &mut [u16],
    m: &mut [u16],
    rows: usize,
    nb: usize,
) {
    permute(kind, (qs, d, m), rows, nb, false)
}

/// Each group's arrays from the row layout into the group layout (`to_groups`) or back.
fn permute(
    kind: QKind,
    (qs, d, m): (&mut [u8], &mut [u16], &mut [u16]),
    rows: usize,
    nb: usize,
    to_groups: bool,
) {
    let q = qb(kind);
    for g in 0..rows / G {
        let base = g * G * nb;
        let src_q = qs[base * q..(base + G * nb) * q].to_vec();
        let src_d = d[base..base + G * nb].to_vec();
        let src_m = m[base..base + G * nb].to_vec();
        for b in 0..nb {
            for i in 0..G {
                // block b of the group's row i: its index in either layout
                let (by_row, by_group) = (i * nb + b, b * G + i);
                if to_groups {
                    let dst = &mut qs[(base + b * G) * q..(base + (b + 1) * G) * q];
                    put_block(kind, dst, i, &src_q[by_row * q..(by_row + 1) * q]);
                    d[base + by_group] = src_d[by_row];
                    m[base + by_group] = src_m[by_row];
                } else {
                    let blk = get_block(kind, &src_q[b * G * q..(b + 1) * G * q], i);
                    qs[(base + by_row) * q..(base + by_row + 1) * q].copy_from_slice(&blk[..q]);
                    d[base + by_row] = src_d[by_group];
                    m[base + by_row] = src_m[by_group];
                }
            }
        }
    }
}

/// Row `r`'s block `b` in the row layout's form (quant bytes, the first 16 for Q4_1; `d`;
/// `m`), read from the grouped arrays; `r` must lie in a whole group.
pub(super) fn block_of(
    kind: QKind,
    qs: &[u8],
    d: &[u16],
    m: &[u16],
    nb: usize,
    r: usize,
    b: usize,
) -> ([u8; 32], u16, u16) {
    let (g, i) = (r / G, r % G);
    let gb = g * nb + b;
    let q = qb(kind);
    let blk = get_block(kind, &qs[gb * q * G..(gb + 1) * q * G], i);
    (blk, d[gb * G + i], m.get(gb * G + i).copied().unwrap_or(0))
}

/// One group's arrays: quants `(nb, 16 * G)` (Q4_1) or `(nb, 32 * G)` (Q8_0), scales and
/// mins or weight sums `(nb, G)`.
#[derive(Clone, Copy)]
pub(super) struct Group<'a> {
    pub kind: QKind,
    pub qs: &'a [u8],
    pub d: &'a [u16],
    pub m: &'a [u16],
}

/// A group's 16 rows against activation rows `c0 .. c0 + C`: `out[c][i]` is row `i`. The
/// activations of a Q8_0 group are `x + 128` ([`flipped`]).
pub(super) type GroupKernel<const C: usize> = fn(Group<'_>, &Act, usize, usize) -> [[f32; G]; C];

/// Activations as the Q8_0 group kernels read them: each byte `x + 128` (unsigned).
pub(super) fn flipped(a: &Act) -> Act {
    let (mut qs, mut d, mut s) = super::take_spare(a.qs.len()).unwrap_or_default();
    qs.clear();
    qs.extend(a.qs.iter().map(|&q| q ^ 0x80));
    d.clear();
    d.extend_from_slice(&a.d);
    s.clear();
    s.extend_from_slice(&a.s);
    Act { qs, d, s, nb: a.nb }
}

/// The portable definition, in the order of the SIMD kernels so that the two agree bit for
/// bit: per row and block the exact integer dot product of the 32 values, added as
/// `(d_w * d_x).mul_add(dot, acc)`; for Q4_1 the mins as `m.mul_add(s, acc_m)`; the
/// result `acc + acc_m`.
pub(super) fn scalar<const C: usize>(
    w: Group<'_>,
    a: &Act,
    c0: usize,
    cols: usize,
) -> [[f32; G]; C] {
    let nb = cols / QK;
    let q = qb(w.kind);
    let mut out = [[0f32; G]; C];
    for (c, o) in out.iter_mut().enumerate() {
        let col = c0 + c;
        let y = &a.qs[col * cols..(col + 1) * cols];
        for (i, oi) in o.iter_mut().enumerate() {
            let (mut acc, mut accm) = (0f32, 0f32);
            for b in 0..nb {
                let blk = get_block(w.kind, &w.qs[b * q * G..(b + 1) * q * G], i);
                let y = &y[b * QK..(b + 1) * QK];
                let dot: i32 = match w.kind {
                    QKind::Q4_1 => (0..QK)
                        .map(|k| nib(&blk, k) as i32 * y[k] as i8 as i32)
                        .sum(),
                    QKind::Q8_0 => (0..QK)
                        .map(|k| blk[k] as i8 as i32 * (y[k] ^ 0x80) as i8 as i32)
                        .sum(),
                };
                let dw = super::h(w.d[b * G + i]);
                acc = (dw * a.d[col * nb + b]).mul_add(dot as f32, acc);
                if w.kind == QKind::Q4_1 {
                    let mw = super::h(w.m[b * G + i]);
                    accm = mw.mul_add(a.s[col * nb + b], accm);
                }
            }
            *oi = acc + accm;
        }
    }
    out
}

/// Panics unless group `w` (`cols` wide) and activation rows `c0 .. c0 + c` hold every value
/// a SIMD kernel reads: the bound its `unsafe` loads rely on.
fn check_bounds(w: &Group<'_>, a: &Act, c0: usize, c: usize, cols: usize) {
    let nb = cols / QK;
    assert!(
        w.qs.len() == nb * w.kind.qs_bytes() * G
            && w.d.len() == nb * G
            && w.m.len() == nb * G
            && a.qs.len() >= (c0 + c) * cols
            && a.d.len() >= (c0 + c) * nb
            && a.s.len() >= (c0 + c) * nb
    );
}

crate::isa::group_kernels!(GroupKernel, kernel_vnni);

/// How far ahead of the block in hand the SIMD kernels prefetch a group's quant bytes: 8
/// blocks (2 KiB of Q4_1, 4 KiB of Q8_0). With four activation rows the products take about
/// as long as the weight stream; the hardware prefetcher, restarted on every task's run of
/// groups, left them waiting on it (stream_speed: the 4-row Q4_1 matmuls of a SmolLM2 step
/// 3.6 -> 3.0 ms; the 1-row time unchanged).
const PREFETCH_BLOCKS: usize = 8;

/// Prefetches block `b + PREFETCH_BLOCKS` of the group quants at `q` (`bb` bytes per block)
/// into L1. Past the group's end that is the next group's bytes, or nothing of use.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(q: *const u8, b: usize, bb: usize) {
    crate::isa::prefetch_lines(q.wrapping_add((b + PREFETCH_BLOCKS) * bb), bb);
}

/// Whether matrices of `kind` are grouped at kernel level `isa`: both kinds from AVX2 up
/// (AVX2's Q8_0 kernel takes the sign trick, `|w| * sign(y, w)`, as the row kernels do:
/// `vpmaddubsw` would saturate on the biased activations).
pub(super) fn grouped_at(kind: QKind, isa: crate::isa::Isa) -> bool {
    let _ = kind;
    isa.min(crate::isa::detected()) >= crate::isa::Isa::Avx2
}

impl GroupKernels {
    /// Activation rows `c0 .. c0 + n` (`n` in 1..=4) against group `w`, into `r[..n]`.
    fn run(&self, w: Group<'_>, a: &Act, c0: usize, n: usize, cols: usize, r: &mut [[f32; G]; 4]) {
        match n {
            4 => *r = (self.k4)(w, a, c0, cols),
            3 => r[..3].copy_from_slice(&(self.k3)(w, a, c0, cols)),
            2 => r[..2].copy_from_slice(&(self.k2)(w, a, c0, cols)),
            _ => r[0] = (self.k1)(w, a, c0, cols)[0],
        }
    }
}

/// `(m, cols) @ W^T` for the grouped rows `0 .. groups * G` into `out` (`(m, rows)`), the
/// groups split over the pool ([`crate::par::row_groups`]). `act` holds the activations in
/// the plain (unpaired) layout.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    k: GroupKernels,
    kind: QKind,
    qs: &[u8],
    d: &[u16],
    mm: &[u16],
    groups: usize,
    rows: usize,
    cols: usize,
    act: &Act,
    m: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let nb = cols / QK;
    let q = qb(kind);
    assert!(
        groups * G <= rows
            && qs.len() >= groups * nb * q * G
            && d.len() >= groups * nb * G
            && mm.len() >= groups * nb * G
            && act.qs.len() == m * cols
            && act.d.len() == m * nb
            && act.s.len() == m * nb
            && out.len() == m * rows
    );
    crate::par::row_groups::<G>(groups, rows, m, out, |g, c0, n, r| {
        let w = Group {
            kind,
            qs: &qs[g * nb * q * G..(g + 1) * nb * q * G],
            d: &d[g * nb * G..(g + 1) * nb * G],
            m: &mm[g * nb * G..(g + 1) * nb * G],
        };
        k.run(w, act, c0, n, cols, r)
    });
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Act, Group, QKind, G, QK};
    use std::arch::x86_64::*;

    pub fn kernel<const C: usize>(w: Group<'_>, a: &Act, c0: usize, cols: usize) -> [[f32; G]; C] {
        let nb = cols / QK;
        super::check_bounds(&w, a, c0, C, cols);
        // SAFETY: `GroupKernels::avx512` hands out this kernel only when the CPU has
        // AVX-512 F/BW/VL/VNNI with AVX2/FMA/F16C (`Isa::Avx512`); the assert keeps every
        // load below inside the slices.
        unsafe {
            match w.kind {
                QKind::Q4_1 => q4_1::<C>(nb, w, a, c0, cols),
                QKind::Q8_0 => q8_0::<C>(nb, w, a, c0, cols),
            }
        }
    }

    /// One block's 32 products for the group's 16 rows: `x[k]` holds values `4k .. 4k + 4` of
    /// every row, `y` the activation row's 32 bytes; two chains of four `vpdpbusd`, so the
    /// products of one row need not wait on each other. `vpdpbusd` takes unsigned bytes
    /// first: the weights for Q4_1 (`ACT_FIRST` false), the biased activations for Q8_0.
    ///
    /// # Safety
    /// `y` must be valid for 32 bytes; the caller runs with AVX-512 F/VNNI.
    #[inline(always)]
    unsafe fn block_dot<const ACT_FIRST: bool>(x: &[__m512i; 8], y: *const i32) -> __m512i {
        let mut s = [_mm512_setzero_si512(); 2];
        for k in 0..8 {
            // SAFETY: k < 8, so the 4 bytes at y + 4k lie in the 32 the caller vouches for.
            let v = _mm512_set1_epi32(unsafe { std::ptr::read_unaligned(y.add(k)) });
            s[k % 2] = if ACT_FIRST {
                _mm512_dpbusd_epi32(s[k % 2], v, x[k])
            } else {
                _mm512_dpbusd_epi32(s[k % 2], x[k], v)
            };
        }
        _mm512_add_epi32(s[0], s[1])
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn q4_1<const C: usize>(
        nb: usize,
        w: Group<'_>,
        a: &Act,
        c0: usize,
        cols: usize,
    ) -> [[f32; G]; C] {
        let mask = _mm512_set1_epi8(0x0F);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); C];
        let mut accm = [_mm512_setzero_ps(); C];
        let q = w.qs.as_ptr();
        for b in 0..nb {
            let base = q.add(b * 16 * G);
            super::prefetch_ahead(q, b, 16 * G);
            let mut x = [zero; 8];
            for l in 0..4 {
                let v = _mm512_loadu_si512(base.add(l * 64) as *const _);
                x[2 * l] = _mm512_and_si512(v, mask);
                x[2 * l + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(b * G) as *const _));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(w.m.as_ptr().add(b * G) as *const _));
            for c in 0..C {
                let col = c0 + c;
                let y = a.qs.as_ptr().add(col * cols + b * QK) as *const i32;
                let dot = _mm512_cvtepi32_ps(block_dot::<false>(&x, y));
                let dx = _mm512_set1_ps(*a.d.get_unchecked(col * nb + b));
                acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, dx), acc[c]);
                let sx = _mm512_set1_ps(*a.s.get_unchecked(col * nb + b));
                accm[c] = _mm512_fmadd_ps(mw, sx, accm[c]);
            }
        }
        let mut out = [[0f32; G]; C];
        for c in 0..C {
            _mm512_storeu_ps(out[c].as_mut_ptr(), _mm512_add_ps(acc[c], accm[c]));
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn q8_0<const C: usize>(
        nb: usize,
        w: Group<'_>,
        a: &Act,
        c0: usize,
        cols: usize,
    ) -> [[f32; G]; C] {
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); C];
        let q = w.qs.as_ptr();
        for b in 0..nb {
            let base = q.add(b * 32 * G);
            super::prefetch_ahead(q, b, 32 * G);
            let mut x = [zero; 8];
            for (l, xl) in x.iter_mut().enumerate() {
                *xl = _mm512_loadu_si512(base.add(l * 64) as *const _);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(b * G) as *const _));
            // 128 * the rows' weight sums, taken off the biased products
            let bias = _mm512_slli_epi32(
                _mm512_cvtepi16_epi32(_mm256_loadu_si256(w.m.as_ptr().add(b * G) as *const _)),
                7,
            );
            for (c, ac) in acc.iter_mut().enumerate() {
                let col = c0 + c;
                let y = a.qs.as_ptr().add(col * cols + b * QK) as *const i32;
                let dot = _mm512_sub_epi32(block_dot::<true>(&x, y), bias);
                let dx = _mm512_set1_ps(*a.d.get_unchecked(col * nb + b));
                *ac = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), *ac);
            }
        }
        let mut out = [[0f32; G]; C];
        for (o, a) in out.iter_mut().zip(acc) {
            // + 0 as the portable definition adds its (absent) min term: -0 becomes +0
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_add_ps(a, _mm512_setzero_ps()));
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod simd256 {
    use super::{Act, Group, QKind, G, QK};
    use std::arch::x86_64::*;

    pub fn kernel<const C: usize>(w: Group<'_>, a: &Act, c0: usize, cols: usize) -> [[f32; G]; C] {
        let nb = cols / QK;
        super::check_bounds(&w, a, c0, C, cols);
        let mut out = [[0f32; G]; C];
        if C == 1 {
            // SAFETY: `GroupKernels::avx2` hands out this kernel only when the CPU has AVX2,
            // FMA and F16C; `check_bounds` (one activation row from c0) keeps every load of
            // the one-row kernels inside the slices.
            out[0] = unsafe {
                match w.kind {
                    QKind::Q4_1 => q4_1_one(nb, w, a, c0, cols),
                    QKind::Q8_0 => q8_0_one(nb, w, a, c0, cols),
                }
            };
            return out;
        }
        for half in 0..2 {
            // SAFETY: `GroupKernels::avx2` hands out this kernel only when the CPU has AVX2,
            // FMA and F16C; the assert keeps every load below inside the slices.
            let o = unsafe {
                match w.kind {
                    QKind::Q4_1 => q4_1::<C>(nb, w, a, c0, cols, half),
                    QKind::Q8_0 => q8_0::<C>(nb, w, a, c0, cols, half),
                }
            };
            for (oc, h) in out.iter_mut().zip(o) {
                oc[half * 8..half * 8 + 8].copy_from_slice(&h);
            }
        }
        out
    }

    /// [`kernel`] on a CPU with the 256-bit `vpdpbusd`: one activation row of Q4_1 (a decode
    /// step) takes [`q4_1_one_avxvnni`] or [`q4_1_one_evex`]; Q8_0 and more rows stay on the
    /// AVX2 kernels.
    pub fn kernel_vnni<const C: usize>(
        w: Group<'_>,
        a: &Act,
        c0: usize,
        cols: usize,
    ) -> [[f32; G]; C] {
        if C != 1 || w.kind != QKind::Q4_1 {
            return kernel::<C>(w, a, c0, cols);
        }
        let nb = cols / QK;
        super::check_bounds(&w, a, c0, 1, cols);
        let mut out = [[0f32; G]; C];
        // SAFETY: `GroupKernels::avx2_vnni` hands out this kernel only when the CPU has AVX2,
        // FMA, F16C and AVX-VNNI (then `has_avx_vnni`) or AVX-512 VNNI + VL (its level is at
        // least `Avx2Vnni`); `check_bounds` (one activation row from c0) keeps every load
        // inside the slices.
        out[0] = unsafe {
            if crate::isa::has_avx_vnni() {
                q4_1_one_avxvnni(nb, w, a, c0, cols)
            } else {
                q4_1_one_evex(nb, w, a, c0, cols)
            }
        };
        out
    }

    /// Generates the kernel for one activation row of Q4_1 (a decode step), both halves of
    /// the group in one pass: each broadcast of activation bytes and scales serves all 16
    /// rows.
    ///
    /// `|t, x, y| step` and `|s| widen` sum the products per half of the group
    /// ([`crate::isa::dot_step_variants`] gives them for AVX2 and both VNNI forms): the exact
    /// integer sums, and the float steps after them are [`q4_1`]'s: the same bits.
    macro_rules! q4_1_one {
        ($(#[$attr:meta])* $name:ident, $parts:literal,
         |$t:ident, $x:ident, $y:ident| $step:expr,
         |$s:ident| $widen:expr,
         // Q4_1's codes are unscaled: no quarter sum
         |$_q:ident| $_quarter:expr) => {
            $(#[$attr])*
            ///
            /// # Safety
            /// The CPU must have the features enabled above, and `check_bounds(&w, a, c0, 1,
            /// cols)` must hold.
            unsafe fn $name(nb: usize, w: Group<'_>, a: &Act, c0: usize, cols: usize) -> [f32; G] {
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); 2];
                let mut accm = [_mm256_setzero_ps(); 2];
                let q = w.qs.as_ptr();
                for b in 0..nb {
                    super::prefetch_ahead(q, b, 16 * G);
                    let base = q.add(b * 16 * G);
                    let y = a.qs.as_ptr().add(c0 * cols + b * QK) as *const i32;
                    // [half][partial sum]
                    let mut t = [[_mm256_setzero_si256(); 2]; 2];
                    for l in 0..4 {
                        let ylo = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(2 * l)));
                        let yhi = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(2 * l + 1)));
                        for (h, th) in t.iter_mut().enumerate() {
                            let v =
                                _mm256_loadu_si256(base.add(l * 64 + h * 32) as *const __m256i);
                            let lo = _mm256_and_si256(v, mask);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                            for (x, yv) in [(lo, ylo), (hi, yhi)] {
                                let ($t, $x, $y) = (th[l % $parts], x, yv);
                                th[l % $parts] = $step;
                            }
                        }
                    }
                    let dx = _mm256_set1_ps(*a.d.get_unchecked(c0 * nb + b));
                    let sx = _mm256_set1_ps(*a.s.get_unchecked(c0 * nb + b));
                    for h in 0..2 {
                        let at = b * G + h * 8;
                        let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                            w.d.as_ptr().add(at) as *const __m128i
                        ));
                        let mw = _mm256_cvtph_ps(_mm_loadu_si128(
                            w.m.as_ptr().add(at) as *const __m128i
                        ));
                        let $s = t[h];
                        let dot = _mm256_cvtepi32_ps($widen);
                        acc[h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, dx), acc[h]);
                        accm[h] = _mm256_fmadd_ps(mw, sx, accm[h]);
                    }
                }
                let mut out = [0f32; G];
                for h in 0..2 {
                    _mm256_storeu_ps(out.as_mut_ptr().add(h * 8), _mm256_add_ps(acc[h], accm[h]));
                }
                out
            }
        };
    }
    crate::isa::dot_step_variants!(q4_1_one, q4_1_one, q4_1_one_avxvnni, q4_1_one_evex);

    /// [`q8_0`] for one activation row, both halves of the group in one pass (as
    /// [`q4_1_one`]); the same bits.
    ///
    /// # Safety
    /// As [`q4_1_one`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_one(nb: usize, w: Group<'_>, a: &Act, c0: usize, cols: usize) -> [f32; G] {
        let ones = _mm256_set1_epi16(1);
        let bias = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); 2];
        let q = w.qs.as_ptr();
        for b in 0..nb {
            super::prefetch_ahead(q, b, 32 * G);
            let p = a.qs.as_ptr().add(c0 * cols + b * QK) as *const __m256i;
            let mut y = [0i32; 8];
            let yb = _mm256_xor_si256(_mm256_loadu_si256(p), bias);
            _mm256_storeu_si256(y.as_mut_ptr() as *mut __m256i, yb);
            let base = q.add(b * 32 * G);
            let mut t = [_mm256_setzero_si256(); 2];
            for (l, &yl) in y.iter().enumerate() {
                let yv = _mm256_set1_epi32(yl);
                for (h, th) in t.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(base.add(l * 64 + h * 32) as *const __m256i);
                    let pr = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(yv, v));
                    *th = _mm256_add_epi32(*th, _mm256_madd_epi16(pr, ones));
                }
            }
            let dx = _mm256_set1_ps(*a.d.get_unchecked(c0 * nb + b));
            for h in 0..2 {
                let at = b * G + h * 8;
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(at) as *const __m128i));
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[h]), _mm256_mul_ps(dw, dx), acc[h]);
            }
        }
        let mut out = [0f32; G];
        for (h, a) in acc.iter().enumerate() {
            // + 0 as the portable definition adds its (absent) min term: -0 becomes +0
            _mm256_storeu_ps(
                out.as_mut_ptr().add(h * 8),
                _mm256_add_ps(*a, _mm256_setzero_ps()),
            );
        }
        out
    }

    /// Rows `8 * half .. 8 * half + 8` of a Q4_1 group: per block and activation row, the
    /// eight `vpmaddubsw` products of the 32 values summed in i16 (at most 8 * 2 * 15 * 127
    /// = 30,480: no saturation; activations lie in -127..=127), widened by one `vpmaddwd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1<const C: usize>(
        nb: usize,
        w: Group<'_>,
        a: &Act,
        c0: usize,
        cols: usize,
        half: usize,
    ) -> [[f32; 8]; C] {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); C];
        let mut accm = [_mm256_setzero_ps(); C];
        let q = w.qs.as_ptr();
        for b in 0..nb {
            if half == 0 {
                // the second half finds the group's bytes in L1
                super::prefetch_ahead(q, b, 16 * G);
            }
            let base = q.add(b * 16 * G + half * 32);
            let mut t = [_mm256_setzero_si256(); C];
            for l in 0..4 {
                let v = _mm256_loadu_si256(base.add(l * 64) as *const __m256i);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                for (c, tc) in t.iter_mut().enumerate() {
                    let y = a.qs.as_ptr().add((c0 + c) * cols + b * QK) as *const i32;
                    let ylo = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(2 * l)));
                    let yhi = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(2 * l + 1)));
                    *tc = _mm256_add_epi16(*tc, _mm256_maddubs_epi16(lo, ylo));
                    *tc = _mm256_add_epi16(*tc, _mm256_maddubs_epi16(hi, yhi));
                }
            }
            let at = b * G + half * 8;
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(at) as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr().add(at) as *const __m128i));
            for c in 0..C {
                let col = c0 + c;
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(t[c], ones));
                let dx = _mm256_set1_ps(*a.d.get_unchecked(col * nb + b));
                acc[c] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, dx), acc[c]);
                let sx = _mm256_set1_ps(*a.s.get_unchecked(col * nb + b));
                accm[c] = _mm256_fmadd_ps(mw, sx, accm[c]);
            }
        }
        let mut out = [[0f32; 8]; C];
        for (o, (a, m)) in out.iter_mut().zip(acc.into_iter().zip(accm)) {
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(a, m));
        }
        out
    }

    /// Rows `8 * half .. 8 * half + 8` of a Q8_0 group. The activations come biased (`x +
    /// 128`, [`super::flipped`], for the AVX-512 kernel): each block's 32 bytes are unbiased
    /// into `y` first. Per load `l` (values `4l .. 4l + 4` of the 8 rows) and activation row,
    /// `vpmaddubsw(|w|, sign(y, w))` gives each row's products `w * y` in pairs (at most 2 *
    /// 128 * 127 = 32,512: no saturation, also for a weight of -128, whose `|w|` is 128 as
    /// an unsigned byte), and `vpmaddwd` by ones adds each row's four into its lane: the
    /// exact integer dot product, scaled as the portable definition does.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0<const C: usize>(
        nb: usize,
        w: Group<'_>,
        a: &Act,
        c0: usize,
        cols: usize,
        half: usize,
    ) -> [[f32; 8]; C] {
        let ones = _mm256_set1_epi16(1);
        let bias = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); C];
        let q = w.qs.as_ptr();
        for b in 0..nb {
            if half == 0 {
                super::prefetch_ahead(q, b, 32 * G);
            }
            // the activation rows' block, unbiased
            let mut y = [[0i32; 8]; C];
            for (c, yc) in y.iter_mut().enumerate() {
                let p = a.qs.as_ptr().add((c0 + c) * cols + b * QK) as *const __m256i;
                let v = _mm256_xor_si256(_mm256_loadu_si256(p), bias);
                _mm256_storeu_si256(yc.as_mut_ptr() as *mut __m256i, v);
            }
            let base = q.add(b * 32 * G + half * 32);
            let mut t = [_mm256_setzero_si256(); C];
            for l in 0..8 {
                let v = _mm256_loadu_si256(base.add(l * 64) as *const __m256i);
                let av = _mm256_sign_epi8(v, v);
                for (tc, yc) in t.iter_mut().zip(&y) {
                    let yv = _mm256_set1_epi32(yc[l]);
                    let p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(yv, v));
                    *tc = _mm256_add_epi32(*tc, _mm256_madd_epi16(p, ones));
                }
            }
            let at = b * G + half * 8;
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(at) as *const __m128i));
            for c in 0..C {
                let dx = _mm256_set1_ps(*a.d.get_unchecked((c0 + c) * nb + b));
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[c]), _mm256_mul_ps(dw, dx), acc[c]);
            }
        }
        let mut out = [[0f32; 8]; C];
        for (o, a) in out.iter_mut().zip(acc) {
            // + 0 as the portable definition adds its (absent) min term: -0 becomes +0
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(a, _mm256_setzero_ps()));
        }
        out
    }
}
