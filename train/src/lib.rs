//! Training and evaluation data for the AFM models (issue 6, point 2).
//!
//! Three sources, one [`Sample`] type:
//!
//! * [`screens`]: procedurally generated UI screenshots (windows and dialogs with a title bar,
//!   menu bar, text fields with content, checkboxes, a list, buttons, a status bar), rendered
//!   with the embedded DejaVu fonts ([`font`]) at 640x400 up to 1280x800, with the structured
//!   ground truth ([`screens::ScreenTruth`]), a natural-language description and question/answer
//!   pairs. Titles and button labels are drawn from the stated UI vocabulary ([`vocab`]); in
//!   the held-out split some are made with words never seen in training ([`vocab`]'s held-out
//!   words).
//! * [`scenes`]: procedurally generated scenes of coloured shapes (counts, colours, relative
//!   positions) with a caption and question/answer pairs.
//! * [`easy_vqa`]: a reader of the easy-VQA data set that ships inside the PyPI package
//!   `easy-vqa` 1.0 (fetched by `scripts/fetch_easy_vqa.sh` into `models/easy-vqa/`).
//!
//! # Determinism
//!
//! [`generate`]`(kind, split, index)` is a pure function of its arguments: the sample's random
//! stream is a ChaCha8 generator seeded with [`seed`]`(kind, split, index)`, which is injective
//! (split in bit 63, kind in bits 56..63, index in bits 0..56), so any sample can be regenerated
//! alone, in any order, and no two (kind, split, index) share a stream. Indices are taken
//! modulo 2^56. The random stream is the same on every platform; the labels and pixels are too
//! with the crate versions locked in Cargo.lock (`rand`'s range sampling may change between its
//! minor versions) up to last-bit differences of the platform's `sin`/`cos` in shape outlines.
//! The fonts are parsed once per process; a sample takes a few milliseconds.
//!
//! A held-out screenshot decides which of its title and button labels get held-out words
//! ([`vocab`]) with a second stream of the same seed (ChaCha8 stream
//! [`screens::HELD_OUT_WORDS_STREAM`]), so those draws are as deterministic as the rest, the
//! training split never makes them (its samples are byte-identical to those made before the
//! held-out words existed), and the held-out split's other draws are unchanged.
//!
//! # Train and held-out splits
//!
//! The held-out split ([`Split::HeldOut`]) never shares a seed with training (bit 63 of the
//! seed), and it is also drawn from different font sizes, layouts and colours, so that an
//! evaluation on it measures generalisation rather than memory. Exactly:
//!
//! | | [`Split::Train`] | [`Split::HeldOut`] |
//! | --- | --- | --- |
//! | screen font size (em, px) | uniform in [12, 16) | uniform in [10.5, 12) or [16, 18) (half each) |
//! | screen canvas sizes | 640x400, 800x500, 1024x640, 1152x720 | 720x450, 960x600, 1280x800 |
//! | screen colour themes | light, graphite, dark, ocean | sand, forest, midnight |
//! | button row | right- or left-aligned | centred |
//! | text field labels | left of the field | above the field |
//! | list placement (window with fields and a list) | list below the fields, or a sidebar on the left | list below the fields, or a sidebar on the right |
//! | screen titles | UI vocabulary | UI vocabulary; about 1/3 of the screens: a title with a held-out word |
//! | screen button labels | UI vocabulary | UI vocabulary; about 1/3 of the labels: one with a held-out word |
//! | scene canvas | 256x256, 320x256 | 288x288, 256x320 |
//! | scene shape radius (px) | uniform in [11, 20) | uniform in [20, 27) |
//! | scene backgrounds | white, light gray, cream | pale blue, pale green, lavender |
//!
//! The constants behind this table are [`screens::font_px_ranges`], [`screens::canvas_sizes`],
//! [`screens::theme_names`], [`vocab::HELD_OUT_TITLE_FRACTION`],
//! [`vocab::HELD_OUT_BUTTON_FRACTION`], [`scenes::canvas_sizes`], [`scenes::radius_range`] and
//! [`scenes::background_names`]; the tests check that generated samples stay inside them.
//! For easy-VQA, `Train` is the package's `train` folder and `HeldOut` its `test` folder.
//!
//! # Licences
//!
//! The generator and everything it produces are this project's (Apache-2.0); DejaVu fonts:
//! Bitstream Vera licence (`assets/fonts/LICENSE-DejaVu.txt`); easy-VQA: MIT. See
//! `assets/data/README.md`.

pub mod adapter_train;
pub mod caption_slots;
pub mod ctc;
pub mod easy_vqa;
pub mod eval;
pub mod font;
pub mod glyphs;
pub mod linprobe;
pub mod lora_recover;
pub mod optim;
pub mod perceive;
pub mod pretrain;
pub mod prompt;
pub mod raster;
pub mod reader_train;
pub mod runloop;
pub mod scenes;
pub mod screens;
pub mod shape_fit;
pub mod spread;
pub mod vocab;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use easy_vqa::{DataError, EasyVqa};

/// Which part of the data a sample belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training data.
    Train,
    /// Evaluation data: other seeds, font sizes, layouts and colours (see the module docs).
    HeldOut,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::HeldOut => "held_out",
        }
    }
}

/// Where a sample comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Screen,
    Scene,
    EasyVqa,
}

/// The generated kinds, the ones [`generate`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SynthKind {
    Screen,
    Scene,
}

impl From<SynthKind> for Kind {
    fn from(k: SynthKind) -> Kind {
        match k {
            SynthKind::Screen => Kind::Screen,
            SynthKind::Scene => Kind::Scene,
        }
    }
}

/// What a question asks about; lets an evaluation report each figure of issue 6 point 4
/// (titles and button labels, scene colours and counts, easy-VQA) separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QaCategory {
    /// Title of a window or dialog.
    Title,
    /// Label of one button.
    Button,
    /// Number of buttons.
    ButtonCount,
    /// Content of a text field.
    Field,
    /// Number of items in a list.
    ListCount,
    /// One item of a list.
    ListItem,
    /// Whether a checkbox is checked.
    Checkbox,
    /// Message text of a dialog.
    Message,
    /// Number of shapes (of a colour, a kind, or both).
    Count,
    /// Colour of a shape.
    Colour,
    /// Kind of a shape.
    Shape,
    /// Whether something is present (yes/no).
    Exists,
    /// Relative position left/right/above/below (yes/no).
    Position,
}

/// One question with its exact expected answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Qa {
    pub question: String,
    pub answer: String,
    pub category: QaCategory,
    /// Whether the expected answer holds a word never seen in training (one of
    /// [`vocab::held_out_words`]); only held-out screenshots have such questions. Left out of
    /// the JSON labels when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unseen: bool,
}

impl Qa {
    pub fn new(question: impl Into<String>, answer: impl Into<String>, category: QaCategory) -> Qa {
        Qa {
            question: question.into(),
            answer: answer.into(),
            category,
            unseen: false,
        }
    }
}

/// An axis-aligned pixel rectangle (x, y of the top-left corner; width, height).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, w: u32, h: u32) -> Rect {
        Rect { x, y, w, h }
    }
    pub fn right(&self) -> u32 {
        self.x + self.w
    }
    pub fn bottom(&self) -> u32 {
        self.y + self.h
    }
    /// Whether the two rectangles share at least one pixel.
    pub fn intersects(&self, o: &Rect) -> bool {
        self.x < o.right() && o.x < self.right() && self.y < o.bottom() && o.y < self.bottom()
    }
    /// Whether `o` lies entirely inside `self`.
    pub fn contains(&self, o: &Rect) -> bool {
        o.x >= self.x && o.y >= self.y && o.right() <= self.right() && o.bottom() <= self.bottom()
    }
}

/// Structured ground truth of a sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    Screen(Box<screens::ScreenTruth>),
    Scene(scenes::SceneTruth),
    /// A glyph sheet ([`glyphs`]): its lines of text.
    Glyphs(Vec<screens::TextItem>),
    EasyVqa {
        /// Image id in the easy-VQA folder (`images/<id>.png`).
        image_id: u32,
        /// Colour and shape of the one shape, when the questions tell them.
        colour: Option<String>,
        shape: Option<String>,
    },
}

/// One training or evaluation example.
#[derive(Clone, Debug)]
pub struct Sample {
    pub image: RgbImage,
    /// Natural-language description of the whole image.
    pub caption: String,
    /// Question/answer pairs about the image.
    pub qa: Vec<Qa>,
    pub kind: Kind,
    pub split: Split,
    /// Index within (kind, split); for easy-VQA the image id.
    pub index: u64,
    pub truth: Truth,
}

/// Everything of a [`Sample`] but its pixels, for writing labels as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Labels<'a> {
    pub kind: Kind,
    pub split: Split,
    pub index: u64,
    pub width: u32,
    pub height: u32,
    pub caption: &'a str,
    pub qa: &'a [Qa],
    pub truth: &'a Truth,
}

impl Sample {
    pub fn labels(&self) -> Labels<'_> {
        Labels {
            kind: self.kind,
            split: self.split,
            index: self.index,
            width: self.image.width(),
            height: self.image.height(),
            caption: &self.caption,
            qa: &self.qa,
            truth: &self.truth,
        }
    }
}

/// The seed of sample `index` of (`kind`, `split`): split in bit 63, kind in bits 56..63, the
/// index (mod 2^56) below, so distinct arguments never share a seed.
pub fn seed(kind: SynthKind, split: Split, index: u64) -> u64 {
    let s = match split {
        Split::Train => 0u64,
        Split::HeldOut => 1,
    };
    let k = match kind {
        SynthKind::Screen => 1u64,
        SynthKind::Scene => 2,
    };
    (s << 63) | (k << 56) | (index & ((1u64 << 56) - 1))
}

/// The random stream of one sample.
pub fn rng_for(kind: SynthKind, split: Split, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed(kind, split, index))
}

/// Generates sample `index` of `kind` in `split`; deterministic in its arguments.
pub fn generate(kind: SynthKind, split: Split, index: u64) -> Sample {
    let mut rng = rng_for(kind, split, index);
    let (image, caption, qa, truth) = match kind {
        SynthKind::Screen => {
            let s = screens::generate(&mut rng, split);
            (s.image, s.caption, s.qa, Truth::Screen(Box::new(s.truth)))
        }
        SynthKind::Scene => {
            let s = scenes::generate(&mut rng, split);
            (s.image, s.caption, s.qa, Truth::Scene(s.truth))
        }
    };
    Sample {
        image,
        caption,
        qa,
        kind: kind.into(),
        split,
        index,
        truth,
    }
}

/// The output of one generator before it is wrapped in a [`Sample`].
pub(crate) struct Generated<T> {
    pub image: RgbImage,
    pub caption: String,
    pub qa: Vec<Qa>,
    pub truth: T,
}

/// Colour as stored in the ground truth.
pub type Rgb = [u8; 3];
