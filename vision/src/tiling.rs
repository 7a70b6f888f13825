//! Tiling: an image becomes a grid of encoder-sized tiles plus an overview (the whole image
//! in one tile), chosen from the image size and a token budget, preserving aspect ratio.
//! A plan can be made from the image header alone, so callers see which tiles and how many
//! image tokens a request costs before anything runs; when the budget forces a smaller image
//! than the native-resolution grid, the plan says so (`downscale`).
//!
//! Modes from the paper map onto budgets: with 144 tokens per 672-px tile, *high-resolution*
//! (2x2 tiles + thumbnail) is a 720-token budget, *balanced* (thumbnail only) 144.

use crate::error::{Result, VisionError};
use crate::preprocess::{resize, Preprocess};
use candle_core::Tensor;
use image::{imageops, Rgb, RgbImage};
use serde::Serialize;

/// How to tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilingConfig {
    /// Tile side in pixels (the encoder's input size).
    pub tile: u32,
    /// Image tokens one tile costs after the adapter (64 for SmolVLM, 144 in the paper).
    pub tokens_per_tile: usize,
    /// The caller's budget of image tokens.
    pub max_tokens: usize,
    /// Add the overview tile when there is more than one tile.
    pub overview: bool,
}

/// What a request will cost, decided before decoding pixels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TilePlan {
    /// Original `(width, height)`.
    pub image: (u32, u32),
    pub tile: u32,
    pub rows: u32,
    pub cols: u32,
    /// The image is resized to this `(width, height)` before cutting (aspect kept; the grid's
    /// right/bottom edge is padded with the normalisation mean, which encodes as ~0).
    pub scaled: (u32, u32),
    pub overview: bool,
    /// Image tokens the request costs.
    pub tokens: usize,
    /// `Some(f)` when the budget forced the image below its native-resolution grid (f < 1
    /// is the linear scale applied); `None` otherwise.
    pub downscale: Option<f64>,
}

impl TilePlan {
    pub fn num_tiles(&self) -> usize {
        (self.rows * self.cols) as usize + self.overview as usize
    }

    /// A one-line description for logs and `--json` output.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}x{} image -> {}x{} tiles of {} px{} = {} image tokens",
            self.image.0,
            self.image.1,
            self.cols,
            self.rows,
            self.tile,
            if self.overview { " + overview" } else { "" },
            self.tokens
        );
        if let Some(f) = self.downscale {
            s.push_str(&format!(
                " (downscaled to {:.0}% by the token budget)",
                f * 100.0
            ));
        }
        s
    }
}

fn tokens(cfg: &TilingConfig, rows: u32, cols: u32) -> usize {
    let n = (rows * cols) as usize;
    n * cfg.tokens_per_tile
        + if cfg.overview && n > 1 {
            cfg.tokens_per_tile
        } else {
            0
        }
}

fn grid_for(w: u32, h: u32, s: f64, tile: u32) -> (u32, u32, u32, u32) {
    let sw = ((w as f64 * s).round() as u32).max(1);
    let sh = ((h as f64 * s).round() as u32).max(1);
    (sh.div_ceil(tile), sw.div_ceil(tile), sw, sh)
}

/// Chooses the tiles for a `w x h` image.
pub fn plan(w: u32, h: u32, cfg: &TilingConfig) -> Result<TilePlan> {
    if w == 0 || h == 0 {
        return Err(VisionError::Invalid(format!("cannot tile a {w}x{h} image")));
    }
    if cfg.tile == 0 || cfg.tokens_per_tile == 0 {
        return Err(VisionError::Invalid(
            "tile size and tokens per tile must be > 0".into(),
        ));
    }
    if cfg.max_tokens < cfg.tokens_per_tile {
        return Err(VisionError::Invalid(format!(
            "an image-token budget of {} is below one tile ({} tokens)",
            cfg.max_tokens, cfg.tokens_per_tile
        )));
    }
    let t = cfg.tile as f64;
    let make = |s: f64, downscale: Option<f64>| {
        let (rows, cols, sw, sh) = grid_for(w, h, s, cfg.tile);
        let overview = cfg.overview && rows * cols > 1;
        TilePlan {
            image: (w, h),
            tile: cfg.tile,
            rows,
            cols,
            scaled: (sw, sh),
            overview,
            tokens: tokens(cfg, rows, cols),
            downscale,
        }
    };
    let (rows, cols) = (h.div_ceil(cfg.tile), w.div_ceil(cfg.tile));
    if rows * cols == 1 {
        // one tile: fit the image in it (up- or downscaled), aspect kept
        return Ok(make(t / w.max(h) as f64, None));
    }
    if tokens(cfg, rows, cols) <= cfg.max_tokens {
        return Ok(make(1.0, None));
    }
    // Largest scale whose grid fits the budget: scales where the grid changes are c*t/w, r*t/h.
    let mut best = t / w.max(h) as f64; // one tile always fits
    for c in 1..=cols {
        for r in 1..=rows {
            let s = (c as f64 * t / w as f64).min(r as f64 * t / h as f64);
            if s > best {
                let (rr, cc, _, _) = grid_for(w, h, s, cfg.tile);
                if tokens(cfg, rr, cc) <= cfg.max_tokens {
                    best = s;
                }
            }
        }
    }
    Ok(make(best, Some(best)))
}

/// Cuts an image into the plan's tiles, row-major, overview last, preprocessed.
///
/// # Shapes
/// `-> (num_tiles, 3, tile, tile)`.
pub fn make_tiles(img: &RgbImage, p: &TilePlan, pre: &Preprocess) -> Result<Tensor> {
    if img.dimensions() != p.image {
        return Err(VisionError::Invalid(format!(
            "plan is for a {:?} image, got {:?}",
            p.image,
            img.dimensions()
        )));
    }
    let fill = Rgb(pre
        .image_mean
        .map(|m| (m / pre.rescale_factor).round().clamp(0.0, 255.0) as u8));
    let s = p.tile;
    let canvas = |w: u32, h: u32, src: &RgbImage| {
        let mut c = RgbImage::from_pixel(w, h, fill);
        imageops::replace(&mut c, src, 0, 0);
        c
    };
    let mut tiles = Vec::with_capacity(p.num_tiles());
    let scaled = resize(img, p.scaled.0, p.scaled.1, pre.filter)?;
    let grid = canvas(p.cols * s, p.rows * s, &scaled);
    for r in 0..p.rows {
        for c in 0..p.cols {
            let t = imageops::crop_imm(&grid, c * s, r * s, s, s).to_image();
            tiles.push(pre.to_tensor(&t)?);
        }
    }
    if p.overview {
        let f = s as f64 / img.width().max(img.height()) as f64;
        let (ow, oh) = (
            ((img.width() as f64 * f).round() as u32).max(1),
            ((img.height() as f64 * f).round() as u32).max(1),
        );
        let ov = resize(img, ow, oh, pre.filter)?;
        tiles.push(pre.to_tensor(&canvas(s, s, &ov))?);
    }
    Ok(Tensor::stack(&tiles, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(budget: usize) -> TilingConfig {
        TilingConfig {
            tile: 512,
            tokens_per_tile: 64,
            max_tokens: budget,
            overview: true,
        }
    }

    #[test]
    fn screenshot_keeps_native_resolution_when_the_budget_allows() {
        let p = plan(1920, 1080, &cfg(1024)).unwrap();
        assert_eq!(
            (p.cols, p.rows, p.overview, p.tokens, p.downscale),
            (4, 3, true, 13 * 64, None)
        );
        assert_eq!(p.scaled, (1920, 1080));
    }

    #[test]
    fn tight_budget_downscales_and_says_so() {
        let p = plan(1920, 1080, &cfg(300)).unwrap();
        assert!(p.tokens <= 300);
        let f = p.downscale.expect("must report the downscale");
        assert!(f < 1.0);
        assert_eq!((p.cols, p.rows), (2, 1));
        assert!(p.describe().contains("downscaled"));
        // aspect ratio kept within a pixel
        let (sw, sh) = p.scaled;
        assert!(((sw as f64 / sh as f64) - 1920.0 / 1080.0).abs() < 0.01);
    }

    #[test]
    fn small_image_is_one_tile_and_budget_below_a_tile_is_refused() {
        let p = plan(300, 200, &cfg(64)).unwrap();
        assert_eq!((p.cols, p.rows, p.overview, p.tokens), (1, 1, false, 64));
        assert_eq!(p.scaled, (512, 341));
        assert!(plan(300, 200, &cfg(63)).is_err());
        assert!(plan(0, 200, &cfg(640)).is_err());
    }

    #[test]
    fn paper_modes_as_budgets() {
        let paper = |budget| TilingConfig {
            tile: 672,
            tokens_per_tile: 144,
            max_tokens: budget,
            overview: true,
        };
        let hi = plan(1344, 1344, &paper(720)).unwrap();
        assert_eq!((hi.cols, hi.rows, hi.tokens), (2, 2, 720));
        let bal = plan(1344, 1344, &paper(144)).unwrap();
        assert_eq!(
            (bal.cols, bal.rows, bal.tokens, bal.downscale),
            (1, 1, 144, Some(0.5))
        );
    }

    #[test]
    fn tiles_come_out_in_order_with_the_overview_last() {
        let mut img = RgbImage::new(1024, 512);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = if x < 512 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            };
        }
        let p = plan(1024, 512, &cfg(1000)).unwrap();
        let t = make_tiles(&img, &p, &Preprocess::default()).unwrap();
        assert_eq!(t.dims(), &[3, 3, 512, 512]);
        let px = |i: usize, c: usize| {
            t.get(i)
                .unwrap()
                .get(c)
                .unwrap()
                .get(100)
                .unwrap()
                .get(100)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(px(0, 0) > 0.9 && px(0, 2) < -0.9); // left tile red
        assert!(px(1, 2) > 0.9 && px(1, 0) < -0.9); // right tile blue
        assert!(px(2, 0) > 0.9); // overview top-left is red
                                 // overview bottom half is padding (mean colour, ~0)
        let pad = t
            .get(2)
            .unwrap()
            .get(0)
            .unwrap()
            .get(400)
            .unwrap()
            .get(100)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(pad.abs() < 0.01, "{pad}");
    }
}
