//! Guided generation: constrained decoding against a JSON Schema (or a Lark grammar), so the
//! output always parses and validates.
//!
//! The automaton is not hand-written: [`llguidance`] (MIT, guidance-ai) compiles the schema
//! to an Earley parser over a lazily built lexer and computes, for each step, the set of
//! tokens that keep the output on the grammar (a bit mask over the vocabulary). It is the
//! library llama.cpp, vLLM, SGLang and mistral.rs use for structured outputs, it supports the
//! JSON Schema subset this crate needs (properties in declaration order, required and
//! optional, `minItems`/`maxItems`, string `enum`/`pattern`/`minLength`/`maxLength`,
//! integer and number ranges, booleans, nested objects, `anyOf`, `$ref`/`$defs`), and it
//! costs microseconds per token. `outlines-core`, the alternative, precompiles a full
//! token-level index per schema (seconds for a nested schema on a 49k vocabulary) and
//! supports fewer keywords.
//!
//! The tokenizer glue is ours ([`TokenizerGlue`], ~40 lines) rather than the
//! `toktrie_hf_tokenizers` crate's: that crate pins `tokenizers` 0.21 while afm uses 0.22,
//! and it would compile a second copy of the tokenizer library. The glue reads every token's
//! bytes from the tokenizer's own `tokenizer.json` form ([`llguidance::token_bytes_from_tokenizer_json`])
//! and marks special tokens so a grammar never emits them.

use crate::error::{LmError, Result};
use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;

/// A tokenizer as llguidance sees it: the bytes of every token in a trie.
struct TokenizerGlue {
    trie: TokTrie,
    hf: tokenizers::Tokenizer,
}

impl TokenizerEnv for TokenizerGlue {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.hf
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// The per-tokenizer part of guided generation: the token trie and llguidance's parser
/// factory. Build it once per model (tens of milliseconds for a 49k vocabulary) and share it.
#[derive(Clone)]
pub struct GuideFactory {
    factory: Arc<ParserFactory>,
    vocab: usize,
    /// Tokens whose bytes start with an ASCII digit.
    digit_start: Arc<Vec<u32>>,
}

impl std::fmt::Debug for GuideFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuideFactory")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl GuideFactory {
    /// The factory for `tok` on a model whose logits are `vocab` wide (ids the tokenizer does
    /// not define are never allowed). `stop_ids` end the output once the grammar is complete
    /// (the tokenizer's eos and the chat template's end-of-turn token).
    pub fn new(tok: &Tokenizer, vocab: usize, stop_ids: &[u32]) -> Result<Self> {
        let json: Value = serde_json::from_str(
            &tok.inner()
                .to_string(false)
                .map_err(|e| LmError::Tokenizer(e.to_string()))?,
        )
        .map_err(|e| LmError::Tokenizer(e.to_string()))?;
        let mut bytes = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| {
            LmError::Tokenizer(format!(
                "guided generation needs a byte-level BPE or byte-fallback tokenizer: {e}"
            ))
        })?;
        if bytes.len() > vocab {
            return Err(LmError::Invalid(format!(
                "the tokenizer has {} tokens but the model's logits only {vocab}",
                bytes.len()
            )));
        }
        let digit_start: Vec<u32> = (0..bytes.len() as u32)
            .filter(|&i| {
                bytes[i as usize]
                    .first()
                    .is_some_and(|b| b.is_ascii_digit())
            })
            .collect();
        while bytes.len() < vocab {
            let mut name = format!(".<[{}]>", bytes.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            bytes.push(name);
        }
        let stops: Vec<u32> = stop_ids
            .iter()
            .copied()
            .filter(|&i| (i as usize) < vocab)
            .collect();
        let Some(&eos) = stops.first() else {
            return Err(LmError::Invalid(
                "guided generation needs an end-of-sequence token; the tokenizer defines none"
                    .into(),
            ));
        };
        let mut trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &bytes);
        if stops.len() > 1 {
            trie = trie.with_eos_tokens(&stops);
        }
        let env: TokEnv = Arc::new(TokenizerGlue {
            trie,
            hf: tok.inner().clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| LmError::Guided {
            reason: e.to_string(),
        })?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            vocab,
            digit_start: Arc::new(digit_start),
        })
    }

    /// A constraint that only lets JSON valid against `schema` through. Compact JSON (no
    /// whitespace between tokens), properties in the schema's order. An unsupported or
    /// unsatisfiable schema is an [`LmError::Schema`] here, before any decoding.
    pub fn json_schema(&self, schema: &Value) -> Result<Guide> {
        check_schema_shape(schema)?;
        let mut s = schema.clone();
        if let Some(o) = s.as_object_mut() {
            o.entry("x-guidance").or_insert_with(
                || serde_json::json!({"whitespace_flexible": false, "lenient": false}),
            );
        }
        let mut g = self.grammar(TopLevelGrammar::from_json_schema(s))?;
        g.json = Some(JsonScan::default());
        Ok(g)
    }

    /// A constraint from a Lark grammar (llguidance's dialect; `%json{...}` embeds a schema).
    pub fn lark(&self, grammar: &str) -> Result<Guide> {
        self.grammar(TopLevelGrammar::from_lark(grammar.to_string()))
    }

    fn grammar(&self, g: TopLevelGrammar) -> Result<Guide> {
        let parser = self
            .factory
            .create_parser(g)
            .map_err(|e| LmError::Schema(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(LmError::Schema(e));
        }
        Ok(Guide {
            matcher,
            vocab: self.vocab,
            text: Vec::new(),
            json: None,
            digit_start: self.digit_start.clone(),
        })
    }
}

/// Refuses schemas llguidance would read in a way the caller did not mean: the top level must
/// be a JSON object (or `true`).
fn check_schema_shape(schema: &Value) -> Result<()> {
    match schema {
        Value::Object(_) | Value::Bool(true) => Ok(()),
        other => Err(LmError::Schema(format!(
            "a JSON Schema is an object, got `{}`",
            crate::guided::short(other)
        ))),
    }
}

pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.floor_char_boundary(60)])
    } else {
        s
    }
}

/// The longest run of digits (a number's integer part, fraction or exponent) a JSON guide
/// lets through while the grammar allows something else: 20 digits hold every `u64` and more
/// precision than an `f64` has. Without it a random-weight model can write `0.333...` for
/// thousands of tokens, since JSON numbers are unbounded in length.
pub const MAX_NUMBER_DIGITS: usize = 20;

/// Where a JSON text is, byte by byte: inside a string or not, and the digits in a row.
#[derive(Debug, Clone, Default)]
struct JsonScan {
    in_str: bool,
    esc: bool,
    digits: usize,
}

impl JsonScan {
    fn push(&mut self, bytes: &[u8]) {
        for &c in bytes {
            if self.in_str {
                if self.esc {
                    self.esc = false;
                } else if c == b'\\' {
                    self.esc = true;
                } else if c == b'"' {
                    self.in_str = false;
                }
                continue;
            }
            if c.is_ascii_digit() {
                self.digits += 1;
            } else {
                self.digits = 0;
                self.in_str = c == b'"';
            }
        }
    }
}

/// The state of one constrained generation: which tokens may come next.
pub struct Guide {
    matcher: Matcher,
    vocab: usize,
    /// The bytes consumed so far.
    text: Vec<u8>,
    /// JSON guides: the scan that caps digit runs ([`MAX_NUMBER_DIGITS`]).
    json: Option<JsonScan>,
    digit_start: Arc<Vec<u32>>,
}

impl Guide {
    /// Sets the logits of every token the grammar forbids now to `-inf`.
    ///
    /// # Shapes
    /// `logits: vocab`.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<()> {
        if logits.len() != self.vocab {
            return Err(LmError::Invalid(format!(
                "logits are {} wide, the guide was built for {}",
                logits.len(),
                self.vocab
            )));
        }
        let mask = self.mask()?;
        apply_mask(&mask, logits);
        Ok(())
    }

    /// The allowed tokens now.
    pub fn mask(&mut self) -> Result<SimpleVob> {
        let mut m = self.matcher.compute_mask().map_err(|e| LmError::Guided {
            reason: e.to_string(),
        })?;
        if m.num_set() == 0 {
            return Err(LmError::Guided {
                reason: "no token can continue the output (the grammar is stuck)".into(),
            });
        }
        if self
            .json
            .as_ref()
            .is_some_and(|j| !j.in_str && j.digits >= MAX_NUMBER_DIGITS)
        {
            let mut capped = m.clone();
            for &t in self.digit_start.iter() {
                capped.disallow_token(t);
            }
            if capped.num_set() > 0 {
                m = capped;
            }
        }
        Ok(m)
    }

    /// Advances past a sampled token (an id the mask allowed).
    pub fn consume(&mut self, id: u32, tok_bytes: &[u8]) -> Result<()> {
        self.matcher
            .consume_token(id)
            .map_err(|e| LmError::Guided {
                reason: format!("token {id} was refused: {e}"),
            })?;
        self.text.extend_from_slice(tok_bytes);
        if let Some(j) = self.json.as_mut() {
            j.push(tok_bytes);
        }
        Ok(())
    }

    /// The grammar is complete and nothing more may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// The bytes of the tokens consumed so far.
    pub fn bytes(&self) -> &[u8] {
        &self.text
    }

    /// The byte string of a token as the grammar sees it.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.matcher.tok_env() {
            Ok(env) => env.tok_trie().decode_raw(&[id]),
            Err(_) => Vec::new(),
        }
    }
}

/// `-inf` at every token `mask` does not allow.
fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) {
    for (i, l) in logits.iter_mut().enumerate() {
        if !mask.is_allowed(i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// A snapshot of a partial JSON text as a value: open strings, arrays and objects closed, a
/// key without its value and an unfinished number or literal left out. `None` before the
/// first complete piece.
pub fn partial_json(text: &str) -> Option<Value> {
    // Walk the text, tracking the open containers; then close them.
    let mut stack: Vec<u8> = Vec::new();
    let mut in_str = false;
    let mut esc = false;
    // Byte index after the last point where the text can be cut and closed.
    let mut cut = 0usize;
    // Whether the innermost open object is waiting for a value after a key.
    let mut closers_at_cut: Vec<u8> = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
                cut = i + 1;
                closers_at_cut = stack.clone();
            }
            i += 1;
            continue;
        }
        match c {
            b'{' | b'[' => {
                stack.push(c);
                cut = i + 1;
                closers_at_cut = stack.clone();
            }
            b'}' | b']' => {
                stack.pop();
                cut = i + 1;
                closers_at_cut = stack.clone();
            }
            b'"' => in_str = true,
            b',' => {
                cut = i;
                closers_at_cut = stack.clone();
            }
            _ => {
                // the end of a number or literal is a cut point once the next separator comes
                if b.get(i + 1)
                    .is_some_and(|n| matches!(n, b',' | b'}' | b']'))
                {
                    cut = i + 1;
                    closers_at_cut = stack.clone();
                }
            }
        }
        i += 1;
    }
    let mut s = text[..cut].to_string();
    // an open string being written: keep what is there
    if in_str {
        let mut t = text.to_string();
        if esc {
            t.pop();
        }
        // a key (inside an object, before `:`) is dropped; a string value is closed
        if let Some(v) = close(&(t.clone() + "\""), &stack) {
            return Some(v);
        }
    }
    while s.ends_with(',') || s.ends_with(':') {
        s.pop();
    }
    // a dangling key (`{"a":1,"b"`) cannot be closed: drop it
    if let Some(v) = close(&s, &closers_at_cut) {
        return Some(v);
    }
    if let Some(p) = s.rfind([',', '{']) {
        let keep = if s.as_bytes()[p] == b'{' { p + 1 } else { p };
        return close(&s[..keep], &closers_at_cut);
    }
    None
}

fn close(text: &str, stack: &[u8]) -> Option<Value> {
    let mut s = text.to_string();
    for &c in stack.iter().rev() {
        while s.ends_with(',') {
            s.pop();
        }
        s.push(if c == b'{' { '}' } else { ']' });
    }
    serde_json::from_str(&s).ok()
}

#[cfg(test)]
mod tests {
    use super::partial_json;
    use serde_json::json;

    #[test]
    fn partial_json_closes_what_is_open() {
        assert_eq!(partial_json(""), None);
        assert_eq!(partial_json("{"), Some(json!({})));
        assert_eq!(partial_json("{\"a\""), Some(json!({})));
        assert_eq!(partial_json("{\"a\":"), Some(json!({})));
        assert_eq!(partial_json("{\"a\":\"he"), Some(json!({"a": "he"})));
        assert_eq!(partial_json("{\"a\":12"), Some(json!({})));
        assert_eq!(partial_json("{\"a\":12,"), Some(json!({"a": 12})));
        assert_eq!(
            partial_json("{\"a\":[1,2,{\"b\":tr"),
            Some(json!({"a": [1, 2, {}]}))
        );
        assert_eq!(
            partial_json("{\"a\":[true],\"c\":{\"d\":\"x\"}}"),
            Some(json!({"a": [true], "c": {"d": "x"}}))
        );
    }
}
