//! Per-request K/V cache. Models hold weights only; every request owns one `Cache`, so one
//! loaded model can serve many threads.

use crate::error::{LmError, Result};
use candle_core::{DType, Device, Tensor};

/// Keys and values of one attention layer, in a buffer that grows by doubling.
///
/// # Shapes
/// buffers `(1, kv_heads, capacity, head_dim)`; the first `len` positions are valid.
#[derive(Debug, Clone)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    max_len: usize,
}

impl LayerKv {
    pub fn new(max_len: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            max_len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` of shape `(1, kv_heads, t, head_dim)`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (_, h, t, d) = k.dims4()?;
        let need = self.len + t;
        if need > self.max_len {
            return Err(LmError::Invalid(format!(
                "K/V cache full: {need} positions exceed the context of {}",
                self.max_len
            )));
        }
        let cap = self.k.as_ref().map(|k| k.dim(2)).transpose()?.unwrap_or(0);
        if need > cap {
            let new_cap = (cap * 2).max(need).max(64).min(self.max_len);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((1, h, new_cap, d), DType::F32, &Device::Cpu)?;
                if let Some(old) = old {
                    if self.len > 0 {
                        buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (kb, vb) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok(())
    }

    /// The valid keys and values, `(1, kv_heads, len, head_dim)` each.
    pub fn kv(&self) -> Result<(Tensor, Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)),
            _ => Err(LmError::Invalid(
                "K/V cache read before anything was written".into(),
            )),
        }
    }

    /// Forgets positions `len..`.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes of the valid entries (f32 keys and values).
    pub fn used_bytes(&self) -> usize {
        match &self.k {
            Some(k) => 2 * self.len * k.dim(1).unwrap_or(0) * k.dim(3).unwrap_or(0) * 4,
            None => 0,
        }
    }

    /// Bytes allocated, including spare capacity.
    pub fn allocated_bytes(&self) -> usize {
        let one = |t: &Option<Tensor>| t.as_ref().map(|t| t.elem_count() * 4).unwrap_or(0);
        one(&self.k) + one(&self.v)
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
    /// `has_kv[i]` tells whether layer `i` stores K/V.
    pub fn new(has_kv: &[bool], max_len: usize) -> Self {
        Self {
            layers: has_kv
                .iter()
                .map(|&b| b.then(|| LayerKv::new(max_len)))
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
    fn grows_keeps_contents_and_refuses_overflow() {
        let mut l = LayerKv::new(100);
        for i in 0..70 {
            let k = Tensor::full(i as f32, (1, 2, 1, 4), &Device::Cpu).unwrap();
            l.append(&k, &k).unwrap();
        }
        let (k, _) = l.kv().unwrap();
        assert_eq!(k.dims(), &[1, 2, 70, 4]);
        let col: Vec<f32> = k
            .narrow(1, 1, 1)
            .unwrap()
            .narrow(3, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col, (0..70).map(|i| i as f32).collect::<Vec<_>>());
        let big = Tensor::zeros((1, 2, 31, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(l.append(&big, &big).is_err());
        assert_eq!(l.used_bytes(), 2 * 70 * 2 * 4 * 4);
    }
}
