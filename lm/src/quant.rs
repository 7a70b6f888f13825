//! Quantized matrices with our own SIMD kernels for the GGUF types the default model uses
//! (Q4_1 weights, Q8_0 embeddings/output), following ggml's arithmetic: activations are
//! quantized per 32-value block (Q8_1 against Q4_1, Q8_0 against Q8_0) and dot products are
//! integer within a block, scaled in f32. candle 0.11 runs Q4_1 with a scalar loop; these
//! kernels use AVX2 or AVX-512 VNNI (detected at run time, scalar fallback elsewhere) and
//! split output rows over candle's CPU pool. On AVX-512 VNNI CPUs the matrices are stored
//! with 16 rows interleaved ([`groups`]), so that one vector instruction serves 16 rows and
//! a batch's extra activation rows cost little more than their products (`AFM_Q4_GROUPS=0`
//! keeps the row layout, to compare).

use crate::error::{LmError, Result};
use crate::isa::Isa;
use candle_core::{Device, Tensor};
use half::f16;
use std::sync::Mutex;

mod groups;

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
}

/// A `(rows, cols)` matrix of ggml blocks, used as `x @ W^T`, repacked for the kernels:
/// the quants of each row contiguous (16 bytes per Q4_1 block, 32 per Q8_0 block) and the
/// block scales (`d`, and `m` for Q4_1; f16 bits as in the file) in arrays of their own, so
/// a decode step streams the same 20 (Q4_1) or 34 (Q8_0) bytes per block as the file holds:
/// decode is bound by memory bandwidth.
#[derive(Debug, Clone)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    qs: Vec<u8>,
    d: Vec<u16>,
    m: Vec<u16>,
    /// Rows `0 .. rows / 16 * 16` are interleaved in groups of 16 ([`groups`]) for the
    /// AVX-512 VNNI and AVX2 kernels; the rows after them keep the row layout. Grouped Q8_0
    /// keeps its row-blocks' weight sums in `m` (read by the AVX-512 kernel only).
    grouped: bool,
}

/// Whether new matrices of `kind` take the grouped layout ([`groups::grouped_at`] the kernel
/// level), unless `AFM_Q4_GROUPS=0` (the row layout, to compare the two).
fn use_groups(kind: QKind) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("AFM_Q4_GROUPS").is_ok_and(|v| v.trim() == "0"));
    !off && groups::grouped_at(kind, crate::isa::level())
}

#[inline(always)]
fn h(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

impl QKind {
    fn qs_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => 16,
            QKind::Q8_0 => 32,
        }
    }
}

/// Quantized activations: rows of Q8 blocks (Q8_1 `s` kept for Q4_1).
struct Act {
    qs: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
    nb: usize,
}

impl Act {
    /// `pairs`: lay each pair of blocks out as the 512-bit Q4_1 kernel reads them,
    /// `[y0[0..16], y1[0..16], y0[16..32], y1[16..32]]`.
    fn new(x: &[f32], m: usize, k: usize, pairs: bool) -> Self {
        let mut a = Self::quantize(x, m, k);
        if pairs {
            let mut tmp = [0u8; 64];
            for p in a.qs.chunks_exact_mut(64) {
                tmp[..16].copy_from_slice(&p[..16]);
                tmp[16..32].copy_from_slice(&p[32..48]);
                tmp[32..48].copy_from_slice(&p[16..32]);
                tmp[48..].copy_from_slice(&p[48..]);
                p.copy_from_slice(&tmp);
            }
        }
        a
    }

    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let nb = k / QK;
        // every byte and scale is overwritten below: a dropped Act of the same size is
        // reused as it is (a fresh one was allocated and zeroed per matmul, ~2% of a
        // four-sequence decode step in glibc's calloc and memset)
        let mut a = match take_spare(m * k) {
            Some((qs, d, s)) => Act { qs, d, s, nb },
            None => Act {
                qs: vec![0; m * k],
                d: vec![0.0; m * nb],
                s: vec![0.0; m * nb],
                nb,
            },
        };
        if m < 8 {
            for (((q, d), s), xr) in
                a.qs.chunks_mut(k)
                    .zip(a.d.chunks_mut(nb))
                    .zip(a.s.chunks_mut(nb))
                    .zip(x.chunks(k))
            {
                quantize_row_q8(xr, q, d, s);
            }
            return a;
        }
        let rows: Vec<Mutex<(&mut [u8], &mut [f32], &mut [f32])>> =
            a.qs.chunks_mut(k)
                .zip(a.d.chunks_mut(nb))
                .zip(a.s.chunks_mut(nb))
                .map(|((q, d), s)| Mutex::new((q, d, s)))
                .collect();
        par_ranges(m, |range| {
            for i in range {
                // each row is locked by exactly one task: never contended
                let mut g = rows[i].lock().unwrap_or_else(|e| e.into_inner());
                let (q, d, s) = &mut *g;
                quantize_row_q8(&x[i * k..(i + 1) * k], q, d, s);
            }
        });
        drop(rows);
        a
    }
}

/// The buffers of a dropped [`Act`]: bytes, scales, sums.
type ActBuffers = (Vec<u8>, Vec<f32>, Vec<f32>);

thread_local! {
    /// Dropped activation buffers, for [`Act::quantize`] and [`groups::flipped`] to reuse
    /// (at most [`ACT_SPARES_MAX`], each of at most [`ACT_SPARE_BYTES`] activation bytes:
    /// decode-sized; a long prompt's buffers are freed).
    static ACT_SPARES: std::cell::RefCell<Vec<ActBuffers>> =
        const { std::cell::RefCell::new(Vec::new()) };
}
const ACT_SPARES_MAX: usize = 4;
const ACT_SPARE_BYTES: usize = 64 * 1024;

/// A spare whose byte buffer is `len` long (its scales and sums then are `len / 32`).
pub(super) fn take_spare(len: usize) -> Option<ActBuffers> {
    ACT_SPARES
        .try_with(|sp| {
            let mut sp = sp.try_borrow_mut().ok()?;
            let i = sp.iter().position(|b| b.0.len() == len)?;
            Some(sp.swap_remove(i))
        })
        .ok()
        .flatten()
}

impl Drop for Act {
    fn drop(&mut self) {
        if self.qs.is_empty() || self.qs.len() > ACT_SPARE_BYTES {
            return;
        }
        let b = (
            std::mem::take(&mut self.qs),
            std::mem::take(&mut self.d),
            std::mem::take(&mut self.s),
        );
        // during thread teardown the spares are gone: the buffers are simply freed
        let _ = ACT_SPARES.try_with(|sp| {
            if let Ok(mut sp) = sp.try_borrow_mut() {
                if sp.len() == ACT_SPARES_MAX {
                    sp.remove(0);
                }
                sp.push(b);
            }
        });
    }
}

use crate::par::par_ranges;
use std::mem::MaybeUninit;

/// ggml's x86 `quantize_row_q8_1` / `q8_0`: per block `d = amax / 127` (stored as f16),
/// `q = round_half_even(x * 127 / amax)`, and `s = d * sum(q)` (stored as f16).
///
/// On AVX2 (chosen at run time) eight values at a time: elementwise IEEE products and the
/// same rounding, an order-free maximum and an integer sum, so the bytes and scales are the
/// definition's (test `quantize_row_is_the_same_at_every_level`); a block holding a NaN or
/// an infinity takes the definition itself. One value at a time (the baseline x86-64
/// target), this was a serial 1.6 ns per value between the parallel products of a 4-row
/// decode step.
fn quantize_row_q8(x: &[f32], qs: &mut [u8], d: &mut [f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::level() >= Isa::Avx2 {
        // SAFETY: the level is at least AVX2, so the CPU has AVX2, FMA and F16C.
        return unsafe { quantize_row_q8_avx2(x, qs, d, s) };
    }
    quantize_row_q8_body(x, qs, d, s)
}

/// [`quantize_row_q8`] on AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_q8_avx2(x: &[f32], qs: &mut [u8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / QK;
    assert!(qs.len() >= nb * QK && d.len() >= nb && s.len() >= nb);
    for b in 0..nb {
        let xb: &[f32; QK] = x[b * QK..(b + 1) * QK].try_into().expect("a whole block");
        let qb = &mut qs[b * QK..(b + 1) * QK];
        // SAFETY: the caller vouches for AVX2.
        let Some((amax, sum, codes)) = (unsafe { crate::kernels::round_block_avx2(xb) }) else {
            // a NaN or an infinity: the definition, for this block
            quantize_row_q8_body(xb, qb, &mut d[b..b + 1], &mut s[b..b + 1]);
            continue;
        };
        qb.copy_from_slice(&codes);
        let db = amax / 127.0;
        // both scales through f16 at once (F16C rounds to nearest even, as f16::from_f32)
        let ds = _mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_setr_ps(
            db,
            db * sum as f32,
            0.0,
            0.0,
        )));
        d[b] = _mm_cvtss_f32(ds);
        s[b] = _mm_cvtss_f32(_mm_movehdup_ps(ds));
    }
}

/// The definition, one value at a time.
fn quantize_row_q8_body(x: &[f32], qs: &mut [u8], d: &mut [f32], s: &mut [f32]) {
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = crate::kernels::inverse_scale(amax);
        let mut sum = 0i32;
        for (j, v) in xb.iter().enumerate() {
            let q = crate::kernels::round_small(v * id) as i32;
            sum += q;
            qs[b * QK + j] = q as i8 as u8;
        }
        d[b] = f16::from_f32(db).to_f32();
        s[b] = f16::from_f32(db * sum as f32).to_f32();
    }
}

impl QMatrix {
    /// Repacks raw ggml block data (as stored in GGUF), checking its size.
    pub fn new(kind: QKind, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(QK) {
            return Err(LmError::Invalid(format!(
                "{kind:?} matrix width {cols} is not a multiple of {QK}"
            )));
        }
        // sizes come from the file: checked, so that huge dims are an error, never a
        // wrapped product that matches a short buffer
        let nblocks = rows
            .checked_mul(cols / QK)
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                LmError::Invalid(format!(
                    "{kind:?} matrix ({rows}, {cols}) is empty or too large"
                ))
            })?;
        let want = nblocks.checked_mul(kind.block_bytes()).ok_or_else(|| {
            LmError::Invalid(format!("{kind:?} matrix ({rows}, {cols}) is too large"))
        })?;
        if data.len() != want {
            return Err(LmError::Invalid(format!(
                "{kind:?} matrix ({rows}, {cols}) needs {want} bytes, got {}",
                data.len()
            )));
        }
        let (qb, bb) = (kind.qs_bytes(), kind.block_bytes());
        let mut qs = vec![0u8; nblocks * qb];
        let mut d = vec![0u16; nblocks];
        let mut m = if kind == QKind::Q4_1 {
            vec![0u16; nblocks]
        } else {
            vec![]
        };
        let bits = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        for (i, blk) in data.chunks_exact(bb).enumerate() {
            d[i] = bits(blk, 0);
            match kind {
                QKind::Q4_1 => {
                    m[i] = bits(blk, 2);
                    qs[i * 16..i * 16 + 16].copy_from_slice(&blk[4..20]);
                }
                QKind::Q8_0 => qs[i * 32..i * 32 + 32].copy_from_slice(&blk[2..34]),
            }
        }
        if let Some(bad) = d.iter().chain(&m).map(|&b| h(b)).find(|v| !v.is_finite()) {
            return Err(LmError::Invalid(format!(
                "{kind:?} block scale {bad} is not finite"
            )));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            qs,
            d,
            m,
            grouped: false,
        }
        .with_groups(use_groups(kind)))
    }

    /// This matrix in the grouped layout (`true`, at least 16 rows) or the row layout; the
    /// values are the same.
    fn with_groups(mut self, on: bool) -> Self {
        let on = on && self.rows >= groups::G;
        if on == self.grouped {
            return self;
        }
        let nb = self.cols / QK;
        let (kind, rows) = (self.kind, self.rows);
        if on {
            if kind == QKind::Q8_0 {
                self.m = groups::q8_sums(&self.qs);
            }
            groups::interleave(kind, &mut self.qs, &mut self.d, &mut self.m, rows, nb);
        } else {
            groups::deinterleave(kind, &mut self.qs, &mut self.d, &mut self.m, rows, nb);
            if kind == QKind::Q8_0 {
                self.m = vec![];
            }
        }
        self.grouped = on;
        self
    }

    /// Rows held in groups (0 in the row layout).
    fn grouped_rows(&self) -> usize {
        if self.grouped {
            self.rows / groups::G * groups::G
        } else {
            0
        }
    }

    /// Row `r`'s block `bi` (index `r * nb + b`) as in the row layout: quants, `d`, `m`.
    fn block(&self, r: usize, b: usize) -> (&[u8], u16, u16) {
        let nb = self.cols / QK;
        let qb = self.kind.qs_bytes();
        let bi = r * nb + b;
        let m = self.m.get(bi).copied().unwrap_or(0);
        (&self.qs[bi * qb..(bi + 1) * qb], self.d[bi], m)
    }

    pub fn kind(&self) -> QKind {
        self.kind
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The bytes a product reads: quants, scales, Q4_1's mins, and grouped Q8_0's weight
    /// sums where the AVX-512 kernel reads them (the AVX2 and portable kernels do not, so
    /// they are not counted there: the bandwidth limit would come out too low).
    pub fn storage_bytes(&self) -> usize {
        let sums_read = self.kind == QKind::Q4_1 || crate::isa::level() == Isa::Avx512;
        self.qs.len() + 2 * (self.d.len() + if sums_read { self.m.len() } else { 0 })
    }

    /// Dequantizes the given rows (embedding lookup).
    ///
    /// # Shapes
    /// `ids.len() = t` -> `(t, cols)`.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        let nb = self.cols / QK;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &id) in out.chunks_mut(self.cols).zip(ids) {
            let id = id as usize;
            if id >= self.rows {
                return Err(LmError::BadTokenId {
                    id: id as u32,
                    vocab: self.rows,
                });
            }
            for b in 0..nb {
                let grouped;
                let (q, d, m) = if id < self.grouped_rows() {
                    let (q, d, m) =
                        groups::block_of(self.kind, &self.qs, &self.d, &self.m, nb, id, b);
                    grouped = q;
                    (&grouped[..], d, m)
                } else {
                    self.block(id, b)
                };
                let o = &mut o[b * QK..(b + 1) * QK];
                match self.kind {
                    QKind::Q4_1 => {
                        let (d, m) = (h(d), h(m));
                        for j in 0..16 {
                            o[j] = (q[j] & 0xF) as f32 * d + m;
                            o[j + 16] = (q[j] >> 4) as f32 * d + m;
                        }
                    }
                    QKind::Q8_0 => {
                        for j in 0..QK {
                            o[j] = q[j] as i8 as f32 * h(d);
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
            return Err(LmError::Invalid(format!(
                "matmul: input width {k}, matrix expects {}",
                self.cols
            )));
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
        let gk = groups::GroupKernels::at(crate::isa::level());
        self.matmul_with(x, m, kernels(self.cols / QK), gk)
    }

    /// `kern` for rows in the row layout, `gk` for grouped rows.
    fn matmul_with(
        &self,
        x: &[f32],
        m: usize,
        kern: Kernels,
        gk: groups::GroupKernels,
    ) -> Vec<f32> {
        // the activation rows are quantized into reused buffers: a short `x` would leave
        // another product's bytes in them
        assert_eq!(x.len(), m * self.cols, "matmul input size");
        let split = self.grouped_rows();
        let fill = |out: &mut [MaybeUninit<f32>]| {
            if split == 0 {
                let act = Act::new(x, m, self.cols, kern.pairs && self.kind == QKind::Q4_1);
                self.rows_matmul(&kern, &act, 0, m, out);
                return;
            }
            // the group kernels read the activations unpaired; so must the tail's
            let act = Act::new(x, m, self.cols, false);
            let (rows, cols) = (self.rows, self.cols);
            let ng = split / groups::G;
            let (kind, qs, d, mm) = (self.kind, &self.qs, &self.d, &self.m);
            if kind == QKind::Q8_0 {
                let fl = groups::flipped(&act);
                groups::matmul(gk, kind, qs, d, mm, ng, rows, cols, &fl, m, out);
            } else {
                groups::matmul(gk, kind, qs, d, mm, ng, rows, cols, &act, m, out);
            }
            if split < self.rows {
                let tail = if kern.pairs {
                    kernels_for(Isa::Avx2Vnni, cols / QK)
                } else {
                    kern
                };
                self.rows_matmul(&tail, &act, split, m, out);
            }
        };
        // SAFETY: `fill` writes every element: the grouped rows `0..split` for every
        // activation row (`groups::matmul`), then the rows `split..` (`rows_matmul`).
        unsafe { crate::par::filled(m * self.rows, fill) }
    }

    /// Rows `from..` (row layout) into `out` (`(m, rows)`).
    /// Every element of those rows is written; `out` need not be initialised.
    fn rows_matmul(
        &self,
        kern: &Kernels,
        act: &Act,
        from: usize,
        m: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        crate::par::row_tiles(from, self.rows, m, out, |r0, nr, o| {
            self.tile(kern, act, r0, nr, m, o)
        });
    }

    /// Rows `r0..r0+nr` against all `m` activation rows into `o` (`(nr, m)`).
    fn tile(&self, k: &Kernels, act: &Act, r0: usize, nr: usize, m: usize, o: &mut [f32]) {
        let view = |r: usize| self.row(r);
        let four = |r: usize| {
            [
                view(r0 + r),
                view(r0 + r + 1),
                view(r0 + r + 2),
                view(r0 + r + 3),
            ]
        };
        let arow = |i: usize| ARow {
            qs: &act.qs[i * self.cols..(i + 1) * self.cols],
            d: &act.d[i * act.nb..(i + 1) * act.nb],
            s: &act.s[i * act.nb..(i + 1) * act.nb],
        };
        let mut r = 0;
        if m == 1 {
            let a = [arow(0)];
            while r + 4 <= nr {
                let w = four(r);
                let res = (k.k41)(self.kind, &w, &a);
                for j in 0..4 {
                    o[r + j] = res[j][0];
                }
                r += 4;
            }
            while r < nr {
                o[r] = (k.k11)(self.kind, &[view(r0 + r)], &a)[0][0];
                r += 1;
            }
            return;
        }
        // 4 weight rows x 4 activation rows: each weight block is unpacked once for four
        // activation rows and each activation block loaded once for four weight rows
        while r + 4 <= nr {
            let w = four(r);
            let mut i = 0;
            while i + 4 <= m {
                let a = [arow(i), arow(i + 1), arow(i + 2), arow(i + 3)];
                let res = (k.k44)(self.kind, &w, &a);
                for (j, row) in res.iter().enumerate() {
                    o[(r + j) * m + i..(r + j) * m + i + 4].copy_from_slice(row);
                }
                i += 4;
            }
            while i < m {
                let res = (k.k41)(self.kind, &w, &[arow(i)]);
                for (j, v) in res.iter().enumerate() {
                    o[(r + j) * m + i] = v[0];
                }
                i += 1;
            }
            r += 4;
        }
        while r < nr {
            let w = [view(r0 + r)];
            let mut i = 0;
            while i + 4 <= m {
                let a = [arow(i), arow(i + 1), arow(i + 2), arow(i + 3)];
                let res = (k.k14)(self.kind, &w, &a);
                o[r * m + i..r * m + i + 4].copy_from_slice(&res[0]);
                i += 4;
            }
            while i < m {
                o[r * m + i] = (k.k11)(self.kind, &w, &[arow(i)])[0][0];
                i += 1;
            }
            r += 1;
        }
    }

    fn row(&self, r: usize) -> WRow<'_> {
        debug_assert!(r >= self.grouped_rows(), "row {r} is in a group");
        let nb = self.cols / QK;
        let qb = self.kind.qs_bytes();
        WRow {
            qs: &self.qs[r * nb * qb..(r + 1) * nb * qb],
            d: &self.d[r * nb..(r + 1) * nb],
            m: if self.m.is_empty() {
                &[]
            } else {
                &self.m[r * nb..(r + 1) * nb]
            },
        }
    }
}

/// One weight row: quants, scales, mins (Q4_1).
#[derive(Clone, Copy)]
pub struct WRow<'a> {
    qs: &'a [u8],
    d: &'a [u16],
    m: &'a [u16],
}

/// One activation row: Q8 quants, scales, and Q8_1 sums.
#[derive(Clone, Copy)]
pub struct ARow<'a> {
    qs: &'a [u8],
    d: &'a [f32],
    s: &'a [f32],
}

type K11 = fn(QKind, &[WRow; 1], &[ARow; 1]) -> [[f32; 1]; 1];
type K41 = fn(QKind, &[WRow; 4], &[ARow; 1]) -> [[f32; 1]; 4];
type K14 = fn(QKind, &[WRow; 1], &[ARow; 4]) -> [[f32; 4]; 1];
type K44 = fn(QKind, &[WRow; 4], &[ARow; 4]) -> [[f32; 4]; 4];

/// A 4x4 tile as two 2x4 tiles: the 256-bit kernels have 16 registers (AVX2 without
/// AVX-512), too few for 16 accumulators; each product is summed exactly as by `kernel`.
#[cfg(target_arch = "x86_64")]
fn two_2x4<const V: u8>(kind: QKind, w: &[WRow; 4], a: &[ARow; 4]) -> [[f32; 4]; 4] {
    let t = simd::kernel::<2, 4, V>(kind, &[w[0], w[1]], a);
    let u = simd::kernel::<2, 4, V>(kind, &[w[2], w[3]], a);
    [t[0], t[1], u[0], u[1]]
}

/// The micro-kernels chosen for this CPU: `kRC` multiplies R weight rows by C activation rows.
#[derive(Clone, Copy)]
struct Kernels {
    k11: K11,
    k41: K41,
    k14: K14,
    k44: K44,
    /// The kernels read activations in the paired 512-bit layout.
    pairs: bool,
}

/// The fastest kernels this CPU runs for rows of `nb` blocks, at most at level
/// [`crate::isa::level`].
fn kernels(nb: usize) -> Kernels {
    kernels_for(crate::isa::level(), nb)
}

/// The kernels of level `isa` (capped to what the CPU runs): AVX-512 VNNI two blocks at a
/// time (even `nb`; odd `nb` falls to the 256-bit VNNI kernels), 256-bit `vpdpbusd`
/// (AVX-VNNI, else AVX-512 VNNI + VL), AVX2 `vpmaddubsw`, or the portable loop.
fn kernels_for(isa: Isa, nb: usize) -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = isa.min(crate::isa::detected());
        if isa == Isa::Avx512 && nb.is_multiple_of(2) {
            return Kernels {
                k11: simd::kernel512::<1, 1>,
                k41: simd::kernel512::<4, 1>,
                k14: simd::kernel512::<1, 4>,
                k44: simd::kernel512::<4, 4>,
                pairs: true,
            };
        }
        macro_rules! k256 {
            ($v:expr) => {
                Kernels {
                    k11: simd::kernel::<1, 1, { $v }>,
                    k41: simd::kernel::<4, 1, { $v }>,
                    k14: simd::kernel::<1, 4, { $v }>,
                    k44: two_2x4::<{ $v }>,
                    pairs: false,
                }
            };
        }
        if isa >= Isa::Avx2Vnni {
            return if crate::isa::has_avx_vnni() {
                k256!(simd::AVX_VNNI)
            } else {
                k256!(simd::EVEX_VNNI)
            };
        }
        if isa == Isa::Avx2 {
            return k256!(simd::MADD);
        }
    }
    let _ = (isa, nb);
    scalar_kernels()
}

fn scalar_kernels() -> Kernels {
    Kernels {
        k11: scalar_kernel::<1, 1>,
        k41: scalar_kernel::<4, 1>,
        k14: scalar_kernel::<1, 4>,
        k44: scalar_kernel::<4, 4>,
        pairs: false,
    }
}

/// Reference arithmetic, also the fallback on CPUs without AVX2, in the order of the 256-bit
/// kernels, so that the two agree bit for bit: per block, eight lanes of four products each
/// (byte `k` of the unpacked 32 quants in lane `k / 4`), each lane's i32 sum scaled by
/// `d_w * d_x` and added with one rounding (`mul_add`, as `vfmadd`); at the end the lanes
/// summed as `hsum` does, then (Q4_1) the `sum_b m[b] * s[b]` term.
fn scalar_kernel<const R: usize, const C: usize>(
    kind: QKind,
    w: &[WRow; R],
    a: &[ARow; C],
) -> [[f32; C]; R] {
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let nb = w[r].d.len();
            let mut lanes = [0f32; 8];
            for b in 0..nb {
                let mut p = [0i32; 8];
                let y = &a[c].qs[b * 32..b * 32 + 32];
                match kind {
                    QKind::Q4_1 => {
                        let q = &w[r].qs[b * 16..b * 16 + 16];
                        for k in 0..32 {
                            let x = if k < 16 { q[k] & 0xF } else { q[k - 16] >> 4 };
                            p[k / 4] += x as i32 * y[k] as i8 as i32;
                        }
                    }
                    QKind::Q8_0 => {
                        let q = &w[r].qs[b * 32..b * 32 + 32];
                        for k in 0..32 {
                            p[k / 4] += q[k] as i8 as i32 * y[k] as i8 as i32;
                        }
                    }
                }
                let sc = h(w[r].d[b]) * a[c].d[b];
                for (l, pl) in lanes.iter_mut().zip(p) {
                    *l = sc.mul_add(pl as f32, *l);
                }
            }
            let h4 = [
                lanes[0] + lanes[4],
                lanes[1] + lanes[5],
                lanes[2] + lanes[6],
                lanes[3] + lanes[7],
            ];
            let mut acc = (h4[0] + h4[2]) + (h4[1] + h4[3]);
            if kind == QKind::Q4_1 {
                let mut mt = 0f32;
                for b in 0..nb {
                    mt += h(w[r].m[b]) * a[c].s[b];
                }
                acc += mt;
            }
            out[r][c] = acc;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{ARow, QKind, WRow};
    use std::arch::x86_64::*;

    /// 256-bit kernel variants: `vpmaddubsw` + `vpmaddwd` (AVX2), `vpdpbusd` in its VEX
    /// (AVX-VNNI) or EVEX (AVX-512 VNNI + VL) encoding.
    pub const MADD: u8 = 0;
    pub const AVX_VNNI: u8 = 1;
    pub const EVEX_VNNI: u8 = 2;

    /// Two blocks per 512-bit step; activations in the paired layout (see `Act::new`).
    pub fn kernel512<const R: usize, const C: usize>(
        kind: QKind,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        let nb = w[0].d.len();
        let qb = if kind == QKind::Q4_1 { 16 } else { 32 };
        assert!(nb.is_multiple_of(2));
        for r in w {
            assert!(
                r.d.len() == nb
                    && r.qs.len() == nb * qb
                    && (kind == QKind::Q8_0 || r.m.len() == nb)
            );
        }
        for c in a {
            assert!(c.d.len() == nb && c.s.len() == nb && c.qs.len() == nb * 32);
        }
        // SAFETY: `kernels_for` picks these kernels only when the CPU has AVX-512 F/BW/VL/VNNI
        // (with AVX2, FMA, F16C: `Isa::Avx512`); the asserts
        // keep every load inside the slices (pairs of blocks, nb even).
        unsafe {
            match kind {
                QKind::Q4_1 => q4_1_512::<R, C>(nb, w, a),
                QKind::Q8_0 => q8_0_512::<R, C>(nb, w, a),
            }
        }
    }

    /// How far ahead of the current block the weight quants are prefetched (bytes); a
    /// prefetch past the end of a row only touches the next row (or nothing: no fault).
    const PREFETCH: usize = 1024;

    /// Two f32 (unaligned) broadcast as `[a x g, b x g, ...]` by `idx`.
    #[inline(always)]
    unsafe fn pair(p: *const f32, idx: __m512i) -> __m512 {
        let v = _mm_castsi128_ps(_mm_loadl_epi64(p as *const __m128i));
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
    }

    /// Two f16 (unaligned) widened and broadcast like `pair`.
    #[inline(always)]
    unsafe fn pair16(p: *const u16, idx: __m512i) -> __m512 {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn q4_1_512<const R: usize, const C: usize>(
        nb: usize,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        let idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut b = 0;
        while b < nb {
            let mut qx = [_mm512_setzero_si512(); R];
            let mut dx = [_mm512_setzero_ps(); R];
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(
                    w[r].qs.as_ptr().wrapping_add(b * 16 + PREFETCH) as *const i8
                );
                let v = _mm256_loadu_si256(w[r].qs.as_ptr().add(b * 16) as *const __m256i);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                qx[r] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                dx[r] = pair16(w[r].d.as_ptr().add(b), idx);
            }
            for c in 0..C {
                let qy = _mm512_loadu_si512(a[c].qs.as_ptr().add(b * 32) as *const _);
                let dy = pair(a[c].d.as_ptr().add(b), idx);
                for r in 0..R {
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qx[r], qy);
                    acc[r][c] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dx[r], dy), acc[r][c]);
                }
            }
            b += 2;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]) + min_term_512(w[r].m, a[c].s);
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn q8_0_512<const R: usize, const C: usize>(
        nb: usize,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut b = 0;
        while b < nb {
            let mut ax = [zero; R];
            let mut neg = [0u64; R];
            let mut dx = [_mm512_setzero_ps(); R];
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(
                    w[r].qs.as_ptr().wrapping_add(b * 32 + PREFETCH) as *const i8
                );
                let v = _mm512_loadu_si512(w[r].qs.as_ptr().add(b * 32) as *const _);
                ax[r] = _mm512_abs_epi8(v);
                neg[r] = _mm512_movepi8_mask(v);
                dx[r] = pair16(w[r].d.as_ptr().add(b), idx);
            }
            for c in 0..C {
                let qy = _mm512_loadu_si512(a[c].qs.as_ptr().add(b * 32) as *const _);
                let dy = pair(a[c].d.as_ptr().add(b), idx);
                for r in 0..R {
                    // |x| * (y with the sign of x); activations never hold -128
                    let sy = _mm512_mask_sub_epi8(qy, neg[r], zero, qy);
                    let p = _mm512_dpbusd_epi32(zero, ax[r], sy);
                    acc[r][c] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dx[r], dy), acc[r][c]);
                }
            }
            b += 2;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
        out
    }

    pub fn kernel<const R: usize, const C: usize, const V: u8>(
        kind: QKind,
        w: &[WRow; R],
        a: &[ARow; C],
    ) -> [[f32; C]; R] {
        let nb = w[0].d.len();
        let qb = if kind == QKind::Q4_1 { 16 } else { 32 };
        for r in w {
            assert!(
                r.d.len() == nb
                    && r.qs.len() == nb * qb
                    && (kind == QKind::Q8_0 || r.m.len() == nb)
            );
        }
        for c in a {
            assert!(c.d.len() == nb && c.s.len() == nb && c.qs.len() == nb * 32);
        }
        // SAFETY: `kernels_for` picks variant V only when the CPU has its features (AVX2,
        // FMA, F16C for all; AVX-VNNI for AVX_VNNI; AVX-512 VNNI + VL for EVEX_VNNI, see
        // `Isa`); the asserts above keep every pointer offset below inside the slices.
        unsafe {
            match (kind, V) {
                (QKind::Q4_1, AVX_VNNI) => q4_1_avxvnni::<R, C>(nb, w, a),
                (QKind::Q4_1, EVEX_VNNI) => q4_1_vnni::<R, C>(nb, w, a),
                (QKind::Q4_1, _) => q4_1_avx2::<R, C>(nb, w, a),
                (QKind::Q8_0, AVX_VNNI) => q8_0_avxvnni::<R, C>(nb, w, a),
                (QKind::Q8_0, EVEX_VNNI) => q8_0_vnni::<R, C>(nb, w, a),
                (QKind::Q8_0, _) => q8_0_avx2::<R, C>(nb, w, a),
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 nibbles of a Q4_1 block as 32 unsigned bytes (low nibbles = values 0..16).
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> __m256i {
        let packed = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(packed, 4), mask),
            _mm_and_si128(packed, mask),
        )
    }

    /// sum of mins * sums for Q4_1: `sum_b m[b] * s[b]`.
    #[inline(always)]
    unsafe fn min_term(m: &[u16], s: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (x, y) in m.iter().zip(s) {
            acc += hx(*x) * y;
        }
        acc
    }

    /// f16 bits to f32 with the F16C instruction.
    #[inline(always)]
    unsafe fn hx(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// `sum m[b] * s[b]` sixteen at a time.
    #[inline(always)]
    unsafe fn min_term_512(m: &[u16], s: &[f32]) -> f32 {
        let n = m.len().min(s.len());
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 16 <= n {
            let mv = _mm512_cvtph_ps(_mm256_loadu_si256(m.as_ptr().add(b) as *const __m256i));
            acc = _mm512_fmadd_ps(mv, _mm512_loadu_ps(s.as_ptr().add(b)), acc);
            b += 16;
        }
        let mut r = _mm512_reduce_add_ps(acc);
        while b < n {
            r += hx(m[b]) * s[b];
            b += 1;
        }
        r
    }

    macro_rules! q_kernel {
        ($name:ident, $feat:literal, $q4:expr, $dot:ident) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const R: usize, const C: usize>(
                nb: usize,
                w: &[WRow; R],
                a: &[ARow; C],
            ) -> [[f32; C]; R] {
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                let qb = if $q4 { 16 } else { 32 };
                // the same block of the rows two tiles on (rows are `nb * qb` bytes apart in
                // a matrix), so that the stream of rows does not wait on memory: the loads
                // of the weights were nearly all of a decode step's time in the AVX2 head
                let ahead = 2 * R * nb * qb;
                for b in 0..nb {
                    if b % (64 / qb) == 0 {
                        for r in 0..R {
                            let p = w[r].qs.as_ptr().wrapping_add(b * qb + ahead);
                            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                        }
                    }
                    let mut qx = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let p = w[r].qs.as_ptr().add(b * qb);
                        qx[r] = if $q4 {
                            unpack(p)
                        } else {
                            _mm256_loadu_si256(p as *const __m256i)
                        };
                    }
                    for c in 0..C {
                        let qy = _mm256_loadu_si256(a[c].qs.as_ptr().add(b * 32) as *const __m256i);
                        let dy = *a[c].d.get_unchecked(b);
                        for r in 0..R {
                            let p = $dot(qx[r], qy);
                            let sc = _mm256_set1_ps(hx(*w[r].d.get_unchecked(b)) * dy);
                            acc[r][c] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[r][c]);
                        }
                    }
                }
                let mut out = [[0f32; C]; R];
                for r in 0..R {
                    for c in 0..C {
                        out[r][c] =
                            hsum(acc[r][c]) + if $q4 { min_term(w[r].m, a[c].s) } else { 0.0 };
                    }
                }
                out
            }
        };
    }

    /// unsigned x signed bytes, 4-way sums into i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8i8_avx2(x: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    }
    #[inline(always)]
    unsafe fn dot_u8i8_vnni(x: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y)
    }
    #[inline(always)]
    unsafe fn dot_u8i8_avxvnni(x: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, y)
    }
    #[inline(always)]
    unsafe fn dot_i8i8_avxvnni(x: __m256i, y: __m256i) -> __m256i {
        dot_u8i8_avxvnni(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }
    /// signed x signed bytes: |x| * sign(y, x).
    #[inline(always)]
    unsafe fn dot_i8i8_avx2(x: __m256i, y: __m256i) -> __m256i {
        dot_u8i8_avx2(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }
    #[inline(always)]
    unsafe fn dot_i8i8_vnni(x: __m256i, y: __m256i) -> __m256i {
        dot_u8i8_vnni(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    q_kernel!(q4_1_avx2, "avx2,fma,f16c", true, dot_u8i8_avx2);
    q_kernel!(
        q4_1_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        true,
        dot_u8i8_vnni
    );
    q_kernel!(
        q4_1_avxvnni,
        "avx2,fma,f16c,avxvnni",
        true,
        dot_u8i8_avxvnni
    );
    q_kernel!(q8_0_avx2, "avx2,fma,f16c", false, dot_i8i8_avx2);
    q_kernel!(
        q8_0_avxvnni,
        "avx2,fma,f16c,avxvnni",
        false,
        dot_i8i8_avxvnni
    );
    q_kernel!(
        q8_0_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        false,
        dot_i8i8_vnni
    );
}

impl QMatrix {
    /// Stacks matrices of the same format and width along the rows; `None` if they differ.
    pub fn concat_rows(ms: &[&QMatrix]) -> Option<QMatrix> {
        let first = ms.first()?;
        if ms
            .iter()
            .any(|m| m.kind != first.kind || m.cols != first.cols)
        {
            return None;
        }
        // in the row layout, then grouped again if any part was (a part may be too small)
        let rows: Vec<QMatrix> = ms.iter().map(|m| (*m).clone().with_groups(false)).collect();
        let cat = |f: fn(&QMatrix) -> &[u8]| {
            rows.iter()
                .flat_map(|m| f(m).iter().copied())
                .collect::<Vec<_>>()
        };
        let catf = |f: fn(&QMatrix) -> &[u16]| {
            rows.iter()
                .flat_map(|m| f(m).iter().copied())
                .collect::<Vec<_>>()
        };
        Some(
            QMatrix {
                kind: first.kind,
                rows: ms.iter().map(|m| m.rows).sum(),
                cols: first.cols,
                qs: cat(|m| &m.qs),
                d: catf(|m| &m.d),
                m: catf(|m| &m.m),
                grouped: false,
            }
            .with_groups(ms.iter().any(|m| m.grouped)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0
                    - 0.5)
                    * 2.0
            })
            .collect()
    }

    /// The activation quantizer on AVX2 computes the same bytes and scales as the definition
    /// (one value at a time), zeros, ties, tiny values (down to blocks whose `127 / amax`
    /// overflows), NaNs and infinities included.
    #[test]
    fn quantize_row_is_the_same_at_every_level() {
        let mut x = data(32 * 40, 7);
        for (i, v) in x.iter_mut().enumerate() {
            match i % 97 {
                0 => *v = 0.0,
                1 => *v *= 1e-30,
                2 => *v = 0.5,
                3 => *v *= 1e6,
                _ => {}
            }
        }
        x[32..64].fill(0.0);
        x[100] = f32::NAN;
        x[130] = f32::INFINITY;
        x[170] = f32::NEG_INFINITY;
        x[200] = f32::NAN;
        x[201] = 3.0;
        // a block so small that 127 / amax overflows
        x[224..256]
            .iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = (j as f32 - 15.5) * 1e-39);
        x[64..96]
            .iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = j as f32 - 16.0);
        let nb = x.len() / QK;
        let (mut q1, mut d1, mut s1) = (vec![0u8; x.len()], vec![0f32; nb], vec![0f32; nb]);
        quantize_row_q8(&x, &mut q1, &mut d1, &mut s1);
        // the definition, one value at a time
        let (mut q0, mut d0, mut s0) = (vec![0u8; x.len()], vec![0f32; nb], vec![0f32; nb]);
        quantize_row_q8_body(&x, &mut q0, &mut d0, &mut s0);
        assert_eq!(q1, q0);
        assert_eq!(
            d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            d0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    /// Our kernels (every tile shape, SIMD and scalar) against candle's own implementation of
    /// the same formats, for row counts and batch sizes that exercise the tails.
    #[test]
    fn matmul_matches_candle_on_the_same_blocks() {
        for (cols, rows, m) in [
            (96, 70, 1),
            (96, 70, 5),
            (128, 70, 1),
            (128, 70, 5),
            (128, 9, 4),
            (64, 1, 3),
            (192, 130, 9),
            (32, 7, 6),
            (160, 13, 11),
            (544, 41, 2),
            (64, 8, 8),
            (128, 17, 13),
        ] {
            let w = Tensor::from_vec(data(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
            let x = Tensor::from_vec(data(m * cols, 7), (m, cols), &Device::Cpu).unwrap();
            for (dt, kind) in [
                (GgmlDType::Q4_1, QKind::Q4_1),
                (GgmlDType::Q8_0, QKind::Q8_0),
            ] {
                let q = QTensor::quantize(&w, dt).unwrap();
                let ours = QMatrix::new(kind, rows, cols, q.data().unwrap().to_vec()).unwrap();
                let want = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
                let want = candle_core::Module::forward(&want, &x).unwrap();
                let got = ours.forward(&x).unwrap();
                let d: f32 = (&got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(d < 5e-3, "{kind:?} rows {rows} m {m}: {d}");
                // every kernel family this CPU has agrees with the scalar reference
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let ours = ours.with_groups(false);
                let pg = groups::GroupKernels::portable();
                let sc = ours.matmul_with(&xs, m, scalar_kernels(), pg);
                let mut families: Vec<(String, Kernels)> = Isa::supported()
                    .map(|i| (format!("{i:?}"), kernels_for(i, cols / QK)))
                    .collect();
                // both encodings of the 256-bit vpdpbusd where the CPU has them
                #[cfg(target_arch = "x86_64")]
                if crate::isa::detected() == Isa::Avx512 {
                    families.push((
                        "EVEX 256".into(),
                        Kernels {
                            k11: simd::kernel::<1, 1, { simd::EVEX_VNNI }>,
                            k41: simd::kernel::<4, 1, { simd::EVEX_VNNI }>,
                            k14: simd::kernel::<1, 4, { simd::EVEX_VNNI }>,
                            k44: two_2x4::<{ simd::EVEX_VNNI }>,
                            pairs: false,
                        },
                    ));
                }
                for (name, k) in families {
                    let got = ours.matmul_with(&xs, m, k, pg);
                    for (g, s) in got.iter().zip(&sc) {
                        // the 256-bit kernels sum in the portable order: bit for bit
                        let tol = if k.pairs { 1e-4 * (1.0 + s.abs()) } else { 0.0 };
                        assert!(
                            (g - s).abs() <= tol,
                            "{kind:?} {name} rows {rows} m {m}: {g} vs scalar {s}"
                        );
                    }
                }
                // embedding rows equal candle's dequantization
                let deq = QTensor::quantize(&w, dt)
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap();
                let pick = [0u32, rows as u32 - 1];
                let r = ours.rows_f32(&pick).unwrap();
                let want_rows = deq
                    .index_select(&Tensor::new(&pick, &Device::Cpu).unwrap(), 0)
                    .unwrap();
                let d: f32 = (&r - &want_rows)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(d < 1e-6, "{kind:?} rows: {d}");
            }
        }
    }

    fn qmat(kind: QKind, rows: usize, cols: usize, seed: u32) -> QMatrix {
        let w = Tensor::from_vec(data(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let dt = match kind {
            QKind::Q4_1 => GgmlDType::Q4_1,
            QKind::Q8_0 => GgmlDType::Q8_0,
        };
        let q = QTensor::quantize(&w, dt).unwrap();
        QMatrix::new(kind, rows, cols, q.data().unwrap().to_vec()).unwrap()
    }

    fn q4_1(rows: usize, cols: usize, seed: u32) -> QMatrix {
        qmat(QKind::Q4_1, rows, cols, seed)
    }

    /// The grouped layout holds the same matrix: its kernels (portable and, where the CPU
    /// has it, AVX-512 VNNI, bit for bit the same) give the row layout's scalar results to
    /// rounding, the tail rows past the last group included; rows read back exactly; the
    /// permutation round-trips.
    #[test]
    fn grouped_layout_equals_the_row_layout() {
        for (kind, (rows, cols, m)) in [QKind::Q4_1, QKind::Q8_0].into_iter().flat_map(|k| {
            [
                (16, 32, 1),
                // one row over many blocks: the decode kernels
                (48, 576, 1),
                (16, 64, 5),
                (17, 96, 3),
                (33, 128, 4),
                (48, 64, 9),
                (70, 160, 2),
                (64, 576, 8),
            ]
            .map(|s| (k, s))
        }) {
            let plain = qmat(kind, rows, cols, 3).with_groups(false);
            let grouped = plain.clone().with_groups(true);
            assert!(grouped.grouped && grouped.grouped_rows() == rows / 16 * 16);
            assert_ne!(
                plain.qs, grouped.qs,
                "rows {rows}: the permutation moved nothing"
            );
            let back = grouped.clone().with_groups(false);
            assert!(back.qs == plain.qs && back.d == plain.d && back.m == plain.m);
            let rows_b = plain.storage_bytes()
                + if kind == QKind::Q8_0 && crate::isa::level() == Isa::Avx512 {
                    2 * plain.d.len()
                } else {
                    0
                };
            assert_eq!(
                grouped.storage_bytes(),
                rows_b,
                "{kind:?}: the weight sums are counted"
            );
            let ids: Vec<u32> = (0..rows as u32).collect();
            let (a, b) = (
                plain.rows_f32(&ids).unwrap(),
                grouped.rows_f32(&ids).unwrap(),
            );
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            let xs = data(m * cols, 11);
            let pg = groups::GroupKernels::portable();
            let want = plain.matmul_with(&xs, m, scalar_kernels(), pg);
            let port = grouped.matmul_with(&xs, m, scalar_kernels(), pg);
            for (g, w) in port.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{kind:?} rows {rows} m {m}: grouped {g} vs rows {w}"
                );
            }
            let simd = [
                groups::GroupKernels::avx512(),
                groups::GroupKernels::avx2(),
                groups::GroupKernels::avx2_vnni(),
            ];
            for fast in simd.into_iter().flatten() {
                for k in [scalar_kernels(), kernels(cols / QK)] {
                    let got = grouped.matmul_with(&xs, m, k, fast);
                    let tail = grouped.grouped_rows();
                    for (i, (g, p)) in got.iter().zip(&port).enumerate() {
                        // group rows bit for bit; tail rows by the row kernels' own order
                        if i % rows < tail {
                            assert_eq!(g.to_bits(), p.to_bits(), "{kind:?} {rows} {m} at {i}");
                        } else {
                            assert!((g - p).abs() <= 1e-4 * (1.0 + p.abs()));
                        }
                    }
                }
                assert_eq!(grouped.matmul(&xs, m).len(), m * rows);
            }
        }
    }

    /// A Q8_0 weight of -128 (no quantizer writes it, a file may hold it) against
    /// activations at +-127: every group kernel gives the portable definition's numbers bit
    /// for bit (AVX2's sign trick takes `|-128|` as the unsigned byte 128, without
    /// saturating), and those equal the exact sum.
    #[test]
    fn q8_0_extremes_give_exact_products_in_every_group_kernel() {
        let (rows, cols) = (32usize, 64usize);
        let nb = cols / QK;
        let mut data = Vec::with_capacity(rows * nb * 34);
        for r in 0..rows {
            for b in 0..nb {
                data.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
                data.extend((0..32).map(|k| match (r + b + k) % 4 {
                    0 | 1 => 0x80u8, // -128
                    2 => 127,
                    _ => (k as u8).wrapping_mul(37),
                }));
            }
        }
        let w = QMatrix::new(QKind::Q8_0, rows, cols, data)
            .unwrap()
            .with_groups(true);
        // +-1 quantize to +-127 exactly (the row's largest magnitude); one row (the
        // decode kernels) and three
        for m in [1, 3] {
            let xs: Vec<f32> = (0..m * cols)
                .map(|i| if (i / 3) % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let port = w.matmul_with(&xs, m, scalar_kernels(), groups::GroupKernels::portable());
            let plain = w.clone().with_groups(false);
            let exact =
                plain.matmul_with(&xs, m, scalar_kernels(), groups::GroupKernels::portable());
            for (g, e) in port.iter().zip(&exact) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
            }
            let simd = [
                groups::GroupKernels::avx512(),
                groups::GroupKernels::avx2(),
                groups::GroupKernels::avx2_vnni(),
            ];
            for fast in simd.into_iter().flatten() {
                let got = w.matmul_with(&xs, m, scalar_kernels(), fast);
                for (i, (g, p)) in got.iter().zip(&port).enumerate() {
                    assert_eq!(g.to_bits(), p.to_bits(), "m {m} at {i}: {g} vs {p}");
                }
            }
        }
    }

    #[test]
    fn concat_rows_of_grouped_matrices_equals_separate_matmuls() {
        let (a, b) = (
            q4_1(24, 64, 1).with_groups(true),
            q4_1(16, 64, 2).with_groups(true),
        );
        let x = data(3 * 64, 9);
        let ab = QMatrix::concat_rows(&[&a, &b]).unwrap();
        assert!(ab.grouped && ab.grouped_rows() == 32);
        let ab = ab.matmul(&x, 3);
        let (ya, yb) = (
            a.with_groups(false).matmul(&x, 3),
            b.with_groups(false).matmul(&x, 3),
        );
        for i in 0..3 {
            for (g, w) in ab[i * 40..i * 40 + 24].iter().zip(&ya[i * 24..i * 24 + 24]) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()));
            }
            for (g, w) in ab[i * 40 + 24..i * 40 + 40]
                .iter()
                .zip(&yb[i * 16..i * 16 + 16])
            {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()));
            }
        }
    }

    #[test]
    fn concat_rows_equals_separate_matmuls() {
        let cols = 64;
        let mk = |rows, seed| {
            let w = Tensor::from_vec(data(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
            QMatrix::new(
                QKind::Q4_1,
                rows,
                cols,
                QTensor::quantize(&w, GgmlDType::Q4_1)
                    .unwrap()
                    .data()
                    .unwrap()
                    .to_vec(),
            )
            .unwrap()
        };
        let (a, b) = (mk(8, 1), mk(5, 2));
        let x = data(3 * cols, 9);
        let ab = QMatrix::concat_rows(&[&a, &b]).unwrap().matmul(&x, 3);
        let (ya, yb) = (a.matmul(&x, 3), b.matmul(&x, 3));
        for i in 0..3 {
            assert_eq!(&ab[i * 13..i * 13 + 8], &ya[i * 8..i * 8 + 8]);
            assert_eq!(&ab[i * 13 + 8..i * 13 + 13], &yb[i * 5..i * 5 + 5]);
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(QMatrix::new(QKind::Q4_1, 2, 33, vec![]).is_err());
        assert!(QMatrix::new(QKind::Q4_1, 2, 32, vec![0; 39]).is_err());
        let m = QMatrix::new(QKind::Q8_0, 2, 32, vec![0; 68]).unwrap();
        assert!(m.rows_f32(&[2]).is_err());
        assert!(m
            .forward(&Tensor::zeros((1, 31), candle_core::DType::F32, &Device::Cpu).unwrap())
            .is_err());
        let mut nan = vec![0u8; 34];
        nan[0..2].copy_from_slice(&half::f16::NAN.to_bits().to_le_bytes());
        assert!(QMatrix::new(QKind::Q8_0, 1, 32, nan).is_err());
    }

    /// Activation buffers are reused across matmuls (`Act::quantize`) and outputs are not
    /// zeroed first (`par::filled`): products stay bit for bit those of a first call, when
    /// a buffer of the same length but another shape (2 x 1152 after 4 x 576) was used in
    /// between, for every kind, at every row count that leaves a tail in the row layout.
    #[test]
    fn reused_buffers_give_the_same_products() {
        for kind in [QKind::Q4_1, QKind::Q8_0] {
            for rows in [48, 37] {
                let (a, b) = (qmat(kind, rows, 576, 5), qmat(kind, rows, 1152, 6));
                let (xa, xb) = (data(4 * 576, 8), data(2 * 1152, 9));
                let first = a.matmul(&xa, 4);
                let other = b.matmul(&xb, 2);
                assert_eq!(a.matmul(&xa, 4), first, "{kind:?} rows {rows}");
                assert_eq!(b.matmul(&xb, 2), other, "{kind:?} rows {rows}");
                assert!(first.iter().chain(&other).all(|v| v.is_finite()));
            }
        }
    }
}
