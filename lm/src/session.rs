//! Sessions: the programming model of Apple's Foundation Models framework over every model
//! afm runs.
//!
//! A [`Session`] holds a [`Transcript`] (instructions, prompts with image attachments,
//! responses, tool calls and their outputs; it round-trips through serde) and the K/V cache of
//! the conversation so far. Each turn renders the whole transcript with the model's chat
//! template, keeps the longest prefix of cached positions whose tokens (and images) are
//! unchanged, and prefills only the rest: a follow-up question re-encodes no image and
//! re-prefills no earlier turn, and the result equals a from-scratch run of the whole
//! conversation. Guided generation ([`Session::respond_as`], [`Session::respond_to_schema`])
//! constrains decoding to a JSON Schema ([`crate::guided`]); tools ([`Tool`]) let the model
//! call code.
//!
//! Any model takes part through [`ChatModel`]: the text models here ([`crate::Checkpoint`],
//! [`crate::ServerCheckpoint`], [`TextModel`]) and, in `afm-fusion`, the vision-language
//! pipelines, which add images.

use crate::cache::Cache;
use crate::chat::{end_of_turn_ids, render_chat, Message};
use crate::error::{LmError, Result};
use crate::generate::{GenerateOptions, StopReason};
use crate::guided::{partial_json, Guide, GuideFactory};
use crate::model::{LanguageModel, LogitsFor};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer};
use candle_core::Tensor;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// An image attached to a prompt: RGB8 pixels, identified by their sha256.
///
/// The pixels are not serialised (a transcript stays small); `path`, when set, lets a restored
/// transcript load them again. A model needs them only to prefill positions that are not in
/// the session's cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageAttachment {
    /// sha256 of the width, height and pixels, hex.
    pub key: String,
    pub width: u32,
    pub height: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Budget of image tokens for this image (`None`: the image processor's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// `width * height * 3` bytes, row-major RGB.
    #[serde(skip)]
    pub rgb: Option<Arc<Vec<u8>>>,
}

impl PartialEq for ImageAttachment {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key && self.width == o.width && self.height == o.height
    }
}

impl ImageAttachment {
    /// An image from its RGB8 pixels (`width * height * 3` bytes, row-major).
    pub fn from_rgb(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || rgb.len() != width as usize * height as usize * 3 {
            return Err(LmError::Invalid(format!(
                "an image attachment of {width}x{height} needs {} RGB bytes, got {}",
                width as usize * height as usize * 3,
                rgb.len()
            )));
        }
        let mut h = Sha256::new();
        h.update(width.to_le_bytes());
        h.update(height.to_le_bytes());
        h.update(&rgb);
        let key = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            key,
            width,
            height,
            path: None,
            max_tokens: None,
            rgb: Some(Arc::new(rgb)),
        })
    }

    /// Sets the budget of image tokens.
    pub fn with_max_tokens(mut self, n: Option<usize>) -> Self {
        self.max_tokens = n;
        self
    }

    /// Records the file the pixels came from (a restored transcript reloads it).
    pub fn with_path(mut self, p: impl Into<PathBuf>) -> Self {
        self.path = Some(p.into());
        self
    }
}

/// A piece of a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Segment {
    Text(String),
    Image(ImageAttachment),
}

/// One entry of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// The system instructions (first entry, at most one).
    Instructions { text: String },
    /// The user's prompt: text and images.
    Prompt { segments: Vec<Segment> },
    /// The model's answer (JSON text for guided generation).
    Response { text: String },
    /// The model asked for a tool.
    ToolCall { name: String, arguments: Value },
    /// What the tool returned, or its error (given back to the model).
    ToolOutput {
        name: String,
        output: String,
        is_error: bool,
    },
}

/// The conversation of a session; serialise it to keep a conversation, and
/// [`Session::from_transcript`] to go on with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    pub entries: Vec<Entry>,
}

impl Transcript {
    /// The chat messages of the transcript; `image` gives the text an image becomes (its
    /// prompt expansion), or an error for a model without vision.
    pub fn messages(
        &self,
        image: &mut dyn FnMut(&ImageAttachment) -> Result<String>,
    ) -> Result<Vec<Message>> {
        let mut out = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            out.push(match e {
                Entry::Instructions { text } => Message::system(text.clone()),
                Entry::Prompt { segments } => {
                    let mut s = String::new();
                    for seg in segments {
                        match seg {
                            Segment::Text(t) => s.push_str(t),
                            Segment::Image(i) => s.push_str(&image(i)?),
                        }
                    }
                    Message::user(s)
                }
                Entry::Response { text } => Message::assistant(text.clone()),
                Entry::ToolCall { name, arguments } => {
                    Message::assistant(tool_call_json(name, arguments))
                }
                Entry::ToolOutput {
                    name,
                    output,
                    is_error,
                } => Message::new(
                    "tool",
                    if *is_error {
                        format!("{name} failed: {output}")
                    } else {
                        format!("{name}: {output}")
                    },
                ),
            });
        }
        Ok(out)
    }

    /// The images attached so far, in order.
    pub fn images(&self) -> impl Iterator<Item = &ImageAttachment> {
        self.entries.iter().flat_map(|e| match e {
            Entry::Prompt { segments } => segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Image(i) => Some(i),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        })
    }
}

/// The JSON a tool call is written as (and the model asked to write).
fn tool_call_json(name: &str, arguments: &Value) -> String {
    serde_json::json!({"tool": name, "arguments": arguments}).to_string()
}

/// A rendered conversation: token ids (image tokens expanded) and where the images are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderedPrompt {
    pub ids: Vec<u32>,
    pub images: Vec<ImageSpan>,
}

/// The positions `start .. start + len` of a prompt hold the embeddings of image `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpan {
    pub start: usize,
    pub len: usize,
    pub key: String,
}

/// A model a [`Session`] can run: a language model, its tokenizer, and how a transcript
/// becomes input (text models render the chat template; a vision-language model also expands
/// and embeds images).
pub trait ChatModel: Send + Sync {
    fn language_model(&self) -> &dyn LanguageModel;
    fn tokenizer(&self) -> &Tokenizer;

    /// Token ids that end the assistant's turn: the eos ids and the template's end-of-turn.
    fn stop_ids(&self) -> Vec<u32> {
        let t = self.tokenizer();
        let mut v: Vec<u32> = t.eos_ids().to_vec();
        for id in end_of_turn_ids(t) {
            if !v.contains(&id) {
                v.push(id);
            }
        }
        v
    }

    /// The transcript with the template's generation prompt, as token ids. The default
    /// renders text; a model without vision refuses images.
    fn render(&self, transcript: &Transcript) -> Result<RenderedPrompt> {
        let msgs = transcript.messages(&mut |_| {
            Err(LmError::Invalid(
                "this model takes no images; use a vision-language model for image attachments"
                    .into(),
            ))
        })?;
        let text = render_chat(self.tokenizer(), &msgs)?;
        Ok(RenderedPrompt {
            ids: self.tokenizer().encode(&text)?,
            images: vec![],
        })
    }

    /// Input embeddings of `prompt.ids[range]`. The default embeds tokens and refuses image
    /// positions.
    ///
    /// # Shapes
    /// `-> (range.len(), hidden)`.
    fn embed(
        &self,
        transcript: &Transcript,
        prompt: &RenderedPrompt,
        range: Range<usize>,
    ) -> Result<Tensor> {
        let _ = transcript;
        if prompt
            .images
            .iter()
            .any(|s| s.start < range.end && s.start + s.len > range.start)
        {
            return Err(LmError::Invalid(
                "this model cannot embed images".to_string(),
            ));
        }
        self.language_model().embed_tokens(&prompt.ids[range])
    }
}

/// Any language model with its tokenizer, as a [`ChatModel`].
pub struct TextModel<M: LanguageModel> {
    pub model: M,
    pub tokenizer: Tokenizer,
}

impl<M: LanguageModel> ChatModel for TextModel<M> {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.model
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// A borrowed language model and tokenizer, as a [`ChatModel`].
pub struct TextChat<'a> {
    pub model: &'a dyn LanguageModel,
    pub tokenizer: &'a Tokenizer,
}

impl ChatModel for TextChat<'_> {
    fn language_model(&self) -> &dyn LanguageModel {
        self.model
    }
    fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }
}

impl ChatModel for crate::load::Checkpoint {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.model
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl ChatModel for crate::load::ServerCheckpoint {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.model
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The sampling and length settings of one response (the parameters `generate` has), as a
/// config struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationOptions {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
    /// Stop when the text contains one of these (free text only; guided output ends with its
    /// grammar).
    pub stop: Vec<String>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        let s = SamplingParams::greedy();
        Self {
            max_tokens: 256,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            repeat_last_n: s.repeat_last_n,
            seed: s.seed,
            stop: vec![],
        }
    }
}

impl GenerationOptions {
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }

    /// The same settings for [`crate::generate()`].
    pub fn to_generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_tokens,
            sampling: self.sampling(),
            stop_strings: self.stop.clone(),
            ..Default::default()
        }
    }

    /// The settings of `afm generate`'s flags.
    pub fn from_generate_options(o: &GenerateOptions) -> Self {
        let s = &o.sampling;
        Self {
            max_tokens: o.max_new_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            repeat_last_n: s.repeat_last_n,
            seed: s.seed,
            stop: o.stop_strings.clone(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(LmError::Invalid(
                "max_tokens must be at least 1 (0 would generate nothing)".into(),
            ));
        }
        self.sampling().validate()
    }
}

/// A user prompt: text and image attachments, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    pub segments: Vec<Segment>,
}

impl Prompt {
    pub fn text(t: impl Into<String>) -> Self {
        Self {
            segments: vec![Segment::Text(t.into())],
        }
    }
    /// Appends an image.
    pub fn image(mut self, i: ImageAttachment) -> Self {
        self.segments.push(Segment::Image(i));
        self
    }
    /// Appends text.
    pub fn then(mut self, t: impl Into<String>) -> Self {
        self.segments.push(Segment::Text(t.into()));
        self
    }
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::text(s)
    }
}
impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::text(s)
    }
}

/// Figures of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnStats {
    /// Tokens of the rendered conversation the turn started from (image tokens included).
    pub prompt_tokens: usize,
    /// Of those, positions served from the session's cache.
    pub reused_tokens: usize,
    /// Positions prefilled in this turn (`prompt_tokens - reused_tokens`, plus tool outputs).
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    /// From the call to the first sampled token (render, prefill, first mask).
    pub time_to_first_token_secs: f64,
    pub decode_secs: f64,
    /// Tool calls made in this turn.
    pub tool_calls: usize,
    pub stop: StopReason,
}

/// The answer to one prompt.
#[derive(Debug, Clone)]
pub struct Response {
    pub text: String,
    pub stats: TurnStats,
}

/// A tool the model may call. The arguments are a Rust type; its JSON Schema (schemars)
/// constrains the call, so the arguments always deserialise.
pub trait Tool: Send + Sync {
    type Arguments: DeserializeOwned + schemars::JsonSchema;
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// Runs the tool. An `Err` is given back to the model as the tool's output.
    fn call(&self, args: Self::Arguments) -> std::result::Result<String, String>;
}

/// A [`Tool`] with its argument type erased.
trait DynTool: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    fn schema(&self) -> Value;
    fn call_json(&self, args: &Value) -> std::result::Result<String, String>;
}

impl<T: Tool> DynTool for T {
    fn name(&self) -> &str {
        Tool::name(self)
    }
    fn description(&self) -> &str {
        Tool::description(self)
    }
    fn schema(&self) -> Value {
        schema_for::<T::Arguments>()
    }
    fn call_json(&self, args: &Value) -> std::result::Result<String, String> {
        let a: T::Arguments = serde_json::from_value(args.clone())
            .map_err(|e| format!("the arguments do not fit the tool: {e}"))?;
        self.call(a)
    }
}

/// The JSON Schema of `T` (schemars), made ready for guided generation: integer formats
/// (`uint8`, `int32`, ...) become ranges, so the output always fits the Rust type, and an
/// object takes only its declared properties (`additionalProperties: false` unless the
/// schema says otherwise; serde would ignore extra ones anyway).
pub fn schema_for<T: schemars::JsonSchema>() -> Value {
    let mut v = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Bool(true));
    bound_integer_formats(&mut v);
    v
}

fn bound_integer_formats(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let range = o
                .get("format")
                .and_then(|f| f.as_str())
                .and_then(|f| match f {
                    "int8" => Some((i8::MIN as f64, i8::MAX as f64)),
                    "uint8" => Some((0.0, u8::MAX as f64)),
                    "int16" => Some((i16::MIN as f64, i16::MAX as f64)),
                    "uint16" => Some((0.0, u16::MAX as f64)),
                    "int32" => Some((i32::MIN as f64, i32::MAX as f64)),
                    "uint32" | "uint" => Some((0.0, u32::MAX as f64)),
                    "int64" | "int" => Some((-9.0e15, 9.0e15)),
                    "uint64" => Some((0.0, 9.0e15)),
                    _ => None,
                });
            if let Some((lo, hi)) = range {
                o.remove("format");
                let lo = o
                    .get("minimum")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(lo)
                    .max(lo);
                let hi = o
                    .get("maximum")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(hi)
                    .min(hi);
                o.insert("minimum".into(), serde_json::json!(lo as i64));
                o.insert("maximum".into(), serde_json::json!(hi as i64));
            } else if matches!(
                o.get("format").and_then(|f| f.as_str()),
                Some("float" | "double")
            ) {
                o.remove("format");
            }
            let object = o.contains_key("properties") || o.get("type") == Some(&"object".into());
            if object
                && !o.contains_key("additionalProperties")
                && !o.contains_key("patternProperties")
            {
                o.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (_, x) in o.iter_mut() {
                bound_integer_formats(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(bound_integer_formats),
        _ => {}
    }
}

/// How a session uses its tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model answers or calls a tool, as it likes.
    #[default]
    Auto,
    /// The first step of each turn must be a tool call.
    Required,
}

/// A conversation with a model (module docs).
pub struct Session<'m, C: ChatModel + ?Sized> {
    model: &'m C,
    transcript: Transcript,
    cache: Cache,
    /// The conversation the cache holds: `cached.ids[..cache.seq_len()]`.
    cached: RenderedPrompt,
    /// Settings of the next responses.
    pub options: GenerationOptions,
    /// Add the JSON Schema to the prompt of a guided response (as the Foundation Models
    /// framework does by default); the constraint holds either way.
    pub include_schema_in_prompt: bool,
    tools: Vec<Box<dyn DynTool + 'm>>,
    /// Tool calls allowed per turn; at the limit the model must answer.
    pub max_tool_calls: usize,
    pub tool_choice: ToolChoice,
    guides: Option<GuideFactory>,
}

/// What a step of a turn produced.
struct Step {
    text: String,
    stats: TurnStats,
}

impl From<Step> for Response {
    fn from(s: Step) -> Self {
        Response {
            text: s.text,
            stats: s.stats,
        }
    }
}

impl<'m, C: ChatModel + ?Sized> Session<'m, C> {
    pub fn new(model: &'m C) -> Self {
        Self::from_transcript(model, Transcript::default())
    }

    /// A session whose model follows `instructions` (the system message).
    pub fn with_instructions(model: &'m C, instructions: impl Into<String>) -> Self {
        Self::from_transcript(
            model,
            Transcript {
                entries: vec![Entry::Instructions {
                    text: instructions.into(),
                }],
            },
        )
    }

    /// Goes on with a saved conversation (nothing is prefilled until the next turn).
    pub fn from_transcript(model: &'m C, transcript: Transcript) -> Self {
        Self {
            cache: model.language_model().new_cache(),
            model,
            transcript,
            cached: RenderedPrompt::default(),
            options: GenerationOptions::default(),
            include_schema_in_prompt: true,
            tools: Vec::new(),
            max_tool_calls: 4,
            tool_choice: ToolChoice::Auto,
            guides: None,
        }
    }

    /// Shares a guide factory built earlier (saves rebuilding the token trie per session).
    pub fn with_guides(mut self, g: GuideFactory) -> Self {
        self.guides = Some(g);
        self
    }

    /// Declares a tool the model may call.
    pub fn with_tool<T: Tool + 'm>(mut self, t: T) -> Self {
        self.tools.push(Box::new(t));
        self
    }

    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    pub fn model(&self) -> &'m C {
        self.model
    }

    /// Replaces the conversation (the cache keeps whatever prefix still matches).
    pub fn set_transcript(&mut self, t: Transcript) {
        self.transcript = t;
    }

    /// Positions the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.cache.seq_len()
    }

    /// Forgets the cache (the next turn prefills the whole conversation).
    pub fn clear_cache(&mut self) {
        self.cache.reset();
        self.cached = RenderedPrompt::default();
    }

    /// The guide factory of this session's model (built on first use).
    pub fn guides(&mut self) -> Result<GuideFactory> {
        if let Some(g) = &self.guides {
            return Ok(g.clone());
        }
        let g = GuideFactory::new(
            self.model.tokenizer(),
            self.model.language_model().info().vocab_size,
            &self.model.stop_ids(),
        )?;
        self.guides = Some(g.clone());
        Ok(g)
    }

    /// Tokens the conversation would take with `prompt` as the next turn, image tokens
    /// included, before anything runs. Errors with [`LmError::PromptTooLong`] when they do not
    /// fit the context with room for one generated token.
    pub fn count_tokens(&self, prompt: impl Into<Prompt>) -> Result<usize> {
        let mut t = self.transcript.clone();
        t.entries.push(Entry::Prompt {
            segments: prompt.into().segments,
        });
        let n = self.model.render(&t)?.ids.len();
        self.check_fits(n)?;
        Ok(n)
    }

    fn check_fits(&self, n: usize) -> Result<()> {
        let ctx = self.model.language_model().info().context_length;
        if n + 1 > ctx {
            return Err(LmError::PromptTooLong {
                tokens: n,
                context: ctx,
                reserved: 1,
            });
        }
        Ok(())
    }

    /// Prefills the conversation so far plus the start of a next prompt (`prefix`, if any), so
    /// the first token of the next response comes sooner. Returns the positions cached.
    pub fn prewarm(&mut self, prefix: Option<&str>) -> Result<usize> {
        // The part of the rendering two different prompts share is what any prompt starting
        // with `prefix` will share (template-agnostic: no knowledge of the markers).
        let p = prefix.unwrap_or("");
        let render = |tail: &str| -> Result<RenderedPrompt> {
            let mut t = self.transcript.clone();
            t.entries.push(Entry::Prompt {
                segments: vec![Segment::Text(format!("{p}{tail}"))],
            });
            self.model.render(&t)
        };
        let (a, b) = (render("\u{1}x")?, render("\u{2}y")?);
        let n = a.ids.iter().zip(&b.ids).take_while(|(x, y)| x == y).count();
        let shared = RenderedPrompt {
            ids: a.ids[..n].to_vec(),
            images: a
                .images
                .iter()
                .filter(|s| s.start + s.len <= n)
                .cloned()
                .collect(),
        };
        self.check_fits(n)?;
        let keep = self.reusable(&shared);
        self.cache.truncate(keep);
        if keep < n {
            let e = self.model.embed(&self.transcript, &shared, keep..n)?;
            if let Err(e) =
                self.model
                    .language_model()
                    .forward_embeds(&e, &mut self.cache, &LogitsFor::Last)
            {
                self.clear_cache();
                return Err(e);
            }
        }
        self.cached = shared;
        Ok(self.cache.seq_len())
    }

    /// How many cached positions `p` can keep: the common prefix of token ids, cut before the
    /// first image whose pixels differ. A cache some of whose layers dropped old positions (a
    /// sliding window) cannot be rolled back and is kept only when all of it matches.
    fn reusable(&self, p: &RenderedPrompt) -> usize {
        let have = self.cache.seq_len().min(self.cached.ids.len());
        let mut n = self
            .cached
            .ids
            .iter()
            .zip(&p.ids)
            .take(have)
            .take_while(|(a, b)| a == b)
            .count();
        for s in &p.images {
            if s.start < n && !self.cached.images.contains(s) {
                n = n.min(s.start);
            }
        }
        let trimmed = (0..self.cache.num_layers())
            .filter_map(|i| self.cache.layer(i))
            .any(|l| l.first() > 0);
        if trimmed && n < self.cache.seq_len() {
            return 0;
        }
        n
    }

    /// Answers a prompt with free text, streaming it to nothing.
    pub fn respond(&mut self, prompt: impl Into<Prompt>) -> Result<Response> {
        self.respond_streaming(prompt, &mut |_| true)
    }

    /// Answers a prompt, streaming each new piece of text to `on_text` (return `false` to
    /// stop). With tools declared, the model may call them first (module docs).
    pub fn respond_streaming(
        &mut self,
        prompt: impl Into<Prompt>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Response> {
        self.text_turn(prompt.into(), |s| {
            if s.tools.is_empty() {
                s.step(None, on_text).map(Response::from)
            } else {
                s.tool_loop(on_text)
            }
        })
    }

    /// One turn answered in text: `prompt` joins the transcript, `run` answers it, and the
    /// answer joins the transcript too; on an error the transcript is as it was.
    fn text_turn(
        &mut self,
        prompt: Prompt,
        run: impl FnOnce(&mut Self) -> Result<Response>,
    ) -> Result<Response> {
        let n0 = self.transcript.entries.len();
        self.transcript.entries.push(Entry::Prompt {
            segments: prompt.segments,
        });
        match run(self) {
            Ok(r) => {
                self.transcript.entries.push(Entry::Response {
                    text: r.text.clone(),
                });
                Ok(r)
            }
            Err(e) => {
                self.transcript.entries.truncate(n0);
                Err(e)
            }
        }
    }

    /// Answers with free text that follows a Lark `grammar` (llguidance's dialect), streaming
    /// each new piece to `on_text`. An invalid grammar is an error before anything runs; the
    /// turn ends when the grammar is complete.
    pub fn respond_to_grammar_streaming(
        &mut self,
        prompt: impl Into<Prompt>,
        grammar: &str,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Response> {
        let mut guide = self.guides()?.lark(grammar)?;
        self.text_turn(prompt.into(), |s| {
            s.step(Some(&mut guide), on_text).map(Response::from)
        })
    }

    /// Answers with a value of `T`, decoded under `T`'s JSON Schema ([`schema_for`]).
    pub fn respond_as<T: DeserializeOwned + schemars::JsonSchema>(
        &mut self,
        prompt: impl Into<Prompt>,
    ) -> Result<T> {
        self.respond_as_streaming(prompt, &mut |_| true)
    }

    /// [`Self::respond_as`], with a snapshot of the partial object (a JSON value with what
    /// is complete so far) after each token that changes it.
    pub fn respond_as_streaming<T: DeserializeOwned + schemars::JsonSchema>(
        &mut self,
        prompt: impl Into<Prompt>,
        on_snapshot: &mut dyn FnMut(&Value) -> bool,
    ) -> Result<T> {
        let schema = schema_for::<T>();
        let (v, _) = self.respond_to_schema_streaming(prompt, &schema, on_snapshot)?;
        serde_json::from_value(v).map_err(|e| LmError::Deserialize {
            ty: std::any::type_name::<T>().to_string(),
            reason: e.to_string(),
        })
    }

    /// Answers with JSON valid against `schema`. An unsupported or unsatisfiable schema is an
    /// error before anything runs.
    pub fn respond_to_schema(
        &mut self,
        prompt: impl Into<Prompt>,
        schema: &Value,
    ) -> Result<(Value, Response)> {
        self.respond_to_schema_streaming(prompt, schema, &mut |_| true)
    }

    /// [`Self::respond_to_schema`] with snapshots of the partial object.
    pub fn respond_to_schema_streaming(
        &mut self,
        prompt: impl Into<Prompt>,
        schema: &Value,
        on_snapshot: &mut dyn FnMut(&Value) -> bool,
    ) -> Result<(Value, Response)> {
        let mut guide = self.guides()?.json_schema(schema)?;
        let mut prompt = prompt.into();
        if self.include_schema_in_prompt {
            prompt.segments.push(Segment::Text(format!(
                "\nAnswer with JSON only, following this JSON Schema: {}",
                compact_schema(schema)
            )));
        }
        let n0 = self.transcript.entries.len();
        self.transcript.entries.push(Entry::Prompt {
            segments: prompt.segments,
        });
        let mut acc = String::new();
        let mut last: Option<Value> = None;
        let r = self.step(Some(&mut guide), &mut |piece| {
            acc.push_str(piece);
            match partial_json(&acc) {
                Some(v) if last.as_ref() != Some(&v) => {
                    let go = on_snapshot(&v);
                    last = Some(v);
                    go
                }
                _ => true,
            }
        });
        let done = r.and_then(|s| {
            let v: Value = serde_json::from_str(&s.text).map_err(|e| LmError::Guided {
                reason: format!(
                    "the output stopped ({:?}) after {} tokens before the JSON was complete \
                     ({e}); raise max_tokens",
                    s.stats.stop, s.stats.generated_tokens
                ),
            })?;
            Ok((v, s))
        });
        match done {
            Ok((v, s)) => {
                self.transcript.entries.push(Entry::Response {
                    text: s.text.clone(),
                });
                Ok((
                    v,
                    Response {
                        text: s.text,
                        stats: s.stats,
                    },
                ))
            }
            Err(e) => {
                self.transcript.entries.truncate(n0);
                Err(e)
            }
        }
    }

    /// Free-text turn with tools: each step is constrained to a call of a declared tool (with
    /// arguments valid against its schema) or a plain answer; calls run, their output goes
    /// into the transcript, and the model continues.
    fn tool_loop(&mut self, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Response> {
        let guides = self.guides()?;
        let mut calls = 0;
        let mut totals: Option<TurnStats> = None;
        loop {
            let may_call = calls < self.max_tool_calls;
            let must_call = calls == 0 && self.tool_choice == ToolChoice::Required;
            let grammar = self.tool_grammar(may_call, must_call);
            let mut guide = guides.lark(&grammar)?;
            let mut text_seen = String::new();
            let s = self.step(Some(&mut guide), &mut |p| {
                text_seen.push_str(p);
                // stream only plain answers; a call starts with `{`
                if text_seen.starts_with('{') {
                    true
                } else {
                    on_text(p)
                }
            })?;
            let add = |t: &mut Option<TurnStats>, s: &TurnStats| match t {
                None => *t = Some(s.clone()),
                Some(t) => {
                    t.prefilled_tokens += s.prefilled_tokens;
                    t.generated_tokens += s.generated_tokens;
                    t.decode_secs += s.decode_secs;
                    t.stop = s.stop;
                }
            };
            add(&mut totals, &s.stats);
            let call = if s.text.starts_with('{') {
                Some(
                    serde_json::from_str::<Value>(&s.text).map_err(|e| LmError::Guided {
                        reason: format!(
                            "the tool call stopped ({:?}) after {} tokens before it was complete \
                             ({e}); raise max_tokens: {}",
                            s.stats.stop, s.stats.generated_tokens, s.text
                        ),
                    })?,
                )
            } else {
                None
            };
            let Some(call) = call else {
                let mut stats = totals.expect("one step ran");
                stats.tool_calls = calls;
                return Ok(Response {
                    text: s.text,
                    stats,
                });
            };
            calls += 1;
            let name = call["tool"].as_str().unwrap_or_default().to_string();
            let args = call["arguments"].clone();
            let out = match self.tools.iter().find(|t| t.name() == name) {
                Some(t) => t.call_json(&args),
                None => Err(format!("there is no tool `{name}`")),
            };
            self.transcript.entries.push(Entry::ToolCall {
                name: name.clone(),
                arguments: args,
            });
            let (output, is_error) = match out {
                Ok(o) => (o, false),
                Err(e) => (e, true),
            };
            self.transcript.entries.push(Entry::ToolOutput {
                name,
                output,
                is_error,
            });
        }
    }

    /// The Lark grammar of one tool-loop step.
    fn tool_grammar(&self, may_call: bool, must_call: bool) -> String {
        let calls: Vec<Value> = self
            .tools
            .iter()
            .map(|t| {
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "tool": {"const": t.name()},
                        "arguments": strip_meta(t.schema()),
                    },
                    "required": ["tool", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let call = serde_json::json!({
            "anyOf": calls,
            "x-guidance": {"whitespace_flexible": false, "coerce_one_of": true},
        });
        let answer = "ANSWER: /[^{\\s][\\s\\S]*/";
        match (may_call, must_call) {
            (true, true) => format!("start: call\ncall: %json {call}\n"),
            (true, false) => format!("start: call | ANSWER\ncall: %json {call}\n{answer}\n"),
            (false, _) => format!("start: ANSWER\n{answer}\n"),
        }
    }

    /// One generation step over the current transcript (which ends with the user's prompt
    /// or a tool output): render, reuse the cache, prefill the rest, decode.
    fn step(
        &mut self,
        guide: Option<&mut Guide>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Step> {
        let r = self.step_inner(guide, on_text);
        if r.is_err() {
            self.clear_cache();
        }
        r
    }

    fn step_inner(
        &mut self,
        mut guide: Option<&mut Guide>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Step> {
        let opts = self.options.clone();
        opts.validate()?;
        let t0 = Instant::now();
        let mut transcript = self.transcript.clone();
        if !self.tools.is_empty() {
            add_tool_instructions(&mut transcript, &self.tools);
        }
        let prompt = self.model.render(&transcript)?;
        let n = prompt.ids.len();
        if n == 0 {
            return Err(LmError::Invalid("the rendered prompt is empty".into()));
        }
        self.check_fits(n)?;
        // keep at least one position to run: the last prompt position gives the first logits
        let keep = self.reusable(&prompt).min(n - 1);
        self.cache.truncate(keep);
        let lm = self.model.language_model();
        let embeds = self.model.embed(&transcript, &prompt, keep..n)?;
        let logits = lm.forward_embeds(&embeds, &mut self.cache, &LogitsFor::Last)?;
        let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        self.cached = prompt;
        let (ctx, tok) = (lm.info().context_length, self.model.tokenizer());
        let stops = self.model.stop_ids();
        let mut sampler = Sampler::new(opts.sampling())?;
        let mut stream = TextStream::new();
        let mut filter = crate::generate::StopFilter {
            stops: if guide.is_some() { &[] } else { &opts.stop },
            pending: String::new(),
        };
        let mut text = String::new();
        let mut ids: Vec<u32> = Vec::new();
        let mut hist = self.cached.ids.clone();
        let mut ttft = None;
        let t1 = Instant::now();
        let stop = loop {
            if let Some(g) = guide.as_deref_mut() {
                if g.is_stopped() {
                    break StopReason::StopToken;
                }
                g.mask_logits(&mut row)?;
            }
            if ids.len() >= opts.max_tokens {
                break StopReason::MaxTokens;
            }
            let next = sampler.sample(&row, &hist)?;
            ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            if stops.contains(&next) {
                break StopReason::StopToken;
            }
            if let Some(g) = guide.as_deref_mut() {
                let b = g.token_bytes(next);
                g.consume(next, &b)?;
            }
            ids.push(next);
            hist.push(next);
            if let Some(piece) = stream.push(tok, next)? {
                let (out, hit) = filter.push(&piece);
                text.push_str(&out);
                let go_on = out.is_empty() || on_text(&out);
                if hit {
                    break StopReason::StopString;
                }
                if !go_on {
                    break StopReason::Cancelled;
                }
            }
            if guide.as_deref().is_some_and(|g| g.is_stopped()) {
                break StopReason::StopToken;
            }
            if ids.len() >= opts.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.cache.seq_len() + 1 > ctx - 1 {
                break StopReason::ContextFull;
            }
            let logits = lm.forward_tokens(&[next], &mut self.cache, &LogitsFor::Last)?;
            row = logits.squeeze(0)?.to_vec1()?;
            self.cached.ids.push(next);
        };
        if stop != StopReason::StopString {
            if let Some(rest) = stream.finish(tok)? {
                let (out, _) = filter.push(&rest);
                text.push_str(&out);
                if !out.is_empty() {
                    on_text(&out);
                }
            }
            let rest = filter.finish();
            if !rest.is_empty() {
                text.push_str(&rest);
                on_text(&rest);
            }
        }
        Ok(Step {
            text,
            stats: TurnStats {
                prompt_tokens: n,
                reused_tokens: keep,
                prefilled_tokens: n - keep,
                generated_tokens: ids.len(),
                time_to_first_token_secs: ttft.unwrap_or_else(|| t0.elapsed().as_secs_f64()),
                decode_secs: t1.elapsed().as_secs_f64(),
                tool_calls: 0,
                stop,
            },
        })
    }
}

/// The tools' descriptions and the call format, added to the instructions when rendering.
fn add_tool_instructions(t: &mut Transcript, tools: &[Box<dyn DynTool + '_>]) {
    let mut s = String::from(
        "You can call tools. To call one, answer with only a JSON object \
         {\"tool\": NAME, \"arguments\": {...}}; its output comes back in the next message. \
         Tools:",
    );
    for tool in tools {
        s.push_str(&format!(
            "\n- {}: {} Arguments: {}",
            tool.name(),
            tool.description(),
            compact_schema(&tool.schema())
        ));
    }
    match t.entries.first_mut() {
        Some(Entry::Instructions { text }) => {
            text.push_str("\n\n");
            text.push_str(&s);
        }
        _ => t.entries.insert(0, Entry::Instructions { text: s }),
    }
}

/// A schema without its annotations (`$schema`, `title`, `description`), for the prompt.
fn compact_schema(v: &Value) -> String {
    strip_meta(v.clone()).to_string()
}

fn strip_meta(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_formats_become_ranges() {
        #[derive(serde::Deserialize, schemars::JsonSchema)]
        #[allow(dead_code)]
        struct T {
            a: u8,
            #[schemars(range(min = -5, max = 5))]
            b: i32,
            c: f64,
        }
        let s = schema_for::<T>();
        let p = &s["properties"];
        assert_eq!(p["a"]["minimum"], 0);
        assert_eq!(p["a"]["maximum"], 255);
        assert_eq!(p["b"]["minimum"], -5);
        assert_eq!(p["b"]["maximum"], 5);
        assert!(p["c"].get("format").is_none());
    }

    #[test]
    fn options_round_trip_and_validate() {
        let o = GenerationOptions {
            temperature: 0.7,
            top_k: 40,
            ..Default::default()
        };
        let s = serde_json::to_string(&o).unwrap();
        let back: GenerationOptions = serde_json::from_str(&s).unwrap();
        assert_eq!(o, back);
        assert_eq!(
            GenerationOptions::from_generate_options(&o.to_generate_options()),
            o
        );
        assert!(GenerationOptions {
            max_tokens: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(serde_json::from_str::<GenerationOptions>(r#"{"temprature": 1}"#).is_err());
    }
}
