//! Error type of the language-model crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a language model.
///
/// Every variant names the file, tensor or field at fault, so a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid {format} file: {reason}")]
    BadFile {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("config field `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("config: {0}")]
    Json(String),
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the prompt is {tokens} tokens (image tokens and earlier turns included), but the model's context holds {context} tokens{}; shorten the prompt (generation stops at the end of the context, so fewer new tokens would not help)", if *reserved > 0 { format!(" and generation needs {reserved} more") } else { String::new() })]
    PromptTooLong {
        tokens: usize,
        context: usize,
        reserved: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadTokenId { id: u32, vocab: usize },
    #[error("LoRA adapter belongs to the base model with sha256 {adapter_base}, but this base model has sha256 {model_base}; an adapter only works on the weights it was trained on")]
    LoraBaseMismatch {
        adapter_base: String,
        model_base: String,
    },
    /// A JSON Schema guided generation cannot use (unsupported keyword, unsatisfiable,
    /// malformed), found before any decoding.
    #[error("JSON Schema: {0}")]
    Schema(String),
    #[error("guided generation: {reason}")]
    Guided { reason: String },
    #[error("the answer does not deserialise into `{ty}`: {reason}")]
    Deserialize { ty: String, reason: String },
    /// The session's tool loop ran out of its budget of calls in one turn.
    #[error("the model made {calls} tool calls in one turn, the limit is {limit}")]
    ToolLimit { calls: usize, limit: usize },
    /// An error from the model behind a session (a vision-language pipeline, for instance).
    #[error(transparent)]
    Model(Box<dyn std::error::Error + Send + Sync>),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, LmError>;

impl LmError {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        LmError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
