//! The highlighted-button mark (`afm_fusion::vlm::highlighted_line`) on generated screens:
//! of the screens with two or more buttons, how often the line marked highlighted is the
//! primary button's label, how often none is marked, and how often another line is.
//! Usage: find_highlight [SCREENS] [READER_DIR] [train|held_out]
//! (develop on the training split; the held-out figure is the probe)
use afm_train::{generate, Split, SynthKind, Truth};
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map_or(Ok(300), |s| s.parse())?;
    let dir = args
        .get(2)
        .map_or("assets/stages/reader-2026-12-04/reader", String::as_str);
    let split = match args.get(3).map(String::as_str) {
        Some("held_out") => Split::HeldOut,
        _ => Split::Train,
    };
    let sr = afm_fusion::vlm::ScreenReader::from_dir(Path::new(dir))?;
    let (mut screens, mut right, mut none, mut wrong, mut lone) = (0, 0, 0, 0, 0);
    for i in 0..n {
        let s = generate(SynthKind::Screen, split, i);
        let Truth::Screen(t) = &s.truth else { continue };
        let lines = sr.read_lines(&s.image)?;
        let marked = lines.iter().find(|l| l.highlighted);
        if t.buttons.len() < 2 {
            lone += usize::from(marked.is_some());
            continue;
        }
        screens += 1;
        let Some(p) = t.buttons.iter().find(|b| b.primary) else {
            continue;
        };
        let r = &p.label.rect;
        match marked {
            None => none += 1,
            Some(l) => {
                let g = l.region;
                let hit = g.x < r.x + r.w && r.x < g.x + g.w && g.y < r.y + r.h && r.y < g.y + g.h;
                if hit {
                    right += 1;
                } else {
                    wrong += 1;
                    println!(
                        "screen {i}: marked {:?}, primary {:?}",
                        l.text, p.label.text
                    );
                }
            }
        }
    }
    println!(
        "{n} {} screens, {screens} with 2+ buttons: the primary marked {right}, none marked {none}, another line marked {wrong}; screens with one button or none, one marked: {lone}",
        split.name()
    );
    Ok(())
}
