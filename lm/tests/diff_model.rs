//! `DiffLm` (the dense decoder in differentiable candle ops, for training adapters against a
//! frozen LM) against `DeviceModel`'s inference kernels, and its gradients against finite
//! differences.

use afm_lm::diff_model::DiffLm;
use afm_lm::random::random_tensors;
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, LanguageModel, LmConfig, LoadOptions, LogitsFor};
use candle_core::{Device, Tensor, Var};

fn cfg(qk_norm: bool, interleaved: bool) -> LmConfig {
    LmConfig {
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: !qk_norm,
        bos_token_id: None,
        eos_token_id: None,
        num_kv_reuse_layers: 0,
        qk_norm,
        rope_interleaved: interleaved,
        kv_quant: false,
    }
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 256).collect()
}

#[test]
fn diff_model_equals_the_inference_model() {
    for (qk, inter) in [(false, false), (false, true), (true, true)] {
        let c = cfg(qk, inter);
        let src = WeightSource::from_tensors(random_tensors(&c, 7).unwrap());
        let dm = DeviceModel::from_source(&src, c.clone()).unwrap();
        let df = DiffLm::from_source(&src, c.clone()).unwrap();
        let toks = ids(23);
        let want = dm
            .forward_tokens(&toks, &mut dm.new_cache(), &LogitsFor::All)
            .unwrap();
        let x = df
            .embed(
                &Tensor::new(toks.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        // a batch of two identical rows: batching must not mix sequences
        let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
        let got = df.forward(&x2).unwrap();
        for r in 0..2 {
            let d = afm_lm::testing::max_abs_diff(&got.get(r).unwrap(), &want).unwrap();
            println!("qk_norm {qk}, interleaved {inter}, row {r}: DiffLm vs DeviceModel max|diff| {d:.2e}");
            assert!(d < 1e-4, "{d}");
        }
    }
}

#[test]
fn input_gradients_match_finite_differences() {
    let c = cfg(true, true);
    let df = DiffLm::from_source(
        &WeightSource::from_tensors(random_tensors(&c, 8).unwrap()),
        c.clone(),
    )
    .unwrap();
    let x0 = df
        .embed(
            &Tensor::new(&ids(9)[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let var = Var::from_tensor(&x0).unwrap();
    // loss: a fixed linear functional of the last position's logits
    let probe: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.37).sin()).collect();
    let probe = Tensor::from_vec(probe, 256, &Device::Cpu).unwrap();
    let loss = |x: &Tensor| -> Tensor {
        let l = df.forward(x).unwrap();
        l.get(0)
            .unwrap()
            .get(8)
            .unwrap()
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient for the input");
    let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let mut worst = 0f32;
    // entries at the first, a middle and the last position (causality: all reach position 8)
    for &i in &[0usize, 5, 64 * 4 + 17, 64 * 8 + 63] {
        let eps = 1e-2f32;
        let shifted = |d: f32| {
            let mut v = base.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, (1, 9, 64), &Device::Cpu).unwrap())
                .to_scalar::<f32>()
                .unwrap()
        };
        let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
        let rel = (fd - g[i]).abs() / fd.abs().max(1e-2);
        println!(
            "d loss / d x[{i}]: autograd {:.5}, finite difference {fd:.5}",
            g[i]
        );
        worst = worst.max(rel);
    }
    assert!(worst < 2e-2, "relative error {worst}");
    // a later position never influences an earlier one
    let l_first = |x: &Tensor| {
        df.forward(x)
            .unwrap()
            .get(0)
            .unwrap()
            .get(2)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let gr = l_first(var.as_tensor()).backward().unwrap();
    let g2: Vec<f32> = gr
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g2[64 * 3..].iter().all(|&v| v == 0.0), "causal mask leaks");
    assert!(g2[..64 * 3].iter().any(|&v| v != 0.0));
}

#[test]
fn refuses_kv_sharing_checkpoints() {
    let c = cfg(true, true).with_block_ratio(1, 1).unwrap();
    let src = WeightSource::from_tensors(random_tensors(&c, 1).unwrap());
    let e = DiffLm::from_source(&src, c).err().unwrap().to_string();
    assert!(e.contains("num_kv_reuse_layers"), "{e}");
}

#[test]
fn real_smollm2_diff_model_equals_dequantized_inference() {
    let Some(p) = afm_lm::testing::smollm2_gguf_or_skip() else {
        return;
    };
    let opts = LoadOptions {
        dequantize: true,
        context_length: Some(64),
        ..Default::default()
    };
    let dm = DeviceModel::load_with(&p, &opts).unwrap();
    let src = WeightSource::from_gguf(&p).unwrap().with_dequantize(true);
    let mut c = dm.config().clone();
    c.max_position_embeddings = 64;
    let df = DiffLm::from_source(&src, c).unwrap();
    let toks: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 28, 7018, 411, 407, 19712,
        8182, 2,
    ];
    let want = dm
        .forward_tokens(&toks, &mut dm.new_cache(), &LogitsFor::All)
        .unwrap();
    let x = df
        .embed(
            &Tensor::new(toks.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let got = df.forward(&x).unwrap().get(0).unwrap();
    let d = afm_lm::testing::max_abs_diff(&got, &want).unwrap();
    println!(
        "SmolLM2-135M (dequantized Q4_1), 18 tokens: DiffLm vs DeviceModel max|logit diff| {d:.2e}"
    );
    assert!(d < 2e-3, "{d}");
}

#[test]
fn packed_segments_equal_their_sequences_run_alone() {
    use afm_lm::diff_model::Packing;
    for (qk, inter) in [(false, false), (true, true)] {
        let c = cfg(qk, inter);
        let src = WeightSource::from_tensors(random_tensors(&c, 11).unwrap());
        let df = DiffLm::from_source(&src, c.clone()).unwrap();
        let embed = |t: &[u32]| {
            df.embed(&Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap())
                .unwrap()
        };
        // a shared prefix of 9 tokens, then three continuations of different lengths
        let prefix = ids(9);
        let tails: Vec<Vec<u32>> = [5usize, 3, 7]
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                (0..n as u32)
                    .map(|i| (i * 53 + 29 * k as u32 + 3) % 256)
                    .collect()
            })
            .collect();
        let mut row = prefix.clone();
        let mut p = Packing {
            positions: (0..9).collect(),
            segments: vec![0; 9],
        };
        for (k, t) in tails.iter().enumerate() {
            row.extend(t);
            p.positions.extend(9..9 + t.len() as u32);
            p.segments
                .extend(std::iter::repeat_n(k as u32 + 1, t.len()));
        }
        let got = df
            .hidden_states_packed(&embed(&row), Some(&p))
            .unwrap()
            .get(0)
            .unwrap();
        let mut at = 9;
        for (k, t) in tails.iter().enumerate() {
            let alone = [prefix.as_slice(), t].concat();
            let want = df.hidden_states(&embed(&alone)).unwrap().get(0).unwrap();
            let d = afm_lm::testing::max_abs_diff(
                &got.narrow(0, at, t.len()).unwrap(),
                &want.narrow(0, 9, t.len()).unwrap(),
            )
            .unwrap();
            let dp = afm_lm::testing::max_abs_diff(
                &got.narrow(0, 0, 9).unwrap(),
                &want.narrow(0, 0, 9).unwrap(),
            )
            .unwrap();
            println!(
                "qk_norm {qk}, interleaved {inter}: segment {k} vs alone {d:.2e}, prefix {dp:.2e}"
            );
            assert!(d < 1e-4 && dp < 1e-4, "{d} {dp}");
            at += t.len();
        }
        // the plain causal pass over the same row differs: later segments see earlier ones
        let causal = df.hidden_states(&embed(&row)).unwrap().get(0).unwrap();
        let d = afm_lm::testing::max_abs_diff(
            &causal.narrow(0, 9 + 5, 3).unwrap(),
            &got.narrow(0, 9 + 5, 3).unwrap(),
        )
        .unwrap();
        assert!(d > 1e-3, "{d}");
        // wrong lengths and positions beyond the model are errors, not wrong numbers
        let short = Packing {
            positions: p.positions[1..].to_vec(),
            segments: p.segments[1..].to_vec(),
        };
        let e = df
            .hidden_states_packed(&embed(&row), Some(&short))
            .unwrap_err()
            .to_string();
        assert!(e.contains("positions"), "{e}");
        let mut far = p.clone();
        far.positions[3] = 500;
        let e = df
            .hidden_states_packed(&embed(&row), Some(&far))
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 500"), "{e}");
    }
}
