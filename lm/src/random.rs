//! Seeded random-weight checkpoints in the documented layout, for tests, benchmarks and the
//! checkpoint generator. Deterministic across platforms (ChaCha8).

use crate::config::LmConfig;
use crate::error::{LmError, Result};
use crate::weights::{gguf_name, WeightSource};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

pub(crate) fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // Box-Muller
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos() * std
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

pub(crate) fn around_one(rng: &mut ChaCha8Rng, n: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..n)
        .map(|_| 1.0 + (rng.random::<f32>() - 0.5) * 0.2)
        .collect();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
}

/// Every tensor `cfg` calls for, keyed by HF name: matrices ~ N(0, 0.02 * sqrt(768/fan_in)),
/// norm weights in [0.9, 1.1], KV scales 0.05. KV-reuse layers get no K/V tensors.
pub fn random_tensors(cfg: &LmConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_attention_heads, cfg.num_kv_heads());
    let mut m = HashMap::new();
    let std = |fan_in: usize| 0.02 * (768.0 / fan_in as f32).sqrt().max(1.0);
    m.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&mut rng, &[v, h], 1.0)?,
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let reuse = l >= cfg.num_block1_layers();
        m.insert(
            format!("{p}.input_layernorm.weight"),
            around_one(&mut rng, h)?,
        );
        m.insert(
            format!("{p}.post_attention_layernorm.weight"),
            around_one(&mut rng, h)?,
        );
        m.insert(
            format!("{p}.self_attn.q_proj.weight"),
            randn(&mut rng, &[nh * hd, h], std(h))?,
        );
        m.insert(
            format!("{p}.self_attn.o_proj.weight"),
            randn(&mut rng, &[h, nh * hd], std(nh * hd))?,
        );
        if !reuse {
            m.insert(
                format!("{p}.self_attn.k_proj.weight"),
                randn(&mut rng, &[nkv * hd, h], std(h))?,
            );
            m.insert(
                format!("{p}.self_attn.v_proj.weight"),
                randn(&mut rng, &[nkv * hd, h], std(h))?,
            );
        }
        if cfg.qk_norm {
            m.insert(
                format!("{p}.self_attn.q_norm.weight"),
                around_one(&mut rng, hd)?,
            );
            if !reuse {
                m.insert(
                    format!("{p}.self_attn.k_norm.weight"),
                    around_one(&mut rng, hd)?,
                );
            }
        }
        if cfg.kv_quant && !reuse {
            m.insert(
                format!("{p}.self_attn.k_scale"),
                Tensor::new(&[0.05f32], &Device::Cpu)?,
            );
            m.insert(
                format!("{p}.self_attn.v_scale"),
                Tensor::new(&[0.05f32], &Device::Cpu)?,
            );
        }
        m.insert(
            format!("{p}.mlp.gate_proj.weight"),
            randn(&mut rng, &[i, h], std(h))?,
        );
        m.insert(
            format!("{p}.mlp.up_proj.weight"),
            randn(&mut rng, &[i, h], std(h))?,
        );
        m.insert(
            format!("{p}.mlp.down_proj.weight"),
            randn(&mut rng, &[h, i], std(i))?,
        );
    }
    m.insert("model.norm.weight".to_string(), around_one(&mut rng, h)?);
    if !cfg.tie_word_embeddings {
        m.insert(
            "lm_head.weight".to_string(),
            randn(&mut rng, &[v, h], std(h))?,
        );
    }
    Ok(m)
}

impl WeightSource {
    /// A source over tensors already in memory (keyed by HF name).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        WeightSource::Safetensors {
            tensors,
            paths: vec![],
        }
    }
}

/// Writes `config.json` and `model.safetensors` into `dir`.
pub fn write_safetensors(
    dir: &Path,
    cfg: &LmConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let io = |source| LmError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let v = serde_json::to_value(cfg).map_err(|e| LmError::Invalid(e.to_string()))?;
    write_config_and_weights(dir, &v, tensors)
}

/// Writes `dir/config.json` (pretty JSON) and `dir/model.safetensors`; `dir` must exist.
pub(crate) fn write_config_and_weights(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let json = serde_json::to_string_pretty(config).map_err(|e| LmError::Invalid(e.to_string()))?;
    std::fs::write(dir.join("config.json"), json).map_err(|source| LmError::Io {
        path: dir.join("config.json"),
        source,
    })?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// Writes a GGUF (architecture `llama`, or `afm` when an AFM feature is on) with matrices
/// quantized to `dtype` and vectors in f32. Q/K weights are written as llama.cpp's converter
/// does for HF checkpoints only when `cfg.rope_interleaved` is false (then they are permuted
/// so the GGUF, which always rotates adjacent pairs, computes the same function).
pub fn write_gguf(
    path: &Path,
    cfg: &LmConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: GgmlDType,
) -> Result<()> {
    let afm = cfg.num_kv_reuse_layers > 0 || cfg.qk_norm || cfg.kv_quant;
    let arch = if afm { "afm" } else { "llama" };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut qs = Vec::new();
    for n in names {
        let mut t = tensors[n].clone();
        if !cfg.rope_interleaved && (n.ends_with("q_proj.weight") || n.ends_with("k_proj.weight")) {
            let heads = if n.ends_with("q_proj.weight") {
                cfg.num_attention_heads
            } else {
                cfg.num_kv_heads()
            };
            t = permute_for_interleaved(&t, heads)?;
        }
        qs.push((gguf_name(n), quantize_matrix(&t, dtype)?));
    }
    use gguf_file::Value as V;
    let u = |x: usize| V::U32(x as u32);
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
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
            V::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            V::F32(cfg.rope_theta as f32),
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
        md.push((format!("{arch}.afm.qk_norm"), V::Bool(cfg.qk_norm)));
        md.push((format!("{arch}.afm.kv_quant"), V::Bool(cfg.kv_quant)));
    }
    write_gguf_file(path, &md, &qs)
}

/// A matrix whose rows split into whole blocks of `dtype` is stored as `dtype`; vectors
/// (norm weights, scales) and odd-width matrices stay f32.
pub(crate) fn quantize_matrix(t: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    Ok(if t.rank() == 2 && t.dim(1)? % dtype.block_size() == 0 {
        QTensor::quantize(t, dtype)?
    } else {
        QTensor::quantize(t, GgmlDType::F32)?
    })
}

/// Writes metadata and tensors (already under their GGUF names) to `path`.
pub(crate) fn write_gguf_file(
    path: &Path,
    md: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|source| LmError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

/// llama.cpp's `permute` of HF Q/K rows: within each head, rows `[0..d/2)` and `[d/2..d)`
/// are interleaved so that rotating adjacent pairs equals HF's rotate-half.
///
/// # Shapes
/// `(heads * head_dim, in) -> (heads * head_dim, in)`.
pub fn permute_for_interleaved(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, 2, hd / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}
