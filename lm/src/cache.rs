//! Per-request K/V cache. Models hold weights only; every request owns one `Cache`, so one
//! loaded model can serve many threads.

use crate::error::{LmError, Result};
use candle_core::{Device, Tensor};
use half::slice::HalfFloatSliceExt;

/// Keys and values of one attention layer: in f32, in f16 ([`LayerKv::new_f16`]: half the
/// bytes, as llama.cpp keeps its cache), or in int8 ([`LayerKv::new_int8`]) with one key
/// scale and one value scale for the layer ([`crate::kv8`]).
///
/// # Shapes
/// `k`, `v`: `(len, kv_heads, head_dim)` row-major, one row appended per position.
#[derive(Debug, Clone)]
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    /// The f16 store (`f16` set); `k`, `v` then stay empty.
    k16: Vec<half::f16>,
    v16: Vec<half::f16>,
    f16: bool,
    /// The int8 store: codes and the (key, value) scales; `k`, `v` then stay empty.
    k8: Vec<i8>,
    v8: Vec<i8>,
    scales: Option<(f32, f32)>,
    width: usize,
    len: usize,
    max_len: usize,
    /// Absolute position of the first stored row (> 0 once `drop_before` trimmed a
    /// sliding-window layer; always 0 for the dense model).
    first: usize,
}

impl LayerKv {
    /// `width = kv_heads * head_dim`.
    pub fn new(width: usize, max_len: usize) -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            k16: Vec::new(),
            v16: Vec::new(),
            f16: false,
            k8: Vec::new(),
            v8: Vec::new(),
            scales: None,
            width,
            len: 0,
            max_len,
            first: 0,
        }
    }

    /// An int8 layer: keys stored as `clip(round(k / k_scale), -128, 127)`, values likewise
    /// (the paper's 8-bit KV cache; one byte per value instead of four).
    pub fn new_int8(width: usize, max_len: usize, k_scale: f32, v_scale: f32) -> Self {
        Self {
            scales: Some((k_scale, v_scale)),
            ..Self::new(width, max_len)
        }
    }

    /// An f16 layer: every key and value rounded to the nearest f16 as it is appended. A
    /// finite value beyond f16's range (one that would round to infinity, |x| >= 65520) is
    /// an error, never an infinity; the engine of `afm serve` then fails that request alone.
    pub fn new_f16(width: usize, max_len: usize) -> Self {
        Self {
            f16: true,
            ..Self::new(width, max_len)
        }
    }

    /// The valid f16 keys and values, each `(len, kv_heads * head_dim)`; `None` for an f32
    /// or int8 layer.
    pub fn f16_slices(&self) -> Option<(&[half::f16], &[half::f16])> {
        self.f16.then(|| {
            (
                &self.k16[..self.len * self.width],
                &self.v16[..self.len * self.width],
            )
        })
    }

    /// The (key, value) scales of an int8 layer, `None` for f32 and f16.
    pub fn int8_scales(&self) -> Option<(f32, f32)> {
        self.scales
    }

    /// The valid int8 keys and values, each `(len, kv_heads * head_dim)`, with their scales;
    /// `None` for an f32 layer.
    pub fn int8_slices(&self) -> Option<(&[i8], &[i8], f32, f32)> {
        let (ks, vs) = self.scales?;
        Some((
            &self.k8[..self.len * self.width],
            &self.v8[..self.len * self.width],
            ks,
            vs,
        ))
    }

    /// Absolute position of the first stored row.
    pub fn first(&self) -> usize {
        self.first
    }

    /// Absolute position one past the last stored row (`first + len`).
    pub fn end(&self) -> usize {
        self.first + self.len
    }

    /// Forgets the rows at absolute positions below `pos` (a sliding-window layer keeps only
    /// the positions a later query can still see). Rolling back with `truncate` below the new
    /// `first` is then impossible: such a layer is emptied.
    pub fn drop_before(&mut self, pos: usize) {
        let n = pos.saturating_sub(self.first).min(self.len);
        if n == 0 {
            return;
        }
        if self.scales.is_some() {
            self.k8.drain(..n * self.width);
            self.v8.drain(..n * self.width);
        } else if self.f16 {
            self.k16.drain(..n * self.width);
            self.v16.drain(..n * self.width);
        } else {
            self.k.drain(..n * self.width);
            self.v.drain(..n * self.width);
        }
        self.len -= n;
        self.first += n;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Appends `t` positions; `k`, `v` are `(t, kv_heads * head_dim)`.
    pub fn append(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        if k.len() != v.len() || !k.len().is_multiple_of(self.width) {
            return Err(LmError::Invalid(format!(
                "K/V append of {} / {} values, rows are {} wide",
                k.len(),
                v.len(),
                self.width
            )));
        }
        let t = k.len() / self.width;
        if self.first + self.len + t > self.max_len {
            return Err(LmError::Invalid(format!(
                "K/V cache full: {} positions exceed the context of {}",
                self.first + self.len + t,
                self.max_len
            )));
        }
        if let Some((ks, vs)) = self.scales {
            crate::kv8::quantize_into(k, ks, &mut self.k8);
            crate::kv8::quantize_into(v, vs, &mut self.v8);
        } else if self.f16 {
            // Whole slices at a time (F16C where the CPU has it, rounding to nearest even as
            // `f16::from_f32` does): one value at a time was ~4% of a four-sequence step.
            let (k0, v0) = (self.k16.len(), self.v16.len());
            for (dst, src) in [(&mut self.k16, k), (&mut self.v16, v)] {
                let at = dst.len();
                dst.resize(at + src.len(), half::f16::ZERO);
                dst[at..].convert_from_f32_slice(src);
            }
            // finite values that rounded to infinity (|x| >= 65520): refused, nothing kept
            let overflowed = |x: &[f32], h: &[half::f16]| {
                x.iter()
                    .zip(h)
                    .fold(false, |a, (x, h)| a | (x.is_finite() & h.is_infinite()))
            };
            if overflowed(k, &self.k16[k0..]) || overflowed(v, &self.v16[v0..]) {
                let x = k
                    .iter()
                    .zip(&self.k16[k0..])
                    .chain(v.iter().zip(&self.v16[v0..]))
                    .find(|(x, h)| x.is_finite() && h.is_infinite())
                    .map_or(f32::INFINITY, |(x, _)| *x);
                self.k16.truncate(k0);
                self.v16.truncate(v0);
                return Err(LmError::Invalid(format!(
                    "K/V value {x:e} is beyond the f16 cache's range (|x| < 65520); \
                     keep the cache in f32 (`--kv 32`)"
                )));
            }
        } else {
            self.k.extend_from_slice(k);
            self.v.extend_from_slice(v);
        }
        self.len += t;
        Ok(())
    }

    /// The valid keys and values of an f32 layer, each `(len, kv_heads * head_dim)`; empty
    /// for an f16 or int8 layer (see [`LayerKv::f16_slices`], [`LayerKv::int8_slices`]).
    pub fn slices(&self) -> (&[f32], &[f32]) {
        if self.scales.is_some() || self.f16 {
            return (&[], &[]);
        }
        (
            &self.k[..self.len * self.width],
            &self.v[..self.len * self.width],
        )
    }

    /// Copies of the keys and values as f32 tensors `(len, kv_heads * head_dim)`
    /// (inspection; an int8 layer is dequantized, an f16 one widened).
    pub fn kv(&self) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (self.int8_slices(), self.f16_slices()) {
            (Some((k, v, ks, vs)), _) => (
                k.iter().map(|&x| x as f32 * ks).collect(),
                v.iter().map(|&x| x as f32 * vs).collect(),
            ),
            (None, Some((k, v))) => (
                k.iter().map(|x| x.to_f32()).collect(),
                v.iter().map(|x| x.to_f32()).collect(),
            ),
            (None, None) => {
                let (k, v) = self.slices();
                (k.to_vec(), v.to_vec())
            }
        };
        Ok((
            Tensor::from_vec(k, (self.len, self.width), &Device::Cpu)?,
            Tensor::from_vec(v, (self.len, self.width), &Device::Cpu)?,
        ))
    }

    /// Forgets absolute positions `len..` (a trimmed window layer truncated below `first`
    /// is emptied and restarts at `len`).
    pub fn truncate(&mut self, len: usize) {
        if len < self.first {
            self.first = len;
            self.len = 0;
        }
        self.len = self.len.min(len - self.first);
        self.k.truncate(self.len * self.width);
        self.v.truncate(self.len * self.width);
        self.k16.truncate(self.len * self.width);
        self.v16.truncate(self.len * self.width);
        self.k8.truncate(self.len * self.width);
        self.v8.truncate(self.len * self.width);
    }

    /// Bytes per stored value: 4 (f32), 2 (f16) or 1 (int8).
    pub fn bytes_per_value(&self) -> usize {
        if self.scales.is_some() {
            1
        } else if self.f16 {
            2
        } else {
            4
        }
    }

    /// Bytes of the valid entries (keys and values).
    pub fn used_bytes(&self) -> usize {
        2 * self.len * self.width * self.bytes_per_value()
    }

    /// Bytes allocated, including spare capacity.
    pub fn allocated_bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * 4
            + (self.k16.capacity() + self.v16.capacity()) * 2
            + self.k8.capacity()
            + self.v8.capacity()
    }
}

/// The state of one request: the K/V of every layer that has its own K/V and the number of
/// positions processed. KV-reuse (block-2) layers have no entry: that is the memory saving.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<Option<LayerKv>>,
    seq_len: usize,
    max_len: usize,
}

impl Cache {
    /// `kv_width[i]` is `kv_heads * head_dim` of layer `i`, `None` for a layer without K/V.
    pub fn new(kv_width: &[Option<usize>], max_len: usize) -> Self {
        Self {
            layers: kv_width
                .iter()
                .map(|w| w.map(|w| LayerKv::new(w, max_len)))
                .collect(),
            seq_len: 0,
            max_len,
        }
    }

    /// As [`Cache::new`], with the layers that have `scales[i] = Some((k, v))` stored in int8
    /// ([`LayerKv::new_int8`]).
    pub fn new_int8(
        kv_width: &[Option<usize>],
        scales: &[Option<(f32, f32)>],
        max_len: usize,
    ) -> Self {
        Self {
            layers: kv_width
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    w.map(|w| match scales.get(i).copied().flatten() {
                        Some((k, v)) => LayerKv::new_int8(w, max_len, k, v),
                        None => LayerKv::new(w, max_len),
                    })
                })
                .collect(),
            seq_len: 0,
            max_len,
        }
    }

    /// As [`Cache::new`], every layer stored in f16 ([`LayerKv::new_f16`]).
    pub fn new_f16(kv_width: &[Option<usize>], max_len: usize) -> Self {
        Self {
            layers: kv_width
                .iter()
                .map(|w| w.map(|w| LayerKv::new_f16(w, max_len)))
                .collect(),
            seq_len: 0,
            max_len,
        }
    }

    /// Positions already processed (the next token's position).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn layer(&self, i: usize) -> Option<&LayerKv> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    pub fn layer_mut(&mut self, i: usize) -> Option<&mut LayerKv> {
        self.layers.get_mut(i).and_then(|l| l.as_mut())
    }

    /// Every layer slot, for models that hand disjoint groups of layers to different
    /// threads (the server model's tracks).
    pub(crate) fn layers_mut(&mut self) -> &mut [Option<LayerKv>] {
        &mut self.layers
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.seq_len += n;
    }

    /// Rolls every layer back to `len` positions (used to undo a failed forward pass, and
    /// to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        for l in self.layers.iter_mut().flatten() {
            l.truncate(len);
        }
        self.seq_len = self.seq_len.min(len);
    }

    /// Empties the cache for a new request.
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Bytes of valid K/V entries over all layers.
    pub fn used_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|l| l.used_bytes()).sum()
    }

    /// Bytes allocated over all layers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| l.allocated_bytes())
            .sum()
    }

    /// Number of layers that store K/V.
    pub fn kv_layers(&self) -> usize {
        self.layers.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_truncates_and_refuses_overflow() {
        let mut l = LayerKv::new(8, 100);
        for i in 0..70 {
            l.append(&[i as f32; 8], &[-(i as f32); 8]).unwrap();
        }
        let (k, v) = l.slices();
        assert_eq!(k.len(), 70 * 8);
        assert_eq!(k[69 * 8], 69.0);
        assert_eq!(v[3 * 8 + 7], -3.0);
        assert!(l.append(&[0.0; 31 * 8], &[0.0; 31 * 8]).is_err());
        assert!(l.append(&[0.0; 7], &[0.0; 7]).is_err());
        assert_eq!(l.used_bytes(), 2 * 70 * 8 * 4);
        l.truncate(10);
        assert_eq!((l.len(), l.slices().0.len()), (10, 80));
    }

    #[test]
    fn f16_layers_round_each_value_and_refuse_what_f16_cannot_hold() {
        let mut l = LayerKv::new_f16(4, 50);
        // 0.1 is not an f16: stored as its nearest f16
        l.append(&[0.1, -2.0, 65504.0, 1e-3], &[3.0, 0.1, -65504.0, 7.0])
            .unwrap();
        let (k, v) = l.f16_slices().unwrap();
        assert_eq!(k[0], half::f16::from_f32(0.1));
        assert_ne!(k[0].to_f32(), 0.1);
        assert_eq!((k[2].to_f32(), v[2].to_f32()), (65504.0, -65504.0));
        assert_eq!(l.slices().0.len(), 0, "no f32 store");
        assert!(l.int8_slices().is_none());
        assert_eq!((l.bytes_per_value(), l.used_bytes()), (2, 2 * 4 * 2));
        // beyond f16's range: an error that names it, and nothing appended
        let e = l.append(&[1.0, 65520.0, 0.0, 0.0], &[0.0; 4]).unwrap_err();
        assert!(e.to_string().contains("f16"), "{e}");
        let e = l.append(&[0.0; 4], &[0.0, 0.0, -1e6, 0.0]).unwrap_err();
        assert!(e.to_string().contains("--kv 32"), "{e}");
        assert_eq!(l.len(), 1);
        // 65519 rounds to 65504: kept
        l.append(&[65519.0, 0.0, 0.0, 0.0], &[0.0; 4]).unwrap();
        assert_eq!(l.f16_slices().unwrap().0[4].to_f32(), 65504.0);
        l.truncate(1);
        for i in 1..10 {
            l.append(&[i as f32; 4], &[i as f32; 4]).unwrap();
        }
        let (kt, _) = l.kv().unwrap();
        assert_eq!(kt.dims(), &[10, 4]);
        assert_eq!(
            kt.to_vec2::<f32>().unwrap()[0][0],
            half::f16::from_f32(0.1).to_f32()
        );
        l.drop_before(6);
        assert_eq!((l.first(), l.len()), (6, 4));
        assert_eq!(l.f16_slices().unwrap().0[0].to_f32(), 6.0);
        l.truncate(8);
        assert_eq!((l.len(), l.f16_slices().unwrap().1.len()), (2, 8));
        let c = Cache::new_f16(&[Some(4), None, Some(4)], 10);
        assert_eq!(c.kv_layers(), 2);
        assert!(c.layer(0).unwrap().f16_slices().is_some());
    }

    #[test]
    fn drop_before_keeps_absolute_positions() {
        let mut l = LayerKv::new(2, 20);
        for i in 0..10 {
            l.append(&[i as f32; 2], &[i as f32; 2]).unwrap();
        }
        l.drop_before(6);
        assert_eq!((l.first(), l.len(), l.end()), (6, 4, 10));
        assert_eq!(l.slices().0[0], 6.0);
        l.truncate(8);
        assert_eq!((l.first(), l.end()), (6, 8));
        // the context bound counts absolute positions
        assert!(l.append(&[0.0; 26], &[0.0; 26]).is_err());
        l.truncate(3);
        assert_eq!((l.first(), l.len()), (3, 0));
    }
}
