//! The `afm-tiny` prompt format: how an image and a question become the token sequence the
//! frozen language model reads, in training (`afm_train::adapter_train`) and at inference ([`crate::afm_tiny`]).
//! It lives here, in afm-fusion, so that inference does not depend on the training crate;
//! `afm_train::prompt` re-exports it.
//!
//! # Format
//! The language model's own chat template (SmolLM2's ChatML, rendered by
//! [`afm_lm::chat::render_chat`] with the tokenizer from the GGUF) over one user message,
//! with the generation prompt:
//!
//! ```text
//! <|im_start|>system
//! You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
//! <|im_start|>user
//! {P}{P}...{P}
//! {question}<|im_end|>
//! <|im_start|>assistant
//! ```
//!
//! (the system turn is the one SmolLM2's template inserts by itself when the chat has none).
//! The user message is `N` copies of the image placeholder `{P}` followed by `\n` and the
//! question; `N` is the number of image embeddings (tokens per image, e.g. 36 for a 6x6
//! pool). The placeholder is [`IMAGE_PLACEHOLDER`] = `<empty_output>`, a special token of
//! SmolLM2's vocabulary (id 16, a marker of its code pre-training data) that the chat never
//! produces; its embedding is replaced by the image embeddings, in order, so its own value
//! never matters. It is configurable (tests use the tiny fixture tokenizer's `<image>`); it
//! must be one token of the vocabulary, else [`PromptFormat::new`] fails naming it. After
//! tokenizing, the number of placeholder tokens must equal `N` (a question containing the
//! placeholder text is an error, not a silent shift of the image).
//!
//! A caption is asked for with the question [`CAPTION_PROMPT`] (`Describe the image.`).
//!
//! # Training sequences
//! `ids = encode(prompt) ++ encode(answer) ++ [<|im_end|>]`: the answer is tokenized on its
//! own (no BOS), exactly the tokens a greedy decoder emits after the prompt, followed by the
//! template's end-of-turn token. The loss is the cross-entropy of predicting each answer
//! token and the end-of-turn token (position `k - 1` predicts token `k`); the prompt,
//! placeholders included, carries no loss.
//!
//! Several questions about one image can share a sequence
//! ([`PromptFormat::conversation`]): the first turn is exactly the single-question sequence,
//! then each further question is a user turn of its own (text only, rendered by the
//! template) followed by its answer and end-of-turn token, which carry loss too. One pass of
//! the frozen LM then trains several answers, and multi-turn chat about an image is what it
//! learns.
//!
//! # Isolated turns
//! Packed turns see each other: a later question could be answered from an earlier answer
//! (or the caption from the answers before it) instead of from the image, and inference
//! asks one question, or the caption, alone. [`PromptFormat::isolated_turns`] packs the same
//! turns so that none sees another: the prefix every single-question sequence shares comes
//! once, then each turn's own tokens as a segment at the positions it has alone, with an
//! attention mask that lets a segment read only the prefix and itself
//! ([`afm_lm::diff_model::Packing`]). Each turn's loss is then exactly the loss of its
//! single-question sequence, at the cost of one pass.
//!
//! # Images of several views (tiling)
//! With a `tiling` section in its `config.json`, afm-tiny cuts an image into views
//! ([`crate::tile_processor::TileProcessor`]): the overview first (when the plan has one),
//! then the tiles row-major ([`view_order`]). Each view becomes `tokens_per_tile`
//! embeddings, and the image's `N` placeholders ([`image_expansion`]) are those embeddings
//! in that order, nothing between them: `N = plan.image_tokens`. Training builds identical
//! sequences by passing `plan.image_tokens` as `image_tokens` to [`PromptFormat`] and the
//! views of `TileProcessor::pixel_values` through the encoder and adapter in their order.
//! Without tiling an image is one view (the whole image resized to the encoder's size, as the
//! shipped model was trained), `N` = tokens per image.
//!
//! # Inference
//! [`crate::Vlm`] configured for afm-tiny ([`crate::Vlm::load_afm_tiny`]) renders exactly
//! this format ([`crate::vlm::ChatFormat::Text`]), splices the image embeddings over the
//! placeholders ([`crate::vlm::splice`]) and decodes until the end-of-turn token.

use crate::error::{FusionError, Result};
use crate::image_processor::ImagePlan;
use afm_lm::chat::{render_chat, Message};
use afm_lm::diff_model::Packing;
use afm_lm::Tokenizer;

/// The image placeholder of `afm-tiny` (a special token of SmolLM2's vocabulary).
pub const IMAGE_PLACEHOLDER: &str = "<empty_output>";

/// The question that asks for a caption.
pub const CAPTION_PROMPT: &str = "Describe the image.";

/// One encoder view of an image (module docs, "Images of several views").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The whole image in one view: the overview of a split plan, or the only view of an
    /// unsplit one.
    Whole,
    /// Tile `(row, col)` of the grid, 0-based.
    Tile { row: u32, col: u32 },
}

/// The views of a plan in afm-tiny's encoder and prompt order (the paper's planner,
/// [`crate::tile_processor::TileProcessor`]): the overview first (when the plan has one),
/// then the tiles row-major; an unsplit plan is one [`View::Whole`]. (Idefics3 puts its
/// global image last: [`crate::processor`].)
pub fn view_order(plan: &ImagePlan) -> Vec<View> {
    if !plan.is_split() {
        return vec![View::Whole];
    }
    let mut v = Vec::with_capacity(plan.tiles);
    if plan.overview {
        v.push(View::Whole);
    }
    for row in 0..plan.rows {
        for col in 0..plan.cols {
            v.push(View::Tile { row, col });
        }
    }
    v
}

/// The prompt text of one image under `plan`: `plan.tokens_per_tile` copies of
/// `placeholder` per view of [`view_order`], nothing between them, so `plan.image_tokens`
/// copies in all (what [`PromptFormat`] writes for `image_tokens = plan.image_tokens`).
pub fn image_expansion(placeholder: &str, plan: &ImagePlan) -> String {
    let views = view_order(plan).len();
    placeholder.repeat(views * plan.tokens_per_tile)
}

/// One training (or evaluation) sequence: one question and its answer
/// ([`PromptFormat::example`]), or several turns about the same image
/// ([`PromptFormat::conversation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Prompt, answer(s) and end-of-turn token ids.
    pub ids: Vec<u32>,
    /// Length of the first turn's prompt (what inference feeds for the first question).
    pub prompt_len: usize,
    /// `true` for the tokens that carry loss: every answer token and the end-of-turn token
    /// after it.
    pub loss: Vec<bool>,
    /// `None`: one causal sequence at positions `0..ids.len()`. `Some`: turns packed after a
    /// shared prefix, each seeing only the prefix and itself
    /// ([`PromptFormat::isolated_turns`]).
    pub packing: Option<Packing>,
}

impl Example {
    /// `true` for the tokens that carry loss (answers and their end-of-turn tokens).
    pub fn loss_mask(&self) -> Vec<bool> {
        self.loss.clone()
    }

    /// The target tokens, in order.
    pub fn targets(&self) -> Vec<u32> {
        self.ids
            .iter()
            .zip(&self.loss)
            .filter(|(_, &m)| m)
            .map(|(&i, _)| i)
            .collect()
    }
}

/// The prompt format over one tokenizer (module docs).
pub struct PromptFormat<'a> {
    tok: &'a Tokenizer,
    placeholder: String,
    placeholder_id: u32,
    end_of_turn: u32,
}

impl<'a> PromptFormat<'a> {
    /// Checks that `placeholder` is one token of the vocabulary, that the tokenizer has a
    /// chat template and that the template has an end-of-turn token.
    pub fn new(tok: &'a Tokenizer, placeholder: &str) -> Result<Self> {
        let placeholder_id = tok.token_to_id(placeholder).ok_or_else(|| {
            FusionError::Invalid(format!(
                "the image placeholder `{placeholder}` is not a token of the language model's vocabulary; pick one of its special tokens"
            ))
        })?;
        let enc = tok
            .inner()
            .encode(placeholder, false)
            .map_err(|e| FusionError::Invalid(format!("tokenizing `{placeholder}`: {e}")))?;
        if enc.get_ids() != [placeholder_id] {
            return Err(FusionError::Invalid(format!(
                "the image placeholder `{placeholder}` does not tokenize to the single token {placeholder_id} (got {:?}); pick a special token",
                enc.get_ids()
            )));
        }
        if tok.chat_template().is_none() {
            return Err(FusionError::Invalid(
                "the language model's tokenizer has no chat template".into(),
            ));
        }
        let end_of_turn = *afm_lm::chat::end_of_turn_ids(tok).first().ok_or_else(|| {
            FusionError::Invalid(
                "the chat template has no end-of-turn token (<|im_end|> or similar)".into(),
            )
        })?;
        Ok(Self {
            tok,
            placeholder: placeholder.to_string(),
            placeholder_id,
            end_of_turn,
        })
    }

    pub fn placeholder_id(&self) -> u32 {
        self.placeholder_id
    }

    pub fn end_of_turn_id(&self) -> u32 {
        self.end_of_turn
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.tok
    }

    /// The rendered prompt text for `question` over an image of `image_tokens` embeddings.
    pub fn prompt_text(&self, question: &str, image_tokens: usize) -> Result<String> {
        Ok(render_chat(
            self.tok,
            &[self.image_message(question, image_tokens)],
        )?)
    }

    /// The first user message: `image_tokens` placeholders, `\n`, the question.
    fn image_message(&self, question: &str, image_tokens: usize) -> Message {
        Message::user(format!(
            "{}\n{question}",
            self.placeholder.repeat(image_tokens)
        ))
    }

    /// The prompt's token ids; exactly `image_tokens` of them are the placeholder.
    pub fn prompt_ids(&self, question: &str, image_tokens: usize) -> Result<Vec<u32>> {
        if image_tokens == 0 {
            return Err(FusionError::Invalid(
                "an image must have at least one embedding".into(),
            ));
        }
        let ids = self
            .tok
            .encode(&self.prompt_text(question, image_tokens)?)?;
        self.check_placeholders(&ids, image_tokens)?;
        Ok(ids)
    }

    /// Errors unless `ids` hold exactly `image_tokens` placeholders.
    pub fn check_placeholders(&self, ids: &[u32], image_tokens: usize) -> Result<()> {
        let n = ids.iter().filter(|&&i| i == self.placeholder_id).count();
        if n != image_tokens {
            return Err(FusionError::Invalid(format!(
                "the sequence holds {n} image placeholders `{}` but the image has {image_tokens} embeddings (does the text contain the placeholder?)",
                self.placeholder
            )));
        }
        Ok(())
    }

    /// A training sequence: prompt, answer, end of turn (module docs).
    pub fn example(&self, question: &str, answer: &str, image_tokens: usize) -> Result<Example> {
        self.conversation(&[(question, answer)], image_tokens)
    }

    fn answer_ids(&self, question: &str, answer: &str) -> Result<Vec<u32>> {
        let ans =
            self.tok.inner().encode(answer, false).map_err(|e| {
                FusionError::Invalid(format!("tokenizing the answer `{answer}`: {e}"))
            })?;
        if ans.get_ids().is_empty() {
            return Err(FusionError::Invalid(format!(
                "the answer to `{question}` is empty"
            )));
        }
        Ok(ans.get_ids().to_vec())
    }

    /// A multi-turn training sequence about one image (module docs, "Training sequences"):
    /// the first user turn holds the image and `turns[0].0`, later user turns only their
    /// question; every answer and its end-of-turn token carry loss. The first turn is
    /// exactly [`Self::example`]`(turns[0])`. Turn `k`'s prompt is the template's rendering
    /// of the chat up to question `k`, which must extend the tokens so far (it does for
    /// ChatML, whose turn boundaries are special tokens); otherwise this errors rather than
    /// train on tokens inference would never see.
    pub fn conversation(&self, turns: &[(&str, &str)], image_tokens: usize) -> Result<Example> {
        if turns.is_empty() {
            return Err(FusionError::Invalid("a conversation needs a turn".into()));
        }
        let mut ids = self.prompt_ids(turns[0].0, image_tokens)?;
        let prompt_len = ids.len();
        let mut loss = vec![false; ids.len()];
        let mut msgs = vec![self.image_message(turns[0].0, image_tokens)];
        for (k, &(q, a)) in turns.iter().enumerate() {
            if k > 0 {
                msgs.push(Message::user(q));
                let p = self.tok.encode(&render_chat(self.tok, &msgs)?)?;
                if !p.starts_with(&ids) {
                    return Err(FusionError::Invalid(format!(
                        "the chat template's rendering of turn {k} does not extend the tokens of the turns before it"
                    )));
                }
                loss.resize(p.len(), false);
                ids = p;
            }
            ids.extend(self.answer_ids(q, a)?);
            ids.push(self.end_of_turn);
            loss.resize(ids.len(), true);
            msgs.push(Message::assistant(a));
        }
        self.check_placeholders(&ids, image_tokens)?;
        Ok(Example {
            ids,
            prompt_len,
            loss,
            packing: None,
        })
    }

    /// Several questions about one image, each trained exactly as if asked alone
    /// ([`Self::example`]), in one sequence (module docs, "Isolated turns"): the tokens all
    /// the single-question sequences share (system turn, image, up to the question) come
    /// once, then each turn's remaining tokens (question, answer, end of turn) as a segment of
    /// its own, at the positions it has alone, attending only to the shared prefix and
    /// itself ([`Packing`]). No answer can be copied from another turn's answer, which is the
    /// condition inference asks under.
    pub fn isolated_turns(&self, turns: &[(&str, &str)], image_tokens: usize) -> Result<Example> {
        let singles = turns
            .iter()
            .map(|&(q, a)| self.example(q, a, image_tokens))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = singles.first() else {
            return Err(FusionError::Invalid("a conversation needs a turn".into()));
        };
        // shared: common to every sequence, and short of every prompt's last token, so that
        // each segment's first answer token is predicted from its own segment
        let mut c = singles
            .iter()
            .map(|e| e.prompt_len)
            .min()
            .unwrap_or(0)
            .saturating_sub(1);
        for e in &singles[1..] {
            let common = first
                .ids
                .iter()
                .zip(&e.ids)
                .take_while(|(a, b)| a == b)
                .count();
            c = c.min(common);
        }
        let last_image = first
            .ids
            .iter()
            .rposition(|&i| i == self.placeholder_id)
            .unwrap_or(0);
        if c <= last_image {
            return Err(FusionError::Invalid(
                "the questions' prompts differ before the end of the image: no shared prefix to pack them after".into(),
            ));
        }
        let mut ex = Example {
            ids: first.ids[..c].to_vec(),
            prompt_len: first.prompt_len,
            loss: vec![false; c],
            packing: Some(Packing {
                positions: (0..c as u32).collect(),
                segments: vec![0; c],
            }),
        };
        let p = ex.packing.as_mut().expect("set above");
        for (k, e) in singles.iter().enumerate() {
            ex.ids.extend_from_slice(&e.ids[c..]);
            ex.loss.extend_from_slice(&e.loss[c..]);
            p.positions.extend(c as u32..e.ids.len() as u32);
            p.segments
                .extend(std::iter::repeat_n(k as u32 + 1, e.ids.len() - c));
        }
        Ok(ex)
    }
}
