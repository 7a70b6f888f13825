//! The f16 K/V cache (`--kv 16`, `afm serve`'s default): half the bytes of f32, logits
//! close to the f32 cache's, and the same guarantees the f32 cache gives (a batched decode
//! step equals each sequence's own step; a prefill equals decode steps token by token).

use afm_lm::random::random_tensors;
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, KvMode, LanguageModel, LmConfig, LogitsFor};
use candle_core::{IndexOp, Tensor};

/// `afm_lm::testing::tiny_llama` with 8 layers; `afm` adds QK-norm, interleaved RoPE and
/// stored 8-bit KV scales.
fn cfg(afm: bool) -> LmConfig {
    LmConfig {
        intermediate_size: 160,
        num_hidden_layers: 8,
        rope_theta: 500000.0,
        qk_norm: afm,
        rope_interleaved: afm,
        kv_quant: afm,
        ..afm_lm::testing::tiny_llama()
    }
}

/// Prefills `prompts[i]` into both `single[i]` and `batched[i]`, then runs `steps` batched
/// steps and checks each sequence's logits against its own single-sequence step.
fn batched_equals_single(
    m: &DeviceModel,
    prompts: &[Vec<u32>],
    single: &mut [afm_lm::Cache],
    batched: &mut [afm_lm::Cache],
    steps: u32,
) {
    for (i, p) in prompts.iter().enumerate() {
        m.forward_tokens(p, &mut single[i], &LogitsFor::Last)
            .unwrap();
        m.forward_tokens(p, &mut batched[i], &LogitsFor::Last)
            .unwrap();
    }
    let n = prompts.len() as u32;
    for s in 0..steps {
        let ids: Vec<u32> = (0..n).map(|i| (i * 91 + s * 13 + 5) % 256).collect();
        let mut refs: Vec<&mut _> = batched.iter_mut().collect();
        let got = m.forward_batch(&ids, &mut refs).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let want = m
                .forward_tokens(&[id], &mut single[i], &LogitsFor::Last)
                .unwrap();
            let d = diff(&got.i(i..i + 1).unwrap(), &want);
            assert!(d < 1e-4, "step {s}, sequence {i}: {d}");
        }
    }
}

fn model(c: &LmConfig) -> DeviceModel {
    DeviceModel::from_source(
        &WeightSource::from_tensors(random_tensors(c, 5).unwrap()),
        c.clone(),
    )
    .unwrap()
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11 + salt) % 256).collect()
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    afm_lm::testing::max_abs_diff(a, b).unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The AFM layout (KV sharing 5:3, QK-norm) and plain llama, both with `--kv 16`.
fn models() -> Vec<(DeviceModel, DeviceModel)> {
    let afm = LmConfig {
        kv_quant: false,
        ..cfg(true)
    }
    .with_block_ratio(5, 3)
    .unwrap();
    [afm, cfg(false)]
        .iter()
        .map(|c| {
            let mut m32 = model(c);
            m32.apply_kv_bits(32, &[]).unwrap();
            let mut m16 = m32.clone();
            assert_eq!(m16.apply_kv_bits(16, &[]).unwrap(), "none");
            assert_eq!(m16.kv_mode(), &KvMode::F16);
            (m16, m32)
        })
        .collect()
}

#[test]
fn f16_cache_holds_half_the_bytes_and_gives_logits_close_to_f32() {
    for (m16, m32) in models() {
        let p = prompt(40, 1);
        let (mut c16, mut c32) = (m16.new_cache(), m32.new_cache());
        let l16 = m16.forward_tokens(&p, &mut c16, &LogitsFor::All).unwrap();
        let l32 = m32.forward_tokens(&p, &mut c32, &LogitsFor::All).unwrap();
        assert_eq!(2 * c16.used_bytes(), c32.used_bytes());
        assert!(c16.layer(0).unwrap().f16_slices().is_some());
        let (d, mag) = (diff(&l16, &l32), max_abs(&l32));
        println!("f16 vs f32 cache: max |diff| {d:e} of max |logit| {mag:e}");
        // the f16 rounding (2^-11 relative) shows, and stays small
        assert!(d > 0.0 && d < 1e-2 * mag, "{d} of {mag}");
    }
}

#[test]
fn f16_batched_step_equals_single_steps_and_prefill_equals_decode() {
    for (m, _) in models() {
        // a prefill, then the same tokens one step at a time
        let p = prompt(20, 2);
        let mut whole = m.new_cache();
        let all = m.forward_tokens(&p, &mut whole, &LogitsFor::All).unwrap();
        let mut steps = m.new_cache();
        for (i, &id) in p.iter().enumerate() {
            let one = m
                .forward_tokens(&[id], &mut steps, &LogitsFor::Last)
                .unwrap();
            let d = diff(&one, &all.i(i..i + 1).unwrap());
            assert!(d < 1e-4, "position {i}: {d}");
        }
        // three sequences in one batched step against their own steps
        let lens = [5usize, 17, 1];
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(lens[i], i as u32)).collect();
        let mut single: Vec<_> = lens.iter().map(|_| m.new_cache()).collect();
        let mut batched: Vec<_> = lens.iter().map(|_| m.new_cache()).collect();
        batched_equals_single(&m, &prompts, &mut single, &mut batched, 3);
    }
}

/// One batched step over caches of different precisions (f16, f32 and the checkpoint's
/// int8) gives each sequence what its own step gives.
#[test]
fn a_batch_of_f16_f32_and_int8_caches_equals_single_steps() {
    let c = LmConfig {
        kv_quant: true,
        ..cfg(true)
    };
    let m8 = model(&c);
    let mut m16 = m8.clone();
    m16.apply_kv_bits(16, &[]).unwrap();
    let mut m32 = m8.clone();
    m32.apply_kv_bits(32, &[]).unwrap();
    let kinds = [&m16, &m32, &m8];
    let mut single: Vec<_> = kinds.iter().map(|m| m.new_cache()).collect();
    let mut batched: Vec<_> = kinds.iter().map(|m| m.new_cache()).collect();
    assert_eq!(
        batched
            .iter()
            .map(|c| c.layer(0).unwrap().bytes_per_value())
            .collect::<Vec<_>>(),
        [2, 4, 1]
    );
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(6 + 5 * i, i as u32)).collect();
    // one model runs both (each cache keeps its own precision; this checkpoint's 8-bit
    // rounding applies to the f16 and f32 caches' values in both runs alike)
    batched_equals_single(&m8, &prompts, &mut single, &mut batched, 3);
}

#[test]
fn serving_prefers_f16_unless_the_checkpoint_stores_kv_scales() {
    let mut plain = model(&cfg(false));
    assert_eq!(plain.kv_store_name(), "f32");
    assert!(plain.prefer_f16_kv());
    assert_eq!(plain.new_cache().layer(0).unwrap().bytes_per_value(), 2);
    assert_eq!(plain.kv_store_name(), "f16");
    // a checkpoint with 8-bit KV scales keeps its int8 cache
    let mut scaled = model(&cfg(true));
    assert!(!scaled.prefer_f16_kv());
    assert_eq!(scaled.new_cache().layer(0).unwrap().bytes_per_value(), 1);
    assert_eq!(scaled.kv_store_name(), "int8");
    // and a mode set explicitly stays
    let mut f32 = model(&cfg(false));
    f32.apply_kv_bits(32, &[]).unwrap();
    assert!(!f32.prefer_f16_kv());
    assert_eq!(f32.new_cache().layer(0).unwrap().bytes_per_value(), 4);
    assert_eq!(f32.kv_store_name(), "f32");
    let e = f32.apply_kv_bits(4, &[]).unwrap_err().to_string();
    assert!(e.contains("16 (f16)") && e.contains("32 (f32)"), "{e}");
}

/// SmolLM2-135M (real weights): the f16 cache's logits stay within 0.1% of their range of
/// the f32 cache's, over 20 times closer than the int8 cache's, and the greedy next tokens
/// agree along a text but at near ties.
#[test]
fn f16_cache_on_real_weights() {
    let Some(gguf) = afm_lm::testing::smollm2_gguf_or_skip() else {
        return;
    };
    // dequantized to f32: the quantized path is chaotic (a 1e-7 change of its input flips
    // 8-bit activation roundings and moves logits by up to ~0.9, tests/llamacpp_parity.rs),
    // so only f32 weights show what the cache's rounding alone does
    let opts = afm_lm::LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    let mut ck = afm_lm::Checkpoint::load_with(&gguf, &opts).unwrap();
    let ids = ck.tokenizer.encode(afm_lm::kv8::CALIBRATION_TEXT).unwrap();
    let ids = &ids[..ids.len().min(200)];
    ck.model.apply_kv_bits(32, &[]).unwrap();
    let l32 = ck
        .model
        .forward_tokens(ids, &mut ck.model.new_cache(), &LogitsFor::All)
        .unwrap();
    ck.model.apply_kv_bits(16, &[]).unwrap();
    let l16 = ck
        .model
        .forward_tokens(ids, &mut ck.model.new_cache(), &LogitsFor::All)
        .unwrap();
    let (d, mag) = (diff(&l16, &l32), max_abs(&l32));
    let mean = |a: &Tensor| {
        (a - &l32)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // the paper's int8 cache (calibrated scales), for scale
    let cal = ck.tokenizer.encode(afm_lm::kv8::CALIBRATION_TEXT).unwrap();
    ck.model.apply_kv_bits(8, &cal).unwrap();
    let l8 = ck
        .model
        .forward_tokens(ids, &mut ck.model.new_cache(), &LogitsFor::All)
        .unwrap();
    let (m16, m8) = (mean(&l16), mean(&l8));
    println!(
        "SmolLM2 (f32 weights), {} positions, logits against the f32 cache's: f16 cache max |diff| {d:.4}, mean {m16:.2e}; int8 cache max {:.4}, mean {m8:.2e}; max |logit| {mag:.1}",
        ids.len(),
        diff(&l8, &l32)
    );
    assert!(d < 1e-3 * mag, "{d} of {mag}");
    assert!(20.0 * m16 < m8, "f16 {m16} against int8 {m8}");
    // the greedy token agrees wherever the f32 cache's top-1 leads by more than 2 d
    let a16: Vec<u32> = l16.argmax(1).unwrap().to_vec1().unwrap();
    let a32: Vec<u32> = l32.argmax(1).unwrap().to_vec1().unwrap();
    let rows: Vec<Vec<f32>> = l32.to_vec2().unwrap();
    for (i, (a, b)) in a16.iter().zip(&a32).enumerate() {
        let r = &rows[i];
        let second = (0..r.len())
            .filter(|&j| j != *b as usize)
            .map(|j| r[j])
            .fold(f32::MIN, f32::max);
        assert!(a == b || r[*b as usize] - second <= 2.0 * d, "position {i}");
    }
}
