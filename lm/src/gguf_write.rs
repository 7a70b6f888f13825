//! Writing GGUF files tensor by tensor (a model of several GB is never held in memory at
//! once), and the GGUF form of afm's low-bit matrices.
//!
//! # Low-bit tensors in GGUF
//! GGUF has no type for the paper's 2-bit grid or afm's 4-bit tables, and the readers in use
//! (candle's, llama.cpp's) refuse unknown type ids. A [`LowBitMatrix`] is therefore stored as
//! an opaque payload:
//! * the tensor keeps its usual name (e.g. `blk.0.attn_q.weight`), with ggml type **F16**
//!   (id 1) and one dimension, `payload_bytes / 2` (so every reader can skip or copy it);
//! * the payload is the packed codes, then the f16 scales (little-endian), exactly as
//!   described in [`crate::lowbit`];
//! * the metadata key `afm.lowbit.<tensor name>` (array of 4 u32) says it is one:
//!   `[bits (2 or 4), group (32, 64, 128 or 256), rows, cols]`.
//!
//! A model file also carries `afm.quant.weights` / `afm.quant.embeddings` (u32: the bits
//! `afm quantize` was asked for, informational). The KV cache's 8-bit scales are ordinary f32
//! tensors `blk.N.attn_k_scale` / `attn_v_scale` of shape `(1)` with `{arch}.afm.kv_quant`
//! true.

use crate::error::{LmError, Result};
use crate::lowbit::LowBitMatrix;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The metadata key that marks `tensor` as a low-bit payload.
pub fn lowbit_key(tensor: &str) -> String {
    format!("afm.lowbit.{tensor}")
}

/// `(bits, group, rows, cols)` of a low-bit tensor, `None` if `tensor` is not one.
pub fn lowbit_meta(
    md: &HashMap<String, Value>,
    tensor: &str,
) -> Result<Option<(u32, usize, usize, usize)>> {
    let key = lowbit_key(tensor);
    let Some(v) = md.get(&key) else {
        return Ok(None);
    };
    let bad = |why: &str| LmError::config(key.clone(), why.to_string());
    let a = v.to_vec().map_err(|_| bad("expected an array of 4 u32"))?;
    let n: Vec<u64> = a
        .iter()
        .map(|x| x.to_u32().map(u64::from).or_else(|_| x.to_u64()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("expected an array of 4 u32"))?;
    match n.as_slice() {
        [b, g, r, c] => Ok(Some((*b as u32, *g as usize, *r as usize, *c as usize))),
        _ => Err(bad("expected 4 values: bits, group, rows, cols")),
    }
}

/// The payload bytes of a low-bit matrix (codes, then scales).
pub fn lowbit_payload(m: &LowBitMatrix) -> Vec<u8> {
    let (qs, d) = m.parts();
    let mut out = Vec::with_capacity(qs.len() + 2 * d.len());
    out.extend_from_slice(&qs);
    for s in d.iter() {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// The metadata value of a low-bit matrix.
pub fn lowbit_value(m: &LowBitMatrix) -> Value {
    let (r, c) = m.dims();
    Value::Array(
        [m.bits() as usize, m.group(), r, c]
            .iter()
            .map(|&x| Value::U32(x as u32))
            .collect(),
    )
}

/// Rebuilds a low-bit matrix from its payload, checking every size.
pub fn lowbit_from_payload(
    bytes: &[u8],
    (bits, group, rows, cols): (u32, usize, usize, usize),
) -> Result<LowBitMatrix> {
    if bits != 2 && bits != 4 {
        return Err(LmError::Invalid(format!("low-bit tensor with {bits} bits")));
    }
    if !matches!(group, 32 | 64 | 128 | 256) {
        return Err(LmError::Invalid(format!("low-bit group size {group}")));
    }
    let kp = cols.div_ceil(group.max(64)) * group.max(64);
    let nq = rows
        .checked_mul(kp)
        .map(|x| x * bits as usize / 8)
        .ok_or_else(|| LmError::Invalid("low-bit tensor size overflows".into()))?;
    let nd = rows * kp / group;
    if bytes.len() != nq + 2 * nd {
        return Err(LmError::Invalid(format!(
            "low-bit payload of {} bytes, a {bits}-bit ({rows}, {cols}) matrix with groups of \
             {group} needs {}",
            bytes.len(),
            nq + 2 * nd
        )));
    }
    let d = bytes[nq..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    LowBitMatrix::from_parts(bits, group, rows, cols, bytes[..nq].to_vec(), d)
}

/// One tensor of a GGUF file about to be written: name, dims as PyTorch orders them
/// (`(out, in)` for matrices), ggml type, payload size.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    pub bytes: usize,
}

const ALIGN: usize = 32;

fn pad(n: usize) -> usize {
    (ALIGN - n % ALIGN) % ALIGN
}

fn write_string<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_string(w, s),
        Value::Array(a) => {
            let t = a.first().map_or(4, type_id);
            if a.iter().any(|x| type_id(x) != t) {
                return Err(std::io::Error::other("GGUF array of mixed value types"));
            }
            w.write_all(&t.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            for x in a {
                write_value(w, x)?;
            }
            Ok(())
        }
    }
}

/// Writes a GGUF v3 file: the metadata, the tensor directory of `specs`, then each tensor's
/// payload as `data(i)` returns it (called once per tensor, in order; a payload of another
/// size than its spec is an error). Each payload is aligned to 32 bytes.
pub fn write_gguf_streaming(
    path: &Path,
    md: &[(String, Value)],
    specs: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let io = |source| LmError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(specs.len() as u64).to_le_bytes());
    head.extend_from_slice(&(md.len() as u64).to_le_bytes());
    for (k, v) in md {
        write_string(&mut head, k).map_err(io)?;
        head.extend_from_slice(&type_id(v).to_le_bytes());
        write_value(&mut head, v).map_err(io)?;
    }
    let mut offset = 0usize;
    for s in specs {
        write_string(&mut head, &s.name).map_err(io)?;
        head.extend_from_slice(&(s.dims.len() as u32).to_le_bytes());
        for &d in s.dims.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        let tid = dtype_id(s.dtype);
        head.extend_from_slice(&tid.to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += s.bytes + pad(s.bytes);
    }
    head.resize(head.len() + pad(head.len()), 0);
    w.write_all(&head).map_err(io)?;
    for (i, s) in specs.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != s.bytes {
            return Err(LmError::Invalid(format!(
                "tensor `{}`: {} bytes written, {} announced",
                s.name,
                bytes.len(),
                s.bytes
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        w.write_all(&vec![0u8; pad(bytes.len())]).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// ggml's type id.
fn dtype_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Payload bytes of a `(rows, cols)` matrix (or a vector: rows = 1) in a standard ggml type.
pub fn ggml_bytes(dtype: GgmlDType, elems: usize) -> usize {
    elems / dtype.block_size() * dtype.type_size()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::WeightSource;
    use candle_core::{Device, Tensor};

    /// A file with a 2-bit matrix, a 4-bit table, a Q8_0 matrix and an f32 vector reads
    /// back through `WeightSource` as the same matrices.
    #[test]
    fn lowbit_and_standard_tensors_round_trip() {
        let dir = std::env::temp_dir().join(format!("afm-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let w: Vec<f32> = (0..40 * 96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let q2 = LowBitMatrix::quantize(&w, 40, 96, 2, 32, None).unwrap();
        let q4 = LowBitMatrix::quantize(&w, 40, 96, 4, 64, None).unwrap();
        let t = Tensor::from_vec(w.clone(), (40, 96), &Device::Cpu).unwrap();
        let q8 = candle_core::quantized::QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let q8b = q8.data().unwrap().to_vec();
        let norm: Vec<u8> = (0..96).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let p2 = lowbit_payload(&q2);
        let p4 = lowbit_payload(&q4);
        let specs = vec![
            TensorSpec {
                name: "blk.0.attn_q.weight".into(),
                dims: vec![p2.len() / 2],
                dtype: GgmlDType::F16,
                bytes: p2.len(),
            },
            TensorSpec {
                name: "token_embd.weight".into(),
                dims: vec![p4.len() / 2],
                dtype: GgmlDType::F16,
                bytes: p4.len(),
            },
            TensorSpec {
                name: "blk.0.attn_k.weight".into(),
                dims: vec![40, 96],
                dtype: GgmlDType::Q8_0,
                bytes: q8b.len(),
            },
            TensorSpec {
                name: "output_norm.weight".into(),
                dims: vec![96],
                dtype: GgmlDType::F32,
                bytes: norm.len(),
            },
        ];
        let md = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            (lowbit_key("blk.0.attn_q.weight"), lowbit_value(&q2)),
            (lowbit_key("token_embd.weight"), lowbit_value(&q4)),
        ];
        let payloads = [p2, p4, q8b, norm];
        write_gguf_streaming(&path, &md, &specs, |i| Ok(payloads[i].clone())).unwrap();
        let src = WeightSource::from_gguf(&path).unwrap();
        let x: Vec<f32> = (0..96).map(|i| (i as f32 * 0.1).sin()).collect();
        let a = src
            .matrix("model.layers.0.self_attn.q_proj.weight", 40, 96)
            .unwrap();
        assert_eq!(a.forward(&x, 1).unwrap(), q2.matmul(&x, 1));
        let e = src.matrix("model.embed_tokens.weight", 40, 96).unwrap();
        let rows = e.embedding(&[5]).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows[0], q4.dequantize()[5 * 96..6 * 96]);
        // the dense view of a low-bit tensor is its dequantization
        let dense = src
            .tensor("model.layers.0.self_attn.q_proj.weight", &[40, 96])
            .unwrap();
        assert_eq!(
            dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            q2.dequantize()
        );
        // a wrong expected shape is refused by name
        let err = src
            .matrix("model.layers.0.self_attn.q_proj.weight", 41, 96)
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn_q"), "{err}");
        let k = src
            .matrix("model.layers.0.self_attn.k_proj.weight", 40, 96)
            .unwrap();
        assert_eq!(k.forward(&x, 1).unwrap().len(), 40);
        let n = src.tensor("model.norm.weight", &[96]).unwrap();
        assert_eq!(n.to_vec1::<f32>().unwrap()[95], 95.0);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_payloads_are_refused() {
        assert!(lowbit_from_payload(&[0; 10], (2, 32, 1, 64)).is_err());
        assert!(lowbit_from_payload(&[0; 20], (3, 32, 1, 64)).is_err());
        assert!(lowbit_from_payload(&[0; 20], (2, 32, 1, 64)).is_ok());
    }
}
