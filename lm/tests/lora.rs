//! LoRA adapters on random-weight models: merged equals unmerged, a zero-B adapter is the
//! base exactly, unmerged on quantized GGUF bases, the server model, the file round trip and
//! every refusal (other base, shapes, unknown modules, NaN, PEFT files without a base hash).

use afm_lm::lora::{a_name, b_name, checkpoint_sha256, LoraPair};
use afm_lm::random::{random_tensors, write_gguf, write_safetensors};
use afm_lm::server_model::{random_server_tensors, ServerConfig, ServerModel};
use afm_lm::testing::max_abs_diff;
use afm_lm::weights::WeightSource;
use afm_lm::{
    DeviceModel, LanguageModel, LmConfig, LmError, LoadOptions, LogitsFor, LoraAdapter, LoraConfig,
    LoraMode, LoraTarget,
};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg() -> LmConfig {
    LmConfig {
        num_hidden_layers: 3,
        ..afm_lm::testing::tiny_llama()
    }
}

/// A random dense checkpoint on disk (so it has a real hash).
fn dense_dir(name: &str) -> PathBuf {
    let d = tmp(name);
    write_safetensors(&d, &cfg(), &random_tensors(&cfg(), 7).unwrap()).unwrap();
    d
}

fn ids() -> Vec<u32> {
    (0..13u32).map(|i| (i * 37 + 11) % 256).collect()
}

fn logits(m: &impl LanguageModel) -> Tensor {
    m.forward_tokens(&ids(), &mut m.new_cache(), &LogitsFor::All)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn lora_cfg(rank: usize, alpha: f32) -> LoraConfig {
    LoraConfig {
        rank,
        alpha,
        targets: LoraTarget::ALL.to_vec(),
    }
}

#[test]
fn merged_and_unmerged_give_equal_logits_on_a_dense_model() {
    let dir = dense_dir("merge");
    let sha = checkpoint_sha256(&dir).unwrap();
    let base = DeviceModel::load(&dir).unwrap();
    let ad = LoraAdapter::random(&base.lora_sites(), lora_cfg(8, 16.0), &sha, 3, 0.05).unwrap();
    assert_eq!(ad.modules().len(), 3 * 7);
    let (mut merged, mut unmerged) = (base.clone(), base.clone());
    let m = merged.apply_lora(&ad, &sha, LoraMode::Merged).unwrap();
    let u = unmerged.apply_lora(&ad, &sha, LoraMode::Unmerged).unwrap();
    assert_eq!((m.merged, m.unmerged, u.merged, u.unmerged), (21, 0, 0, 21));
    let (lb, lm, lu) = (logits(&base), logits(&merged), logits(&unmerged));
    let d = max_abs_diff(&lm, &lu).unwrap();
    let effect = max_abs_diff(&lb, &lm).unwrap();
    let mag = max_abs(&lm);
    println!(
        "dense: merged vs unmerged max |diff| = {d:e} (logits up to {mag:.2}); adapter moves \
         logits by {effect:.4}"
    );
    assert!(
        effect > 0.05,
        "the adapter must change the logits ({effect})"
    );
    // f32 rounding of two summation orders: a few ulps of the largest logit
    assert!(d <= 1e-6 * mag, "{d}");
    // the same through LoadOptions (Auto merges dense matrices)
    // (not inside the model directory, where it would count as one more weight shard)
    let path = tmp("merge-adapter").join("adapter.safetensors");
    ad.save(&path).unwrap();
    let opts = LoadOptions {
        lora: Some(path),
        ..Default::default()
    };
    let loaded = DeviceModel::load_with(&dir, &opts).unwrap();
    assert_eq!(max_abs_diff(&logits(&loaded), &lm).unwrap(), 0.0);
}

#[test]
fn a_zero_b_adapter_gives_exactly_the_base_logits() {
    let dir = dense_dir("zero");
    let sha = checkpoint_sha256(&dir).unwrap();
    let base = DeviceModel::load(&dir).unwrap();
    let ad = LoraAdapter::random(&base.lora_sites(), LoraConfig::default(), &sha, 3, 0.0).unwrap();
    let lb = logits(&base);
    for mode in [LoraMode::Merged, LoraMode::Unmerged] {
        let mut m = base.clone();
        m.apply_lora(&ad, &sha, mode).unwrap();
        assert_eq!(max_abs_diff(&logits(&m), &lb).unwrap(), 0.0, "{mode:?}");
    }
}

#[test]
fn unmerged_on_quantized_gguf_bases_matches_the_dequantized_base_merged() {
    let dir = tmp("gguf");
    let t = random_tensors(&cfg(), 7).unwrap();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let p = dir.join(format!("m-{dtype:?}.gguf"));
        write_gguf(&p, &cfg(), &t, dtype).unwrap();
        let sha = checkpoint_sha256(&p).unwrap();
        let q = DeviceModel::load(&p).unwrap();
        let deq = DeviceModel::load_with(
            &p,
            &LoadOptions {
                dequantize: true,
                ..Default::default()
            },
        )
        .unwrap();
        let ad = LoraAdapter::random(&q.lora_sites(), lora_cfg(8, 16.0), &sha, 5, 0.05).unwrap();
        // a quantized base cannot be merged into: refused before anything changes
        let mut qm = q.clone();
        let e = qm.apply_lora(&ad, &sha, LoraMode::Merged).unwrap_err();
        assert!(e.to_string().contains("quantized"), "{e}");
        assert_eq!(
            qm.apply_lora(&ad, &sha, LoraMode::Auto).unwrap().unmerged,
            21
        );
        let mut dm = deq.clone();
        dm.apply_lora(&ad, &sha, LoraMode::Merged).unwrap();
        // the kernels' activation rounding is the only difference, with and without LoRA
        let base_gap = max_abs_diff(&logits(&q), &logits(&deq)).unwrap();
        let lora_gap = max_abs_diff(&logits(&qm), &logits(&dm)).unwrap();
        let effect = max_abs_diff(&logits(&q), &logits(&qm)).unwrap();
        println!(
            "{dtype:?}: base kernels vs dequantized {base_gap:e}; with LoRA (unmerged vs \
             merged into dequantized) {lora_gap:e}; adapter effect {effect:.4}"
        );
        assert!(effect > 0.05);
        assert!(lora_gap < 3.0 * base_gap + 1e-4, "{lora_gap} vs {base_gap}");
    }
}

#[test]
fn int8_base_takes_the_adapter_unmerged() {
    let dir = dense_dir("int8");
    let sha = checkpoint_sha256(&dir).unwrap();
    let base = DeviceModel::load(&dir).unwrap();
    let ad = LoraAdapter::random(&base.lora_sites(), lora_cfg(8, 16.0), &sha, 3, 0.05).unwrap();
    let mut merged_then_int8 = base.clone();
    merged_then_int8
        .apply_lora(&ad, &sha, LoraMode::Merged)
        .unwrap();
    merged_then_int8.set_int8(true).unwrap();
    let mut int8_then_lora = base.clone();
    int8_then_lora.set_int8(true).unwrap();
    let done = int8_then_lora
        .apply_lora(&ad, &sha, LoraMode::Auto)
        .unwrap();
    assert_eq!(done.merged, 0);
    let mut f32_lora = base.clone();
    f32_lora.apply_lora(&ad, &sha, LoraMode::Merged).unwrap();
    let d = max_abs_diff(&logits(&int8_then_lora), &logits(&f32_lora)).unwrap();
    let e = max_abs_diff(&logits(&base), &logits(&f32_lora)).unwrap();
    println!("int8 base + unmerged LoRA vs f32 merged: {d:.4} (adapter effect {e:.4})");
    assert!(d < e / 3.0, "{d} vs {e}");
}

#[test]
fn server_model_merged_equals_unmerged_and_zero_b_is_exact() {
    let cfg = ServerConfig::preset("tiny").unwrap();
    let mut cfg = cfg;
    cfg.shared_expert_intermediate_size = 32;
    let t = random_server_tensors(&cfg, 11).unwrap();
    let base = ServerModel::from_source(&WeightSource::from_tensors(t), cfg.clone()).unwrap();
    let sha = "ab".repeat(32);
    let sites = base.lora_sites();
    // per track and layer: q, k, v, o; dense layers gate/up/down; MoE layers 4 experts + shared
    let dense = (0..cfg.num_layers_per_track)
        .filter(|&i| !cfg.is_moe(i))
        .count();
    let moe = cfg.num_layers_per_track - dense;
    assert_eq!(
        sites.len(),
        cfg.num_tracks * (4 * cfg.num_layers_per_track + 3 * dense + 3 * 5 * moe)
    );
    assert!(sites
        .iter()
        .any(|s| s.module == "model.tracks.1.layers.1.mlp.experts.3.down_proj"));
    assert!(sites
        .iter()
        .any(|s| s.module == "model.tracks.0.layers.3.mlp.shared_expert.gate_proj"));
    let ad = LoraAdapter::random(&sites, lora_cfg(4, 8.0), &sha, 2, 0.05).unwrap();
    let (mut m, mut u) = (base.clone(), base.clone());
    m.apply_lora(&ad, &sha, LoraMode::Merged).unwrap();
    u.apply_lora(&ad, &sha, LoraMode::Unmerged).unwrap();
    let d = max_abs_diff(&logits(&m), &logits(&u)).unwrap();
    let effect = max_abs_diff(&logits(&base), &logits(&m)).unwrap();
    let mag = max_abs(&logits(&m));
    println!(
        "server: merged vs unmerged {d:e} (logits up to {mag:.2}); adapter effect {effect:.4}"
    );
    assert!(effect > 0.05);
    assert!(d <= 1e-6 * mag, "{d}");
    let zero = LoraAdapter::random(&sites, lora_cfg(4, 8.0), &sha, 2, 0.0).unwrap();
    let mut z = base.clone();
    z.apply_lora(&zero, &sha, LoraMode::Unmerged).unwrap();
    assert_eq!(max_abs_diff(&logits(&z), &logits(&base)).unwrap(), 0.0);
    // one adapter per model
    let e = m.apply_lora(&ad, &sha, LoraMode::Merged).unwrap_err();
    assert!(e.to_string().contains("already"), "{e}");
}

#[test]
fn file_round_trip_keeps_config_and_factors() {
    let dir = dense_dir("roundtrip");
    let sha = checkpoint_sha256(&dir).unwrap();
    let base = DeviceModel::load(&dir).unwrap();
    let c = LoraConfig {
        rank: 4,
        alpha: 16.0,
        targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down],
    };
    let ad = LoraAdapter::random(&base.lora_sites(), c.clone(), &sha, 9, 0.1).unwrap();
    assert_eq!(ad.modules().len(), 3 * 3);
    assert_eq!(ad.scale(), 4.0);
    let p = dir.join("a.safetensors");
    ad.save(&p).unwrap();
    let back = LoraAdapter::load(&p).unwrap();
    assert_eq!(back.config(), &c);
    assert_eq!(back.base_sha256(), sha);
    for (m, pair) in ad.modules() {
        let q = &back.modules()[m];
        assert_eq!(max_abs_diff(&pair.a, &q.a).unwrap(), 0.0);
        assert_eq!(max_abs_diff(&pair.b, &q.b).unwrap(), 0.0);
    }
    // PEFT's names
    let names = safetensors_names(&p);
    assert!(
        names.contains(&"base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight".into())
    );
    assert!(names.contains(&"base_model.model.model.layers.0.mlp.down_proj.lora_B.weight".into()));
}

fn safetensors_names(p: &Path) -> Vec<String> {
    let b = std::fs::read(p).unwrap();
    candle_core::safetensors::load_buffer(&b, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect()
}

/// Writes `tensors` with afm metadata (rank 4, alpha 8, all targets, `sha`).
fn write_raw(p: &Path, tensors: &HashMap<String, Tensor>, sha: Option<&str>) {
    let mut meta: HashMap<String, String> = [
        ("afm_lora_version", "1"),
        ("rank", "4"),
        ("alpha", "8"),
        ("targets", "q,k,v,o,gate,up,down"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(s) = sha {
        meta.insert("base_sha256".into(), s.into());
    }
    safetensors::serialize_to_file(tensors.iter(), Some(meta), p).unwrap();
}

fn pair(out: usize, inp: usize, r: usize) -> (Tensor, Tensor) {
    (
        Tensor::ones((r, inp), DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones((out, r), DType::F32, &Device::Cpu).unwrap(),
    )
}

#[test]
fn refusals_name_the_hashes_and_the_tensor() {
    let dir = dense_dir("refuse");
    let sha = checkpoint_sha256(&dir).unwrap();
    let base = DeviceModel::load(&dir).unwrap();
    let adir = tmp("refuse-adapters");
    let lb = logits(&base);
    let load_err = |name: &str, t: HashMap<String, Tensor>, s: Option<&str>| -> LmError {
        let p = adir.join(format!("{name}.safetensors"));
        write_raw(&p, &t, s);
        LoraAdapter::load(&p).unwrap_err()
    };
    let q0 = "model.layers.0.self_attn.q_proj";
    let good = |out, inp| {
        let (a, b) = pair(out, inp, 4);
        HashMap::from([(a_name(q0), a), (b_name(q0), b)])
    };

    // another base: typed error naming both hashes, model untouched
    let other = "0".repeat(64);
    let p = adir.join("other.safetensors");
    write_raw(&p, &good(64, 64), Some(&other));
    let ad = LoraAdapter::load(&p).unwrap();
    let mut m = base.clone();
    match m.apply_lora(&ad, &sha, LoraMode::Auto).unwrap_err() {
        e @ LmError::LoraBaseMismatch { .. } => {
            let s = e.to_string();
            assert!(s.contains(&other) && s.contains(&sha), "{s}");
        }
        e => panic!("{e}"),
    }
    assert_eq!(max_abs_diff(&logits(&m), &lb).unwrap(), 0.0);
    // ... and through LoadOptions
    let e = DeviceModel::load_with(
        &dir,
        &LoadOptions {
            lora: Some(p),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, LmError::LoraBaseMismatch { .. }), "{e}");

    // wrong width for this model (out 32 instead of 64): names the B tensor, model untouched
    let p = adir.join("width.safetensors");
    write_raw(&p, &good(32, 64), Some(&sha));
    let ad = LoraAdapter::load(&p).unwrap();
    let mut m = base.clone();
    let e = m.apply_lora(&ad, &sha, LoraMode::Auto).unwrap_err();
    assert!(e.to_string().contains(&b_name(q0)), "{e}");
    assert_eq!(max_abs_diff(&logits(&m), &lb).unwrap(), 0.0);

    // wrong rank in the file: names the A tensor
    let (a, b) = pair(64, 64, 3);
    let e = load_err(
        "rank",
        HashMap::from([(a_name(q0), a), (b_name(q0), b)]),
        Some(&sha),
    );
    assert!(e.to_string().contains(&a_name(q0)), "{e}");

    // unknown layer: names the tensor
    let q9 = "model.layers.9.self_attn.q_proj";
    let (a, b) = pair(64, 64, 4);
    let p = adir.join("layer.safetensors");
    write_raw(
        &p,
        &HashMap::from([(a_name(q9), a), (b_name(q9), b)]),
        Some(&sha),
    );
    let ad = LoraAdapter::load(&p).unwrap();
    let e = base
        .clone()
        .apply_lora(&ad, &sha, LoraMode::Auto)
        .unwrap_err();
    assert!(e.to_string().contains(&a_name(q9)), "{e}");

    // unknown target (the embeddings): names the tensor
    let emb = "model.embed_tokens";
    let (a, b) = pair(256, 64, 4);
    let e = load_err(
        "target",
        HashMap::from([(a_name(emb), a), (b_name(emb), b)]),
        Some(&sha),
    );
    assert!(e.to_string().contains(&a_name(emb)), "{e}");

    // a tensor that is no LoRA factor
    let e = load_err(
        "stray",
        HashMap::from([(
            "model.norm.weight".to_string(),
            Tensor::ones(64, DType::F32, &Device::Cpu).unwrap(),
        )]),
        Some(&sha),
    );
    assert!(e.to_string().contains("model.norm.weight"), "{e}");

    // NaN / Inf: names the tensor
    for (bad, name) in [(f32::NAN, "nan"), (f32::INFINITY, "inf")] {
        let (a, _) = pair(64, 64, 4);
        let mut v = vec![0.5f32; 64 * 4];
        v[17] = bad;
        let b = Tensor::from_vec(v, (64, 4), &Device::Cpu).unwrap();
        let e = load_err(
            name,
            HashMap::from([(a_name(q0), a), (b_name(q0), b)]),
            Some(&sha),
        );
        assert!(
            e.to_string().contains(&b_name(q0)) && e.to_string().contains("NaN"),
            "{e}"
        );
    }

    // a factor without its partner
    let (a, _) = pair(64, 64, 4);
    let e = load_err("half", HashMap::from([(a_name(q0), a)]), Some(&sha));
    assert!(e.to_string().contains(&b_name(q0)), "{e}");

    // no base hash (a PEFT file): refused, pointing at the import
    let e = load_err("peft", good(64, 64), None);
    assert!(e.to_string().contains("from_peft"), "{e}");

    // a target outside the listed ones
    let c = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::V],
    };
    let (a, b) = pair(64, 64, 4);
    let e = LoraAdapter::new(
        c,
        &sha,
        BTreeMap::from([(q0.to_string(), LoraPair { a, b })]),
    )
    .unwrap_err();
    assert!(e.to_string().contains(&a_name(q0)), "{e}");
}

#[test]
fn kv_reuse_layers_have_no_k_v_sites() {
    let c = cfg().with_block_ratio(2, 1).unwrap();
    let m = DeviceModel::from_source(
        &WeightSource::from_tensors(random_tensors(&c, 1).unwrap()),
        c.clone(),
    )
    .unwrap();
    let sites = m.lora_sites();
    assert_eq!(sites.len(), 2 * 7 + 5);
    assert!(!sites
        .iter()
        .any(|s| s.module == "model.layers.2.self_attn.k_proj"));
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF with a rank-32, alpha-16 adapter on all seven
/// projections (the paper's setting), unmerged on the Q4_1 blocks, against the same adapter
/// merged into the dequantized weights. (Speed is `afm bench`'s business, not a test's.)
#[test]
fn smollm2_gguf_takes_an_unmerged_adapter() {
    let Some(p) = afm_lm::testing::smollm2_gguf_or_skip() else {
        return;
    };
    let sha = checkpoint_sha256(&p).unwrap();
    // the hash is the file's own (scripts/fetch_smollm2.sh checks the same value)
    assert_eq!(
        sha,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    let q = DeviceModel::load(&p).unwrap();
    let deq = DeviceModel::load_with(
        &p,
        &LoadOptions {
            dequantize: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ad = LoraAdapter::random(&q.lora_sites(), LoraConfig::default(), &sha, 1, 0.02).unwrap();
    assert_eq!(ad.modules().len(), 30 * 7);
    let mut qm = q.clone();
    assert_eq!(
        qm.apply_lora(&ad, &sha, LoraMode::Auto).unwrap().unmerged,
        210
    );
    let mut dm = deq.clone();
    dm.apply_lora(&ad, &sha, LoraMode::Merged).unwrap();
    let base_gap = max_abs_diff(&logits(&q), &logits(&deq)).unwrap();
    let lora_gap = max_abs_diff(&logits(&qm), &logits(&dm)).unwrap();
    let effect = max_abs_diff(&logits(&q), &logits(&qm)).unwrap();
    println!(
        "SmolLM2 Q4_1: kernels vs dequantized {base_gap:.4}; with LoRA r32 (unmerged vs merged \
         into dequantized) {lora_gap:.4}; adapter effect {effect:.4}"
    );
    assert!(effect > 0.5, "{effect}");
    assert!(lora_gap < 3.0 * base_gap + 1e-3, "{lora_gap} vs {base_gap}");
}

/// A server (PT-MoE) GGUF with Q8_0 experts takes an adapter unmerged, through
/// `LoadOptions`, and matches the same adapter merged into the dequantized weights within the
/// kernels' own rounding.
#[test]
fn server_gguf_q8_0_takes_the_adapter_unmerged() {
    use afm_lm::server_checkpoint::write_server_gguf;
    let cfg = ServerConfig::preset("tiny").unwrap();
    let t = random_server_tensors(&cfg, 12).unwrap();
    let p = tmp("server-gguf").join("s.gguf");
    write_server_gguf(&p, &cfg, &t, GgmlDType::Q8_0, &[]).unwrap();
    let sha = checkpoint_sha256(&p).unwrap();
    let q = ServerModel::load(&p).unwrap();
    let ad = LoraAdapter::random(&q.lora_sites(), lora_cfg(4, 8.0), &sha, 4, 0.05).unwrap();
    let f = tmp("server-gguf-adapter").join("a.safetensors");
    ad.save(&f).unwrap();
    let qm = ServerModel::load_with(
        &p,
        &LoadOptions {
            lora: Some(f.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let dm = ServerModel::load_with(
        &p,
        &LoadOptions {
            dequantize: true,
            lora: Some(f),
            lora_mode: LoraMode::Merged,
            ..Default::default()
        },
    )
    .unwrap();
    let deq = ServerModel::load_with(
        &p,
        &LoadOptions {
            dequantize: true,
            ..Default::default()
        },
    )
    .unwrap();
    let base_gap = max_abs_diff(&logits(&q), &logits(&deq)).unwrap();
    let lora_gap = max_abs_diff(&logits(&qm), &logits(&dm)).unwrap();
    let effect = max_abs_diff(&logits(&q), &logits(&qm)).unwrap();
    println!("server Q8_0: kernels vs dequantized {base_gap:e}; with LoRA {lora_gap:e}; effect {effect:.4}");
    assert!(effect > 0.05);
    assert!(lora_gap < 3.0 * base_gap + 1e-4, "{lora_gap} vs {base_gap}");
}
