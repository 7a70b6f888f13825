//! The `afm-tiny` prompt format, shared by training and inference: defined (and documented:
//! format, training sequences, inference) in [`afm_fusion::afm_prompt`], re-exported here so
//! that training code keeps using `afm_train::prompt`.
//!
//! In short: SmolLM2's ChatML over one user message of `N` image placeholders
//! ([`IMAGE_PLACEHOLDER`] = `<empty_output>`), `\n` and the question; the image embeddings
//! replace the placeholders; a training sequence is prompt ++ answer ++ `<|im_end|>`, with
//! loss on the answer and the end-of-turn token only.

pub use afm_fusion::afm_prompt::{Example, PromptFormat, CAPTION_PROMPT, IMAGE_PLACEHOLDER};
