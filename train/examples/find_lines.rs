//! The line finder on held-out screens: how many titles, buttons and strings have a found
//! line matched to them, and (with a reader export) how many are read exactly end to end.
//! Usage: find_lines SCREENS [READER_DIR|-] [DUMP.png] [train|held_out]
//! (develop the finder on the training split; the held-out figure is the probe)
use afm_train::reader_train::{match_found, read_found, screen_strings};
use afm_train::{generate, Split, SynthKind, Truth};
use afm_vision::reader::TextReader;
use afm_vision::text_lines::LineFinder;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map_or(Ok(60), |s| s.parse())?;
    let finder = LineFinder::default();
    let split = match args.get(4).map(String::as_str) {
        Some("train") => Split::Train,
        _ => Split::HeldOut,
    };
    let (mut tb, mut tb_found, mut all, mut all_found, mut lines) = (0, 0, 0, 0, 0);
    for i in 0..n {
        let s = generate(SynthKind::Screen, split, i);
        let Truth::Screen(t) = &s.truth else { continue };
        let found = finder.find(&s.image);
        lines += found.len();
        for (role, it) in screen_strings(t) {
            let m = match_found(&it.rect, &found).is_some();
            all += 1;
            all_found += usize::from(m);
            if role == "title" || role == "button" {
                tb += 1;
                tb_found += usize::from(m);
                if !m && i < 20 {
                    let near: Vec<_> = found
                        .iter()
                        .filter(|r| r.y + r.h > it.rect.y && r.y < it.rect.bottom())
                        .collect();
                    println!(
                        "screen {i}: {role} {:?} at {:?} not found; on its rows: {near:?}",
                        it.text, it.rect
                    );
                }
            } else if !m && i < 3 {
                println!(
                    "screen {i}: {role} {:?} at {:?} not found",
                    it.text, it.rect
                );
            }
        }
        if i == 9 {
            for r in found.iter().filter(|r| r.y > 80 && r.y < 160) {
                println!("  found {r:?}");
            }
            if let Some(p) = args.get(3).filter(|p| !p.is_empty()) {
                let mut img = s.image.clone();
                for r in &found {
                    for x in r.x..r.x + r.w {
                        img.put_pixel(x, r.y, image::Rgb([255, 0, 0]));
                        img.put_pixel(x, r.y + r.h - 1, image::Rgb([255, 0, 0]));
                    }
                }
                img.save(p)?;
            }
        }
    }
    println!("{n} {} screens:", split.name());
    println!(
        "   {lines} lines found; titles and buttons with a found line {tb_found}/{tb}, all strings {all_found}/{all}"
    );
    if let Some(dir) = args.get(2).filter(|d| !d.is_empty() && *d != "-") {
        let reader = TextReader::from_dir(Path::new(dir))?;
        let f = read_found(&reader, split, n as usize)?;
        println!(
            "end to end: titles {}/{}, buttons {}/{} read exactly ({:.1}%; unseen words {}/{}), strings {}/{}, character error rate {:.2}%",
            f.titles_exact, f.titles, f.buttons_exact, f.buttons, 100.0 * f.titles_buttons_exact(),
            f.unseen_exact, f.unseen, f.strings_exact, f.strings, 100.0 * f.cer
        );
        for (want, got) in &f.examples {
            println!("  {want:?} read as {got:?}");
        }
    }
    Ok(())
}
