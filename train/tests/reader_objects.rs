//! What the pipeline reads off generated images with the shipped reader
//! (`assets/afm-tiny/reader`, `ScreenReader::read`): a scene is a picture of objects, however
//! small its shapes (the training split's are 11-20 px in radius, and a small dark triangle
//! looks like an "A" to the line finder); a screen is text, never objects.

use afm_fusion::vlm::ScreenReader;
use afm_train::{generate, Split, SynthKind, Truth};
use std::path::PathBuf;

fn reader() -> ScreenReader {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/afm-tiny/reader");
    ScreenReader::from_dir(&dir).unwrap()
}

#[test]
fn scenes_of_both_splits_are_read_as_their_objects_not_as_text() {
    let r = reader();
    for split in [Split::Train, Split::HeldOut] {
        for i in 0..60 {
            let s = generate(SynthKind::Scene, split, i);
            let Truth::Scene(t) = &s.truth else {
                panic!("not a scene")
            };
            let (lines, objects) = r.read(&s.image).unwrap();
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            assert!(
                texts.is_empty(),
                "{split:?} scene {i}: read as text {texts:?}"
            );
            assert_eq!(
                objects.len(),
                t.shapes.len(),
                "{split:?} scene {i}: {} objects found, {} drawn",
                objects.len(),
                t.shapes.len()
            );
        }
    }
}

#[test]
fn screens_of_both_splits_are_read_as_text_not_as_objects() {
    let r = reader();
    for split in [Split::Train, Split::HeldOut] {
        for i in 0..30 {
            let s = generate(SynthKind::Screen, split, i);
            let (lines, objects) = r.read(&s.image).unwrap();
            assert!(
                objects.is_empty(),
                "{split:?} screen {i}: objects {objects:?}"
            );
            assert!(
                lines.len() >= 3,
                "{split:?} screen {i}: {} lines",
                lines.len()
            );
        }
    }
}
