//! Grouped-query self-attention with RoPE, optional QK-norm and optional 8-bit KV fake
//! quantisation, as in the AFM on-device model.
//!
//! A block-1 layer projects its own K/V and appends them to its cache. A block-2 (KV-reuse)
//! layer has no K/V projections: it attends to the K/V cache of the last block-1 layer, which
//! already holds RoPE'd, k-normed, quantised keys; its queries are roped at their true positions.

use crate::cache::LayerKv;
use crate::error::{LmError, Result};
use crate::linear::Fused;
use crate::rms_norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::WeightSource;

#[derive(Debug, Clone)]
pub struct Attention {
    /// `[q]` in KV-reuse (block-2) layers, `[q, k, v]` (one fused matmul) otherwise.
    proj: Fused,
    reuses_kv: bool,
    o_proj: Fused,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Learned (key, value) scales of the 8-bit KV fake quantisation.
    kv_scales: Option<(f32, f32)>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// What `Attention::load` needs to know about the layer.
pub struct AttentionSpec {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub reuses_kv: bool,
    pub qk_norm: bool,
    pub kv_quant: bool,
}

impl Attention {
    /// [`crate::linear::Linear::set_int8`] on the q/k/v and output projections.
    /// Weight bytes one token's step reads (projections only).
    pub fn bytes_read(&self) -> usize {
        self.proj.bytes_read() + self.o_proj.bytes_read()
    }

    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        self.proj.set_int8(on)?;
        self.o_proj.set_int8(on)
    }

    /// Loads `{prefix}.q_proj.weight`, `{prefix}.k_proj.weight`, `{prefix}.v_proj.weight`,
    /// `{prefix}.o_proj.weight` and, when enabled, `{prefix}.q_norm.weight`,
    /// `{prefix}.k_norm.weight`, `{prefix}.k_scale`, `{prefix}.v_scale`.
    /// KV-reuse layers must not carry K/V tensors; finding them is reported as a config error.
    pub fn load(src: &WeightSource, prefix: &str, s: &AttentionSpec) -> Result<Self> {
        let (h, hd, kvh) = (s.hidden, s.head_dim, s.n_kv_heads);
        let q_proj = src.projection(&format!("{prefix}.q_proj.weight"), s.n_heads * hd, h)?;
        let q_out = s.n_heads * hd;
        let o_proj = Fused::new(vec![(
            src.projection(&format!("{prefix}.o_proj.weight"), h, s.n_heads * hd)?,
            h,
        )])?;
        let k_name = format!("{prefix}.k_proj.weight");
        let proj = if s.reuses_kv {
            if src.contains(&k_name) {
                return Err(LmError::config(
                    "num_kv_reuse_layers",
                    format!(
                        "layer `{prefix}` is a KV-reuse layer but the checkpoint has `{}`; \
                         the config does not match the weights",
                        src.stored_name(&k_name)
                    ),
                ));
            }
            Fused::new(vec![(q_proj, q_out)])?
        } else {
            Fused::new(vec![
                (q_proj, q_out),
                (src.projection(&k_name, kvh * hd, h)?, kvh * hd),
                (
                    src.projection(&format!("{prefix}.v_proj.weight"), kvh * hd, h)?,
                    kvh * hd,
                ),
            ])?
        };
        let (q_norm, k_norm) = if s.qk_norm {
            let q = RmsNorm::load(src, &format!("{prefix}.q_norm.weight"), hd, s.eps)?;
            let k = if s.reuses_kv {
                None
            } else {
                Some(RmsNorm::load(
                    src,
                    &format!("{prefix}.k_norm.weight"),
                    hd,
                    s.eps,
                )?)
            };
            (Some(q), k)
        } else {
            (None, None)
        };
        let kv_scales = if s.kv_quant && !s.reuses_kv {
            let scalar = |n: &str| -> Result<f32> {
                let name = format!("{prefix}.{n}");
                let v = src.tensor(&name, &[1])?.to_vec1::<f32>()?[0];
                if !(v > 0.0 && v.is_finite()) {
                    return Err(LmError::BadTensor {
                        name,
                        reason: format!("KV quantisation scale {v} must be positive"),
                    });
                }
                Ok(v)
            };
            Some((scalar("k_scale")?, scalar("v_scale")?))
        } else {
            None
        };
        Ok(Self {
            proj,
            reuses_kv: s.reuses_kv,
            o_proj,
            q_norm,
            k_norm,
            kv_scales,
            n_heads: s.n_heads,
            n_kv_heads: kvh,
            head_dim: hd,
        })
    }

    /// The q/k/v (or q) and output matrices, for LoRA ([`crate::lora::attention_sites`] lists
    /// their parts in the same order).
    pub(crate) fn lora_fused(&mut self) -> [&mut Fused; 2] {
        [&mut self.proj, &mut self.o_proj]
    }

    /// The checkpoint's (key, value) scales of the 8-bit KV quantisation, if it has them.
    pub fn kv_scales(&self) -> Option<(f32, f32)> {
        self.kv_scales
    }

    pub fn reuses_kv(&self) -> bool {
        self.reuses_kv
    }

    /// A block-1 layer: projects q, k, v (one fused matmul), ropes, norms and quantises K/V,
    /// appends them to `kv`, then attends over everything in `kv`.
    ///
    /// # Shapes
    /// `x: (t, hidden)` (already normed), `pos.len() == t` -> `(t, hidden)`.
    ///
    /// `fake_quant`: apply the checkpoint's 8-bit K/V rounding when the cache is f32 (an
    /// int8 cache always rounds); `false` keeps the projections' values (`--kv 16` stores
    /// them in f16, `--kv 32` in f32).
    pub fn forward_own(
        &self,
        x: &[f32],
        pos: &[usize],
        rope: &Rope,
        kv: &mut LayerKv,
        fake_quant: bool,
    ) -> Result<Vec<f32>> {
        if self.reuses_kv {
            return Err(LmError::Invalid("forward_own on a KV-reuse layer".into()));
        }
        let t = pos.len();
        let qkv = self.proj.forward(x, t)?;
        let (qd, kvd) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let w = qd + 2 * kvd;
        let mut q = Vec::with_capacity(t * qd);
        let mut k = Vec::with_capacity(t * kvd);
        let mut v = Vec::with_capacity(t * kvd);
        for row in qkv.chunks_exact(w) {
            q.extend_from_slice(&row[..qd]);
            k.extend_from_slice(&row[qd..qd + kvd]);
            v.extend_from_slice(&row[qd + kvd..]);
        }
        rope.apply(&mut k, self.n_kv_heads, pos)?;
        if let Some(n) = &self.k_norm {
            n.forward_inplace(&mut k)?;
        }
        // an int8 cache quantizes on append (the same rounding)
        if let (Some((ks, vs)), None, true) = (self.kv_scales, kv.int8_scales(), fake_quant) {
            fake_quant_i8(&mut k, ks);
            fake_quant_i8(&mut v, vs);
        }
        kv.append(&k, &v)?;
        self.attend(q, pos, rope, kv)
    }

    /// A block-2 (KV-reuse) layer: projects q only and attends to another layer's cache.
    ///
    /// # Shapes
    /// `x: (t, hidden)` (already normed) -> `(t, hidden)`.
    pub fn forward_shared(
        &self,
        x: &[f32],
        pos: &[usize],
        rope: &Rope,
        kv: &LayerKv,
    ) -> Result<Vec<f32>> {
        let q = self.proj.forward(x, pos.len())?;
        self.attend(q, pos, rope, kv)
    }

    /// Causal attention of the query rows (row `i` at absolute position `pos[i]` sees keys
    /// `0..=pos[i]`), then the output projection.
    ///
    /// # Shapes
    /// `q: (t, heads * head_dim) -> (t, hidden)`.
    fn attend(
        &self,
        mut q: Vec<f32>,
        pos: &[usize],
        rope: &Rope,
        kv: &LayerKv,
    ) -> Result<Vec<f32>> {
        let t = pos.len();
        let (h, hd, kvh) = (self.n_heads, self.head_dim, self.n_kv_heads);
        rope.apply(&mut q, h, pos)?;
        if let Some(n) = &self.q_norm {
            n.forward_inplace(&mut q)?;
        }
        let n_keys = kv.len();
        if let Some(&p) = pos.iter().find(|&&p| p >= n_keys) {
            return Err(LmError::Invalid(format!(
                "query at position {p} but only {n_keys} keys are cached"
            )));
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let out = layer_attention(&q, pos, kv, h, kvh, hd, scale);
        self.o_proj.forward(&out, t)
    }
}

/// Many independent sequences in one pass (continuous batching): sequence `i` runs
/// `counts[i]` consecutive rows (one for a decode step, a prompt's rows for a prefill), the
/// projections run on all rows at once, so their weights are read once for the whole batch,
/// and each sequence's rows attend causally to its own cache.
impl Attention {
    /// A block-1 layer: the rows of sequence `i` (at positions `pos[..]`, in order) append
    /// their K/V to `kvs[i]` and attend over it.
    ///
    /// # Shapes
    /// `x: (n, hidden)` (already normed), `pos.len() == n == counts.iter().sum()`,
    /// `kvs.len() == counts.len()` -> `(n, hidden)`.
    ///
    /// `fake_quant` as in [`Attention::forward_own`].
    pub fn forward_own_batch(
        &self,
        x: &[f32],
        pos: &[usize],
        counts: &[usize],
        rope: &Rope,
        kvs: &mut [&mut LayerKv],
        fake_quant: bool,
    ) -> Result<Vec<f32>> {
        if self.reuses_kv {
            return Err(LmError::Invalid(
                "forward_own_batch on a KV-reuse layer".into(),
            ));
        }
        check_segments(pos.len(), counts, kvs.len())?;
        let n = pos.len();
        let qkv = self.proj.forward(x, n)?;
        let (qd, kvd) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let w = qd + 2 * kvd;
        let mut q = Vec::with_capacity(n * qd);
        let mut first = 0;
        for (&c, kv) in counts.iter().zip(kvs.iter_mut()) {
            let mut k = Vec::with_capacity(c * kvd);
            let mut v = Vec::with_capacity(c * kvd);
            for row in qkv[first * w..(first + c) * w].chunks_exact(w) {
                q.extend_from_slice(&row[..qd]);
                k.extend_from_slice(&row[qd..qd + kvd]);
                v.extend_from_slice(&row[qd + kvd..]);
            }
            rope.apply(&mut k, self.n_kv_heads, &pos[first..first + c])?;
            if let Some(n) = &self.k_norm {
                n.forward_inplace(&mut k)?;
            }
            if let (Some((ks, vs)), None, true) = (self.kv_scales, kv.int8_scales(), fake_quant) {
                fake_quant_i8(&mut k, ks);
                fake_quant_i8(&mut v, vs);
            }
            kv.append(&k, &v)?;
            first += c;
        }
        let kvs: Vec<&LayerKv> = kvs.iter().map(|k| &**k).collect();
        self.attend_batch(q, pos, counts, rope, &kvs)
    }

    /// A block-2 (KV-reuse) layer: the rows of sequence `i` attend to `kvs[i]`, another
    /// layer's cache.
    ///
    /// # Shapes
    /// `x: (n, hidden)` (already normed), `pos.len() == n == counts.iter().sum()` ->
    /// `(n, hidden)`.
    pub fn forward_shared_batch(
        &self,
        x: &[f32],
        pos: &[usize],
        counts: &[usize],
        rope: &Rope,
        kvs: &[&LayerKv],
    ) -> Result<Vec<f32>> {
        if !self.reuses_kv {
            return Err(LmError::Invalid(
                "forward_shared_batch on a layer with its own K/V".into(),
            ));
        }
        check_segments(pos.len(), counts, kvs.len())?;
        let q = self.proj.forward(x, pos.len())?;
        self.attend_batch(q, pos, counts, rope, kvs)
    }

    /// Each sequence's query rows against its own cache, then one output projection.
    ///
    /// # Shapes
    /// `q: (n, heads * head_dim) -> (n, hidden)`.
    fn attend_batch(
        &self,
        mut q: Vec<f32>,
        pos: &[usize],
        counts: &[usize],
        rope: &Rope,
        kvs: &[&LayerKv],
    ) -> Result<Vec<f32>> {
        let (h, hd, kvh) = (self.n_heads, self.head_dim, self.n_kv_heads);
        // the runs were checked by the two callers
        let n = pos.len();
        rope.apply(&mut q, h, pos)?;
        if let Some(n) = &self.q_norm {
            n.forward_inplace(&mut q)?;
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let mut first = 0;
        for (&c, kv) in counts.iter().zip(kvs) {
            if let Some(&p) = pos[first..first + c].iter().find(|&&p| p >= kv.len()) {
                return Err(LmError::Invalid(format!(
                    "query at position {p} but only {} keys are cached",
                    kv.len()
                )));
            }
            first += c;
        }
        if counts.iter().all(|&c| c == 1) {
            // decode step: every sequence in one parallel region
            let f16: Option<Vec<_>> = kvs.iter().map(|kv| kv.f16_slices()).collect();
            if let Some(slices) = f16 {
                let out = crate::kernels::decode_attention(&q, pos, &slices, h, kvh, hd, scale);
                return self.o_proj.forward(&out, n);
            }
            // int8 caches with the same scales (one model's)
            let i8s: Option<Vec<_>> = kvs.iter().map(|kv| kv.int8_slices()).collect();
            if let Some(i8s) = i8s {
                let (ks, vs) = (i8s[0].2, i8s[0].3);
                if i8s.iter().all(|s| (s.2, s.3) == (ks, vs)) {
                    let slices: Vec<(&[i8], &[i8])> = i8s.iter().map(|s| (s.0, s.1)).collect();
                    let out = crate::kv8::decode_attention_i8(
                        &q, pos, &slices, ks, vs, h, kvh, hd, scale,
                    );
                    return self.o_proj.forward(&out, n);
                }
            }
            let plain = |kv: &&LayerKv| kv.int8_slices().is_none() && kv.f16_slices().is_none();
            if kvs.iter().all(plain) {
                let slices: Vec<(&[f32], &[f32])> = kvs.iter().map(|kv| kv.slices()).collect();
                let out = crate::kernels::decode_attention(&q, pos, &slices, h, kvh, hd, scale);
                return self.o_proj.forward(&out, n);
            }
        }
        let mut out = Vec::with_capacity(q.len());
        let mut first = 0;
        for (&c, kv) in counts.iter().zip(kvs) {
            let (qi, p) = (
                &q[first * h * hd..(first + c) * h * hd],
                &pos[first..first + c],
            );
            out.extend(layer_attention(qi, p, kv, h, kvh, hd, scale));
            first += c;
        }
        self.o_proj.forward(&out, n)
    }
}

/// Causal attention of query rows `q` (at positions `pos`) over one layer's cache, in the
/// cache's own precision (int8, f16 or f32).
///
/// # Shapes
/// `q: (t, heads * hd)` (roped) -> `(t, heads * hd)`.
#[allow(clippy::too_many_arguments)]
fn layer_attention(
    q: &[f32],
    pos: &[usize],
    kv: &LayerKv,
    h: usize,
    kvh: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    if let Some((k8, v8, ks, vs)) = kv.int8_slices() {
        return crate::kv8::causal_attention_i8(q, pos, k8, v8, ks, vs, h, kvh, hd, scale);
    }
    if let Some((k, v)) = kv.f16_slices() {
        return crate::kernels::causal_attention(q, pos, k, v, h, kvh, hd, scale);
    }
    let (k, v) = kv.slices();
    crate::kernels::causal_attention(q, pos, k, v, h, kvh, hd, scale)
}

/// `n` rows split into one run of `counts[i] >= 1` rows per cache (at least one cache).
pub(crate) fn check_segments(n: usize, counts: &[usize], caches: usize) -> Result<()> {
    if counts.is_empty()
        || counts.len() != caches
        || counts.contains(&0)
        || counts.iter().sum::<usize>() != n
    {
        return Err(LmError::Invalid(format!(
            "{n} rows in runs of {counts:?} for {caches} caches: each cache needs a run of at least one row, and the runs must cover the rows"
        )));
    }
    Ok(())
}

/// `x <- clip(round(x / s), -128, 127) * s`, in f32 (round half to even, as torch;
/// [`crate::kv8::code`], the int8 cache's rounding).
/// Compiled for the level in use ([`crate::isa::vectorized`]): on the baseline x86-64 target
/// `round_ties_even` is a C library call per value (0.3% of the 3.1B model's decode on an
/// Intel Xeon, `perf`), with AVX a vector rounding instruction; the same numbers.
pub fn fake_quant_i8(x: &mut [f32], s: f32) {
    crate::isa::vectorized(
        #[inline(always)]
        || {
            for v in x.iter_mut() {
                *v = crate::kv8::code(*v, s) * s;
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::fake_quant_i8;

    /// At the level in use, the same bits as the plain loop (the baseline target's library
    /// rounding): ties to even, signed zeros, clamping, infinities and NaN.
    #[test]
    fn fake_quant_is_the_plain_loop_bit_for_bit() {
        let s = 0.37f32;
        let mut x: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.0173).collect();
        x.extend([0.5, 1.5, 2.5, -0.5, -1.5, -0.1, -0.0, 0.0, 1e9, -1e9]);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        x.extend((0..256).map(|k| (k as f32 - 128.0 + 0.5) * s));
        let mut fast = x.clone();
        fake_quant_i8(&mut fast, s);
        let plain: Vec<f32> = x
            .iter()
            .map(|v| (v / s).round_ties_even().clamp(-128.0, 127.0) * s)
            .collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&plain));
    }
}
