//! `ServerModel`: the AFM server language model, Parallel-Track Mixture-of-Experts (PT-MoE),
//! behind the common [`LanguageModel`] trait.
//!
//! # Forward pass
//! `embed_tokens` -> for each *segment* (track block) of `track_block_depth` (D) layers:
//! copy the hidden state into every one of the `num_tracks` (T) tracks, run the segment's D
//! layers of each track on its own copy (each track has its own residual stream and its own
//! K/V cache per layer; nothing is exchanged between tracks inside a segment), then merge the
//! T track outputs into one hidden state (`track_merge`: `mean` = sum / T, or `sum`) ->
//! final RMSNorm (`model.norm`) -> `lm_head`.
//!
//! **Track parallelism rule.** The T tracks of one segment run concurrently on afm's pool
//! (`par::par_ranges` over the tracks, each track running its D layers sequentially, with
//! afm's kernels inside a track on that track's thread alone, `par::inline`); the only join is
//! at the segment boundary, where the merge adds the track outputs *in track order* 0, 1, ..,
//! T-1 (then divides by T for `mean`). The merge order is fixed, so a parallel run is bitwise
//! equal to a sequential one (`set_parallel_tracks(false)`). Synchronisation points per pass:
//! `num_layers_per_track / D`.
//!
//! Layer `i` of a track (0-based, the same in every track):
//! - attention kind `attention_pattern[i % attention_pattern.len()]`: `local` = RoPE +
//!   sliding window (a query at position `p` sees keys `max(0, p - sliding_window) ..= p`,
//!   i.e. `sliding_window + 1` keys: the window excludes the current token); `global` = full
//!   causal attention, no positional encoding (NoPE) unless `global_rope`;
//! - MLP: a mixture of experts when `moe_every > 0` and `i % moe_every == moe_every - 1`
//!   (with `moe_every = 2`: dense, sparse, dense, sparse, ...), the dense SwiGLU otherwise.
//!
//! Attention (as `DeviceModel`): q/k/v projections, RoPE (local layers), then QK-norm
//! (learned RMSNorm over the head dim) when `qk_norm`, scaled dot product, `o_proj`.
//!
//! MoE (dropless): router logits `l = router(x)` on the post-attention-normed input, soft-capped
//! `c = cap * tanh(l / cap)` (`router_softcap`), the top `experts_per_token` (k) experts by `c`
//! (ties broken by the lower expert index), weights = softmax over the k selected `c`, output
//! `sum_j w_j * SwiGLU_{e_j}(x)`, plus `SwiGLU_shared(x)` when the config has a shared
//! expert (`shared_expert_intermediate_size > 0`; off in the paper). Experts are private to
//! their track.
//!
//! # K/V cache
//! One `LayerKv` per (track, layer), cache index `track * num_layers_per_track + layer`. A local
//! layer's cache is trimmed after every forward pass to the last `sliding_window` positions (all
//! the next query can see), so a long prompt does not grow it. Consequence: rolling a cache back
//! (`Cache::truncate`) to before the kept window empties those layers, and the next pass then
//! fails with an error rather than computing a wrong result.
//!
//! # Tensor names
//! `(out, in)` matrices as in PyTorch; `{p} = model.tracks.{t}.layers.{i}`:
//! - `model.embed_tokens.weight (vocab, hidden)`, `model.norm.weight (hidden)`,
//!   `lm_head.weight (vocab, hidden)` unless `tie_word_embeddings`;
//! - `{p}.input_layernorm.weight (hidden)`, `{p}.post_attention_layernorm.weight (hidden)`;
//! - `{p}.self_attn.q_proj.weight (heads * head_dim, hidden)`,
//!   `{p}.self_attn.{k,v}_proj.weight (kv_heads * head_dim, hidden)`,
//!   `{p}.self_attn.o_proj.weight (hidden, heads * head_dim)`;
//!   with `qk_norm`, `{p}.self_attn.{q,k}_norm.weight (head_dim)`;
//! - dense layers: `{p}.mlp.{gate,up}_proj.weight (intermediate, hidden)`,
//!   `{p}.mlp.down_proj.weight (hidden, intermediate)`;
//! - MoE layers: `{p}.mlp.router.weight (num_experts, hidden)`,
//!   `{p}.mlp.experts.{e}.{gate,up}_proj.weight (moe_intermediate, hidden)`,
//!   `{p}.mlp.experts.{e}.down_proj.weight (hidden, moe_intermediate)`; with a shared
//!   expert, `{p}.mlp.shared_expert.{gate,up,down}_proj.weight` (inner width
//!   `shared_expert_intermediate_size`).

use crate::cache::{Cache, LayerKv};
use crate::error::{LmError, Result};
use crate::linear::{Fused, Linear};
use crate::lora::{self, LoraAdapter, LoraApplied, LoraFused, LoraMode, LoraSite};
use crate::mlp::Mlp;
use crate::model::{LanguageModel, LogitsFor, ModelInfo};
use crate::par::{axpy, dot};
use crate::random::{around_one, randn};
use crate::rms_norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::WeightSource;
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Attention kind of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// RoPE + sliding window of `sliding_window` past positions.
    Local,
    /// Full causal attention, NoPE (RoPE only with `global_rope`).
    Global,
}

/// How the track outputs are combined at a segment boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackMerge {
    /// Sum over tracks divided by the number of tracks (the paper).
    Mean,
    /// Sum over tracks.
    Sum,
}

/// Configuration of a PT-MoE server model (`config.json`). See the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerConfig {
    pub vocab_size: usize,
    /// Width of each track's residual stream (every track is full width).
    pub hidden_size: usize,
    /// Inner width of the dense SwiGLU layers.
    pub intermediate_size: usize,
    /// T: number of parallel tracks.
    pub num_tracks: usize,
    /// D: layers per track block (segment); tracks synchronise every D layers.
    #[serde(default = "default_depth")]
    pub track_block_depth: usize,
    /// Layers per track (a multiple of `track_block_depth`).
    pub num_layers_per_track: usize,
    pub num_attention_heads: usize,
    /// GQA: number of K/V heads (divides `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Per-head width (even, for RoPE).
    pub head_dim: usize,
    /// E: experts per MoE layer (per track).
    #[serde(default)]
    pub num_experts: usize,
    /// k: experts each token is routed to (1 ..= E).
    #[serde(default)]
    pub experts_per_token: usize,
    /// Inner width of each expert's SwiGLU.
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// Inner width of an optional shared expert: a SwiGLU every token of an MoE layer goes
    /// through, added to the routed experts' weighted sum; 0 = none (the paper's server).
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// Every `moe_every`-th layer is an MoE layer (layer `i` with `i % moe_every ==
    /// moe_every - 1`); 2 = pattern (dense, sparse); 0 = no MoE.
    #[serde(default = "default_moe_every")]
    pub moe_every: usize,
    /// Attention kinds, repeating over the layers of a track.
    #[serde(default = "default_pattern")]
    pub attention_pattern: Vec<AttentionKind>,
    /// Past positions a local layer sees besides the current one.
    #[serde(default = "default_window")]
    pub sliding_window: usize,
    /// Apply RoPE in global layers too (false = NoPE, the paper).
    #[serde(default)]
    pub global_rope: bool,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE rotates adjacent pairs (AFM) instead of the two halves of the head (HF llama).
    #[serde(default = "default_true")]
    pub rope_interleaved: bool,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Learned RMSNorm over the head dim on q and k (after RoPE).
    #[serde(default = "default_true")]
    pub qk_norm: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_merge")]
    pub track_merge: TrackMerge,
    /// Router logit soft cap `cap * tanh(x / cap)`.
    #[serde(default = "default_softcap")]
    pub router_softcap: f32,
    /// Context length in tokens.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
}

fn default_depth() -> usize {
    4
}
fn default_moe_every() -> usize {
    2
}
fn default_pattern() -> Vec<AttentionKind> {
    use AttentionKind::*;
    vec![Local, Local, Local, Global]
}
fn default_window() -> usize {
    4096
}
fn default_theta() -> f64 {
    500000.0
}
fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_merge() -> TrackMerge {
    TrackMerge::Mean
}
fn default_softcap() -> f32 {
    50.0
}
fn default_ctx() -> usize {
    8192
}

impl ServerConfig {
    /// Checks every field; errors name the field at fault.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_tracks", self.num_tracks),
            ("track_block_depth", self.track_block_depth),
            ("num_layers_per_track", self.num_layers_per_track),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (f, v) in positive {
            if v == 0 {
                return Err(LmError::config(f, "must be at least 1"));
            }
        }
        if !self
            .num_layers_per_track
            .is_multiple_of(self.track_block_depth)
        {
            return Err(LmError::config(
                "track_block_depth",
                format!(
                    "{} does not divide num_layers_per_track = {}",
                    self.track_block_depth, self.num_layers_per_track
                ),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(LmError::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(LmError::config("head_dim", "must be even (RoPE pairs)"));
        }
        if self.attention_pattern.is_empty() {
            return Err(LmError::config("attention_pattern", "must not be empty"));
        }
        if self.attention_pattern.contains(&AttentionKind::Local) && self.sliding_window == 0 {
            return Err(LmError::config(
                "sliding_window",
                "must be at least 1 when the pattern has local layers",
            ));
        }
        if self.moe_every > 0 {
            if self.num_experts == 0 {
                return Err(LmError::config(
                    "num_experts",
                    "must be at least 1 when moe_every > 0",
                ));
            }
            if self.experts_per_token == 0 || self.experts_per_token > self.num_experts {
                return Err(LmError::config(
                    "experts_per_token",
                    format!(
                        "top-k = {} must be between 1 and num_experts = {}",
                        self.experts_per_token, self.num_experts
                    ),
                ));
            }
            if self.moe_intermediate_size == 0 {
                return Err(LmError::config(
                    "moe_intermediate_size",
                    "must be at least 1 when moe_every > 0",
                ));
            }
        }
        if !(self.router_softcap > 0.0 && self.router_softcap.is_finite()) {
            return Err(LmError::config(
                "router_softcap",
                format!("{} must be positive and finite", self.router_softcap),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(LmError::config("rms_norm_eps", "must be positive"));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(LmError::config("rope_theta", "must be positive and finite"));
        }
        // the same caps as `LmConfig`: a huge value is refused, not allocated
        use crate::config::caps;
        for (f, v, cap) in [
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                caps::CONTEXT,
            ),
            ("vocab_size", self.vocab_size, caps::VOCAB),
            ("hidden_size", self.hidden_size, caps::WIDTH),
            ("intermediate_size", self.intermediate_size, caps::WIDTH),
            (
                "moe_intermediate_size",
                self.moe_intermediate_size,
                caps::WIDTH,
            ),
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
                caps::WIDTH,
            ),
            ("head_dim", self.head_dim, caps::WIDTH),
            ("num_tracks", self.num_tracks, caps::COUNT),
            (
                "num_layers_per_track",
                self.num_layers_per_track,
                caps::COUNT,
            ),
            ("num_attention_heads", self.num_attention_heads, caps::COUNT),
            ("num_experts", self.num_experts, caps::COUNT),
            ("moe_every", self.moe_every, caps::COUNT),
            (
                "attention_pattern",
                self.attention_pattern.len(),
                caps::COUNT,
            ),
        ] {
            caps::check(f, v, cap)?;
        }
        if self.num_tracks * self.num_layers_per_track > caps::COUNT {
            return Err(LmError::config(
                "num_layers_per_track",
                format!(
                    "{} tracks x {} layers exceed the supported {} layers",
                    self.num_tracks,
                    self.num_layers_per_track,
                    caps::COUNT
                ),
            ));
        }
        Ok(())
    }

    /// Attention kind of layer `i` of a track.
    pub fn attention_kind(&self, i: usize) -> AttentionKind {
        self.attention_pattern[i % self.attention_pattern.len()]
    }

    /// Whether layer `i` of a track is an MoE layer.
    pub fn is_moe(&self, i: usize) -> bool {
        self.moe_every > 0 && i % self.moe_every == self.moe_every - 1
    }

    /// Reads and validates a `config.json`.
    pub fn from_json(v: serde_json::Value) -> Result<Self> {
        let c: Self = serde_json::from_value(v).map_err(|e| LmError::Json(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }
}

/// A mixture-of-experts SwiGLU layer with a soft-capped top-k softmax router. See the module
/// docs for the routing rule.
#[derive(Debug, Clone)]
pub struct MoeLayer {
    router: Linear,
    experts: Vec<Mlp>,
    /// Applied to every token, weight 1, on top of the routed experts.
    shared: Option<Mlp>,
    top_k: usize,
    softcap: f32,
}

impl MoeLayer {
    /// Loads `{prefix}.router.weight (num_experts, hidden)` and
    /// `{prefix}.experts.{e}.{gate,up,down}_proj.weight`.
    pub fn load(
        src: &WeightSource,
        prefix: &str,
        hidden: usize,
        inner: usize,
        num_experts: usize,
        top_k: usize,
        softcap: f32,
    ) -> Result<Self> {
        if top_k == 0 || top_k > num_experts {
            return Err(LmError::config(
                "experts_per_token",
                format!("top-k = {top_k} must be between 1 and num_experts = {num_experts}"),
            ));
        }
        let router = src.projection(&format!("{prefix}.router.weight"), num_experts, hidden)?;
        let experts = (0..num_experts)
            .map(|e| Mlp::load(src, &format!("{prefix}.experts.{e}"), hidden, inner))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            router,
            experts,
            shared: None,
            top_k,
            softcap,
        })
    }

    /// Adds the shared expert `{prefix}.shared_expert.{gate,up,down}_proj.weight` (inner
    /// width `inner`), which every token goes through with weight 1.
    pub fn with_shared_expert(
        mut self,
        src: &WeightSource,
        prefix: &str,
        hidden: usize,
        inner: usize,
    ) -> Result<Self> {
        self.shared = Some(Mlp::load(
            src,
            &format!("{prefix}.shared_expert"),
            hidden,
            inner,
        )?);
        Ok(self)
    }

    /// The experts chosen for each row and their weights: `(expert, weight)` by descending
    /// capped logit, ties broken by the lower expert index; weights sum to 1.
    ///
    /// # Shapes
    /// `x: (t, hidden)` -> `t` lists of `top_k` pairs.
    pub fn route(&self, x: &[f32], t: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let e = self.experts.len();
        let logits = self.router.forward(x, t)?;
        let cap = self.softcap;
        Ok(logits
            .chunks_exact(e)
            .map(|row| {
                let c: Vec<f32> = row.iter().map(|&l| cap * (l / cap).tanh()).collect();
                let mut idx: Vec<usize> = (0..e).collect();
                // stable sort by descending capped logit: equal logits keep index order
                idx.sort_by(|&a, &b| c[b].total_cmp(&c[a]));
                idx.truncate(self.top_k);
                let mut w: Vec<f32> = idx.iter().map(|&i| c[i]).collect();
                crate::kernels::softmax_in_place(&mut w);
                idx.into_iter().zip(w).collect()
            })
            .collect())
    }

    /// # Shapes
    /// `x: (t, hidden) -> (t, hidden)`.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        let h = x.len() / t.max(1);
        let routes = self.route(x, t)?;
        // rows routed to each expert, with their weights
        let mut per: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (r, sel) in routes.iter().enumerate() {
            for &(e, w) in sel {
                per[e].push((r, w));
            }
        }
        let mut out = vec![0f32; t * h];
        for (e, rows) in per.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let xs: Vec<f32> = rows
                .iter()
                .flat_map(|&(r, _)| x[r * h..(r + 1) * h].iter().copied())
                .collect();
            let y = self.experts[e].forward(&xs, rows.len())?;
            for (j, &(r, w)) in rows.iter().enumerate() {
                axpy(w, &y[j * h..(j + 1) * h], &mut out[r * h..(r + 1) * h]);
            }
        }
        if let Some(s) = &self.shared {
            let y = s.forward(x, t)?;
            out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
        }
        Ok(out)
    }

    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// The experts' SwiGLUs by module path under `{prefix}` (`experts.{e}`, then
    /// `shared_expert`), for LoRA.
    fn lora_mlps(&mut self, prefix: &str) -> Vec<(String, &mut Mlp)> {
        let mut v: Vec<(String, &mut Mlp)> = self
            .experts
            .iter_mut()
            .enumerate()
            .map(|(e, m)| (format!("{prefix}.experts.{e}"), m))
            .collect();
        if let Some(s) = &mut self.shared {
            v.push((format!("{prefix}.shared_expert"), s));
        }
        v
    }
}

/// Self-attention of one server layer (local: RoPE + sliding window; global: NoPE, full causal).
#[derive(Debug, Clone)]
struct ServerAttention {
    qkv: Fused,
    o_proj: Fused,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `Some(w)`: a query at `p` sees keys `p - w ..= p`.
    window: Option<usize>,
    rope: bool,
}

impl ServerAttention {
    fn load(src: &WeightSource, p: &str, cfg: &ServerConfig, i: usize) -> Result<Self> {
        let (h, hd, nh, kvh) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        let local = cfg.attention_kind(i) == AttentionKind::Local;
        let qkv = Fused::new(vec![
            (
                src.projection(&format!("{p}.q_proj.weight"), nh * hd, h)?,
                nh * hd,
            ),
            (
                src.projection(&format!("{p}.k_proj.weight"), kvh * hd, h)?,
                kvh * hd,
            ),
            (
                src.projection(&format!("{p}.v_proj.weight"), kvh * hd, h)?,
                kvh * hd,
            ),
        ])?;
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(RmsNorm::load(
                    src,
                    &format!("{p}.q_norm.weight"),
                    hd,
                    cfg.rms_norm_eps,
                )?),
                Some(RmsNorm::load(
                    src,
                    &format!("{p}.k_norm.weight"),
                    hd,
                    cfg.rms_norm_eps,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            qkv,
            o_proj: Fused::new(vec![(
                src.projection(&format!("{p}.o_proj.weight"), h, nh * hd)?,
                h,
            )])?,
            q_norm,
            k_norm,
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            window: local.then_some(cfg.sliding_window),
            rope: local || cfg.global_rope,
        })
    }

    /// # Shapes
    /// `x: (t, hidden)` (normed), `pos.len() == t` -> `(t, hidden)`.
    fn forward(&self, x: &[f32], pos: &[usize], rope: &Rope, kv: &mut LayerKv) -> Result<Vec<f32>> {
        let t = pos.len();
        let (nh, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (qd, kvd) = (nh * hd, kvh * hd);
        let qkv = self.qkv.forward(x, t)?;
        let mut q = Vec::with_capacity(t * qd);
        let mut k = Vec::with_capacity(t * kvd);
        let mut v = Vec::with_capacity(t * kvd);
        for row in qkv.chunks_exact(qd + 2 * kvd) {
            q.extend_from_slice(&row[..qd]);
            k.extend_from_slice(&row[qd..qd + kvd]);
            v.extend_from_slice(&row[qd + kvd..]);
        }
        if self.rope {
            rope.apply(&mut q, nh, pos)?;
            rope.apply(&mut k, kvh, pos)?;
        }
        if let Some(n) = &self.q_norm {
            n.forward_inplace(&mut q)?;
        }
        if let Some(n) = &self.k_norm {
            n.forward_inplace(&mut k)?;
        }
        if kv.f16_slices().is_some() || kv.int8_slices().is_some() {
            return Err(LmError::Invalid(
                "the server model keeps its K/V in f32: this cache is f16 or int8".into(),
            ));
        }
        if pos.first().is_some_and(|&p| p != kv.end()) {
            return Err(LmError::Invalid(format!(
                "pass starts at position {} but the layer cache ends at {}",
                pos[0],
                kv.end()
            )));
        }
        kv.append(&k, &v)?;
        let first = kv.first();
        let (ks, vs) = kv.slices();
        let scale = 1.0 / (hd as f32).sqrt();
        let rep = nh / kvh;
        let mut out = vec![0f32; t * qd];
        let mut scores = Vec::new();
        for (i, &p) in pos.iter().enumerate() {
            // keys visible to position p
            let lo = self.window.map_or(0, |w| p.saturating_sub(w));
            if lo < first {
                return Err(LmError::Invalid(format!(
                    "position {p} needs keys from {lo}, the cache keeps them from {first} \
                     (a window layer was rolled back past its window)"
                )));
            }
            for head in 0..nh {
                let g = head / rep;
                let qv = &q[(i * nh + head) * hd..][..hd];
                scores.clear();
                scores.extend((lo..=p).map(|j| {
                    let r = j - first;
                    dot(qv, &ks[(r * kvh + g) * hd..][..hd]) * scale
                }));
                crate::kernels::softmax_in_place(&mut scores);
                let o = &mut out[(i * nh + head) * hd..][..hd];
                for (j, &w) in (lo..=p).zip(scores.iter()) {
                    let r = j - first;
                    axpy(w, &vs[(r * kvh + g) * hd..][..hd], o);
                }
            }
        }
        self.o_proj.forward(&out, t)
    }
}

#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Moe(MoeLayer),
}

#[derive(Debug, Clone)]
struct ServerLayer {
    input_norm: RmsNorm,
    attn: ServerAttention,
    post_norm: RmsNorm,
    ffn: Ffn,
}

impl ServerLayer {
    /// This layer's fused matrices with the LoRA sites of their parts (module paths under
    /// `p = model.tracks.{t}.layers.{i}`): q/k/v, o, then per SwiGLU (the dense MLP, or every
    /// expert and the shared expert) gate/up and down. The router is not a site.
    fn lora_groups(&mut self, p: &str, hidden: usize) -> Vec<LoraFused<'_>> {
        let a = &mut self.attn;
        let (qd, kvd) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
        let sites = lora::attention_sites(&format!("{p}.self_attn"), hidden, qd, Some(kvd));
        let mut groups: Vec<LoraFused<'_>> = [&mut a.qkv, &mut a.o_proj]
            .into_iter()
            .zip(sites)
            .map(|(fused, sites)| LoraFused { fused, sites })
            .collect();
        let mlps: Vec<(String, &mut Mlp)> = match &mut self.ffn {
            Ffn::Dense(m) => vec![(format!("{p}.mlp"), m)],
            Ffn::Moe(m) => m.lora_mlps(&format!("{p}.mlp")),
        };
        for (prefix, m) in mlps {
            let [gu, d] = m.lora_fused();
            let inner = gu.outs()[0];
            for (fused, sites) in [gu, d]
                .into_iter()
                .zip(lora::mlp_sites(&prefix, hidden, inner))
            {
                groups.push(LoraFused { fused, sites });
            }
        }
        groups
    }

    fn load(src: &WeightSource, cfg: &ServerConfig, track: usize, i: usize) -> Result<Self> {
        let p = format!("model.tracks.{track}.layers.{i}");
        let h = cfg.hidden_size;
        let ffn = if cfg.is_moe(i) {
            let moe = MoeLayer::load(
                src,
                &format!("{p}.mlp"),
                h,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.experts_per_token,
                cfg.router_softcap,
            )?;
            Ffn::Moe(match cfg.shared_expert_intermediate_size {
                0 => moe,
                n => moe.with_shared_expert(src, &format!("{p}.mlp"), h, n)?,
            })
        } else {
            Ffn::Dense(Mlp::load(
                src,
                &format!("{p}.mlp"),
                h,
                cfg.intermediate_size,
            )?)
        };
        Ok(Self {
            input_norm: RmsNorm::load(
                src,
                &format!("{p}.input_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            attn: ServerAttention::load(src, &format!("{p}.self_attn"), cfg, i)?,
            post_norm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            ffn,
        })
    }

    /// Pre-norm residual block, in place on `x: (t, hidden)`.
    fn forward(&self, x: &mut [f32], pos: &[usize], rope: &Rope, kv: &mut LayerKv) -> Result<()> {
        let t = pos.len();
        let mut hn = vec![0f32; x.len()];
        self.input_norm.forward_into(x, &mut hn)?;
        let a = self.attn.forward(&hn, pos, rope, kv)?;
        x.iter_mut().zip(&a).for_each(|(x, y)| *x += y);
        self.post_norm.forward_into(x, &mut hn)?;
        let m = match &self.ffn {
            Ffn::Dense(m) => m.forward(&hn, t)?,
            Ffn::Moe(m) => m.forward(&hn, t)?,
        };
        x.iter_mut().zip(&m).for_each(|(x, y)| *x += y);
        Ok(())
    }
}

/// The PT-MoE server model. See the module docs.
#[derive(Debug, Clone)]
pub struct ServerModel {
    cfg: ServerConfig,
    info: ModelInfo,
    embed: Linear,
    /// `tracks[t][i]`: layer `i` of track `t`.
    tracks: Vec<Vec<ServerLayer>>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    parallel_tracks: bool,
    /// Whether a LoRA adapter has been applied (a second one is refused).
    has_lora: bool,
}

impl ServerModel {
    /// Builds the model from a weight source (tensor names in the module docs).
    pub fn from_source(src: &WeightSource, cfg: ServerConfig) -> Result<Self> {
        cfg.validate()?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = src.matrix("model.embed_tokens.weight", v, h)?;
        let tracks = (0..cfg.num_tracks)
            .map(|t| {
                (0..cfg.num_layers_per_track)
                    .map(|i| ServerLayer::load(src, &cfg, t, i))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(src, "model.norm.weight", h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            src.matrix("lm_head.weight", v, h)?
        };
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.max_position_embeddings,
            cfg.rope_interleaved,
        )?;
        let info = ModelInfo {
            vocab_size: v,
            context_length: cfg.max_position_embeddings,
            hidden_size: h,
            num_layers: cfg.num_tracks * cfg.num_layers_per_track,
        };
        Ok(Self {
            cfg,
            info,
            embed,
            tracks,
            norm,
            lm_head,
            rope,
            parallel_tracks: true,
            has_lora: false,
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Every projection a LoRA adapter can target (module paths in [`crate::lora`]:
    /// attention q/k/v/o, dense MLPs, every expert and the shared expert; not the router).
    pub fn lora_sites(&self) -> Vec<LoraSite> {
        // the walk needs `&mut`; a clone shares every weight (Arc), so it is cheap
        let mut m = self.clone();
        m.lora_groups().into_iter().flat_map(|g| g.sites).collect()
    }

    fn lora_groups(&mut self) -> Vec<LoraFused<'_>> {
        let h = self.cfg.hidden_size;
        let mut groups = Vec::new();
        for (t, track) in self.tracks.iter_mut().enumerate() {
            for (i, layer) in track.iter_mut().enumerate() {
                groups.extend(layer.lora_groups(&format!("model.tracks.{t}.layers.{i}"), h));
            }
        }
        groups
    }

    /// Applies a LoRA adapter, as [`crate::DeviceModel::apply_lora`] (sites in
    /// [`ServerModel::lora_sites`]). One adapter per model.
    pub fn apply_lora(
        &mut self,
        adapter: &LoraAdapter,
        model_sha256: &str,
        mode: LoraMode,
    ) -> Result<LoraApplied> {
        if self.has_lora {
            return Err(LmError::Invalid(
                "this model already has a LoRA adapter; load the base again to apply another"
                    .into(),
            ));
        }
        let done = adapter.apply(model_sha256, mode, self.lora_groups())?;
        self.has_lora = true;
        Ok(done)
    }

    /// With `false`, the tracks of a segment run one after another (same result, bitwise).
    pub fn set_parallel_tracks(&mut self, on: bool) {
        self.parallel_tracks = on;
    }

    /// Track synchronisation points per forward pass (`num_layers_per_track / D`).
    pub fn syncs_per_pass(&self) -> usize {
        self.cfg.num_layers_per_track / self.cfg.track_block_depth
    }

    fn run(&self, x: &Tensor, cache: &mut Cache, logits: &LogitsFor) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        if h != self.info.hidden_size {
            return Err(LmError::Invalid(format!(
                "input embeddings have width {h}, the model's hidden size is {}",
                self.info.hidden_size
            )));
        }
        if t == 0 {
            return Err(LmError::Invalid("forward pass with no positions".into()));
        }
        let start = cache.seq_len();
        if start + t > self.info.context_length {
            return Err(LmError::PromptTooLong {
                tokens: start + t,
                context: self.info.context_length,
                reserved: 0,
            });
        }
        let l = self.cfg.num_layers_per_track;
        if cache.num_layers() != self.cfg.num_tracks * l {
            return Err(LmError::Invalid("cache was made for another model".into()));
        }
        let rows = logits.rows(t)?;
        let pos: Vec<usize> = (start..start + t).collect();
        let mut x: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let d = self.cfg.track_block_depth;
        let n_tracks = self.cfg.num_tracks;
        for seg in 0..l / d {
            let layers = seg * d..(seg + 1) * d;
            // dispatch: every track gets a copy of `x` and its own caches
            let run_track = |(track, kvs): (&Vec<ServerLayer>, &mut [Option<LayerKv>])| {
                let mut y = x.clone();
                for i in layers.clone() {
                    let kv = kvs[i].as_mut().ok_or_else(|| {
                        LmError::Invalid(format!("cache has no K/V slot for layer {i}"))
                    })?;
                    track[i].forward(&mut y, &pos, &self.rope, kv)?;
                }
                Ok::<_, LmError>(y)
            };
            let slots = cache.layers_mut().chunks_mut(l);
            let outs: Vec<Vec<f32>> = if self.parallel_tracks && n_tracks > 1 {
                // each track is one task of the shared pool (claimed in turn, so a thread
                // the OS has descheduled holds up at most the track it started): its kernels
                // run on its own thread
                let jobs: Vec<std::sync::Mutex<_>> = self
                    .tracks
                    .iter()
                    .zip(slots)
                    .map(|job| std::sync::Mutex::new((Some(job), None)))
                    .collect();
                crate::par::par_ranges(n_tracks, |r| {
                    for j in r {
                        // each track's lock is taken once, by the task that claimed it
                        let mut g = jobs[j].lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(job) = g.0.take() {
                            g.1 = Some(crate::par::inline(|| run_track(job)));
                        }
                    }
                });
                jobs.into_iter()
                    .map(|m| {
                        m.into_inner()
                            .unwrap_or_else(|e| e.into_inner())
                            .1
                            .unwrap_or_else(|| Err(LmError::Invalid("a track did not run".into())))
                    })
                    .collect::<Result<_>>()?
            } else {
                self.tracks
                    .iter()
                    .zip(slots)
                    .map(run_track)
                    .collect::<Result<_>>()?
            };
            // merge: sum in track order, then / T for `mean`
            x.copy_from_slice(&outs[0]);
            for o in &outs[1..] {
                x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
            }
            if self.cfg.track_merge == TrackMerge::Mean && n_tracks > 1 {
                let inv = 1.0 / n_tracks as f32;
                x.iter_mut().for_each(|a| *a *= inv);
            }
        }
        // local layers keep only what the next query can see
        let end = start + t;
        for track in 0..n_tracks {
            for i in 0..l {
                if self.cfg.attention_kind(i) == AttentionKind::Local {
                    if let Some(kv) = cache.layer_mut(track * l + i) {
                        kv.drop_before(end.saturating_sub(self.cfg.sliding_window));
                    }
                }
            }
        }
        let x: Vec<f32> = if rows.len() == t {
            x
        } else {
            rows.iter()
                .flat_map(|&r| x[r * h..(r + 1) * h].iter().copied())
                .collect()
        };
        let logits = crate::model::output_logits(
            &self.norm,
            &self.lm_head,
            x,
            rows.len(),
            self.info.vocab_size,
        )?;
        cache.advance(t);
        Ok(logits)
    }
}

impl LanguageModel for ServerModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        crate::model::embed_checked(&self.embed, self.info.vocab_size, ids)
    }

    /// One K/V slot per (track, layer), index `track * num_layers_per_track + layer`.
    fn new_cache(&self) -> Cache {
        let w = self.cfg.num_key_value_heads * self.cfg.head_dim;
        let n = self.cfg.num_tracks * self.cfg.num_layers_per_track;
        Cache::new(&vec![Some(w); n], self.info.context_length)
    }

    fn forward_embeds(
        &self,
        embeds: &Tensor,
        cache: &mut Cache,
        logits: &LogitsFor,
    ) -> Result<Tensor> {
        let start = cache.seq_len();
        let out = self.run(embeds, cache, logits);
        if out.is_err() {
            cache.truncate(start);
        }
        out
    }
}

/// Every tensor `cfg` calls for, keyed by name (module docs): matrices ~ N(0, 0.02 *
/// sqrt(768 / fan_in)) (at least 0.02), embeddings N(0, 1), norm weights in [0.9, 1.1].
pub fn random_server_tensors(cfg: &ServerConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, v, hd) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
    let (nh, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let std = |fan_in: usize| 0.02 * (768.0 / fan_in as f32).sqrt().max(1.0);
    let mut m = HashMap::new();
    m.insert(
        "model.embed_tokens.weight".into(),
        randn(&mut rng, &[v, h], 1.0)?,
    );
    let mlp = |m: &mut HashMap<String, Tensor>, rng: &mut ChaCha8Rng, p: String, inner| {
        m.insert(
            format!("{p}.gate_proj.weight"),
            randn(rng, &[inner, h], std(h))?,
        );
        m.insert(
            format!("{p}.up_proj.weight"),
            randn(rng, &[inner, h], std(h))?,
        );
        m.insert(
            format!("{p}.down_proj.weight"),
            randn(rng, &[h, inner], std(inner))?,
        );
        Ok::<_, LmError>(())
    };
    for t in 0..cfg.num_tracks {
        for i in 0..cfg.num_layers_per_track {
            let p = format!("model.tracks.{t}.layers.{i}");
            m.insert(
                format!("{p}.input_layernorm.weight"),
                around_one(&mut rng, h)?,
            );
            m.insert(
                format!("{p}.post_attention_layernorm.weight"),
                around_one(&mut rng, h)?,
            );
            let a = format!("{p}.self_attn");
            m.insert(
                format!("{a}.q_proj.weight"),
                randn(&mut rng, &[nh * hd, h], std(h))?,
            );
            m.insert(
                format!("{a}.k_proj.weight"),
                randn(&mut rng, &[kvh * hd, h], std(h))?,
            );
            m.insert(
                format!("{a}.v_proj.weight"),
                randn(&mut rng, &[kvh * hd, h], std(h))?,
            );
            m.insert(
                format!("{a}.o_proj.weight"),
                randn(&mut rng, &[h, nh * hd], std(nh * hd))?,
            );
            if cfg.qk_norm {
                m.insert(format!("{a}.q_norm.weight"), around_one(&mut rng, hd)?);
                m.insert(format!("{a}.k_norm.weight"), around_one(&mut rng, hd)?);
            }
            if cfg.is_moe(i) {
                // a wider router so that routing differs between tokens
                m.insert(
                    format!("{p}.mlp.router.weight"),
                    randn(&mut rng, &[cfg.num_experts, h], 10.0 * std(h))?,
                );
                for e in 0..cfg.num_experts {
                    mlp(
                        &mut m,
                        &mut rng,
                        format!("{p}.mlp.experts.{e}"),
                        cfg.moe_intermediate_size,
                    )?;
                }
                if cfg.shared_expert_intermediate_size > 0 {
                    mlp(
                        &mut m,
                        &mut rng,
                        format!("{p}.mlp.shared_expert"),
                        cfg.shared_expert_intermediate_size,
                    )?;
                }
            } else {
                mlp(&mut m, &mut rng, format!("{p}.mlp"), cfg.intermediate_size)?;
            }
        }
    }
    m.insert("model.norm.weight".into(), around_one(&mut rng, h)?);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".into(), randn(&mut rng, &[v, h], std(h))?);
    }
    Ok(m)
}
