//! Generated screenshots: every label in the ground truth is drawn where it says, with the
//! pixels it says; the layout is sane; the questions agree with the ground truth; titles and
//! button labels come from the stated vocabulary (and, in the held-out split, the held-out
//! words).

mod common;

use std::collections::HashMap;

use afm_train::screens::{ScreenTruth, TextItem, WindowKind};
use afm_train::{font, generate, vocab, QaCategory, Rect, Sample, Split, SynthKind, Truth};
use common::dist;
use image::{Rgb, RgbImage};

const N: u64 = 120;

fn screen(split: Split, i: u64) -> (Sample, ScreenTruth) {
    let s = generate(SynthKind::Screen, split, i);
    let t = match &s.truth {
        Truth::Screen(t) => (**t).clone(),
        other => panic!("not a screen: {other:?}"),
    };
    (s, t)
}

fn all_screens() -> Vec<(Sample, ScreenTruth)> {
    [Split::Train, Split::HeldOut]
        .into_iter()
        .flat_map(|sp| (0..N).map(move |i| screen(sp, i)))
        .collect()
}

/// The most common colour inside `r`.
fn mode(img: &RgbImage, r: Rect) -> [u8; 3] {
    let mut counts: HashMap<[u8; 3], usize> = HashMap::new();
    for y in r.y..r.bottom() {
        for x in r.x..r.right() {
            *counts.entry(img.get_pixel(x, y).0).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(c, n)| (*n, *c))
        .map(|(c, _)| c)
        .unwrap_or([0, 0, 0])
}

/// Re-renders `t` alone over the flat background of its line box and checks that the
/// screenshot has exactly those pixels there, and that they contain ink of the text colour.
fn assert_text_drawn(img: &RgbImage, t: &TextItem, what: &str) {
    assert!(!t.text.is_empty(), "{what}: empty text");
    let r = t.rect;
    assert!(r.w > 0 && r.h > 0, "{what} {:?}: empty rect", t.text);
    let bg = mode(img, r);
    // Rendered into a small canvas shifted by whole pixels, which leaves coverage unchanged.
    let m = 8;
    let mut reference = RgbImage::from_pixel(r.w + 2 * m, r.h + 2 * m, Rgb(bg));
    let (ox, oy) = (
        t.origin[0] - r.x as f32 + m as f32,
        t.origin[1] - r.y as f32 + m as f32,
    );
    font::draw_text(&mut reference, t.style(), ox, oy, &t.text);
    let (mut ink, mut solid, mut diff) = (0, 0, 0);
    for y in r.y..r.bottom() {
        for x in r.x..r.right() {
            let a = img.get_pixel(x, y).0;
            let b = reference.get_pixel(x - r.x + m, y - r.y + m).0;
            if b != bg {
                ink += 1;
            }
            if dist(a, t.color) < dist(bg, t.color) / 2.0 {
                solid += 1;
            }
            if dist(a, b) > 2.0 {
                diff += 1;
            }
        }
    }
    assert_eq!(
        diff, 0,
        "{what} {:?}: {diff} pixels of its box differ from the text rendered alone",
        t.text
    );
    let glyphs = t.text.chars().filter(|c| !c.is_whitespace()).count();
    assert!(
        ink >= 4 * glyphs,
        "{what} {:?}: only {ink} ink pixels",
        t.text
    );
    assert!(
        solid >= glyphs,
        "{what} {:?}: only {solid} pixels at least half-way to the text colour {:?}",
        t.text,
        t.color
    );
}

#[test]
fn every_text_in_the_truth_is_drawn_exactly_there() {
    for (s, t) in all_screens() {
        let img = &s.image;
        let id = format!("{:?} {}", s.split, s.index);
        assert_text_drawn(img, &t.title, &format!("{id} title"));
        for m in &t.menu {
            assert_text_drawn(img, m, &format!("{id} menu"));
        }
        if let Some(m) = &t.message {
            assert_text_drawn(img, m, &format!("{id} message"));
        }
        for b in &t.buttons {
            assert_text_drawn(img, &b.label, &format!("{id} button"));
            assert!(
                b.rect.contains(&b.label.rect),
                "{id}: button label outside its button"
            );
        }
        for f in &t.fields {
            assert_text_drawn(img, &f.label, &format!("{id} field label"));
            assert_text_drawn(img, &f.content, &format!("{id} field content"));
            assert!(
                f.rect.contains(&f.content.rect),
                "{id}: content outside its field"
            );
        }
        for c in &t.checkboxes {
            assert_text_drawn(img, &c.label, &format!("{id} checkbox"));
        }
        if let Some(l) = &t.list {
            for (item, row) in l.items.iter().zip(&l.row_rects) {
                assert_text_drawn(img, item, &format!("{id} list item"));
                assert!(row.contains(&item.rect), "{id}: item outside its row");
                assert!(l.rect.contains(row), "{id}: row outside the list");
            }
        }
        if let Some(st) = &t.status {
            assert_text_drawn(img, st, &format!("{id} status"));
        }
    }
}

#[test]
fn buttons_show_their_label_colour_on_their_background() {
    for (s, t) in all_screens() {
        for b in &t.buttons {
            let r = b.rect;
            let mut text_px = 0;
            for y in r.y..r.bottom() {
                for x in r.x..r.right() {
                    let p = s.image.get_pixel(x, y).0;
                    if dist(p, b.label.color) < dist(b.background, b.label.color) / 2.0 {
                        text_px += 1;
                    }
                }
            }
            assert!(
                text_px >= b.label.text.len(),
                "{:?} {}: button {:?} has {text_px} pixels of its text colour",
                s.split,
                s.index,
                b.label.text
            );
            // The background named in the truth is the button's own colour.
            let centre_row = r.y + r.h / 2;
            assert_eq!(s.image.get_pixel(r.x + 3, centre_row).0, b.background);
        }
    }
}

#[test]
fn layout_is_inside_the_window_and_nothing_overlaps() {
    for (s, t) in all_screens() {
        let id = format!("{:?} {}", s.split, s.index);
        let canvas = Rect::new(0, 0, t.width, t.height);
        assert_eq!((s.image.width(), s.image.height()), (t.width, t.height));
        assert!(
            canvas.contains(&t.window_rect),
            "{id}: window outside the canvas"
        );
        let mut rects: Vec<(String, Rect)> = vec![("title".into(), t.title.rect)];
        rects.extend(t.menu.iter().map(|m| (format!("menu {}", m.text), m.rect)));
        rects.extend(t.message.iter().map(|m| ("message".into(), m.rect)));
        rects.extend(t.status.iter().map(|m| ("status".into(), m.rect)));
        for f in &t.fields {
            rects.push((format!("label {}", f.label.text), f.label.rect));
            rects.push((format!("field {}", f.label.text), f.rect));
        }
        for c in &t.checkboxes {
            rects.push((format!("box {}", c.label.text), c.box_rect));
            rects.push((format!("check {}", c.label.text), c.label.rect));
        }
        if let Some(l) = &t.list {
            rects.push(("list".into(), l.rect));
        }
        for b in &t.buttons {
            rects.push((format!("button {}", b.label.text), b.rect));
        }
        for (name, r) in &rects {
            assert!(
                t.window_rect.contains(r),
                "{id}: {name} {r:?} outside the window"
            );
        }
        for i in 0..rects.len() {
            for j in i + 1..rects.len() {
                assert!(
                    !rects[i].1.intersects(&rects[j].1),
                    "{id}: {} {:?} overlaps {} {:?}",
                    rects[i].0,
                    rects[i].1,
                    rects[j].0,
                    rects[j].1
                );
            }
        }
        // Buttons left to right, one primary.
        for w in t.buttons.windows(2) {
            assert!(
                w[0].rect.right() <= w[1].rect.x,
                "{id}: buttons out of order"
            );
        }
        assert_eq!(t.buttons.iter().filter(|b| b.primary).count(), 1, "{id}");
        assert!((1..=3).contains(&t.buttons.len()), "{id}");
    }
}

/// Number of runs of pixel rows inside the list that hold anything but their row background;
/// runs closer than `merge` rows (an underscore below its word) count as one.
fn drawn_rows(img: &RgbImage, r: Rect, merge: u32) -> usize {
    let mut runs = 0;
    let mut last_ink: Option<u32> = None;
    for y in r.y + 1..r.bottom() - 1 {
        let bg = img.get_pixel(r.x + 1, y).0;
        let ink = (r.x + 3..r.right() - 3).any(|x| dist(img.get_pixel(x, y).0, bg) > 40.0);
        if ink {
            if last_ink.is_none_or(|l| y - l > merge) {
                runs += 1;
            }
            last_ink = Some(y);
        }
    }
    runs
}

#[test]
fn list_item_count_equals_the_rows_drawn() {
    let mut lists = 0;
    for (s, t) in all_screens() {
        if let Some(l) = &t.list {
            lists += 1;
            assert_eq!(
                drawn_rows(&s.image, l.rect, (t.font_px * 0.3) as u32 + 1),
                l.items.len(),
                "{:?} {}: items {:?}",
                s.split,
                s.index,
                l.item_texts()
            );
            let q =
                s.qa.iter()
                    .find(|q| q.category == QaCategory::ListCount)
                    .expect("a list count question");
            assert_eq!(q.answer, l.items.len().to_string());
        }
    }
    assert!(lists > 40, "only {lists} screens with a list");
}

#[test]
fn questions_agree_with_the_truth() {
    let mut seen: HashMap<QaCategory, usize> = HashMap::new();
    for (s, t) in all_screens() {
        let id = format!("{:?} {}", s.split, s.index);
        for q in &s.qa {
            *seen.entry(q.category).or_default() += 1;
            assert!(
                !q.answer.is_empty(),
                "{id}: empty answer to {:?}",
                q.question
            );
        }
        let ask = |question: &str| -> Option<&str> {
            s.qa.iter()
                .find(|q| q.question == question)
                .map(|q| q.answer.as_str())
        };
        let what = match t.window_kind {
            WindowKind::Window => "window",
            WindowKind::Dialog => "dialog",
        };
        assert_eq!(
            ask(&format!("What is the title of the {what}?")),
            Some(t.title.text.as_str()),
            "{id}"
        );
        let b = &t.buttons;
        assert_eq!(
            ask("How many buttons are there?"),
            Some(b.len().to_string().as_str())
        );
        if b.len() >= 2 {
            assert_eq!(
                ask("What does the button on the right say?"),
                Some(b[b.len() - 1].label.text.as_str()),
                "{id}"
            );
            assert_eq!(
                ask("What does the button on the left say?"),
                Some(b[0].label.text.as_str()),
                "{id}"
            );
        }
        for f in &t.fields {
            assert_eq!(
                ask(&format!("What is in the {} field?", f.label.text)),
                Some(f.content.text.as_str()),
                "{id}"
            );
        }
        for c in &t.checkboxes {
            let a = if c.checked { "yes" } else { "no" };
            assert_eq!(
                ask(&format!("Is \"{}\" checked?", c.label.text)),
                Some(a),
                "{id}"
            );
        }
        // The description names the title, every button and every field content.
        assert!(s.caption.contains(&t.title.text), "{id}: {}", s.caption);
        for b in b {
            assert!(s.caption.contains(&b.label.text), "{id}: {}", s.caption);
        }
        for f in &t.fields {
            assert!(s.caption.contains(&f.content.text), "{id}: {}", s.caption);
        }
    }
    for c in [
        QaCategory::Title,
        QaCategory::Button,
        QaCategory::ButtonCount,
        QaCategory::Field,
        QaCategory::ListCount,
        QaCategory::ListItem,
        QaCategory::Checkbox,
        QaCategory::Message,
    ] {
        assert!(
            seen.get(&c).copied().unwrap_or(0) > 10,
            "few {c:?} questions: {seen:?}"
        );
    }
}

#[test]
fn titles_buttons_menus_and_checkboxes_come_from_the_vocabulary() {
    let mut labels = 0;
    let mut distinct = std::collections::HashSet::new();
    for (s, t) in all_screens() {
        let mut all: Vec<&str> = vec![t.title.text.as_str()];
        all.extend(t.buttons.iter().map(|b| b.label.text.as_str()));
        all.extend(t.menu.iter().map(|m| m.text.as_str()));
        all.extend(t.checkboxes.iter().map(|c| c.label.text.as_str()));
        // Held-out titles and button labels may also hold words never seen in training
        // (`vocab::held_out_words`, tested in tests/held_out_words.rs); menus and checkboxes
        // never do, and training screens never do.
        let held_out = s.split == Split::HeldOut;
        for (k, l) in all.into_iter().enumerate() {
            let may_hold_unseen = held_out && k <= t.buttons.len();
            if may_hold_unseen {
                assert!(
                    l.split(' ')
                        .all(|w| vocab::in_vocabulary(w) || vocab::is_held_out_word(w)),
                    "{l:?} is in neither word list"
                );
            } else {
                assert!(vocab::in_vocabulary(l), "{l:?} is not in the UI vocabulary");
            }
            labels += 1;
            for w in l.split(' ').filter(|w| vocab::in_vocabulary(w)) {
                distinct.insert(w.to_string());
            }
        }
    }
    // The generator draws on a good part of the UI vocabulary, not a handful of words.
    assert!(labels > 500, "{labels}");
    assert!(
        distinct.len() > 250,
        "only {} distinct words drawn",
        distinct.len()
    );
}

#[test]
fn there_are_windows_dialogs_and_maximised_windows_at_realistic_sizes() {
    let all = all_screens();
    let dialogs = all
        .iter()
        .filter(|(_, t)| t.window_kind == WindowKind::Dialog)
        .count();
    let maxed = all.iter().filter(|(_, t)| t.maximized).count();
    assert!(dialogs > 20 && dialogs < all.len() / 2, "{dialogs} dialogs");
    assert!(maxed > 10, "{maxed} maximised");
    for (_, t) in &all {
        assert!((640..=1280).contains(&t.width) && (400..=800).contains(&t.height));
    }
}
