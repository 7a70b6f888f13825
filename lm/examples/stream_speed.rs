//! Times the quantized matmuls of a SmolLM2-135M-shaped decode step over weights that do not
//! fit in the cache (30 layers of Q4_1 matrices, the Q8_0 head), at 1 and 4 activation rows.
//!
//! ```text
//! cargo run --release -p afm-lm --example stream_speed -- [ROUNDS]
//! ```
//!
//! `NO_HEAD=1` leaves the head out, `HEAD_ONLY=1` the layers (the head alone, 32 MB, may then
//! sit in a large L3). Medians over `ROUNDS` (default 20), 1 and 4 rows alternated.
use afm_lm::quant::{QKind, QMatrix};
use std::time::Instant;

fn matrix(kind: QKind, rows: usize, cols: usize, seed: usize) -> QMatrix {
    let nbytes = rows * cols / 32 * kind.block_bytes();
    let mut data: Vec<u8> = (0..nbytes)
        .map(|i| ((i + seed) * 7919 % 251) as u8)
        .collect();
    for blk in data.chunks_exact_mut(kind.block_bytes()) {
        blk[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        if kind == QKind::Q4_1 {
            blk[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_bits().to_le_bytes());
        }
    }
    QMatrix::new(kind, rows, cols, data).unwrap()
}

fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(20, |s| s.parse().unwrap());
    let only_head = std::env::var_os("HEAD_ONLY").is_some();
    let no_head = std::env::var_os("NO_HEAD").is_some();
    let mut ms = vec![];
    if !only_head {
        for l in 0..30 {
            // q+k+v fused, o, gate+up fused, down
            ms.push(matrix(QKind::Q4_1, 960, 576, l));
            ms.push(matrix(QKind::Q4_1, 576, 576, l + 1));
            ms.push(matrix(QKind::Q4_1, 3072, 576, l + 2));
            ms.push(matrix(QKind::Q4_1, 576, 1536, l + 3));
        }
    }
    if !no_head {
        ms.push(matrix(QKind::Q8_0, 49152, 576, 9));
    }
    let bytes: usize = ms.iter().map(|m| m.storage_bytes()).sum();
    let xs: Vec<Vec<f32>> = [576usize, 1536]
        .iter()
        .map(|&c| (0..4 * c).map(|i| (i as f32 * 0.37).sin()).collect())
        .collect();
    let run = |m: usize| {
        let t = Instant::now();
        for w in &ms {
            let x = if w.dims().1 == 576 { &xs[0] } else { &xs[1] };
            std::hint::black_box(w.matmul(&x[..m * w.dims().1], m));
        }
        t.elapsed().as_secs_f64()
    };
    run(1);
    run(4);
    let (mut t1, mut t4) = (vec![], vec![]);
    for _ in 0..rounds {
        t1.push(run(1));
        t4.push(run(4));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (med(&mut t1), med(&mut t4));
    println!(
        "{:.1} MB of weights: 1 row {:.3} ms ({:.1} GB/s), 4 rows {:.3} ms, ratio {:.2}x",
        bytes as f64 / 1e6,
        a * 1e3,
        bytes as f64 / a / 1e9,
        b * 1e3,
        4.0 * a / b
    );
}
