//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched by `scripts/fetch_smollm2.sh` into
/// `models/` (or named by `AFM_SMOLLM2_GGUF`). `None`, with a message saying how to get it,
/// when absent: the test is then skipped, never passed silently in CI (.ci/run fetches it
/// and sets `AFM_REQUIRE_REAL_WEIGHTS=1`, which turns the skip into a failure).
pub fn smollm2_gguf() -> Option<PathBuf> {
    afm::lm::testing::smollm2_gguf_or_skip()
}

/// The stdout and stderr of a finished command, after asserting that it succeeded (with
/// its stderr as the failure message).
pub fn succeeded(out: &std::process::Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    afm::lm::testing::read_f32_file(path).unwrap()
}
