//! Register-Window attention: reduces to global attention with a register token when one
//! window covers the grid, masks padding on grids the window does not divide, and batches.

use afm_vision::random::random_tensors;
use afm_vision::weights::VisionWeights;
use afm_vision::{AttentionPattern, VisionConfig, VisionEncoder};
use candle_core::{Device, Tensor};

fn cfg(attention: AttentionPattern) -> VisionConfig {
    VisionConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_channels: 3,
        image_size: 64,
        patch_size: 8,
        layer_norm_eps: 1e-6,
        hidden_act: "gelu_pytorch_tanh".into(),
        attention,
        stem: None,
    }
}

fn rw(window: usize, global_layers: Vec<usize>) -> AttentionPattern {
    AttentionPattern::RegisterWindow {
        window,
        global_layers,
        num_registers: 1,
    }
}

fn encoder(c: &VisionConfig) -> VisionEncoder {
    VisionEncoder::new(
        &VisionWeights::from_tensors(random_tensors(c, 7).unwrap()).unwrap(),
        c.clone(),
    )
    .unwrap()
}

fn pixels(b: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = (0..b * 3 * h * w)
        .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (b, 3, h, w), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    afm_lm::testing::max_abs_diff(a, b).unwrap()
}

#[test]
fn one_window_over_the_whole_grid_is_global_attention_with_a_register() {
    // 8x8 grid; window 8 (exact) and window 11 (padded, masked) both equal all-global blocks
    let global = encoder(&cfg(rw(8, vec![0, 1, 2])));
    let x = pixels(2, 64, 64, 1);
    let want = global.forward(&x).unwrap();
    assert_eq!(want.dims(), &[2, 65, 32]);
    for win in [8, 11] {
        let windowed = encoder(&cfg(rw(win, vec![])));
        let d = max_diff(&windowed.forward(&x).unwrap(), &want);
        println!("window {win} over an 8x8 grid vs global attention: max |diff| = {d:e}");
        assert!(d < 1e-4, "window {win}: {d}");
    }
}

#[test]
fn uneven_grid_padding_is_masked_exactly() {
    // 5x7 grid, window 3: windows at the right/bottom edges are partial. Reference: run each
    // window as its own sequence (no padding at all) and average the registers by hand.
    let c = cfg(rw(3, vec![]));
    let c1 = VisionConfig {
        num_hidden_layers: 1,
        ..c.clone()
    };
    let enc = encoder(&c1);
    let x = pixels(1, 40, 56, 2);
    let got = enc.forward(&x).unwrap();
    assert_eq!(got.dims(), &[1, 1 + 35, 32]);
    // the same computation with global attention restricted per window, assembled by hand
    let w = VisionWeights::from_tensors(random_tensors(&c1, 7).unwrap()).unwrap();
    let emb = afm_vision::embeddings::Embeddings::load(&w, &c1).unwrap();
    let patches = emb.forward(&x).unwrap(); // (1, 35, 32)
    let reg = w
        .get("embeddings.register_tokens", &[1, 32])
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let seq = Tensor::cat(&[&reg, &patches], 1).unwrap(); // (1, 36, 32)
    let ln = |name: &str, t: &Tensor| {
        candle_nn::ops::layer_norm(
            t,
            &w.get(&format!("encoder.layers.0.{name}.weight"), &[32])
                .unwrap(),
            &w.get(&format!("encoder.layers.0.{name}.bias"), &[32])
                .unwrap(),
            1e-6,
        )
        .unwrap()
    };
    let attn =
        afm_vision::attention::Attention::load(&w, "encoder.layers.0.self_attn", 32, 4).unwrap();
    let hn = ln("layer_norm1", &seq);
    let mut reg_sum = Tensor::zeros((1, 1, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut patch_out = vec![None; 35];
    let mut n_win = 0;
    for wy in 0..2 {
        for wx in 0..3 {
            let mut idx = vec![0u32];
            for y in wy * 3..(wy * 3 + 3).min(5) {
                for xx in wx * 3..(wx * 3 + 3).min(7) {
                    idx.push(1 + (y * 7 + xx) as u32);
                }
            }
            let sub = hn
                .index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 1)
                .unwrap();
            let o = attn.forward_global(&sub, false).unwrap();
            reg_sum = (reg_sum + o.narrow(1, 0, 1).unwrap()).unwrap();
            for (k, &i) in idx.iter().enumerate().skip(1) {
                patch_out[i as usize - 1] = Some(o.narrow(1, k, 1).unwrap());
            }
            n_win += 1;
        }
    }
    let reg_out = (reg_sum / n_win as f64).unwrap();
    let parts: Vec<Tensor> = std::iter::once(reg_out)
        .chain(patch_out.into_iter().map(|t| t.unwrap()))
        .collect();
    let a = Tensor::cat(&parts, 1).unwrap();
    let x1 = (seq + a).unwrap();
    let hn2 = ln("layer_norm2", &x1);
    let lin = |n: &str, o: usize, i: usize| {
        candle_nn::Linear::new(
            w.get(&format!("encoder.layers.0.mlp.{n}.weight"), &[o, i])
                .unwrap(),
            Some(
                w.get(&format!("encoder.layers.0.mlp.{n}.bias"), &[o])
                    .unwrap(),
            ),
        )
    };
    use candle_nn::Module;
    let m = lin("fc2", 32, 64)
        .forward(&lin("fc1", 64, 32).forward(&hn2).unwrap().gelu().unwrap())
        .unwrap();
    let x2 = (x1 + m).unwrap();
    let want = candle_nn::ops::layer_norm(
        &x2,
        &w.get("post_layernorm.weight", &[32]).unwrap(),
        &w.get("post_layernorm.bias", &[32]).unwrap(),
        1e-6,
    )
    .unwrap();
    let d = max_diff(&got, &want);
    println!(
        "5x7 grid, window 3 (6 windows, 4 partial) vs per-window reference: max |diff| = {d:e}"
    );
    assert!(d < 1e-4, "{d}");
}

#[test]
fn batching_tiles_equals_one_at_a_time_and_windows_differ_from_global() {
    let enc = encoder(&cfg(rw(4, vec![1])));
    let x = pixels(3, 64, 64, 3);
    let all = enc.forward(&x).unwrap();
    for i in 0..3 {
        let one = enc.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
        assert!(max_diff(&one, &all.narrow(0, i, 1).unwrap()) < 1e-4);
    }
    let glob = encoder(&cfg(rw(4, vec![0, 1, 2]))).forward(&x).unwrap();
    assert!(
        max_diff(&glob, &all) > 1e-3,
        "window blocks must change the result"
    );
}

#[test]
fn fused_kernels_equal_candle_ops_for_global_and_windowed_blocks() {
    // the fused attention / activation kernels (inference) against the differentiable candle
    // ops path, on an uneven grid (masked partial windows), 2 registers, batch 2, and both
    // GELU variants
    for (attention, act) in [
        (AttentionPattern::Global, "gelu_pytorch_tanh"),
        (
            AttentionPattern::RegisterWindow {
                window: 3,
                global_layers: vec![1],
                num_registers: 2,
            },
            "gelu_pytorch_tanh",
        ),
        (rw(4, vec![2]), "quick_gelu"),
    ] {
        let c = VisionConfig {
            hidden_act: act.into(),
            ..cfg(attention)
        };
        let mut enc = encoder(&c);
        let x = pixels(2, 40, 56, 5);
        let fast = enc.forward(&x).unwrap();
        enc.set_fast_kernels(false);
        let slow = enc.forward(&x).unwrap();
        let d = max_diff(&fast, &slow);
        println!(
            "fused kernels vs candle ops ({:?}, {act}): max |diff| = {d:e}",
            c.attention
        );
        assert!(d < 1e-5, "{d}");
    }
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let mut c = cfg(rw(4, vec![5]));
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("global_layers"));
    c.attention = rw(0, vec![]);
    assert!(c.validate().is_err());
    let enc = encoder(&cfg(AttentionPattern::Global));
    assert!(enc.forward(&pixels(1, 60, 64, 0)).is_err()); // not a multiple of the patch
    let mut t = random_tensors(&cfg(AttentionPattern::Global), 1).unwrap();
    t.remove("vision_model.encoder.layers.1.mlp.fc2.bias");
    let e = VisionEncoder::new(
        &VisionWeights::from_tensors(t).unwrap(),
        cfg(AttentionPattern::Global),
    )
    .err()
    .unwrap();
    assert!(
        e.to_string()
            .contains("vision_model.encoder.layers.1.mlp.fc2.bias"),
        "{e}"
    );
}
