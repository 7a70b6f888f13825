//! A convolutional stem before the patch embedding (afm's own choice, not the paper's).
//!
//! A plain ViT embeds each `p x p` patch with one linear map, so a glyph looks different at
//! every sub-patch offset and the encoder must learn each offset separately. Reading 11-14 px
//! text with patch 16 failed that way (docs/afm-tiny-v2.md). Early convolutions, as in
//! "Early Convolutions Help Transformers See Better" (Xiao et al., 2021) and in OCR models,
//! share their weights across positions: the stem is `n` stride-2 3x3 convolutions (padding
//! 1, bias, GELU after each), and the patch embedding then covers `p / 2^n` stem pixels.
//!
//! Weights: `embeddings.stem.{i}.weight (c_i, c_{i-1}, 3, 3)` and `embeddings.stem.{i}.bias
//! (c_i)`, with `c_{-1}` the image channels and `c_i` the config's `stem` list.

use crate::error::Result;
use crate::weights::VisionWeights;
use candle_core::Tensor;

pub struct ConvStem {
    /// `(weight (c_out, c_in, 3, 3), bias (c_out))` per convolution.
    convs: Vec<(Tensor, Tensor)>,
}

impl ConvStem {
    /// Loads `embeddings.stem.{i}.{weight,bias}` for the output channels `channels`.
    pub fn load(w: &VisionWeights, in_channels: usize, channels: &[usize]) -> Result<Self> {
        let mut convs = Vec::with_capacity(channels.len());
        let mut c_in = in_channels;
        for (i, &c) in channels.iter().enumerate() {
            convs.push((
                w.get(&format!("embeddings.stem.{i}.weight"), &[c, c_in, 3, 3])?,
                w.get(&format!("embeddings.stem.{i}.bias"), &[c])?,
            ));
            c_in = c;
        }
        Ok(Self { convs })
    }

    /// # Shapes
    /// `x: (b, c, h, w)` with `h`, `w` multiples of `2^n` -> `(b, c_last, h / 2^n, w / 2^n)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (w, b) in &self.convs {
            let c = b.dim(0)?;
            x = x
                .conv2d(w, 1, 2, 1, 1)?
                .broadcast_add(&b.reshape((1, c, 1, 1))?)?
                .gelu()?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// The stem against a direct evaluation of its definition (one 3x3 stride-2 convolution
    /// with zero padding, bias and tanh-GELU), on an odd-valued input.
    #[test]
    fn one_convolution_matches_its_definition() {
        let (ci, co, h, w) = (2usize, 3usize, 6usize, 4usize);
        let wv: Vec<f32> = (0..co * ci * 9)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
            .collect();
        let bv: Vec<f32> = vec![0.1, -0.2, 0.3];
        let xv: Vec<f32> = (0..ci * h * w)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 7.0)
            .collect();
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        m.insert(
            "embeddings.stem.0.weight".to_string(),
            Tensor::from_vec(wv.clone(), (co, ci, 3, 3), &dev).unwrap(),
        );
        m.insert(
            "embeddings.stem.0.bias".to_string(),
            Tensor::from_vec(bv.clone(), co, &dev).unwrap(),
        );
        let stem = ConvStem::load(&VisionWeights::with_prefix(m, ""), ci, &[co]).unwrap();
        let x = Tensor::from_vec(xv.clone(), (1, ci, h, w), &dev).unwrap();
        let got: Vec<f32> = stem
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gelu = |v: f32| {
            0.5 * v
                * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
        };
        let (oh, ow) = (h / 2, w / 2);
        assert_eq!(got.len(), co * oh * ow);
        for o in 0..co {
            for y in 0..oh {
                for x in 0..ow {
                    let mut acc = bv[o];
                    for c in 0..ci {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = ((2 * y + ky) as i64 - 1, (2 * x + kx) as i64 - 1);
                                if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                    continue;
                                }
                                acc += wv[((o * ci + c) * 3 + ky) * 3 + kx]
                                    * xv[(c * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                    let g = got[(o * oh + y) * ow + x];
                    assert!(
                        (g - gelu(acc)).abs() < 1e-4,
                        "({o},{y},{x}): {g} vs {}",
                        gelu(acc)
                    );
                }
            }
        }
    }
}
