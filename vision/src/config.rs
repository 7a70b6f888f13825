//! Vision-tower configuration: a serde struct mirroring HF `SiglipVisionConfig` (the
//! `vision_config` of Idefics3/SmolVLM checkpoints) plus the attention pattern.

use crate::error::{Result, VisionError};
use serde::{Deserialize, Serialize};

/// Which attention the encoder blocks use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttentionPattern {
    /// Every block attends over all tokens (SigLIP, CLIP).
    #[default]
    Global,
    /// The paper's Register-Window attention (see `attention.rs` for the exact rule):
    /// windows of `window x window` patches, each with the register token(s) appended, in all
    /// blocks but `global_layers`, which attend over everything.
    RegisterWindow {
        window: usize,
        global_layers: Vec<usize>,
        #[serde(default = "one")]
        num_registers: usize,
    },
}

fn one() -> usize {
    1
}

/// Vision encoder configuration. Field names are those of HF `SiglipVisionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    /// Side of the square image the position table was trained for.
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// `gelu_pytorch_tanh` (SigLIP) or `gelu` (exact, erf).
    #[serde(default = "act")]
    pub hidden_act: String,
    /// AFM extension; absent in HF configs (= global attention).
    #[serde(default)]
    pub attention: AttentionPattern,
    /// afm extension: a convolutional stem before the patch embedding, as the output channels
    /// of its stride-2 3x3 convolutions (see `stem.rs`). Absent: a plain patch embedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stem: Option<Vec<usize>>,
}

fn three() -> usize {
    3
}
fn eps() -> f64 {
    1e-6
}
fn act() -> String {
    "gelu_pytorch_tanh".into()
}

impl VisionConfig {
    /// Side of the position grid the table holds.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Channels and patch side the patch embedding sees: the image's, or the stem's output.
    pub fn embed_input(&self) -> (usize, usize) {
        match &self.stem {
            Some(s) if !s.is_empty() => (s[s.len() - 1], self.patch_size >> s.len()),
            _ => (self.num_channels, self.patch_size),
        }
    }

    pub fn num_registers(&self) -> usize {
        match &self.attention {
            AttentionPattern::Global => 0,
            AttentionPattern::RegisterWindow { num_registers, .. } => *num_registers,
        }
    }

    /// Checks what the encoder relies on; each failure names its field.
    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, f: &str| {
            if v == 0 {
                Err(VisionError::config(f, "must be > 0"))
            } else {
                Ok(())
            }
        };
        pos(self.hidden_size, "hidden_size")?;
        pos(self.intermediate_size, "intermediate_size")?;
        pos(self.num_hidden_layers, "num_hidden_layers")?;
        pos(self.num_attention_heads, "num_attention_heads")?;
        pos(self.num_channels, "num_channels")?;
        pos(self.patch_size, "patch_size")?;
        pos(self.image_size, "image_size")?;
        // the same caps as the language models' configs
        use afm_lm::config::caps;
        for (f, v, cap) in [
            ("hidden_size", self.hidden_size, caps::WIDTH),
            ("intermediate_size", self.intermediate_size, caps::WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, caps::COUNT),
            ("num_attention_heads", self.num_attention_heads, caps::COUNT),
            ("num_channels", self.num_channels, caps::COUNT),
            ("image_size", self.image_size, 1 << 16),
        ] {
            if v > cap {
                return Err(VisionError::config(
                    f,
                    format!("{v} exceeds the supported maximum of {cap}"),
                ));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(VisionError::config(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(VisionError::config(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if let Some(stem) = &self.stem {
            if let Some(&c) = stem.iter().find(|&&c| c > caps::WIDTH) {
                return Err(VisionError::config(
                    "stem",
                    format!(
                        "channel count {c} exceeds the supported maximum of {}",
                        caps::WIDTH
                    ),
                ));
            }
            let down = 1usize.checked_shl(stem.len() as u32).unwrap_or(0);
            if stem.is_empty()
                || stem.len() > 4
                || stem.contains(&0)
                || down == 0
                || !self.patch_size.is_multiple_of(down)
            {
                return Err(VisionError::config(
                    "stem",
                    format!(
                        "{stem:?}: give 1 to 4 positive channel counts whose stride-2 halvings divide patch_size {}",
                        self.patch_size
                    ),
                ));
            }
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu_pytorch_tanh" | "gelu" | "quick_gelu"
        ) {
            return Err(VisionError::config(
                "hidden_act",
                format!("`{}` is not supported", self.hidden_act),
            ));
        }
        if let AttentionPattern::RegisterWindow {
            window,
            global_layers,
            num_registers,
        } = &self.attention
        {
            pos(*window, "attention.window")?;
            pos(*num_registers, "attention.num_registers")?;
            if let Some(l) = global_layers.iter().find(|&&l| l >= self.num_hidden_layers) {
                return Err(VisionError::config(
                    "attention.global_layers",
                    format!(
                        "layer {l} does not exist ({} layers)",
                        self.num_hidden_layers
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads a `config.json`: a bare vision config, or one nested under `vision_config`
    /// (SiglipConfig, Idefics3/SmolVLM).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let v: serde_json::Value = crate::error::read_json(path, "config.json")?;
        let v = v.get("vision_config").cloned().unwrap_or(v);
        let cfg: VisionConfig = serde_json::from_value(v).map_err(|e| VisionError::BadFile {
            path: path.to_path_buf(),
            format: "config.json",
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_stem(stem: &str) -> String {
        format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_channels": 3, "image_size": 224,
               "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
               "stem": {stem}}}"#
        )
    }

    fn parse(s: &str) -> std::result::Result<VisionConfig, String> {
        let c: VisionConfig = serde_json::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn stems_are_checked_before_anything_is_allocated() {
        assert!(parse(&with_stem("[8, 16]")).is_ok());
        let huge = parse(&with_stem("[8, 1099511627776]")).unwrap_err();
        assert!(
            huge.contains("stem") && huge.contains("1099511627776"),
            "{huge}"
        );
        for bad in ["[]", "[8, 0]", "[8, 8, 8, 8, 8]", "[8, 8, 8, 8, 8, 8]"] {
            let e = parse(&with_stem(bad)).unwrap_err();
            assert!(e.contains("stem"), "{bad}: {e}");
        }
    }
}
