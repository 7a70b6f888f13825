//! Quantized matrices with our own SIMD kernels for the GGUF types the default model uses
//! (Q4_1 weights, Q8_0 embeddings/output), following ggml's arithmetic: activations are
//! quantized per 32-value block (Q8_1 against Q4_1, Q8_0 against Q8_0) and dot products are
//! integer within a block, scaled in f32. candle 0.11 runs Q4_1 with a scalar loop; these
//! kernels use AVX2 (detected at run time, scalar fallback elsewhere) and split output rows
//! over rayon's pool.

use crate::error::{LmError, Result};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

/// The block formats with our kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// `d: f16, m: f16, qs: [u8; 16]` (value = d * nibble + m); 20 bytes per 32 values.
    Q4_1,
    /// `d: f16, qs: [i8; 32]` (value = d * q); 34 bytes per 32 values.
    Q8_0,
}

impl QKind {
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => 20,
            QKind::Q8_0 => 34,
        }
    }
    /// Bytes of one quantized activation block (Q8_1: d, s, 32 x i8; Q8_0: d, 32 x i8).
    fn act_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => 36,
            QKind::Q8_0 => 34,
        }
    }
}

/// A `(rows, cols)` matrix of ggml blocks, row-major; used as `x @ W^T`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

impl QMatrix {
    /// Wraps raw ggml block data, checking its size.
    pub fn new(kind: QKind, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if cols % QK != 0 {
            return Err(LmError::Invalid(format!("{kind:?} matrix width {cols} is not a multiple of {QK}")));
        }
        let want = rows * cols / QK * kind.block_bytes();
        if data.len() != want {
            return Err(LmError::Invalid(format!(
                "{kind:?} matrix ({rows}, {cols}) needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Self { kind, rows, cols, data })
    }

    pub fn kind(&self) -> QKind {
        self.kind
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.kind.block_bytes()
    }

    /// Dequantizes the given rows (embedding lookup).
    ///
    /// # Shapes
    /// `ids.len() = t` -> `(t, cols)`.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &id) in out.chunks_mut(self.cols).zip(ids) {
            let id = id as usize;
            if id >= self.rows {
                return Err(LmError::BadTokenId { id: id as u32, vocab: self.rows });
            }
            let row = &self.data[id * self.row_bytes()..(id + 1) * self.row_bytes()];
            for (b, o) in row.chunks_exact(self.kind.block_bytes()).zip(o.chunks_mut(QK)) {
                match self.kind {
                    QKind::Q4_1 => {
                        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                        for j in 0..16 {
                            o[j] = (b[4 + j] & 0xF) as f32 * d + m;
                            o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                        }
                    }
                    QKind::Q8_0 => {
                        let d = f16_at(b, 0);
                        for j in 0..QK {
                            o[j] = b[2 + j] as i8 as f32 * d;
                        }
                    }
                }
            }
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
    }

    /// `x @ W^T`.
    ///
    /// # Shapes
    /// `x: (..., cols)` -> `(..., rows)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.cols {
            return Err(LmError::Invalid(format!("matmul: input width {k}, matrix expects {}", self.cols)));
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let out = self.matmul(&xs, m);
        let mut od = dims;
        *od.last_mut().unwrap() = self.rows;
        Ok(Tensor::from_vec(out, od, &Device::Cpu)?)
    }

    /// `(m, cols) @ W^T -> (m, rows)` on slices.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let nb = self.cols / QK;
        let ab = self.kind.act_bytes();
        let mut act = vec![0u8; m * nb * ab];
        act.par_chunks_mut(nb * ab).zip(x.par_chunks(self.cols)).for_each(|(a, xr)| match self.kind {
            QKind::Q4_1 => quantize_q8_1(xr, a),
            QKind::Q8_0 => quantize_q8_0(xr, a),
        });
        let rb = self.row_bytes();
        // Output computed transposed, (rows, m), so each task owns contiguous memory.
        let mut out_t = vec![0f32; self.rows * m];
        let threads = rayon::current_num_threads().max(1);
        let chunk_rows = (self.rows / (threads * 8)).clamp(1, 64);
        let dot = dot_fn(self.kind);
        out_t
            .par_chunks_mut(chunk_rows * m)
            .zip(self.data.par_chunks(chunk_rows * rb))
            .for_each(|(o, w)| {
                for (r, wr) in w.chunks_exact(rb).enumerate() {
                    for i in 0..m {
                        o[r * m + i] = dot(nb, wr, &act[i * nb * ab..(i + 1) * nb * ab]);
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = out_t[r * m + i];
            }
        }
        out
    }
}

type DotFn = fn(usize, &[u8], &[u8]) -> f32;

fn dot_fn(kind: QKind) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return match kind {
                QKind::Q4_1 => avx2::dot_q4_1_q8_1_safe,
                QKind::Q8_0 => avx2::dot_q8_0_q8_0_safe,
            };
        }
    }
    match kind {
        QKind::Q4_1 => dot_q4_1_q8_1_scalar,
        QKind::Q8_0 => dot_q8_0_q8_0_scalar,
    }
}

/// ggml's x86 `quantize_row_q8_1`: per block `d = amax / 127`, `q = round_half_even(x * 127 /
/// amax)`, `s = d * sum(q)`; d and s stored as f16.
pub fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(36)) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (j, v) in xb.iter().enumerate() {
            let q = (v * id).round_ties_even() as i32;
            sum += q;
            ob[4 + j] = q as i8 as u8;
        }
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        ob[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_bits().to_le_bytes());
    }
}

/// ggml's x86 `quantize_row_q8_0`.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (j, v) in xb.iter().enumerate() {
            ob[2 + j] = (v * id).round_ties_even() as i32 as i8 as u8;
        }
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    }
}

fn dot_q4_1_q8_1_scalar(nb: usize, x: &[u8], y: &[u8]) -> f32 {
    let mut acc = 0f32;
    for i in 0..nb {
        let (xb, yb) = (&x[i * 20..i * 20 + 20], &y[i * 36..i * 36 + 36]);
        let mut s = 0i32;
        for j in 0..16 {
            s += (xb[4 + j] & 0xF) as i32 * yb[4 + j] as i8 as i32;
            s += (xb[4 + j] >> 4) as i32 * yb[20 + j] as i8 as i32;
        }
        acc += f16_at(xb, 0) * f16_at(yb, 0) * s as f32 + f16_at(xb, 2) * f16_at(yb, 2);
    }
    acc
}

fn dot_q8_0_q8_0_scalar(nb: usize, x: &[u8], y: &[u8]) -> f32 {
    let mut acc = 0f32;
    for i in 0..nb {
        let (xb, yb) = (&x[i * 34..i * 34 + 34], &y[i * 34..i * 34 + 34]);
        let s: i32 = (0..QK).map(|j| xb[2 + j] as i8 as i32 * yb[2 + j] as i8 as i32).sum();
        acc += f16_at(xb, 0) * f16_at(yb, 0) * s as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::f16_at;
    use std::arch::x86_64::*;

    pub fn dot_q4_1_q8_1_safe(nb: usize, x: &[u8], y: &[u8]) -> f32 {
        assert!(x.len() >= nb * 20 && y.len() >= nb * 36);
        // SAFETY: the caller (`dot_fn`) selected this only after detecting AVX2 and FMA, and
        // the assert above keeps every load below inside `x` and `y`.
        unsafe { dot_q4_1_q8_1(nb, x, y) }
    }

    pub fn dot_q8_0_q8_0_safe(nb: usize, x: &[u8], y: &[u8]) -> f32 {
        assert!(x.len() >= nb * 34 && y.len() >= nb * 34);
        // SAFETY: as above: AVX2/FMA detected at run time, loads bounded by the assert.
        unsafe { dot_q8_0_q8_0(nb, x, y) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4_1_q8_1(nb: usize, x: &[u8], y: &[u8]) -> f32 {
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for i in 0..nb {
            let xb = x.as_ptr().add(i * 20);
            let yb = y.as_ptr().add(i * 36);
            let xs = std::slice::from_raw_parts(xb, 4);
            let ys = std::slice::from_raw_parts(yb, 4);
            let (dx, mx, dy, sy) = (f16_at(xs, 0), f16_at(xs, 2), f16_at(ys, 0), f16_at(ys, 2));
            summs += mx * sy;
            let packed = _mm_loadu_si128(xb.add(4) as *const __m128i);
            let lo = _mm_and_si128(packed, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
            let qx = _mm256_set_m128i(hi, lo);
            let qy = _mm256_loadu_si256(yb.add(4) as *const __m256i);
            let p16 = _mm256_maddubs_epi16(qx, qy);
            let p32 = _mm256_madd_epi16(p16, ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy), _mm256_cvtepi32_ps(p32), acc);
        }
        hsum(acc) + summs
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q8_0_q8_0(nb: usize, x: &[u8], y: &[u8]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for i in 0..nb {
            let xb = x.as_ptr().add(i * 34);
            let yb = y.as_ptr().add(i * 34);
            let d = f16_at(std::slice::from_raw_parts(xb, 2), 0) * f16_at(std::slice::from_raw_parts(yb, 2), 0);
            let qx = _mm256_loadu_si256(xb.add(2) as *const __m256i);
            let qy = _mm256_loadu_si256(yb.add(2) as *const __m256i);
            // |x| * sign(y, x): maddubs needs an unsigned left operand
            let ax = _mm256_sign_epi8(qx, qx);
            let sy = _mm256_sign_epi8(qy, qx);
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p32), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0 - 0.5) * 2.0).collect()
    }

    /// Our kernels against candle's own (scalar / AVX) implementation of the same formats.
    #[test]
    fn matmul_matches_candle_on_the_same_blocks() {
        let (rows, cols, m) = (70, 96, 5);
        let w = Tensor::from_vec(data(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(data(m * cols, 7), (m, cols), &Device::Cpu).unwrap();
        for (dt, kind) in [(GgmlDType::Q4_1, QKind::Q4_1), (GgmlDType::Q8_0, QKind::Q8_0)] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let ours = QMatrix::new(kind, rows, cols, q.data().unwrap().to_vec()).unwrap();
            let want = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
            let want = candle_core::Module::forward(&want, &x).unwrap();
            let got = ours.forward(&x).unwrap();
            let d: f32 = (&got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(d < 2e-3, "{kind:?}: {d}");
            // the scalar path agrees too
            let nb = cols / QK;
            let mut act = vec![0u8; nb * kind.act_bytes()];
            let xs: Vec<f32> = x.get(0).unwrap().to_vec1().unwrap();
            match kind {
                QKind::Q4_1 => quantize_q8_1(&xs, &mut act),
                QKind::Q8_0 => quantize_q8_0(&xs, &mut act),
            }
            let row = &ours.data[..ours.row_bytes()];
            let (a, b) = match kind {
                QKind::Q4_1 => (dot_q4_1_q8_1_scalar(nb, row, &act), dot_fn(kind)(nb, row, &act)),
                QKind::Q8_0 => (dot_q8_0_q8_0_scalar(nb, row, &act), dot_fn(kind)(nb, row, &act)),
            };
            assert!((a - b).abs() < 1e-4, "{kind:?}: scalar {a} simd {b}");
            // embedding rows equal candle's dequantization
            let deq = QTensor::quantize(&w, dt).unwrap().dequantize(&Device::Cpu).unwrap();
            let r = ours.rows_f32(&[3, 69]).unwrap();
            let want_rows = deq.index_select(&Tensor::new(&[3u32, 69], &Device::Cpu).unwrap(), 0).unwrap();
            let d: f32 = (&r - &want_rows).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(d < 1e-6, "{kind:?} rows: {d}");
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(QMatrix::new(QKind::Q4_1, 2, 33, vec![]).is_err());
        assert!(QMatrix::new(QKind::Q4_1, 2, 32, vec![0; 39]).is_err());
        let m = QMatrix::new(QKind::Q8_0, 2, 32, vec![0; 68]).unwrap();
        assert!(m.rows_f32(&[2]).is_err());
        assert!(m.forward(&Tensor::zeros((1, 31), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}

impl QMatrix {
    /// Stacks matrices of the same format and width along the rows; `None` if they differ.
    pub fn concat_rows(ms: &[&QMatrix]) -> Option<QMatrix> {
        let first = ms.first()?;
        if ms.iter().any(|m| m.kind != first.kind || m.cols != first.cols) {
            return None;
        }
        let mut data = Vec::with_capacity(ms.iter().map(|m| m.data.len()).sum());
        for m in ms {
            data.extend_from_slice(&m.data);
        }
        Some(QMatrix {
            kind: first.kind,
            rows: ms.iter().map(|m| m.rows).sum(),
            cols: first.cols,
            data,
        })
    }
}
