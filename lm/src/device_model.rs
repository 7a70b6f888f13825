//! `DeviceModel`: the AFM on-device dense decoder (RMSNorm, GQA + RoPE, SwiGLU) with the
//! paper's KV-cache sharing, which is also exactly a llama model when sharing is off.
//!
//! Layers `0..b1` (block 1) are ordinary. Layers `b1..` (block 2, `num_kv_reuse_layers` of
//! them) have no K/V projections and attend to the cache of layer `b1 - 1`. Since nothing
//! reads block 2's hidden states at other positions, prefill runs block 2 only on the rows
//! whose logits are wanted (the time-to-first-token saving); `set_prefill_shortcut(false)`
//! runs it on every row instead (same result, for tests and benchmarks).

use crate::attention::{Attention, AttentionSpec};
use crate::cache::Cache;
use crate::config::LmConfig;
use crate::error::{LmError, Result};
use crate::linear::Linear;
use crate::lora::{self, LoraAdapter, LoraApplied, LoraFused, LoraMode, LoraSite};
use crate::mlp::Mlp;
use crate::model::{LanguageModel, LogitsFor, ModelInfo};
use crate::rms_norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::WeightSource;
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn set_int8(&mut self, on: bool) -> Result<()> {
        self.attn.set_int8(on)?;
        self.mlp.set_int8(on)
    }

    fn load(src: &WeightSource, cfg: &LmConfig, i: usize) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        let spec = AttentionSpec {
            hidden: h,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps,
            reuses_kv: i >= cfg.num_block1_layers(),
            qk_norm: cfg.qk_norm,
            kv_quant: cfg.kv_quant,
        };
        Ok(Self {
            input_norm: RmsNorm::load(
                src,
                &format!("{p}.input_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            attn: Attention::load(src, &format!("{p}.self_attn"), &spec)?,
            post_norm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(src, &format!("{p}.mlp"), h, cfg.intermediate_size)?,
        })
    }
}

/// The on-device decoder. See the module docs.
#[derive(Debug, Clone)]
pub struct DeviceModel {
    cfg: LmConfig,
    info: ModelInfo,
    embed: Linear,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    prefill_shortcut: bool,
    /// Whether a LoRA adapter has been applied (a second one is refused).
    has_lora: bool,
    /// How the K/V cache stores keys and values.
    kv_mode: KvMode,
}

/// How [`DeviceModel::new_cache`] stores keys and values.
#[derive(Debug, Clone, PartialEq)]
pub enum KvMode {
    /// As the checkpoint says: int8 with its stored per-layer scales when it has them
    /// (`kv_quant`; the same numbers as its 8-bit fake quantisation, a quarter of the
    /// memory), f32 otherwise.
    Checkpoint,
    /// int8 with these per-layer (key, value) scales (`None` for layers without K/V).
    Int8(Vec<Option<(f32, f32)>>),
    /// f32, without the checkpoint's 8-bit rounding (`--kv 32`: full precision).
    Full,
    /// f16, without the checkpoint's 8-bit rounding (`--kv 16`: half the bytes of f32, as
    /// llama.cpp keeps its cache; every key and value rounded to the nearest f16).
    F16,
}

impl KvMode {
    /// Whether K/V go through the checkpoint's 8-bit rounding (stored in int8, or rounded
    /// in an f32 cache); `Full` and `F16` keep the projections' values.
    fn rounds_to_8_bits(&self) -> bool {
        matches!(self, KvMode::Checkpoint | KvMode::Int8(_))
    }
}

impl DeviceModel {
    /// Builds the model from a weight source and a validated config.
    ///
    /// Tensor names (HF llama style; GGUF names are mapped, see `weights::gguf_name`):
    /// `model.embed_tokens.weight (vocab, hidden)`, `model.norm.weight (hidden)`,
    /// `lm_head.weight (vocab, hidden)` unless tied, and per layer `model.layers.{i}.`
    /// `input_layernorm.weight`, `post_attention_layernorm.weight`,
    /// `self_attn.{q,k,v,o}_proj.weight`, `mlp.{gate,up,down}_proj.weight`; block-2 layers
    /// have no `k_proj`/`v_proj`; with `qk_norm`, `self_attn.q_norm.weight (head_dim)` and
    /// (block 1 only) `self_attn.k_norm.weight`; with `kv_quant`, block-1 layers have scalar
    /// `self_attn.k_scale (1)` and `self_attn.v_scale (1)`.
    pub fn from_source(src: &WeightSource, cfg: LmConfig) -> Result<Self> {
        cfg.validate()?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_name = "model.embed_tokens.weight";
        let embed = src.matrix(embed_name, v, h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(src, &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(src, "model.norm.weight", h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            src.matrix("lm_head.weight", v, h)?
        };
        let rope = Rope::new(
            cfg.head_dim(),
            cfg.rope_theta,
            cfg.max_position_embeddings,
            cfg.rope_interleaved,
        )?;
        let info = ModelInfo {
            vocab_size: v,
            context_length: cfg.max_position_embeddings,
            hidden_size: h,
            num_layers: cfg.num_hidden_layers,
        };
        Ok(Self {
            cfg,
            info,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            prefill_shortcut: true,
            has_lora: false,
            kv_mode: KvMode::Checkpoint,
        })
    }

    /// The checkpoint's stored per-layer (key, value) KV scales (`kv_quant`), `None` for a
    /// checkpoint without them.
    pub fn stored_kv_scales(&self) -> Option<Vec<Option<(f32, f32)>>> {
        let v: Vec<Option<(f32, f32)>> = self.layers.iter().map(|l| l.attn.kv_scales()).collect();
        let b1 = self.cfg.num_block1_layers();
        v[..b1].iter().all(Option::is_some).then_some(v)
    }

    /// Per-layer KV scales calibrated on `ids` (one forward pass with a full-precision
    /// cache: the largest |k| and |v| of each layer, `/ 127`).
    pub fn calibrate_kv_scales(&self, ids: &[u32]) -> Result<Vec<Option<(f32, f32)>>> {
        if ids.is_empty() {
            return Err(LmError::Invalid("KV calibration needs some tokens".into()));
        }
        // weights are shared (`Arc`s, candle tensors): the clone is cheap
        let mut probe = self.clone();
        probe.kv_mode = KvMode::Full;
        let mut cache = probe.new_cache();
        let n = ids.len().min(self.info.context_length);
        probe.forward_tokens(&ids[..n], &mut cache, &LogitsFor::Last)?;
        let mut cal = crate::kv8::KvCalibration::default();
        cal.observe(&cache);
        Ok(cal.scales())
    }

    /// Sets how new caches store K/V (see [`KvMode`]); an `Int8` scale list of the wrong
    /// length, a missing scale for a layer with K/V, or a non-positive scale is an error.
    pub fn set_kv_mode(&mut self, mode: KvMode) -> Result<()> {
        if let KvMode::Int8(s) = &mode {
            if s.len() != self.layers.len() {
                return Err(LmError::Invalid(format!(
                    "{} KV scales for a model of {} layers",
                    s.len(),
                    self.layers.len()
                )));
            }
            for (i, (l, sc)) in self.layers.iter().zip(s).enumerate() {
                match sc {
                    None if !l.attn.reuses_kv() => {
                        return Err(LmError::Invalid(format!("no KV scale for layer {i}")))
                    }
                    Some((k, v)) if !(*k > 0.0 && *v > 0.0 && k.is_finite() && v.is_finite()) => {
                        return Err(LmError::Invalid(format!(
                            "KV scales ({k}, {v}) of layer {i} must be positive"
                        )))
                    }
                    _ => {}
                }
            }
        }
        self.kv_mode = mode;
        Ok(())
    }

    pub fn kv_mode(&self) -> &KvMode {
        &self.kv_mode
    }

    /// The run-time `--kv` option: 8 stores K/V in int8 with the checkpoint's scales, or,
    /// when it has none, with scales calibrated on `calibration` ([`Self::calibrate_kv_scales`]);
    /// 16 stores f16 and 32 f32 (both without the checkpoint's 8-bit rounding). Returns
    /// where the scales came from (`"checkpoint"`, `"calibrated"`, or `"none"`).
    pub fn apply_kv_bits(&mut self, bits: u32, calibration: &[u32]) -> Result<&'static str> {
        match bits {
            8 => {
                if let Some(s) = self.stored_kv_scales() {
                    self.set_kv_mode(KvMode::Int8(s))?;
                    Ok("checkpoint")
                } else {
                    let s = self.calibrate_kv_scales(calibration)?;
                    self.set_kv_mode(KvMode::Int8(s))?;
                    Ok("calibrated")
                }
            }
            16 => {
                self.set_kv_mode(KvMode::F16)?;
                Ok("none")
            }
            32 => {
                self.set_kv_mode(KvMode::Full)?;
                Ok("none")
            }
            b => Err(LmError::Invalid(format!(
                "--kv {b}: expected 8 (int8), 16 (f16) or 32 (f32)"
            ))),
        }
    }

    /// f16 K/V ([`KvMode::F16`]) unless the mode was set already or the checkpoint stores
    /// 8-bit KV scales (its int8 cache then stays): `afm serve`'s default, where the cache's
    /// bytes are most of what each added stream costs. Returns whether new caches are f16.
    pub fn prefer_f16_kv(&mut self) -> bool {
        if self.kv_mode == KvMode::Checkpoint && self.stored_kv_scales().is_none() {
            self.kv_mode = KvMode::F16;
        }
        self.kv_mode == KvMode::F16
    }

    /// How new caches store K/V (what `new_cache` builds): `"int8"`, `"f16"` or `"f32"`.
    pub fn kv_store_name(&self) -> &'static str {
        match &self.kv_mode {
            KvMode::F16 => "f16",
            KvMode::Int8(_) => "int8",
            KvMode::Checkpoint if self.stored_kv_scales().is_some() => "int8",
            KvMode::Checkpoint | KvMode::Full => "f32",
        }
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Runs every dense f32 projection (q/k/v/o, gate/up/down) and the output head in int8
    /// ([`crate::linear::Linear::set_int8`]: weights per output channel, one activation
    /// scale per 32 inputs), or back in f32.
    /// Only matrices loaded dense (safetensors, f32/f16 GGUF) change; quantized GGUF
    /// matrices keep their own kernels, and the embedding lookup stays f32. Opt-in: logits
    /// move by the rounding of 8 bits (tested), so greedy output can differ from f32.
    /// Weight bytes one decode step reads from memory: every layer's projections and the
    /// output head (the embedding table adds one row, not counted). Divided by the machine's
    /// read bandwidth this is the bandwidth limit of decode: `afm bench lm` reports both.
    pub fn weight_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.attn.bytes_read() + l.mlp.bytes_read())
            .sum();
        layers + self.lm_head.bytes_read()
    }

    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        for l in &mut self.layers {
            l.set_int8(on)?;
        }
        self.lm_head.set_int8(on)
    }

    /// The LoRA sites of layer `i`, grouped as its four fused matrices hold them:
    /// q/k/v (q only in KV-reuse layers), o, gate/up, down.
    fn layer_lora_sites(&self, i: usize) -> [Vec<LoraSite>; 4] {
        let c = &self.cfg;
        let p = format!("model.layers.{i}");
        let (h, hd) = (c.hidden_size, c.head_dim());
        let kv = (i < c.num_block1_layers()).then_some(c.num_kv_heads() * hd);
        let [qkv, o] =
            lora::attention_sites(&format!("{p}.self_attn"), h, c.num_attention_heads * hd, kv);
        let [gu, d] = lora::mlp_sites(&format!("{p}.mlp"), h, c.intermediate_size);
        [qkv, o, gu, d]
    }

    /// Every projection a LoRA adapter can target (module paths in [`crate::lora`]).
    pub fn lora_sites(&self) -> Vec<LoraSite> {
        (0..self.layers.len())
            .flat_map(|i| self.layer_lora_sites(i).into_iter().flatten())
            .collect()
    }

    /// Applies a LoRA adapter (see [`crate::lora`]): `model_sha256` is the hash of the
    /// checkpoint this model was loaded from ([`lora::checkpoint_sha256`]); an adapter made
    /// for another base, with a module the model lacks or with wrong widths is refused
    /// before anything changes. One adapter per model: a second is an error.
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
        let sites: Vec<[Vec<LoraSite>; 4]> = (0..self.layers.len())
            .map(|i| self.layer_lora_sites(i))
            .collect();
        let mut groups = Vec::new();
        for (layer, sites) in self.layers.iter_mut().zip(sites) {
            let [a, o] = layer.attn.lora_fused();
            let [gu, d] = layer.mlp.lora_fused();
            for (fused, sites) in [a, o, gu, d].into_iter().zip(sites) {
                groups.push(LoraFused { fused, sites });
            }
        }
        let done = adapter.apply(model_sha256, mode, groups)?;
        self.has_lora = true;
        Ok(done)
    }

    /// With `false`, block 2 runs on every prompt position (for comparison only).
    pub fn set_prefill_shortcut(&mut self, on: bool) {
        self.prefill_shortcut = on;
    }

    pub fn prefill_shortcut(&self) -> bool {
        self.prefill_shortcut
    }

    fn kv_widths(&self) -> Vec<Option<usize>> {
        let w = self.cfg.num_kv_heads() * self.cfg.head_dim();
        self.layers
            .iter()
            .map(|l| (!l.attn.reuses_kv()).then_some(w))
            .collect()
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
        if cache.num_layers() != self.layers.len() {
            return Err(LmError::Invalid("cache was made for another model".into()));
        }
        let rows = logits.rows(t)?;
        let b1 = self.cfg.num_block1_layers();
        let pos: Vec<usize> = (start..start + t).collect();
        let mut x: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut hn = vec![0f32; x.len()];
        let add = |x: &mut [f32], y: &[f32]| x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        for (i, layer) in self.layers[..b1].iter().enumerate() {
            let kv = cache
                .layer_mut(i)
                .ok_or_else(|| LmError::Invalid(format!("cache has no K/V slot for layer {i}")))?;
            layer.input_norm.forward_into(&x, &mut hn)?;
            let fake_quant = self.kv_mode.rounds_to_8_bits();
            add(
                &mut x,
                &layer
                    .attn
                    .forward_own(&hn, &pos, &self.rope, kv, fake_quant)?,
            );
            layer.post_norm.forward_into(&x, &mut hn)?;
            add(&mut x, &layer.mlp.forward(&hn, t)?);
        }
        let select = |x: &[f32]| gather_rows(x, &rows, h);
        // Block 2 only needs the rows whose logits are asked for.
        let (mut x, pos2) = if self.prefill_shortcut {
            (select(&x), rows.iter().map(|&r| start + r).collect())
        } else {
            (x, pos)
        };
        if b1 < self.layers.len() {
            let shared = cache.layer(b1 - 1).ok_or_else(|| {
                LmError::Invalid("cache has no K/V for the last block-1 layer".into())
            })?;
            let n = pos2.len();
            let mut hn = vec![0f32; x.len()];
            for layer in &self.layers[b1..] {
                layer.input_norm.forward_into(&x, &mut hn)?;
                add(
                    &mut x,
                    &layer.attn.forward_shared(&hn, &pos2, &self.rope, shared)?,
                );
                layer.post_norm.forward_into(&x, &mut hn)?;
                add(&mut x, &layer.mlp.forward(&hn, n)?);
            }
        }
        if !self.prefill_shortcut {
            x = select(&x);
        }
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

impl LanguageModel for DeviceModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        crate::model::embed_checked(&self.embed, self.info.vocab_size, ids)
    }

    fn new_cache(&self) -> Cache {
        let scales = match &self.kv_mode {
            KvMode::Checkpoint => self.stored_kv_scales(),
            KvMode::Int8(s) => Some(s.clone()),
            KvMode::Full => None,
            KvMode::F16 => {
                return Cache::new_f16(&self.kv_widths(), self.info.context_length);
            }
        };
        match scales {
            Some(s) => Cache::new_int8(&self.kv_widths(), &s, self.info.context_length),
            None => Cache::new(&self.kv_widths(), self.info.context_length),
        }
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

/// Continuous batching: many sequences in one pass (module `crate::batch`).
impl DeviceModel {
    /// Runs token `ids[i]` at position `caches[i].seq_len()` of sequence `i`, for every
    /// sequence at once: each projection is one matmul over the `b` rows (the weights are
    /// read once per step for all of them), each row attends to its own cache. Appends to
    /// every cache and returns the logits of each row. On error every cache is rolled back.
    ///
    /// # Shapes
    /// `ids.len() == caches.len() == b` -> `(b, vocab)`.
    pub fn forward_batch(&self, ids: &[u32], caches: &mut [&mut Cache]) -> Result<Tensor> {
        if ids.is_empty() || caches.len() != ids.len() {
            return Err(LmError::Invalid(format!(
                "a batch step needs one cache per token ({} tokens, {} caches)",
                ids.len(),
                caches.len()
            )));
        }
        let embeds = self.embed_tokens(ids)?;
        self.forward_segments(&embeds, &vec![1; ids.len()], caches)
    }

    /// Many sequences in one pass, each continuing its own cache: sequence `i` runs the next
    /// `counts[i]` rows of `embeds` (one for a decode step, the rest of a prompt for a
    /// prefill), at positions `caches[i].seq_len()..`. The projections run on all rows at
    /// once; each sequence attends causally to its own cache. Appends to every cache and
    /// returns the logits of each sequence's last row (what [`LanguageModel::forward_embeds`]
    /// with [`LogitsFor::Last`] gives for that sequence alone). On error every cache is
    /// rolled back.
    ///
    /// # Shapes
    /// `embeds: (n, hidden)`, `counts.len() == caches.len() == b`, `counts.iter().sum() == n`
    /// -> `(b, vocab)`.
    pub fn forward_segments(
        &self,
        embeds: &Tensor,
        counts: &[usize],
        caches: &mut [&mut Cache],
    ) -> Result<Tensor> {
        let (n, h) = embeds.dims2()?;
        crate::attention::check_segments(n, counts, caches.len())?;
        if h != self.info.hidden_size {
            return Err(LmError::Invalid(format!(
                "input embeddings have width {h}, the model's hidden size is {}",
                self.info.hidden_size
            )));
        }
        for (c, &t) in caches.iter().zip(counts) {
            if c.num_layers() != self.layers.len() {
                return Err(LmError::Invalid("cache was made for another model".into()));
            }
            if c.seq_len() + t > self.info.context_length {
                return Err(LmError::PromptTooLong {
                    tokens: c.seq_len() + t,
                    context: self.info.context_length,
                    reserved: 0,
                });
            }
        }
        let starts: Vec<usize> = caches.iter().map(|c| c.seq_len()).collect();
        let out = self.run_batch(embeds, counts, caches, &starts);
        match out {
            Ok(l) => {
                caches
                    .iter_mut()
                    .zip(counts)
                    .for_each(|(c, &t)| c.advance(t));
                Ok(l)
            }
            Err(e) => {
                for (c, &s) in caches.iter_mut().zip(&starts) {
                    c.truncate(s);
                }
                Err(e)
            }
        }
    }

    fn run_batch(
        &self,
        embeds: &Tensor,
        counts: &[usize],
        caches: &mut [&mut Cache],
        starts: &[usize],
    ) -> Result<Tensor> {
        let b = counts.len();
        let h = self.info.hidden_size;
        let b1 = self.cfg.num_block1_layers();
        let pos: Vec<usize> = counts
            .iter()
            .zip(starts)
            .flat_map(|(&t, &s)| s..s + t)
            .collect();
        let n = pos.len();
        // the last row of each sequence: the one whose logits are returned
        let last: Vec<usize> = counts
            .iter()
            .scan(0, |end, &t| {
                *end += t;
                Some(*end - 1)
            })
            .collect();
        let mut x: Vec<f32> = embeds.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut hn = vec![0f32; x.len()];
        let add = |x: &mut [f32], y: &[f32]| x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        for (i, layer) in self.layers[..b1].iter().enumerate() {
            let mut kvs = caches
                .iter_mut()
                .map(|c| {
                    c.layer_mut(i).ok_or_else(|| {
                        LmError::Invalid(format!("cache has no K/V slot for layer {i}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            layer.input_norm.forward_into(&x, &mut hn)?;
            add(
                &mut x,
                &layer.attn.forward_own_batch(
                    &hn,
                    &pos,
                    counts,
                    &self.rope,
                    &mut kvs,
                    self.kv_mode.rounds_to_8_bits(),
                )?,
            );
            layer.post_norm.forward_into(&x, &mut hn)?;
            add(&mut x, &layer.mlp.forward(&hn, n)?);
        }
        let select = |x: &[f32]| gather_rows(x, &last, h);
        // Block 2 writes no cache: with the shortcut it runs only the rows whose logits are
        // returned (as `run` does).
        let (mut x, pos2, counts2) = if self.prefill_shortcut {
            (
                select(&x),
                last.iter().map(|&r| pos[r]).collect::<Vec<_>>(),
                vec![1; b],
            )
        } else {
            (x, pos.clone(), counts.to_vec())
        };
        if b1 < self.layers.len() {
            let shared = caches
                .iter()
                .map(|c| {
                    c.layer(b1 - 1).ok_or_else(|| {
                        LmError::Invalid("cache has no K/V for the last block-1 layer".into())
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let rows = pos2.len();
            let mut hn = vec![0f32; x.len()];
            for layer in &self.layers[b1..] {
                layer.input_norm.forward_into(&x, &mut hn)?;
                add(
                    &mut x,
                    &layer
                        .attn
                        .forward_shared_batch(&hn, &pos2, &counts2, &self.rope, &shared)?,
                );
                layer.post_norm.forward_into(&x, &mut hn)?;
                add(&mut x, &layer.mlp.forward(&hn, rows)?);
            }
        }
        if !self.prefill_shortcut {
            x = select(&x);
        }
        debug_assert_eq!(x.len(), b * h);
        crate::model::output_logits(&self.norm, &self.lm_head, x, b, self.info.vocab_size)
    }
}

/// Rows `rows` of the row-major `x` (rows of width `h`), in that order; all of `x` when
/// `rows` is every row.
fn gather_rows(x: &[f32], rows: &[usize], h: usize) -> Vec<f32> {
    if rows.len() * h == x.len() {
        return x.to_vec();
    }
    rows.iter()
        .flat_map(|&r| x[r * h..(r + 1) * h].iter().copied())
        .collect()
}
