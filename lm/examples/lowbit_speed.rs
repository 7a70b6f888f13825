//! The 2-bit decode kernel's compute ceiling: one activation row times a 3072 x 3072 2-bit
//! matrix (2.9 MB with its scales, resident in a last-level cache of a few MB or more), so
//! the time is the kernel's and the pool's, not the memory's. Reports GB/s of weights
//! streamed through the kernel: a decode step cannot read its weights faster than this, so
//! `bench lm`'s bandwidth limit is out of reach where it is above this figure. `AFM_ISA`
//! picks the kernel level, `RAYON_NUM_THREADS` (or `--threads` elsewhere) the threads.
//! Usage: `lowbit_speed [ROUNDS]`.
use afm_lm::lowbit::{LowBitMatrix, DEFAULT_GROUP};
use std::time::Instant;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!("{}", afm_lm::isa::describe_cpu());
    let (rows, cols) = (3072, 3072);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 251) as f32 / 125.0 - 1.0) * 0.02)
        .collect();
    let m = LowBitMatrix::quantize_with(&w, rows, cols, 2, DEFAULT_GROUP, None, 1)
        .expect("a valid 2-bit format");
    let bytes = m.storage_bytes() as f64;
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let calls = 200;
    for _ in 0..calls / 4 {
        std::hint::black_box(m.matmul(&x, 1));
    }
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..calls {
            std::hint::black_box(m.matmul(&x, 1));
        }
        best = best.min(t.elapsed().as_secs_f64() / calls as f64);
    }
    println!(
        "2-bit {rows}x{cols}, group {DEFAULT_GROUP}, threads: {}, kernel {}: {:.1} us per product, \
         {:.1} GB/s of weights, {:.1} GMAC/s",
        afm_lm::par::threads(),
        afm_lm::lowbit::kernel_name(),
        best * 1e6,
        bytes / best / 1e9,
        (rows * cols) as f64 / best / 1e9
    );
}
