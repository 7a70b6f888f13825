//! The Idefics3 / SmolVLM image processor and prompt expansion, rule for rule as
//! transformers' `Idefics3ImageProcessorPil` and `Idefics3Processor` (transformers 5.24):
//!
//! 1. resize so the longest edge is `size.longest_edge` (up or down; the other side keeps the
//!    aspect ratio, truncated, then rounded up to even), capped at 4096;
//! 2. with image splitting: resize again so both sides are multiples of the tile
//!    (`max_image_size.longest_edge`: longer side rounded up, the other from the aspect ratio,
//!    rounded up), cut row-major into tiles, and add a global image: the step-2 image resized
//!    to one tile (squashed, not padded). A step-2 image of exactly one tile is not split;
//!    without splitting the step-1 image is resized to one tile;
//! 3. each resize is a separable PIL filter (LANCZOS in SmolVLM) on 8-bit RGB, width first;
//!    then rescale and normalise.
//!
//! The prompt gets, per image, `<fake_token_around_image><row_r_col_c>` + `<image>` x
//! `image_seq_len` for every tile, `\n` after every row of tiles, then
//! `\n<fake_token_around_image><global-img>` + `<image>` x n + `<fake_token_around_image>`
//! (unsplit: only the global part, without the leading newline).
//!
//! A caller's token budget (`max_tokens`) lowers the longest edge in steps of one tile until
//! the image fits; the plan says so (`downscale`), and nothing is downscaled silently.

use crate::error::{FusionError, Result};
use afm_vision::preprocess::resize;
use afm_vision::{Filter, Preprocess};
use candle_core::Tensor;
use image::{imageops, RgbImage};

pub use afm_vision::ImagePlan;
use serde_json::Value;
use std::path::Path;

/// transformers' absolute cap on a resized side.
const MAX_IMAGE_SIZE: u32 = 4096;

/// Settings from `preprocessor_config.json` and `processor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Idefics3Processor {
    pub do_resize: bool,
    /// `size.longest_edge` (2048 in SmolVLM-256M/500M).
    pub longest_edge: u32,
    /// `max_image_size.longest_edge`: the encoder's tile side (512).
    pub tile: u32,
    pub do_image_splitting: bool,
    /// `<image>` tokens per tile (64 in SmolVLM).
    pub image_seq_len: usize,
    pub pre: Preprocess,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| FusionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| FusionError::BadFile {
            path: path.to_path_buf(),
            format: "JSON",
            reason: e.to_string(),
        })
}

/// `{"longest_edge": n}` -> n.
fn edge(v: &Value, key: &str) -> Result<Option<u32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .get("longest_edge")
            .and_then(|e| e.as_u64())
            .filter(|&e| e > 0 && e <= MAX_IMAGE_SIZE as u64)
            .map(|e| Some(e as u32))
            .ok_or_else(|| {
                FusionError::config(key, "must be {\"longest_edge\": n} with 0 < n <= 4096")
            }),
    }
}

impl Idefics3Processor {
    /// Reads the image-processor settings of a checkpoint directory: transformers 4 writes
    /// them to `preprocessor_config.json` (with `image_seq_len` in `processor_config.json`),
    /// transformers 5 nests them under `image_processor` in `processor_config.json`. Missing
    /// keys take `Idefics3ImageProcessor`'s defaults (LANCZOS, 4 * 364, 364, mean/std 0.5).
    pub fn from_dir(dir: &Path, default_seq_len: usize) -> Result<Self> {
        let pp = dir.join("preprocessor_config.json");
        let pc = dir.join("processor_config.json");
        let proc_cfg = read_json(&pc)?;
        let (path, v) = match read_json(&pp)? {
            Some(v) => (pp, v),
            None => match proc_cfg.as_ref().and_then(|p| p.get("image_processor")) {
                Some(v) => (pc.clone(), v.clone()),
                None => {
                    return Err(FusionError::BadFile {
                        path: dir.to_path_buf(),
                        format: "checkpoint directory",
                        reason: "no image-processor settings (preprocessor_config.json, or \
                                 `image_processor` in processor_config.json)"
                            .into(),
                    })
                }
            },
        };
        let seq = proc_cfg
            .as_ref()
            .and_then(|p| p.get("image_seq_len"))
            .or_else(|| v.get("image_seq_len"))
            .map(|x| {
                x.as_u64()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| FusionError::config("image_seq_len", "must be > 0"))
            })
            .transpose()?
            .map(|n| n as usize)
            .unwrap_or(default_seq_len);
        Self::from_json(&v, seq).map_err(|e| match e {
            FusionError::Config { field, reason } => FusionError::BadFile {
                path,
                format: "image processor config",
                reason: format!("field `{field}`: {reason}"),
            },
            e => e,
        })
    }

    /// The processor of an Idefics3 / SmolVLM checkpoint directory, checked against its
    /// `config.json` (tokens per tile and tile size must match the connector and the
    /// encoder), without reading any weights.
    pub fn for_checkpoint(dir: &Path) -> Result<(crate::config::Idefics3Config, Self)> {
        let cfg = crate::config::Idefics3Config::from_file(&dir.join("config.json"))?;
        let p = Self::from_dir(dir, cfg.tokens_per_tile())?;
        if p.image_seq_len != cfg.tokens_per_tile() {
            return Err(FusionError::config(
                "image_seq_len",
                format!(
                    "the processor puts {} <image> tokens per tile but the connector makes {}",
                    p.image_seq_len,
                    cfg.tokens_per_tile()
                ),
            ));
        }
        if p.tile as usize != cfg.vision.image_size {
            return Err(FusionError::config(
                "max_image_size",
                format!(
                    "tiles of {} px do not match the encoder's {} px",
                    p.tile, cfg.vision.image_size
                ),
            ));
        }
        Ok((cfg, p))
    }

    /// The fewest image tokens any image costs (one tile).
    pub fn min_image_tokens(&self) -> usize {
        self.image_seq_len
    }

    pub fn from_json(v: &Value, image_seq_len: usize) -> Result<Self> {
        let mut pre = Preprocess::from_json(v)?;
        if v.get("resample").is_none() {
            pre.filter = Filter::Lanczos;
        }
        let flag = |k: &str, d: bool| v.get(k).and_then(|b| b.as_bool()).unwrap_or(d);
        let tile = edge(v, "max_image_size")?.unwrap_or(364);
        let longest_edge = edge(v, "size")?.unwrap_or(4 * 364);
        Ok(Self {
            do_resize: flag("do_resize", true),
            longest_edge,
            tile,
            do_image_splitting: flag("do_image_splitting", true),
            image_seq_len,
            pre,
        })
    }

    /// Plans an image of `w x h` under an optional budget of `<image>` tokens, splitting as
    /// `do_image_splitting` says.
    pub fn plan(&self, w: u32, h: u32, max_tokens: Option<usize>) -> Result<ImagePlan> {
        self.plan_with(w, h, max_tokens, self.do_image_splitting)
    }

    /// [`Self::plan`] with image splitting on or off whatever `do_image_splitting` says.
    pub fn plan_with(
        &self,
        w: u32,
        h: u32,
        max_tokens: Option<usize>,
        split: bool,
    ) -> Result<ImagePlan> {
        if w == 0 || h == 0 {
            return Err(FusionError::Invalid(format!(
                "cannot process a {w}x{h} image"
            )));
        }
        let mut edge = self.longest_edge;
        loop {
            let p = self.plan_at(w, h, edge, split);
            match max_tokens {
                Some(b) if p.image_tokens > b => {
                    if edge <= self.tile || !self.do_resize {
                        return Err(FusionError::Invalid(format!(
                            "an image-token budget of {b} is below what one image costs at the \
                             smallest size ({} tokens)",
                            p.image_tokens
                        )));
                    }
                    edge = edge.saturating_sub(self.tile).max(self.tile);
                }
                _ => return Ok(p),
            }
        }
    }

    fn plan_at(&self, w: u32, h: u32, edge: u32, split: bool) -> ImagePlan {
        let resized = if self.do_resize {
            let (rh, rw) = rescale_to_max_len(h, w, edge);
            let (rh, rw) = scale_below_upper_bound(rh, rw, MAX_IMAGE_SIZE);
            (rw, rh)
        } else {
            (w, h)
        };
        let m = self.tile;
        let (grid_size, rows, cols) = if split {
            let (gh, gw) = for_vision_encoder(resized.1, resized.0, m);
            if gh > m || gw > m {
                ((gw, gh), (gh - m) / m + 1, (gw - m) / m + 1)
            } else {
                ((gw, gh), 0, 0)
            }
        } else {
            ((m, m), 0, 0)
        };
        let tiles = (rows * cols) as usize + 1;
        ImagePlan {
            image: (w, h),
            tile: m,
            resized,
            grid_size,
            rows,
            cols,
            overview: rows > 0,
            tiles,
            tokens_per_tile: self.image_seq_len,
            image_tokens: tiles * self.image_seq_len,
            longest_edge: edge,
            downscale: (edge < self.longest_edge && self.do_resize)
                .then(|| edge as f64 / self.longest_edge as f64),
        }
    }

    /// The encoder input for a planned image: split tiles row-major, the global image last
    /// (what the plan says; the plan decides splitting).
    ///
    /// # Shapes
    /// `-> (tiles, 3, tile, tile)`.
    pub fn pixel_values(&self, img: &RgbImage, plan: &ImagePlan) -> Result<Tensor> {
        if img.dimensions() != plan.image {
            return Err(FusionError::Invalid(format!(
                "plan is for a {:?} image, got {:?}",
                plan.image,
                img.dimensions()
            )));
        }
        if plan.tile != self.tile {
            return Err(FusionError::Invalid(format!(
                "plan is for tiles of {} px, this processor cuts {} px",
                plan.tile, self.tile
            )));
        }
        let f = self.pre.filter;
        let m = self.tile;
        let step1 = resize(img, plan.resized.0, plan.resized.1, f)?;
        let mut frames = Vec::with_capacity(plan.tiles);
        if plan.is_split() {
            let step2 = resize(&step1, plan.grid_size.0, plan.grid_size.1, f)?;
            for r in 0..plan.rows {
                for c in 0..plan.cols {
                    let t = imageops::crop_imm(&step2, c * m, r * m, m, m).to_image();
                    frames.push(self.pre.to_tensor(&t)?);
                }
            }
            frames.push(self.pre.to_tensor(&resize(&step2, m, m, f)?)?);
        } else {
            // unsplit, or split but small enough for one tile: the step-1 image squashed to
            // one tile (transformers resizes it to the 1x1 grid, the same size)
            frames.push(self.pre.to_tensor(&resize(&step1, m, m, f)?)?);
        }
        Ok(Tensor::stack(&frames, 0)?)
    }

    /// The text that replaces one `<image>` placeholder of the chat template.
    pub fn image_prompt(&self, plan: &ImagePlan) -> String {
        let run = "<image>".repeat(self.image_seq_len);
        let global = format!("<fake_token_around_image><global-img>{run}<fake_token_around_image>");
        if plan.rows == 0 && plan.cols == 0 {
            return global;
        }
        let mut s = String::new();
        for r in 0..plan.rows {
            for c in 0..plan.cols {
                s.push_str(&format!(
                    "<fake_token_around_image><row_{}_col_{}>{run}",
                    r + 1,
                    c + 1
                ));
            }
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&global);
        s
    }
}

impl crate::image_processor::ImageProcessor for Idefics3Processor {
    fn plan(
        &self,
        w: u32,
        h: u32,
        max_image_tokens: Option<usize>,
        split: bool,
    ) -> Result<ImagePlan> {
        self.plan_with(w, h, max_image_tokens, split)
    }
    fn pixel_values(&self, img: &RgbImage, plan: &ImagePlan) -> Result<Tensor> {
        Idefics3Processor::pixel_values(self, img, plan)
    }
    fn prompt_expansion(&self, plan: &ImagePlan) -> String {
        self.image_prompt(plan)
    }
    fn min_image_tokens(&self) -> usize {
        self.image_seq_len
    }
    fn tile_size(&self) -> u32 {
        self.tile
    }
    fn splits_by_default(&self) -> bool {
        self.do_image_splitting
    }
    fn required_tokens(&self) -> Vec<String> {
        ["<image>", "<fake_token_around_image>", "<global-img>"]
            .map(String::from)
            .to_vec()
    }
}

/// transformers' `_resize_output_size_rescale_to_max_len`: `(h, w)` in and out.
fn rescale_to_max_len(h: u32, w: u32, max_len: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    let (mut h, mut w) = (h, w);
    if w >= h {
        w = max_len;
        h = (w as f64 / aspect) as u32;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = max_len;
        w = (h as f64 * aspect) as u32;
        if w % 2 != 0 {
            w += 1;
        }
    }
    (h.max(1), w.max(1))
}

/// transformers' `_resize_output_size_scale_below_upper_bound`.
fn scale_below_upper_bound(h: u32, w: u32, max_len: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    let (mut h, mut w) = (h, w);
    if w >= h && w > max_len {
        w = max_len;
        h = (w as f64 / aspect) as u32;
    } else if h > w && h > max_len {
        h = max_len;
        w = (h as f64 * aspect) as u32;
    }
    (h.max(1), w.max(1))
}

/// transformers' `resize_for_vision_encoder` size rule: `(h, w)` -> multiples of `m`.
fn for_vision_encoder(h: u32, w: u32, m: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    if w >= h {
        let w2 = w.div_ceil(m) * m;
        let h2 = ((w2 as f64 / aspect) as u32).div_ceil(m) * m;
        (h2.max(m), w2)
    } else {
        let h2 = h.div_ceil(m) * m;
        let w2 = ((h2 as f64 * aspect) as u32).div_ceil(m) * m;
        (h2, w2.max(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smolvlm() -> Idefics3Processor {
        Idefics3Processor::from_json(
            &serde_json::json!({"size": {"longest_edge": 2048},
                "max_image_size": {"longest_edge": 512}, "resample": 1,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
            64,
        )
        .unwrap()
    }

    #[test]
    fn screenshot_splits_into_4x3_tiles_plus_global() {
        let p = smolvlm().plan(1920, 1080, None).unwrap();
        // 1920x1080 -> 2048x1152 -> 2048x1536 -> 4 cols x 3 rows + global
        assert_eq!(p.resized, (2048, 1152));
        assert_eq!(p.grid_size, (2048, 1536));
        assert_eq!((p.cols, p.rows, p.tiles, p.image_tokens), (4, 3, 13, 832));
        assert_eq!(p.downscale, None);
    }

    #[test]
    fn budget_lowers_the_longest_edge_and_says_so() {
        let pr = smolvlm();
        let p = pr.plan(1920, 1080, Some(400)).unwrap();
        assert!(p.image_tokens <= 400);
        assert!(p.downscale.is_some() && p.describe().contains("downscaled"));
        assert_eq!(p.longest_edge, 1024);
        assert!(pr.plan(1920, 1080, Some(10)).is_err());
        let one = pr.plan(1920, 1080, Some(64)).unwrap();
        assert_eq!((one.rows, one.cols, one.tiles), (0, 0, 1));
    }

    #[test]
    fn prompt_has_rows_columns_and_global_image() {
        let pr = Idefics3Processor {
            image_seq_len: 2,
            ..smolvlm()
        };
        let p = ImagePlan {
            rows: 1,
            cols: 2,
            tiles: 3,
            ..pr.plan(100, 100, None).unwrap()
        };
        assert_eq!(
            pr.image_prompt(&p),
            "<fake_token_around_image><row_1_col_1><image><image>\
             <fake_token_around_image><row_1_col_2><image><image>\n\n\
             <fake_token_around_image><global-img><image><image><fake_token_around_image>"
        );
    }
}
