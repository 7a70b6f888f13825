//! Helpers shared by the afm-train integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use image::RgbImage;

/// Workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The easy-VQA data fetched by `scripts/fetch_easy_vqa.sh` (or named by `AFM_EASY_VQA_DIR`).
/// `None`, with a message saying how to get it, when absent: the test is then skipped, never
/// passed silently in CI (.ci/run fetches it and sets `AFM_REQUIRE_REAL_WEIGHTS=1`, which turns
/// the skip into a failure).
pub fn easy_vqa_dir() -> Option<PathBuf> {
    let p = afm_train::easy_vqa::data_dir(&root());
    if p.join("train/questions.json").exists() && p.join("test/questions.json").exists() {
        return Some(p);
    }
    afm_lm::testing::skip_missing(&format!(
        "easy-VQA data not found at {}; run `bash scripts/fetch_easy_vqa.sh` to fetch it",
        p.display()
    ))
}

/// Euclidean distance between two colours.
pub fn dist(a: [u8; 3], b: [u8; 3]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f32 - y as f32).powi(2))
        .sum::<f32>()
        .sqrt()
}

/// Number of 4-connected components of `mask` (width `w`) with at least `min_area` pixels.
pub fn components(mask: &[bool], w: usize, min_area: usize) -> usize {
    let h = mask.len() / w;
    let mut seen = vec![false; mask.len()];
    let mut n = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut area = 0;
        while let Some(i) = stack.pop() {
            area += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if area >= min_area {
            n += 1;
        }
    }
    n
}

/// Pixels of `img` within `tol` of `c`, eroded once (a pixel counts only when its four
/// neighbours match too), so anti-aliased edges that pass through `c` do not count.
pub fn colour_core_mask(img: &RgbImage, c: [u8; 3], tol: f32) -> Vec<bool> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let m: Vec<bool> = img.pixels().map(|p| dist(p.0, c) <= tol).collect();
    let mut out = vec![false; m.len()];
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let i = y * w + x;
            out[i] = m[i] && m[i - 1] && m[i + 1] && m[i - w] && m[i + w];
        }
    }
    out
}

/// SmolLM2's ChatML chat template (with its default system turn), for tests that pair the
/// tiny fixture tokenizer with the afm-tiny prompt format.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tiny fixture tokenizer (448 ids) with SmolLM2's ChatML template.
pub fn tokenizer() -> afm_lm::Tokenizer {
    let dir = root().join("tests/fixtures/hf_tiny_idefics3");
    let mut tok = afm_lm::Tokenizer::from_dir(&dir).unwrap();
    tok.set_chat_template(Some(CHATML.into()));
    tok
}

/// A tiny dense LM config whose vocabulary covers the fixture tokenizer.
pub fn lm_config() -> afm_lm::LmConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "tie_word_embeddings": true
    }))
    .unwrap()
}

/// Random weights, the (tied) embedding table scaled to std 0.1 so that the logits are
/// moderate, as in a trained LM (with std 1 the random LM is so sure of its text that the
/// loss sits near 38 whatever the image).
pub fn lm_tensors() -> std::collections::HashMap<String, candle_core::Tensor> {
    let mut t = afm_lm::random::random_tensors(&lm_config(), 7).unwrap();
    let e = t.remove("model.embed_tokens.weight").unwrap();
    t.insert("model.embed_tokens.weight".into(), (e * 0.1).unwrap());
    t
}

/// The tiny random LM, frozen for stage-2 training, recorded under the file name `name`.
pub fn frozen_lm(name: &str) -> afm_train::adapter_train::FrozenLm {
    let model = afm_lm::diff_model::DiffLm::from_source(
        &afm_lm::weights::WeightSource::from_tensors(lm_tensors()),
        lm_config(),
    )
    .unwrap();
    afm_train::adapter_train::FrozenLm::new(model, tokenizer(), name, "0")
}

/// Fixed image embeddings of `shape`, values spread over about [-0.85, 0.85] (std ~0.5):
/// the same in every run, so that a test's margins are the same on every machine and run
/// (`Tensor::randn` drew a new image per run, and a few draws made a margin too thin).
pub fn fixed_image(shape: &[usize], seed: u32) -> candle_core::Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.618_034 + seed as f32 * 0.414_213_6).fract() - 0.5) * 1.7)
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}
