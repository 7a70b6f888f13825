//! Fixture helpers shared by the fusion crate's integration tests.

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The tiny random SmolVLM checkpoint and its transformers fixtures
/// (`scripts/ref_hf_idefics3.py`).
pub fn tiny_idefics3() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_idefics3")
}

/// A fixture tensor described in `ref.json` as `{"file": ..., "shape": [...]}` (raw
/// little-endian f32), read from `d`.
pub fn tensor(d: &Path, spec: &Value) -> Tensor {
    let shape: Vec<usize> = spec["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let v = afm_lm::testing::read_f32_file(&d.join(spec["file"].as_str().unwrap())).unwrap();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
