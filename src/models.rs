//! The default models, wherever the binary or the program using the library runs.
//!
//! * `afm-tiny` (vision encoder, adapter, LoRA adapter of its language model and text-line
//!   reader, 38 MB): its files are embedded in the library with
//!   `include_bytes!`, so `cargo install`, a copied binary and the examples caption without the
//!   source tree. On first use they are written once to the data directory
//!   ([`data_dir`]`/afm-tiny-<sha256 prefix>/`) because the loaders read directories; a new
//!   build with other weights gets a new directory, an unchanged one reuses it.
//! * SmolLM2-135M-Instruct (GGUF Q4_1, 93 MB), the language model afm-tiny names: too large to
//!   embed. [`smollm2_gguf`] only looks for it on this machine; the `afm` binary fetches it
//!   on first use (`afm generate` or `afm caption` once), the library never downloads it.
//!
//! Why embedding rather than installing on first use from somewhere: afm-tiny is small, and a
//! binary that carries it needs no network, no source tree and no install step; its
//! language model is the only file that travels separately, and it is checked by sha256.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// File name of the default language model.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the default language model (the one afm-tiny's config records).
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The embedded afm-tiny export: (path inside the export, contents).
const AFM_TINY_FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../assets/afm-tiny/config.json"),
    ),
    (
        "adapter.safetensors",
        include_bytes!("../assets/afm-tiny/adapter.safetensors"),
    ),
    (
        "lora.safetensors",
        include_bytes!("../assets/afm-tiny/lora.safetensors"),
    ),
    (
        "vision/config.json",
        include_bytes!("../assets/afm-tiny/vision/config.json"),
    ),
    (
        "vision/model.safetensors",
        include_bytes!("../assets/afm-tiny/vision/model.safetensors"),
    ),
    (
        "reader/config.json",
        include_bytes!("../assets/afm-tiny/reader/config.json"),
    ),
    (
        "reader/model.safetensors",
        include_bytes!("../assets/afm-tiny/reader/model.safetensors"),
    ),
    (
        "reader/shapes.json",
        include_bytes!("../assets/afm-tiny/reader/shapes.json"),
    ),
    ("README.md", include_bytes!("../assets/afm-tiny/README.md")),
];

/// Where afm keeps models it writes or downloads: `$AFM_HOME`, else `$XDG_CACHE_HOME/afm`,
/// else `~/.cache/afm`.
pub fn data_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("AFM_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("afm");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/afm")
}

/// sha256 over the embedded files (names and contents), hex.
fn embedded_digest() -> String {
    let mut h = Sha256::new();
    for (name, bytes) in AFM_TINY_FILES {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `dir` holds every embedded file with its size (a complete earlier write).
fn complete(dir: &Path) -> bool {
    AFM_TINY_FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    })
}

/// The embedded afm-tiny export as a directory, written under [`data_dir`] on first use
/// (module docs). Safe when several processes start at once: each writes a private copy
/// and renames it into place.
pub fn afm_tiny_dir() -> Result<PathBuf> {
    afm_tiny_dir_in(&data_dir())
}

/// [`afm_tiny_dir`] under `root` instead of the data directory.
pub fn afm_tiny_dir_in(root: &Path) -> Result<PathBuf> {
    let dir = root.join(format!("afm-tiny-{}", &embedded_digest()[..16]));
    if complete(&dir) {
        return Ok(dir);
    }
    let tmp = root.join(format!(".afm-tiny-{}.partial", std::process::id()));
    let write = || -> std::io::Result<()> {
        for (name, bytes) in AFM_TINY_FILES {
            let p = tmp.join(name);
            std::fs::create_dir_all(p.parent().expect("a file inside the export"))?;
            std::fs::write(&p, bytes)?;
        }
        Ok(())
    };
    let res = write().with_context(|| {
        format!(
            "writing the embedded default model afm-tiny to {} (set AFM_HOME to a writable directory)",
            tmp.display()
        )
    });
    if let Err(e) = res {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e);
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race (or left an incomplete copy): keep a complete one.
        if !complete(&dir) {
            std::fs::remove_dir_all(&dir).ok();
            std::fs::rename(&tmp, &dir)
                .with_context(|| format!("moving the default model into {}", dir.display()))?;
        }
        std::fs::remove_dir_all(&tmp).ok();
    }
    Ok(dir)
}

/// The places [`smollm2_gguf`] looks, in order: `$AFM_SMOLLM2_GGUF`, `./models/<file>`,
/// `<data dir>/<file>`.
pub fn smollm2_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("AFM_SMOLLM2_GGUF") {
        v.push(PathBuf::from(p));
    }
    v.push(PathBuf::from("models").join(SMOLLM2_FILE));
    v.push(data_dir().join(SMOLLM2_FILE));
    v
}

/// The default language model on this machine (never downloads; module docs).
pub fn smollm2_gguf() -> Result<PathBuf> {
    let c = smollm2_candidates();
    if let Some(p) = c.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!(
        "the default language model {SMOLLM2_FILE} is not on this machine (looked at {}); \
         run `afm generate hello` once to fetch it, or set AFM_SMOLLM2_GGUF=FILE",
        c.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The default vision-language model, loaded: the embedded afm-tiny with SmolLM2
/// ([`afm_tiny_dir`], [`smollm2_gguf`]).
pub fn load_default_vlm() -> Result<crate::fusion::Vlm<crate::lm::DeviceModel>> {
    let dir = afm_tiny_dir()?;
    let gguf = smollm2_gguf()?;
    let m = crate::fusion::ModelDir::open(&dir)
        .with_context(|| format!("reading the default model {}", dir.display()))?;
    m.load(Some(&gguf))
        .with_context(|| format!("loading the default model {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_once_then_reuses() {
        let root = std::env::temp_dir().join(format!("afm-models-unit-{}", std::process::id()));
        std::fs::remove_dir_all(&root).ok();
        let a = afm_tiny_dir_in(&root).unwrap();
        assert!(complete(&a));
        let cfg = std::fs::read(a.join("config.json")).unwrap();
        assert_eq!(cfg, AFM_TINY_FILES[0].1);
        let t0 = std::fs::metadata(a.join("adapter.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        let b = afm_tiny_dir_in(&root).unwrap();
        assert_eq!(a, b);
        let t1 = std::fs::metadata(b.join("adapter.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(t0, t1, "the second call rewrote the files");
        // A truncated copy is replaced.
        std::fs::write(a.join("adapter.safetensors"), b"x").unwrap();
        let c = afm_tiny_dir_in(&root).unwrap();
        assert!(complete(&c));
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn unwritable_data_dir_is_a_clear_error() {
        let f = std::env::temp_dir().join(format!("afm-models-file-{}", std::process::id()));
        std::fs::write(&f, b"not a dir").unwrap();
        let e = afm_tiny_dir_in(&f).unwrap_err();
        assert!(format!("{e:#}").contains("AFM_HOME"), "{e:#}");
        std::fs::remove_file(&f).ok();
    }
}
