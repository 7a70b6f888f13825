//! `afm-tiny`: the export that stage-2 training (`afm_train::adapter_train`) writes, and the
//! configuration of [`Vlm`] that runs it ([`Vlm::load_afm_tiny`], [`Vlm::afm_tiny`]).
//!
//! # The export directory
//! * `config.json` ([`AfmTinyConfig`]): `model_type` = `"afm-tiny"`, `vision` (the ViT's
//!   [`VisionConfig`]), `adapter` ([`AfmAdapterConfig`]), `lm` ([`LmInfo`]: file name, sha256,
//!   hidden size and vocabulary size of the GGUF it was trained against), `image_placeholder`
//!   (token text) and `image_placeholder_id`, `tokens_per_image`, `image_size`,
//!   `image_mean` / `image_std` (bicubic resize), `caption_prompt`, and optionally `tiling`
//!   ([`TilingSettings`], below);
//! * `vision/config.json` + `model.safetensors` (tensors `vision_model.*`), what
//!   [`VisionEncoder::load`] reads;
//! * `adapter.safetensors`: tensors `adapter.*` as [`AfmAdapter::load`] reads them.
//!
//! The language model is not part of the export: it is the GGUF named in `lm.file`, whose
//! sha256 must equal `lm.sha256` ([`verify_lm`]). [`lm_candidates`] lists where it is looked
//! for beside the export (the export directory, then its parent: the training run directory);
//! the CLI then falls back to its default-model location.
//!
//! This is the one definition: training writes it, inference reads it.
//!
//! # Tiling
//! `"tiling": {"tile": 224, "max_tokens": 576, "overview": true}`: `tile` must equal
//! `image_size`; `max_tokens` is the image-token budget per image when the caller gives none
//! (a multiple of `tokens_per_image`: 576 = 16 views of 36); `overview` (default `true`)
//! puts the whole image first. An image then becomes the overview plus its
//! native-resolution tiles, or fewer, downscaled tiles when the budget is below the native
//! grid (the plan reports it), each through the ViT and adapter (`tokens_per_image` tokens
//! each), in the order of [`crate::afm_prompt::view_order`].
//!
//! Without a `tiling` section (the shipped `assets/afm-tiny`, trained on one view) every image
//! is one view: the whole image resized (squashed) to `image_size` squared, bicubic,
//! `image_mean` / `image_std`; budgets at or above `tokens_per_image` change nothing.
//!
//! # Inference
//! [`Vlm`] with the [`TileProcessor`] of the config, the ViT and the adapter (fast kernels),
//! the GGUF's language model and tokenizer, and the prompt of [`crate::afm_prompt`]
//! ([`ChatFormat::Text`]); generation is [`afm_lm::generate_from_embeds`] with the caller's
//! sampling options, stopping at the chat template's end-of-turn token. `caption` and
//! `describe_screen` both ask the export's `caption_prompt`.

use crate::afm_adapter::{AfmAdapter, AfmAdapterConfig};
use crate::afm_prompt::PromptFormat;
use crate::error::{FusionError, Result};
use crate::tile_processor::{check_tiling, TileProcessor, TilingSettings};
use crate::vlm::{ChatFormat, Vlm, VlmParts};
use afm_lm::{Checkpoint, DeviceModel, LanguageModel, Tokenizer};
use afm_vision::preprocess::Preprocess;
use afm_vision::{VisionConfig, VisionEncoder};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `model_type` of an afm-tiny export.
pub const MODEL_TYPE: &str = "afm-tiny";

/// The language model an adapter is trained against (recorded in the run state and the
/// export).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmInfo {
    /// File name (no directory), e.g. `SmolLM2-135M-Instruct.Q4_1.gguf`.
    pub file: String,
    /// sha256 of the file, hex.
    pub sha256: String,
    pub hidden_size: usize,
    pub vocab_size: usize,
}

/// `afm-tiny/config.json` (module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AfmTinyConfig {
    pub model_type: String,
    pub vision: VisionConfig,
    pub adapter: AfmAdapterConfig,
    pub lm: LmInfo,
    pub image_placeholder: String,
    pub image_placeholder_id: u32,
    pub tokens_per_image: usize,
    pub image_size: usize,
    pub image_mean: f32,
    pub image_std: f32,
    pub caption_prompt: String,
    /// Overview + tiles (module docs, "Tiling"); absent: one view per image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<TilingSettings>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FusionError + '_ {
    move |source| FusionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> FusionError {
    FusionError::BadFile {
        path: path.to_path_buf(),
        format: "afm-tiny config.json",
        reason: reason.into(),
    }
}

impl AfmTinyConfig {
    /// Reads and checks `config.json` of an export.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let c: Self = serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
        c.validate().map_err(|r| bad(path, r))?;
        Ok(c)
    }

    /// The fields agree with each other (the reason otherwise).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != MODEL_TYPE {
            return Err(format!(
                "model_type is `{}`, not `{MODEL_TYPE}`",
                self.model_type
            ));
        }
        let pool = self.adapter.pool[0] * self.adapter.pool[1];
        if self.tokens_per_image != pool {
            return Err(format!(
                "tokens_per_image {} differs from the adapter's {:?} pool ({pool} tokens)",
                self.tokens_per_image, self.adapter.pool
            ));
        }
        if self.image_size != self.vision.image_size {
            return Err(format!(
                "image_size {} differs from the encoder's {}",
                self.image_size, self.vision.image_size
            ));
        }
        if self.adapter.vision_hidden_size != self.vision.hidden_size {
            return Err(format!(
                "the adapter reads width {}, the encoder gives {}",
                self.adapter.vision_hidden_size, self.vision.hidden_size
            ));
        }
        if self.adapter.text_hidden_size != self.lm.hidden_size {
            return Err(format!(
                "the adapter writes width {}, the language model `{}` is {} wide",
                self.adapter.text_hidden_size, self.lm.file, self.lm.hidden_size
            ));
        }
        if !(self.image_std.is_finite() && self.image_std > 0.0) {
            return Err(format!("image_std {} must be positive", self.image_std));
        }
        if let Some(t) = &self.tiling {
            check_tiling(t, self.image_size as u32, self.tokens_per_image)?;
        }
        Ok(())
    }

    /// The image processor of the export (module docs, "Tiling"), from the config alone.
    pub fn processor(&self) -> Result<TileProcessor> {
        TileProcessor::new(
            self.image_size as u32,
            self.tokens_per_image,
            self.tiling,
            self.preprocess()?,
            &self.image_placeholder,
        )
    }

    /// The image preprocessing of training: resize to `image_size` squared, then
    /// `(x / 255 - mean) / std`.
    pub fn preprocess(&self) -> Result<Preprocess> {
        Ok(Preprocess::from_json(&serde_json::json!({
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }))?)
    }
}

/// `model_type` of a checkpoint directory's `config.json` (`None` when it has none).
pub fn model_type(dir: &Path) -> Result<Option<String>> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| FusionError::BadFile {
        path: p.clone(),
        format: "config.json",
        reason: e.to_string(),
    })?;
    Ok(v.get("model_type")
        .and_then(|t| t.as_str())
        .map(String::from))
}

/// `true` when `dir/config.json` says `model_type: "afm-tiny"`.
pub fn is_afm_tiny(dir: &Path) -> Result<bool> {
    Ok(model_type(dir)?.as_deref() == Some(MODEL_TYPE))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads an `afm-tiny/` export: its config, the ViT and the adapter (fast kernels on).
pub fn load_export(dir: &Path) -> Result<(AfmTinyConfig, VisionEncoder, AfmAdapter)> {
    let c = AfmTinyConfig::from_file(&dir.join("config.json"))?;
    let vdir = dir.join("vision");
    if !vdir.is_dir() {
        return Err(FusionError::BadFile {
            path: dir.to_path_buf(),
            format: "afm-tiny export",
            reason: format!("no `vision/` directory (expected {})", vdir.display()),
        });
    }
    let mut vit = VisionEncoder::load(&vdir)?;
    if *vit.config() != c.vision {
        return Err(bad(
            &dir.join("config.json"),
            format!(
                "`vision` differs from {}",
                vdir.join("config.json").display()
            ),
        ));
    }
    vit.set_fast_kernels(true);
    let af = dir.join("adapter.safetensors");
    let bytes = std::fs::read(&af).map_err(io(&af))?;
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        FusionError::BadFile {
            path: af.clone(),
            format: "safetensors",
            reason: e.to_string(),
        }
    })?;
    let mut adapter = AfmAdapter::load(t, c.adapter.clone()).map_err(|e| FusionError::BadFile {
        path: af.clone(),
        format: "afm-tiny adapter",
        reason: e.to_string(),
    })?;
    adapter.set_fast_kernels(true);
    Ok((c, vit, adapter))
}

/// Where the export's language model is looked for beside it: `dir/<lm.file>`, then
/// `dir/../<lm.file>` (the training run directory).
pub fn lm_candidates(dir: &Path, cfg: &AfmTinyConfig) -> Vec<PathBuf> {
    let mut v = vec![dir.join(&cfg.lm.file)];
    if let Some(p) = dir.parent() {
        v.push(p.join(&cfg.lm.file));
    }
    v
}

/// Errors unless `path`'s sha256 is the one the export was trained against.
pub fn verify_lm(path: &Path, info: &LmInfo) -> Result<()> {
    let got = sha256_file(path)?;
    if !got.eq_ignore_ascii_case(&info.sha256) {
        return Err(FusionError::LmMismatch {
            path: path.to_path_buf(),
            reason: format!(
                "its sha256 is {got}, the export was trained against `{}` with sha256 {}",
                info.file, info.sha256
            ),
        });
    }
    Ok(())
}

impl Vlm<DeviceModel> {
    /// Loads the export `dir` with the language model `lm` (a GGUF; its sha256 must be the one
    /// recorded in `config.json`). Reads local files only.
    pub fn load_afm_tiny(dir: &Path, lm: &Path) -> Result<Self> {
        let (cfg, encoder, adapter) = load_export(dir)?;
        if !lm.is_file() {
            return Err(FusionError::LmMismatch {
                path: lm.to_path_buf(),
                reason: format!(
                    "no such file (the export needs `{}`, sha256 {})",
                    cfg.lm.file, cfg.lm.sha256
                ),
            });
        }
        verify_lm(lm, &cfg.lm)?;
        let ck = Checkpoint::load(lm)?;
        let mut vlm = Self::afm_tiny(cfg, encoder, adapter, ck.model, ck.tokenizer)?;
        // an export with a text reader (`reader/`) reads every image's text into the prompt
        let rdir = dir.join("reader");
        if rdir.join("config.json").exists() {
            vlm.set_reader(Some(crate::vlm::ScreenReader::from_dir(&rdir)?));
        }
        Ok(vlm)
    }
}

impl<M: LanguageModel> Vlm<M> {
    /// The afm-tiny configuration of the pipeline from parts (module docs); checks that they
    /// fit the export's config.
    pub fn afm_tiny(
        cfg: AfmTinyConfig,
        encoder: VisionEncoder,
        adapter: AfmAdapter,
        lm: M,
        mut tokenizer: Tokenizer,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|r| FusionError::config("afm-tiny config", r))?;
        if *encoder.config() != cfg.vision {
            return Err(FusionError::config(
                "vision",
                "the encoder's configuration differs from the export's",
            ));
        }
        if *adapter.config() != cfg.adapter {
            return Err(FusionError::config(
                "adapter",
                "the adapter's configuration differs from the export's",
            ));
        }
        let info = lm.info();
        if info.hidden_size != cfg.lm.hidden_size || info.vocab_size != cfg.lm.vocab_size {
            return Err(FusionError::config(
                "lm",
                format!(
                    "the language model is {} wide with {} tokens, the export was trained against `{}` ({} wide, {} tokens)",
                    info.hidden_size, info.vocab_size, cfg.lm.file, cfg.lm.hidden_size, cfg.lm.vocab_size
                ),
            ));
        }
        let (ph, eot) = {
            let f = PromptFormat::new(&tokenizer, &cfg.image_placeholder)?;
            (f.placeholder_id(), f.end_of_turn_id())
        };
        if ph != cfg.image_placeholder_id {
            return Err(FusionError::config(
                "image_placeholder_id",
                format!(
                    "the tokenizer gives `{}` the id {ph}, the export recorded {}",
                    cfg.image_placeholder, cfg.image_placeholder_id
                ),
            ));
        }
        if !tokenizer.eos_ids().contains(&eot) {
            tokenizer.add_eos_id(eot);
        }
        let processor = cfg.processor()?;
        let vlm = Vlm::new(VlmParts {
            model_type: MODEL_TYPE.into(),
            lm,
            encoder,
            adapter: Box::new(adapter),
            processor: Box::new(processor),
            tokenizer,
            chat: ChatFormat::Text,
            image_token: cfg.image_placeholder.clone(),
            image_token_id: cfg.image_placeholder_id,
            caption_prompt: cfg.caption_prompt.clone(),
            screen_prompt: cfg.caption_prompt,
        })?;
        Ok(vlm)
    }
}
