//! # afm-vision
//!
//! The vision side of afm: a ViT encoder that loads SigLIP/CLIP-style checkpoints (global
//! attention) and runs the paper's Register-Window attention (see `attention.rs` for the
//! exact rule), with learned position embeddings resized bicubically to any grid.

pub mod attention;
pub mod bf16;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod image_io;
pub mod kernels;
pub mod objects;
pub mod preprocess;
pub mod random;
pub mod reader;
pub mod stem;
pub mod text_lines;
pub mod tiling;
pub mod vit;
pub mod weights;

/// The int8 matrix kernel of [`VisionEncoder::set_int8`] (it lives in `afm-lm`, which
/// uses it for safetensors language models too).
pub use afm_lm::int8;
pub use config::{AttentionPattern, VisionConfig};
pub use error::{Result, VisionError};
/// The `image` crate this crate decodes with (its `RgbImage` is the type images travel as).
pub use image;
pub use image_io::{decode_image, load_image, ImageLimits};
pub use preprocess::{Filter, Preprocess};
pub use tiling::{make_tiles, plan, ImagePlan, TilingConfig};
pub use vit::VisionEncoder;
