//! The afm-tiny inference pipeline (`afm_fusion::Vlm` in its afm-tiny configuration) over an export written by the
//! stage-2 trainer (tiny random LM, the tiny fixture tokenizer): its first-token logits equal
//! the training path's (DiffLm over the spliced embeddings) and its greedy answers equal the
//! training evaluation's greedy answers; bad exports and wrong language models are refused
//! with errors naming the problem.

mod common;

use afm_fusion::afm_prompt::{view_order, View};
use afm_fusion::afm_tiny::{load_export, verify_lm, AfmTinyConfig};
use afm_fusion::{AskOptions, TilingSettings, Vlm};
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, GenerateOptions};
use afm_train::adapter_train::{
    greedy, input_embeddings, pick, run, AdapterTrainConfig, FrozenLm, Trainable,
};
use afm_train::pretrain::{example, pixels};
use afm_train::prompt::PromptFormat;
use afm_train::Split;
use afm_vision::preprocess::resize;
use afm_vision::Filter;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-tiny-inf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The inference model: the same weights behind the fast on-device implementation.
fn device_lm() -> DeviceModel {
    DeviceModel::from_source(
        &WeightSource::from_tensors(common::lm_tensors()),
        common::lm_config(),
    )
    .unwrap()
}

/// A complete test-tiny run (4 steps) and its export.
fn trained(name: &str) -> (AdapterTrainConfig, FrozenLm, PathBuf) {
    let cfg = AdapterTrainConfig::test_tiny();
    let lm = common::frozen_lm("tiny-random.gguf");
    let dir = tmp(name);
    let st = run(&cfg, &lm, None, None, &dir, None, None, None, &mut |_| {}).unwrap();
    assert_eq!(st.step, cfg.total_steps());
    (cfg, lm, dir)
}

/// The training path's logits at position `t - 1` of the first sequence of `x`.
///
/// # Shapes
/// `x: (b, len, hidden)` -> `vocab` values.
fn last_logits(lm: &afm_lm::diff_model::DiffLm, x: &candle_core::Tensor, t: usize) -> Vec<f32> {
    let hs = lm.hidden_states(x).unwrap().get(0).unwrap();
    lm.logits(&hs.narrow(0, t - 1, 1).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn pipeline(export: &Path) -> Vlm<DeviceModel> {
    let (c, vit, adapter) = load_export(export).unwrap();
    Vlm::afm_tiny(c, vit, adapter, device_lm(), common::tokenizer()).unwrap()
}

#[test]
fn inference_matches_the_training_path() {
    let (cfg, lm, dir) = trained("parity");
    let export = dir.join("afm-tiny");
    let tiny = pipeline(&export);
    // the training side, rebuilt from the run's checkpoint (differentiable ops)
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    afm_train::optim::load_checkpoint(&dir.join("checkpoint.safetensors"), &tr.params, cfg.adamw)
        .unwrap();
    let side = tr.build(&cfg, 32).unwrap();
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let max_new = 8;
    let mut worst = 0f32;
    let mut generated = 0;
    for j in 0..4u64 {
        let s = example(j, Split::HeldOut, None).unwrap();
        let (q, _, _) = pick(&s, j, false).unwrap();
        let prompt = fmt.prompt_ids(&q, cfg.tokens_per_image()).unwrap();
        let img = side
            .embed(
                &pixels(&s, cfg.vision.image_size)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap()
            .detach();
        // training path: DiffLm over the spliced embeddings, last position
        let x = input_embeddings(&lm.model, &[&prompt], fmt.placeholder_id(), &img).unwrap();
        let t = prompt.len();
        let want = last_logits(&lm.model, &x, t);
        let want_ids = greedy(
            &lm.model,
            std::slice::from_ref(&prompt),
            fmt.placeholder_id(),
            &img,
            max_new,
            fmt.end_of_turn_id(),
        )
        .unwrap()
        .remove(0);
        // inference path: the export through Vlm, greedy
        let opts = AskOptions {
            generate: GenerateOptions {
                max_new_tokens: max_new,
                ..Default::default()
            },
            max_image_tokens: None,
        };
        let mut streamed = String::new();
        let ans = tiny
            .ask(&s.image, &q, &opts, &mut |p| {
                streamed.push_str(p);
                true
            })
            .unwrap();
        assert_eq!(ans.prompt_tokens, t);
        assert_eq!(ans.plan.image_tokens, 4);
        let got = &ans.generation.first_logits;
        assert_eq!(got.len(), want.len());
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(d);
        generated += want_ids.len();
        assert!(d < 1e-3, "question {j}: first-token logits differ by {d}");
        assert_eq!(
            ans.generation.ids, want_ids,
            "question {j} `{q}`: greedy answers differ"
        );
        assert_eq!(
            ans.generation.text,
            lm.tokenizer.decode(&want_ids, true).unwrap()
        );
        assert_eq!(streamed, ans.generation.text);
    }
    assert!(
        generated > 0,
        "every greedy answer was empty: nothing compared"
    );
    println!("afm-tiny inference vs training path: max |first-token logit diff| = {worst:e}");
    // caption and describe_screen use the export's caption prompt
    let s = example(0, Split::HeldOut, None).unwrap();
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 3,
            ..Default::default()
        },
        max_image_tokens: None,
    };
    let c = tiny.caption(&s.image, &opts, &mut |_| true).unwrap();
    let a = tiny
        .ask(&s.image, tiny.caption_prompt(), &opts, &mut |_| true)
        .unwrap();
    assert_eq!(c.generation.ids, a.generation.ids);
    let sc = tiny
        .describe_screen(&s.image, &opts, &mut |_| true)
        .unwrap();
    assert_eq!(sc.generation.ids, a.generation.ids);
    // an image is encoded once: its first request runs the encoder, the next ones reuse the
    // embeddings (example 7 is not among the images asked about above)
    let s7 = example(7, Split::HeldOut, None).unwrap();
    let first = tiny.caption(&s7.image, &opts, &mut |_| true).unwrap();
    assert!(!first.image_from_cache && first.encode_secs > 0.0);
    let again = tiny.ask(&s7.image, "x", &opts, &mut |_| true).unwrap();
    assert!(again.image_from_cache && again.encode_secs == 0.0);
    let screen = tiny
        .describe_screen(&s7.image, &opts, &mut |_| true)
        .unwrap();
    assert!(screen.image_from_cache);
    assert_eq!(screen.generation.ids, first.generation.ids);
    let cached = tiny.encode_image(&s7.image, None).unwrap();
    let hit = cached.from_cache;
    assert!(hit);
    let plan = tiny
        .plan(s7.image.width(), s7.image.height(), None)
        .unwrap();
    let px = tiny.processor().pixel_values(&s7.image, &plan).unwrap();
    let fresh = tiny.embed_pixels(&px).unwrap();
    let d = (&cached.embeds - &fresh).unwrap().abs().unwrap();
    assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // a budget below the fixed 4 image tokens is refused; one at or above is met
    let e = tiny
        .ask(
            &s.image,
            "x",
            &AskOptions {
                max_image_tokens: Some(3),
                ..opts.clone()
            },
            &mut |_| true,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("budget of 3") && e.contains("4 tokens"), "{e}");
    assert!(tiny.plan(640, 480, Some(4)).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same export with a `tiling` section: an image becomes the overview plus tiles, and the
/// sequence training would build from those views (`PromptFormat` with `plan.image_tokens`
/// placeholders, the views' embeddings in `view_order`) gives the pipeline's logits.
#[test]
fn tiled_export_matches_the_training_path_over_its_views() {
    let (cfg, lm, dir) = trained("tiled");
    let (mut c, vit, adapter) = load_export(&dir.join("afm-tiny")).unwrap();
    let n = cfg.tokens_per_image();
    c.tiling = Some(TilingSettings {
        tile: cfg.vision.image_size as u32,
        max_tokens: 7 * n,
        overview: true,
    });
    let tiny = Vlm::afm_tiny(c, vit, adapter, device_lm(), common::tokenizer()).unwrap();
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    afm_train::optim::load_checkpoint(&dir.join("checkpoint.safetensors"), &tr.params, cfg.adamw)
        .unwrap();
    let side = tr.build(&cfg, 32).unwrap();
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let s = example(5, Split::HeldOut, None).unwrap();
    let (q, _, _) = pick(&s, 5, false).unwrap();
    // 3 x 2 tiles of 32 px + the overview = 7 views
    let img = resize(&s.image, 96, 64, Filter::Bicubic).unwrap();
    let plan = tiny.plan(96, 64, None).unwrap();
    assert_eq!(
        (
            plan.cols,
            plan.rows,
            plan.overview,
            plan.tiles,
            plan.image_tokens
        ),
        (3, 2, true, 7, 7 * n)
    );
    assert_eq!(view_order(&plan)[0], View::Whole);
    let px = tiny.processor().pixel_values(&img, &plan).unwrap();
    let views = side.embed(&px).unwrap().detach(); // (7, n, d)
    let d = views.dim(2).unwrap();
    let image = views.reshape((1, 7 * n, d)).unwrap();
    let prompt = fmt.prompt_ids(&q, plan.image_tokens).unwrap();
    let x = input_embeddings(&lm.model, &[&prompt], fmt.placeholder_id(), &image).unwrap();
    let t = prompt.len();
    let want = last_logits(&lm.model, &x, t);
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 2,
            ..Default::default()
        },
        max_image_tokens: None,
    };
    let ans = tiny.ask(&img, &q, &opts, &mut |_| true).unwrap();
    assert_eq!(ans.plan, plan);
    assert_eq!(ans.prompt_tokens, t);
    let diff = ans
        .generation
        .first_logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "first-token logits differ by {diff}");
    // a budget below the native grid: fewer, downscaled tiles, and the plan says so
    let small = tiny
        .ask(
            &img,
            &q,
            &AskOptions {
                max_image_tokens: Some(3 * n),
                ..opts.clone()
            },
            &mut |_| true,
        )
        .unwrap();
    assert!(small.plan.image_tokens <= 3 * n && small.plan.downscale.is_some());
    assert!(small.plan.describe().contains("downscaled"));
    assert_eq!(
        small.prompt_tokens,
        fmt.prompt_ids(&q, small.plan.image_tokens).unwrap().len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_exports_and_wrong_language_models_are_refused_by_name() {
    let (_cfg, _lm, dir) = trained("errors");
    let export = dir.join("afm-tiny");
    let cj = export.join("config.json");
    let good: AfmTinyConfig = serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    assert!(afm_fusion::afm_tiny::is_afm_tiny(&export).unwrap());

    // a language model file whose sha256 is not the recorded one
    let lm_file = dir.join("tiny-random.gguf");
    std::fs::write(&lm_file, b"not the model").unwrap();
    let e = verify_lm(&lm_file, &good.lm).unwrap_err().to_string();
    assert!(
        e.contains("tiny-random.gguf") && e.contains("sha256") && e.contains("trained against"),
        "{e}"
    );
    let e = Vlm::load_afm_tiny(&export, &lm_file)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sha256"), "{e}");
    // a missing language model
    let e = Vlm::load_afm_tiny(&export, &dir.join("nope.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("nope.gguf") && e.contains("tiny-random.gguf"),
        "{e}"
    );
    // it is looked for beside the export and in the run directory
    let cands = afm_fusion::afm_tiny::lm_candidates(&export, &good);
    assert_eq!(
        cands,
        vec![export.join("tiny-random.gguf"), lm_file.clone()]
    );

    // the wrong language model behind the pipeline (width / vocabulary)
    let (c, vit, adapter) = load_export(&export).unwrap();
    let mut other = good.clone();
    other.lm.vocab_size = 1000;
    let e = Vlm::afm_tiny(other, vit, adapter, device_lm(), common::tokenizer())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("1000 tokens"), "{e}");
    // a placeholder id that is not the tokenizer's
    let (_, vit, adapter) = load_export(&export).unwrap();
    let mut other = c.clone();
    other.image_placeholder_id += 1;
    let e = Vlm::afm_tiny(other, vit, adapter, device_lm(), common::tokenizer())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("image_placeholder_id"), "{e}");
    // an inconsistent config: tokens_per_image vs the adapter's pool
    let mut bad = good.clone();
    bad.tokens_per_image = 5;
    std::fs::write(&cj, serde_json::to_string(&bad).unwrap()).unwrap();
    let e = load_export(&export).err().unwrap().to_string();
    assert!(
        e.contains("tokens_per_image 5") && e.contains("config.json"),
        "{e}"
    );
    std::fs::write(&cj, serde_json::to_string(&good).unwrap()).unwrap();
    // a missing adapter file
    std::fs::rename(
        export.join("adapter.safetensors"),
        dir.join("adapter.safetensors"),
    )
    .unwrap();
    let e = load_export(&export).err().unwrap().to_string();
    assert!(e.contains("adapter.safetensors"), "{e}");
    std::fs::rename(
        dir.join("adapter.safetensors"),
        export.join("adapter.safetensors"),
    )
    .unwrap();
    // a missing vision directory
    std::fs::rename(export.join("vision"), dir.join("vision")).unwrap();
    let e = load_export(&export).err().unwrap().to_string();
    assert!(e.contains("vision"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Stage 2 with `tiling`: every training and held-out image becomes the overview plus tiles
/// (its sequence holds one placeholder per view token), the export carries the tiling
/// section, and the pipeline over that export gives the training path's first-token logits
/// on a held-out image of its own plan.
#[test]
fn tiled_training_builds_the_inference_sequences_and_exports_tiling() {
    let cfg = AdapterTrainConfig {
        tiling: Some(TilingSettings {
            tile: 32,
            max_tokens: 10 * 4,
            overview: true,
        }),
        ..AdapterTrainConfig::test_tiny()
    };
    let lm = common::frozen_lm("tiny-random.gguf");
    let dir = tmp("tiled-train");
    let st = run(&cfg, &lm, None, None, &dir, None, None, None, &mut |_| {}).unwrap();
    assert_eq!(st.step, cfg.total_steps());
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let n = cfg.tokens_per_image();
    let b = afm_train::adapter_train::batch(&cfg, &fmt, Split::Train, 0, 6, None).unwrap();
    assert!(
        b.view_counts.iter().all(|&c| c > 1 && c <= 10),
        "{:?}",
        b.view_counts
    );
    assert_eq!(
        b.pixels.dim(0).unwrap(),
        b.view_counts.iter().sum::<usize>()
    );
    for (e, c) in b.examples.iter().zip(&b.view_counts) {
        let k = e.ids.iter().filter(|&&x| x == fmt.placeholder_id()).count();
        assert_eq!(k, c * n);
    }
    let export = dir.join("afm-tiny");
    let c = AfmTinyConfig::from_file(&export.join("config.json")).unwrap();
    assert_eq!(c.tiling, cfg.tiling);
    let tiny = pipeline(&export);
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    afm_train::optim::load_checkpoint(&dir.join("checkpoint.safetensors"), &tr.params, cfg.adamw)
        .unwrap();
    let side = tr.build(&cfg, 32).unwrap();
    let hb = afm_train::adapter_train::batch(&cfg, &fmt, Split::HeldOut, 3, 1, None).unwrap();
    let s = example(3, Split::HeldOut, None).unwrap();
    let imgs = afm_train::adapter_train::per_example(
        &side.embed(&hb.pixels).unwrap().detach(),
        &hb.view_counts,
    )
    .unwrap();
    let e = &hb.examples[0];
    let prompt = &e.ids[..e.prompt_len];
    let x = afm_train::adapter_train::input_embeddings_ragged(
        &lm.model,
        &[prompt],
        fmt.placeholder_id(),
        &imgs,
    )
    .unwrap();
    let t = prompt.len();
    let want = last_logits(&lm.model, &x, t);
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 1,
            ..Default::default()
        },
        max_image_tokens: None,
    };
    let ans = tiny
        .ask(&s.image, &hb.questions[0], &opts, &mut |_| true)
        .unwrap();
    assert_eq!(ans.plan.tiles, hb.view_counts[0]);
    assert_eq!(ans.prompt_tokens, t);
    let diff = ans
        .generation
        .first_logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "first-token logits differ by {diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Stage 2 with a LoRA adapter on the LM: the run trains it (its factors move, B from zero),
/// resumes with it from the checkpoint, and exports `lora.safetensors` bound to the LM's
/// hash; the pipeline with that adapter applied gives the training path's logits; the export
/// refuses a second adapter and the adapter refuses another base.
#[test]
fn lora_training_exports_an_adapter_the_pipeline_applies() {
    use afm_train::adapter_train::{prepare_lora, LoraTrain};
    let cfg = AdapterTrainConfig {
        lora: Some(LoraTrain {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q".into(), "v".into(), "down".into()],
        }),
        ..AdapterTrainConfig::test_tiny()
    };
    const SHA: &str = "abababababababababababababababababababababababababababababababab";
    let lm_with_hash = || {
        let model = afm_lm::diff_model::DiffLm::from_source(
            &WeightSource::from_tensors(common::lm_tensors()),
            common::lm_config(),
        )
        .unwrap();
        FrozenLm::new(model, common::tokenizer(), "tiny-random.gguf", SHA)
    };
    let mut lm = lm_with_hash();
    // a run with `lora` refuses an LM without the adapter attached
    let dir = tmp("lora-train");
    let e = run(&cfg, &lm, None, None, &dir, None, None, None, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("prepare_lora"), "{e}");
    prepare_lora(&cfg, &mut lm).unwrap();
    let st = run(
        &cfg,
        &lm,
        None,
        None,
        &dir,
        None,
        None,
        Some(2),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(st.step, 2);
    // resume in a fresh process-like state: a new LM, the adapter attached again (fresh B = 0)
    let mut lm2 = lm_with_hash();
    prepare_lora(&cfg, &mut lm2).unwrap();
    let st = run(&cfg, &lm2, None, None, &dir, None, None, None, &mut |_| {}).unwrap();
    assert_eq!(st.step, cfg.total_steps());
    let export = dir.join("afm-tiny");
    let file = export.join("lora.safetensors");
    let adapter = afm_lm::LoraAdapter::load(&file).unwrap();
    assert_eq!(adapter.base_sha256(), SHA);
    assert_eq!(adapter.config().rank, 2);
    let moved = adapter
        .modules()
        .values()
        .map(|p| {
            p.b.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max);
    assert!(moved > 0.0, "the LoRA B factors never left zero");
    // the pipeline with the exported adapter against the training path (DiffLm + LoRA)
    let (c, vit, ad) = load_export(&export).unwrap();
    let mut tiny = Vlm::afm_tiny(c, vit, ad, device_lm(), common::tokenizer()).unwrap();
    let base_first = {
        let s = example(2, Split::HeldOut, None).unwrap();
        let opts = AskOptions {
            generate: GenerateOptions {
                max_new_tokens: 1,
                ..Default::default()
            },
            max_image_tokens: None,
        };
        tiny.ask(&s.image, "What is it?", &opts, &mut |_| true)
            .unwrap()
            .generation
            .first_logits
    };
    let other = "cd".repeat(32);
    let err = tiny.apply_lora(&adapter, &other).err().unwrap().to_string();
    assert!(err.contains(&other) && err.contains(SHA), "{err}");
    tiny.apply_lora(&adapter, SHA).unwrap();
    let s = example(2, Split::HeldOut, None).unwrap();
    let fmt = PromptFormat::new(&lm2.tokenizer, &cfg.image_placeholder).unwrap();
    let px = tiny
        .processor()
        .pixel_values(
            &s.image,
            &tiny.plan(s.image.width(), s.image.height(), None).unwrap(),
        )
        .unwrap();
    let img = tiny.embed_pixels(&px).unwrap();
    let n = img.elem_count() / 32;
    let img = img.reshape((1, n, 32)).unwrap();
    let prompt = fmt.prompt_ids("What is it?", n).unwrap();
    let x = input_embeddings(&lm2.model, &[&prompt], fmt.placeholder_id(), &img).unwrap();
    let t = prompt.len();
    let want = last_logits(&lm2.model, &x, t);
    let opts = AskOptions {
        generate: GenerateOptions {
            max_new_tokens: 1,
            ..Default::default()
        },
        max_image_tokens: None,
    };
    let got = tiny
        .ask(&s.image, "What is it?", &opts, &mut |_| true)
        .unwrap()
        .generation
        .first_logits;
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(diff(&got, &want) < 1e-3, "with LoRA: {}", diff(&got, &want));
    assert!(
        diff(&got, &base_first) > 1e-4,
        "the adapter changed nothing"
    );
    // an export carrying its own adapter refuses a second one, before loading anything
    let m = afm_fusion::ModelDir::open(&export).unwrap();
    assert_eq!(m.own_lora().as_deref(), Some(file.as_path()));
    let e = m
        .load_with_lora(Some(Path::new("/nonexistent.gguf")), Some(&file))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("carries its own LoRA adapter"), "{e}");
    // a next run can start from the exported adapter (`afm train adapter --init-lora`): the
    // LM then computes exactly what the export's adapter computes
    use afm_train::adapter_train::prepare_lora_from;
    let mut lm3 = lm_with_hash();
    prepare_lora_from(&cfg, &mut lm3, Some(&file)).unwrap();
    let x3 = input_embeddings(&lm3.model, &[&prompt], fmt.placeholder_id(), &img).unwrap();
    let again = last_logits(&lm3.model, &x3, t);
    assert!(diff(&again, &want) < 1e-5, "{}", diff(&again, &want));
    // ... and refuses one of another shape, another base, or a run without `lora`
    let other_rank = AdapterTrainConfig {
        lora: Some(LoraTrain {
            rank: 4,
            ..cfg.lora.clone().unwrap()
        }),
        ..cfg.clone()
    };
    let e = prepare_lora_from(&other_rank, &mut lm_with_hash(), Some(&file))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 2") && e.contains("rank 4"), "{e}");
    let mut other_base = common::frozen_lm("tiny-random");
    let e = prepare_lora_from(&cfg, &mut other_base, Some(&file))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(SHA), "{e}");
    let no_lora = AdapterTrainConfig {
        lora: None,
        ..cfg.clone()
    };
    let e = prepare_lora_from(&no_lora, &mut lm_with_hash(), Some(&file))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no `lora` section"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
