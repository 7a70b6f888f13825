//! Diagnostic: does the image pathway carry information to the frozen LM?
//!
//! ```text
//! cargo run --release -p afm-train --example diag_image -- EXPORT_DIR LM_GGUF [N]
//! ```
//!
//! Prints the L2 norms of the LM's token embeddings and of the export's image
//! embeddings (on the first held-out batch), then, over the first `N` (default 64) held-out
//! questions (rounded up to a multiple of 8), the teacher-forced loss per question kind with the right image and with the
//! image of the next example in the batch. When the two losses agree for a kind, the LM
//! answers that kind from its prior, not from the image. easy-VQA questions are included
//! when `models/easy-vqa` (relative to the working directory) holds the data.
//!
//! The export's `lora.safetensors`, when it has one, is attached to the LM first.
//!
//! For the first four images it also prints each image token's nearest word (the LM's output
//! head without the final norm) next to the image's caption.
//!
//! On the first `afm-tiny` (no adapter output norm), 96 questions: image tokens of norm 177
//! against word embeddings of 3.2, and count questions at loss 0.846 (right) vs 0.849 (other
//! image).
use afm_fusion::afm_tiny::load_export;
use afm_fusion::VisionAdapter;
use afm_train::adapter_train::{batch, sequence_loss, AdapterTrainConfig, FrozenLm};
use afm_train::easy_vqa::{data_dir, EasyVqa};
use afm_train::prompt::PromptFormat;
use afm_train::Split;
use candle_core::{Tensor, D};
use std::collections::BTreeMap;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        return Err("usage: diag_image EXPORT_DIR LM_GGUF [N]".into());
    }
    let (cfg_e, vit, adapter) = load_export(Path::new(&a[1]))?;
    let mut lm = FrozenLm::from_gguf(Path::new(&a[2]))?;
    // the export's own LoRA adapter, as inference applies it
    let lora = Path::new(&a[1]).join("lora.safetensors");
    if lora.exists() {
        let ad = afm_lm::lora::LoraAdapter::load(&lora)?;
        ad.check_base(&lm.info.sha256)?;
        lm.model.attach_lora(&ad)?;
        println!("LoRA adapter {} attached", lora.display());
    }
    let n: usize = match a.get(3) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("N must be a number, got `{s}`"))?,
        None => 64,
    };
    let easy = EasyVqa::open(&data_dir(Path::new(".")), Split::HeldOut).ok();
    let mut cfg = AdapterTrainConfig::afm_tiny();
    cfg.vision = cfg_e.vision.clone();
    cfg.pool = cfg_e.adapter.pool;
    let fmt = PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder)?;
    // token embedding norms
    let vocab = lm.model.config().vocab_size;
    let emb = afm_train::caption_slots::embedding_table(&lm.model)?;
    let norms = emb.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nv: Vec<f32> = norms.to_vec1()?;
    let mut s = nv.clone();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "token embedding norms: median {:.3} p10 {:.3} p90 {:.3} mean|x| {:.4}",
        s[vocab / 2],
        s[vocab / 10],
        s[vocab * 9 / 10],
        emb.abs()?.mean_all()?.to_scalar::<f32>()?
    );
    let mut per: BTreeMap<String, (f32, f32, usize)> = BTreeMap::new();
    let bs = 8;
    let mut done = 0;
    while done < n {
        let b = batch(&cfg, &fmt, Split::HeldOut, done as u64, bs, easy.as_ref())?;
        let x = vit.forward(&b.pixels)?;
        let g = cfg.vision.grid();
        let img = adapter.forward(&x, (g, g), cfg.vision.num_registers())?;
        if done == 0 {
            let inorm = img.sqr()?.sum(D::Minus1)?.sqrt()?;
            println!(
                "image embedding norms: mean {:.3} min {:.3} max {:.3}; mean|x| {:.4}",
                inorm.mean_all()?.to_scalar::<f32>()?,
                inorm.flatten_all()?.min(0)?.to_scalar::<f32>()?,
                inorm.flatten_all()?.max(0)?.to_scalar::<f32>()?,
                img.abs()?.mean_all()?.to_scalar::<f32>()?
            );
            // how different are the images' embeddings from each other?
            let mean = img.mean(0)?;
            let dev = img.broadcast_sub(&mean)?.sqr()?.sum(D::Minus1)?.sqrt()?;
            println!(
                "image embeddings: per-token distance from the batch mean {:.3}",
                dev.mean_all()?.to_scalar::<f32>()?
            );
            // and within one image: do its tokens differ by position?
            let own = img.broadcast_sub(&img.mean_keepdim(1)?)?;
            let own = own.sqr()?.sum(D::Minus1)?.sqrt()?;
            println!(
                "image embeddings: per-token distance from its own image's mean token {:.3}",
                own.mean_all()?.to_scalar::<f32>()?
            );
            // the same, relative to the token norm, after each stage of the adapter
            let r = cfg.vision.num_registers();
            let vit_patches = ("vit", x.narrow(1, r, g * g)?);
            let stages = adapter.forward_stages(&x, (g, g), r)?;
            for (name, z) in std::iter::once(vit_patches).chain(stages) {
                let d = z
                    .broadcast_sub(&z.mean_keepdim(1)?)?
                    .sqr()?
                    .sum(D::Minus1)?
                    .sqrt()?;
                let n = z.sqr()?.sum(D::Minus1)?.sqrt()?;
                println!(
                    "  adapter stage {name:>6}: per-position variation {:.3} of the token norm",
                    d.mean_all()?.to_scalar::<f32>()? / n.mean_all()?.to_scalar::<f32>()?
                );
            }
            println!(
                "share of the image tokens' energy common to the batch: {:.3}",
                afm_train::adapter_train::common_token_share(&img)?.to_scalar::<f32>()?
            );
            // what the image tokens say when read as words: each token's nearest word by
            // the LM's own output head (dot product with the embedding table), next to the
            // caption (what `caption_slots` trains them towards)
            let words = img.broadcast_matmul(&emb.t()?)?.argmax(D::Minus1)?;
            for i in 0..bs.min(4) {
                let ids: Vec<u32> = words.get(i)?.to_vec1()?;
                println!("image {i} caption: {}", b.captions[i]);
                println!("image {i} tokens:  {}", lm.tokenizer.decode(&ids, false)?);
            }
        }
        let rolled = Tensor::cat(&[img.narrow(0, 1, bs - 1)?, img.narrow(0, 0, 1)?], 0)?;
        for i in 0..bs {
            let ex = std::slice::from_ref(&b.examples[i]);
            let l1 = sequence_loss(&lm.model, ex, fmt.placeholder_id(), &img.narrow(0, i, 1)?)?
                .to_scalar::<f32>()?;
            let l2 = sequence_loss(
                &lm.model,
                ex,
                fmt.placeholder_id(),
                &rolled.narrow(0, i, 1)?,
            )?
            .to_scalar::<f32>()?;
            let c = format!("{:?}", b.categories[i]);
            let e = per.entry(c).or_insert((0.0, 0.0, 0));
            e.0 += l1;
            e.1 += l2;
            e.2 += 1;
        }
        done += bs;
    }
    println!(
        "{:<28} {:>6} {:>8} {:>8}",
        "category", "n", "right", "rolled"
    );
    for (c, (l1, l2, k)) in per {
        println!(
            "{c:<28} {k:>6} {:>8.3} {:>8.3}",
            l1 / k as f32,
            l2 / k as f32
        );
    }
    Ok(())
}
