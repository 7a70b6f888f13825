//! Continuous batching: many generations advance together, one model pass for all of them
//! per step ([`DeviceModel::forward_segments`]), so each step reads the weights once for
//! the whole batch. A [`Sequence`] is one generation's state between steps (sampler, stop
//! rules, text stream, cache); sequences join at any step, either already prefilled
//! ([`Sequence::start`]) or with their prompt still to run ([`Sequence::pending`]: the
//! next [`step`] prefills it in the same pass as the others' decode step), and leave when
//! they stop. Each sequence's tokens are exactly what [`crate::generate`] gives for the
//! same request (tested).

use crate::cache::Cache;
use crate::device_model::DeviceModel;
use crate::error::{LmError, Result};
use crate::generate::{GenerateOptions, StopFilter, StopReason};
use crate::guided::Guide;
use crate::model::{LanguageModel, LogitsFor};
use crate::sampling::Sampler;
use crate::tokenizer::{TextStream, Tokenizer};
use candle_core::Tensor;
use std::sync::atomic::Ordering;

/// One generation's state between decode steps (module docs).
pub struct Sequence {
    opts: GenerateOptions,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    pending: String,
    stream: TextStream,
    history: Vec<u32>,
    ids: Vec<u32>,
    text: String,
    cache: Cache,
    context: usize,
    prompt_tokens: usize,
    /// Prompt positions taken from a cached prefix ([`Sequence::start_cached`]).
    cached_tokens: usize,
    /// The token to feed at the next step (`None` once stopped).
    next: Option<u32>,
    stop: Option<StopReason>,
    /// Guided generation: the tokens the grammar allows ([`crate::guided`]).
    guide: Option<Guide>,
    /// The prompt rows still to be prefilled ([`Sequence::pending`]); `None` once the
    /// prompt has run.
    prefill: Option<Tensor>,
}

/// What one step gave a sequence: new text (possibly empty: held back, or an incomplete
/// UTF-8 character) and, when it stopped, why.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    pub text: String,
    pub stop: Option<StopReason>,
}

impl Sequence {
    /// Prefills the prompt (`embeds`, with `history` its token ids for the repetition
    /// penalty) and samples the first token.
    ///
    /// # Shapes
    /// `embeds: (t, hidden)`.
    pub fn start<M: LanguageModel + ?Sized>(
        model: &M,
        tok: &Tokenizer,
        embeds: &Tensor,
        history: &[u32],
        opts: &GenerateOptions,
    ) -> Result<(Self, StepOutput)> {
        Self::start_guided(model, tok, embeds, history, opts, None)
    }

    /// [`Self::start`] under a grammar: every token is one the guide allows, and the
    /// sequence stops when the grammar is complete (stop strings do not apply).
    ///
    /// # Shapes
    /// `embeds: (t, hidden)`.
    pub fn start_guided<M: LanguageModel + ?Sized>(
        model: &M,
        tok: &Tokenizer,
        embeds: &Tensor,
        history: &[u32],
        opts: &GenerateOptions,
        guide: Option<Guide>,
    ) -> Result<(Self, StepOutput)> {
        Self::start_cached(model, tok, embeds, history, opts, guide, None)
    }

    /// [`Self::start_guided`] from a cache that already holds the prompt's first
    /// `prefix.seq_len()` positions (a prefix cache's copy, computed from the same tokens):
    /// only the rest of `embeds` is prefilled. The prefix must be shorter than the prompt,
    /// so that the last position is run and gives the first token's logits. `None`: the
    /// whole prompt.
    ///
    /// # Shapes
    /// `embeds: (t, hidden)`.
    pub fn start_cached<M: LanguageModel + ?Sized>(
        model: &M,
        tok: &Tokenizer,
        embeds: &Tensor,
        history: &[u32],
        opts: &GenerateOptions,
        guide: Option<Guide>,
        prefix: Option<Cache>,
    ) -> Result<(Self, StepOutput)> {
        let mut s = Self::pending(model, tok, embeds, history, opts, guide, prefix)?;
        let rows = s
            .prefill
            .take()
            .ok_or_else(|| LmError::Invalid("a new sequence without prompt rows".into()))?;
        let logits = model.forward_embeds(&rows, &mut s.cache, &LogitsFor::Last)?;
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let out = s.push_logits(tok, &row)?;
        Ok((s, out))
    }

    /// A sequence whose prompt has not run yet: checked (length, cached prefix) but not
    /// prefilled. The next [`step`] prefills it in the same pass as the other sequences'
    /// decode step and samples its first token (what [`Self::start_cached`] gives, one
    /// pass later). Arguments as for [`Self::start_cached`].
    ///
    /// # Shapes
    /// `embeds: (t, hidden)`.
    pub fn pending<M: LanguageModel + ?Sized>(
        model: &M,
        tok: &Tokenizer,
        embeds: &Tensor,
        history: &[u32],
        opts: &GenerateOptions,
        guide: Option<Guide>,
        prefix: Option<Cache>,
    ) -> Result<Self> {
        let t = embeds.dim(0)?;
        let context = model.info().context_length;
        if t >= context {
            return Err(LmError::PromptTooLong {
                tokens: t,
                context,
                reserved: 1,
            });
        }
        let (cache, done) = match prefix {
            Some(c) => {
                let p = c.seq_len();
                if p >= t {
                    return Err(LmError::Invalid(format!(
                        "a cached prefix of {p} positions for a prompt of {t}: the prefix must be shorter"
                    )));
                }
                (c, p)
            }
            None => {
                if t == 0 {
                    return Err(LmError::Invalid("an empty prompt".into()));
                }
                (model.new_cache(), 0)
            }
        };
        let mut s = Self {
            sampler: Sampler::new(opts.sampling.clone())?,
            stop_ids: tok
                .eos_ids()
                .iter()
                .chain(&opts.stop_tokens)
                .copied()
                .collect(),
            opts: opts.clone(),
            pending: String::new(),
            stream: TextStream::new(),
            history: history.to_vec(),
            ids: Vec::new(),
            text: String::new(),
            cache,
            context,
            prompt_tokens: t,
            cached_tokens: done,
            next: None,
            stop: None,
            guide,
            prefill: Some(embeds.narrow(0, done, t - done)?),
        };
        if s.guide.is_some() {
            s.opts.stop_strings.clear();
        }
        Ok(s)
    }

    /// Whether the prompt still has to run (a [`Self::pending`] sequence before its first
    /// [`step`]).
    pub fn is_pending(&self) -> bool {
        self.prefill.is_some()
    }

    /// The token the next step feeds; `None` once the sequence has stopped.
    pub fn next_token(&self) -> Option<u32> {
        self.next
    }

    pub fn stop(&self) -> Option<StopReason> {
        self.stop
    }

    /// Generated ids so far (stop token excluded).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Text so far (what the steps returned, joined).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Prompt positions that came from a cached prefix instead of being prefilled.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut Cache {
        &mut self.cache
    }

    /// Stops the sequence (e.g. its client went away).
    pub fn cancel(&mut self) {
        self.next = None;
        self.prefill = None;
        self.stop.get_or_insert(StopReason::Cancelled);
    }

    /// Samples from the logits of the position just run, as `generate` does.
    fn push_logits(&mut self, tok: &Tokenizer, row: &[f32]) -> Result<StepOutput> {
        if self.stop.is_some() {
            return Err(LmError::Invalid("step on a stopped sequence".into()));
        }
        let mut text = String::new();
        let stop = 'step: {
            if self.ids.len() >= self.opts.max_new_tokens {
                break 'step Some(StopReason::MaxTokens);
            }
            let next = match self.guide.as_mut() {
                Some(g) => {
                    let mut r = row.to_vec();
                    g.mask_logits(&mut r)?;
                    self.sampler.sample(&r, &self.history)?
                }
                None => self.sampler.sample(row, &self.history)?,
            };
            if self.stop_ids.contains(&next) {
                break 'step Some(StopReason::StopToken);
            }
            if let Some(g) = self.guide.as_mut() {
                let b = g.token_bytes(next);
                g.consume(next, &b)?;
            }
            self.ids.push(next);
            self.history.push(next);
            if let Some(piece) = self.stream.push(tok, next)? {
                let mut f = StopFilter {
                    stops: &self.opts.stop_strings,
                    pending: std::mem::take(&mut self.pending),
                };
                let (out, hit) = f.push(&piece);
                self.pending = f.pending;
                text.push_str(&out);
                if hit {
                    break 'step Some(StopReason::StopString);
                }
            }
            if self
                .opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                break 'step Some(StopReason::Cancelled);
            }
            if self.guide.as_ref().is_some_and(|g| g.is_stopped()) {
                break 'step Some(StopReason::StopToken);
            }
            if self.ids.len() >= self.opts.max_new_tokens {
                break 'step Some(StopReason::MaxTokens);
            }
            if self.cache.seq_len() + 1 > self.context - 1 {
                break 'step Some(StopReason::ContextFull);
            }
            self.next = Some(next);
            None
        };
        if let Some(reason) = stop {
            self.next = None;
            self.stop = Some(reason);
            if reason != StopReason::StopString {
                if let Some(rest) = self.stream.finish(tok)? {
                    let mut f = StopFilter {
                        stops: &self.opts.stop_strings,
                        pending: std::mem::take(&mut self.pending),
                    };
                    let (out, _) = f.push(&rest);
                    self.pending = f.pending;
                    text.push_str(&out);
                }
                text.push_str(&std::mem::take(&mut self.pending));
            }
        }
        self.text.push_str(&text);
        Ok(StepOutput { text, stop })
    }
}

/// One pass of the model for every sequence in `seqs` that has work: a running sequence
/// ([`Sequence::next_token`]) decodes one token, a [`Sequence::pending`] one runs its prompt
/// and samples its first token, all in one [`DeviceModel::forward_segments`] call (the
/// weights are read once for all of them). Returns one output per sequence of `seqs`, in
/// order (empty text and no stop for a sequence that had already stopped). On a model error
/// no sequence advances (pending ones stay pending).
pub fn step(
    model: &DeviceModel,
    tok: &Tokenizer,
    seqs: &mut [&mut Sequence],
) -> Result<Vec<StepOutput>> {
    let mut outs = vec![
        StepOutput {
            text: String::new(),
            stop: None
        };
        seqs.len()
    ];
    // decoding sequences first (their rows embedded in one call), then the prompts
    let decoding: Vec<usize> = (0..seqs.len())
        .filter(|&i| seqs[i].prefill.is_none() && seqs[i].next.is_some())
        .collect();
    let prefilling: Vec<usize> = (0..seqs.len())
        .filter(|&i| seqs[i].prefill.is_some())
        .collect();
    if decoding.is_empty() && prefilling.is_empty() {
        return Ok(outs);
    }
    let order: Vec<usize> = decoding.iter().chain(&prefilling).copied().collect();
    let mut parts = Vec::with_capacity(1 + prefilling.len());
    let mut counts = vec![1; decoding.len()];
    if !decoding.is_empty() {
        let ids: Vec<u32> = decoding
            .iter()
            .map(|&i| seqs[i].next.unwrap_or(0))
            .collect();
        parts.push(model.embed_tokens(&ids)?);
    }
    for &i in &prefilling {
        if let Some(rows) = &seqs[i].prefill {
            counts.push(rows.dim(0)?);
            parts.push(rows.clone());
        }
    }
    let embeds = if parts.len() == 1 {
        parts.remove(0)
    } else {
        Tensor::cat(&parts, 0)?
    };
    let logits = {
        let mut by_index: Vec<Option<&mut Cache>> =
            seqs.iter_mut().map(|s| Some(&mut s.cache)).collect();
        let mut caches: Vec<&mut Cache> =
            order.iter().filter_map(|&i| by_index[i].take()).collect();
        model.forward_segments(&embeds, &counts, &mut caches)?
    };
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    for (&i, row) in order.iter().zip(rows) {
        seqs[i].prefill = None;
        outs[i] = seqs[i].push_logits(tok, &row)?;
    }
    Ok(outs)
}
