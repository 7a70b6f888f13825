//! Stage-1 training: AdamW against its formula, a few steps lower the contrastive loss, a
//! resumed run equals an uninterrupted one, the exported encoder loads and computes what the
//! training path computed, and bad checkpoints / mismatched resumptions are refused by name.

use afm_lm::Tokenizer;
use afm_train::optim::{load_checkpoint, save_checkpoint, AdamW, AdamWConfig, Params};
use afm_train::pretrain::{
    batch, contrastive_loss, init_params, run, Event, PretrainConfig, TextTower,
};
use afm_train::Split;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-pretrain-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The tiny SmolVLM fixture's tokenizer (451 tokens) with a seeded random 24-wide table.
fn text_tower() -> TextTower {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_idefics3");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let v = 512;
    let table: Vec<f32> = (0..v * 24).map(|i| ((i as f32) * 0.7131).sin()).collect();
    TextTower::new(tok, Tensor::from_vec(table, (v, 24), &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn adamw_step_matches_the_formula() {
    let mut t = HashMap::new();
    t.insert(
        "p".to_string(),
        Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap(),
    );
    let params = Params::from_tensors(t).unwrap();
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
        max_grad_norm: 0.0,
    };
    let mut opt = AdamW::new(&params, cfg).unwrap();
    let (mut p, mut m, mut v) = (vec![1.0f64, -2.0, 0.5], vec![0f64; 3], vec![0f64; 3]);
    for step in 1..=3 {
        let loss = params.get("p").unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&params, &grads, cfg.lr).unwrap();
        for i in 0..3 {
            let g = 2.0 * p[i];
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.99 * v[i] + 0.01 * g * g;
            let mh = m[i] / (1.0 - 0.9f64.powi(step));
            let vh = v[i] / (1.0 - 0.99f64.powi(step));
            p[i] = p[i] * (1.0 - 0.1 * 0.1) - 0.1 * mh / (vh.sqrt() + 1e-8);
        }
    }
    let got: Vec<f32> = params.get("p").unwrap().to_vec1().unwrap();
    for (a, b) in got.iter().zip(&p) {
        assert!((*a as f64 - b).abs() < 1e-5, "{got:?} vs {p:?}");
    }
    // clipping scales the gradient to the stated norm
    let mut t = HashMap::new();
    t.insert(
        "q".to_string(),
        Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap(),
    );
    let q = Params::from_tensors(t).unwrap();
    let mut opt = AdamW::new(
        &q,
        AdamWConfig {
            max_grad_norm: 1.0,
            ..cfg
        },
    )
    .unwrap();
    let g = q.get("q").unwrap().sum_all().unwrap().backward().unwrap();
    let norm = opt.step(&q, &g, 0.1).unwrap();
    assert!((norm - 2f64.sqrt()).abs() < 1e-6, "{norm}");
}

#[test]
fn a_few_steps_lower_the_loss_on_a_tiny_batch() {
    let cfg = PretrainConfig::test_tiny();
    let text = text_tower();
    let params = init_params(&cfg, text.width()).unwrap();
    let (px, tx) = batch(&cfg, &text, Split::Train, 0, None).unwrap();
    let mut opt = AdamW::new(&params, cfg.adamw).unwrap();
    let mut losses = vec![];
    // step k follows the run's schedule (warm-up first), on the same batch every time
    for k in 0..12 {
        let (loss, _) = contrastive_loss(&cfg, &params, &px, &tx).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let g = loss.backward().unwrap();
        let norm = opt.step(&params, &g, cfg.lr_at(k)).unwrap();
        assert!(norm > 0.0 && norm.is_finite());
    }
    let (loss, _) = contrastive_loss(&cfg, &params, &px, &tx).unwrap();
    losses.push(loss.to_scalar::<f32>().unwrap());
    println!("contrastive loss over 12 AdamW steps on one batch of 6: {losses:?}");
    assert!(
        losses[1] < losses[0],
        "the first step did not lower the loss: {losses:?}"
    );
    assert!(*losses.last().unwrap() < 0.6 * losses[0], "{losses:?}");
    // every ViT parameter received a gradient (the windowed path is differentiable end to end)
    let (loss, _) = contrastive_loss(&cfg, &params, &px, &tx).unwrap();
    let g = loss.backward().unwrap();
    let missing: Vec<&String> = params
        .names()
        .filter(|n| g.get(params.get(n).unwrap()).is_none())
        .collect();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn resumed_run_equals_uninterrupted_and_export_loads() {
    let cfg = PretrainConfig::test_tiny();
    let text = text_tower();
    let (a, b) = (tmp("a"), tmp("b"));
    let mut events = vec![];
    let sa = run(&cfg, &text, &a, None, None, None, &mut |e| {
        events.push(format!("{e:?}"))
    })
    .unwrap();
    assert_eq!(sa.step, 6);
    assert_eq!(sa.history.len(), 2);
    assert!(events.iter().any(|e| e.starts_with("Done")));
    // b: stop after 4 steps, then resume
    let sb = run(&cfg, &text, &b, None, None, Some(4), &mut |_| {}).unwrap();
    assert_eq!(sb.step, 4);
    assert!(
        !b.join("vision").exists(),
        "export before the run is complete"
    );
    let mut resumed = None;
    let sb = run(&cfg, &text, &b, None, None, None, &mut |e| {
        if let Event::Resumed { step } = e {
            resumed = Some(*step)
        }
    })
    .unwrap();
    assert_eq!(resumed, Some(4));
    assert_eq!(sb.history, {
        let mut h = sa.history.clone();
        for (x, y) in h.iter_mut().zip(&sb.history) {
            x.seconds = y.seconds;
        }
        h
    });
    let load = |d: &PathBuf| {
        candle_core::safetensors::load(d.join("vision/model.safetensors"), &Device::Cpu).unwrap()
    };
    let (ta, tb) = (load(&a), load(&b));
    let mut worst = 0f32;
    for (k, x) in &ta {
        worst = worst.max(afm_lm::testing::max_abs_diff(x, &tb[k]).unwrap());
    }
    println!("resumed vs uninterrupted, max |param diff| {worst:e}");
    assert!(worst < 1e-6, "{worst}");

    // the exported encoder (fast kernels) computes what the training path computed
    let enc = afm_vision::VisionEncoder::load(&a.join("vision")).unwrap();
    let params = Params::from_tensors(
        ta.iter()
            .map(|(k, v)| (k.replace("vision_model.", "vision."), v.clone()))
            .collect(),
    )
    .unwrap();
    let (px, _) = batch(&cfg, &text, Split::HeldOut, 0, None).unwrap();
    let fast = enc.forward(&px).unwrap();
    let mut slow = afm_vision::VisionEncoder::new(
        &afm_vision::weights::VisionWeights::from_tensors(params.with_prefix("vision.")).unwrap(),
        cfg.vision.clone(),
    )
    .unwrap();
    slow.set_fast_kernels(false);
    let d = afm_lm::testing::max_abs_diff(&fast, &slow.forward(&px).unwrap()).unwrap();
    assert!(d < 1e-4, "{d}");

    // resuming with other settings is refused, naming the file
    let mut other = cfg.clone();
    other.batch_size = 4;
    let e = run(&other, &text, &b, None, None, None, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pretrain.json") && e.contains("another configuration"),
        "{e}"
    );
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn bad_checkpoints_are_refused_by_name() {
    let cfg = PretrainConfig::test_tiny();
    let params = init_params(&cfg, 24).unwrap();
    let opt = AdamW::new(&params, cfg.adamw).unwrap();
    let d = tmp("bad");
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("c.safetensors");
    save_checkpoint(&p, &params, &opt).unwrap();
    // a model with a different text width does not fit
    let other = init_params(&cfg, 16).unwrap();
    let e = load_checkpoint(&p, &other, cfg.adamw)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("head.text_proj.weight") && e.contains("shape"),
        "{e}"
    );
    // truncated file
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_checkpoint(&p, &params, cfg.adamw)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("c.safetensors"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}
