//! # afm-fusion
//!
//! Joins the vision encoder (`afm-vision`) and any language model behind
//! [`afm_lm::LanguageModel`] in one pipeline, [`Vlm`], generic over its parts, one file per
//! component:
//!
//! * image processors ([`ImageProcessor`], [`image_processor`]): the paper's planner
//!   ([`TileProcessor`], [`tile_processor`]: overview + tiles under a token budget) and
//!   Idefics3's ([`Idefics3Processor`], [`processor`]); both plan with the one [`ImagePlan`];
//! * adapters ([`VisionAdapter`], [`adapter`]): the paper's ([`AfmAdapter`], [`afm_adapter`])
//!   and Idefics3's pixel-shuffle connector ([`PixelShuffleConnector`], [`connector`]);
//! * the language model through [`afm_lm::LanguageModel`].
//!
//! SmolVLM / Idefics3 checkpoints ([`Vlm::load_idefics3`]) and the project's afm-tiny export
//! ([`Vlm::load_afm_tiny`], [`afm_tiny`], prompt format [`afm_prompt`]) are two
//! configurations of it; [`ModelDir`] tells them apart from a directory's `config.json` and
//! loads either, or only its image processor (plans without weights).

pub mod adapter;
pub mod afm_adapter;
pub mod afm_prompt;
pub mod afm_tiny;
pub mod config;
pub mod connector;
pub mod error;
pub mod grounded;
pub mod grounded_screen;
pub mod image_cache;
pub mod image_processor;
pub mod model_dir;
pub mod processor;
pub mod screen;
pub mod session;
pub mod tile_processor;
pub mod vlm;

/// The former name of [`VisionAdapter`].
pub use adapter::VisionAdapter as Adapter;
pub use adapter::VisionAdapter;
pub use afm_adapter::{AfmAdapter, AfmAdapterConfig};
pub use afm_tiny::{AfmTinyConfig, LmInfo};
pub use config::Idefics3Config;
pub use connector::PixelShuffleConnector;
pub use error::{FusionError, Result};
pub use image_processor::{ImagePlan, ImageProcessor, Processor};
pub use model_dir::ModelDir;
pub use processor::Idefics3Processor;
pub use screen::ScreenDescription;
pub use tile_processor::{TileProcessor, TilingSettings};
pub use vlm::{
    splice, Answer, AskOptions, ChatFormat, ChatMessage, EncodedImage, Part, Vlm, VlmParts,
};

// One loaded model serves many threads: checked at compile time.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Vlm<afm_lm::DeviceModel>>();
    send_sync::<ModelDir>();
    send_sync::<Processor>();
};
