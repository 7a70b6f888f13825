//! The tiny random-weight chat model the session tests share.

use afm_lm::random::random_tensors;
use afm_lm::session::TextModel;
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, LmConfig, Tokenizer};
use std::path::PathBuf;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A 2-layer random model over the tiny SmolVLM fixture's 451-token byte-level tokenizer,
/// with a ChatML template, on int8 kernels.
pub fn tiny(ctx: usize, seed: u64) -> TextModel<DeviceModel> {
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_idefics3");
    let mut tokenizer = Tokenizer::from_dir(&fx).unwrap();
    tokenizer.set_chat_template(Some(CHATML.to_string()));
    let c = LmConfig {
        vocab_size: 512,
        max_position_embeddings: ctx,
        ..afm_lm::testing::tiny_llama()
    };
    let mut model = DeviceModel::from_source(
        &WeightSource::from_tensors(random_tensors(&c, seed).unwrap()),
        c,
    )
    .unwrap();
    // int8 kernels: afm's own, per-token cheap (dense f32 goes through candle's matmul)
    model.set_int8(true).unwrap();
    TextModel { model, tokenizer }
}
