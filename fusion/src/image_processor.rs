//! The image-processor component of [`crate::Vlm`]: how an image becomes encoder views and
//! prompt tokens. Two implementations:
//!
//! * [`crate::processor::Idefics3Processor`]: transformers' Idefics3 / SmolVLM rules (tiles
//!   row-major, the global image last, row/column marker tokens in the prompt);
//! * [`crate::tile_processor::TileProcessor`]: the paper's planner
//!   ([`afm_vision::tiling`]: the overview first, then native-resolution tiles row-major under
//!   a token budget), used by afm-tiny.
//!
//! Both describe an image's cost with the one plan type, [`ImagePlan`], made from the image
//! size alone (no pixels decoded), so a dry run and the budget check need no weights.
//! [`Processor`] is what a pipeline holds: an implementation plus the switch every one of
//! them honours (image splitting on or off).

use crate::error::Result;
use candle_core::Tensor;
use image::RgbImage;

pub use afm_vision::ImagePlan;

/// Plans images, cuts them into encoder views and writes their prompt text.
pub trait ImageProcessor: std::fmt::Debug + Send + Sync {
    /// What an image of `w x h` costs: `max_image_tokens` is the caller's budget (`None`: the
    /// processor's default, its full resolution); with `split = false` the image is one view
    /// of the whole image. An image larger than the budget allows is downscaled and the plan
    /// says so (`downscale`); a budget below one view is an error.
    fn plan(
        &self,
        w: u32,
        h: u32,
        max_image_tokens: Option<usize>,
        split: bool,
    ) -> Result<ImagePlan>;

    /// The encoder input of a planned image, views in prompt order.
    ///
    /// # Shapes
    /// `-> (plan.tiles, 3, tile, tile)`.
    fn pixel_values(&self, img: &RgbImage, plan: &ImagePlan) -> Result<Tensor>;

    /// The prompt text of one image: exactly `plan.image_tokens` image tokens, one per image
    /// embedding in the order of [`Self::pixel_values`]' views, with whatever markers the
    /// format puts around them.
    fn prompt_expansion(&self, plan: &ImagePlan) -> String;

    /// The fewest image tokens any image costs (one view).
    fn min_image_tokens(&self) -> usize;

    /// Side of one view in pixels (the encoder's input size).
    fn tile_size(&self) -> u32;

    /// Whether images are split into tiles unless the pipeline turns splitting off.
    fn splits_by_default(&self) -> bool;

    /// Token texts [`Self::prompt_expansion`] writes, each of which must be one token of the
    /// language model's vocabulary.
    fn required_tokens(&self) -> Vec<String>;

    /// Why a caller's budget (at or above [`Self::min_image_tokens`]) changes nothing, when it
    /// does not; `None`: budgets apply.
    fn budget_note(&self) -> Option<String> {
        None
    }
}

/// A pipeline's image processor: an [`ImageProcessor`] and the splitting switch.
#[derive(Debug)]
pub struct Processor {
    /// `false`: every image is one view of the whole image (Idefics3's
    /// `do_image_splitting = false`, the paper's thumbnail-only "balanced" mode). Starts as
    /// the processor's own setting ([`ImageProcessor::splits_by_default`]).
    pub do_image_splitting: bool,
    inner: Box<dyn ImageProcessor>,
}

impl Processor {
    pub fn new(inner: Box<dyn ImageProcessor>) -> Self {
        Self {
            do_image_splitting: inner.splits_by_default(),
            inner,
        }
    }

    /// The implementation.
    pub fn inner(&self) -> &dyn ImageProcessor {
        self.inner.as_ref()
    }

    /// What an image of `w x h` costs under an optional budget ([`ImageProcessor::plan`]).
    pub fn plan(&self, w: u32, h: u32, max_image_tokens: Option<usize>) -> Result<ImagePlan> {
        self.inner
            .plan(w, h, max_image_tokens, self.do_image_splitting)
    }

    /// # Shapes
    /// `-> (plan.tiles, 3, tile, tile)` ([`ImageProcessor::pixel_values`]).
    pub fn pixel_values(&self, img: &RgbImage, plan: &ImagePlan) -> Result<Tensor> {
        self.inner.pixel_values(img, plan)
    }

    pub fn prompt_expansion(&self, plan: &ImagePlan) -> String {
        self.inner.prompt_expansion(plan)
    }

    pub fn min_image_tokens(&self) -> usize {
        self.inner.min_image_tokens()
    }

    pub fn tile_size(&self) -> u32 {
        self.inner.tile_size()
    }

    pub fn budget_note(&self) -> Option<String> {
        self.inner.budget_note()
    }
}
