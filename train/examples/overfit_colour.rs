//! Diagnostic: can stage 2's trainable parts (adapter + the LM's LoRA) learn to name a shape's
//! colour from the image at all?
//!
//! ```text
//! cargo run --release -p afm-train --example overfit_colour -- CONFIG.json EXPORT_DIR LM_GGUF [N] [STEPS] [LR]
//! ```
//!
//! Takes the first `N` (default 16) easy-VQA `train` images with a colour question, all asking
//! the same "What color is the shape?", and trains the export's adapter and LoRA (ViT frozen,
//! as `CONFIG`) on that one batch for `STEPS` (default 40) full-batch AdamW steps at `LR`
//! (default 3e-4). Every 5 steps it prints the loss with the right images and with the images
//! rolled by one, and the same on `N` easy-VQA `test` images. The question is the same for
//! every image, so a loss below the answers' entropy needs the image: if the right and rolled
//! losses stay together, the setup cannot read colour, whatever the data.
use afm_train::adapter_train::{
    prepare_lora_from, sequence_loss, AdapterTrainConfig, FrozenLm, Trainable,
};
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::optim::AdamW;
use afm_train::pretrain::pixels;
use afm_train::prompt::PromptFormat;
use afm_train::{QaCategory, Split};
use candle_core::Tensor;
use std::path::Path;

type Set = (Vec<afm_train::prompt::Example>, Tensor, Vec<String>);

fn colour_set(
    e: &EasyVqa,
    n: usize,
    fmt: &PromptFormat,
    tokens: usize,
    size: usize,
) -> Result<Set, Box<dyn std::error::Error>> {
    let (mut ex, mut px, mut ans) = (vec![], vec![], vec![]);
    let mut i = 0;
    while ex.len() < n && i < e.len() {
        let s = e.get(i)?;
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
    let root = data_dir(Path::new("."));
    let tokens = cfg.tokens_per_image();
    let size = cfg.vision.image_size;
    let train = colour_set(&EasyVqa::open(&root, Split::Train)?, n, &fmt, tokens, size)?;
    let test = colour_set(
        &EasyVqa::open(&root, Split::HeldOut)?,
        n,
        &fmt,
        tokens,
        size,
    )?;
    println!("train answers: {:?}", train.2);
    let ph = fmt.placeholder_id();
    let eval = |tr: &Trainable, s: &Set| -> Result<(f32, f32), Box<dyn std::error::Error>> {
        let img = tr.build(&cfg, lm.hidden_size())?.embed(&s.1)?.detach();
        let b = img.dim(0)?;
        let rolled = Tensor::cat(&[img.narrow(0, 1, b - 1)?, img.narrow(0, 0, 1)?], 0)?;
        Ok((
            sequence_loss(&lm.model, &s.0, ph, &img)?.to_scalar::<f32>()?,
            sequence_loss(&lm.model, &s.0, ph, &rolled)?.to_scalar::<f32>()?,
        ))
    };
    let mut opt = AdamW::new(&tr.params, cfg.adamw)?;
    for step in 0..=steps {
        if step % 5 == 0 {
            let (r, o) = eval(&tr, &train)?;
            let (tr_, to) = eval(&tr, &test)?;
            println!(
                "step {step:>3}: train right {r:.3} rolled {o:.3} | test right {tr_:.3} rolled {to:.3}"
            );
        }
        if step == steps {
            break;
        }
        let img = tr.build(&cfg, lm.hidden_size())?.embed(&train.1)?;
        let loss = sequence_loss(&lm.model, &train.0, ph, &img)?;
        let g = loss.backward()?;
        opt.step(&tr.params, &g, lr)?;
    }
    Ok(())
}
