//! Fitting the object finder's shape classes ([`afm_vision::objects::ShapeClasses`]) on
//! labelled training pictures, and measuring the finder on either split.
//!
//! Every component the finder cuts out of a training picture is labelled with the shape it
//! covers (a generated scene's shape whose centre is nearest the component's box centre, or
//! an easy-VQA image's one shape), and each class's centroid is the mean of its examples'
//! [`afm_vision::objects::shape_features`]. Classes are kept per source ("triangle" of the
//! scenes and "triangle" of easy-VQA are two centroids with one name): a nearest-centroid
//! rule over a mixture. Nothing of the held-out split is used.

use crate::{Sample, Truth};
use afm_vision::objects::{
    colour_name, components, ground, shape_features, ShapeClass, ShapeClasses, GRID,
};
use std::collections::BTreeMap;

/// The components of a picture with the shape and colour each one covers, when known:
/// `(source, shape, colour, features)`.
pub fn labelled(s: &Sample) -> Vec<Labelled> {
    label(s, &found(s))
}

/// One labelled component: `(source, shape, colour, features, median colour)`.
pub type Labelled = (&'static str, String, Option<String>, Vec<f32>, [u8; 3]);

/// The finder's components of a picture (none without a plain ground or with too many).
fn found(s: &Sample) -> Vec<afm_vision::objects::Component> {
    ground(&s.image)
        .and_then(|g| components(&s.image, g))
        .unwrap_or_default()
}

/// `cs`, the components of `s`, labelled ([`labelled`]).
fn label(s: &Sample, cs: &[afm_vision::objects::Component]) -> Vec<Labelled> {
    match &s.truth {
        Truth::Scene(t) => cs
            .iter()
            .filter_map(|c| {
                let (cx, cy) = (
                    c.region.x as f32 + c.region.w as f32 / 2.0,
                    c.region.y as f32 + c.region.h as f32 / 2.0,
                );
                let near = t.shapes.iter().min_by(|a, b| {
                    let d =
                        |s: &&crate::scenes::SceneShape| (s.cx - cx).powi(2) + (s.cy - cy).powi(2);
                    d(a).total_cmp(&d(b))
                })?;
                let d = ((near.cx - cx).powi(2) + (near.cy - cy).powi(2)).sqrt();
                (d <= near.radius).then(|| {
                    (
                        "scenes",
                        near.shape.name().to_string(),
                        Some(near.colour.name().to_string()),
                        shape_features(c),
                        c.rgb,
                    )
                })
            })
            .collect(),
        Truth::EasyVqa { colour, shape, .. } => {
            // one shape per image: the largest component
            let Some(c) = cs.iter().max_by_key(|c| c.pixels.len()) else {
                return Vec::new();
            };
            match shape {
                Some(sh) => vec![(
                    "easy_vqa",
                    sh.clone(),
                    colour.clone(),
                    shape_features(c),
                    c.rgb,
                )],
                None => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

/// Class centroids from labelled training pictures.
pub fn fit(samples: impl Iterator<Item = Sample>) -> ShapeClasses {
    let mut sums: BTreeMap<(&'static str, String), (Vec<f64>, usize)> = BTreeMap::new();
    for s in samples {
        for (src, shape, _, f, _) in labelled(&s) {
            let e = sums
                .entry((src, shape))
                .or_insert_with(|| (vec![0.0; f.len()], 0));
            for (a, b) in e.0.iter_mut().zip(&f) {
                *a += *b as f64;
            }
            e.1 += 1;
        }
    }
    ShapeClasses {
        grid: GRID,
        classes: sums
            .into_iter()
            .map(|((_, name), (sum, n))| ShapeClass {
                name,
                centroid: sum.iter().map(|v| (v / n as f64) as f32).collect(),
                examples: n,
            })
            .collect(),
    }
}

/// How well the finder names what it cuts out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FinderScore {
    /// Labelled components.
    pub objects: usize,
    pub shape_right: usize,
    /// Components whose truth colour is known.
    pub with_colour: usize,
    pub colour_right: usize,
    /// Pictures whose every object was found (as many components as truth shapes, scenes).
    pub pictures: usize,
    pub pictures_counted: usize,
    /// Wrong shape names, `(truth, said)` -> times.
    pub confusions: BTreeMap<(String, String), usize>,
    /// Wrong colour names, `(truth, said)` -> times.
    pub colour_confusions: BTreeMap<(String, String), usize>,
}

/// Measures `classes` on `samples`.
pub fn score(classes: &ShapeClasses, samples: impl Iterator<Item = Sample>) -> FinderScore {
    let mut sc = FinderScore::default();
    for s in samples {
        let cs = found(&s);
        if let Truth::Scene(t) = &s.truth {
            sc.pictures += 1;
            sc.pictures_counted += usize::from(cs.len() == t.shapes.len());
        }
        for (_, shape, colour, f, rgb) in label(&s, &cs) {
            sc.objects += 1;
            let said = classes.classify(&f);
            if said == shape {
                sc.shape_right += 1;
            } else {
                *sc.confusions
                    .entry((shape.clone(), said.to_string()))
                    .or_default() += 1;
            }
            if let Some(c) = colour {
                sc.with_colour += 1;
                let named = colour_name(rgb);
                if named == c {
                    sc.colour_right += 1;
                } else {
                    *sc.colour_confusions
                        .entry((c, named.to_string()))
                        .or_default() += 1;
                }
            }
        }
    }
    sc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, Split, SynthKind};

    #[test]
    fn centroids_fitted_on_training_scenes_name_training_scenes() {
        let train = (0..60).map(|i| generate(SynthKind::Scene, Split::Train, i));
        let classes = fit(train);
        let names: std::collections::BTreeSet<_> =
            classes.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), 6, "{names:?}");
        // other training scenes, not those fitted on
        let sc = score(
            &classes,
            (1000..1040).map(|i| generate(SynthKind::Scene, Split::Train, i)),
        );
        assert!(sc.objects > 100, "{sc:?}");
        assert!(sc.shape_right * 10 >= sc.objects * 9, "{sc:?}");
        assert!(sc.pictures_counted * 10 >= sc.pictures * 9, "{sc:?}");
    }
}
