//! Header values that once panicked or exhausted memory are refused by name: a GGUF with
//! `general.alignment = 0` or tensor dims whose product wraps, and configs whose context or
//! widths are absurd (a RoPE table is no longer built for the whole declared context).

use afm_lm::random::{random_tensors, write_gguf};
use afm_lm::server_checkpoint::write_server_safetensors;
use afm_lm::{DeviceModel, LmConfig, ServerConfig, ServerModel};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-hostile-hdr-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg() -> LmConfig {
    serde_json::from_str(
        r#"{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 32}"#,
    )
    .unwrap()
}

fn write_md(path: &std::path::Path, md: &[(&str, gguf_file::Value)], t: &[(&str, &QTensor)]) {
    let mut f = std::fs::File::create(path).unwrap();
    let refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut f, &refs, t).unwrap();
}

#[test]
fn gguf_alignment_zero_or_odd_is_an_error_not_a_division_by_zero() {
    let dir = tmp("align");
    let t = QTensor::quantize(
        &Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    use gguf_file::Value as V;
    for (i, v) in [V::U32(0), V::U8(0), V::I32(0), V::U32(3), V::I16(-8)]
        .into_iter()
        .enumerate()
    {
        let p = dir.join(format!("a{i}.gguf"));
        write_md(
            &p,
            &[
                ("general.architecture", V::String("llama".into())),
                ("general.alignment", v.clone()),
            ],
            &[("token_embd.weight", &t)],
        );
        let e = DeviceModel::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("general.alignment") && e.contains("power of two"),
            "{v:?}: {e}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn gguf_dims_whose_product_wraps_are_refused_naming_the_tensor() {
    let dir = tmp("dims");
    let c = cfg();
    let p = dir.join("m.gguf");
    write_gguf(&p, &c, &random_tensors(&c, 3).unwrap(), GgmlDType::Q8_0).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    // tensor info: name, n_dims (u32), dims (u64 each, ggml order)
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in header")
        + name.len();
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 2);
    // (64, 2^58) rows x cols: 64 * 2^58 = 2^64 wraps to 0
    bytes[at + 12..at + 20].copy_from_slice(&(1u64 << 58).to_le_bytes());
    bytes[at + 4..at + 12].copy_from_slice(&64u64.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = DeviceModel::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("token_embd.weight") && e.contains("overflow"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn qmatrix_sizes_are_checked() {
    use afm_lm::quant::{QKind, QMatrix};
    assert!(QMatrix::new(QKind::Q8_0, 64, 1 << 58, vec![]).is_err());
    assert!(QMatrix::new(QKind::Q4_1, usize::MAX / 2, 64, vec![0; 40]).is_err());
    assert!(QMatrix::new(QKind::Q8_0, 0, 32, vec![]).is_err());
}

#[test]
fn server_config_caps_match_the_device_config() {
    let base = ServerConfig::preset("tiny").unwrap();
    for (field, v) in [
        ("max_position_embeddings", 1u64 << 40),
        ("max_position_embeddings", 1 << 26),
        ("hidden_size", 1 << 40),
        ("vocab_size", 1 << 40),
        ("num_experts", 1 << 30),
        ("num_tracks", 1 << 30),
    ] {
        let mut j = serde_json::to_value(&base).unwrap();
        j[field] = v.into();
        let e = ServerConfig::from_json(j).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains("maximum"), "{field}: {e}");
        let mut j = serde_json::to_value(cfg()).unwrap();
        if j.get(field).is_some() {
            j[field] = v.into();
            let e = LmConfig::from_json(j).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}

#[test]
fn a_million_token_context_loads_fast_and_small() {
    // the largest accepted context: the RoPE table is built only for its first positions
    let mut c = ServerConfig::preset("tiny").unwrap();
    c.max_position_embeddings = 1 << 20;
    let dir = tmp("ctx");
    let t = afm_lm::server_model::random_server_tensors(&c, 5).unwrap();
    write_server_safetensors(&dir, &c, &t).unwrap();
    let t0 = std::time::Instant::now();
    let ck = afm_lm::ServerCheckpoint::load(&dir);
    // no tokenizer here: the model alone
    drop(ck);
    let src = afm_lm::weights::WeightSource::from_tensors(t);
    let m = ServerModel::from_source(&src, c).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
    drop(m);
    let mut d = cfg();
    d.max_position_embeddings = 1 << 20;
    let t0 = std::time::Instant::now();
    let src = afm_lm::weights::WeightSource::from_tensors(random_tensors(&d, 1).unwrap());
    DeviceModel::from_source(&src, d).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
    std::fs::remove_dir_all(dir).ok();
}
