//! Grouped-query self-attention with RoPE, optional QK-norm and optional 8-bit KV fake
//! quantisation, as in the AFM on-device model.
//!
//! A block-1 layer projects its own K/V and appends them to its cache. A block-2 (KV-reuse)
//! layer has no K/V projections: it attends to the K/V cache of the last block-1 layer, which
//! already holds RoPE'd, k-normed, quantised keys; its queries are roped at their true positions.

use crate::cache::LayerKv;
use crate::error::{LmError, Result};
use crate::rms_norm::RmsNorm;
use crate::rope::{Positions, Rope};
use crate::weights::WeightSource;
use crate::linear::{Fused, Linear};
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct Attention {
    /// `[q]` in KV-reuse (block-2) layers, `[q, k, v]` (one fused matmul) otherwise.
    proj: Fused,
    reuses_kv: bool,
    o_proj: Linear,
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
    /// Loads `{prefix}.q_proj.weight`, `{prefix}.k_proj.weight`, `{prefix}.v_proj.weight`,
    /// `{prefix}.o_proj.weight` and, when enabled, `{prefix}.q_norm.weight`,
    /// `{prefix}.k_norm.weight`, `{prefix}.k_scale`, `{prefix}.v_scale`.
    /// KV-reuse layers must not carry K/V tensors; finding them is reported as a config error.
    pub fn load(src: &WeightSource, prefix: &str, s: &AttentionSpec) -> Result<Self> {
        let (h, hd, kvh) = (s.hidden, s.head_dim, s.n_kv_heads);
        let q_proj = src.matrix(&format!("{prefix}.q_proj.weight"), s.n_heads * hd, h)?;
        let q_out = s.n_heads * hd;
        let o_proj = src.matrix(&format!("{prefix}.o_proj.weight"), h, s.n_heads * hd)?;
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
                (src.matrix(&k_name, kvh * hd, h)?, kvh * hd),
                (src.matrix(&format!("{prefix}.v_proj.weight"), kvh * hd, h)?, kvh * hd),
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

    pub fn reuses_kv(&self) -> bool {
        self.reuses_kv
    }

    fn heads(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// A block-1 layer: projects q, k, v (one fused matmul), ropes, norms and quantises K/V,
    /// appends them to `kv`, then attends over everything in `kv`.
    ///
    /// # Shapes
    /// `x: (1, t, hidden) -> (1, t, hidden)`.
    pub fn forward_own(&self, x: &Tensor, pos: &Positions, rope: &Rope, kv: &mut LayerKv) -> Result<Tensor> {
        if self.reuses_kv {
            return Err(LmError::Invalid("forward_own on a KV-reuse layer".into()));
        }
        let mut p = self.proj.forward(x)?.into_iter();
        let (q, k, v) = match (p.next(), p.next(), p.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => return Err(LmError::Invalid("fused q/k/v projection returned too few parts".into())),
        };
        let k = self.heads(&k, self.n_kv_heads)?;
        let mut v = self.heads(&v, self.n_kv_heads)?;
        let mut k = rope.apply(&k, pos)?;
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        if let Some((ks, vs)) = self.kv_scales {
            k = fake_quant_i8(&k, ks)?;
            v = fake_quant_i8(&v, vs)?;
        }
        kv.append(&k, &v)?;
        self.attend(&q, pos, rope, kv)
    }

    /// A block-2 (KV-reuse) layer: projects q only and attends to another layer's cache.
    ///
    /// # Shapes
    /// `x: (1, t, hidden) -> (1, t, hidden)`; `kv` holds `(1, kv_heads, T, head_dim)`.
    pub fn forward_shared(&self, x: &Tensor, pos: &Positions, rope: &Rope, kv: &LayerKv) -> Result<Tensor> {
        let q = self
            .proj
            .forward(x)?
            .into_iter()
            .next()
            .ok_or_else(|| LmError::Invalid("empty q projection".into()))?;
        self.attend(&q, pos, rope, kv)
    }

    /// Attends from projected queries `q` (rows at absolute positions `pos`) to the keys in
    /// `kv` with a causal mask, then applies the output projection.
    ///
    /// # Shapes
    /// `q: (1, t, heads * head_dim) -> (1, t, hidden)`.
    fn attend(&self, q: &Tensor, pos: &Positions, rope: &Rope, kv: &LayerKv) -> Result<Tensor> {
        let (_, t, _) = q.dims3()?;
        let q = self.heads(q, self.n_heads)?;
        let mut q = rope.apply(&q, pos)?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        let (k, v) = kv.kv()?;
        let n_keys = k.dim(2)?;
        let rep = self.n_heads / self.n_kv_heads;
        // GQA without copying K/V: query head `j*rep + r` uses K/V head `j`, so fold the
        // `rep` query heads of each K/V head into the row dimension.
        let q = (q * (1.0 / (self.head_dim as f64).sqrt()))?
            .reshape((1, self.n_kv_heads, rep * t, self.head_dim))?;
        let scores = q.matmul(&k.t()?)?; // (1, kvh, rep*t, T)
        let scores = match causal_mask(pos, n_keys)? {
            Some(mask) => scores
                .reshape((1, self.n_kv_heads, rep, t, n_keys))?
                .broadcast_add(&mask)?
                .reshape((1, self.n_kv_heads, rep * t, n_keys))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?;
        let out = probs.matmul(&v.contiguous()?)?; // (1, kvh, rep*t, hd)
        let out = out
            .reshape((1, self.n_heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((1, t, self.n_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

/// `x <- clip(round(x / s), -128, 127) * s`, in f32.
pub fn fake_quant_i8(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(((x / s as f64)?.round()?.clamp(-128f32, 127f32)? * s as f64)?)
}

/// Additive mask `(t, T)`: row i (absolute position p_i) sees keys `0..=p_i`. `None` when no
/// key needs masking (a single query at the last position).
fn causal_mask(pos: &Positions, n_keys: usize) -> Result<Option<Tensor>> {
    let ps = pos.to_vec();
    if ps.iter().all(|&p| p as usize + 1 >= n_keys) {
        return Ok(None);
    }
    let mut m = vec![0f32; ps.len() * n_keys];
    for (i, &p) in ps.iter().enumerate() {
        for j in (p as usize + 1)..n_keys {
            m[i * n_keys + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Some(Tensor::from_vec(m, (ps.len(), n_keys), &Device::Cpu)?))
}
