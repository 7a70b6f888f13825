//! Weight sources: safetensors (HF names) and GGUF (llama.cpp names), behind one lookup by the
//! HF tensor name. Every lookup checks the shape and names the tensor on failure.

use crate::error::{LmError, Result};
use crate::linear::Linear;
use crate::lowbit::LowBitMatrix;
use crate::quant::{QKind, QMatrix};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where the tensors of a checkpoint come from.
pub enum WeightSource {
    /// All tensors of one or more safetensors files, keyed by their (HF) names.
    Safetensors {
        tensors: HashMap<String, Tensor>,
        paths: Vec<PathBuf>,
    },
    /// A GGUF file: tensors are read on demand and stay quantized.
    Gguf {
        content: gguf_file::Content,
        file: Mutex<File>,
        path: PathBuf,
        /// Expand quantized matrices to f32 (slower; for reference comparisons).
        dequantize: bool,
    },
}

impl WeightSource {
    /// Reads safetensors files (all shards) into memory. Malformed headers, offsets past the
    /// end of the file and unsupported dtypes are errors naming the file.
    pub fn from_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| LmError::Io {
                path: path.clone(),
                source,
            })?;
            let loaded =
                candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
                    LmError::BadFile {
                        path: path.clone(),
                        format: "safetensors",
                        reason: e.to_string(),
                    }
                })?;
            tensors.extend(loaded);
        }
        Ok(WeightSource::Safetensors {
            tensors,
            paths: paths.to_vec(),
        })
    }

    /// Opens a GGUF file and reads its header (metadata and tensor directory).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|source| LmError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| LmError::BadFile {
            path: path.to_path_buf(),
            format: "GGUF",
            reason,
        };
        // candle divides by `general.alignment` and trusts the tensor dims: check both. The
        // header is read through a buffer: unbuffered, its many small fields (a vocabulary of
        // 49,152 strings) took some 900,000 system calls, most of a CLI start; candle asks for the
        // position before every string, which [`Counted`] answers without a call.
        let pos = std::io::Seek::stream_position(&mut file).map_err(|source| LmError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut header = Counted {
            inner: std::io::BufReader::with_capacity(1 << 16, &mut file),
            pos,
        };
        crate::gguf_check::check_header(&mut header).map_err(bad)?;
        let content = gguf_file::Content::read(&mut header).map_err(|e| bad(e.to_string()))?;
        drop(header);
        let size = file
            .metadata()
            .map_err(|source| LmError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        crate::gguf_check::check_tensors(&content, size).map_err(|(name, reason)| {
            LmError::BadTensor {
                name,
                reason: format!("{reason} (file {})", path.display()),
            }
        })?;
        Ok(WeightSource::Gguf {
            content,
            file: Mutex::new(file),
            path: path.to_path_buf(),
            dequantize: false,
        })
    }

    /// Makes a GGUF source expand every quantized matrix to f32 on load.
    pub fn with_dequantize(mut self, on: bool) -> Self {
        if let WeightSource::Gguf { dequantize, .. } = &mut self {
            *dequantize = on;
        }
        self
    }

    /// The checkpoint's file name(s), for messages.
    pub fn describe(&self) -> String {
        match self {
            WeightSource::Safetensors { paths, .. } => paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            WeightSource::Gguf { path, .. } => path.display().to_string(),
        }
    }

    /// The name a tensor has in this source, given its HF name.
    pub fn stored_name(&self, hf_name: &str) -> String {
        match self {
            WeightSource::Safetensors { .. } => hf_name.to_string(),
            WeightSource::Gguf { .. } => gguf_name(hf_name),
        }
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            WeightSource::Safetensors { tensors, .. } => tensors.contains_key(hf_name),
            WeightSource::Gguf { content, .. } => {
                content.tensor_infos.contains_key(&gguf_name(hf_name))
            }
        }
    }

    fn check_shape(name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
        if got != expected {
            return Err(LmError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                got: got.to_vec(),
            });
        }
        Ok(())
    }

    /// The low-bit matrix stored under `hf_name` (see [`crate::gguf_write`]), `None` when
    /// the tensor is not one; its rows and columns must be `shape`.
    fn gguf_lowbit(&self, hf_name: &str, shape: &[usize]) -> Result<Option<LowBitMatrix>> {
        let WeightSource::Gguf { content, .. } = self else {
            return Ok(None);
        };
        let name = gguf_name(hf_name);
        let Some(meta) = crate::gguf_write::lowbit_meta(&content.metadata, &name)? else {
            return Ok(None);
        };
        Self::check_shape(&name, &[meta.2, meta.3], shape)?;
        let q = self.gguf_qtensor_raw(&name)?;
        if q.dtype() != GgmlDType::F16 || q.shape().rank() != 1 {
            return Err(LmError::BadTensor {
                name,
                reason: "a low-bit payload must be a 1-D tensor of ggml type F16".into(),
            });
        }
        let m = crate::gguf_write::lowbit_from_payload(&q.data()?, meta).map_err(|e| {
            LmError::BadTensor {
                name,
                reason: e.to_string(),
            }
        })?;
        Ok(Some(m))
    }

    fn gguf_qtensor(&self, hf_name: &str, shape: &[usize]) -> Result<QTensor> {
        let name = gguf_name(hf_name);
        if let WeightSource::Gguf { content, .. } = self {
            if let Some(info) = content.tensor_infos.get(&name) {
                Self::check_shape(&name, info.shape.dims(), shape)?;
            }
        }
        self.gguf_qtensor_raw(&name)
    }

    /// The tensor stored under the GGUF name `name`, whatever its shape.
    fn gguf_qtensor_raw(&self, name: &str) -> Result<QTensor> {
        let name = name.to_string();
        let WeightSource::Gguf {
            content,
            file,
            path,
            ..
        } = self
        else {
            unreachable!("gguf_qtensor on a safetensors source")
        };
        let info = content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| LmError::MissingTensor { name: name.clone() })?;
        let mut f = file.lock().map_err(|_| LmError::BadFile {
            path: path.clone(),
            format: "GGUF",
            reason: "file handle poisoned by an earlier panic".into(),
        })?;
        info.read(&mut *f, content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| LmError::BadTensor {
                name,
                reason: format!("{e} (file {} truncated or corrupt?)", path.display()),
            })
    }

    /// A dense f32 tensor (norm weights, scales, small matrices).
    ///
    /// # Shapes
    /// `shape` as in PyTorch (for matrices: `(out, in)`).
    pub fn tensor(&self, hf_name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            WeightSource::Safetensors { tensors, .. } => {
                let t = tensors.get(hf_name).ok_or_else(|| LmError::MissingTensor {
                    name: hf_name.to_string(),
                })?;
                Self::check_shape(hf_name, t.dims(), shape)?;
                float_weight(t).map_err(|reason| LmError::BadTensor {
                    name: hf_name.to_string(),
                    reason,
                })
            }
            WeightSource::Gguf { .. } => {
                if let Some(m) = self.gguf_lowbit(hf_name, shape)? {
                    return Ok(Tensor::from_vec(m.dequantize(), shape, &Device::Cpu)?);
                }
                let q = self.gguf_qtensor(hf_name, shape)?;
                let t = q.dequantize(&Device::Cpu)?;
                check_finite(&gguf_name(hf_name), &t)?;
                Ok(t)
            }
        }
    }

    /// A weight matrix for `x @ W^T`: quantized when the GGUF stores it quantized, f32
    /// otherwise.
    ///
    /// # Shapes
    /// `(out, in)`.
    pub fn matrix(&self, hf_name: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        match self {
            WeightSource::Safetensors { .. } => Ok(Linear::Candle(QMatMul::Tensor(
                self.tensor(hf_name, &[out_dim, in_dim])?,
            ))),
            WeightSource::Gguf { dequantize, .. } => {
                if let Some(m) = self.gguf_lowbit(hf_name, &[out_dim, in_dim])? {
                    if *dequantize {
                        let t = Tensor::from_vec(m.dequantize(), (out_dim, in_dim), &Device::Cpu)?;
                        return Ok(Linear::Candle(QMatMul::Tensor(t)));
                    }
                    return Ok(Linear::LowBit(Arc::new(m)));
                }
                let q = self.gguf_qtensor(hf_name, &[out_dim, in_dim])?;
                if *dequantize
                    || matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
                {
                    let t = q.dequantize(&Device::Cpu)?;
                    check_finite(&gguf_name(hf_name), &t)?;
                    return Ok(Linear::Candle(QMatMul::Tensor(t)));
                }
                let kind = match q.dtype() {
                    GgmlDType::Q4_1 => Some(QKind::Q4_1),
                    GgmlDType::Q8_0 => Some(QKind::Q8_0),
                    _ => None,
                };
                if let Some(kind) = kind {
                    let m = QMatrix::new(kind, out_dim, in_dim, q.data()?.into_owned()).map_err(
                        |e| LmError::BadTensor {
                            name: gguf_name(hf_name),
                            reason: e.to_string(),
                        },
                    )?;
                    return Ok(Linear::Blocks(Arc::new(m)));
                }
                Ok(Linear::Candle(QMatMul::from_arc(Arc::new(q))?))
            }
        }
    }

    /// A projection matrix of a layer (q/k/v/o, gate/up/down) for `x @ W^T`: as
    /// [`WeightSource::matrix`], but a dense result is stored transposed
    /// ([`Linear::Dense`]), the layout candle's matmul runs fastest.
    ///
    /// # Shapes
    /// `(out, in)` in the file.
    pub fn projection(&self, hf_name: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        Ok(match self.matrix(hf_name, out_dim, in_dim)? {
            Linear::Candle(QMatMul::Tensor(t)) => Linear::Dense(t.t()?.contiguous()?),
            other => other,
        })
    }

    /// GGUF metadata (empty for safetensors).
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match self {
            WeightSource::Gguf { content, .. } => Some(&content.metadata),
            _ => None,
        }
    }
}

/// NaN or infinite weights are a corrupt file, not a model: refuse them by name.
fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    first_non_finite(t)?.map_or(Ok(()), |reason| {
        Err(LmError::BadTensor {
            name: name.to_string(),
            reason,
        })
    })
}

/// Where the first NaN or infinite value of an f32 tensor is, as a message (`NaN at [3, 17]
/// (element 401 of 1024)`), or `None` when every value is finite. Every element is looked
/// at (candle's `max` skips NaN, so a reduction would miss them).
pub fn first_non_finite(t: &Tensor) -> Result<Option<String>> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let Some(i) = v.iter().position(|x| !x.is_finite()) else {
        return Ok(None);
    };
    let mut idx = vec![0usize; t.rank()];
    let mut rest = i;
    for (k, &d) in t.dims().iter().enumerate().rev() {
        if d > 0 {
            idx[k] = rest % d;
            rest /= d;
        }
    }
    Ok(Some(format!(
        "{} at {idx:?} (element {i} of {}): NaN or infinite values are a corrupt file",
        v[i],
        v.len()
    )))
}

/// A weight as f32: its stored dtype must be a float type (an integer dtype of the same
/// width, e.g. F16 data labelled I16, would otherwise convert as integers), and every value
/// finite. The error message names the dtype or the first bad element.
pub fn float_weight(t: &Tensor) -> std::result::Result<Tensor, String> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {}
        other => {
            return Err(format!(
                "dtype {other:?} is not a float type (weights are F32, F16 or BF16)"
            ))
        }
    }
    let t = t.to_dtype(DType::F32).map_err(|e| e.to_string())?;
    match first_non_finite(&t) {
        Ok(None) => Ok(t),
        Ok(Some(m)) => Err(m),
        Err(e) => Err(e.to_string()),
    }
}

/// Maps an HF llama tensor name onto llama.cpp's GGUF name.
///
/// `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`.
pub fn gguf_name(hf: &str) -> String {
    const TOP: &[(&str, &str)] = &[
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    const LAYER: &[(&str, &str)] = &[
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        ("self_attn.k_scale", "attn_k_scale"),
        ("self_attn.v_scale", "attn_v_scale"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    if let Some((_, g)) = TOP.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let layer_tail = |tail: &str| -> Option<String> {
        if let Some((_, g)) = LAYER.iter().find(|(h, _)| *h == tail) {
            return Some(g.to_string());
        }
        // server model (PT-MoE) MoE layers: router and per-expert SwiGLU
        if tail == "mlp.router.weight" {
            return Some("ffn_gate_inp.weight".into());
        }
        if let Some(proj) = tail.strip_prefix("mlp.shared_expert.") {
            let g = match proj {
                "gate_proj.weight" => "ffn_gate_shexp",
                "up_proj.weight" => "ffn_up_shexp",
                "down_proj.weight" => "ffn_down_shexp",
                _ => return None,
            };
            return Some(format!("{g}.weight"));
        }
        let (e, proj) = tail.strip_prefix("mlp.experts.")?.split_once('.')?;
        let g = match proj {
            "gate_proj.weight" => "ffn_gate_exp",
            "up_proj.weight" => "ffn_up_exp",
            "down_proj.weight" => "ffn_down_exp",
            _ => return None,
        };
        Some(format!("{g}.{e}.weight"))
    };
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            if let Some(g) = layer_tail(tail) {
                return format!("blk.{idx}.{g}");
            }
        }
    }
    // server model (PT-MoE): `model.tracks.{t}.layers.{i}.X` -> `trk.{t}.blk.{i}.X'`
    if let Some(rest) = hf.strip_prefix("model.tracks.") {
        if let Some((track, rest)) = rest.split_once('.') {
            if let Some((idx, tail)) = rest.strip_prefix("layers.").and_then(|r| r.split_once('.'))
            {
                if let Some(g) = layer_tail(tail) {
                    return format!("trk.{track}.blk.{idx}.{g}");
                }
            }
        }
    }
    hf.to_string()
}

/// A buffered reader that knows its position: `stream_position` (a `seek` of 0) is answered
/// from a count instead of an `lseek`. `pos` starts at the inner reader's position.
struct Counted<R> {
    inner: std::io::BufReader<R>,
    pos: u64,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: std::io::Read + std::io::Seek> std::io::Seek for Counted<R> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        if to == std::io::SeekFrom::Current(0) {
            return Ok(self.pos);
        }
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    /// The counted reader reports the position a plain cursor does, through reads, short
    /// and long skips and absolute seeks.
    #[test]
    fn counted_reader_keeps_the_position() {
        use std::io::{Cursor, Read, Seek, SeekFrom};
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut plain = Cursor::new(&data[..]);
        let mut counted = super::Counted {
            inner: std::io::BufReader::with_capacity(1 << 10, Cursor::new(&data[..])),
            pos: 0,
        };
        let steps = [
            SeekFrom::Current(0),
            SeekFrom::Current(3),
            SeekFrom::Current(5000),
            SeekFrom::Start(17),
            SeekFrom::Current(-9),
            SeekFrom::End(-400),
            SeekFrom::Start(150_000),
        ];
        for (i, s) in steps.into_iter().enumerate() {
            let (mut a, mut b) = (vec![0u8; 13 * i + 1], vec![0u8; 13 * i + 1]);
            plain.read_exact(&mut a).unwrap();
            counted.read_exact(&mut b).unwrap();
            assert_eq!(a, b, "step {i}");
            assert_eq!(plain.seek(s).unwrap(), counted.seek(s).unwrap(), "step {i}");
            assert_eq!(
                plain.stream_position().unwrap(),
                counted.stream_position().unwrap()
            );
        }
    }

    #[test]
    fn hf_names_map_to_llama_cpp_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight"),
            "blk.12.attn_output.weight"
        );
        assert_eq!(gguf_name("model.embed_tokens.weight"), "token_embd.weight");
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight"),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(gguf_name("something.else"), "something.else");
        assert_eq!(
            gguf_name("model.tracks.3.layers.7.self_attn.k_norm.weight"),
            "trk.3.blk.7.attn_k_norm.weight"
        );
        assert_eq!(
            gguf_name("model.tracks.0.layers.1.mlp.router.weight"),
            "trk.0.blk.1.ffn_gate_inp.weight"
        );
        assert_eq!(
            gguf_name("model.tracks.1.layers.11.mlp.experts.39.down_proj.weight"),
            "trk.1.blk.11.ffn_down_exp.39.weight"
        );
        assert_eq!(
            gguf_name("model.tracks.0.layers.1.mlp.shared_expert.up_proj.weight"),
            "trk.0.blk.1.ffn_up_shexp.weight"
        );
        assert_eq!(
            gguf_name("model.tracks.1.layers.2.mlp.gate_proj.weight"),
            "trk.1.blk.2.ffn_gate.weight"
        );
    }
}
