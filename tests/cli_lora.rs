//! `afm generate --lora` and `afm lora-import` on a random-weight model with a small real
//! tokenizer: the adapter changes the output, a zero-B adapter does not, an adapter made for
//! another base is refused with both hashes, and a PEFT adapter imports bound to its base.

use afm::lm::lora::checkpoint_sha256;
use afm::lm::random::{random_tensors, write_safetensors};
use afm::lm::{DeviceModel, LmConfig, LoraAdapter, LoraConfig, LoraTarget};
use std::path::{Path, PathBuf};
use std::process::Command;

fn afm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_afm"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("afm-cli-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A random dense model with the tiny Idefics3 fixture's tokenizer (448 tokens).
fn model_dir(name: &str, seed: u64) -> PathBuf {
    let cfg = LmConfig {
        vocab_size: 448,
        max_position_embeddings: 128,
        ..afm::lm::testing::tiny_llama()
    };
    let d = tmp(name);
    write_safetensors(&d, &cfg, &random_tensors(&cfg, seed).unwrap()).unwrap();
    let tok = root().join("tests/fixtures/hf_tiny_idefics3");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), d.join(f)).unwrap();
    }
    d
}

fn generate(model: &Path, lora: Option<&Path>) -> (bool, String, String) {
    let mut c = afm();
    c.args([
        "--threads",
        "2",
        "generate",
        "--raw",
        "--max-tokens",
        "12",
        "--model",
    ])
    .arg(model);
    if let Some(l) = lora {
        c.arg("--lora").arg(l);
    }
    let out = c.arg("the cat sat on the mat").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn adapter(model: &Path, b_std: f32, out: &Path) {
    let m = DeviceModel::load(model).unwrap();
    let sha = checkpoint_sha256(model).unwrap();
    let c = LoraConfig {
        rank: 8,
        alpha: 16.0,
        targets: LoraTarget::ALL.to_vec(),
    };
    LoraAdapter::random(&m.lora_sites(), c, &sha, 1, b_std)
        .unwrap()
        .save(out)
        .unwrap();
}

#[test]
fn generate_with_lora_changes_the_output_and_refuses_another_base() {
    let model = model_dir("m", 3);
    let ad = tmp("adapters");
    let (strong, zero) = (ad.join("strong.safetensors"), ad.join("zero.safetensors"));
    adapter(&model, 0.3, &strong);
    adapter(&model, 0.0, &zero);
    let (ok, base_out, err) = generate(&model, None);
    assert!(ok, "{err}");
    let (ok, zero_out, err) = generate(&model, Some(&zero));
    assert!(ok, "{err}");
    assert_eq!(zero_out, base_out);
    let (ok, lora_out, err) = generate(&model, Some(&strong));
    assert!(ok, "{err}");
    assert_ne!(
        lora_out, base_out,
        "a strong adapter must change greedy output"
    );

    // the same adapter on another model: refused, both hashes named, no panic
    let other = model_dir("other", 4);
    let (ok, _, err) = generate(&other, Some(&strong));
    assert!(!ok);
    let (a, b) = (
        checkpoint_sha256(&model).unwrap(),
        checkpoint_sha256(&other).unwrap(),
    );
    assert!(
        err.contains(&a) && err.contains(&b) && !err.contains("panicked"),
        "{err}"
    );
    // a missing adapter file: named
    let (ok, _, err) = generate(&model, Some(&ad.join("nope.safetensors")));
    assert!(
        !ok && err.contains("nope.safetensors") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn lora_import_binds_a_peft_adapter_to_the_named_base() {
    let fx = root().join("tests/fixtures/peft_lora");
    let out = tmp("import").join("a.safetensors");
    let o = afm()
        .args(["lora-import", "--peft"])
        .arg(fx.join("adapter"))
        .arg("--base")
        .arg(fx.join("base"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let sha = checkpoint_sha256(&fx.join("base")).unwrap();
    assert!(err.contains(&sha) && err.contains("rank 4"), "{err}");
    let ad = LoraAdapter::load(&out).unwrap();
    assert_eq!(ad.base_sha256(), sha);
    assert_eq!(ad.modules().len(), 14);
}
