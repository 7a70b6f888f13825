//! Procedurally generated scenes: 1-9 flat shapes (circle, square, triangle, diamond, hexagon,
//! star) in 10 named colours on a plain background, in 1-4 groups of identical shapes, never
//! touching (at least 5 px apart) and fully inside the canvas. The ground truth lists every
//! shape with its centre, radius and bounding box; the caption names the groups with their
//! counts and one relative position; the questions ask for counts ("How many red circles are
//! there?"), colours ("What colour is the triangle?"), shapes ("What is the blue shape?"),
//! presence ("Is there a green star?") and relative positions ("Is the square left of the
//! circle?"), with yes/no answers balanced. Counts are answered with digits.

use image::{Rgb as Px, RgbImage};
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::raster;
use crate::{Generated, Qa, QaCategory as C, Rect, Rgb, Split};

/// Canvas sizes (width, height) of each split.
pub fn canvas_sizes(split: Split) -> &'static [(u32, u32)] {
    match split {
        Split::Train => &[(256, 256), (320, 256)],
        Split::HeldOut => &[(288, 288), (256, 320)],
    }
}

/// Half-open range of shape radii (px) of each split.
pub fn radius_range(split: Split) -> (f32, f32) {
    match split {
        Split::Train => (11.0, 20.0),
        Split::HeldOut => (20.0, 27.0),
    }
}

const TRAIN_BACKGROUNDS: [(&str, Rgb); 3] = [
    ("white", [255, 255, 255]),
    ("light gray", [235, 235, 235]),
    ("cream", [250, 243, 224]),
];
const HELD_OUT_BACKGROUNDS: [(&str, Rgb); 3] = [
    ("pale blue", [225, 236, 250]),
    ("pale green", [228, 245, 228]),
    ("lavender", [240, 232, 252]),
];

fn backgrounds(split: Split) -> &'static [(&'static str, Rgb)] {
    match split {
        Split::Train => &TRAIN_BACKGROUNDS,
        Split::HeldOut => &HELD_OUT_BACKGROUNDS,
    }
}

/// Background colour names of each split.
pub fn background_names(split: Split) -> Vec<&'static str> {
    backgrounds(split).iter().map(|b| b.0).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
    Diamond,
    Hexagon,
    Star,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 6] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Diamond,
        ShapeKind::Hexagon,
        ShapeKind::Star,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Diamond => "diamond",
            ShapeKind::Hexagon => "hexagon",
            ShapeKind::Star => "star",
        }
    }
    pub fn plural(self) -> String {
        format!("{}s", self.name())
    }
}

/// The named palette.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Orange,
    Purple,
    Pink,
    Brown,
    Black,
    Gray,
}

impl Colour {
    pub const ALL: [Colour; 10] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Orange,
        Colour::Purple,
        Colour::Pink,
        Colour::Brown,
        Colour::Black,
        Colour::Gray,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Orange => "orange",
            Colour::Purple => "purple",
            Colour::Pink => "pink",
            Colour::Brown => "brown",
            Colour::Black => "black",
            Colour::Gray => "gray",
        }
    }
    pub fn rgb(self) -> Rgb {
        match self {
            Colour::Red => [220, 38, 38],
            Colour::Green => [34, 160, 64],
            Colour::Blue => [37, 99, 235],
            Colour::Yellow => [245, 200, 20],
            Colour::Orange => [249, 115, 22],
            Colour::Purple => [147, 51, 234],
            Colour::Pink => [236, 100, 170],
            Colour::Brown => [133, 77, 30],
            Colour::Black => [25, 25, 25],
            Colour::Gray => [128, 128, 128],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SceneShape {
    pub shape: ShapeKind,
    pub colour: Colour,
    pub cx: f32,
    pub cy: f32,
    /// Every point of the shape is within this distance of the centre.
    pub radius: f32,
    pub bbox: Rect,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SceneTruth {
    pub width: u32,
    pub height: u32,
    pub background: &'static str,
    pub background_rgb: Rgb,
    pub shapes: Vec<SceneShape>,
}

impl SceneTruth {
    /// Number of shapes matching both filters (None matches everything).
    pub fn count(&self, shape: Option<ShapeKind>, colour: Option<Colour>) -> usize {
        self.shapes
            .iter()
            .filter(|s| shape.is_none_or(|k| s.shape == k) && colour.is_none_or(|c| s.colour == c))
            .count()
    }
}

fn outline(kind: ShapeKind, cx: f32, cy: f32, r: f32) -> Vec<(f32, f32)> {
    let ring = |n: usize, rad: &dyn Fn(usize) -> f32, phase: f32| -> Vec<(f32, f32)> {
        (0..n)
            .map(|i| {
                let a = phase + i as f32 * std::f32::consts::TAU / n as f32;
                (cx + rad(i) * a.cos(), cy + rad(i) * a.sin())
            })
            .collect()
    };
    let up = -std::f32::consts::FRAC_PI_2;
    match kind {
        ShapeKind::Circle => vec![],
        ShapeKind::Square => {
            let s = r * 0.78;
            vec![
                (cx - s, cy - s),
                (cx + s, cy - s),
                (cx + s, cy + s),
                (cx - s, cy + s),
            ]
        }
        ShapeKind::Triangle => {
            // Equilateral, pointing up, its centroid slightly low so it looks centred.
            ring(3, &|_| r, up)
                .into_iter()
                .map(|(x, y)| (x, y + r * 0.12))
                .collect()
        }
        ShapeKind::Diamond => vec![
            (cx, cy - r),
            (cx + r * 0.72, cy),
            (cx, cy + r),
            (cx - r * 0.72, cy),
        ],
        ShapeKind::Hexagon => ring(6, &|_| r * 0.95, 0.0),
        ShapeKind::Star => ring(10, &|i| if i % 2 == 0 { r } else { r * 0.45 }, up),
    }
}

fn draw_shape(img: &mut RgbImage, s: &SceneShape) {
    let c = s.colour.rgb();
    match s.shape {
        ShapeKind::Circle => raster::fill_circle(img, s.cx, s.cy, s.radius, c),
        k => raster::fill_polygon(img, &outline(k, s.cx, s.cy, s.radius), c),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// A group of identical shapes, e.g. "three red circles" or "an orange star".
fn group_phrase(n: usize, c: Colour, k: ShapeKind) -> String {
    // one definition for the captions trained on and the grammar they are decoded under
    afm_fusion::grounded::group_phrase(n, c.name(), k.name())
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Generates one scene in `split` from `rng`.
pub(crate) fn generate(rng: &mut ChaCha8Rng, split: Split) -> Generated<SceneTruth> {
    let (w, h) = *canvas_sizes(split).choose(rng).unwrap_or(&(256, 256));
    let (bg_name, bg) = *backgrounds(split)
        .choose(rng)
        .unwrap_or(&TRAIN_BACKGROUNDS[0]);
    let (rlo, rhi) = radius_range(split);

    // Groups of identical shapes.
    let n_groups = rng.random_range(1..=4);
    let mut groups: Vec<(ShapeKind, Colour, usize)> = Vec::new();
    let mut total = 0;
    while groups.len() < n_groups {
        let k = *ShapeKind::ALL.choose(rng).unwrap_or(&ShapeKind::Circle);
        let c = *Colour::ALL.choose(rng).unwrap_or(&Colour::Red);
        if groups.iter().any(|g| g.0 == k && g.1 == c) {
            continue;
        }
        let n = if rng.random_bool(0.5) {
            1
        } else {
            rng.random_range(2..=4)
        };
        let n = n.min(9 - total);
        if n == 0 {
            break;
        }
        total += n;
        groups.push((k, c, n));
    }

    // Place them without touching.
    let gap = 5.0;
    let mut shapes: Vec<SceneShape> = Vec::new();
    for &(k, c, n) in &groups {
        for _ in 0..n {
            let r = rng.random_range(rlo..rhi);
            for _ in 0..300 {
                let cx = rng.random_range(r + 3.0..w as f32 - r - 3.0);
                let cy = rng.random_range(r + 3.0..h as f32 - r - 3.0);
                let free = shapes.iter().all(|s| {
                    let (dx, dy) = (s.cx - cx, s.cy - cy);
                    (dx * dx + dy * dy).sqrt() >= s.radius + r + gap
                });
                if free {
                    let bbox = Rect::new(
                        (cx - r).floor() as u32,
                        (cy - r).floor() as u32,
                        (2.0 * r).ceil() as u32 + 1,
                        (2.0 * r).ceil() as u32 + 1,
                    );
                    shapes.push(SceneShape {
                        shape: k,
                        colour: c,
                        cx,
                        cy,
                        radius: r,
                        bbox,
                    });
                    break;
                }
            }
        }
    }

    let mut img = RgbImage::from_pixel(w, h, Px(bg));
    for s in &shapes {
        draw_shape(&mut img, s);
    }
    let truth = SceneTruth {
        width: w,
        height: h,
        background: bg_name,
        background_rgb: bg,
        shapes,
    };
    let (caption, qa) = language(&truth, rng);
    Generated {
        image: img,
        caption,
        qa,
        truth,
    }
}

/// How a shape can be named unambiguously in this scene ("the star", "the red star").
fn referent(t: &SceneTruth, s: &SceneShape) -> Option<String> {
    if t.count(Some(s.shape), None) == 1 {
        Some(format!("the {}", s.shape.name()))
    } else if t.count(Some(s.shape), Some(s.colour)) == 1 {
        Some(format!("the {} {}", s.colour.name(), s.shape.name()))
    } else {
        None
    }
}

/// A relative-position fact between two shapes: (question, answer, statement).
fn position_qa(
    a: &SceneShape,
    na: &str,
    b: &SceneShape,
    nb: &str,
    rng: &mut ChaCha8Rng,
) -> Option<(String, &'static str, String)> {
    let (dx, dy) = (b.cx - a.cx, b.cy - a.cy);
    let clear = a.radius.max(b.radius);
    let horizontal = dx.abs() > clear;
    let vertical = dy.abs() > clear;
    let use_h = match (horizontal, vertical) {
        (false, false) => return None,
        (true, false) => true,
        (false, true) => false,
        (true, true) => rng.random_bool(0.5),
    };
    let (truth, other) = if use_h {
        if dx > 0.0 {
            ("left of", "right of")
        } else {
            ("right of", "left of")
        }
    } else if dy > 0.0 {
        ("above", "below")
    } else {
        ("below", "above")
    };
    let statement = format!("{} is {truth} {nb}.", capitalise(na));
    let (rel, ans) = if rng.random_bool(0.5) {
        (truth, "yes")
    } else {
        (other, "no")
    };
    Some((format!("Is {na} {rel} {nb}?"), ans, statement))
}

fn language(t: &SceneTruth, rng: &mut ChaCha8Rng) -> (String, Vec<Qa>) {
    // Groups in order of first appearance.
    let mut groups: Vec<(ShapeKind, Colour, usize)> = Vec::new();
    for s in &t.shapes {
        match groups
            .iter_mut()
            .find(|g| g.0 == s.shape && g.1 == s.colour)
        {
            Some(g) => g.2 += 1,
            None => groups.push((s.shape, s.colour, 1)),
        }
    }
    let phrases: Vec<String> = groups
        .iter()
        .map(|&(k, c, n)| group_phrase(n, c, k))
        .collect();
    let list = match phrases.len() {
        0 => "nothing".to_string(),
        1 => phrases[0].clone(),
        n => format!("{} and {}", phrases[..n - 1].join(", "), phrases[n - 1]),
    };
    let mut caption = format!("{} on a {} background.", capitalise(&list), t.background);

    let mut qa = Vec::new();
    let n = t.shapes.len();
    qa.push(Qa::new(
        "How many shapes are there?",
        n.to_string(),
        C::Count,
    ));
    for &(k, c, cnt) in &groups {
        qa.push(Qa::new(
            format!("How many {} {} are there?", c.name(), k.plural()),
            cnt.to_string(),
            C::Count,
        ));
    }
    // An absent combination, a colour count and a shape count.
    let k = *ShapeKind::ALL.choose(rng).unwrap_or(&ShapeKind::Circle);
    let c = *Colour::ALL.choose(rng).unwrap_or(&Colour::Red);
    if t.count(Some(k), Some(c)) == 0 {
        qa.push(Qa::new(
            format!("How many {} {} are there?", c.name(), k.plural()),
            "0",
            C::Count,
        ));
        qa.push(Qa::new(
            format!("Is there {} {} {}?", article(c.name()), c.name(), k.name()),
            "no",
            C::Exists,
        ));
    }
    if let Some(s) = t.shapes.choose(rng) {
        qa.push(Qa::new(
            format!("How many {} shapes are there?", s.colour.name()),
            t.count(None, Some(s.colour)).to_string(),
            C::Count,
        ));
        qa.push(Qa::new(
            format!("How many {} are there?", s.shape.plural()),
            t.count(Some(s.shape), None).to_string(),
            C::Count,
        ));
        qa.push(Qa::new(
            format!(
                "Is there {} {} {}?",
                article(s.colour.name()),
                s.colour.name(),
                s.shape.name()
            ),
            "yes",
            C::Exists,
        ));
    }
    // Colour of each shape kind that occurs once; kind of each colour that occurs once.
    for k in ShapeKind::ALL {
        if t.count(Some(k), None) == 1 {
            if let Some(s) = t.shapes.iter().find(|s| s.shape == k) {
                qa.push(Qa::new(
                    format!("What colour is the {}?", k.name()),
                    s.colour.name(),
                    C::Colour,
                ));
            }
        }
    }
    for c in Colour::ALL {
        if t.count(None, Some(c)) == 1 {
            if let Some(s) = t.shapes.iter().find(|s| s.colour == c) {
                qa.push(Qa::new(
                    format!("What is the {} shape?", c.name()),
                    s.shape.name(),
                    C::Shape,
                ));
            }
        }
    }
    // Relative positions between nameable shapes (at most two questions).
    let named: Vec<(&SceneShape, String)> = t
        .shapes
        .iter()
        .filter_map(|s| referent(t, s).map(|r| (s, r)))
        .collect();
    let mut asked = 0;
    let mut described = false;
    'outer: for i in 0..named.len() {
        for j in i + 1..named.len() {
            let (a, na) = (&named[i].0, &named[i].1);
            let (b, nb) = (&named[j].0, &named[j].1);
            if let Some((q, ans, statement)) = position_qa(a, na, b, nb, rng) {
                if !described {
                    caption.push(' ');
                    caption.push_str(&statement);
                    described = true;
                }
                qa.push(Qa::new(q, ans, C::Position));
                asked += 1;
                if asked == 2 {
                    break 'outer;
                }
            }
        }
    }
    (caption, qa)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_colours_are_far_apart_and_from_backgrounds() {
        let dist = |a: Rgb, b: Rgb| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (*x as f32 - y as f32).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        for (i, a) in Colour::ALL.iter().enumerate() {
            for b in &Colour::ALL[i + 1..] {
                assert!(dist(a.rgb(), b.rgb()) > 70.0, "{a:?} {b:?}");
            }
            for (_, bg) in TRAIN_BACKGROUNDS.iter().chain(HELD_OUT_BACKGROUNDS.iter()) {
                assert!(dist(a.rgb(), *bg) > 100.0, "{a:?} {bg:?}");
            }
        }
    }
}
