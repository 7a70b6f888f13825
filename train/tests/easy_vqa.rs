//! The easy-VQA reader: clear errors naming the bad file on small hand-made folders (always
//! run), and the real data from the PyPI package (skipped when absent, see common::easy_vqa_dir).

mod common;

use std::path::{Path, PathBuf};

use afm_train::easy_vqa::{self, answers};
use afm_train::{EasyVqa, Kind, QaCategory, Split, Truth};
use image::{Rgb, RgbImage};

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("train/images")).unwrap();
    d
}

fn write_questions(root: &Path, text: &str) {
    std::fs::write(root.join("train/questions.json"), text).unwrap();
}

fn write_png(root: &Path, id: u32) {
    let img = RgbImage::from_pixel(64, 64, Rgb([255, 0, 0]));
    img.save(root.join(format!("train/images/{id}.png")))
        .unwrap();
}

#[test]
fn reads_a_small_folder() {
    let d = scratch("ok");
    write_questions(
        &d,
        r#"[["what color is the shape?", "red", 0], ["is there a circle?", "yes", 0],
            ["is there not a blue shape?", "yes", 1], ["what shape is present?", "triangle", 1]]"#,
    );
    write_png(&d, 0);
    write_png(&d, 1);
    let set = EasyVqa::open(&d, Split::Train).unwrap();
    assert_eq!((set.len(), set.num_questions()), (2, 4));
    let s = set.get(0).unwrap();
    assert_eq!(
        (s.image.width(), s.kind, s.split, s.index),
        (64, Kind::EasyVqa, Split::Train, 0)
    );
    assert_eq!(s.caption, "A red circle.");
    assert_eq!(s.qa[0].category, QaCategory::Colour);
    assert_eq!(s.qa[1].category, QaCategory::Exists);
    // "is there not a blue shape? yes" says nothing about the colour that is there: it is
    // read from the pixels (a flat red image).
    assert_eq!(set.get(1).unwrap().caption, "A red triangle.");
    assert!(set.get(2).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn missing_folder_names_the_questions_file() {
    let d = std::env::temp_dir().join("afm-train-no-such-dir");
    let e = EasyVqa::open(&d, Split::HeldOut).unwrap_err().to_string();
    assert!(e.contains("test/questions.json"), "{e}");
    let e = answers(&d).unwrap_err().to_string();
    assert!(e.contains("answers.txt"), "{e}");
}

#[test]
fn corrupt_questions_name_the_file() {
    for (name, text) in [
        ("trunc", r#"[["what color is the shape?", "red", 0"#),
        ("object", r#"{"questions": []}"#),
        ("badrow", r#"[["what color is the shape?", 0]]"#),
        ("empty", "[]"),
    ] {
        let d = scratch(name);
        write_questions(&d, text);
        let e = EasyVqa::open(&d, Split::Train).unwrap_err().to_string();
        assert!(e.contains("train/questions.json"), "{name}: {e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn missing_or_corrupt_images_name_the_image() {
    let d = scratch("img");
    write_questions(&d, r#"[["is there a circle?", "yes", 7]]"#);
    let e = EasyVqa::open(&d, Split::Train).unwrap_err().to_string();
    assert!(e.contains("7.png"), "{e}");
    std::fs::write(d.join("train/images/7.png"), b"not a png").unwrap();
    let set = EasyVqa::open(&d, Split::Train).unwrap();
    let e = set.get(0).unwrap_err().to_string();
    assert!(e.contains("images/7.png"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn real_easy_vqa_data() {
    let Some(dir) = common::easy_vqa_dir() else {
        return;
    };
    let ans = answers(&dir).unwrap();
    assert_eq!(ans.len(), 13, "{ans:?}");
    for (split, images, questions) in [(Split::Train, 4000, 38_575), (Split::HeldOut, 1000, 9_673)]
    {
        let set = EasyVqa::open(&dir, split).unwrap();
        assert_eq!(
            (set.len(), set.num_questions()),
            (images, questions),
            "{split:?}"
        );
        let mut n_q = 0;
        let (mut shape_checked, mut shape_wrong) = (0, 0);
        for i in 0..set.len() {
            let s = set.get(i).unwrap();
            assert_eq!((s.image.width(), s.image.height()), (64, 64));
            let Truth::EasyVqa {
                colour,
                shape,
                image_id,
            } = &s.truth
            else {
                panic!()
            };
            assert_eq!(*image_id as u64, s.index);
            // Every image gets its colour and shape (from its questions or its pixels), and
            // the pixel reading agrees with the questions wherever they tell.
            assert!(
                colour.is_some() && shape.is_some(),
                "{split:?} {}: {}",
                s.index,
                s.caption
            );
            // (The shape from pixels is a rough fill-ratio guess, right for most images.)
            let (pc, ps) = easy_vqa::colour_and_shape_from_pixels(&s.image).expect("a shape");
            for q in &s.qa {
                match q.category {
                    QaCategory::Colour => assert_eq!(q.answer, pc, "{split:?} {}", s.index),
                    QaCategory::Shape => {
                        shape_checked += 1;
                        if q.answer != ps {
                            shape_wrong += 1;
                        }
                    }
                    _ => {}
                }
            }
            let (c, sh) = (colour.as_deref().unwrap(), shape.as_deref().unwrap());
            assert_eq!(s.caption, format!("A {c} {sh}."), "{split:?} {}", s.index);
            for q in &s.qa {
                assert!(ans.contains(&q.answer), "{:?}", q.answer);
                let yes_no = q.answer == "yes" || q.answer == "no";
                assert_eq!(yes_no, q.category == QaCategory::Exists, "{}", q.question);
            }
            n_q += s.qa.len();
        }
        assert_eq!(n_q, questions);
        eprintln!("{split:?}: shape from pixels wrong on {shape_wrong} of {shape_checked}");
        assert!(
            shape_wrong * 20 < shape_checked,
            "{shape_wrong} of {shape_checked}"
        );
    }
    assert_eq!(easy_vqa::DEFAULT_DIR, "models/easy-vqa");
}
