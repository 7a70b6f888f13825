//! Generated scenes: the shapes in the ground truth are the blobs drawn, and the caption and
//! questions agree with them.

mod common;

use afm_train::scenes::{Colour, SceneShape, SceneTruth, ShapeKind};
use afm_train::{generate, QaCategory, Rect, Sample, Split, SynthKind, Truth};
use common::{colour_core_mask, components};

const N: u64 = 150;

fn scene(split: Split, i: u64) -> (Sample, SceneTruth) {
    let s = generate(SynthKind::Scene, split, i);
    let t = match &s.truth {
        Truth::Scene(t) => t.clone(),
        other => panic!("not a scene: {other:?}"),
    };
    (s, t)
}

fn all_scenes() -> Vec<(Sample, SceneTruth)> {
    [Split::Train, Split::HeldOut]
        .into_iter()
        .flat_map(|sp| (0..N).map(move |i| scene(sp, i)))
        .collect()
}

#[test]
fn shape_counts_per_colour_equal_the_blobs_drawn() {
    let mut total = 0;
    for (s, t) in all_scenes() {
        for c in Colour::ALL {
            let mask = colour_core_mask(&s.image, c.rgb(), 24.0);
            let blobs = components(&mask, s.image.width() as usize, 4);
            assert_eq!(
                blobs,
                t.count(None, Some(c)),
                "{:?} {}: {} {:?} blobs drawn, truth says {}",
                s.split,
                s.index,
                blobs,
                c,
                t.count(None, Some(c))
            );
            total += blobs;
        }
        // Nothing but shapes and background: every pixel is the background, a palette colour
        // or a blend of the two at a shape's edge.
        let bg = t.background_rgb;
        let stray = s
            .image
            .pixels()
            .filter(|p| p.0 != bg && !t.shapes.iter().any(|sh| near_shape(sh, bg, p.0)))
            .count();
        assert_eq!(stray, 0, "{:?} {}", s.split, s.index);
    }
    assert!(total > 2 * N as usize * 2, "{total}");
}

/// Whether `p` is a blend of the background `bg` and the shape's colour (an anti-aliased
/// edge pixel) or the colour itself.
fn near_shape(sh: &SceneShape, bg: [u8; 3], p: [u8; 3]) -> bool {
    let c = sh.colour.rgb();
    let v: Vec<f32> = (0..3).map(|i| c[i] as f32 - bg[i] as f32).collect();
    let d: Vec<f32> = (0..3).map(|i| p[i] as f32 - bg[i] as f32).collect();
    let vv: f32 = v.iter().map(|x| x * x).sum();
    let a = ((0..3).map(|i| d[i] * v[i]).sum::<f32>() / vv).clamp(0.0, 1.0);
    let r: f32 = (0..3)
        .map(|i| (d[i] - a * v[i]).powi(2))
        .sum::<f32>()
        .sqrt();
    r < 3.0
}

#[test]
fn shapes_sit_inside_the_canvas_apart_and_are_drawn_at_their_centres() {
    for (s, t) in all_scenes() {
        let canvas = Rect::new(0, 0, t.width, t.height);
        assert!(!t.shapes.is_empty() && t.shapes.len() <= 9);
        for (i, a) in t.shapes.iter().enumerate() {
            assert!(canvas.contains(&a.bbox), "{:?} {}: {a:?}", s.split, s.index);
            let centre = s.image.get_pixel(a.cx as u32, a.cy as u32).0;
            assert_eq!(centre, a.colour.rgb(), "{:?} {}: {a:?}", s.split, s.index);
            for b in &t.shapes[i + 1..] {
                let d = ((a.cx - b.cx).powi(2) + (a.cy - b.cy).powi(2)).sqrt();
                assert!(d >= a.radius + b.radius + 4.0, "{:?} {}", s.split, s.index);
            }
        }
    }
}

/// Resolves "the star", "the red star" to the one shape it names.
fn resolve<'a>(t: &'a SceneTruth, name: &str) -> &'a SceneShape {
    let words: Vec<&str> = name.trim_start_matches("the ").split(' ').collect();
    let kind = |w: &str| {
        ShapeKind::ALL
            .into_iter()
            .find(|k| k.name() == w)
            .unwrap_or_else(|| panic!("shape {w}"))
    };
    let hits: Vec<&SceneShape> = match words.as_slice() {
        [k] => t.shapes.iter().filter(|s| s.shape == kind(k)).collect(),
        [c, k] => t
            .shapes
            .iter()
            .filter(|s| s.shape == kind(k) && s.colour.name() == *c)
            .collect(),
        _ => panic!("cannot parse {name:?}"),
    };
    assert_eq!(hits.len(), 1, "{name:?} is ambiguous");
    hits[0]
}

#[test]
fn questions_and_captions_agree_with_the_shapes() {
    let mut positions = 0;
    let (mut yes, mut no) = (0, 0);
    for (s, t) in all_scenes() {
        let id = format!("{:?} {}", s.split, s.index);
        assert!(s.caption.contains(t.background), "{id}");
        for q in &s.qa {
            match q.category {
                QaCategory::Count => {
                    let n: usize = q.answer.parse().expect("a digit");
                    let body = q
                        .question
                        .trim_start_matches("How many ")
                        .trim_end_matches(" are there?");
                    let words: Vec<&str> = body.split(' ').collect();
                    let colour = Colour::ALL.into_iter().find(|c| c.name() == words[0]);
                    let last = words[words.len() - 1];
                    let shape = ShapeKind::ALL.into_iter().find(|k| k.plural() == last);
                    assert_eq!(t.count(shape, colour), n, "{id}: {}", q.question);
                }
                QaCategory::Colour => {
                    let name = q
                        .question
                        .trim_start_matches("What colour is ")
                        .trim_end_matches('?');
                    assert_eq!(resolve(&t, name).colour.name(), q.answer, "{id}");
                }
                QaCategory::Shape => {
                    let c = q
                        .question
                        .trim_start_matches("What is the ")
                        .trim_end_matches(" shape?");
                    let hits: Vec<_> = t.shapes.iter().filter(|s| s.colour.name() == c).collect();
                    assert_eq!(hits.len(), 1, "{id}");
                    assert_eq!(hits[0].shape.name(), q.answer, "{id}");
                }
                QaCategory::Exists => {
                    let body = q
                        .question
                        .trim_start_matches("Is there ")
                        .trim_end_matches('?');
                    let words: Vec<&str> = body.split(' ').collect();
                    let present = t
                        .shapes
                        .iter()
                        .any(|s| s.colour.name() == words[1] && s.shape.name() == words[2]);
                    assert_eq!(q.answer, if present { "yes" } else { "no" }, "{id}");
                }
                QaCategory::Position => {
                    positions += 1;
                    let body = q.question.trim_start_matches("Is ").trim_end_matches('?');
                    let (rel, (a, b)) = [" left of ", " right of ", " above ", " below "]
                        .iter()
                        .find_map(|r| body.split_once(r).map(|p| (r.trim(), p)))
                        .expect("a relation");
                    let (a, b) = (resolve(&t, a), resolve(&t, b));
                    let truth = match rel {
                        "left of" => a.cx < b.cx,
                        "right of" => a.cx > b.cx,
                        "above" => a.cy < b.cy,
                        _ => a.cy > b.cy,
                    };
                    // Only asked when the answer is clear-cut.
                    let gap = if rel.ends_with("of") {
                        (a.cx - b.cx).abs()
                    } else {
                        (a.cy - b.cy).abs()
                    };
                    assert!(gap > a.radius.max(b.radius), "{id}: {}", q.question);
                    assert_eq!(
                        q.answer,
                        if truth { "yes" } else { "no" },
                        "{id}: {}",
                        q.question
                    );
                    if truth {
                        yes += 1
                    } else {
                        no += 1
                    }
                }
                other => panic!("{id}: unexpected {other:?} question"),
            }
        }
        // The caption names every group with its count.
        for c in Colour::ALL {
            for k in ShapeKind::ALL {
                let n = t.count(Some(k), Some(c));
                if n > 1 {
                    assert!(
                        s.caption.contains(&format!("{} {}", c.name(), k.plural())),
                        "{id}: {}",
                        s.caption
                    );
                } else if n == 1 {
                    assert!(
                        s.caption.contains(&format!("{} {}", c.name(), k.name())),
                        "{id}"
                    );
                }
            }
        }
    }
    assert!(positions > 50, "{positions} position questions");
    assert!(
        yes > positions / 4 && no > positions / 4,
        "yes {yes} no {no}"
    );
}
