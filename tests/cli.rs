//! The `afm` binary: `generate` streams the answer to stdout and the figures to stderr; bad
//! input gives a message, not a panic.

mod common;

use std::process::Command;

fn afm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_afm"))
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let Some(model) = common::smollm2_gguf() else {
        return;
    };
    let out = afm()
        .args([
            "--threads",
            "2",
            "generate",
            "--max-tokens",
            "16",
            "--model",
        ])
        .arg(&model)
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.trim().is_empty());
    for k in ["load", "prefill", "tok/s", "decode"] {
        assert!(stderr.contains(k), "stderr lacks {k}: {stderr}");
    }
}

#[test]
fn bad_model_path_and_bad_flags_fail_cleanly() {
    let out = afm()
        .args(["generate", "--model", "/nonexistent.gguf", "hi"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent.gguf") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let Some(model) = common::smollm2_gguf() else {
        return;
    };
    let out = afm()
        .args(["generate", "--top-p", "0", "--model"])
        .arg(&model)
        .arg("hi")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("top_p") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
