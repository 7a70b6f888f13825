//! Models by name: `owner/name` or `owner/name@revision` on the Hugging Face Hub, fetched
//! through the `hf-hub` crate into its standard cache (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`) with a progress bar, from `$HF_ENDPOINT` (default
//! `https://huggingface.co`). This is the only place the library reaches the network, and
//! only when a user names a Hub id.
//!
//! A snapshot already in the cache is used without any network access (so a warm cache
//! works offline); a cold cache without network is an error that says what to do.

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// A parsed Hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

/// `owner/name[@revision]` when `spec` has that shape and is not a path on this machine
/// (a local file or directory always wins).
pub fn parse(spec: &str) -> Option<HubId> {
    if Path::new(spec).exists() {
        return None;
    }
    let (repo, revision) = match spec.split_once('@') {
        Some((r, v)) if !v.is_empty() => (r, v),
        Some(_) => return None,
        None => (spec, "main"),
    };
    let mut parts = repo.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(owner) && ok(name)).then(|| HubId {
        repo: repo.to_string(),
        revision: revision.to_string(),
    })
}

/// The files a model directory needs (configs, tokenizer, chat template, weights).
fn wanted(name: &str) -> bool {
    !name.contains('/')
        && (name.ends_with(".json")
            || name.ends_with(".safetensors")
            || name.ends_with(".jinja")
            || name == "tokenizer.model")
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

/// A cached snapshot that has what a model directory needs: `config.json` and its weights
/// (every shard a `model.safetensors.index.json` names).
fn complete_snapshot(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        let Some(map) = v["weight_map"].as_object() else {
            return false;
        };
        return map
            .values()
            .filter_map(|f| f.as_str())
            .all(|f| dir.join(f).is_file());
    }
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
    })
}

/// The local directory of a Hub model: the cached snapshot, else downloaded (module docs).
pub fn resolve(id: &HubId) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone());
    if let Some(cfg) = cache.repo(repo.clone()).get("config.json") {
        if let Some(dir) = cfg.parent().filter(|d| complete_snapshot(d)) {
            eprintln!(
                "afm: {}@{} from the cache {}",
                id.repo,
                id.revision,
                dir.display()
            );
            return Ok(dir.to_path_buf());
        }
    }
    download(id, &cache, repo).map_err(|e| {
        e.context(format!(
            "fetching the model {}@{} from the Hugging Face Hub at {} (HF_ENDPOINT); it is \
             not in the local cache {}. Connect to the network or set HF_ENDPOINT to a \
             reachable mirror; or, on a machine that can reach the Hub, download it \
             (`huggingface-cli download {}`) and copy the cache here (HF_HOME), or pass \
             --model DIR with a local copy",
            id.repo,
            id.revision,
            endpoint(),
            cache.path().display(),
            id.repo
        ))
    })
}

fn download(id: &HubId, cache: &Cache, repo: Repo) -> Result<PathBuf> {
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .with_cache_dir(cache.path().clone())
        .with_retries(0)
        .build()
        .context("setting up the Hub client")?;
    let api = api.repo(repo);
    let info = api.info().context("reading the repository's file list")?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| wanted(f))
        .collect();
    if !files.iter().any(|f| f == "config.json") {
        bail!(
            "{} has no config.json at {}: not a model afm can load from the Hub (a GGUF \
             repository: download the .gguf file and pass --model FILE)",
            id.repo,
            id.revision
        );
    }
    eprintln!(
        "afm: fetching {}@{} ({} files) from {}",
        id.repo,
        id.revision,
        files.len(),
        endpoint()
    );
    let mut dir = None;
    for f in &files {
        let p = api.get(f).with_context(|| format!("downloading {f}"))?;
        if f == "config.json" {
            dir = p.parent().map(Path::to_path_buf);
        }
    }
    let dir = dir.context("config.json was not downloaded")?;
    if !complete_snapshot(&dir) {
        bail!("{} has no safetensors weights", id.repo);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths() {
        let id = |s: &str| parse(s).map(|h| (h.repo, h.revision));
        assert_eq!(
            id("HuggingFaceTB/SmolVLM-256M-Instruct"),
            Some(("HuggingFaceTB/SmolVLM-256M-Instruct".into(), "main".into()))
        );
        assert_eq!(id("a/b@v1.0"), Some(("a/b".into(), "v1.0".into())));
        assert_eq!(id("a/b@"), None);
        assert_eq!(id("a"), None);
        assert_eq!(id("a/b/c"), None);
        assert_eq!(id("./a/b"), None);
        assert_eq!(id("/a/b"), None);
        assert_eq!(id("a/../b"), None);
        assert_eq!(id("a b/c"), None);
        // an existing local path is a path, not an id
        assert_eq!(id("assets/images"), None);
    }
}
