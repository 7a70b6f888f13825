//! Helpers shared by the afm-train integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use image::RgbImage;

/// Workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The easy-VQA data fetched by `scripts/fetch_easy_vqa.sh` (or named by `AFM_EASY_VQA_DIR`).
/// `None`, with a message saying how to get it, when absent: the test is then skipped, never
/// passed silently in CI (.ci/run fetches it and sets `AFM_REQUIRE_REAL_WEIGHTS=1`, which turns
/// the skip into a failure).
pub fn easy_vqa_dir() -> Option<PathBuf> {
    let p = afm_train::easy_vqa::data_dir(&root());
    if p.join("train/questions.json").exists() && p.join("test/questions.json").exists() {
        return Some(p);
    }
    let msg = format!(
        "SKIPPED: easy-VQA data not found at {}; run `bash scripts/fetch_easy_vqa.sh` to fetch it",
        p.display()
    );
    if std::env::var("AFM_REQUIRE_REAL_WEIGHTS").is_ok_and(|v| v == "1") {
        panic!("{msg} (AFM_REQUIRE_REAL_WEIGHTS=1)");
    }
    eprintln!("{msg}");
    None
}

/// Euclidean distance between two colours.
pub fn dist(a: [u8; 3], b: [u8; 3]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f32 - y as f32).powi(2))
        .sum::<f32>()
        .sqrt()
}

/// Number of 4-connected components of `mask` (width `w`) with at least `min_area` pixels.
pub fn components(mask: &[bool], w: usize, min_area: usize) -> usize {
    let h = mask.len() / w;
    let mut seen = vec![false; mask.len()];
    let mut n = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut area = 0;
        while let Some(i) = stack.pop() {
            area += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if area >= min_area {
            n += 1;
        }
    }
    n
}

/// Pixels of `img` within `tol` of `c`, eroded once (a pixel counts only when its four
/// neighbours match too), so anti-aliased edges that pass through `c` do not count.
pub fn colour_core_mask(img: &RgbImage, c: [u8; 3], tol: f32) -> Vec<bool> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let m: Vec<bool> = img.pixels().map(|p| dist(p.0, c) <= tol).collect();
    let mut out = vec![false; m.len()];
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let i = y * w + x;
            out[i] = m[i] && m[i - 1] && m[i + 1] && m[i - w] && m[i + w];
        }
    }
    out
}
