//! The text-line reader against PyTorch: `scripts/ref_torch_reader.py` builds the same network
//! from torch parts (pixel_unshuffle, Conv2d, max_pool2d, Linear, LayerNorm, tanh-GELU) with
//! seeded random weights and writes its logits for a random input; afm's reader must give
//! the same logits from the same weights.

use afm_vision::reader::{TextReader, CLASSES};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/torch_reader")
}

fn f32s(name: &str) -> Vec<f32> {
    let b = std::fs::read(fixture().join(name)).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn reader_logits_equal_pytorch() {
    let reader = TextReader::from_dir(&fixture()).unwrap();
    let x = Tensor::from_vec(f32s("input.f32"), (2, 1, 16, 40), &Device::Cpu).unwrap();
    let got: Vec<f32> = reader
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = f32s("logits.f32");
    assert_eq!(got.len(), 2 * 10 * CLASSES);
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "max |diff| {worst} (logits up to {scale})"
    );
}

/// Weights that are not finite are refused when the reader loads, naming the tensor.
#[test]
fn nan_weights_are_refused() {
    let dir = std::env::temp_dir().join(format!("afm-reader-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    let w = t.get("reader.head.bias").unwrap();
    let mut v: Vec<f32> = w.to_vec1().unwrap();
    v[3] = f32::NAN;
    t.insert(
        "reader.head.bias".into(),
        Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = TextReader::from_dir(&dir)
        .err()
        .expect("NaN weights load")
        .to_string();
    assert!(e.contains("reader.head.bias"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
