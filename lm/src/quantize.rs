//! Converting a DeviceModel checkpoint (safetensors or GGUF, SmolLM2 included) into one GGUF
//! file in the paper's formats (`afm quantize`), and writing random-weight checkpoints of any
//! size straight into those formats, tensor by tensor ([`write_random_gguf`]).
//!
//! Formats by role: projections (q/k/v/o, gate/up/down) get `--weights` (2: the paper's 2-bit
//! grid, [`crate::lowbit`]; 4: Q4_1; 8: Q8_0; 16: F16; 32: F32); the embedding table and an
//! untied output head get `--embeddings` (4: afm's 4-bit table; 8: Q8_0; 16: F16; 32: F32);
//! norms stay f32. `--kv 8` stores per-layer K/V scales (the checkpoint's own, or calibrated
//! on a text) and sets `afm.kv_quant`, so the model runs with the 8-bit KV cache by default.

use crate::config::LmConfig;
use crate::error::{LmError, Result};
use crate::gguf_write::{ggml_bytes, lowbit_key, lowbit_payload, write_gguf_streaming, TensorSpec};
use crate::load::{config_from_gguf, CheckpointFiles};
use crate::lora::LoraTarget;
use crate::lowbit::LowBitMatrix;
use crate::weights::{gguf_name, WeightSource};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::Path;

/// How one tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorFormat {
    F32,
    F16,
    /// A standard ggml block format (Q4_1, Q8_0, ...).
    Ggml(GgmlDType),
    /// afm's low-bit grid ([`crate::lowbit`]).
    LowBit {
        bits: u32,
        group: usize,
    },
}

/// The formats `afm quantize` was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeSpec {
    /// 2, 4, 8, 16 or 32 bits for the projections.
    pub weights: u32,
    /// 4, 8, 16 or 32 bits for the embedding table (and an untied output head).
    pub embeddings: u32,
    /// 8 (int8 KV cache with stored scales) or 16 (no KV scales stored: the cache's
    /// precision is chosen at run time, f32 unless `--kv 16` / `--kv 8`); 32 is taken as 16.
    pub kv: u32,
    /// Inputs per scale of the 2-bit weights ([`crate::lowbit::DEFAULT_GROUP`]).
    pub group: usize,
    /// Fit each 2-bit group's scale to the calibration text's inputs: the rounding error of
    /// input column `j` weighs `E[x_j^2]` ([`crate::diff_model::DiffLm::input_importance`]
    /// over the calibration tokens). Plain dense checkpoints only (no KV sharing).
    pub importance: bool,
    /// Projection kinds kept in Q4_1 when `weights` is 2 (a mixed file, as llama.cpp's Q2_K
    /// keeps its V and down projections at higher precision): bit `i` is
    /// [`LoraTarget::ALL`]`[i]` (q, k, v, o, gate, up, down); 0 = every projection 2-bit.
    pub q4_projections: u8,
}

impl Default for QuantizeSpec {
    fn default() -> Self {
        Self {
            weights: 2,
            embeddings: 4,
            kv: 8,
            group: crate::lowbit::DEFAULT_GROUP,
            importance: false,
            q4_projections: 0,
        }
    }
}

/// The [`QuantizeSpec::q4_projections`] mask of a target list.
pub fn projection_mask(targets: &[LoraTarget]) -> u8 {
    targets.iter().fold(0, |m, t| {
        m | LoraTarget::ALL
            .iter()
            .position(|a| a == t)
            .map_or(0, |i| 1 << i)
    })
}

/// The projection kind of a tensor name (`model.layers.3.mlp.down_proj.weight` -> down).
fn projection_of(name: &str) -> Option<LoraTarget> {
    let proj = name.strip_suffix(".weight")?.rsplit('.').next()?;
    LoraTarget::ALL.into_iter().find(|t| t.proj() == proj)
}

impl QuantizeSpec {
    /// Checks the combination, naming the bad option.
    pub fn validate(&self) -> Result<()> {
        self.weight_format()?;
        self.embedding_format()?;
        if self.q4_projections != 0 && self.weights != 2 {
            return Err(LmError::Invalid(format!(
                "--q4 keeps projections in Q4_1 beside 2-bit ones: it needs --weights 2 (got {})",
                self.weights
            )));
        }
        if self.q4_projections >= 1 << LoraTarget::ALL.len() {
            return Err(LmError::Invalid(format!(
                "q4_projections {:#b} names more than the seven projection kinds",
                self.q4_projections
            )));
        }
        if ![8, 16, 32].contains(&self.kv) {
            return Err(LmError::Invalid(format!(
                "--kv {}: expected 8 (store KV scales) or 16 / 32 (none)",
                self.kv
            )));
        }
        Ok(())
    }

    pub fn weight_format(&self) -> Result<TensorFormat> {
        Ok(match self.weights {
            2 => TensorFormat::LowBit {
                bits: 2,
                group: self.group,
            },
            4 => TensorFormat::Ggml(GgmlDType::Q4_1),
            8 => TensorFormat::Ggml(GgmlDType::Q8_0),
            16 => TensorFormat::F16,
            32 => TensorFormat::F32,
            b => {
                return Err(LmError::Invalid(format!(
                    "--weights {b}: expected 2, 4, 8, 16 or 32"
                )))
            }
        })
    }

    pub fn embedding_format(&self) -> Result<TensorFormat> {
        Ok(match self.embeddings {
            4 => TensorFormat::LowBit { bits: 4, group: 32 },
            8 => TensorFormat::Ggml(GgmlDType::Q8_0),
            16 => TensorFormat::F16,
            32 => TensorFormat::F32,
            b => {
                return Err(LmError::Invalid(format!(
                    "--embeddings {b}: expected 4, 8, 16 or 32"
                )))
            }
        })
    }
}

/// What a tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Projection,
    Vector,
}

/// Every tensor of a DeviceModel with `cfg` (HF names, PyTorch dims, role), KV scales
/// excluded, in the order they are written.
pub fn tensor_list(cfg: &LmConfig) -> Vec<(String, Vec<usize>, Role)> {
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_attention_heads, cfg.num_kv_heads());
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        Role::Embedding,
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let reuse = l >= cfg.num_block1_layers();
        out.push((format!("{p}.input_layernorm.weight"), vec![h], Role::Vector));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Role::Vector,
        ));
        out.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![nh * hd, h],
            Role::Projection,
        ));
        if !reuse {
            for n in ["k_proj", "v_proj"] {
                out.push((
                    format!("{p}.self_attn.{n}.weight"),
                    vec![nkv * hd, h],
                    Role::Projection,
                ));
            }
        }
        out.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, nh * hd],
            Role::Projection,
        ));
        if cfg.qk_norm {
            out.push((
                format!("{p}.self_attn.q_norm.weight"),
                vec![hd],
                Role::Vector,
            ));
            if !reuse {
                out.push((
                    format!("{p}.self_attn.k_norm.weight"),
                    vec![hd],
                    Role::Vector,
                ));
            }
        }
        for n in ["gate_proj", "up_proj"] {
            out.push((format!("{p}.mlp.{n}.weight"), vec![i, h], Role::Projection));
        }
        out.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            Role::Projection,
        ));
    }
    out.push(("model.norm.weight".to_string(), vec![h], Role::Vector));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h], Role::Embedding));
    }
    out
}

/// The GGUF spec (and low-bit metadata) of a tensor stored as `fmt`; a matrix whose width
/// does not split into the format's blocks falls back to F32 (as llama.cpp does).
pub fn spec_of(
    gguf: &str,
    dims: &[usize],
    fmt: TensorFormat,
) -> (TensorSpec, Option<(String, Value)>, TensorFormat) {
    let elems: usize = dims.iter().product();
    let fmt = match fmt {
        TensorFormat::Ggml(dt) if dims.len() != 2 || !dims[1].is_multiple_of(dt.block_size()) => {
            TensorFormat::F32
        }
        TensorFormat::LowBit { .. } if dims.len() != 2 => TensorFormat::F32,
        f => f,
    };
    match fmt {
        TensorFormat::F32 | TensorFormat::F16 | TensorFormat::Ggml(_) => {
            let dt = match fmt {
                TensorFormat::F32 => GgmlDType::F32,
                TensorFormat::F16 => GgmlDType::F16,
                TensorFormat::Ggml(d) => d,
                TensorFormat::LowBit { .. } => unreachable!(),
            };
            (
                TensorSpec {
                    name: gguf.to_string(),
                    dims: dims.to_vec(),
                    dtype: dt,
                    bytes: ggml_bytes(dt, elems),
                },
                None,
                fmt,
            )
        }
        TensorFormat::LowBit { bits, group } => {
            let (rows, cols) = (dims[0], dims[1]);
            let kp = cols.div_ceil(group.max(64)) * group.max(64);
            let bytes = rows * kp * bits as usize / 8 + 2 * rows * kp / group;
            let md = Value::Array(
                [bits as usize, group, rows, cols]
                    .iter()
                    .map(|&x| Value::U32(x as u32))
                    .collect(),
            );
            (
                TensorSpec {
                    name: gguf.to_string(),
                    dims: vec![bytes / 2],
                    dtype: GgmlDType::F16,
                    bytes,
                },
                Some((lowbit_key(gguf), md)),
                fmt,
            )
        }
    }
}

/// The payload of `x` (row-major, `dims`) stored as `fmt` (as [`spec_of`] resolved it).
pub fn encode(x: Vec<f32>, dims: &[usize], fmt: TensorFormat) -> Result<Vec<u8>> {
    encode_with(x, dims, fmt, 15, None)
}

/// [`encode`] with `candidates` scale candidates for low-bit formats and an optional
/// per-input-column importance ([`LowBitMatrix::quantize_with`]; other formats ignore it).
fn encode_with(
    x: Vec<f32>,
    dims: &[usize],
    fmt: TensorFormat,
    candidates: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    Ok(match fmt {
        TensorFormat::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorFormat::F16 => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        TensorFormat::Ggml(dt) => {
            let t = Tensor::from_vec(x, dims, &Device::Cpu)?;
            QTensor::quantize(&t, dt)?.data()?.into_owned()
        }
        TensorFormat::LowBit { bits, group } => {
            let m = LowBitMatrix::quantize_with(
                &x, dims[0], dims[1], bits, group, importance, candidates,
            )?;
            lowbit_payload(&m)
        }
    })
}

/// The architecture metadata of a DeviceModel GGUF (llama.cpp keys; the AFM keys when an
/// AFM feature is on, under architecture `afm`).
pub fn arch_metadata(cfg: &LmConfig) -> Vec<(String, Value)> {
    let afm = cfg.num_kv_reuse_layers > 0 || cfg.qk_norm || cfg.kv_quant;
    let arch = if afm { "afm" } else { "llama" };
    let u = |x: usize| Value::U32(x as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.vocab_size"), u(cfg.vocab_size)),
        (format!("{arch}.embedding_length"), u(cfg.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u(cfg.intermediate_size),
        ),
        (format!("{arch}.block_count"), u(cfg.num_hidden_layers)),
        (
            format!("{arch}.attention.head_count"),
            u(cfg.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u(cfg.num_kv_heads()),
        ),
        (format!("{arch}.attention.key_length"), u(cfg.head_dim())),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.context_length"),
            u(cfg.max_position_embeddings),
        ),
    ];
    if afm {
        md.push((
            format!("{arch}.afm.kv_reuse_layers"),
            u(cfg.num_kv_reuse_layers),
        ));
        md.push((format!("{arch}.afm.qk_norm"), Value::Bool(cfg.qk_norm)));
        md.push((format!("{arch}.afm.kv_quant"), Value::Bool(cfg.kv_quant)));
    }
    md
}

/// What [`quantize_checkpoint`] did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// Bytes of the input checkpoint's weight files.
    pub bytes_in: u64,
    /// Bytes of the output file.
    pub bytes_out: u64,
    /// Parameters (embedding table counted once when tied).
    pub params: usize,
    /// Where the KV scales came from: "checkpoint", "calibrated" or "none" (`--kv 16`).
    pub kv_scales: &'static str,
}

/// Converts the DeviceModel at `input` (a GGUF file, or safetensors with `config.json`) into
/// one GGUF file at `output` with the formats of `spec`. `calibration`: token ids of a text
/// for the KV scales when `--kv 8` and the input has none stored. A GGUF input's tokenizer
/// metadata is carried over; a safetensors input's `tokenizer.json` is not (GGUF holds
/// llama.cpp's tokenizer form): the output then loads as a model without a tokenizer.
pub fn quantize_checkpoint(
    input: &Path,
    output: &Path,
    spec: &QuantizeSpec,
    calibration: &[u32],
) -> Result<QuantizeReport> {
    spec.validate()?;
    let files = CheckpointFiles::resolve(input)?;
    let (src, mut cfg, in_paths) = match &files {
        CheckpointFiles::Gguf(p) => {
            let src = WeightSource::from_gguf(p)?;
            let cfg = config_from_gguf(&src)?;
            (src, cfg, vec![p.clone()])
        }
        CheckpointFiles::Safetensors {
            config, weights, ..
        } => (
            WeightSource::from_safetensors(weights)?,
            LmConfig::from_file(config)?,
            weights.clone(),
        ),
    };
    let bytes_in = in_paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    // KV scales: stored ones, or calibrated on the source model
    let scales: Option<Vec<Option<(f32, f32)>>> = if spec.kv == 8 {
        let model = crate::device_model::DeviceModel::from_source(&src, cfg.clone())?;
        match model.stored_kv_scales() {
            Some(s) => Some(s),
            None => Some(model.calibrate_kv_scales(calibration)?),
        }
    } else {
        None
    };
    // input importance of the projections, from the same calibration tokens
    let importance = if spec.importance && spec.weights == 2 {
        if calibration.is_empty() {
            return Err(LmError::Invalid(
                "importance-weighted 2-bit scales need calibration text: none was given (or \
                 the checkpoint has no tokenizer to read it)"
                    .into(),
            ));
        }
        let lm = crate::diff_model::DiffLm::from_source(&src, cfg.clone()).map_err(|e| {
            LmError::Invalid(format!(
                "importance-weighted 2-bit scales are computed with the differentiable dense \
                 model, which refuses this checkpoint: {e}"
            ))
        })?;
        Some(lm.input_importance(calibration, 512)?)
    } else {
        None
    };
    let kv_source = match (&scales, cfg.kv_quant) {
        (None, _) => "none",
        (Some(_), true) => "checkpoint",
        (Some(_), false) => "calibrated",
    };
    let permute = !cfg.rope_interleaved;
    cfg.kv_quant = scales.is_some();
    cfg.rope_interleaved = true;
    let list = tensor_list(&cfg);
    let mut md = arch_metadata(&cfg);
    md.push(("afm.quant.weights".into(), Value::U32(spec.weights)));
    md.push(("afm.quant.embeddings".into(), Value::U32(spec.embeddings)));
    if let Some(m) = src.gguf_metadata() {
        let mut tok: Vec<(String, Value)> = m
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") || k.starts_with("general.name"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tok.sort_by(|a, b| a.0.cmp(&b.0));
        md.extend(tok);
    }
    let mut specs = Vec::new();
    let mut fmts = Vec::new();
    for (name, dims, role) in &list {
        let fmt = match role {
            Role::Embedding => spec.embedding_format()?,
            Role::Projection => match projection_of(name) {
                Some(t) if spec.q4_projections & projection_mask(&[t]) != 0 => {
                    TensorFormat::Ggml(GgmlDType::Q4_1)
                }
                _ => spec.weight_format()?,
            },
            Role::Vector => TensorFormat::F32,
        };
        let (s, m, f) = spec_of(&gguf_name(name), dims, fmt);
        specs.push(s);
        md.extend(m);
        fmts.push(f);
    }
    let mut scale_vals = Vec::new();
    if let Some(s) = &scales {
        for (l, sc) in s.iter().enumerate() {
            if let Some((k, v)) = sc {
                for (n, x) in [("k_scale", k), ("v_scale", v)] {
                    let name = format!("model.layers.{l}.self_attn.{n}");
                    specs.push(TensorSpec {
                        name: gguf_name(&name),
                        dims: vec![1],
                        dtype: GgmlDType::F32,
                        bytes: 4,
                    });
                    scale_vals.push(*x);
                }
            }
        }
    }
    let n_main = list.len();
    let src_cfg_heads = (cfg.num_attention_heads, cfg.num_kv_heads());
    write_gguf_streaming(output, &md, &specs, |i| {
        if i >= n_main {
            return Ok(scale_vals[i - n_main].to_le_bytes().to_vec());
        }
        let (name, dims, _) = &list[i];
        let mut t = src.tensor(name, dims)?;
        if permute && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) {
            let heads = if name.ends_with("q_proj.weight") {
                src_cfg_heads.0
            } else {
                src_cfg_heads.1
            };
            t = crate::random::permute_for_interleaved(&t, heads)?;
        }
        // the QK-norm weights scale the head dims that the permutation moved
        if permute && (name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight")) {
            let n = t.dim(0)?;
            t = crate::random::permute_for_interleaved(&t.reshape((n, 1))?, 1)?.reshape(n)?;
        }
        let x = t.flatten_all()?.to_vec1::<f32>()?;
        let imp = importance
            .as_ref()
            .and_then(|m| m.get(name))
            .map(|v| v.as_slice());
        encode_with(x, dims, fmts[i], 15, imp)
    })?;
    let bytes_out = std::fs::metadata(output)
        .map_err(|source| LmError::Io {
            path: output.to_path_buf(),
            source,
        })?
        .len();
    let params = list
        .iter()
        .map(|(_, d, _)| d.iter().product::<usize>())
        .sum();
    Ok(QuantizeReport {
        bytes_in,
        bytes_out,
        params,
        kv_scales: kv_source,
    })
}

/// Writes a random-weight DeviceModel of `cfg` straight into one GGUF in the formats of
/// `spec`, one tensor at a time (never the whole model in memory): weights uniform with the
/// standard deviation of [`crate::random::random_tensors`] (`0.02 * sqrt(768 / fan_in)`,
/// at least 0.02; embeddings 1), norms in [0.9, 1.1]; with `spec.kv == 8`, every block-1
/// layer gets K/V scales of `kv_scale`. `extra`: more metadata (e.g. a tokenizer).
pub fn write_random_gguf(
    path: &Path,
    cfg: &LmConfig,
    spec: &QuantizeSpec,
    seed: u64,
    kv_scale: f32,
    extra: &[(String, Value)],
) -> Result<()> {
    spec.validate()?;
    cfg.validate()?;
    let mut cfg = cfg.clone();
    cfg.kv_quant = spec.kv == 8;
    cfg.rope_interleaved = true;
    let list = tensor_list(&cfg);
    let mut md = arch_metadata(&cfg);
    md.push(("afm.quant.weights".into(), Value::U32(spec.weights)));
    md.push(("afm.quant.embeddings".into(), Value::U32(spec.embeddings)));
    md.extend(extra.iter().cloned());
    let mut specs = Vec::new();
    let mut fmts = Vec::new();
    for (name, dims, role) in &list {
        let fmt = match role {
            Role::Embedding => spec.embedding_format()?,
            Role::Projection => match projection_of(name) {
                Some(t) if spec.q4_projections & projection_mask(&[t]) != 0 => {
                    TensorFormat::Ggml(GgmlDType::Q4_1)
                }
                _ => spec.weight_format()?,
            },
            Role::Vector => TensorFormat::F32,
        };
        let (s, m, f) = spec_of(&gguf_name(name), dims, fmt);
        specs.push(s);
        md.extend(m);
        fmts.push(f);
    }
    let n_main = specs.len();
    if cfg.kv_quant {
        for l in 0..cfg.num_block1_layers() {
            for n in ["k_scale", "v_scale"] {
                specs.push(TensorSpec {
                    name: gguf_name(&format!("model.layers.{l}.self_attn.{n}")),
                    dims: vec![1],
                    dtype: GgmlDType::F32,
                    bytes: 4,
                });
            }
        }
    }
    write_gguf_streaming(path, &md, &specs, |i| {
        if i >= n_main {
            return Ok(kv_scale.to_le_bytes().to_vec());
        }
        let (name, dims, role) = &list[i];
        let n: usize = dims.iter().product();
        let tseed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let x = match role {
            Role::Vector => {
                let mut rng = ChaCha8Rng::seed_from_u64(tseed);
                (0..n)
                    .map(|_| 1.0 + (rng.random::<f32>() - 0.5) * 0.2)
                    .collect()
            }
            _ => {
                let std = if *role == Role::Embedding && name.contains("embed") {
                    1.0
                } else {
                    let fan_in = dims[1] as f32;
                    0.02 * (768.0 / fan_in).sqrt().max(1.0)
                };
                uniform_par(n, tseed, std)
            }
        };
        // random weights: the quick scale (their quality does not matter)
        encode_with(x, dims, fmts[i], 1, None)
    })
}

/// `n` values uniform with standard deviation `std`, generated in parallel chunks.
fn uniform_par(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let a = std * 3f32.sqrt();
    let mut x = vec![0f32; n];
    x.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(c as u64));
        for v in out {
            *v = (rng.random::<f32>() * 2.0 - 1.0) * a;
        }
    });
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LanguageModel, LogitsFor};

    fn tiny() -> LmConfig {
        LmConfig::from_json(serde_json::json!({
            "vocab_size": 160, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_kv_reuse_layers": 1, "qk_norm": true, "rope_interleaved": false,
            "tie_word_embeddings": true, "max_position_embeddings": 64
        }))
        .unwrap()
    }

    /// The logits of every position of `ids`, from a fresh cache, flattened.
    fn all_logits(m: &crate::DeviceModel, ids: &[u32]) -> Vec<f32> {
        m.forward_tokens(ids, &mut m.new_cache(), &LogitsFor::All)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let e: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let n: f32 = b.iter().map(|x| x * x).sum();
        (e / n).sqrt()
    }

    /// `q4_projections` keeps the named projection kinds in Q4_1 beside 2-bit ones: the file
    /// says so tensor by tensor, loads, and is nearer the f32 model than the all-2-bit file;
    /// the option is refused without 2-bit weights.
    #[test]
    fn mixed_files_keep_the_named_projections_in_q4_1() {
        let dir = std::env::temp_dir().join(format!("afm-quantize-mix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = tiny();
        let t = crate::random::random_tensors(&cfg, 7).unwrap();
        crate::random::write_safetensors(&dir, &cfg, &t).unwrap();
        let ids: Vec<u32> = (0..12).map(|i| (i * 29 % 160) as u32).collect();
        let logits = |m: &crate::DeviceModel| all_logits(m, &ids);
        let want = logits(&crate::DeviceModel::load(&dir).unwrap());
        let all2 = QuantizeSpec {
            weights: 2,
            embeddings: 32,
            kv: 16,
            group: 32,
            importance: false,
            q4_projections: 0,
        };
        let mixed = QuantizeSpec {
            q4_projections: projection_mask(&[LoraTarget::V, LoraTarget::Down]),
            ..all2
        };
        let (p2, pm) = (dir.join("all2.gguf"), dir.join("mixed.gguf"));
        quantize_checkpoint(&dir, &p2, &all2, &[]).unwrap();
        let r = quantize_checkpoint(&dir, &pm, &mixed, &[]).unwrap();
        assert!(r.bytes_out > std::fs::metadata(&p2).unwrap().len());
        let mut f = std::fs::File::open(&pm).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        for (name, proj, q4) in [
            ("model.layers.0.self_attn.v_proj.weight", "v", true),
            ("model.layers.2.mlp.down_proj.weight", "down", true),
            ("model.layers.0.self_attn.q_proj.weight", "q", false),
            ("model.layers.1.mlp.up_proj.weight", "up", false),
        ] {
            let gg = gguf_name(name);
            let info = &content.tensor_infos[&gg];
            assert_eq!(info.ggml_dtype == GgmlDType::Q4_1, q4, "{proj}: {info:?}");
            assert_eq!(
                content.metadata.contains_key(&lowbit_key(&gg)),
                !q4,
                "{proj}"
            );
        }
        let (e2, em) = (
            rel(&logits(&crate::DeviceModel::load(&p2).unwrap()), &want),
            rel(&logits(&crate::DeviceModel::load(&pm).unwrap()), &want),
        );
        assert!(em < e2, "mixed {em} vs all 2-bit {e2}");
        let bad = QuantizeSpec {
            weights: 4,
            ..mixed
        };
        let err = quantize_checkpoint(&dir, &dir.join("x.gguf"), &bad, &[]).unwrap_err();
        assert!(err.to_string().contains("--weights 2"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A safetensors model quantized to each format loads from its one GGUF and computes
    /// what its own dequantized weights compute; 8-bit formats stay near the f32 model.
    #[test]
    fn quantized_checkpoints_load_and_match_their_dequantization() {
        let dir = std::env::temp_dir().join(format!("afm-quantize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = tiny();
        let t = crate::random::random_tensors(&cfg, 3).unwrap();
        crate::random::write_safetensors(&dir, &cfg, &t).unwrap();
        let f32_model = crate::DeviceModel::load(&dir).unwrap();
        let ids: Vec<u32> = (0..12).map(|i| (i * 13 % 160) as u32).collect();
        let logits = |m: &crate::DeviceModel| all_logits(m, &ids);
        let want = logits(&f32_model);
        let cal: Vec<u32> = (0..40).map(|i| (i * 7 % 160) as u32).collect();
        // (weights, embeddings, kv, bound on the distance to the f32 model when it is tight)
        for (w, e, kv, tol) in [
            (8, 8, 16, Some(0.02)),
            (2, 4, 8, None),
            (4, 16, 16, Some(0.15)),
            (2, 32, 16, None),
            (32, 32, 16, Some(1e-5)),
        ] {
            let out = dir.join(format!("q{w}-{e}-{kv}.gguf"));
            let spec = QuantizeSpec {
                weights: w,
                embeddings: e,
                kv,
                group: 32,
                importance: false,
                q4_projections: 0,
            };
            let r = quantize_checkpoint(&dir, &out, &spec, &cal).unwrap();
            assert!(r.bytes_out > 0 && r.params > 0);
            assert_eq!(r.kv_scales, if kv == 8 { "calibrated" } else { "none" });
            let q = crate::DeviceModel::load(&out).unwrap();
            assert_eq!(q.stored_kv_scales().is_some(), kv == 8);
            let got = logits(&q);
            if let Some(tol) = tol {
                assert!(rel(&got, &want) < tol, "w{w} e{e}: {}", rel(&got, &want));
            }
            // the same file with every matrix expanded to f32 (the format's definition)
            let deq = crate::DeviceModel::load_with(
                &out,
                &crate::LoadOptions {
                    dequantize: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let d = rel(&got, &logits(&deq));
            // only the kernels' 8-bit activation rounding separates the two
            assert!(d < 0.05, "w{w} e{e} against its dequantization: {d}");
        }
        // a bad option is refused by name
        let bad = QuantizeSpec {
            weights: 3,
            ..Default::default()
        };
        let err = quantize_checkpoint(&dir, &dir.join("x.gguf"), &bad, &cal).unwrap_err();
        assert!(err.to_string().contains("--weights 3"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A dense (no KV sharing) tiny model whose layer-0 input norm makes 8 of 64 columns 12x
    /// louder than the rest, so that the q/k/v inputs' energy is far from uniform.
    fn skewed_dense() -> (LmConfig, std::collections::HashMap<String, Tensor>) {
        let mut cfg = tiny();
        cfg.num_kv_reuse_layers = 0;
        let mut t = crate::random::random_tensors(&cfg, 5).unwrap();
        let w: Vec<f32> = (0..64)
            .map(|j| if j % 8 == 3 { 12.0 } else { 1.0 })
            .collect();
        t.insert(
            "model.layers.0.input_layernorm.weight".into(),
            Tensor::new(w, &Device::Cpu).unwrap(),
        );
        (cfg, t)
    }

    /// Layer 0's q/k/v inputs, by hand: each token's RMS-normed embedding times the input
    /// norm's gain (f64).
    fn layer0_inputs(
        t: &std::collections::HashMap<String, Tensor>,
        ids: &[u32],
        eps: f64,
    ) -> Vec<Vec<f64>> {
        let emb: Vec<Vec<f32>> = t["model.embed_tokens.weight"].to_vec2().unwrap();
        let g: Vec<f32> = t["model.layers.0.input_layernorm.weight"]
            .to_vec1()
            .unwrap();
        ids.iter()
            .map(|&id| {
                let e = &emb[id as usize];
                let ms = e.iter().map(|x| (x * x) as f64).sum::<f64>() / e.len() as f64;
                let r = 1.0 / (ms + eps).sqrt();
                e.iter()
                    .zip(&g)
                    .map(|(x, g)| *x as f64 * r * *g as f64)
                    .collect()
            })
            .collect()
    }

    /// The importance of layer 0's q/k/v is the mean squared RMS-normed embedding, computed
    /// here by hand from the weights; windows do not change it (layer 0's input does not
    /// depend on context).
    #[test]
    fn input_importance_is_the_mean_squared_projection_input() {
        let (cfg, t) = skewed_dense();
        let ids: Vec<u32> = (0..37).map(|i| (i * 11 % 160) as u32).collect();
        let src = WeightSource::from_tensors(t.clone());
        let lm = crate::diff_model::DiffLm::from_source(&src, cfg.clone()).unwrap();
        let imp = lm.input_importance(&ids, 16).unwrap();
        assert_eq!(imp.len(), 4 * 7);
        let mut want = vec![0f64; 64];
        for x in layer0_inputs(&t, &ids, cfg.rms_norm_eps) {
            for j in 0..64 {
                want[j] += x[j].powi(2) / ids.len() as f64;
            }
        }
        for n in ["q_proj", "k_proj", "v_proj"] {
            let got = &imp[&format!("model.layers.0.self_attn.{n}.weight")];
            for j in 0..64 {
                let d = (got[j] as f64 - want[j]).abs();
                assert!(
                    d <= 1e-4 * want[j].max(1.0),
                    "{n} col {j}: {} vs {}",
                    got[j],
                    want[j]
                );
            }
        }
        assert_eq!(imp["model.layers.3.mlp.down_proj.weight"].len(), 96);
        assert!(imp.values().flatten().all(|v| v.is_finite() && *v >= 0.0));
        // one window of everything gives the same layer-0 figures
        let whole = lm.input_importance(&ids, 64).unwrap();
        let a = &whole["model.layers.0.self_attn.q_proj.weight"];
        let b = &imp["model.layers.0.self_attn.q_proj.weight"];
        assert!(a
            .iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * x.max(1.0)));
        // and the model is left as it was: an ordinary forward records nothing
        assert!(lm.recorder_is_idle());
        assert!(lm.input_importance(&[], 16).is_err());
    }

    /// On the calibration inputs themselves, importance-weighted 2-bit scales give a smaller
    /// output error `||X (W - Q)^T||` than plain ones (layer 0's q projection, whose inputs
    /// are dominated by 8 columns); `afm quantize --calibrate` writes such a model, which
    /// loads; a KV-sharing checkpoint and a missing text are refused by name.
    #[test]
    fn importance_weighted_scales_cut_the_output_error() {
        let (cfg, t) = skewed_dense();
        let ids: Vec<u32> = (0..96).map(|i| (i * 7 % 160) as u32).collect();
        let src = WeightSource::from_tensors(t.clone());
        let lm = crate::diff_model::DiffLm::from_source(&src, cfg.clone()).unwrap();
        let imp = lm.input_importance(&ids, 64).unwrap();
        let name = "model.layers.0.self_attn.q_proj.weight";
        let w: Vec<f32> = t[name].flatten_all().unwrap().to_vec1().unwrap();
        let xs = layer0_inputs(&t, &ids, cfg.rms_norm_eps);
        let err = |q: &[f32]| -> f64 {
            xs.iter()
                .map(|x| {
                    (0..64)
                        .map(|r| {
                            let d: f64 = (0..64)
                                .map(|j| x[j] * (w[r * 64 + j] - q[r * 64 + j]) as f64)
                                .sum();
                            d.powi(2)
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let plain = LowBitMatrix::quantize(&w, 64, 64, 2, 32, None)
            .unwrap()
            .dequantize();
        let weighted = LowBitMatrix::quantize(&w, 64, 64, 2, 32, Some(&imp[name]))
            .unwrap()
            .dequantize();
        let (ep, ew) = (err(&plain), err(&weighted));
        assert!(ew < 0.8 * ep, "weighted {ew} vs plain {ep}");

        let dir = std::env::temp_dir().join(format!("afm-imp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::random::write_safetensors(&dir, &cfg, &t).unwrap();
        let spec = QuantizeSpec {
            weights: 2,
            embeddings: 32,
            kv: 16,
            group: 32,
            importance: true,
            q4_projections: 0,
        };
        let out = dir.join("imp.gguf");
        quantize_checkpoint(&dir, &out, &spec, &ids).unwrap();
        let plain_out = dir.join("plain.gguf");
        let plain_spec = QuantizeSpec {
            importance: false,
            ..spec
        };
        quantize_checkpoint(&dir, &plain_out, &plain_spec, &ids).unwrap();
        assert_ne!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&plain_out).unwrap()
        );
        let m = crate::DeviceModel::load(&out).unwrap();
        let mut c = m.new_cache();
        let l = m
            .forward_tokens(&ids[..5], &mut c, &LogitsFor::Last)
            .unwrap();
        assert!(l
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
        // refused: no calibration text; a KV-sharing checkpoint
        let e = quantize_checkpoint(&dir, &out, &spec, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("calibration text"), "{e}");
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let scfg = tiny();
        let st = crate::random::random_tensors(&scfg, 5).unwrap();
        crate::random::write_safetensors(&shared, &scfg, &st).unwrap();
        let e = quantize_checkpoint(&shared, &out, &spec, &ids)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_kv_reuse_layers"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn random_gguf_loads_and_runs() {
        let dir = std::env::temp_dir().join(format!("afm-randgguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.gguf");
        let cfg = tiny();
        write_random_gguf(&p, &cfg, &QuantizeSpec::default(), 1, 0.05, &[]).unwrap();
        let m = crate::DeviceModel::load(&p).unwrap();
        assert!(m.config().kv_quant);
        let mut c = m.new_cache();
        let l = m
            .forward_tokens(&[1, 2, 3], &mut c, &LogitsFor::Last)
            .unwrap();
        assert_eq!(l.dims(), &[1, 160]);
        // the int8 cache is a quarter of the f32 one
        assert_eq!(c.layer(0).unwrap().bytes_per_value(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
