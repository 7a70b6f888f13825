//! # afm-lm
//!
//! The language-model side of afm: the [`LanguageModel`] trait shared by every model, the
//! AFM on-device decoder [`DeviceModel`] with KV-cache sharing, loading from safetensors and
//! GGUF, tokenizers and chat templates, generation with the usual samplers, and
//! [`Session`]s with transcripts, KV reuse across turns, guided generation and tools.
//!
//! See `lm/README.md` for the checkpoint layout.

pub mod attention;
pub mod batch;
pub mod cache;
pub mod chat;
pub mod config;
pub mod device_model;
pub mod diff_model;
pub mod error;
pub mod generate;
pub mod gguf_check;
pub mod gguf_write;
pub mod guided;
pub mod int8;
pub mod isa;
pub mod kernels;
pub mod kv8;
pub mod linear;
pub mod load;
pub mod lora;
pub mod lowbit;
pub mod mlp;
pub mod model;
pub mod par;
pub mod perplexity;
pub mod quant;
pub mod quantize;
pub mod random;
pub mod rms_norm;
pub mod rope;
pub mod sampling;
pub mod server_checkpoint;
pub mod server_model;
pub mod session;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use cache::Cache;
pub use chat::Message;
pub use config::LmConfig;
pub use device_model::{DeviceModel, KvMode};
pub use error::{LmError, Result};
pub use generate::{generate, generate_from_embeds, GenerateOptions, Generation, StopReason};
pub use load::{Checkpoint, LoadOptions, ServerCheckpoint};
pub use lora::{LoraAdapter, LoraConfig, LoraMode, LoraTarget};
pub use model::{LanguageModel, LogitsFor, ModelInfo};
pub use sampling::SamplingParams;
pub use server_model::{ServerConfig, ServerModel};
pub use session::{
    schema_for, ChatModel, Entry, GenerationOptions, ImageAttachment, Prompt, Response, Segment,
    Session, TextChat, TextModel, Tool, ToolChoice, Transcript, TurnStats,
};
pub use tokenizer::Tokenizer;

// One loaded model serves many threads (a server, a batch): checked at compile time.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<DeviceModel>();
    send_sync::<ServerModel>();
    send_sync::<Tokenizer>();
    send_sync::<Checkpoint>();
    send_sync::<ServerCheckpoint>();
    send_sync::<LoraAdapter>();
};
