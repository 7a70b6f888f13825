//! Connectionist temporal classification (Graves et al., 2006): the loss of a label sequence
//! under per-step class distributions, summed over every alignment, and its gradient.
//!
//! Stage 1b reads a string from the character slots of the patches along its row
//! ([`crate::perceive`]); with CTC the head may put each character in any slot of any
//! patch in the row, in order, instead of one fixed slot per character. The forward and
//! backward recursions run here on plain slices (in log space), and the gradient with
//! respect to the logits enters candle's graph as a constant: `sum(G * logits)` has gradient
//! `G` ([`crate::perceive`] builds that term).
//!
//! # Shapes
//! `logp: (t, c)` row-major log-probabilities (each row a log-softmax), `labels: (l,)`
//! with no blank among them -> the negative log-likelihood and `(t, c)` gradients with
//! respect to the logits the log-softmax came from.

const NEG: f32 = f32::NEG_INFINITY;

fn lse2(a: f32, b: f32) -> f32 {
    let m = a.max(b);
    if m == NEG {
        NEG
    } else {
        m + ((a - m).exp() + (b - m).exp()).ln()
    }
}

fn lse3(a: f32, b: f32, c: f32) -> f32 {
    let m = a.max(b).max(c);
    if m == NEG {
        NEG
    } else {
        m + ((a - m).exp() + (b - m).exp() + (c - m).exp()).ln()
    }
}

/// Steps a label sequence needs at least: one per label, plus one blank between equal
/// neighbours.
pub fn min_steps(labels: &[u32]) -> usize {
    labels.len() + labels.windows(2).filter(|w| w[0] == w[1]).count()
}

/// The CTC negative log-likelihood of `labels` under `logp` and its gradient with respect
/// to the logits (`softmax - posterior occupancy`). `None` when no alignment exists (fewer
/// steps than [`min_steps`], or a label equal to `blank` or out of range).
///
/// # Shapes
/// `logp: (t, c)` -> `(nll, grad: (t, c))`.
pub fn ctc(
    logp: &[f32],
    t: usize,
    c: usize,
    labels: &[u32],
    blank: u32,
) -> Option<(f32, Vec<f32>)> {
    if t == 0 || logp.len() != t * c || labels.iter().any(|&l| l == blank || l as usize >= c) {
        return None;
    }
    if t < min_steps(labels) {
        return None;
    }
    // the extended sequence: blank, l1, blank, l2, ..., blank
    let ext: Vec<u32> = std::iter::once(blank)
        .chain(labels.iter().flat_map(|&l| [l, blank]))
        .collect();
    let s = ext.len();
    let lp = |ti: usize, k: u32| logp[ti * c + k as usize];
    // skipping a blank is allowed into a label that differs from the one two back
    let skip = |i: usize| i >= 2 && ext[i] != blank && ext[i] != ext[i - 2];
    // alpha[t][i]: paths over steps 0..=t ending in state i, emissions included
    let mut alpha = vec![NEG; t * s];
    alpha[0] = lp(0, ext[0]);
    if s > 1 {
        alpha[1] = lp(0, ext[1]);
    }
    for ti in 1..t {
        for i in 0..s {
            let a = alpha[(ti - 1) * s + i];
            let b = if i >= 1 {
                alpha[(ti - 1) * s + i - 1]
            } else {
                NEG
            };
            let d = if skip(i) {
                alpha[(ti - 1) * s + i - 2]
            } else {
                NEG
            };
            let v = lse3(a, b, d);
            alpha[ti * s + i] = if v == NEG { NEG } else { v + lp(ti, ext[i]) };
        }
    }
    let last = (t - 1) * s;
    let logp_all = if s > 1 {
        lse2(alpha[last + s - 1], alpha[last + s - 2])
    } else {
        alpha[last]
    };
    if !logp_all.is_finite() {
        return None;
    }
    // beta[t][i]: paths over steps t+1.. from state i at step t, emissions after t
    let mut beta = vec![NEG; t * s];
    beta[last + s - 1] = 0.0;
    if s > 1 {
        beta[last + s - 2] = 0.0;
    }
    for ti in (0..t - 1).rev() {
        for i in 0..s {
            let nx = (ti + 1) * s;
            let a = beta[nx + i] + lp(ti + 1, ext[i]);
            let b = if i + 1 < s {
                beta[nx + i + 1] + lp(ti + 1, ext[i + 1])
            } else {
                NEG
            };
            let d = if i + 2 < s && skip(i + 2) {
                beta[nx + i + 2] + lp(ti + 1, ext[i + 2])
            } else {
                NEG
            };
            beta[ti * s + i] = lse3(a, b, d);
        }
    }
    // gradient: softmax minus the posterior occupancy of each class
    let mut grad = vec![0f32; t * c];
    for ti in 0..t {
        let row = &mut grad[ti * c..(ti + 1) * c];
        for (k, g) in row.iter_mut().enumerate() {
            *g = lp(ti, k as u32).exp();
        }
        for i in 0..s {
            let v = alpha[ti * s + i] + beta[ti * s + i] - logp_all;
            if v > NEG {
                row[ext[i] as usize] -= v.exp();
            }
        }
    }
    Some((-logp_all, grad))
}

/// Greedy (best-path) decoding: the most likely class per step, repeats merged, blanks
/// dropped.
pub fn greedy(best: &[u32], blank: u32) -> Vec<u32> {
    let mut out = vec![];
    let mut prev = blank;
    for &k in best {
        if k != blank && k != prev {
            out.push(k);
        }
        prev = k;
    }
    out
}

/// Levenshtein distance between two sequences (character error counts).
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (x != y) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn log_softmax(z: &[f32], c: usize) -> Vec<f32> {
        z.chunks(c)
            .flat_map(|r| {
                let m = r.iter().cloned().fold(NEG, f32::max);
                let s: f32 = r.iter().map(|x| (x - m).exp()).sum();
                r.iter().map(move |x| x - m - s.ln()).collect::<Vec<_>>()
            })
            .collect()
    }

    /// The definition: sum over every path of `t` steps that collapses to `labels`.
    fn brute(logp: &[f32], t: usize, c: usize, labels: &[u32], blank: u32) -> f32 {
        let mut total = 0f64;
        let n = c.pow(t as u32);
        for code in 0..n {
            let mut x = code;
            let path: Vec<u32> = (0..t)
                .map(|_| {
                    let k = (x % c) as u32;
                    x /= c;
                    k
                })
                .collect();
            if greedy(&path, blank) == labels {
                let lp: f32 = path
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| logp[i * c + k as usize])
                    .sum();
                total += (lp as f64).exp();
            }
        }
        -(total.ln() as f32)
    }

    #[test]
    fn the_loss_is_the_sum_over_every_alignment() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for labels in [
            vec![1u32],
            vec![1, 2],
            vec![2, 2],
            vec![1, 2, 1],
            vec![3, 3, 1],
        ] {
            for t in min_steps(&labels)..=6 {
                let c = 4;
                let z: Vec<f32> = (0..t * c).map(|_| rng.random_range(-2.0..2.0)).collect();
                let lp = log_softmax(&z, c);
                let (nll, _) = ctc(&lp, t, c, &labels, 0).unwrap();
                let want = brute(&lp, t, c, &labels, 0);
                assert!(
                    (nll - want).abs() < 1e-4,
                    "{labels:?} t={t}: {nll} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (t, c, labels) = (7, 5, vec![2u32, 2, 4]);
        let z: Vec<f32> = (0..t * c).map(|_| rng.random_range(-1.5..1.5)).collect();
        let f = |z: &[f32]| ctc(&log_softmax(z, c), t, c, &labels, 0).unwrap().0 as f64;
        let (_, g) = ctc(&log_softmax(&z, c), t, c, &labels, 0).unwrap();
        for i in 0..t * c {
            let h = 1e-2f32;
            let (mut up, mut dn) = (z.clone(), z.clone());
            up[i] += h;
            dn[i] -= h;
            let fd = (f(&up) - f(&dn)) / (2.0 * h as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3,
                "logit {i}: {fd} vs {}",
                g[i]
            );
        }
        // every step's gradient sums to zero (softmax minus a distribution)
        for r in g.chunks(c) {
            assert!(r.iter().sum::<f32>().abs() < 1e-4);
        }
    }

    #[test]
    fn impossible_alignments_and_bad_labels_are_refused() {
        let lp = log_softmax(&[0.0; 12], 4);
        assert!(ctc(&lp, 3, 4, &[1, 1], 0).is_some());
        assert!(
            ctc(&lp, 2, 4, &[1, 1], 0).is_none(),
            "needs a blank between the 1s"
        );
        assert!(ctc(&lp, 3, 4, &[0], 0).is_none(), "blank as a label");
        assert!(ctc(&lp, 3, 4, &[7], 0).is_none(), "label out of range");
        assert!(ctc(&lp, 3, 3, &[1], 0).is_none(), "wrong shape");
    }

    #[test]
    fn greedy_decoding_and_edit_distance() {
        assert_eq!(greedy(&[0, 1, 1, 0, 1, 2, 2, 0], 0), vec![1, 1, 2]);
        assert_eq!(edit_distance(b"kitten", b"sitting"), 3);
        assert_eq!(edit_distance(b"", b"abc"), 3);
        assert_eq!(edit_distance(b"same", b"same"), 0);
    }
}
