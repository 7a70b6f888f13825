//! Generation on the real SmolLM2-135M-Instruct: samplers, seeds, stop tokens and strings,
//! UTF-8-safe streaming, cancellation, budgets and over-long prompts.

mod common;

use afm::lm::chat::render_chat;
use afm::lm::generate::{generate, GenerateOptions, StopReason};
use afm::lm::{Checkpoint, LanguageModel, LmError, LoadOptions, Message, SamplingParams};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn load() -> Option<Checkpoint> {
    common::smollm2_gguf().map(|p| Checkpoint::load(&p).unwrap())
}

fn chat(ck: &Checkpoint, q: &str) -> Vec<u32> {
    ck.tokenizer
        .encode(&render_chat(&ck.tokenizer, &[Message::user(q)]).unwrap())
        .unwrap()
}

fn opts(n: usize, s: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: s,
        ..Default::default()
    }
}

#[test]
fn greedy_answer_is_sane_and_stops_at_end_of_turn() {
    let Some(ck) = load() else { return };
    let ids = chat(&ck, "What is 2 + 2? Answer with one short sentence.");
    let mut streamed = String::new();
    let g = generate(
        &ck.model,
        &ck.tokenizer,
        &ids,
        &opts(64, SamplingParams::greedy()),
        &mut |s| {
            streamed.push_str(s);
            true
        },
    )
    .unwrap();
    println!(
        "answer: {:?} ({:?}, {} tokens)",
        g.text, g.stats.stop, g.stats.generated_tokens
    );
    assert_eq!(g.stats.stop, StopReason::StopToken, "{:?}", g.text);
    assert_eq!(streamed, g.text);
    assert!(g.text.contains('4'), "{:?}", g.text);
    assert!(!g.text.contains("<|im_end|>"));
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_matters() {
    let Some(ck) = load() else { return };
    let ids = chat(&ck, "Tell me a story about a cat.");
    let run = |seed| {
        let s = SamplingParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            seed,
            ..SamplingParams::greedy()
        };
        generate(&ck.model, &ck.tokenizer, &ids, &opts(24, s), &mut |_| true)
            .unwrap()
            .ids
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn stop_strings_cut_the_text_and_budget_is_respected() {
    let Some(ck) = load() else { return };
    let ids = chat(&ck, "Count from 1 to 20, separated by commas.");
    let full = generate(
        &ck.model,
        &ck.tokenizer,
        &ids,
        &opts(60, SamplingParams::greedy()),
        &mut |_| true,
    )
    .unwrap();
    println!("full: {:?}", full.text);
    let stop = "5";
    assert!(full.text.contains(stop), "{:?}", full.text);
    let mut o = opts(60, SamplingParams::greedy());
    o.stop_strings = vec![stop.to_string()];
    let mut streamed = String::new();
    let g = generate(&ck.model, &ck.tokenizer, &ids, &o, &mut |s| {
        streamed.push_str(s);
        true
    })
    .unwrap();
    assert_eq!(g.stats.stop, StopReason::StopString);
    assert_eq!(g.text, full.text[..full.text.find(stop).unwrap()]);
    assert_eq!(streamed, g.text);
    let g = generate(
        &ck.model,
        &ck.tokenizer,
        &ids,
        &opts(5, SamplingParams::greedy()),
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(
        (g.stats.generated_tokens, g.stats.stop),
        (5, StopReason::MaxTokens)
    );
}

#[test]
fn streaming_is_utf8_safe_across_token_boundaries() {
    let Some(ck) = load() else { return };
    // characters that byte-level BPE splits over several tokens
    let text = "東京 Ελληνικά 🙂👍🏽 café";
    let ids = ck.tokenizer.encode(text).unwrap();
    assert!(ids.len() > text.chars().count() / 2);
    let mut stream = afm::lm::tokenizer::TextStream::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = stream.push(&ck.tokenizer, id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "half a character streamed: {piece:?}"
            );
            out.push_str(&piece);
        }
    }
    out.extend(stream.finish(&ck.tokenizer).unwrap());
    assert_eq!(out, text);
}

#[test]
fn cancellation_by_flag_and_by_callback() {
    let Some(ck) = load() else { return };
    let ids = chat(&ck, "Write a long essay about the ocean.");
    let flag = Arc::new(AtomicBool::new(false));
    let mut o = opts(100, SamplingParams::greedy());
    o.cancel = Some(flag.clone());
    let mut n = 0;
    let g = generate(&ck.model, &ck.tokenizer, &ids, &o, &mut |_| {
        n += 1;
        if n == 3 {
            flag.store(true, Ordering::Relaxed);
        }
        true
    })
    .unwrap();
    assert_eq!(g.stats.stop, StopReason::Cancelled);
    assert!(g.stats.generated_tokens < 10);
    let mut calls = 0;
    let g = generate(
        &ck.model,
        &ck.tokenizer,
        &ids,
        &opts(100, SamplingParams::greedy()),
        &mut |_| {
            calls += 1;
            calls < 2
        },
    )
    .unwrap();
    assert_eq!(g.stats.stop, StopReason::Cancelled);
    assert_eq!(calls, 2);
}

#[test]
fn over_long_prompt_is_a_clear_error_and_full_context_is_reported() {
    let Some(p) = common::smollm2_gguf() else {
        return;
    };
    let ck = Checkpoint::load_with(
        &p,
        &LoadOptions {
            context_length: Some(64),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ck.model.info().context_length, 64);
    let long = chat(&ck, &"word ".repeat(100));
    let e = generate(
        &ck.model,
        &ck.tokenizer,
        &long,
        &opts(8, SamplingParams::greedy()),
        &mut |_| true,
    )
    .unwrap_err();
    assert!(matches!(e, LmError::PromptTooLong { .. }), "{e}");
    assert!(e.to_string().contains("context"), "{e}");
    let ids = chat(&ck, "Write a long essay about the ocean.");
    let g = generate(
        &ck.model,
        &ck.tokenizer,
        &ids,
        &opts(500, SamplingParams::greedy()),
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(g.stats.stop, StopReason::ContextFull);
    assert!(ids.len() + g.stats.generated_tokens <= 64);
}
