//! `afm serve` end to end on loopback: the API and its limits over raw HTTP, the official
//! `openai` Python client (streaming and not, text and images), a bounded load test, and a
//! graceful SIGTERM. The Python parts need `openai` (`AFM_PYTHON`, default `python3`;
//! `.ci/run` installs it in a venv): skipped with a message without it, failing in CI.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let home = std::env::temp_dir().join(format!("afm-serve-test-{}", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_afm"))
            .current_dir(common::root())
            .env("AFM_HOME", home)
            .args(["--threads", "2", "serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(a.split_whitespace().next().unwrap_or("").to_string());
                }
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        Server { child, addr, log }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One HTTP/1.1 request; (status, body) of the whole response.
    fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = self.send(method, path, body);
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let status = raw[9..12].parse().unwrap_or_else(|_| panic!("{raw}"));
        let body = raw.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
        (status, body)
    }

    fn send(&self, method: &str, path: &str, body: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        s
    }

    fn chat(&self, body: serde_json::Value) -> (u16, String) {
        self.http("POST", "/v1/chat/completions", body.to_string().as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a streaming response until `needle` has arrived.
fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Python with the `openai` package, or `None` (skip; a failure under CI).
fn python_with_openai() -> Option<String> {
    let py = std::env::var("AFM_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    afm::lm::testing::skip_missing(&format!(
        "`{py} -c 'import openai'` failed; pip install openai (or set AFM_PYTHON)"
    ))
}

fn script(name: &str) -> PathBuf {
    common::root().join("scripts").join(name)
}

fn run_python(py: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(py).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

fn user(text: &str) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": text}])
}

/// The text model (SmolLM2 GGUF): every route, every limit as a clear 4xx, concurrency
/// 429, then the official client.
#[test]
fn text_server_routes_limits_and_openai_client() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let s = Server::start(&[
        "--model",
        gguf.to_str().unwrap(),
        "--max-tokens",
        "64",
        "--max-body-bytes",
        "100000",
        "--max-concurrent",
        "2",
    ]);
    // without --kv a server keeps f16 K/V (the GGUF stores no 8-bit KV scales)
    assert!(
        s.log.lock().unwrap().contains("KV cache: f16"),
        "{}",
        s.log.lock().unwrap()
    );
    let (st, body) = s.http("GET", "/health", b"");
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"ok\""), "{body}");
    let (st, body) = s.http("GET", "/v1/models", b"");
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    let (st, body) = s.http("GET", "/", b"");
    assert_eq!(st, 200);
    assert!(
        body.contains("<html") && body.contains("Describe"),
        "{body}"
    );
    assert_eq!(s.http("GET", "/nope", b"").0, 404);

    // a plain request
    let (st, body) =
        s.chat(serde_json::json!({"messages": user("Name a colour."), "max_tokens": 8}));
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 8);

    // response_format json_schema: the content is JSON valid against the schema
    let (st, body) = s.chat(serde_json::json!({
        "messages": user("Name a colour and a number."),
        "max_tokens": 64,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object",
            "properties": {
                "colour": {"type": "string", "enum": ["red", "green", "blue"]},
                "n": {"type": "integer", "minimum": 1, "maximum": 9}
            },
            "required": ["colour", "n"],
            "additionalProperties": false
        }}}
    }));
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let a: serde_json::Value = serde_json::from_str(content).unwrap();
    assert!(
        ["red", "green", "blue"].contains(&a["colour"].as_str().unwrap()),
        "{content}"
    );
    assert!((1..=9).contains(&a["n"].as_u64().unwrap()), "{content}");

    // limits and bad input: each a 4xx naming the problem
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "not valid JSON"),
        (b"[]".to_vec(), 400, "JSON object"),
        (br#"{"messages": []}"#.to_vec(), 400, "empty"),
        (
            br#"{"messages": [{"role": "robot", "content": "x"}]}"#.to_vec(),
            400,
            "role",
        ),
        (
            serde_json::json!({"messages": user("x"), "max_tokens": 65})
                .to_string()
                .into_bytes(),
            400,
            "max_tokens",
        ),
        (
            serde_json::json!({"messages": user("x"), "temperature": -1})
                .to_string()
                .into_bytes(),
            400,
            "temperature",
        ),
        (
            serde_json::json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
            .to_string()
            .into_bytes(),
            400,
            "no vision",
        ),
        (
            serde_json::json!({"messages": user("x"), "response_format":
                {"type": "json_schema", "json_schema": {"name": "a", "schema":
                    {"type": "string", "format": "no-such-format"}}}})
            .to_string()
            .into_bytes(),
            400,
            "no-such-format",
        ),
        (vec![b' '; 200_000], 413, "max-body-bytes"),
    ];
    for (body, want, needle) in cases {
        let (st, got) = s.http("POST", "/v1/chat/completions", &body);
        assert_eq!(st, want, "{got}");
        assert!(got.contains(needle), "{needle:?} not in {got}");
        assert!(got.contains("\"error\""), "{got}");
    }

    // two streams in flight fill --max-concurrent 2: the third request gets 429
    let stream =
        serde_json::json!({"messages": user("Count to fifty."), "max_tokens": 64, "stream": true})
            .to_string();
    let mut a = s.send("POST", "/v1/chat/completions", stream.as_bytes());
    let mut b = s.send("POST", "/v1/chat/completions", stream.as_bytes());
    read_until(&mut a, "data: ");
    read_until(&mut b, "data: ");
    let (st, body) = s.chat(serde_json::json!({"messages": user("hi"), "max_tokens": 4}));
    assert_eq!(st, 429, "{body}");
    assert!(body.contains("--max-concurrent"), "{body}");
    // one stream runs to its end; the other's client goes away, which frees its slot
    let rest = read_until(&mut a, "[DONE]");
    assert!(rest.contains("finish_reason"), "{rest}");
    drop(a);
    drop(b);
    let t0 = Instant::now();
    loop {
        let (st, body) = s.chat(serde_json::json!({"messages": user("hi"), "max_tokens": 4}));
        if st == 200 {
            break;
        }
        assert_eq!(st, 429, "{body}");
        assert!(t0.elapsed() < Duration::from_secs(120), "slots never freed");
        std::thread::sleep(Duration::from_millis(200));
    }

    let Some(py) = python_with_openai() else {
        return;
    };
    let image = common::root().join("assets/images/scene.png");
    let r = run_python(
        &py,
        &[
            script("serve_openai_client.py").to_str().unwrap(),
            &s.url(),
            image.to_str().unwrap(),
            "--text-only",
        ],
    );
    println!("openai client (text model): {r}");
    assert!(r["stream_chunks"].as_u64().unwrap() >= 1);
}

/// The default vision-language model (afm-tiny): the official client with an image (data:
/// URL), files only under --allow-files, the pixel limit.
#[test]
fn vision_server_images_files_and_openai_client() {
    if common::smollm2_gguf().is_none() {
        return;
    }
    let s = Server::start(&[
        "--allow-files",
        "assets/images",
        "--max-image-pixels",
        "1000000",
        "--prefix-cache",
        "16",
    ]);
    let (st, body) = s.http("GET", "/v1/models", b"");
    assert_eq!(st, 200);
    assert!(
        body.contains("afm-tiny") && body.contains("\"vision\":true"),
        "{body}"
    );
    let img = |url: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe the image."}]}], "max_tokens": 12, "temperature": 0})
    };
    let (st, body) = s.chat(img("scene.png"));
    assert_eq!(st, 200, "{body}");
    let (st2, body2) = s.chat(img(&format!(
        "file://{}",
        common::root().join("assets/images/scene.png").display()
    )));
    assert_eq!(st2, 200, "{body2}");
    let text = |b: &str| {
        let v: serde_json::Value = serde_json::from_str(b).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(text(&body), text(&body2));
    let (st, body) = s.chat(img("../../Cargo.toml"));
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("--allow-files"), "{body}");
    let (st, body) = s.chat(img("http://example.com/a.png"));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("data: URL"), "{body}");
    let (st, body) = s.chat(img("data:image/png;base64,%%%"));
    assert_eq!(st, 400, "{body}");
    // 1200 x 1000 pixels is over --max-image-pixels 1000000
    let mut png = Vec::new();
    afm::vision::image::RgbImage::new(1200, 1000)
        .write_to(
            &mut std::io::Cursor::new(&mut png),
            afm::vision::image::ImageFormat::Png,
        )
        .unwrap();
    use base64::Engine as _;
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let (st, body) = s.chat(img(&url));
    assert_eq!(st, 413, "{body}");
    assert!(body.contains("pixels"), "{body}");

    let Some(py) = python_with_openai() else {
        return;
    };
    let r = run_python(
        &py,
        &[
            script("serve_openai_client.py").to_str().unwrap(),
            &s.url(),
            common::root()
                .join("assets/images/scene.png")
                .to_str()
                .unwrap(),
        ],
    );
    println!("openai client (afm-tiny): {r}");
    assert!(r["image_text"].as_str().unwrap().split_whitespace().count() >= 2);
}

/// 8 concurrent clients, 200 requests, no errors; p50 / p99 printed.
#[test]
fn load_test_8_clients_200_requests() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let Some(py) = python_with_openai() else {
        return;
    };
    let s = Server::start(&["--model", gguf.to_str().unwrap()]);
    let r = run_python(
        &py,
        &[
            script("serve_load.py").to_str().unwrap(),
            &s.url(),
            "8",
            "200",
            "8",
        ],
    );
    println!("load test (2 shared cores, other jobs running): {r}");
    assert_eq!(r["ok"], 200, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
}

/// SIGTERM while a stream runs: the stream completes, the process exits 0. (The server runs
/// the GGUF with `--kv 8`: the model flags apply to a text model too.)
#[test]
fn sigterm_finishes_requests_in_flight_then_exits() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let mut s = Server::start(&["--model", gguf.to_str().unwrap(), "--kv", "8"]);
    assert!(
        s.log.lock().unwrap().contains("KV cache: 8-bit"),
        "--kv 8 not applied: {}",
        s.log.lock().unwrap()
    );
    let body =
        serde_json::json!({"messages": user("Tell me a story."), "max_tokens": 24, "stream": true})
            .to_string();
    let mut c = s.send("POST", "/v1/chat/completions", body.as_bytes());
    read_until(&mut c, "content");
    let st = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let rest = read_until(&mut c, "[DONE]");
    assert!(rest.contains("finish_reason"), "{rest}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(200));
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}

/// The web page in headless Chromium (Debian's chromium + chromium-driver, selenium from
/// PyPI): choose an image and press "Describe", drop an image and ask; answers stream in.
#[test]
fn web_page_in_headless_chromium() {
    if common::smollm2_gguf().is_none() {
        return;
    }
    let py = std::env::var("AFM_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&py, &["-c", "import selenium"])
        || !(has("chromium", &["--version"]) || has("chromium-browser", &["--version"]))
        || !has("chromedriver", &["--version"])
    {
        afm::lm::testing::skip_missing::<()>(
            "the web-page test needs chromium, chromedriver (apt-get install chromium \
             chromium-driver) and selenium (pip install selenium) in AFM_PYTHON",
        );
        return;
    }
    let s = Server::start(&[]);
    let r = run_python(
        &py,
        &[
            script("serve_web_page.py").to_str().unwrap(),
            &s.url(),
            common::root()
                .join("assets/images/scene.png")
                .to_str()
                .unwrap(),
        ],
    );
    println!("web page: {r}");
    assert!(
        r["describe"].as_str().unwrap().split_whitespace().count() >= 2,
        "{r}"
    );
    assert!(!r["ask"].as_str().unwrap().is_empty(), "{r}");
}

/// `afm bench serve` runs end to end (a smoke run on two small streams; the figures are
/// not checked): the server's streams and the model's own batched step, side by side.
#[test]
fn bench_serve_reports_the_model_step_beside_the_server() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_afm"))
        .current_dir(common::root())
        .args(["--threads", "2", "bench", "serve", "--no-reference"])
        .args(["--streams", "1,2", "--max-tokens", "4", "--requests", "1"])
        .arg("--model")
        .arg(&gguf)
        .output()
        .unwrap();
    let (stdout, _) = common::succeeded(&out);
    assert!(stdout.contains("model step alone"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    // the model-step column holds a positive rate in every row, and the last column the
    // range of the per-round ratios to one stream (exactly 1 for one stream)
    for r in rows {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        let step: f64 = cells[4].parse().unwrap_or_else(|_| panic!("{r}"));
        assert!(step > 0.0, "{r}");
        let (lo, hi) = cells[8]
            .strip_suffix('x')
            .and_then(|c| c.split_once('-'))
            .unwrap_or_else(|| panic!("{r}"));
        let (lo, hi): (f64, f64) = (lo.parse().unwrap(), hi.parse().unwrap());
        assert!(lo > 0.0 && lo <= hi, "{r}");
        if cells[1] == "1" {
            assert_eq!((lo, hi), (1.0, 1.0), "{r}");
        }
    }
}

/// `--prefix-cache`: a second request that shares the chat template's system prompt with
/// the first reuses its K/V (`usage.prompt_tokens_details.cached_tokens`), and without the
/// flag nothing is reused. (Requests with images never use it: `engine::tests`.)
#[test]
fn prefix_cache_reuses_a_shared_prompt_start_and_reports_it() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let cached = |s: &Server, q: &str| -> (u64, u64, String) {
        let (st, body) = s.chat(serde_json::json!({"messages": user(q), "max_tokens": 6}));
        assert_eq!(st, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
            v["usage"]["prompt_tokens"].as_u64().unwrap(),
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    let s = Server::start(&["--model", gguf.to_str().unwrap(), "--prefix-cache", "16"]);
    let (c1, _, a1) = cached(&s, "Name a colour.");
    assert_eq!(c1, 0, "nothing to reuse yet");
    assert!(!a1.is_empty());
    // another question: the system prompt and the user turn's header are reused
    let (c2, p2, a2) = cached(&s, "Name an animal.");
    assert!(c2 >= 8 && c2 < p2, "cached {c2} of {p2}");
    assert!(!a2.is_empty());
    // the same question again: all but the last position
    let (c3, p3, _) = cached(&s, "Name a colour.");
    assert_eq!(c3, p3 - 1);
    drop(s);
    let s = Server::start(&["--model", gguf.to_str().unwrap()]);
    cached(&s, "Name a colour.");
    assert_eq!(
        cached(&s, "Name a colour.").0,
        0,
        "no reuse without --prefix-cache"
    );
}
