//! Small CPU kernels shared by the language and vision models: a vectorisable `exp`, a row
//! softmax, the language models' causal attention (one row at a time, `rows`, for f32, f16
//! and int8 caches), and a blocked attention on gemm for the vision encoder.

use crate::par::par_ranges;
use std::cell::RefCell;

mod rows;
pub use rows::KvElem;

/// `x` rounded to the nearest integer, ties to even, for `|x| < 2^22` (an int8 quantizer's
/// `v * 127 / amax`): adding and subtracting 1.5 * 2^23 lets the FPU's default rounding do
/// it, in plain arithmetic that LLVM vectorises. `f32::round_ties_even` is a `rintf` call per
/// value on the baseline x86-64 target (no SSE4.1 `roundps`); this equals it on that range
/// (NaN stays NaN).
#[inline(always)]
pub fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// `127 / amax`, or 0 when that is not finite: a zero block, and a block so small
/// (`amax < 127 / f32::MAX`) that the quotient overflows (an infinite factor made every code
/// saturate or wrap, and the sum of such codes overflow).
#[inline(always)]
pub(crate) fn inverse_scale(amax: f32) -> f32 {
    let id = 127.0 / amax;
    if amax != 0.0 && id.is_finite() {
        id
    } else {
        0.0
    }
}

/// One block of 32 values to int8 codes, eight at a time on AVX2, as the int8 activation
/// quantisers (`quant`'s Q8 rows, `lowbit`'s activation rows) define them: `q =
/// round_half_even(x * inverse_scale(amax))` with `amax` the largest magnitude. Returns
/// `(amax, sum of the codes, the codes)`, or `None` when the block holds a NaN or an
/// infinity: the caller's definition then handles it (a lanes' maximum need not pass NaNs
/// over as the definitions do). Elementwise IEEE products, the same rounding
/// ([`round_small`]), an order-free maximum and an integer sum, so the definitions' codes.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn round_block_avx2(x: &[f32; 32]) -> Option<(f32, i32, [u8; 32])> {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let magic = _mm256_set1_ps(12_582_912.0);
    // SAFETY: x holds 32 floats: four loads of 8.
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
    let mut m = _mm256_and_ps(v[0], abs_mask);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_and_ps(*vi, abs_mask));
    }
    // the lanes' maximum in lane 0, by halving (order-free for values that are not NaN)
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let nan = v.iter().fold(0, |n, vi| {
        n | _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(*vi, *vi))
    });
    if nan != 0 || !amax.is_finite() {
        return None;
    }
    let id = _mm256_set1_ps(inverse_scale(amax));
    let c: [__m256i; 4] = std::array::from_fn(|i| {
        let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v[i], id), magic), magic);
        _mm256_cvtps_epi32(r)
    });
    let sum8 = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum8),
        _mm256_extracti128_si256::<1>(sum8),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2)));
    // i32 -> i16 -> i8 packs interleave 128-bit lanes; the permutation restores the order
    let bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(
            _mm256_packs_epi32(c[0], c[1]),
            _mm256_packs_epi32(c[2], c[3]),
        ),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    );
    let mut q = [0u8; 32];
    // SAFETY: q holds 32 bytes.
    unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes) };
    Some((amax, sum, q))
}

/// `exp(x)` for f32 in plain arithmetic that LLVM vectorises: Cephes' `expf` (range reduction
/// by `ln 2` in two parts, a degree-6 polynomial, the exponent put in by bits). Relative error
/// below 2e-7 over the whole range; `exp(x) = 0` below -87.3 (so `-inf` gives exactly 0) and
/// saturates at `exp(88.72)`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    let xc = x.clamp(LO, 88.722_83);
    let n = floor_small(xc * LOG2E + 0.5);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = fmadd(1.987_569_1e-4, r, 1.398_2e-3);
    let p = fmadd(p, r, 8.333_452e-3);
    let p = fmadd(p, r, 4.166_579_6e-2);
    let p = fmadd(p, r, 0.166_666_65);
    let p = fmadd(p, r, 0.5);
    let p = fmadd(p * r, r, r) + 1.0;
    // 2^n by bits (|n| <= 128)
    let v = p * f32::from_bits(small_int(n).wrapping_add(127) << 23);
    if x < LO {
        0.0
    } else {
        v
    }
}

/// `floor(y)` for `|y| < 2^22` by [`round_small`] and a compare: on the baseline x86-64
/// target (no SSE4.1) `f32::floor` is a `floorf` call per value, which kept [`exp`] and so
/// the softmax scalar. Equal to `floor` on that range (test; `-0.0` gives `+0.0`, the same
/// `n` for [`exp`]), NaN stays NaN.
#[inline(always)]
fn floor_small(y: f32) -> f32 {
    let t = round_small(y);
    if t > y {
        t - 1.0
    } else {
        t
    }
}

/// `a * b + c`: one fused instruction where the build targets FMA (`target-cpu=native` on
/// any x86-64 of the last decade), a multiply and an add elsewhere (`mul_add` without the
/// feature is a slow library call).
#[inline(always)]
fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// `r` (|r| < 2^22) rounded to the nearest integer, ties to even (exact for an integer-valued
/// `r`), as two's-complement bits, by vector float and integer ops: `r as i32` is a
/// saturating conversion that LLVM emits lane by lane (it kept the whole softmax scalar).
/// Adding `1.5 * 2^23` lands where the spacing of f32 is 1, so the FPU's default rounding
/// rounds it and the integer sits in the low mantissa bits. NaN gives some value, not a
/// panic.
#[inline(always)]
pub(crate) fn small_int(r: f32) -> u32 {
    const MAGIC: f32 = 12_582_912.0;
    (r + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits())
}

/// The largest `f(x)` over `xs` (`init` when empty; NaNs are passed over), in 16 lanes so
/// that it vectorises (`f32::max` folds one by one because of its NaN rule).
#[inline(always)]
pub(crate) fn max_of(xs: &[f32], init: f32, f: impl Fn(f32) -> f32) -> f32 {
    let mut m = [init; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in m.iter_mut().zip(c) {
            let v = f(x);
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks.remainder().iter().map(|&x| f(x));
    m.into_iter().chain(tail).fold(init, f32::max)
}

/// Softmax of one row in place. A row whose every entry is `-inf` becomes all zeros.
#[inline]
pub fn softmax_in_place(row: &mut [f32]) {
    crate::isa::vectorized(
        #[inline(always)]
        || {
            let inv = exp_shifted_body(row);
            for x in row.iter_mut() {
                *x *= inv;
            }
        },
    )
}

/// The unnormalised softmax: `row[j] = exp(row[j] - max)`, returning `1 / sum` of the new
/// entries (the factor [`softmax_in_place`] multiplies by; attention applies it to the
/// `head_dim`-wide output row instead of the `keys`-wide probabilities). A row whose every
/// entry is `-inf` becomes all zeros and the factor is 0.
///
/// Runs at the vector width of the CPU ([`crate::isa::vectorized`]), the same bits at every
/// width.
#[inline]
pub fn exp_shifted_in_place(row: &mut [f32]) -> f32 {
    crate::isa::vectorized(
        #[inline(always)]
        || exp_shifted_body(row),
    )
}

#[inline(always)]
fn exp_shifted_body(row: &mut [f32]) -> f32 {
    let mx = max_of(row, f32::NEG_INFINITY, |x| x);
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return 0.0;
    }
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - mx);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - mx);
        sum += *x;
    }
    1.0 / sum
}

/// Rows per task of [`causal_attention`] from this many rows on (each task takes all the
/// query heads of one K/V head); fewer rows go one task per (query head, row).
const PREFILL_ROWS: usize = 16;

thread_local! {
    /// Per thread: a block's scores, and its rows' softmax factors.
    static SCORES: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The output buffer shared by the attention tasks, each writing its own block.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (rows x head columns) blocks (see `causal_attention`), and the
// buffer outlives the parallel loop.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// Pointers and sizes of one block of single-head attention for [`attend_block`].
pub struct AttendBlock {
    /// `rows x head_dim` queries, row stride `q_stride`.
    pub q: *const f32,
    pub q_stride: usize,
    /// `keys x head_dim` keys and values, row stride `kv_stride`.
    pub k: *const f32,
    pub v: *const f32,
    pub kv_stride: usize,
    /// `rows x head_dim` output, row stride `out_stride`.
    pub out: *mut f32,
    pub out_stride: usize,
    pub rows: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Apply the softmax's `1 / sum` to the `head_dim`-wide output rows instead of the
    /// `keys`-wide probability rows: the same result up to rounding, and cheaper when there
    /// are many more keys than `head_dim` (the vision encoder: 1024 keys, 64 wide). The
    /// language models keep the probability rows, the order llama.cpp's and transformers'
    /// softmax use: their GGUF path quantises every layer's input to 8 bits, so that
    /// last-bit differences there can change a greedy pick at a near tie
    /// (`tests/llamacpp_parity.rs`).
    pub normalise_output: bool,
}

/// One block of single-head attention: scores `scale * q k^T` by a single-threaded gemm into
/// a per-thread buffer, `mask(row, scores)` to adjust each row (add a key mask, cut the
/// causal future to `-inf`), a row softmax, then `out = p v` by a second gemm. The vision
/// encoder's blocked attention is made of these; the language models' attention is `rows`.
///
/// # Safety
/// Every pointer of `b` must be valid for the rows, columns and strides it describes, and no
/// other thread may write the output block meanwhile.
pub unsafe fn attend_block(b: AttendBlock, mask: impl Fn(usize, &mut [f32])) {
    let (rows, n, hd) = (b.rows, b.keys, b.head_dim);
    let (q, q_stride, k, kv_stride, scale) = (b.q, b.q_stride, b.k, b.kv_stride, b.scale);
    let scores = |s: &mut [f32]| {
        // SAFETY: the caller vouches for q and k; s holds rows*n floats.
        unsafe {
            gemm::gemm(
                rows,
                n,
                hd,
                s.as_mut_ptr(),
                1,
                n as isize,
                false,
                q,
                1,
                q_stride as isize,
                k,
                kv_stride as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    // SAFETY: passed on from the caller.
    unsafe { attend_block_with(b, scores, mask, None) }
}

/// The weighted sum of values for [`attend_block_with`]: given the `rows x keys`
/// probabilities (row-major, unnormalised when `normalise_output`) and each row's factor,
/// writes `factor * p v` into the block's output rows.
pub type WeightedSum<'a> = &'a dyn Fn(&[f32], &[f32]);

/// [`attend_block`] with the scores `scale * q k^T` (`rows x keys`, row-major) computed by
/// `scores` instead of the f32 gemm (the vision encoder's int8 path), and with `out = p v`
/// by `weighted_sum` when given; `b.q` and `b.k` are then not read here, nor `b.v` when
/// `weighted_sum` is given.
///
/// # Safety
/// As [`attend_block`], for `b.v` and the output block.
pub unsafe fn attend_block_with(
    b: AttendBlock,
    scores: impl FnOnce(&mut [f32]),
    mask: impl Fn(usize, &mut [f32]),
    weighted_sum: Option<WeightedSum>,
) {
    let (rows, n, hd) = (b.rows, b.keys, b.head_dim);
    if rows == 0 {
        return;
    }
    SCORES.with(|buf| {
        let (buf, inv) = &mut *buf.borrow_mut();
        if buf.len() < rows * n {
            buf.resize(rows * n, 0.0);
        }
        inv.clear();
        inv.resize(rows, 0.0);
        let s = &mut buf[..rows * n];
        scores(s);
        for ((i, row), inv) in s.chunks_exact_mut(n.max(1)).enumerate().zip(inv.iter_mut()) {
            mask(i, row);
            if b.normalise_output {
                *inv = exp_shifted_in_place(row);
            } else {
                softmax_in_place(row);
                *inv = 1.0;
            }
        }
        if let Some(ws) = weighted_sum {
            ws(s, inv);
            return;
        }
        // SAFETY: the caller vouches for v and the output block (rows x hd at row stride
        // out_stride, written by this thread alone); s is rows x n.
        unsafe {
            gemm::gemm(
                rows,
                hd,
                n,
                b.out,
                1,
                b.out_stride as isize,
                false,
                s.as_ptr(),
                1,
                n as isize,
                b.v,
                1,
                b.kv_stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            // the softmax's normalisation, on the output rows
            if b.normalise_output {
                for (i, &f) in inv.iter().enumerate() {
                    std::slice::from_raw_parts_mut(b.out.add(i * b.out_stride), hd)
                        .iter_mut()
                        .for_each(|o| *o *= f);
                }
            }
        }
    });
}

/// Causal multi-head attention with grouped K/V heads: query row `i` (at absolute position
/// `pos[i]`, ascending) attends to keys `0..=pos[i]`; query head `j * (heads / kv_heads) + r`
/// uses K/V head `j`. Each (row, query head) is attended over its own keys (scores,
/// softmax, weighted sum of values) through a per-thread score buffer. From 16 rows on, work
/// is split into `(K/V head, block of 16 rows)` tasks on our pool, and in each the (row,
/// query head) pairs that share the K/V head go four at a time (`rows::attend_rows`, which
/// loads each key once for the four and gives each the numbers of `rows::attend_row`);
/// fewer rows (a decode step) make one task per (query head, row), one `rows::attend_row`
/// each. The arithmetic of a row does not depend on the other rows, so a prefill and a run
/// of decode steps compute the same numbers (test `prefill_rows_equal_decode_rows`).
///
/// # Shapes
/// `q: (t, heads * hd)` (roped), `k, v: (n_keys, kv_heads * hd)` (f32 or f16) ->
/// `(t, heads * hd)`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention<T: KvElem>(
    q: &[f32],
    pos: &[usize],
    k: &[T],
    v: &[T],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let t = pos.len();
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let n_keys = k.len() / kw.max(1);
    assert!(q.len() == t * qw && v.len() == k.len() && pos.iter().all(|&p| p < n_keys));
    let rep = heads / kv_heads;
    let mut out = vec![0f32; t * qw];
    let optr = OutPtr(out.as_mut_ptr());
    let optr = &optr;
    if t < PREFILL_ROWS {
        // a decode step or a short prompt: one task per (query head, row), so that every
        // thread has work
        par_ranges(heads * t, |range| {
            SCORES.with(|buf| {
                let (scores, _) = &mut *buf.borrow_mut();
                for task in range {
                    let (head, r) = (task / t, task % t);
                    let g = head / rep;
                    // SAFETY: row r, columns head*hd..+hd of the output belong to this
                    // task alone, and `out` (t * qw floats) outlives the loop.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(optr.0.add(r * qw + head * hd), hd)
                    };
                    rows::attend_row(
                        &q[r * qw + head * hd..][..hd],
                        &k[g * hd..],
                        &v[g * hd..],
                        kw,
                        pos[r] + 1,
                        scale,
                        scores,
                        o,
                    );
                }
            });
        });
        return out;
    }
    let nblk = t.div_ceil(PREFILL_ROWS);
    // tasks of (K/V head, block of rows); in each, the (row, query head) pairs that share
    // the K/V head, in order, four at a time (`rows::attend_rows`)
    par_ranges(kv_heads * nblk, |range| {
        SCORES.with(|buf| {
            let (scores, _) = &mut *buf.borrow_mut();
            for task in range {
                let (g, blk) = (task / nblk, task % nblk);
                let r0 = blk * PREFILL_ROWS;
                let r1 = (r0 + PREFILL_ROWS).min(t);
                let pairs: Vec<(usize, usize)> = (r0..r1)
                    .flat_map(|r| (g * rep..(g + 1) * rep).map(move |h| (r, h)))
                    .collect();
                for group in pairs.chunks(4) {
                    // on the stack: a prefill makes one such group per four (row, head) pairs
                    let (mut qs, mut ns) = ([&[][..]; 4], [0usize; 4]);
                    let mut outs: [&mut [f32]; 4] = Default::default();
                    for (i, &(r, h)) in group.iter().enumerate() {
                        qs[i] = &q[r * qw + h * hd..][..hd];
                        ns[i] = pos[r] + 1;
                        // SAFETY: row r, columns h*hd..+hd of the output belong to this
                        // (g, blk) task alone (h is one of g's query heads, r one of blk's
                        // rows), the pairs are distinct, and `out` (t * qw floats) outlives
                        // the loop.
                        outs[i] = unsafe {
                            std::slice::from_raw_parts_mut(optr.0.add(r * qw + h * hd), hd)
                        };
                    }
                    let m = group.len();
                    rows::attend_rows(
                        &qs[..m],
                        &ns[..m],
                        &k[g * hd..],
                        &v[g * hd..],
                        kw,
                        scale,
                        scores,
                        &mut outs[..m],
                    );
                }
            }
        });
    });
    out
}

/// One decode row per sequence, each attending to its own K/V (continuous batching): row
/// `i` at position `pos[i]` sees keys `0..=pos[i]` of `kv[i]`, with the numbers
/// [`causal_attention`] computes for each sequence alone, in one parallel region for all.
/// With at least as many rows as pool threads, each task is one sequence with all its heads
/// (`rows::attend_seq`: its K/V rows read front to back); with fewer, one task per (row,
/// head) (`rows::attend_row`), so every thread has work. `AFM_ATT_ROWS=1` keeps the
/// per-(row, head) tasks, to compare.
///
/// # Shapes
/// `q: (b, heads * hd)` (roped), `kv[i]: (n_i, kv_heads * hd)` each -> `(b, heads * hd)`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention<T: KvElem>(
    q: &[f32],
    pos: &[usize],
    kv: &[(&[T], &[T])],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let b = pos.len();
    let (qw, kw) = (heads * hd, kv_heads * hd);
    assert!(q.len() == b * qw && kv.len() == b);
    for ((k, v), &p) in kv.iter().zip(pos) {
        assert!(k.len() == v.len() && (p + 1) * kw <= k.len());
    }
    let rep = heads / kv_heads;
    let mut out = vec![0f32; b * qw];
    let optr = OutPtr(out.as_mut_ptr());
    let optr = &optr;
    static PER_ROW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let per_row =
        *PER_ROW.get_or_init(|| std::env::var_os("AFM_ATT_ROWS").is_some_and(|v| v == "1"));
    if b >= crate::par::threads().max(2) && !per_row {
        // one task per sequence, its heads together (`rows::attend_seq`)
        par_ranges(b, |range| {
            SCORES.with(|buf| {
                let (scores, _) = &mut *buf.borrow_mut();
                for i in range {
                    let (k, v) = kv[i];
                    let n = pos[i] + 1;
                    // SAFETY: row i of the output belongs to this task alone, and `out`
                    // (b * qw floats) outlives the loop.
                    let o = unsafe { std::slice::from_raw_parts_mut(optr.0.add(i * qw), qw) };
                    rows::attend_seq(
                        &q[i * qw..][..qw],
                        k,
                        v,
                        heads,
                        kv_heads,
                        n,
                        scale,
                        scores,
                        o,
                    );
                }
            });
        });
        return out;
    }
    par_ranges(b * heads, |range| {
        SCORES.with(|buf| {
            let (scores, _) = &mut *buf.borrow_mut();
            for task in range {
                let (i, head) = (task / heads, task % heads);
                let g = head / rep;
                let (k, v) = kv[i];
                let n = pos[i] + 1;
                // SAFETY: row i, columns head*hd..+hd of the output belong to this task
                // alone, and `out` (b * qw floats) outlives the loop.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(optr.0.add(i * qw + head * hd), hd) };
                rows::attend_row(
                    &q[i * qw + head * hd..][..hd],
                    &k[g * hd..],
                    &v[g * hd..],
                    kw,
                    n,
                    scale,
                    scores,
                    o,
                );
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched decode attention equals each sequence's own causal attention, bit for bit.
    #[test]
    fn decode_attention_equals_each_sequence_alone() {
        // 64: one group of columns; 128: two; 72: a short second group; 20: the portable path
        for hd in [64usize, 128, 72, 20] {
            let (heads, kvh) = (9, 3);
            let f = |i: usize, s: f32| (i as f32 * s).sin() * 0.7;
            let lens = [1usize, 24, 75, 130];
            let kv: Vec<(Vec<f32>, Vec<f32>)> = lens
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    let k = (0..n * kvh * hd).map(|i| f(i + j, 0.71)).collect();
                    let v = (0..n * kvh * hd).map(|i| f(i + 3 * j, 1.13)).collect();
                    (k, v)
                })
                .collect();
            let q: Vec<f32> = (0..lens.len() * heads * hd).map(|i| f(i, 0.37)).collect();
            let pos: Vec<usize> = lens.iter().map(|n| n - 1).collect();
            let refs: Vec<(&[f32], &[f32])> = kv
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            let got = decode_attention(&q, &pos, &refs, heads, kvh, hd, 0.125);
            for (i, (k, v)) in kv.iter().enumerate() {
                let qi = &q[i * heads * hd..(i + 1) * heads * hd];
                let want = causal_attention(qi, &pos[i..i + 1], k, v, heads, kvh, hd, 0.125);
                let g = &got[i * heads * hd..(i + 1) * heads * hd];
                assert!(
                    g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "hd {hd}, row {i}"
                );
            }
        }
    }

    /// Every row of a prefill computes what a decode step at that row's position computes
    /// over the same keys, bit for bit, at every head width (multiples of 8 take the SIMD
    /// path, 20 the portable one), and for key counts around the groups of eight.
    #[test]
    fn prefill_rows_equal_decode_rows() {
        for (t, start, hd) in [
            (70usize, 5usize, 64usize),
            (17, 0, 8),
            (9, 3, 20),
            (30, 100, 128),
        ] {
            let (heads, kvh) = (6, 2);
            let n_keys = start + t;
            let f = |i: usize, s: f32| (i as f32 * s).sin() * 0.9;
            let q: Vec<f32> = (0..t * heads * hd).map(|i| f(i, 0.37)).collect();
            let k: Vec<f32> = (0..n_keys * kvh * hd).map(|i| f(i, 0.71)).collect();
            let v: Vec<f32> = (0..n_keys * kvh * hd).map(|i| f(i, 1.13)).collect();
            let pos: Vec<usize> = (start..start + t).collect();
            let all = causal_attention(&q, &pos, &k, &v, heads, kvh, hd, 0.3);
            for i in 0..t {
                let qi = &q[i * heads * hd..(i + 1) * heads * hd];
                let one = causal_attention(qi, &pos[i..i + 1], &k, &v, heads, kvh, hd, 0.3);
                let got = &all[i * heads * hd..(i + 1) * heads * hd];
                assert!(
                    got.iter()
                        .zip(&one)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "t = {t}, hd = {hd}, row {i}"
                );
            }
        }
    }

    /// An f16 cache's attention is the f32 attention over the widened values, bit for bit,
    /// in a prefill and in a batched decode step (the kernels widen as they load, and the
    /// arithmetic after is the same); and it differs from attention over the unrounded f32
    /// values, so the f16 store is really read.
    #[test]
    fn f16_attention_is_f32_attention_over_the_widened_values() {
        use half::f16;
        for hd in [64usize, 72, 20] {
            let (heads, kvh, n) = (6, 2, 53);
            let f = |i: usize, s: f32| (i as f32 * s).sin() * 0.9;
            let k: Vec<f32> = (0..n * kvh * hd).map(|i| f(i, 0.71)).collect();
            let v: Vec<f32> = (0..n * kvh * hd).map(|i| f(i, 1.13)).collect();
            let (k16, v16): (Vec<f16>, Vec<f16>) = (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let (kw, vw): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            let t = 30;
            let q: Vec<f32> = (0..t * heads * hd).map(|i| f(i, 0.37)).collect();
            let pos: Vec<usize> = (n - t..n).collect();
            let got = causal_attention(&q, &pos, &k16, &v16, heads, kvh, hd, 0.3);
            let want = causal_attention(&q, &pos, &kw, &vw, heads, kvh, hd, 0.3);
            assert!(same(&got, &want), "prefill, hd {hd}");
            let raw = causal_attention(&q, &pos, &k, &v, heads, kvh, hd, 0.3);
            assert!(!same(&got, &raw), "hd {hd}: the f16 rounding must show");
            // a decode step of at least as many sequences as threads (one task per sequence)
            // and of one (a task per (row, head))
            let b = crate::par::threads().clamp(4, t);
            let qd = &q[..b * heads * hd];
            let pd: Vec<usize> = (0..b).map(|i| n - 1 - 7 * (i % 7)).collect();
            let got =
                decode_attention(qd, &pd, &vec![(&k16[..], &v16[..]); b], heads, kvh, hd, 0.3);
            let want = decode_attention(qd, &pd, &vec![(&kw[..], &vw[..]); b], heads, kvh, hd, 0.3);
            assert!(same(&got, &want), "decode, hd {hd}");
            let q1 = &q[..heads * hd];
            let got = decode_attention(q1, &pd[..1], &[(&k16[..], &v16[..])], heads, kvh, hd, 0.3);
            let want = decode_attention(q1, &pd[..1], &[(&kw[..], &vw[..])], heads, kvh, hd, 0.3);
            assert!(same(&got, &want), "decode of one row, hd {hd}");
        }
    }

    #[test]
    fn floor_small_equals_floor() {
        let mut ys: Vec<f32> = vec![0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.5, -2.5, 127.0, -128.0];
        ys.extend((0..400_000).map(|i| (i as f32 - 200_000.0) * 0.000_731));
        ys.extend((0..2000).map(|i| i as f32 * 0.5 - 500.0));
        for y in ys {
            // as values (-0.0 gives +0.0, which `exp` treats alike)
            assert_eq!(floor_small(y), y.floor(), "{y}");
        }
        assert!(floor_small(f32::NAN).is_nan());
    }

    /// `isa::vectorized` runs the softmax 8 or 16 lanes wide; the test's own call of the
    /// body is compiled for the baseline target (4 lanes): the same bits.
    #[test]
    fn vectorized_softmax_gives_the_baseline_bits() {
        for n in [1usize, 15, 16, 17, 100, 1024, 1029] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 0.043)
                .collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            let (fa, fb) = (exp_shifted_in_place(&mut a), exp_shifted_body(&mut b));
            assert_eq!(fa.to_bits(), fb.to_bits(), "factor, {n} entries");
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.to_bits(), y.to_bits(), "{n} entries");
            }
        }
    }

    #[test]
    fn round_small_equals_round_ties_even() {
        let mut xs: Vec<f32> = vec![
            0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5, 127.0,
        ];
        xs.extend((0..200_000).map(|i| (i as f32 - 100_000.0) * 0.00137));
        xs.extend((0..1000).map(|i| i as f32 * 4093.25 - 2e6));
        for x in xs {
            assert_eq!(round_small(x), x.round_ties_even(), "{x}");
        }
        assert!(round_small(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_masked_entries_are_zero() {
        let mut r = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5, -3.0];
        softmax_in_place(&mut r);
        assert_eq!(r[2], 0.0);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut all = vec![f32::NEG_INFINITY; 3];
        softmax_in_place(&mut all);
        assert_eq!(all, vec![0.0; 3]);
    }

    #[test]
    fn causal_attention_equals_a_naive_loop() {
        // 70 prefill rows after 5 cached keys, one decode row and 3-5 rows, at several
        // head widths
        for (t, start, hd) in [
            (70usize, 5usize, 8usize),
            (1, 74, 8),
            (1, 74, 64),
            (3, 40, 20),
            (4, 0, 64),
            (5, 9, 64),
        ] {
            check_against_naive(t, start, hd);
        }
    }

    fn check_against_naive(t: usize, start: usize, hd: usize) {
        let (heads, kvh) = (4, 2);
        let n_keys = start + t;
        let f = |i: usize, s: f32| (i as f32 * s).sin() * 0.7;
        let q: Vec<f32> = (0..t * heads * hd).map(|i| f(i, 0.37)).collect();
        let k: Vec<f32> = (0..n_keys * kvh * hd).map(|i| f(i, 0.71)).collect();
        let v: Vec<f32> = (0..n_keys * kvh * hd).map(|i| f(i, 1.13)).collect();
        let pos: Vec<usize> = (start..start + t).collect();
        let got = causal_attention(&q, &pos, &k, &v, heads, kvh, hd, 0.3);
        let mut worst = 0f32;
        for i in 0..t {
            for h in 0..heads {
                let g = h / (heads / kvh);
                let qv = &q[(i * heads + h) * hd..][..hd];
                let sc: Vec<f64> = (0..=pos[i])
                    .map(|j| {
                        let kv = &k[(j * kvh + g) * hd..][..hd];
                        qv.iter().zip(kv).map(|(a, b)| (a * b) as f64).sum::<f64>() * 0.3
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    let want: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, w)| w / z * v[(j * kvh + g) * hd + c] as f64)
                        .sum();
                    worst = worst.max((got[(i * heads + h) * hd + c] as f64 - want).abs() as f32);
                }
            }
        }
        assert!(worst < 1e-5, "t = {t}, hd = {hd}: {worst}");
    }
}
