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
    let (stdout, stderr) = common::succeeded(&out);
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

#[test]
fn server_gen_writes_a_checkpoint_that_generates_and_benches() {
    let dir = std::env::temp_dir().join(format!("afm-cli-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = dir.join("tiny-st");
    let out = afm()
        .args([
            "server-gen",
            "--preset",
            "tiny",
            "--set",
            "num_tracks=3",
            "--out",
        ])
        .arg(&st)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("3 tracks"), "{stderr}");
    let cfg = afm::lm::ServerConfig::from_file(&st.join("config.json")).unwrap();
    assert_eq!(cfg.num_tracks, 3);

    // bad overrides name the field
    let out = afm()
        .args([
            "server-gen",
            "--preset",
            "tiny",
            "--set",
            "num_trackz=3",
            "--out",
        ])
        .arg(dir.join("x"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("num_trackz"),
        "{stderr}"
    );
    let out = afm()
        .args([
            "server-gen",
            "--preset",
            "tiny",
            "--set",
            "experts_per_token=9",
            "--out",
        ])
        .arg(dir.join("x"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("experts_per_token")
            && !stderr.contains("panicked"),
        "{stderr}"
    );

    // the benchmark runs on it (a smoke run; the figures are not checked)
    let out = afm()
        .args([
            "--threads",
            "2",
            "bench",
            "server",
            "--prompt-tokens",
            "12",
            "--new-tokens",
            "3",
            "--runs",
            "1",
            "--model",
        ])
        .arg(&st)
        .output()
        .unwrap();
    let (stdout, _) = common::succeeded(&out);
    for k in [
        "active per token",
        "all-global",
        "synchronisation points",
        "tracks parallel",
    ] {
        assert!(stdout.contains(k), "bench output lacks {k}: {stdout}");
    }

    // with SmolLM2's tokenizer in a Q8_0 GGUF, `afm generate` runs the server model
    if let Some(smol) = common::smollm2_gguf() {
        let g = dir.join("tiny-smol.gguf");
        let out = afm()
            .args([
                "server-gen",
                "--preset",
                "tiny",
                "--set",
                "vocab_size=49152",
                "--quant",
                "q8_0",
                "--tokenizer",
            ])
            .arg(&smol)
            .arg("--out")
            .arg(&g)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = afm()
            .args(["generate", "--max-tokens", "8", "--model"])
            .arg(&g)
            .arg("Hello")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("decode") && stderr.contains("generated"),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_vit_runs_stops_resumes_and_exports() {
    let Some(lm) = common::smollm2_gguf() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("afm-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let train = |extra: &[&str]| {
        let out = afm()
            .args([
                "--threads",
                "2",
                "train",
                "vit",
                "--config",
                "test-tiny",
                "--no-easy-vqa",
                "--lm",
            ])
            .arg(&lm)
            .arg("--out")
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let first = train(&["--max-steps", "4"]);
    assert!(first.contains("stopped at step 4 of 6"), "{first}");
    assert!(first.contains("epoch 1: train loss"), "{first}");
    let second = train(&[]);
    assert!(second.contains("resumed at step 4"), "{second}");
    assert!(
        second.contains("epoch 2: train loss") && second.contains("held-out"),
        "{second}"
    );
    assert!(second.contains("encoder written to"), "{second}");
    afm::vision::VisionEncoder::load(&dir.join("vision")).unwrap();
    // a different setting on the same run directory is refused, naming the file
    let out = afm()
        .args([
            "train",
            "vit",
            "--config",
            "test-tiny",
            "--batch-size",
            "4",
            "--no-easy-vqa",
            "--lm",
        ])
        .arg(&lm)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("pretrain.json"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_adapter_runs_stops_resumes_and_exports() {
    let Some(lm) = common::smollm2_gguf() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("afm-cli-train-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let train = |extra: &[&str]| {
        let out = afm()
            .args([
                "--threads",
                "2",
                "train",
                "adapter",
                "--config",
                "test-tiny",
                "--placeholder",
                "<empty_output>",
                "--batch-size",
                "2",
                "--eval-questions",
                "2",
                "--no-easy-vqa",
                "--lm",
            ])
            .arg(&lm)
            .arg("--out")
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let first = train(&["--max-steps", "3"]);
    assert!(first.contains("stopped at step 3 of 4"), "{first}");
    assert!(first.contains("epoch 1: train loss"), "{first}");
    assert!(first.contains("held-out exact match"), "{first}");
    let second = train(&[]);
    assert!(second.contains("resumed at step 3"), "{second}");
    assert!(second.contains("epoch 2: train loss"), "{second}");
    assert!(second.contains("afm-tiny written to"), "{second}");
    let (c, _vit, _adapter) = afm_train::adapter_train::load_export(&dir.join("afm-tiny")).unwrap();
    assert_eq!(c.image_placeholder, "<empty_output>");
    assert_eq!(c.lm.file, "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(c.lm.hidden_size, 576);
    // a placeholder outside SmolLM2's vocabulary is refused by name
    let out = afm()
        .args([
            "train",
            "adapter",
            "--config",
            "test-tiny",
            "--no-easy-vqa",
            "--lm",
        ])
        .arg(&lm)
        .arg("--out")
        .arg(dir.join("other"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("`<image>` is not a token"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_and_screen_print_json_that_validates() {
    let dir = std::env::temp_dir().join(format!("afm-cli-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population_millions": {"type": "number", "minimum": 0, "maximum": 50},
            "capital": {"type": "boolean"},
            "sights": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}
        },
        "required": ["city", "population_millions", "capital", "sights"],
        "additionalProperties": false
    });
    let sf = dir.join("city.json");
    std::fs::write(&sf, schema.to_string()).unwrap();
    // bad schema files fail before the model loads, naming the file
    let not_json = dir.join("bad.json");
    std::fs::write(&not_json, "{nope").unwrap();
    let arr = dir.join("arr.json");
    std::fs::write(&arr, "[1]").unwrap();
    for (f, want) in [(&not_json, "not JSON"), (&arr, "an array")] {
        let out = afm()
            .args(["generate", "--model", "/nonexistent.gguf", "--schema"])
            .arg(f)
            .arg("hi")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(want) && stderr.contains("json"),
            "{stderr}"
        );
    }
    let Some(model) = common::smollm2_gguf() else {
        return;
    };
    let out = afm()
        .args([
            "--threads",
            "2",
            "generate",
            "--max-tokens",
            "200",
            "--schema",
        ])
        .arg(&sf)
        .arg("--model")
        .arg(&model)
        .arg("Tell me about Paris.")
        .output()
        .unwrap();
    let (stdout, _) = common::succeeded(&out);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["city", "population_millions", "capital", "sights"],
        "{stdout}"
    );
    assert!(v["sights"]
        .as_array()
        .is_some_and(|a| (1..=3).contains(&a.len())));
    // an unsupported schema is a clear error before decoding
    let bad = dir.join("unsupported.json");
    std::fs::write(&bad, r#"{"type": "string", "format": "no-such-format"}"#).unwrap();
    let out = afm()
        .args(["generate", "--schema"])
        .arg(&bad)
        .arg("--model")
        .arg(&model)
        .arg("hi")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("JSON Schema") && stderr.contains("format"),
        "{stderr}"
    );
    // the typed screen description of afm-tiny (the default model)
    let home = dir.join("home");
    let out = afm()
        .current_dir(common::root())
        .env("AFM_SMOLLM2_GGUF", &model)
        .env("AFM_HOME", &home)
        .args([
            "--threads",
            "2",
            "screen",
            "--json",
            "assets/images/screen.png",
        ])
        .output()
        .unwrap();
    let (stdout, _) = common::succeeded(&out);
    let d: afm::fusion::ScreenDescription = serde_json::from_str(&stdout).unwrap();
    // afm-tiny describes it in sentences (decoded under the grammar of the lines it read),
    // put in the slots: the title and the one real button, exactly
    assert_eq!(d.title, "Ignore Rule", "{d:?}");
    let buttons: Vec<&str> = d.buttons.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(buttons, ["Set Up"], "{d:?}");
    assert!(d.fields.iter().all(|f| f.value != "Set Up"), "{d:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `afm generate ... | head -1` style: the reader has gone before the answer is printed. The
/// process ends on SIGPIPE, as other command-line tools do, instead of panicking in
/// `println!` (plain and `--schema` output both).
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let Some(model) = common::smollm2_gguf() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("afm-cli-sigpipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("s.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}"#,
    )
    .unwrap();
    for extra in [
        vec![],
        vec!["--schema".to_string(), schema.display().to_string()],
    ] {
        let mut child = afm()
            .args(["--threads", "1", "generate", "--max-tokens", "8"])
            .args(&extra)
            .arg("--model")
            .arg(&model)
            .arg("hi")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader exits before anything is written
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{extra:?}: {:?} {stderr}",
            out.status
        );
    }
}

/// `afm --threads 2 bench ARGS --model SMOLLM2`'s stdout, after checking it succeeded; `None`
/// (the test skips) without the real SmolLM2 weights.
fn bench_on_smollm2(args: &[&str]) -> Option<String> {
    let model = common::smollm2_gguf()?;
    let out = afm()
        .args(["--threads", "2", "bench"])
        .args(args)
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    Some(common::succeeded(&out).0)
}

/// `afm bench lm` holds each run to the read bandwidth measured just before it, in the worker
/// process, and the probe's gigabyte does not count in the peak RSS it reports (it did once:
/// mimalloc kept the freed buffer). A smoke test: no speed is asserted.
#[test]
fn bench_lm_holds_each_run_to_its_own_bandwidth_reading() {
    let Some(stdout) = bench_on_smollm2(&[
        "lm",
        "--no-reference",
        "--processes",
        "1",
        "--runs",
        "2",
        "--new-tokens",
        "4",
        "--prompt-tokens",
        "16",
    ]) else {
        return;
    };
    assert!(
        stdout.contains("measured before each of the 2 runs") && stdout.contains("% of it (median"),
        "{stdout}"
    );
    // | afm (2 threads) | prefill | decode | NNN MB | barriers |
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| afm (2 threads)"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let rss: f64 = row
        .split('|')
        .nth(4)
        .unwrap()
        .trim()
        .trim_end_matches(" MB")
        .parse()
        .unwrap();
    assert!(rss > 0.0 && rss < 700.0, "peak RSS {rss} MB: {row}");
}

/// `afm bench guided` runs end to end on SmolLM2 and prints its figures, the within-run mask
/// share among them (a smoke test: no speed is asserted).
#[test]
fn bench_guided_prints_its_figures() {
    let Some(stdout) = bench_on_smollm2(&["guided", "--runs", "1", "--new-tokens", "8"]) else {
        return;
    };
    for line in [
        "mask per token",
        "decode, unconstrained:",
        "decode, guided (JSON Schema):",
        "within the guided runs: the mask adds",
    ] {
        assert!(stdout.contains(line), "{stdout}");
    }
}

/// `afm train reader`: a test-tiny run stops, resumes, reports the held-out reads (at each
/// string's box and end to end through the line finder) and writes a `reader/` export that
/// loads and reads; a config that does not fit its own layers is refused by field.
#[test]
fn train_reader_runs_stops_resumes_and_exports() {
    let dir = std::env::temp_dir().join(format!("afm-cli-train-reader-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let train = |extra: &[&str]| {
        let out = afm()
            .args([
                "--threads",
                "2",
                "train",
                "reader",
                "--config",
                "test-tiny",
                "--out",
            ])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let first = train(&["--max-steps", "2"]);
    assert!(first.contains("stopped at step 2 of 3"), "{first}");
    let second = train(&[]);
    assert!(second.contains("resumed at step 2"), "{second}");
    assert!(second.contains("epoch 1: train loss"), "{second}");
    assert!(
        second.contains("end to end (lines found, then read)"),
        "{second}"
    );
    assert!(second.contains("reader written to"), "{second}");
    let reader = afm_vision::reader::TextReader::from_dir(&dir.join("reader")).unwrap();
    let img = afm_vision::image::RgbImage::from_pixel(40, 12, afm_vision::image::Rgb([9, 9, 9]));
    // a flat region has nothing to read: an empty string, not an error
    let read = reader
        .read(
            &img,
            &[afm_vision::reader::Region {
                x: 0,
                y: 0,
                w: 40,
                h: 12,
            }],
        )
        .unwrap();
    assert_eq!(read, vec![String::new()]);
    let bad = dir.join("bad.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reader.json")).unwrap()).unwrap();
    cfg["config"]["model"]["height"] = serde_json::json!(20);
    std::fs::write(&bad, cfg.to_string()).unwrap();
    let out = afm()
        .args(["train", "reader", "--config"])
        .arg(&bad)
        .arg("--out")
        .arg(dir.join("other"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("`height`"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
