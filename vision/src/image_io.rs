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
    // the content decides, as in `decode_image` (not the file name's extension)
    let mut head = [0u8; 64];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|source| VisionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if r.format().is_none() || image::guess_format(&head[..n]).is_err() {
        return Err(VisionError::BadImage {
            what,
            reason: "not an image (unrecognised format)".into(),
        });
    }
    r.into_dimensions().map_err(|e| decode_error(&what, e))
}

/// A decoder error: its memory limit (a header declaring a huge image) is reported as
/// the pixel limit it stands for.
fn decode_error(what: &str, e: image::ImageError) -> VisionError {
    match e {
        image::ImageError::Limits(l) => VisionError::TooLarge {
            what: what.to_string(),
            reason: format!(
                "the image's declared size exceeds the decoder's memory limit ({l}); the \
                 limit is {} pixels",
                ImageLimits::default().max_pixels
            ),
        },
        e => VisionError::BadImage {
            what: what.to_string(),
            reason: e.to_string(),
        },
    }
}

/// As [`image_size`], with the limits [`load_image`] applies (file bytes, pixels, zero
/// size) checked from the file's size and header: what `--dry-run` plans, a real run reads.
pub fn image_size_checked(path: &Path, limits: &ImageLimits) -> Result<(u32, u32)> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
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
    let (w, h) = image_size(path)?;
    check_pixels(w, h, &what, limits)?;
    Ok((w, h))
}

fn check_pixels(w: u32, h: u32, what: &str, limits: &ImageLimits) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(VisionError::BadImage {
            what: what.to_string(),
            reason: format!("zero-size image ({w}x{h})"),
        });
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
    Ok(())
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
    if format == image::ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        // the decoder pads a cut-off scan with grey and reports success: a caption of that
        // would describe an image the file does not hold
        return Err(bad(
            "truncated JPEG (no end-of-image marker after the image data)".into(),
        ));
    }
    let mut lim = image::Limits::default();
    // 8 bytes per pixel covers RGBA16 / float intermediates; the pixel check below is exact.
    lim.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(lim);
    let mut dec = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => decode_error(what, e),
        e => bad(format!("{format:?}: {e}")),
    })?;
    let (w, h) = dec.dimensions();
    check_pixels(w, h, what, limits)?;
    let orientation = dec
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(dec).map_err(|e| bad(format!("{format:?}: {e}")))?;
    img.apply_orientation(orientation);
    Ok(to_rgb_on_white(&img))
}

/// Whether a JPEG holds an end-of-image marker (`FF D9`) after its first scan. The marker
/// segments before the first start-of-scan (`FF DA`) are walked by their lengths, so an EXIF
/// thumbnail's own markers do not count; inside entropy-coded data a `FF` byte is always
/// followed by `00` or a restart marker, so `FF D9` there is the real end.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    let sos = loop {
        let Some(&[ff, m]) = bytes
            .get(i..i + 2)
            .map(|s| <&[u8; 2]>::try_from(s).unwrap())
        else {
            return false;
        };
        if ff != 0xFF {
            return false;
        }
        match m {
            0xFF => i += 1, // fill byte
            0xDA => break i,
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4) else {
                    return false;
                };
                i += 2 + u16::from_be_bytes([len[0], len[1]]) as usize;
            }
        }
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
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
