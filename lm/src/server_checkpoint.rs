//! Server-model (PT-MoE) checkpoints: loading from a directory (`config.json` +
//! `*.safetensors`) or from one GGUF file, writing both, named presets, and the size figures
//! the README's memory table is made of (parameters total and active per token, K/V-cache
//! bytes, synchronisation points).
//!
//! # Layout
//! * **Directory**: `config.json` holds a [`ServerConfig`] (the schema is in `lm/README.md`;
//!   unknown keys are ignored, so `"model_type": "afm_ptmoe"` may be added), the tensors are
//!   in one or more `*.safetensors` (f32/f16/bf16) under the names listed in
//!   [`crate::server_model`]'s module docs; `tokenizer.json` (+ `tokenizer_config.json`) beside
//!   them make it a text-generation checkpoint.
//! * **GGUF**: `general.architecture = "afm_ptmoe"`, the whole [`ServerConfig`] as a JSON
//!   string under the key `afm_ptmoe.config` (one source of truth for both formats, validated
//!   field by field on load), optional `tokenizer.ggml.*` keys as llama.cpp writes them, and
//!   the tensors under llama.cpp-style names: `model.tracks.{t}.layers.{i}.X` becomes
//!   `trk.{t}.blk.{i}.X'` with `X'` the llama.cpp layer name (`attn_q.weight`,
//!   `ffn_gate.weight`, ...), the router `ffn_gate_inp.weight` and expert `e`'s matrices
//!   `ffn_{gate,up,down}_exp.{e}.weight` ([`crate::weights::gguf_name`]). Matrices may be
//!   quantized (experts included); Q4_1 and Q8_0 run on afm's own kernels, the other GGML
//!   types on candle's quantized matmul.

use crate::error::{LmError, Result};
use crate::load::{CheckpointFiles, LoadOptions};
use crate::random::{quantize_matrix, write_gguf_file};
use crate::server_model::{AttentionKind, ServerConfig, ServerModel, TrackMerge};
use crate::weights::{gguf_name, WeightSource};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// `general.architecture` of a server-model GGUF.
pub const GGUF_ARCH: &str = "afm_ptmoe";
/// GGUF metadata key holding the [`ServerConfig`] as JSON.
pub const GGUF_CONFIG_KEY: &str = "afm_ptmoe.config";

/// Parameter counts of a server model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Every weight in the checkpoint (embeddings included).
    pub total: usize,
    /// Weights one token's forward pass uses: all but the experts it is not routed to
    /// (embeddings and routers included).
    pub active: usize,
}

impl ServerConfig {
    /// Names of the built-in presets ([`ServerConfig::preset`]).
    pub const PRESETS: &'static [&'static str] = &["tiny", "paper-small"];

    /// A named configuration:
    /// * `tiny`: 2 tracks x 4 layers (D = 2), width 64, 4 experts top-2, window 8: for tests;
    /// * `paper-small`: the paper's server (tamm's defaults: 8 tracks x 48 layers of width
    ///   2048, D = 4, 4 x 128 MHA heads, dense SwiGLU 5888, 40 experts of SwiGLU 2944 per
    ///   track, top-2, every other layer MoE, (local x3, global) with a 4096 window) with the
    ///   width and the widths of the MLPs divided by 8 and the depth by 6 (8 tracks x 8
    ///   layers of width 256, 2 x 128 heads, dense 736, experts 368), the SmolLM2 vocabulary
    ///   (49152) so that a real tokenizer fits: ~0.41 B parameters, ~0.07 B active per token.
    pub fn preset(name: &str) -> Result<Self> {
        use AttentionKind::{Global, Local};
        let base = ServerConfig {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            num_tracks: 2,
            track_block_depth: 2,
            num_layers_per_track: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            num_experts: 4,
            experts_per_token: 2,
            moe_intermediate_size: 64,
            shared_expert_intermediate_size: 0,
            moe_every: 2,
            attention_pattern: vec![Local, Local, Local, Global],
            sliding_window: 8,
            global_rope: false,
            rope_theta: 500000.0,
            rope_interleaved: true,
            rms_norm_eps: 1e-5,
            qk_norm: true,
            tie_word_embeddings: true,
            track_merge: TrackMerge::Mean,
            router_softcap: 50.0,
            max_position_embeddings: 256,
        };
        let cfg = match name {
            "tiny" => base,
            "paper-small" => ServerConfig {
                vocab_size: 49152,
                hidden_size: 256,
                intermediate_size: 736,
                num_tracks: 8,
                track_block_depth: 4,
                num_layers_per_track: 8,
                num_attention_heads: 2,
                num_key_value_heads: 2,
                head_dim: 128,
                num_experts: 40,
                experts_per_token: 2,
                moe_intermediate_size: 368,
                sliding_window: 4096,
                max_position_embeddings: 32768,
                ..base
            },
            _ => {
                return Err(LmError::Invalid(format!(
                    "unknown server preset `{name}` (known: {})",
                    Self::PRESETS.join(", ")
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::config::read_config_file(path, "server config.json", Self::from_json)
    }

    /// Parameters in total and per token (see [`ParamCounts`]); equal to the element count
    /// of the tensors the model loads.
    pub fn param_counts(&self) -> ParamCounts {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let (nh, kvh) = (self.num_attention_heads, self.num_key_value_heads);
        let embed = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        let attn = h * nh * hd * 2 + h * kvh * hd * 2 + if self.qk_norm { 2 * hd } else { 0 };
        let norms = 2 * h;
        let expert = 3 * h * self.moe_intermediate_size;
        let shared = 3 * h * self.shared_expert_intermediate_size;
        let (mut total, mut active) = (embed + h, embed + h);
        for i in 0..self.num_layers_per_track {
            let common = attn + norms;
            let (t, a) = if self.is_moe(i) {
                let fixed = common + self.num_experts * h + shared;
                (
                    fixed + self.num_experts * expert,
                    fixed + self.experts_per_token * expert,
                )
            } else {
                let dense = 3 * h * self.intermediate_size;
                (common + dense, common + dense)
            };
            total += self.num_tracks * t;
            active += self.num_tracks * a;
        }
        ParamCounts { total, active }
    }

    /// Bytes of K/V cache (f32, as afm stores it) after `tokens` positions: a local layer
    /// holds at most `sliding_window` positions, a global layer all of them.
    pub fn kv_cache_bytes(&self, tokens: usize) -> usize {
        let row = 2 * self.num_key_value_heads * self.head_dim * 4;
        let per_track: usize = (0..self.num_layers_per_track)
            .map(|i| match self.attention_kind(i) {
                AttentionKind::Local => tokens.min(self.sliding_window),
                AttentionKind::Global => tokens,
            })
            .sum();
        self.num_tracks * per_track * row
    }

    /// [`ServerConfig::kv_cache_bytes`] of the same model with every layer global.
    pub fn kv_cache_bytes_all_global(&self, tokens: usize) -> usize {
        let row = 2 * self.num_key_value_heads * self.head_dim * 4;
        self.num_tracks * self.num_layers_per_track * tokens * row
    }

    /// Synchronisation points per forward pass: `(parallel tracks, tensor parallelism)`.
    /// Tracks join once per track block (`num_layers_per_track / D`); a tensor-parallel layout
    /// of the same depth all-reduces twice per layer (after attention and after the MLP).
    pub fn syncs_per_pass(&self) -> (usize, usize) {
        (
            self.num_layers_per_track / self.track_block_depth,
            2 * self.num_layers_per_track,
        )
    }
}

impl ServerModel {
    /// Loads a server model from a local path: a directory with `config.json` and
    /// `*.safetensors`, or a GGUF file (see the module docs of `server_checkpoint`).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Self> {
        load_server(&CheckpointFiles::resolve(path)?, opts)
    }
}

pub(crate) fn load_server(files: &CheckpointFiles, opts: &LoadOptions) -> Result<ServerModel> {
    let (src, mut cfg) = match files {
        CheckpointFiles::Gguf(p) => {
            let src = WeightSource::from_gguf(p)?.with_dequantize(opts.dequantize);
            let cfg = config_from_gguf(&src)?;
            (src, cfg)
        }
        CheckpointFiles::Safetensors {
            config, weights, ..
        } => {
            let cfg = ServerConfig::from_file(config)?;
            (WeightSource::from_safetensors(weights)?, cfg)
        }
    };
    if let Some(n) = opts.context_length {
        cfg.max_position_embeddings = n;
        cfg.validate()?;
    }
    let mut model = ServerModel::from_source(&src, cfg)?;
    if let Some(p) = &opts.lora {
        let adapter = crate::lora::LoraAdapter::load(p)?;
        let sha = crate::lora::files_sha256(files)?;
        model.apply_lora(&adapter, &sha, opts.lora_mode)?;
    }
    Ok(model)
}

/// The [`ServerConfig`] stored in a server GGUF's metadata.
pub fn config_from_gguf(src: &WeightSource) -> Result<ServerConfig> {
    let md = src
        .gguf_metadata()
        .ok_or_else(|| LmError::Invalid("not a GGUF source".into()))?;
    let arch = md
        .get("general.architecture")
        .ok_or_else(|| LmError::config("general.architecture", "missing"))?
        .to_string()
        .map_err(|e| LmError::config("general.architecture", e.to_string()))?;
    if arch != GGUF_ARCH {
        return Err(LmError::config(
            "general.architecture",
            format!("`{arch}` is not a server (PT-MoE) model, which is `{GGUF_ARCH}`"),
        ));
    }
    let json = md
        .get(GGUF_CONFIG_KEY)
        .ok_or_else(|| LmError::config(GGUF_CONFIG_KEY, "missing"))?
        .to_string()
        .map_err(|e| LmError::config(GGUF_CONFIG_KEY, e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| LmError::config(GGUF_CONFIG_KEY, format!("not JSON: {e}")))?;
    ServerConfig::from_json(v).map_err(|e| match e {
        LmError::Json(reason) => LmError::config(GGUF_CONFIG_KEY, reason),
        e => e,
    })
}

/// Whether a checkpoint path holds a server (PT-MoE) model rather than a dense one: a GGUF
/// whose architecture is `afm_ptmoe`, or a `config.json` with `num_tracks`.
pub fn is_server_checkpoint(path: &Path) -> Result<bool> {
    match CheckpointFiles::resolve(path)? {
        CheckpointFiles::Gguf(p) => {
            let src = WeightSource::from_gguf(&p)?;
            Ok(src
                .gguf_metadata()
                .and_then(|md| md.get("general.architecture"))
                .and_then(|v| v.to_string().ok())
                .is_some_and(|a| a == GGUF_ARCH))
        }
        CheckpointFiles::Safetensors { config, .. } => {
            let text = std::fs::read_to_string(&config).map_err(|source| LmError::Io {
                path: config.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LmError::BadFile {
                    path: config.clone(),
                    format: "config.json",
                    reason: e.to_string(),
                })?;
            Ok(v.get("num_tracks").is_some())
        }
    }
}

/// Writes `config.json` (with `"model_type": "afm_ptmoe"`) and `model.safetensors` into `dir`.
pub fn write_server_safetensors(
    dir: &Path,
    cfg: &ServerConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let io = |source| LmError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut v = serde_json::to_value(cfg).map_err(|e| LmError::Invalid(e.to_string()))?;
    v["model_type"] = GGUF_ARCH.into();
    crate::random::write_config_and_weights(dir, &v, tensors)
}

/// Writes a server GGUF: matrices whose rows split into whole blocks are stored as `dtype`
/// (experts and embeddings included; routers stay f32 so that routing is exact), vectors as
/// f32, plus `extra` metadata (e.g. `tokenizer.ggml.*` copied from another GGUF).
pub fn write_server_gguf(
    path: &Path,
    cfg: &ServerConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: GgmlDType,
    extra: &[(String, gguf_file::Value)],
) -> Result<()> {
    cfg.validate()?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let qs = names
        .into_iter()
        .map(|n| {
            let dt = if n.ends_with("mlp.router.weight") {
                GgmlDType::F32
            } else {
                dtype
            };
            Ok((gguf_name(n), quantize_matrix(&tensors[n], dt)?))
        })
        .collect::<Result<Vec<(String, QTensor)>>>()?;
    let json = serde_json::to_string(cfg).map_err(|e| LmError::Invalid(e.to_string()))?;
    let mut md = vec![
        (
            "general.architecture".to_string(),
            gguf_file::Value::String(GGUF_ARCH.into()),
        ),
        (GGUF_CONFIG_KEY.to_string(), gguf_file::Value::String(json)),
    ];
    md.extend(extra.iter().cloned());
    write_gguf_file(path, &md, &qs)
}

/// The `tokenizer.*` metadata of a GGUF (to give a generated checkpoint a real tokenizer).
pub fn gguf_tokenizer_metadata(path: &Path) -> Result<Vec<(String, gguf_file::Value)>> {
    let src = WeightSource::from_gguf(path)?;
    let md = src.gguf_metadata().expect("a GGUF source has metadata");
    let mut v: Vec<(String, gguf_file::Value)> = md
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if v.is_empty() {
        return Err(LmError::BadFile {
            path: path.to_path_buf(),
            format: "GGUF",
            reason: "it has no tokenizer.* metadata".into(),
        });
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}
