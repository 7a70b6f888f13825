//! Text rendering with the embedded fonts: DejaVu (Debian's `fonts-dejavu-core` 2.37, Bitstream
//! Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`), which every generated screen uses, and
//! Liberation (Debian's `fonts-liberation2` 2.1.5) and Noto (`fonts-noto-core` 20201225), both
//! SIL OFL 1.1 (`assets/fonts/LICENSE-Liberation.txt`, `LICENSE-Noto.txt`), which only the
//! reader's lines drawn alone use when a run asks for them.
//!
//! The fonts are parsed once per process ([`LazyLock`]); glyphs are rasterised with anti-aliased
//! coverage by `ab_glyph` and blended onto an [`RgbImage`]. Sizes are em sizes in pixels (the
//! CSS convention: a 16 px font has 16 px from one line's em box to the next without leading).

use std::sync::LazyLock;

use ab_glyph::{point, Font, FontRef, GlyphId, PxScale, ScaleFont};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::{raster, Rect, Rgb};

static SANS_TTF: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static SANS_BOLD_TTF: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-Bold.ttf");
static MONO_TTF: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");
static LIBERATION_SANS_TTF: &[u8] = include_bytes!("../assets/fonts/LiberationSans-Regular.ttf");
static LIBERATION_SANS_BOLD_TTF: &[u8] = include_bytes!("../assets/fonts/LiberationSans-Bold.ttf");
static LIBERATION_SERIF_TTF: &[u8] = include_bytes!("../assets/fonts/LiberationSerif-Regular.ttf");
static NOTO_SANS_TTF: &[u8] = include_bytes!("../assets/fonts/NotoSans-Regular.ttf");
static NOTO_SERIF_TTF: &[u8] = include_bytes!("../assets/fonts/NotoSerif-Regular.ttf");

/// One of the embedded typefaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Face {
    /// DejaVu Sans.
    Sans,
    /// DejaVu Sans Bold.
    SansBold,
    /// DejaVu Sans Mono.
    Mono,
    /// Liberation Sans (metric-compatible with Arial).
    LiberationSans,
    /// Liberation Sans Bold.
    LiberationSansBold,
    /// Liberation Serif (metric-compatible with Times New Roman).
    LiberationSerif,
    /// Noto Sans.
    NotoSans,
    /// Noto Serif.
    NotoSerif,
}

impl Face {
    /// The faces every generated screen draws with.
    pub const DEJAVU: [Face; 3] = [Face::Sans, Face::SansBold, Face::Mono];
    /// Every embedded face.
    pub const ALL: [Face; 8] = [
        Face::Sans,
        Face::SansBold,
        Face::Mono,
        Face::LiberationSans,
        Face::LiberationSansBold,
        Face::LiberationSerif,
        Face::NotoSans,
        Face::NotoSerif,
    ];
}

struct Fonts {
    sans: FontRef<'static>,
    bold: FontRef<'static>,
    mono: FontRef<'static>,
    liberation_sans: FontRef<'static>,
    liberation_sans_bold: FontRef<'static>,
    liberation_serif: FontRef<'static>,
    noto_sans: FontRef<'static>,
    noto_serif: FontRef<'static>,
}

static FONTS: LazyLock<Fonts> = LazyLock::new(|| {
    // The files are compiled in and checked by a test; a failure here is a build defect.
    let parse = |bytes: &'static [u8], name: &str| {
        FontRef::try_from_slice(bytes).unwrap_or_else(|e| panic!("embedded {name}: {e}"))
    };
    Fonts {
        sans: parse(SANS_TTF, "DejaVuSans.ttf"),
        bold: parse(SANS_BOLD_TTF, "DejaVuSans-Bold.ttf"),
        mono: parse(MONO_TTF, "DejaVuSansMono.ttf"),
        liberation_sans: parse(LIBERATION_SANS_TTF, "LiberationSans-Regular.ttf"),
        liberation_sans_bold: parse(LIBERATION_SANS_BOLD_TTF, "LiberationSans-Bold.ttf"),
        liberation_serif: parse(LIBERATION_SERIF_TTF, "LiberationSerif-Regular.ttf"),
        noto_sans: parse(NOTO_SANS_TTF, "NotoSans-Regular.ttf"),
        noto_serif: parse(NOTO_SERIF_TTF, "NotoSerif-Regular.ttf"),
    }
});

fn font(face: Face) -> &'static FontRef<'static> {
    let f = &*FONTS;
    match face {
        Face::Sans => &f.sans,
        Face::SansBold => &f.bold,
        Face::Mono => &f.mono,
        Face::LiberationSans => &f.liberation_sans,
        Face::LiberationSansBold => &f.liberation_sans_bold,
        Face::LiberationSerif => &f.liberation_serif,
        Face::NotoSans => &f.noto_sans,
        Face::NotoSerif => &f.noto_serif,
    }
}

/// `ab_glyph` scales by the font's ascent-to-descent height; convert an em size to that.
fn px_scale(face: Face, em_px: f32) -> PxScale {
    let f = font(face);
    let upem = f.units_per_em().unwrap_or(2048.0);
    PxScale::from(em_px * f.height_unscaled() / upem)
}

/// Vertical metrics of a face at an em size, in pixels.
#[derive(Clone, Copy, Debug)]
pub struct Metrics {
    /// Distance from the baseline up to the top of the line (positive).
    pub ascent: f32,
    /// Distance from the baseline down to the bottom of the line (positive).
    pub descent: f32,
    /// Height of capital letters above the baseline.
    pub cap_height: f32,
}

pub fn metrics(face: Face, em_px: f32) -> Metrics {
    let f = font(face);
    let s = f.as_scaled(px_scale(face, em_px));
    // Height of 'H' from its outline bounds.
    let h = s.scaled_glyph('H');
    let cap = f
        .outline_glyph(h)
        .map(|g| -g.px_bounds().min.y)
        .unwrap_or(0.72 * em_px);
    Metrics {
        ascent: s.ascent(),
        descent: -s.descent(),
        cap_height: cap,
    }
}

/// Advance width of `text` in pixels (with kerning).
pub fn text_width(face: Face, em_px: f32, text: &str) -> f32 {
    let f = font(face);
    let s = f.as_scaled(px_scale(face, em_px));
    let mut w = 0.0;
    let mut prev: Option<GlyphId> = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            w += s.kern(p, id);
        }
        w += s.h_advance(id);
        prev = Some(id);
    }
    w
}

/// Face, em size and colour of a run of text.
#[derive(Clone, Copy, Debug)]
pub struct TextStyle {
    pub face: Face,
    pub px: f32,
    pub color: Rgb,
}

impl TextStyle {
    pub fn new(face: Face, px: f32, color: Rgb) -> TextStyle {
        TextStyle { face, px, color }
    }
}

/// Draws `text` with its baseline at `baseline` (rounded to a whole pixel, which keeps
/// horizontal stems crisp) starting at `x`; returns the line box (x, top of the ascent, advance
/// width, ascent + descent), clipped to the image.
pub fn draw_text(img: &mut RgbImage, st: TextStyle, x: f32, baseline: f32, text: &str) -> Rect {
    let f = font(st.face);
    let scale = px_scale(st.face, st.px);
    let s = f.as_scaled(scale);
    let baseline = baseline.round();
    let mut caret = x;
    let mut prev: Option<GlyphId> = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            caret += s.kern(p, id);
        }
        let glyph = id.with_scale_and_position(scale, point(caret, baseline));
        caret += s.h_advance(id);
        prev = Some(id);
        if let Some(og) = f.outline_glyph(glyph) {
            let b = og.px_bounds();
            let (bx, by) = (b.min.x as i64, b.min.y as i64);
            og.draw(|gx, gy, cov| {
                raster::blend(img, bx + gx as i64, by + gy as i64, st.color, cov);
            });
        }
    }
    let top = baseline - s.ascent();
    raster::clip_rect(img, x, top, caret - x, s.ascent() - s.descent())
}

/// Draws `text` starting at `x`, its capital letters centred vertically inside `[y, y + h)`.
pub fn draw_text_in(img: &mut RgbImage, st: TextStyle, x: f32, y: f32, h: f32, text: &str) -> Rect {
    let baseline = baseline_centered(st.face, st.px, y, h);
    draw_text(img, st, x, baseline, text)
}

/// The baseline that centres capital letters vertically inside `[y, y + h)`.
pub fn baseline_centered(face: Face, em_px: f32, y: f32, h: f32) -> f32 {
    let m = metrics(face, em_px);
    y + (h + m.cap_height) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_fonts_parse_and_measure() {
        for face in Face::ALL {
            let m = metrics(face, 16.0);
            assert!(m.ascent > 12.0 && m.ascent < 18.0, "{face:?} {m:?}");
            assert!(m.cap_height > 9.0 && m.cap_height < 14.0, "{face:?} {m:?}");
            assert!(text_width(face, 16.0, "Hello") > 30.0);
        }
        // Mono: every glyph has the same advance.
        assert_eq!(
            text_width(Face::Mono, 14.0, "iiii"),
            text_width(Face::Mono, 14.0, "MMMM")
        );
    }
}
