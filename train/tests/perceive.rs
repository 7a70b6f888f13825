//! Stage 1b (`afm_train::perceive`): the per-patch targets are right (reading the character
//! targets back gives the strings; object patches carry their objects' colours), views are
//! deterministic, and a tiny run trains, resumes and exports an encoder that loads.

use afm_train::perceive::{
    self, char_class, class_char, labels, read_row, view_for, PerceiveConfig, View, COLOURS,
};
use afm_train::{generate, Split, SynthKind, Truth};

#[test]
fn character_classes_round_trip() {
    for c in ' '..='~' {
        let k = char_class(c);
        assert!((1..=95).contains(&k));
        assert_eq!(class_char(k), Some(c));
    }
    assert_eq!(char_class('é'), 96);
    assert_eq!(class_char(0), None);
}

/// The character targets of a screen crop, walked like a prediction, spell every string
/// that is wholly in view: no two characters share a slot and each lands in its row.
#[test]
fn character_targets_spell_the_strings() {
    let cfg = PerceiveConfig::afm_tiny();
    let (mut strings, mut exact) = (0, 0);
    for j in 0..60u64 {
        for split in [Split::Train, Split::HeldOut] {
            let (s, v) = view_for(&cfg, j * 5 + 1, split, None).unwrap();
            let l = labels(&s, &v);
            for (_, text, row, a, b) in &l.strings {
                strings += 1;
                exact += (read_row(&l.chars, *row, *a, *b) == *text) as usize;
            }
        }
    }
    assert!(strings > 100, "only {strings} strings in view");
    // narrow glyph pairs at the smallest scales may share a 2-px slot: allow a few
    assert!(
        exact as f64 >= 0.97 * strings as f64,
        "{exact} of {strings} strings spelled back exactly"
    );
}

/// A scene's overview labels every shape: its centre patch and patches of its colour.
#[test]
fn scene_overview_labels_every_shape() {
    for i in 0..20u64 {
        let s = generate(SynthKind::Scene, Split::Train, i);
        let Truth::Scene(t) = &s.truth else { panic!() };
        let (w, h) = s.image.dimensions();
        let l = labels(&s, &View::overview(w, h));
        let centres: u32 = l.center.iter().sum();
        assert_eq!(l.objects_in_view, t.shapes.len());
        assert!(centres as usize <= t.shapes.len() && centres >= 1);
        for sh in &t.shapes {
            let k = COLOURS.iter().position(|c| *c == sh.colour.name()).unwrap() as u32;
            assert!(
                l.colour.contains(&k),
                "scene {i}: no patch labelled {} for a {} {}",
                sh.colour.name(),
                sh.colour.name(),
                sh.shape.name()
            );
        }
        assert!(
            l.role.iter().all(|&r| r == 0),
            "scenes have no screen roles"
        );
    }
}

#[test]
fn views_are_deterministic_and_splits_differ() {
    let cfg = PerceiveConfig::afm_tiny();
    for j in [0u64, 1, 3, 7, 12] {
        let (a, va) = view_for(&cfg, j, Split::Train, None).unwrap();
        let (b, vb) = view_for(&cfg, j, Split::Train, None).unwrap();
        assert_eq!(va, vb);
        assert_eq!(a.image, b.image);
        let (c, _) = view_for(&cfg, j, Split::HeldOut, None).unwrap();
        assert_ne!(a.image, c.image);
    }
}

#[test]
fn tiny_run_resumes_and_exports_a_loadable_encoder() {
    let dir = std::env::temp_dir().join(format!("afm-perceive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = PerceiveConfig::test_tiny();
    let st = perceive::run(&cfg, &dir, None, None, None, None, Some(2), &mut |_| {}).unwrap();
    assert_eq!(st.step, 2);
    assert!(!dir.join("vision").exists());
    // a run stopped early can still be exported from its checkpoint
    let (out, step) = perceive::export_checkpoint(&cfg, &dir).unwrap();
    assert_eq!(step, 2);
    afm_vision::VisionEncoder::load(&out).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let mut resumed = false;
    let st = perceive::run(&cfg, &dir, None, None, None, None, None, &mut |e| {
        if let perceive::Event::Resumed { step } = e {
            resumed = *step == 2;
        }
    })
    .unwrap();
    assert!(resumed);
    assert_eq!(st.step, cfg.total_steps());
    assert_eq!(st.history.len(), cfg.epochs);
    let m = &st.history[1].eval;
    assert!(m.loss.is_finite() && m.feature_spread.is_finite());
    let enc = afm_vision::VisionEncoder::load(&dir.join("vision")).unwrap();
    assert_eq!(enc.config().hidden_size, 32);
    assert!(dir.join("heads.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_reading_run_sees_screen_crops_around_strings_only() {
    let cfg = PerceiveConfig {
        text_only: true,
        ..PerceiveConfig::afm_tiny()
    };
    for j in 0..10u64 {
        let (s, v) = view_for(&cfg, j, Split::Train, None).unwrap();
        assert!(matches!(s.truth, Truth::Screen(_)), "example {j}");
        let l = labels(&s, &v);
        assert!(
            l.char_weight.iter().any(|&w| w >= 1.0),
            "example {j}: no character in view"
        );
    }
}

/// `sources` takes the named sources in turn, each source's views its own images in order;
/// an object-only run never sees a screen.
#[test]
fn sources_are_taken_in_turn_and_each_takes_new_images() {
    use afm_train::perceive::ViewSource;
    let cfg = PerceiveConfig {
        sources: vec![ViewSource::Scene, ViewSource::Scene, ViewSource::Screen],
        ..PerceiveConfig::afm_tiny()
    };
    let mut scenes = vec![];
    for j in 0..9u64 {
        let (s, _) = view_for(&cfg, j, Split::Train, None).unwrap();
        match (j % 3, &s.truth) {
            (0 | 1, Truth::Scene(_)) => scenes.push(s.image.clone()),
            (2, Truth::Screen(_)) => {}
            (k, _) => panic!("view {j} (slot {k}) came from the wrong source"),
        }
    }
    // six scene views, six different scenes
    for a in 0..scenes.len() {
        for b in a + 1..scenes.len() {
            assert_ne!(
                scenes[a], scenes[b],
                "scene views {a} and {b} repeat an image"
            );
        }
    }
    let bad = PerceiveConfig {
        weights: afm_train::perceive::LossWeights {
            background: f32::NAN,
            ..PerceiveConfig::afm_tiny().weights
        },
        ..PerceiveConfig::afm_tiny()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("background"), "{e}");
    // scene views at twice the scene's size
    let big = PerceiveConfig {
        sources: vec![ViewSource::Scene],
        scene_scale: Some((2.0, 2.0)),
        ..PerceiveConfig::afm_tiny()
    };
    for j in 0..4u64 {
        let (_, v) = view_for(&big, j, Split::Train, None).unwrap();
        assert_eq!(v.s, 2.0, "view {j}");
    }
    let e = PerceiveConfig {
        scene_scale: Some((3.0, 1.0)),
        ..big
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("scene_scale"), "{e}");
}

/// With `background` below 1, the shape term follows the object patches: logits that are
/// right on the background and wrong on the objects lose more than at weight 1.
#[test]
fn background_weight_shifts_the_shape_term_to_object_patches() {
    use afm_train::perceive::{loss, HeadLogits, LossWeights, SHAPES};
    use candle_core::{Device, Tensor};
    let cfg = PerceiveConfig::afm_tiny();
    let (s, v) = view_for(&cfg, 0, Split::Train, None).unwrap();
    let lab = labels(&s, &v);
    let objects = lab.shape.iter().filter(|&&c| c != 0).count();
    assert!(objects > 0 && objects < lab.shape.len());
    // predicts "none" everywhere, confidently
    let n = lab.shape.len();
    let mut sh = vec![0f32; n * SHAPES.len()];
    for p in 0..n {
        sh[p * SHAPES.len()] = 8.0;
    }
    let z = |c: usize| Tensor::zeros((n, c), candle_core::DType::F32, &Device::Cpu).unwrap();
    let lg = HeadLogits {
        colour: z(afm_train::perceive::COLOURS.len()),
        shape: Tensor::from_vec(sh, (n, SHAPES.len()), &Device::Cpu).unwrap(),
        center: z(2),
        role: z(afm_train::perceive::ROLES.len()),
        chars: z(afm_train::perceive::CHAR_CLASSES)
            .repeat((afm_train::perceive::SLOTS, 1))
            .unwrap(),
    };
    let only_shape = |background: f32| {
        let w = LossWeights {
            shape: 1.0,
            background,
            ..LossWeights::none()
        };
        loss(&w, &lg, std::slice::from_ref(&lab))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (even, objects_first) = (only_shape(1.0), only_shape(0.1));
    assert!(
        objects_first > 2.0 * even,
        "object-weighted {objects_first} vs even {even}"
    );
}

/// Object groups: one row per (colour, shape) group in view, averaging its patches; the
/// object term is low when each group's patches agree on its shape on average, even if most
/// of them say nothing, and high when they agree on another shape.
#[test]
fn object_groups_average_each_groups_patches_and_the_object_term_follows_them() {
    use afm_train::perceive::{loss, object_groups, HeadLogits, LossWeights, SHAPES};
    use candle_core::{Device, Tensor};
    let cfg = PerceiveConfig::afm_tiny();
    let (s, v) = view_for(&cfg, 0, Split::Train, None).unwrap();
    let lab = labels(&s, &v);
    let (pool, groups) = object_groups(std::slice::from_ref(&lab)).unwrap().unwrap();
    let mut want = std::collections::BTreeSet::new();
    for k in 0..lab.shape.len() {
        if lab.shape[k] != 0 {
            want.insert((lab.colour[k], lab.shape[k]));
        }
    }
    assert_eq!(groups.len(), want.len());
    assert_eq!(pool.dims(), &[want.len(), lab.shape.len()]);
    for r in pool.sum(1).unwrap().to_vec1::<f32>().unwrap() {
        assert!((r - 1.0).abs() < 1e-5, "row sum {r}");
    }
    let n = lab.shape.len();
    let k = SHAPES.len();
    // only the first patch of each group speaks (strongly); every other patch is uniform
    let speak = |right: bool| {
        let mut sh = vec![0f32; n * k];
        let mut seen = std::collections::BTreeSet::new();
        for p in 0..n {
            let t = lab.shape[p] as usize;
            if t != 0 && seen.insert((lab.colour[p], lab.shape[p])) {
                let c = if right { t } else { 1 + t % (k - 1) };
                sh[p * k + c] = 40.0;
            }
        }
        let z = |c: usize| Tensor::zeros((n, c), candle_core::DType::F32, &Device::Cpu).unwrap();
        let lg = HeadLogits {
            colour: z(afm_train::perceive::COLOURS.len()),
            shape: Tensor::from_vec(sh, (n, k), &Device::Cpu).unwrap(),
            center: z(2),
            role: z(afm_train::perceive::ROLES.len()),
            chars: z(afm_train::perceive::CHAR_CLASSES)
                .repeat((afm_train::perceive::SLOTS, 1))
                .unwrap(),
        };
        let w = LossWeights {
            objects: 1.0,
            ..LossWeights::none()
        };
        loss(&w, &lg, std::slice::from_ref(&lab))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (right, wrong) = (speak(true), speak(false));
    assert!(right < 0.7 * wrong, "right {right}, wrong {wrong}");
}

#[test]
fn a_stem_run_starts_from_a_plain_encoder_and_exports_what_it_trained() {
    let base = std::env::temp_dir().join(format!("afm-perceive-stem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // a plain encoder (no stem), exported from a 1-step run
    let plain = PerceiveConfig::test_tiny();
    perceive::run(
        &plain,
        &base.join("plain"),
        None,
        None,
        None,
        None,
        Some(1),
        &mut |_| {},
    )
    .unwrap();
    let (plain_dir, _) = perceive::export_checkpoint(&plain, &base.join("plain")).unwrap();
    // the same encoder with a stem: everything but the patch embedding carries over
    let mut cfg = PerceiveConfig::test_tiny();
    cfg.vision.stem = Some(vec![8, 16]);
    let p = perceive::init_params(&cfg, Some(&plain_dir), None).unwrap();
    let plain_t =
        afm_vision::weights::VisionWeights::from_files(&[&plain_dir.join("model.safetensors")])
            .unwrap();
    let q = p.with_prefix("vision.");
    let k = "encoder.layers.1.mlp.fc1.weight";
    let a: Vec<f32> = q[k].flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = plain_t
        .get(k, &[64, 32])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let close = a
        .iter()
        .zip(&b)
        .all(|(x, y)| (x - y).abs() <= 1e-3 * (1.0 + y.abs()));
    assert!(close, "{k} did not carry over");
    assert_eq!(
        q["embeddings.patch_embedding.weight"].dims(),
        &[32, 16, 4, 4]
    );
    assert_eq!(q["embeddings.stem.0.weight"].dims(), &[8, 3, 3, 3]);
    // a stem run trains, and its export loads with the stem and gives the training features
    let dir = base.join("stem");
    perceive::run(
        &cfg,
        &dir,
        Some(&plain_dir),
        None,
        None,
        None,
        Some(2),
        &mut |_| {},
    )
    .unwrap();
    let (out, _) = perceive::export_checkpoint(&cfg, &dir).unwrap();
    let enc = afm_vision::VisionEncoder::load(&out).unwrap();
    assert_eq!(enc.config().stem, Some(vec![8, 16]));
    let b = perceive::batch(&cfg, Split::HeldOut, 0, 2, None).unwrap();
    let got = enc.forward(&b.pixels).unwrap();
    let r = cfg.vision.num_registers();
    let (n, t, d) = got.dims3().unwrap();
    let got = got
        .narrow(1, r, t - r)
        .unwrap()
        .reshape((n * (t - r), d))
        .unwrap();
    // the training path on the exported weights
    let t = afm_train::adapter_train::read_vision_export(&out, &cfg.vision).unwrap();
    let want = perceive::patch_features(&cfg.vision, &t, &b.pixels).unwrap();
    let diff: f32 = (got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = want.abs().unwrap().mean_all().unwrap().to_scalar().unwrap();
    assert!(
        scale > 0.0 && diff <= 1e-3 * scale.max(1.0),
        "export differs by {diff} (scale {scale})"
    );
    std::fs::remove_dir_all(&base).ok();
}

/// CTC reading end to end on free logits: gradient steps on the character logits of a few
/// screen crops, through `perceive::loss` with `ctc: true`, make the best path spell every
/// string in view; the loss is the mean CTC loss per character and falls.
#[test]
fn ctc_reading_learns_to_spell_the_strings_from_free_logits() {
    use afm_train::perceive::{head_shapes, read_row_ctc, HeadLogits, LossWeights, SLOTS};
    use candle_core::{DType, Device, Tensor, Var, D};
    let cfg = PerceiveConfig {
        text_only: true,
        ..PerceiveConfig::afm_tiny()
    };
    let labs: Vec<_> = (0..3u64)
        .map(|j| {
            let (s, v) = view_for(&cfg, j, Split::Train, None).unwrap();
            labels(&s, &v)
        })
        .collect();
    let strings: usize = labs.iter().map(|l| l.strings.len()).sum();
    assert!(strings >= 3, "{strings} strings in view");
    let n = labs.len() * 196;
    let w = LossWeights {
        chars: 1.0,
        ctc: true,
        ..LossWeights::none()
    };
    let cls = perceive::CHAR_CLASSES;
    let zeros = |name: &str| {
        let k = head_shapes(1)
            .into_iter()
            .find(|(h, _)| *h == name)
            .unwrap()
            .1;
        Tensor::zeros((n, k), DType::F32, &Device::Cpu).unwrap()
    };
    let var = Var::zeros((n * SLOTS, cls), DType::F32, &Device::Cpu).unwrap();
    let mut first = None;
    let mut last = 0f32;
    for _ in 0..300 {
        let lg = HeadLogits {
            colour: zeros("colour"),
            shape: zeros("shape"),
            center: zeros("center"),
            role: zeros("role"),
            chars: var.as_tensor().clone(),
        };
        let l = perceive::loss(&w, &lg, &labs).unwrap();
        last = l.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
        let g = l.backward().unwrap();
        let gv = g.get(var.as_tensor()).expect("a gradient for the logits");
        let m = gv
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        var.set(&(var.as_tensor() - (gv * (0.5 / m.max(1e-12)) as f64).unwrap()).unwrap())
            .unwrap();
    }
    let first = first.unwrap();
    assert!(first > 3.0 && last < 0.2 * first, "loss {first} -> {last}");
    let pred = var
        .as_tensor()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let per_view = 196 * SLOTS;
    for (i, l) in labs.iter().enumerate() {
        for (_, text, row, a, b) in &l.strings {
            let got = read_row_ctc(&pred[i * per_view..(i + 1) * per_view], *row, *a, *b);
            assert_eq!(&got, text);
        }
    }
}

/// A run started from an export's `heads.safetensors` starts from those heads (not fresh
/// ones); a heads file of another width, or without a head, is refused with its name.
#[test]
fn heads_carry_over_from_an_export_and_a_mismatched_file_is_refused() {
    use candle_core::{DType, Device, Tensor};
    let base = std::env::temp_dir().join(format!("afm-perceive-heads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let cfg = PerceiveConfig::test_tiny();
    perceive::run(
        &cfg,
        &base.join("a"),
        None,
        None,
        None,
        None,
        Some(2),
        &mut |_| {},
    )
    .unwrap();
    let (vision, _) = perceive::export_checkpoint(&cfg, &base.join("a")).unwrap();
    let heads = base.join("a").join("heads.safetensors");
    let stored = candle_core::safetensors::load(&heads, &Device::Cpu).unwrap();
    let p = perceive::init_params(&cfg, Some(&vision), Some(&heads)).unwrap();
    let fresh = perceive::init_params(&cfg, Some(&vision), None).unwrap();
    let vals = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for name in ["head.colour.weight", "head.chars.bias", "head.role.weight"] {
        let got = vals(&p.tensors()[name]);
        assert_eq!(got, vals(&stored[name]), "{name} did not carry over");
        assert_ne!(
            got,
            vals(&fresh.tensors()[name]),
            "{name}: trained equals fresh"
        );
    }
    // another width: refused, naming the head and both shapes
    let mut wide = PerceiveConfig::test_tiny();
    wide.vision.hidden_size = 64;
    wide.vision.intermediate_size = 128;
    let e = perceive::init_params(&wide, None, Some(&heads))
        .err()
        .expect("a heads file of width 32 for an encoder of width 64")
        .to_string();
    assert!(
        e.contains("head.") && e.contains("32") && e.contains("64"),
        "{e}"
    );
    // a file without the heads (the encoder's weights): refused, naming the missing head
    let e = perceive::init_params(&cfg, None, Some(&vision.join("model.safetensors")))
        .err()
        .expect("not a heads file")
        .to_string();
    assert!(e.contains("has no `head."), "{e}");
    std::fs::remove_dir_all(&base).ok();
}

/// Glyph sheets: training views are sheets whose character targets spell every line; a
/// held-out view of that source is the screen crop a `screen_text` run would see, so the
/// probe's reading figures are those of screens; a bad em range is refused by name.
#[test]
fn glyph_views_spell_their_lines_and_hold_out_screens() {
    use afm_train::perceive::ViewSource;
    let glyphs = PerceiveConfig {
        sources: vec![ViewSource::Glyphs, ViewSource::Scene],
        glyph_px: Some((16.0, 44.0)),
        ..PerceiveConfig::afm_tiny()
    };
    let screens = PerceiveConfig {
        sources: vec![ViewSource::ScreenText, ViewSource::Scene],
        ..glyphs.clone()
    };
    let (mut lines, mut spelled, mut chars) = (0, 0, 0);
    for j in 0..8u64 {
        let (s, v) = view_for(&glyphs, 2 * j, Split::Train, None).unwrap();
        let Truth::Glyphs(items) = &s.truth else {
            panic!("training view {j} is not a glyph sheet")
        };
        let l = labels(&s, &v);
        chars += l.chars.iter().filter(|&&c| c != 0).count();
        for (_, text, row, first, last) in &l.strings {
            lines += 1;
            if read_row(&l.chars, *row, *first, *last) == *text {
                spelled += 1;
            }
        }
        assert!(l.strings.len() <= items.len());
        let (h, hv) = view_for(&glyphs, 2 * j, Split::HeldOut, None).unwrap();
        let (e, ev) = view_for(&screens, 2 * j, Split::HeldOut, None).unwrap();
        assert!(matches!(h.truth, Truth::Screen(_)), "held-out view {j}");
        assert_eq!(h.image, e.image, "held-out view {j}");
        assert_eq!(hv, ev, "held-out view {j}");
    }
    assert!(chars > 8 * 30, "{chars} characters in 8 sheets");
    // lines are drawn whole inside the sheet: nearly all read back from their targets (a
    // line whose middle sits on a patch row's edge may lose a character to the next row)
    assert!(
        spelled * 10 >= lines * 9,
        "{spelled} of {lines} lines spelled"
    );
    let e = PerceiveConfig {
        glyph_px: Some((50.0, 20.0)),
        ..glyphs
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("glyph_px"), "{e}");
}
