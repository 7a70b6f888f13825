//! Stage 1b of afm-tiny's recipe: a ViT that **perceives and reads**, pretrained on what the
//! generator knows about every pixel.
//!
//! Stage 1 ([`crate::pretrain`]) matched a whole image with its caption, one vector per
//! image: it never told the ViT where anything is, and nothing in it taught reading. This
//! stage puts dense, per-patch targets on the encoder's patch outputs (a 14x14 grid per
//! 224-px tile), all taken from the generator's ground truth:
//!
//! | head | per patch | source |
//! | --- | --- | --- |
//! | `colour` | colour of the object covering the patch, or none ([`COLOURS`]) | scenes, easy-VQA |
//! | `shape` | its shape, or none ([`SHAPES`]) | scenes, easy-VQA |
//! | `center` | whether an object's centre lies in the patch (what counting needs) | scenes, easy-VQA |
//! | `role` | the screen element under the patch ([`ROLES`]: title, button, field, ...) | screens |
//! | `chars` | [`SLOTS`] slots: the characters whose centres fall in the patch, in reading order, then blanks | every string on a screen |
//!
//! # Reading at the character level
//! A character's target is its own code ([`char_class`]: printable ASCII, one class per
//! character), never a word id, so the head reads words it has never seen: the held-out split
//! has titles from a separate word list. A character belongs to the patch row holding the
//! middle of its x-height and to the patch holding its horizontal centre; slot `k` of a patch
//! holds the patch's `k`-th character from the left (a fixed alignment, so no CTC is needed,
//! and no sub-patch position has to be predicted: a first run with one slot per 2 px column
//! predicted blanks only after 3,840 views). Slots of the patches a string spans carry full
//! weight (blanks included, so the head learns how many characters a patch holds); all other
//! slots weigh [`OFF_TEXT_WEIGHT`]. A string is read back by walking its patch row left to
//! right and keeping the non-blank slots ([`read_row`]).
//!
//! # Views
//! The encoder sees what the tiling planner (`afm_vision::tiling`) gives it at inference:
//! native-resolution tiles of 224 px and a 224-px overview of the whole image. Example `j`
//! of a run is source `j % 5` ([`view_for`]): a scene (overview or a native tile), a screen
//! crop around a string (twice: reading is the hard part), a screen overview or random crop,
//! and an easy-VQA image (a scene when easy-VQA is absent). Screen crops are drawn at a
//! random scale in `scale_range`, so the ViT reads fonts smaller and larger than the
//! training split's 12-16 px (the held-out split uses 10.5-12 and 16-18 px). Every choice is
//! seeded by `(seed, split, j)`: a resumed run sees what an uninterrupted one would.
//!
//! # Files
//! As [`crate::pretrain`]: `perceive.json`, `checkpoint.safetensors`, and on completion
//! `vision/` (an encoder `afm_vision::VisionEncoder::load` reads) plus `heads.safetensors`.

use crate::easy_vqa::{colour_and_shape_from_pixels, EasyVqa};
use crate::font;
use crate::optim::{AdamWConfig, Params};
use crate::pretrain::{normal, Result, TrainError};
use crate::runloop::{run_loop, LoopSpec, StepLoss};
use crate::scenes::SceneTruth;
use crate::screens::{ScreenTruth, TextItem};
use crate::{generate, Rect, Sample, Split, SynthKind, Truth};
use afm_vision::weights::VisionWeights;
use afm_vision::{Preprocess, VisionConfig, VisionEncoder};
use candle_core::{DType, Device, Tensor, D};
use image::{imageops, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Colour classes of the `colour` head: none, the scenes' ten, easy-VQA's teal.
pub const COLOURS: [&str; 12] = [
    "none", "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "gray",
    "teal",
];
/// Shape classes of the `shape` head: none, the scenes' six, easy-VQA's rectangle.
pub const SHAPES: [&str; 8] = [
    "none",
    "circle",
    "square",
    "triangle",
    "diamond",
    "hexagon",
    "star",
    "rectangle",
];
/// Screen element classes of the `role` head.
pub const ROLES: [&str; 16] = [
    "none",
    "window",
    "title",
    "menu",
    "button",
    "button_text",
    "field",
    "field_text",
    "label",
    "checkbox",
    "checkbox_text",
    "list",
    "list_item",
    "selected_row",
    "status",
    "message",
];
/// Character slots per patch (the most characters one patch holds: 4.5-px glyphs at the
/// smallest scale put at most 4 centres in 16 px).
pub const SLOTS: usize = 6;
/// Character classes: 0 blank, 1..=95 the printable ASCII characters `' '..='~'`, 96 any
/// other character.
pub const CHAR_CLASSES: usize = 97;
/// Loss weight of character slots away from any string.
pub const OFF_TEXT_WEIGHT: f32 = 0.05;
/// Side of a view (the encoder's input) in pixels.
const TILE: u32 = 224;
/// Patch side in pixels.
const PATCH: u32 = 16;

/// Class of a character ([`CHAR_CLASSES`]).
pub fn char_class(c: char) -> u32 {
    match c {
        ' '..='~' => c as u32 - 31,
        _ => 96,
    }
}

/// The character of a class (`None` for blank; `'?'` for "other").
pub fn class_char(k: u32) -> Option<char> {
    match k {
        0 => None,
        1..=95 => char::from_u32(k + 31),
        _ => Some('?'),
    }
}

/// Relative weights of the heads' losses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    pub colour: f32,
    pub shape: f32,
    pub center: f32,
    pub role: f32,
    pub chars: f32,
    /// Read with CTC ([`crate::ctc`]): a string's characters may sit in any slots of the
    /// patches along its row (one patch of slack at each end), in order, instead of the
    /// fixed slot of the module docs. The character term is then the mean CTC loss per
    /// character over the strings wholly in view.
    #[serde(default)]
    pub ctc: bool,
    /// Weight of the patches that show no object (class `none`) in the colour and shape
    /// terms, against 1 for object patches. A scene's shapes cover a few of 196 patches, so
    /// at 1 the background is most of both terms; below 1 the object patches lead.
    #[serde(default = "unit_weight")]
    pub background: f32,
    /// Weight of the object term: the shape head's logits averaged over each object group of
    /// a view (the patches with the same colour and shape labels), against the group's shape
    /// ([`object_groups`]). The head is linear, so this is the head on the group's mean
    /// feature: edge patches may carry a shape that the flat inside of a shape cannot.
    #[serde(default)]
    pub objects: f32,
}

fn unit_weight() -> f32 {
    1.0
}

impl LossWeights {
    /// Every term off (background at its neutral 1): a base to switch single terms on,
    /// `LossWeights { shape: 1.0, ..LossWeights::none() }`.
    pub fn none() -> Self {
        Self {
            colour: 0.0,
            shape: 0.0,
            center: 0.0,
            role: 0.0,
            chars: 0.0,
            ctc: false,
            background: 1.0,
            objects: 0.0,
        }
    }
}

/// Where a run's views come from ([`view_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewSource {
    /// A scene of shapes: its overview or a native-resolution tile.
    Scene,
    /// A screen crop around a string, at a random scale.
    ScreenText,
    /// A screen overview or a random crop.
    Screen,
    /// An easy-VQA image (a scene when easy-VQA is absent).
    EasyVqa,
    /// A glyph sheet ([`crate::glyphs`]) in the training split; a screen crop around a string
    /// in the held-out split, so that the probe's reading figures stay those of screens.
    Glyphs,
}

/// A stage-1b run's settings (`perceive.json` keeps them; a resumed run must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerceiveConfig {
    pub vision: VisionConfig,
    pub batch_size: usize,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    pub warmup_steps: usize,
    pub adamw: AdamWConfig,
    /// Held-out batches evaluated after every epoch.
    pub eval_batches: usize,
    /// Held-out screenshots whose title and first button are read after every epoch.
    pub eval_reads: usize,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Range of the random scale of screen crops.
    pub scale_range: (f32, f32),
    pub weights: LossWeights,
    /// Screen crops around strings only (sources 1 and 2 of the mix): a reading run.
    #[serde(default)]
    pub text_only: bool,
    /// The views' sources, taken in turn (view `j` is `sources[j % len]`); empty for the
    /// default mix of the module docs. Overrides `text_only`.
    #[serde(default)]
    pub sources: Vec<ViewSource>,
    /// Scene views as crops at a random scale in this range (2.0: shapes twice their
    /// size), instead of the overview or a native tile.
    #[serde(default)]
    pub scene_scale: Option<(f32, f32)>,
    /// Em sizes of glyph sheets' text, px (`glyphs` views; default [`crate::glyphs::DEFAULT_PX`]).
    #[serde(default)]
    pub glyph_px: Option<(f32, f32)>,
}

impl PerceiveConfig {
    /// afm-tiny's encoder (the same as stage 1's, [`crate::pretrain::PretrainConfig::afm_tiny`]).
    pub fn afm_tiny() -> Self {
        Self {
            vision: crate::pretrain::PretrainConfig::afm_tiny().vision,
            batch_size: 24,
            // ~3-6 views/s on 2 cores: 5 x 160 steps of 24 (19,200 views) is 1-2 hours
            steps_per_epoch: 160,
            epochs: 5,
            warmup_steps: 50,
            adamw: AdamWConfig {
                lr: 5e-4,
                weight_decay: 0.05,
                ..Default::default()
            },
            eval_batches: 4,
            eval_reads: 40,
            checkpoint_every: 40,
            seed: 0,
            scale_range: (0.75, 1.3),
            weights: LossWeights {
                colour: 1.0,
                shape: 1.0,
                center: 1.0,
                role: 0.5,
                chars: 2.0,
                ctc: false,
                background: 1.0,
                objects: 0.0,
            },
            text_only: false,
            sources: vec![],
            scene_scale: None,
            glyph_px: None,
        }
    }

    /// A very small configuration for tests (224-px views, a 2-block encoder of width 32).
    pub fn test_tiny() -> Self {
        let mut v = crate::pretrain::PretrainConfig::afm_tiny().vision;
        v.hidden_size = 32;
        v.intermediate_size = 64;
        v.num_hidden_layers = 2;
        v.num_attention_heads = 2;
        v.attention = afm_vision::AttentionPattern::RegisterWindow {
            window: 7,
            global_layers: vec![1],
            num_registers: 1,
        };
        Self {
            vision: v,
            batch_size: 5,
            steps_per_epoch: 3,
            epochs: 2,
            warmup_steps: 2,
            adamw: AdamWConfig {
                lr: 1e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
            eval_batches: 1,
            eval_reads: 2,
            checkpoint_every: 2,
            seed: 0,
            scale_range: (0.75, 1.3),
            weights: Self::afm_tiny().weights,
            text_only: false,
            sources: vec![],
            scene_scale: None,
            glyph_px: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        if self.vision.image_size != TILE as usize || self.vision.patch_size != PATCH as usize {
            return Err(TrainError::Invalid(format!(
                "stage 1b needs {TILE}-px views with patch {PATCH} (got {} / {})",
                self.vision.image_size, self.vision.patch_size
            )));
        }
        for (k, v) in [
            ("batch_size", self.batch_size),
            ("steps_per_epoch", self.steps_per_epoch),
            ("epochs", self.epochs),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(TrainError::Invalid(format!("`{k}` must be at least 1")));
            }
        }
        let (a, b) = self.scale_range;
        if !(a > 0.1 && b >= a && b < 4.0) {
            return Err(TrainError::Invalid(format!(
                "`scale_range` ({a}, {b}) must satisfy 0.1 < lo <= hi < 4"
            )));
        }
        if !(self.adamw.lr > 0.0 && self.adamw.lr.is_finite()) {
            return Err(TrainError::Invalid("`adamw.lr` must be positive".into()));
        }
        if let Some((lo, hi)) = self.glyph_px {
            if !(lo >= 6.0 && lo <= hi && hi <= 80.0) {
                return Err(TrainError::Invalid(format!(
                    "`glyph_px` ({lo}, {hi}) must satisfy 6 <= lo <= hi <= 80"
                )));
            }
        }
        if let Some((lo, hi)) = self.scene_scale {
            if !(lo > 0.1 && hi >= lo && hi < 8.0) {
                return Err(TrainError::Invalid(format!(
                    "`scene_scale` ({lo}, {hi}) must satisfy 0.1 < lo <= hi < 8"
                )));
            }
        }
        let b = self.weights.background;
        if !(b.is_finite() && b >= 0.0) {
            return Err(TrainError::Invalid(format!(
                "`weights.background` ({b}) must be a finite weight >= 0"
            )));
        }
        Ok(())
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch * self.epochs
    }
}

/// Where a 224-px view sits in its image: view pixel `(u, v)` shows scaled-image pixel
/// `(u + ox, v + oy)`, i.e. source pixel `((u + ox) / s, (v + oy) / s)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    pub s: f32,
    pub ox: u32,
    pub oy: u32,
}

impl View {
    /// The overview: the whole image fitted into the tile, top-left, as the planner does.
    pub fn overview(w: u32, h: u32) -> View {
        View {
            s: TILE as f32 / w.max(h) as f32,
            ox: 0,
            oy: 0,
        }
    }

    /// Scaled image size.
    fn scaled(&self, w: u32, h: u32) -> (u32, u32) {
        (
            ((w as f32 * self.s).round() as u32).max(1),
            ((h as f32 * self.s).round() as u32).max(1),
        )
    }

    /// View coordinates of a source point.
    fn view_of(&self, x: f32, y: f32) -> (f32, f32) {
        (x * self.s - self.ox as f32, y * self.s - self.oy as f32)
    }

    /// Source coordinates of a view point.
    fn source_of(&self, u: f32, v: f32) -> (f32, f32) {
        ((u + self.ox as f32) / self.s, (v + self.oy as f32) / self.s)
    }
}

/// The view's pixels: the image scaled by `view.s`, cut at `(ox, oy)`, padded with the
/// normalisation mean (grey 128) like the planner's tiles, normalised.
///
/// # Shapes
/// `-> (3, 224, 224)`.
pub fn view_pixels(img: &RgbImage, view: &View) -> Result<Tensor> {
    let pre = Preprocess::default();
    let (w, h) = img.dimensions();
    let (sw, sh) = view.scaled(w, h);
    let scaled = if (sw, sh) == (w, h) {
        img.clone()
    } else {
        afm_vision::preprocess::resize(img, sw, sh, pre.filter)?
    };
    let mut canvas = RgbImage::from_pixel(TILE, TILE, Rgb([128, 128, 128]));
    let cw = TILE.min(sw.saturating_sub(view.ox));
    let ch = TILE.min(sh.saturating_sub(view.oy));
    if cw > 0 && ch > 0 {
        let part = imageops::crop_imm(&scaled, view.ox, view.oy, cw, ch).to_image();
        imageops::replace(&mut canvas, &part, 0, 0);
    }
    Ok(pre.to_tensor(&canvas)?)
}

/// Per-patch targets of one view (module docs). Patches row-major, 196 of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub colour: Vec<u32>,
    pub shape: Vec<u32>,
    pub center: Vec<u32>,
    pub role: Vec<u32>,
    /// `patches * SLOTS` character classes.
    pub chars: Vec<u32>,
    /// `patches * SLOTS` loss weights of the character slots.
    pub char_weight: Vec<f32>,
    /// Strings wholly inside the view: `(role, text, patch row, first and last patch column)`.
    pub strings: Vec<(u32, String, usize, usize, usize)>,
    /// Objects whose centre is inside the view.
    pub objects_in_view: usize,
}

impl Labels {
    fn empty() -> Labels {
        let n = (TILE / PATCH) as usize;
        let p = n * n;
        Labels {
            colour: vec![0; p],
            shape: vec![0; p],
            center: vec![0; p],
            role: vec![0; p],
            chars: vec![0; p * SLOTS],
            char_weight: vec![OFF_TEXT_WEIGHT; p * SLOTS],
            strings: vec![],
            objects_in_view: 0,
        }
    }
}

/// Patches per side of a 224-px view.
pub const GRID: usize = (TILE / PATCH) as usize;

/// The 4x4 sample points of patch `(r, c)` in view coordinates.
fn patch_points(r: usize, c: usize) -> impl Iterator<Item = (f32, f32)> {
    (0..16).map(move |k| {
        let (i, j) = (k / 4, k % 4);
        (
            (c as u32 * PATCH) as f32 + 2.0 + 4.0 * j as f32,
            (r as u32 * PATCH) as f32 + 2.0 + 4.0 * i as f32,
        )
    })
}

fn colour_index(name: &str) -> u32 {
    COLOURS.iter().position(|c| *c == name).unwrap_or(0) as u32
}

fn shape_index(name: &str) -> u32 {
    SHAPES.iter().position(|c| *c == name).unwrap_or(0) as u32
}

fn near(a: &Rgb<u8>, b: [u8; 3], tol: i32) -> bool {
    (0..3)
        .map(|c| (a[c] as i32 - b[c] as i32).abs())
        .sum::<i32>()
        <= tol
}

/// An object to label: its exact RGB, bounding box, colour and shape classes, centre.
type Object = ([u8; 3], Rect, u32, u32, (f32, f32));

/// Object patches and centres of `objects`.
fn object_labels(img: &RgbImage, view: &View, objects: &[Object], l: &mut Labels) {
    let (w, h) = img.dimensions();
    for r in 0..GRID {
        for c in 0..GRID {
            let mut votes = vec![0usize; objects.len()];
            for (u, v) in patch_points(r, c) {
                let (x, y) = view.source_of(u, v);
                if x < 0.0 || y < 0.0 || x >= w as f32 || y >= h as f32 {
                    continue;
                }
                let (xi, yi) = (x as u32, y as u32);
                let px = img.get_pixel(xi, yi);
                // later objects are drawn on top
                if let Some(k) = objects.iter().rposition(|(rgb, b, ..)| {
                    xi >= b.x
                        && xi < b.right()
                        && yi >= b.y
                        && yi < b.bottom()
                        && near(px, *rgb, 40)
                }) {
                    votes[k] += 1;
                }
            }
            if let Some((k, &n)) = votes.iter().enumerate().max_by_key(|(_, n)| **n) {
                if n >= 4 {
                    l.colour[r * GRID + c] = objects[k].2;
                    l.shape[r * GRID + c] = objects[k].3;
                }
            }
        }
    }
    for o in objects {
        let (u, v) = view.view_of(o.4 .0, o.4 .1);
        if u >= 0.0 && v >= 0.0 && u < TILE as f32 && v < TILE as f32 {
            let (sw, sh) = view.scaled(w, h);
            // a centre in the padding beyond the scaled image cannot be seen
            if u + (view.ox as f32) < sw as f32 && v + (view.oy as f32) < sh as f32 {
                l.center[(v as usize / PATCH as usize) * GRID + u as usize / PATCH as usize] = 1;
                l.objects_in_view += 1;
            }
        }
    }
}

fn scene_labels(img: &RgbImage, t: &SceneTruth, view: &View, l: &mut Labels) {
    let objects: Vec<_> = t
        .shapes
        .iter()
        .map(|s| {
            (
                s.colour.rgb(),
                s.bbox,
                colour_index(s.colour.name()),
                shape_index(s.shape.name()),
                (s.cx, s.cy),
            )
        })
        .collect();
    object_labels(img, view, &objects, l);
}

fn easy_labels(
    img: &RgbImage,
    colour: Option<&str>,
    shape: Option<&str>,
    view: &View,
    l: &mut Labels,
) {
    let from_px = colour_and_shape_from_pixels(img);
    let colour = colour.or(from_px.map(|p| p.0));
    let shape = shape.or(from_px.map(|p| p.1));
    let (Some(colour), Some(shape)) = (colour, shape) else {
        return;
    };
    let rgb = match crate::easy_vqa::css_colour(colour) {
        Some(c) => c,
        None => return,
    };
    // the shape's pixels are exactly its colour: its bounding box and centre
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0 == rgb {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        return;
    }
    let bbox = Rect::new(x0, y0, x1 - x0 + 1, y1 - y0 + 1);
    let centre = ((x0 + x1 + 1) as f32 / 2.0, (y0 + y1 + 1) as f32 / 2.0);
    object_labels(
        img,
        view,
        &[(rgb, bbox, colour_index(colour), shape_index(shape), centre)],
        l,
    );
}

/// Every string of a screen with its role (title 2, menu 3, ...).
pub fn screen_strings(t: &ScreenTruth) -> Vec<(u32, &TextItem)> {
    let role = |n: &str| ROLES.iter().position(|r| *r == n).unwrap_or(0) as u32;
    let mut v = vec![(role("title"), &t.title)];
    v.extend(t.menu.iter().map(|m| (role("menu"), m)));
    v.extend(t.message.iter().map(|m| (role("message"), m)));
    for f in &t.fields {
        v.push((role("label"), &f.label));
        v.push((role("field_text"), &f.content));
    }
    v.extend(
        t.checkboxes
            .iter()
            .map(|c| (role("checkbox_text"), &c.label)),
    );
    if let Some(list) = &t.list {
        v.extend(list.items.iter().map(|i| (role("list_item"), i)));
    }
    v.extend(t.buttons.iter().map(|b| (role("button_text"), &b.label)));
    v.extend(t.status.iter().map(|s| (role("status"), s)));
    v.retain(|(_, it)| !it.text.is_empty());
    v
}

fn screen_labels(t: &ScreenTruth, view: &View, l: &mut Labels) {
    let role = |n: &str| ROLES.iter().position(|r| *r == n).unwrap_or(0) as u32;
    // boxes, larger first so that smaller ones (inside them) win
    let mut boxes: Vec<(Rect, u32)> = vec![(t.window_rect, role("window"))];
    boxes.extend(t.buttons.iter().map(|b| (b.rect, role("button"))));
    boxes.extend(t.fields.iter().map(|f| (f.rect, role("field"))));
    boxes.extend(t.checkboxes.iter().map(|c| (c.box_rect, role("checkbox"))));
    if let Some(list) = &t.list {
        boxes.push((list.rect, role("list")));
        if let Some(s) = list.selected.and_then(|i| list.row_rects.get(i)) {
            boxes.push((*s, role("selected_row")));
        }
    }
    let strings = screen_strings(t);
    boxes.extend(strings.iter().map(|(r, it)| (it.rect, *r)));
    boxes.sort_by_key(|(b, _)| std::cmp::Reverse(b.w as u64 * b.h as u64));
    let is_text = |r: u32| {
        matches!(
            ROLES[r as usize],
            "title"
                | "menu"
                | "button_text"
                | "field_text"
                | "label"
                | "checkbox_text"
                | "list_item"
                | "status"
                | "message"
        )
    };
    for r in 0..GRID {
        for c in 0..GRID {
            let mut votes = [0usize; ROLES.len()];
            for (u, v) in patch_points(r, c) {
                let (x, y) = view.source_of(u, v);
                let (xi, yi) = (x.floor() as i64, y.floor() as i64);
                if xi < 0 || yi < 0 || xi >= t.width as i64 || yi >= t.height as i64 {
                    continue;
                }
                let (xi, yi) = (xi as u32, yi as u32);
                let hit = boxes
                    .iter()
                    .rev()
                    .find(|(b, _)| xi >= b.x && xi < b.right() && yi >= b.y && yi < b.bottom());
                if let Some((_, k)) = hit {
                    votes[*k as usize] += if is_text(*k) { 3 } else { 1 };
                }
            }
            let (k, n) = votes
                .iter()
                .enumerate()
                .max_by_key(|(_, n)| **n)
                .unwrap_or((0, &0));
            if *n >= 3 {
                l.role[r * GRID + c] = k as u32;
            }
        }
    }
    for (role, it) in strings {
        string_labels(role, it, view, l);
    }
}

/// Character targets of one string (module docs: reading at the character level).
fn string_labels(role: u32, it: &TextItem, view: &View, l: &mut Labels) {
    let chars: Vec<char> = it.text.chars().collect();
    let (x0, base) = (it.origin[0], it.origin[1]);
    let mid_y = base - 0.35 * it.px;
    let (_, v) = view.view_of(x0, mid_y);
    if v < 0.0 || v >= TILE as f32 {
        return;
    }
    let row = v as usize / PATCH as usize;
    let mut prefix = String::new();
    let mut left = 0f32;
    let (mut first, mut last, mut all_in) = (usize::MAX, 0usize, true);
    for &ch in &chars {
        prefix.push(ch);
        let right = font::text_width(it.face, it.px, &prefix);
        let (u, _) = view.view_of(x0 + 0.5 * (left + right), mid_y);
        let (ul, _) = view.view_of(x0 + left, mid_y);
        let (ur, _) = view.view_of(x0 + right, mid_y);
        left = right;
        if ul < 0.0 || ur > TILE as f32 {
            all_in = false;
        }
        if !(0.0..TILE as f32).contains(&u) {
            continue;
        }
        let col = u as usize / PATCH as usize;
        // the patch's characters in reading order: the next free slot
        let base = (row * GRID + col) * SLOTS;
        match (0..SLOTS).find(|&k| l.chars[base + k] == 0) {
            Some(k) => l.chars[base + k] = char_class(ch),
            None => all_in = false,
        }
        first = first.min(col);
        last = last.max(col);
    }
    if first > last {
        return;
    }
    for col in first..=last {
        for s in 0..SLOTS {
            let i = (row * GRID + col) * SLOTS + s;
            // characters weigh twice the blanks around them
            l.char_weight[i] = if l.chars[i] != 0 { 2.0 } else { 1.0 };
        }
    }
    if all_in {
        l.strings.push((role, it.text.clone(), row, first, last));
    }
}

/// A glyph sheet's labels: every line's characters, and role `message` under them.
fn glyph_labels(lines: &[TextItem], view: &View, l: &mut Labels) {
    let message = ROLES.iter().position(|r| *r == "message").unwrap_or(0) as u32;
    for it in lines {
        string_labels(message, it, view, l);
    }
    for p in 0..GRID * GRID {
        if (0..SLOTS).any(|k| l.chars[p * SLOTS + k] != 0) {
            l.role[p] = message;
        }
    }
}

/// Labels of a sample seen through `view`.
pub fn labels(sample: &Sample, view: &View) -> Labels {
    let mut l = Labels::empty();
    match &sample.truth {
        Truth::Scene(t) => scene_labels(&sample.image, t, view, &mut l),
        Truth::Screen(t) => screen_labels(t, view, &mut l),
        Truth::Glyphs(lines) => glyph_labels(lines, view, &mut l),
        Truth::EasyVqa { colour, shape, .. } => easy_labels(
            &sample.image,
            colour.as_deref(),
            shape.as_deref(),
            view,
            &mut l,
        ),
    }
    l
}

/// A native-scale crop at scale `s` that holds `r` (source rect) when it fits, placed at
/// random around it; otherwise a random crop.
fn crop_around(rng: &mut ChaCha8Rng, w: u32, h: u32, s: f32, r: Option<Rect>) -> View {
    let (sw, sh) = (
        ((w as f32 * s).round() as u32).max(1),
        ((h as f32 * s).round() as u32).max(1),
    );
    let max_x = sw.saturating_sub(TILE);
    let max_y = sh.saturating_sub(TILE);
    let pick = |rng: &mut ChaCha8Rng, lo: f32, hi: f32, max: u32| -> u32 {
        let (lo, hi) = (lo.max(0.0) as u32, (hi.max(0.0) as u32).min(max));
        if hi <= lo {
            lo.min(max)
        } else {
            rng.random_range(lo..=hi)
        }
    };
    let (ox, oy) = match r {
        Some(r) => {
            let (x0, y0) = (r.x as f32 * s, r.y as f32 * s);
            let (x1, y1) = (r.right() as f32 * s, r.bottom() as f32 * s);
            (
                pick(rng, x1 - TILE as f32 + 2.0, x0 - 2.0, max_x),
                pick(rng, y1 - TILE as f32 + 2.0, y0 - 2.0, max_y),
            )
        }
        None => (
            pick(rng, 0.0, max_x as f32, max_x),
            pick(rng, 0.0, max_y as f32, max_y),
        ),
    };
    View { s, ox, oy }
}

/// Example `j` of `split`: the sample and how it is viewed (module docs: views).
pub fn view_for(
    cfg: &PerceiveConfig,
    j: u64,
    split: Split,
    easy: Option<&EasyVqa>,
) -> Result<(Sample, View)> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        cfg.seed
            ^ (j.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            ^ (((split == Split::HeldOut) as u64) << 63),
    );
    let (src, idx) = if !cfg.sources.is_empty() {
        // held-out glyph views are screen crops: the same held-out views as a run with
        // `screen_text` in their place
        let eff: Vec<ViewSource> = cfg
            .sources
            .iter()
            .map(|&x| match x {
                ViewSource::Glyphs if split == Split::HeldOut => ViewSource::ScreenText,
                x => x,
            })
            .collect();
        let n = eff.len() as u64;
        let this = eff[(j % n) as usize];
        let code = match this {
            ViewSource::Scene => 0,
            ViewSource::ScreenText => 1,
            ViewSource::Screen => 3,
            ViewSource::EasyVqa => 4,
            ViewSource::Glyphs => 5,
        };
        // the k-th view of a source takes that source's k-th image
        let k = (0..j % n).filter(|&i| eff[i as usize] == this).count() as u64;
        let per_cycle = eff.iter().filter(|&&x| x == this).count() as u64;
        (code, (j / n) * per_cycle + k)
    } else if cfg.text_only {
        (1 + j % 2, j / 2)
    } else {
        (j % 5, j / 5)
    };
    let scale = |rng: &mut ChaCha8Rng| rng.random_range(cfg.scale_range.0..=cfg.scale_range.1);
    Ok(match (src, easy) {
        (0, _) | (4, None) | (6.., _) => {
            let s = generate(
                SynthKind::Scene,
                split,
                if src == 0 { idx * 2 } else { idx * 2 + 1 },
            );
            let (w, h) = s.image.dimensions();
            let v = if let Some((lo, hi)) = cfg.scene_scale {
                let sc = rng.random_range(lo..=hi);
                crop_around(&mut rng, w, h, sc, None)
            } else if rng.random_bool(0.5) {
                View::overview(w, h)
            } else {
                crop_around(&mut rng, w, h, 1.0, None)
            };
            (s, v)
        }
        (1 | 2, _) => {
            let s = generate(SynthKind::Screen, split, idx * 3 + src - 1);
            let (w, h) = s.image.dimensions();
            let Truth::Screen(t) = &s.truth else {
                unreachable!("screens carry screen truth")
            };
            let strings = screen_strings(t);
            // titles and button labels are what the bars ask about: half the crops
            let pool: Vec<&TextItem> = if rng.random_bool(0.5) {
                strings
                    .iter()
                    .filter(|(r, _)| matches!(ROLES[*r as usize], "title" | "button_text"))
                    .map(|(_, it)| *it)
                    .collect()
            } else {
                strings.iter().map(|(_, it)| *it).collect()
            };
            let target = if pool.is_empty() {
                None
            } else {
                Some(pool[rng.random_range(0..pool.len())].rect)
            };
            let sc = scale(&mut rng);
            let v = crop_around(&mut rng, w, h, sc, target);
            (s, v)
        }
        (3, _) => {
            let s = generate(SynthKind::Screen, split, idx * 3 + 2);
            let (w, h) = s.image.dimensions();
            let v = if rng.random_bool(0.3) {
                View::overview(w, h)
            } else {
                let sc = scale(&mut rng);
                crop_around(&mut rng, w, h, sc, None)
            };
            (s, v)
        }
        (5, _) => {
            let px = cfg.glyph_px.unwrap_or(crate::glyphs::DEFAULT_PX);
            let s = crate::glyphs::sheet(idx, cfg.seed, px);
            (
                s,
                View::overview(crate::glyphs::SHEET, crate::glyphs::SHEET),
            )
        }
        (_, Some(e)) => {
            let s = e.get((idx % e.len() as u64) as usize)?;
            let (w, h) = s.image.dimensions();
            (s, View::overview(w, h))
        }
    })
}

/// The heads' parameter names and shapes: `(out, in)` weight and `(out)` bias each.
pub fn head_shapes(d: usize) -> Vec<(&'static str, usize)> {
    let _ = d;
    vec![
        ("colour", COLOURS.len()),
        ("shape", SHAPES.len()),
        ("center", 2),
        ("role", ROLES.len()),
        ("chars", SLOTS * CHAR_CLASSES),
    ]
}

/// Fresh head parameters (`{prefix}{name}.weight`, `.bias`).
pub fn init_heads(d: usize, prefix: &str, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut m = HashMap::new();
    for (name, out) in head_shapes(d) {
        m.insert(
            format!("{prefix}{name}.weight"),
            normal(&mut rng, &[out, d], 0.02)?,
        );
        m.insert(
            format!("{prefix}{name}.bias"),
            Tensor::zeros(out, DType::F32, &Device::Cpu)?,
        );
    }
    Ok(m)
}

/// Initial parameters: the ViT under `vision.` (from `init` — a `vision/` export — or fresh as
/// in stage 1) and the heads under `head.` (from `heads` — a stage-1b `heads.safetensors`,
/// every head with this config's shape — or fresh).
pub fn init_params(
    cfg: &PerceiveConfig,
    init: Option<&Path>,
    heads: Option<&Path>,
) -> Result<Params> {
    cfg.validate()?;
    let fresh = crate::pretrain::init_params(
        &crate::pretrain::PretrainConfig {
            vision: cfg.vision.clone(),
            seed: cfg.seed,
            ..crate::pretrain::PretrainConfig::afm_tiny()
        },
        8,
    )?;
    let mut m: HashMap<String, Tensor> = fresh
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.starts_with("vision."))
        .collect();
    if let Some(dir) = init {
        // An encoder without a stem can start a run that adds one: everything but the
        // patch embedding carries over, the stem and the new patch embedding start fresh.
        let plain = VisionConfig {
            stem: None,
            ..cfg.vision.clone()
        };
        let adds_stem = cfg.vision.stem.is_some()
            && VisionConfig::from_file(&dir.join("config.json")).ok() == Some(plain.clone());
        let t = if adds_stem {
            let mut t = crate::adapter_train::read_vision_export(dir, &plain)?;
            t.retain(|k, _| !k.starts_with("embeddings.patch_embedding."));
            t
        } else {
            crate::adapter_train::read_vision_export(dir, &cfg.vision)?
        };
        m.extend(t.into_iter().map(|(k, v)| (format!("vision.{k}"), v)));
    }
    let mut fresh_heads = init_heads(cfg.vision.hidden_size, "head.", cfg.seed + 1)?;
    if let Some(file) = heads {
        let bad = |what: String| TrainError::Invalid(format!("{}: {what}", file.display()));
        let stored = candle_core::safetensors::load(file, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read the heads ({e})")))?;
        for (name, t) in fresh_heads.iter_mut() {
            let got = stored
                .get(name)
                .ok_or_else(|| bad(format!("has no `{name}` (not a stage-1b heads file?)")))?;
            if got.dims() != t.dims() {
                return Err(bad(format!(
                    "`{name}` is {:?}, this config's head is {:?}",
                    got.dims(),
                    t.dims()
                )));
            }
            *t = got.to_dtype(DType::F32)?;
        }
    }
    m.extend(fresh_heads);
    Ok(Params::from_tensors(m)?)
}

/// A batch: pixels and labels.
pub struct Batch {
    /// `(b, 3, 224, 224)`
    pub pixels: Tensor,
    pub labels: Vec<Labels>,
    /// Kind of each example's sample.
    pub kinds: Vec<crate::Kind>,
}

/// Examples `start .. start + n` of `split`.
pub fn batch(
    cfg: &PerceiveConfig,
    split: Split,
    start: u64,
    n: usize,
    easy: Option<&EasyVqa>,
) -> Result<Batch> {
    use rayon::prelude::*;
    let items = (start..start + n as u64)
        .into_par_iter()
        .map(|j| {
            let (s, v) = view_for(cfg, j, split, easy)?;
            let px = view_pixels(&s.image, &v)?;
            Ok((px, labels(&s, &v), s.kind))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut px = vec![];
    let mut labels = vec![];
    let mut kinds = vec![];
    for (p, l, k) in items {
        px.push(p);
        labels.push(l);
        kinds.push(k);
    }
    Ok(Batch {
        pixels: Tensor::stack(&px, 0)?,
        labels,
        kinds,
    })
}

/// Patch features of the encoder built from `params` (`vision.` prefix), differentiable.
///
/// # Shapes
/// `pixels: (b, 3, 224, 224)` -> `(b * 196, d)`.
pub fn patch_features(
    vision: &VisionConfig,
    params: &HashMap<String, Tensor>,
    pixels: &Tensor,
) -> Result<Tensor> {
    let mut enc = VisionEncoder::new(
        &VisionWeights::from_tensors(params.clone())?,
        vision.clone(),
    )?;
    enc.set_fast_kernels(false);
    let out = enc.forward(pixels)?;
    let r = vision.num_registers();
    let (b, t, d) = out.dims3()?;
    let p = out.narrow(1, r, t - r)?;
    Ok(p.reshape((b * (t - r), d))?)
}

/// Logits of every head.
pub struct HeadLogits {
    pub colour: Tensor,
    pub shape: Tensor,
    pub center: Tensor,
    pub role: Tensor,
    /// `(n * SLOTS, CHAR_CLASSES)`
    pub chars: Tensor,
}

/// The heads on patch features `(n, d)`; `heads` holds `{prefix}{name}.weight/.bias`.
pub fn head_logits(
    feats: &Tensor,
    heads: &HashMap<String, Tensor>,
    prefix: &str,
) -> Result<HeadLogits> {
    let lin = |name: &str| -> Result<Tensor> {
        let get = |k: String| {
            heads
                .get(&k)
                .cloned()
                .ok_or_else(|| TrainError::Invalid(format!("parameter `{k}` is missing")))
        };
        let w = get(format!("{prefix}{name}.weight"))?;
        let b = get(format!("{prefix}{name}.bias"))?;
        Ok(feats.matmul(&w.t()?)?.broadcast_add(&b)?)
    };
    let n = feats.dim(0)?;
    Ok(HeadLogits {
        colour: lin("colour")?,
        shape: lin("shape")?,
        center: lin("center")?,
        role: lin("role")?,
        chars: lin("chars")?.reshape((n * SLOTS, CHAR_CLASSES))?,
    })
}

/// Weighted mean cross-entropy.
fn weighted_ce(logits: &Tensor, target: &[u32], weight: &[f32]) -> Result<Tensor> {
    let n = target.len();
    let t = Tensor::from_slice(target, (n, 1), &Device::Cpu)?;
    let w = Tensor::from_slice(weight, n, &Device::Cpu)?;
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?
        .gather(&t, 1)?
        .squeeze(1)?;
    let total: f32 = weight.iter().sum::<f32>().max(1e-6);
    Ok(((lp * w)?.sum_all()? * (-1.0 / total as f64))?)
}

/// The slots a string's CTC alignment runs over, in reading order (the patches of its row
/// from one before its first to one after its last, each patch's slots left to right), as
/// indices into one view's `GRID * GRID * SLOTS` slots.
pub fn row_steps(row: usize, first: usize, last: usize) -> Vec<usize> {
    let (a, b) = (first.saturating_sub(1), (last + 1).min(GRID - 1));
    (a..=b)
        .flat_map(|col| (0..SLOTS).map(move |k| (row * GRID + col) * SLOTS + k))
        .collect()
}

/// The character classes of a string (what CTC aligns).
fn string_classes(text: &str) -> Vec<u32> {
    text.chars().map(char_class).collect()
}

/// Mean CTC loss per character over the strings wholly in view of every label set
/// (`chars: (views * GRID * GRID * SLOTS, CHAR_CLASSES)`). Its value is the loss; its
/// gradient with respect to `chars` is CTC's, which [`crate::ctc::ctc`] computes on plain
/// slices and which enters the graph as `sum(G * logits) + constant`. Zero (no gradient)
/// when no string is in view.
fn ctc_chars_loss(chars: &Tensor, labels: &[Labels]) -> Result<Tensor> {
    let per_view = GRID * GRID * SLOTS;
    let mut idx: Vec<u32> = vec![];
    let mut segs: Vec<(usize, usize, Vec<u32>)> = vec![];
    for (v, l) in labels.iter().enumerate() {
        for (_, text, row, a, b) in &l.strings {
            let lab = string_classes(text);
            let steps = row_steps(*row, *a, *b);
            if lab.is_empty() || steps.len() < crate::ctc::min_steps(&lab) {
                continue;
            }
            segs.push((idx.len(), steps.len(), lab));
            idx.extend(steps.iter().map(|&k| (v * per_view + k) as u32));
        }
    }
    if segs.is_empty() {
        return Ok(Tensor::new(0f32, &Device::Cpu)?);
    }
    let n = idx.len();
    let it = Tensor::from_vec(idx, n, &Device::Cpu)?;
    let sel = chars.index_select(&it, 0)?;
    let c = CHAR_CLASSES;
    let lp: Vec<f32> = candle_nn::ops::log_softmax(&sel.detach(), D::Minus1)?
        .flatten_all()?
        .to_vec1()?;
    let mut g = vec![0f32; n * c];
    let mut total = 0f64;
    let mut counted = 0usize;
    for (start, t, lab) in &segs {
        let Some((nll, grad)) = crate::ctc::ctc(&lp[start * c..(start + t) * c], *t, c, lab, 0)
        else {
            continue;
        };
        let w = 1.0 / lab.len() as f32;
        total += (nll * w) as f64;
        counted += 1;
        for (o, v) in g[start * c..(start + t) * c].iter_mut().zip(grad) {
            *o = v * w;
        }
    }
    if counted == 0 {
        return Ok(Tensor::new(0f32, &Device::Cpu)?);
    }
    let scale = 1.0 / counted as f32;
    g.iter_mut().for_each(|x| *x *= scale);
    let gt = Tensor::from_vec(g, (n, c), &Device::Cpu)?;
    let surrogate = (&sel * &gt)?.sum_all()?;
    let offset = total / counted as f64 - surrogate.to_scalar::<f32>()? as f64;
    Ok((surrogate + offset)?)
}

/// Reads a string with CTC's best path over [`row_steps`].
pub fn read_row_ctc(char_pred: &[u32], row: usize, first: usize, last: usize) -> String {
    let best: Vec<u32> = row_steps(row, first, last)
        .into_iter()
        .map(|k| char_pred[k])
        .collect();
    crate::ctc::greedy(&best, 0)
        .into_iter()
        .filter_map(class_char)
        .collect()
}

/// The object groups of a batch: for every view, the patches with the same (non-`none`)
/// colour and shape labels. Returns the averaging matrix `(groups, views * GRID * GRID)`
/// (each row holds `1 / patches` on its group's patches) and each group's shape class;
/// `None` when no view shows an object.
pub fn object_groups(labels: &[Labels]) -> Result<Option<(Tensor, Vec<u32>)>> {
    let p = GRID * GRID;
    let mut rows: Vec<Vec<usize>> = vec![];
    let mut shape = vec![];
    for (v, l) in labels.iter().enumerate() {
        let mut g: std::collections::BTreeMap<(u32, u32), Vec<usize>> = Default::default();
        for k in 0..p.min(l.shape.len()) {
            if l.shape[k] != 0 {
                g.entry((l.colour[k], l.shape[k]))
                    .or_default()
                    .push(v * p + k);
            }
        }
        for ((_, s), idx) in g {
            rows.push(idx);
            shape.push(s);
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let n = labels.len() * p;
    let mut m = vec![0f32; rows.len() * n];
    for (r, idx) in rows.iter().enumerate() {
        let w = 1.0 / idx.len() as f32;
        idx.iter().for_each(|&k| m[r * n + k] = w);
    }
    Ok(Some((
        Tensor::from_vec(m, (rows.len(), n), &Device::Cpu)?,
        shape,
    )))
}

/// The weighted sum of the heads' losses over a batch's labels.
pub fn loss(cfg: &LossWeights, lg: &HeadLogits, labels: &[Labels]) -> Result<Tensor> {
    let cat = |f: &dyn Fn(&Labels) -> &Vec<u32>| -> Vec<u32> {
        labels.iter().flat_map(|l| f(l).iter().copied()).collect()
    };
    let ones = |n: usize| vec![1f32; n];
    let colour = cat(&|l| &l.colour);
    let shape = cat(&|l| &l.shape);
    let center = cat(&|l| &l.center);
    let role = cat(&|l| &l.role);
    let chars = cat(&|l| &l.chars);
    let cw: Vec<f32> = labels
        .iter()
        .flat_map(|l| l.char_weight.iter().copied())
        .collect();
    // centres are rare (a few of 196 patches): weigh them up
    let centre_w: Vec<f32> = center
        .iter()
        .map(|&c| if c == 1 { 3.0 } else { 1.0 })
        .collect();
    let object_w = |t: &[u32]| -> Vec<f32> {
        t.iter()
            .map(|&c| if c == 0 { cfg.background } else { 1.0 })
            .collect()
    };
    let l = ((weighted_ce(&lg.colour, &colour, &object_w(&colour))? * cfg.colour as f64)?
        + (weighted_ce(&lg.shape, &shape, &object_w(&shape))? * cfg.shape as f64)?)?;
    let l = (l + (weighted_ce(&lg.center, &center, &centre_w)? * cfg.center as f64)?)?;
    let l = (l + (weighted_ce(&lg.role, &role, &ones(role.len()))? * cfg.role as f64)?)?;
    // the averaging matrix is built only when the term counts
    let groups = if cfg.objects > 0.0 {
        object_groups(labels)?
    } else {
        None
    };
    let l = match groups {
        Some((pool, groups)) => {
            let pooled = pool.matmul(&lg.shape)?;
            (l + (weighted_ce(&pooled, &groups, &ones(groups.len()))? * cfg.objects as f64)?)?
        }
        None => l,
    };
    let reading = if cfg.ctc {
        ctc_chars_loss(&lg.chars, labels)?
    } else {
        weighted_ce(&lg.chars, &chars, &cw)?
    };
    Ok((l + (reading * cfg.chars as f64)?)?)
}

/// Reads the string whose patch row and columns are given: the non-blank slots' characters
/// left to right.
pub fn read_row(char_pred: &[u32], row: usize, first: usize, last: usize) -> String {
    let mut s = String::new();
    for col in first..=last {
        for k in 0..SLOTS {
            if let Some(c) = class_char(char_pred[(row * GRID + col) * SLOTS + k]) {
                s.push(c);
            }
        }
    }
    s
}

/// Held-out figures of the heads (the same held-out views for every evaluation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f32,
    /// Colour accuracy over object patches.
    pub colour_acc: f32,
    /// Shape accuracy over object patches.
    pub shape_acc: f32,
    /// Shape accuracy over object groups ([`object_groups`]: the shape head's logits
    /// averaged over a group's patches).
    #[serde(default)]
    pub object_shape_acc: f32,
    /// Scene views whose predicted centre count equals the objects in view.
    pub count_acc: f32,
    /// Role accuracy over screen patches.
    pub role_acc: f32,
    /// Character accuracy over slots that hold a character.
    pub char_acc: f32,
    /// Strings read exactly (walked from predicted slots), of those wholly in view.
    pub string_exact: f32,
    pub strings: usize,
    /// [`crate::spread`] of the images' mean patch features within a batch (collapse check:
    /// near 0 means every image gives the same features).
    pub feature_spread: f32,
}

#[derive(Default)]
struct Tally {
    hit: usize,
    n: usize,
}

impl Tally {
    fn add(&mut self, ok: bool) {
        self.hit += ok as usize;
        self.n += 1;
    }
    fn frac(&self) -> f32 {
        if self.n == 0 {
            0.0
        } else {
            self.hit as f32 / self.n as f32
        }
    }
}

/// Figures of head logits against labels (no gradients needed). `ctc`: strings are read
/// with [`read_row_ctc`], and the character figure is `1 - edit distance / length` of the
/// strings read (no slot holds a fixed character under CTC).
pub fn metrics(lg: &HeadLogits, batch: &Batch, feats: &Tensor, ctc: bool) -> Result<Metrics> {
    let am = |t: &Tensor| -> Result<Vec<u32>> { Ok(t.argmax(D::Minus1)?.to_vec1::<u32>()?) };
    let (colour, shape, center, role, chars) = (
        am(&lg.colour)?,
        am(&lg.shape)?,
        am(&lg.center)?,
        am(&lg.role)?,
        am(&lg.chars)?,
    );
    let p = GRID * GRID;
    let (mut c, mut s, mut cnt, mut r, mut ch, mut st) = (
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    );
    for (i, l) in batch.labels.iter().enumerate() {
        let off = i * p;
        for k in 0..p {
            if l.colour[k] != 0 {
                c.add(colour[off + k] == l.colour[k]);
            }
            if l.shape[k] != 0 {
                s.add(shape[off + k] == l.shape[k]);
            }
        }
        match batch.kinds[i] {
            crate::Kind::Screen => {
                for k in 0..p {
                    r.add(role[off + k] == l.role[k]);
                }
                let pred = &chars[off * SLOTS..(off + p) * SLOTS];
                if ctc {
                    for (_, text, row, a, b) in &l.strings {
                        let got = read_row_ctc(pred, *row, *a, *b);
                        let want: Vec<char> = text.chars().collect();
                        let have: Vec<char> = got.chars().collect();
                        let errs = crate::ctc::edit_distance(&want, &have).min(want.len());
                        ch.hit += want.len() - errs;
                        ch.n += want.len();
                        st.add(got == *text);
                    }
                } else {
                    for (want, got) in l.chars.iter().zip(pred) {
                        if *want != 0 {
                            ch.add(got == want);
                        }
                    }
                    for (_, text, row, a, b) in &l.strings {
                        st.add(read_row(pred, *row, *a, *b) == *text);
                    }
                }
            }
            _ => {
                let n: usize = center[off..off + p].iter().map(|&x| x as usize).sum();
                cnt.add(n == l.objects_in_view);
            }
        }
    }
    let object_shape_acc = match object_groups(&batch.labels)? {
        Some((pool, groups)) => {
            let pred = pool
                .matmul(&lg.shape)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            let hit = pred.iter().zip(&groups).filter(|(a, b)| a == b).count();
            hit as f32 / groups.len() as f32
        }
        None => 0.0,
    };
    // spread of per-image mean features
    let b = batch.labels.len();
    let d = feats.dim(1)?;
    let m = feats.reshape((b, p, d))?.mean(1)?;
    let feature_spread = crate::spread::spread_of_rows(&m)?.unwrap_or(0.0);
    Ok(Metrics {
        loss: 0.0,
        colour_acc: c.frac(),
        shape_acc: s.frac(),
        object_shape_acc,
        count_acc: cnt.frac(),
        role_acc: r.frac(),
        char_acc: ch.frac(),
        string_exact: st.frac(),
        strings: st.n,
        feature_spread,
    })
}

/// Averages per-batch metrics (weighting string accuracy by strings).
fn mean_metrics(all: &[Metrics]) -> Metrics {
    let n = all.len().max(1) as f32;
    let strings: usize = all.iter().map(|m| m.strings).sum();
    Metrics {
        loss: all.iter().map(|m| m.loss).sum::<f32>() / n,
        colour_acc: all.iter().map(|m| m.colour_acc).sum::<f32>() / n,
        shape_acc: all.iter().map(|m| m.shape_acc).sum::<f32>() / n,
        object_shape_acc: all.iter().map(|m| m.object_shape_acc).sum::<f32>() / n,
        count_acc: all.iter().map(|m| m.count_acc).sum::<f32>() / n,
        role_acc: all.iter().map(|m| m.role_acc).sum::<f32>() / n,
        char_acc: all.iter().map(|m| m.char_acc).sum::<f32>() / n,
        string_exact: if strings == 0 {
            0.0
        } else {
            all.iter()
                .map(|m| m.string_exact * m.strings as f32)
                .sum::<f32>()
                / strings as f32
        },
        strings,
        feature_spread: all.iter().map(|m| m.feature_spread).sum::<f32>() / n,
    }
}

/// Held-out screens read at native scale: title and first button, each in a view holding it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadReport {
    pub titles: usize,
    pub titles_exact: usize,
    pub buttons: usize,
    pub buttons_exact: usize,
    /// A few (expected, read) pairs.
    pub examples: Vec<(String, String)>,
}

/// Reads the title and the first button label of held-out screens `0..n` at scale 1, each in
/// a 224-px view placed deterministically around it (the string starts 8 px from the left
/// when it fits; it is cut otherwise, and then not counted).
pub fn read_screens(
    vision: &VisionConfig,
    encoder: &HashMap<String, Tensor>,
    heads: &HashMap<String, Tensor>,
    heads_prefix: &str,
    n: usize,
    ctc: bool,
) -> Result<ReadReport> {
    let mut rep = ReadReport::default();
    for i in 0..n as u64 {
        let s = generate(SynthKind::Screen, Split::HeldOut, i);
        let Truth::Screen(t) = &s.truth else { continue };
        let (w, h) = s.image.dimensions();
        let mut items = vec![(true, t.title.clone())];
        if let Some(b) = t.buttons.first() {
            items.push((false, b.label.clone()));
        }
        for (is_title, it) in items {
            let r = it.rect;
            let ox = r.x.saturating_sub(8).min(w.saturating_sub(TILE));
            let oy = (r.y + r.h / 2)
                .saturating_sub(TILE / 2)
                .min(h.saturating_sub(TILE));
            let view = View { s: 1.0, ox, oy };
            let mut l = Labels::empty();
            string_labels(0, &it, &view, &mut l);
            let Some((_, text, row, a, b)) = l.strings.first().cloned() else {
                continue;
            };
            let px = view_pixels(&s.image, &view)?.unsqueeze(0)?;
            let f = patch_features(vision, encoder, &px)?;
            let lg = head_logits(&f, heads, heads_prefix)?;
            let pred = lg.chars.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let got = if ctc {
                read_row_ctc(&pred, row, a, b)
            } else {
                read_row(&pred, row, a, b)
            };
            let ok = got == text;
            if is_title {
                rep.titles += 1;
                rep.titles_exact += ok as usize;
            } else {
                rep.buttons += 1;
                rep.buttons_exact += ok as usize;
            }
            if rep.examples.len() < 8 {
                rep.examples.push((text, got));
            }
        }
    }
    Ok(rep)
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f32,
    pub eval: Metrics,
    pub read: ReadReport,
    pub seconds: f64,
}

pub type RunState = crate::runloop::RunState<PerceiveConfig, EpochReport>;
pub type Event = crate::runloop::Event<EpochReport>;

/// Held-out metrics of the current parameters.
pub fn evaluate(
    cfg: &PerceiveConfig,
    params: &Params,
    easy_eval: Option<&EasyVqa>,
) -> Result<(Metrics, ReadReport)> {
    let all = params.tensors();
    let mut ms = vec![];
    for k in 0..cfg.eval_batches.max(1) {
        let b = batch(
            cfg,
            Split::HeldOut,
            (k * cfg.batch_size) as u64,
            cfg.batch_size,
            easy_eval,
        )?;
        let f = patch_features(&cfg.vision, &params.with_prefix("vision."), &b.pixels)?.detach();
        let lg = head_logits(&f, &all, "head.")?;
        let mut m = metrics(&lg, &b, &f, cfg.weights.ctc)?;
        m.loss = loss(&cfg.weights, &lg, &b.labels)?.to_scalar::<f32>()?;
        ms.push(m);
    }
    let read = read_screens(
        &cfg.vision,
        &params.with_prefix("vision."),
        &all,
        "head.",
        cfg.eval_reads,
        cfg.weights.ctc,
    )?;
    Ok((mean_metrics(&ms), read))
}

/// Runs (or resumes) a stage-1b run; `init`: a `vision/` export to start the encoder from,
/// `heads`: a `heads.safetensors` to start the heads from (both ignored when resuming: the
/// checkpoint has the weights).
#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &PerceiveConfig,
    dir: &Path,
    init: Option<&Path>,
    heads: Option<&Path>,
    easy: Option<&EasyVqa>,
    easy_eval: Option<&EasyVqa>,
    until: Option<usize>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<RunState> {
    cfg.validate()?;
    let params = init_params(cfg, init, heads)?;
    let spec = LoopSpec {
        dir,
        state_file: "perceive.json",
        steps_per_epoch: cfg.steps_per_epoch,
        epochs: cfg.epochs,
        warmup_steps: cfg.warmup_steps,
        checkpoint_every: cfg.checkpoint_every,
        adamw: cfg.adamw,
        until,
    };
    let st = run_loop(
        cfg,
        &params,
        &spec,
        &mut |step| {
            let t0 = Instant::now();
            let b = batch(
                cfg,
                Split::Train,
                (step * cfg.batch_size) as u64,
                cfg.batch_size,
                easy,
            )?;
            let data_s = t0.elapsed().as_secs_f64();
            let all = params.tensors();
            let f = patch_features(&cfg.vision, &params.with_prefix("vision."), &b.pixels)?;
            let lg = head_logits(&f, &all, "head.")?;
            Ok(StepLoss {
                grads: None,
                loss: loss(&cfg.weights, &lg, &b.labels)?,
                examples: cfg.batch_size,
                data_s,
            })
        },
        &mut |end| {
            let (eval, read) = evaluate(cfg, &params, easy_eval)?;
            Ok(EpochReport {
                epoch: end.epoch,
                train_loss: end.train_loss,
                eval,
                read,
                seconds: end.seconds,
            })
        },
        on_event,
    )?;
    if st.step == cfg.total_steps() {
        let out = export(cfg, &params, dir)?;
        on_event(&Event::Done { dir: out });
    }
    Ok(st)
}

/// Writes `dir/vision/` (config + f32 safetensors, as stage 1) and `dir/heads.safetensors`.
pub fn export(cfg: &PerceiveConfig, params: &Params, dir: &Path) -> Result<PathBuf> {
    let out = crate::pretrain::write_vision(&cfg.vision, params, dir)?;
    let heads: HashMap<String, Tensor> = params
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.starts_with("head."))
        .collect();
    candle_core::safetensors::save(&heads, dir.join("heads.safetensors"))?;
    Ok(out)
}

/// Linear-probe results on a frozen encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub train_views: usize,
    pub eval_views: usize,
    pub steps: usize,
    pub eval: Metrics,
    pub read: ReadReport,
    pub seconds: f64,
}

#[allow(clippy::too_many_arguments)]
/// Linear probes (module docs' heads, freshly initialised) trained on the **frozen** features
/// of `train_views` training views and measured on `eval_views` held-out views plus
/// `cfg.eval_reads` held-out screens read at native scale. What a stage has put into its
/// features, independent of the heads it trained with.
pub fn probe(
    cfg: &PerceiveConfig,
    encoder_dir: &Path,
    train_views: usize,
    eval_views: usize,
    steps: usize,
    easy: Option<&EasyVqa>,
    easy_eval: Option<&EasyVqa>,
    on_progress: &mut dyn FnMut(&str),
) -> Result<ProbeReport> {
    let t0 = Instant::now();
    let enc = init_params(cfg, Some(encoder_dir), None)?.with_prefix("vision.");
    let chunk = cfg.batch_size.max(1);
    let feats_of =
        |split: Split, n: usize, say: &mut dyn FnMut(&str)| -> Result<Vec<(Tensor, Batch)>> {
            let mut out = vec![];
            let mut done = 0;
            while done < n {
                let k = chunk.min(n - done);
                let b = batch(
                    cfg,
                    split,
                    done as u64,
                    k,
                    if split == Split::Train {
                        easy
                    } else {
                        easy_eval
                    },
                )?;
                let f = patch_features(&cfg.vision, &enc, &b.pixels)?.detach();
                out.push((f, b));
                done += k;
                say(&format!("features of {done}/{n} {} views", split.name()));
            }
            Ok(out)
        };
    let train = feats_of(Split::Train, train_views, on_progress)?;
    let eval = feats_of(Split::HeldOut, eval_views, on_progress)?;
    let heads = Params::from_tensors(init_heads(cfg.vision.hidden_size, "probe.", 7)?)?;
    let mut opt = crate::optim::AdamW::new(
        &heads,
        AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for step in 0..steps {
        let (f, b) = &train[step % train.len()];
        let lg = head_logits(f, &heads.tensors(), "probe.")?;
        let l = loss(&cfg.weights, &lg, &b.labels)?;
        let g = l.backward()?;
        let lr = crate::runloop::lr_at(3e-3, steps / 20, steps, step);
        opt.step(&heads, &g, lr)?;
        if (step + 1) % (steps / 10).max(1) == 0 {
            on_progress(&format!(
                "probe step {}/{steps}: loss {:.3}",
                step + 1,
                l.to_scalar::<f32>()?
            ));
        }
    }
    let h = heads.tensors();
    let mut ms = vec![];
    for (f, b) in &eval {
        let lg = head_logits(f, &h, "probe.")?;
        let mut m = metrics(&lg, b, f, cfg.weights.ctc)?;
        m.loss = loss(&cfg.weights, &lg, &b.labels)?.to_scalar::<f32>()?;
        ms.push(m);
    }
    let read = read_screens(
        &cfg.vision,
        &enc,
        &h,
        "probe.",
        cfg.eval_reads,
        cfg.weights.ctc,
    )?;
    Ok(ProbeReport {
        train_views,
        eval_views,
        steps,
        eval: mean_metrics(&ms),
        read,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Writes the export of a run that has not finished, from its last checkpoint (what
/// `afm train perceive --export-now` does): for a run stopped early on purpose. The export
/// records nothing of the schedule; `perceive.json` keeps the step it came from.
pub fn export_checkpoint(cfg: &PerceiveConfig, dir: &Path) -> Result<(PathBuf, usize)> {
    let params = init_params(cfg, None, None)?;
    let ck = dir.join("checkpoint.safetensors");
    let opt = crate::optim::load_checkpoint(&ck, &params, cfg.adamw)?;
    Ok((export(cfg, &params, dir)?, opt.step as usize))
}
