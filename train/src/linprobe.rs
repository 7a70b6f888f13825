//! Linear softmax probes: how much of a label a frozen feature holds.
//!
//! The diagnostics of `train/examples/` (`probe_tokens`, `object_probe`) fit one on
//! training features and measure it on held-out ones.

use crate::pretrain::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// Fits a linear softmax probe on `xtr` (features standardised with the training rows'
/// mean and deviation; AdamW lr 1e-2, weight decay 1e-2, full batch, 400 steps) and returns
/// its accuracy on `xte` with the majority class of `yte` as the floor.
///
/// # Shapes
/// `xtr: (n, d)`, `ytr.len() == n`, `xte: (m, d)`, `yte.len() == m`; labels `< classes`.
pub fn linear_probe(
    xtr: &Tensor,
    ytr: &[u32],
    xte: &Tensor,
    yte: &[u32],
    classes: usize,
) -> Result<(f64, f64)> {
    let mu = xtr.mean_keepdim(0)?;
    let sd = (xtr.broadcast_sub(&mu)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    let norm = |x: &Tensor| x.broadcast_sub(&mu)?.broadcast_div(&sd);
    let (xtr, xte) = (norm(xtr)?, norm(xte)?);
    let d = xtr.dim(1)?;
    let w = Var::zeros((d, classes), DType::F32, &Device::Cpu)?;
    let b = Var::zeros(classes, DType::F32, &Device::Cpu)?;
    let mut opt = AdamW::new(
        vec![w.clone(), b.clone()],
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 1e-2,
            ..Default::default()
        },
    )?;
    let t = Tensor::from_slice(ytr, ytr.len(), &Device::Cpu)?;
    for _ in 0..400 {
        let logits = xtr.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
        opt.backward_step(&candle_nn::loss::cross_entropy(&logits, &t)?)?;
    }
    let pred: Vec<u32> = xte
        .matmul(w.as_tensor())?
        .broadcast_add(b.as_tensor())?
        .argmax(D::Minus1)?
        .to_vec1()?;
    let m = yte.len().max(1) as f64;
    let acc = pred.iter().zip(yte).filter(|(p, y)| p == y).count() as f64 / m;
    let mut counts = vec![0usize; classes];
    yte.iter().for_each(|&y| counts[y as usize] += 1);
    let floor = *counts.iter().max().unwrap_or(&0) as f64 / m;
    Ok((acc, floor))
}
