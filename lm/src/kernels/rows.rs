//! The language models' attention, one query row at a time: the same arithmetic for a
//! decode step's single row and for every row of a prefill, so a K/V cache filled by decode
//! steps and one filled by a prefill hold the same numbers, and a continued conversation
//! answers as a fresh run of the whole transcript does (`lm/tests/session.rs`). This is the
//! attention of every cache of the language models (`--kv 32`, `--kv 16`, `--kv 8`:
//! [`KvElem`]): an f16 key or value, or an int8 code, is widened to f32 as it is loaded, and
//! everything after is the f32 arithmetic (an int8 cache's scales are applied around the
//! kernel, `crate::kv8::causal_attention_i8`).
//!
//! Per row: scores `scale * q k_j` for the row's keys `0..n`, a softmax over exactly those
//! `n` scores, then `sum_j p_j v_j` in key order. The scores are computed eight keys at a
//! time: each key's products are summed in 8 lanes and the lanes reduced by one fixed tree
//! (`_mm256_hadd_ps` twice, then the two 128-bit halves), which gives every key the same
//! formula whatever its place in the group, so the grouping never changes a number. Before,
//! both used two single-threaded gemm calls per (row block, head): a decode row's small
//! calls cost about a tenth of a decode step (perf), and a quarter of a 4-sequence
//! continuous-batching step.
//!
//! The level is [`crate::isa::level`]: AVX2 + FMA when the head width is a multiple of 8,
//! else the portable loop (keys one after another, each key's products in 8 lanes and a
//! fixed tree).

/// An element of a K/V cache the row kernels read: f32, f16 (half the bytes a decode step
/// reads from memory) or an int8 code (a quarter; its scales are applied by the caller);
/// the kernels widen each value to f32 as it is loaded.
pub trait KvElem: Copy + Send + Sync + 'static + sealed::Sealed {
    /// The value as f32 (exact: f16 widens without rounding).
    fn get(self) -> f32;

    /// Eight consecutive values widened to f32.
    ///
    /// # Safety
    /// Eight elements at `p` are readable; the CPU has AVX2 and F16C (`Isa::Avx2`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

mod sealed {
    /// Only this module's element types are K/V elements (their `load8` is trusted).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for i8 {}
}

impl KvElem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: eight floats at p (caller's contract); AVX is part of the caller's level.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: eight f16 (16 bytes) at p (caller's contract); F16C is part of the
        // caller's level. `vcvtph2ps` widens exactly, as `f16::to_f32` does.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

impl KvElem for i8 {
    #[inline(always)]
    fn get(self) -> f32 {
        self as f32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: eight bytes at p (caller's contract); AVX2 is part of the caller's level.
        // Sign-extended to i32 and converted: exact, as `i8 as f32`.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }
}

/// Attention of one query row over keys `0..n`, written to `out`.
///
/// # Shapes
/// `q: (hd)`; key and value `j` at `k[j * stride..][..hd]`, `v[j * stride..][..hd]`;
/// `scores`: scratch, grown to `n` when shorter; `out: (hd)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_row<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    stride: usize,
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    assert!(
        n >= 1
            && out.len() == hd
            && k.len() >= (n - 1) * stride + hd
            && v.len() >= (n - 1) * stride + hd
    );
    if scores.len() < n {
        scores.resize(n, 0.0);
    }
    let s = &mut scores[..n];
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && crate::isa::level() >= crate::isa::Isa::Avx2 {
        // SAFETY: the level is at least AVX2 (AVX2, FMA and F16C detected); the slices'
        // lengths were asserted for n keys of width hd at this stride.
        unsafe { avx2::attend_row(q, k, v, stride, n, scale, s, out) };
        return;
    }
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = dot_lanes(q, &k[j * stride..][..hd]) * scale;
    }
    super::softmax_in_place(s);
    out.fill(0.0);
    for (j, &p) in s.iter().enumerate() {
        for (o, x) in out.iter_mut().zip(&v[j * stride..][..hd]) {
            *o += p * x.get();
        }
    }
}

/// Every head of one decode row over keys `0..n` of its own cache, written to `out`: what
/// [`attend_row`] computes for each head (the same numbers), with the keys taken in order
/// for all heads at once, so the K and V rows are read front to back (a decode step's K/V
/// come from memory; read one head at a time, a row's other heads' columns are skipped and
/// the reads wait on memory).
///
/// # Shapes
/// `q: (heads * hd)`; `k, v: (>= n, kv_heads * hd)` (row-major); `scores`: scratch, grown
/// to `heads * n` when shorter; `out: (heads * hd)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_seq<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    heads: usize,
    kv_heads: usize,
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len() / heads;
    let kw = kv_heads * hd;
    assert!(
        n >= 1
            && heads.is_multiple_of(kv_heads)
            && q.len() == heads * hd
            && out.len() == q.len()
            && k.len() >= n * kw
            && v.len() >= n * kw
    );
    if scores.len() < heads * n {
        scores.resize(heads * n, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(8) && crate::isa::level() >= crate::isa::Isa::Avx2 {
        // SAFETY: the level is at least AVX2 (AVX2, FMA and F16C detected); the slices'
        // lengths were asserted for n rows of kv_heads * hd at that stride.
        unsafe {
            avx2::attend_seq(
                q,
                k,
                v,
                heads,
                kv_heads,
                n,
                scale,
                &mut scores[..heads * n],
                out,
            )
        };
        return;
    }
    let rep = heads / kv_heads;
    for h in 0..heads {
        let g = h / rep;
        attend_row(
            &q[h * hd..][..hd],
            &k[g * hd..],
            &v[g * hd..],
            kw,
            n,
            scale,
            scores,
            &mut out[h * hd..][..hd],
        );
    }
}

/// `q . k` in 8 lanes and a fixed tree, then the tail in order: the portable path's dot
/// product (deterministic, and it vectorises, where one ordered sum does not).
fn dot_lanes<T: KvElem>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (mut qc, mut kc) = (q.chunks_exact(8), k.chunks_exact(8));
    for (a, b) in (&mut qc).zip(&mut kc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i].get();
        }
    }
    let mut sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in qc.remainder().iter().zip(kc.remainder()) {
        sum += x * y.get();
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::KvElem;
    use std::arch::x86_64::*;

    /// Eight keys' 8-lane sums reduced to one vector of eight dot products, the same tree
    /// for every key: `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
    ///
    /// # Safety
    /// The caller runs with AVX.
    #[inline(always)]
    unsafe fn reduce8(a: &[__m256; 8]) -> __m256 {
        let t01 = _mm256_hadd_ps(a[0], a[1]);
        let t23 = _mm256_hadd_ps(a[2], a[3]);
        let t45 = _mm256_hadd_ps(a[4], a[5]);
        let t67 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t01, t23);
        let u1 = _mm256_hadd_ps(t45, t67);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    /// [`super::attend_row`] on AVX2 + FMA + F16C.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `q.len()` is a multiple of 8 and the slices
    /// hold `n` keys and values of width `q.len()` at `stride`, `s.len() == n`,
    /// `out.len() == q.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_row<T: KvElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        stride: usize,
        n: usize,
        scale: f32,
        s: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = q.len();
        let chunks = hd / 8;
        let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
        let sc = _mm256_set1_ps(scale);
        let mut j = 0;
        while j < n {
            let m = (n - j).min(8);
            // SAFETY: keys j .. j + m lie in k (caller's contract).
            let lanes = unsafe { score_group(qp, kp.add(j * stride), stride, chunks, m, sc) };
            s[j..j + m].copy_from_slice(&lanes[..m]);
            j += 8;
        }
        crate::kernels::softmax_in_place(s);
        // out = sum_j p_j v_j, in key order, 64 columns at a time
        let mut c0 = 0;
        while c0 < chunks {
            let w = (chunks - c0).min(8);
            // SAFETY: columns 8 c0 .. 8 (c0 + w) of n values and of out (caller's contract).
            unsafe {
                let (vc, oc) = (vp.add(8 * c0), out.as_mut_ptr().add(8 * c0));
                if w == 8 {
                    weighted(s, vc, stride, oc, 8)
                } else {
                    weighted(s, vc, stride, oc, w)
                }
            }
            c0 += 8;
        }
    }

    /// `scale * q . k_t` for keys `t < m` (`m <= 8`) at `k`, by [`key_sums`] and [`reduce8`]:
    /// the one formula of a score, whatever the kernel; lanes from `m` on are not scores.
    ///
    /// # Safety
    /// As [`key_sums`].
    #[inline(always)]
    unsafe fn score_group<T: KvElem>(
        q: *const f32,
        k: *const T,
        stride: usize,
        chunks: usize,
        m: usize,
        scale: __m256,
    ) -> [f32; 8] {
        // SAFETY: passed on; AVX2 is the caller's.
        unsafe {
            let acc = if m == 8 {
                key_sums(q, k, stride, chunks, 8)
            } else {
                key_sums(q, k, stride, chunks, m)
            };
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(reduce8(&acc), scale));
            lanes
        }
    }

    /// The 8-lane products of `q` with keys `0..m` (`m <= 8`) at `k`, one accumulator per
    /// key (zero past `m`), chunk after chunk.
    ///
    /// # Safety
    /// AVX2 + FMA + F16C; `q` holds `8 * chunks` floats, and `m` keys of that width at
    /// `stride` lie at `k`.
    #[inline(always)]
    unsafe fn key_sums<T: KvElem>(
        q: *const f32,
        k: *const T,
        stride: usize,
        chunks: usize,
        m: usize,
    ) -> [__m256; 8] {
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in 0..chunks {
            // SAFETY: chunk c of q and of keys t < m (caller's contract).
            unsafe {
                let qc = _mm256_loadu_ps(q.add(8 * c));
                for (t, a) in acc.iter_mut().enumerate() {
                    if t < m {
                        let kc = T::load8(k.add(t * stride + 8 * c));
                        *a = _mm256_fmadd_ps(qc, kc, *a);
                    }
                }
            }
        }
        acc
    }

    /// `out[..8 w] = sum_j p[j] v_j[..8 w]` (`w <= 8` chunks of 8), in key order.
    ///
    /// # Safety
    /// AVX2 + FMA + F16C; `p.len()` values of `8 w` elements at `stride` lie at `v`, and
    /// `out` holds `8 w` floats.
    #[inline(always)]
    unsafe fn weighted<T: KvElem>(p: &[f32], v: *const T, stride: usize, out: *mut f32, w: usize) {
        // SAFETY: passed on.
        unsafe { weighted_from(p, v, stride, out, w, false) }
    }

    /// [`weighted`] continuing the sums already in `out` when `cont` (from zero otherwise).
    ///
    /// # Safety
    /// As [`weighted`].
    #[inline(always)]
    unsafe fn weighted_from<T: KvElem>(
        p: &[f32],
        v: *const T,
        stride: usize,
        out: *mut f32,
        w: usize,
        cont: bool,
    ) {
        let mut acc = [_mm256_setzero_ps(); 8];
        if cont {
            for (c, a) in acc.iter_mut().enumerate() {
                if c < w {
                    // SAFETY: chunk c < w of out.
                    *a = unsafe { _mm256_loadu_ps(out.add(8 * c)) };
                }
            }
        }
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            for (c, a) in acc.iter_mut().enumerate() {
                if c < w {
                    // SAFETY: value j, chunk c < w (caller's contract).
                    let x = unsafe { T::load8(v.add(j * stride + 8 * c)) };
                    *a = _mm256_fmadd_ps(pv, x, *a);
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            if c < w {
                // SAFETY: chunk c < w of out.
                unsafe { _mm256_storeu_ps(out.add(8 * c), *a) };
            }
        }
    }

    /// Keys per block of the weighted sum: the block's value rows are read by every head
    /// while they are in L1 (16 rows of `kv_heads * hd` floats: 12 kB for SmolLM2-135M).
    const KEY_BLOCK: usize = 16;

    /// [`super::attend_seq`] on AVX2 + FMA + F16C: per head and key the same operations as
    /// [`attend_row`] (the same `key_sums` and `reduce8`, the same softmax, the weighted sum
    /// in key order; its running sums are kept in `out` between blocks of keys, which does
    /// not round them).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `hd = q.len() / heads` is a multiple of 8, `k`
    /// and `v` hold `n` rows of `kv_heads * hd`, `s.len() == heads * n`,
    /// `out.len() == q.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_seq<T: KvElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        heads: usize,
        kv_heads: usize,
        n: usize,
        scale: f32,
        s: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = q.len() / heads;
        let (chunks, kw, rep) = (hd / 8, kv_heads * hd, heads / kv_heads);
        let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
        let sc = _mm256_set1_ps(scale);
        let mut j = 0;
        while j < n {
            let m = (n - j).min(8);
            for h in 0..heads {
                // SAFETY: head h's query lies in q, and keys j .. j + m of K/V head h / rep
                // (columns (h / rep) hd ..) lie in k (caller's contract).
                let lanes = unsafe {
                    let (qh, kg) = (qp.add(h * hd), kp.add(j * kw + (h / rep) * hd));
                    score_group(qh, kg, kw, chunks, m, sc)
                };
                s[h * n + j..h * n + j + m].copy_from_slice(&lanes[..m]);
            }
            j += 8;
        }
        for row in s.chunks_exact_mut(n) {
            crate::kernels::softmax_in_place(row);
        }
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + KEY_BLOCK).min(n);
            for h in 0..heads {
                let p = &s[h * n + j0..h * n + j1];
                let mut c0 = 0;
                while c0 < chunks {
                    let w = (chunks - c0).min(8);
                    // SAFETY: columns 8 c0 .. 8 (c0 + w) of head h / rep in value rows
                    // j0 .. j1 < n, and of head h in out (caller's contract).
                    unsafe {
                        let vc = vp.add(j0 * kw + (h / rep) * hd + 8 * c0);
                        let oc = out.as_mut_ptr().add(h * hd + 8 * c0);
                        if w == 8 {
                            weighted_from(p, vc, kw, oc, 8, j0 > 0)
                        } else {
                            weighted_from(p, vc, kw, oc, w, j0 > 0)
                        }
                    }
                    c0 += 8;
                }
            }
            j0 = j1;
        }
    }
}
