//! Token generation over any [`LanguageModel`]: sampling, stop tokens, stop strings, a token
//! budget, streaming of UTF-8-safe text pieces, cancellation and timing figures.

use crate::cache::Cache;
use crate::error::{LmError, Result};
use crate::model::{LanguageModel, LogitsFor};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer};
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Extra stop token ids (the tokenizer's eos ids always stop).
    pub stop_tokens: Vec<u32>,
    /// Stop as soon as the text contains one of these; the stop string is not returned.
    pub stop_strings: Vec<String>,
    /// Set to `true` from another thread to stop after the current token.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop_tokens: vec![],
            stop_strings: vec![],
            cancel: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence or stop token.
    StopToken,
    StopString,
    MaxTokens,
    /// The context is full: the prompt plus the tokens generated reached the model's length.
    ContextFull,
    Cancelled,
}

/// Timing and counts of one generation.
#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stop: StopReason,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed over the tokens after the first (the first comes from prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    /// Generated ids (stop token excluded).
    pub ids: Vec<u32>,
    /// The logits of the first generated token.
    pub first_logits: Vec<f32>,
    pub stats: GenerationStats,
}

/// Holds back text that may be the start of a stop string.
pub(crate) struct StopFilter<'a> {
    pub(crate) stops: &'a [String],
    pub(crate) pending: String,
}

impl<'a> StopFilter<'a> {
    /// Returns (text safe to emit, whether a stop string was hit).
    pub(crate) fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Longest suffix of pending that is a proper prefix of a stop string stays back.
        let mut hold = 0;
        for s in self.stops {
            for (i, _) in self.pending.char_indices() {
                let suffix = &self.pending[i..];
                if s.starts_with(suffix) && suffix.len() < s.len() {
                    hold = hold.max(suffix.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Generates from token ids. `on_text` receives each new piece of text as soon as it is
/// complete UTF-8; return `false` from it to stop (reported as `Cancelled`).
pub fn generate<M: LanguageModel + ?Sized>(
    model: &M,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(LmError::Invalid("empty prompt".into()));
    }
    let embeds = model.embed_tokens(prompt)?;
    generate_from_embeds(model, tok, &embeds, prompt, opts, on_text)
}

/// Generates from input embeddings (text with image embeddings spliced in). `history` is the
/// prompt's token ids, used by the repetition penalty (image positions may hold any id).
///
/// # Shapes
/// `embeds: (t, hidden)`.
pub fn generate_from_embeds<M: LanguageModel + ?Sized>(
    model: &M,
    tok: &Tokenizer,
    embeds: &Tensor,
    history: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let mut cache = model.new_cache();
    generate_with_cache(model, tok, embeds, history, opts, &mut cache, on_text)
}

/// As [`generate_from_embeds`], continuing an existing cache (multi-turn chat).
pub fn generate_with_cache<M: LanguageModel + ?Sized>(
    model: &M,
    tok: &Tokenizer,
    embeds: &Tensor,
    history: &[u32],
    opts: &GenerateOptions,
    cache: &mut Cache,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let t = embeds.dim(0)?;
    let ctx = model.info().context_length;
    let total = cache.seq_len() + t;
    if total >= ctx {
        return Err(LmError::PromptTooLong {
            tokens: total,
            context: ctx,
            reserved: 1,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let stops: Vec<u32> = tok
        .eos_ids()
        .iter()
        .chain(&opts.stop_tokens)
        .copied()
        .collect();
    let mut filter = StopFilter {
        stops: &opts.stop_strings,
        pending: String::new(),
    };
    let mut stream = TextStream::new();
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut hist = history.to_vec();
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };

    let t0 = Instant::now();
    let logits = model.forward_embeds(embeds, cache, &LogitsFor::Last)?;
    let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let first_logits = row.clone();
    let t1 = Instant::now();
    let stop = loop {
        if ids.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        let next = sampler.sample(&row, &hist)?;
        if stops.contains(&next) {
            break StopReason::StopToken;
        }
        ids.push(next);
        hist.push(next);
        if let Some(piece) = stream.push(tok, next)? {
            let (out, hit) = filter.push(&piece);
            text.push_str(&out);
            let go_on = out.is_empty() || on_text(&out);
            if hit {
                break StopReason::StopString;
            }
            if !go_on {
                break StopReason::Cancelled;
            }
        }
        if cancelled() {
            break StopReason::Cancelled;
        }
        if ids.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if cache.seq_len() + 1 > ctx - 1 {
            break StopReason::ContextFull;
        }
        let logits = model.forward_tokens(&[next], cache, &LogitsFor::Last)?;
        row = logits.squeeze(0)?.to_vec1()?;
    };
    if stop != StopReason::StopString {
        if let Some(rest) = stream.finish(tok)? {
            let (out, _) = filter.push(&rest);
            text.push_str(&out);
            if !out.is_empty() {
                on_text(&out);
            }
        }
        let rest = filter.finish();
        if !rest.is_empty() {
            text.push_str(&rest);
            on_text(&rest);
        }
    }
    let decode_secs = t1.elapsed().as_secs_f64();
    Ok(Generation {
        text,
        stats: GenerationStats {
            prompt_tokens: t,
            generated_tokens: ids.len(),
            prefill_secs,
            decode_secs,
            stop,
        },
        ids,
        first_logits,
    })
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_filter_holds_back_prefixes_and_cuts_at_the_stop() {
        let stops = vec!["END".to_string()];
        let mut f = StopFilter {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(f.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(f.push("N"), (String::new(), false));
        assert_eq!(f.push("Dx"), (String::new(), true));
        let mut f = StopFilter {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(f.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(f.push("xit"), ("Exit".to_string(), false));
    }
}
