//! Loading: every supported GGUF type loads and agrees with f32; malformed, truncated, lying
//! and mismatched files give errors that name the problem, never a panic.

use afm_lm::random::{random_tensors, write_gguf, write_safetensors};
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, LanguageModel, LmConfig, LogitsFor};
use candle_core::quantized::GgmlDType;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-loading-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// hidden 256 so every K-quant (block 256) applies.
fn cfg() -> LmConfig {
    serde_json::from_str(
        r#"{"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": true, "rope_theta": 10000.0}"#,
    )
    .unwrap()
}

fn err_of<T: std::fmt::Debug>(r: afm_lm::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn every_gguf_type_loads_and_tracks_f32() {
    let c = cfg();
    let t = random_tensors(&c, 9).unwrap();
    let f32m = DeviceModel::from_source(&WeightSource::from_tensors(t.clone()), c.clone()).unwrap();
    let ids: Vec<u32> = (0..10).map(|i| i * 25).collect();
    let want = f32m
        .forward_tokens(&ids, &mut f32m.new_cache(), &LogitsFor::All)
        .unwrap();
    let scale: f32 = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let dir = tmp("types");
    for (dt, rel_tol) in [
        (GgmlDType::F32, 1e-5f32),
        (GgmlDType::F16, 5e-4),
        (GgmlDType::BF16, 3e-3),
        (GgmlDType::Q8_0, 8e-3),
        (GgmlDType::Q6K, 2e-2),
        (GgmlDType::Q5_0, 4e-2),
        (GgmlDType::Q5_1, 4e-2),
        (GgmlDType::Q5K, 4e-2),
        (GgmlDType::Q4_0, 8e-2),
        (GgmlDType::Q4_1, 8e-2),
        (GgmlDType::Q4K, 8e-2),
        (GgmlDType::Q3K, 0.15),
        (GgmlDType::Q2K, 0.25),
    ] {
        let p = dir.join(format!("{dt:?}.gguf"));
        // c.rope_interleaved is false: the writer permutes Q/K as llama.cpp's converter does
        write_gguf(&p, &c, &t, dt).unwrap();
        let m = DeviceModel::load(&p).unwrap();
        let got = m
            .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
            .unwrap();
        let d: f32 = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        println!(
            "{dt:?}: max |diff| vs f32 = {d:.4} ({:.2}% of max |logit| {scale:.2})",
            100.0 * d / scale
        );
        assert!(d / scale < rel_tol, "{dt:?}: {d}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn truncated_gguf_names_the_tensor() {
    let c = cfg();
    let dir = tmp("trunc");
    let p = dir.join("m.gguf");
    write_gguf(&p, &c, &random_tensors(&c, 1).unwrap(), GgmlDType::Q8_0).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // cut inside the tensor data
    std::fs::write(&p, &bytes[..bytes.len() - 5000]).unwrap();
    let e = err_of(DeviceModel::load(&p));
    assert!(e.contains("tensor `") && e.contains("truncated"), "{e}");
    // cut inside the header
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = err_of(DeviceModel::load(&p));
    assert!(e.contains("not a valid GGUF"), "{e}");
    // not a GGUF at all
    std::fs::write(&p, b"hello, this is text").unwrap();
    let e = err_of(DeviceModel::load(&p));
    assert!(e.contains("not a valid GGUF"), "{e}");
    std::fs::write(&p, b"").unwrap();
    assert!(DeviceModel::load(&p).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let c = cfg();
    let mut t = random_tensors(&c, 2).unwrap();
    t.remove("model.layers.1.mlp.up_proj.weight");
    let e = err_of(DeviceModel::from_source(
        &WeightSource::from_tensors(t),
        c.clone(),
    ));
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );

    let mut t = random_tensors(&c, 2).unwrap();
    let bad =
        candle_core::Tensor::zeros((3, 256), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    t.insert("model.layers.0.self_attn.k_proj.weight".into(), bad);
    let e = err_of(DeviceModel::from_source(
        &WeightSource::from_tensors(t),
        c.clone(),
    ));
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("[3, 256]")
            && e.contains("[128, 256]"),
        "{e}"
    );

    // GGUF names are reported in GGUF terms
    let dir = tmp("missing");
    let mut t = random_tensors(&c, 2).unwrap();
    t.remove("model.norm.weight");
    let p = dir.join("m.gguf");
    write_gguf(&p, &c, &t, GgmlDType::F32).unwrap();
    let e = err_of(DeviceModel::load(&p));
    assert!(e.contains("output_norm.weight"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn nan_weights_and_kv_reuse_mismatch_are_refused() {
    let c = cfg();
    let mut t = random_tensors(&c, 3).unwrap();
    let nan = candle_core::Tensor::full(f32::NAN, 256, &candle_core::Device::Cpu).unwrap();
    t.insert("model.layers.0.input_layernorm.weight".into(), nan);
    let e = err_of(DeviceModel::from_source(
        &WeightSource::from_tensors(t),
        c.clone(),
    ));
    assert!(e.contains("input_layernorm") && e.contains("NaN"), "{e}");
    // config says layer 1 reuses K/V, but the weights have K/V for it
    let t = random_tensors(&c, 3).unwrap();
    let shared = LmConfig {
        num_kv_reuse_layers: 1,
        ..c
    };
    let e = err_of(DeviceModel::from_source(
        &WeightSource::from_tensors(t),
        shared,
    ));
    assert!(
        e.contains("num_kv_reuse_layers") && e.contains("model.layers.1.self_attn.k_proj.weight"),
        "{e}"
    );
}

#[test]
fn safetensors_dir_round_trips_and_bad_files_are_named() {
    let c = cfg();
    let dir = tmp("st");
    let t = random_tensors(&c, 4).unwrap();
    write_safetensors(&dir, &c, &t).unwrap();
    let m = DeviceModel::load(&dir).unwrap();
    let m0 = DeviceModel::from_source(&WeightSource::from_tensors(t), c.clone()).unwrap();
    let ids = [1u32, 2, 3];
    let a = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
        .unwrap();
    let b = m0
        .forward_tokens(&ids, &mut m0.new_cache(), &LogitsFor::All)
        .unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());

    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(DeviceModel::load(&dir));
    assert!(
        e.contains("model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
    // a header that lies about its length
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&st, &lying).unwrap();
    assert!(err_of(DeviceModel::load(&dir)).contains("model.safetensors"));
    std::fs::write(&st, &bytes).unwrap();

    std::fs::write(dir.join("config.json"), r#"{"vocab_size": 256}"#).unwrap();
    let e = err_of(DeviceModel::load(&dir));
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 3}"#,
    )
    .unwrap();
    let e = err_of(DeviceModel::load(&dir));
    assert!(e.contains("hidden_size") || e.contains("head_dim"), "{e}");
    std::fs::remove_dir_all(dir).ok();

    let e = err_of(DeviceModel::load(std::path::Path::new(
        "/nonexistent/model.gguf",
    )));
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn f16_and_bf16_safetensors_load_as_f32() {
    let c = cfg();
    let t = random_tensors(&c, 5).unwrap();
    let ids = [3u32, 1, 4, 1, 5];
    let m0 = DeviceModel::from_source(&WeightSource::from_tensors(t.clone()), c.clone()).unwrap();
    let want = m0
        .forward_tokens(&ids, &mut m0.new_cache(), &LogitsFor::All)
        .unwrap();
    for dt in [candle_core::DType::F16, candle_core::DType::BF16] {
        let dir = tmp(&format!("{dt:?}"));
        let half: std::collections::HashMap<_, _> = t
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dt).unwrap()))
            .collect();
        write_safetensors(&dir, &c, &half).unwrap();
        let m = DeviceModel::load(&dir).unwrap();
        let got = m
            .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
            .unwrap();
        let scale: f32 = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        let d: f32 = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        println!(
            "{dt:?} safetensors: max |diff| vs f32 = {d:.4} ({:.3}% of max |logit|)",
            100.0 * d / scale
        );
        assert!(
            d / scale
                < if dt == candle_core::DType::F16 {
                    5e-4
                } else {
                    3e-3
                },
            "{dt:?}: {d}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
