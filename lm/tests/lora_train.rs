//! Trainable LoRA in `DiffLm`: a few AdamW steps on a fixed text lower the loss with the base
//! frozen, and the saved adapter, applied by `DeviceModel` to the same base file, reproduces
//! `DiffLm`'s logits.

use afm_lm::diff_model::DiffLm;
use afm_lm::lora::checkpoint_sha256;
use afm_lm::random::{random_tensors, write_safetensors};
use afm_lm::testing::max_abs_diff;
use afm_lm::weights::WeightSource;
use afm_lm::{
    DeviceModel, LanguageModel, LmConfig, LoadOptions, LogitsFor, LoraAdapter, LoraConfig,
    LoraMode, LoraTarget,
};
use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

fn cfg() -> LmConfig {
    LmConfig {
        ..afm_lm::testing::tiny_llama()
    }
}

#[test]
fn adamw_steps_lower_the_loss_and_the_saved_adapter_reproduces_difflm() {
    let dir = std::env::temp_dir().join(format!("afm-lora-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    write_safetensors(&model_dir, &cfg(), &random_tensors(&cfg(), 5).unwrap()).unwrap();
    let sha = checkpoint_sha256(&model_dir).unwrap();
    let src = WeightSource::from_safetensors(&[model_dir.join("model.safetensors")]).unwrap();
    let mut df = DiffLm::from_source(&src, cfg()).unwrap();
    let lc = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: LoraTarget::ALL.to_vec(),
    };
    let init = LoraAdapter::random(&df.lora_sites(), lc, &sha, 1, 0.0).unwrap();
    df.attach_lora(&init).unwrap();
    assert_eq!(df.lora_vars().len(), 2 * 7 * 2);

    // a fixed "text": a short repeating pattern the random base does not predict
    let text: Vec<u32> = (0..24u32)
        .map(|i| [7, 42, 99, 3, 180, 42][i as usize % 6])
        .collect();
    let n = text.len();
    let ids = Tensor::new(&text[..n - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets = Tensor::new(&text[1..], &Device::Cpu).unwrap();
    let x = df.embed(&ids).unwrap();
    let loss_of = |df: &DiffLm| -> Tensor {
        let lg = df.forward(&x).unwrap().squeeze(0).unwrap();
        candle_nn::loss::cross_entropy(&lg, &targets).unwrap()
    };
    let mut opt = AdamW::new(
        df.lora_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = loss_of(&df);
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    losses.push(loss_of(&df).to_scalar::<f32>().unwrap());
    println!("LoRA training loss: {losses:.4?}");
    assert!(losses[8] < 0.8 * losses[0], "loss must fall: {:?}", losses);

    // saved, loaded onto the same base file by the inference model: the same logits
    let trained = df.lora_adapter().unwrap();
    assert_eq!(trained.base_sha256(), sha);
    let p = dir.join("trained.safetensors");
    trained.save(&p).unwrap();
    let want = df.forward(&x).unwrap().squeeze(0).unwrap();
    for mode in [LoraMode::Merged, LoraMode::Unmerged] {
        let m = DeviceModel::load_with(
            &model_dir,
            &LoadOptions {
                lora: Some(p.clone()),
                lora_mode: mode,
                ..Default::default()
            },
        )
        .unwrap();
        let got = m
            .forward_tokens(&text[..n - 1], &mut m.new_cache(), &LogitsFor::All)
            .unwrap();
        let d = max_abs_diff(&got, &want).unwrap();
        println!("trained adapter, DeviceModel {mode:?} vs DiffLm: max |diff| = {d:e}");
        assert!(d < 1e-4, "{d}");
    }
    // and the base without it is not what DiffLm computes now
    let base = DeviceModel::load(&model_dir).unwrap();
    let got = base
        .forward_tokens(&text[..n - 1], &mut base.new_cache(), &LogitsFor::All)
        .unwrap();
    assert!(max_abs_diff(&got, &want).unwrap() > 0.1);
}
