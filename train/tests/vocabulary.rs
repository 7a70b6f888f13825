//! The stated UI vocabulary: at least 300 words, and the committed word list
//! (`train/assets/data/ui_vocabulary.txt`) is exactly the one in the code; so is the held-out
//! word list (`train/assets/data/held_out_vocabulary.txt`).
//! `AFM_UPDATE_ASSETS=1 cargo test -p afm-train --test vocabulary` rewrites the files.

use afm_train::vocab;

#[test]
fn vocabulary_has_at_least_300_distinct_words() {
    let w = vocab::ui_words();
    assert!(w.len() >= 300, "{}", w.len());
    let mut sorted = w.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), w.len());
    assert!(w.iter().all(|x| !x.is_empty() && !x.contains(' ')));
}

#[test]
fn vocabulary_file_matches_the_code() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data/ui_vocabulary.txt");
    let want = vocab::vocabulary_file_text();
    if std::env::var("AFM_UPDATE_ASSETS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &want).expect("write the vocabulary file");
    }
    let have = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (AFM_UPDATE_ASSETS=1 writes it)", path.display()));
    assert!(
        have == want,
        "{} differs from vocab::ui_words(); rerun with AFM_UPDATE_ASSETS=1",
        path.display()
    );
}

#[test]
fn held_out_vocabulary_file_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/data/held_out_vocabulary.txt");
    let want = vocab::held_out_vocabulary_file_text();
    if std::env::var("AFM_UPDATE_ASSETS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &want).expect("write the held-out vocabulary file");
    }
    let have = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (AFM_UPDATE_ASSETS=1 writes it)", path.display()));
    assert!(
        have == want,
        "{} differs from vocab::held_out_words(); rerun with AFM_UPDATE_ASSETS=1",
        path.display()
    );
}
