//! The paper's vision-language adapter against an independent PyTorch build of the same
//! layers (`scripts/ref_torch_afm_adapter.py`: transformers' SiglipEncoderLayer, nn.Linear,
//! nn.Conv2d, nn.AdaptiveAvgPool2d), on a 7x7 grid pooled unevenly to 3x3 with a register.

use afm_fusion::afm_adapter::adaptive_pool_matrix;
use afm_fusion::{Adapter, AfmAdapter, AfmAdapterConfig};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/torch_afm_adapter")
}

fn read_f32(name: &str) -> Vec<f32> {
    afm_lm::testing::read_f32_file(&dir().join(name)).unwrap()
}

fn load() -> (AfmAdapter, serde_json::Value) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    let cfg: AfmAdapterConfig = serde_json::from_value(meta["adapter"].clone()).unwrap();
    let t =
        candle_core::safetensors::load(dir().join("weights.safetensors"), &Device::Cpu).unwrap();
    (AfmAdapter::load(t, cfg).unwrap(), meta)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    afm_lm::testing::max_abs_diff(a, b).unwrap()
}

#[test]
fn afm_adapter_matches_pytorch_layer_linear_conv_and_adaptive_pool() {
    let (mut a, meta) = load();
    let x = Tensor::from_vec(read_f32("input.f32"), (2, 50, 32), &Device::Cpu).unwrap();
    let want = Tensor::from_vec(read_f32("output.f32"), (2, 9, 48), &Device::Cpu).unwrap();
    assert_eq!(meta["registers"], 1);
    assert_eq!(a.tokens_per_tile((7, 7)).unwrap(), 9);
    let got = a.forward(&x, (7, 7), 1).unwrap();
    let d = max_diff(&got, &want);
    println!("AFM adapter (7x7 grid + register -> 3x3 tokens) vs PyTorch: max |diff| = {d:e}");
    assert!(d < 1e-4, "{d}");
    a.set_fast_kernels(false);
    let d2 = max_diff(&a.forward(&x, (7, 7), 1).unwrap(), &want);
    assert!(d2 < 1e-4, "candle-op path: {d2}");
}

#[test]
fn afm_adapter_output_norm_matches_pytorch_rmsnorm() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    let mut cfg: AfmAdapterConfig = serde_json::from_value(meta["adapter"].clone()).unwrap();
    cfg.output_norm_eps = meta["output_norm_eps"].as_f64();
    assert!(cfg.output_norm_eps.is_some());
    let t =
        candle_core::safetensors::load(dir().join("weights.safetensors"), &Device::Cpu).unwrap();
    let mut a = AfmAdapter::load(t.clone(), cfg.clone()).unwrap();
    let x = Tensor::from_vec(read_f32("input.f32"), (2, 50, 32), &Device::Cpu).unwrap();
    let want = Tensor::from_vec(read_f32("output_out_norm.f32"), (2, 9, 48), &Device::Cpu).unwrap();
    let d = max_diff(&a.forward(&x, (7, 7), 1).unwrap(), &want);
    println!("AFM adapter + output RMSNorm vs PyTorch: max |diff| = {d:e}");
    assert!(d < 1e-4, "{d}");
    a.set_fast_kernels(false);
    let d2 = max_diff(&a.forward(&x, (7, 7), 1).unwrap(), &want);
    assert!(d2 < 1e-4, "candle-op path: {d2}");
    // without the output norm the result differs (the test above), and a missing gain or a
    // bad epsilon is an error naming it
    let mut no_gain = t.clone();
    no_gain.remove("adapter.out_norm.weight");
    let e = AfmAdapter::load(no_gain, cfg.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("out_norm.weight"), "{e}");
    let bad = AfmAdapterConfig {
        output_norm_eps: Some(-1.0),
        ..cfg
    };
    let e = AfmAdapter::load(t, bad).err().unwrap().to_string();
    assert!(e.contains("output_norm_eps"), "{e}");
}

#[test]
fn adaptive_pool_bins_match_pytorch_rule_and_average() {
    // 42x42 -> 12x12 (the paper's 672 px tile): every row of the matrix sums to 1 and
    // cell 0 averages rows/cols 0..4 (ceil(42/12) = 4)
    let m = adaptive_pool_matrix(42, 42, 12, 12);
    for r in m.chunks_exact(42 * 42) {
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let first: Vec<usize> = (0..42 * 42).filter(|&i| m[i] > 0.0).collect();
    assert_eq!(first.len(), 16);
    assert_eq!(*first.last().unwrap(), 3 * 42 + 3);
}

#[test]
fn wrong_inputs_are_errors() {
    let (a, _) = load();
    let x = Tensor::zeros((1, 50, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(a.forward(&x, (6, 8), 1).is_err());
    assert!(a.tokens_per_tile((2, 2)).is_err());
    let mut t =
        candle_core::safetensors::load(dir().join("weights.safetensors"), &Device::Cpu).unwrap();
    t.remove("adapter.conv.bias");
    let cfg = a.config().clone();
    let e = AfmAdapter::load(t, cfg).err().unwrap().to_string();
    assert!(e.contains("adapter.conv.bias"), "{e}");
}
