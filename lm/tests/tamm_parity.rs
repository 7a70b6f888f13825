//! Parity with Apple's own AFM code: a seeded random `tamm` 0.2.0 `AFMTextV7` (8 layers, 5:3
//! KV-cache sharing, GQA 4:2, QK-norm, interleaved RoPE with theta 500000, 8-bit KV fake
//! quantisation, tied embeddings), written by `scripts/ref_tamm_afm.py` to
//! `tests/fixtures/tamm_afm_tiny` under our tensor names.

use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, LanguageModel, LmConfig, LogitsFor};
use candle_core::{Device, Tensor};
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tamm_afm_tiny")
}

fn input() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("input.json")).unwrap()).unwrap()
}

/// Token ids and tamm's logits `(t, vocab)`.
fn reference(vocab: usize) -> (Vec<u32>, Tensor) {
    afm_lm::testing::reference_logits(&fixture(), vocab).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    afm_lm::testing::max_abs_diff(a, b).unwrap()
}

fn model() -> DeviceModel {
    let m = DeviceModel::load(&fixture()).unwrap();
    let c = m.config();
    assert!(c.qk_norm && c.kv_quant && c.rope_interleaved && c.tie_word_embeddings);
    assert_eq!((c.num_hidden_layers, c.num_kv_reuse_layers), (8, 3));
    m
}

#[test]
fn all_positions_match_tamm() {
    let mut m = model();
    let (ids, want) = reference(m.info().vocab_size);
    for shortcut in [true, false] {
        m.set_prefill_shortcut(shortcut);
        let got = m
            .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
            .unwrap();
        let d = max_diff(&got, &want);
        println!(
            "tamm AFMTextV7, all {} positions x {} logits (prefill shortcut {shortcut}): \
             max |diff| = {d:e}",
            ids.len(),
            m.info().vocab_size
        );
        assert!(d < TOL, "shortcut {shortcut}: {d}");
    }
}

#[test]
fn prefill_shortcut_last_and_selected_rows_match_tamm() {
    let m = model();
    assert!(m.prefill_shortcut());
    let (ids, want) = reference(m.info().vocab_size);
    let t = ids.len();
    let got = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Last)
        .unwrap();
    let d = max_diff(&got, &want.narrow(0, t - 1, 1).unwrap());
    println!("tamm AFMTextV7, prefill shortcut, last position: max |diff| = {d:e}");
    assert!(d < TOL, "{d}");

    let rows = vec![0, 4, 7, t - 1];
    let got = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Rows(rows.clone()))
        .unwrap();
    let idx = Tensor::from_vec(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        rows.len(),
        &Device::Cpu,
    )
    .unwrap();
    let d = max_diff(&got, &want.index_select(&idx, 0).unwrap());
    println!("tamm AFMTextV7, prefill shortcut, rows {rows:?}: max |diff| = {d:e}");
    assert!(d < TOL, "{d}");
}

#[test]
fn incremental_decoding_matches_tamm() {
    let m = model();
    let (ids, want) = reference(m.info().vocab_size);
    // token by token
    let mut cache = m.new_cache();
    let mut worst = 0f32;
    for (i, &id) in ids.iter().enumerate() {
        let got = m
            .forward_tokens(&[id], &mut cache, &LogitsFor::Last)
            .unwrap();
        let d = max_diff(&got, &want.narrow(0, i, 1).unwrap());
        assert!(d < TOL, "position {i}: {d}");
        worst = worst.max(d);
    }
    assert_eq!(cache.seq_len(), ids.len());
    // the cache holds K/V for block 1 only
    assert_eq!(cache.kv_layers(), 5);
    println!("tamm AFMTextV7, token-by-token decoding: max |diff| = {worst:e}");

    // a 5-token prefill (block 2 only on its last row), then one token at a time: block 2
    // must read the K/V of positions where it never ran
    let mut cache = m.new_cache();
    let got = m
        .forward_tokens(&ids[..5], &mut cache, &LogitsFor::Last)
        .unwrap();
    let mut worst = max_diff(&got, &want.narrow(0, 4, 1).unwrap());
    for (i, &id) in ids.iter().enumerate().skip(5) {
        let got = m
            .forward_tokens(&[id], &mut cache, &LogitsFor::Last)
            .unwrap();
        worst = worst.max(max_diff(&got, &want.narrow(0, i, 1).unwrap()));
    }
    println!("tamm AFMTextV7, prefill 5 then decode: max |diff| = {worst:e}");
    assert!(worst < TOL, "{worst}");
}

/// The fixture is sensitive to the KV fake quantisation: without it our logits are far from
/// tamm's (so the 1e-4 agreement above checks the rounding, not just the float path).
#[test]
fn kv_quantisation_is_visible_in_the_fixture() {
    let mut cfg = LmConfig::from_file(&fixture().join("config.json")).unwrap();
    cfg.kv_quant = false;
    let src = WeightSource::from_safetensors(&[fixture().join("model.safetensors")]).unwrap();
    let m = DeviceModel::from_source(&src, cfg).unwrap();
    let (ids, want) = reference(m.info().vocab_size);
    let got = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
        .unwrap();
    let d = max_diff(&got, &want);
    let effect = input()["kv_quant_effect_max_abs"].as_f64().unwrap();
    println!(
        "without KV quantisation: max |diff| vs tamm = {d:e} (tamm's own quantisation effect \
         {effect:e})"
    );
    assert!(d > 100.0 * TOL, "{d}");
}

/// The 8-bit KV cache proper (keys and values stored as int8 with the fixture's per-layer
/// scales, which tamm's `KVQuantizer` computed): a quarter of the f32 cache's bytes and the
/// same logits as tamm, in prefill and token by token; `--kv 32` (f32) and `--kv 16` (f16)
/// turn the rounding off.
#[test]
fn int8_kv_cache_matches_tamms_kv_quantizer() {
    let mut m = model();
    let (ids, want) = reference(m.info().vocab_size);
    // the checkpoint's scales are used as they are
    assert_eq!(m.apply_kv_bits(8, &[]).unwrap(), "checkpoint");
    let mut cache = m.new_cache();
    let got = m.forward_tokens(&ids, &mut cache, &LogitsFor::All).unwrap();
    let l0 = cache.layer(0).unwrap();
    assert_eq!(l0.bytes_per_value(), 1);
    assert!(l0.int8_slices().is_some());
    let d = max_diff(&got, &want);
    println!(
        "tamm AFMTextV7, int8 KV cache ({} bytes for {} positions): max |diff| = {d:e}",
        cache.used_bytes(),
        ids.len()
    );
    assert!(d < TOL, "{d}");
    // the int8 store holds exactly the fake-quantised values (tamm's arithmetic)
    let c = m.config();
    let widths: Vec<Option<usize>> = (0..c.num_hidden_layers)
        .map(|i| (i < c.num_block1_layers()).then_some(c.num_kv_heads() * c.head_dim()))
        .collect();
    let mut f32_cache = afm_lm::Cache::new(&widths, c.max_position_embeddings);
    m.forward_tokens(&ids, &mut f32_cache, &LogitsFor::Last)
        .unwrap();
    for i in 0..c.num_block1_layers() {
        let (k8, v8) = cache.layer(i).unwrap().kv().unwrap();
        let (kf, vf) = f32_cache.layer(i).unwrap().kv().unwrap();
        assert_eq!(max_diff(&k8, &kf), 0.0, "layer {i} keys");
        assert_eq!(max_diff(&v8, &vf), 0.0, "layer {i} values");
    }
    assert_eq!(4 * cache.used_bytes(), f32_cache.used_bytes());
    // token by token on the int8 cache
    let mut cache = m.new_cache();
    let mut worst = 0f32;
    for (i, &id) in ids.iter().enumerate() {
        let got = m
            .forward_tokens(&[id], &mut cache, &LogitsFor::Last)
            .unwrap();
        worst = worst.max(max_diff(&got, &want.narrow(0, i, 1).unwrap()));
    }
    println!("tamm AFMTextV7, int8 KV cache token by token: max |diff| = {worst:e}");
    assert!(worst < TOL, "{worst}");
    // --kv 32 (f32) and --kv 16 (f16): no 8-bit rounding, so no longer tamm's quantised model
    for bits in [32, 16] {
        assert_eq!(m.apply_kv_bits(bits, &[]).unwrap(), "none");
        let got = m
            .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
            .unwrap();
        assert!(max_diff(&got, &want) > 100.0 * TOL, "--kv {bits}");
    }
    assert!(m.apply_kv_bits(4, &[]).is_err());
}
