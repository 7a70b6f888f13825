//! Continuous batching: a batched decode step gives each sequence the logits its own
//! single-sequence step gives, and batched generation gives each request the tokens
//! `generate` gives it alone.

use afm_lm::batch::{step, Sequence};
use afm_lm::generate::{generate, GenerateOptions};
use afm_lm::random::random_tensors;
use afm_lm::weights::WeightSource;
use afm_lm::{Checkpoint, DeviceModel, LanguageModel, LmConfig, LogitsFor, SamplingParams};

fn cfg() -> LmConfig {
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
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        num_kv_reuse_layers: 0,
        qk_norm: true,
        rope_interleaved: true,
        kv_quant: true,
    }
}

/// The AFM on-device layout (KV sharing 5:3, QK-norm, 8-bit KV) and plain llama.
fn layouts() -> [LmConfig; 2] {
    let mut llama = cfg();
    llama.qk_norm = false;
    llama.kv_quant = false;
    llama.rope_interleaved = false;
    [cfg().with_block_ratio(5, 3).unwrap(), llama]
}

/// A random-weight model of `c`, seeded.
fn model(c: &LmConfig, seed: u64) -> DeviceModel {
    DeviceModel::from_source(
        &WeightSource::from_tensors(random_tensors(c, seed).unwrap()),
        c.clone(),
    )
    .unwrap()
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11 + salt) % 256).collect()
}

/// The AFM on-device layout (KV sharing 5:3, QK-norm, 8-bit KV) and plain llama: three
/// sequences of different lengths, four steps, each compared with its own one-token step.
#[test]
fn batched_step_matches_single_steps() {
    for c in layouts() {
        let m = DeviceModel::from_source(
            &WeightSource::from_tensors(random_tensors(&c, 3).unwrap()),
            c.clone(),
        )
        .unwrap();
        let lens = [5, 17, 1];
        let mut single: Vec<_> = lens.iter().map(|_| m.new_cache()).collect();
        let mut batched: Vec<_> = lens.iter().map(|_| m.new_cache()).collect();
        for (i, &n) in lens.iter().enumerate() {
            let p = prompt(n, i as u32);
            m.forward_tokens(&p, &mut single[i], &LogitsFor::Last)
                .unwrap();
            m.forward_tokens(&p, &mut batched[i], &LogitsFor::Last)
                .unwrap();
        }
        let mut worst = 0f32;
        for s in 0..4u32 {
            let ids: Vec<u32> = (0..3u32).map(|i| (i * 91 + s * 13 + 5) % 256).collect();
            let mut refs: Vec<&mut _> = batched.iter_mut().collect();
            let got = m.forward_batch(&ids, &mut refs).unwrap();
            assert_eq!(got.dims(), &[3, 256]);
            for (i, &id) in ids.iter().enumerate() {
                let want = m
                    .forward_tokens(&[id], &mut single[i], &LogitsFor::Last)
                    .unwrap();
                let d =
                    afm_lm::testing::max_abs_diff(&got.narrow(0, i, 1).unwrap(), &want).unwrap();
                worst = worst.max(d);
                assert_eq!(batched[i].seq_len(), single[i].seq_len());
            }
        }
        println!("max |batched - single| = {worst:e}");
        assert!(worst < 1e-4, "{worst}");
    }
}

#[test]
fn batched_step_refuses_bad_input_and_rolls_back() {
    let m = model(&cfg(), 3);
    let (mut a, mut b) = (m.new_cache(), m.new_cache());
    m.forward_tokens(&[1, 2, 3], &mut a, &LogitsFor::Last)
        .unwrap();
    m.forward_tokens(&[4], &mut b, &LogitsFor::Last).unwrap();
    // an id outside the vocabulary: nothing advances
    let e = m
        .forward_batch(&[5, 999], &mut [&mut a, &mut b])
        .unwrap_err();
    assert!(e.to_string().contains("999"), "{e}");
    assert_eq!((a.seq_len(), b.seq_len()), (3, 1));
    assert_eq!(a.layer(0).unwrap().len(), 3);
    // counts that disagree
    assert!(m.forward_batch(&[5], &mut [&mut a, &mut b]).is_err());
    assert!(m.forward_batch(&[], &mut []).is_err());
    // a full context
    let mut full = m.new_cache();
    m.forward_tokens(&prompt(64, 0), &mut full, &LogitsFor::Last)
        .unwrap();
    let e = m
        .forward_batch(&[1, 2], &mut [&mut a, &mut full])
        .unwrap_err();
    assert!(e.to_string().contains("64"), "{e}");
    assert_eq!(a.seq_len(), 3);
}

/// Prefill and decode in one pass: a fresh prompt, a prompt continuing a cache and a decode
/// row, run together, give each sequence the logits (and the cache) of its own pass, then a
/// batched decode step on the three caches agrees too. Both layouts, as above.
#[test]
fn segments_match_each_sequence_alone() {
    for c in layouts() {
        let m = model(&c, 5);
        // sequence 0 decodes after 9 positions, 1 prefills 7 from nothing, 2 prefills 4 after 5
        let (p0, p2) = (prompt(9, 1), prompt(5, 2));
        let mut caches = vec![m.new_cache(), m.new_cache(), m.new_cache()];
        m.forward_tokens(&p0, &mut caches[0], &LogitsFor::Last)
            .unwrap();
        m.forward_tokens(&p2, &mut caches[2], &LogitsFor::Last)
            .unwrap();
        let mut single = caches.clone();
        let rows = [vec![17u32], prompt(7, 3), prompt(4, 4)];
        let embeds: Vec<_> = rows.iter().map(|r| m.embed_tokens(r).unwrap()).collect();
        let all = candle_core::Tensor::cat(&embeds, 0).unwrap();
        let got = {
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            m.forward_segments(&all, &[1, 7, 4], &mut refs).unwrap()
        };
        assert_eq!(got.dims(), &[3, 256]);
        let mut worst = 0f32;
        for i in 0..3 {
            let want = m
                .forward_embeds(&embeds[i], &mut single[i], &LogitsFor::Last)
                .unwrap();
            worst = worst
                .max(afm_lm::testing::max_abs_diff(&got.narrow(0, i, 1).unwrap(), &want).unwrap());
            assert_eq!(caches[i].seq_len(), single[i].seq_len());
        }
        assert_eq!(
            caches.iter().map(|c| c.seq_len()).collect::<Vec<_>>(),
            [10, 7, 9]
        );
        // the caches hold what each sequence's own pass put there
        let ids = [3u32, 4, 5];
        let got = {
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            m.forward_batch(&ids, &mut refs).unwrap()
        };
        for i in 0..3 {
            let want = m
                .forward_tokens(&[ids[i]], &mut single[i], &LogitsFor::Last)
                .unwrap();
            worst = worst
                .max(afm_lm::testing::max_abs_diff(&got.narrow(0, i, 1).unwrap(), &want).unwrap());
        }
        println!("max |segments - alone| = {worst:e}");
        assert!(worst < 1e-4, "{worst}");
    }
}

/// Runs that do not cover the rows, an empty run, a run past the context: refused, and no
/// cache moves.
#[test]
fn segments_refuse_bad_runs_and_roll_back() {
    let m = model(&cfg(), 3);
    let (mut a, mut b) = (m.new_cache(), m.new_cache());
    m.forward_tokens(&[1, 2, 3], &mut a, &LogitsFor::Last)
        .unwrap();
    let e5 = m.embed_tokens(&prompt(5, 0)).unwrap();
    for counts in [&[2usize, 2][..], &[5, 0], &[1, 2, 2], &[6, 1]] {
        let e = m
            .forward_segments(&e5, counts, &mut [&mut a, &mut b])
            .unwrap_err();
        assert!(e.to_string().contains("runs of"), "{counts:?}: {e}");
    }
    let long = m.embed_tokens(&prompt(66, 0)).unwrap();
    let e = m
        .forward_segments(&long, &[62, 4], &mut [&mut a, &mut b])
        .unwrap_err();
    assert!(e.to_string().contains("65"), "{e}");
    assert_eq!((a.seq_len(), b.seq_len()), (3, 0));
    assert_eq!(a.layer(0).unwrap().len(), 3);
    // and the caches still work
    m.forward_segments(&e5, &[2, 3], &mut [&mut a, &mut b])
        .unwrap();
    assert_eq!((a.seq_len(), b.seq_len()), (5, 3));
}

/// Real SmolLM2: four chat requests (greedy, sampled with seeds, a stop string, a token
/// budget) batched together give exactly what `generate` gives each alone.
#[test]
fn batched_generation_equals_generate_on_smollm2() {
    let Some(p) = afm_lm::testing::smollm2_gguf_or_skip() else {
        return;
    };
    let ck = Checkpoint::load(&p).unwrap();
    let (m, tok) = (&ck.model, &ck.tokenizer);
    let reqs: Vec<(&str, GenerateOptions)> = vec![
        (
            "Name three colours.",
            GenerateOptions {
                max_new_tokens: 24,
                ..Default::default()
            },
        ),
        (
            "Write a short poem about rain.",
            GenerateOptions {
                max_new_tokens: 30,
                sampling: SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: 7,
                    ..Default::default()
                },
                ..Default::default()
            },
        ),
        (
            "Count from one to ten in words.",
            GenerateOptions {
                max_new_tokens: 40,
                stop_strings: vec!["5.".into()],
                ..Default::default()
            },
        ),
        (
            "Hi",
            GenerateOptions {
                max_new_tokens: 3,
                ..Default::default()
            },
        ),
    ];
    let prompts: Vec<Vec<u32>> = reqs
        .iter()
        .map(|(q, _)| {
            let t = afm_lm::chat::render_chat(tok, &[afm_lm::Message::user(*q)]).unwrap();
            tok.encode(&t).unwrap()
        })
        .collect();
    let want: Vec<_> = reqs
        .iter()
        .zip(&prompts)
        .map(|((_, o), ids)| generate(m, tok, ids, o, &mut |_| true).unwrap())
        .collect();
    // Requests join one after another (as on a server), then all step together.
    let mut seqs = Vec::new();
    let mut texts = Vec::new();
    for ((_, o), ids) in reqs.iter().zip(&prompts) {
        let e = m.embed_tokens(ids).unwrap();
        let (s, first) = Sequence::start(m, tok, &e, ids, o).unwrap();
        texts.push(first.text);
        seqs.push(s);
        // the sequences already running take a step before the next one joins
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        for (t, out) in texts.iter_mut().zip(step(m, tok, &mut refs).unwrap()) {
            t.push_str(&out.text);
        }
    }
    let mut steps = 0;
    while seqs.iter().any(|s| s.next_token().is_some()) {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        for (t, out) in texts.iter_mut().zip(step(m, tok, &mut refs).unwrap()) {
            t.push_str(&out.text);
        }
        steps += 1;
    }
    assert!(steps > 10);
    for ((s, t), w) in seqs.iter().zip(&texts).zip(&want) {
        assert_eq!(s.ids(), &w.ids[..]);
        assert_eq!(s.text(), w.text);
        assert_eq!(t, &w.text);
        assert_eq!(s.stop(), Some(w.stats.stop));
    }
    assert_eq!(
        seqs[2].stop(),
        Some(afm_lm::StopReason::StopString),
        "{:?}",
        texts[2]
    );
    assert_eq!(seqs[3].stop(), Some(afm_lm::StopReason::MaxTokens));

    // The same requests joining with their prompts still to run: each is prefilled in the
    // same pass as the running ones' decode step (two join at once, then two more).
    let mut seqs: Vec<Sequence> = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    for pair in [0..2, 2..4] {
        for k in pair {
            let e = m.embed_tokens(&prompts[k]).unwrap();
            let s = Sequence::pending(m, tok, &e, &prompts[k], &reqs[k].1, None, None).unwrap();
            assert!(s.is_pending());
            seqs.push(s);
            texts.push(String::new());
        }
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        for (t, out) in texts.iter_mut().zip(step(m, tok, &mut refs).unwrap()) {
            t.push_str(&out.text);
        }
        assert!(seqs.iter().all(|s| !s.is_pending()));
    }
    while seqs.iter().any(|s| s.next_token().is_some()) {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        for (t, out) in texts.iter_mut().zip(step(m, tok, &mut refs).unwrap()) {
            t.push_str(&out.text);
        }
    }
    for ((s, t), w) in seqs.iter().zip(&texts).zip(&want) {
        assert_eq!(s.ids(), &w.ids[..], "joined pending");
        assert_eq!(t, &w.text);
        assert_eq!(s.stop(), Some(w.stats.stop));
    }
}

/// Total variation distance between the softmax distributions of two logit rows.
fn total_variation(a: &[f32], b: &[f32]) -> f32 {
    let p = |r: &[f32]| {
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = r.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect::<Vec<_>>()
    };
    p(a).iter()
        .zip(p(b))
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / 2.0
}

/// Real SmolLM2: a sequence started from a cached prefix of its prompt (the K/V of another
/// prompt that shares the chat template's system prompt, cut where the two differ; and the
/// same prompt again, cut one short) predicts what one prefill of the whole prompt predicts,
/// up to float rounding: the reused positions come from a prefill of another length and
/// the rest runs as its own prefill (or decode step), which sum in other orders, and the
/// int8 activations turn those last-bit differences into whole quantization steps (logits
/// move by up to ~0.9 of ~29). The distributions of the next token stay within 5% total
/// variation, with the same greedy first token; later greedy tokens can differ at near-ties,
/// as with llama.cpp's prompt cache, so `afm serve` keeps the cache behind `--prefix-cache`.
#[test]
fn start_from_a_cached_prefix_predicts_what_a_full_prefill_does_on_smollm2() {
    let Some(p) = afm_lm::testing::smollm2_gguf_or_skip() else {
        return;
    };
    let ck = Checkpoint::load(&p).unwrap();
    let (m, tok) = (&ck.model, &ck.tokenizer);
    let ids = |q: &str| {
        let t = afm_lm::chat::render_chat(tok, &[afm_lm::Message::user(q)]).unwrap();
        tok.encode(&t).unwrap()
    };
    let opts = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let first = ids("Name three colours.");
    let (s0, _) = Sequence::start(m, tok, &m.embed_tokens(&first).unwrap(), &first, &opts).unwrap();
    assert_eq!(s0.cache().seq_len(), first.len());
    assert_eq!(s0.cached_tokens(), 0);
    for q in [
        "Name three colours.",
        "Write a short poem about rain.",
        "Count from one to ten in words.",
    ] {
        let p = ids(q);
        let lcp = first
            .iter()
            .zip(&p)
            .take_while(|(a, b)| a == b)
            .count()
            .min(p.len() - 1);
        assert!(lcp >= 8, "the prompts share the system prompt: {lcp}");
        let mut prefix = s0.cache().clone();
        prefix.truncate(lcp);
        assert_eq!(prefix.seq_len(), lcp);
        let mut c = prefix.clone();
        let got = m
            .forward_tokens(&p[lcp..], &mut c, &LogitsFor::Last)
            .unwrap();
        let mut whole = m.new_cache();
        let want = m.forward_tokens(&p, &mut whole, &LogitsFor::Last).unwrap();
        let (g, w): (Vec<f32>, Vec<f32>) = (
            got.squeeze(0).unwrap().to_vec1().unwrap(),
            want.squeeze(0).unwrap().to_vec1().unwrap(),
        );
        let tv = total_variation(&g, &w);
        println!(
            "{q}: prefix {lcp} of {}, max |logit difference| {:.3}, total variation {tv:.4}",
            p.len(),
            afm_lm::testing::max_abs_diff(&got, &want).unwrap()
        );
        assert!(tv < 0.05, "{q}: {tv}");
        let argmax =
            |r: &[f32]| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as u32;
        assert_eq!(argmax(&g), argmax(&w), "{q}");
        let e = m.embed_tokens(&p).unwrap();
        let (s, _) = Sequence::start_cached(m, tok, &e, &p, &opts, None, Some(prefix)).unwrap();
        assert_eq!(s.ids()[0], argmax(&g), "{q}");
        assert_eq!((s.prompt_tokens(), s.cached_tokens()), (p.len(), lcp));
        assert_eq!(s.cache().seq_len(), p.len());
    }
    // a prefix as long as the prompt leaves no position to run: refused
    let e = m.embed_tokens(&first).unwrap();
    let err = Sequence::start_cached(m, tok, &e, &first, &opts, None, Some(s0.cache().clone()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("prefix"), "{err}");
}
