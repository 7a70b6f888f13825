//! Helpers for parity checks against reference outputs (used by the tests of every afm
//! crate, and useful to anyone comparing afm with another implementation).

use crate::error::{LmError, Result};
use candle_core::Tensor;
use std::path::Path;

/// A tiny plain-llama configuration for tests and examples (random weights from
/// [`crate::random::random_tensors`]): vocabulary 256, width 64, MLP 128, 2 layers, 4 query
/// heads over 2 K/V heads, 64 positions, tied embeddings; change fields with struct-update
/// syntax (`LmConfig { num_hidden_layers: 3, ..tiny_llama() }`).
pub fn tiny_llama() -> crate::LmConfig {
    crate::LmConfig {
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        num_kv_reuse_layers: 0,
        qk_norm: false,
        rope_interleaved: false,
        kv_quant: false,
    }
}

/// The largest absolute elementwise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        return Err(LmError::Invalid(format!(
            "shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let d = (a.to_dtype(candle_core::DType::F32)? - b.to_dtype(candle_core::DType::F32)?)?;
    Ok(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A file of little-endian f32 values (the fixtures the reference scripts write).
pub fn read_f32_file(path: &Path) -> Result<Vec<f32>> {
    let b = std::fs::read(path).map_err(|source| LmError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if b.len() % 4 != 0 {
        return Err(LmError::BadFile {
            path: path.to_path_buf(),
            format: "f32 array",
            reason: format!("{} bytes is not a whole number of f32 values", b.len()),
        });
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A reference script's fixture: the token ids under `"ids"` in `dir/input.json` and the
/// reference logits `(ids, vocab)` in `dir/logits.f32`.
pub fn reference_logits(dir: &Path, vocab: usize) -> Result<(Vec<u32>, Tensor)> {
    let p = dir.join("input.json");
    let text = std::fs::read_to_string(&p).map_err(|source| LmError::Io {
        path: p.clone(),
        source,
    })?;
    let bad = |reason: String| LmError::BadFile {
        path: p.clone(),
        format: "input.json",
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let ids = v["ids"]
        .as_array()
        .ok_or_else(|| bad("no `ids` list".into()))?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| bad("`ids` holds a non-integer".into()))?;
    let logits = read_f32_file(&dir.join("logits.f32"))?;
    if logits.len() != ids.len() * vocab {
        return Err(LmError::Invalid(format!(
            "{}: {} values, expected {} ids x {vocab}",
            dir.join("logits.f32").display(),
            logits.len(),
            ids.len()
        )));
    }
    let n = ids.len();
    Ok((
        ids,
        Tensor::from_vec(logits, (n, vocab), &candle_core::Device::Cpu)?,
    ))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (`AFM_SMOLLM2_GGUF`, else
/// `models/SmolLM2-135M-Instruct.Q4_1.gguf` of the repository), or `None` after printing
/// why the test is skipped. With `AFM_REQUIRE_REAL_WEIGHTS=1` (CI) a missing file panics
/// instead, so a real-weights test never passes silently.
pub fn smollm2_gguf_or_skip() -> Option<std::path::PathBuf> {
    let p = std::env::var_os("AFM_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        return Some(p);
    }
    skip_missing(&format!(
        "real SmolLM2 weights not found at {}; run `bash scripts/fetch_smollm2.sh` to fetch them",
        p.display()
    ))
}

/// Whether real-weights tests must fail rather than skip when their files are missing
/// (`AFM_REQUIRE_REAL_WEIGHTS=1`, which `.ci/run` sets after fetching them).
pub fn real_weights_required() -> bool {
    std::env::var("AFM_REQUIRE_REAL_WEIGHTS").is_ok_and(|v| v == "1")
}

/// The skip of a real-weights or real-data test whose files are missing: prints
/// `SKIPPED: {why}` and gives `None`, or panics with it under [`real_weights_required`].
pub fn skip_missing<T>(why: &str) -> Option<T> {
    let msg = format!("SKIPPED: {why}");
    if real_weights_required() {
        panic!("{msg} (AFM_REQUIRE_REAL_WEIGHTS=1)");
    }
    eprintln!("{msg}");
    None
}
