//! Times the batched decode attention ([`afm_lm::kernels::decode_attention`]) of a
//! SmolLM2-135M-shaped step: 30 layers, 9 heads over 3 K/V heads of 64, f16 caches, `B`
//! sequences of `N` positions, hot (caches in L3) and cold (a 128 MB buffer read between
//! steps, as a decode step's weight stream does).
//!
//! ```text
//! cargo run --release -p afm-lm --example att_speed -- [B] [N] [ROUNDS]
//! ```
//!
//! `LAYERS=1` keeps one layer's caches (in L2): the kernels' own speed. Measured on the
//! Zen 4 (2026-12-05), 4 x 124 positions: hot 0.6-1.0 ms, cold 1.0-1.5 ms per step; the
//! difference is about the 11.4 MB of K/V at the machine's read bandwidth. Software
//! prefetch of the next keys, and loading each K/V chunk once for the three query heads
//! that share it, changed neither (within the noise).
use half::f16;
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let b = *a.first().unwrap_or(&4);
    let n = *a.get(1).unwrap_or(&124);
    let rounds = *a.get(2).unwrap_or(&30);
    let layers: usize = std::env::var("LAYERS").map_or(30, |s| s.parse().unwrap());
    let (heads, kvh, hd) = (9usize, 3usize, 64usize);
    let kw = kvh * hd;
    let f = |i: usize, s: f32| f16::from_f32((i as f32 * s).sin() * 0.7);
    let caches: Vec<Vec<(Vec<f16>, Vec<f16>)>> = (0..layers)
        .map(|l| {
            (0..b)
                .map(|i| {
                    let k = (0..n * kw).map(|x| f(x + 31 * i + l, 0.71)).collect();
                    let v = (0..n * kw).map(|x| f(x + 17 * i + l, 1.13)).collect();
                    (k, v)
                })
                .collect()
        })
        .collect();
    let q: Vec<f32> = (0..b * heads * hd)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let pos = vec![n - 1; b];
    let flush: Vec<u8> = vec![1; 128 << 20];
    let step = || {
        let t = Instant::now();
        for l in &caches {
            let kv: Vec<(&[f16], &[f16])> = l.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            std::hint::black_box(afm_lm::kernels::decode_attention(
                &q, &pos, &kv, heads, kvh, hd, 0.125,
            ));
        }
        t.elapsed().as_secs_f64()
    };
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    let (mut hot, mut cold) = (vec![], vec![]);
    step();
    for _ in 0..rounds {
        hot.push(step());
        let s: u64 = flush.iter().step_by(64).map(|&x| x as u64).sum();
        std::hint::black_box(s);
        cold.push(step());
    }
    println!(
        "{b} sequences x {n} positions, {:.1} MB of K/V: hot {:.3} ms, cold {:.3} ms per step",
        (layers * b * n * kw * 2 * 2) as f64 / 1e6,
        med(&mut hot),
        med(&mut cold)
    );
}
