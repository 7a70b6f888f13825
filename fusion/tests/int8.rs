//! The opt-in int8 paths (`Vlm::set_vision_int8`, `Vlm::set_lm_int8`,
//! `VisionEncoder::set_int8`) against HF transformers in f32 and against our own f32 path:
//! the error 8 bits bring, bounded, and switching back gives the f32 results exactly.
//!
//! The bounds are relative L2 errors, `|got - want| / |want|`. A wrong kernel (a transposed
//! matrix, a lost scale, a lost offset) gives errors of order 1, far above them.

use afm_fusion::{Adapter, Vlm};
use afm_lm::{LanguageModel, LogitsFor};
use afm_vision::{load_image, ImageLimits};
use candle_core::Tensor;
use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{tensor, tiny_idefics3 as fixture};

/// `|a - b| / |b|` over all elements.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn argmax(t: &Tensor) -> u32 {
    afm_lm::sampling::argmax(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

#[test]
fn int8_smolvlm_stays_close_to_transformers_and_switches_back_exactly() {
    check(&fixture(), 0.01, 0.03);
}

/// The full SmolVLM-256M configuration (random weights) from `python
/// scripts/ref_hf_idefics3.py --full DIR`: `AFM_SMOLVLM_FULL=DIR cargo test --release -p
/// afm-fusion --test int8 -- --ignored --nocapture`.
#[test]
#[ignore = "needs AFM_SMOLVLM_FULL (a 1 GB checkpoint made by a script)"]
fn int8_full_size_smolvlm_256m_stays_close_to_transformers() {
    let d = std::env::var("AFM_SMOLVLM_FULL").expect("set AFM_SMOLVLM_FULL");
    // 12 full-width encoder layers of 8-bit rounding add up: measured 0.024 / 0.019
    check(Path::new(&d), 0.05, 0.05);
}

/// Every case of `d/ref.json` with both int8 paths on: image embeddings and first-token
/// logits within `tol_img` / `tol_logits` (relative L2) of transformers' f32, the same first
/// token in all cases but at most one, and f32 again, bit for bit, once switched off.
fn check(d: &Path, tol_img: f32, tol_logits: f32) {
    let d = d.to_path_buf();
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("ref.json")).unwrap()).unwrap();
    let image_token = r["image_token_id"].as_u64().unwrap() as u32;
    let mut vlm = Vlm::load_idefics3(&d).unwrap();
    let mut top1_same = 0;
    let cases = r["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        vlm.processor_mut().do_image_splitting = case["do_image_splitting"].as_bool().unwrap();
        let px = tensor(&d, &case["pixel_values"]).squeeze(0).unwrap();
        let want_img = tensor(&d, &case["image_hidden_states"]);
        let want_logits = tensor(&d, &case["logits"]);
        let img = load_image(
            &d.join(case["image"].as_str().unwrap()),
            &ImageLimits::default(),
        )
        .unwrap();
        let enc = vlm.encode_image(&img, None).unwrap();
        let parts: Vec<afm_fusion::Part> = case["messages"][0]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| match p["type"].as_str().unwrap() {
                "image" => afm_fusion::Part::Image(enc.clone()),
                _ => afm_fusion::Part::Text(p["text"].as_str().unwrap().to_string()),
            })
            .collect();
        let (ids, _) = vlm
            .prepare(&[afm_fusion::ChatMessage::user(parts)])
            .unwrap();
        let logits = |vlm: &Vlm<afm_lm::DeviceModel>, img: &Tensor| {
            let lm = vlm.lm();
            let e = afm_fusion::splice(lm, &ids, image_token, Some(img)).unwrap();
            lm.forward_embeds(&e, &mut lm.new_cache(), &LogitsFor::Last)
                .unwrap()
                .squeeze(0)
                .unwrap()
        };
        let f32_img = vlm.embed_pixels(&px).unwrap();
        let f32_logits = logits(&vlm, &f32_img);

        vlm.set_vision_int8(true).unwrap();
        vlm.set_lm_int8(true).unwrap();
        let q_img = vlm.embed_pixels(&px).unwrap();
        let q_logits = logits(&vlm, &q_img);
        let e_img = rel(&q_img, &want_img.reshape(q_img.dims()).unwrap());
        let e_logits = rel(&q_logits, &want_logits);
        let e_f32 = rel(&f32_logits, &want_logits);
        println!(
            "case {name}: int8 vs transformers f32, relative L2 error: image embeddings {e_img:.4}, first-token logits {e_logits:.4} (our f32: {e_f32:.1e}); arg-max {} vs {}",
            argmax(&q_logits),
            argmax(&want_logits)
        );
        assert!(e_img < tol_img, "case {name}: image embeddings {e_img}");
        assert!(e_logits < tol_logits, "case {name}: logits {e_logits}");
        top1_same += usize::from(argmax(&q_logits) == argmax(&want_logits));

        // back to f32: the same numbers as before, bit for bit
        vlm.set_vision_int8(false).unwrap();
        vlm.set_lm_int8(false).unwrap();
        assert_eq!(rel(&vlm.embed_pixels(&px).unwrap(), &f32_img), 0.0);
        assert_eq!(rel(&logits(&vlm, &f32_img), &f32_logits), 0.0);
    }
    println!(
        "int8 first token = transformers' in {top1_same} of {} cases",
        cases.len()
    );
    assert!(
        top1_same + 1 >= cases.len(),
        "int8 changed the first token in {} cases",
        cases.len() - top1_same
    );
}

/// The real afm-tiny weights (the shipped ViT and adapter) on a real sample image.
#[test]
fn int8_afm_tiny_vision_stays_close_to_f32_on_real_weights() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (cfg, mut vit, adapter) =
        afm_fusion::afm_tiny::load_export(&root.join("assets/afm-tiny")).unwrap();
    let s = cfg.image_size as u32;
    let pre = cfg.preprocess().unwrap();
    let mut worst: f32 = 0.0;
    for img in ["scene.png", "screen.png"] {
        let im = load_image(
            &root.join("assets/images").join(img),
            &ImageLimits::default(),
        )
        .unwrap();
        let px = pre.run(&im, s, s).unwrap().unsqueeze(0).unwrap();
        let grid = (
            cfg.image_size / cfg.vision.patch_size,
            cfg.image_size / cfg.vision.patch_size,
        );
        let regs = cfg.vision.num_registers();
        vit.set_int8(false).unwrap();
        let h32 = vit.forward(&px).unwrap();
        let t32 = adapter.forward(&h32, grid, regs).unwrap();
        vit.set_int8(true).unwrap();
        let h8 = vit.forward(&px).unwrap();
        let t8 = adapter.forward(&h8, grid, regs).unwrap();
        let (eh, et) = (rel(&h8, &h32), rel(&t8, &t32));
        println!("afm-tiny {img}: int8 ViT vs f32, relative L2 error: ViT output {eh:.4}, image tokens {et:.4}");
        worst = worst.max(eh).max(et);
    }
    assert!(worst < 0.01, "{worst}");
}
