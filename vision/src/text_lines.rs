//! Finding lines of text in a screenshot, for the text-line reader ([`crate::reader`]).
//!
//! Screens draw text on flat grounds: a glyph is a small, dense cluster of strong luminance
//! steps, while the outlines of fields, buttons and windows are long, thin and sparse. So:
//! 1. edge pixels: luminance steps of at least `edge` (0-255) to the right or below, less
//!    straight runs of `max_run` px or more across or down (rules and the sides of boxes,
//!    which would otherwise join the glyphs that touch them);
//! 2. 8-connected components of edge pixels; a component is kept when it is no taller than
//!    `max_height` px, dense (edge pixels cover at least `min_fill` of its box: a rectangle's
//!    outline covers an eighth of it or less, a glyph a quarter or more) or smaller than
//!    10 x 10 px, and not a thin upright (at most a quarter as wide as tall, `bar_height` px
//!    or taller:
//!    the side of a box, which would join the text inside it to its neighbours; a glyph
//!    like I or l dropped here still lies in the margin the reader adds around its line);
//! 3. kept components merge into lines: vertical extents overlapping by at least half the
//!    smaller one, horizontal gap at most `gap` x the line height;
//! 4. a line is kept when at least `min_height` px tall and wider than half its height.
//!
//! No learning and no font knowledge: the same rule for any face, size and theme. What it
//! finds is a box per line, not a role; the reader reads each box.

use crate::reader::Region;
use image::RgbImage;

/// The finder's thresholds (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineFinder {
    pub edge: f32,
    pub max_run: u32,
    pub bar_height: u32,
    pub max_height: u32,
    pub min_height: u32,
    pub min_fill: f32,
    pub gap: f32,
}

impl Default for LineFinder {
    fn default() -> Self {
        Self {
            edge: 28.0,
            max_run: 30,
            bar_height: 8,
            max_height: 48,
            min_height: 5,
            min_fill: 0.2,
            gap: 0.9,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Boxy {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
}

impl Boxy {
    fn h(&self) -> u32 {
        self.y1 - self.y0 + 1
    }
    fn w(&self) -> u32 {
        self.x1 - self.x0 + 1
    }
}

impl LineFinder {
    /// Boxes of the lines of text in `img` in reading order (rows top to bottom, each left to
    /// right); each box is
    /// the union of its glyphs' edge pixels (tight; the reader adds its own margin).
    pub fn find(&self, img: &RgbImage) -> Vec<Region> {
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        if w < 2 || h < 2 {
            return vec![];
        }
        let lum: Vec<f32> = img
            .pixels()
            .map(|p| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32)
            .collect();
        let mut edge = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                let v = lum[y * w + x];
                let r = if x + 1 < w {
                    (lum[y * w + x + 1] - v).abs()
                } else {
                    0.0
                };
                let d = if y + 1 < h {
                    (lum[(y + 1) * w + x] - v).abs()
                } else {
                    0.0
                };
                edge[y * w + x] = r.max(d) >= self.edge;
            }
        }
        // rules and borders: straight runs of `max_run` edge pixels or more, across or down
        let max_run = self.max_run as usize;
        let mut clear = vec![false; w * h];
        for y in 0..h {
            mark_runs(&edge, &mut clear, y * w, 1, w, max_run);
        }
        for x in 0..w {
            mark_runs(&edge, &mut clear, x, w, h, max_run);
        }
        for (e, c) in edge.iter_mut().zip(&clear) {
            *e &= !c;
        }
        // 8-connected components by an explicit stack
        let mut seen = vec![false; w * h];
        let (mut comps, mut solids): (Vec<Boxy>, Vec<Boxy>) = (vec![], vec![]);
        let mut stack = vec![];
        for start in 0..w * h {
            if !edge[start] || seen[start] {
                continue;
            }
            seen[start] = true;
            stack.push(start);
            let (sx, sy) = ((start % w) as u32, (start / w) as u32);
            let mut b = Boxy {
                x0: sx,
                y0: sy,
                x1: sx,
                y1: sy,
            };
            let mut pixels: Vec<usize> = vec![];
            while let Some(i) = stack.pop() {
                pixels.push(i);
                let (x, y) = ((i % w) as i64, (i / w) as i64);
                b.x0 = b.x0.min(x as u32);
                b.x1 = b.x1.max(x as u32);
                b.y0 = b.y0.min(y as u32);
                b.y1 = b.y1.max(y as u32);
                for dy in -1..=1i64 {
                    for dx in -1..=1i64 {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                            continue;
                        }
                        let j = ny as usize * w + nx as usize;
                        if edge[j] && !seen[j] {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
            let fill = pixels.len() as f32 / (b.w() * b.h()) as f32;
            let small = b.w() < 10 && b.h() < 10;
            // a thin upright: the side of a box (or an I, l or |, which the reader still
            // sees in the margin of the line around it)
            let bar = 4 * b.w() <= b.h() && b.h() >= self.bar_height;
            if b.h() <= self.max_height && !bar && (small || fill >= self.min_fill) {
                if solid_square(img, b) {
                    solids.push(b);
                } else {
                    comps.push(b);
                }
            }
        }
        // what is drawn inside a solid square (an icon's inner mark) is part of it
        comps.retain(|c| {
            !solids
                .iter()
                .any(|s| c.x0 >= s.x0 && c.x1 <= s.x1 && c.y0 >= s.y0 && c.y1 <= s.y1)
        });
        // merge into lines: repeatedly join a component to the first line it fits
        comps.sort_by_key(|b| (b.x0, b.y0));
        let mut lines: Vec<Boxy> = vec![];
        for c in comps {
            let fit = lines.iter_mut().rev().find(|l| {
                let ov = (l.y1.min(c.y1) as i64 - l.y0.max(c.y0) as i64 + 1).max(0) as f32;
                let lh = l.h().max(c.h()) as f32;
                let gap = c.x0 as f32 - l.x1 as f32;
                ov >= 0.5 * l.h().min(c.h()) as f32 && gap <= self.gap * lh && gap >= -lh
            });
            match fit {
                Some(l) => {
                    l.x0 = l.x0.min(c.x0);
                    l.x1 = l.x1.max(c.x1);
                    l.y0 = l.y0.min(c.y0);
                    l.y1 = l.y1.max(c.y1);
                }
                None => lines.push(c),
            }
        }
        let out: Vec<Region> = lines
            .into_iter()
            .filter(|l| l.h() >= self.min_height && l.h() <= self.max_height && 2 * l.w() > l.h())
            .map(|l| Region {
                x: l.x0,
                y: l.y0,
                w: l.w(),
                h: l.h(),
            })
            .collect();
        reading_order(out)
    }
}

/// Whether the component box `b` is a solid square: an icon, an avatar or a ticked box, not
/// a glyph. Square within 0.7-1.4, at least 8 px high, and at least 75% of its pixels off the
/// ground (the per-channel median of the ring of pixels just outside the box). A glyph is
/// drawn with strokes and leaves most of its box to the ground (a bold O or M about half);
/// a filled rounded square leaves only its corners, a filled circle a fifth. Left in a line,
/// an app icon before a title is read as a letter. (On 200 training-split screens, titles
/// read exactly end to end went from 126 to 169; 70% or 80% did less well.)
fn solid_square(img: &RgbImage, b: Boxy) -> bool {
    let (w, h) = img.dimensions();
    let (bw, bh) = (b.w(), b.h());
    if bh < 8 || 10 * bw < 7 * bh || 10 * bw > 14 * bh {
        return false;
    }
    if b.x0 == 0 || b.y0 == 0 || b.x1 + 1 >= w || b.y1 + 1 >= h {
        return false;
    }
    let mut ring: Vec<[f32; 3]> = vec![];
    for x in b.x0 - 1..=b.x1 + 1 {
        ring.push(lum_at(img, x, b.y0 - 1));
        ring.push(lum_at(img, x, b.y1 + 1));
    }
    for y in b.y0..=b.y1 {
        ring.push(lum_at(img, b.x0 - 1, y));
        ring.push(lum_at(img, b.x1 + 1, y));
    }
    let mut ground = [0f32; 3];
    for (c, g) in ground.iter_mut().enumerate() {
        let mut v: Vec<f32> = ring.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        *g = v[v.len() / 2];
    }
    let mut off = 0u32;
    for y in b.y0..=b.y1 {
        for x in b.x0..=b.x1 {
            off += u32::from(dist(lum_at(img, x, y), ground) >= 28.0);
        }
    }
    4 * off >= 3 * bw * bh
}

/// Marks in `clear` every run of `min_run` or more set pixels of `edge` along the line of
/// `len` pixels starting at `start`, `stride` apart (a row: stride 1; a column: the width).
fn mark_runs(
    edge: &[bool],
    clear: &mut [bool],
    start: usize,
    stride: usize,
    len: usize,
    min_run: usize,
) {
    let mut k = 0;
    while k < len {
        let k0 = k;
        while k < len && edge[start + k * stride] {
            k += 1;
        }
        if k - k0 >= min_run {
            (k0..k).for_each(|j| clear[start + j * stride] = true);
        }
        k += 1;
    }
}

/// Lines in reading order: rows top to bottom (a line whose middle lies within the current
/// row's extent joins it), each row left to right.
fn reading_order(mut lines: Vec<Region>) -> Vec<Region> {
    lines.sort_by_key(|r| (r.y + r.h / 2, r.x));
    let mut rows: Vec<(u32, u32, Vec<Region>)> = vec![];
    for r in lines {
        let mid = r.y + r.h / 2;
        match rows.last_mut() {
            Some((y0, y1, row)) if mid >= *y0 && mid <= *y1 => {
                *y1 = (*y1).max(r.y + r.h);
                row.push(r);
            }
            _ => rows.push((r.y, r.y + r.h, vec![r])),
        }
    }
    rows.into_iter()
        .flat_map(|(_, _, mut row)| {
            row.sort_by_key(|r| r.x);
            row
        })
        .collect()
}

/// A region grown by `mx` px left and right and `my` px above and below, clipped to a
/// `w x h` image.
pub fn grow(r: Region, mx: u32, my: u32, w: u32, h: u32) -> Region {
    let x0 = r.x.saturating_sub(mx);
    let y0 = r.y.saturating_sub(my);
    let x1 = (r.x + r.w + mx).min(w);
    let y1 = (r.y + r.h + my).min(h);
    Region {
        x: x0,
        y: y0,
        w: x1.saturating_sub(x0),
        h: y1.saturating_sub(y0),
    }
}

/// The box the reader reads for a found line (a tight ink box): a third of its height more
/// left and right, a fifth above and below.
pub fn reading_box(r: Region, w: u32, h: u32) -> Region {
    grow(r, r.h.div_ceil(3), r.h.div_ceil(5), w, h)
}

fn lum_at(img: &RgbImage, x: u32, y: u32) -> [f32; 3] {
    let p = img.get_pixel(x, y).0;
    [p[0] as f32, p[1] as f32, p[2] as f32]
}

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i]).abs()).fold(0.0, f32::max)
}

/// Whether a found line sits in a snug box of its own ground, as a button's label does:
/// going out from the line's margin left, right, up and down along its middle, the ground
/// (the colour just outside the margin) ends within 2.5 line heights sideways and 1.2 above
/// and below, about as far on each side (the label is centred), and where it ends the colour
/// is about the same on all four sides (the box's edge or what is around it). A field's text
/// is left-aligned in a wide box, a menu's word has other words beside it, so neither is.
pub fn snug_box(img: &RgbImage, r: Region) -> bool {
    snug_box_contrast(img, r).is_some()
}

/// [`snug_box`] with how much the box stands out: `None` when the line is not in a snug box,
/// else the largest channel difference between the box's ground and what lies 3 px beyond
/// its edge on the left (past a 1-px border and its anti-aliasing). A filled accent button on
/// a window is high; a plain button, drawn in about the window's colour, is low.
pub fn snug_box_contrast(img: &RgbImage, r: Region) -> Option<f32> {
    let (w, h) = img.dimensions();
    let lh = r.h.max(1) as i64;
    let m = (lh / 4).max(2);
    let (cx, cy) = ((r.x + r.w / 2) as i64, (r.y + r.h / 2) as i64);
    let (x0, x1) = (r.x as i64 - m, (r.x + r.w) as i64 - 1 + m);
    let (y0, y1) = (r.y as i64 - m, (r.y + r.h) as i64 - 1 + m);
    if x0 < 0 || y0 < 0 || x1 >= w as i64 || y1 >= h as i64 {
        return None;
    }
    // the ground: the per-channel median of the four margin points (one may fall on an I or
    // l that the finder left out of the line)
    let samples =
        [(x0, cy), (x1, cy), (cx, y0), (cx, y1)].map(|(x, y)| lum_at(img, x as u32, y as u32));
    let mut ground = [0f32; 3];
    for (c, g) in ground.iter_mut().enumerate() {
        let mut v = samples.map(|p| p[c]);
        v.sort_by(f32::total_cmp);
        *g = 0.5 * (v[1] + v[2]);
    }
    let inside = |x: i64, y: i64| x >= 0 && y >= 0 && x < w as i64 && y < h as i64;
    let off = |x: i64, y: i64| -> Option<[f32; 3]> {
        if !inside(x, y) {
            return None;
        }
        let c = lum_at(img, x as u32, y as u32);
        Some(c).filter(|c| dist(*c, ground) > 24.0)
    };
    // steps from (x, y) along (dx, dy) until the colour leaves the ground: (steps, colour).
    // Within the first `skip` steps, a stroke of up to 3 px with ground after it is a glyph
    // the finder left out (the I of "Install"), stepped over.
    let walk =
        |x: i64, y: i64, dx: i64, dy: i64, limit: i64, skip: i64| -> Option<(i64, [f32; 3])> {
            let mut k = 0;
            while k <= limit {
                let (px, py) = (x + dx * k, y + dy * k);
                if !inside(px, py) {
                    return None;
                }
                if let Some(c) = off(px, py) {
                    let back = (1..=3).find(|j| {
                        let (qx, qy) = (px + dx * j, py + dy * j);
                        inside(qx, qy) && off(qx, qy).is_none()
                    });
                    match back {
                        Some(j) if k < skip => k += j,
                        _ => return Some((k, c)),
                    }
                } else {
                    k += 1;
                }
            }
            None
        };
    let side = 5 * lh / 2;
    let up = 6 * lh / 5;
    let (Some(l), Some(rt), Some(u), Some(d)) = (
        walk(x0, cy, -1, 0, side, lh / 2),
        walk(x1, cy, 1, 0, side, lh / 2),
        walk(cx, y0, 0, -1, up, 0),
        walk(cx, y1, 0, 1, up, 0),
    ) else {
        return None;
    };
    let centred = (l.0 - rt.0).abs() <= lh / 2 + 3 && (u.0 - d.0).abs() <= lh / 3 + 2;
    let same_edge = [rt.1, u.1, d.1].iter().all(|c| dist(*c, l.1) <= 40.0);
    if !(centred && same_edge) {
        return None;
    }
    let beyond = x0 - l.0 - 3;
    if beyond < 0 {
        return None;
    }
    Some(dist(ground, lum_at(img, beyond as u32, cy as u32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two "words" of dense blobs on one row, a rectangle outline and a far blob on another:
    /// the words merge into one line, the outline is not text.
    #[test]
    fn blobs_merge_into_lines_and_outlines_are_dropped() {
        let mut img = RgbImage::from_pixel(200, 100, image::Rgb([240, 240, 240]));
        let ink = image::Rgb([20, 20, 20]);
        let mut blob = |x0: u32, y0: u32| {
            for y in y0..y0 + 10 {
                for x in x0..x0 + 6 {
                    if (x + y) % 3 != 0 {
                        img.put_pixel(x, y, ink);
                    }
                }
            }
        };
        for x in [10, 18, 26, 40, 48] {
            blob(x, 10);
        }
        blob(150, 10);
        // an outline 120 x 20
        let mut img2 = img.clone();
        for x in 10..130 {
            img2.put_pixel(x, 60, ink);
            img2.put_pixel(x, 80, ink);
        }
        for y in 60..=80 {
            img2.put_pixel(10, y, ink);
            img2.put_pixel(129, y, ink);
        }
        let lines = LineFinder::default().find(&img2);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].x <= 10 && lines[0].x + lines[0].w >= 53,
            "{lines:?}"
        );
        assert!(lines[1].x >= 149, "{lines:?}");
        assert!(lines.iter().all(|l| l.y < 30));
    }

    /// A filled icon (a rounded square with a light inner square) before a word is not part
    /// of its line; a bold ring (an O, 64% ink) starting the next word is.
    #[test]
    fn solid_icons_are_dropped_and_bold_rings_kept() {
        let mut img = RgbImage::from_pixel(200, 80, image::Rgb([30, 30, 40]));
        let ink = image::Rgb([230, 230, 230]);
        let accent = image::Rgb([120, 90, 210]);
        // the icon: 13 x 13 at (10, 10), corners cut, an inner square at its middle
        for y in 10..23u32 {
            for x in 10..23u32 {
                let corner = (x == 10 || x == 22) && (y == 10 || y == 22);
                if !corner {
                    img.put_pixel(x, y, accent);
                }
            }
        }
        for y in 13..20 {
            for x in 13..20 {
                img.put_pixel(x, y, ink);
            }
        }
        // a word of strokes 8 px after it, and below, a word led by a ring
        let mut glyph = |x0: u32, y0: u32| {
            for y in y0..y0 + 10 {
                for x in x0..x0 + 6 {
                    if (x + y) % 3 != 0 {
                        img.put_pixel(x, y, ink);
                    }
                }
            }
        };
        for x in [31, 39, 47] {
            glyph(x, 12);
        }
        for x in [24, 32] {
            glyph(x, 50);
        }
        for y in 50..60u32 {
            for x in 10..20u32 {
                let inner = (12..18).contains(&x) && (52..58).contains(&y);
                if !inner {
                    img.put_pixel(x, y, ink);
                }
            }
        }
        let lines = LineFinder::default().find(&img);
        assert_eq!(lines.len(), 2, "{lines:?}");
        // (edge pixels sit one before a step to the right: the word starts at 30)
        assert!(
            lines[0].x >= 28 && lines[0].x + lines[0].w >= 53,
            "{lines:?}"
        );
        assert!(
            lines[1].x <= 10 && lines[1].x + lines[1].w >= 37,
            "{lines:?}"
        );
    }

    /// A label centred in a filled box is boxed; the same label on open ground, or at the
    /// left of a wide box, is not.
    #[test]
    fn snug_boxes_are_told_from_fields_and_open_text() {
        let ground = image::Rgb([40, 40, 50]);
        let fill = image::Rgb([120, 90, 210]);
        let mut img = RgbImage::from_pixel(300, 120, ground);
        // a button 60 x 24 at (20, 20), label 30 x 10 centred in it
        for y in 20..44 {
            for x in 20..80 {
                img.put_pixel(x, y, fill);
            }
        }
        // a field 200 x 24 at (20, 70), label 30 x 10 at its left
        for y in 70..94 {
            for x in 20..220 {
                img.put_pixel(x, y, fill);
            }
        }
        let label = Region {
            x: 35,
            y: 27,
            w: 30,
            h: 10,
        };
        assert!(snug_box(&img, label));
        // the filled button stands out by its fill against the window (160 in blue)
        assert_eq!(snug_box_contrast(&img, label), Some(160.0));
        // an I left out of the line, in its margin, is stepped over: still a snug box
        let mut with_i = img.clone();
        for y in 25..38 {
            with_i.put_pixel(33, y, image::Rgb([240, 240, 240]));
            with_i.put_pixel(32, y, image::Rgb([240, 240, 240]));
        }
        assert_eq!(snug_box_contrast(&with_i, label), Some(160.0));
        // a plain button 60 x 24 at (120, 20): about the window's colour, a lighter border
        for y in 20..44u32 {
            for x in 120..180u32 {
                let edge = x == 120 || x == 179 || y == 20 || y == 43;
                let c = if edge { [90, 90, 100] } else { [52, 52, 62] };
                img.put_pixel(x, y, image::Rgb(c));
            }
        }
        let plain = snug_box_contrast(
            &img,
            Region {
                x: 135,
                y: 27,
                w: 30,
                h: 10,
            },
        );
        assert_eq!(plain, Some(12.0));
        assert!(!snug_box(
            &img,
            Region {
                x: 28,
                y: 77,
                w: 30,
                h: 10
            }
        ));
        assert!(!snug_box(
            &img,
            Region {
                x: 240,
                y: 27,
                w: 30,
                h: 10
            }
        ));
    }

    #[test]
    fn tiny_and_flat_images_have_no_lines() {
        assert!(LineFinder::default()
            .find(&RgbImage::from_pixel(1, 1, image::Rgb([0, 0, 0])))
            .is_empty());
        assert!(LineFinder::default()
            .find(&RgbImage::from_pixel(50, 40, image::Rgb([9, 9, 9])))
            .is_empty());
    }
}
