//! The common language-model trait that the on-device model, the server model, fusion,
//! generation and the CLI meet at.

use crate::cache::Cache;
use crate::error::{LmError, Result};
use crate::linear::Linear;
use crate::rms_norm::RmsNorm;
use candle_core::{Device, Tensor};

/// Static facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub vocab_size: usize,
    /// Maximum number of positions (prompt + generated).
    pub context_length: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
}

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position (generation).
    Last,
    /// Every position (scoring, tests).
    All,
    /// Selected positions, relative to the start of this pass, ascending.
    Rows(Vec<usize>),
}

impl LogitsFor {
    pub(crate) fn rows(&self, t: usize) -> Result<Vec<usize>> {
        let rows = match self {
            LogitsFor::Last => vec![t.saturating_sub(1)],
            LogitsFor::All => (0..t).collect(),
            LogitsFor::Rows(r) => r.clone(),
        };
        if rows.is_empty() || rows.iter().any(|&r| r >= t) || rows.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(LmError::Invalid(format!(
                "logit rows {rows:?} must be ascending and below the {t} positions of the pass"
            )));
        }
        Ok(rows)
    }
}

/// A decoder language model that starts from input embeddings.
///
/// Weights are immutable and shared (`Send + Sync`); all per-request state lives in the
/// `Cache`, so one model serves many threads, each with its own cache.
pub trait LanguageModel: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Looks up token embeddings.
    ///
    /// # Shapes
    /// `ids.len() = t` -> `(t, hidden)`.
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor>;

    /// A fresh, empty per-request cache.
    fn new_cache(&self) -> Cache;

    /// Runs the positions `cache.seq_len() ..` whose input embeddings are `embeds` (text
    /// embeddings with image embeddings spliced in, for instance), appends them to the cache
    /// and returns the logits of the rows asked for. On error the cache is rolled back.
    ///
    /// # Shapes
    /// `embeds: (t, hidden)` -> `(rows, vocab)`.
    fn forward_embeds(
        &self,
        embeds: &Tensor,
        cache: &mut Cache,
        logits: &LogitsFor,
    ) -> Result<Tensor>;

    /// `forward_embeds(embed_tokens(ids))`.
    ///
    /// # Shapes
    /// `ids.len() = t` -> `(rows, vocab)`.
    fn forward_tokens(&self, ids: &[u32], cache: &mut Cache, logits: &LogitsFor) -> Result<Tensor> {
        let e = self.embed_tokens(ids)?;
        self.forward_embeds(&e, cache, logits)
    }
}

/// Token embeddings, refusing ids outside the vocabulary (shared by the models).
pub(crate) fn embed_checked(embed: &Linear, vocab: usize, ids: &[u32]) -> Result<Tensor> {
    if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(LmError::BadTokenId { id, vocab });
    }
    embed.embedding(ids)
}

/// Final RMSNorm and output projection of `n` hidden rows (shared by the models).
///
/// # Shapes
/// `x: (n, hidden)` -> `(n, vocab)`.
pub(crate) fn output_logits(
    norm: &RmsNorm,
    lm_head: &Linear,
    mut x: Vec<f32>,
    n: usize,
    vocab: usize,
) -> Result<Tensor> {
    norm.forward_inplace(&mut x)?;
    let logits = lm_head.forward(&x, n)?;
    Ok(Tensor::from_vec(logits, (n, vocab), &Device::Cpu)?)
}
