//! Copies an `afm-tiny` export (`<run>/afm-tiny` of `afm train adapter`), or a stage run's
//! directory (`afm train perceive`: `vision/`, `heads.safetensors`, `perceive.json`), for
//! shipping or committing, with its weights stored as f16 (half the bytes; the loaders widen
//! every tensor to f32):
//!
//! ```text
//! cargo run --release -p afm-train --example ship_export -- EXPORT_DIR OUT_DIR
//! ```
//!
//! The JSON files present (`config.json`, `vision/config.json`, `perceive.json`) are copied
//! as they are; the weight files present (`adapter.safetensors`, `vision/model.safetensors`,
//! `heads.safetensors`, `lora.safetensors`) are rewritten in f16; at least the encoder must
//! be there. It refuses a tensor that f16 cannot hold
//! (a magnitude above 65504) and prints the largest relative rounding error per file. A file's
//! string metadata is kept as it is (a LoRA adapter's records the base model it belongs to:
//! without it the loader refuses the adapter).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn half(src: &Path, dst: &Path) -> Res<()> {
    let bytes = std::fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("{}: {e}", src.display()))?;
    let meta = header.metadata().clone();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut worst = 0f32;
    let mut bytes = 0usize;
    for (name, t) in &tensors {
        let t32 = t.to_dtype(DType::F32)?;
        let max: f32 = t32.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        if !max.is_finite() || max > 65504.0 {
            return Err(
                format!("{}: {name} has |x| up to {max}, beyond f16", src.display()).into(),
            );
        }
        let h = t32.to_dtype(DType::F16)?;
        let back = h.to_dtype(DType::F32)?;
        let err: f32 = (&back - &t32)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        if max > 0.0 {
            worst = worst.max(err / max);
        }
        bytes += h.elem_count() * 2;
        out.insert(name.clone(), h);
    }
    safetensors::serialize_to_file(&out, meta, dst)
        .map_err(|e| format!("{}: {e}", dst.display()))?;
    println!(
        "{} -> {}: {} tensors, {:.1} MB, largest rounding error {:.1e} of a tensor's max |x|",
        src.display(),
        dst.display(),
        out.len(),
        bytes as f64 / 1e6,
        worst
    );
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: ship_export EXPORT_DIR OUT_DIR";
    let src = std::path::PathBuf::from(args.next().ok_or(usage)?);
    let dst = std::path::PathBuf::from(args.next().ok_or(usage)?);
    std::fs::create_dir_all(dst.join("vision"))?;
    if !src.join("vision/model.safetensors").is_file() {
        return Err(format!("{}: no vision/model.safetensors", src.display()).into());
    }
    for f in ["config.json", "vision/config.json", "perceive.json"] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f))
                .map_err(|e| format!("{}: {e}", src.join(f).display()))?;
        }
    }
    for f in [
        "adapter.safetensors",
        "vision/model.safetensors",
        "heads.safetensors",
        "lora.safetensors",
    ] {
        if src.join(f).is_file() {
            half(&src.join(f), &dst.join(f))?;
        }
    }
    Ok(())
}
