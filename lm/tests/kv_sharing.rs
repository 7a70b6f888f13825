//! The paper's KV-cache sharing on a small random-weight AFM-style model (8 layers, 5:3).

use afm_lm::random::random_tensors;
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, LanguageModel, LmConfig, LogitsFor};
use candle_core::Tensor;

fn cfg(afm_features: bool) -> LmConfig {
    LmConfig {
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 8,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        num_kv_reuse_layers: 0,
        qk_norm: afm_features,
        rope_interleaved: afm_features,
        kv_quant: afm_features,
    }
}

fn model(c: &LmConfig, seed: u64) -> DeviceModel {
    DeviceModel::from_source(
        &WeightSource::from_tensors(random_tensors(c, seed).unwrap()),
        c.clone(),
    )
    .unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 256).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    afm_lm::testing::max_abs_diff(a, b).unwrap()
}

#[test]
fn kv_cache_bytes_drop_by_37_5_percent_at_5_3() {
    let full = model(&cfg(true), 1);
    let shared = model(&cfg(true).with_block_ratio(5, 3).unwrap(), 1);
    let ids = prompt(100);
    let (mut cf, mut cs) = (full.new_cache(), shared.new_cache());
    full.forward_tokens(&ids, &mut cf, &LogitsFor::Last)
        .unwrap();
    shared
        .forward_tokens(&ids, &mut cs, &LogitsFor::Last)
        .unwrap();
    let (bf, bs) = (cf.used_bytes(), cs.used_bytes());
    let drop = 1.0 - bs as f64 / bf as f64;
    println!(
        "KV cache after 100 tokens: {bf} bytes without sharing ({} layers), {bs} bytes with 5:3 sharing ({} layers): -{:.1}%",
        cf.kv_layers(),
        cs.kv_layers(),
        drop * 100.0
    );
    assert_eq!(cs.kv_layers(), 5);
    assert_eq!(bs * 8, bf * 5, "exactly 3/8 of the K/V bytes must go");
    assert!((drop - 0.375).abs() < 1e-12);
    // the paper's full-size model: 21 of 56 layers reuse K/V
    let big = LmConfig {
        num_hidden_layers: 56,
        ..cfg(true)
    }
    .with_block_ratio(5, 3)
    .unwrap();
    assert_eq!(big.num_kv_reuse_layers, 21);
}

#[test]
fn prefill_shortcut_logits_equal_block2_on_every_position() {
    for afm in [true, false] {
        let c = cfg(afm).with_block_ratio(5, 3).unwrap();
        let mut m = model(&c, 2);
        let ids = prompt(40);
        let mut ca = m.new_cache();
        let fast = m.forward_tokens(&ids, &mut ca, &LogitsFor::Last).unwrap();
        m.set_prefill_shortcut(false);
        let mut cb = m.new_cache();
        let slow = m.forward_tokens(&ids, &mut cb, &LogitsFor::Last).unwrap();
        let d = max_diff(&fast, &slow);
        println!("afm features {afm}: last-position logits, shortcut vs block 2 on all 40 rows: max |diff| = {d:e}");
        assert!(d < 1e-4, "{d}");
        // and the caches hold the same K/V afterwards
        assert_eq!(ca.seq_len(), cb.seq_len());
        let (ka, _) = ca.layer(4).unwrap().kv().unwrap();
        let (kb, _) = cb.layer(4).unwrap().kv().unwrap();
        assert!(max_diff(&ka, &kb) < 1e-6);
    }
}

#[test]
fn incremental_decoding_equals_one_full_forward() {
    for (afm, ratio) in [
        (true, (5, 3)),
        (false, (5, 3)),
        (false, (1, 0)),
        (true, (1, 0)),
    ] {
        let c = cfg(afm).with_block_ratio(ratio.0, ratio.1).unwrap();
        let m = model(&c, 3);
        let ids = prompt(24);
        let mut cfull = m.new_cache();
        let full = m.forward_tokens(&ids, &mut cfull, &LogitsFor::All).unwrap();
        assert_eq!(full.dims(), &[24, 256]);
        let mut cache = m.new_cache();
        let mut worst = 0f32;
        // a prefill of 7, a chunk of 5, then one token at a time
        let first = m
            .forward_tokens(&ids[..7], &mut cache, &LogitsFor::Last)
            .unwrap();
        worst = worst.max(max_diff(&first, &full.narrow(0, 6, 1).unwrap()));
        let chunk = m
            .forward_tokens(&ids[7..12], &mut cache, &LogitsFor::All)
            .unwrap();
        worst = worst.max(max_diff(&chunk, &full.narrow(0, 7, 5).unwrap()));
        for (i, &id) in ids.iter().enumerate().skip(12) {
            let l = m
                .forward_tokens(&[id], &mut cache, &LogitsFor::Last)
                .unwrap();
            worst = worst.max(max_diff(&l, &full.narrow(0, i, 1).unwrap()));
        }
        println!("afm features {afm}, blocks {ratio:?}: incremental vs full forward, max |diff| = {worst:e}");
        assert!(worst < 1e-4, "{worst}");
        assert_eq!(cache.seq_len(), 24);
    }
}

#[test]
fn selected_rows_equal_the_same_rows_of_all() {
    let c = cfg(true).with_block_ratio(5, 3).unwrap();
    let m = model(&c, 4);
    let ids = prompt(16);
    let all = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
        .unwrap();
    let some = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Rows(vec![2, 9, 15]))
        .unwrap();
    let idx = Tensor::new(&[2u32, 9, 15], &candle_core::Device::Cpu).unwrap();
    assert!(max_diff(&some, &all.index_select(&idx, 0).unwrap()) < 1e-4);
    assert!(m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Rows(vec![3, 1]))
        .is_err());
    assert!(m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Rows(vec![16]))
        .is_err());
}

#[test]
fn one_model_serves_many_threads_with_their_own_caches() {
    let m = std::sync::Arc::new(model(&cfg(true).with_block_ratio(5, 3).unwrap(), 5));
    let ids = prompt(20);
    let want = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Last)
        .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (m, ids) = (m.clone(), ids.clone());
            std::thread::spawn(move || {
                m.forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Last)
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        assert!(max_diff(&h.join().unwrap(), &want) < 1e-5);
    }
}

#[test]
fn context_overflow_is_an_error_and_leaves_the_cache_usable() {
    let m = model(&cfg(false), 6);
    let mut cache = m.new_cache();
    m.forward_tokens(&prompt(200), &mut cache, &LogitsFor::Last)
        .unwrap();
    let e = m
        .forward_tokens(&prompt(100), &mut cache, &LogitsFor::Last)
        .unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    assert_eq!(cache.seq_len(), 200);
    m.forward_tokens(&[1], &mut cache, &LogitsFor::Last)
        .unwrap();
    assert!(m
        .embed_tokens(&[256])
        .unwrap_err()
        .to_string()
        .contains("outside the vocabulary"));
}
