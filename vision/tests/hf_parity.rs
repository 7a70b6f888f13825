//! Parity with HF transformers (`scripts/ref_hf_siglip.py`): a seeded random SiglipVisionModel
//! loaded from its own safetensors, at its trained size and at another size (position table
//! interpolated), the same tower nested as in Idefics3/SmolVLM checkpoints, and
//! SiglipImageProcessor's resize + rescale + normalise on a PNG.

use afm_vision::weights::VisionWeights;
use afm_vision::{load_image, ImageLimits, Preprocess, VisionConfig, VisionEncoder};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn read_f32(path: &Path) -> Vec<f32> {
    afm_lm::testing::read_f32_file(path).unwrap()
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn tensor(dir: &Path, file: &str, shape: &[usize]) -> Tensor {
    Tensor::from_vec(read_f32(&dir.join(file)), shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    afm_lm::testing::max_abs_diff(a, b).unwrap()
}

fn reference(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap()
}

#[test]
fn tiny_siglip_matches_transformers_at_trained_and_interpolated_sizes() {
    let dir = fixtures().join("hf_tiny_siglip");
    let r = reference(&dir);
    let enc = VisionEncoder::load(&dir).unwrap();
    let px = tensor(&dir, "pixels.f32", &shape(&r["pixels"]));
    let want = tensor(&dir, "hidden.f32", &shape(&r["hidden"]));
    let got = enc.forward(&px).unwrap();
    let d = max_diff(&got, &want);
    println!("tiny SigLIP 64x64, batch 2 vs transformers: max |diff| = {d:e}");
    assert!(d < 1e-4, "{d}");

    let px = tensor(&dir, "pixels_48x80.f32", &shape(&r["pixels_48x80"]));
    let want = tensor(&dir, "hidden_48x80.f32", &shape(&r["hidden_48x80"]));
    let got = enc.forward(&px).unwrap();
    let d = max_diff(&got, &want);
    println!("tiny SigLIP 48x80 (interpolated positions) vs transformers: max |diff| = {d:e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn tower_nested_as_in_idefics3_loads_to_the_same_output() {
    let dir = fixtures().join("hf_tiny_siglip");
    let r = reference(&dir);
    let plain =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    // Idefics3ForConditionalGeneration saves the tower as `model.vision_model.*`, beside the
    // connector and the LM; the encoder must find it there and ignore the rest.
    let mut nested: std::collections::HashMap<String, Tensor> = plain
        .into_iter()
        .map(|(k, v)| {
            let k = k.strip_prefix("vision_model.").unwrap_or(&k).to_string();
            (format!("model.vision_model.{k}"), v)
        })
        .collect();
    nested.insert(
        "model.connector.modality_projection.proj.weight".into(),
        Tensor::zeros((8, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let cfg = VisionConfig::from_file(&dir.join("config.json")).unwrap();
    let w = VisionWeights::from_tensors(nested).unwrap();
    assert_eq!(w.prefix(), "model.vision_model.");
    let enc = VisionEncoder::new(&w, cfg).unwrap();
    let px = tensor(&dir, "pixels.f32", &shape(&r["pixels"]));
    let want = tensor(&dir, "hidden.f32", &shape(&r["hidden"]));
    let d = max_diff(&enc.forward(&px).unwrap(), &want);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn resize_and_normalise_match_siglip_image_processor() {
    let dir = fixtures().join("hf_siglip_preprocess");
    let r = reference(&dir);
    let img = load_image(
        &dir.join(r["image"].as_str().unwrap()),
        &ImageLimits::default(),
    )
    .unwrap();
    let pre = Preprocess::from_json(&serde_json::json!({
        "resample": 3, "do_rescale": true, "rescale_factor": 0.00392156862745098,
        "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
    }))
    .unwrap();
    assert_eq!(pre, Preprocess::default());
    for o in r["outputs"].as_array().unwrap() {
        let (h, w) = (
            o["height"].as_u64().unwrap() as u32,
            o["width"].as_u64().unwrap() as u32,
        );
        let want = tensor(&dir, o["file"].as_str().unwrap(), &shape(&o["shape"]));
        let got = pre.run(&img, w, h).unwrap();
        let diff = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        let v: Vec<f32> = diff.to_vec1().unwrap();
        let (imax, max) =
            v.iter()
                .cloned()
                .enumerate()
                .fold((0, 0f32), |a, (i, x)| if x > a.1 { (i, x) } else { a });
        let at = (
            imax / (w * h) as usize,
            imax / w as usize % h as usize,
            imax % w as usize,
        );
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let r: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        println!(
            "  worst at (c, y, x) = {at:?}: ours {} reference {}",
            g[imax], r[imax]
        );
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        // One 8-bit level is 2/255 = 0.0078 after normalising with std 0.5. PIL and
        // fast_image_resize both resize in 8 bits with the same cubic filter (width first,
        // then height) but round their fixed-point sums differently, so a few pixels land
        // one or two levels apart (measured: max 2 levels, mean 0.003 levels).
        println!(
            "301x203 PNG -> {w}x{h} vs SiglipImageProcessor: max |diff| = {max:.4} ({:.1} levels), mean {mean:.5}",
            max / (2.0 / 255.0)
        );
        assert!(max <= 2.01 * 2.0 / 255.0, "{w}x{h}: max {max}");
        assert!(mean < 0.02 * 2.0 / 255.0, "{w}x{h}: mean {mean}");
    }
}

#[test]
fn preprocessor_config_errors_name_the_field() {
    let e = Preprocess::from_json(&serde_json::json!({"resample": 7}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("resample"), "{e}");
    let e = Preprocess::from_json(&serde_json::json!({"image_std": [0.5, 0.0, 0.5]}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_std"), "{e}");
    let e = Preprocess::from_json(&serde_json::json!({"image_mean": [0.5, 0.5]}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_mean"), "{e}");
    let p =
        Preprocess::from_json(&serde_json::json!({"do_normalize": false, "resample": 2})).unwrap();
    assert_eq!((p.image_mean, p.image_std), ([0.0; 3], [1.0; 3]));
}

/// The full SmolVLM-256M vision tower (SigLIP-B/16-512, random weights): run
/// `python scripts/ref_hf_siglip.py --full DIR`, then this test with `AFM_SIGLIP_FULL=DIR`
/// and `--ignored`. Not in CI: the checkpoint is ~370 MB and needs torch to make.
#[test]
#[ignore = "needs AFM_SIGLIP_FULL=DIR from `scripts/ref_hf_siglip.py --full DIR`"]
fn full_size_siglip_b16_512_matches_transformers() {
    let dir = PathBuf::from(std::env::var("AFM_SIGLIP_FULL").expect("set AFM_SIGLIP_FULL"));
    let r = reference(&dir);
    let enc = VisionEncoder::load(&dir).unwrap();
    let px = tensor(&dir, "pixels.f32", &shape(&r["pixels"]));
    let want = tensor(&dir, "hidden.f32", &shape(&r["hidden"]));
    let d = max_diff(&enc.forward(&px).unwrap(), &want);
    println!(
        "SigLIP-B/16-512 (768 wide, 12 layers, 1024 patches) vs transformers: max |diff| = {d:e}"
    );
    assert!(d < 1e-3, "{d}");
}
