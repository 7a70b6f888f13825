//! `Vlm`: one vision-language pipeline, generic over its parts: an image processor
//! ([`ImageProcessor`]: how an image becomes encoder views and prompt tokens), a vision
//! encoder, an adapter ([`VisionAdapter`]) and any [`LanguageModel`], behind caption / ask /
//! describe-screen / chat calls. The model is `Send + Sync` and holds no per-request state
//! except a small cache of encoded images (so a second question about the same image does
//! not run the encoder again); every request gets its own LM cache.
//!
//! Two configurations ship; [`crate::model_dir::ModelDir`] loads either from a model
//! directory:
//!
//! | | SmolVLM / Idefics3 ([`Vlm::load_idefics3`]) | afm-tiny ([`Vlm::load_afm_tiny`]) |
//! |---|---|---|
//! | image processor | [`crate::processor::Idefics3Processor`] | [`crate::tile_processor::TileProcessor`] (the paper's planner) |
//! | encoder | SigLIP | Register-Window ViT |
//! | adapter | [`crate::connector::PixelShuffleConnector`] | [`crate::afm_adapter::AfmAdapter`] |
//! | language model | in the checkpoint (safetensors) | a frozen SmolLM2 GGUF |
//! | chat | [`ChatFormat::Multimodal`] (the checkpoint's template) | [`ChatFormat::Text`] ([`crate::afm_prompt`]) |
//!
//! # Flow
//! `plan` (image size, budget -> [`ImagePlan`]) -> `pixel_values` `(tiles, 3, s, s)` ->
//! encoder `(tiles, registers + g*g, dv)` -> adapter `(tiles, t, d)` -> image embeddings
//! `(tiles * t, d)`, cached per image and budget -> the chat rendered with each image's
//! prompt expansion (`plan.image_tokens` image tokens) -> embeddings spliced over the image
//! tokens ([`splice`]) -> generation.

use crate::adapter::VisionAdapter;
use crate::config::Idefics3Config;
use crate::connector::PixelShuffleConnector;
use crate::error::{FusionError, Result};
use crate::image_cache::{image_key, ImageCache};
use crate::image_processor::{ImagePlan, ImageProcessor, Processor};
use crate::processor::Idefics3Processor;
use afm_lm::chat::{render_chat, Message};
use afm_lm::weights::WeightSource;
use afm_lm::{DeviceModel, GenerateOptions, Generation, LanguageModel, Tokenizer};
use afm_vision::weights::VisionWeights;
use afm_vision::VisionEncoder;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::grounded_screen::screen_grammar;

/// The placeholder a multimodal chat template writes where an image goes.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// One image, encoded and projected into the LM's embedding space.
#[derive(Debug)]
pub struct EncodedImage {
    pub plan: ImagePlan,
    /// `(image_tokens, lm_hidden)`, in prompt order (the processor's view order).
    pub embeds: Tensor,
    /// Time the encoder and adapter took (0 when served from the cache).
    pub encode_secs: f64,
    pub from_cache: bool,
    /// The image's text, found and read by the pipeline's text reader (top to bottom), when
    /// it has one ([`Vlm::set_reader`]); the prompt carries it after the image.
    pub text: Option<Vec<ReadLine>>,
    /// The flat-coloured objects found in it when it has no text and the reader has an
    /// object finder ([`ScreenReader::objects`]); empty otherwise.
    pub objects: Vec<afm_vision::objects::SeenObject>,
}

/// One line of text read in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLine {
    pub text: String,
    /// Where it is (the finder's tight box), px.
    pub region: afm_vision::reader::Region,
    /// It sits in a snug box of its own ground (a button-like control).
    pub boxed: bool,
    /// The boxed line whose box stands out from its surroundings clearly more than any
    /// other's ([`afm_vision::text_lines::snug_box_contrast`]: by 40 or more of 255), or the
    /// only boxed line when its box stands out by 80 or more: the highlighted (default)
    /// button, drawn filled in an accent colour.
    pub highlighted: bool,
}

/// A text reader and the line finder it reads from ([`Vlm::set_reader`]), and, for
/// pictures without text, an object finder.
pub struct ScreenReader {
    pub reader: afm_vision::reader::TextReader,
    pub finder: afm_vision::text_lines::LineFinder,
    /// Names the flat-coloured objects of a picture with no text (`shapes.json` in the
    /// reader's directory).
    pub objects: Option<afm_vision::objects::ObjectFinder>,
}

impl ScreenReader {
    /// The reader of an export's `reader/` directory (`config.json`, `model.safetensors`,
    /// and `shapes.json` when it has an object finder).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let shapes = dir.join("shapes.json");
        Ok(Self {
            reader: afm_vision::reader::TextReader::from_dir(dir)?,
            finder: afm_vision::text_lines::LineFinder::default(),
            objects: if shapes.exists() {
                Some(afm_vision::objects::ObjectFinder::from_dir(dir)?)
            } else {
                None
            },
        })
    }

    /// What the pipeline reads off an image: its lines of text, or its flat-coloured objects
    /// (when there is an object finder) when it has no text.
    ///
    /// A small flat shape can look like a glyph to the line finder: a dark triangle reads as
    /// "A", a star's point as ",". So the object finder runs on every image, and the image
    /// is taken for a picture of objects, its lines dropped, when every line lies inside an
    /// object's box (a whole small shape, or a part of one) and no object reaches the
    /// image's edge (a window's bars and panes do), as [`is_picture`] decides. Otherwise its
    /// lines are all kept and no objects are given.
    pub fn read(
        &self,
        img: &RgbImage,
    ) -> Result<(Vec<ReadLine>, Vec<afm_vision::objects::SeenObject>)> {
        let lines = self.read_lines(img)?;
        let Some(f) = &self.objects else {
            return Ok((lines, Vec::new()));
        };
        let objects = f.find(img);
        let regions: Vec<_> = lines.iter().map(|l| l.region).collect();
        let boxes: Vec<_> = objects.iter().map(|o| o.region).collect();
        let picture = is_picture(&regions, &boxes, img.width(), img.height());
        Ok(if picture {
            (Vec::new(), objects)
        } else {
            (lines, Vec::new())
        })
    }

    /// Every line of text found in `img`, read, top to bottom (empty reads dropped).
    pub fn read_lines(&self, img: &RgbImage) -> Result<Vec<ReadLine>> {
        let found = self.finder.find(img);
        let boxes: Vec<_> = found
            .iter()
            .map(|r| afm_vision::text_lines::reading_box(*r, img.width(), img.height()))
            .collect();
        let read = self.reader.read(img, &boxes)?;
        let lines: Vec<(ReadLine, Option<f32>)> = found
            .into_iter()
            .zip(read)
            .filter(|(_, t)| !t.is_empty())
            .map(|(region, text)| {
                let contrast = afm_vision::text_lines::snug_box_contrast(img, region);
                let line = ReadLine {
                    boxed: contrast.is_some(),
                    highlighted: false,
                    text,
                    region,
                };
                (line, contrast)
            })
            .collect();
        let contrasts: Vec<Option<f32>> = lines.iter().map(|(_, c)| *c).collect();
        let top = highlighted_line(&contrasts);
        Ok(lines
            .into_iter()
            .enumerate()
            .map(|(i, (mut l, _))| {
                l.highlighted = top == Some(i);
                l
            })
            .collect())
    }
}

/// How far (px) a line's box may stick out of an object's box and still be taken for that
/// object ([`ScreenReader::read`]).
pub const SHAPE_LINE_MARGIN: u32 = 2;

/// Most objects one misread "line" may stand for ([`is_picture`]): two or three small shapes
/// side by side read as one line ("0 Q"). A line over more objects is taken for a word,
/// whose glyphs the object finder saw as objects.
pub const SHAPES_PER_LINE: usize = 3;

/// Whether an image whose line finder gave the boxes `lines` and whose object finder gave
/// the boxes `objects` is a picture of objects (see [`ScreenReader::read`]): no object
/// reaches within [`SHAPE_LINE_MARGIN`] px of the image's edge, and every line is made of
/// objects: it meets 1 to [`SHAPES_PER_LINE`] objects' boxes, lies inside their joint box
/// (within the margin), and either covers a quarter of that box (whole shapes read as
/// glyphs) or each of those objects is small, at most 1/16 of the image (a star's point read
/// as a comma). No lines and no objects: true (nothing to read either way).
pub fn is_picture(
    lines: &[afm_vision::reader::Region],
    objects: &[afm_vision::reader::Region],
    width: u32,
    height: u32,
) -> bool {
    let m = SHAPE_LINE_MARGIN;
    let off_edge = |r: &afm_vision::reader::Region| {
        r.x > m && r.y > m && r.x + r.w + m < width && r.y + r.h + m < height
    };
    let image_area = width as u64 * height as u64;
    objects.iter().all(off_edge)
        && lines
            .iter()
            .all(|l| made_of_objects(*l, objects, image_area))
}

/// `a` is made of the objects whose boxes it meets (see [`is_picture`]).
fn made_of_objects(
    a: afm_vision::reader::Region,
    objects: &[afm_vision::reader::Region],
    image_area: u64,
) -> bool {
    type R = afm_vision::reader::Region;
    let meets = |b: &R| a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
    let met: Vec<&R> = objects.iter().filter(|b| meets(b)).collect();
    if met.is_empty() || met.len() > SHAPES_PER_LINE {
        return false;
    }
    let (x0, y0) = (
        met.iter().map(|b| b.x).min().unwrap_or(0),
        met.iter().map(|b| b.y).min().unwrap_or(0),
    );
    let (x1, y1) = (
        met.iter().map(|b| b.x + b.w).max().unwrap_or(0),
        met.iter().map(|b| b.y + b.h).max().unwrap_or(0),
    );
    let m = SHAPE_LINE_MARGIN;
    let inside = a.x + m >= x0 && a.y + m >= y0 && a.x + a.w <= x1 + m && a.y + a.h <= y1 + m;
    let area = |w: u32, h: u32| w as u64 * h as u64;
    let whole = 4 * area(a.w, a.h) >= area(x1 - x0, y1 - y0);
    let small = met.iter().all(|b| 16 * area(b.w, b.h) <= image_area);
    inside && (whole || small)
}

/// Which of the lines is the highlighted button ([`ReadLine::highlighted`]), given each
/// line's [`afm_vision::text_lines::snug_box_contrast`] (`None`: not boxed).
pub fn highlighted_line(contrasts: &[Option<f32>]) -> Option<usize> {
    let mut c: Vec<(usize, f32)> = contrasts
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, (*c)?)))
        .collect();
    c.sort_by(|a, b| b.1.total_cmp(&a.1));
    match c.as_slice() {
        [a] if a.1 >= 80.0 => Some(a.0),
        [a, b, ..] if a.1 - b.1 >= 40.0 => Some(a.0),
        _ => None,
    }
}

/// The prompt text that follows an image whose lines were read: `Text in the image:` then
/// each line quoted, those in a snug box marked `button` (the highlighted one `highlighted
/// button`), separated by `; `.
pub fn text_block(lines: &[ReadLine]) -> String {
    let items: Vec<String> = lines
        .iter()
        .map(|l| {
            if l.highlighted {
                format!("highlighted button \"{}\"", l.text)
            } else if l.boxed {
                format!("button \"{}\"", l.text)
            } else {
                format!("\"{}\"", l.text)
            }
        })
        .collect();
    format!("Text in the image: {}.\n", items.join("; "))
}

/// The prompt text that follows an image whose objects were found: `Objects in the image, 6
/// in all: 3 purple hexagons; 3 brown circles.` (groups of one colour and shape, in order of
/// first appearance, counts as digits).
pub fn object_block(objects: &[afm_vision::objects::SeenObject]) -> String {
    let items: Vec<String> = afm_vision::objects::groups(objects)
        .into_iter()
        .map(|(n, colour, shape)| {
            let noun = if n == 1 {
                shape.to_string()
            } else {
                afm_vision::objects::plural(shape)
            };
            format!("{n} {colour} {noun}")
        })
        .collect();
    format!(
        "Objects in the image, {} in all: {}.\n",
        objects.len(),
        items.join("; ")
    )
}

/// What the prompt carries after an image: its text ([`text_block`]) when it has any, else
/// its objects ([`object_block`]) when any were found, else nothing.
pub fn image_block(
    lines: Option<&[ReadLine]>,
    objects: &[afm_vision::objects::SeenObject],
) -> String {
    match lines {
        Some(l) if !l.is_empty() => text_block(l),
        _ if !objects.is_empty() => object_block(objects),
        _ => String::new(),
    }
}

/// A piece of a chat message.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    Image(Arc<EncodedImage>),
}

/// One chat turn with text and images.
#[derive(Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub parts: Vec<Part>,
}

impl ChatMessage {
    pub fn user(parts: Vec<Part>) -> Self {
        Self {
            role: "user".into(),
            parts,
        }
    }
    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            parts: vec![Part::Text(text.into())],
        }
    }
}

/// Options of one request.
#[derive(Debug, Clone, Default)]
pub struct AskOptions {
    pub generate: GenerateOptions,
    /// Budget of image tokens per image (`None`: the image processor's default, its full
    /// resolution).
    pub max_image_tokens: Option<usize>,
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub generation: Generation,
    pub plan: ImagePlan,
    pub encode_secs: f64,
    pub image_from_cache: bool,
    /// Prompt tokens, image tokens included.
    pub prompt_tokens: usize,
}

/// The request text behind [`Vlm::caption`] for SmolVLM / Idefics3.
pub const CAPTION_PROMPT: &str = "Describe this image.";
/// The request text behind [`Vlm::describe_screen`] for SmolVLM / Idefics3.
pub const SCREEN_PROMPT: &str =
    "Describe this screenshot: the window title, the controls and what they say.";

#[derive(Serialize)]
struct TemplatePart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: Vec<TemplatePart<'a>>,
}

/// How a chat becomes prompt text.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatFormat {
    /// A chat template that takes typed content parts (`{"type": "image"}`,
    /// `{"type": "text", "text": ...}`) and writes [`IMAGE_PLACEHOLDER`] where an image goes;
    /// each placeholder is then replaced by the image's prompt expansion (Idefics3 / SmolVLM).
    Multimodal(String),
    /// The language model's own text-only chat template (the tokenizer's): a message's
    /// content is its parts joined in order, an image as its prompt expansion followed by
    /// `\n` ([`crate::afm_prompt`]'s format: `{P}...{P}\n{question}`).
    Text,
}

/// The parts of a [`Vlm`] ([`Vlm::new`] checks that they fit together).
pub struct VlmParts<M: LanguageModel> {
    /// `"idefics3"`, `"afm-tiny"`, ...: what messages call the model.
    pub model_type: String,
    pub lm: M,
    pub encoder: VisionEncoder,
    pub adapter: Box<dyn VisionAdapter>,
    pub processor: Box<dyn ImageProcessor>,
    pub tokenizer: Tokenizer,
    pub chat: ChatFormat,
    /// The token the prompt expansion repeats once per image embedding, and its id.
    pub image_token: String,
    pub image_token_id: u32,
    /// The request behind [`Vlm::caption`].
    pub caption_prompt: String,
    /// The request behind [`Vlm::describe_screen`].
    pub screen_prompt: String,
}

/// A vision-language model over any language model (module docs).
pub struct Vlm<M: LanguageModel> {
    model_type: String,
    lm: M,
    encoder: VisionEncoder,
    adapter: Box<dyn VisionAdapter>,
    tokenizer: Tokenizer,
    processor: Processor,
    chat: ChatFormat,
    image_token: String,
    image_token_id: u32,
    caption_prompt: String,
    screen_prompt: String,
    images: ImageCache<EncodedImage>,
    reader: Option<ScreenReader>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FusionError + '_ {
    move |source| FusionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The chat template of a checkpoint directory: `chat_template.jinja`, `chat_template.json`
/// (`{"chat_template": ...}`), then `tokenizer_config.json`'s.
fn chat_template(dir: &Path, tok: &Tokenizer) -> Result<String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map_err(io(&jinja));
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        let text = std::fs::read_to_string(&json).map_err(io(&json))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| FusionError::BadFile {
                path: json.clone(),
                format: "chat_template.json",
                reason: e.to_string(),
            })?;
        return v
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(String::from)
            .ok_or_else(|| FusionError::BadFile {
                path: json,
                format: "chat_template.json",
                reason: "no `chat_template` string".into(),
            });
    }
    tok.chat_template().map(String::from).ok_or_else(|| {
        FusionError::BadFile {
            path: dir.to_path_buf(),
            format: "checkpoint directory",
            reason: "no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)".into(),
        }
    })
}

impl Vlm<DeviceModel> {
    /// Runs the language model's dense projections and output head in int8
    /// ([`DeviceModel::set_int8`]), or back in f32.
    pub fn set_lm_int8(&mut self, on: bool) -> Result<()> {
        self.lm.set_int8(on)?;
        Ok(())
    }

    /// f16 K/V for the language model unless its checkpoint stores 8-bit KV scales
    /// ([`DeviceModel::prefer_f16_kv`]); returns whether new caches are f16.
    pub fn prefer_lm_f16_kv(&mut self) -> bool {
        self.lm.prefer_f16_kv()
    }

    /// The language model's K/V precision ([`DeviceModel::apply_kv_bits`]: 8 = int8 with the
    /// checkpoint's scales or scales calibrated on afm's calibration text, 16 = f16, 32 =
    /// f32); returns where the scales came from.
    pub fn set_lm_kv_bits(&mut self, bits: u32) -> Result<&'static str> {
        let cal = self
            .tokenizer
            .encode(afm_lm::kv8::CALIBRATION_TEXT)
            .unwrap_or_default();
        Ok(self.lm.apply_kv_bits(bits, &cal)?)
    }

    /// Loads an Idefics3 / SmolVLM checkpoint directory in its HF layout: `config.json`,
    /// `*.safetensors` (`model.vision_model.*`, `model.connector.*`, `model.text_model.*`,
    /// `lm_head.weight`), `tokenizer.json`, `tokenizer_config.json`, the chat template and
    /// `preprocessor_config.json` / `processor_config.json`. Reads local files only.
    pub fn load_idefics3(dir: &Path) -> Result<Self> {
        let cfg = Idefics3Config::from_file(&dir.join("config.json"))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(FusionError::BadFile {
                path: dir.to_path_buf(),
                format: "checkpoint directory",
                reason: "no .safetensors file".into(),
            });
        }
        let mut all = HashMap::new();
        for f in &files {
            let bytes = std::fs::read(f).map_err(io(f))?;
            let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
                FusionError::BadFile {
                    path: f.clone(),
                    format: "safetensors",
                    reason: e.to_string(),
                }
            })?;
            all.extend(t);
        }
        let mut vision = HashMap::new();
        let mut text = HashMap::new();
        let mut rest = HashMap::new();
        for (k, v) in all {
            if k.contains("vision_model.") {
                vision.insert(k, v);
            } else if let Some(r) = k.strip_prefix("model.text_model.") {
                text.insert(format!("model.{r}"), v);
            } else if k == "lm_head.weight" {
                text.insert(k, v);
            } else {
                rest.insert(k, v);
            }
        }
        let encoder =
            VisionEncoder::new(&VisionWeights::from_tensors(vision)?, cfg.vision.clone())?;
        let adapter = PixelShuffleConnector::load(
            &rest,
            "model.connector.",
            cfg.scale_factor,
            cfg.vision.hidden_size,
            cfg.text.hidden_size,
        )?;
        let mut tcfg = cfg.text.clone();
        tcfg.tie_word_embeddings = !text.contains_key("lm_head.weight");
        let lm = DeviceModel::from_source(
            &WeightSource::Safetensors {
                tensors: text,
                paths: files,
            },
            tcfg,
        )?;
        let mut tokenizer = Tokenizer::from_dir(dir)?;
        let template = chat_template(dir, &tokenizer)?;
        for stop in ["<end_of_utterance>", "<|im_end|>"] {
            if let Some(id) = tokenizer.token_to_id(stop) {
                tokenizer.add_eos_id(id);
            }
        }
        let (_, processor) = Idefics3Processor::for_checkpoint(dir)?;
        if tokenizer.token_to_id(IMAGE_PLACEHOLDER) != Some(cfg.image_token_id) {
            return Err(FusionError::config(
                "image_token_id",
                format!(
                    "{} is not the tokenizer's `{IMAGE_PLACEHOLDER}` ({:?})",
                    cfg.image_token_id,
                    tokenizer.token_to_id(IMAGE_PLACEHOLDER)
                ),
            ));
        }
        Self::new(VlmParts {
            model_type: "idefics3".into(),
            lm,
            encoder,
            adapter: Box::new(adapter),
            processor: Box::new(processor),
            tokenizer,
            chat: ChatFormat::Multimodal(template),
            image_token: IMAGE_PLACEHOLDER.into(),
            image_token_id: cfg.image_token_id,
            caption_prompt: CAPTION_PROMPT.into(),
            screen_prompt: SCREEN_PROMPT.into(),
        })
    }
}

impl Vlm<DeviceModel> {
    /// Applies a LoRA adapter to the language model (merged into dense weights, unmerged in
    /// f32 beside quantized ones; [`afm_lm::lora`]). `base_sha256` is the hash of the
    /// checkpoint the language model came from: an adapter made for another base is refused
    /// with both hashes named. Encoded images in the cache stay valid (the adapter touches
    /// the language model only).
    pub fn apply_lora(
        &mut self,
        adapter: &afm_lm::lora::LoraAdapter,
        base_sha256: &str,
    ) -> Result<afm_lm::lora::LoraApplied> {
        Ok(self
            .lm
            .apply_lora(adapter, base_sha256, afm_lm::lora::LoraMode::Auto)?)
    }
}

impl<M: LanguageModel> Vlm<M> {
    /// Assembles a pipeline from parts; checks that they fit together: every token the
    /// processor writes is in the vocabulary, the image token's id is the tokenizer's, the
    /// processor's views are the encoder's input size, and the adapter makes as many tokens
    /// per view as the processor puts in the prompt.
    pub fn new(p: VlmParts<M>) -> Result<Self> {
        let processor = Processor::new(p.processor);
        let mut needed = processor.inner().required_tokens();
        needed.push(p.image_token.clone());
        if matches!(p.chat, ChatFormat::Multimodal(_)) {
            needed.push(IMAGE_PLACEHOLDER.into());
        }
        for t in &needed {
            if p.tokenizer.token_to_id(t).is_none() {
                return Err(FusionError::config(
                    "tokenizer",
                    format!("the vocabulary has no `{t}` token"),
                ));
            }
        }
        if p.tokenizer.token_to_id(&p.image_token) != Some(p.image_token_id) {
            return Err(FusionError::config(
                "image_token_id",
                format!(
                    "{} is not the tokenizer's `{}` ({:?})",
                    p.image_token_id,
                    p.image_token,
                    p.tokenizer.token_to_id(&p.image_token)
                ),
            ));
        }
        let vc = p.encoder.config();
        if processor.tile_size() as usize != vc.image_size {
            return Err(FusionError::config(
                "image processor",
                format!(
                    "views of {} px do not match the encoder's {} px",
                    processor.tile_size(),
                    vc.image_size
                ),
            ));
        }
        let g = vc.image_size / vc.patch_size;
        let per_view = p.adapter.tokens_per_tile((g, g))?;
        if per_view != processor.min_image_tokens() {
            return Err(FusionError::config(
                "image processor",
                format!(
                    "the prompt gets {} image tokens per view but the adapter makes {per_view}",
                    processor.min_image_tokens()
                ),
            ));
        }
        if p.chat == ChatFormat::Text && p.tokenizer.chat_template().is_none() {
            return Err(FusionError::config(
                "tokenizer",
                "the language model's tokenizer has no chat template",
            ));
        }
        Ok(Self {
            model_type: p.model_type,
            lm: p.lm,
            encoder: p.encoder,
            adapter: p.adapter,
            tokenizer: p.tokenizer,
            processor,
            chat: p.chat,
            image_token: p.image_token,
            image_token_id: p.image_token_id,
            caption_prompt: p.caption_prompt,
            screen_prompt: p.screen_prompt,
            images: ImageCache::default(),
            reader: None,
        })
    }

    /// Reads the text of every image encoded from now on and puts it in the prompt after
    /// the image ([`text_block`]); `None` stops. Clears the image cache.
    pub fn set_reader(&mut self, reader: Option<ScreenReader>) {
        self.reader = reader;
        self.images.clear();
    }

    pub fn reader(&self) -> Option<&ScreenReader> {
        self.reader.as_ref()
    }

    /// `"idefics3"`, `"afm-tiny"`, ...
    pub fn model_type(&self) -> &str {
        &self.model_type
    }
    /// The request behind [`Vlm::caption`].
    pub fn caption_prompt(&self) -> &str {
        &self.caption_prompt
    }
    /// The request behind [`Vlm::describe_screen`].
    pub fn screen_prompt(&self) -> &str {
        &self.screen_prompt
    }
    pub fn chat_format(&self) -> &ChatFormat {
        &self.chat
    }
    /// The token the prompt repeats once per image embedding, and its id.
    pub fn image_token(&self) -> (&str, u32) {
        (&self.image_token, self.image_token_id)
    }
    pub fn lm(&self) -> &M {
        &self.lm
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn processor(&self) -> &Processor {
        &self.processor
    }
    /// Changes the image processing (e.g. image splitting); clears the encoded-image cache.
    pub fn processor_mut(&mut self) -> &mut Processor {
        self.clear_image_cache();
        &mut self.processor
    }

    /// Forgets every encoded image (the next request runs the encoder again).
    pub fn clear_image_cache(&self) {
        self.images.clear();
    }
    pub fn encoder(&self) -> &VisionEncoder {
        &self.encoder
    }

    /// Runs the vision encoder's matrices and attention scores in int8 or back in f32
    /// ([`VisionEncoder::set_int8`]); clears the encoded-image cache.
    pub fn set_vision_int8(&mut self, on: bool) -> Result<()> {
        self.clear_image_cache();
        self.encoder.set_int8(on)?;
        Ok(())
    }

    /// What an image of `w x h` will cost under a budget, without running anything.
    pub fn plan(&self, w: u32, h: u32, max_image_tokens: Option<usize>) -> Result<ImagePlan> {
        self.processor.plan(w, h, max_image_tokens)
    }

    /// Image embeddings from encoder pixel values (no cache), view by view in order.
    ///
    /// # Shapes
    /// `pixels: (tiles, 3, tile, tile)` -> `(tiles * tokens_per_tile, lm_hidden)`.
    pub fn embed_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = pixels.dims4()?;
        let p = self.encoder.config().patch_size;
        let x = self.encoder.forward(pixels)?;
        let y = self
            .adapter
            .forward(&x, (h / p, w / p), self.encoder.config().num_registers())?;
        let (tiles, t, d) = y.dims3()?;
        Ok(y.reshape((tiles * t, d))?)
    }

    /// Encodes an image (or returns the cached encoding of the same pixels and budget).
    pub fn encode_image(
        &self,
        img: &RgbImage,
        max_image_tokens: Option<usize>,
    ) -> Result<Arc<EncodedImage>> {
        let key = image_key(img, max_image_tokens);
        if let Some(e) = self.images.get(key) {
            return Ok(Arc::new(EncodedImage {
                plan: e.plan.clone(),
                embeds: e.embeds.clone(),
                encode_secs: 0.0,
                from_cache: true,
                text: e.text.clone(),
                objects: e.objects.clone(),
            }));
        }
        let t0 = Instant::now();
        let plan = self.plan(img.width(), img.height(), max_image_tokens)?;
        let pixels = self.processor.pixel_values(img, &plan)?;
        let embeds = self.embed_pixels(&pixels)?.to_dtype(DType::F32)?;
        let (text, objects) = match &self.reader {
            Some(r) => {
                let (lines, objects) = r.read(img)?;
                (Some(lines), objects)
            }
            None => (None, Vec::new()),
        };
        let enc = Arc::new(EncodedImage {
            plan,
            embeds,
            encode_secs: t0.elapsed().as_secs_f64(),
            from_cache: false,
            text,
            objects,
        });
        self.images.insert(key, enc.clone());
        Ok(enc)
    }

    /// Renders a chat with the pipeline's chat format ([`ChatFormat`]) and expands every
    /// image into its prompt text. Message text may not contain the image token (nor, with a
    /// multimodal template, the image placeholder).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let reserved: &[&str] = match &self.chat {
            ChatFormat::Multimodal(_) => &[IMAGE_PLACEHOLDER, &self.image_token],
            ChatFormat::Text => &[&self.image_token],
        };
        let texts = messages
            .iter()
            .flat_map(|m| &m.parts)
            .filter_map(|p| match p {
                Part::Text(t) => Some(t),
                Part::Image(_) => None,
            });
        for t in texts {
            if let Some(bad) = reserved.iter().find(|r| t.contains(**r)) {
                return Err(FusionError::Invalid(format!(
                    "message text may not contain the image placeholder `{bad}`"
                )));
            }
        }
        let template = match &self.chat {
            ChatFormat::Multimodal(t) => t,
            ChatFormat::Text => {
                let msgs: Vec<Message> = messages
                    .iter()
                    .map(|m| {
                        let mut content = String::new();
                        for p in &m.parts {
                            match p {
                                Part::Text(t) => content.push_str(t),
                                Part::Image(e) => {
                                    content.push_str(&self.processor.prompt_expansion(&e.plan));
                                    content.push('\n');
                                    content.push_str(&image_block(e.text.as_deref(), &e.objects));
                                }
                            }
                        }
                        Message::new(m.role.clone(), content)
                    })
                    .collect();
                return Ok(render_chat(&self.tokenizer, &msgs)?);
            }
        };
        let mut images = Vec::new();
        let tm: Vec<TemplateMessage> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: &m.role,
                content: m
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => TemplatePart {
                            kind: "text",
                            text: Some(t),
                        },
                        Part::Image(e) => {
                            images.push(e.clone());
                            TemplatePart {
                                kind: "image",
                                text: None,
                            }
                        }
                    })
                    .collect(),
            })
            .collect();
        let name = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let text = afm_lm::chat::render(
            template,
            &tm,
            &name(self.tokenizer.bos_id()),
            &name(self.tokenizer.eos_ids().first().copied()),
        )?;
        let pieces: Vec<&str> = text.split(IMAGE_PLACEHOLDER).collect();
        if pieces.len() - 1 != images.len() {
            return Err(FusionError::PlaceholderMismatch {
                placeholders: pieces.len() - 1,
                embeddings: images.len(),
            });
        }
        let mut out = String::from(pieces[0]);
        for (img, piece) in images.iter().zip(&pieces[1..]) {
            out.push_str(&self.processor.prompt_expansion(&img.plan));
            out.push_str(piece);
        }
        Ok(out)
    }

    /// Token ids and input embeddings of a chat, image embeddings spliced in at the image
    /// token's positions. The number of placeholders must equal the number of image
    /// embeddings.
    ///
    /// # Shapes
    /// `-> (ids: t, embeds: (t, lm_hidden))`.
    pub fn prepare(&self, messages: &[ChatMessage]) -> Result<(Vec<u32>, Tensor)> {
        let text = self.render(messages)?;
        let ids = self.tokenizer.encode(&text)?;
        let images: Vec<&Tensor> = messages
            .iter()
            .flat_map(|m| m.parts.iter())
            .filter_map(|p| match p {
                Part::Image(e) => Some(&e.embeds),
                _ => None,
            })
            .collect();
        let image = if images.is_empty() {
            None
        } else {
            Some(Tensor::cat(&images, 0)?)
        };
        let embeds = splice(&self.lm, &ids, self.image_token_id, image.as_ref())?;
        Ok((ids, embeds))
    }

    /// Generates the assistant's next turn of a chat.
    pub fn chat(
        &self,
        messages: &[ChatMessage],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let (ids, embeds) = self.prepare(messages)?;
        Ok(afm_lm::generate_from_embeds(
            &self.lm,
            &self.tokenizer,
            &embeds,
            &ids,
            opts,
            on_text,
        )?)
    }

    /// Answers a question about an image, streaming the answer to `on_text`.
    pub fn ask(
        &self,
        img: &RgbImage,
        question: &str,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        if question.trim().is_empty() {
            return Err(FusionError::Invalid(
                "the question is empty; ask something about the image".into(),
            ));
        }
        let enc = self.encode_image(img, opts.max_image_tokens)?;
        self.ask_encoded(enc, question, opts, on_text)
    }

    /// [`Self::ask`] about an image already encoded (so that the answer reports the
    /// encoding of this request, not a cache hit of it).
    fn ask_encoded(
        &self,
        enc: Arc<EncodedImage>,
        question: &str,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let msgs = [ChatMessage::user(vec![
            Part::Image(enc.clone()),
            Part::Text(question.to_string()),
        ])];
        let (ids, embeds) = self.prepare(&msgs)?;
        let generation = afm_lm::generate_from_embeds(
            &self.lm,
            &self.tokenizer,
            &embeds,
            &ids,
            &opts.generate,
            on_text,
        )?;
        Ok(Answer {
            generation,
            plan: enc.plan.clone(),
            encode_secs: enc.encode_secs,
            image_from_cache: enc.from_cache,
            prompt_tokens: ids.len(),
        })
    }

    /// A caption of an image ([`Self::caption_prompt`]). With a text reader and an object
    /// list (afm-tiny on a picture), decoded under [`crate::grounded::caption_grammar`]; with
    /// a text reader that read lines (afm-tiny on a screenshot, whose caption is its
    /// description), under [`crate::grounded_screen::screen_grammar`].
    pub fn caption(
        &self,
        img: &RgbImage,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let enc = self.encode_image(img, opts.max_image_tokens)?;
        // afm-tiny: a picture's caption names what the object finder found
        // ([`crate::grounded`]), a screenshot's what the reader read
        // ([`crate::grounded_screen`], when its screen request is its caption request)
        let grammar = self.reader.as_ref().and_then(|_| {
            crate::grounded::picture_grammar(img, &enc).or_else(|| {
                (self.screen_prompt == self.caption_prompt)
                    .then(|| enc.text.as_deref().and_then(screen_grammar))
                    .flatten()
            })
        });
        match grammar {
            Some(g) => {
                self.answer_under_grammar(img, &enc, &self.caption_prompt, &g, opts, on_text)
            }
            None => self.ask_encoded(enc, &self.caption_prompt, opts, on_text),
        }
    }

    /// Captions many images with this one loaded model, in order. Each image's failure is
    /// its own entry; `on_done(i, result)` is called as each finishes (progress bars).
    /// One request at a time already keeps every core busy, so this runs them in sequence;
    /// the model is `Send + Sync`, so callers may also share it across threads.
    pub fn caption_many(
        &self,
        images: &[RgbImage],
        opts: &AskOptions,
        on_done: &mut dyn FnMut(usize, &Result<Answer>),
    ) -> Vec<Result<Answer>> {
        images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let r = self.caption(img, opts, &mut |_| true);
                on_done(i, &r);
                r
            })
            .collect()
    }

    /// A description of a screenshot ([`Self::screen_prompt`]; afm-tiny's is its caption
    /// prompt: it learnt screenshot descriptions as captions), at the processor's full
    /// resolution unless the caller sets a budget. With a text reader that read lines
    /// (afm-tiny on a screenshot), decoded under
    /// [`crate::grounded_screen::screen_grammar`].
    pub fn describe_screen(
        &self,
        img: &RgbImage,
        opts: &AskOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let enc = self.encode_image(img, opts.max_image_tokens)?;
        let grammar = self
            .reader
            .as_ref()
            .and_then(|_| enc.text.as_deref().and_then(screen_grammar));
        match grammar {
            Some(g) => self.answer_under_grammar(img, &enc, &self.screen_prompt, &g, opts, on_text),
            None => self.ask_encoded(enc, &self.screen_prompt, opts, on_text),
        }
    }
}

/// Text embeddings of `ids` with the rows of `image` put at the positions of `image_token`.
///
/// # Shapes
/// `ids: t`, `image: (n, hidden)` with `n` = count of `image_token` in `ids` -> `(t, hidden)`.
pub fn splice<M: LanguageModel + ?Sized>(
    lm: &M,
    ids: &[u32],
    image_token: u32,
    image: Option<&Tensor>,
) -> Result<Tensor> {
    let n_place = ids.iter().filter(|&&i| i == image_token).count();
    let n_img = match image {
        Some(t) => t.dim(0)?,
        None => 0,
    };
    if n_place != n_img {
        return Err(FusionError::PlaceholderMismatch {
            placeholders: n_place,
            embeddings: n_img,
        });
    }
    let text = lm.embed_tokens(ids)?;
    let Some(image) = image else { return Ok(text) };
    let hidden = lm.info().hidden_size;
    if image.dim(1)? != hidden {
        return Err(FusionError::Invalid(format!(
            "image embeddings are {} wide, the language model {hidden}",
            image.dim(1)?
        )));
    }
    let image = image.to_dtype(text.dtype())?;
    let mut pieces = Vec::new();
    let (mut i, mut used) = (0, 0);
    while i < ids.len() {
        let is_img = ids[i] == image_token;
        let start = i;
        while i < ids.len() && (ids[i] == image_token) == is_img {
            i += 1;
        }
        if is_img {
            pieces.push(image.narrow(0, used, i - start)?);
            used += i - start;
        } else {
            pieces.push(text.narrow(0, start, i - start)?);
        }
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highlighted_button_stands_out_clearly_or_alone() {
        // an accent button beside two plain ones, not-boxed lines between
        assert_eq!(
            highlighted_line(&[None, Some(15.0), Some(150.0), None, Some(20.0)]),
            Some(2)
        );
        // two buttons that stand out alike: neither
        assert_eq!(highlighted_line(&[Some(150.0), Some(130.0)]), None);
        // a lone button: only a filled one
        assert_eq!(highlighted_line(&[None, Some(120.0)]), Some(1));
        assert_eq!(highlighted_line(&[None, Some(20.0)]), None);
        assert_eq!(highlighted_line(&[None, None]), None);
        let line = |text: &str, boxed: bool, highlighted: bool| ReadLine {
            text: text.into(),
            region: afm_vision::reader::Region {
                x: 0,
                y: 0,
                w: 10,
                h: 10,
            },
            boxed,
            highlighted,
        };
        assert_eq!(
            text_block(&[
                line("Save", false, false),
                line("Cancel", true, false),
                line("OK", true, true)
            ]),
            "Text in the image: \"Save\"; button \"Cancel\"; highlighted button \"OK\".\n"
        );
    }
    #[test]
    fn shapes_read_as_glyphs_make_a_picture_but_text_on_panes_stays_text() {
        use afm_vision::reader::Region;
        let r = |x, y, w, h| Region { x, y, w, h };
        let (w, h) = (320, 256);
        // a small dark triangle read as "A": the line fills the triangle's box
        let triangle = r(84, 10, 33, 33);
        assert!(is_picture(&[r(86, 12, 28, 25)], &[triangle], w, h));
        // a star's point read as ",": a small line inside a small object
        let star = r(270, 25, 45, 45);
        assert!(is_picture(&[r(291, 31, 7, 7)], &[triangle, star], w, h));
        // no text at all, objects found: a picture; neither: nothing to read either way
        assert!(is_picture(&[], &[triangle], w, h));
        assert!(is_picture(&[], &[], w, h));
        // a line on open ground, beside the shapes: text
        assert!(!is_picture(
            &[r(86, 12, 28, 25), r(150, 200, 60, 12)],
            &[triangle],
            w,
            h
        ));
        // two small shapes side by side read as one line ("0 Q"): a picture
        let (a, b) = (r(84, 128, 24, 24), r(112, 126, 25, 25));
        assert!(is_picture(&[r(84, 127, 52, 22)], &[a, b], w, h));
        // a word whose four glyphs are each an object: text
        let glyphs: Vec<Region> = (0..4).map(|i| r(100 + 22 * i, 100, 20, 24)).collect();
        assert!(!is_picture(&[r(100, 100, 86, 24)], &glyphs, w, h));
        // a short line on a large pane (more than 1/16 of the image, line under a quarter)
        let pane = r(40, 40, 200, 150);
        assert!(!is_picture(&[r(50, 50, 60, 12)], &[pane], w, h));
        // a maximised window: bars and panes reach the edge, so their lines stay text even
        // when each lies in a small box
        let (bw, bh) = (1024, 640);
        let title_bar = r(1, 1, 1022, 32);
        assert!(!is_picture(&[r(44, 10, 155, 14)], &[title_bar], bw, bh));
        // a line that sticks out of the object's box by more than the margin: text
        assert!(!is_picture(&[r(80, 12, 40, 25)], &[triangle], w, h));
    }

    #[test]
    fn the_prompt_carries_text_or_else_objects_grouped_and_counted() {
        let r = afm_vision::reader::Region {
            x: 0,
            y: 0,
            w: 10,
            h: 10,
        };
        let obj = |colour: &'static str, shape: &str| afm_vision::objects::SeenObject {
            colour,
            rgb: [0; 3],
            shape: shape.into(),
            region: r,
            area: 100,
        };
        let objects = [
            obj("purple", "hexagon"),
            obj("brown", "circle"),
            obj("purple", "hexagon"),
            obj("blue", "box"),
        ];
        assert_eq!(
            object_block(&objects),
            "Objects in the image, 4 in all: 2 purple hexagons; 1 brown circle; 1 blue box.\n"
        );
        let lines = [ReadLine {
            text: "OK".into(),
            region: r,
            boxed: false,
            highlighted: false,
        }];
        // text wins; objects only for a picture without text; nothing for neither
        assert_eq!(
            image_block(Some(&lines), &objects),
            "Text in the image: \"OK\".\n"
        );
        assert_eq!(image_block(Some(&[]), &objects), object_block(&objects));
        assert_eq!(image_block(None, &objects), object_block(&objects));
        assert_eq!(image_block(Some(&[]), &[]), "");
        assert_eq!(image_block(None, &[]), "");
    }
}
