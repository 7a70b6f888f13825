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

/// The code of `v` at scale `s`, as an f32: `clip(round(v / s), -128, 127)`, ties to even, as
/// tamm computes it (a division, not a multiply by the inverse, so that ties fall exactly
/// where tamm has them). The int8 cache stores it ([`quantize_into`]); the 8-bit K/V mode
/// of an f32 cache multiplies it back by `s` ([`crate::attention::fake_quant_i8`]), so both
/// round alike. Inlined, for the callers' [`crate::isa::vectorized`] loops.
#[inline(always)]
pub(crate) fn code(v: f32, s: f32) -> f32 {
    (v / s).round_ties_even().clamp(-128.0, 127.0)
}

/// Appends `x` quantized with scale `s` to `out`. Compiled for the level in use
/// ([`crate::isa::vectorized`]): on the baseline x86-64 target `round_ties_even` is a C
/// library call per value (`rintf`, 0.1-0.2% of a thread's time in the 3.1B model's decode
/// on an Intel Xeon, `perf`); the same codes.
pub fn quantize_into(x: &[f32], s: f32, out: &mut Vec<i8>) {
    crate::isa::vectorized(
        #[inline(always)]
        || out.extend(x.iter().map(|&v| code(v, s) as i8)),
    )
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

/// Which kernel the int8 KV attention runs on this CPU: the row attention of the f32 and
/// f16 caches (`crate::kernels`, AVX2 + FMA + F16C when the level allows and the head
/// width is a multiple of 8, else portable).
pub fn kernel_name() -> &'static str {
    if crate::isa::level() >= crate::isa::Isa::Avx2 {
        "avx2 rows"
    } else {
        "portable rows"
    }
}

/// Causal GQA attention over an int8 K/V cache: as [`crate::kernels::causal_attention`]
/// (query row `i` at absolute position `pos[i]` sees keys `0..=pos[i]`, query head
/// `j * (heads / kv_heads) + r` uses K/V head `j`), with keys `k_scale * k8` and values
/// `v_scale * v8`. It is that row attention over the int8 codes themselves (widened as they
/// load), with `scale * k_scale` as the score scale and the output times `v_scale`: one
/// query row at a time, so a prefill row computes what a decode step computes.
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
    let mut out =
        crate::kernels::causal_attention(q, pos, k8, v8, heads, kv_heads, hd, scale * k_scale);
    out.iter_mut().for_each(|x| *x *= v_scale);
    out
}

/// [`crate::kernels::decode_attention`] over int8 caches that share one pair of scales (one
/// model's), with the scales applied as [`causal_attention_i8`] applies them: each row the
/// same numbers as that function gives its sequence alone.
///
/// # Shapes
/// `q: (b, heads * hd)` (roped), `kv[i]: (n_i, kv_heads * hd)` each -> `(b, heads * hd)`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_i8(
    q: &[f32],
    pos: &[usize],
    kv: &[(&[i8], &[i8])],
    k_scale: f32,
    v_scale: f32,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let mut out =
        crate::kernels::decode_attention(q, pos, kv, heads, kv_heads, hd, scale * k_scale);
    out.iter_mut().for_each(|x| *x *= v_scale);
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

    /// At the level in use, the codes of the plain loop (the baseline target's library
    /// rounding): ties to even, clipping, signed zeros, infinities and NaN (which `as i8`
    /// makes 0).
    #[test]
    fn quantize_is_the_plain_loop() {
        let s = 0.37f32;
        let mut x: Vec<f32> = (-30000..30000).map(|i| i as f32 * 0.0031).collect();
        x.extend([0.5, 1.5, 2.5, -0.5, -1.5, -0.0, 1e9, -1e9]);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        x.extend((0..256).map(|k| (k as f32 - 128.0 + 0.5) * s));
        let mut fast = vec![7i8];
        quantize_into(&x, s, &mut fast);
        let plain: Vec<i8> = std::iter::once(7)
            .chain(
                x.iter()
                    .map(|v| (v / s).round_ties_even().clamp(-128.0, 127.0) as i8),
            )
            .collect();
        assert_eq!(fast, plain);
    }

    /// On ragged head widths (multiples of 8 take the SIMD path) and row counts: close to the
    /// f32 attention of the dequantized cache (the definition), and bit for bit the f32 row
    /// attention over the widened codes with the scales applied as documented.
    #[test]
    fn int8_attention_matches_f32_attention_of_the_dequantized_cache() {
        for (heads, kvh, hd, t, start) in [
            (4, 2, 16, 5, 0),
            (2, 1, 40, 70, 3),
            (3, 3, 7, 1, 9),
            (6, 2, 64, 9, 30),
        ] {
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
            let got = causal_attention_i8(&q, &pos, &k8, &v8, ks, vs, heads, kvh, hd, sc);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 2e-5, "h{hd} t{t}: {g} vs {w}");
            }
            let kw8: Vec<f32> = k8.iter().map(|&x| x as f32).collect();
            let vw8: Vec<f32> = v8.iter().map(|&x| x as f32).collect();
            let mut same =
                crate::kernels::causal_attention(&q, &pos, &kw8, &vw8, heads, kvh, hd, sc * ks);
            same.iter_mut().for_each(|x| *x *= vs);
            assert!(
                got.iter()
                    .zip(&same)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "h{hd} t{t}"
            );
        }
    }
}
