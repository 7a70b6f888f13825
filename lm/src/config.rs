//! Model configuration: a serde struct mirroring HF `config.json` (llama family) plus the AFM
//! extensions. The same struct is filled from GGUF metadata for GGUF checkpoints.

use crate::error::{LmError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `eos_token_id` is an integer or a list of integers in HF configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(x) => vec![*x],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// Configuration of a dense decoder (`DeviceModel`).
///
/// Field names are those of HF `LlamaConfig` so a llama-style `config.json` deserialises as is.
/// The AFM fields (`num_kv_reuse_layers`, `qk_norm`, `rope_interleaved`, `kv_quant`) default to
/// "off", which is exactly a llama model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// GQA: number of K/V heads (defaults to `num_attention_heads`).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width (defaults to `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Context length in tokens.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// AFM KV-cache sharing: the number of trailing layers (block 2) that have no K/V
    /// projections and attend to the K/V cache of the last block-1 layer. 0 = off (llama).
    #[serde(default)]
    pub num_kv_reuse_layers: usize,
    /// AFM QK-norm: learned RMSNorm over the head dim on q and k, applied after RoPE.
    #[serde(default)]
    pub qk_norm: bool,
    /// RoPE rotates adjacent pairs (x0,x1),(x2,x3)... (AFM, GGUF llama) instead of the two
    /// halves of the head (HF llama safetensors).
    #[serde(default)]
    pub rope_interleaved: bool,
    /// AFM 8-bit KV fake quantisation with learned per-layer key/value scales.
    #[serde(default)]
    pub kv_quant: bool,
}

/// Upper bounds on the sizes a config may declare, shared by every model config: far above
/// any real checkpoint, low enough that every product of them fits in `usize` and no table
/// built from them is absurd. A hostile config is refused by name before memory is spent.
pub mod caps {
    /// Context length in tokens.
    pub const CONTEXT: usize = 1 << 20;
    /// Vocabulary size.
    pub const VOCAB: usize = 1 << 22;
    /// Residual, MLP and head widths.
    pub const WIDTH: usize = 1 << 18;
    /// Layers, heads, tracks, experts.
    pub const COUNT: usize = 1 << 12;

    /// Refuses `value` above `cap`, naming the field.
    pub fn check(field: &str, value: usize, cap: usize) -> crate::Result<()> {
        if value > cap {
            return Err(crate::LmError::config(
                field,
                format!("{value} exceeds the supported maximum of {cap}"),
            ));
        }
        Ok(())
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    2048
}

/// Reads a JSON config file and parses it with `parse`; I/O, JSON and schema errors name the
/// file (`format` says which kind of file it should be), validation errors name the field.
pub(crate) fn read_config_file<T>(
    path: &Path,
    format: &'static str,
    parse: impl FnOnce(serde_json::Value) -> Result<T>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| LmError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| LmError::BadFile {
        path: path.to_path_buf(),
        format,
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    parse(v).map_err(|e| match e {
        LmError::Json(reason) => bad(reason),
        e => e,
    })
}

impl LmConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config_file(path, "config.json", Self::from_json)
    }

    /// Parses and validates a config from JSON (a whole `config.json`, or the `text_config`
    /// of a vision-language checkpoint).
    ///
    /// RoPE settings come from `rope_theta` (transformers 4) or from
    /// `rope_parameters.rope_theta` (transformers 5); RoPE scaling of any type other than
    /// `default` is refused rather than silently ignored.
    pub fn from_json(mut v: serde_json::Value) -> Result<Self> {
        let obj = v
            .as_object_mut()
            .ok_or_else(|| LmError::Json("the config is not a JSON object".into()))?;
        for key in ["rope_parameters", "rope_scaling"] {
            let Some(p) = obj.get(key).filter(|p| !p.is_null()).cloned() else {
                continue;
            };
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(LmError::config(
                    key,
                    format!("RoPE type `{kind}` is not supported (only `default`)"),
                ));
            }
            if let Some(theta) = p.get("rope_theta") {
                if obj.get("rope_theta").is_none_or(|t| t.is_null()) {
                    obj.insert("rope_theta".into(), theta.clone());
                }
            }
        }
        let cfg: LmConfig = serde_json::from_value(v).map_err(|e| LmError::Json(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Number of block-1 layers (those with their own K/V).
    pub fn num_block1_layers(&self) -> usize {
        self.num_hidden_layers - self.num_kv_reuse_layers
    }

    /// Sets block 2 to `b2 / (b1 + b2)` of the layers (the paper uses 5:3), rounded to the
    /// nearest layer. `(1, 0)` turns sharing off.
    pub fn with_block_ratio(mut self, b1: usize, b2: usize) -> Result<Self> {
        if b1 == 0 {
            return Err(LmError::config(
                "block ratio",
                "block 1 must have at least one layer",
            ));
        }
        let n = self.num_hidden_layers;
        self.num_kv_reuse_layers = (n * b2 + (b1 + b2) / 2) / (b1 + b2);
        self.validate()?;
        Ok(self)
    }

    /// Checks the invariants the model code relies on; every failure names its field.
    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, f: &str| {
            if v == 0 {
                Err(LmError::config(f, "must be > 0"))
            } else {
                Ok(())
            }
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.hidden_size, "hidden_size")?;
        pos(self.intermediate_size, "intermediate_size")?;
        pos(self.num_hidden_layers, "num_hidden_layers")?;
        pos(self.num_attention_heads, "num_attention_heads")?;
        pos(self.num_kv_heads(), "num_key_value_heads")?;
        pos(self.max_position_embeddings, "max_position_embeddings")?;
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(LmError::config(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} K/V heads",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(LmError::config(
                "head_dim",
                format!("{hd} must be even and > 0 for RoPE"),
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(LmError::config(
                "hidden_size",
                "not divisible by num_attention_heads and no head_dim given",
            ));
        }
        if self.num_kv_reuse_layers >= self.num_hidden_layers {
            return Err(LmError::config(
                "num_kv_reuse_layers",
                format!(
                    "{} reuse layers leave no block-1 layer out of {}",
                    self.num_kv_reuse_layers, self.num_hidden_layers
                ),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(LmError::config("rms_norm_eps", "must be a positive number"));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(LmError::config("rope_theta", "must be a positive number"));
        }
        caps::check(
            "max_position_embeddings",
            self.max_position_embeddings,
            caps::CONTEXT,
        )?;
        caps::check("vocab_size", self.vocab_size, caps::VOCAB)?;
        caps::check("hidden_size", self.hidden_size, caps::WIDTH)?;
        caps::check("intermediate_size", self.intermediate_size, caps::WIDTH)?;
        caps::check("head_dim", hd, caps::WIDTH)?;
        caps::check("num_hidden_layers", self.num_hidden_layers, caps::COUNT)?;
        caps::check("num_attention_heads", self.num_attention_heads, caps::COUNT)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> LmConfig {
        serde_json::from_str(
            r#"{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
                "eos_token_id": [1, 2]}"#,
        )
        .unwrap()
    }

    #[test]
    fn hf_llama_config_parses_with_afm_defaults_off() {
        let c = base();
        c.validate().unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.num_kv_reuse_layers, 0);
        assert_eq!(c.eos_token_id.unwrap().to_vec(), vec![1, 2]);
    }

    #[test]
    fn block_ratio_5_3_of_8_layers_is_3_reuse_layers() {
        let c = base().with_block_ratio(5, 3).unwrap();
        assert_eq!(c.num_kv_reuse_layers, 3);
        assert_eq!(c.num_block1_layers(), 5);
        let c56 = LmConfig {
            num_hidden_layers: 56,
            ..base()
        }
        .with_block_ratio(5, 3)
        .unwrap();
        assert_eq!(c56.num_kv_reuse_layers, 21);
    }

    #[test]
    fn transformers_5_rope_parameters_are_read_and_scaling_is_refused() {
        let v = serde_json::json!({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}});
        assert_eq!(LmConfig::from_json(v.clone()).unwrap().rope_theta, 100000.0);
        let mut w = v.clone();
        w["rope_parameters"]["rope_type"] = "llama3".into();
        let e = LmConfig::from_json(w).unwrap_err().to_string();
        assert!(e.contains("rope_parameters") && e.contains("llama3"), "{e}");
        let mut w = v;
        w["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        assert!(LmConfig::from_json(w)
            .unwrap_err()
            .to_string()
            .contains("rope_scaling"));
    }

    #[test]
    fn bad_configs_name_their_field() {
        let mut c = base();
        c.num_key_value_heads = Some(3);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut c = base();
        c.num_kv_reuse_layers = 8;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_kv_reuse_layers"));
    }
}
