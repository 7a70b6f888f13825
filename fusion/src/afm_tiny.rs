//! `afm-tiny`: the export that stage-2 training (`afm_train::adapter_train`) writes, and the
//! inference pipeline over it.
//!
//! # The export directory
//! * `config.json` ([`AfmTinyConfig`]): `model_type` = `"afm-tiny"`, `vision` (the ViT's
//!   [`VisionConfig`]), `adapter` ([`AfmAdapterConfig`]), `lm` ([`LmInfo`]: file name, sha256,
//!   hidden size and vocabulary size of the GGUF it was trained against), `image_placeholder`
//!   (token text) and `image_placeholder_id`, `tokens_per_image`, `image_size`,
//!   `image_mean` / `image_std` (bicubic resize), `caption_prompt`;
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
//! # Inference ([`AfmTiny`])
//! As in training: one image = one tile, the whole image resized to `image_size` squared
//! (bicubic, `image_mean` / `image_std`); high-resolution tiling is NOT done yet. The ViT
//! (fast kernels) and the adapter (fast kernels) give `tokens_per_image` embeddings that
//! replace the placeholders of the prompt ([`crate::afm_prompt`]); generation is
//! [`afm_lm::generate_from_embeds`] with the caller's sampling options, stopping at the chat
//! template's end-of-turn token.

use crate::afm_adapter::{AfmAdapter, AfmAdapterConfig};
use crate::afm_prompt::PromptFormat;
use crate::connector::Adapter;
use crate::error::{FusionError, Result};
use crate::image_cache::{image_key, ImageCache};
use crate::processor::ImagePlan;
use crate::vlm::{splice, Answer, AskOptions, VisionLanguage};
use afm_lm::{Checkpoint, DeviceModel, LanguageModel, Tokenizer};
use afm_vision::preprocess::Preprocess;
use afm_vision::{VisionConfig, VisionEncoder};
use candle_core::{DType, Device};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
        Ok(())
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

/// What an image of `w x h` costs under an export: always one `image_size` squared tile of
/// `tokens_per_image` tokens (no tiling yet). A budget below that is an error (afm-tiny cannot
/// spend fewer tokens); any larger budget is met as is.
pub fn plan(
    cfg: &AfmTinyConfig,
    w: u32,
    h: u32,
    max_image_tokens: Option<usize>,
) -> Result<ImagePlan> {
    let n = cfg.tokens_per_image;
    if let Some(b) = max_image_tokens {
        if b < n {
            return Err(FusionError::Invalid(format!(
                "an image-token budget of {b} is below what afm-tiny spends on every image ({n} tokens: one {s}x{s} tile; tiling is not implemented)",
                s = cfg.image_size
            )));
        }
    }
    let s = cfg.image_size as u32;
    Ok(ImagePlan {
        image: (w, h),
        resized: (s, s),
        grid_size: (s, s),
        rows: 0,
        cols: 0,
        tiles: 1,
        image_tokens: n,
        longest_edge: s,
        downscale: None,
    })
}

/// The afm-tiny pipeline (module docs) over any language model.
pub struct AfmTiny<M: LanguageModel> {
    cfg: AfmTinyConfig,
    lm: M,
    encoder: VisionEncoder,
    adapter: AfmAdapter,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    /// `(tokens_per_image, lm_hidden)` embeddings of recent images.
    images: ImageCache<candle_core::Tensor>,
}

impl AfmTiny<DeviceModel> {
    /// Loads the export `dir` with the language model `lm` (a GGUF; its sha256 must be the one
    /// recorded in `config.json`). Reads local files only.
    pub fn load(dir: &Path, lm: &Path) -> Result<Self> {
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
        Self::new(cfg, encoder, adapter, ck.model, ck.tokenizer)
    }
}

impl<M: LanguageModel> AfmTiny<M> {
    /// Assembles the pipeline from parts; checks that they fit together.
    pub fn new(
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
        let preprocess = cfg.preprocess()?;
        Ok(Self {
            cfg,
            lm,
            encoder,
            adapter,
            tokenizer,
            preprocess,
            images: ImageCache::default(),
        })
    }

    pub fn config(&self) -> &AfmTinyConfig {
        &self.cfg
    }
    pub fn lm(&self) -> &M {
        &self.lm
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn encoder(&self) -> &VisionEncoder {
        &self.encoder
    }

    /// Runs the ViT's matrices and attention scores in int8 ([`VisionEncoder::set_int8`]) or back in
    /// f32; forgets the cached images. (The language model is a quantized GGUF already.)
    pub fn set_vision_int8(&mut self, on: bool) -> Result<()> {
        self.images.clear();
        self.encoder.set_int8(on)?;
        Ok(())
    }

    /// The prompt format of this export over its tokenizer.
    pub fn prompt_format(&self) -> Result<PromptFormat<'_>> {
        PromptFormat::new(&self.tokenizer, &self.cfg.image_placeholder)
    }

    /// What an image of `w x h` costs ([`plan`]).
    pub fn plan(&self, w: u32, h: u32, max_image_tokens: Option<usize>) -> Result<ImagePlan> {
        plan(&self.cfg, w, h, max_image_tokens)
    }

    /// The image's `(tokens_per_image, lm_hidden)` embeddings (f32), and whether they came
    /// from the cache of recent images (then the encoder did not run).
    pub fn embed_image_cached(&self, img: &RgbImage) -> Result<(Arc<candle_core::Tensor>, bool)> {
        let key = image_key(img, ());
        if let Some(e) = self.images.get(key) {
            return Ok((e, true));
        }
        let e = Arc::new(self.embed_image(img)?);
        self.images.insert(key, e.clone());
        Ok((e, false))
    }

    /// The image's `(tokens_per_image, lm_hidden)` embeddings (f32); always runs the encoder.
    pub fn embed_image(&self, img: &RgbImage) -> Result<candle_core::Tensor> {
        let s = self.cfg.image_size as u32;
        let px = self.preprocess.run(img, s, s)?.unsqueeze(0)?;
        let c = self.encoder.config();
        let g = c.grid();
        let x = self.encoder.forward(&px)?;
        let y = self.adapter.forward(&x, (g, g), c.num_registers())?;
        let (_, n, d) = y.dims3()?;
        Ok(y.reshape((n, d))?.to_dtype(DType::F32)?)
    }

    /// Prompt ids and input embeddings for `question` about an image with embeddings
    /// `image: (tokens_per_image, lm_hidden)`.
    pub fn prepare(
        &self,
        question: &str,
        image: &candle_core::Tensor,
    ) -> Result<(Vec<u32>, candle_core::Tensor)> {
        let fmt = self.prompt_format()?;
        let ids = fmt.prompt_ids(question, image.dim(0)?)?;
        let embeds = splice(&self.lm, &ids, fmt.placeholder_id(), Some(image))?;
        Ok((ids, embeds))
    }

    /// Answers a question about an image, streaming the answer to `on_text`.
    pub fn ask(
        &self,
        img: &RgbImage,
        question: &str,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let plan = self.plan(img.width(), img.height(), opts.max_image_tokens)?;
        let t0 = Instant::now();
        let (image, image_from_cache) = self.embed_image_cached(img)?;
        let encode_secs = if image_from_cache {
            0.0
        } else {
            t0.elapsed().as_secs_f64()
        };
        let (ids, embeds) = self.prepare(question, &image)?;
        let generation = afm_lm::generate_from_embeds(
            &self.lm,
            &self.tokenizer,
            &embeds,
            &ids,
            &opts.generate,
            on_text,
        )?;
        Ok(Answer {
            generation,
            plan,
            encode_secs,
            image_from_cache,
            prompt_tokens: ids.len(),
        })
    }

    /// A caption of an image (the export's `caption_prompt`).
    pub fn caption(
        &self,
        img: &RgbImage,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let q = self.cfg.caption_prompt.clone();
        self.ask(img, &q, opts, on_text)
    }

    /// A description of a screenshot: afm-tiny learnt screenshot descriptions as the captions
    /// of its generated screens, so this is [`AfmTiny::caption`] (the export's
    /// `caption_prompt`; one tile, like every image).
    pub fn describe_screen(
        &self,
        img: &RgbImage,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        self.caption(img, opts, on_text)
    }
}

impl<M: LanguageModel> VisionLanguage for AfmTiny<M> {
    fn model_type(&self) -> &str {
        MODEL_TYPE
    }
    fn plan(&self, w: u32, h: u32, max_image_tokens: Option<usize>) -> Result<ImagePlan> {
        AfmTiny::plan(self, w, h, max_image_tokens)
    }
    fn ask(
        &self,
        img: &RgbImage,
        question: &str,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        AfmTiny::ask(self, img, question, opts, on_text)
    }
    fn caption(
        &self,
        img: &RgbImage,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        AfmTiny::caption(self, img, opts, on_text)
    }
    fn describe_screen(
        &self,
        img: &RgbImage,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        AfmTiny::describe_screen(self, img, opts, on_text)
    }
}
