//! Flat-coloured objects on a plain ground, found outside the ViT: the text reader's
//! counterpart for pictures of shapes.
//!
//! The ground is the colour that covers most of the image's border (at least half of it, or
//! the image is not a plain-ground picture and nothing is found). Every pixel that differs
//! from it by more than [`GROUND_STEP`] in some channel is foreground; 8-connected foreground
//! components of [`MIN_AREA`] pixels or more are objects. An object's colour is the median of
//! its core pixels (those whose four neighbours are in it too, so the anti-aliased rim does
//! not count), named by the nearest reference colour in CIELAB ([`colour_name`]: CSS named
//! colours, each under its basic colour term). Its shape is the nearest class centroid of
//! [`shape_features`], learned from labelled training pictures ([`ShapeClasses`], saved as
//! `shapes.json` beside the text reader). No learning about colours, no knowledge of any
//! generator's palette.

use crate::error::{Result, VisionError};
use crate::reader::Region;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A pixel is foreground when a channel differs from the ground by more than this.
pub const GROUND_STEP: i32 = 40;
/// Components smaller than this (px) are specks, not objects.
pub const MIN_AREA: usize = 24;
/// More objects than this: not a picture of a few shapes (a screenshot, a photo), so none
/// are reported.
pub const MAX_OBJECTS: usize = 24;
/// Side of the occupancy grid of [`shape_features`].
pub const GRID: usize = 12;
/// Weight of the box's distance from square (`|ln(w / h)|`) and of the fill among
/// [`shape_features`].
const ASPECT_WEIGHT: f32 = 3.0;

/// One object found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenObject {
    /// Basic colour term ([`colour_name`]).
    pub colour: &'static str,
    /// Median colour of its core pixels.
    pub rgb: [u8; 3],
    /// Shape class ([`ShapeClasses`]).
    pub shape: String,
    /// Its bounding box, px.
    pub region: Region,
    /// Its pixels.
    pub area: usize,
}

/// A connected foreground component.
#[derive(Debug, Clone)]
pub struct Component {
    pub region: Region,
    /// Its pixels, `(x, y)`.
    pub pixels: Vec<(u32, u32)>,
    /// Median colour of its core pixels (of all its pixels when it has no core).
    pub rgb: [u8; 3],
}

/// The ground colour: the most common colour of the border pixels, when it covers at least
/// half of them.
pub fn ground(img: &RgbImage) -> Option<[u8; 3]> {
    let (w, h) = img.dimensions();
    if w < 3 || h < 3 {
        return None;
    }
    let mut counts: std::collections::HashMap<[u8; 3], usize> = Default::default();
    let mut n = 0;
    let mut add = |x: u32, y: u32| {
        *counts.entry(img.get_pixel(x, y).0).or_default() += 1;
        n += 1;
    };
    for x in 0..w {
        add(x, 0);
        add(x, h - 1);
    }
    for y in 1..h - 1 {
        add(0, y);
        add(w - 1, y);
    }
    let (c, k) = counts.into_iter().max_by_key(|(c, k)| (*k, *c))?;
    (2 * k >= n).then_some(c)
}

/// The 8-connected foreground components of `img` on `ground`, in reading order of their
/// first pixel, [`MIN_AREA`] px or larger. `None` when there are more than [`MAX_OBJECTS`].
pub fn components(img: &RgbImage, ground: [u8; 3]) -> Option<Vec<Component>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let fg: Vec<bool> = img
        .pixels()
        .map(|p| (0..3).any(|c| (p.0[c] as i32 - ground[c] as i32).abs() > GROUND_STEP))
        .collect();
    let mut label = vec![u32::MAX; w * h];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !fg[start] || label[start] != u32::MAX {
            continue;
        }
        let id = out.len() as u32 + 1;
        label[start] = id;
        stack.push(start);
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            pixels.push((x as u32, y as u32));
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if fg[j] && label[j] == u32::MAX {
                        label[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
        if pixels.len() < MIN_AREA {
            // a speck: keep its label (so it is not revisited) but no component
            out.push(None);
            continue;
        }
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for &(x, y) in &pixels {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        let inside = |x: i64, y: i64| {
            x >= 0
                && y >= 0
                && x < w as i64
                && y < h as i64
                && label[y as usize * w + x as usize] == id
        };
        let core: Vec<[u8; 3]> = pixels
            .iter()
            .filter(|&&(x, y)| {
                let (x, y) = (x as i64, y as i64);
                inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1)
            })
            .map(|&(x, y)| img.get_pixel(x, y).0)
            .collect();
        let core = if core.is_empty() {
            pixels.iter().map(|&(x, y)| img.get_pixel(x, y).0).collect()
        } else {
            core
        };
        let rgb = std::array::from_fn(|c| {
            let mut v: Vec<u8> = core.iter().map(|p| p[c]).collect();
            v.sort_unstable();
            v[v.len() / 2]
        });
        out.push(Some(Component {
            region: Region {
                x: x0,
                y: y0,
                w: x1 - x0 + 1,
                h: y1 - y0 + 1,
            },
            pixels,
            rgb,
        }));
        if out.iter().flatten().count() > MAX_OBJECTS {
            return None;
        }
    }
    Some(out.into_iter().flatten().collect())
}

/// Scale-free shape features of a component: its occupancy on a [`GRID`] x [`GRID`] grid
/// laid over its bounding box (the fraction of each cell it covers), then how far from square
/// its box is (`|ln(w / h)|`) and its fill of the box, both weighted by 3.
///
/// # Shapes
/// `GRID * GRID + 2` values.
pub fn shape_features(c: &Component) -> Vec<f32> {
    let Region { x, y, w, h } = c.region;
    let mut f = vec![0f32; GRID * GRID + 2];
    for &(px, py) in &c.pixels {
        let gx = ((px - x) as usize * GRID / w as usize).min(GRID - 1);
        let gy = ((py - y) as usize * GRID / h as usize).min(GRID - 1);
        f[gy * GRID + gx] += 1.0;
    }
    let cell = (w as f32 * h as f32) / (GRID * GRID) as f32;
    for v in f.iter_mut().take(GRID * GRID) {
        *v = (*v / cell).min(1.0);
    }
    f[GRID * GRID] = ASPECT_WEIGHT * (w as f32 / h as f32).ln().abs();
    f[GRID * GRID + 1] = ASPECT_WEIGHT * c.pixels.len() as f32 / (w as f32 * h as f32);
    f
}

/// One learned shape class: its name and the mean [`shape_features`] of its training
/// examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeClass {
    pub name: String,
    pub centroid: Vec<f32>,
    /// Training examples it was averaged from.
    pub examples: usize,
}

/// A nearest-centroid shape classifier (`shapes.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeClasses {
    /// The grid side the centroids were computed with (must be [`GRID`]).
    pub grid: usize,
    pub classes: Vec<ShapeClass>,
}

impl ShapeClasses {
    /// Loads and checks `shapes.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let format = "shape classes JSON";
        let bad = |reason: String| VisionError::BadFile {
            path: path.to_path_buf(),
            format,
            reason,
        };
        let s: ShapeClasses = crate::error::read_json(path, format)?;
        if s.grid != GRID {
            return Err(bad(format!("grid {} (this build uses {GRID})", s.grid)));
        }
        if s.classes.is_empty() {
            return Err(bad("no classes".into()));
        }
        for c in &s.classes {
            if c.centroid.len() != GRID * GRID + 2 {
                return Err(bad(format!(
                    "class `{}` has {} values, expected {}",
                    c.name,
                    c.centroid.len(),
                    GRID * GRID + 2
                )));
            }
            if c.centroid.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!("class `{}` has a non-finite value", c.name)));
            }
            if c.name.trim().is_empty() {
                return Err(bad("a class has an empty name".into()));
            }
        }
        Ok(s)
    }

    /// The nearest class's name.
    pub fn classify(&self, features: &[f32]) -> &str {
        let d = |c: &ShapeClass| -> f32 {
            c.centroid
                .iter()
                .zip(features)
                .map(|(a, b)| (a - b) * (a - b))
                .sum()
        };
        self.classes
            .iter()
            .min_by(|a, b| d(a).total_cmp(&d(b)))
            .map_or("shape", |c| c.name.as_str())
    }
}

/// Finds and names the objects of a picture of flat shapes.
#[derive(Debug, Clone)]
pub struct ObjectFinder {
    pub shapes: ShapeClasses,
}

impl ObjectFinder {
    /// Loads `shapes.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Ok(Self {
            shapes: ShapeClasses::load(&dir.join("shapes.json"))?,
        })
    }

    /// The objects of `img`, in reading order; empty when it has no plain ground or more
    /// than [`MAX_OBJECTS`] objects.
    pub fn find(&self, img: &RgbImage) -> Vec<SeenObject> {
        let Some(g) = ground(img) else {
            return Vec::new();
        };
        let Some(cs) = components(img, g) else {
            return Vec::new();
        };
        cs.iter()
            .map(|c| SeenObject {
                colour: colour_name(c.rgb),
                rgb: c.rgb,
                shape: self.shapes.classify(&shape_features(c)).to_string(),
                region: c.region,
                area: c.pixels.len(),
            })
            .collect()
    }
}

/// Reference colours: CSS named colours (CSS Color Module Level 4), each under the basic
/// colour term it is usually called by.
const REFERENCE: &[(&str, [u8; 3])] = &[
    ("red", [255, 0, 0]),
    ("red", [220, 20, 60]),
    ("red", [178, 34, 34]),
    ("red", [139, 0, 0]),
    ("red", [205, 92, 92]),
    ("orange", [255, 165, 0]),
    ("orange", [255, 140, 0]),
    ("orange", [255, 127, 80]),
    ("orange", [255, 69, 0]),
    ("yellow", [255, 255, 0]),
    ("yellow", [255, 215, 0]),
    ("yellow", [240, 230, 140]),
    ("green", [0, 128, 0]),
    ("green", [0, 255, 0]),
    ("green", [34, 139, 34]),
    ("green", [46, 139, 87]),
    ("green", [50, 205, 50]),
    ("green", [0, 100, 0]),
    ("green", [144, 238, 144]),
    ("teal", [0, 128, 128]),
    ("teal", [0, 139, 139]),
    ("teal", [32, 178, 170]),
    ("blue", [0, 0, 255]),
    ("blue", [65, 105, 225]),
    ("blue", [30, 144, 255]),
    ("blue", [0, 0, 128]),
    ("blue", [70, 130, 180]),
    ("blue", [0, 0, 205]),
    ("blue", [135, 206, 235]),
    ("purple", [128, 0, 128]),
    ("purple", [148, 0, 211]),
    ("purple", [138, 43, 226]),
    ("purple", [147, 112, 219]),
    ("purple", [75, 0, 130]),
    ("purple", [153, 50, 204]),
    ("pink", [255, 192, 203]),
    ("pink", [255, 105, 180]),
    ("pink", [255, 20, 147]),
    ("pink", [219, 112, 147]),
    ("pink", [199, 21, 133]),
    ("brown", [165, 42, 42]),
    ("brown", [139, 69, 19]),
    ("brown", [160, 82, 45]),
    ("brown", [210, 105, 30]),
    ("brown", [128, 0, 0]),
    ("black", [0, 0, 0]),
    ("gray", [128, 128, 128]),
    ("gray", [169, 169, 169]),
    ("gray", [105, 105, 105]),
    ("gray", [192, 192, 192]),
    ("gray", [112, 128, 144]),
    ("white", [255, 255, 255]),
];

/// sRGB (0-255) to CIELAB (D65).
pub fn lab(rgb: [u8; 3]) -> [f32; 3] {
    let lin = |c: u8| {
        let c = c as f32 / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let (r, g, b) = (lin(rgb[0]), lin(rgb[1]), lin(rgb[2]));
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f32| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// The basic colour term of the nearest reference colour (CIELAB distance).
pub fn colour_name(rgb: [u8; 3]) -> &'static str {
    let p = lab(rgb);
    let d = |q: [u8; 3]| {
        let q = lab(q);
        (0..3).map(|i| (p[i] - q[i]) * (p[i] - q[i])).sum::<f32>()
    };
    REFERENCE
        .iter()
        .min_by(|a, b| d(a.1).total_cmp(&d(b.1)))
        .map_or("gray", |r| r.0)
}

/// The name of a flat ground colour (a picture's background), as captions name it: near
/// white `white`; a pale colour by its hue, `light gray`, `cream` (yellowish), `pale green`,
/// `pale blue`, `lavender` (violet) or `pale pink`; a darker one by its basic colour term
/// ([`colour_name`]), `dark ` before it when it is deep (CIELAB lightness under 35).
pub fn ground_name(rgb: [u8; 3]) -> String {
    let [l, a, b] = lab(rgb);
    let chroma = a.hypot(b);
    if l >= 80.0 {
        if chroma < 4.0 {
            return if l >= 98.0 { "white" } else { "light gray" }.to_string();
        }
        let hue = b.atan2(a).to_degrees().rem_euclid(360.0);
        return match hue {
            h if (45.0..115.0).contains(&h) => "cream",
            h if (115.0..200.0).contains(&h) => "pale green",
            h if (200.0..290.0).contains(&h) => "pale blue",
            h if (290.0..345.0).contains(&h) => "lavender",
            _ => "pale pink",
        }
        .to_string();
    }
    let name = colour_name(rgb);
    if l < 35.0 && name != "black" {
        format!("dark {name}")
    } else {
        name.to_string()
    }
}

/// English plural of a shape name.
pub fn plural(noun: &str) -> String {
    if noun.ends_with('s') || noun.ends_with('x') || noun.ends_with("sh") || noun.ends_with("ch") {
        format!("{noun}es")
    } else {
        format!("{noun}s")
    }
}

/// The objects grouped by colour and shape, in order of first appearance, with counts:
/// `[(3, "purple", "hexagon"), (3, "brown", "circle")]`.
pub fn groups(objects: &[SeenObject]) -> Vec<(usize, &'static str, &str)> {
    let mut g: Vec<(usize, &'static str, &str)> = Vec::new();
    for o in objects {
        match g.iter_mut().find(|x| x.1 == o.colour && x.2 == o.shape) {
            Some(x) => x.0 += 1,
            None => g.push((1, o.colour, o.shape.as_str())),
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn disc(img: &mut RgbImage, cx: f32, cy: f32, r: f32, c: [u8; 3]) {
        for (x, y, p) in img.enumerate_pixels_mut() {
            if (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) <= r * r {
                *p = Rgb(c);
            }
        }
    }

    #[test]
    fn grounds_are_named_by_lightness_and_hue() {
        for (name, rgb) in [
            ("white", [255, 255, 255]),
            ("light gray", [235, 235, 235]),
            ("cream", [250, 243, 224]),
            ("pale blue", [225, 236, 250]),
            ("pale green", [228, 245, 228]),
            ("lavender", [240, 232, 252]),
            ("pale pink", [252, 228, 232]),
            ("blue", [40, 90, 200]),
            ("dark green", [0, 70, 0]),
            ("black", [5, 5, 5]),
        ] {
            assert_eq!(ground_name(rgb), name, "{rgb:?}");
        }
    }

    #[test]
    fn basic_colours_are_named_by_their_own_term() {
        for (name, rgb) in [
            ("red", [255, 0, 0]),
            ("green", [0, 200, 0]),
            ("blue", [20, 40, 230]),
            ("yellow", [250, 240, 10]),
            ("black", [10, 10, 10]),
            ("white", [250, 250, 250]),
            ("gray", [120, 120, 120]),
        ] {
            assert_eq!(colour_name(rgb), name, "{rgb:?}");
        }
    }

    #[test]
    fn components_are_found_with_their_core_colour_and_specks_dropped() {
        let mut img = RgbImage::from_pixel(80, 60, Rgb([250, 250, 245]));
        disc(&mut img, 20.0, 20.0, 8.0, [200, 30, 30]);
        disc(&mut img, 55.0, 40.0, 10.0, [30, 30, 200]);
        img.put_pixel(70, 5, Rgb([0, 0, 0])); // a speck
        let g = ground(&img).unwrap();
        assert_eq!(g, [250, 250, 245]);
        let cs = components(&img, g).unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].rgb, [200, 30, 30]);
        assert_eq!(cs[1].rgb, [30, 30, 200]);
        assert_eq!(
            cs[0].region,
            Region {
                x: 12,
                y: 12,
                w: 17,
                h: 17
            }
        );
    }

    #[test]
    fn a_busy_border_or_too_many_objects_gives_nothing() {
        // border with no majority colour: a gradient
        let img = RgbImage::from_fn(40, 40, |x, y| Rgb([(x * 6) as u8, (y * 6) as u8, 0]));
        assert_eq!(ground(&img), None);
        // 30 separate blobs
        let mut img = RgbImage::from_pixel(200, 200, Rgb([255, 255, 255]));
        for i in 0..30 {
            disc(
                &mut img,
                15.0 + (i % 6) as f32 * 30.0,
                15.0 + (i / 6) as f32 * 30.0,
                5.0,
                [0, 0, 0],
            );
        }
        assert!(components(&img, [255, 255, 255]).is_none());
        let f = ObjectFinder {
            shapes: ShapeClasses {
                grid: GRID,
                classes: vec![ShapeClass {
                    name: "circle".into(),
                    centroid: vec![0.0; GRID * GRID + 2],
                    examples: 1,
                }],
            },
        };
        assert!(f.find(&img).is_empty());
    }

    #[test]
    fn shape_features_tell_a_disc_from_a_square_by_their_corners() {
        let mut img = RgbImage::from_pixel(100, 50, Rgb([255, 255, 255]));
        disc(&mut img, 25.0, 25.0, 15.0, [0, 0, 0]);
        for y in 10..41 {
            for x in 60..91 {
                img.put_pixel(x, y, Rgb([0, 0, 0]));
            }
        }
        let cs = components(&img, [255, 255, 255]).unwrap();
        let (d, s) = (shape_features(&cs[0]), shape_features(&cs[1]));
        // corner cells: nearly empty for the disc, full for the square
        assert!(d[0] < 0.2, "{}", d[0]);
        assert!(s[0] > 0.99, "{}", s[0]);
        let classes = ShapeClasses {
            grid: GRID,
            classes: vec![
                ShapeClass {
                    name: "circle".into(),
                    centroid: d.clone(),
                    examples: 1,
                },
                ShapeClass {
                    name: "square".into(),
                    centroid: s.clone(),
                    examples: 1,
                },
            ],
        };
        assert_eq!(classes.classify(&d), "circle");
        assert_eq!(classes.classify(&s), "square");
    }

    #[test]
    fn bad_shape_files_are_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("afm-shapes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("shapes.json");
        std::fs::write(
            &p,
            r#"{"grid": 12, "classes": [{"name": "x", "centroid": [1.0], "examples": 1}]}"#,
        )
        .unwrap();
        let e = ShapeClasses::load(&p).unwrap_err().to_string();
        assert!(e.contains("expected 146"), "{e}");
        std::fs::write(&p, r#"{"grid": 8, "classes": []}"#).unwrap();
        let e = ShapeClasses::load(&p).unwrap_err().to_string();
        assert!(e.contains("grid 8"), "{e}");
        std::fs::write(&p, "not json").unwrap();
        assert!(ShapeClasses::load(&p).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn groups_count_by_colour_and_shape_in_order() {
        let o = |c: &'static str, s: &str| SeenObject {
            colour: c,
            rgb: [0; 3],
            shape: s.into(),
            region: Region {
                x: 0,
                y: 0,
                w: 1,
                h: 1,
            },
            area: 1,
        };
        let objs = [
            o("purple", "hexagon"),
            o("brown", "circle"),
            o("purple", "hexagon"),
        ];
        assert_eq!(
            groups(&objs),
            vec![(2, "purple", "hexagon"), (1, "brown", "circle")]
        );
        assert_eq!(plural("box"), "boxes");
        assert_eq!(plural("star"), "stars");
    }
}
