//! The caption-slot objective (`afm_train::caption_slots`) on the tiny random LM and the tiny
//! fixture tokenizer: its targets, its loss against a hand computation, training on it alone
//! (no LM forward) lowering it, the settings that are refused, and a run continuing from an
//! earlier export's adapter.

mod common;

use afm_train::adapter_train::{batch, slot_targets, step_loss, AdapterTrainConfig, Trainable};
use afm_train::caption_slots::{targets, CaptionSlots, SlotHead};
use afm_train::optim::AdamW;
use afm_train::prompt::PromptFormat;
use afm_train::Split;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

fn slots_cfg(lm_loss: bool) -> AdapterTrainConfig {
    AdapterTrainConfig {
        caption_slots: Some(CaptionSlots {
            weight: 1.0,
            mse_weight: 0.5,
            logit_scale: 4.0,
        }),
        lm_loss,
        ..AdapterTrainConfig::test_tiny()
    }
}

#[test]
fn targets_are_the_caption_tokens_cut_or_padded_to_the_slots() {
    let tok = common::tokenizer();
    let ids = tok
        .inner()
        .encode("A red circle.", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(ids.len() >= 2, "{ids:?}");
    let pad = 7;
    let long = targets(&tok, "A red circle.", ids.len() + 3, pad).unwrap();
    assert_eq!(&long[..ids.len()], ids.as_slice());
    assert_eq!(&long[ids.len()..], &[pad, pad, pad]);
    let short = targets(&tok, "A red circle.", 2, pad).unwrap();
    assert_eq!(short, ids[..2].to_vec());
    assert_eq!(targets(&tok, "", 3, pad).unwrap(), vec![pad; 3]);
}

#[test]
fn loss_is_scaled_cross_entropy_over_the_words_plus_squared_error_over_every_slot() {
    let lm = common::frozen_lm("tiny-random");
    let head = SlotHead::new(&lm.model).unwrap();
    let v = lm.info.vocab_size as u32;
    let h = lm.hidden_size();
    let table = lm
        .model
        .embed(
            &Tensor::arange(0u32, v, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let img = Tensor::randn(0f32, 0.5, (2, 3, h), &Device::Cpu).unwrap();
    let pad = 9u32;
    // two padding slots: squared error only
    let t = vec![vec![1u32, 2, pad], vec![4, pad, v - 1]];
    for (mse_w, scale) in [(0.0f32, 1.0f32), (2.0, 4.0)] {
        let c = CaptionSlots {
            weight: 1.0,
            mse_weight: mse_w,
            logit_scale: scale,
        };
        let got = head.loss(&img, &t, pad, &c).unwrap();
        // by hand: log-softmax over s x . E^T on the word slots, |x - E[t]|^2 on all six
        // in units of E's mean square
        let x: Vec<Vec<f32>> = img.reshape((6, h)).unwrap().to_vec2().unwrap();
        let e: Vec<Vec<f32>> = table.to_vec2().unwrap();
        let ms: f32 = e.iter().flatten().map(|a| a * a).sum::<f32>() / (e.len() * h) as f32;
        let (mut ce, mut se, mut hits, mut words) = (0f64, 0f64, 0, 0);
        for (r, tgt) in t.iter().flatten().enumerate() {
            se += x[r]
                .iter()
                .zip(&e[*tgt as usize])
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            if *tgt == pad {
                continue;
            }
            words += 1;
            let logits: Vec<f64> = e
                .iter()
                .map(|w| {
                    scale as f64
                        * w.iter()
                            .zip(&x[r])
                            .map(|(a, b)| (a * b) as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            ce += lse - logits[*tgt as usize];
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap();
            hits += (best == *tgt as usize) as usize;
        }
        let want = ce / words as f64 + mse_w as f64 * se / (6.0 * h as f64) / ms as f64;
        let l = got.loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (l - want).abs() < 1e-4 * want.abs().max(1.0),
            "{l} vs {want}"
        );
        assert_eq!(got.words, 4);
        assert_eq!(got.hits, hits);
        assert_eq!(got.accuracy(), hits as f32 / 4.0);
    }
    let c = CaptionSlots {
        weight: 1.0,
        mse_weight: 5.0,
        logit_scale: 1.0,
    };
    // image tokens equal to their targets' embeddings: no squared error left
    let exact = table
        .index_select(&Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap(), 0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = head
        .loss(
            &exact,
            &[vec![1, 2, 3]],
            pad,
            &CaptionSlots {
                mse_weight: 0.0,
                ..c
            },
        )
        .unwrap();
    let b = head.loss(&exact, &[vec![1, 2, 3]], pad, &c).unwrap();
    let (a, b) = (
        a.loss.to_scalar::<f32>().unwrap(),
        b.loss.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    // all padding: the squared error alone, accuracy 0 over 0 words
    let p = head
        .loss(&img, &[vec![pad; 3], vec![pad; 3]], pad, &c)
        .unwrap();
    assert_eq!((p.words, p.hits, p.accuracy()), (0, 0, 0.0));
    assert!(p.loss.to_scalar::<f32>().unwrap() > 0.0);
    // mismatched targets are an error, not a panic
    assert!(head.loss(&img, &t[..1], pad, &c).is_err());
    assert!(head.loss(&img, &[vec![1, 2], vec![1, 2]], pad, &c).is_err());
}

#[test]
fn training_on_caption_slots_alone_lowers_that_loss_and_raises_its_accuracy() {
    let lm = common::frozen_lm("tiny-random");
    let cfg = AdapterTrainConfig {
        adamw: afm_train::optim::AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..slots_cfg(false)
    };
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let head = SlotHead::new(&lm.model).unwrap();
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    let b = batch(&cfg, &fmt, Split::Train, 0, cfg.batch_size, None).unwrap();
    let t = slot_targets(&cfg, &fmt, &b.captions).unwrap();
    assert_eq!(t.len(), cfg.batch_size);
    assert!(t.iter().all(|r| r.len() == cfg.tokens_per_image()));
    let accuracy = |tr: &Trainable| {
        let side = tr.build(&cfg, 32).unwrap();
        let img = side.embed(&b.pixels).unwrap().detach();
        head.loss(
            &img,
            &t,
            fmt.placeholder_id(),
            cfg.caption_slots.as_ref().unwrap(),
        )
        .unwrap()
        .accuracy()
    };
    let acc0 = accuracy(&tr);
    let mut opt = AdamW::new(&tr.params, cfg.adamw).unwrap();
    let mut losses = vec![];
    for _ in 0..30 {
        let loss = step_loss(&cfg, &tr, &lm, &fmt, &b, Some(&head)).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let g = loss.backward().unwrap();
        opt.step(&tr.params, &g, cfg.adamw.lr).unwrap();
    }
    let acc1 = accuracy(&tr);
    println!(
        "caption-slot loss {:.3} -> {:.3}, slot accuracy {acc0:.3} -> {acc1:.3}",
        losses[0],
        losses.last().unwrap()
    );
    assert!(*losses.last().unwrap() < 0.5 * losses[0], "{losses:?}");
    assert!(acc1 > acc0 + 0.25, "{acc0} -> {acc1}");
    // the same step with the answer loss added is larger by exactly that loss
    let both = slots_cfg(true);
    let l_both = step_loss(&both, &tr, &lm, &fmt, &b, Some(&head))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let answers = AdapterTrainConfig {
        caption_slots: None,
        ..both.clone()
    };
    let l_ans = step_loss(&answers, &tr, &lm, &fmt, &b, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let l_slots = step_loss(&slots_cfg(false), &tr, &lm, &fmt, &b, Some(&head))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (l_both - (l_ans + l_slots)).abs() < 1e-4 * l_both,
        "{l_both} {l_ans} {l_slots}"
    );
    // without the embedding table the slot loss is an error, not a silent zero
    assert!(step_loss(&both, &tr, &lm, &fmt, &b, None).is_err());
}

#[test]
fn settings_without_a_loss_or_with_bad_weights_are_refused() {
    let none = AdapterTrainConfig {
        lm_loss: false,
        ..AdapterTrainConfig::test_tiny()
    };
    let e = none.validate().unwrap_err().to_string();
    assert!(e.contains("nothing to train"), "{e}");
    for (w, m, s) in [
        (0.0, 1.0, 1.0),
        (f32::NAN, 1.0, 1.0),
        (1.0, -1.0, 1.0),
        (1.0, 1.0, 0.0),
    ] {
        let c = AdapterTrainConfig {
            caption_slots: Some(CaptionSlots {
                weight: w,
                mse_weight: m,
                logit_scale: s,
            }),
            ..AdapterTrainConfig::test_tiny()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("caption_slots"), "{e}");
    }
    // a config written before these fields existed reads as the answer loss alone
    let mut v = serde_json::to_value(AdapterTrainConfig::test_tiny()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("caption_slots");
    o.remove("lm_loss");
    let c: AdapterTrainConfig = serde_json::from_value(v).unwrap();
    assert!(c.lm_loss && c.caption_slots.is_none());
}

#[test]
fn a_run_starts_from_an_earlier_adapter_and_refuses_a_mismatched_one() {
    let cfg = AdapterTrainConfig::test_tiny();
    let first = Trainable::init(&cfg, 32, None).unwrap();
    let d = std::env::temp_dir().join(format!("afm-slots-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    // an "earlier" adapter: the fresh one scaled, saved as an export's adapter file
    let saved: HashMap<String, Tensor> = first
        .params
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.starts_with("adapter."))
        .map(|(k, v)| (k, (v * 3.0).unwrap()))
        .collect();
    let f = d.join("adapter.safetensors");
    candle_core::safetensors::save(&saved, &f).unwrap();
    let tr = Trainable::init_from(&cfg, 32, None, Some(&f)).unwrap();
    for (k, v) in &saved {
        let got = tr.params.get(k).unwrap();
        assert_eq!(afm_lm::testing::max_abs_diff(got, v).unwrap(), 0.0, "{k}");
    }
    // missing, mis-shaped and foreign tensors are refused, naming the tensor
    let refused = |edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
        let mut t = saved.clone();
        edit(&mut t);
        candle_core::safetensors::save(&t, &f).unwrap();
        Trainable::init_from(&cfg, 32, None, Some(&f))
            .err()
            .unwrap()
            .to_string()
    };
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = refused(&|t| {
        t.remove("adapter.proj.weight");
    });
    assert!(e.contains("adapter.proj.weight"), "{e}");
    let e = refused(&|t| {
        t.insert("adapter.proj.bias".into(), zeros(5));
    });
    assert!(
        e.contains("adapter.proj.bias") && e.contains("shape"),
        "{e}"
    );
    let e = refused(&|t| {
        t.insert("adapter.extra".into(), zeros(1));
    });
    assert!(e.contains("adapter.extra"), "{e}");
    std::fs::write(&f, b"not safetensors").unwrap();
    assert!(Trainable::init_from(&cfg, 32, None, Some(&f)).is_err());
    let _ = std::fs::remove_dir_all(&d);
}
