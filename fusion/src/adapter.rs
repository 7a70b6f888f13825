//! The adapter component of [`crate::Vlm`]: encoded views in, image embeddings in the
//! language model's width out. Two implementations: the paper's adapter
//! ([`crate::afm_adapter::AfmAdapter`]: transformer layer, projection, 3x3 convolution,
//! pooling to a fixed grid) and Idefics3's pixel-shuffle connector
//! ([`crate::connector::PixelShuffleConnector`]).

use crate::error::Result;
use candle_core::Tensor;

/// Turns encoded views (tiles) into image embeddings for the language model.
pub trait VisionAdapter: Send + Sync {
    /// Image tokens one view becomes, for an encoder grid of `grid = (rows, cols)` patches.
    fn tokens_per_tile(&self, grid: (usize, usize)) -> Result<usize>;

    /// Views in, image embeddings out, view by view in the same order.
    ///
    /// # Shapes
    /// `x: (tiles, registers + rows*cols, vision_hidden)` -> `(tiles, tokens, lm_hidden)`.
    fn forward(&self, x: &Tensor, grid: (usize, usize), registers: usize) -> Result<Tensor>;
}
