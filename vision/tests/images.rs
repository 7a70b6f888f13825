//! Image input: every format, every colour type to RGB8, EXIF orientation, limits checked
//! before memory is spent, and bad input answered with an error naming the file and reason.

use afm_vision::{decode_image, load_image, ImageLimits, VisionError};
use image::{DynamicImage, ImageBuffer, ImageFormat, LumaA, Rgb, RgbImage, Rgba};
use std::io::Cursor;

fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(2)) as u8,
            (y * 255 / h.max(2)) as u8,
            if (x / 4 + y / 4) % 2 == 0 { 255 } else { 0 },
        ])
    })
}

fn encode(img: &DynamicImage, f: ImageFormat) -> Vec<u8> {
    let mut v = Cursor::new(Vec::new());
    img.write_to(&mut v, f).unwrap();
    v.into_inner()
}

#[test]
fn every_format_decodes_to_the_same_pixels() {
    let img = pattern(37, 23);
    let lim = ImageLimits::default();
    for f in [
        ImageFormat::Png,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
        ImageFormat::WebP,
        ImageFormat::Gif,
        ImageFormat::Jpeg,
    ] {
        let bytes = encode(&DynamicImage::ImageRgb8(img.clone()), f);
        let got = decode_image(&bytes, &format!("x.{f:?}"), &lim).unwrap();
        assert_eq!(got.dimensions(), (37, 23), "{f:?}");
        // lossless formats are exact; GIF quantises to a 256-colour palette, JPEG is lossy:
        // for those the mean channel error must stay small
        let errs: Vec<i32> = got
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let mean = errs.iter().sum::<i32>() as f64 / errs.len() as f64;
        match f {
            ImageFormat::Jpeg | ImageFormat::Gif => {
                assert!(mean < 12.0, "{f:?}: mean channel error {mean}")
            }
            _ => assert_eq!(errs.iter().max(), Some(&0), "{f:?}"),
        }
    }
}

#[test]
fn colour_types_become_rgb8_with_alpha_on_white() {
    let lim = ImageLimits::default();
    // RGBA: transparent -> white, half-transparent black -> grey, opaque red -> red
    let rgba = ImageBuffer::from_fn(3, 1, |x, _| match x {
        0 => Rgba([0u8, 0, 0, 0]),
        1 => Rgba([0, 0, 0, 128]),
        _ => Rgba([255, 0, 0, 255]),
    });
    let got = decode_image(
        &encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png),
        "rgba.png",
        &lim,
    )
    .unwrap();
    assert_eq!(got.get_pixel(0, 0), &Rgb([255, 255, 255]));
    assert_eq!(got.get_pixel(1, 0), &Rgb([127, 127, 127]));
    assert_eq!(got.get_pixel(2, 0), &Rgb([255, 0, 0]));
    // grey + alpha
    let la = ImageBuffer::from_pixel(2, 2, LumaA([10u8, 255]));
    let got = decode_image(
        &encode(&DynamicImage::ImageLumaA8(la), ImageFormat::Png),
        "la.png",
        &lim,
    )
    .unwrap();
    assert_eq!(got.get_pixel(1, 1), &Rgb([10, 10, 10]));
    // 16-bit RGB
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(2, 2, Rgb([65535u16, 0, 32896]));
    let got = decode_image(
        &encode(&DynamicImage::ImageRgb16(deep), ImageFormat::Png),
        "deep.png",
        &lim,
    )
    .unwrap();
    assert_eq!(got.get_pixel(0, 0), &Rgb([255, 0, 128]));
}

/// A JPEG with an EXIF APP1 segment carrying `orientation`.
fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
    let jpg = encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::Jpeg);
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpg[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpg[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    // 40x20, left half black, right half white
    let img = RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let lim = ImageLimits::default();
    let plain = decode_image(&jpeg_with_orientation(&img, 1), "o1.jpg", &lim).unwrap();
    assert_eq!(plain.dimensions(), (40, 20));
    // 6 = rotate 90 degrees clockwise: the left (black) half ends up on top
    let rot = decode_image(&jpeg_with_orientation(&img, 6), "o6.jpg", &lim).unwrap();
    assert_eq!(rot.dimensions(), (20, 40));
    assert!(rot.get_pixel(10, 5)[0] < 30 && rot.get_pixel(10, 35)[0] > 225);
}

/// A BMP header claiming `w x h` pixels, with no pixel data behind it.
fn bmp_header(w: i32, h: i32) -> Vec<u8> {
    let mut v = b"BM".to_vec();
    v.extend_from_slice(&(54u32 + 16).to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&54u32.to_le_bytes());
    v.extend_from_slice(&40u32.to_le_bytes());
    v.extend_from_slice(&w.to_le_bytes());
    v.extend_from_slice(&h.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&24u16.to_le_bytes());
    v.extend_from_slice(&[0; 24]);
    v.extend_from_slice(&[0; 16]);
    v
}

#[test]
fn huge_and_bomb_images_are_refused_before_decoding() {
    let lim = ImageLimits::default();
    let e = decode_image(&bmp_header(50000, 50000), "bomb.bmp", &lim).unwrap_err();
    assert!(
        matches!(
            e,
            VisionError::TooLarge { .. } | VisionError::BadImage { .. }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("bomb.bmp") && (msg.contains("limit") || msg.contains("large")),
        "{msg}"
    );
    // a real image over a small pixel limit
    let small = ImageLimits {
        max_pixels: 100,
        ..lim
    };
    let e = decode_image(
        &encode(&DynamicImage::ImageRgb8(pattern(20, 20)), ImageFormat::Png),
        "p.png",
        &small,
    )
    .unwrap_err();
    assert!(matches!(e, VisionError::TooLarge { .. }), "{e}");
    assert!(
        e.to_string().contains("400 pixels exceed the limit of 100"),
        "{e}"
    );
    // file-size limit checked before reading
    let dir = std::env::temp_dir().join(format!("afm-img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("big.png");
    std::fs::write(
        &p,
        encode(&DynamicImage::ImageRgb8(pattern(64, 64)), ImageFormat::Png),
    )
    .unwrap();
    let e = load_image(
        &p,
        &ImageLimits {
            max_file_bytes: 10,
            ..lim
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("big.png") && e.to_string().contains("bytes exceed"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupt_truncated_empty_and_non_images_are_named_errors() {
    let lim = ImageLimits::default();
    let png = encode(&DynamicImage::ImageRgb8(pattern(64, 64)), ImageFormat::Png);
    let e = decode_image(&png[..png.len() / 2], "half.png", &lim)
        .unwrap_err()
        .to_string();
    assert!(e.contains("half.png"), "{e}");
    let e = decode_image(b"", "empty.png", &lim)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty.png") && e.contains("empty"), "{e}");
    let e = decode_image(b"just some text, not pixels", "notes.txt", &lim)
        .unwrap_err()
        .to_string();
    assert!(e.contains("notes.txt") && e.contains("not an image"), "{e}");
    let e = decode_image(&bmp_header(0, 10), "zero.bmp", &lim)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zero.bmp"), "{e}");
    let jpg = encode(&DynamicImage::ImageRgb8(pattern(64, 64)), ImageFormat::Jpeg);
    let mut bad = jpg.clone();
    for b in bad[200..400].iter_mut() {
        *b = 0xFF;
    }
    // a damaged JPEG either decodes to something or errors; it never panics
    let _ = decode_image(&bad, "damaged.jpg", &lim);
    let e = load_image(std::path::Path::new("/nonexistent/cat.png"), &lim)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/cat.png"), "{e}");
}
