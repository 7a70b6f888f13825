//! Small anti-aliased drawing primitives on [`RgbImage`]: rectangles, rounded rectangles,
//! circles, polygons and thick lines. Edges are anti-aliased by 4x4 supersampling of the
//! pixels an edge crosses; everything is clipped to the image.

use image::{Rgb as Px, RgbImage};

use crate::{Rect, Rgb};

/// Blends `color` with coverage `a` (0..=1) onto pixel (x, y); ignores pixels outside.
pub fn blend(img: &mut RgbImage, x: i64, y: i64, color: Rgb, a: f32) {
    if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 || a <= 0.0 {
        return;
    }
    let p = img.get_pixel_mut(x as u32, y as u32);
    if a >= 1.0 {
        *p = Px(color);
        return;
    }
    for (d, s) in p.0.iter_mut().zip(color) {
        *d = (*d as f32 + (s as f32 - *d as f32) * a).round() as u8;
    }
}

/// Linear mix of two colours, `t` = 0 gives `a`.
pub fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    let mut o = [0u8; 3];
    for i in 0..3 {
        o[i] = (a[i] as f32 + (b[i] as f32 - a[i] as f32) * t)
            .round()
            .clamp(0.0, 255.0) as u8;
    }
    o
}

/// The part of the float rectangle (x, y, w, h) inside the image, rounded outwards.
pub fn clip_rect(img: &RgbImage, x: f32, y: f32, w: f32, h: f32) -> Rect {
    let x0 = x.floor().clamp(0.0, img.width() as f32) as u32;
    let y0 = y.floor().clamp(0.0, img.height() as f32) as u32;
    let x1 = (x + w).ceil().clamp(0.0, img.width() as f32) as u32;
    let y1 = (y + h).ceil().clamp(0.0, img.height() as f32) as u32;
    Rect::new(x0, y0, x1.saturating_sub(x0), y1.saturating_sub(y0))
}

/// Fills whole pixels of `r` (clipped).
pub fn fill_rect(img: &mut RgbImage, r: Rect, color: Rgb) {
    let x1 = r.right().min(img.width());
    let y1 = r.bottom().min(img.height());
    for y in r.y..y1 {
        for x in r.x..x1 {
            img.put_pixel(x, y, Px(color));
        }
    }
}

/// Blends `color` at opacity `a` over whole pixels of `r` (clipped).
pub fn shade_rect(img: &mut RgbImage, r: Rect, color: Rgb, a: f32) {
    for y in r.y..r.bottom().min(img.height()) {
        for x in r.x..r.right().min(img.width()) {
            blend(img, x as i64, y as i64, color, a);
        }
    }
}

/// A `t`-pixel outline just inside `r`.
pub fn stroke_rect(img: &mut RgbImage, r: Rect, t: u32, color: Rgb) {
    let t = t.min(r.w / 2).min(r.h / 2);
    fill_rect(img, Rect::new(r.x, r.y, r.w, t), color);
    fill_rect(img, Rect::new(r.x, r.bottom() - t, r.w, t), color);
    fill_rect(img, Rect::new(r.x, r.y, t, r.h), color);
    fill_rect(img, Rect::new(r.right() - t, r.y, t, r.h), color);
}

/// Fills the region `inside` within the float box [x0, x1) x [y0, y1), anti-aliased: pixels whose
/// four corners and centre agree are filled or skipped whole, the others are supersampled 4x4.
pub fn fill_coverage(
    img: &mut RgbImage,
    (x0, y0, x1, y1): (f32, f32, f32, f32),
    color: Rgb,
    inside: impl Fn(f32, f32) -> bool,
) {
    let px0 = x0.floor().max(0.0) as i64;
    let py0 = y0.floor().max(0.0) as i64;
    let px1 = (x1.ceil() as i64).min(img.width() as i64);
    let py1 = (y1.ceil() as i64).min(img.height() as i64);
    for py in py0..py1 {
        for px in px0..px1 {
            let (fx, fy) = (px as f32, py as f32);
            let probes = [
                inside(fx, fy),
                inside(fx + 1.0, fy),
                inside(fx, fy + 1.0),
                inside(fx + 1.0, fy + 1.0),
                inside(fx + 0.5, fy + 0.5),
            ];
            let n = probes.iter().filter(|&&b| b).count();
            let a = if n == 5 {
                1.0
            } else if n == 0 {
                0.0
            } else {
                let mut hits = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        if inside(fx + (sx as f32 + 0.5) / 4.0, fy + (sy as f32 + 0.5) / 4.0) {
                            hits += 1;
                        }
                    }
                }
                hits as f32 / 16.0
            };
            blend(img, px, py, color, a);
        }
    }
}

/// A rectangle with corners rounded to radius `rad`.
pub fn fill_rounded_rect(img: &mut RgbImage, r: Rect, rad: f32, color: Rgb) {
    let rad = rad.min(r.w as f32 / 2.0).min(r.h as f32 / 2.0).max(0.0);
    let ri = rad.ceil() as u32;
    if ri == 0 {
        fill_rect(img, r, color);
        return;
    }
    // Centre cross, then the four corners.
    fill_rect(img, Rect::new(r.x + ri, r.y, r.w - 2 * ri, r.h), color);
    fill_rect(img, Rect::new(r.x, r.y + ri, ri, r.h - 2 * ri), color);
    fill_rect(
        img,
        Rect::new(r.right() - ri, r.y + ri, ri, r.h - 2 * ri),
        color,
    );
    let (x0, y0, x1, y1) = (r.x as f32, r.y as f32, r.right() as f32, r.bottom() as f32);
    // Inside when the nearest point of the inner rectangle is within `rad`.
    let inside = |x: f32, y: f32| {
        let dx = x - x.clamp(x0 + rad, x1 - rad);
        let dy = y - y.clamp(y0 + rad, y1 - rad);
        dx * dx + dy * dy <= rad * rad
    };
    let k = ri as f32;
    for (bx, by) in [(x0, y0), (x1 - k, y0), (x0, y1 - k), (x1 - k, y1 - k)] {
        fill_coverage(img, (bx, by, bx + k, by + k), color, inside);
    }
}

/// A rounded rectangle with a `t`-pixel border of `border` around a `fill` interior.
pub fn bordered_rounded_rect(
    img: &mut RgbImage,
    r: Rect,
    rad: f32,
    t: u32,
    border: Rgb,
    fill: Rgb,
) {
    fill_rounded_rect(img, r, rad, border);
    if r.w > 2 * t && r.h > 2 * t {
        let inner = Rect::new(r.x + t, r.y + t, r.w - 2 * t, r.h - 2 * t);
        fill_rounded_rect(img, inner, (rad - t as f32).max(0.0), fill);
    }
}

/// A filled circle.
pub fn fill_circle(img: &mut RgbImage, cx: f32, cy: f32, r: f32, color: Rgb) {
    let r2 = r * r;
    fill_coverage(img, (cx - r, cy - r, cx + r, cy + r), color, |x, y| {
        (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r2
    });
}

/// Whether (x, y) is inside the polygon `pts` (even-odd rule, any simple polygon).
pub fn point_in_polygon(pts: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// A filled polygon (at least three points).
pub fn fill_polygon(img: &mut RgbImage, pts: &[(f32, f32)], color: Rgb) {
    if pts.len() < 3 {
        return;
    }
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    fill_coverage(img, (x0, y0, x1, y1), color, |x, y| {
        point_in_polygon(pts, x, y)
    });
}

/// A straight line of width `w` with square ends.
pub fn draw_line(img: &mut RgbImage, (ax, ay): (f32, f32), (bx, by): (f32, f32), w: f32, c: Rgb) {
    let (dx, dy) = (bx - ax, by - ay);
    let len = (dx * dx + dy * dy).sqrt();
    if len == 0.0 {
        return;
    }
    let (nx, ny) = (-dy / len * w / 2.0, dx / len * w / 2.0);
    fill_polygon(
        img,
        &[
            (ax + nx, ay + ny),
            (bx + nx, by + ny),
            (bx - nx, by - ny),
            (ax - nx, ay - ny),
        ],
        c,
    );
}

/// Fills the whole image with a vertical gradient from `top` to `bottom`.
pub fn vertical_gradient(img: &mut RgbImage, top: Rgb, bottom: Rgb) {
    let h = img.height().max(2);
    for y in 0..img.height() {
        let c = mix(top, bottom, y as f32 / (h - 1) as f32);
        for x in 0..img.width() {
            img.put_pixel(x, y, Px(c));
        }
    }
}
