//! `DiffLm`: the dense decoder written in plain candle tensor ops, so gradients flow through
//! it. Training an adapter with the language model frozen needs d(loss)/d(input embeddings)
//! through the whole LM; `DeviceModel`'s inference kernels work on slices and keep no graph.
//!
//! Same function as [`crate::DeviceModel`] (RMSNorm, GQA with RoPE on adjacent pairs or on
//! halves, optional QK-norm after RoPE, SwiGLU, tied or untied output) over a whole sequence
//! with a causal mask, no cache. Checkpoints with KV-cache sharing or KV quantisation are
//! refused (their block-2 layers and rounding are inference paths). Weights are plain f32
//! tensors (GGUF matrices are dequantized) and always frozen: the matrix products pass
//! gradients back to their input only ([`FrozenLinear`]), so training the LM itself would need
//! another path. A LoRA adapter ([`DiffLm::attach_lora`]) is the exception: its A and B
//! factors are [`Var`]s beside the frozen projections ([`DiffLm::lora_vars`] for an optimizer,
//! [`DiffLm::lora_adapter`] to save the result for `DeviceModel`).

use crate::config::LmConfig;
use crate::error::{LmError, Result};
use crate::lora::{self, LoraAdapter, LoraConfig, LoraPair, LoraSite, LoraTarget};
use crate::weights::WeightSource;
use candle_core::{DType, Device, Tensor, Var, D};
use std::collections::BTreeMap;
use std::sync::Mutex;

struct DiffLayer {
    /// Position in the stack (the `N` of `model.layers.N`).
    index: usize,
    input_norm: Tensor,
    q: FrozenLinear,
    k: FrozenLinear,
    v: FrozenLinear,
    o: FrozenLinear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    gate: FrozenLinear,
    up: FrozenLinear,
    down: FrozenLinear,
    /// Trainable LoRA factors `(A (r, in), B (out, r))` per target, in
    /// [`LoraTarget::ALL`] order; `None` where the adapter has none.
    lora: [Option<(Var, Var)>; 7],
}

/// The trainable adapter of a [`DiffLm`]: its config and base hash (the factors live in the
/// layers).
struct DiffLora {
    config: LoraConfig,
    base_sha256: String,
}

/// A differentiable dense decoder (see the module docs).
pub struct DiffLm {
    cfg: LmConfig,
    embed: Tensor,
    layers: Vec<DiffLayer>,
    norm: Tensor,
    lm_head: FrozenLinear,
    /// `(max_len, head_dim / 2)` each.
    cos: Tensor,
    sin: Tensor,
    lora: Option<DiffLora>,
    /// While [`DiffLm::input_importance`] runs: per layer and projection ([`LoraTarget::ALL`]
    /// order), the per-column sum of squared inputs and the rows summed.
    recorder: Mutex<Option<Vec<[(Vec<f64>, usize); 7]>>>,
}

/// Several sequences that share a prefix, packed into one row of a batch: each token has a
/// position (its RoPE position) and a segment. Segment 0 is the shared prefix; a token of
/// segment `s > 0` attends to the earlier tokens of the prefix and of its own segment only.
/// With each segment's positions continuing from the prefix's end, the hidden states of a
/// segment are those of prefix ++ segment run alone: one forward pass computes the prefix
/// once for all of them (how stage 2 trains several questions about one image without
/// later questions seeing earlier answers).
///
/// # Shapes
/// `positions`, `segments`: `b * t` entries, row-major over the batch's `(b, t)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
}

impl Packing {
    fn check(&self, b: usize, t: usize, max_positions: usize) -> Result<()> {
        if self.positions.len() != b * t || self.segments.len() != b * t {
            return Err(LmError::Invalid(format!(
                "packing: {} positions and {} segments for a batch of {b} x {t} tokens",
                self.positions.len(),
                self.segments.len()
            )));
        }
        if let Some(p) = self
            .positions
            .iter()
            .find(|&&p| p as usize >= max_positions)
        {
            return Err(LmError::Invalid(format!(
                "packing: position {p} is beyond the model's {max_positions} positions"
            )));
        }
        Ok(())
    }

    /// Additive attention mask: 0 where query `i` may read key `j` (`j <= i` and `j` in the
    /// prefix or in `i`'s segment), -inf elsewhere.
    ///
    /// # Shapes
    /// -> `b * t * t` entries, `(b, t, t)` row-major.
    pub fn mask(&self, b: usize, t: usize) -> Vec<f32> {
        let mut m = Vec::with_capacity(b * t * t);
        for r in 0..b {
            let seg = &self.segments[r * t..(r + 1) * t];
            for i in 0..t {
                m.extend((0..t).map(|j| {
                    if j <= i && (seg[j] == 0 || seg[j] == seg[i]) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        m
    }
}

/// `x @ W^T` for a frozen `W`: candle's matmul backward computes the gradient of both
/// operands, which for frozen weights is pure waste (a third of the LM's backward, and a
/// 49152 x 576 gradient for the output layer every step). This op passes back `dL/dx` only.
#[derive(Clone)]
struct FrozenLinear {
    /// `(in, out)`, contiguous: the layout candle's matmul runs fastest (transposed once, at
    /// load).
    wt: Tensor,
}

impl FrozenLinear {
    /// From a PyTorch-layout `(out, in)` matrix.
    fn new(w: Tensor) -> Result<Self> {
        Ok(Self {
            wt: w.t()?.contiguous()?,
        })
    }

    /// `x @ W^T`, no weight gradient.
    ///
    /// # Shapes
    /// `x: (rows, in)` -> `(rows, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("frozen-linear: f32 input expected")
        };
        let (rows, inp) = l.shape().dims2()?;
        let x = match l.contiguous_offsets() {
            Some((a, b)) => Tensor::from_slice(&v[a..b], (rows, inp), &Device::Cpu)?,
            None => candle_core::bail!("frozen-linear: contiguous input expected"),
        };
        let y = x.matmul(&self.wt)?;
        let out = y.dim(1)?;
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1()?),
            (rows, out).into(),
        ))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.wt.t()?)?))
    }
}

fn poisoned() -> LmError {
    LmError::Invalid("input importance: a pass panicked while recording".into())
}

/// `x * rsqrt(mean(x^2) + eps) * w` over the last dim.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

impl DiffLm {
    /// Reads every weight as f32 (HF names; GGUF names are mapped by the source).
    pub fn from_source(src: &WeightSource, cfg: LmConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.num_kv_reuse_layers > 0 || cfg.kv_quant {
            return Err(LmError::config(
                if cfg.kv_quant {
                    "kv_quant"
                } else {
                    "num_kv_reuse_layers"
                },
                "the differentiable model covers plain dense checkpoints only",
            ));
        }
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
        let (nh, kvh) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let embed = src.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let t = |n: &str, s: &[usize]| src.tensor(&format!("{p}.{n}"), s);
                let m = |n: &str, s: &[usize]| FrozenLinear::new(t(n, s)?);
                Ok(DiffLayer {
                    index: i,
                    input_norm: t("input_layernorm.weight", &[h])?,
                    q: m("self_attn.q_proj.weight", &[nh * hd, h])?,
                    k: m("self_attn.k_proj.weight", &[kvh * hd, h])?,
                    v: m("self_attn.v_proj.weight", &[kvh * hd, h])?,
                    o: m("self_attn.o_proj.weight", &[h, nh * hd])?,
                    q_norm: cfg
                        .qk_norm
                        .then(|| t("self_attn.q_norm.weight", &[hd]))
                        .transpose()?,
                    k_norm: cfg
                        .qk_norm
                        .then(|| t("self_attn.k_norm.weight", &[hd]))
                        .transpose()?,
                    post_norm: t("post_attention_layernorm.weight", &[h])?,
                    gate: m("mlp.gate_proj.weight", &[inter, h])?,
                    up: m("mlp.up_proj.weight", &[inter, h])?,
                    down: m("mlp.down_proj.weight", &[h, inter])?,
                    lora: Default::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = src.tensor("model.norm.weight", &[h])?;
        let lm_head = FrozenLinear::new(if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            src.tensor("lm_head.weight", &[cfg.vocab_size, h])?
        })?;
        let half = hd / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
            .collect();
        let n = cfg.max_position_embeddings;
        let ang: Vec<f32> = (0..n)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        let ang = Tensor::from_vec(ang, (n, half), &Device::Cpu)?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            cos: ang.cos()?,
            sin: ang.sin()?,
            cfg,
            lora: None,
            recorder: Mutex::new(None),
        })
    }

    /// Every projection a LoRA adapter can target: q/k/v/o and gate/up/down of every layer,
    /// with the module paths of [`crate::DeviceModel::lora_sites`].
    pub fn lora_sites(&self) -> Vec<LoraSite> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim());
        (0..c.num_hidden_layers)
            .flat_map(|i| {
                let p = format!("model.layers.{i}");
                let a = lora::attention_sites(
                    &format!("{p}.self_attn"),
                    h,
                    c.num_attention_heads * hd,
                    Some(c.num_kv_heads() * hd),
                );
                let m = lora::mlp_sites(&format!("{p}.mlp"), h, c.intermediate_size);
                a.into_iter().chain(m).flatten()
            })
            .collect()
    }

    /// Makes `adapter`'s factors trainable parameters of this model (copies, as [`Var`]s;
    /// the base stays frozen): the forward pass adds `scale * (x A^T) B^T` to each targeted
    /// projection, unmerged, so gradients reach A and B. Start training from
    /// [`LoraAdapter::random`] with `b_std = 0` (the adapter then changes nothing at step 0).
    /// Modules the model lacks and wrong widths are refused by tensor name, before anything
    /// changes; a second adapter is an error.
    ///
    /// The base hash is not checked here (a `DiffLm` does not know its file); it is carried
    /// into [`DiffLm::lora_adapter`], so the trained file only loads onto that base.
    pub fn attach_lora(&mut self, adapter: &LoraAdapter) -> Result<()> {
        if self.lora.is_some() {
            return Err(LmError::Invalid(
                "this DiffLm already has a LoRA adapter".into(),
            ));
        }
        let sites = self.lora_sites();
        let r = adapter.config().rank;
        let mut found = Vec::new();
        for s in &sites {
            let Some(p) = adapter.modules().get(&s.module) else {
                continue;
            };
            if p.a.dims() != [r, s.in_dim] {
                return Err(LmError::ShapeMismatch {
                    name: lora::a_name(&s.module),
                    expected: vec![r, s.in_dim],
                    got: p.a.dims().to_vec(),
                });
            }
            if p.b.dims() != [s.out_dim, r] {
                return Err(LmError::ShapeMismatch {
                    name: lora::b_name(&s.module),
                    expected: vec![s.out_dim, r],
                    got: p.b.dims().to_vec(),
                });
            }
            found.push(s);
        }
        if let Some(m) = adapter
            .modules()
            .keys()
            .find(|m| !found.iter().any(|s| &s.module == *m))
        {
            return Err(LmError::BadTensor {
                name: lora::a_name(m),
                reason: format!("the model has no projection `{m}`"),
            });
        }
        for s in found {
            let p = &adapter.modules()[&s.module];
            let layer: usize = s
                .module
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| LmError::Invalid(format!("bad module path `{}`", s.module)))?;
            let slot = LoraTarget::ALL
                .iter()
                .position(|t| *t == s.target)
                .unwrap_or(0);
            // fresh storage: training must not write into the adapter's tensors
            self.layers[layer].lora[slot] = Some((
                Var::from_tensor(&p.a.copy()?)?,
                Var::from_tensor(&p.b.copy()?)?,
            ));
        }
        self.lora = Some(DiffLora {
            config: adapter.config().clone(),
            base_sha256: adapter.base_sha256().to_string(),
        });
        Ok(())
    }

    /// The trainable LoRA parameters (A and B of every targeted projection), for an
    /// optimizer; empty without an adapter.
    pub fn lora_vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.lora.iter().flatten())
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect()
    }

    /// The adapter's current values as a [`LoraAdapter`] (to save with
    /// [`LoraAdapter::save`] and apply to a `DeviceModel` of the same base).
    pub fn lora_adapter(&self) -> Result<LoraAdapter> {
        let lo = self
            .lora
            .as_ref()
            .ok_or_else(|| LmError::Invalid("this DiffLm has no LoRA adapter".into()))?;
        let mut modules = std::collections::BTreeMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (t, f) in LoraTarget::ALL.iter().zip(&l.lora) {
                if let Some((a, b)) = f {
                    modules.insert(
                        t.module_in(&format!("model.layers.{i}")),
                        LoraPair {
                            a: a.as_tensor().detach().copy()?,
                            b: b.as_tensor().detach().copy()?,
                        },
                    );
                }
            }
        }
        LoraAdapter::new(lo.config.clone(), &lo.base_sha256, modules)
    }

    /// `w(x)` plus the LoRA update of `target` in layer `l`, if any.
    ///
    /// # Shapes
    /// `x: (rows, in)` -> `(rows, out)`.
    fn proj(
        &self,
        l: &DiffLayer,
        target: LoraTarget,
        w: &FrozenLinear,
        x: &Tensor,
    ) -> Result<Tensor> {
        let y = w.forward(x)?;
        let slot = LoraTarget::ALL
            .iter()
            .position(|t| *t == target)
            .unwrap_or(0);
        if let Some(rec) = self.recorder.lock().map_err(|_| poisoned())?.as_mut() {
            let sq = x.detach().sqr()?.sum(0)?.to_vec1::<f32>()?;
            let (sum, rows) = &mut rec[l.index][slot];
            if sum.is_empty() {
                sum.resize(sq.len(), 0.0);
            }
            for (s, v) in sum.iter_mut().zip(&sq) {
                *s += f64::from(*v);
            }
            *rows += x.dim(0)?;
        }
        match (&l.lora[slot], &self.lora) {
            (Some((a, b)), Some(lo)) => {
                let d = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
                Ok((y + (d * lo.config.scale() as f64)?)?)
            }
            _ => Ok(y),
        }
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Token embeddings.
    ///
    /// # Shapes
    /// `ids: (b, t)` u32 -> `(b, t, hidden)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(LmError::BadTokenId {
                id: max,
                vocab: self.cfg.vocab_size,
            });
        }
        Ok(self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?)
    }

    /// The RoPE angles' cosines and sines at positions `0..t`, or at `packing`'s positions.
    ///
    /// # Shapes
    /// -> `(t, head_dim / 2)` each, or `(b, 1, t, head_dim / 2)` with a packing.
    fn rope_tables(
        &self,
        b: usize,
        t: usize,
        packing: Option<&Packing>,
    ) -> Result<(Tensor, Tensor)> {
        Ok(match packing {
            None => (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?),
            Some(p) => {
                let idx = Tensor::from_vec(p.positions.clone(), b * t, &Device::Cpu)?;
                let half = self.cos.dim(1)?;
                let pick = |z: &Tensor| -> Result<Tensor> {
                    Ok(z.index_select(&idx, 0)?.reshape((b, 1, t, half))?)
                };
                (pick(&self.cos)?, pick(&self.sin)?)
            }
        })
    }

    /// RoPE with the angles of [`Self::rope_tables`].
    ///
    /// # Shapes
    /// `x: (b, heads, t, head_dim)` -> same.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, nh, t, hd) = x.dims4()?;
        let half = hd / 2;
        let (x0, x1) = if self.cfg.rope_interleaved {
            let x = x.reshape((b, nh, t, half, 2))?;
            (
                x.narrow(4, 0, 1)?.squeeze(4)?,
                x.narrow(4, 1, 1)?.squeeze(4)?,
            )
        } else {
            (x.narrow(3, 0, half)?, x.narrow(3, half, half)?)
        };
        let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
        let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
        Ok(if self.cfg.rope_interleaved {
            Tensor::stack(&[r0, r1], 4)?.reshape((b, nh, t, hd))?
        } else {
            Tensor::cat(&[r0, r1], 3)?
        })
    }

    /// Final hidden states (after the last layer, before the final norm) of a batch of
    /// sequences that all start at position 0.
    ///
    /// # Shapes
    /// `x: (b, t, hidden) -> (b, t, hidden)`.
    pub fn hidden_states(&self, x: &Tensor) -> Result<Tensor> {
        self.hidden_states_packed(x, None)
    }

    /// [`Self::hidden_states`] with each row's positions and attention given by `packing`
    /// (several sequences sharing a prefix in one row, [`Packing`]); `None`: causal, positions
    /// `0..t`.
    ///
    /// # Shapes
    /// `x: (b, t, hidden) -> (b, t, hidden)`; `packing` holds `b * t` entries.
    pub fn hidden_states_packed(&self, x: &Tensor, packing: Option<&Packing>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        if h != self.cfg.hidden_size {
            return Err(LmError::Invalid(format!(
                "input embeddings have width {h}, the model's hidden size is {}",
                self.cfg.hidden_size
            )));
        }
        if t == 0 || t > self.cfg.max_position_embeddings {
            return Err(LmError::PromptTooLong {
                tokens: t,
                context: self.cfg.max_position_embeddings,
                reserved: 0,
            });
        }
        let (nh, kvh, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_kv_heads(),
            self.cfg.head_dim(),
        );
        let eps = self.cfg.rms_norm_eps;
        let mask = match packing {
            None => {
                let m: Vec<f32> = (0..t)
                    .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                    .collect();
                Tensor::from_vec(m, (t, t), x.device())?
            }
            Some(p) => {
                p.check(b, t, self.cfg.max_position_embeddings)?;
                Tensor::from_vec(p.mask(b, t), (b, 1, t, t), x.device())?
            }
        };
        let (cos, sin) = self.rope_tables(b, t, packing)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = x.to_dtype(DType::F32)?;
        for l in &self.layers {
            let hn = rms_norm(&x, &l.input_norm, eps)?.reshape((b * t, h))?;
            let heads = |tg: LoraTarget, w: &FrozenLinear, n: usize| -> Result<Tensor> {
                Ok(self
                    .proj(l, tg, w, &hn)?
                    .reshape((b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let mut q = self.rope(&heads(LoraTarget::Q, &l.q, nh)?, &cos, &sin)?;
            let mut k = self.rope(&heads(LoraTarget::K, &l.k, kvh)?, &cos, &sin)?;
            let v = heads(LoraTarget::V, &l.v, kvh)?;
            if let Some(w) = &l.q_norm {
                q = rms_norm(&q, w, eps)?;
            }
            if let Some(w) = &l.k_norm {
                k = rms_norm(&k, w, eps)?;
            }
            // GQA: query head g*rep + r reads K/V head g
            let rep = nh / kvh;
            let (k, v) = if rep > 1 {
                let expand = |z: &Tensor| -> Result<Tensor> {
                    Ok(z.unsqueeze(2)?
                        .broadcast_as((b, kvh, rep, t, hd))?
                        .reshape((b, nh, t, hd))?)
                };
                (expand(&k)?, expand(&v)?)
            } else {
                (k, v)
            };
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let a = p
                .matmul(&v.contiguous()?)?
                .transpose(1, 2)?
                .reshape((b * t, nh * hd))?;
            let a = self.proj(l, LoraTarget::O, &l.o, &a)?.reshape((b, t, h))?;
            x = (x + a)?;
            let hn = rms_norm(&x, &l.post_norm, eps)?.reshape((b * t, h))?;
            let g = self.proj(l, LoraTarget::Gate, &l.gate, &hn)?;
            let u = self.proj(l, LoraTarget::Up, &l.up, &hn)?;
            let m = self.proj(
                l,
                LoraTarget::Down,
                &l.down,
                &(candle_nn::ops::silu(&g)? * u)?,
            )?;
            x = (x + m.reshape((b, t, h))?)?;
        }
        Ok(x)
    }

    /// Logits of the rows of `hidden` (e.g. only the positions a loss needs).
    ///
    /// # Shapes
    /// `hidden: (n, hidden) -> (n, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let hn = rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps)?;
        self.lm_head.forward(&hn)
    }

    /// The importance of each input column of every projection: the mean squared input
    /// `E[x_j^2]` over the positions of `ids`, run as consecutive windows of at most `window`
    /// tokens (each from position 0). A quantizer that weighs column `j`'s rounding error by it
    /// minimises the expected output error `E[(x . (w - q))^2]` under independent inputs (what
    /// llama.cpp calls an importance matrix). Keys: HF weight names,
    /// `model.layers.N.self_attn.q_proj.weight` ... `model.layers.N.mlp.down_proj.weight`;
    /// values: one entry per input column. With a LoRA adapter attached, the inputs recorded
    /// are those of the adapted model (quantize the base: run this without one).
    ///
    /// # Shapes
    /// `ids`: at least 1 token, any length (windows of `window`).
    pub fn input_importance(
        &self,
        ids: &[u32],
        window: usize,
    ) -> Result<BTreeMap<String, Vec<f32>>> {
        if ids.is_empty() || window == 0 {
            return Err(LmError::Invalid(format!(
                "input importance: {} calibration tokens in windows of {window}: need at \
                 least one token and a window of at least one",
                ids.len()
            )));
        }
        let n = self.layers.len();
        *self.recorder.lock().map_err(|_| poisoned())? =
            Some((0..n).map(|_| Default::default()).collect());
        let run = || -> Result<()> {
            for w in ids.chunks(window.min(self.cfg.max_position_embeddings)) {
                let t = Tensor::from_slice(w, (1, w.len()), &Device::Cpu)?;
                self.hidden_states(&self.embed(&t)?)?;
            }
            Ok(())
        };
        let ran = run();
        let rec = self.recorder.lock().map_err(|_| poisoned())?.take();
        ran?;
        let rec = rec.ok_or_else(poisoned)?;
        let mut out = BTreeMap::new();
        for (i, slots) in rec.into_iter().enumerate() {
            for (t, (sum, rows)) in LoraTarget::ALL.iter().zip(slots) {
                let mean = sum.iter().map(|s| (s / rows.max(1) as f64) as f32);
                out.insert(
                    format!("{}.weight", t.module_in(&format!("model.layers.{i}"))),
                    mean.collect(),
                );
            }
        }
        Ok(out)
    }

    /// Whether no importance pass is recording (tests).
    #[cfg(test)]
    pub(crate) fn recorder_is_idle(&self) -> bool {
        self.recorder.lock().map(|r| r.is_none()).unwrap_or(false)
    }

    /// Logits of every position.
    ///
    /// # Shapes
    /// `x: (b, t, hidden) -> (b, t, vocab)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let hs = self.hidden_states(x)?.reshape((b * t, h))?;
        Ok(self.logits(&hs)?.reshape((b, t, self.cfg.vocab_size))?)
    }
}
