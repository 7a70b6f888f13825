//! Training the text-line reader ([`afm_vision::reader`]) with CTC on generated lines.
//!
//! Each step's batch is lines cut from generated training screens (every string a screen
//! draws: title, menus, labels, field contents, buttons, list items, status) with random
//! margins, and single lines drawn alone on a flat ground in one of the embedded faces at
//! `synth_px` em, dark on light or light on dark, of training-vocabulary words and random
//! characters (so the reader cannot lean on a word list). Both are a pure function of the
//! step index, so a resumed run repeats an uninterrupted one.
//!
//! After every epoch the reader reads held-out screens (other seeds, font sizes, themes and
//! layouts; a third of the titles and button labels made of words no training sample holds)
//! cut at each string's own box with fixed margins: titles and buttons read exactly (and the
//! unseen-word slice of them), and the character error rate over every string.

use crate::ctc;
use crate::font::{self, Face, TextStyle};
use crate::optim::{AdamWConfig, Params};
use crate::pretrain::{normal, Result, TrainError};
use crate::runloop::{
    run_loop, write_json_atomic, EpochEnd, LoopSpec, RunState as LoopState, StepLoss,
};
use crate::screens::{ScreenTruth, TextItem};
use crate::{generate, vocab, Split, SynthKind, Truth};
use afm_vision::reader::{
    batch_lines, class_of, greedy_decode, line_pixels, ReaderConfig, Region, TextReader,
};
use afm_vision::text_lines::LineFinder;
use afm_vision::weights::VisionWeights;
use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A reader run's settings (`reader.json` keeps them; a resumed run must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReaderTrainConfig {
    pub model: ReaderConfig,
    /// Lines per step.
    pub batch_size: usize,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    pub warmup_steps: usize,
    pub checkpoint_every: usize,
    pub adamw: AdamWConfig,
    /// Share of a batch's lines cut from generated screens (the rest are drawn alone).
    pub screen_share: f64,
    /// Lines taken from each generated screen.
    pub lines_per_screen: usize,
    /// Em sizes of lines drawn alone, px.
    pub synth_px: (f32, f32),
    /// Held-out screens read after every epoch.
    pub eval_screens: usize,
    pub seed: u64,
    /// Faces of the lines drawn alone; empty: the generator's three DejaVu faces
    /// ([`Face::DEJAVU`]).
    #[serde(default)]
    pub synth_faces: Vec<Face>,
    /// Start from this reader export (`reader/`: `config.json`, `model.safetensors`), whose
    /// config must be `model`, instead of fresh parameters.
    #[serde(default)]
    pub init: Option<PathBuf>,
}

impl ReaderTrainConfig {
    pub fn afm_tiny() -> Self {
        Self {
            model: ReaderConfig::default(),
            batch_size: 48,
            steps_per_epoch: 250,
            epochs: 8,
            warmup_steps: 100,
            checkpoint_every: 50,
            adamw: AdamWConfig {
                lr: 1e-3,
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            screen_share: 0.6,
            lines_per_screen: 4,
            synth_px: (8.0, 30.0),
            eval_screens: 120,
            seed: 17,
            synth_faces: Vec::new(),
            init: None,
        }
    }

    /// A few seconds' run for tests.
    pub fn test_tiny() -> Self {
        Self {
            model: ReaderConfig {
                height: 16,
                channels: vec![8, 8],
                hidden: 16,
                context_layers: 1,
                max_width: 256,
                layer_norm_eps: 1e-5,
            },
            batch_size: 4,
            steps_per_epoch: 3,
            epochs: 1,
            warmup_steps: 1,
            checkpoint_every: 2,
            eval_screens: 2,
            ..Self::afm_tiny()
        }
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch * self.epochs
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let bad = |s: String| Err(TrainError::Invalid(s));
        if self.batch_size == 0 || self.steps_per_epoch == 0 || self.epochs == 0 {
            return bad("batch_size, steps_per_epoch and epochs must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.screen_share) || self.lines_per_screen == 0 {
            return bad(format!(
                "screen_share {} must be in 0-1 and lines_per_screen at least 1",
                self.screen_share
            ));
        }
        if !(self.synth_px.0 >= 4.0
            && self.synth_px.1 >= self.synth_px.0
            && self.synth_px.1 <= 200.0)
        {
            return bad(format!(
                "synth_px {:?}: need 4 <= lo <= hi <= 200",
                self.synth_px
            ));
        }
        if !(self.adamw.lr > 0.0 && self.adamw.lr.is_finite()) {
            return bad(format!("adamw.lr {}", self.adamw.lr));
        }
        Ok(())
    }
}

/// Fresh reader parameters (`reader.*`): He-normal convolutions and projections (fan-in),
/// zero biases, unit norms.
pub fn init_params(cfg: &ReaderConfig, seed: u64) -> Result<Params> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut m = HashMap::new();
    for (name, shape) in cfg.weight_shapes() {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let std = if name.starts_with("head.") {
                0.02
            } else {
                (2.0 / fan_in as f32).sqrt()
            };
            normal(&mut rng, &shape, std)?
        };
        m.insert(format!("reader.{name}"), t);
    }
    Ok(Params::from_tensors(m)?)
}

/// The parameters a run starts from: the reader export `cfg.init` when set (its
/// `config.json` must equal `cfg.model`, its tensors every name and shape of it), else fresh
/// ([`init_params`]).
pub fn start_params(cfg: &ReaderTrainConfig) -> Result<Params> {
    let Some(dir) = &cfg.init else {
        return init_params(&cfg.model, cfg.seed);
    };
    let bad = |why: String| TrainError::Invalid(format!("reader init {}: {why}", dir.display()));
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| bad(format!("{}: {e}", cfg_path.display())))?;
    let model: ReaderConfig =
        serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", cfg_path.display())))?;
    if model != cfg.model {
        return Err(bad(format!(
            "its config {model:?} is not the run's model {:?}",
            cfg.model
        )));
    }
    let loaded = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let mut m = HashMap::new();
    for (name, shape) in cfg.model.weight_shapes() {
        let key = format!("reader.{name}");
        let t = loaded
            .get(&key)
            .ok_or_else(|| bad(format!("no tensor {key}")))?;
        if t.dims() != shape.as_slice() {
            return Err(bad(format!("{key} is {:?}, not {shape:?}", t.dims())));
        }
        m.insert(key, t.to_dtype(DType::F32)?);
    }
    if loaded.len() != m.len() {
        return Err(bad(format!(
            "{} tensors, the model has {}",
            loaded.len(),
            m.len()
        )));
    }
    Ok(Params::from_tensors(m)?)
}

/// The reader over the current parameter values (the graph reaches them in training).
pub fn reader_of(cfg: &ReaderConfig, params: &Params) -> Result<TextReader> {
    Ok(TextReader::load(
        cfg.clone(),
        &VisionWeights::with_prefix(params.tensors(), "reader."),
    )?)
}

/// Every string a screen draws, with its role name.
pub fn screen_strings(t: &ScreenTruth) -> Vec<(&'static str, &TextItem)> {
    let mut v = vec![("title", &t.title)];
    v.extend(t.menu.iter().map(|m| ("menu", m)));
    if let Some(m) = &t.message {
        v.push(("message", m));
    }
    for f in &t.fields {
        v.push(("label", &f.label));
        v.push(("field", &f.content));
    }
    v.extend(t.checkboxes.iter().map(|c| ("checkbox", &c.label)));
    if let Some(l) = &t.list {
        v.extend(l.items.iter().map(|i| ("list", i)));
    }
    v.extend(t.buttons.iter().map(|b| ("button", &b.label)));
    if let Some(s) = &t.status {
        v.push(("status", s));
    }
    v
}

/// A string's box with margins (fractions of its em size) left/right and top/bottom,
/// shifted by `(dx, dy)` px, clipped to the image.
fn margin_box(
    img: &RgbImage,
    it: &TextItem,
    lr: (f32, f32),
    tb: (f32, f32),
    d: (f32, f32),
) -> Region {
    let r = it.rect;
    let x0 = (r.x as f32 - lr.0 * it.px + d.0).max(0.0);
    let y0 = (r.y as f32 - tb.0 * it.px + d.1).max(0.0);
    let x1 = (r.right() as f32 + lr.1 * it.px + d.0).min(img.width() as f32);
    let y1 = (r.bottom() as f32 + tb.1 * it.px + d.1).min(img.height() as f32);
    Region {
        x: x0.round() as u32,
        y: y0.round() as u32,
        w: (x1 - x0).round().max(1.0) as u32,
        h: (y1 - y0).round().max(1.0) as u32,
    }
}

/// The fixed margins of the held-out reads: a quarter em left and right, 0.15 em above and
/// below.
pub fn eval_box(img: &RgbImage, it: &TextItem) -> Region {
    margin_box(img, it, (0.25, 0.25), (0.15, 0.15), (0.0, 0.0))
}

/// A training line: normalised pixels, width and label classes.
type Line = (Vec<f32>, usize, Vec<u32>);

fn labels_of(text: &str) -> Vec<u32> {
    text.chars().map(class_of).collect()
}

/// One line drawn alone (see the module docs).
fn synth_line(cfg: &ReaderTrainConfig, rng: &mut ChaCha8Rng) -> Option<Line> {
    let lum = |c: [u8; 3]| (299 * c[0] as i32 + 587 * c[1] as i32 + 114 * c[2] as i32) / 1000;
    let (bg, fg) = loop {
        let bg: [u8; 3] = [0; 3].map(|_| rng.random_range(0..=255u8));
        let fg: [u8; 3] = [0; 3].map(|_| rng.random_range(0..=255u8));
        if (lum(bg) - lum(fg)).abs() >= 80 {
            break (bg, fg);
        }
    };
    let faces: &[Face] = if cfg.synth_faces.is_empty() {
        &Face::DEJAVU
    } else {
        &cfg.synth_faces
    };
    let face = faces[rng.random_range(0..faces.len())];
    let em = rng.random_range(cfg.synth_px.0..=cfg.synth_px.1);
    let words = vocab::ui_words();
    let n = rng.random_range(1..=5);
    let text = (0..n)
        .map(|_| {
            if rng.random_bool(0.5) {
                words[rng.random_range(0..words.len())].to_string()
            } else {
                crate::glyphs::random_word(rng)
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let m = font::metrics(face, em);
    let tw = font::text_width(face, em, &text);
    let (w, h) = (
        (tw + 2.0 * em).ceil() as u32,
        (m.ascent + m.descent + em).ceil() as u32,
    );
    let mut img = RgbImage::from_pixel(w, h, image::Rgb(bg));
    let x = em;
    let baseline = (em * 0.5 + m.ascent).round();
    let rect = font::draw_text(&mut img, TextStyle::new(face, em, fg), x, baseline, &text);
    let it = TextItem {
        text: text.clone(),
        rect,
        color: fg,
        face,
        px: em,
        origin: [x, baseline],
    };
    jittered(cfg, rng, &img, &it)
}

fn jittered(
    cfg: &ReaderTrainConfig,
    rng: &mut ChaCha8Rng,
    img: &RgbImage,
    it: &TextItem,
) -> Option<Line> {
    let r = margin_box(
        img,
        it,
        (rng.random_range(0.0..0.7), rng.random_range(0.0..0.7)),
        (rng.random_range(0.0..0.35), rng.random_range(0.0..0.35)),
        (rng.random_range(-1.5..1.5), rng.random_range(-1.5..1.5)),
    );
    let (px, w) = line_pixels(img, r, cfg.model.height)?;
    if w > cfg.model.max_width {
        return None;
    }
    let labels = labels_of(&it.text);
    if labels.is_empty() || w.div_ceil(4) < ctc::min_steps(&labels) {
        return None;
    }
    Some((px, w, labels))
}

/// Batch `step` of a run: a pure function of the step index.
pub fn batch(cfg: &ReaderTrainConfig, step: usize) -> Vec<Line> {
    let n = cfg.batch_size;
    let from_screens = ((n as f64 * cfg.screen_share).round() as usize).min(n);
    let screens = from_screens.div_ceil(cfg.lines_per_screen);
    let base = step as u64 * screens as u64;
    let mut lines: Vec<Line> = (0..screens)
        .into_par_iter()
        .flat_map_iter(|s| {
            let idx = base + s as u64;
            let sample = generate(SynthKind::Screen, Split::Train, idx);
            let mut rng =
                ChaCha8Rng::seed_from_u64(cfg.seed ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut out = vec![];
            if let Truth::Screen(t) = &sample.truth {
                let items = screen_strings(t);
                for _ in 0..cfg.lines_per_screen {
                    let (_, it) = items[rng.random_range(0..items.len())];
                    if let Some(l) = jittered(cfg, &mut rng, &sample.image, it) {
                        out.push(l);
                    }
                }
            }
            out
        })
        .collect();
    lines.truncate(from_screens);
    let synth: Vec<Line> = (lines.len()..n)
        .into_par_iter()
        .map(|k| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                cfg.seed
                    ^ 0xD1B5_4A32_D192_ED03
                    ^ ((step * n + k) as u64).wrapping_mul(0xA24B_AED4_963E_E407),
            );
            loop {
                if let Some(l) = synth_line(cfg, &mut rng) {
                    return l;
                }
            }
        })
        .collect();
    lines.extend(synth);
    lines
}

/// The CTC loss of a batch (mean per line), as a tensor whose gradient with respect to the
/// logits is CTC's: `sum(G * logits) - detach(same) + nll`. The lines run in groups of
/// similar width (sorted, at most [`GROUP`] per group) so that little of a pass is padding.
pub fn ctc_loss(reader: &TextReader, lines: &[Line]) -> Result<Tensor> {
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by_key(|&i| lines[i].1);
    let mut terms = vec![];
    let mut nll = 0f32;
    let mut used = 0usize;
    for group in order.chunks(GROUP) {
        let px: Vec<(Vec<f32>, usize)> = group
            .iter()
            .map(|&i| (lines[i].0.clone(), lines[i].1))
            .collect();
        let (x, steps) = batch_lines(&px, reader.config().height)?;
        let logits = reader.forward(&x)?;
        let (b, t, c) = logits.dims3()?;
        let logp: Vec<f32> = candle_nn::ops::log_softmax(&logits.detach(), D::Minus1)?
            .flatten_all()?
            .to_vec1()?;
        let per: Vec<Option<(f32, Vec<f32>)>> = (0..b)
            .into_par_iter()
            .map(|k| {
                let tk = steps[k].min(t);
                ctc::ctc(
                    &logp[k * t * c..k * t * c + tk * c],
                    tk,
                    c,
                    &lines[group[k]].2,
                    0,
                )
            })
            .collect();
        let mut g = vec![0f32; b * t * c];
        for (k, p) in per.into_iter().enumerate() {
            if let Some((l, gr)) = p {
                if l.is_finite() {
                    nll += l;
                    used += 1;
                    g[k * t * c..k * t * c + gr.len()].copy_from_slice(&gr);
                }
            }
        }
        let g = Tensor::from_vec(g, (b, t, c), &Device::Cpu)?;
        terms.push((logits * g)?.sum_all()?);
    }
    if used == 0 {
        return Err(TrainError::Invalid(
            "no line of the batch has a CTC alignment (lines too narrow for their text)".into(),
        ));
    }
    let scale = 1.0 / used as f64;
    let mut s = terms[0].clone();
    for t in &terms[1..] {
        s = (s + t)?;
    }
    let s = s.affine(scale, 0.0)?;
    Ok((&s - s.detach())?.affine(1.0, nll as f64 * scale)?)
}

/// Lines per forward pass in training (see [`ctc_loss`]).
pub const GROUP: usize = 16;

/// Held-out reading figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadFigures {
    pub screens: usize,
    pub titles: usize,
    pub titles_exact: usize,
    pub buttons: usize,
    pub buttons_exact: usize,
    /// Titles and buttons whose text holds a held-out word, and how many were read exactly.
    pub unseen: usize,
    pub unseen_exact: usize,
    /// Every string of the screens.
    pub strings: usize,
    pub strings_exact: usize,
    /// Character error rate (edit distance / characters) over every string.
    pub cer: f64,
    /// A few (truth, read) pairs of titles and buttons.
    pub examples: Vec<(String, String)>,
}

impl ReadFigures {
    pub fn titles_buttons_exact(&self) -> f64 {
        (self.titles_exact + self.buttons_exact) as f64 / (self.titles + self.buttons).max(1) as f64
    }
}

/// Levenshtein distance over characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Counts one string's read into `f` (titles and buttons also into their slices and
/// examples) and its edit distance into `errs` / `chars`.
fn tally(
    f: &mut ReadFigures,
    role: &str,
    want: &str,
    got: String,
    errs: &mut usize,
    chars: &mut usize,
) {
    let exact = got == want;
    f.strings += 1;
    f.strings_exact += usize::from(exact);
    *errs += edit_distance(want, &got);
    *chars += want.chars().count();
    match role {
        "title" => {
            f.titles += 1;
            f.titles_exact += usize::from(exact);
        }
        "button" => {
            f.buttons += 1;
            f.buttons_exact += usize::from(exact);
        }
        _ => return,
    }
    if vocab::has_held_out_word(want) {
        f.unseen += 1;
        f.unseen_exact += usize::from(exact);
    }
    if f.examples.len() < 6 && (!exact || f.examples.len() < 2) {
        f.examples.push((want.to_string(), got));
    }
}

/// Screens `0..n` of `split`, each string scored by what `read_one` gives for it (one read
/// per string of [`screen_strings`], in its order).
type ReadOne<'a> = dyn Fn(&RgbImage, &[(&'static str, &TextItem)]) -> Result<Vec<String>> + 'a;

fn score_screens(split: Split, n: usize, read_one: &ReadOne) -> Result<ReadFigures> {
    let mut f = ReadFigures {
        screens: n,
        ..Default::default()
    };
    let (mut errs, mut chars) = (0usize, 0usize);
    let samples: Vec<_> = (0..n as u64)
        .into_par_iter()
        .map(|i| generate(SynthKind::Screen, split, i))
        .collect();
    for s in &samples {
        let Truth::Screen(t) = &s.truth else { continue };
        let items = screen_strings(t);
        let read = read_one(&s.image, &items)?;
        for ((role, it), got) in items.iter().zip(read) {
            tally(&mut f, role, &it.text, got, &mut errs, &mut chars);
        }
    }
    f.cer = errs as f64 / chars.max(1) as f64;
    Ok(f)
}

/// Reads every string of held-out screens `0..n` at its own box ([`eval_box`]).
pub fn read_held_out(reader: &TextReader, n: usize) -> Result<ReadFigures> {
    score_screens(Split::HeldOut, n, &|img, items| {
        let regions: Vec<Region> = items.iter().map(|(_, it)| eval_box(img, it)).collect();
        Ok(reader.read(img, &regions)?)
    })
}

/// The found line that stands for a string: the one whose box overlaps the string's own box
/// most, if it covers at least half of the string's width and lies mostly inside its rows.
pub fn match_found(item: &crate::Rect, found: &[Region]) -> Option<usize> {
    let (ix0, ix1) = (item.x as i64, item.right() as i64);
    let (iy0, iy1) = (item.y as i64, item.bottom() as i64);
    found
        .iter()
        .enumerate()
        .filter_map(|(k, r)| {
            let (x0, x1) = (r.x as i64, (r.x + r.w) as i64);
            let (y0, y1) = (r.y as i64, (r.y + r.h) as i64);
            let ox = (ix1.min(x1) - ix0.max(x0)).max(0);
            let oy = (iy1.min(y1) - iy0.max(y0)).max(0);
            let good =
                2 * ox >= ix1 - ix0 && 2 * oy >= y1 - y0 && 2 * (x1 - x0) <= 3 * (ix1 - ix0) + 8;
            good.then_some((k, ox * oy))
        })
        .max_by_key(|&(_, a)| a)
        .map(|(k, _)| k)
}

/// The margin the reader's input gets around a found line (tight ink box): a third of its
/// height left and right, a fifth above and below.
pub fn found_box(img: &RgbImage, r: Region) -> Region {
    afm_vision::text_lines::reading_box(r, img.width(), img.height())
}

/// Held-out screens `0..n` read end to end: lines found by [`LineFinder`], each read, and
/// each string scored by the found line matched to it ([`match_found`]; a string with none
/// counts as read wrong, all its characters as errors). `strings` counts every string;
/// `examples` holds titles and buttons.
pub fn read_found_held_out(reader: &TextReader, n: usize) -> Result<ReadFigures> {
    read_found(reader, Split::HeldOut, n)
}

/// [`read_found_held_out`] on screens `0..n` of either split (the training split is where the
/// finder is developed).
pub fn read_found(reader: &TextReader, split: Split, n: usize) -> Result<ReadFigures> {
    let finder = LineFinder::default();
    score_screens(split, n, &|img, items| {
        let found = finder.find(img);
        let boxes: Vec<Region> = found.iter().map(|r| found_box(img, *r)).collect();
        let read = reader.read(img, &boxes)?;
        Ok(items
            .iter()
            .map(|(_, it)| {
                match_found(&it.rect, &found)
                    .map(|k| read[k].clone())
                    .unwrap_or_default()
            })
            .collect())
    })
}

/// One epoch's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f32,
    /// Each string read at its own box.
    pub read: ReadFigures,
    /// End to end: lines found in the screen, then read.
    #[serde(default)]
    pub found: ReadFigures,
    pub seconds: f64,
}

pub type RunState = LoopState<ReaderTrainConfig, EpochReport>;
pub type Event = crate::runloop::Event<EpochReport>;

/// Runs (or resumes) a reader run in `dir`; writes `dir/reader/` at the end.
pub fn run(
    cfg: &ReaderTrainConfig,
    dir: &Path,
    until: Option<usize>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<RunState> {
    cfg.validate()?;
    let params = start_params(cfg)?;
    let spec = LoopSpec {
        dir,
        state_file: "reader.json",
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
            let lines = batch(cfg, step);
            let data_s = t0.elapsed().as_secs_f64();
            let reader = reader_of(&cfg.model, &params)?;
            Ok(StepLoss {
                grads: None,
                loss: ctc_loss(&reader, &lines)?,
                examples: lines.len(),
                data_s,
            })
        },
        &mut |end: EpochEnd| {
            let reader = reader_of(&cfg.model, &params)?;
            Ok(EpochReport {
                epoch: end.epoch,
                train_loss: end.train_loss,
                read: read_held_out(&reader, cfg.eval_screens)?,
                found: read_found_held_out(&reader, cfg.eval_screens)?,
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

/// Writes `dir/reader/config.json` and `dir/reader/model.safetensors` (f16).
pub fn export(cfg: &ReaderTrainConfig, params: &Params, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("reader");
    std::fs::create_dir_all(&out).map_err(crate::runloop::io(&out))?;
    write_json_atomic(&out.join("config.json"), &cfg.model)?;
    let t: HashMap<String, Tensor> = params
        .tensors()
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&t, out.join("model.safetensors"))?;
    Ok(out)
}

/// The export of a run stopped early: its last checkpoint's parameters.
pub fn export_checkpoint(cfg: &ReaderTrainConfig, dir: &Path) -> Result<(PathBuf, usize)> {
    let params = start_params(cfg)?;
    let opt =
        crate::optim::load_checkpoint(&dir.join("checkpoint.safetensors"), &params, cfg.adamw)?;
    Ok((export(cfg, &params, dir)?, opt.step as usize))
}

/// Decodes a batch of lines with the current reader (for tests and probes).
pub fn read_lines(reader: &TextReader, lines: &[Line]) -> Result<Vec<String>> {
    let px: Vec<(Vec<f32>, usize)> = lines.iter().map(|l| (l.0.clone(), l.1)).collect();
    let (x, steps) = batch_lines(&px, reader.config().height)?;
    let y = reader.forward(&x)?;
    let (b, _, _) = y.dims3()?;
    (0..b)
        .map(|i| {
            let row: Vec<f32> = y.get(i)?.flatten_all()?.to_vec1()?;
            Ok(greedy_decode(&row, steps[i]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_seeded_and_labelled() {
        let cfg = ReaderTrainConfig::test_tiny();
        let a = batch(&cfg, 3);
        let b = batch(&cfg, 3);
        assert_eq!(a.len(), cfg.batch_size);
        assert_eq!(a, b);
        assert_ne!(batch(&cfg, 4), a);
        for (px, w, labels) in &a {
            assert_eq!(px.len(), cfg.model.height * w);
            assert!(!labels.is_empty());
            assert!(w.div_ceil(4) >= ctc::min_steps(labels));
        }
    }

    #[test]
    fn a_run_starts_from_a_reader_export_or_refuses_it() {
        let dir = std::env::temp_dir().join(format!("afm-reader-init-{}", std::process::id()));
        let cfg = ReaderTrainConfig::test_tiny();
        let fresh = init_params(&cfg.model, 5).unwrap();
        let out = export(&cfg, &fresh, &dir).unwrap();
        let from = ReaderTrainConfig {
            init: Some(out.clone()),
            ..cfg.clone()
        };
        let p = start_params(&from).unwrap();
        for (k, v) in fresh.tensors() {
            let got = p.get(&k).unwrap();
            let d = (got - &v).unwrap().abs().unwrap().max_all().unwrap();
            // stored in f16
            assert!(d.to_scalar::<f32>().unwrap() < 1e-2, "{k}");
        }
        // another model's export is refused, naming the directory
        let other = ReaderTrainConfig {
            model: ReaderConfig {
                hidden: 24,
                ..cfg.model.clone()
            },
            init: Some(out.clone()),
            ..cfg.clone()
        };
        let e = start_params(&other).err().unwrap().to_string();
        assert!(
            e.contains("reader init") && e.contains("not the run's model"),
            "{e}"
        );
        // lines drawn alone in other faces: the batch changes, the default one does not
        let faces = ReaderTrainConfig {
            synth_faces: vec![Face::LiberationSerif, Face::NotoSans],
            screen_share: 0.0,
            ..cfg.clone()
        };
        let plain = ReaderTrainConfig {
            screen_share: 0.0,
            ..cfg.clone()
        };
        let dejavu = ReaderTrainConfig {
            synth_faces: Face::DEJAVU.to_vec(),
            ..plain.clone()
        };
        assert_eq!(batch(&plain, 3), batch(&dejavu, 3));
        assert_ne!(batch(&plain, 3), batch(&faces, 3));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("Set Up", "Set Up"), 0);
    }

    /// Gradient steps on a fixed batch of four lines make the reader spell them: the CTC
    /// loss reaches the parameters through the convolutions and the context layers.
    #[test]
    fn a_fixed_batch_is_learned() {
        let mut cfg = ReaderTrainConfig::test_tiny();
        cfg.model.channels = vec![16, 24];
        cfg.model.hidden = 48;
        let lines = batch(&cfg, 0);
        let params = init_params(&cfg.model, 1).unwrap();
        let mut opt = crate::optim::AdamW::new(
            &params,
            AdamWConfig {
                lr: 3e-3,
                ..Default::default()
            },
        )
        .unwrap();
        let first = {
            let r = reader_of(&cfg.model, &params).unwrap();
            ctc_loss(&r, &lines).unwrap().to_scalar::<f32>().unwrap()
        };
        let mut last = first;
        for _ in 0..250 {
            let r = reader_of(&cfg.model, &params).unwrap();
            let loss = ctc_loss(&r, &lines).unwrap();
            last = loss.to_scalar::<f32>().unwrap();
            let g = loss.backward().unwrap();
            opt.step(&params, &g, 3e-3).unwrap();
        }
        assert!(last < first * 0.2, "loss {first} -> {last}");
        let r = reader_of(&cfg.model, &params).unwrap();
        let got = read_lines(&r, &lines).unwrap();
        let want: Vec<String> = lines
            .iter()
            .map(|l| {
                l.2.iter()
                    .filter_map(|&c| afm_vision::reader::char_of(c))
                    .collect::<String>()
                    .trim()
                    .to_string()
            })
            .collect();
        let right = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        assert!(right >= 3, "{got:?} vs {want:?}");
    }
}
