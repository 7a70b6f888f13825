//! Fits the object finder's shape classes (`shapes.json`) on training pictures, and scores
//! the finder (shape and colour named per object, pictures whose objects were all found).
//! Usage: fit_shapes OUT_DIR [SCENES] [EASY_VQA_IMAGES] [--held-out]
//! Fits on SCENES generated training scenes and the first EASY_VQA_IMAGES of easy-VQA's
//! training split, writes OUT_DIR/shapes.json, and scores other training pictures; with
//! `--held-out` also the held-out split (the probe: measure once, never tune to it).
use afm_train::shape_fit::{fit, score, FinderScore};
use afm_train::{generate, EasyVqa, Sample, Split, SynthKind};
use std::path::Path;

fn report(what: &str, s: &FinderScore) {
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    println!(
        "{what}: shapes {}/{} ({:.1}%), colours {}/{} ({:.1}%), scenes with every object found {}/{}",
        s.shape_right,
        s.objects,
        pct(s.shape_right, s.objects),
        s.colour_right,
        s.with_colour,
        pct(s.colour_right, s.with_colour),
        s.pictures_counted,
        s.pictures
    );
    for ((t, said), n) in &s.confusions {
        println!("  shape {t} -> {said}: {n}");
    }
    for ((t, said), n) in &s.colour_confusions {
        println!("  colour {t} -> {said}: {n}");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = Path::new(
        args.get(1)
            .ok_or("usage: fit_shapes OUT_DIR [SCENES] [EASY_VQA_IMAGES] [--held-out]")?,
    );
    let n_scenes: u64 = args.get(2).map_or(Ok(2000), |s| s.parse())?;
    let n_easy: usize = args.get(3).map_or(Ok(2000), |s| s.parse())?;
    let held_out = args.iter().any(|a| a == "--held-out");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let easy_dir = afm_train::easy_vqa::data_dir(&root);
    let easy = EasyVqa::open(&easy_dir, Split::Train)?;
    let easy_samples = |d: &EasyVqa, r: std::ops::Range<usize>| -> Vec<Sample> {
        r.filter_map(|i| d.get(i).ok()).collect()
    };
    let train: Vec<Sample> = (0..n_scenes)
        .map(|i| generate(SynthKind::Scene, Split::Train, i))
        .chain(easy_samples(&easy, 0..n_easy.min(easy.len())))
        .collect();
    let classes = fit(train.into_iter());
    for c in &classes.classes {
        println!("class {} from {} examples", c.name, c.examples);
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("shapes.json"), serde_json::to_string(&classes)?)?;
    println!("wrote {}", out.join("shapes.json").display());
    // other training pictures
    let other: Vec<Sample> = (100_000..100_500)
        .map(|i| generate(SynthKind::Scene, Split::Train, i))
        .chain(easy_samples(
            &easy,
            n_easy.min(easy.len())..easy.len().min(n_easy + 500),
        ))
        .collect();
    report(
        "training split (not fitted on)",
        &score(&classes, other.into_iter()),
    );
    if held_out {
        let scenes: Vec<Sample> = (0..500)
            .map(|i| generate(SynthKind::Scene, Split::HeldOut, i))
            .collect();
        report("held-out scenes", &score(&classes, scenes.into_iter()));
        let test = EasyVqa::open(&easy_dir, Split::HeldOut)?;
        report(
            "held-out easy-VQA",
            &score(
                &classes,
                easy_samples(&test, 0..test.len().min(500)).into_iter(),
            ),
        );
    }
    Ok(())
}
