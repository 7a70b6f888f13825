//! Times our quantized matvec on random blocks (decode-sized), reporting GB/s of weights.
use afm_lm::quant::{QKind, QMatrix};
use std::time::Instant;
fn main() {
    for (kind, rows, cols) in [
        (QKind::Q4_1, 3072, 576),
        (QKind::Q4_1, 576, 1536),
        (QKind::Q8_0, 49152, 576),
    ] {
        let nbytes = rows * cols / 32 * kind.block_bytes();
        let mut data = vec![0u8; nbytes];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7919 % 251) as u8;
        }
        // keep scales finite and small
        for blk in data.chunks_exact_mut(kind.block_bytes()) {
            blk[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
            if kind == QKind::Q4_1 {
                blk[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_bits().to_le_bytes());
            }
        }
        let m = QMatrix::new(kind, rows, cols, data).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let n = 300;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(m.matmul(&x, 1));
        }
        let s = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "{kind:?} {rows}x{cols}: {:.1} us, {:.1} GB/s",
            s * 1e6,
            nbytes as f64 / s / 1e9
        );
    }
}
