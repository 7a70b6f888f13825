//! Models by Hub id through a fake Hugging Face Hub on loopback that serves the random-weight
//! tiny SmolVLM of `tests/fixtures/hf_tiny_idefics3` (written by transformers): the download
//! into the standard cache, the reuse of the cache without network, a caption equal to the
//! local directory's, and the cold-cache offline error.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

struct FakeHub {
    addr: String,
    requests: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
}

fn fixture() -> PathBuf {
    common::root().join("tests/fixtures/hf_tiny_idefics3")
}

/// One request: (method, path, range start and end).
fn read_request(s: &mut TcpStream) -> Option<(String, String, Option<(u64, Option<u64>)>)> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut it = line.split_whitespace();
    let (method, path) = (it.next()?.to_string(), it.next()?.to_string());
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-')?;
            range = Some((a.parse().ok()?, b.parse().ok()));
        }
    }
    Some((method, path, range))
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn serve_one(mut s: TcpStream) -> Option<String> {
    let (_method, path, range) = read_request(&mut s)?;
    let prefix = "/api/models/test-org/tiny-smolvlm/revision/";
    if path.starts_with(prefix) {
        let siblings: Vec<_> = FILES
            .iter()
            .chain(&["README.md", "sample.png"])
            .map(|f| serde_json::json!({"rfilename": f}))
            .collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        respond(
            &mut s,
            "200 OK",
            &[("Content-Type".into(), "application/json".into())],
            body.as_bytes(),
        );
        return Some(path);
    }
    let file = path
        .strip_prefix("/test-org/tiny-smolvlm/resolve/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_rev, f)| f.to_string());
    match file.filter(|f| FILES.contains(&f.as_str())) {
        Some(f) => {
            let data = std::fs::read(fixture().join(&f)).ok()?;
            let size = data.len() as u64;
            let (a, b) = range.map_or((0, size - 1), |(a, b)| {
                (a, b.unwrap_or(size - 1).min(size - 1))
            });
            let etag = format!(
                "\"{}\"",
                afm::fusion::afm_tiny::sha256_file(&fixture().join(&f)).ok()?
            );
            respond(
                &mut s,
                if range.is_some() {
                    "206 Partial Content"
                } else {
                    "200 OK"
                },
                &[
                    ("ETag".into(), etag),
                    ("X-Repo-Commit".into(), COMMIT.into()),
                    ("Content-Range".into(), format!("bytes {a}-{b}/{size}")),
                ],
                &data[a as usize..=b as usize],
            );
        }
        None => respond(&mut s, "404 Not Found", &[], b"not found"),
    }
    Some(path)
}

impl FakeHub {
    fn start() -> FakeHub {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (r, p) = (requests.clone(), paths.clone());
        std::thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                r.fetch_add(1, Ordering::SeqCst);
                if let Some(path) = serve_one(s) {
                    p.lock().unwrap().push(path);
                }
            }
        });
        FakeHub {
            addr,
            requests,
            paths,
        }
    }
}

fn caption(model: &str, hf_home: &Path, endpoint: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_afm"))
        .current_dir(common::root())
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .args([
            "--threads",
            "2",
            "caption",
            "--max-tokens",
            "6",
            "--model",
            model,
        ])
        .arg("assets/images/scene.png")
        .output()
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), s(&out.stdout), s(&out.stderr))
}

#[test]
fn hub_id_downloads_then_reuses_the_cache_and_captions() {
    let hub = FakeHub::start();
    let endpoint = format!("http://{}", hub.addr);
    let home = std::env::temp_dir().join(format!("afm-hub-test-{}", std::process::id()));
    std::fs::remove_dir_all(&home).ok();

    let local = caption(fixture().to_str().unwrap(), &home, "http://127.0.0.1:1");
    assert!(local.0, "{}", local.2);
    assert_eq!(hub.requests.load(Ordering::SeqCst), 0);

    let (ok, out, err) = caption("test-org/tiny-smolvlm@v1", &home, &endpoint);
    assert!(ok, "{err}");
    assert!(err.contains("fetching test-org/tiny-smolvlm@v1"), "{err}");
    assert_eq!(
        out, local.1,
        "the Hub copy captions as the local directory does"
    );
    let n = hub.requests.load(Ordering::SeqCst);
    assert!(n >= FILES.len(), "{n} requests");
    let paths = hub.paths.lock().unwrap().clone();
    assert!(
        paths
            .iter()
            .any(|p| p.contains("/resolve/v1/model.safetensors")),
        "{paths:?}"
    );
    assert!(!paths.iter().any(|p| p.contains("sample.png")), "{paths:?}");
    let snap = home
        .join("hub/models--test-org--tiny-smolvlm/snapshots")
        .join(COMMIT);
    for f in FILES {
        assert!(snap.join(f).is_file(), "{f} not in {}", snap.display());
    }
    assert_eq!(
        std::fs::read_to_string(home.join("hub/models--test-org--tiny-smolvlm/refs/v1")).unwrap(),
        COMMIT
    );

    // Warm cache: no request at all, even with the Hub unreachable.
    let (ok, out2, err) = caption("test-org/tiny-smolvlm@v1", &home, "http://127.0.0.1:1");
    assert!(ok, "{err}");
    assert!(err.contains("from the cache"), "{err}");
    assert_eq!(out2, local.1);
    assert_eq!(hub.requests.load(Ordering::SeqCst), n);

    // An unknown repository on the Hub: a clear error.
    let (ok, _, err) = caption("test-org/missing", &home, &endpoint);
    assert!(!ok);
    assert!(err.contains("test-org/missing"), "{err}");
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn offline_with_a_cold_cache_says_what_to_do() {
    let home = std::env::temp_dir().join(format!("afm-hub-cold-{}", std::process::id()));
    std::fs::remove_dir_all(&home).ok();
    let (ok, out, err) = caption(
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        &home,
        "http://127.0.0.1:1",
    );
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    for needle in [
        "HuggingFaceTB/SmolVLM-256M-Instruct@main",
        "not in the local cache",
        "HF_ENDPOINT",
        "--model DIR",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    assert_eq!(err.lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&home);
}
