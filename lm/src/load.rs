//! Opening checkpoints from local paths: a GGUF file, or a directory (or file) of safetensors
//! with a `config.json`. The library never touches the network.

use crate::config::{LmConfig, TokenIds};
use crate::device_model::DeviceModel;
use crate::error::{LmError, Result};
use crate::weights::WeightSource;
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The files a checkpoint path resolves to.
#[derive(Debug, Clone)]
pub enum CheckpointFiles {
    Gguf(PathBuf),
    Safetensors {
        config: PathBuf,
        weights: Vec<PathBuf>,
        dir: PathBuf,
    },
}

impl CheckpointFiles {
    /// Resolves `path`: a `.gguf` file; a `.safetensors` file with `config.json` beside it;
    /// or a directory holding `config.json` and `*.safetensors` (or one `.gguf`).
    pub fn resolve(path: &Path) -> Result<Self> {
        let io = |source| LmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_file() {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            return match ext {
                "gguf" => Ok(Self::Gguf(path.to_path_buf())),
                "safetensors" => {
                    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                    Ok(Self::Safetensors {
                        config: dir.join("config.json"),
                        weights: vec![path.to_path_buf()],
                        dir,
                    })
                }
                _ => {
                    // Sniff the magic so a renamed GGUF still loads.
                    let mut head = [0u8; 4];
                    use std::io::Read;
                    let n = std::fs::File::open(path)
                        .and_then(|mut f| f.read(&mut head))
                        .map_err(io)?;
                    if n == 4 && &head == b"GGUF" {
                        Ok(Self::Gguf(path.to_path_buf()))
                    } else {
                        Err(LmError::BadFile {
                            path: path.to_path_buf(),
                            format: "model",
                            reason: "expected a .gguf or .safetensors file, or a model directory"
                                .into(),
                        })
                    }
                }
            };
        }
        let mut st = Vec::new();
        let mut gg = Vec::new();
        for e in std::fs::read_dir(path).map_err(io)? {
            let p = e.map_err(io)?.path();
            match p.extension().and_then(|e| e.to_str()) {
                Some("safetensors") => st.push(p),
                Some("gguf") => gg.push(p),
                _ => {}
            }
        }
        st.sort();
        gg.sort();
        if !st.is_empty() {
            return Ok(Self::Safetensors {
                config: path.join("config.json"),
                weights: st,
                dir: path.to_path_buf(),
            });
        }
        match gg.len() {
            1 => Ok(Self::Gguf(gg.remove(0))),
            0 => Err(LmError::BadFile {
                path: path.to_path_buf(),
                format: "model directory",
                reason: "no .safetensors or .gguf file in it".into(),
            }),
            _ => Err(LmError::BadFile {
                path: path.to_path_buf(),
                format: "model directory",
                reason: format!("{} .gguf files; name the one to load", gg.len()),
            }),
        }
    }
}

/// Reads a GGUF metadata value as usize, naming the key on failure.
fn meta_usize(md: &HashMap<String, Value>, key: &str) -> Result<Option<usize>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map(|x| Some(x as usize))
            .map_err(|e| LmError::config(key, e.to_string())),
    }
}

fn meta_f64(md: &HashMap<String, Value>, key: &str) -> Result<Option<f64>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map(Some)
            .map_err(|e| LmError::config(key, e.to_string())),
    }
}

fn meta_bool(md: &HashMap<String, Value>, key: &str) -> Result<bool> {
    match md.get(key) {
        None => Ok(false),
        Some(v) => v.to_bool().map_err(|e| LmError::config(key, e.to_string())),
    }
}

/// Builds an `LmConfig` from GGUF metadata (llama.cpp keys under `{arch}.`, plus the AFM
/// extension keys `{arch}.afm.kv_reuse_layers`, `{arch}.afm.qk_norm`, `{arch}.afm.kv_quant`).
pub fn config_from_gguf(src: &WeightSource) -> Result<LmConfig> {
    let md = src
        .gguf_metadata()
        .ok_or_else(|| LmError::Invalid("not a GGUF source".into()))?;
    let arch = match md.get("general.architecture") {
        Some(v) => v
            .to_string()
            .map_err(|e| LmError::config("general.architecture", e.to_string()))?
            .clone(),
        None => return Err(LmError::config("general.architecture", "missing")),
    };
    if arch != "llama" && arch != "afm" {
        return Err(LmError::config(
            "general.architecture",
            format!("`{arch}` is not supported (llama, afm)"),
        ));
    }
    let req = |k: &str| -> Result<usize> {
        let key = format!("{arch}.{k}");
        meta_usize(md, &key)?.ok_or_else(|| LmError::config(key, "missing"))
    };
    let embd_rows = |name: &str| -> Option<usize> {
        match src {
            WeightSource::Gguf { content, .. } => {
                match crate::gguf_write::lowbit_meta(&content.metadata, name) {
                    Ok(Some((_, _, rows, _))) => Some(rows),
                    _ => content.tensor_infos.get(name).map(|i| i.shape.dims()[0]),
                }
            }
            _ => None,
        }
    };
    let vocab = match meta_usize(md, &format!("{arch}.vocab_size"))? {
        Some(v) => v,
        None => embd_rows("token_embd.weight").ok_or_else(|| LmError::MissingTensor {
            name: "token_embd.weight".into(),
        })?,
    };
    let n_heads = req("attention.head_count")?;
    let eos = meta_usize(md, "tokenizer.ggml.eos_token_id")?.map(|x| TokenIds::One(x as u32));
    let cfg = LmConfig {
        vocab_size: vocab,
        hidden_size: req("embedding_length")?,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads: n_heads,
        num_key_value_heads: Some(
            meta_usize(md, &format!("{arch}.attention.head_count_kv"))?.unwrap_or(n_heads),
        ),
        head_dim: meta_usize(md, &format!("{arch}.attention.key_length"))?,
        rms_norm_eps: meta_f64(md, &format!("{arch}.attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: meta_f64(md, &format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0),
        max_position_embeddings: req("context_length")?,
        tie_word_embeddings: !src.contains("lm_head.weight"),
        bos_token_id: meta_usize(md, "tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
        eos_token_id: eos,
        num_kv_reuse_layers: meta_usize(md, &format!("{arch}.afm.kv_reuse_layers"))?.unwrap_or(0),
        qk_norm: meta_bool(md, &format!("{arch}.afm.qk_norm"))?,
        // llama.cpp's converter permutes Q/K so that GGUF llama models rotate adjacent pairs.
        rope_interleaved: true,
        kv_quant: meta_bool(md, &format!("{arch}.afm.kv_quant"))?,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// How to load a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Expand quantized GGUF matrices to f32 (reference comparisons; slower, more memory).
    pub dequantize: bool,
    /// Override the context length (e.g. to bound memory).
    pub context_length: Option<usize>,
    /// An afm LoRA adapter file to apply ([`crate::lora`]); it must have been made for this
    /// very checkpoint (its sha256 is computed and compared).
    pub lora: Option<PathBuf>,
    /// How to apply `lora` (default: merged into dense matrices, unmerged on quantized ones).
    pub lora_mode: crate::lora::LoraMode,
}

impl LoadOptions {
    fn apply(&self, mut cfg: LmConfig) -> Result<LmConfig> {
        if let Some(n) = self.context_length {
            cfg.max_position_embeddings = n;
            cfg.validate()?;
        }
        Ok(cfg)
    }
}

impl DeviceModel {
    /// Loads a model (no tokenizer needed) from a local path (see `CheckpointFiles::resolve`).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Self> {
        load_model(&CheckpointFiles::resolve(path)?, opts)
    }
}

fn load_model(files: &CheckpointFiles, opts: &LoadOptions) -> Result<DeviceModel> {
    let mut model = load_base(files, opts)?;
    if let Some(p) = &opts.lora {
        let adapter = crate::lora::LoraAdapter::load(p)?;
        let sha = crate::lora::files_sha256(files)?;
        model.apply_lora(&adapter, &sha, opts.lora_mode)?;
    }
    Ok(model)
}

fn load_base(files: &CheckpointFiles, opts: &LoadOptions) -> Result<DeviceModel> {
    match files {
        CheckpointFiles::Gguf(p) => {
            let src = WeightSource::from_gguf(p)?.with_dequantize(opts.dequantize);
            let cfg = opts.apply(config_from_gguf(&src)?)?;
            DeviceModel::from_source(&src, cfg)
        }
        CheckpointFiles::Safetensors {
            config, weights, ..
        } => {
            let cfg = opts.apply(LmConfig::from_file(config)?)?;
            let src = WeightSource::from_safetensors(weights)?;
            DeviceModel::from_source(&src, cfg)
        }
    }
}

/// The checkpoint's tokenizer, with the chat template's end-of-turn token among the stop ids.
fn load_tokenizer(files: &CheckpointFiles) -> Result<crate::tokenizer::Tokenizer> {
    let mut tokenizer = match files {
        CheckpointFiles::Gguf(p) => {
            let src = WeightSource::from_gguf(p)?;
            crate::tokenizer::Tokenizer::from_gguf(src.gguf_metadata().expect("gguf source"))?
        }
        CheckpointFiles::Safetensors { dir, .. } => crate::tokenizer::Tokenizer::from_dir(dir)?,
    };
    for id in crate::chat::end_of_turn_ids(&tokenizer) {
        tokenizer.add_eos_id(id);
    }
    Ok(tokenizer)
}

/// A model and its tokenizer, as one checkpoint path provides them.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub model: DeviceModel,
    pub tokenizer: crate::tokenizer::Tokenizer,
}

impl Checkpoint {
    /// Loads model and tokenizer: for GGUF the tokenizer is rebuilt from the file's metadata,
    /// for a safetensors directory it is `tokenizer.json` (+ `tokenizer_config.json`).
    /// The chat template's end-of-turn token is added to the stop ids.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let files = CheckpointFiles::resolve(path)?;
        let mut tokenizer = load_tokenizer(&files)?;
        let model = load_model(&files, opts)?;
        if let Some(eos) = &model.config().eos_token_id {
            for id in eos.to_vec() {
                tokenizer.add_eos_id(id);
            }
        }
        Ok(Self { model, tokenizer })
    }
}

/// A server (PT-MoE) model and its tokenizer, as one checkpoint path provides them (see
/// `server_checkpoint` for the layout).
#[derive(Debug, Clone)]
pub struct ServerCheckpoint {
    pub model: crate::server_model::ServerModel,
    pub tokenizer: crate::tokenizer::Tokenizer,
}

impl ServerCheckpoint {
    /// As [`Checkpoint::load`], for a server model.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let files = CheckpointFiles::resolve(path)?;
        let tokenizer = load_tokenizer(&files)?;
        let model = crate::server_checkpoint::load_server(&files, opts)?;
        Ok(Self { model, tokenizer })
    }
}
