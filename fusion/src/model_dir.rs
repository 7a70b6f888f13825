//! One loader for every kind of model directory: [`ModelDir`] reads `config.json`, tells an
//! afm-tiny export (`model_type` `"afm-tiny"`) from a SmolVLM / Idefics3 checkpoint
//! (anything else), and gives the image processor (configs only: plans without weights),
//! the external language model the directory needs, if any, and the loaded [`Vlm`].

use crate::afm_tiny::{self, AfmTinyConfig, LmInfo};
use crate::error::{FusionError, Result};
use crate::image_processor::Processor;
use crate::processor::Idefics3Processor;
use crate::vlm::Vlm;
use afm_lm::DeviceModel;
use std::path::{Path, PathBuf};

/// File name of the LoRA adapter inside an afm-tiny export (on its language model; made by
/// stage 2 when it trains one, bound to the GGUF's sha256).
pub const EXPORT_LORA_FILE: &str = "lora.safetensors";

#[derive(Debug, Clone)]
enum Kind {
    Idefics3,
    AfmTiny(Box<AfmTinyConfig>),
}

/// A model directory, its kind known from `config.json` (module docs).
#[derive(Debug, Clone)]
pub struct ModelDir {
    path: PathBuf,
    kind: Kind,
}

impl ModelDir {
    /// Reads `dir/config.json`. An afm-tiny export's config is read and checked now; a
    /// directory whose config is absent, unreadable or of another type is taken for a
    /// SmolVLM / Idefics3 checkpoint, whose loader names what is missing.
    pub fn open(dir: &Path) -> Result<Self> {
        let kind = match afm_tiny::is_afm_tiny(dir) {
            Ok(true) => Kind::AfmTiny(Box::new(AfmTinyConfig::from_file(
                &dir.join("config.json"),
            )?)),
            _ => Kind::Idefics3,
        };
        Ok(Self {
            path: dir.to_path_buf(),
            kind,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `"afm-tiny"` or `"idefics3"` (what [`Vlm::model_type`] will say).
    pub fn model_type(&self) -> &str {
        match self.kind {
            Kind::Idefics3 => "idefics3",
            Kind::AfmTiny(_) => afm_tiny::MODEL_TYPE,
        }
    }

    /// The image processor, from the configs alone (no weights read).
    pub fn image_processor(&self) -> Result<Processor> {
        Ok(match &self.kind {
            Kind::Idefics3 => {
                Processor::new(Box::new(Idefics3Processor::for_checkpoint(&self.path)?.1))
            }
            Kind::AfmTiny(cfg) => Processor::new(Box::new(cfg.processor()?)),
        })
    }

    /// The language model the directory does not carry and must be given to [`Self::load`]
    /// (an afm-tiny export's GGUF); `None`: it carries its own.
    pub fn external_lm(&self) -> Option<&LmInfo> {
        match &self.kind {
            Kind::Idefics3 => None,
            Kind::AfmTiny(cfg) => Some(&cfg.lm),
        }
    }

    /// Where the external language model is looked for beside the directory
    /// ([`afm_tiny::lm_candidates`]); empty when it carries its own.
    pub fn lm_candidates(&self) -> Vec<PathBuf> {
        match &self.kind {
            Kind::Idefics3 => Vec::new(),
            Kind::AfmTiny(cfg) => afm_tiny::lm_candidates(&self.path, cfg),
        }
    }

    /// Loads the pipeline. `lm` is the external language model ([`Self::external_lm`]):
    /// required when the directory needs one, refused when it carries its own.
    pub fn load(&self, lm: Option<&Path>) -> Result<Vlm<DeviceModel>> {
        self.load_with_lora(lm, None)
    }

    /// The LoRA adapter an afm-tiny export carries (`lora.safetensors` beside its
    /// `config.json`), if any.
    pub fn own_lora(&self) -> Option<PathBuf> {
        match &self.kind {
            Kind::AfmTiny(_) => Some(self.path.join(EXPORT_LORA_FILE)).filter(|p| p.is_file()),
            Kind::Idefics3 => None,
        }
    }

    /// [`Self::load`], then a LoRA adapter on the language model: the export's own
    /// ([`Self::own_lora`]) or `lora` (an afm LoRA file bound to this model's language-model
    /// checkpoint: the afm-tiny export's GGUF, or a SmolVLM directory's safetensors). One
    /// adapter per model: a `lora` on an export that carries its own is refused.
    pub fn load_with_lora(
        &self,
        lm: Option<&Path>,
        lora: Option<&Path>,
    ) -> Result<Vlm<DeviceModel>> {
        let own = self.own_lora();
        if let (Some(o), Some(l)) = (&own, lora) {
            return Err(FusionError::Invalid(format!(
                "{} carries its own LoRA adapter ({}); a second one ({}) cannot be applied on top",
                self.path.display(),
                o.display(),
                l.display()
            )));
        }
        let mut vlm = self.load_base(lm)?;
        if let Some(f) = own.as_deref().or(lora) {
            let adapter = afm_lm::lora::LoraAdapter::load(f)?;
            let base = match &self.kind {
                Kind::AfmTiny(cfg) => cfg.lm.sha256.clone(),
                Kind::Idefics3 => afm_lm::lora::checkpoint_sha256(&self.path)?,
            };
            vlm.apply_lora(&adapter, &base).map_err(|e| match e {
                FusionError::Lm(e) => FusionError::Invalid(format!("{}: {e}", f.display())),
                e => e,
            })?;
        }
        Ok(vlm)
    }

    fn load_base(&self, lm: Option<&Path>) -> Result<Vlm<DeviceModel>> {
        match (&self.kind, lm) {
            (Kind::Idefics3, None) => Vlm::load_idefics3(&self.path),
            (Kind::Idefics3, Some(_)) => Err(FusionError::Invalid(format!(
                "{} carries its own language model; an external one applies to afm-tiny exports only",
                self.path.display()
            ))),
            (Kind::AfmTiny(_), Some(lm)) => Vlm::load_afm_tiny(&self.path, lm),
            (Kind::AfmTiny(cfg), None) => Err(FusionError::Invalid(format!(
                "the afm-tiny export {} needs its language model `{}` (sha256 {})",
                self.path.display(),
                cfg.lm.file,
                cfg.lm.sha256
            ))),
        }
    }
}
