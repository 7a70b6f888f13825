//! The embedded default model, `assets/afm-tiny` (trained by `afm train`, model card in
//! `assets/afm-tiny/README.md`), with the real SmolLM2-135M-Instruct: the README's main command
//! captions the committed sample, and `afm eval` on the first held-out questions stays above a
//! floor well over chance (a regression guard: the model card's full figures come from
//! `afm eval` with its default 200 questions per bar).

mod common;

use serde_json::Value;
use std::process::Command;

fn afm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afm"));
    c.current_dir(common::root()).args(["--threads", "2"]);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_shipped_weights_are_small_and_name_the_default_lm() {
    let dir = common::root().join("assets/afm-tiny");
    let mut total = 0;
    for f in [
        "config.json",
        "adapter.safetensors",
        "vision/config.json",
        "vision/model.safetensors",
        "README.md",
    ] {
        let m = std::fs::metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        total += m.len();
    }
    assert!(total < 50_000_000, "{total} bytes");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "afm-tiny");
    assert_eq!(
        cfg["lm"]["sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
}

/// The README's main command: `cargo run --release -- caption assets/images/scene.png`.
#[test]
fn readme_main_command_captions_the_sample() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let out = afm()
        .env("AFM_SMOLLM2_GGUF", &gguf)
        .env(
            "AFM_HOME",
            std::env::temp_dir().join("afm-default-model-no-cache"),
        )
        .args(["caption", "assets/images/scene.png"])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let caption = stdout
        .strip_prefix("assets/images/scene.png: ")
        .unwrap_or_else(|| panic!("{stdout}"))
        .trim();
    assert!(caption.split_whitespace().count() >= 3, "{stdout}");
    assert!(stderr.contains("captioned"), "{stderr}");
}
