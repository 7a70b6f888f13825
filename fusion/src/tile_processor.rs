//! The paper's image processor, [`TileProcessor`] (afm-tiny's): the planner of
//! [`afm_vision::tiling`] (an overview plus native-resolution tiles under a token budget)
//! behind [`ImageProcessor`], or, without tiling settings, one view per image: the whole
//! image resized (squashed) to the encoder's size, as afm-tiny was trained.
//!
//! # Views and prompt
//! With tiling, an image larger than one tile becomes the overview (the whole image fitted
//! into one tile, aspect kept, padded with the normalisation mean) followed by the grid's
//! tiles row-major, each `tokens_per_tile` embeddings after the adapter; an image that fits
//! one tile is that tile alone. The prompt holds one placeholder per embedding in the same
//! order, nothing between them ([`crate::afm_prompt::image_expansion`],
//! [`crate::afm_prompt::view_order`]).
//!
//! # Budget
//! The caller's image-token budget replaces `max_tokens` of the settings; when the
//! native-resolution grid costs more, the image is downscaled until it fits and the plan says
//! so (`downscale`). Without tiling every image costs `tokens_per_tile` whatever the budget
//! (a budget below that is an error).

use crate::error::{FusionError, Result};
use crate::image_processor::{ImagePlan, ImageProcessor};
use afm_vision::tiling::{make_tiles, plan as tile_plan, TilingConfig};
use afm_vision::Preprocess;
use candle_core::Tensor;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// `tiling` in an afm-tiny `config.json`, e.g.
/// `{"tile": 224, "max_tokens": 576, "overview": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TilingSettings {
    /// Tile side in pixels: the encoder's input size (`image_size`).
    pub tile: u32,
    /// Image-token budget per image, the overview included, when the caller gives none.
    pub max_tokens: usize,
    /// Put the overview before the tiles when there is more than one tile (default `true`).
    #[serde(default = "yes")]
    pub overview: bool,
}

fn yes() -> bool {
    true
}

/// The paper's image processor (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct TileProcessor {
    /// The encoder's input size; one view is `image_size` squared.
    pub image_size: u32,
    /// Image tokens one view becomes after the adapter.
    pub tokens_per_tile: usize,
    /// `None`: one squashed view per image (module docs).
    pub tiling: Option<TilingSettings>,
    pub pre: Preprocess,
    /// The token text the prompt repeats once per image embedding.
    pub placeholder: String,
}

impl TileProcessor {
    /// Checks that the settings fit together.
    pub fn new(
        image_size: u32,
        tokens_per_tile: usize,
        tiling: Option<TilingSettings>,
        pre: Preprocess,
        placeholder: &str,
    ) -> Result<Self> {
        if image_size == 0 || tokens_per_tile == 0 {
            return Err(FusionError::config(
                "image_size",
                "the view size and tokens per view must be > 0",
            ));
        }
        if let Some(t) = &tiling {
            check_tiling(t, image_size, tokens_per_tile)
                .map_err(|r| FusionError::config("tiling", r))?;
        }
        Ok(Self {
            image_size,
            tokens_per_tile,
            tiling,
            pre,
            placeholder: placeholder.to_string(),
        })
    }

    fn single_view(&self, w: u32, h: u32) -> ImagePlan {
        let s = self.image_size;
        ImagePlan {
            image: (w, h),
            tile: s,
            resized: (s, s),
            grid_size: (s, s),
            rows: 0,
            cols: 0,
            overview: false,
            tiles: 1,
            tokens_per_tile: self.tokens_per_tile,
            image_tokens: self.tokens_per_tile,
            longest_edge: s,
            downscale: None,
        }
    }
}

/// The reason tiling settings do not fit an encoder of `image_size` and an adapter of
/// `tokens_per_tile` tokens.
pub fn check_tiling(
    t: &TilingSettings,
    image_size: u32,
    tokens_per_tile: usize,
) -> std::result::Result<(), String> {
    if t.tile != image_size {
        return Err(format!(
            "tiling.tile {} differs from the encoder's input size {image_size}",
            t.tile
        ));
    }
    if t.max_tokens < tokens_per_tile {
        return Err(format!(
            "tiling.max_tokens {} is below one tile ({tokens_per_tile} tokens)",
            t.max_tokens
        ));
    }
    Ok(())
}

impl ImageProcessor for TileProcessor {
    fn plan(
        &self,
        w: u32,
        h: u32,
        max_image_tokens: Option<usize>,
        split: bool,
    ) -> Result<ImagePlan> {
        if w == 0 || h == 0 {
            return Err(FusionError::Invalid(format!(
                "cannot process a {w}x{h} image"
            )));
        }
        let (n, s) = (self.tokens_per_tile, self.image_size);
        if let Some(b) = max_image_tokens {
            if b < n {
                return Err(FusionError::Invalid(format!(
                    "an image-token budget of {b} is below what one image costs ({n} tokens: one {s}x{s} tile)"
                )));
            }
        }
        let Some(t) = &self.tiling else {
            return Ok(self.single_view(w, h));
        };
        let cfg = TilingConfig {
            tile: t.tile,
            tokens_per_tile: n,
            max_tokens: if split {
                max_image_tokens.unwrap_or(t.max_tokens)
            } else {
                n
            },
            overview: t.overview,
        };
        let mut p = tile_plan(w, h, &cfg)?;
        if !split {
            // one view by choice, not by the budget
            p.downscale = None;
        }
        Ok(p)
    }

    fn pixel_values(&self, img: &RgbImage, plan: &ImagePlan) -> Result<Tensor> {
        if img.dimensions() != plan.image || plan.tile != self.image_size {
            return Err(FusionError::Invalid(format!(
                "plan is for a {:?} image in {} px tiles, got a {:?} image and {} px tiles",
                plan.image,
                plan.tile,
                img.dimensions(),
                self.image_size
            )));
        }
        if self.tiling.is_none() {
            let s = self.image_size;
            return Ok(self.pre.run(img, s, s)?.unsqueeze(0)?);
        }
        Ok(make_tiles(img, plan, &self.pre)?)
    }

    fn prompt_expansion(&self, plan: &ImagePlan) -> String {
        crate::afm_prompt::image_expansion(&self.placeholder, plan)
    }

    fn min_image_tokens(&self) -> usize {
        self.tokens_per_tile
    }

    fn tile_size(&self) -> u32 {
        self.image_size
    }

    fn splits_by_default(&self) -> bool {
        true
    }

    fn required_tokens(&self) -> Vec<String> {
        vec![self.placeholder.clone()]
    }

    fn budget_note(&self) -> Option<String> {
        self.tiling.is_none().then(|| {
            format!(
                "every image is one {s}x{s} tile of {n} image tokens (its config.json has no `tiling` section)",
                s = self.image_size,
                n = self.tokens_per_tile
            )
        })
    }
}
