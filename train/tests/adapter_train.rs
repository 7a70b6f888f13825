//! Stage-2 training (adapter with the LM frozen) on a tiny random LM and the tiny fixture
//! tokenizer: the prompt format, one step lowering the loss, frozen weights staying frozen,
//! resume equal to an uninterrupted run, and the export loading back.

mod common;

use afm_fusion::VisionAdapter;
use afm_train::adapter_train::{
    batch, common_token_share, load_export, loss_units, pick, pick_turns, run, sequence_loss,
    sequence_loss_weighted, step_grads, step_loss, turn_weights, AdapterTrainConfig, Event,
    FrozenLm, Trainable,
};
use afm_train::optim::AdamW;
use afm_train::prompt::{PromptFormat, CAPTION_PROMPT};
use afm_train::Split;
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-adapter-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn prompt_has_one_placeholder_per_image_token_and_masks_the_answer() {
    let tok = common::tokenizer();
    let fmt = PromptFormat::new(&tok, "<image>").unwrap();
    let ph = tok.token_to_id("<image>").unwrap();
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    let ex = fmt.example("What colour is the circle?", "red", 4).unwrap();
    assert_eq!(ex.ids.iter().filter(|&&i| i == ph).count(), 4);
    // the placeholders are a run at the start of the user turn
    let text = fmt.prompt_text("What colour is the circle?", 4).unwrap();
    assert!(
        text.contains("<|im_start|>user\n<image><image><image><image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    // the loss mask covers exactly the answer tokens and the end-of-turn token
    let answer = tok.inner().encode("red", false).unwrap().get_ids().to_vec();
    let mask = ex.loss_mask();
    assert_eq!(mask.iter().filter(|&&m| m).count(), answer.len() + 1);
    assert!(mask[..ex.prompt_len].iter().all(|&m| !m));
    let mut want = answer.clone();
    want.push(eot);
    assert_eq!(ex.targets(), want.as_slice());
    assert_eq!(
        &ex.ids[..ex.prompt_len],
        fmt.prompt_ids("What colour is the circle?", 4)
            .unwrap()
            .as_slice()
    );
    // a caption is asked with the caption prompt
    assert!(fmt
        .prompt_text(CAPTION_PROMPT, 1)
        .unwrap()
        .contains("<image>\nDescribe the image."));
    // a question containing the placeholder is a mismatch, reported by name
    let e = fmt
        .example("what is <image>?", "x", 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("5 image placeholders") && e.contains("4 embeddings"),
        "{e}"
    );
    // placeholder not in the vocabulary: a clear error
    let e = PromptFormat::new(&tok, "<no_such_token>")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("<no_such_token>") && e.contains("vocabulary"),
        "{e}"
    );
    // no chat template: a clear error
    let mut bare = common::tokenizer();
    bare.set_chat_template(None);
    let e = PromptFormat::new(&bare, "<image>")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("chat template"), "{e}");
    // sequence with a wrong number of placeholders vs image embeddings
    let lm = common::frozen_lm("tiny-random");
    let img = Tensor::zeros((1, 3, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = afm_train::adapter_train::sequence_loss(&lm.model, &[ex], ph, &img)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4 image placeholders for 3 image embeddings"),
        "{e}"
    );
}

#[test]
fn conversation_trains_every_answer_and_starts_as_the_single_question() {
    let tok = common::tokenizer();
    let fmt = PromptFormat::new(&tok, "<image>").unwrap();
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    let enc = |s: &str| tok.inner().encode(s, false).unwrap().get_ids().to_vec();
    let turns = [
        ("What colour is the circle?", "red"),
        ("How many shapes are there?", "3"),
        ("Is there a square?", "no"),
    ];
    let conv = fmt.conversation(&turns, 4).unwrap();
    // one turn is exactly the single-question sequence
    assert_eq!(
        fmt.conversation(&turns[..1], 4).unwrap(),
        fmt.example(turns[0].0, turns[0].1, 4).unwrap()
    );
    // the first turn's prompt is what inference feeds
    assert_eq!(
        &conv.ids[..conv.prompt_len],
        fmt.prompt_ids(turns[0].0, 4).unwrap().as_slice()
    );
    // every answer and its end-of-turn token carry loss, nothing else
    let mut want = vec![];
    for (_, a) in turns {
        want.extend(enc(a));
        want.push(eot);
    }
    assert_eq!(conv.targets(), want);
    assert_eq!(conv.loss_mask().iter().filter(|&&m| m).count(), want.len());
    // later questions are user turns of their own, without the image
    let text = tok.decode(&conv.ids, false).unwrap();
    assert!(
        text.contains("<|im_start|>user\nHow many shapes are there?<|im_end|>"),
        "{text}"
    );
    assert_eq!(text.matches("<image>").count(), 4);
    assert!(fmt.conversation(&[], 4).is_err());
}

#[test]
fn isolated_turns_train_each_answer_exactly_as_asked_alone() {
    let lm = common::frozen_lm("tiny-random");
    let fmt = PromptFormat::new(&lm.tokenizer, "<image>").unwrap();
    let turns = [
        ("What colour is the circle?", "red"),
        (CAPTION_PROMPT, "A red circle and two blue squares."),
        ("How many shapes are there?", "3"),
    ];
    let iso = fmt.isolated_turns(&turns, 4).unwrap();
    let singles: Vec<_> = turns
        .iter()
        .map(|&(q, a)| fmt.example(q, a, 4).unwrap())
        .collect();
    // the same targets, each turn's tokens once, the image once
    let want: Vec<u32> = singles.iter().flat_map(|e| e.targets()).collect();
    assert_eq!(iso.targets(), want);
    let ph = fmt.placeholder_id();
    assert_eq!(iso.ids.iter().filter(|&&i| i == ph).count(), 4);
    let p = iso.packing.as_ref().unwrap();
    assert_eq!(p.segments.len(), iso.ids.len());
    assert_eq!(*p.segments.iter().max().unwrap(), 3);
    // the loss of the packed sequence is the loss of the three sequences asked alone
    let img = common::fixed_image(&[1, 4, 32], 1);
    let img3 = img.repeat((3, 1, 1)).unwrap();
    let alone = sequence_loss(&lm.model, &singles, ph, &img3)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // padded beside a longer plain sequence, as in a batch
    let long = fmt
        .example(
            "Describe the image in great detail please, every shape.",
            "ok",
            4,
        )
        .unwrap();
    let img2 = img.repeat((2, 1, 1)).unwrap();
    let both = [iso.clone(), long.clone()];
    let packed_batch = sequence_loss(&lm.model, &both, ph, &img2)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let long_alone = sequence_loss(&lm.model, std::slice::from_ref(&long), ph, &img)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let n_iso = want.len() as f32;
    let n_long = long.targets().len() as f32;
    let mixed = (alone * n_iso + long_alone * n_long) / (n_iso + n_long);
    println!("isolated turns: alone {alone}, packed beside a plain sequence {packed_batch} (want {mixed})");
    assert!(
        (packed_batch - mixed).abs() < 1e-4,
        "{packed_batch} vs {mixed}"
    );
    let packed = sequence_loss(&lm.model, std::slice::from_ref(&iso), ph, &img)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((packed - alone).abs() < 1e-4, "{packed} vs {alone}");
    // the multi-turn chat of the same turns is a different loss (later turns see earlier)
    let chat = sequence_loss(&lm.model, &[fmt.conversation(&turns, 4).unwrap()], ph, &img)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // (the random LM attends weakly to the earlier turns: the gap is small but far above the
    // 1e-6 at which the packed and alone losses agree)
    println!("multi-turn chat {chat}, isolated {alone}");
    assert!((chat - alone).abs() > 5e-5, "{chat} vs {alone}");
    // per-turn weighting: the mean of the three turns' own mean losses, whatever their lengths
    let each: Vec<f32> = singles
        .iter()
        .map(|e| {
            sequence_loss(&lm.model, std::slice::from_ref(e), ph, &img)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .collect();
    let want_turn = each.iter().sum::<f32>() / 3.0;
    let w = turn_weights(std::slice::from_ref(&iso));
    assert_eq!(w.len(), want.len());
    assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    let per_turn = sequence_loss_weighted(
        &lm.model,
        std::slice::from_ref(&iso),
        ph,
        &[img.get(0).unwrap()],
        true,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    println!(
        "per-turn losses {each:?}: weighted {per_turn} (want {want_turn}), per token {packed}"
    );
    assert!(
        (per_turn - want_turn).abs() < 1e-4,
        "{per_turn} vs {want_turn}"
    );
    // the caption is the long turn: per token and per turn differ
    assert!((per_turn - packed).abs() > 1e-3, "{per_turn} vs {packed}");
    // one turn: the single-question sequence's tokens and loss
    let one = fmt.isolated_turns(&turns[..1], 4).unwrap();
    assert_eq!(one.ids, singles[0].ids);
    assert_eq!(one.loss, singles[0].loss);
    assert!(fmt.isolated_turns(&[], 4).is_err());
    // the config switch builds isolated sequences
    let cfg = AdapterTrainConfig {
        isolate_turns: true,
        qa_per_sequence: 3,
        ..AdapterTrainConfig::test_tiny()
    };
    let b = batch(&cfg, &fmt, Split::Train, 0, 3, None).unwrap();
    assert!(b.examples.iter().all(|e| e.packing.is_some()));
}

#[test]
fn training_sequences_pack_several_questions_and_held_out_asks_one() {
    let mut cfg = AdapterTrainConfig::test_tiny();
    cfg.qa_per_sequence = 3;
    let tok = common::tokenizer();
    let fmt = PromptFormat::new(&tok, &cfg.image_placeholder).unwrap();
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    for j in 0..6u64 {
        let s = afm_train::pretrain::example(j, Split::Train, None).unwrap();
        let turns = pick_turns(&s, j, true, 3).unwrap();
        // the first turn is the single pick, no turn repeats, at most 3
        assert_eq!(turns[0], pick(&s, j, true).unwrap());
        assert!(turns.len() <= 3 && turns.len() == 3.min(s.qa.len() + 1));
        for (i, t) in turns.iter().enumerate() {
            assert!(!turns[..i].contains(t), "turn {i} repeats: {t:?}");
        }
    }
    let b = batch(&cfg, &fmt, Split::Train, 0, 4, None).unwrap();
    let turns_of =
        |e: &afm_train::prompt::Example| e.targets().iter().filter(|&&t| t == eot).count();
    assert!(
        b.examples.iter().all(|e| turns_of(e) >= 2),
        "packed training sequences"
    );
    let h = batch(&cfg, &fmt, Split::HeldOut, 0, 4, None).unwrap();
    assert!(
        h.examples.iter().all(|e| turns_of(e) == 1),
        "held-out: one question each"
    );
}

fn lm_weights_snapshot(lm: &FrozenLm) -> Vec<f32> {
    // the embedding table is the LM's first input: reading it back through `embed` sees any
    // change to the frozen weights
    let ids = Tensor::arange(0u32, 512, &Device::Cpu)
        .unwrap()
        .reshape((1, 512))
        .unwrap();
    let e = lm.model.embed(&ids).unwrap().flatten_all().unwrap();
    let x = lm.model.embed(&ids.narrow(1, 0, 8).unwrap()).unwrap();
    let f = lm.model.forward(&x).unwrap().flatten_all().unwrap();
    [e.to_vec1::<f32>().unwrap(), f.to_vec1::<f32>().unwrap()].concat()
}

#[test]
fn training_steps_lower_the_loss_and_leave_the_lm_alone() {
    let lm = common::frozen_lm("tiny-random");
    let cfg = AdapterTrainConfig {
        // the output norm starts at this LM's embedding scale, as the afm-tiny-norm-packed
        // variant's does at SmolLM2's
        output_norm_gain: Some(lm.token_embedding_rms().unwrap()),
        ..AdapterTrainConfig::test_tiny()
    };
    let before = lm_weights_snapshot(&lm);
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    let b = batch(&cfg, &fmt, Split::Train, 0, cfg.batch_size, None).unwrap();
    let mut opt = AdamW::new(&tr.params, cfg.adamw).unwrap();
    let mut losses = vec![];
    for k in 0..8 {
        let loss = step_loss(&cfg, &tr, &lm, &fmt, &b, None).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let g = loss.backward().unwrap();
        if k == 0 {
            // every trainable parameter (ViT and adapter) gets a gradient
            let missing: Vec<&String> = tr
                .params
                .names()
                .filter(|n| g.get(tr.params.get(n).unwrap()).is_none())
                .collect();
            assert!(missing.is_empty(), "no gradient for {missing:?}");
            assert!(tr.params.names().any(|n| n.starts_with("vision.")));
        }
        opt.step(&tr.params, &g, cfg.lr_at(k.min(1))).unwrap();
    }
    let loss = step_loss(&cfg, &tr, &lm, &fmt, &b, None).unwrap();
    losses.push(loss.to_scalar::<f32>().unwrap());
    println!("adapter loss over 8 steps on one batch of 3: {losses:?}");
    // two turns per sequence: the random LM cannot predict the second turn's answer from the
    // image as well as the first (one turn per sequence drops ~9% here, two ~5%)
    assert!(losses.windows(2).take(4).all(|w| w[1] < w[0]), "{losses:?}");
    assert!(*losses.last().unwrap() < 0.96 * losses[0], "{losses:?}");
    assert_eq!(lm_weights_snapshot(&lm), before, "the frozen LM changed");
}

#[test]
fn frozen_vit_flag_trains_the_adapter_only() {
    let cfg = AdapterTrainConfig {
        train_vit: false,
        ..AdapterTrainConfig::test_tiny()
    };
    let lm = common::frozen_lm("tiny-random");
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    assert!(tr.params.names().all(|n| n.starts_with("adapter.")));
    let vit_before = tr.vit_tensors();
    let b = batch(&cfg, &fmt, Split::Train, 0, cfg.batch_size, None).unwrap();
    let mut opt = AdamW::new(&tr.params, cfg.adamw).unwrap();
    let adapter_before: Vec<f32> = tr
        .params
        .get("adapter.proj.weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for k in 0..2 {
        let loss = step_loss(&cfg, &tr, &lm, &fmt, &b, None).unwrap();
        let g = loss.backward().unwrap();
        opt.step(&tr.params, &g, cfg.lr_at(k)).unwrap();
    }
    for (k, v) in tr.vit_tensors() {
        assert_eq!(
            afm_lm::testing::max_abs_diff(&v, &vit_before[&k]).unwrap(),
            0.0,
            "{k} changed"
        );
    }
    let adapter_after: Vec<f32> = tr
        .params
        .get("adapter.proj.weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(adapter_before, adapter_after);
}

#[test]
fn resumed_run_equals_uninterrupted_and_export_loads() {
    let cfg = AdapterTrainConfig::test_tiny();
    let lm = common::frozen_lm("tiny-random");
    let (a, b) = (tmp("a"), tmp("b"));
    let mut events = vec![];
    let sa = run(&cfg, &lm, None, None, &a, None, None, None, &mut |e| {
        events.push(format!("{e:?}"))
    })
    .unwrap();
    assert_eq!(sa.step, 4);
    assert_eq!(sa.history.len(), 2);
    let h = &sa.history[1];
    assert_eq!(
        h.per_category.values().map(|c| c.1).sum::<usize>(),
        cfg.eval_questions
    );
    assert!(h.eval_loss.is_finite() && (0.0..=1.0).contains(&h.eval_accuracy));
    // every evaluation reports the held-out image tokens' spread (collapse check)
    for e in &sa.history {
        let s = e.image_token_spread.expect("image-token spread reported");
        assert!(s.is_finite() && s > 0.0, "epoch {}: spread {s}", e.epoch);
    }
    assert!(events.iter().any(|e| e.starts_with("Done")));
    let sb = run(&cfg, &lm, None, None, &b, None, None, Some(3), &mut |_| {}).unwrap();
    assert_eq!(sb.step, 3);
    assert!(
        !b.join("afm-tiny").exists(),
        "export before the run is complete"
    );
    let mut resumed = None;
    let sb = run(&cfg, &lm, None, None, &b, None, None, None, &mut |e| {
        if let Event::Resumed { step } = e {
            resumed = Some(*step)
        }
    })
    .unwrap();
    assert_eq!(resumed, Some(3));
    let strip = |h: &[afm_train::adapter_train::EpochReport]| {
        h.iter()
            .map(|r| {
                let mut r = r.clone();
                r.seconds = 0.0;
                r
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&sa.history), strip(&sb.history));
    for f in [
        "afm-tiny/adapter.safetensors",
        "afm-tiny/vision/model.safetensors",
    ] {
        let ta = candle_core::safetensors::load(a.join(f), &Device::Cpu).unwrap();
        let tb = candle_core::safetensors::load(b.join(f), &Device::Cpu).unwrap();
        assert_eq!(ta.len(), tb.len());
        for (k, x) in &ta {
            assert_eq!(
                afm_lm::testing::max_abs_diff(x, &tb[k]).unwrap(),
                0.0,
                "{f}: {k} differs between the resumed and the uninterrupted run"
            );
        }
    }
    // the export loads back and computes the training path's image embeddings
    let (c, vit, adapter) = load_export(&a.join("afm-tiny")).unwrap();
    assert_eq!(c.tokens_per_image, 4);
    assert_eq!(c.image_placeholder, "<image>");
    assert_eq!(c.lm.file, "tiny-random");
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    assert_eq!(c.image_placeholder_id, fmt.placeholder_id());
    let bt = batch(&cfg, &fmt, Split::HeldOut, 0, 2, None).unwrap();
    let g = c.vision.grid();
    let got = adapter
        .forward(
            &vit.forward(&bt.pixels).unwrap(),
            (g, g),
            c.vision.num_registers(),
        )
        .unwrap();
    assert_eq!(got.dims(), &[2, 4, 32]);
    // the run's own parameters, rebuilt from the checkpoint, give the same embeddings
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    afm_train::optim::load_checkpoint(&a.join("checkpoint.safetensors"), &tr.params, cfg.adamw)
        .unwrap();
    let want = tr.build(&cfg, 32).unwrap().embed(&bt.pixels).unwrap();
    let d = afm_lm::testing::max_abs_diff(&got, &want).unwrap();
    assert!(d < 1e-4, "export vs training path: {d}");
    // another setting on the same directory is refused, naming the state file
    let other = AdapterTrainConfig {
        batch_size: 2,
        ..cfg.clone()
    };
    let e = run(&other, &lm, None, None, &a, None, None, None, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("adapter.json"), "{e}");
}

#[test]
fn vision_init_from_a_stage1_export_and_bad_settings_are_refused() {
    // a stage-1 export of the test ViT
    let pc = afm_train::pretrain::PretrainConfig::test_tiny();
    let params = afm_train::pretrain::init_params(&pc, 8).unwrap();
    let d = tmp("stage1");
    let vdir = afm_train::pretrain::export_vision(&pc, &params, &d).unwrap();
    let cfg = AdapterTrainConfig::test_tiny();
    let tr = Trainable::init(&cfg, 32, Some(&vdir)).unwrap();
    let w = tr
        .params
        .get("vision.embeddings.patch_embedding.weight")
        .unwrap();
    let want = params
        .get("vision.embeddings.patch_embedding.weight")
        .unwrap();
    assert_eq!(afm_lm::testing::max_abs_diff(w, want).unwrap(), 0.0);
    // a ViT of another shape is refused, naming the file
    let mut other = cfg.clone();
    other.vision.hidden_size = 64;
    other.vision.intermediate_size = 128;
    let e = Trainable::init(&other, 32, Some(&vdir))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    // a pool larger than the patch grid
    let bad = AdapterTrainConfig {
        pool: [5, 5],
        ..cfg.clone()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("pool"), "{e}");
}

#[test]
fn common_token_share_measures_what_all_views_share() {
    let a = common::fixed_image(&[1, 4, 32], 3);
    // every view the same: all of the energy is common
    let same = a.repeat((3, 1, 1)).unwrap();
    let s = common_token_share(&same)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((s - 1.0).abs() < 1e-5, "{s}");
    // a view and its negation: nothing in common
    let opp = Tensor::cat(&[&a, &a.neg().unwrap()], 0).unwrap();
    let s = common_token_share(&opp)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(s.abs() < 1e-6, "{s}");
    // a shared part c plus view-specific parts d_i: |c|^2 / (|c|^2 + mean |d_i|^2) when the
    // d_i average to zero
    let c =
        (Tensor::ones((1, 4, 32), candle_core::DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap();
    let mixed = Tensor::cat(&[(&c + &a).unwrap(), (&c - &a).unwrap()], 0).unwrap();
    let ca = 0.25f32;
    let da = a
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let got = common_token_share(&mixed)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = ca / (ca + da);
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    // one view has nothing to compare with
    let one = common_token_share(&a).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(one, 0.0);
    // the config refuses a negative or non-finite weight
    let mut cfg = AdapterTrainConfig::test_tiny();
    cfg.common_token_weight = Some(-1.0);
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("common_token_weight"), "{e}");
    cfg.common_token_weight = Some(f32::NAN);
    assert!(cfg.validate().is_err());
    cfg.common_token_weight = Some(0.5);
    cfg.validate().unwrap();
    // in a training step the term adds weight x share of the batch's image tokens
    let lm = common::frozen_lm("tiny-random");
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let tr = Trainable::init(&cfg, 32, None).unwrap();
    let b = batch(&cfg, &fmt, Split::Train, 0, cfg.batch_size, None).unwrap();
    let with = step_loss(&cfg, &tr, &lm, &fmt, &b, None).unwrap();
    let share = common_token_share(&tr.build(&cfg, 32).unwrap().embed(&b.pixels).unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    cfg.common_token_weight = None;
    let without = step_loss(&cfg, &tr, &lm, &fmt, &b, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let with_s = with.to_scalar::<f32>().unwrap();
    println!("step loss {without} + 0.5 x share {share} = {with_s}");
    assert!(share > 0.01, "{share}");
    assert!(
        (with_s - without - 0.5 * share).abs() < 1e-4,
        "{with_s} vs {without} + 0.5 x {share}"
    );
    // and its gradient reaches the adapter
    let g = with.backward().unwrap();
    assert!(tr
        .params
        .names()
        .any(|n| g.get(tr.params.get(n).unwrap()).is_some()));
}

#[test]
fn train_categories_keep_only_those_questions_and_no_caption() {
    let mut cfg = AdapterTrainConfig::test_tiny();
    cfg.qa_per_sequence = 8;
    cfg.train_categories = serde_json::from_str(r#"["count", "title"]"#).unwrap();
    cfg.validate().unwrap();
    let tok = common::tokenizer();
    let fmt = PromptFormat::new(&tok, &cfg.image_placeholder).unwrap();
    let eot = tok.token_to_id("<|im_end|>").unwrap();
    // scenes and screens in turn: every first turn is a count or a title question
    let b = batch(&cfg, &fmt, Split::Train, 0, 6, None).unwrap();
    for (i, c) in b.categories.iter().enumerate() {
        let c = c.expect("a question, never the caption");
        assert!(
            matches!(
                c,
                afm_train::QaCategory::Count | afm_train::QaCategory::Title
            ),
            "sequence {i}: {c:?}"
        );
    }
    // every turn of the sequence is one of the image's count or title questions
    for (i, e) in b.examples.iter().enumerate() {
        let s = afm_train::pretrain::example(i as u64, Split::Train, None).unwrap();
        let kept =
            s.qa.iter()
                .filter(|q| {
                    matches!(
                        q.category,
                        afm_train::QaCategory::Count | afm_train::QaCategory::Title
                    )
                })
                .count();
        let turns = e.targets().iter().filter(|&&t| t == eot).count();
        assert_eq!(turns, kept.min(8), "sequence {i}");
        let text = tok.decode(&e.ids, false).unwrap();
        assert!(
            !text.contains(CAPTION_PROMPT),
            "sequence {i} has a caption: {text}"
        );
    }
    // held-out batches are not filtered
    let h = batch(&cfg, &fmt, Split::HeldOut, 0, 12, None).unwrap();
    assert!(h.categories.iter().any(|c| !matches!(
        c,
        Some(afm_train::QaCategory::Count | afm_train::QaCategory::Title)
    )));
    // an empty list and an unknown kind are refused
    cfg.train_categories = Some(vec![]);
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("train_categories"));
    assert!(serde_json::from_str::<Vec<afm_train::QaCategory>>(r#"["colours"]"#).is_err());
}

#[test]
fn caption_share_starts_that_share_of_sequences_with_the_caption() {
    use afm_train::adapter_train::caption_first;
    // the hash picks about the share asked for, and none or all at 0 and 1
    let n = (0..4000u64)
        .filter(|&j| caption_first(Some(0.5), j))
        .count();
    assert!((1800..2200).contains(&n), "{n} of 4000");
    assert_eq!(
        (0..500u64).filter(|&j| caption_first(Some(0.0), j)).count(),
        0
    );
    assert_eq!(
        (0..500u64).filter(|&j| caption_first(Some(1.0), j)).count(),
        500
    );
    assert_eq!((0..500u64).filter(|&j| caption_first(None, j)).count(), 0);
    let mut cfg = AdapterTrainConfig::test_tiny();
    cfg.caption_share = Some(1.0);
    cfg.validate().unwrap();
    let tok = common::tokenizer();
    let fmt = PromptFormat::new(&tok, &cfg.image_placeholder).unwrap();
    // every training sequence starts with the caption prompt and trains the caption
    let b = batch(&cfg, &fmt, Split::Train, 0, 4, None).unwrap();
    for (i, e) in b.examples.iter().enumerate() {
        assert_eq!(b.categories[i], None, "sequence {i} starts with a question");
        assert_eq!(b.questions[i], CAPTION_PROMPT, "sequence {i}");
        assert_eq!(b.answers[i], b.captions[i], "sequence {i}");
        let text = tok.decode(&e.ids, false).unwrap();
        assert!(text.contains(&b.captions[i]), "sequence {i}: {text}");
    }
    // held-out batches ask one question as before
    let h = batch(&cfg, &fmt, Split::HeldOut, 0, 4, None).unwrap();
    assert!(h.categories.iter().all(|c| c.is_some()));
    cfg.caption_share = Some(1.5);
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("caption_share"), "{e}");
}

#[test]
fn train_sources_take_only_those_images_in_turn() {
    use afm_train::pretrain::{example_of, Source};
    let mut cfg = AdapterTrainConfig::test_tiny();
    cfg.train_sources = serde_json::from_str(r#"["screen"]"#).unwrap();
    cfg.validate().unwrap();
    let tok = common::tokenizer();
    let fmt = PromptFormat::new(&tok, &cfg.image_placeholder).unwrap();
    // only screens, in order: training example j is screen j
    let b = batch(&cfg, &fmt, Split::Train, 0, 4, None).unwrap();
    for (j, c) in b.captions.iter().enumerate() {
        let s = example_of(Source::Screen, j as u64, Split::Train, None).unwrap();
        assert_eq!(c, &s.caption, "example {j}");
    }
    // two sources alternate: scene 0, screen 0, scene 1, screen 1
    cfg.train_sources = Some(vec![Source::Scene, Source::Screen]);
    let b = batch(&cfg, &fmt, Split::Train, 0, 4, None).unwrap();
    let want: Vec<String> = [
        (Source::Scene, 0),
        (Source::Screen, 0),
        (Source::Scene, 1),
        (Source::Screen, 1),
    ]
    .iter()
    .map(|&(s, i)| example_of(s, i, Split::Train, None).unwrap().caption)
    .collect();
    assert_eq!(b.captions, want);
    // `data_offset` moves where training steps start, so a continued stage sees new images
    let base = afm_train::adapter_train::train_start(&cfg, 2);
    assert_eq!(base, 2 * cfg.batch_size as u64);
    let mut off = cfg.clone();
    off.data_offset = 1000;
    assert_eq!(afm_train::adapter_train::train_start(&off, 2), 1000 + base);
    let moved = batch(
        &off,
        &fmt,
        Split::Train,
        afm_train::adapter_train::train_start(&off, 0),
        2,
        None,
    )
    .unwrap();
    let s1000 = example_of(Source::Scene, 500, Split::Train, None).unwrap();
    assert_eq!(moved.captions[0], s1000.caption);
    assert_ne!(moved.captions[0], b.captions[0]);
    let j: AdapterTrainConfig =
        serde_json::from_str(&serde_json::to_string(&off).unwrap()).unwrap();
    assert_eq!(j.data_offset, 1000);
    // an offset past the generator's index space is a clear error, not a wrapped index
    off.data_offset = u64::MAX - 1;
    let e = off.validate().unwrap_err().to_string();
    assert!(e.contains("data_offset"), "{e}");
    // held-out batches are not filtered: scenes and screens in turn as without the option
    cfg.train_sources = Some(vec![Source::Screen]);
    let h = batch(&cfg, &fmt, Split::HeldOut, 0, 2, None).unwrap();
    let s0 = afm_train::pretrain::example(0, Split::HeldOut, None).unwrap();
    assert_eq!(h.captions[0], s0.caption);
    assert_eq!(
        s0.caption,
        example_of(Source::Scene, 0, Split::HeldOut, None)
            .unwrap()
            .caption
    );
    // easy-VQA without its data set, an empty list and an unknown name are clear errors
    cfg.train_sources = Some(vec![Source::EasyVqa]);
    let e = batch(&cfg, &fmt, Split::Train, 0, 1, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("easy-VQA") && e.contains("fetch_easy_vqa"),
        "{e}"
    );
    cfg.train_sources = Some(vec![]);
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("train_sources"));
    assert!(serde_json::from_str::<Vec<Source>>(r#"["photos"]"#).is_err());
}

#[test]
fn micro_batches_give_the_whole_batch_gradient() {
    let lm = common::frozen_lm("tiny-random");
    for per_turn in [false, true] {
        let cfg = AdapterTrainConfig {
            output_norm_gain: Some(lm.token_embedding_rms().unwrap()),
            loss_per_turn: per_turn,
            ..AdapterTrainConfig::test_tiny()
        };
        let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
        let tr = Trainable::init(&cfg, 32, None).unwrap();
        let b = batch(&cfg, &fmt, Split::Train, 0, cfg.batch_size, None).unwrap();
        assert!(b.examples.len() >= 3);
        // the examples differ in length, so equal weights per micro-batch would be wrong
        let units: Vec<usize> = b
            .examples
            .iter()
            .map(|e| loss_units(std::slice::from_ref(e), per_turn))
            .collect();
        // answer tokens differ between examples; turns do not (2 each), but micro-batches of
        // 2 split the 3 examples 2 + 1, so a plain mean of micro-batch losses would be wrong
        assert!(
            per_turn || units.iter().any(|&u| u != units[0]),
            "{units:?}"
        );
        let whole = step_loss(&cfg, &tr, &lm, &fmt, &b, None).unwrap();
        let want_loss = whole.to_scalar::<f32>().unwrap();
        let want = whole.backward().unwrap();
        for micro in [1, 2] {
            let (loss, got) = step_grads(&cfg, &tr, &lm, &fmt, &b, micro).unwrap();
            let loss = loss.to_scalar::<f32>().unwrap();
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "per_turn {per_turn}, micro {micro}: loss {loss} against {want_loss} (units {units:?})"
            );
            // differences relative to the largest gradient of all (the attention key biases'
            // true gradient is 0, so theirs are rounding noise)
            let (mut worst, mut scale) = (0f32, 0f32);
            for n in tr.params.names() {
                let p = tr.params.get(n).unwrap();
                let (a, g) = (want.get(p), got.get(p));
                assert_eq!(a.is_some(), g.is_some(), "{n}: gradient in one only");
                let (Some(a), Some(g)) = (a, g) else { continue };
                let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                scale = a.iter().fold(scale, |m, x| m.max(x.abs()));
                worst = a
                    .iter()
                    .zip(&g)
                    .fold(worst, |m, (x, y)| m.max((x - y).abs()));
            }
            let worst = worst / scale;
            println!("per_turn {per_turn}, micro {micro}: loss {loss} (whole {want_loss}), worst relative gradient difference {worst:e}");
            assert!(worst < 1e-4, "per_turn {per_turn}, micro {micro}: {worst}");
        }
    }
    // micro-batches cannot split the losses over the whole batch, and 0 is refused
    let bad = AdapterTrainConfig {
        micro_batch: Some(0),
        ..AdapterTrainConfig::test_tiny()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("micro_batch"));
    let bad = AdapterTrainConfig {
        micro_batch: Some(1),
        common_token_weight: Some(0.1),
        ..AdapterTrainConfig::test_tiny()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("common_token_weight"));
}
