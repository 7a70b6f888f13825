//! Seeded mutation and property tests (proptest, stable Rust) over the readers of untrusted
//! input: the GGUF reader, the safetensors reader, `config.json` parsing (LM, server, vision),
//! image decoding with its limits, and the tokenizer's input. Each property is "no panic,
//! and a success is a sane result" (a loaded model has the config's shapes, a decoded image
//! is within the limits, token ids are inside the vocabulary and decode back).
//!
//! CI runs `AFM_FUZZ_CASES` cases per target (default 256) from seed `AFM_FUZZ_SEED` (default
//! 19); a longer local run:
//!
//!     AFM_FUZZ_CASES=20000 AFM_FUZZ_SEED=$RANDOM cargo test --release --test fuzz -- --nocapture
//!
//! A failure prints the seed and the shrunk input (proptest).

mod hostile;

use afm::lm::weights::WeightSource;
use afm::lm::{DeviceModel, LmConfig, ServerConfig};
use afm::vision::image;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::path::PathBuf;

fn cases() -> u32 {
    std::env::var("AFM_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

fn runner() -> TestRunner {
    let seed: u64 = std::env::var("AFM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(19);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    println!("fuzz: {} cases, AFM_FUZZ_SEED={seed}", cases());
    TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            max_shrink_iters: 200,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One edit of a file: `(kind, position, value)`; positions below `hot` (the header) are
/// favoured, where a flipped byte changes a length, a count or a type.
type Edit = (u8, u64, u64);

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec((0u8..7, any::<u64>(), any::<u64>()), 1..6)
}

fn mutate(base: &[u8], hot: usize, edits: &[Edit]) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(kind, pos, val) in edits {
        if b.is_empty() {
            break;
        }
        let hot_pos = (pos as usize) % hot.clamp(1, b.len());
        let any_pos = (pos as usize) % b.len();
        match kind {
            0 => b[hot_pos] ^= (val as u8) | 1,
            1 => {
                // an extreme or random 8-byte value (lengths, counts, dims, offsets)
                let v = [0, 1, u64::MAX, 1 << 63, 1 << 40, val][(val % 6) as usize];
                let end = (hot_pos + 8).min(b.len());
                b[hot_pos..end].copy_from_slice(&v.to_le_bytes()[..end - hot_pos]);
            }
            2 => {
                let v = [0u32, 1, 3, u32::MAX, 13, val as u32][(val % 6) as usize];
                let end = (hot_pos + 4).min(b.len());
                b[hot_pos..end].copy_from_slice(&v.to_le_bytes()[..end - hot_pos]);
            }
            3 => b.truncate(any_pos),
            4 => b[any_pos] ^= (val as u8) | 1,
            5 => {
                let n = (val % 16) as usize;
                b.splice(hot_pos..hot_pos, std::iter::repeat_n(val as u8, n));
            }
            _ => {
                let n = ((val % 16) as usize).min(b.len() - hot_pos);
                b.drain(hot_pos..hot_pos + n);
            }
        }
    }
    b
}

#[test]
fn fuzz_gguf_reader() {
    let cfg = hostile::lm_config();
    let (base, hot) = hostile::base_gguf(&cfg, 3).bytes_and_data_start();
    let dir = tmp("gguf");
    let p = dir.join("m.gguf");
    runner()
        .run(&edits(), |e| {
            std::fs::write(&p, mutate(&base, hot, &e)).unwrap();
            // every layer that reads the file: header, config, tokenizer, weights
            if let Ok(src) = WeightSource::from_gguf(&p) {
                if let Ok(c) = afm::lm::load::config_from_gguf(&src) {
                    prop_assert!(c.validate().is_ok());
                    if let Ok(m) = DeviceModel::from_source(&src, c.clone()) {
                        use afm::lm::LanguageModel;
                        prop_assert_eq!(m.info().vocab_size, c.vocab_size);
                    }
                }
                if let Some(md) = src.gguf_metadata() {
                    let _ = afm::lm::Tokenizer::from_gguf(md);
                }
            }
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn fuzz_safetensors_reader() {
    let cfg = hostile::lm_config();
    let st = hostile::base_st(&cfg, 4);
    let base = st.bytes();
    let hot = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let dir = tmp("st");
    let p = dir.join("model.safetensors");
    runner()
        .run(&edits(), |e| {
            std::fs::write(&p, mutate(&base, hot, &e)).unwrap();
            if let Ok(src) = WeightSource::from_safetensors(std::slice::from_ref(&p)) {
                if let Ok(m) = DeviceModel::from_source(&src, cfg.clone()) {
                    use afm::lm::{LanguageModel, LogitsFor};
                    // a model that loads computes finite logits (weights are checked finite)
                    let l = m
                        .forward_tokens(&[1, 2, 3], &mut m.new_cache(), &LogitsFor::Last)
                        .unwrap();
                    let v = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    prop_assert!(v.iter().all(|x| x.is_finite()));
                }
            }
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(dir).ok();
}

/// JSON values as a hostile `config.json` holds them: the real field names with any value.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|x| json!(x)),
        any::<u64>().prop_map(|x| json!(x)),
        (0u64..300).prop_map(|x| json!(x)),
        prop::sample::select(vec![0u64, 1, 2, 3, 4, 8, 16, 64, 1 << 20, 1 << 26, 1 << 40])
            .prop_map(|x| json!(x)),
        any::<f64>().prop_map(|x| json!(x)),
        "[a-z_]{0,8}".prop_map(|s| json!(s)),
        Just(json!([])),
        Just(json!(["local", "global"])),
        Just(json!({"rope_type": "llama3"})),
    ]
}

fn config_fields() -> Vec<&'static str> {
    vec![
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "eos_token_id",
        "bos_token_id",
        "num_kv_reuse_layers",
        "qk_norm",
        "rope_interleaved",
        "kv_quant",
        "rope_scaling",
        "rope_parameters",
        "num_tracks",
        "track_block_depth",
        "num_layers_per_track",
        "num_experts",
        "experts_per_token",
        "moe_intermediate_size",
        "moe_every",
        "attention_pattern",
        "sliding_window",
        "router_softcap",
        "track_merge",
        "patch_size",
        "image_size",
        "num_channels",
        "hidden_act",
        "layer_norm_eps",
        "attention",
    ]
}

#[test]
fn fuzz_config_json() {
    let base_lm = serde_json::to_value(hostile::lm_config()).unwrap();
    let base_server = serde_json::to_value(ServerConfig::preset("tiny").unwrap()).unwrap();
    let base_vision: serde_json::Value = serde_json::json!({
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_channels": 3, "image_size": 64, "patch_size": 8,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6});
    let fields = config_fields();
    let strat = prop::collection::vec(
        (prop::sample::select(fields), json_value(), any::<bool>()),
        1..8,
    );
    let dir = tmp("cfg");
    runner()
        .run(&strat, |edits| {
            for base in [&base_lm, &base_server, &base_vision] {
                let mut v = base.clone();
                for (k, val, remove) in &edits {
                    if *remove {
                        v.as_object_mut().unwrap().remove(*k);
                    } else {
                        v[*k] = val.clone();
                    }
                }
                if let Ok(c) = LmConfig::from_json(v.clone()) {
                    prop_assert!(c.validate().is_ok());
                    // the sizes a model is built from fit in memory arithmetic
                    prop_assert!(c.vocab_size.checked_mul(c.hidden_size).is_some());
                }
                if let Ok(c) = ServerConfig::from_json(v.clone()) {
                    prop_assert!(c.validate().is_ok());
                    // the RoPE table is bounded, whatever the context
                    let r = afm::lm::rope::Rope::new(
                        c.head_dim,
                        c.rope_theta,
                        c.max_position_embeddings,
                        true,
                    );
                    prop_assert!(r.is_ok());
                }
                let p = dir.join("config.json");
                std::fs::write(&p, v.to_string()).unwrap();
                let _ = afm::vision::VisionConfig::from_file(&p);
            }
            Ok(())
        })
        .unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn fuzz_image_decode_with_limits() {
    use image::ImageFormat as F;
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(37, 29, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 9) as u8, ((x + y) * 3) as u8])
    }));
    let bases: Vec<Vec<u8>> = [F::Png, F::Jpeg, F::Gif, F::Bmp, F::WebP, F::Tiff]
        .into_iter()
        .map(|f| {
            let mut c = std::io::Cursor::new(Vec::new());
            img.write_to(&mut c, f).unwrap();
            c.into_inner()
        })
        .collect();
    let limits = afm::vision::ImageLimits {
        max_file_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };
    runner()
        .run(&(0..bases.len(), edits()), |(i, e)| {
            let b = mutate(&bases[i], 64, &e);
            if let Ok(im) = afm::vision::decode_image(&b, "fuzz", &limits) {
                prop_assert!(im.width() > 0 && im.height() > 0);
                prop_assert!((im.width() as u64) * (im.height() as u64) <= limits.max_pixels);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_tokenizer_input() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_tiny_idefics3");
    let tok = afm::lm::Tokenizer::from_dir(&dir).unwrap();
    let vocab = 448;
    let strat = prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "(<\\|im_start\\|>|<image>|<end_of_utterance>|[a-z ]{0,5}|[0-9]{1,4}|\u{0}|\u{feff}|\n){0,12}",
    ];
    runner()
        .run(&strat, |s| {
            let ids = tok.encode(&s).unwrap();
            prop_assert!(ids.iter().all(|&i| (i as usize) < vocab), "{ids:?}");
            let back = tok.decode(&ids, false).unwrap();
            // byte-level BPE: every input comes back
            prop_assert_eq!(back, s);
            Ok(())
        })
        .unwrap();
}
