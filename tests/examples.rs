//! The top-level `examples/` run against the default model (afm-tiny with the real SmolLM2),
//! as a user runs them. `cargo test` builds the examples already; the test asks cargo again
//! (a no-op then, and a build when this test runs alone) and runs the binaries.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// `target/<profile>/examples`, after making sure the examples are built.
fn examples_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .current_dir(common::root())
            .args(["build", "--release", "--examples", "--quiet"])
            .status()
            .expect("running cargo");
        assert!(status.success(), "cargo build --release --examples failed");
        // this test runs from target/<profile>/deps/
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("examples")
    })
}

/// Runs an example from the workspace root with a private data directory; (stdout, stderr).
fn run(name: &str, args: &[&str]) -> Option<(String, String)> {
    let gguf = common::smollm2_gguf()?;
    let home = std::env::temp_dir().join(format!("afm-examples-{}", std::process::id()));
    let out = Command::new(examples_dir().join(name))
        .current_dir(common::root())
        .env("AFM_SMOLLM2_GGUF", gguf)
        .env("AFM_HOME", &home)
        .env("RAYON_NUM_THREADS", "2")
        .args(args)
        .output()
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (stdout, stderr) = (s(&out.stdout), s(&out.stderr));
    assert!(out.status.success(), "example {name}: {stderr}");
    Some((stdout, stderr))
}

#[test]
fn caption_captions_a_batch() {
    let Some((out, _)) = run(
        "caption",
        &["assets/images/scene.png", "assets/images/screen.png"],
    ) else {
        return;
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for (l, p) in lines.iter().zip(["scene.png", "screen.png"]) {
        let cap = l
            .strip_prefix(&format!("assets/images/{p}: "))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            !cap.starts_with("error") && cap.split_whitespace().count() >= 2,
            "{out}"
        );
    }
}

#[test]
fn vqa_follow_up_reuses_the_image_embeddings() {
    let Some((out, _)) = run(
        "vqa",
        &[
            "assets/images/scene.png",
            "What shapes are there?",
            "What colour are they?",
        ],
    ) else {
        return;
    };
    assert!(out.contains("(image from cache: true)"), "{out}");
    assert_eq!(
        out.matches("\nA: ").count() + usize::from(out.starts_with("A: ")),
        2,
        "{out}"
    );
}

#[test]
fn screen_describes_the_screenshot() {
    let Some((out, err)) = run("screen", &["assets/images/screen.png"]) else {
        return;
    };
    let d: afm::fusion::ScreenDescription = serde_json::from_str(&out).expect("typed JSON");
    assert_eq!(d.title, "Ignore Rule", "{out}");
    let buttons: Vec<&str> = d.buttons.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(buttons, ["Set Up"], "{out}");
    assert!(err.contains("image tokens"), "{err}");
}

#[test]
fn generate_streams_text() {
    let Some((out, err)) = run("generate", &["Say hello."]) else {
        return;
    };
    assert!(!out.trim().is_empty(), "{out}");
    assert!(err.contains("tok/s"), "{err}");
}

#[test]
fn server_model_runs_pt_moe_and_the_device_model_through_one_trait() {
    let Some((out, _)) = run("server_model", &[]) else {
        return;
    };
    assert!(out.contains("PT-MoE: 2 tracks"), "{out}");
    assert!(out.contains("server PT-MoE (8 layers"), "{out}");
    assert!(out.contains("on-device SmolLM2 (30 layers"), "{out}");
    assert!(out.contains("(16 tokens)"), "{out}");
}

#[test]
fn respond_as_fills_in_a_rust_type() {
    let Some((out, err)) = run("respond_as", &["Describe a penguin."]) else {
        return;
    };
    assert_eq!(out.matches("Animal {").count(), 2, "{out}");
    for k in ["name:", "legs:", "can_fly:", "colours:"] {
        assert!(out.contains(k), "{out}");
    }
    assert!(err.contains("partial: {"), "{err}");
}
