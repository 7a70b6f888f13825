//! Sessions over the vision-language pipeline (the tiny random Idefics3 fixture): images as
//! attachments, counted before the run; a follow-up turn re-encodes no image and prefills
//! no earlier turn, and answers as a fresh run of the whole conversation does; transcripts
//! with image paths round-trip; the typed screen description always parses.

use afm_fusion::session::attachment;
use afm_fusion::{ScreenDescription, Vlm};
use afm_lm::{Entry, GenerationOptions, Prompt, Segment, Session, Transcript};
use afm_vision::{load_image, ImageLimits};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tiny_idefics3")
}

fn opts(n: usize) -> GenerationOptions {
    GenerationOptions {
        max_tokens: n,
        ..Default::default()
    }
}

/// The transcript with every image's pixels dropped (only its key and size left).
fn without_pixels(t: &Transcript) -> Transcript {
    let mut t = t.clone();
    for e in &mut t.entries {
        if let Entry::Prompt { segments } = e {
            for s in segments {
                if let Segment::Image(a) = s {
                    a.rgb = None;
                    a.path = None;
                }
            }
        }
    }
    t
}

#[test]
fn follow_up_about_an_image_reuses_the_cache() {
    let vlm = Vlm::load_idefics3(&dir()).unwrap();
    let img = load_image(&dir().join("sample.png"), &ImageLimits::default()).unwrap();
    let plan = vlm.plan(img.width(), img.height(), None).unwrap();
    let mut s = Session::new(&vlm);
    s.options = opts(8);
    let p1 = Prompt::default()
        .image(attachment(&img))
        .then("What is in the picture?");
    // the image's tokens are counted before anything runs
    let with = s.count_tokens(p1.clone()).unwrap();
    let without = s.count_tokens("What is in the picture?").unwrap();
    assert!(
        with >= without + plan.image_tokens,
        "{with} {without} {plan:?}"
    );
    let r1 = s.respond(p1).unwrap();
    assert_eq!(r1.stats.prompt_tokens, with);
    // turn 2 with the pixels gone from the transcript: it can only work if the image is
    // neither encoded again nor prefilled again
    let t = without_pixels(s.transcript());
    s.set_transcript(t);
    let r2 = s.respond("And what colour is it?").unwrap();
    assert!(
        r2.stats.reused_tokens >= r1.stats.prompt_tokens,
        "{:?} {:?}",
        r2.stats,
        r1.stats
    );
    // a fresh session without the cache needs the pixels, and says so
    let mut t = s.transcript().clone();
    let last = t.entries.pop().unwrap();
    let q = t.entries.pop().unwrap();
    let mut f = Session::from_transcript(&vlm, t.clone());
    f.options = opts(8);
    let e = f.respond("And what colour is it?").unwrap_err();
    assert!(e.to_string().contains("no pixels"), "{e}");
    // with the pixels back, the fresh run of the whole conversation answers the same
    if let Entry::Prompt { segments } = &mut t.entries[0] {
        segments[0] = Segment::Image(attachment(&img));
    }
    let mut f = Session::from_transcript(&vlm, t);
    f.options = opts(8);
    let Entry::Prompt { segments } = q else {
        panic!()
    };
    let r3 = f.respond(Prompt { segments }).unwrap();
    assert_eq!(r3.stats.reused_tokens, 0);
    assert_eq!(Entry::Response { text: r3.text }, last);
}

#[test]
fn transcript_with_an_image_path_round_trips() {
    let vlm = Vlm::load_idefics3(&dir()).unwrap();
    let path = dir().join("sample.png");
    let img = load_image(&path, &ImageLimits::default()).unwrap();
    let mut s = Session::new(&vlm);
    s.options = opts(4);
    s.respond(
        Prompt::default()
            .image(attachment(&img).with_path(&path))
            .then("Describe it."),
    )
    .unwrap();
    let json = serde_json::to_string(s.transcript()).unwrap();
    assert!(!json.contains("rgb"), "pixels are not serialised");
    let back: Transcript = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s.transcript());
    // a new session reads the pixels from the path to prefill the conversation
    let mut r = Session::from_transcript(&vlm, back);
    r.options = opts(4);
    r.respond("More.").unwrap();
}

#[test]
fn typed_screen_description_always_parses() {
    let vlm = Vlm::load_idefics3(&dir()).unwrap();
    let img = load_image(&dir().join("sample.png"), &ImageLimits::default()).unwrap();
    for seed in 0..3 {
        let o = GenerationOptions {
            temperature: 1.0,
            seed,
            ..Default::default()
        };
        let d: ScreenDescription = vlm.describe_screen_typed(&img, None, &o).unwrap();
        assert!(
            d.title.chars().count() <= 60 && d.buttons.len() <= 8,
            "{d:?}"
        );
    }
}
