//! Diagnostic: can stage 2's trainable parts (adapter + the LM's LoRA) learn to name a shape's
//! colour from the image at all?
//!
//! ```text
//! cargo run --release -p afm-train --example overfit_colour -- CONFIG.json EXPORT_DIR LM_GGUF [N] [STEPS] [LR] [BATCH]
//! ```
//!
//! Takes the first `N` (default 16) easy-VQA `train` images with a colour question, all asking
//! the same "What color is the shape?", and trains the export's adapter and LoRA (ViT frozen,
//! as `CONFIG`) on that one batch for `STEPS` (default 40) full-batch AdamW steps at `LR`
//! (default 3e-4). Every 5 steps it prints the loss with the right images and with the images
//! rolled by one, and the same on `N` easy-VQA `test` images. The question is the same for
//! every image, so a loss below the answers' entropy needs the image: if the right and rolled
//! losses stay together, the setup cannot read colour, whatever the data.
//!
//! With `AFM_OVERFIT_SOURCE=scene` the images are the generator's scenes instead, each with
//! its own "What colour is the <kind>?" (a kind that occurs once); `train_vit: true` in
//! `CONFIG` trains the ViT too.
//!
//! With `BATCH` < `N` every step takes the next `BATCH` of the `N` training images in turn
//! (minibatches rather than one batch), which asks whether colour is learned in general
//! rather than memorised; the printed losses are then on the first 64 training images and 64
//! test images.
use afm_train::adapter_train::{
    prepare_lora_from, sequence_loss, AdapterTrainConfig, FrozenLm, Trainable,
};
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::optim::AdamW;
use afm_train::pretrain::{example_of, pixels, Source};
use afm_train::prompt::PromptFormat;
use afm_train::{QaCategory, Split};
use candle_core::Tensor;
use std::path::Path;

type Set = (Vec<afm_train::prompt::Example>, Tensor, Vec<String>);

/// The first `n` images of `split` with a colour question: easy-VQA's (`scene == false`)
/// or the generator's scenes ("What colour is the triangle?", asked of a kind that occurs
/// once).
fn colour_set(
    scene: bool,
    split: Split,
    n: usize,
    fmt: &PromptFormat,
    tokens: usize,
    size: usize,
) -> Result<Set, Box<dyn std::error::Error>> {
    let root = data_dir(Path::new("."));
    let e = if scene {
        None
    } else {
        Some(EasyVqa::open(&root, split)?)
    };
    let (mut ex, mut px, mut ans) = (vec![], vec![], vec![]);
    let mut i = 0;
    while ex.len() < n {
        let s = match &e {
            Some(e) if i < e.len() => e.get(i)?,
            Some(_) => break,
            None => example_of(Source::Scene, i as u64, split, None)?,
        };
        i += 1;
        if let Some(q) = s.qa.iter().find(|q| q.category == QaCategory::Colour) {
            ex.push(fmt.example(&q.question, &q.answer, tokens)?);
            px.push(pixels(&s, size)?);
            ans.push(q.answer.clone());
        }
    }
    Ok((ex, Tensor::stack(&px, 0)?, ans))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        return Err("usage: overfit_colour CONFIG.json EXPORT_DIR LM_GGUF [N] [STEPS] [LR]".into());
    }
    let mut cfg: AdapterTrainConfig = serde_json::from_str(&std::fs::read_to_string(&a[1])?)?;
    cfg.common_token_weight = None;
    let export = Path::new(&a[2]);
    let n: usize = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let steps: usize = a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(40);
    let lr: f64 = a.get(6).map(|s| s.parse()).transpose()?.unwrap_or(3e-4);
    let batch: usize = a.get(7).map(|s| s.parse()).transpose()?.unwrap_or(n).min(n);
    let mut lm = FrozenLm::from_gguf(Path::new(&a[3]))?;
    prepare_lora_from(&cfg, &mut lm, Some(&export.join("lora.safetensors")))?;
    let mut tr = Trainable::init_from(
        &cfg,
        lm.hidden_size(),
        Some(&export.join("vision")),
        Some(&export.join("adapter.safetensors")),
    )?;
    tr.add_lora(&lm)?;
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder)?;
    let tokens = cfg.tokens_per_image();
    let size = cfg.vision.image_size;
    let scene = std::env::var("AFM_OVERFIT_SOURCE").is_ok_and(|v| v == "scene");
    let train = colour_set(scene, Split::Train, n, &fmt, tokens, size)?;
    let shown = n.min(64);
    let test = colour_set(scene, Split::HeldOut, shown, &fmt, tokens, size)?;
    if n <= 16 {
        println!("train answers: {:?}", train.2);
    }
    let train_shown: Set = (
        train.0[..shown].to_vec(),
        train.1.narrow(0, 0, shown)?,
        train.2[..shown].to_vec(),
    );
    let ph = fmt.placeholder_id();
    // in chunks of 16 sequences: the LoRA graph of 64 sequences at once would take ~20 GB
    let eval = |tr: &Trainable, s: &Set| -> Result<(f32, f32), Box<dyn std::error::Error>> {
        let img = tr.build(&cfg, lm.hidden_size())?.embed(&s.1)?.detach();
        let b = img.dim(0)?;
        let rolled = Tensor::cat(&[img.narrow(0, 1, b - 1)?, img.narrow(0, 0, 1)?], 0)?;
        let (mut right, mut other) = (0f32, 0f32);
        for start in (0..b).step_by(16) {
            let len = 16.min(b - start);
            let ex = &s.0[start..start + len];
            let w = len as f32 / b as f32;
            right += w * sequence_loss(&lm.model, ex, ph, &img.narrow(0, start, len)?)?
                .detach()
                .to_scalar::<f32>()?;
            other += w * sequence_loss(&lm.model, ex, ph, &rolled.narrow(0, start, len)?)?
                .detach()
                .to_scalar::<f32>()?;
        }
        Ok((right, other))
    };
    let mut opt = AdamW::new(&tr.params, cfg.adamw)?;
    for step in 0..=steps {
        if step % 5 == 0 {
            let (r, o) = eval(&tr, &train_shown)?;
            let (tr_, to) = eval(&tr, &test)?;
            println!(
                "step {step:>3}: train right {r:.3} rolled {o:.3} | test right {tr_:.3} rolled {to:.3}"
            );
        }
        if step == steps {
            break;
        }
        let start = (step * batch) % n;
        let len = batch.min(n - start);
        let img = tr
            .build(&cfg, lm.hidden_size())?
            .embed(&train.1.narrow(0, start, len)?)?;
        let loss = sequence_loss(&lm.model, &train.0[start..start + len], ph, &img)?;
        let g = loss.backward()?;
        opt.step(&tr.params, &g, lr)?;
    }
    Ok(())
}
