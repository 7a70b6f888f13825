//! The optional int8 path of dense f32 matrices (the vision encoder's projections, MLP and
//! attention scores, a safetensors language model's projections): `y = x W^T + b` with the
//! weights quantised per output channel and the activations per row, both symmetric to
//! `[-127, 127]`, and the products summed in exact i32 arithmetic over the whole row.
//!
//! # Arithmetic
//! For weight row `o` (output channel) `sw[o] = max|W[o, :]| / 127` and
//! `qw[o, k] = round(W[o, k] / sw[o])`; for activation row `r` `sx[r] = max|x[r, :]| / 127` and
//! `qx[r, k] = round(x[r, k] / sx[r])`. Then
//! `y[r, o] = sx[r] * sw[o] * sum_k qx[r, k] qw[o, k] + b[o]`.
//! The kernel multiplies unsigned by signed bytes (AVX-512 VNNI `vpdpbusd`), so it stores
//! `qx + 128` and subtracts `128 * sum_k qw[o, k]` afterwards; the result is the same integer.
//! No 32-bit overflow is possible below `2^31 / (255 * 127)` = 66,313 inputs per row
//! ([`MAX_INPUTS`]; callers refuse wider matrices).
//!
//! # Speed
//! On CPUs with AVX-512 VNNI one `vpdpbusd` does 64 multiply-adds where an f32 FMA does 16.
//! Elsewhere a portable loop computes the same integers (slower than the f32 path: the
//! int8 path is then not worth turning on; [`int8_kernel_is_fast`] tells).
//!
//! # Layout of the packed weights
//! Output channels in panels of [`NR`] = 32; inside a panel, for each group of 4 inputs, the
//! 32 channels' 4 bytes side by side (128 bytes: two 512-bit registers). Inputs are padded
//! with zeros to a multiple of 4, channels with zero rows to a multiple of 32.

use rayon::prelude::*;

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
    /// `128 * sum_k qw[o, k]`.
    offset: Vec<i32>,
    pool: Pool,
}

/// Activations quantised per row: `qx + 128` in rows of `kp` bytes (padding holds 128 = 0).
pub struct QuantRows {
    pub kp: usize,
    pub q: Vec<u8>,
    pub scale: Vec<f32>,
}

/// Quantises `rows` rows of `inp` values (see the module docs).
pub fn quantize_rows(pool: Pool, x: &[f32], rows: usize, inp: usize) -> QuantRows {
    let kp = inp.div_ceil(4) * 4;
    let mut q = vec![128u8; rows * kp];
    let mut scale = vec![0f32; rows];
    let rows_per_task = (1 << 16) / kp.max(1) + 1;
    par_chunks_mut(pool, &mut scale, rows_per_task, |task, sc| {
        for (i, s) in sc.iter_mut().enumerate() {
            let r = task * rows_per_task + i;
            let amax = x[r * inp..(r + 1) * inp]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            // a NaN or infinite input makes the row's output NaN, as in f32
            *s = if amax.is_finite() {
                amax / 127.0
            } else {
                f32::NAN
            };
        }
    });
    let scale_ref = &scale;
    par_chunks_mut(pool, &mut q, rows_per_task * kp, |task, qc| {
        for (i, qr) in qc.chunks_mut(kp).enumerate() {
            let r = task * rows_per_task + i;
            let s = scale_ref[r];
            if s > 0.0 {
                let inv = 1.0 / s;
                for (d, &v) in qr.iter_mut().zip(&x[r * inp..(r + 1) * inp]) {
                    // round half away from zero, as `f32::round`, in a form that vectorises
                    // (`round` is a library call on baseline x86-64)
                    let t = (v * inv).clamp(-127.0, 127.0);
                    *d = ((t + 0.5f32.copysign(t)) as i32 + 128) as u8;
                }
            }
        }
    });
    QuantRows { kp, q, scale }
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

    /// Quantises `W` whose element `(o, k)` (output channel `o`, input `k`) is `w(k, o)`.
    /// A channel holding NaN or infinity gives NaN outputs, as in f32.
    ///
    /// # Panics
    /// When `inp > MAX_INPUTS` (callers check first).
    pub fn from_fn(inp: usize, out: usize, w: impl Fn(usize, usize) -> f32) -> Self {
        assert!(
            inp <= MAX_INPUTS,
            "{inp} inputs per row overflow the i32 sums"
        );
        let kp = inp.div_ceil(4) * 4;
        let panels = out.div_ceil(NR);
        let groups = kp / 4;
        let mut packed = vec![0i8; panels * groups * NR * 4];
        let mut scale = vec![0f32; panels * NR];
        let mut offset = vec![0i32; panels * NR];
        for o in 0..out {
            let amax = (0..inp).fold(0f32, |m, k| m.max(w(k, o).abs()));
            if !amax.is_finite() {
                scale[o] = f32::NAN;
                continue;
            }
            if amax == 0.0 {
                continue;
            }
            let inv = 127.0 / amax;
            scale[o] = amax / 127.0;
            let (p, c) = (o / NR, o % NR);
            let mut sum = 0i32;
            for k in 0..inp {
                let q = (w(k, o) * inv).round().clamp(-127.0, 127.0) as i8;
                sum += q as i32;
                packed[(p * groups + k / 4) * NR * 4 + c * 4 + k % 4] = q;
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
            pool: Pool::default(),
        }
    }

    /// Runs on `pool` (default [`Pool::Candle`]).
    pub fn with_pool(mut self, pool: Pool) -> Self {
        self.pool = pool;
        self
    }

    /// `alpha * x W^T` for the quantized rows `qx` (made with this matrix's input width),
    /// on this thread, into `y` (row `i` at `y[i * stride..]`, `out` values).
    pub fn forward_quantized_into(&self, qx: &QuantRows, y: &mut [f32], stride: usize, alpha: f32) {
        assert_eq!(qx.kp, self.kp, "rows quantized for another input width");
        let rows = qx.scale.len();
        assert!(
            rows == 0 || y.len() >= (rows - 1) * stride + self.out,
            "output too small"
        );
        let vnni = has_vnni();
        let panels = self.out.div_ceil(NR);
        let mut r = 0;
        while r < rows {
            let m = MR.min(rows - r);
            let mut tile = [[0i32; NR]; MR];
            for p in 0..panels {
                self.panel_tile(qx, r, m, p, &mut tile, vnni);
                let c0 = p * NR;
                let cols = NR.min(self.out - c0);
                for (i, accr) in tile.iter().enumerate().take(m) {
                    let sx = qx.scale[r + i] * alpha;
                    let yr = &mut y[(r + i) * stride + c0..(r + i) * stride + c0 + cols];
                    for (c, yv) in yr.iter_mut().enumerate() {
                        let o = c0 + c;
                        *yv = (accr[c] - self.offset[o]) as f32 * (sx * self.scale[o]);
                    }
                }
            }
            r += m;
        }
    }

    /// The integer products of rows `r0..r0 + m` with panel `p`.
    fn panel_tile(
        &self,
        qx: &QuantRows,
        r0: usize,
        m: usize,
        p: usize,
        acc: &mut [[i32; NR]; MR],
        vnni: bool,
    ) {
        let groups = self.kp / 4;
        let panel = &self.packed[p * groups * NR * 4..(p + 1) * groups * NR * 4];
        let a = &qx.q[r0 * self.kp..(r0 + m) * self.kp];
        if vnni {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `has_vnni` checked the CPU features the kernel is compiled for; `a`
            // holds m rows of kp bytes and `panel` groups * 128 bytes (slices checked
            // above), which is all the kernel reads.
            unsafe {
                vnni::tile(a, self.kp, m, panel, groups, acc)
            };
        } else {
            tile_scalar(a, self.kp, m, panel, groups, acc);
        }
    }

    /// `(inp, out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.inp, self.out)
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
        let zeros;
        let bias = match bias {
            Some(b) => b,
            None => {
                zeros = vec![0f32; self.out];
                &zeros
            }
        };
        assert_eq!(bias.len(), self.out, "one bias per output channel");
        let qx = quantize_rows(self.pool, x, rows, self.inp);
        let mut y = vec![0f32; rows * self.out];
        let vnni = has_vnni();
        let panels = self.out.div_ceil(NR);
        if rows > MB {
            // blocks of whole rows, each written in place
            par_chunks_mut(self.pool, &mut y, MB * self.out, |blk, yb| {
                let r0 = blk * MB;
                let n = yb.len() / self.out;
                let mut r = 0;
                while r < n {
                    let m = MR.min(n - r);
                    let yt = &mut yb[r * self.out..];
                    self.rows_tile(&qx, r0 + r, m, 0..panels, yt, self.out, bias, vnni);
                    r += m;
                }
                post(yb);
            });
            return y;
        }
        // few rows (decode, short prompts): split the columns instead, each task into a
        // buffer of its own (its columns of every row), then one copy into place
        let per_task = panels.div_ceil(8).max(1);
        let width = per_task * NR;
        let mut parts = vec![0f32; rows * self.out];
        par_chunks_mut(self.pool, &mut parts, rows * width, |t, buf| {
            let p0 = t * per_task;
            let p1 = (p0 + per_task).min(panels);
            let cols = buf.len() / rows.max(1);
            let mut r = 0;
            while r < rows {
                let m = MR.min(rows - r);
                self.rows_tile(&qx, r, m, p0..p1, &mut buf[r * cols..], cols, bias, vnni);
                r += m;
            }
            post(buf);
        });
        for (t, buf) in parts.chunks(rows * width).enumerate() {
            let cols = buf.len() / rows.max(1);
            for r in 0..rows {
                y[r * self.out + t * width..r * self.out + t * width + cols]
                    .copy_from_slice(&buf[r * cols..(r + 1) * cols]);
            }
        }
        y
    }

    /// Rows `r0..r0 + m` (`m <= MR`) of the output, columns of `panels`, into `y`: row `i`
    /// at `y[i * stride..]`, the first panel's first column at index 0 of it.
    #[allow(clippy::too_many_arguments)]
    fn rows_tile(
        &self,
        qx: &QuantRows,
        r0: usize,
        m: usize,
        panels: std::ops::Range<usize>,
        y: &mut [f32],
        stride: usize,
        b: &[f32],
        vnni: bool,
    ) {
        let mut acc = [[0i32; NR]; MR];
        let first = panels.start;
        for p in panels {
            self.panel_tile(qx, r0, m, p, &mut acc, vnni);
            let c0 = p * NR;
            let cols = NR.min(self.out - c0);
            let at = (p - first) * NR;
            for (i, accr) in acc.iter().enumerate().take(m) {
                let sx = qx.scale[r0 + i];
                let yr = &mut y[i * stride + at..i * stride + at + cols];
                for (c, yv) in yr.iter_mut().enumerate() {
                    let o = c0 + c;
                    *yv = (accr[c] - self.offset[o]) as f32 * (sx * self.scale[o]) + b[o];
                }
            }
        }
    }
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the int8 kernel in AVX-512 VNNI (else a portable loop).
pub fn int8_kernel_is_fast() -> bool {
    has_vnni()
}

/// The portable kernel: the same integers as the VNNI one.
fn tile_scalar(
    a: &[u8],
    kp: usize,
    m: usize,
    panel: &[i8],
    groups: usize,
    acc: &mut [[i32; NR]; MR],
) {
    for (i, accr) in acc.iter_mut().enumerate().take(m) {
        let ar = &a[i * kp..(i + 1) * kp];
        accr.fill(0);
        for g in 0..groups {
            let bg = &panel[g * NR * 4..(g + 1) * NR * 4];
            let av = &ar[g * 4..g * 4 + 4];
            for (c, accv) in accr.iter_mut().enumerate() {
                let bc = &bg[c * 4..c * 4 + 4];
                *accv += (0..4).map(|j| av[j] as i32 * bc[j] as i32).sum::<i32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Dispatches on the number of rows so each micro-kernel keeps its accumulators in
    /// registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VNNI; `a` must hold `m` rows of `kp >= 4 * groups`
    /// bytes and `panel` `groups * 128` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile(
        a: &[u8],
        kp: usize,
        m: usize,
        panel: &[i8],
        groups: usize,
        acc: &mut [[i32; NR]; MR],
    ) {
        match m {
            8 => rows::<8>(a, kp, panel, groups, acc),
            7 => rows::<7>(a, kp, panel, groups, acc),
            6 => rows::<6>(a, kp, panel, groups, acc),
            5 => rows::<5>(a, kp, panel, groups, acc),
            4 => rows::<4>(a, kp, panel, groups, acc),
            3 => rows::<3>(a, kp, panel, groups, acc),
            2 => rows::<2>(a, kp, panel, groups, acc),
            _ => rows::<1>(a, kp, panel, groups, acc),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows<const M: usize>(
        a: &[u8],
        kp: usize,
        panel: &[i8],
        groups: usize,
        acc: &mut [[i32; NR]; MR],
    ) {
        let a = a.as_ptr();
        let b = panel.as_ptr();
        let mut s = [[_mm512_setzero_si512(); 2]; M];
        for g in 0..groups {
            let b0 = _mm512_loadu_si512(b.add(g * 128) as *const _);
            let b1 = _mm512_loadu_si512(b.add(g * 128 + 64) as *const _);
            for (r, sr) in s.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(std::ptr::read_unaligned(
                    a.add(r * kp + g * 4) as *const i32
                ));
                sr[0] = _mm512_dpbusd_epi32(sr[0], av, b0);
                sr[1] = _mm512_dpbusd_epi32(sr[1], av, b1);
            }
        }
        for (r, sr) in s.iter().enumerate() {
            _mm512_storeu_si512(acc[r].as_mut_ptr() as *mut _, sr[0]);
            _mm512_storeu_si512(acc[r].as_mut_ptr().add(16) as *mut _, sr[1]);
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

    /// The integers both kernels must produce, computed from the definitions.
    fn reference(
        x: &[f32],
        wt: &[f32],
        b: &[f32],
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for o in 0..out {
            let wmax = (0..inp).fold(0f32, |m, k| m.max(wt[k * out + o].abs()));
            for r in 0..rows {
                let xr = &x[r * inp..(r + 1) * inp];
                let xmax = xr.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut s = 0i64;
                for k in 0..inp {
                    let qx = (xr[k] * (127.0 / xmax)).round() as i64;
                    let qw = (wt[k * out + o] * (127.0 / wmax)).round() as i64;
                    s += qx * qw;
                }
                y[r * out + o] = s as f32 * (xmax / 127.0) * (wmax / 127.0) + b[o];
            }
        }
        y
    }

    #[test]
    fn kernels_match_the_definition_and_stay_close_to_f32() {
        // odd sizes: inputs not a multiple of 4, channels not a multiple of 32, rows past
        // one task and not a multiple of the micro-tile
        for &(rows, inp, out) in &[
            (3, 5, 7),
            (77, 70, 45),
            (130, 96, 64),
            (1, 40, 300),
            (9, 33, 1000),
        ] {
            let x = lcg(rows * inp, 1 + rows as u64);
            let wt = lcg(inp * out, 2 + inp as u64);
            let b = lcg(out, 3);
            let m = Int8Matrix::from_transposed(&wt, inp, out);
            let want = reference(&x, &wt, &b, rows, inp, out);
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
            // the portable kernel gives the same integers as the one this CPU picked
            let qx = quantize_rows(Pool::Rayon, &x, rows, inp);
            let groups = m.kp / 4;
            for p in 0..out.div_ceil(NR) {
                let panel = &m.packed[p * groups * NR * 4..(p + 1) * groups * NR * 4];
                let mut a1 = [[0i32; NR]; MR];
                let mut a2 = [[0i32; NR]; MR];
                let mr = MR.min(rows);
                tile_scalar(&qx.q[..mr * m.kp], m.kp, mr, panel, groups, &mut a1);
                if has_vnni() {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: features checked; slices sized as `tile` requires.
                    unsafe {
                        vnni::tile(&qx.q[..mr * m.kp], m.kp, mr, panel, groups, &mut a2)
                    };
                    assert_eq!(a1[..mr], a2[..mr]);
                }
            }
        }
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
