//! The optional int8 path of dense f32 matrices (the vision encoder's projections, MLP and
//! attention scores, a safetensors language model's projections): `y = x W^T + b` with the
//! weights quantised per output channel and the activations per row or per group of inputs,
//! both symmetric to `[-127, 127]`, and the products summed in exact i32 arithmetic.
//!
//! # Arithmetic
//! For weight row `o` (output channel) `sw[o] = max|W[o, :]| / 127` and
//! `qw[o, k] = round(W[o, k] / sw[o])`. Activations get one scale per row, or one per group
//! of `G` inputs of a row ([`Int8Matrix::with_act_group`]): for group `g` of row `r`,
//! `sx[r, g] = max|x[r, g]| / 127` and `qx[r, k] = round(x[r, k] / sx[r, g])`. Then
//! `y[r, o] = sw[o] * sum_g sx[r, g] * sum_{k in g} qx[r, k] qw[o, k] + b[o]`, the inner sums
//! exact in i32. Groups keep an outlier channel from flattening the rest of its row (language
//! models have such channels; `lm/tests/int8.rs`).
//! The kernel multiplies unsigned by signed bytes (AVX-512 VNNI `vpdpbusd`), so it stores
//! `qx + 128` and subtracts `128 * sum_{k in g} qw[o, k]` per group afterwards; the result is
//! the same integer.
//! No 32-bit overflow is possible below `2^31 / (255 * 127)` = 66,313 inputs per row
//! ([`MAX_INPUTS`]; callers refuse wider matrices).
//!
//! # Speed
//! On CPUs with AVX-512 VNNI one `vpdpbusd` does 64 multiply-adds where an f32 FMA does 16
//! (AVX-VNNI: 32 against 8). With AVX2 alone, tiles of three or more rows widen the bytes to
//! i16 and `vpmaddwd` does 16 (with a `vpaddd`), one row or two take `vpmaddubsw`; at most
//! twice f32's rate, as far as the multiply ports go. Elsewhere a portable loop computes the
//! same integers (slower than the f32 path: the int8 path is then not worth turning on;
//! [`int8_kernel_is_fast`] tells).
//!
//! # Layout of the packed weights
//! Output channels in panels of [`NR`] = 32; inside a panel, for each group of 4 inputs, the
//! 32 channels' 4 bytes side by side (128 bytes: two 512-bit registers). Inputs are padded
//! with zeros to a multiple of 4, channels with zero rows to a multiple of 32.

use crate::isa::Isa;
use crate::kernels::{max_of, round_small, small_int};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The thread pool the kernel splits its work over: the one the caller's other kernels use,
/// so the two never wait for each other's threads to wake (measured: the vision encoder,
/// whose attention and f32 matmuls run on rayon, is ~7% slower with this kernel on candle's
/// pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// candle's CPU pool ([`crate::par`]), as the language model's kernels.
    #[default]
    Candle,
    /// rayon's global pool, as the vision encoder's kernels.
    Rayon,
    /// This thread alone (inside work that is already split over the cores).
    Inline,
}

fn par_chunks_mut<T: Send>(
    pool: Pool,
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    match pool {
        Pool::Candle => crate::par::par_chunks_mut(out, chunk, f),
        Pool::Rayon => out
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c)),
        Pool::Inline => out
            .chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c)),
    }
}

/// Output channels per panel.
pub const NR: usize = 32;
/// The widest input row the i32 sums hold without overflow (module docs).
pub const MAX_INPUTS: usize = 66_000;
/// Activation rows per micro-tile.
const MR: usize = 8;
/// At AVX2, at least this many rows take the widened kernel (`avx2::tile_wide`, which
/// widens a block of weights once for all its rows: all of `Int8Matrix::sweep`'s rows, up
/// to `MB`, or a micro-tile in `panel_tile`); fewer take `avx2::tile_madd`.
const WIDE_ROWS: usize = 3;
/// Activation rows per parallel task.
const MB: usize = 64;

/// A weight matrix quantised for the int8 kernel.
#[derive(Debug, Clone)]
pub struct Int8Matrix {
    inp: usize,
    out: usize,
    /// `inp` rounded up to a multiple of 4.
    kp: usize,
    packed: Vec<i8>,
    /// Per output channel (padded panels included, 0 there).
    scale: Vec<f32>,
    /// `128 * sum_{k in g} qw[o, k]`, at `(panel * ngroups + g) * NR + c`.
    offset: Vec<i32>,
    /// Inputs per activation scale (a multiple of 4; `kp` for one scale per row).
    group: usize,
    pool: Pool,
}

/// Activations quantised per row or per group of a row: `qx + 128` in rows of `kp` bytes
/// (padding holds 128 = 0), and `ngroups` scales per row.
pub struct QuantRows {
    pub kp: usize,
    pub q: Vec<u8>,
    /// Inputs per scale.
    pub group: usize,
    pub ngroups: usize,
    /// `rows * ngroups`.
    pub scale: Vec<f32>,
}

impl QuantRows {
    pub fn rows(&self) -> usize {
        self.scale.len() / self.ngroups.max(1)
    }
}

/// A block of outputs as `f32`.
///
/// # Safety
/// Every value of `block` has been written.
unsafe fn assume_init_mut(block: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the values are initialised
    // (the caller's word)
    unsafe { &mut *(block as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `|x|`, and infinity for NaN (which `max_of` and `f32::max` pass over): a NaN input
/// then makes its scale NaN, and so its outputs, as in f32.
#[inline(always)]
fn abs_or_inf(x: f32) -> f32 {
    if x.is_nan() {
        f32::INFINITY
    } else {
        x.abs()
    }
}

/// `x` clamped to `[-127, 127]` and rounded half away from zero, as `f32::round`, in a form
/// that vectorises: `round` and `trunc` are library calls on baseline x86-64 (no SSE4.1),
/// and `as i32` is done lane by lane (see `small_int`). Ties to even, then ties moved away
/// from zero (`t - r` is exact here; adding 0.5 first would round 0.49999997 + 0.5 up to 1).
#[inline(always)]
fn round_away(x: f32) -> f32 {
    let t = x.clamp(-127.0, 127.0);
    let r = round_small(t);
    if (t - r).abs() == 0.5 {
        t + 0.5f32.copysign(t)
    } else {
        r
    }
}

/// Quantises `rows` rows of `inp` values with one scale per `group` inputs (a multiple of 4;
/// `inp` or more for one per row; see the module docs).
pub fn quantize_rows(pool: Pool, x: &[f32], rows: usize, inp: usize, group: usize) -> QuantRows {
    let kp = inp.div_ceil(4) * 4;
    let group = group.div_ceil(4).clamp(1, kp.max(4) / 4) * 4;
    let ng = kp.div_ceil(group);
    let mut q = vec![128u8; rows * kp];
    let mut scale = vec![0f32; rows * ng];
    let rows_per_task = (1 << 16) / kp.max(1) + 1;
    par_chunks_mut(pool, &mut scale, rows_per_task * ng, |task, sc| {
        for (i, s) in sc.iter_mut().enumerate() {
            let (r, g) = (task * rows_per_task + i / ng, i % ng);
            let (k0, k1) = ((g * group).min(inp), ((g + 1) * group).min(inp));
            let xs = &x[r * inp + k0..r * inp + k1];
            let amax = crate::isa::vectorized(
                #[inline(always)]
                || max_of(xs, 0.0, abs_or_inf),
            );
            // a NaN or infinite input makes the row's output NaN, as in f32; a group whose
            // largest value is so small that `1 / scale` overflows (below ~3.7e-37) is
            // quantised as zeros, its contribution of that size dropped (its zeros would
            // otherwise quantise from `0 * inf = NaN` to any byte)
            *s = if !amax.is_finite() {
                f32::NAN
            } else if (127.0 / amax).is_finite() {
                amax / 127.0
            } else {
                0.0
            };
        }
    });
    let scale_ref = &scale;
    par_chunks_mut(pool, &mut q, rows_per_task * kp, |task, qc| {
        for (i, qr) in qc.chunks_mut(kp).enumerate() {
            let r = task * rows_per_task + i;
            let xr = &x[r * inp..(r + 1) * inp];
            for (g, (qg, xg)) in qr.chunks_mut(group).zip(xr.chunks(group)).enumerate() {
                let s = scale_ref[r * ng + g];
                if s > 0.0 {
                    let inv = 1.0 / s;
                    crate::isa::vectorized(
                        #[inline(always)]
                        || {
                            for (d, &v) in qg.iter_mut().zip(xg) {
                                *d = small_int(round_away(v * inv)).wrapping_add(128) as u8;
                            }
                        },
                    )
                }
            }
        }
    });
    QuantRows {
        kp,
        q,
        group,
        ngroups: ng,
        scale,
    }
}

impl Int8Matrix {
    /// Quantises `W^T` stored `(inp, out)` row-major (the layout of the encoder's `Dense`).
    ///
    /// # Shapes
    /// `wt: inp * out` values.
    pub fn from_transposed(wt: &[f32], inp: usize, out: usize) -> Self {
        assert_eq!(wt.len(), inp * out, "W^T must hold inp * out values");
        Self::from_fn(inp, out, |k, o| wt[k * out + o])
    }

    /// Quantises `W` whose element `(o, k)` (output channel `o`, input `k`) is `w(k, o)`:
    /// the values gathered into rows, then [`Int8Matrix::from_rows`].
    ///
    /// # Panics
    /// When `inp > MAX_INPUTS` (callers check first).
    pub fn from_fn(inp: usize, out: usize, w: impl Fn(usize, usize) -> f32) -> Self {
        let rows: Vec<f32> = (0..out)
            .flat_map(|o| (0..inp).map(move |k| (k, o)))
            .map(|(k, o)| w(k, o))
            .collect();
        Self::from_rows(inp, out, &rows, inp)
    }

    /// Quantises `W` whose output channel `o` holds the `inp` inputs at
    /// `rows[o * stride..o * stride + inp]` (rows of keys, say), in loops that vectorise
    /// (the vision encoder's int8 attention quantises every head's keys of every layer with
    /// this): per channel, `scale = max |w| / 127` and `q = round(w / scale)`, half away
    /// from zero. A channel holding NaN or infinity gives NaN outputs, as in f32; a channel
    /// of zeros, or so small that `127 / max` overflows, is kept as zeros.
    ///
    /// # Shapes
    /// `rows`: at least `(out - 1) * stride + inp` values.
    ///
    /// # Panics
    /// When `inp > MAX_INPUTS` or `rows` is too short (callers check first).
    pub fn from_rows(inp: usize, out: usize, rows: &[f32], stride: usize) -> Self {
        assert!(
            inp <= MAX_INPUTS,
            "{inp} inputs per row overflow the i32 sums"
        );
        assert!(
            out == 0 || rows.len() >= (out - 1) * stride + inp,
            "rows too short for {out} channels of {inp} inputs"
        );
        let kp = inp.div_ceil(4) * 4;
        let panels = out.div_ceil(NR);
        let groups = kp / 4;
        let mut packed = vec![0i8; panels * groups * NR * 4];
        let mut scale = vec![0f32; panels * NR];
        // one activation scale per row (`group = kp`): one offset per channel
        let mut offset = vec![0i32; panels * NR];
        let mut q = vec![0i8; kp];
        for o in 0..out {
            let w = &rows[o * stride..o * stride + inp];
            let amax = crate::isa::vectorized(
                #[inline(always)]
                || max_of(w, 0.0, abs_or_inf),
            );
            // NaN or infinity: a NaN scale; a channel so small that `127 / amax` overflows
            // (below ~3.7e-37) is kept as zeros, as the activation quantiser does with such
            // groups (with an infinite `inv` its weights would quantise to +-127 and its
            // zeros from NaN)
            if !amax.is_finite() {
                scale[o] = f32::NAN;
                continue;
            }
            if amax == 0.0 || !(127.0 / amax).is_finite() {
                continue;
            }
            let inv = 127.0 / amax;
            scale[o] = amax / 127.0;
            let sum = crate::isa::vectorized(
                #[inline(always)]
                || {
                    let mut sum = 0i32;
                    for (d, &v) in q.iter_mut().zip(w) {
                        let b = small_int(round_away(v * inv)) as i8;
                        *d = b;
                        sum += b as i32;
                    }
                    sum
                },
            );
            let (p, c) = (o / NR, o % NR);
            for (g, quad) in q.chunks_exact(4).enumerate() {
                let at = (p * groups + g) * NR * 4 + c * 4;
                packed[at..at + 4].copy_from_slice(quad);
            }
            offset[o] = 128 * sum;
        }
        Self {
            inp,
            out,
            kp,
            packed,
            scale,
            offset,
            group: kp,
            pool: Pool::default(),
        }
    }

    /// One activation scale per `group` inputs of a row (rounded up to a multiple of 4)
    /// instead of one per row.
    pub fn with_act_group(mut self, group: usize) -> Self {
        self.group = group.div_ceil(4).clamp(1, self.kp.max(4) / 4) * 4;
        self.offset = self.offsets();
        self
    }

    /// `128 * sum_{k in g} qw[o, k]` for every panel, group and channel.
    fn offsets(&self) -> Vec<i32> {
        let groups = self.kp / 4;
        let ng = self.kp.div_ceil(self.group);
        let panels = self.out.div_ceil(NR);
        let mut off = vec![0i32; panels * ng * NR];
        for p in 0..panels {
            for kg in 0..groups {
                let g = kg * 4 / self.group;
                let base = (p * groups + kg) * NR * 4;
                for c in 0..NR {
                    let s: i32 = self.packed[base + c * 4..base + c * 4 + 4]
                        .iter()
                        .map(|&q| q as i32)
                        .sum();
                    off[(p * ng + g) * NR + c] += 128 * s;
                }
            }
        }
        off
    }

    /// Runs on `pool` (default [`Pool::Candle`]).
    pub fn with_pool(mut self, pool: Pool) -> Self {
        self.pool = pool;
        self
    }

    /// `alpha * x W^T` for the quantized rows `qx` (made with this matrix's input width),
    /// on this thread, into `y` (row `i` at `y[i * stride..]`, `out` values).
    pub fn forward_quantized_into(&self, qx: &QuantRows, y: &mut [f32], stride: usize, alpha: f32) {
        assert_eq!(
            (qx.kp, qx.group),
            (self.kp, self.group),
            "rows quantized for another input width or group"
        );
        let rows = qx.rows();
        assert!(
            rows == 0 || y.len() >= (rows - 1) * stride + self.out,
            "output too small"
        );
        let isa = crate::isa::level();
        let panels = self.out.div_ceil(NR);
        let mut r = 0;
        while r < rows {
            let m = MB.min(rows - r);
            self.sweep(qx, r, m, 0..panels, isa, |p, i0, tile| {
                let c0 = p * NR;
                let cols = NR.min(self.out - c0);
                let sc = &self.scale[c0..c0 + cols];
                let y = &mut *y;
                crate::isa::vectorized(
                    #[inline(always)]
                    || {
                        for (i, accr) in tile.iter().enumerate() {
                            let at = (r + i0 + i) * stride + c0;
                            for ((yv, &a), &s) in y[at..at + cols].iter_mut().zip(accr).zip(sc) {
                                *yv = a * (alpha * s);
                            }
                        }
                    },
                );
            });
            r += m;
        }
    }

    /// Rows `r0..r0 + m` (`m <= MB`) against each panel of `panels`: `emit(p, i0, acc)`
    /// receives panel `p`'s unscaled sums of rows `r0 + i0..r0 + i0 + acc.len()`. AVX2's
    /// widened kernel takes all `m` rows at once (it widens each block of weights once for
    /// them); the other kernels take micro-tiles of `MR` rows, each against every panel.
    fn sweep(
        &self,
        qx: &QuantRows,
        r0: usize,
        m: usize,
        panels: std::ops::Range<usize>,
        isa: Isa,
        mut emit: impl FnMut(usize, usize, &[[f32; NR]]),
    ) {
        debug_assert!(m <= MB);
        #[cfg(target_arch = "x86_64")]
        if isa.min(crate::isa::detected()) == Isa::Avx2 && m >= WIDE_ROWS {
            let mut acc = [[0f32; NR]; MB];
            for p in panels {
                let t = self.tile(qx, r0, m, p);
                // SAFETY: the CPU has AVX2 and FMA (`isa` is capped by what it runs); the
                // slices of `t` are cut to the sizes `Tile` documents, `m <= MB` rows.
                unsafe { avx2::tile_wide(&t, &mut acc[..m]) };
                emit(p, 0, &acc[..m]);
            }
            return;
        }
        let mut acc = [[0f32; NR]; MR];
        let mut i0 = 0;
        while i0 < m {
            let mm = MR.min(m - i0);
            for p in panels.clone() {
                self.panel_tile(qx, r0 + i0, mm, p, &mut acc, isa);
                emit(p, i0, &acc[..mm]);
            }
            i0 += mm;
        }
    }

    /// `sum_g sx[r, g] * (sum_{k in g} (qx + 128) qw - offset)` for rows `r0..r0 + m` and
    /// panel `p` (the weight scale not yet applied).
    fn panel_tile(
        &self,
        qx: &QuantRows,
        r0: usize,
        m: usize,
        p: usize,
        acc: &mut [[f32; NR]; MR],
        isa: Isa,
    ) {
        let t = self.tile(qx, r0, m, p);
        // `isa` never exceeds what the CPU runs (`Isa::supported`, `isa::level`), so the
        // features each kernel is compiled for are there.
        #[cfg(target_arch = "x86_64")]
        match isa.min(crate::isa::detected()) {
            // SAFETY: the CPU has the kernel's features (above); the slices of `t` are cut
            // to the sizes `Tile` documents, which is all the kernels read.
            Isa::Avx512 => unsafe { vnni::tile(&t, acc) },
            // SAFETY: as above (AVX-VNNI, or AVX-512 VNNI + VL when it is absent).
            Isa::Avx2Vnni => unsafe { avx2::tile_vnni(&t, acc, crate::isa::has_avx_vnni()) },
            // SAFETY: as above.
            Isa::Avx2 if m >= WIDE_ROWS => unsafe { avx2::tile_wide(&t, &mut acc[..]) },
            // SAFETY: as above.
            Isa::Avx2 => unsafe { avx2::tile_madd(&t, acc) },
            Isa::Portable => tile_scalar(&t, acc),
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = isa;
            tile_scalar(&t, acc);
        }
    }

    /// The operands of rows `r0..r0 + m` and panel `p`.
    fn tile<'a>(&'a self, qx: &'a QuantRows, r0: usize, m: usize, p: usize) -> Tile<'a> {
        let groups = self.kp / 4;
        let ng = qx.ngroups;
        Tile {
            a: &qx.q[r0 * self.kp..(r0 + m) * self.kp],
            kp: self.kp,
            m,
            panel: &self.packed[p * groups * NR * 4..(p + 1) * groups * NR * 4],
            steps: self.group / 4,
            sx: &qx.scale[r0 * ng..(r0 + m) * ng],
            ng,
            off: &self.offset[p * ng * NR..(p + 1) * ng * NR],
        }
    }

    /// `(inp, out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.inp, self.out)
    }

    /// Bytes a product reads: the int8 weights, their scales and offsets.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scale.len() + self.offset.len())
    }

    /// `y = x W^T + b` for `rows` rows of `inp` values, then `post` on each block of
    /// output while it is in cache: an elementwise activation, or nothing (blocks are whole
    /// rows above 64 rows and column ranges below).
    ///
    /// # Shapes
    /// `x: rows * inp`, `bias: out` (or none) -> `rows * out`.
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        post: impl Fn(&mut [f32]) + Sync,
    ) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.inp, "x must hold rows * inp values");
        if let Some(b) = bias {
            assert_eq!(b.len(), self.out, "one bias per output channel");
        }
        let qx = quantize_rows(self.pool, x, rows, self.inp, self.group);
        // every output is written below (each block's `rows_tile` covers all its rows and
        // all panels), so the buffers are not zeroed first: at the vision encoder's sizes
        // zeroing them took 4% of its time
        let mut y = Box::<[f32]>::new_uninit_slice(rows * self.out);
        let isa = crate::isa::level();
        let panels = self.out.div_ceil(NR);
        if rows > MB {
            // blocks of whole rows, each written in place
            par_chunks_mut(self.pool, &mut y, MB * self.out, |blk, yb| {
                let r0 = blk * MB;
                let n = yb.len() / self.out;
                self.rows_tile(&qx, r0, n, 0..panels, yb, self.out, bias, isa);
                // SAFETY: `rows_tile` wrote all `n` rows of the block, every panel's columns
                post(unsafe { assume_init_mut(yb) });
            });
            // SAFETY: the blocks cover `y`, and `rows_tile` wrote every value of each
            return unsafe { y.assume_init() }.into_vec();
        }
        // few rows (decode, short prompts): split the columns instead, each task into a
        // buffer of its own (its columns of every row), then one copy into place
        let per_task = panels.div_ceil(8).max(1);
        let width = per_task * NR;
        let mut parts = Box::<[f32]>::new_uninit_slice(rows * self.out);
        par_chunks_mut(self.pool, &mut parts, rows * width, |t, buf| {
            let p0 = t * per_task;
            let p1 = (p0 + per_task).min(panels);
            let cols = buf.len() / rows.max(1);
            self.rows_tile(&qx, 0, rows, p0..p1, buf, cols, bias, isa);
            // SAFETY: `rows_tile` wrote every row's `cols` columns (panels `p0..p1`; the
            // last task's buffer is cut to the columns that remain)
            post(unsafe { assume_init_mut(buf) });
        });
        for (t, buf) in parts.chunks(rows * width).enumerate() {
            let cols = buf.len() / rows.max(1);
            for r in 0..rows {
                y[r * self.out + t * width..r * self.out + t * width + cols]
                    .copy_from_slice(&buf[r * cols..(r + 1) * cols]);
            }
        }
        // SAFETY: task `t` wrote columns `t * width..` (`cols` of them, the last task the
        // rest) of every row, and the copies above cover every row and column of `y`
        unsafe { y.assume_init() }.into_vec()
    }

    /// Rows `r0..r0 + m` (`m <= MB`) of the output, columns of `panels`, into `y`: row `i`
    /// at `y[i * stride..]`, the first panel's first column at index 0 of it.
    #[allow(clippy::too_many_arguments)]
    fn rows_tile(
        &self,
        qx: &QuantRows,
        r0: usize,
        m: usize,
        panels: std::ops::Range<usize>,
        y: &mut [MaybeUninit<f32>],
        stride: usize,
        b: Option<&[f32]>,
        isa: Isa,
    ) {
        let first = panels.start;
        self.sweep(qx, r0, m, panels, isa, |p, i0, acc| {
            let c0 = p * NR;
            let cols = NR.min(self.out - c0);
            let at = (p - first) * NR;
            let sc = &self.scale[c0..c0 + cols];
            let y = &mut *y;
            crate::isa::vectorized(
                #[inline(always)]
                || {
                    for (i, accr) in acc.iter().enumerate() {
                        let at = (i0 + i) * stride + at;
                        let yr = &mut y[at..at + cols];
                        match b {
                            Some(b) => {
                                let bs = &b[c0..c0 + cols];
                                for (((yv, &a), &s), &bv) in yr.iter_mut().zip(accr).zip(sc).zip(bs)
                                {
                                    yv.write(a * s + bv);
                                }
                            }
                            None => {
                                for ((yv, &a), &s) in yr.iter_mut().zip(accr).zip(sc) {
                                    yv.write(a * s + 0.0);
                                }
                            }
                        }
                    }
                },
            );
        });
    }
}

/// Whether the int8 kernel in use ([`crate::isa::level`]) is faster than the f32 path: with
/// `vpdpbusd` (AVX-512 VNNI, or AVX-VNNI at 256 bits) by about 2x in the vision encoder,
/// with AVX2 alone (`vpmaddwd`, the widened kernel) by about 1.2x (`bench vision` in the
/// AVX2 proxy, docs/performance.md); the portable loop is slower than f32.
pub fn int8_kernel_is_fast() -> bool {
    crate::isa::level() >= Isa::Avx2
}

/// One micro-tile's operands: `m` activation rows of `kp` bytes, a panel of `kp / 4` groups
/// of 128 bytes, activation groups of `steps` 4-byte steps with `ng` scales per row (`sx`,
/// `m * ng`), and the panel's offsets (`ng * NR`).
struct Tile<'a> {
    a: &'a [u8],
    kp: usize,
    m: usize,
    panel: &'a [i8],
    steps: usize,
    sx: &'a [f32],
    ng: usize,
    off: &'a [i32],
}

/// The portable kernel: the same integers as the VNNI one, scaled the same way.
fn tile_scalar(t: &Tile, acc: &mut [[f32; NR]; MR]) {
    let groups = t.kp / 4;
    for (i, accr) in acc.iter_mut().enumerate().take(t.m) {
        let ar = &t.a[i * t.kp..(i + 1) * t.kp];
        accr.fill(0.0);
        for g in 0..t.ng {
            let mut s = [0i32; NR];
            for kg in g * t.steps..((g + 1) * t.steps).min(groups) {
                let bg = &t.panel[kg * NR * 4..(kg + 1) * NR * 4];
                let av = &ar[kg * 4..kg * 4 + 4];
                for (c, sv) in s.iter_mut().enumerate() {
                    let bc = &bg[c * 4..c * 4 + 4];
                    *sv += (0..4).map(|j| av[j] as i32 * bc[j] as i32).sum::<i32>();
                }
            }
            let sx = t.sx[i * t.ng + g];
            for (c, a) in accr.iter_mut().enumerate() {
                *a += (s[c] - t.off[g * NR + c]) as f32 * sx;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "int8_avx2.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// Dispatches on the number of rows so each micro-kernel keeps its accumulators in
    /// registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VNNI; the slices of `t` must have the sizes `Tile`
    /// documents.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile(t: &Tile, acc: &mut [[f32; NR]; MR]) {
        match t.m {
            8 => rows::<8>(t, acc),
            7 => rows::<7>(t, acc),
            6 => rows::<6>(t, acc),
            5 => rows::<5>(t, acc),
            4 => rows::<4>(t, acc),
            3 => rows::<3>(t, acc),
            2 => rows::<2>(t, acc),
            _ => rows::<1>(t, acc),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows<const M: usize>(t: &Tile, acc: &mut [[f32; NR]; MR]) {
        let (a, b, kp) = (t.a.as_ptr(), t.panel.as_ptr(), t.kp);
        let groups = kp / 4;
        let mut f = [[_mm512_setzero_ps(); 2]; M];
        for g in 0..t.ng {
            let mut s = [[_mm512_setzero_si512(); 2]; M];
            for kg in g * t.steps..((g + 1) * t.steps).min(groups) {
                let b0 = _mm512_loadu_si512(b.add(kg * 128) as *const _);
                let b1 = _mm512_loadu_si512(b.add(kg * 128 + 64) as *const _);
                for (r, sr) in s.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(std::ptr::read_unaligned(
                        a.add(r * kp + kg * 4) as *const i32
                    ));
                    sr[0] = _mm512_dpbusd_epi32(sr[0], av, b0);
                    sr[1] = _mm512_dpbusd_epi32(sr[1], av, b1);
                }
            }
            let o0 = _mm512_loadu_si512(t.off.as_ptr().add(g * NR) as *const _);
            let o1 = _mm512_loadu_si512(t.off.as_ptr().add(g * NR + 16) as *const _);
            for r in 0..M {
                let sx = _mm512_set1_ps(*t.sx.get_unchecked(r * t.ng + g));
                let v0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(s[r][0], o0));
                let v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(s[r][1], o1));
                f[r][0] = _mm512_fmadd_ps(v0, sx, f[r][0]);
                f[r][1] = _mm512_fmadd_ps(v1, sx, f[r][1]);
            }
        }
        for (r, fr) in f.iter().enumerate() {
            _mm512_storeu_ps(acc[r].as_mut_ptr(), fr[0]);
            _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), fr[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// What both kernels must produce, computed from the definitions (module docs), with
    /// one activation scale per `group` inputs (`group >= inp`: one per row).
    fn reference(
        x: &[f32],
        wt: &[f32],
        b: &[f32],
        (rows, inp, out): (usize, usize, usize),
        group: usize,
    ) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for o in 0..out {
            let wmax = (0..inp).fold(0f32, |m, k| m.max(wt[k * out + o].abs()));
            for r in 0..rows {
                let mut acc = 0f64;
                for (g, xg) in x[r * inp..(r + 1) * inp].chunks(group).enumerate() {
                    let xmax = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if xmax == 0.0 {
                        continue;
                    }
                    let mut s = 0i64;
                    for (j, xv) in xg.iter().enumerate() {
                        let k = g * group + j;
                        let qx = (xv * (127.0 / xmax)).round() as i64;
                        let qw = (wt[k * out + o] * (127.0 / wmax)).round() as i64;
                        s += qx * qw;
                    }
                    acc += s as f64 * (xmax / 127.0) as f64;
                }
                y[r * out + o] = (acc * (wmax / 127.0) as f64) as f32 + b[o];
            }
        }
        y
    }

    /// `from_rows` against the definition, computed here one value at a time with
    /// `f32::round`: packing, scales and offsets, with padding inputs (`inp` not a multiple
    /// of 4), a partial last panel, a row stride wider than `inp`, a zero channel, a tiny
    /// channel and exact ties. `from_fn` (the same constructor over a closure) as well.
    #[test]
    fn from_rows_matches_the_definition() {
        for (inp, out, stride) in [(64, 70, 192), (7, 33, 7), (13, 5, 20)] {
            let mut rows = lcg(out * stride, 11 + inp as u64);
            rows[..inp].fill(0.0);
            rows[stride..stride + inp]
                .iter_mut()
                .for_each(|v| *v *= 1e-39);
            // channel 2: a maximum of 127 (a scale of 1), and ties at 0.5 and -1.5
            rows[2 * stride] = 127.0;
            rows[2 * stride + 1] = 0.5;
            rows[2 * stride + 2] = -1.5;
            let (kp, panels) = (inp.div_ceil(4) * 4, out.div_ceil(NR));
            let mut packed = vec![0i8; panels * kp * NR];
            let mut scale = vec![0f32; panels * NR];
            let mut offset = vec![0i32; panels * NR];
            for o in 0..out {
                let w = &rows[o * stride..o * stride + inp];
                let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                if amax == 0.0 || !(127.0 / amax).is_finite() {
                    continue;
                }
                scale[o] = amax / 127.0;
                for (k, v) in w.iter().enumerate() {
                    let q = (v * (127.0 / amax)).round().clamp(-127.0, 127.0) as i8;
                    packed[((o / NR) * (kp / 4) + k / 4) * NR * 4 + (o % NR) * 4 + k % 4] = q;
                    offset[o] += 128 * q as i32;
                }
            }
            let a = Int8Matrix::from_rows(inp, out, &rows, stride);
            let b = Int8Matrix::from_fn(inp, out, |k, o| rows[o * stride + k]);
            for m in [&a, &b] {
                assert_eq!(m.packed, packed, "{inp} x {out}");
                assert_eq!(m.offset, offset, "{inp} x {out}");
                assert_eq!(
                    m.scale.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                    scale.iter().map(|s| s.to_bits()).collect::<Vec<_>>()
                );
                assert_eq!((m.kp, m.group), (kp, kp));
            }
            assert_eq!(a.packed[2 * 4 + 1], 1, "0.5 rounds away from zero");
            assert_eq!(a.packed[2 * 4 + 2], -2, "-1.5 rounds away from zero");
        }
    }

    /// A NaN in a weight channel (from either constructor) or in an activation row makes
    /// that channel's or row's outputs NaN, as in f32, and leaves the others finite.
    #[test]
    fn nan_inputs_give_nan_outputs() {
        let (rows, inp, out) = (3, 40, 36);
        let mut w = lcg(out * inp, 5);
        w[4 * inp + 17] = f32::NAN;
        let mut x = lcg(rows * inp, 6);
        x[inp + 3] = f32::NAN;
        for m in [
            Int8Matrix::from_rows(inp, out, &w, inp),
            Int8Matrix::from_fn(inp, out, |k, o| w[o * inp + k]),
        ] {
            let y = m.forward(&x, rows, None, |_| {});
            for r in 0..rows {
                for o in 0..out {
                    let v = y[r * out + o];
                    assert_eq!(v.is_nan(), r == 1 || o == 4, "row {r} channel {o}: {v}");
                }
            }
        }
    }

    /// A weight channel of tiny values (`127 / amax` would overflow) is kept as zeros with a
    /// zero scale, as tiny activation groups are; a normal small channel keeps its values.
    #[test]
    fn tiny_weight_channels_are_zeros() {
        let (inp, out) = (8, 2);
        // W^T (inp, out): channel 0 tiny, channel 1 small but normal
        let wt: Vec<f32> = (0..inp * out)
            .map(|i| {
                if i % 2 == 0 {
                    1e-40 * (i as f32 - 7.0)
                } else {
                    1e-30 * (i as f32 - 7.0)
                }
            })
            .collect();
        let m = Int8Matrix::from_transposed(&wt, inp, out);
        assert_eq!(m.scale[0], 0.0);
        assert!(
            m.packed[..4].iter().all(|&q| q == 0),
            "{:?}",
            &m.packed[..4]
        );
        assert!(m.scale[1] > 0.0);
        let x = vec![1.0f32; inp];
        let y = m.forward(&x, 1, None, |_| {});
        assert_eq!(y[0], 0.0);
        let want: f32 = (0..inp).map(|k| wt[k * out + 1]).sum();
        assert!(
            (y[1] - want).abs() <= 0.02 * want.abs(),
            "{} vs {want}",
            y[1]
        );
    }

    /// A group of tiny values (its `1 / scale` would overflow) quantises to zeros with a
    /// zero scale, not to the bytes that `0 * inf` would give; normal small values keep
    /// their scale.
    #[test]
    fn tiny_groups_quantise_to_zeros() {
        let x = [1e-40f32, 0.0, -3e-41, 0.0, 1.1e-30, 0.0, -2e-30, 5e-31];
        let q = quantize_rows(Pool::Inline, &x, 1, 8, 4);
        assert_eq!(q.scale[0], 0.0);
        assert!(q.q[..4].iter().all(|&b| b == 128), "{:?}", &q.q[..4]);
        assert_eq!(q.scale[1], 2e-30 / 127.0);
        assert_eq!(&q.q[4..], &[128 + 70, 128, 128 - 127, 128 + 32]);
    }

    /// The quantiser rounds half away from zero (`f32::round`) at every vector width,
    /// ties and signed zeros included: with a row maximum of 127 the scale is 1, so each
    /// value is its own rounding input.
    #[test]
    fn quantiser_rounds_as_f32_round() {
        let mut x: Vec<f32> = (0..=508).map(|i| i as f32 * 0.5 - 127.0).collect();
        x.extend([
            -0.0,
            0.0,
            0.499_999_97,
            -0.499_999_97,
            126.499_99,
            -126.5,
            1e-30,
        ]);
        x.extend((0..3000).map(|i| ((i * 7919 % 2531) as f32 - 1265.0) * 0.1003));
        let x: Vec<f32> = x.into_iter().map(|v| v.clamp(-127.0, 127.0)).collect();
        let inp = x.len();
        let q = quantize_rows(Pool::Inline, &x, 1, inp, inp);
        assert_eq!(q.scale[0], 1.0);
        for (k, &v) in x.iter().enumerate() {
            assert_eq!(q.q[k] as i32 - 128, v.round() as i32, "{v}");
        }
    }

    /// AVX2's two kernels, widened (`vpmaddwd`, up to `MB` rows at once) and byte
    /// (`vpmaddubsw`, `MR` rows), sum the same integers and scale them by the same fused
    /// multiply-add: the same bits, for every height up to a micro-tile and some taller
    /// ones, with groups within one block, across blocks, and one per row.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_give_the_same_bits() {
        if crate::isa::detected() < Isa::Avx2 {
            return;
        }
        let rows = MB;
        for &(inp, out, group) in &[(70, 45, 8), (301, 70, 200), (600, 33, 0)] {
            let x = lcg(rows * inp, 5 + inp as u64);
            let wt = lcg(inp * out, 6 + inp as u64);
            let mut m = Int8Matrix::from_transposed(&wt, inp, out);
            if group > 0 {
                m = m.with_act_group(group);
            }
            let qx = quantize_rows(Pool::Inline, &x, rows, inp, m.group);
            for h in (1..=MR).chain([13, 37, MB]) {
                for p in 0..out.div_ceil(NR) {
                    let mut wide = [[1f32; NR]; MB];
                    // SAFETY: the CPU has AVX2 and FMA (checked above); `tile` cuts the
                    // slices to the sizes `Tile` documents; `h <= MB`.
                    unsafe { avx2::tile_wide(&m.tile(&qx, rows - h, h, p), &mut wide[..h]) };
                    for r0 in (0..h).step_by(MR) {
                        let mr = MR.min(h - r0);
                        let mut byte = [[7f32; NR]; MR];
                        // SAFETY: as above.
                        unsafe { avx2::tile_madd(&m.tile(&qx, rows - h + r0, mr, p), &mut byte) };
                        for (r1, r2) in wide[r0..r0 + mr].iter().zip(&byte[..mr]) {
                            for (v1, v2) in r1.iter().zip(r2) {
                                assert_eq!(v1.to_bits(), v2.to_bits(), "{h} rows: {v1} vs {v2}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_match_the_definition_and_stay_close_to_f32() {
        // odd sizes: inputs not a multiple of 4, channels not a multiple of 32, rows past
        // one task and not a multiple of the micro-tile; one scale per row and per group
        for &(rows, inp, out, group) in &[
            (3, 5, 7, 0),
            (77, 70, 45, 0),
            (77, 70, 45, 8),
            (130, 96, 64, 0),
            (130, 96, 64, 32),
            (1, 40, 300, 0),
            (9, 33, 1000, 12),
            // groups of more than one block of AVX2's widened kernel (32 steps of 4 inputs)
            (20, 301, 70, 0),
            (20, 301, 70, 200),
        ] {
            let x = lcg(rows * inp, 1 + rows as u64);
            let wt = lcg(inp * out, 2 + inp as u64);
            let b = lcg(out, 3);
            let mut m = Int8Matrix::from_transposed(&wt, inp, out);
            let g = if group == 0 { inp } else { group };
            if group > 0 {
                m = m.with_act_group(group);
            }
            let want = reference(&x, &wt, &b, (rows, inp, out), g);
            let got = m.forward(&x, rows, Some(&b), |_| {});
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
            // and the f32 product, within what 8 bits allow
            let mut err = 0f32;
            let mut norm = 0f32;
            for r in 0..rows {
                for o in 0..out {
                    let f: f32 = (0..inp)
                        .map(|k| x[r * inp + k] * wt[k * out + o])
                        .sum::<f32>()
                        + b[o];
                    err += (got[r * out + o] - f).powi(2);
                    norm += f * f;
                }
            }
            let rel = (err / norm).sqrt();
            assert!(rel < 0.02, "relative error {rel} at {rows}x{inp}x{out}");
            // every kernel this CPU runs gives the portable kernel's numbers, for every
            // micro-tile height (1..=8 rows: the 2-row AVX2 kernels' odd tails)
            let qx = quantize_rows(Pool::Rayon, &x, rows, inp, m.group);
            for isa in Isa::supported().skip(1) {
                for mr in 1..=MR.min(rows) {
                    for p in 0..out.div_ceil(NR) {
                        let (mut a1, mut a2) = ([[0f32; NR]; MR], [[7f32; NR]; MR]);
                        m.panel_tile(&qx, rows - mr, mr, p, &mut a1, Isa::Portable);
                        m.panel_tile(&qx, rows - mr, mr, p, &mut a2, isa);
                        for (r1, r2) in a1[..mr].iter().zip(&a2[..mr]) {
                            for (v1, v2) in r1.iter().zip(r2) {
                                // the same integers; fma against mul + add in the float
                                // sum over groups
                                assert!(
                                    (v1 - v2).abs() <= 1e-4 * v1.abs().max(1.0),
                                    "{isa:?} {mr} rows: {v1} vs {v2}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// An outlier input channel flattens the rest of a row under one scale per row; groups
    /// keep the rest.
    #[test]
    fn groups_keep_small_inputs_next_to_an_outlier() {
        let (rows, inp, out) = (4, 256, 64);
        let mut x = lcg(rows * inp, 21);
        for r in 0..rows {
            x[r * inp + 7] = 300.0;
        }
        let wt = lcg(inp * out, 22);
        let err = |m: &Int8Matrix| {
            let got = m.forward(&x, rows, None, |_| {});
            let (mut e, mut n) = (0f32, 0f32);
            for r in 0..rows {
                for o in 0..out {
                    let f: f32 = (0..inp).map(|k| x[r * inp + k] * wt[k * out + o]).sum();
                    e += (got[r * out + o] - f).powi(2);
                    n += f * f;
                }
            }
            (e / n).sqrt()
        };
        let per_row = err(&Int8Matrix::from_transposed(&wt, inp, out));
        let grouped = err(&Int8Matrix::from_transposed(&wt, inp, out).with_act_group(32));
        assert!(
            grouped < per_row / 2.0,
            "grouped {grouped} vs per row {per_row}"
        );
    }

    #[test]
    fn zero_rows_and_channels_give_the_bias() {
        let (rows, inp, out) = (2, 8, 3);
        let mut x = lcg(rows * inp, 9);
        x[..inp].fill(0.0);
        let mut wt = lcg(inp * out, 10);
        for k in 0..inp {
            wt[k * out + 1] = 0.0;
        }
        let b = [0.5, -0.25, 2.0];
        let y = Int8Matrix::from_transposed(&wt, inp, out).forward(&x, rows, Some(&b), |_| {});
        assert_eq!(&y[..3], &b);
        assert_eq!(y[4], -0.25);
    }
}
