//! `config.json` of an Idefics3 / SmolVLM checkpoint: the vision tower's config, the text
//! model's config, the image token and the pixel-shuffle factor. Keys missing from
//! `vision_config` take transformers' `Idefics3VisionConfig` defaults, as transformers does.

use crate::error::{FusionError, Result};
use afm_lm::LmConfig;
use afm_vision::VisionConfig;
use serde_json::{json, Value};
use std::path::Path;

/// The parts of an Idefics3 `config.json` the pipeline uses.
#[derive(Debug, Clone)]
pub struct Idefics3Config {
    pub vision: VisionConfig,
    pub text: LmConfig,
    /// Id of the `<image>` placeholder token.
    pub image_token_id: u32,
    /// Pixel-shuffle factor of the connector (4 in SmolVLM: 1024 patches -> 64 tokens).
    pub scale_factor: usize,
}

impl Idefics3Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| FusionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| FusionError::BadFile {
            path: path.to_path_buf(),
            format: "config.json",
            reason: e.to_string(),
        })?;
        Self::from_json(&v).map_err(|e| match e {
            FusionError::Config { field, reason } => FusionError::BadFile {
                path: path.to_path_buf(),
                format: "config.json",
                reason: format!("field `{field}`: {reason}"),
            },
            e => e,
        })
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let mut vision = json!({
            "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6
        });
        let given = v
            .get("vision_config")
            .and_then(|x| x.as_object())
            .ok_or_else(|| FusionError::config("vision_config", "missing"))?;
        for (k, x) in given {
            vision[k] = x.clone();
        }
        let vision: VisionConfig = serde_json::from_value(vision)
            .map_err(|e| FusionError::config("vision_config", e.to_string()))?;
        vision.validate()?;
        let text = v
            .get("text_config")
            .cloned()
            .ok_or_else(|| FusionError::config("text_config", "missing"))?;
        let text = LmConfig::from_json(text)?;
        let int = |k: &str, default: u64| -> Result<u64> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .ok_or_else(|| FusionError::config(k, "must be a non-negative integer")),
            }
        };
        let image_token_id = int("image_token_id", 128257)? as u32;
        if image_token_id as usize >= text.vocab_size {
            return Err(FusionError::config(
                "image_token_id",
                format!(
                    "{image_token_id} is outside the text model's vocabulary of {}",
                    text.vocab_size
                ),
            ));
        }
        let scale_factor = int("scale_factor", 2)? as usize;
        let grid = vision.grid();
        if scale_factor == 0 || !grid.is_multiple_of(scale_factor) {
            return Err(FusionError::config(
                "scale_factor",
                format!("{scale_factor} must be > 0 and divide the {grid}x{grid} patch grid"),
            ));
        }
        Ok(Self {
            vision,
            text,
            image_token_id,
            scale_factor,
        })
    }

    /// Image tokens per encoder tile.
    pub fn tokens_per_tile(&self) -> usize {
        let g = self.vision.grid() / self.scale_factor;
        g * g
    }
}
