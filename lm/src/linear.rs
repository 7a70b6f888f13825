//! A weight matrix used as `x @ W^T`: our SIMD kernels for Q4_1/Q8_0 blocks (also for dense
//! matrices switched to 8 bits), candle's quantized or dense matmul for everything else.

use crate::error::{LmError, Result};
use crate::int8::Int8Matrix;
use crate::lora::LoraDelta;
use crate::lowbit::LowBitMatrix;
use crate::quant::QMatrix;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense f32 (safetensors, F16/F32 GGUF) or a quantized type candle handles.
    Candle(QMatMul),
    /// Dense f32 stored transposed, `(in, out)` contiguous: candle's matmul on a row-major
    /// right-hand side runs prefill 1.2-3.4x faster than on a transposed view (measured at
    /// 81 rows, SmolLM2 widths) and decode the same.
    Dense(Tensor),
    /// Q4_1 / Q8_0 blocks with our kernels.
    Blocks(Arc<QMatrix>),
    /// A dense matrix run in int8 ([`crate::int8`]: weights per output channel, one
    /// activation scale per [`LM_ACT_GROUP`] inputs); `orig` is the f32 matrix it came from,
    /// kept for embedding lookups and for going back ([`Linear::set_int8`]).
    Int8 {
        q: Arc<Int8Matrix>,
        orig: Box<Linear>,
    },
    /// The paper's 2-bit grid or a 4-bit table ([`crate::lowbit`]), with our kernels.
    LowBit(Arc<LowBitMatrix>),
}

impl Linear {
    /// Bytes of weights one product with this matrix reads (what a decode step streams from
    /// memory for it): the stored format's size, scales included.
    pub fn bytes_read(&self) -> usize {
        match self {
            Linear::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Linear::Candle(QMatMul::Tensor(t)) | Linear::Candle(QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            Linear::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Linear::Blocks(b) => b.storage_bytes(),
            Linear::Int8 { q, .. } => q.storage_bytes(),
            Linear::LowBit(b) => b.storage_bytes(),
        }
    }

    /// Turns a dense f32 matrix ([`Linear::Dense`], or a dense [`Linear::Candle`]) into
    /// [`Linear::Int8`], or back with `on = false`. Quantized GGUF matrices stay as they are.
    ///
    /// Why one activation scale per 32 inputs, not per row as in the vision encoder:
    /// language-model activations carry outlier channels, and one scale per row loses the
    /// small inputs beside them. Measured on the real SmolLM2-135M (`lm/tests/int8.rs`,
    /// logits against f32, relative L2):
    /// * 0.143 with one scale per row;
    /// * 0.078, 0.070 and 0.057 with groups of 128, 64 and 32;
    /// * 0.047 with its weights in Q8_0 blocks on the GGUF kernels, which decode at half
    ///   the speed.
    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        let next = match (&*self, on) {
            (Linear::Dense(wt), true) => Some(int8_of(wt, self.clone())?),
            (Linear::Candle(QMatMul::Tensor(w)), true) => {
                Some(int8_of(&w.t()?.contiguous()?, self.clone())?)
            }
            (Linear::Int8 { orig, .. }, false) => Some((**orig).clone()),
            _ => None,
        };
        if let Some(n) = next {
            *self = n;
        }
        Ok(())
    }

    /// `m` rows of input.
    ///
    /// # Shapes
    /// `x: (m, in) -> (m, out)`, row-major.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        match self {
            Linear::Blocks(q) => {
                if x.len() != m * q.dims().1 {
                    return Err(LmError::Invalid(format!(
                        "matmul: {} inputs for {m} rows of width {}",
                        x.len(),
                        q.dims().1
                    )));
                }
                Ok(q.matmul(x, m))
            }
            Linear::LowBit(q) => {
                if x.len() != m * q.dims().1 {
                    return Err(LmError::Invalid(format!(
                        "matmul: {} inputs for {m} rows of width {}",
                        x.len(),
                        q.dims().1
                    )));
                }
                Ok(q.matmul(x, m))
            }
            Linear::Int8 { q, .. } => {
                let (inp, _) = q.dims();
                if x.len() != m * inp {
                    return Err(LmError::Invalid(format!(
                        "matmul: {} inputs for {m} rows of width {inp}",
                        x.len()
                    )));
                }
                Ok(q.forward(x, m, None, |_| {}))
            }
            Linear::Dense(wt) => {
                let (inp, _) = wt.dims2()?;
                if x.len() != m * inp {
                    return Err(LmError::Invalid(format!(
                        "matmul: {} inputs for {m} rows of width {inp}",
                        x.len()
                    )));
                }
                let t = Tensor::from_slice(x, (m, inp), &Device::Cpu)?;
                Ok(t.matmul(wt)?.flatten_all()?.to_vec1::<f32>()?)
            }
            Linear::Candle(w) => {
                if m == 0 || !x.len().is_multiple_of(m) {
                    return Err(LmError::Invalid(format!(
                        "matmul: {} inputs for {m} rows",
                        x.len()
                    )));
                }
                let t = Tensor::from_slice(x, (m, x.len() / m), &Device::Cpu)?;
                Ok(w.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    /// Rows of the matrix as f32 (embedding lookup).
    ///
    /// # Shapes
    /// `ids.len() = t` -> `(t, in)`.
    pub fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                Ok(m.embedding(&ids)?.to_dtype(DType::F32)?)
            }
            Linear::Blocks(m) => m.rows_f32(ids),
            Linear::LowBit(m) => m.rows_f32(ids),
            Linear::Int8 { orig, .. } => orig.embedding(ids),
            Linear::Dense(wt) => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                Ok(wt.t()?.contiguous()?.index_select(&ids, 0)?)
            }
        }
    }
}

/// Inputs per activation scale of the language model's int8 matrices (see
/// [`Linear::set_int8`]).
pub const LM_ACT_GROUP: usize = 32;

/// [`Linear::Int8`] of `orig`, whose dense matrix is `wt` `(in, out)`; `orig` itself when
/// its rows are wider than the int8 kernel sums ([`crate::int8::MAX_INPUTS`]).
fn int8_of(wt: &Tensor, orig: Linear) -> Result<Linear> {
    let (inp, out) = wt.dims2()?;
    if inp > crate::int8::MAX_INPUTS {
        return Ok(orig);
    }
    let v = wt.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Linear::Int8 {
        q: Arc::new(Int8Matrix::from_transposed(&v, inp, out).with_act_group(LM_ACT_GROUP)),
        orig: Box::new(orig),
    })
}

/// Several matrices that read the same input (q/k/v, gate/up), stored as one when they share
/// a format so the input is quantized once and the work is one parallel pass.
#[derive(Debug, Clone)]
pub struct Fused {
    one: Option<Linear>,
    parts: Vec<Linear>,
    outs: Vec<usize>,
    /// Unmerged LoRA deltas, one slot per part (empty until an adapter is applied): each
    /// adds its low-rank product to its own part's slice of the output.
    lora: Vec<Option<LoraDelta>>,
}

impl Fused {
    /// Bytes of weights one product reads (LoRA deltas not counted: they are small).
    pub fn bytes_read(&self) -> usize {
        self.one
            .iter()
            .chain(&self.parts)
            .map(Linear::bytes_read)
            .sum()
    }

    /// `parts`: each matrix with its output width.
    pub fn new(parts: Vec<(Linear, usize)>) -> Result<Self> {
        let outs: Vec<usize> = parts.iter().map(|(_, o)| *o).collect();
        let mats: Vec<Linear> = parts.into_iter().map(|(l, _)| l).collect();
        Ok(match Self::concat(&mats)? {
            Some(one) => Self {
                one: Some(one),
                parts: vec![],
                outs,
                lora: vec![],
            },
            None => Self {
                one: None,
                parts: mats,
                outs,
                lora: vec![],
            },
        })
    }

    fn concat(mats: &[Linear]) -> Result<Option<Linear>> {
        if mats.len() < 2 {
            return Ok(None);
        }
        let blocks: Option<Vec<&QMatrix>> = mats
            .iter()
            .map(|m| match m {
                Linear::Blocks(b) => Some(b.as_ref()),
                _ => None,
            })
            .collect();
        if let Some(bs) = blocks {
            return Ok(QMatrix::concat_rows(&bs).map(|m| Linear::Blocks(Arc::new(m))));
        }
        let low: Option<Vec<&LowBitMatrix>> = mats
            .iter()
            .map(|m| match m {
                Linear::LowBit(b) => Some(b.as_ref()),
                _ => None,
            })
            .collect();
        if let Some(bs) = low {
            return Ok(LowBitMatrix::concat_rows(&bs).map(|m| Linear::LowBit(Arc::new(m))));
        }
        let dense_t: Option<Vec<&Tensor>> = mats
            .iter()
            .map(|m| match m {
                Linear::Dense(t) => Some(t),
                _ => None,
            })
            .collect();
        if let Some(ts) = dense_t {
            return Ok(Some(Linear::Dense(Tensor::cat(&ts, 1)?)));
        }
        let dense: Option<Vec<&Tensor>> = mats
            .iter()
            .map(|m| match m {
                Linear::Candle(QMatMul::Tensor(t)) => Some(t),
                _ => None,
            })
            .collect();
        if let Some(ts) = dense {
            return Ok(Some(Linear::Candle(QMatMul::Tensor(Tensor::cat(&ts, 0)?))));
        }
        Ok(None)
    }

    /// [`Linear::set_int8`] on every matrix.
    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        for l in self.one.iter_mut().chain(self.parts.iter_mut()) {
            l.set_int8(on)?;
        }
        Ok(())
    }

    /// Output width of each part.
    pub fn outs(&self) -> &[usize] {
        &self.outs
    }

    /// All parts side by side.
    ///
    /// # Shapes
    /// `x: (m, in) -> (m, sum(outs))`.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = self.forward_base(x, m)?;
        if self.lora.iter().any(Option::is_some) {
            let total: usize = self.outs.iter().sum();
            let mut at = 0;
            for (d, &o) in self.lora.iter().zip(&self.outs) {
                if let Some(d) = d {
                    d.add_into(x, m, &mut out, total, at)?;
                }
                at += o;
            }
        }
        Ok(out)
    }

    /// The base matrices alone (no unmerged LoRA).
    fn forward_base(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if let Some(one) = &self.one {
            return one.forward(x, m);
        }
        if let [p] = self.parts.as_slice() {
            return p.forward(x, m);
        }
        let total: usize = self.outs.iter().sum();
        let mut out = vec![0f32; m * total];
        let mut at = 0;
        for (p, &o) in self.parts.iter().zip(&self.outs) {
            let y = p.forward(x, m)?;
            for i in 0..m {
                out[i * total + at..i * total + at + o].copy_from_slice(&y[i * o..(i + 1) * o]);
            }
            at += o;
        }
        Ok(out)
    }

    /// Whether part `part`'s weights are a dense f32 matrix that a LoRA delta can be merged
    /// into ([`Fused::merge_lora`]).
    pub fn can_merge(&self, part: usize) -> bool {
        let m = match &self.one {
            Some(one) => one,
            None => match self.parts.get(part) {
                Some(p) => p,
                None => return false,
            },
        };
        matches!(m, Linear::Dense(_) | Linear::Candle(QMatMul::Tensor(_)))
    }

    /// Adds `delta` `(out_part, in)` (PyTorch layout, `W += delta`) to part `part`'s
    /// weights, in place: the LoRA merge. Only dense f32 matrices ([`Fused::can_merge`]);
    /// anything else is an error naming the part.
    ///
    /// # Shapes
    /// `delta: (outs()[part], in)`.
    pub fn merge_lora(&mut self, part: usize, delta: &Tensor) -> Result<()> {
        if part >= self.outs.len() {
            return Err(LmError::Invalid(format!(
                "merge into part {part} of a {}-part projection",
                self.outs.len()
            )));
        }
        let (at, o) = (self.outs[..part].iter().sum::<usize>(), self.outs[part]);
        let (target, at) = match &mut self.one {
            Some(one) => (one, at),
            None => (&mut self.parts[part], 0),
        };
        let delta = delta.to_dtype(DType::F32)?;
        match target {
            // (in, out): columns at..at+o
            Linear::Dense(wt) => {
                *wt = add_block(wt, &delta.t()?, 1, at, o)?;
            }
            // (out, in): rows at..at+o
            Linear::Candle(QMatMul::Tensor(w)) => {
                *w = add_block(w, &delta, 0, at, o)?;
            }
            _ => {
                return Err(LmError::Invalid(format!(
                    "cannot merge a LoRA delta into part {part}: its weights are quantized \
                     (GGUF blocks or int8); apply the adapter unmerged"
                )))
            }
        }
        Ok(())
    }

    /// Keeps `delta` beside part `part`'s weights (unmerged LoRA): [`Fused::forward`] adds
    /// its product to that part's output slice. A second delta on the same part is an error.
    pub fn attach_lora(&mut self, part: usize, delta: LoraDelta) -> Result<()> {
        if part >= self.outs.len() {
            return Err(LmError::Invalid(format!(
                "LoRA on part {part} of a {}-part projection",
                self.outs.len()
            )));
        }
        if delta.out_dim() != self.outs[part] {
            return Err(LmError::Invalid(format!(
                "LoRA delta of width {} on a part of width {}",
                delta.out_dim(),
                self.outs[part]
            )));
        }
        if self.lora.is_empty() {
            self.lora = vec![None; self.outs.len()];
        }
        if self.lora[part].is_some() {
            return Err(LmError::Invalid(format!(
                "part {part} already carries a LoRA adapter"
            )));
        }
        self.lora[part] = Some(delta);
        Ok(())
    }
}

/// `w` with `delta` added to the block of `len` rows (`dim` 0) or columns (`dim` 1) starting
/// at `at`.
fn add_block(w: &Tensor, delta: &Tensor, dim: usize, at: usize, len: usize) -> Result<Tensor> {
    let size = w.dim(dim)?;
    let mut pieces = Vec::with_capacity(3);
    if at > 0 {
        pieces.push(w.narrow(dim, 0, at)?);
    }
    pieces.push((w.narrow(dim, at, len)? + delta)?);
    if at + len < size {
        pieces.push(w.narrow(dim, at + len, size - at - len)?);
    }
    Ok(Tensor::cat(&pieces, dim)?.contiguous()?)
}
