//! Error type of the vision crate.

use std::path::PathBuf;

/// Everything that can go wrong loading images or running the encoder; every variant names
/// the file, field or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    BadImage { what: String, reason: String },
    #[error("{what}: image too large: {reason}")]
    TooLarge { what: String, reason: String },
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
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, VisionError>;

impl VisionError {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        VisionError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Reads a JSON file into `T`: an unreadable file is [`VisionError::Io`], text that does
/// not parse as `T` is [`VisionError::BadFile`] naming `format`.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    format: &'static str,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| VisionError::BadFile {
        path: path.to_path_buf(),
        format,
        reason: e.to_string(),
    })
}
