//! A text-line reader: a small convolutional recogniser that turns one line of text into
//! characters (afm's own component, not the paper's).
//!
//! Sixteen sessions of training the ViT to read screens from 16-px patches failed
//! (docs/afm-tiny-v2.md): the encoder memorises a fixed batch but learns characters from
//! streamed 224-px views at about one point per 3,600 views. A line recogniser sees only the
//! text, at a fixed glyph height, with weights shared along the line: the design of CRNN
//! (Shi et al., 2015) without the recurrent layer. Characters are classes (printable ASCII),
//! so words never seen in training are read with the same classes; the output is aligned to
//! the text by CTC (Graves et al., 2006), with no per-character position labels.
//!
//! The network, for a line normalised to `height` px (dark text on a light ground, see
//! [`line_pixels`]):
//! 1. space to depth: each 2x2 block of pixels becomes 4 channels (`dy * 2 + dx`);
//! 2. `n` 3x3 convolutions (padding 1, bias, ReLU), each followed by max pooling: 2x2 after
//!    the first, 2x1 (height only) after the others, until the height is 2;
//! 3. the columns flattened (`2 * c_last` features per step of 4 input px, ordered row then
//!    channel) and projected to
//!    `hidden` (`proj`), then a LayerNorm and GELU;
//! 4. `context_layers` residual blocks `x + W [ln(x)_{t-1}, ln(x)_t, ln(x)_{t+1}] + b` with
//!    GELU (a 3-wide 1-D convolution over the steps);
//! 5. a LayerNorm and a linear map to the classes (`head`): 0 is CTC's blank, `1 + (c - 32)`
//!    the printable ASCII character `c`, the last class any other character.
//!
//! Weights (`reader.` prefix): `conv.{i}.weight (c_i, c_{i-1}, 3, 3)` (`c_{-1}` = 4), `conv.{i}.bias (c_i)`,
//! `proj.weight (hidden, 2 * c_last)`, `proj.bias`, `proj_norm.{weight,bias}`,
//! `context.{i}.norm.{weight,bias} (hidden)`, `context.{i}.weight (hidden, 3 * hidden)`,
//! `context.{i}.bias`, `head_norm.{weight,bias}`, `head.weight (classes, hidden)`,
//! `head.bias`.

use crate::error::{Result, VisionError};
use crate::weights::VisionWeights;
use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Number of classes: blank, the 95 printable ASCII characters, "other".
pub const CLASSES: usize = 97;
/// Class of CTC's blank.
pub const BLANK: u32 = 0;
/// Class of every character outside printable ASCII.
pub const OTHER: u32 = 96;
/// Input pixels per output step.
pub const STEP_PX: usize = 4;

/// `reader/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReaderConfig {
    /// Line height the network reads, px: `2^(convs + 2)`, so that the pooling ends at 2 rows.
    pub height: usize,
    /// Output channels of each convolution.
    pub channels: Vec<usize>,
    pub hidden: usize,
    pub context_layers: usize,
    /// Widest input, px; wider lines are read in pieces ([`TextReader::read`]).
    pub max_width: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-5
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            height: 32,
            channels: vec![32, 64, 128],
            hidden: 192,
            context_layers: 2,
            max_width: 640,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ReaderConfig {
    /// Checks the fields against each other; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| {
            Err(VisionError::Config {
                field: field.into(),
                reason,
            })
        };
        let n = self.channels.len();
        if n < 2 || self.channels.contains(&0) {
            return bad(
                "channels",
                format!("{:?}: at least two non-zero", self.channels),
            );
        }
        if self.height != 4 << n {
            return bad(
                "height",
                format!(
                    "{} with {n} convolutions: must be 2^{} = {} (space to depth halves it, each convolution's pooling again, down to 2)",
                    self.height,
                    n + 2,
                    4usize << n
                ),
            );
        }
        if self.hidden == 0 || self.hidden > 4096 {
            return bad("hidden", format!("{}: must be 1-4096", self.hidden));
        }
        if self.max_width < 4 * self.height || !self.max_width.is_multiple_of(STEP_PX) {
            return bad(
                "max_width",
                format!(
                    "{}: a multiple of {STEP_PX}, at least 4 x height",
                    self.max_width
                ),
            );
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return bad("layer_norm_eps", format!("{}", self.layer_norm_eps));
        }
        Ok(())
    }

    /// Reads and validates `path` (a `config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let c: Self = crate::error::read_json(path, "reader config.json")?;
        c.validate()?;
        Ok(c)
    }

    /// Every weight name (without the `reader.` prefix) with its shape.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![];
        let mut c_in = 4;
        for (i, &c) in self.channels.iter().enumerate() {
            v.push((format!("conv.{i}.weight"), vec![c, c_in, 3, 3]));
            v.push((format!("conv.{i}.bias"), vec![c]));
            c_in = c;
        }
        let h = self.hidden;
        v.push(("proj.weight".into(), vec![h, 2 * c_in]));
        v.push(("proj.bias".into(), vec![h]));
        v.push(("proj_norm.weight".into(), vec![h]));
        v.push(("proj_norm.bias".into(), vec![h]));
        for i in 0..self.context_layers {
            v.push((format!("context.{i}.norm.weight"), vec![h]));
            v.push((format!("context.{i}.norm.bias"), vec![h]));
            v.push((format!("context.{i}.weight"), vec![h, 3 * h]));
            v.push((format!("context.{i}.bias"), vec![h]));
        }
        v.push(("head_norm.weight".into(), vec![h]));
        v.push(("head_norm.bias".into(), vec![h]));
        v.push(("head.weight".into(), vec![CLASSES, h]));
        v.push(("head.bias".into(), vec![CLASSES]));
        v
    }
}

/// The class of a character (see the module docs).
pub fn class_of(c: char) -> u32 {
    if (' '..='~').contains(&c) {
        1 + (c as u32 - 32)
    } else {
        OTHER
    }
}

/// The character of a class; `None` for the blank. "Other" reads as U+FFFD.
pub fn char_of(class: u32) -> Option<char> {
    match class {
        BLANK => None,
        c if c < OTHER => char::from_u32(c - 1 + 32),
        _ => Some('\u{FFFD}'),
    }
}

/// Greedy CTC decoding of one line: the best class per step, repeats merged, blanks
/// dropped, surrounding spaces trimmed.
///
/// # Shapes
/// `logits: (t, CLASSES)` row-major.
pub fn greedy_decode(logits: &[f32], t: usize) -> String {
    let mut out = String::new();
    let mut prev = BLANK;
    for row in logits.chunks(CLASSES).take(t) {
        let best = row
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |a, (i, &v)| {
                if v > a.1 {
                    (i, v)
                } else {
                    a
                }
            })
            .0 as u32;
        if best != prev {
            if let Some(ch) = char_of(best) {
                out.push(ch);
            }
        }
        prev = best;
    }
    out.trim().to_string()
}

/// A rectangle of an image, px.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// One line cut out of an image and normalised for the reader: luminance, inverted when the
/// text is lighter than the ground (the ground is the median of the crop's border; the text
/// is lighter when the lightest 2% of pixels lie farther above the ground than the darkest 2%
/// below it: white on an orange button as well as on a dark window), stretched so that the
/// ground is 1 and the darkest 2% of pixels 0, and resized (bilinear) to `height` rows
/// keeping the aspect ratio. Returns the pixels (row-major) and the width.
/// `None` when the region is empty or holds no contrast (a flat crop has nothing to read).
///
/// # Shapes
/// -> `(height * width,)`, `width >= 1`.
pub fn line_pixels(img: &RgbImage, r: Region, height: usize) -> Option<(Vec<f32>, usize)> {
    let (iw, ih) = img.dimensions();
    let x1 = (r.x.saturating_add(r.w)).min(iw);
    let y1 = (r.y.saturating_add(r.h)).min(ih);
    if r.x >= x1 || r.y >= y1 {
        return None;
    }
    let (w, h) = ((x1 - r.x) as usize, (y1 - r.y) as usize);
    let mut lum = Vec::with_capacity(w * h);
    for y in r.y..y1 {
        for x in r.x..x1 {
            let p = img.get_pixel(x, y).0;
            lum.push((0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) / 255.0);
        }
    }
    let mut border: Vec<f32> = (0..w)
        .flat_map(|x| [lum[x], lum[(h - 1) * w + x]])
        .chain((0..h).flat_map(|y| [lum[y * w], lum[y * w + w - 1]]))
        .collect();
    border.sort_by(f32::total_cmp);
    let bg = border[border.len() / 2];
    let mut sorted = lum.clone();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    let (dark, light) = (sorted[(n * 2 / 100).min(n - 1)], sorted[n * 98 / 100]);
    let invert = light - bg > bg - dark;
    if invert {
        for v in &mut lum {
            *v = 1.0 - *v;
        }
    }
    let (ground, ink) = if invert {
        (1.0 - bg, 1.0 - light)
    } else {
        (bg, dark)
    };
    if ground - ink < 0.04 {
        return None;
    }
    for v in &mut lum {
        *v = ((*v - ink) / (ground - ink)).clamp(0.0, 1.0);
    }
    let out_w = ((w as f32 * height as f32 / h as f32).round() as usize).max(1);
    Some((resize_bilinear(&lum, w, h, out_w, height), out_w))
}

/// Bilinear resampling with pixel centres aligned (half-pixel convention), averaging
/// `ceil(scale)` source samples per axis when shrinking so that thin strokes survive.
fn resize_bilinear(src: &[f32], w: usize, h: usize, ow: usize, oh: usize) -> Vec<f32> {
    let sx = w as f32 / ow as f32;
    let sy = h as f32 / oh as f32;
    let taps = |s: f32| (s.ceil() as usize).max(1);
    let (tx, ty) = (taps(sx), taps(sy));
    let sample = |x: f32, y: f32| {
        let x = x.clamp(0.0, (w - 1) as f32);
        let y = y.clamp(0.0, (h - 1) as f32);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let a = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
        let b = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
        a * (1.0 - fy) + b * fy
    };
    let mut out = Vec::with_capacity(ow * oh);
    for oy in 0..oh {
        for ox in 0..ow {
            let (cx, cy) = ((ox as f32 + 0.5) * sx, (oy as f32 + 0.5) * sy);
            let mut acc = 0.0;
            for j in 0..ty {
                for i in 0..tx {
                    let x = cx - sx / 2.0 + (i as f32 + 0.5) * sx / tx as f32 - 0.5;
                    let y = cy - sy / 2.0 + (j as f32 + 0.5) * sy / ty as f32 - 0.5;
                    acc += sample(x, y);
                }
            }
            out.push(acc / (tx * ty) as f32);
        }
    }
    out
}

/// Lines of equal height padded with ground (1.0) to one width, a multiple of [`STEP_PX`].
/// Returns the batch and each line's valid output steps.
///
/// # Shapes
/// `lines[i]: (height * w_i,)` -> `(b, 1, height, w_max)`, steps `(b,)`.
pub fn batch_lines(lines: &[(Vec<f32>, usize)], height: usize) -> Result<(Tensor, Vec<usize>)> {
    let wmax = lines.iter().map(|l| l.1).max().unwrap_or(STEP_PX);
    let wmax = wmax.div_ceil(STEP_PX) * STEP_PX;
    let mut data = vec![1.0f32; lines.len() * height * wmax];
    for (b, (px, w)) in lines.iter().enumerate() {
        if px.len() != height * w {
            return Err(VisionError::Invalid(format!(
                "line {b}: {} pixels for {height} x {w}",
                px.len()
            )));
        }
        for y in 0..height {
            let dst = (b * height + y) * wmax;
            data[dst..dst + w].copy_from_slice(&px[y * w..(y + 1) * w]);
        }
    }
    let steps = lines.iter().map(|l| l.1.div_ceil(STEP_PX)).collect();
    let t = Tensor::from_vec(data, (lines.len(), 1, height, wmax), &Device::Cpu)?;
    Ok((t, steps))
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn load(w: &VisionWeights, name: &str, d: usize) -> Result<Self> {
        Ok(Self {
            w: w.get(&format!("{name}.weight"), &[d])?,
            b: w.get(&format!("{name}.bias"), &[d])?,
        })
    }

    /// LayerNorm over the last dimension from plain tensor operations (so that it has a
    /// gradient in training).
    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(xc
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)?)
    }
}

struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn load(w: &VisionWeights, name: &str, out: usize, inp: usize) -> Result<Self> {
        Ok(Self {
            w: w.get(&format!("{name}.weight"), &[out, inp])?,
            b: w.get(&format!("{name}.bias"), &[out])?,
        })
    }

    /// # Shapes
    /// `x: (b, t, in)` -> `(b, t, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.w.t()?)?.broadcast_add(&self.b)?)
    }
}

/// A 3x3 convolution with padding 1 and bias, channels last, as one matrix product over the
/// image's 3x3 neighbourhoods (ordered row, column, channel).
///
/// # Shapes
/// `x: (b, h, w, c_in)`, `wt: (c_out, c_in, 3, 3)`, `bias: (c_out)` -> `(b, h, w, c_out)`.
fn conv3x3(x: &Tensor, wt: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, w, ci) = x.dims4()?;
    let co = wt.dim(0)?;
    let p = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            taps.push(p.narrow(1, dy, h)?.narrow(2, dx, w)?);
        }
    }
    let cols = Tensor::cat(&taps, 3)?.reshape((b * h * w, 9 * ci))?;
    let wm = wt.permute((0, 2, 3, 1))?.reshape((co, 9 * ci))?;
    Ok(cols
        .matmul(&wm.t()?)?
        .broadcast_add(bias)?
        .reshape((b, h, w, co))?)
}

/// The reader (see the module docs).
pub struct TextReader {
    cfg: ReaderConfig,
    convs: Vec<(Tensor, Tensor)>,
    proj: Linear,
    proj_norm: Norm,
    context: Vec<(Norm, Linear)>,
    head_norm: Norm,
    head: Linear,
}

impl TextReader {
    /// Builds the reader from `reader.*` tensors (f32 or f16/bf16, converted to f32;
    /// shapes and finiteness checked).
    pub fn load(cfg: ReaderConfig, w: &VisionWeights) -> Result<Self> {
        cfg.validate()?;
        let mut convs = vec![];
        let mut c_in = 4;
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push((
                w.get(&format!("conv.{i}.weight"), &[c, c_in, 3, 3])?,
                w.get(&format!("conv.{i}.bias"), &[c])?,
            ));
            c_in = c;
        }
        let h = cfg.hidden;
        let proj = Linear::load(w, "proj", h, 2 * c_in)?;
        let proj_norm = Norm::load(w, "proj_norm", h)?;
        let context = (0..cfg.context_layers)
            .map(|i| {
                Ok((
                    Norm::load(w, &format!("context.{i}.norm"), h)?,
                    Linear::load(w, &format!("context.{i}"), h, 3 * h)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            proj,
            proj_norm,
            context,
            head_norm: Norm::load(w, "head_norm", h)?,
            head: Linear::load(w, "head", CLASSES, h)?,
            convs,
            cfg,
        })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg = ReaderConfig::load(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| VisionError::Io {
            path: path.clone(),
            source,
        })?;
        let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            VisionError::BadFile {
                path: path.clone(),
                format: "safetensors",
                reason: e.to_string(),
            }
        })?;
        Self::load(cfg, &VisionWeights::with_prefix(t, "reader."))
    }

    pub fn config(&self) -> &ReaderConfig {
        &self.cfg
    }

    /// Class scores per output step.
    ///
    /// # Shapes
    /// `x: (b, 1, height, w)` with `w` a multiple of [`STEP_PX`] -> `(b, w / 4, CLASSES)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 1 || h != self.cfg.height || w % STEP_PX != 0 || w == 0 {
            // (the space-to-depth step needs even sizes; STEP_PX = 4 and the height 2^k give them)
            return Err(VisionError::Invalid(format!(
                "reader input (_, {c}, {h}, {w}): expected (_, 1, {}, a multiple of {STEP_PX})",
                self.cfg.height
            )));
        }
        // channels last: (b, h, w, c), so that each convolution is one matrix product over
        // its 3x3 neighbourhoods and the pooling a reshape; 2x2 pixel blocks become 4 channels
        // (space to depth), so no convolution runs at the full resolution
        let b = x.dim(0)?;
        let mut x = x
            .reshape((b, h / 2, 2, w / 2, 2))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((b, h / 2, w / 2, 4))?;
        for (i, (wt, bias)) in self.convs.iter().enumerate() {
            x = conv3x3(&x, wt, bias)?.relu()?;
            let (bb, h, w, c) = x.dims4()?;
            x = if i == 0 {
                x.reshape((bb, h / 2, 2, w / 2, 2, c))?.max(4)?.max(2)?
            } else {
                x.reshape((bb, h / 2, 2, w, c))?.max(2)?
            };
        }
        // (b, 2, t, c) -> (b, t, 2c): each step's features ordered (row, channel)
        let (b, hh, t, c) = x.dims4()?;
        let x = x.permute((0, 2, 1, 3))?.reshape((b, t, hh * c))?;
        let eps = self.cfg.layer_norm_eps;
        let mut x = self
            .proj_norm
            .forward(&self.proj.forward(&x)?, eps)?
            .gelu()?;
        for (norm, lin) in &self.context {
            let n = norm.forward(&x, eps)?;
            let p = n.pad_with_zeros(1, 1, 1)?;
            let cat = Tensor::cat(
                &[p.narrow(1, 0, t)?, p.narrow(1, 1, t)?, p.narrow(1, 2, t)?],
                2,
            )?;
            x = (x + lin.forward(&cat)?.gelu()?)?;
        }
        self.head.forward(&self.head_norm.forward(&x, eps)?)
    }

    /// Reads lines already normalised by [`line_pixels`]. Lines wider than `max_width`
    /// are read in pieces of `max_width` px that overlap by a quarter of it, joined at the
    /// middle of each overlap.
    pub fn read_pixels(&self, lines: &[(Vec<f32>, usize)]) -> Result<Vec<String>> {
        let height = self.cfg.height;
        let maxw = self.cfg.max_width;
        // shortest first so that a batch pads little
        let mut order: Vec<usize> = (0..lines.len()).collect();
        order.sort_by_key(|&i| lines[i].1);
        let mut texts = vec![String::new(); lines.len()];
        let mut pieces: Vec<(usize, Vec<f32>, usize)> = vec![];
        for &i in &order {
            let (px, w) = &lines[i];
            if *w <= maxw {
                pieces.push((i, px.clone(), *w));
            } else {
                for (x0, pw) in piece_starts(*w, maxw) {
                    let mut p = Vec::with_capacity(height * pw);
                    for y in 0..height {
                        p.extend_from_slice(&px[y * w + x0..y * w + x0 + pw]);
                    }
                    pieces.push((i, p, pw));
                }
            }
        }
        let mut logits_of: Vec<Vec<(Vec<f32>, usize)>> = vec![vec![]; lines.len()];
        for chunk in pieces.chunks(16) {
            let batch: Vec<(Vec<f32>, usize)> =
                chunk.iter().map(|(_, p, w)| (p.clone(), *w)).collect();
            let (x, steps) = batch_lines(&batch, height)?;
            let y = self.forward(&x)?.to_dtype(DType::F32)?;
            for (k, (i, _, _)) in chunk.iter().enumerate() {
                let row: Vec<f32> = y.get(k)?.flatten_all()?.to_vec1()?;
                logits_of[*i].push((row, steps[k]));
            }
        }
        for (i, parts) in logits_of.into_iter().enumerate() {
            texts[i] = if parts.len() == 1 {
                greedy_decode(&parts[0].0, parts[0].1)
            } else {
                join_pieces(&parts, lines[i].1, maxw)
            };
        }
        Ok(texts)
    }

    /// Reads each region of `img` (see [`line_pixels`]); a region with nothing to read gives
    /// an empty string.
    pub fn read(&self, img: &RgbImage, regions: &[Region]) -> Result<Vec<String>> {
        let h = self.cfg.height;
        let mut lines = vec![];
        let mut idx = vec![];
        for (i, r) in regions.iter().enumerate() {
            if let Some(l) = line_pixels(img, *r, h) {
                lines.push(l);
                idx.push(i);
            }
        }
        let read = self.read_pixels(&lines)?;
        let mut out = vec![String::new(); regions.len()];
        for (k, i) in idx.into_iter().enumerate() {
            out[i] = read[k].clone();
        }
        Ok(out)
    }
}

/// Start and width of each piece of a line `w` px wide read `maxw` px at a time.
fn piece_starts(w: usize, maxw: usize) -> Vec<(usize, usize)> {
    let stride = maxw * 3 / 4 / STEP_PX * STEP_PX;
    let mut v = vec![];
    let mut x0 = 0;
    loop {
        let pw = (w - x0).min(maxw);
        v.push((x0, pw));
        if x0 + pw >= w {
            return v;
        }
        x0 += stride;
    }
}

/// Joins the step scores of a line's pieces: each step is taken from the piece whose own
/// centre is nearest, then decoded once.
fn join_pieces(parts: &[(Vec<f32>, usize)], w: usize, maxw: usize) -> String {
    let starts = piece_starts(w, maxw);
    let total = w.div_ceil(STEP_PX);
    let mut rows = Vec::with_capacity(total * CLASSES);
    for s in 0..total {
        let px = s * STEP_PX;
        let (k, _) = starts
            .iter()
            .enumerate()
            .filter(|(_, (x0, pw))| px >= *x0 && px < x0 + pw)
            .min_by_key(|(_, (x0, pw))| (2 * px + STEP_PX).abs_diff(2 * x0 + pw))
            .unwrap_or((0, &(0, 0)));
        let local = (px - starts[k].0) / STEP_PX;
        let (logits, steps) = &parts[k];
        let local = local.min(steps.saturating_sub(1));
        rows.extend_from_slice(&logits[local * CLASSES..(local + 1) * CLASSES]);
    }
    greedy_decode(&rows, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_trip() {
        for c in ' '..='~' {
            assert_eq!(char_of(class_of(c)), Some(c));
        }
        assert_eq!(class_of('é'), OTHER);
        assert_eq!(char_of(BLANK), None);
    }

    #[test]
    fn greedy_merges_repeats_and_drops_blanks() {
        // steps: a a blank a b b -> "aab"
        let seq = [
            class_of('a'),
            class_of('a'),
            BLANK,
            class_of('a'),
            class_of('b'),
            class_of('b'),
        ];
        let mut logits = vec![0f32; seq.len() * CLASSES];
        for (t, &c) in seq.iter().enumerate() {
            logits[t * CLASSES + c as usize] = 5.0;
        }
        assert_eq!(greedy_decode(&logits, seq.len()), "aab");
        assert_eq!(greedy_decode(&logits, 2), "a");
    }

    #[test]
    fn line_pixels_normalise_polarity_and_height() {
        // light text (200) on a dark ground (20), one bar of "ink"
        let mut img = RgbImage::from_pixel(40, 10, image::Rgb([20, 20, 20]));
        for y in 3..7 {
            for x in 10..30 {
                img.put_pixel(x, y, image::Rgb([200, 200, 200]));
            }
        }
        let (px, w) = line_pixels(
            &img,
            Region {
                x: 0,
                y: 0,
                w: 40,
                h: 10,
            },
            32,
        )
        .unwrap();
        assert_eq!(w, 128);
        assert_eq!(px.len(), 32 * 128);
        // the ground reads 1 (light), the bar's middle 0 (dark)
        assert!((px[0] - 1.0).abs() < 1e-5);
        assert!(px[16 * 128 + 64] < 0.05, "{}", px[16 * 128 + 64]);
        // the text's side of the ground decides, not the ground's lightness: white on an
        // orange button (ground luminance 0.58) and black on a dark gray (0.24) both come out
        // as dark text on a light ground
        for (ground, ink) in [([224, 128, 58], [255, 255, 255]), ([60, 60, 60], [0, 0, 0])] {
            let mut img = RgbImage::from_pixel(40, 10, image::Rgb(ground));
            for y in 3..7 {
                for x in 10..30 {
                    img.put_pixel(x, y, image::Rgb(ink));
                }
            }
            let r = Region {
                x: 0,
                y: 0,
                w: 40,
                h: 10,
            };
            let (px, _) = line_pixels(&img, r, 32).unwrap();
            assert!((px[0] - 1.0).abs() < 1e-5, "{ground:?}: {}", px[0]);
            assert!(
                px[16 * 128 + 64] < 0.05,
                "{ground:?}: {}",
                px[16 * 128 + 64]
            );
        }
        // a flat region has nothing to read
        let flat = RgbImage::from_pixel(20, 10, image::Rgb([90, 90, 90]));
        assert!(line_pixels(
            &flat,
            Region {
                x: 0,
                y: 0,
                w: 20,
                h: 10
            },
            32
        )
        .is_none());
        // an empty or outside region neither
        assert!(line_pixels(
            &img,
            Region {
                x: 50,
                y: 0,
                w: 5,
                h: 5
            },
            32
        )
        .is_none());
    }

    #[test]
    fn config_is_checked() {
        let c = ReaderConfig::default();
        c.validate().unwrap();
        let bad = ReaderConfig {
            height: 48,
            ..c.clone()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("height"), "{e}");
    }

    #[test]
    fn long_lines_are_read_in_overlapping_pieces() {
        let p = piece_starts(1500, 640);
        assert_eq!(p[0], (0, 640));
        assert_eq!(p.last().map(|(x, w)| x + w), Some(1500));
        for w in p.windows(2) {
            assert!(w[1].0 < w[0].0 + w[0].1, "pieces overlap: {p:?}");
        }
    }
}
