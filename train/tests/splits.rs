//! Train and held-out differ in seeds, font sizes, canvas sizes, layouts and colours, as
//! documented in the crate docs; every generated sample stays inside its split's parameters.

use std::collections::HashSet;

use afm_train::{generate, scenes, screens, seed, Split, SynthKind, Truth};

const N: u64 = 150;

fn overlaps(a: (f32, f32), b: (f32, f32)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[test]
fn split_parameters_are_disjoint() {
    for a in screens::font_px_ranges(Split::Train) {
        for b in screens::font_px_ranges(Split::HeldOut) {
            assert!(!overlaps(*a, *b), "font sizes {a:?} and {b:?} overlap");
        }
    }
    let tc: HashSet<_> = screens::canvas_sizes(Split::Train).iter().collect();
    let hc: HashSet<_> = screens::canvas_sizes(Split::HeldOut).iter().collect();
    assert!(tc.is_disjoint(&hc));
    let tt: HashSet<_> = screens::theme_names(Split::Train).into_iter().collect();
    let ht: HashSet<_> = screens::theme_names(Split::HeldOut).into_iter().collect();
    assert!(tt.is_disjoint(&ht));
    let ta: HashSet<_> = screens::button_aligns(Split::Train).iter().collect();
    let ha: HashSet<_> = screens::button_aligns(Split::HeldOut).iter().collect();
    assert!(ta.is_disjoint(&ha));
    assert_ne!(
        screens::label_placement(Split::Train),
        screens::label_placement(Split::HeldOut)
    );
    assert!(!overlaps(
        scenes::radius_range(Split::Train),
        scenes::radius_range(Split::HeldOut)
    ));
    let ts: HashSet<_> = scenes::canvas_sizes(Split::Train).iter().collect();
    let hs: HashSet<_> = scenes::canvas_sizes(Split::HeldOut).iter().collect();
    assert!(ts.is_disjoint(&hs));
    let tb: HashSet<_> = scenes::background_names(Split::Train).into_iter().collect();
    let hb: HashSet<_> = scenes::background_names(Split::HeldOut)
        .into_iter()
        .collect();
    assert!(tb.is_disjoint(&hb));
}

#[test]
fn seeds_of_the_splits_never_meet() {
    let mut seen = HashSet::new();
    for kind in [SynthKind::Screen, SynthKind::Scene] {
        for split in [Split::Train, Split::HeldOut] {
            for i in 0..10_000 {
                assert!(seen.insert(seed(kind, split, i)), "{kind:?} {split:?} {i}");
            }
        }
    }
}

#[test]
fn screens_stay_inside_their_split() {
    for split in [Split::Train, Split::HeldOut] {
        let ranges = screens::font_px_ranges(split);
        let mut used_ranges = HashSet::new();
        let mut aligns = HashSet::new();
        let mut placements = HashSet::new();
        for i in 0..N {
            let s = generate(SynthKind::Screen, split, i);
            let Truth::Screen(t) = &s.truth else { panic!() };
            let r = ranges
                .iter()
                .position(|(lo, hi)| t.font_px >= *lo && t.font_px < *hi)
                .unwrap_or_else(|| panic!("{split:?} {i}: font {} px", t.font_px));
            used_ranges.insert(r);
            assert!(screens::canvas_sizes(split).contains(&(t.width, t.height)));
            assert!(screens::theme_names(split).contains(&t.theme));
            assert!(screens::button_aligns(split).contains(&t.button_align));
            aligns.insert(format!("{:?}", t.button_align));
            if !t.fields.is_empty() {
                assert_eq!(t.label_placement, screens::label_placement(split));
            }
            if let Some(l) = &t.list {
                assert!(screens::list_placements(split).contains(&l.placement));
                placements.insert(format!("{:?}", l.placement));
            }
            // Every text of the screen is drawn at the screen's size (the status bar slightly
            // smaller).
            assert_eq!(t.title.px, t.font_px);
            for b in &t.buttons {
                assert_eq!(b.label.px, t.font_px);
            }
        }
        assert_eq!(
            used_ranges.len(),
            ranges.len(),
            "{split:?}: {used_ranges:?}"
        );
        assert_eq!(
            aligns.len(),
            screens::button_aligns(split).len(),
            "{split:?}"
        );
        assert_eq!(
            placements.len(),
            screens::list_placements(split).len(),
            "{split:?}"
        );
    }
}

#[test]
fn scenes_stay_inside_their_split() {
    for split in [Split::Train, Split::HeldOut] {
        let (lo, hi) = scenes::radius_range(split);
        for i in 0..N {
            let s = generate(SynthKind::Scene, split, i);
            let Truth::Scene(t) = &s.truth else { panic!() };
            assert!(scenes::canvas_sizes(split).contains(&(t.width, t.height)));
            assert!(scenes::background_names(split).contains(&t.background));
            for sh in &t.shapes {
                assert!(
                    sh.radius >= lo && sh.radius < hi,
                    "{split:?} {i}: {}",
                    sh.radius
                );
            }
        }
    }
}
