//! `afm caption`, `afm ask` and `afm screen` on the tiny random-weight SmolVLM checkpoint
//! (`tests/fixtures/hf_tiny_idefics3`: its text is gibberish, its plans and figures are real):
//! batch output in every format, per-image errors that do not stop the batch, streaming,
//! the image-token budget, dry runs, and one-line errors instead of panics.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_tiny_idefics3")
}

fn afm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afm"));
    c.args(["--threads", "1"]);
    c
}

/// `afm SUBCOMMAND --model FIXTURE --max-tokens 4 ARGS...`
fn run(sub: &str, args: &[&str]) -> Output {
    afm()
        .arg(sub)
        .arg("--model")
        .arg(fixture())
        .args(["--max-tokens", "4"])
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh directory with copies of the fixture's images and `extra` (name, bytes) files.
fn image_dir(name: &str, extra: &[(&str, &[u8])]) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-cli-vlm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["sample.png", "wide.png"] {
        std::fs::copy(fixture().join(f), d.join(f)).unwrap();
    }
    for (n, b) in extra {
        std::fs::write(d.join(n), b).unwrap();
    }
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_clean_failure(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one-line error expected: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

const FIELDS: &[&str] = &[
    "path",
    "caption",
    "generated_tokens",
    "prompt_tokens",
    "image_tokens",
    "tiles",
    "plan",
    "encode_ms",
    "prefill_ms",
    "decode_tok_s",
    "error",
];

#[test]
fn caption_two_images_jsonl() {
    let f = fixture();
    let (a, b) = (f.join("sample.png"), f.join("wide.png"));
    let out = run("caption", &["--jsonl", s(&a), s(&b)]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (v, p) in lines.iter().zip([&a, &b]) {
        for k in FIELDS {
            assert!(v.get(k).is_some(), "no field {k}: {v}");
        }
        assert_eq!(v["path"], s(p));
        assert!(v["error"].is_null(), "{v}");
        assert!(v["caption"].is_string());
        let n = v["generated_tokens"].as_u64().unwrap();
        assert!((1..=4).contains(&n), "{v}");
        assert!(v["prompt_tokens"].as_u64().unwrap() > v["image_tokens"].as_u64().unwrap());
        assert!(v["encode_ms"].as_f64().unwrap() > 0.0);
        assert!(v["prefill_ms"].as_f64().unwrap() > 0.0);
        assert!(v["decode_tok_s"].as_f64().is_some());
        assert!(v["plan"].as_str().unwrap().contains("image tokens"));
    }
    // 150x100 -> 128x86 -> 2x2 tiles of 64 + global, 16 tokens each; 190x80 -> 2x1 + global
    assert_eq!(
        (
            lines[0]["tiles"].as_u64(),
            lines[0]["image_tokens"].as_u64()
        ),
        (Some(5), Some(80))
    );
    assert_eq!(
        (
            lines[1]["tiles"].as_u64(),
            lines[1]["image_tokens"].as_u64()
        ),
        (Some(3), Some(48))
    );
    assert!(stderr.contains("2 of 2 image(s) captioned"), "{stderr}");
}

/// `--int8` runs the same pipeline with int8 projections (accuracy: `fusion/tests/int8.rs`).
#[test]
fn int8_flag_captions_with_the_same_plan() {
    let a = fixture().join("sample.png");
    let out32 = run("caption", &["--json", s(&a)]);
    let out8 = run("caption", &["--json", "--int8", s(&a)]);
    assert!(out8.status.success(), "{}", text(&out8.stderr));
    assert!(!text(&out8.stderr).contains("panicked"));
    let v32: Value = serde_json::from_str(&text(&out32.stdout)).unwrap();
    let v8: Value = serde_json::from_str(&text(&out8.stdout)).unwrap();
    assert!(v8[0]["error"].is_null(), "{v8}");
    assert!(v8[0]["caption"].is_string(), "{v8}");
    for k in ["tiles", "image_tokens", "prompt_tokens"] {
        assert_eq!(v8[0][k], v32[0][k], "{k}");
    }
}

#[test]
fn caption_directory_with_a_corrupt_image_goes_on_and_fails_at_the_end() {
    let png = std::fs::read(fixture().join("sample.png")).unwrap();
    let d = image_dir(
        "corrupt",
        &[
            ("broken.png", &png[..png.len() / 3]),
            ("garbage.jpg", b"not an image at all"),
            ("notes.txt", b"not picked up"),
        ],
    );
    // JSON lines: sorted, the text file skipped, errors in the `error` field
    let out = run("caption", &["--jsonl", s(&d)]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = v
        .iter()
        .map(|x| {
            Path::new(x["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        names,
        ["broken.png", "garbage.jpg", "sample.png", "wide.png"]
    );
    for x in &v[..2] {
        assert!(x["error"].as_str().is_some_and(|e| !e.is_empty()), "{x}");
        assert!(x["caption"].is_null());
    }
    for x in &v[2..] {
        assert!(x["error"].is_null(), "{x}");
        assert!(x["caption"].is_string());
    }
    assert!(
        stderr.contains("broken.png") && stderr.contains("garbage.jpg"),
        "{stderr}"
    );
    assert!(stderr.contains("2 of 4 image(s) failed"), "{stderr}");

    // plain lines: `path: caption` for the good ones, the bad ones on stderr
    let out = run("caption", &[s(&d)]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{}: ", s(&d.join("sample.png")))),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("{}: ", s(&d.join("wide.png")))),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("error: {}", s(&d.join("broken.png")))),
        "{stderr}"
    );

    // one JSON array at the end
    let out = run("caption", &["--json", s(&d)]);
    assert!(!out.status.success());
    let arr: Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = arr.as_array().unwrap();
    assert_eq!(arr.len(), 4);
    assert_eq!(arr.iter().filter(|x| x["error"].is_null()).count(), 2);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn ask_streams_the_answer_and_reports_figures() {
    let img = fixture().join("sample.png");
    let out = run("ask", &[s(&img), "What is in the picture?"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.trim().is_empty(), "empty answer");
    for k in [
        "load",
        "5 tiles",
        "80 image tokens",
        "encode",
        "prefill",
        "tok/s",
        "decode",
        "generated 4 tok",
    ] {
        assert!(stderr.contains(k), "stderr lacks {k}: {stderr}");
    }
}

#[test]
fn screen_describes_a_screenshot() {
    let img = fixture().join("wide.png");
    let out = run("screen", &[s(&img)]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.trim().is_empty());
    assert!(
        stderr.contains("3 tiles") && stderr.contains("decode"),
        "{stderr}"
    );
    // `--json`: the typed description, valid even from random weights (guided generation)
    for img in ["wide.png", "sample.png"] {
        let out = run("screen", &["--json", s(&fixture().join(img))]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{stderr}");
        let d: afm::fusion::ScreenDescription = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{img}: not a screen description ({e}): {stdout}"));
        assert!(d.buttons.len() <= 8, "{d:?}");
    }
}

#[test]
fn default_model_plans_without_a_model_flag() {
    // no --model: the embedded afm-tiny (assets/afm-tiny); a dry run reads only its config
    let img = fixture().join("sample.png");
    let out = afm()
        .args(["caption", "--dry-run", "--jsonl", s(&img)])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["image_tokens"], 36, "{v}");
    assert_eq!(v["tiles"], 1, "{v}");
}

/// An afm-tiny model directory whose config.json (the shipped one) has a `tiling` section:
/// a dry run reads only the config, so no weights are needed.
#[test]
fn afm_tiny_with_a_tiling_section_plans_overview_and_tiles() {
    let d = std::env::temp_dir().join(format!("afm-cli-tiling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/afm-tiny/config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
    cfg["tiling"] = serde_json::json!({"tile": 224, "max_tokens": 900, "overview": true});
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let shot = d.join("screenshot.png");
    afm::vision::image::RgbImage::from_pixel(1280, 800, afm::vision::image::Rgb([90, 90, 90]))
        .save(&shot)
        .unwrap();
    let plan = |extra: &[&str]| {
        let out = afm()
            .args(["caption", "--dry-run", "--jsonl", "--model"])
            .arg(&d)
            .args(extra)
            .arg(&shot)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        (v, text(&out.stderr))
    };
    // native resolution: 6x4 tiles of 224 px + the overview, 36 tokens each
    let (v, err) = plan(&[]);
    assert_eq!(
        (v["tiles"].as_u64(), v["image_tokens"].as_u64()),
        (Some(25), Some(900)),
        "{v}"
    );
    assert!(v["downscale"].is_null(), "{v}");
    assert!(
        v["plan"]
            .as_str()
            .unwrap()
            .contains("6x4 grid of 224 px + overview"),
        "{v}"
    );
    assert!(!err.contains("does not apply"), "{err}");
    // a budget below the native grid: downscaled, and the plan says so
    let (v, _) = plan(&["--image-max-tokens", "360"]);
    assert!(v["image_tokens"].as_u64().unwrap() <= 360, "{v}");
    assert!(v["downscale"].as_f64().unwrap() < 1.0, "{v}");
    assert!(v["plan"].as_str().unwrap().contains("downscaled"), "{v}");
    // below one tile: the same one-line error as every model
    let out = afm()
        .args([
            "caption",
            "--dry-run",
            "--image-max-tokens",
            "20",
            "--model",
        ])
        .arg(&d)
        .arg(&shot)
        .output()
        .unwrap();
    assert_clean_failure(&out, &["--image-max-tokens 20", "afm-tiny", "36 tokens"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn image_token_budget_reports_the_downscale() {
    let img = fixture().join("sample.png");
    let out = run("caption", &["--image-max-tokens", "16", "--jsonl", s(&img)]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("downscaled to longest edge 64 (50%)"),
        "{stderr}"
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (v["tiles"].as_u64(), v["image_tokens"].as_u64()),
        (Some(1), Some(16))
    );
    assert_eq!(v["downscale"].as_f64(), Some(0.5));

    let out = run("ask", &["--image-max-tokens", "16", s(&img), "what?"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("downscaled"), "{stderr}");

    // below one tile: one clear error before anything runs
    let out = run("caption", &["--image-max-tokens", "8", s(&img)]);
    assert_clean_failure(&out, &["--image-max-tokens 8", "16 tokens"]);
}

#[test]
fn dry_run_prints_plans_without_running_the_model() {
    let f = fixture();
    let out = run(
        "caption",
        &[
            "--dry-run",
            s(&f.join("sample.png")),
            s(&f.join("wide.png")),
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains("sample.png: 150x100 image -> 5 tiles")
            && lines[0].contains("80 image tokens"),
        "{stdout}"
    );
    assert!(
        lines[1].contains("wide.png: 190x80 image -> 3 tiles"),
        "{stdout}"
    );
    assert!(!stderr.contains("decode"), "the model ran: {stderr}");

    let out = run(
        "caption",
        &[
            "--dry-run",
            "--jsonl",
            "--image-max-tokens",
            "16",
            s(&f.join("sample.png")),
        ],
    );
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["tiles"].as_u64(), v["downscale"].as_f64()),
        (Some(1), Some(0.5))
    );
    assert!(v["caption"].is_null());

    for sub in [
        vec!["ask", "--dry-run", s(&f.join("wide.png")), "q"],
        vec!["screen", "--dry-run", s(&f.join("wide.png"))],
    ] {
        let out = run(sub[0], &sub[1..]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            stdout.contains("3 tiles") && stdout.contains("48 image tokens"),
            "{stdout}"
        );
    }
}

#[test]
fn bad_input_is_a_one_line_error_naming_the_path() {
    let f = fixture();
    let img = f.join("sample.png");
    let missing = f.join("no-such-image.png");
    let d = image_dir("bad", &[("garbage.png", b"\x89PNG but not really")]);
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("readme.txt"), "no images here").unwrap();
    let not_model = d.join("not-a-model");
    std::fs::create_dir_all(&not_model).unwrap();

    // missing file, before the model loads
    assert_clean_failure(&run("caption", &[s(&img), s(&missing)]), &[s(&missing)]);
    assert_clean_failure(&run("ask", &[s(&missing), "q"]), &[s(&missing)]);
    assert_clean_failure(&run("screen", &[s(&missing)]), &[s(&missing)]);
    // a directory without images
    assert_clean_failure(&run("caption", &[s(&empty)]), &[s(&empty), "no images"]);
    // a corrupt image on its own
    let garbage = d.join("garbage.png");
    assert_clean_failure(&run("ask", &[s(&garbage), "q"]), &[s(&garbage)]);
    assert_clean_failure(&run("screen", &[s(&garbage)]), &[s(&garbage)]);
    // bad model directories
    for (model, needle) in [
        (not_model.clone(), not_model.join("config.json")),
        (d.join("nope"), d.join("nope")),
        (img.clone(), img.clone()),
    ] {
        let out = afm()
            .args([
                "ask",
                "--max-tokens",
                "4",
                "--model",
                s(&model),
                s(&img),
                "q",
            ])
            .output()
            .unwrap();
        assert_clean_failure(&out, &[s(&needle)]);
    }
    // a truncated checkpoint
    let broken = d.join("broken-model");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&f).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, broken.join(p.file_name().unwrap())).unwrap();
    }
    let w = broken.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let out = afm()
        .args(["caption", "--model", s(&broken), s(&img)])
        .output()
        .unwrap();
    assert_clean_failure(&out, &[s(&w)]);
    std::fs::remove_dir_all(&d).ok();
}

mod common;

/// An afm-tiny export (random test-tiny ViT and adapter, `<empty_output>` placeholder) written
/// by the trainer's `export` against the real SmolLM2 (`None`: the GGUF is absent, skipped).
fn afm_tiny_export(name: &str) -> Option<(PathBuf, PathBuf)> {
    use afm_train::adapter_train::{export, AdapterTrainConfig, FrozenLm, Trainable};
    let gguf = common::smollm2_gguf()?;
    let lm = FrozenLm::from_gguf(&gguf).unwrap();
    let cfg = AdapterTrainConfig {
        image_placeholder: "<empty_output>".into(),
        ..AdapterTrainConfig::test_tiny()
    };
    let tr = Trainable::init(&cfg, lm.hidden_size(), None).unwrap();
    let fmt = afm_train::prompt::PromptFormat::new(&lm.tokenizer, &cfg.image_placeholder).unwrap();
    let d = std::env::temp_dir().join(format!("afm-cli-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let out = export(&cfg, &tr, &lm, &fmt, &d).unwrap();
    Some((out, gguf))
}

/// `afm SUB --model EXPORT --max-tokens 4 ARGS...`, the default model named by
/// `AFM_SMOLLM2_GGUF` (the export records SmolLM2's sha256, so the CLI looks there).
fn run_tiny(export: &Path, gguf: &Path, sub: &str, args: &[&str]) -> Output {
    afm()
        .env("AFM_SMOLLM2_GGUF", gguf)
        .env("AFM_HOME", export.join("no-cache"))
        .arg(sub)
        .arg("--model")
        .arg(export)
        .args(["--max-tokens", "4"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn afm_tiny_export_captions_asks_and_describes() {
    let Some((export, gguf)) = afm_tiny_export("run") else {
        return;
    };
    let img = fixture().join("sample.png");
    // caption: one `path: caption` line
    let out = run_tiny(&export, &gguf, "caption", &[s(&img)]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{}: ", img.display())),
        "{stdout}"
    );
    assert!(
        lines[0].len() > img.display().to_string().len() + 2,
        "{stdout}"
    );
    assert!(err.contains("1 of 1 image(s) captioned"), "{err}");
    // --json: one tile of 4 image tokens, a caption
    let out = run_tiny(&export, &gguf, "caption", &["--json", s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v.as_array().unwrap()[0];
    assert_eq!(r["image_tokens"], 4);
    assert_eq!(r["tiles"], 1);
    assert!(r["caption"].is_string(), "{r}");
    assert!(r["generated_tokens"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["prompt_tokens"].as_u64().unwrap() > 4, "{r}");
    // ask streams an answer, figures on stderr
    let out = run_tiny(
        &export,
        &gguf,
        "ask",
        &[s(&img), "What colour is the circle?"],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!text(&out.stdout).trim().is_empty());
    assert!(
        err.contains("= 4 image tokens") && err.contains("decode"),
        "{err}"
    );
    // screen
    let out = run_tiny(&export, &gguf, "screen", &[s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // the image-token budget: below the fixed tile is an error, above it a note
    let out = run_tiny(
        &export,
        &gguf,
        "caption",
        &["--image-max-tokens", "2", s(&img)],
    );
    assert_clean_failure(&out, &["--image-max-tokens 2", "afm-tiny", "4 tokens"]);
    let out = run_tiny(
        &export,
        &gguf,
        "caption",
        &["--image-max-tokens", "64", s(&img)],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("does not apply to afm-tiny"), "{err}");
    // dry run: the plan from the config alone
    let out = run_tiny(&export, &gguf, "caption", &["--dry-run", s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 tile"),
        "{}",
        text(&out.stdout)
    );
    // --lm names the model explicitly
    let out = run_tiny(&export, &gguf, "caption", &["--lm", s(&gguf), s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_dir_all(export.parent().unwrap()).unwrap();
}

#[test]
fn eval_reports_every_bar_of_an_export() {
    let Some((export, gguf)) = afm_tiny_export("eval") else {
        return;
    };
    let report = export.join("report.json");
    let out = afm()
        .env("AFM_SMOLLM2_GGUF", &gguf)
        .env("AFM_HOME", export.join("no-cache"))
        .args(["eval", "--model"])
        .arg(&export)
        .args([
            "--per-bar",
            "3",
            "--no-easy-vqa",
            "--max-tokens",
            "4",
            "--captions",
            "2",
            "--json",
        ])
        .arg(&report)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    // random weights: no bar is met, and the table says so
    for line in [
        "screens: titles and button labels read exactly",
        "  with words never seen in training",
        "scenes: colour and count questions",
        "other screen and scene questions (no target)",
    ] {
        assert!(stdout.contains(line), "{stdout}");
    }
    assert!(stdout.contains("target 80%  BELOW"), "{stdout}");
    assert!(!stdout.contains("easy-VQA"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["answers"].as_array().unwrap().len(), 9, "{v}");
    assert_eq!(v["bars"][0]["score"]["total"], 3, "{v}");
    // the titles-and-buttons bar's slice with words never seen in training
    assert_eq!(v["bars"][0]["bar"], "titles_buttons", "{v}");
    assert!(
        v["bars"][0]["unseen_words"]["total"].as_u64().unwrap() <= 3,
        "{v}"
    );
    assert!(v["bars"][1].get("unseen_words").is_none(), "{v}");
    assert!(v["answers"][0]["unseen"].is_boolean(), "{v}");
    // the image tokens' spread over every evaluated image (collapse check), in both forms
    let sp = &v["image_token_spread"];
    let images = sp["images"].as_u64().unwrap();
    assert!((2..=9).contains(&images), "{v}");
    let value = sp["value"].as_f64().unwrap();
    assert!(value.is_finite() && value > 0.0, "{v}");
    assert!(
        stdout.contains(&format!(
            "image-token spread over {images} images: {value:.3}"
        )),
        "{stdout}"
    );
    // two captions per source (scenes, screens), graded, in both forms
    let c = &v["captions"];
    assert_eq!(c["total"], 4, "{v}");
    assert_eq!(c["captions"].as_array().unwrap().len(), 4, "{v}");
    let f1 = c["mean_word_f1"].as_f64().unwrap();
    assert!(
        stdout.contains(&format!(
            "held-out captions: mean word F1 {f1:.3} over 4 captions"
        )),
        "{stdout}"
    );
    assert!(
        c["captions"][0]["expected"].as_str().unwrap().len() > 3,
        "{v}"
    );

    // easy-VQA wanted but absent: said before the model loads
    let out = afm()
        .env("AFM_EASY_VQA_DIR", export.join("no-such-dir"))
        .args(["eval", "--model"])
        .arg(&export)
        .output()
        .unwrap();
    assert_clean_failure(&out, &["scripts/fetch_easy_vqa.sh", "--no-easy-vqa"]);
    let _ = std::fs::remove_dir_all(export.parent().unwrap());
}

#[test]
fn afm_tiny_wrong_or_missing_parts_are_one_line_errors() {
    let Some((export, gguf)) = afm_tiny_export("errors") else {
        return;
    };
    let img = fixture().join("sample.png");
    let cj = export.join("config.json");
    let good = std::fs::read_to_string(&cj).unwrap();
    let mut v: Value = serde_json::from_str(&good).unwrap();
    // another sha256 than the file's: the named model is refused
    v["lm"]["sha256"] = "00".repeat(32).into();
    std::fs::write(&cj, v.to_string()).unwrap();
    let out = run_tiny(&export, &gguf, "caption", &["--lm", s(&gguf), s(&img)]);
    assert_clean_failure(
        &out,
        &["sha256", "trained against", "SmolLM2-135M-Instruct"],
    );
    // a language model that is nowhere: says where it looked and what to pass
    v["lm"]["file"] = "missing-lm.gguf".into();
    std::fs::write(&cj, v.to_string()).unwrap();
    let out = run_tiny(&export, &gguf, "ask", &[s(&img), "what?"]);
    assert_clean_failure(&out, &["missing-lm.gguf", "not found", "--lm"]);
    // a missing adapter file
    std::fs::write(&cj, &good).unwrap();
    std::fs::remove_file(export.join("adapter.safetensors")).unwrap();
    let out = run_tiny(&export, &gguf, "caption", &[s(&img)]);
    assert_clean_failure(&out, &["adapter.safetensors"]);
    // --lm does not apply to a SmolVLM checkpoint
    let out = run("caption", &["--lm", s(&gguf), s(&img)]);
    assert_clean_failure(&out, &["--lm applies to afm-tiny"]);
    std::fs::remove_dir_all(export.parent().unwrap()).unwrap();
}

/// `--lora` on the vision-language commands: an adapter bound to the export's GGUF applies
/// (a zero-B adapter leaves the answer as it was, a strong one changes it); one made for
/// another base is refused naming both hashes.
#[test]
fn afm_tiny_takes_a_lora_adapter_bound_to_its_language_model() {
    let Some((export, gguf)) = afm_tiny_export("lora") else {
        return;
    };
    let img = fixture().join("sample.png");
    let sha = afm::lm::lora::checkpoint_sha256(&gguf).unwrap();
    let sites = afm::lm::Checkpoint::load(&gguf).unwrap().model.lora_sites();
    let dir = export.join("adapters");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, base: &str, b_std: f32| {
        let cfg = afm::lm::LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        };
        let a = afm::lm::LoraAdapter::random(&sites, cfg, base, 3, b_std).unwrap();
        let f = dir.join(name);
        a.save(&f).unwrap();
        f
    };
    let ask = |extra: &[&str]| {
        let mut args = vec![s(&img), "What is the title?"];
        args.extend_from_slice(extra);
        run_tiny(&export, &gguf, "ask", &args)
    };
    let plain = ask(&[]);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let zero = write("zero.safetensors", &sha, 0.0);
    let out = ask(&["--lora", s(&zero)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), text(&plain.stdout));
    let strong = write("strong.safetensors", &sha, 0.5);
    let out = ask(&["--lora", s(&strong)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(text(&out.stdout), text(&plain.stdout));
    let other = "cd".repeat(32);
    let wrong = write("wrong.safetensors", &other, 0.5);
    let out = ask(&["--lora", s(&wrong)]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains(&other) && e.contains(&sha), "{e}");
    std::fs::remove_dir_all(&export).ok();
}

/// `afm ask --schema`: from random weights the answer is JSON that keeps the schema (enum,
/// integer range, array counts, string lengths); a budget too small for a whole object is a
/// clear error that says to raise it, never a truncated answer.
#[test]
fn ask_with_a_schema_prints_json_that_keeps_it() {
    let d = image_dir("ask-schema", &[]);
    let sf = d.join("answer.json");
    std::fs::write(
        &sf,
        r#"{"type":"object","properties":{
            "colour":{"type":"string","enum":["red","green","blue"]},
            "count":{"type":"integer","minimum":0,"maximum":9},
            "tags":{"type":"array","items":{"type":"string","maxLength":8},"minItems":1,"maxItems":2}},
            "required":["colour","count","tags"]}"#,
    )
    .unwrap();
    for img in ["sample.png", "wide.png"] {
        let out = afm()
            .args(["ask", "--model"])
            .arg(fixture())
            .args([
                "--max-tokens",
                "96",
                "--schema",
                s(&sf),
                s(&d.join(img)),
                "what?",
            ])
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(
            ["red", "green", "blue"].contains(&v["colour"].as_str().unwrap()),
            "{v}"
        );
        assert!(v["count"].as_u64().is_some_and(|c| c <= 9), "{v}");
        let tags = v["tags"].as_array().unwrap();
        assert!((1..=2).contains(&tags.len()), "{v}");
        assert!(
            tags.iter()
                .all(|t| t.as_str().unwrap().chars().count() <= 8),
            "{v}"
        );
    }
    let out = run(
        "ask",
        &["--schema", s(&sf), s(&d.join("sample.png")), "what?"],
    );
    assert_clean_failure(&out, &["max_tokens"]);
    std::fs::remove_dir_all(&d).ok();
}

/// An export with a text reader (`reader/`, here the committed trained reader) reads the
/// image's lines into the prompt: the same caption request on a screenshot gets a longer
/// prompt than without it; `afm read` prints the lines with the reader alone (real weights:
/// the screenshot's button and field text are read exactly).
#[test]
fn a_reader_in_the_export_puts_the_image_text_in_the_prompt() {
    let Some((export, gguf)) = afm_tiny_export("reader") else {
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let screen = root.join("assets/images/screen.png");
    let prompt_tokens = |export: &Path| {
        let out = run_tiny(export, &gguf, "caption", &["--json", s(&screen)]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["prompt_tokens"].as_u64().unwrap()
    };
    let without = prompt_tokens(&export);
    let src = root.join("assets/stages/reader-2026-12-04/reader");
    std::fs::create_dir_all(export.join("reader")).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), export.join("reader").join(f)).unwrap();
    }
    let with = prompt_tokens(&export);
    assert!(with > without + 20, "prompt tokens {without} -> {with}");
    // a session (here `ask --schema`) renders the same text after the image
    let schema = export.join("answer.schema.json");
    std::fs::write(&schema, r#"{"enum": ["a", "b"]}"#).unwrap();
    let session_prompt = |export: &Path| {
        let out = run_tiny(
            export,
            &gguf,
            "ask",
            &[
                "--schema",
                s(&schema),
                s(&screen),
                "What does the button say?",
            ],
        );
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        let n: u64 = err
            .split("prompt ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no prompt figure in {err}"));
        n
    };
    let with_session = session_prompt(&export);
    std::fs::rename(export.join("reader"), export.join("reader-off")).unwrap();
    let without_session = session_prompt(&export);
    std::fs::rename(export.join("reader-off"), export.join("reader")).unwrap();
    assert!(
        with_session > without_session + 20,
        "session prompt tokens {without_session} -> {with_session}"
    );
    let out = afm()
        .args(["read", "--json", "--model"])
        .arg(&export)
        .arg(&screen)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lines: Vec<&str> = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    for want in ["Set Up", "Norway", "Emma Evans", "275 MB"] {
        assert!(lines.contains(&want), "{want:?} not in {lines:?}");
    }
    let boxed: Vec<&Value> = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["boxed"] == true)
        .collect();
    assert_eq!(boxed.len(), 1, "{boxed:?}");
    assert_eq!(boxed[0]["text"], "Set Up");
    // the lone button is filled in the accent colour: the highlighted one
    assert_eq!(boxed[0]["highlighted"], true, "{boxed:?}");
    // a directory without a reader is one line naming what is missing
    let out = afm()
        .args(["read", "--model"])
        .arg(root.join("assets/stages/afm-tiny-v12-2026-12-04"))
        .arg(&screen)
        .output()
        .unwrap();
    assert_clean_failure(&out, &["no text reader there"]);
    std::fs::remove_dir_all(&export).ok();
}

/// The committed reader directory's object finder (`shapes.json`, fitted on training
/// pictures by `fit_shapes`) names the README's scene exactly: three purple hexagons and three
/// brown circles, no text lines; a screenshot has text, so no objects; a damaged
/// `shapes.json` is a one-line error naming the file.
#[test]
fn afm_read_names_the_objects_of_a_picture_without_text() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let reader = root.join("assets/stages/reader-2026-12-04/reader");
    let read = |dir: &Path, img: &str| {
        afm()
            .args(["read", "--json", "--model"])
            .arg(dir)
            .arg(root.join("assets/images").join(img))
            .output()
            .unwrap()
    };
    let out = read(&reader, "scene.png");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["lines"].as_array().unwrap().len(), 0, "{v}");
    let mut objects: Vec<String> = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            format!(
                "{} {}",
                o["colour"].as_str().unwrap(),
                o["shape"].as_str().unwrap()
            )
        })
        .collect();
    objects.sort();
    assert_eq!(
        objects,
        [
            "brown circle",
            "brown circle",
            "brown circle",
            "purple hexagon",
            "purple hexagon",
            "purple hexagon"
        ],
        "{v}"
    );
    let out = read(&reader, "screen.png");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["lines"].as_array().unwrap().len() > 3, "{v}");
    assert_eq!(v["objects"].as_array().unwrap().len(), 0, "{v}");
    // the shipped default carries the same classes
    assert_eq!(
        std::fs::read(reader.join("shapes.json")).unwrap(),
        std::fs::read(root.join("assets/afm-tiny/reader/shapes.json")).unwrap()
    );
    let bad = std::env::temp_dir().join(format!("afm-bad-shapes-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(reader.join(f), bad.join(f)).unwrap();
    }
    std::fs::write(bad.join("shapes.json"), r#"{"grid": 12, "classes": []}"#).unwrap();
    let out = read(&bad, "scene.png");
    assert_clean_failure(&out, &["shapes.json", "no classes"]);
    std::fs::remove_dir_all(&bad).ok();
}
