//! Self-attention of the vision encoder: global (SigLIP/CLIP) and the paper's
//! Register-Window pattern.
//!
//! # The Register-Window rule implemented here
//!
//! The report's one sentence is that a global register token "interacts with the distinct
//! local windows before global context aggregation". We implement (our decision):
//!
//! 1. The token sequence is `[registers; patches]`; patches sit on a `gh x gw` grid.
//! 2. In a window block the grid is cut into `w x w` windows, row-major, starting at the top
//!    left. When `w` does not divide the grid, the grid is padded at the bottom/right to a
//!    multiple of `w`; padded slots are masked out as keys and their outputs are dropped, so
//!    a partial window attends only over its real patches.
//! 3. Every window attends over `[registers; its patches]`: the registers are appended to
//!    every window, so each window's patches see the registers and the registers see each
//!    window.
//! 4. The new register state is the mean, over windows, of the registers' per-window
//!    attention outputs (all windows weigh the same). Residual and MLP then apply to all
//!    tokens as usual.
//! 5. Global blocks attend over the whole `[registers; patches]` sequence.
//!
//! With one window covering the whole grid, rule 2-4 is exactly global attention over
//! `[registers; patches]` (tested). Windows are batched: `b * n_windows` short sequences go
//! through one batched matmul.

use crate::error::Result;
use crate::kernels::{Act, FusedAttention};
use crate::weights::VisionWeights;
use afm_lm::int8::{Int8Matrix, Pool};
use candle_core::CpuStorage;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Refuses rows wider than the int8 kernel sums without overflow.
fn check_int8_width(inp: usize) -> Result<()> {
    if inp > afm_lm::int8::MAX_INPUTS {
        return Err(crate::error::VisionError::Invalid(format!(
            "int8: rows of {inp} inputs are wider than the kernel's {}",
            afm_lm::int8::MAX_INPUTS
        )));
    }
    Ok(())
}

/// `y = x W^T + b` with `W^T` stored contiguous `(in, out)`, so the matmul runs on a
/// row-major 2-D operand pair (measured 1.7x faster in candle than multiplying by a
/// transposed view).
pub struct Dense {
    /// `(in, out)`
    wt: Tensor,
    /// `(out)`
    b: Tensor,
    /// The int8 copy of `wt` and the bias in f32, which the inference path uses when set
    /// ([`Dense::set_int8`]).
    int8: Option<(Int8Matrix, Vec<f32>)>,
}

impl Dense {
    /// Loads `{name}.weight (out, in)` and `{name}.bias (out)`.
    pub fn load(w: &VisionWeights, name: &str, out: usize, inp: usize) -> Result<Self> {
        Self::from_parts(
            &[&w.get(&format!("{name}.weight"), &[out, inp])?],
            &[&w.get(&format!("{name}.bias"), &[out])?],
        )
    }

    /// Stacks several projections of the same input into one (output rows concatenated).
    pub fn from_parts(ws: &[&Tensor], bs: &[&Tensor]) -> Result<Self> {
        Ok(Self {
            wt: Tensor::cat(ws, 0)?.t()?.contiguous()?,
            b: Tensor::cat(bs, 0)?,
            int8: None,
        })
    }

    /// Runs the inference path ([`Dense::forward_fast`]) in int8 (`crate::int8`: weights
    /// per output channel, activations per row) or back in f32. The f32 weights stay, so
    /// training and `forward` are unaffected.
    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        self.int8 = match on {
            false => None,
            true => {
                let (inp, out) = self.wt.dims2()?;
                check_int8_width(inp)?;
                let wt = self
                    .wt
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let b = self.b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let q = Int8Matrix::from_transposed(&wt, inp, out).with_pool(Pool::Rayon);
                Some((q, b))
            }
        };
        Ok(())
    }

    /// Inference path: one gemm call writing into an output pre-filled with the bias, then
    /// the activation (if any) in place; no intermediate tensors. f32 only.
    ///
    /// # Shapes
    /// `x: (..., in) -> (..., out)`.
    pub fn forward_fast(&self, x: &Tensor, act: Option<Act>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (inp, out) = self.wt.dims2()?;
        if x.dtype() != DType::F32 || dims.last() != Some(&inp) {
            let y = self.forward(x)?;
            return Ok(match act {
                Some(a) => y.contiguous()?.apply_op1_no_bwd(&a)?,
                None => y,
            });
        }
        let rows = x.elem_count() / inp;
        let x = x.contiguous()?;
        if let Some((q, bv)) = &self.int8 {
            let y = {
                // the input in place (no copy), as the f32 path below
                let (xs, _) = x.storage_and_layout();
                let candle_core::Storage::Cpu(CpuStorage::F32(xv)) = &*xs else {
                    return Err(crate::error::VisionError::Invalid(
                        "the int8 path takes f32 tensors on the CPU".into(),
                    ));
                };
                let xo = x.layout().start_offset();
                q.forward(&xv[xo..xo + rows * inp], rows, Some(bv), |c| {
                    if let Some(a) = act {
                        a.apply_slice(c)
                    }
                })
            };
            let mut shape = dims;
            *shape.last_mut().unwrap() = out;
            return Ok(Tensor::from_vec(y, shape, x.device())?);
        }
        let mut y = vec![0f32; rows * out];
        {
            let (xs, _) = x.storage_and_layout();
            let (ws, _) = self.wt.storage_and_layout();
            let (bs, _) = self.b.storage_and_layout();
            let (
                candle_core::Storage::Cpu(CpuStorage::F32(xv)),
                candle_core::Storage::Cpu(CpuStorage::F32(wv)),
                candle_core::Storage::Cpu(CpuStorage::F32(bv)),
            ) = (&*xs, &*ws, &*bs)
            else {
                return self.forward(x.as_ref());
            };
            let xo = x.layout().start_offset();
            let (xv, wv, bv) = (&xv[xo..xo + rows * inp], &wv[..inp * out], &bv[..out]);
            y.par_chunks_mut(out).for_each(|r| r.copy_from_slice(bv));
            // SAFETY: y is rows x out (row stride out), x is rows x inp (row stride inp) and
            // wt is inp x out (row stride out), all checked above; gemm reads lhs/rhs and
            // reads and writes dst only inside those bounds.
            unsafe {
                gemm::gemm(
                    rows,
                    out,
                    inp,
                    y.as_mut_ptr(),
                    1,
                    out as isize,
                    true,
                    xv.as_ptr(),
                    1,
                    inp as isize,
                    wv.as_ptr(),
                    1,
                    out as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
        }
        if let Some(a) = act {
            y.par_chunks_mut(1 << 14).for_each(|c| a.apply_slice(c));
        }
        let mut shape = dims;
        *shape.last_mut().unwrap() = out;
        Ok(Tensor::from_vec(y, shape, x.device())?)
    }

    /// # Shapes
    /// `x: (..., in) -> (..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows = x.elem_count() / inp.max(1);
        let y = x
            .reshape((rows, inp))?
            .matmul(&self.wt)?
            .broadcast_add(&self.b)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.wt.dim(1)?;
        Ok(y.reshape(out)?)
    }
}

pub struct Attention {
    /// q, k, v projections fused: `hidden -> 3 * hidden`.
    qkv: Dense,
    o: Dense,
    heads: usize,
    head_dim: usize,
    /// Scores in int8 on the fused path ([`FusedAttention::int8`]).
    int8: bool,
}

impl Attention {
    /// See [`Dense::set_int8`]; applies to the fused q/k/v and the output projection, and
    /// the fused kernel's scores ([`FusedAttention::int8`]).
    pub fn set_int8(&mut self, on: bool) -> Result<()> {
        check_int8_width(self.head_dim)?;
        self.int8 = on;
        self.qkv.set_int8(on)?;
        self.o.set_int8(on)
    }

    /// Loads `{p}.q_proj`, `{p}.k_proj`, `{p}.v_proj`, `{p}.out_proj` (weight and bias).
    pub fn load(w: &VisionWeights, p: &str, hidden: usize, heads: usize) -> Result<Self> {
        let get = |n: &str, shape: &[usize]| w.get(&format!("{p}.{n}"), shape);
        let (d, hh) = (hidden, &[hidden, hidden][..]);
        Ok(Self {
            qkv: Dense::from_parts(
                &[
                    &get("q_proj.weight", hh)?,
                    &get("k_proj.weight", hh)?,
                    &get("v_proj.weight", hh)?,
                ],
                &[
                    &get("q_proj.bias", &[d])?,
                    &get("k_proj.bias", &[d])?,
                    &get("v_proj.bias", &[d])?,
                ],
            )?,
            o: Dense::load(w, &format!("{p}.out_proj"), d, d)?,
            heads,
            head_dim: hidden / heads,
            int8: false,
        })
    }

    /// Softmax attention over each sequence of `x`, with an optional additive key mask whose
    /// row `i % m` applies to sequence `i`. `fast` picks the fused kernel (inference) or
    /// candle ops (differentiable).
    ///
    /// # Shapes
    /// `x: (n, t, hidden)`, `mask: (m, t)` -> `(n, t, hidden)` (before `out_proj`).
    fn attend(&self, x: &Tensor, mask: Option<&Tensor>, fast: bool) -> Result<Tensor> {
        let (n, t, hdim) = x.dims3()?;
        let qkv = if fast {
            self.qkv.forward_fast(x, None)?
        } else {
            self.qkv.forward(x)?
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if fast && qkv.dtype() == DType::F32 {
            let none;
            let m = match mask {
                Some(m) => m,
                None => {
                    none = Tensor::zeros((1, 0), DType::F32, x.device())?;
                    &none
                }
            };
            return Ok(qkv.contiguous()?.apply_op2_no_bwd(
                &m.contiguous()?,
                &FusedAttention {
                    heads: self.heads,
                    head_dim: self.head_dim,
                    scale: scale as f32,
                    int8: self.int8,
                },
            )?);
        }
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * hdim, hdim)?
                .reshape((n, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = ((split(0)? * scale)?, split(1)?, split(2)?);
        let mut s = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            let rows = m.dim(0)?;
            let m = m.unsqueeze(0)?.repeat((n / rows, 1, 1))?;
            s = s.broadcast_add(&m.reshape((n, 1, 1, t))?)?;
        }
        // candle-nn's fused softmax has no backward: the differentiable path composes it
        let p = if fast {
            candle_nn::ops::softmax_last_dim(&s)?
        } else {
            candle_nn::ops::softmax(&s, candle_core::D::Minus1)?
        };
        Ok(p.matmul(&v)?.transpose(1, 2)?.reshape((n, t, hdim))?)
    }

    /// Global attention.
    ///
    /// # Shapes
    /// `x: (b, t, hidden) -> (b, t, hidden)`.
    pub fn forward_global(&self, x: &Tensor, fast: bool) -> Result<Tensor> {
        self.out(&self.attend(x, None, fast)?, fast)
    }

    fn out(&self, x: &Tensor, fast: bool) -> Result<Tensor> {
        if fast {
            self.o.forward_fast(x, None)
        } else {
            self.o.forward(x)
        }
    }

    /// Register-Window attention (module docs), `r` registers first, then a `gh x gw` grid.
    ///
    /// # Shapes
    /// `x: (b, r + gh*gw, hidden) -> (b, r + gh*gw, hidden)`.
    pub fn forward_windowed(
        &self,
        x: &Tensor,
        r: usize,
        gh: usize,
        gw: usize,
        win: usize,
        fast: bool,
    ) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let (nh, nw) = (gh.div_ceil(win), gw.div_ceil(win));
        let (ph, pw) = (nh * win, nw * win);
        let nwin = nh * nw;
        let regs = x.narrow(1, 0, r)?;
        let mut grid = x.narrow(1, r, gh * gw)?.reshape((b, gh, gw, d))?;
        if ph > gh {
            grid = grid.pad_with_zeros(1, 0, ph - gh)?;
        }
        if pw > gw {
            grid = grid.pad_with_zeros(2, 0, pw - gw)?;
        }
        // (b, nh, win, nw, win, d) -> (b, nh, nw, win, win, d) -> (b*nwin, win*win, d)
        let wins = grid
            .reshape((b, nh, win, nw, win, d))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b * nwin, win * win, d))?;
        let regs_rep = regs
            .unsqueeze(1)?
            .repeat((1, nwin, 1, 1))?
            .reshape((b * nwin, r, d))?;
        let seq = Tensor::cat(&[&regs_rep, &wins], 1)?;
        let mask = if ph > gh || pw > gw {
            let mut m = vec![0f32; nwin * (r + win * win)];
            for wy in 0..nh {
                for wx in 0..nw {
                    let wi = wy * nw + wx;
                    for y in 0..win {
                        for xx in 0..win {
                            if wy * win + y >= gh || wx * win + xx >= gw {
                                m[wi * (r + win * win) + r + y * win + xx] = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
            }
            Some(Tensor::from_vec(m, (nwin, r + win * win), &Device::Cpu)?)
        } else {
            None
        };
        let out = self.attend(&seq, mask.as_ref(), fast)?; // (b*nwin, r + win^2, d)
        let reg_out = out.narrow(1, 0, r)?.reshape((b, nwin, r, d))?.mean(1)?;
        let patch_out = out
            .narrow(1, r, win * win)?
            .reshape((b, nh, nw, win, win, d))?
            .permute((0, 1, 3, 2, 4, 5))?
            .contiguous()?
            .reshape((b, ph, pw, d))?
            .narrow(1, 0, gh)?
            .narrow(2, 0, gw)?
            .contiguous()?
            .reshape((b, gh * gw, d))?;
        let merged = Tensor::cat(&[&reg_out, &patch_out], 1)?;
        self.out(&merged, fast)
    }
}
