//! Parity with Apple's own PT-MoE code: a seeded random `tamm` 0.2.0
//! `AFMParallelTrackMoEConfig` model (2 tracks x 8 layers, track blocks of 4, GQA 4:2 with
//! attention width 32 in a 48-wide model, (dense, sparse) MLPs with 4 experts per track and
//! top-2, (local, local, local, global) attention with a sliding window of 6 on a 20-token
//! prompt, interleaved RoPE on local layers, NoPE on global ones, QK-norm, router soft cap 5,
//! mean track merge, tied embeddings), written by `scripts/ref_tamm_ptmoe.py` to
//! `tests/fixtures/tamm_ptmoe_tiny` under our tensor names.

use afm_lm::server_model::{AttentionKind, ServerConfig, ServerModel, TrackMerge};
use afm_lm::weights::WeightSource;
use afm_lm::{LanguageModel, LogitsFor};
use candle_core::Tensor;
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tamm_ptmoe_tiny")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join(name)).unwrap()).unwrap()
}

fn config() -> ServerConfig {
    ServerConfig::from_json(json("config.json")).unwrap()
}

fn load(cfg: ServerConfig) -> ServerModel {
    let src = WeightSource::from_safetensors(&[fixture().join("model.safetensors")]).unwrap();
    ServerModel::from_source(&src, cfg).unwrap()
}

fn model() -> ServerModel {
    let m = load(config());
    let c = m.config();
    assert_eq!(
        (c.num_tracks, c.num_layers_per_track, c.track_block_depth),
        (2, 8, 4)
    );
    assert_eq!((c.num_experts, c.experts_per_token, c.moe_every), (4, 2, 2));
    assert_eq!(
        c.shared_expert_intermediate_size, 0,
        "tamm has no shared expert"
    );
    assert!(c.qk_norm && c.rope_interleaved && c.tie_word_embeddings && !c.global_rope);
    assert_eq!(c.track_merge, TrackMerge::Mean);
    m
}

/// Token ids and tamm's logits `(t, vocab)`.
fn reference(vocab: usize) -> (Vec<u32>, Tensor) {
    afm_lm::testing::reference_logits(&fixture(), vocab).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    afm_lm::testing::max_abs_diff(a, b).unwrap()
}

/// Runs `ids` in passes of the given sizes on one cache; the logits of every position.
fn chunked(m: &ServerModel, ids: &[u32], chunks: &[usize]) -> Tensor {
    assert_eq!(chunks.iter().sum::<usize>(), ids.len());
    let mut cache = m.new_cache();
    let mut rows = Vec::new();
    let mut at = 0;
    for &n in chunks {
        rows.push(
            m.forward_tokens(&ids[at..at + n], &mut cache, &LogitsFor::All)
                .unwrap(),
        );
        at += n;
    }
    assert_eq!(cache.seq_len(), ids.len());
    Tensor::cat(&rows, 0).unwrap()
}

#[test]
fn fixture_exercises_the_window_and_routing() {
    let c = config();
    let input = json("input.json");
    let (ids, _) = reference(c.vocab_size);
    // the prompt is longer than a local layer's view, so the window cuts keys off
    assert!(ids.len() > c.sliding_window + 1);
    assert!(c.attention_pattern.contains(&AttentionKind::Local));
    assert!(c.attention_pattern.contains(&AttentionKind::Global));
    // no near-tie between the k-th and (k+1)-th expert that f32 rounding could flip
    let gap = input["router_min_topk_gap"].as_f64().unwrap();
    // router logits large enough for the soft cap to bend them
    let big = input["router_max_abs_logit"].as_f64().unwrap();
    println!(
        "tamm fixture: {} tokens, window {}, min top-k router gap {gap:e}, max |router logit| \
         {big:.2} (cap {})",
        ids.len(),
        c.sliding_window,
        c.router_softcap
    );
    assert!(gap > 1e-3, "{gap}");
    assert!(big > c.router_softcap as f64, "{big}");
    // every expert is used
    let counts = input["expert_counts"].as_array().unwrap();
    assert_eq!(counts.len(), c.num_experts);
    assert!(counts.iter().all(|n| n.as_u64().unwrap() > 0));
}

#[test]
fn all_positions_match_tamm() {
    let mut m = model();
    let (ids, want) = reference(m.info().vocab_size);
    for parallel in [true, false] {
        m.set_parallel_tracks(parallel);
        let got = m
            .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
            .unwrap();
        let d = max_diff(&got, &want);
        println!(
            "tamm PT-MoE, all {} positions x {} logits (parallel tracks {parallel}): \
             max |diff| = {d:e}",
            ids.len(),
            m.info().vocab_size
        );
        assert!(d < TOL, "parallel {parallel}: {d}");
    }
    let t = ids.len();
    let got = m
        .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::Last)
        .unwrap();
    let d = max_diff(&got, &want.narrow(0, t - 1, 1).unwrap());
    println!("tamm PT-MoE, last position only: max |diff| = {d:e}");
    assert!(d < TOL, "{d}");
}

#[test]
fn incremental_decoding_matches_tamm() {
    let m = model();
    let (ids, want) = reference(m.info().vocab_size);
    let c = m.config().clone();
    let l = c.num_layers_per_track;

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
    // local layers keep only their window, global layers everything, in every track
    for track in 0..c.num_tracks {
        for i in 0..l {
            let kv = cache.layer(track * l + i).unwrap();
            let keep = match c.attention_kind(i) {
                AttentionKind::Local => c.sliding_window,
                AttentionKind::Global => ids.len(),
            };
            assert_eq!(kv.len(), keep, "track {track} layer {i}");
        }
    }
    println!("tamm PT-MoE, token-by-token decoding: max |diff| = {worst:e}");

    // a prefill longer than the window, then one token at a time
    let split = c.sliding_window + 3;
    let mut chunks = vec![split];
    chunks.extend(std::iter::repeat_n(1, ids.len() - split));
    let d = max_diff(&chunked(&m, &ids, &chunks), &want);
    println!("tamm PT-MoE, prefill {split} then decode: max |diff| = {d:e}");
    assert!(d < TOL, "{d}");

    // a short prefill, then passes of several tokens that straddle the window
    let chunks = [4, 5, 7, ids.len() - 16];
    let d = max_diff(&chunked(&m, &ids, &chunks), &want);
    println!("tamm PT-MoE, passes of {chunks:?} tokens: max |diff| = {d:e}");
    assert!(d < TOL, "{d}");
}

/// The parity above can fail: a model that differs from tamm in the window (off by one
/// either way: tamm's window excludes the current token), the track merge, RoPE on global
/// layers, the attention pattern or the router cap is far from tamm's logits.
#[test]
fn perturbed_configs_do_not_match_tamm() {
    let base = config();
    let (ids, want) = reference(base.vocab_size);
    let mut cases: Vec<(&str, ServerConfig)> = Vec::new();
    let mut c = base.clone();
    c.sliding_window -= 1;
    cases.push(("sliding_window - 1", c));
    let mut c = base.clone();
    c.sliding_window += 1;
    cases.push(("sliding_window + 1", c));
    let mut c = base.clone();
    c.sliding_window = 64;
    cases.push(("no window", c));
    let mut c = base.clone();
    c.track_merge = TrackMerge::Sum;
    cases.push(("track_merge sum", c));
    let mut c = base.clone();
    c.global_rope = true;
    cases.push(("global_rope", c));
    let mut c = base.clone();
    c.attention_pattern = vec![AttentionKind::Local];
    cases.push(("all local", c));
    let mut c = base.clone();
    c.router_softcap = 50.0;
    cases.push(("router_softcap 50", c));
    let mut c = base.clone();
    c.rope_interleaved = false;
    cases.push(("rope halves", c));
    for (name, cfg) in cases {
        let m = load(cfg);
        let got = m
            .forward_tokens(&ids, &mut m.new_cache(), &LogitsFor::All)
            .unwrap();
        let d = max_diff(&got, &want);
        println!("perturbed ({name}): max |diff| vs tamm = {d:e}");
        assert!(d > 100.0 * TOL, "{name}: {d}");
    }
}
