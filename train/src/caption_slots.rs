//! The caption-slot objective: image tokens that spell the image's description in the frozen
//! language model's own word embeddings.
//!
//! # Why
//! Trained only through the frozen LM's answer loss, `afm-tiny`'s image tokens collapse onto
//! each question type's most common answer (model card). Given the ground-truth description
//! as *text*, the same frozen LM answers most questions (`train/examples/prompt_oracle.rs`).
//! This objective asks the image tokens to carry that description directly: image token `i`
//! (the adapter's output grid in raster order, as the LM reads it) should be the embedding of
//! the description's token `i`.
//!
//! # Objective
//! For an image with `n` image tokens and caption tokens `c_0 .. c_{m-1}` (the tokenizer's
//! ids of the sample's caption, no special tokens), the targets are `t_i = c_i` for
//! `i < min(n, m)` (the *caption slots*) and the image placeholder's id for the remaining
//! slots (the *padding*, the token that means "no text here" to the LM); a caption longer
//! than `n` tokens keeps its first `n` ([`targets`]). With `E` the LM's token-embedding table
//! `(vocab, h)`, `x_i` the image token and `s` = [`CaptionSlots::logit_scale`]:
//!
//! `loss = mean_{caption slots} CE(s x_i E^T, t_i)
//!       + mse_weight * mean_{all slots} |x_i - E[t_i]|^2 / (h * ms(E))`
//!
//! The cross-entropy picks the right word among the vocabulary (its logits are the LM's own
//! tied output head without the final norm). It skips the padding: SmolLM2's unused special
//! tokens, `<empty_output>` among them, share one direction with some rare words, so no
//! image token can make `<empty_output>` the arg-max (`E[16] . E[16]` = 10.8 against 17.3 for token
//! 3427). The squared error, in units of the embeddings' mean square `ms(E)`, pulls every
//! slot, padding included, onto its target's embedding, so the tokens stay at the scale of
//! real words. The scale `s` lets an exact embedding win the soft-max: at `s = 1` a word's
//! own embedding scores ~7.9 against tens of thousands of others near 0 and gets only a few
//! per cent of the probability, and the cross-entropy would push the norm up.
//!
//! Neither term needs the LM's layers, so a step costs the ViT and adapter plus one
//! `(b n, h) x (h, vocab)` product: a pure caption-slot run
//! ([`super::adapter_train::AdapterTrainConfig::lm_loss`] `false`) sees more images per
//! second than the answer loss allows. Added to the answer loss (weight
//! [`CaptionSlots::weight`]) it keeps the tokens readable while the answers train.
//!
//! # Reported
//! [`SlotLoss::accuracy`]: the fraction of caption slots whose arg-max word is the target,
//! the held-out figure of a pure caption-slot run.

use crate::pretrain::{Result, TrainError};
use afm_lm::diff_model::DiffLm;
use afm_lm::Tokenizer;
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

/// Weights of the caption-slot loss (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CaptionSlots {
    /// Weight of the caption-slot loss in a run's total loss.
    pub weight: f32,
    /// Weight of the squared-error term inside it.
    pub mse_weight: f32,
    /// Factor on the logits of the cross-entropy term (module docs).
    #[serde(default = "one")]
    pub logit_scale: f32,
}

fn one() -> f32 {
    1.0
}

impl CaptionSlots {
    pub fn validate(&self) -> Result<()> {
        if !(self.weight > 0.0 && self.weight.is_finite()) {
            return Err(TrainError::Invalid(
                "`caption_slots.weight` must be positive".into(),
            ));
        }
        if !(self.logit_scale > 0.0 && self.logit_scale.is_finite()) {
            return Err(TrainError::Invalid(
                "`caption_slots.logit_scale` must be positive".into(),
            ));
        }
        if !(self.mse_weight >= 0.0 && self.mse_weight.is_finite()) {
            return Err(TrainError::Invalid(
                "`caption_slots.mse_weight` must be zero or positive".into(),
            ));
        }
        Ok(())
    }
}

/// The slot targets of one caption: its first `n` token ids, then `pad` up to `n`.
pub fn targets(tok: &Tokenizer, caption: &str, n: usize, pad: u32) -> Result<Vec<u32>> {
    let enc = tok
        .inner()
        .encode(caption, false)
        .map_err(|e| TrainError::Invalid(format!("tokenizing the caption {caption:?}: {e}")))?;
    let mut t: Vec<u32> = enc.get_ids().iter().copied().take(n).collect();
    t.resize(n, pad);
    Ok(t)
}

/// The LM's whole token-embedding table, detached.
///
/// # Shapes
/// `-> (vocab, h)`.
pub fn embedding_table(lm: &DiffLm) -> Result<Tensor> {
    let v = lm.config().vocab_size as u32;
    let ids = Tensor::arange(0u32, v, &Device::Cpu)?.unsqueeze(0)?;
    Ok(lm.embed(&ids)?.squeeze(0)?.detach())
}

/// The frozen embedding table the objective compares against.
pub struct SlotHead {
    /// `(vocab, h)`
    table: Tensor,
    /// `(h, vocab)`, contiguous.
    table_t: Tensor,
    /// Mean square of the table's entries.
    mean_square: f64,
}

/// One batch's caption-slot loss.
pub struct SlotLoss {
    /// Scalar, with its graph to the image tokens.
    pub loss: Tensor,
    /// Caption slots whose arg-max word is the target.
    pub hits: usize,
    /// Number of caption slots.
    pub words: usize,
}

impl SlotLoss {
    /// Fraction of caption slots whose arg-max word is the target (0 when there are none).
    pub fn accuracy(&self) -> f32 {
        self.hits as f32 / self.words.max(1) as f32
    }
}

impl SlotHead {
    /// The LM's token-embedding table (a copy; no gradient ever reaches it).
    pub fn new(lm: &DiffLm) -> Result<Self> {
        let table = embedding_table(lm)?;
        let table_t = table.t()?.contiguous()?;
        let mean_square = table.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        Ok(Self {
            table,
            table_t,
            mean_square,
        })
    }

    /// The loss of image tokens against their targets (module docs); `pad` marks the padding
    /// slots (kept out of the cross-entropy and the accuracy).
    ///
    /// # Shapes
    /// `image: (b, n, h)`, `targets.len() = b`, each of length `n`.
    pub fn loss(
        &self,
        image: &Tensor,
        targets: &[Vec<u32>],
        pad: u32,
        c: &CaptionSlots,
    ) -> Result<SlotLoss> {
        let (b, n, h) = image.dims3()?;
        if targets.len() != b || targets.iter().any(|t| t.len() != n) {
            return Err(TrainError::Invalid(format!(
                "caption-slot targets for {} images of {n} tokens do not match the {b} images",
                targets.len()
            )));
        }
        let flat: Vec<u32> = targets.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat.clone(), b * n, &Device::Cpu)?;
        let x = image.reshape((b * n, h))?;
        let want = self.table.index_select(&t, 0)?;
        let mse = ((&x - want)?.sqr()?.mean_all()? / self.mean_square)?;
        let mut loss = (mse * c.mse_weight as f64)?;
        let words: Vec<u32> = (0..flat.len() as u32)
            .filter(|&r| flat[r as usize] != pad)
            .collect();
        let (mut hits, m) = (0, words.len());
        if m > 0 {
            let rows = Tensor::from_vec(words.clone(), m, &Device::Cpu)?;
            let xw = x.index_select(&rows, 0)?;
            let tw: Vec<u32> = words.iter().map(|&r| flat[r as usize]).collect();
            let logits = (xw.matmul(&self.table_t)? * c.logit_scale as f64)?;
            let ce = candle_nn::loss::cross_entropy(
                &logits,
                &Tensor::from_vec(tw.clone(), m, &Device::Cpu)?,
            )?;
            loss = (loss + ce)?;
            let best: Vec<u32> = logits.detach().argmax(D::Minus1)?.to_vec1()?;
            hits = best.iter().zip(&tw).filter(|(a, b)| a == b).count();
        }
        Ok(SlotLoss {
            loss,
            hits,
            words: m,
        })
    }
}
