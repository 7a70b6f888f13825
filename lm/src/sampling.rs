//! Next-token samplers: greedy, temperature, top-k, top-p, min-p, repetition penalty, with a
//! seeded ChaCha8 generator so a seed reproduces a run exactly on every platform.

use crate::error::{LmError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings. `temperature == 0` is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p * p(most likely)` (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this (1.0 = off).
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LmError::Invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty {} must be > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Stateful sampler (holds the random generator).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one row, vocab long); `history` is the token ids
    /// so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(LmError::Invalid("empty logits".into()));
        }
        let p = &self.params;
        if p.temperature == 0.0 && p.repetition_penalty == 1.0 {
            // greedy without a penalty: no copy of the row
            if logits.iter().any(|x| x.is_nan()) {
                return Err(LmError::Invalid("the model produced NaN logits".into()));
            }
            return Ok(argmax(logits));
        }
        let mut logits = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let from = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &id in &history[from..] {
                if let (true, Some(l)) = (seen.insert(id), logits.get_mut(id as usize)) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(LmError::Invalid("the model produced NaN logits".into()));
        }
        if p.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        // Candidates sorted by logit, descending.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = if p.top_k == 0 {
            logits.len()
        } else {
            p.top_k.min(logits.len())
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            idx.truncate(k);
        }
        idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &q) in probs[..keep].iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return Ok(idx[i]);
            }
        }
        Ok(idx[keep - 1])
    }
}

/// Index of the largest value (the first one on ties, as llama.cpp and torch do).
pub fn argmax(xs: &[f32]) -> u32 {
    // the definition: the first index whose value no later one exceeds (NaNs are passed
    // over, unless the first value is NaN, which nothing exceeds)
    if xs.first().is_none_or(|x| x.is_nan()) {
        return 0;
    }
    // in two vectorised passes: the largest value, then the first chunk holding it
    let mx = crate::kernels::max_of(xs, f32::NEG_INFINITY, |x| x);
    let mut chunks = xs.chunks(16).enumerate();
    chunks
        .find_map(|(c, ch)| {
            ch.contains(&mx)
                .then(|| 16 * c + ch.iter().position(|&x| x == mx).unwrap_or(0))
        })
        .unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn greedy_takes_argmax_and_first_on_ties() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]).unwrap(), 1);
    }

    /// The vectorised argmax is the definition (first index that no later value exceeds),
    /// with ties, NaNs, infinities and signed zeros.
    #[test]
    fn argmax_is_the_first_largest() {
        let naive = |xs: &[f32]| {
            let mut best = 0;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN, 5.0, 1.0],
            vec![1.0, f32::NAN, 5.0, 5.0],
            vec![f32::NEG_INFINITY; 40],
            vec![-0.0, 0.0, -1.0],
            vec![-1.0, 0.0, -0.0],
            vec![2.0, f32::INFINITY, 3.0, f32::INFINITY],
        ];
        for n in [1usize, 15, 16, 17, 33, 1000, 49152] {
            cases.push(
                (0..n)
                    .map(|i| ((i * 7919 % 1013) as f32 * 0.01).sin().round())
                    .collect(),
            );
        }
        for xs in cases {
            assert_eq!(argmax(&xs), naive(&xs), "{:?}", &xs[..xs.len().min(8)]);
        }
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            })
            .unwrap();
            (0..50)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_1_and_tiny_top_p_and_min_p_1_are_greedy() {
        let logits = [0.5f32, 2.0, 1.9, -3.0];
        for p in [
            SamplingParams {
                top_k: 1,
                ..params(5.0)
            },
            SamplingParams {
                top_p: 1e-6,
                ..params(5.0)
            },
            SamplingParams {
                min_p: 1.0,
                ..params(5.0)
            },
        ] {
            let mut s = Sampler::new(p).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]).unwrap(), 1);
            }
        }
    }

    #[test]
    fn top_k_2_only_ever_picks_the_two_best() {
        let logits = [0.0f32, 1.0, 1.1, 0.9];
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            ..params(10.0)
        })
        .unwrap();
        let picks: std::collections::HashSet<u32> =
            (0..200).map(|_| s.sample(&logits, &[]).unwrap()).collect();
        assert_eq!(picks, [1u32, 2].into_iter().collect());
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        })
        .unwrap();
        assert_eq!(s.sample(&[1.0, 1.5], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[1.0, 1.5], &[1]).unwrap(), 0);
    }

    #[test]
    fn bad_params_and_nan_logits_are_errors() {
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..params(1.0)
        })
        .is_err());
        assert!(Sampler::new(params(-1.0)).is_err());
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert!(s.sample(&[f32::NAN, 1.0], &[]).is_err());
    }
}
