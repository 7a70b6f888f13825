//! Tiling: an image becomes an overview (the whole image in one tile) plus a grid of
//! encoder-sized tiles, chosen from the image size and a token budget, preserving aspect
//! ratio. A plan can be made from the image header alone, so callers see which tiles and how
//! many image tokens a request costs before anything runs; when the budget forces a smaller
//! image than the native-resolution grid, the plan says so (`downscale`).
//!
//! Modes from the paper map onto budgets: with 144 tokens per 672-px tile, *high-resolution*
//! (2x2 tiles + thumbnail) is a 720-token budget, *balanced* (thumbnail only) 144.
//!
//! [`ImagePlan`] is the one plan type of the project: this planner and the Idefics3 image
//! processor (`afm_fusion::processor`) both describe what an image costs with it.
//!
//! # Tile order
//! [`make_tiles`] returns the overview first (when the plan has one), then the grid's tiles
//! row-major (left to right, top to bottom). An image that fits one tile is that one tile
//! alone (`rows = cols = 0`).

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

/// What one image will cost, decided from its size before any pixel is decoded or resized.
///
/// The encoder runs `tiles` views of `tile x tile` pixels: the grid's `rows x cols` tiles
/// and, when `overview` is set, one more view of the whole image (the paper's overview,
/// Idefics3's global image). `rows = cols = 0` means the image is not split: one view of
/// the whole image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImagePlan {
    /// Original `(width, height)`.
    pub image: (u32, u32),
    /// Tile side in pixels (the encoder's input size).
    pub tile: u32,
    /// The image is resized to this `(width, height)` before it is cut (aspect ratio kept).
    pub resized: (u32, u32),
    /// The grid the tiles are cut from, `(width, height)`: `(cols * tile, rows * tile)`
    /// when split (this planner pads the resized image to it with the normalisation mean,
    /// Idefics3 resizes to it), the one view's size when not.
    pub grid_size: (u32, u32),
    /// Tile rows and columns; `(0, 0)`: not split (one view of the whole image).
    pub rows: u32,
    pub cols: u32,
    /// The views include one of the whole image besides the grid.
    pub overview: bool,
    /// Views the encoder runs: `rows * cols + overview`, or 1 unsplit.
    pub tiles: usize,
    /// Image tokens one view becomes.
    pub tokens_per_tile: usize,
    /// Image tokens in the prompt: `tiles * tokens_per_tile`.
    pub image_tokens: usize,
    /// Longest edge of the resized image (Idefics3: the `longest_edge` setting used).
    pub longest_edge: u32,
    /// `Some(f)` when the budget forced the image below its full resolution (`f < 1`: the
    /// linear scale applied, relative to the processor's full resolution); `None` otherwise.
    pub downscale: Option<f64>,
}

impl ImagePlan {
    pub fn num_tiles(&self) -> usize {
        self.tiles
    }

    /// `true` when the image is cut into a grid of tiles.
    pub fn is_split(&self) -> bool {
        self.rows > 0 && self.cols > 0
    }

    /// A one-line description for logs and `--json` output.
    pub fn describe(&self) -> String {
        let mut s = if self.is_split() {
            format!(
                "{}x{} image -> {} tiles ({}x{} grid of {} px{}) = {} image tokens",
                self.image.0,
                self.image.1,
                self.tiles,
                self.cols,
                self.rows,
                self.tile,
                if self.overview { " + overview" } else { "" },
                self.image_tokens
            )
        } else {
            format!(
                "{}x{} image -> 1 tile (the whole image, unsplit) = {} image tokens",
                self.image.0, self.image.1, self.image_tokens
            )
        };
        if let Some(f) = self.downscale {
            s.push_str(&format!(
                "; downscaled to longest edge {} ({:.0}%) by the image-token budget",
                self.longest_edge,
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

/// The size of `w x h` fitted into a `tile` square, aspect ratio kept.
fn fit(w: u32, h: u32, tile: u32) -> (u32, u32) {
    let f = tile as f64 / w.max(h) as f64;
    (
        ((w as f64 * f).round() as u32).clamp(1, tile),
        ((h as f64 * f).round() as u32).clamp(1, tile),
    )
}

/// Chooses the tiles for a `w x h` image.
pub fn plan(w: u32, h: u32, cfg: &TilingConfig) -> Result<ImagePlan> {
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
        if rows * cols == 1 {
            // one tile: the image fitted into it (up- or downscaled), aspect kept
            let resized = fit(w, h, cfg.tile);
            return ImagePlan {
                image: (w, h),
                tile: cfg.tile,
                resized,
                grid_size: (cfg.tile, cfg.tile),
                rows: 0,
                cols: 0,
                overview: false,
                tiles: 1,
                tokens_per_tile: cfg.tokens_per_tile,
                image_tokens: cfg.tokens_per_tile,
                longest_edge: resized.0.max(resized.1),
                downscale,
            };
        }
        let overview = cfg.overview;
        ImagePlan {
            image: (w, h),
            tile: cfg.tile,
            resized: (sw, sh),
            grid_size: (cols * cfg.tile, rows * cfg.tile),
            rows,
            cols,
            overview,
            tiles: (rows * cols) as usize + overview as usize,
            tokens_per_tile: cfg.tokens_per_tile,
            image_tokens: tokens(cfg, rows, cols),
            longest_edge: sw.max(sh),
            downscale,
        }
    };
    let (rows, cols) = (h.div_ceil(cfg.tile), w.div_ceil(cfg.tile));
    if rows * cols == 1 {
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

/// Cuts an image into the plan's views, preprocessed, in the module's order: the overview
/// first (when the plan has one), then the tiles row-major; an unsplit plan is one view.
/// A view that is not square-filled (the overview, the unsplit image, the grid's right and
/// bottom edge) is padded with the normalisation mean, which encodes as ~0.
///
/// # Shapes
/// `-> (plan.tiles, 3, tile, tile)`.
pub fn make_tiles(img: &RgbImage, p: &ImagePlan, pre: &Preprocess) -> Result<Tensor> {
    if img.dimensions() != p.image {
        return Err(VisionError::Invalid(format!(
            "plan is for a {:?} image, got {:?}",
            p.image,
            img.dimensions()
        )));
    }
    if p.tile == 0 || (p.rows == 0) != (p.cols == 0) {
        return Err(VisionError::Invalid(format!(
            "a plan of {}x{} tiles of {} px cannot be cut",
            p.cols, p.rows, p.tile
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
    let whole = || -> Result<Tensor> {
        let (ow, oh) = fit(img.width(), img.height(), s);
        let ov = resize(img, ow, oh, pre.filter)?;
        pre.to_tensor(&canvas(s, s, &ov))
    };
    let mut tiles = Vec::with_capacity(p.tiles);
    if !p.is_split() {
        tiles.push(whole()?);
        return Ok(Tensor::stack(&tiles, 0)?);
    }
    if p.overview {
        tiles.push(whole()?);
    }
    let scaled = resize(img, p.resized.0, p.resized.1, pre.filter)?;
    let grid = canvas(p.cols * s, p.rows * s, &scaled);
    for r in 0..p.rows {
        for c in 0..p.cols {
            let t = imageops::crop_imm(&grid, c * s, r * s, s, s).to_image();
            tiles.push(pre.to_tensor(&t)?);
        }
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
            (p.cols, p.rows, p.overview, p.image_tokens, p.downscale),
            (4, 3, true, 13 * 64, None)
        );
        assert_eq!(
            (p.tiles, p.resized, p.grid_size),
            (13, (1920, 1080), (2048, 1536))
        );
    }

    #[test]
    fn tight_budget_downscales_and_says_so() {
        let p = plan(1920, 1080, &cfg(300)).unwrap();
        assert!(p.image_tokens <= 300);
        let f = p.downscale.expect("must report the downscale");
        assert!(f < 1.0);
        assert_eq!((p.cols, p.rows, p.tiles), (2, 1, 3));
        assert!(p.describe().contains("downscaled"), "{}", p.describe());
        // aspect ratio kept within a pixel
        let (sw, sh) = p.resized;
        assert!(((sw as f64 / sh as f64) - 1920.0 / 1080.0).abs() < 0.01);
        assert_eq!(p.longest_edge, sw);
    }

    #[test]
    fn small_image_is_one_tile_and_budget_below_a_tile_is_refused() {
        let p = plan(300, 200, &cfg(64)).unwrap();
        assert_eq!(
            (p.cols, p.rows, p.overview, p.tiles, p.image_tokens),
            (0, 0, false, 1, 64)
        );
        assert_eq!(p.resized, (512, 341));
        assert!(p.describe().contains("1 tile"), "{}", p.describe());
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
        assert_eq!((hi.cols, hi.rows, hi.image_tokens), (2, 2, 720));
        let bal = plan(1344, 1344, &paper(144)).unwrap();
        assert_eq!(
            (bal.tiles, bal.image_tokens, bal.downscale),
            (1, 144, Some(0.5))
        );
    }

    #[test]
    fn tiles_come_out_with_the_overview_first_then_row_major() {
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
        let px = |i: usize, c: usize, y: usize, x: usize| {
            t.get(i)
                .unwrap()
                .get(c)
                .unwrap()
                .get(y)
                .unwrap()
                .get(x)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(px(0, 0, 100, 100) > 0.9); // overview top-left is red
        assert!(px(0, 2, 100, 400) > 0.9); // overview top-right is blue
        let pad = px(0, 0, 400, 100); // overview bottom half is padding (mean colour, ~0)
        assert!(pad.abs() < 0.01, "{pad}");
        assert!(px(1, 0, 100, 100) > 0.9 && px(1, 2, 100, 100) < -0.9); // left tile red
        assert!(px(2, 2, 100, 100) > 0.9 && px(2, 0, 100, 100) < -0.9); // right tile blue
                                                                        // a plan for another image is refused
        assert!(make_tiles(&RgbImage::new(10, 10), &p, &Preprocess::default()).is_err());
    }
}
