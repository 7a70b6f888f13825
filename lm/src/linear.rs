//! A weight matrix used as `x @ W^T`: our SIMD kernels for Q4_1/Q8_0 blocks, candle's
//! quantized or dense matmul for everything else.

use crate::error::Result;
use crate::quant::QMatrix;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense f32 (safetensors, F16/F32 GGUF) or a quantized type candle handles.
    Candle(QMatMul),
    /// Q4_1 / Q8_0 blocks with our kernels.
    Blocks(Arc<QMatrix>),
}

impl Linear {
    /// # Shapes
    /// `(..., in) -> (..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => Ok(m.forward(x)?),
            Linear::Blocks(m) => m.forward(x),
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
        }
    }
}

/// Several matrices that read the same input (q/k/v, gate/up), stored as one when they share
/// a format so the input is quantized once and the work is one parallel pass.
#[derive(Debug, Clone)]
pub struct Fused {
    one: Option<Linear>,
    parts: Vec<Linear>,
    outs: Vec<usize>,
}

impl Fused {
    /// `parts`: each matrix with its output width.
    pub fn new(parts: Vec<(Linear, usize)>) -> Result<Self> {
        let outs: Vec<usize> = parts.iter().map(|(_, o)| *o).collect();
        let mats: Vec<Linear> = parts.into_iter().map(|(l, _)| l).collect();
        let one = Self::concat(&mats)?;
        Ok(match one {
            Some(one) => Self { one: Some(one), parts: vec![], outs },
            None => Self { one: None, parts: mats, outs },
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

    /// One output per part.
    ///
    /// # Shapes
    /// `(..., in) -> [(..., out_i)]`.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.one {
            Some(one) => {
                let y = one.forward(x)?;
                let mut at = 0;
                let mut v = Vec::with_capacity(self.outs.len());
                for &o in &self.outs {
                    v.push(y.narrow(candle_core::D::Minus1, at, o)?.contiguous()?);
                    at += o;
                }
                Ok(v)
            }
            None => self.parts.iter().map(|p| p.forward(x)).collect(),
        }
    }
}
