//! Resize (fast_image_resize, SIMD), rescale and normalise into the encoder's input tensor.
//!
//! SigLIP / Idefics3 processors resize with PIL's BICUBIC filter (Keys cubic, a = -0.5, with
//! the kernel widened when downscaling); fast_image_resize's `CatmullRom` convolution is the
//! same filter. Values are rescaled by `rescale_factor` (1/255) and normalised per channel
//! with the checkpoint's `image_mean` / `image_std`.

use crate::error::{Result, VisionError};
use candle_core::{Device, Tensor};
use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// The resize filter a checkpoint's preprocessor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// PIL BICUBIC (resample = 3): SigLIP, Idefics3/SmolVLM.
    Bicubic,
    /// PIL BILINEAR (resample = 2).
    Bilinear,
    /// PIL LANCZOS (resample = 1).
    Lanczos,
}

impl Filter {
    /// From the integer PIL code in `preprocessor_config.json` (`resample`).
    pub fn from_pil(code: u64) -> Result<Self> {
        match code {
            3 => Ok(Filter::Bicubic),
            2 => Ok(Filter::Bilinear),
            1 => Ok(Filter::Lanczos),
            c => Err(VisionError::config(
                "resample",
                format!("PIL filter {c} is not supported (1, 2, 3)"),
            )),
        }
    }

    fn alg(self) -> ResizeAlg {
        ResizeAlg::Convolution(match self {
            Filter::Bicubic => FilterType::CatmullRom,
            Filter::Bilinear => FilterType::Bilinear,
            Filter::Lanczos => FilterType::Lanczos3,
        })
    }
}

/// Preprocessing settings, as in a HF `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub filter: Filter,
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for Preprocess {
    /// SigLIP's: bicubic, 1/255, mean 0.5, std 0.5.
    fn default() -> Self {
        Self {
            filter: Filter::Bicubic,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

/// Resizes an RGB8 image to `w x h` with `filter` (no resize when the size already matches).
///
/// Like PIL, the width is resized first and the result rounded and clamped to 8 bits, then the
/// height: near sharp edges the cubic kernel overshoots, and which pass clamps first decides
/// the pixel (up to ~20 levels apart in one order or the other), so the order is PIL's.
pub fn resize(img: &RgbImage, w: u32, h: u32, filter: Filter) -> Result<RgbImage> {
    if w == 0 || h == 0 {
        return Err(VisionError::Invalid(format!("resize to {w}x{h}")));
    }
    let (sw, sh) = img.dimensions();
    let mut cur = if sw != w {
        resize_once(img, w, sh, filter)?
    } else {
        img.clone()
    };
    if sh != h {
        cur = resize_once(&cur, w, h, filter)?;
    }
    Ok(cur)
}

/// One fast_image_resize pass (called with only one side changing).
fn resize_once(img: &RgbImage, w: u32, h: u32, filter: Filter) -> Result<RgbImage> {
    let src = Image::from_vec_u8(
        img.width(),
        img.height(),
        img.as_raw().clone(),
        PixelType::U8x3,
    )
    .map_err(|e| VisionError::Invalid(format!("resize source: {e}")))?;
    let mut dst = Image::new(w, h, PixelType::U8x3);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(filter.alg()),
        )
        .map_err(|e| VisionError::Invalid(format!("resize: {e}")))?;
    RgbImage::from_raw(w, h, dst.into_vec())
        .ok_or_else(|| VisionError::Invalid("resize produced a short buffer".into()))
}

impl Preprocess {
    /// Reads a HF `preprocessor_config.json` (SigLIP, Idefics3/SmolVLM): `resample` (PIL code),
    /// `do_rescale` / `rescale_factor`, `do_normalize` / `image_mean` / `image_std`. Absent
    /// fields take SigLIP's defaults; a field of the wrong type is an error naming it.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let v: serde_json::Value = crate::error::read_json(path, "preprocessor_config.json")?;
        Self::from_json(&v)
    }

    /// As [`Preprocess::from_file`], from parsed JSON.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let mut p = Preprocess::default();
        let flag = |k: &str| -> Result<bool> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(true),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| VisionError::config(k, "must be true or false")),
            }
        };
        if let Some(r) = v.get("resample") {
            let code = r
                .as_u64()
                .ok_or_else(|| VisionError::config("resample", "must be a PIL filter code"))?;
            p.filter = Filter::from_pil(code)?;
        }
        if !flag("do_rescale")? {
            p.rescale_factor = 1.0;
        } else if let Some(r) = v.get("rescale_factor") {
            let f = r
                .as_f64()
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| {
                    VisionError::config("rescale_factor", "must be a positive number")
                })?;
            p.rescale_factor = f as f32;
        }
        let triple = |k: &str| -> Result<Option<[f32; 3]>> {
            let Some(x) = v.get(k) else { return Ok(None) };
            let err = || VisionError::config(k, "must be a number or a list of 3 numbers");
            let vals: Vec<f64> = match x {
                serde_json::Value::Number(n) => vec![n.as_f64().ok_or_else(err)?; 3],
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|e| e.as_f64().ok_or_else(err))
                    .collect::<Result<_>>()?,
                _ => return Err(err()),
            };
            if vals.len() != 3 {
                return Err(err());
            }
            Ok(Some([vals[0] as f32, vals[1] as f32, vals[2] as f32]))
        };
        if !flag("do_normalize")? {
            p.image_mean = [0.0; 3];
            p.image_std = [1.0; 3];
        } else {
            if let Some(m) = triple("image_mean")? {
                p.image_mean = m;
            }
            if let Some(s) = triple("image_std")? {
                if s.iter().any(|x| x.is_nan() || *x <= 0.0) {
                    return Err(VisionError::config("image_std", "values must be > 0"));
                }
                p.image_std = s;
            }
        }
        Ok(p)
    }

    /// Rescales and normalises an RGB8 image into channels-first floats.
    ///
    /// # Shapes
    /// `img: (h, w, 3)` -> `(3, h, w)`.
    pub fn to_tensor(&self, img: &RgbImage) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        let n = (w * h) as usize;
        let mut out = vec![0f32; 3 * n];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * n + i] =
                    (p[c] as f32 * self.rescale_factor - self.image_mean[c]) / self.image_std[c];
            }
        }
        Ok(Tensor::from_vec(
            out,
            (3, h as usize, w as usize),
            &Device::Cpu,
        )?)
    }

    /// Resize to `w x h`, then `to_tensor`.
    pub fn run(&self, img: &RgbImage, w: u32, h: u32) -> Result<Tensor> {
        self.to_tensor(&resize(img, w, h, self.filter)?)
    }
}
