//! One loaded model shared by 8 threads: every thread's greedy output equals the serial
//! run's, for a `Vlm` (SmolVLM fixture, f32 and int8, sharing its image cache) and for
//! `DeviceModel`s (dense safetensors, and a Q4_1/Q8_0 GGUF that runs the block kernels, whose
//! output rows are written through a shared pointer). Threads start together behind a
//! barrier and each runs two requests, so requests overlap.
//! `Send + Sync` of the model types is asserted at compile time in the crates themselves.

use afm_fusion::{AskOptions, Vlm};
use afm_lm::random::{random_tensors, write_gguf};
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, GenerateOptions, LanguageModel, LmConfig, LogitsFor};
use afm_vision::image::{Rgb, RgbImage};
use candle_core::quantized::GgmlDType;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};

const THREADS: usize = 8;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_idefics3")
}

/// Runs `f(input)` for every input serially, then on 8 threads at once (thread `t` takes
/// inputs `t` and `t+1`, so every input runs on two threads) and checks each thread's outputs
/// against the serial ones.
fn same_on_8_threads<I, O>(inputs: Vec<I>, f: impl Fn(&I) -> O + Send + Sync + 'static)
where
    I: Send + Sync + 'static,
    O: PartialEq + std::fmt::Debug + Send + 'static,
{
    let serial: Vec<O> = inputs.iter().map(&f).collect();
    let (inputs, f) = (Arc::new(inputs), Arc::new(f));
    let barrier = Arc::new(Barrier::new(THREADS));
    let n = inputs.len();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (inputs, f, barrier) = (inputs.clone(), f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..2)
                    .map(|k| {
                        let i = (t + k) % n;
                        (i, f(&inputs[i]))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        for (i, out) in h.join().expect("no thread panics") {
            assert_eq!(out, serial[i], "thread {t}, input {i}");
        }
    }
}

fn picture(seed: u32) -> RgbImage {
    RgbImage::from_fn(40 + seed * 7, 36 + seed * 3, |x, y| {
        Rgb([
            (x * (seed + 3)) as u8,
            (y * 11) as u8,
            ((x ^ y) * seed) as u8,
        ])
    })
}

fn greedy_vlm(int8: bool) {
    let mut vlm = Vlm::load_idefics3(&fixture()).unwrap();
    if int8 {
        vlm.set_vision_int8(true).unwrap();
        vlm.set_lm_int8(true).unwrap();
    }
    let vlm = Arc::new(vlm);
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 6,
            ..Default::default()
        },
        max_image_tokens: None,
    };
    let inputs: Vec<(RgbImage, String)> = (0..THREADS as u32)
        .map(|i| (picture(i % 4), format!("What is in picture {i}?")))
        .collect();
    let outs: Vec<Vec<u32>> = inputs
        .iter()
        .map(|(img, q)| {
            vlm.ask(img, q, &opts, &mut |_| true)
                .unwrap()
                .generation
                .ids
        })
        .collect();
    assert!(
        outs.iter().any(|o| o != &outs[0]),
        "the inputs must give different answers for the test to mean anything"
    );
    let v = vlm.clone();
    same_on_8_threads(inputs, move |(img, q)| {
        v.ask(img, q, &opts, &mut |_| true).unwrap().generation.ids
    });
}

#[test]
fn one_vlm_serves_8_threads_with_the_serial_answers() {
    greedy_vlm(false);
}

#[test]
fn one_int8_vlm_serves_8_threads_with_the_serial_answers() {
    greedy_vlm(true);
}

/// 8 greedy tokens after each prompt, with the model's own cache per request.
fn greedy_ids(m: &DeviceModel, prompt: &[u32]) -> Vec<u32> {
    let mut cache = m.new_cache();
    let mut ids = prompt.to_vec();
    let mut out = vec![];
    let mut next = &ids[..];
    for _ in 0..8 {
        let l = m
            .forward_tokens(next, &mut cache, &LogitsFor::Last)
            .unwrap();
        let v = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let best = v
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0 as u32;
        out.push(best);
        ids.push(best);
        next = &ids[ids.len() - 1..];
    }
    out
}

fn prompts() -> Vec<Vec<u32>> {
    (0..THREADS as u32)
        .map(|i| (0..5 + 3 * i).map(|j| (j * 37 + i * 11) % 256).collect())
        .collect()
}

#[test]
fn one_device_model_serves_8_threads_with_the_serial_tokens() {
    let cfg: LmConfig = serde_json::from_str(
        r#"{"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "num_kv_reuse_layers": 1}"#,
    )
    .unwrap();
    let t = random_tensors(&cfg, 8).unwrap();
    let dense = Arc::new(
        DeviceModel::from_source(&WeightSource::from_tensors(t.clone()), cfg.clone()).unwrap(),
    );
    let d = dense.clone();
    same_on_8_threads(prompts(), move |p| greedy_ids(&d, p));

    for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let dir = std::env::temp_dir().join(format!("afm-concurrency-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{dt:?}.gguf"));
        write_gguf(&p, &cfg, &t, dt).unwrap();
        let q = Arc::new(DeviceModel::load(&p).unwrap());
        assert_eq!(q.info().vocab_size, 256);
        let qq = q.clone();
        same_on_8_threads(prompts(), move |p| greedy_ids(&qq, p));
        std::fs::remove_dir_all(dir).ok();
    }
}
