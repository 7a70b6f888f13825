//! Perplexity of a language model on a token sequence, the way `afm bench quant` and its
//! llama.cpp counterpart (`scripts/bench_llamacpp_ppl.py`) both compute it: the text is cut
//! into consecutive windows of `ctx` tokens, each window is one fresh forward pass, and every
//! position but a window's first is scored (`-log p(token | the window before it)`).

use crate::error::{LmError, Result};
use crate::model::{LanguageModel, LogitsFor};

/// Summed negative log-likelihood and the number of scored tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Nll {
    pub sum: f64,
    pub count: usize,
}

impl Nll {
    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        (self.sum / self.count.max(1) as f64).exp()
    }
}

/// `-log softmax(logits)[target]` in f64.
pub fn token_nll(logits: &[f32], target: u32) -> Result<f64> {
    let t = target as usize;
    if t >= logits.len() {
        return Err(LmError::BadTokenId {
            id: target,
            vocab: logits.len(),
        });
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln()
        + m;
    Ok(lse - logits[t] as f64)
}

/// The NLL of `ids` in windows of `ctx` tokens (see the module docs).
pub fn nll<M: LanguageModel + ?Sized>(model: &M, ids: &[u32], ctx: usize) -> Result<Nll> {
    if ctx < 2 {
        return Err(LmError::Invalid(format!(
            "perplexity window {ctx}: need at least 2"
        )));
    }
    let v = model.info().vocab_size;
    let mut out = Nll::default();
    for w in ids.chunks(ctx) {
        if w.len() < 2 {
            continue;
        }
        let mut cache = model.new_cache();
        let rows: Vec<usize> = (0..w.len() - 1).collect();
        let l = model.forward_tokens(w, &mut cache, &LogitsFor::Rows(rows))?;
        let l: Vec<f32> = l.flatten_all()?.to_vec1()?;
        for (i, row) in l.chunks_exact(v).enumerate() {
            out.sum += token_nll(row, w[i + 1])?;
            out.count += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_nll_is_the_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        let want = -((3.0f64).exp() / z).ln();
        assert!((token_nll(&l, 2).unwrap() - want).abs() < 1e-12);
        assert!(token_nll(&l, 3).is_err());
        let n = Nll { sum: 2.0, count: 2 };
        assert!((n.perplexity() - std::f64::consts::E).abs() < 1e-12);
    }
}
