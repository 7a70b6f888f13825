//! Parity with PEFT (`scripts/ref_peft_lora.py`): a seeded tiny random LlamaForCausalLM with a
//! PEFT LoRA adapter (r 4, alpha 8, all seven projections, random non-zero B), PEFT's own
//! `adapter_model.safetensors` imported onto the saved base; logits at every position against
//! the adapted PyTorch model, merged and unmerged, from safetensors and from an f32 GGUF
//! conversion (q/k rows permuted by the converter, and so the q/k B factors by the import).

use afm_lm::lora::checkpoint_sha256;
use afm_lm::random::write_gguf;
use afm_lm::testing::{max_abs_diff, read_f32_file, reference_logits};
use afm_lm::weights::WeightSource;
use afm_lm::{
    DeviceModel, LanguageModel, LmConfig, LmError, LoadOptions, LogitsFor, LoraAdapter, LoraMode,
    LoraTarget,
};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::path::PathBuf;

const VOCAB: usize = 128;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft_lora")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-lora-peft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(m: &DeviceModel, ids: &[u32]) -> Tensor {
    m.forward_tokens(ids, &mut m.new_cache(), &LogitsFor::All)
        .unwrap()
}

#[test]
fn peft_adapter_matches_peft_logits_merged_and_unmerged() {
    let base_dir = fixture().join("base");
    let (ids, want) = reference_logits(&fixture(), VOCAB).unwrap();
    let base_want = Tensor::from_vec(
        read_f32_file(&fixture().join("base_logits.f32")).unwrap(),
        (ids.len(), VOCAB),
        &Device::Cpu,
    )
    .unwrap();
    let sha = checkpoint_sha256(&base_dir).unwrap();
    let ad = LoraAdapter::from_peft(&fixture().join("adapter"), &sha).unwrap();
    assert_eq!(ad.config().rank, 4);
    assert_eq!(ad.config().alpha, 8.0);
    assert_eq!(ad.config().targets, LoraTarget::ALL.to_vec());
    assert_eq!(ad.modules().len(), 2 * 7);

    let base = DeviceModel::load(&base_dir).unwrap();
    let d_base = max_abs_diff(&run(&base, &ids), &base_want).unwrap();
    let effect = max_abs_diff(&base_want, &want).unwrap();
    let mut diffs = Vec::new();
    for mode in [LoraMode::Merged, LoraMode::Unmerged] {
        let mut m = base.clone();
        m.apply_lora(&ad, &sha, mode).unwrap();
        let d = max_abs_diff(&run(&m, &ids), &want).unwrap();
        diffs.push(d);
        println!(
            "PEFT LoRA {mode:?}: max |afm - PEFT| over {} x {VOCAB} logits = {d:e} (base alone \
             {d_base:e}; the adapter moves PEFT's logits by {effect:.4})",
            ids.len()
        );
    }
    assert!(effect > 0.1, "the reference adapter must matter ({effect})");
    assert!(d_base < 1e-4, "{d_base}");
    for d in diffs {
        assert!(d < 1e-4, "{d}");
    }
}

#[test]
fn imported_adapter_saves_as_an_afm_file_bound_to_its_base() {
    let base_dir = fixture().join("base");
    let (ids, want) = reference_logits(&fixture(), VOCAB).unwrap();
    let ad = LoraAdapter::import_peft(&fixture().join("adapter"), &base_dir).unwrap();
    let p = tmp("save").join("adapter.safetensors");
    ad.save(&p).unwrap();
    // afm's own loader refuses PEFT's file (no base hash) but takes the converted one
    let e = LoraAdapter::load(&fixture().join("adapter/adapter_model.safetensors")).unwrap_err();
    assert!(e.to_string().contains("from_peft"), "{e}");
    let m = DeviceModel::load_with(
        &base_dir,
        &LoadOptions {
            lora: Some(p.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let d = max_abs_diff(&run(&m, &ids), &want).unwrap();
    assert!(d < 1e-4, "{d}");
    // the same adapter on another base model is refused with both hashes
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_llama");
    let e = DeviceModel::load_with(
        &other,
        &LoadOptions {
            lora: Some(p),
            ..Default::default()
        },
    )
    .unwrap_err();
    match &e {
        LmError::LoraBaseMismatch {
            adapter_base,
            model_base,
        } => {
            assert_eq!(adapter_base, &checkpoint_sha256(&base_dir).unwrap());
            assert_eq!(model_base, &checkpoint_sha256(&other).unwrap());
        }
        e => panic!("{e}"),
    }
}

#[test]
fn peft_adapter_on_a_gguf_conversion_of_the_base() {
    let base_dir = fixture().join("base");
    let (ids, want) = reference_logits(&fixture(), VOCAB).unwrap();
    let cfg = LmConfig::from_file(&base_dir.join("config.json")).unwrap();
    let tensors =
        match WeightSource::from_safetensors(&[base_dir.join("model.safetensors")]).unwrap() {
            WeightSource::Safetensors { tensors, .. } => tensors,
            _ => unreachable!(),
        };
    let g = tmp("gguf").join("base.gguf");
    write_gguf(&g, &cfg, &tensors, GgmlDType::F32).unwrap();
    // PEFT factors in HF layout onto a GGUF whose q/k rows are permuted: import_peft follows
    let ad = LoraAdapter::import_peft(&fixture().join("adapter"), &g).unwrap();
    let sha = checkpoint_sha256(&g).unwrap();
    let mut m = DeviceModel::load(&g).unwrap();
    m.apply_lora(&ad, &sha, LoraMode::Unmerged).unwrap();
    let d = max_abs_diff(&run(&m, &ids), &want).unwrap();
    println!("PEFT LoRA on the f32 GGUF conversion, unmerged: max |diff| = {d:e}");
    assert!(d < 1e-4, "{d}");
    // without the permutation the q/k updates land on the wrong rows: a test that can fail
    let raw = LoraAdapter::from_peft(&fixture().join("adapter"), &sha).unwrap();
    let mut w = DeviceModel::load(&g).unwrap();
    w.apply_lora(&raw, &sha, LoraMode::Unmerged).unwrap();
    let bad = max_abs_diff(&run(&w, &ids), &want).unwrap();
    assert!(bad > 100.0 * d.max(1e-6), "{bad}");
}

#[test]
fn peft_features_afm_does_not_implement_are_refused_by_name() {
    let src = fixture().join("adapter");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    let sha = checkpoint_sha256(&fixture().join("base")).unwrap();
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("use_dora", serde_json::json!(true), "use_dora"),
        ("use_rslora", serde_json::json!(true), "use_rslora"),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 8}),
            "rank_pattern",
        ),
        ("bias", serde_json::json!("all"), "bias"),
        (
            "target_modules",
            serde_json::json!(["q_proj", "lm_head"]),
            "lm_head",
        ),
    ];
    for (i, (key, value, named)) in cases.into_iter().enumerate() {
        let d = tmp(&format!("refuse-{i}"));
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            d.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut c = cfg.clone();
        c[key] = value;
        std::fs::write(d.join("adapter_config.json"), c.to_string()).unwrap();
        let e = LoraAdapter::from_peft(&d, &sha).unwrap_err();
        assert!(e.to_string().contains(named), "{key}: {e}");
    }
    // a bad hash is refused too
    let e = LoraAdapter::from_peft(&src, "not-a-hash").unwrap_err();
    assert!(e.to_string().contains("sha256"), "{e}");
}
