//! Times the int8 path's matmul (`Int8Matrix::forward`) at the vision encoder's shapes
//! (SigLIP-B/16-512: 1024 rows of 768 -> 2304, 768 -> 3072, 3072 -> 768), on one thread
//! (`Pool::Inline`), reporting milliseconds and multiply-adds per second. `AFM_ISA` picks
//! the kernel level. Usage: `int8_speed [ROUNDS]`.
use afm_lm::int8::{Int8Matrix, Pool};
use std::time::Instant;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("{}", afm_lm::isa::describe_cpu());
    let rows = 1024;
    for (inp, out) in [(768, 2304), (768, 3072), (3072, 768)] {
        let wt: Vec<f32> = (0..inp * out)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.001)
            .collect();
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 104_729 % 997) as f32 - 498.0) * 0.01)
            .collect();
        let m = Int8Matrix::from_transposed(&wt, inp, out).with_pool(Pool::Inline);
        let mut best = f64::INFINITY;
        for _ in 0..rounds {
            let t = Instant::now();
            std::hint::black_box(m.forward(&x, rows, None, |_| {}));
            best = best.min(t.elapsed().as_secs_f64());
        }
        let macs = (rows * inp * out) as f64;
        println!(
            "{rows} x {inp} -> {out}: {:.1} ms, {:.1} GMAC/s (best of {rounds})",
            best * 1e3,
            macs / best / 1e9
        );
    }
}
