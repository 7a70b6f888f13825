//! Tokenizers: from a HF `tokenizer.json` (+ `tokenizer_config.json`) or rebuilt from GGUF
//! metadata (`tokenizer.ggml.*`), with the chat template the checkpoint defines.

use crate::error::{LmError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// A tokenizer plus the special-token facts generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos: Vec<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> LmError {
    LmError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present beside it, `tokenizer_config.json` (chat
    /// template, bos/eos tokens, `add_bos_token`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| LmError::BadFile {
            path: tj.clone(),
            format: "tokenizer.json",
            reason: e.to_string(),
        })?;
        let mut t = Self {
            inner,
            bos: None,
            add_bos: false,
            eos: vec![],
            chat_template: None,
        };
        let tc = dir.join("tokenizer_config.json");
        if tc.exists() {
            let text = std::fs::read_to_string(&tc).map_err(|source| LmError::Io {
                path: tc.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LmError::BadFile {
                    path: tc.clone(),
                    format: "tokenizer_config.json",
                    reason: e.to_string(),
                })?;
            let tok = |key: &str| -> Option<u32> {
                let s = match v.get(key)? {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                    _ => return None,
                };
                t.inner.token_to_id(&s)
            };
            t.bos = tok("bos_token");
            t.eos = tok("eos_token").into_iter().collect();
            t.add_bos = v
                .get("add_bos_token")
                .and_then(|b| b.as_bool())
                .unwrap_or(false);
            t.chat_template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|e| e.get("template")?.as_str().map(String::from)),
                _ => None,
            };
        }
        Ok(t)
    }

    /// Rebuilds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model = gpt2`):
    /// tokens, merges, token types (control and user-defined tokens become added tokens),
    /// bos/eos ids, `add_bos_token` and `tokenizer.chat_template`.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let get_str = |k: &str| -> Result<Option<String>> {
            md.get(k)
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| LmError::config(k, e.to_string()))
                })
                .transpose()
        };
        let model = get_str("tokenizer.ggml.model")?.unwrap_or_default();
        if model != "gpt2" {
            return Err(LmError::config(
                "tokenizer.ggml.model",
                format!("`{model}` tokenizers are not supported from GGUF (only byte-level BPE `gpt2`); pass a tokenizer.json"),
            ));
        }
        let list = |k: &str| -> Result<&Vec<Value>> {
            md.get(k)
                .ok_or_else(|| LmError::config(k, "missing"))?
                .to_vec()
                .map_err(|e| LmError::config(k, e.to_string()))
        };
        let tokens = list("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| LmError::config("tokenizer.ggml.tokens", e.to_string()))?;
        let merges = list("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = v
                    .to_string()
                    .map_err(|e| LmError::config("tokenizer.ggml.merges", e.to_string()))?;
                s.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        LmError::config(
                            "tokenizer.ggml.merges",
                            format!("entry {i} `{s}` is not `a b`"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| LmError::config("tokenizer.ggml.token_type", e.to_string()))?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tk_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = get_str("tokenizer.ggml.pre")?.unwrap_or_default();
        let byte_level = ByteLevel::new(false, true, true);
        // llama.cpp's `smollm` pre-tokenizer splits digits individually before the GPT-2
        // regex, as SmolLM2's tokenizer.json does (Digits + ByteLevel).
        let pre_tok: PreTokenizerWrapper = if pre == "smollm" {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevel::default()));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(t, &ty)| AddedToken::from(t.clone(), ty == 3))
            .collect();
        inner.add_special_tokens(&added);
        let id = |k: &str| -> Result<Option<u32>> {
            md.get(k)
                .map(|v| v.to_u32().map_err(|e| LmError::config(k, e.to_string())))
                .transpose()
        };
        let n = tokens.len() as u32;
        let check = |k: &str, v: Option<u32>| -> Result<Option<u32>> {
            match v {
                Some(x) if x >= n => Err(LmError::config(
                    k,
                    format!("id {x} is outside the {n}-token vocabulary"),
                )),
                v => Ok(v),
            }
        };
        Ok(Self {
            inner,
            bos: check(
                "tokenizer.ggml.bos_token_id",
                id("tokenizer.ggml.bos_token_id")?,
            )?,
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            eos: check(
                "tokenizer.ggml.eos_token_id",
                id("tokenizer.ggml.eos_token_id")?,
            )?
            .into_iter()
            .collect(),
            chat_template: get_str("tokenizer.chat_template")?,
        })
    }

    /// Encodes text. Special tokens written in the text (`<|im_start|>`) are recognised,
    /// as chat templates need. A BOS token is prepended when the checkpoint asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tk_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tk_err)
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence ids (the checkpoint's eos token, plus any the caller added).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Adds stop ids (for instance the chat template's end-of-turn token).
    pub fn add_eos_id(&mut self, id: u32) {
        if !self.eos.contains(&id) {
            self.eos.push(id);
        }
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn set_chat_template(&mut self, t: Option<String>) {
        self.chat_template = t;
    }

    /// The inner HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns a growing list of token ids into text pieces that are always whole UTF-8
/// characters, even when a character spans several byte-level tokens.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    /// `ids[..start]` are fully emitted and never re-decoded.
    start: usize,
    /// Characters of `decode(ids[start..])` already emitted.
    emitted: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new complete text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids[self.start..], true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None); // an incomplete multi-byte character: wait for more bytes
        }
        let new: String = text.chars().skip(self.emitted).collect();
        self.emitted += new.chars().count();
        // Keep the decode window short: restart after a few whole tokens.
        if self.ids.len() - self.start > 16 {
            self.start = self.ids.len();
            self.emitted = 0;
        }
        Ok((!new.is_empty()).then_some(new))
    }

    /// Whatever is left (an incomplete character is emitted lossily at the end).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let text = tok.decode(&self.ids[self.start..], true)?;
        let new: String = text.chars().skip(self.emitted).collect();
        self.start = self.ids.len();
        self.emitted = 0;
        Ok((!new.is_empty()).then_some(new))
    }
}
