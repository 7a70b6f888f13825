//! Times the prefill attention ([`afm_lm::kernels::causal_attention`]) of one layer of a
//! SmolLM2-135M-shaped model (9 heads over 3 K/V heads of 64, f32) over `T` rows (default
//! 1141, the prompt of `afm bench vlm`).
//!
//! ```text
//! cargo run --release -p afm-lm --example prefill_att -- [T]
//! ```
//!
//! Measured on the Intel Xeon (family 6 model 207, 2 threads, 2026-12-06), alternated:
//! 36.6-37.8 ms per layer one row at a time (`rows::attend_row`), 20.5-23.2 ms with four
//! rows per call (`rows::attend_rows`).
use std::time::Instant;
fn main() {
    let t: usize = std::env::args().nth(1).map_or(1141, |s| s.parse().unwrap());
    let (heads, kvh, hd) = (9usize, 3usize, 64usize);
    let f = |i: usize, s: f32| (i as f32 * s).sin() * 0.7;
    let q: Vec<f32> = (0..t * heads * hd).map(|i| f(i, 0.37)).collect();
    let k: Vec<f32> = (0..t * kvh * hd).map(|i| f(i, 0.71)).collect();
    let v: Vec<f32> = (0..t * kvh * hd).map(|i| f(i, 1.13)).collect();
    let pos: Vec<usize> = (0..t).collect();
    for _ in 0..3 {
        let s = Instant::now();
        for _ in 0..10 {
            std::hint::black_box(afm_lm::kernels::causal_attention(
                &q, &pos, &k, &v, heads, kvh, hd, 0.125,
            ));
        }
        println!("{:.2} ms per layer", s.elapsed().as_secs_f64() * 100.0);
    }
}
