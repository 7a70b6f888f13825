//! The hostile-input corpus (`tests/hostile/mod.rs` writes it from a seed): every case runs
//! through its library loader and through the `afm` CLI, each in a child process with an
//! address-space limit (RLIMIT_AS, 3 GiB) and a 30 s deadline, and must give a clear error
//! (the message holds the words the case names) or the correct result (the same output as
//! its base). A panic, abort, timeout, a wrong or unclear error, or a normal-looking answer
//! from broken input fails the test, which prints the totals. See `docs/hostile-input.md`.
//!
//! `AFM_HOSTILE_ONLY=substring` runs the matching cases only; `AFM_HOSTILE_KEEP=1` keeps the
//! corpus directory.

mod hostile;

use hostile::{Case, Expect, Target, PROMPT_IDS};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);
const MEMORY_LIMIT: u64 = 3 << 30;
const SEED: u64 = 19;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    ClearError,
    Correct,
    /// A panic, an abort (out of memory under the limit), or the deadline passed.
    Crash,
    /// Success from broken input, or a result that differs from the base.
    SilentlyWrong,
    /// An error that does not name the problem, or a refusal of valid input.
    BadError,
}

/// Sets the address-space limit of the calling process.
fn limit_memory() {
    let lim = libc::rlimit {
        rlim_cur: MEMORY_LIMIT,
        rlim_max: MEMORY_LIMIT,
    };
    // SAFETY: setrlimit reads the struct we pass and touches no other memory; it is
    // async-signal-safe, so it may also run between fork and exec.
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &lim);
    }
}

fn lm_logits(path: &Path, server: bool) -> Result<Vec<f32>, String> {
    use afm::lm::{Checkpoint, LanguageModel, LogitsFor, ServerCheckpoint};
    let run = |m: &dyn Fn() -> afm::lm::Result<candle_core::Tensor>| {
        m().map_err(|e| e.to_string()).and_then(|t| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())
        })
    };
    if server {
        let ck = ServerCheckpoint::load(path).map_err(|e| e.to_string())?;
        run(&|| {
            ck.model
                .forward_tokens(&PROMPT_IDS, &mut ck.model.new_cache(), &LogitsFor::Last)
        })
    } else {
        let ck = Checkpoint::load(path).map_err(|e| e.to_string())?;
        // the tokenizer must work too
        let ids = ck
            .tokenizer
            .encode("hello world")
            .map_err(|e| e.to_string())?;
        if ids.is_empty() {
            return Err("the tokenizer encoded nothing".into());
        }
        run(&|| {
            ck.model
                .forward_tokens(&PROMPT_IDS, &mut ck.model.new_cache(), &LogitsFor::Last)
        })
    }
}

fn vlm_caption(dir: &Path) -> Result<String, String> {
    use afm::fusion::{AskOptions, ModelDir};
    let md = ModelDir::open(dir).map_err(|e| e.to_string())?;
    let vlm = md.load(None).map_err(|e| e.to_string())?;
    let img = afm::vision::image::RgbImage::from_fn(40, 32, |x, y| {
        afm::vision::image::Rgb([(x * 6) as u8, (y * 7) as u8, 90])
    });
    let mut opts = AskOptions::default();
    opts.generate.max_new_tokens = 3;
    let a = vlm
        .caption(&img, &opts, &mut |_| true)
        .map_err(|e| e.to_string())?;
    Ok(a.generation.text)
}

fn read_rgb(p: &Path) -> (u32, u32, Vec<u8>) {
    let b = std::fs::read(p).unwrap();
    let w = u32::from_le_bytes(b[..4].try_into().unwrap());
    let h = u32::from_le_bytes(b[4..8].try_into().unwrap());
    (w, h, b[8..].to_vec())
}

/// Runs one case's library target in this (child) process; `Ok(detail)` when the result
/// matches the base, `Err("error: ..")` for an error, `Err("wrong: ..")` for a mismatch.
fn run_library(c: &Case) -> Result<String, String> {
    let tol = match &c.expect {
        Expect::Ok { tol } => *tol,
        _ => 0.0,
    };
    let e = |m: String| format!("error: {m}");
    match c.target {
        Target::Lm | Target::Server => {
            let got = lm_logits(&c.path, c.target == Target::Server).map_err(e)?;
            let Some(base) = &c.base else {
                return Ok("loaded (no base to compare)".into());
            };
            let want = lm_logits(base, c.target == Target::Server)
                .map_err(|m| format!("error: the base failed: {m}"))?;
            let d = got
                .iter()
                .zip(&want)
                // equal values (the same infinity included) differ by 0, not inf - inf = NaN
                .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() })
                // NaN-propagating: `f32::max` would skip a NaN logit and call it a match
                .fold(0f32, |m, x| {
                    if m.is_nan() || x.is_nan() {
                        f32::NAN
                    } else {
                        m.max(x)
                    }
                });
            if got.len() != want.len() || d.is_nan() || d > tol.max(1e-4) {
                return Err(format!("wrong: logits differ from the base by {d}"));
            }
            Ok(format!("logits match the base (max diff {d:.2e})"))
        }
        Target::Image => {
            let img = afm::vision::load_image(&c.path, &afm::vision::ImageLimits::default())
                .map_err(|m| e(m.to_string()))?;
            let Some(r) = &c.base else {
                return Ok(format!(
                    "decoded {}x{} (no reference)",
                    img.width(),
                    img.height()
                ));
            };
            let (w, h, px) = read_rgb(r);
            if (img.width(), img.height()) != (w, h) {
                return Err(format!(
                    "wrong: {}x{}, reference {w}x{h}",
                    img.width(),
                    img.height()
                ));
            }
            let mean = img
                .as_raw()
                .iter()
                .zip(&px)
                .map(|(&a, &b)| (a as f32 - b as f32).abs())
                .sum::<f32>()
                / px.len() as f32;
            if mean > tol {
                return Err(format!("wrong: mean pixel difference {mean} > {tol}"));
            }
            Ok(format!("{w}x{h}, mean pixel difference {mean:.2}"))
        }
        Target::Vlm => {
            let got = vlm_caption(&c.path).map_err(e)?;
            if let Some(b) = &c.base {
                let want = vlm_caption(b).map_err(|m| format!("error: the base failed: {m}"))?;
                if got != want {
                    return Err(format!("wrong: caption {got:?}, base {want:?}"));
                }
            }
            Ok(format!("caption {got:?} as the base"))
        }
        Target::LmConfig => afm::lm::LmConfig::from_file(&c.path)
            .map(|_| "parsed".to_string())
            .map_err(|m| e(m.to_string())),
        Target::ServerConfig => afm::lm::ServerConfig::from_file(&c.path)
            .map(|_| "parsed".to_string())
            .map_err(|m| e(m.to_string())),
        Target::VisionConfig => afm::vision::VisionConfig::from_file(&c.path)
            .map(|_| "parsed".to_string())
            .map_err(|m| e(m.to_string())),
        Target::Tokenizer => {
            let t = afm::lm::Tokenizer::from_dir(&c.path).map_err(|m| e(m.to_string()))?;
            let text = "hello world, 123";
            let ids = t.encode(text).map_err(|m| e(m.to_string()))?;
            let back = t.decode(&ids, true).map_err(|m| e(m.to_string()))?;
            if !back.contains(text) {
                return Err(format!("wrong: round trip gave {back:?}"));
            }
            Ok("round trip".into())
        }
        Target::CliOnly => Ok("no library target".into()),
    }
}

/// Child mode: runs the case named by `AFM_HOSTILE_CASE` from the manifest and prints one
/// `RESULT` line.
#[test]
fn child_case() {
    let (Ok(manifest), Ok(id)) = (
        std::env::var("AFM_HOSTILE_MANIFEST"),
        std::env::var("AFM_HOSTILE_CASE"),
    ) else {
        return; // not a child
    };
    limit_memory();
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let c = cases.iter().find(|c| c.id == id).expect("case in manifest");
    match run_library(c) {
        Ok(d) => println!("RESULT ok {d}"),
        Err(m) => println!("RESULT {}", m.replace('\n', " ")),
    }
}

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
    secs: f64,
}

fn run_with_deadline(mut cmd: Command) -> Run {
    let t0 = Instant::now();
    let dir = std::env::temp_dir();
    let tag =
        format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "");
    let (o, e) = (
        dir.join(format!("afm-hostile-{tag}.out")),
        dir.join(format!("afm-hostile-{tag}.err")),
    );
    cmd.stdout(Stdio::from(std::fs::File::create(&o).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&e).unwrap()))
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > DEADLINE {
            child.kill().ok();
            timed_out = true;
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let r = Run {
        status: status.code(),
        stdout: read(&o),
        stderr: read(&e),
        timed_out,
        secs: t0.elapsed().as_secs_f64(),
    };
    std::fs::remove_file(o).ok();
    std::fs::remove_file(e).ok();
    r
}

fn error_outcome(expect: &Expect, msg: &str) -> Outcome {
    match expect {
        Expect::Ok { .. } => Outcome::BadError,
        Expect::Err(words) | Expect::Either(words) => {
            let m = msg.to_lowercase();
            let ok = words.iter().all(|w| match w.strip_prefix('!') {
                Some(not) => !m.contains(&not.to_lowercase()),
                None => m.contains(&w.to_lowercase()),
            });
            if ok {
                Outcome::ClearError
            } else {
                Outcome::BadError
            }
        }
    }
}

fn crashed(r: &Run) -> bool {
    r.timed_out
        || r.status.is_none()
        || r.status == Some(101)
        || r.stderr.contains("panicked")
        || r.stderr.contains("memory allocation of")
}

fn classify_library(c: &Case, manifest: &Path) -> (Outcome, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_case",
        "--exact",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("AFM_HOSTILE_MANIFEST", manifest)
    .env("AFM_HOSTILE_CASE", &c.id)
    .env("RAYON_NUM_THREADS", "1");
    let r = run_with_deadline(cmd);
    if crashed(&r) {
        let why = if r.timed_out {
            "timeout".to_string()
        } else {
            last_line(&r.stderr)
        };
        return (Outcome::Crash, format!("{why} ({:.1} s)", r.secs));
    }
    // (the harness may print `test child_case ... ` before it on the same line)
    let Some(line) = r
        .stdout
        .lines()
        .find_map(|l| l.find("RESULT ").map(|i| &l[i + 7..]))
    else {
        return (
            Outcome::Crash,
            format!("no result: {}", last_line(&r.stderr)),
        );
    };
    let line = line.to_string();
    if let Some(d) = line.strip_prefix("ok ") {
        return match c.expect {
            Expect::Ok { .. } | Expect::Either(_) => (Outcome::Correct, d.to_string()),
            Expect::Err(_) => (Outcome::SilentlyWrong, format!("accepted: {d}")),
        };
    }
    if let Some(d) = line.strip_prefix("wrong: ") {
        return (Outcome::SilentlyWrong, d.to_string());
    }
    let msg = line.strip_prefix("error: ").unwrap_or(&line).to_string();
    (error_outcome(&c.expect, &msg), msg)
}

fn last_line(s: &str) -> String {
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

fn classify_cli(c: &Case) -> (Outcome, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_afm"));
    let path = c.path.display().to_string();
    cmd.args(c.cli.iter().map(|a| a.replace("{path}", &path)))
        .env("AFM_HOME", std::env::temp_dir().join("afm-hostile-no-home"))
        .env("PYTHON", "/nonexistent-python-no-downloads")
        .env_remove("AFM_SMOLLM2_GGUF")
        .env("RAYON_NUM_THREADS", "1");
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            limit_memory();
            Ok(())
        });
    }
    let r = run_with_deadline(cmd);
    if crashed(&r) {
        let why = if r.timed_out {
            "timeout".to_string()
        } else {
            last_line(&r.stderr)
        };
        return (Outcome::Crash, format!("{why} ({:.1} s)", r.secs));
    }
    if r.status == Some(0) {
        return match c.expect {
            Expect::Ok { .. } | Expect::Either(_) if r.stdout.trim().is_empty() => {
                (Outcome::SilentlyWrong, "exit 0 with no output".into())
            }
            Expect::Ok { .. } | Expect::Either(_) => (Outcome::Correct, format!("{:.1} s", r.secs)),
            Expect::Err(_) => (
                Outcome::SilentlyWrong,
                format!(
                    "exit 0: {}",
                    r.stdout.trim().chars().take(80).collect::<String>()
                ),
            ),
        };
    }
    // a failed image in a caption batch is reported on stderr and in the JSONL
    let msg = format!("{} {}", r.stderr, r.stdout);
    (error_outcome(&c.expect, &msg), last_line(&r.stderr))
}

#[test]
fn hostile_corpus_gives_clear_errors_or_correct_results() {
    if std::env::var("AFM_HOSTILE_CASE").is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("afm-hostile-corpus-{}", std::process::id()));
    let t0 = Instant::now();
    let corpus = hostile::generate(&dir, SEED);
    let gen_secs = t0.elapsed().as_secs_f64();
    let manifest = dir.join("manifest.json");
    std::fs::write(&manifest, serde_json::to_vec(&corpus.cases).unwrap()).unwrap();
    let only = std::env::var("AFM_HOSTILE_ONLY").ok();
    let cases: Vec<&Case> = corpus
        .cases
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.id.contains(o)))
        .collect();
    // (case, channel) jobs, run 2 at a time (the CI machine has 2 cores)
    let mut jobs: Vec<(&Case, bool)> = vec![];
    for c in &cases {
        if c.target != Target::CliOnly {
            jobs.push((c, false));
        }
        if !c.cli.is_empty() {
            jobs.push((c, true));
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(c, cli)) = jobs.get(i) else { break };
                let t = Instant::now();
                let (o, d) = if cli {
                    classify_cli(c)
                } else {
                    classify_library(c, &manifest)
                };
                results
                    .lock()
                    .unwrap()
                    .push((c.id.clone(), cli, o, d, t.elapsed().as_secs_f64()));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut totals = std::collections::BTreeMap::new();
    let mut bad = vec![];
    for (id, cli, o, d, secs) in &results {
        *totals.entry((*cli, *o)).or_insert(0usize) += 1;
        let ch = if *cli { "cli" } else { "lib" };
        println!("{o:?}\t{ch}\t{id}\t{secs:.2}s\t{d}");
        if !matches!(o, Outcome::ClearError | Outcome::Correct) {
            bad.push(format!("{o:?} {ch} {id}: {d}"));
        }
    }
    let slowest = results.iter().map(|r| r.4).fold(0f64, f64::max);
    println!(
        "\n{} cases ({} runs) written in {gen_secs:.1} s, run in {:.1} s (slowest run {slowest:.1} s)",
        cases.len(),
        results.len(),
        t0.elapsed().as_secs_f64() - gen_secs
    );
    for ch in [false, true] {
        let n = |o| totals.get(&(ch, o)).copied().unwrap_or(0);
        println!(
            "{}: clear error {} | correct {} | panic/abort/timeout {} | silently wrong {} | unclear or wrong error {}",
            if ch { "CLI    " } else { "library" },
            n(Outcome::ClearError),
            n(Outcome::Correct),
            n(Outcome::Crash),
            n(Outcome::SilentlyWrong),
            n(Outcome::BadError)
        );
    }
    // per case: the worst of its runs (library and CLI)
    let mut worst = std::collections::BTreeMap::new();
    for (id, _, o, _, _) in &results {
        let w = worst.entry(id.clone()).or_insert(*o);
        let rank = |o: &Outcome| match o {
            Outcome::Correct => 0,
            Outcome::ClearError => 1,
            Outcome::BadError => 2,
            Outcome::SilentlyWrong => 3,
            Outcome::Crash => 4,
        };
        if rank(o) > rank(w) {
            *w = *o;
        }
    }
    let n = |o| worst.values().filter(|&&w| w == o).count();
    println!(
        "per case: clear error {} | correct {} | panic/abort/timeout {} | silently wrong {} | unclear or wrong error {}",
        n(Outcome::ClearError),
        n(Outcome::Correct),
        n(Outcome::Crash),
        n(Outcome::SilentlyWrong),
        n(Outcome::BadError)
    );
    if std::env::var("AFM_HOSTILE_KEEP").is_err() {
        std::fs::remove_dir_all(&dir).ok();
    }
    assert!(
        cases.len() >= 150 || only.is_some(),
        "only {} cases",
        cases.len()
    );
    assert!(
        bad.is_empty(),
        "{} bad runs:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
