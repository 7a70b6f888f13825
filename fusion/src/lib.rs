//! # afm-fusion
//!
//! Joins the vision encoder (`afm-vision`) and any language model behind
//! [`afm_lm::LanguageModel`]: adapters that turn encoded tiles into image embeddings
//! (the paper's adapter and the Idefics3 / SmolVLM pixel-shuffle connector), the Idefics3 image processor and prompt
//! expansion, and [`Vlm`] with caption / ask / describe-screen / chat calls; the `afm-tiny`
//! prompt format ([`afm_prompt`]) and pipeline ([`AfmTiny`], over the export stage-2 training
//! writes). Both pipelines implement [`VisionLanguage`].

pub mod afm_adapter;
pub mod afm_prompt;
pub mod afm_tiny;
pub mod config;
pub mod connector;
pub mod error;
pub mod image_cache;
pub mod processor;
pub mod vlm;

pub use afm_adapter::{AfmAdapter, AfmAdapterConfig};
pub use afm_tiny::{AfmTiny, AfmTinyConfig, LmInfo};
pub use config::Idefics3Config;
pub use connector::{Adapter, PixelShuffleConnector};
pub use error::{FusionError, Result};
pub use processor::{Idefics3Processor, ImagePlan};
pub use vlm::{splice, Answer, AskOptions, ChatMessage, EncodedImage, Part, VisionLanguage, Vlm};
