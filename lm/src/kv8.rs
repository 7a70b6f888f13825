//! The paper's 8-bit KV cache: per layer one key scale and one value scale, keys and values
//! stored as `clip(round_half_even(x / s), -128, 127)` (the arithmetic of tamm's
//! `KVQuantizer`, whose fake quantisation `q * s` is exactly what these kernels read back),
//! and causal attention that reads the int8 cache directly.
//!
//! Scales come from the checkpoint (`self_attn.k_scale` / `v_scale`, learned in the paper)
//! or from a calibration pass ([`KvCalibration`]: the largest |k| and |v| of each layer on a
//! calibration text, `/ 127`).
//!
//! Kernels: the scores `q . (s_k k8)` and the weighted sum `sum p (s_v v8)` widen 16 (AVX-512)
//! or 8 (AVX2) int8 values to f32 per step and multiply in f32, chosen at run time, with a
//! portable loop elsewhere. Queries stay f32, as in tamm: quantizing them to run the scores
//! on VNNI's int8 dot product would add a rounding tamm does not have (the weight kernels in
//! [`crate::lowbit`] are where VNNI pays).

use crate::kernels::{attend_block_with, AttendBlock};
use crate::par::par_ranges;

/// The text `--kv 8` calibrates on when a checkpoint stores no KV scales (plain English
/// prose, dialogue, a list, numbers and code, so that the layers see the usual range of
/// their keys and values; written for afm).
pub const CALIBRATION_TEXT: &str = "The morning train was late again, so Maria walked the \
last two miles to the workshop. She liked the walk: the river was high after the rain, and the \
old bridge hummed when the trucks went over it. \"We need the drawings by Friday,\" her manager \
had said, \"and the client wants three options, not two.\" She counted in her head: 14 panels, \
6 hinges each, 84 hinges in all, and the supplier had only 60 in stock.\n\nShopping list:\n\
- 2 kg of flour\n- 12 eggs\n- a bottle of olive oil\n- batteries (AA, pack of 8)\n\nIn 1969 \
the first people walked on the Moon; the trip took about three days each way. Light from the \
Sun reaches the Earth in a little over eight minutes, while a radio signal from Mars needs \
between three and twenty-two minutes, depending on where the two planets are.\n\n\
def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / \
len(values)\n\nQuestion: What is the capital of France? Answer: Paris. Question: How many \
legs does a spider have? Answer: eight. The committee met on Tuesday, 3 March, at 10:30, and \
agreed that the budget (EUR 12,500) should cover printing, travel and two new laptops. Then \
the conversation turned to the weather, to football, and to the strange noise in the attic.";

/// Appends `x` quantized with scale `s` to `out`.
pub fn quantize_into(x: &[f32], s: f32, out: &mut Vec<i8>) {
    // `x / s` as tamm computes it (a division, not a multiply by the inverse), so that
    // ties fall exactly where tamm has them
    out.extend(
        x.iter()
            .map(|&v| (v / s).round_ties_even().clamp(-128.0, 127.0) as i8),
    );
}

/// Scale of a layer whose largest absolute key (or value) is `amax`: `amax / 127`, or 1 when
/// the layer is all zeros.
pub fn scale_for(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    }
}

/// Running per-layer maxima of |k| and |v| for calibration.
#[derive(Debug, Clone, Default)]
pub struct KvCalibration {
    /// Per layer `(max |k|, max |v|)`, `None` for layers without K/V.
    pub amax: Vec<Option<(f32, f32)>>,
}

impl KvCalibration {
    /// Folds in the K/V of every layer of `cache` (f32 and f16 layers; an int8 layer's
    /// values are its scales' multiples and add nothing).
    pub fn observe(&mut self, cache: &crate::cache::Cache) {
        let n = cache.num_layers();
        if self.amax.len() < n {
            self.amax.resize(n, None);
        }
        for (i, slot) in self.amax.iter_mut().enumerate().take(n) {
            if let Some(l) = cache.layer(i) {
                let (mk, mv) = match l.f16_slices() {
                    Some((k, v)) => {
                        let m =
                            |x: &[half::f16]| x.iter().fold(0f32, |a, v| a.max(v.to_f32().abs()));
                        (m(k), m(v))
                    }
                    None => {
                        let (k, v) = l.slices();
                        let m = |x: &[f32]| x.iter().fold(0f32, |a, v| a.max(v.abs()));
                        (m(k), m(v))
                    }
                };
                let (a, b) = slot.unwrap_or((0.0, 0.0));
                *slot = Some((a.max(mk), b.max(mv)));
            }
        }
    }

    /// The per-layer (key, value) scales.
    pub fn scales(&self) -> Vec<Option<(f32, f32)>> {
        self.amax
            .iter()
            .map(|a| a.map(|(k, v)| (scale_for(k), scale_for(v))))
            .collect()
    }
}

/// `dot(q, k8)` in f32 and `out += a * v8`: the two inner loops.
#[derive(Clone, Copy)]
pub(crate) struct Ops {
    pub dot: fn(&[f32], &[i8]) -> f32,
    pub axpy: fn(f32, &[i8], &mut [f32]),
    pub name: &'static str,
}

fn dot_portable(q: &[f32], k: &[i8]) -> f32 {
    q.iter().zip(k).map(|(a, &b)| a * b as f32).sum()
}

fn axpy_portable(a: f32, v: &[i8], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o += a * x as f32;
    }
}

pub(crate) fn portable() -> Ops {
    Ops {
        dot: dot_portable,
        axpy: axpy_portable,
        name: "portable",
    }
}

/// The fastest ops this CPU runs.
pub(crate) fn ops() -> Ops {
    static OPS: std::sync::OnceLock<Ops> = std::sync::OnceLock::new();
    *OPS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if simd::has512() {
                return simd::ops512();
            }
            if simd::has256() {
                return simd::ops256();
            }
        }
        portable()
    })
}

/// Which kernel the int8 KV attention runs on this CPU.
pub fn kernel_name() -> &'static str {
    ops().name
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use super::Ops;
    use std::arch::x86_64::*;

    use crate::isa::{level, Isa};

    /// AVX-512 F + FMA, unless `AFM_ISA` caps the level below AVX-512.
    pub fn has512() -> bool {
        level() >= Isa::Avx512
    }
    /// AVX2 + FMA, unless `AFM_ISA` caps the level below AVX2.
    pub fn has256() -> bool {
        level() >= Isa::Avx2
    }

    pub fn ops512() -> Ops {
        Ops {
            dot: dot512,
            axpy: axpy512,
            name: "avx512",
        }
    }
    pub fn ops256() -> Ops {
        Ops {
            dot: dot256,
            axpy: axpy256,
            name: "avx2",
        }
    }

    fn dot512(q: &[f32], k: &[i8]) -> f32 {
        let n = q.len().min(k.len());
        // SAFETY: chosen only after `has512()`; every load is inside 0..n of both slices.
        unsafe { dot512_impl(&q[..n], &k[..n]) }
    }
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn dot512_impl(q: &[f32], k: &[i8]) -> f32 {
        let n = q.len();
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let kv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                k.as_ptr().add(i) as *const __m128i
            )));
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(i)), kv, acc);
            i += 16;
        }
        let mut s = _mm512_reduce_add_ps(acc);
        while i < n {
            s += q[i] * k[i] as f32;
            i += 1;
        }
        s
    }

    fn axpy512(a: f32, v: &[i8], out: &mut [f32]) {
        let n = out.len().min(v.len());
        // SAFETY: chosen only after `has512()`; every access is inside 0..n of both slices.
        unsafe { axpy512_impl(a, &v[..n], &mut out[..n]) }
    }
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn axpy512_impl(a: f32, v: &[i8], out: &mut [f32]) {
        let n = out.len();
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        while i + 16 <= n {
            let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                v.as_ptr().add(i) as *const __m128i
            )));
            let o = out.as_mut_ptr().add(i);
            _mm512_storeu_ps(o, _mm512_fmadd_ps(av, x, _mm512_loadu_ps(o)));
            i += 16;
        }
        while i < n {
            out[i] += a * v[i] as f32;
            i += 1;
        }
    }

    fn dot256(q: &[f32], k: &[i8]) -> f32 {
        let n = q.len().min(k.len());
        // SAFETY: chosen only after `has256()`; every load is inside 0..n of both slices.
        unsafe { dot256_impl(&q[..n], &k[..n]) }
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot256_impl(q: &[f32], k: &[i8]) -> f32 {
        let n = q.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let kv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                k.as_ptr().add(i) as *const __m128i
            )));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), kv, acc);
            i += 8;
        }
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let mut s = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
        while i < n {
            s += q[i] * k[i] as f32;
            i += 1;
        }
        s
    }

    fn axpy256(a: f32, v: &[i8], out: &mut [f32]) {
        let n = out.len().min(v.len());
        // SAFETY: chosen only after `has256()`; every access is inside 0..n of both slices.
        unsafe { axpy256_impl(a, &v[..n], &mut out[..n]) }
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy256_impl(a: f32, v: &[i8], out: &mut [f32]) {
        let n = out.len();
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                v.as_ptr().add(i) as *const __m128i
            )));
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(av, x, _mm256_loadu_ps(o)));
            i += 8;
        }
        while i < n {
            out[i] += a * v[i] as f32;
            i += 1;
        }
    }
}

/// The output buffer shared by the attention tasks, each writing its own block.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (rows x head columns) blocks, and the buffer outlives the
// parallel loop.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// Causal GQA attention over an int8 K/V cache: as [`crate::kernels::causal_attention`]
/// (query row `i` at absolute position `pos[i]` sees keys `0..=pos[i]`, query head
/// `j * (heads / kv_heads) + r` uses K/V head `j`), with keys `k_scale * k8` and values
/// `v_scale * v8`.
///
/// # Shapes
/// `q: (t, heads * hd)` (roped), `k8, v8: (n_keys, kv_heads * hd)` -> `(t, heads * hd)`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_i8(
    q: &[f32],
    pos: &[usize],
    k8: &[i8],
    v8: &[i8],
    k_scale: f32,
    v_scale: f32,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    causal_attention_i8_with(
        ops(),
        q,
        pos,
        k8,
        v8,
        (k_scale, v_scale),
        heads,
        kv_heads,
        hd,
        scale,
    )
}

/// Query rows per task.
const QBLOCK: usize = 64;

#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_attention_i8_with(
    ops: Ops,
    q: &[f32],
    pos: &[usize],
    k8: &[i8],
    v8: &[i8],
    (k_scale, v_scale): (f32, f32),
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let t = pos.len();
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let n_keys = k8.len() / kw.max(1);
    assert!(q.len() == t * qw && v8.len() == k8.len() && pos.iter().all(|&p| p < n_keys));
    let rep = heads / kv_heads;
    let nblk = t.div_ceil(QBLOCK);
    let mut out = vec![0f32; t * qw];
    let optr = OutPtr(out.as_mut_ptr());
    let optr = &optr;
    par_ranges(heads * nblk, |range| {
        for task in range {
            let (head, blk) = (task / nblk, task % nblk);
            let g = head / rep;
            let r0 = blk * QBLOCK;
            let rows = QBLOCK.min(t - r0);
            let n = pos[r0..r0 + rows].iter().max().map_or(0, |&p| p + 1);
            let qrow = |i: usize| &q[(r0 + i) * qw + head * hd..(r0 + i) * qw + (head + 1) * hd];
            let krow = |j: usize| &k8[j * kw + g * hd..j * kw + (g + 1) * hd];
            let vrow = |j: usize| &v8[j * kw + g * hd..j * kw + (g + 1) * hd];
            let scores = |s: &mut [f32]| {
                let f = scale * k_scale;
                for i in 0..rows {
                    let qi = qrow(i);
                    // keys past the row's position are cut to -inf by the mask
                    let seen = pos[r0 + i] + 1;
                    for (j, sv) in s[i * n..i * n + seen].iter_mut().enumerate() {
                        *sv = f * (ops.dot)(qi, krow(j));
                    }
                }
            };
            let weighted = |p: &[f32], inv: &[f32]| {
                for i in 0..rows {
                    // SAFETY: the output row (r0 + i) at columns head*hd.. belongs to this
                    // (head, blk) task alone; `out` outlives the loop.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(optr.0.add((r0 + i) * qw + head * hd), hd)
                    };
                    let seen = pos[r0 + i] + 1;
                    for (j, &pj) in p[i * n..i * n + seen].iter().enumerate() {
                        if pj != 0.0 {
                            (ops.axpy)(pj * v_scale, vrow(j), o);
                        }
                    }
                    if inv[i] != 1.0 {
                        o.iter_mut().for_each(|x| *x *= inv[i]);
                    }
                }
            };
            // SAFETY: with `scores` and `weighted_sum` given, attend_block_with reads none of
            // the block's pointers but `out` (not written there either: `weighted` writes it).
            unsafe {
                attend_block_with(
                    AttendBlock {
                        q: std::ptr::null(),
                        q_stride: qw,
                        k: std::ptr::null(),
                        v: std::ptr::null(),
                        kv_stride: kw,
                        out: optr.0.add(r0 * qw + head * hd),
                        out_stride: qw,
                        rows,
                        keys: n,
                        head_dim: hd,
                        scale,
                        normalise_output: false,
                    },
                    scores,
                    |i, row| row[pos[r0 + i] + 1..].fill(f32::NEG_INFINITY),
                    Some(&weighted),
                );
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn quantize_is_tamms_rounding_and_clipping() {
        let mut out = Vec::new();
        quantize_into(&[0.25, -0.25, 0.75, 100.0, -100.0, 0.0], 0.5, &mut out);
        // 0.5 and -0.5 round to even (0), 1.5 to 2, out of range clips to 127 / -128
        assert_eq!(out, vec![0, 0, 2, 127, -128, 0]);
        assert_eq!(scale_for(127.0), 1.0);
        assert_eq!(scale_for(0.0), 1.0);
    }

    /// Every kernel family this CPU has, on ragged head widths and row counts, against the
    /// f32 attention of the dequantized cache (the definition).
    #[test]
    fn int8_attention_matches_f32_attention_of_the_dequantized_cache() {
        let mut fams = vec![portable(), ops()];
        #[cfg(target_arch = "x86_64")]
        {
            if simd::has256() {
                fams.push(simd::ops256());
            }
            if simd::has512() {
                fams.push(simd::ops512());
            }
        }
        for (heads, kvh, hd, t, start) in [(4, 2, 16, 5, 0), (2, 1, 40, 70, 3), (3, 3, 7, 1, 9)] {
            let n = start + t;
            let (qw, kw) = (heads * hd, kvh * hd);
            let q = uniform(t * qw, 1);
            let (k, v) = (uniform(n * kw, 2), uniform(n * kw, 3));
            let (ks, vs) = (scale_for(0.9), scale_for(1.0));
            let (mut k8, mut v8) = (Vec::new(), Vec::new());
            quantize_into(&k, ks, &mut k8);
            quantize_into(&v, vs, &mut v8);
            let kd: Vec<f32> = k8.iter().map(|&x| x as f32 * ks).collect();
            let vd: Vec<f32> = v8.iter().map(|&x| x as f32 * vs).collect();
            let pos: Vec<usize> = (start..n).collect();
            let sc = 1.0 / (hd as f32).sqrt();
            let want = crate::kernels::causal_attention(&q, &pos, &kd, &vd, heads, kvh, hd, sc);
            for f in &fams {
                let got =
                    causal_attention_i8_with(*f, &q, &pos, &k8, &v8, (ks, vs), heads, kvh, hd, sc);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 2e-5, "{} h{hd} t{t}: {g} vs {w}", f.name);
                }
            }
        }
    }
}
