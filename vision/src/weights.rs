//! Vision-tower weights from safetensors, found under whatever prefix the checkpoint uses
//! (`vision_model.` for SiglipVisionModel, `model.vision_model.` for Idefics3/SmolVLM).

use crate::error::{Result, VisionError};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub struct VisionWeights {
    tensors: HashMap<String, Tensor>,
    prefix: String,
}

impl VisionWeights {
    /// Reads safetensors files; the prefix is the part before `embeddings.patch_embedding.weight`.
    pub fn from_files(paths: &[&Path]) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| VisionError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
                VisionError::BadFile {
                    path: path.to_path_buf(),
                    format: "safetensors",
                    reason: e.to_string(),
                }
            })?;
            tensors.extend(t);
        }
        Self::from_tensors(tensors)
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Result<Self> {
        const KEY: &str = "embeddings.patch_embedding.weight";
        let prefix = tensors
            .keys()
            .filter(|k| k.ends_with(KEY))
            .min_by_key(|k| k.len())
            .map(|k| k[..k.len() - KEY.len()].to_string())
            .ok_or_else(|| VisionError::MissingTensor {
                name: format!("*{KEY}"),
            })?;
        Ok(Self { tensors, prefix })
    }

    /// Tensors under an explicit prefix (adapters, or towers saved without embeddings).
    pub fn with_prefix(tensors: HashMap<String, Tensor>, prefix: impl Into<String>) -> Self {
        Self {
            tensors,
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&format!("{}{name}", self.prefix))
    }

    /// The tensor `{prefix}{name}` as f32, shape-checked.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .tensors
            .get(&full)
            .ok_or_else(|| VisionError::MissingTensor { name: full.clone() })?;
        if t.dims() != shape {
            return Err(VisionError::ShapeMismatch {
                name: full,
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        afm_lm::weights::float_weight(t).map_err(|reason| VisionError::BadFile {
            path: full.clone().into(),
            format: "tensor",
            reason,
        })
    }
}
