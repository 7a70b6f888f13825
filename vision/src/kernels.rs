//! CPU kernels for the encoder's inference path, as candle custom ops: a fused multi-head
//! attention (scores, mask, softmax and the weighted sum per block of query rows, never
//! materialising the full `(heads, t, t)` score tensor) and the GELU activations, both with a
//! vectorisable `exp`. candle's own `softmax` and `gelu` run one scalar `exp`/`tanh` per
//! element and, at SigLIP-B/16-512 size, took as long as the matmuls around them.
//!
//! These ops have no backward pass: training uses the candle-op path of the encoder
//! (`VisionEncoder::set_fast_kernels(false)`), which the tests compare against this one.

use crate::bf16::{weighted_sum, BfValues};
use afm_lm::int8::{quantize_rows, Int8Matrix, Pool};
use afm_lm::kernels::{attend_block, attend_block_with, AttendBlock, WeightedSum};
pub use afm_lm::kernels::{exp, softmax_in_place};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape,
};
use rayon::prelude::*;

/// The activations the encoder's MLP can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` = `x * sigmoid(2u)`.
    GeluTanh,
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
}

impl Act {
    /// In place over a slice, at the CPU's vector width (`afm_lm::isa::vectorized`; the same
    /// bits at every width).
    pub fn apply_slice(self, xs: &mut [f32]) {
        afm_lm::isa::vectorized(
            #[inline(always)]
            || match self {
                Act::GeluTanh => xs.iter_mut().for_each(|x| *x = Act::GeluTanh.apply(*x)),
                Act::QuickGelu => xs.iter_mut().for_each(|x| *x = Act::QuickGelu.apply(*x)),
            },
        )
    }

    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        let z = match self {
            Act::GeluTanh => -2.0 * 0.797_884_6 * (x + 0.044_715 * x * x * x),
            Act::QuickGelu => -1.702 * x,
        };
        x / (1.0 + exp(z))
    }
}

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "afm-vision-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "activation input")?;
        let mut out = vec![0f32; x.len()];
        let act = *self;
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, i)| {
                afm_lm::isa::vectorized(
                    #[inline(always)]
                    || match act {
                        Act::GeluTanh => o
                            .iter_mut()
                            .zip(i)
                            .for_each(|(o, &v)| *o = Act::GeluTanh.apply(v)),
                        Act::QuickGelu => o
                            .iter_mut()
                            .zip(i)
                            .for_each(|(o, &v)| *o = Act::QuickGelu.apply(v)),
                    },
                )
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: the fast kernels take f32, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: the fast kernels need a contiguous tensor"),
    }
}

/// Fused multi-head self-attention over packed `[q | k | v]` projections.
///
/// Input 1 is `qkv: (n, t, 3 * heads * head_dim)` (the output of one fused projection, q
/// already including any bias); input 2 is an additive key mask `(m, t)` (0 or `-inf`), where
/// sequence `i` uses row `i % m`, or a `(1, 0)` tensor for no mask. The output is
/// `(n, t, heads * head_dim)`, heads side by side as `out_proj` expects.
///
/// Work is split into `(sequence, head, block of `QBLOCK` = 256 query rows)` tasks on rayon's pool (the
/// pool gemm uses); each task is one `afm_lm::kernels::attend_block` (two single-threaded gemm calls through a per-thread score
/// buffer of `256 x t` floats: 1 MB at t = 1024, an L2; measured fastest of 32..512).
pub struct FusedAttention {
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Scores `q k^T` in int8 ([`afm_lm::int8`]): per head, the keys' mean over the
    /// sequence is subtracted first (each score row moves by a constant, which the softmax
    /// ignores, and the keys quantise with less error), then keys and queries are quantised
    /// per row. The weighted sum of the values runs in bf16 ([`crate::bf16`]) on CPUs with
    /// AVX-512 BF16 and `head_dim` a multiple of 16, in f32 elsewhere.
    pub int8: bool,
}

const QBLOCK: usize = 256;

/// The output buffer shared by the tasks, each of which writes its own disjoint block.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (rows x head columns) regions of the buffer (see `cpu_fwd`),
// and the buffer outlives the parallel loop that uses the pointer.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

impl CustomOp2 for FusedAttention {
    fn name(&self) -> &'static str {
        "afm-vision-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s1, l1, "qkv")?;
        let mask = contiguous_f32(s2, l2, "attention mask")?;
        let (n, t, w3) = l1.shape().dims3()?;
        let (hd, heads) = (self.head_dim, self.heads);
        let d = heads * hd;
        if w3 != 3 * d {
            candle_core::bail!("qkv has width {w3}, expected 3 * {heads} heads * {hd}");
        }
        let (m, mt) = l2.shape().dims2()?;
        let masked = mt != 0;
        if masked && (mt != t || m == 0) {
            candle_core::bail!("attention mask is {m}x{mt}, expected rows of {t} keys");
        }
        let mut out = vec![0f32; n * t * d];
        let optr = OutPtr(out.as_mut_ptr());
        let optr = &optr;
        let nblk = t.div_ceil(QBLOCK);
        // int8: every (sequence, head)'s keys, centred and quantised, once, and its values
        // in bf16 where that is the faster product (`bf16::available`)
        let bf16_values = self.int8 && hd % 16 == 0 && crate::bf16::available();
        let keys: Vec<(Int8Matrix, Option<BfValues>)> = if self.int8 {
            (0..n * heads)
                .into_par_iter()
                .map(|sh| {
                    let (seq, h) = (sh / heads, sh % heads);
                    let k = &qkv[seq * t * 3 * d + d + h * hd..];
                    let mut mean = vec![0f32; hd];
                    for j in 0..t {
                        for (m, v) in mean.iter_mut().zip(&k[j * 3 * d..j * 3 * d + hd]) {
                            *m += v;
                        }
                    }
                    mean.iter_mut().for_each(|m| *m /= t as f32);
                    // the centred keys, one row of `hd` per key, quantised per key
                    let mut centred = vec![0f32; t * hd];
                    for (j, c) in centred.chunks_exact_mut(hd).enumerate() {
                        for ((c, v), m) in c.iter_mut().zip(&k[j * 3 * d..]).zip(&mean) {
                            *c = v - m;
                        }
                    }
                    let km = Int8Matrix::from_rows(hd, t, &centred, hd).with_pool(Pool::Inline);
                    let v = &qkv[seq * t * 3 * d + 2 * d + h * hd..];
                    (km, bf16_values.then(|| BfValues::new(v, 3 * d, t, hd)))
                })
                .collect()
        } else {
            Vec::new()
        };
        let keys = &keys;
        (0..n * heads * nblk).into_par_iter().for_each(|task| {
            let (seq, rest) = (task / (heads * nblk), task % (heads * nblk));
            let (h, blk) = (rest / nblk, rest % nblk);
            let r0 = blk * QBLOCK;
            let rows = QBLOCK.min(t - r0);
            let base = seq * t * 3 * d;
            let q = &qkv[base + r0 * 3 * d + h * hd..];
            let k = &qkv[base + d + h * hd..];
            let v = &qkv[base + 2 * d + h * hd..];
            let mrow = masked.then(|| &mask[(seq % m) * t..(seq % m + 1) * t]);
            let block = AttendBlock {
                q: q.as_ptr(),
                q_stride: 3 * d,
                k: k.as_ptr(),
                v: v.as_ptr(),
                kv_stride: 3 * d,
                out: optr.0.wrapping_add(seq * t * d + r0 * d + h * hd),
                out_stride: d,
                rows,
                keys: t,
                head_dim: hd,
                scale: self.scale,
                normalise_output: true,
            };
            let add_mask = |_: usize, row: &mut [f32]| {
                if let Some(mr) = mrow {
                    for (x, mv) in row.iter_mut().zip(mr) {
                        *x += mv;
                    }
                }
            };
            if self.int8 {
                let mut qb = vec![0f32; rows * hd];
                for (i, r) in qb.chunks_exact_mut(hd).enumerate() {
                    r.copy_from_slice(&q[i * 3 * d..i * 3 * d + hd]);
                }
                let qx = quantize_rows(Pool::Inline, &qb, rows, hd, hd);
                let (km, bv) = &keys[seq * heads + h];
                let out_block = block.out;
                let ws = |p: &[f32], f: &[f32]| {
                    if let Some(bv) = bv {
                        // SAFETY: the output block (rows r0..r0+rows, columns h*hd..+hd,
                        // row stride d of sequence `seq`) belongs to this task alone
                        unsafe { weighted_sum(p, rows, f, bv, out_block, d) }
                    }
                };
                // SAFETY: v rows 0..t of sequence `seq` (columns h*hd.., row stride 3d) lie
                // in `qkv`; the output block belongs to this task alone (as below).
                unsafe {
                    attend_block_with(
                        block,
                        |s| km.forward_quantized_into(&qx, s, t, self.scale),
                        add_mask,
                        bv.as_ref().map(|_| &ws as WeightedSum),
                    );
                }
                return;
            }
            // SAFETY: q rows r0..r0+rows and k, v rows 0..t of sequence `seq`, columns
            // h*hd..(h+1)*hd of their part, row stride 3d, lie in `qkv` (n*t*3d floats,
            // checked above); the output block (rows r0.., columns h*hd.., row stride d of
            // sequence `seq`) belongs to this (seq, h, blk) task alone, and `out` outlives
            // the loop.
            unsafe { attend_block(block, add_mask) };
        });
        Ok((CpuStorage::F32(out), Shape::from((n, t, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The int8 scores against f32, with keys that share a large offset (which the centring
    /// removes) and a key mask on one of the sequences.
    #[test]
    fn int8_attention_stays_close_to_f32() {
        use candle_core::{Device, Tensor};
        let (n, t, heads, hd) = (2, 70, 3, 16);
        let d = heads * hd;
        let mut s = 7u64;
        let mut qkv: Vec<f32> = (0..n * t * 3 * d)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect();
        for row in qkv.chunks_exact_mut(3 * d) {
            row[d..2 * d].iter_mut().for_each(|k| *k += 5.0);
        }
        let qkv = Tensor::from_vec(qkv, (n, t, 3 * d), &Device::Cpu).unwrap();
        let mut mask = vec![0f32; 2 * t];
        mask[t + 3..t + 20].fill(f32::NEG_INFINITY);
        let mask = Tensor::from_vec(mask, (2, t), &Device::Cpu).unwrap();
        let run = |int8| {
            let op = FusedAttention {
                heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                int8,
            };
            qkv.apply_op2_no_bwd(&mask, &op)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (run(true), run(false));
        let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        let rel = (num / den).sqrt();
        println!("int8 attention vs f32: relative L2 error {rel:.4}");
        assert!(rel < 0.02, "relative error {rel}");
        assert!(rel > 0.0, "the int8 path did not run");
    }

    #[test]
    fn activations_match_their_definitions() {
        for i in -400..400 {
            let x = i as f32 * 0.025;
            let g = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
            assert!((Act::GeluTanh.apply(x) - g).abs() < 1e-6, "{x}");
            let q = x / (1.0 + (-1.702 * x).exp());
            assert!((Act::QuickGelu.apply(x) - q).abs() < 1e-6, "{x}");
        }
    }
}
