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
//! A prefill's rows that share a K/V head go up to four per call ([`attend_rows`]), each
//! key and value loaded once for all of them, with each row's numbers unchanged.
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

/// [`attend_row`] for up to four queries over the same keys and values (the rows of a
/// prefill that share a K/V head): query `i` attends to keys `0..ns[i]`, and gets exactly
/// the numbers one `attend_row` per query gives (test
/// `attend_rows_equals_one_row_at_a_time`). At the AVX2 level, while the queries' keys
/// overlap, each key and value chunk is loaded once for all of them: a prefill's rows read
/// their head's K/V from L2 at one load per multiply-add, and this was the prefill
/// attention's limit.
///
/// # Shapes
/// `qs[i]: (hd)`; key and value `j` at `k[j * stride..][..hd]`, `v[j * stride..][..hd]`;
/// `scores`: scratch, grown when shorter; `outs[i]: (hd)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_rows<T: KvElem>(
    qs: &[&[f32]],
    ns: &[usize],
    k: &[T],
    v: &[T],
    stride: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    outs: &mut [&mut [f32]],
) {
    let r = qs.len();
    assert!((1..=4).contains(&r) && ns.len() == r && outs.len() == r);
    let hd = qs[0].len();
    let nmax = ns.iter().copied().max().unwrap_or(0);
    assert!(
        ns.iter().all(|&n| n >= 1)
            && qs.iter().all(|q| q.len() == hd)
            && outs.iter().all(|o| o.len() == hd)
            && k.len() >= (nmax - 1) * stride + hd
            && v.len() >= (nmax - 1) * stride + hd
    );
    #[cfg(target_arch = "x86_64")]
    if r > 1 && hd.is_multiple_of(8) && crate::isa::level() >= crate::isa::Isa::Avx2 {
        if scores.len() < r * nmax {
            scores.resize(r * nmax, 0.0);
        }
        let s = &mut scores[..r * nmax];
        let (kp, vp) = (k.as_ptr(), v.as_ptr());
        // SAFETY: the level is at least AVX2 (AVX2, FMA and F16C detected); each query and
        // output holds `hd` (a multiple of 8) floats, the outputs are distinct slices, the
        // keys and values hold `max(ns)` rows of `hd` at `stride` (asserted above), and
        // `s` holds `r * max(ns)` floats.
        unsafe {
            let q = |i: usize| qs[i].as_ptr();
            let o = |i: usize, outs: &mut [&mut [f32]]| outs[i].as_mut_ptr();
            match r {
                2 => avx2::attend_rows::<T, 2, 4>(
                    [q(0), q(1)],
                    [ns[0], ns[1]],
                    (kp, vp, stride, hd, scale),
                    s,
                    [o(0, outs), o(1, outs)],
                ),
                3 => avx2::attend_rows::<T, 3, 2>(
                    [q(0), q(1), q(2)],
                    [ns[0], ns[1], ns[2]],
                    (kp, vp, stride, hd, scale),
                    s,
                    [o(0, outs), o(1, outs), o(2, outs)],
                ),
                _ => avx2::attend_rows::<T, 4, 2>(
                    [q(0), q(1), q(2), q(3)],
                    [ns[0], ns[1], ns[2], ns[3]],
                    (kp, vp, stride, hd, scale),
                    s,
                    [o(0, outs), o(1, outs), o(2, outs), o(3, outs)],
                ),
            }
        }
        return;
    }
    for ((q, &n), o) in qs.iter().zip(ns).zip(outs.iter_mut()) {
        attend_row(q, k, v, stride, n, scale, scores, o);
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

    /// [`super::attend_rows`] for `R` (2 to 4) queries on AVX2 + FMA + F16C. Every score
    /// is [`score_group`]'s formula (its key's own 8-lane accumulator, chunk after chunk
    /// from zero, then [`reduce8`]'s tree and the scale), every weighted sum
    /// [`weighted_from`]'s (each chunk's accumulator in key order from zero; the sums go
    /// through `out` where a query continues alone, which does not round them): the same
    /// numbers as [`attend_row`] per query. While the keys overlap (`0..min(ns)`), `KB`
    /// keys' chunks are loaded once for all `R` queries (`R * KB <= 8` accumulators), and in
    /// the weighted sum `KB` chunks of each value row.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `hd` is a multiple of 8; each `qs[i]` and
    /// `outs[i]` holds `hd` floats, the outputs do not overlap the rest; `max(ns)` keys and
    /// values of `hd` at `stride` lie at `k` and `v`; `s.len() == R * max(ns)`; every
    /// `ns[i] >= 1`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_rows<T: KvElem, const R: usize, const KB: usize>(
        qs: [*const f32; R],
        ns: [usize; R],
        (k, v, stride, hd, scale): (*const T, *const T, usize, usize, f32),
        s: &mut [f32],
        outs: [*mut f32; R],
    ) {
        debug_assert!(R * KB <= 8);
        let chunks = hd / 8;
        let nmax = s.len() / R;
        let nmin = ns.iter().copied().min().unwrap_or(0);
        let sc = _mm256_set1_ps(scale);
        // the scores of keys every query sees, `KB` keys at a time
        let mut j = 0;
        while j + KB <= nmin {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..chunks {
                // SAFETY: chunk c of each query, and of keys j .. j + KB <= min(ns).
                unsafe {
                    let mut qc = [_mm256_setzero_ps(); R];
                    for (x, q) in qc.iter_mut().zip(&qs) {
                        *x = _mm256_loadu_ps(q.add(8 * c));
                    }
                    for t in 0..KB {
                        let kc = T::load8(k.add((j + t) * stride + 8 * c));
                        for (i, x) in qc.iter().enumerate() {
                            acc[i * KB + t] = _mm256_fmadd_ps(*x, kc, acc[i * KB + t]);
                        }
                    }
                }
            }
            let mut lanes = [0f32; 8];
            // SAFETY: eight floats into `lanes`.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(reduce8(&acc), sc)) };
            for i in 0..R {
                for t in 0..KB {
                    s[i * nmax + j + t] = lanes[i * KB + t];
                }
            }
            j += KB;
        }
        // each query's other keys, eight at a time as `attend_row`, then its softmax
        for (i, &n) in ns.iter().enumerate() {
            let mut jj = j;
            while jj < n {
                let m = (n - jj).min(8);
                // SAFETY: keys jj .. jj + m <= n lie at k; query i holds `hd` floats.
                let lanes =
                    unsafe { score_group(qs[i], k.add(jj * stride), stride, chunks, m, sc) };
                s[i * nmax + jj..i * nmax + jj + m].copy_from_slice(&lanes[..m]);
                jj += 8;
            }
            crate::kernels::softmax_in_place(&mut s[i * nmax..i * nmax + n]);
        }
        // out_i = sum_j p_ij v_j in key order, `KB` chunks of every query at a time
        let mut c0 = 0;
        while c0 + KB <= chunks {
            let mut acc = [_mm256_setzero_ps(); 8];
            for jj in 0..nmin {
                // SAFETY: chunks c0 .. c0 + KB of value jj < min(ns).
                unsafe {
                    let mut vc = [_mm256_setzero_ps(); KB];
                    for (c, x) in vc.iter_mut().enumerate() {
                        *x = T::load8(v.add(jj * stride + 8 * (c0 + c)));
                    }
                    for i in 0..R {
                        let p = _mm256_set1_ps(*s.get_unchecked(i * nmax + jj));
                        for (c, x) in vc.iter().enumerate() {
                            acc[i * KB + c] = _mm256_fmadd_ps(p, *x, acc[i * KB + c]);
                        }
                    }
                }
            }
            for (i, &n) in ns.iter().enumerate() {
                // SAFETY: chunks c0 .. c0 + KB of output i; values nmin .. n lie at v.
                unsafe {
                    let oc = outs[i].add(8 * c0);
                    for c in 0..KB {
                        _mm256_storeu_ps(oc.add(8 * c), acc[i * KB + c]);
                    }
                    if n > nmin {
                        let p = &s[i * nmax + nmin..i * nmax + n];
                        weighted_from(p, v.add(nmin * stride + 8 * c0), stride, oc, KB, true);
                    }
                }
            }
            c0 += KB;
        }
        // fewer than `KB` chunks left: each query alone over all its keys
        if c0 < chunks {
            for (i, &n) in ns.iter().enumerate() {
                // SAFETY: chunks c0 .. chunks of output i and of values 0 .. n.
                unsafe {
                    let (p, oc) = (&s[i * nmax..i * nmax + n], outs[i].add(8 * c0));
                    weighted_from(p, v.add(8 * c0), stride, oc, chunks - c0, false);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows' kernel gives every query `attend_row`'s bits: 2, 3 and 4 queries, whose
    /// key counts are equal or differ (the shared keys not a multiple of the key group,
    /// tails of one to nine keys), head widths of one, two and a partial group of chunks
    /// (64, 128, 72) and not a multiple of 8 (20: the per-query path), over f32, f16 and
    /// int8 K/V.
    #[test]
    fn attend_rows_equals_one_row_at_a_time() {
        fn check<T: KvElem>(conv: impl Fn(f32) -> T) {
            let f = |i: usize, s: f32| (i as f32 * s).sin() * 0.9;
            for hd in [64usize, 128, 72, 20] {
                let stride = 3 * hd;
                let nkeys = 41;
                let k: Vec<T> = (0..nkeys * stride).map(|i| conv(f(i, 0.71))).collect();
                let v: Vec<T> = (0..nkeys * stride).map(|i| conv(f(i, 1.13))).collect();
                for ns in [
                    vec![7usize, 7],
                    vec![1, 2, 3],
                    vec![30, 31, 32, 33],
                    vec![41, 9, 17, 1],
                    vec![40, 40, 40],
                    vec![13, 22],
                ] {
                    let r = ns.len();
                    let q: Vec<f32> = (0..r * hd).map(|i| f(i + hd, 0.37) * 2.0).collect();
                    let qs: Vec<&[f32]> = q.chunks_exact(hd).collect();
                    let mut got = vec![0f32; r * hd];
                    let mut outs: Vec<&mut [f32]> = got.chunks_exact_mut(hd).collect();
                    let mut scores = Vec::new();
                    attend_rows(&qs, &ns, &k, &v, stride, 0.3, &mut scores, &mut outs);
                    for i in 0..r {
                        let mut want = vec![0f32; hd];
                        attend_row(qs[i], &k, &v, stride, ns[i], 0.3, &mut scores, &mut want);
                        let g = &got[i * hd..(i + 1) * hd];
                        assert!(
                            g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "hd {hd}, keys {ns:?}, query {i}: {:?} vs {:?}",
                            &g[..4],
                            &want[..4]
                        );
                    }
                }
            }
        }
        check(|x| x);
        check(half::f16::from_f32);
        check(|x| (x * 127.0).round() as i8);
    }
}
