//! Error type of the fusion crate.

use std::path::PathBuf;

/// Everything that can go wrong assembling or running a vision-language request; every
/// variant names the file, field or count at fault.
#[derive(Debug, thiserror::Error)]
pub enum FusionError {
    #[error(transparent)]
    Lm(#[from] afm_lm::LmError),
    #[error(transparent)]
    Vision(#[from] afm_vision::VisionError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
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
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("the prompt has {placeholders} image placeholder tokens but the images give {embeddings} image embeddings")]
    PlaceholderMismatch {
        placeholders: usize,
        embeddings: usize,
    },
    #[error("{path}: not the language model this afm-tiny export was trained against: {reason}")]
    LmMismatch { path: PathBuf, reason: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, FusionError>;

impl FusionError {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FusionError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
