//! `afm device-gen` writes the paper's on-device shape (small preset here) in the 2-bit /
//! 4-bit / 8-bit-KV formats, `afm quantize` converts it into other formats and prints the
//! sizes, and `afm bench quant` measures both (speed and memory only: random weights).

use std::path::PathBuf;
use std::process::Command;

fn afm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_afm"))
}

fn run(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn device_gen_quantize_and_bench() {
    let dir = std::env::temp_dir().join(format!("afm-quantize-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g2: PathBuf = dir.join("small-2b.gguf");
    let out = run(afm()
        .args(["device-gen", "--preset", "afm-small", "--out"])
        .arg(&g2));
    assert!(out.contains("random weights"), "{out}");
    let m = afm_lm::DeviceModel::load(&g2).unwrap();
    let c = m.config();
    assert_eq!((c.num_hidden_layers, c.num_kv_reuse_layers), (8, 3));
    assert!(c.kv_quant && c.qk_norm);
    // 2-bit to 8-bit weights with F16 embeddings and no KV scales
    let g8 = dir.join("small-8b.gguf");
    let out = run(afm().arg("quantize").arg(&g2).arg(&g8).args([
        "--weights",
        "8",
        "--embeddings",
        "16",
        "--kv",
        "16",
    ]));
    assert!(
        out.contains("MB ->") && out.contains("weights: Q8_0"),
        "{out}"
    );
    assert!(out.contains("KV cache: no KV scales"), "{out}");
    assert!(!afm_lm::DeviceModel::load(&g8).unwrap().config().kv_quant);
    // a bad option names itself
    let bad = afm()
        .arg("quantize")
        .arg(&g2)
        .arg(dir.join("x.gguf"))
        .args(["--weights", "3"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--weights 3"));
    // the benchmark, afm runs only
    let out = run(afm()
        .args([
            "--threads",
            "2",
            "bench",
            "quant",
            "--prompt-tokens",
            "16",
            "--new-tokens",
            "4",
        ])
        .arg("--run")
        .arg(format!("two=afm:{}", g2.display()))
        .arg("--run")
        .arg(format!("eight=afm:{}:kv16", g8.display())));
    assert!(
        out.contains("| two | afm |") && out.contains("| eight | afm |"),
        "{out}"
    );
    assert!(
        out.contains("8-bit (checkpoint)") && out.contains("| f16 |"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Real weights: `afm quantize --calibrate` fits SmolLM2-135M's 2-bit scales to a text's
/// activations, and on another text (the README's first 768 tokens) the result's perplexity
/// is far below that of plain 2-bit scales (measured on the KJV's Luke, 2,048 tokens: 705
/// against 840,334; docs/quantization.md). A missing text and a checkpoint without a
/// tokenizer are refused by name.
#[test]
fn calibrated_two_bit_scales_beat_plain_ones_on_real_weights() {
    let Some(gguf) = afm_lm::testing::smollm2_gguf_or_skip() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("afm-quantize-cal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cal = dir.join("cal.txt");
    std::fs::write(&cal, afm_lm::kv8::CALIBRATION_TEXT.repeat(3)).unwrap();
    let (plain, imp) = (dir.join("plain.gguf"), dir.join("imp.gguf"));
    let args = ["--weights", "2", "--embeddings", "8", "--kv", "16"];
    run(afm().arg("quantize").arg(&gguf).arg(&plain).args(args));
    let out = run(afm()
        .arg("quantize")
        .arg(&gguf)
        .arg(&imp)
        .args(args)
        .arg("--calibrate")
        .arg(&cal));
    assert!(
        out.contains("calibration: ") && out.contains("tokens of"),
        "{out}"
    );
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let ppl = |p: &std::path::Path| -> f64 {
        let ck = afm_lm::load::Checkpoint::load(p).unwrap();
        let ids = ck.tokenizer.encode(&text).unwrap();
        let ids = &ids[..ids.len().min(768)];
        afm_lm::perplexity::nll(&ck.model, ids, 256)
            .unwrap()
            .perplexity()
    };
    let (pp, pi) = (ppl(&plain), ppl(&imp));
    assert!(
        pi.is_finite() && pi * 10.0 < pp,
        "calibrated {pi} vs plain {pp}"
    );
    // refused by name: a text that is not there; a checkpoint with KV sharing
    let e = afm()
        .arg("quantize")
        .arg(&gguf)
        .arg(dir.join("x.gguf"))
        .arg("--calibrate")
        .arg(dir.join("missing.txt"))
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("missing.txt"));
    // a checkpoint without a tokenizer cannot read the text (KV-sharing checkpoints are
    // refused in lm/src/quantize.rs's tests)
    let small = dir.join("small.gguf");
    run(afm()
        .args(["device-gen", "--preset", "afm-small", "--out"])
        .arg(&small));
    let e = afm()
        .arg("quantize")
        .arg(&small)
        .arg(dir.join("y.gguf"))
        .args(["--kv", "16", "--calibrate"])
        .arg(&cal)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("has no tokenizer"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
