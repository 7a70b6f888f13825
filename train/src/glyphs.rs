//! Glyph sheets: dense lines of text on a plain ground, the first step of a reading curriculum.
//!
//! A screen crop around a string ([`crate::perceive`]'s `screen_text` views) holds one string
//! of 5-20 characters among patches that hold none; two sessions of reading runs on such crops
//! learned characters slowly (about one point of held-out character accuracy per 3,600
//! views), while a fixed batch was memorised in 100 steps. A glyph sheet is the opposite
//! kind of view: a 224-px image filled with lines of text, 40-160 characters, every character
//! with its own label, drawn in one of the embedded faces at an em size in a configured range
//! (`glyph_px`), dark on light or light on dark.
//!
//! Half the lines are words of the training vocabulary ([`crate::vocab::ui_words`]) and half
//! are random characters (letters, digits and punctuation in words of 1-8), so the head cannot
//! lean on a word list: the held-out split's words stay unseen, and sheets are made for the
//! training split only (a held-out view of this source is a screen crop instead, so the
//! probe's figures stay those of screens).

use crate::font::{self, Face, TextStyle};
use crate::screens::TextItem;
use crate::{Kind, Rect, Rgb, Sample, Split, Truth};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Side of a sheet: one encoder view.
pub const SHEET: u32 = 224;

/// Em sizes of a sheet's text, px, when a run does not set `glyph_px`.
pub const DEFAULT_PX: (f32, f32) = (18.0, 48.0);

const PUNCT: &[u8] = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// One random "word": 1-8 characters, mostly letters.
pub(crate) fn random_word(rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(1..=8);
    (0..n)
        .map(|_| {
            let r: f32 = rng.random();
            if r < 0.45 {
                rng.random_range(b'a'..=b'z') as char
            } else if r < 0.75 {
                rng.random_range(b'A'..=b'Z') as char
            } else if r < 0.88 {
                rng.random_range(b'0'..=b'9') as char
            } else {
                PUNCT[rng.random_range(0..PUNCT.len())] as char
            }
        })
        .collect()
}

fn contrast(a: Rgb, b: Rgb) -> i32 {
    let lum = |c: Rgb| (299 * c[0] as i32 + 587 * c[1] as i32 + 114 * c[2] as i32) / 1000;
    (lum(a) - lum(b)).abs()
}

/// Sheet `index` (training split only, see the module docs), glyphs of em size in `px`.
///
/// # Shapes
/// The image is `SHEET x SHEET` RGB; `Truth::Glyphs` holds every line, wholly inside it.
pub fn sheet(index: u64, seed: u64, px: (f32, f32)) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    let (bg, fg) = loop {
        let light = rng.random_bool(0.7);
        let (lo, hi) = if light { (170, 255) } else { (0, 90) };
        let bg: Rgb = [0; 3].map(|_| rng.random_range(lo..=hi));
        let fg: Rgb = [0; 3].map(|_| rng.random_range(0..=255u8));
        if contrast(bg, fg) >= 90 {
            break (bg, fg);
        }
    };
    let mut image = RgbImage::from_pixel(SHEET, SHEET, image::Rgb(bg));
    let face = [Face::Sans, Face::SansBold, Face::Mono][rng.random_range(0..3)];
    let em = rng.random_range(px.0..=px.1);
    let m = font::metrics(face, em);
    let line_h = (m.ascent + m.descent) * rng.random_range(1.0..1.3);
    let words = crate::vocab::ui_words();
    let mut lines = vec![];
    let mut top = rng.random_range(0.0..line_h * 0.5);
    while top + m.ascent + m.descent <= SHEET as f32 {
        let baseline = (top + m.ascent).round();
        let x = rng.random_range(0.0..em);
        let vocab_line = rng.random_bool(0.5);
        let mut text = String::new();
        // words that do not fit are skipped; a few tries fill the line's end
        let mut misses = 0;
        while misses < 6 {
            let w = if vocab_line {
                words[rng.random_range(0..words.len())].to_string()
            } else {
                random_word(&mut rng)
            };
            let next = if text.is_empty() {
                w
            } else {
                format!("{text} {w}")
            };
            if x + font::text_width(face, em, &next) > SHEET as f32 - 1.0 {
                misses += 1;
                continue;
            }
            text = next;
        }
        if !text.is_empty() {
            let rect: Rect =
                font::draw_text(&mut image, TextStyle::new(face, em, fg), x, baseline, &text);
            lines.push(TextItem {
                text,
                rect,
                color: fg,
                face,
                px: em,
                origin: [x, baseline],
            });
        }
        top += line_h;
    }
    Sample {
        image,
        caption: String::new(),
        qa: vec![],
        kind: Kind::Screen,
        split: Split::Train,
        index,
        truth: Truth::Glyphs(lines),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheets_are_dense_seeded_and_inside() {
        let a = sheet(7, 1, (18.0, 48.0));
        let b = sheet(7, 1, (18.0, 48.0));
        assert_eq!(a.image, b.image);
        let Truth::Glyphs(lines) = &a.truth else {
            panic!("a sheet carries its lines")
        };
        let chars: usize = lines.iter().map(|l| l.text.chars().count()).sum();
        assert!(chars >= 20, "{chars} characters");
        for l in lines {
            assert!(l.rect.right() <= SHEET && l.rect.bottom() <= SHEET, "{l:?}");
        }
        // a different index is a different sheet
        assert_ne!(sheet(8, 1, (18.0, 48.0)).image, a.image);
    }
}
