//! Image input: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF through the `image` crate, EXIF
//! orientation applied, every colour type converted to RGB8 (alpha composited on white),
//! with limits on file bytes and pixels checked before memory is spent.

use crate::error::{Result, VisionError};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use std::io::Cursor;
use std::path::Path;

/// Refuse inputs beyond these before decoding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest file accepted, in bytes (default 64 MiB).
    pub max_file_bytes: u64,
    /// Largest decoded image, in pixels (default 40 megapixels).
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 << 20,
            max_pixels: 40_000_000,
        }
    }
}

/// Reads and decodes an image file into RGB8.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<RgbImage> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(VisionError::BadImage {
            what,
            reason: "not a regular file".into(),
        });
    }
    if meta.len() > limits.max_file_bytes {
        return Err(VisionError::TooLarge {
            what,
            reason: format!(
                "{} bytes exceed the limit of {} bytes",
                meta.len(),
                limits.max_file_bytes
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image(&bytes, &what, limits)
}

/// The `(width, height)` an image file declares, read from its header only.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let what = path.display().to_string();
    let r = ImageReader::open(path)
        .map_err(|source| VisionError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| VisionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if r.format().is_none() {
        return Err(VisionError::BadImage {
            what,
            reason: "not an image (unrecognised format)".into(),
        });
    }
    r.into_dimensions().map_err(|e| VisionError::BadImage {
        what,
        reason: e.to_string(),
    })
}

/// Decodes image bytes (named `what` in errors) into RGB8.
pub fn decode_image(bytes: &[u8], what: &str, limits: &ImageLimits) -> Result<RgbImage> {
    let bad = |reason: String| VisionError::BadImage {
        what: what.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(bad("empty file".into()));
    }
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(VisionError::TooLarge {
            what: what.to_string(),
            reason: format!(
                "{} bytes exceed the limit of {} bytes",
                bytes.len(),
                limits.max_file_bytes
            ),
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    let format = reader
        .format()
        .ok_or_else(|| bad("not an image (unrecognised format)".into()))?;
    let mut lim = image::Limits::default();
    // 8 bytes per pixel covers RGBA16 / float intermediates; the pixel check below is exact.
    lim.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(lim);
    let mut dec = reader
        .into_decoder()
        .map_err(|e| bad(format!("{format:?}: {e}")))?;
    let (w, h) = dec.dimensions();
    if w == 0 || h == 0 {
        return Err(bad(format!("zero-size image ({w}x{h})")));
    }
    let px = w as u64 * h as u64;
    if px > limits.max_pixels {
        return Err(VisionError::TooLarge {
            what: what.to_string(),
            reason: format!(
                "{w}x{h} = {px} pixels exceed the limit of {} pixels",
                limits.max_pixels
            ),
        });
    }
    let orientation = dec
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(dec).map_err(|e| bad(format!("{format:?}: {e}")))?;
    img.apply_orientation(orientation);
    Ok(to_rgb_on_white(&img))
}

/// RGB8 from any colour type; transparent pixels are composited on white.
pub fn to_rgb_on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        for c in 0..3 {
            o[c] = ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}
