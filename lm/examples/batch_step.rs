//! Times continuous batching's decode step (`DeviceModel::forward_batch`) for one count of
//! sequences, long enough to profile (`perf record`).
//!
//! ```text
//! cargo run --release -p afm-lm --example batch_step -- MODEL.gguf [SEQUENCES] [STEPS]
//! ```
//!
//! Each sequence is prefilled with the same 24-token prompt; then `STEPS` (default 200)
//! batched steps run, and the tokens per second of the steps are printed.
use afm_lm::{DeviceModel, LanguageModel, LogitsFor};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = a.first() else {
        return Err("usage: batch_step MODEL.gguf [SEQUENCES] [STEPS]".into());
    };
    let n: usize = a.get(1).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let steps: usize = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let m = DeviceModel::load(std::path::Path::new(path))?;
    let prompt: Vec<u32> = (0..24u32).map(|i| 100 + 37 * i).collect();
    let mut caches = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = m.new_cache();
        m.forward_tokens(&prompt, &mut c, &LogitsFor::Last)?;
        caches.push(c);
    }
    let ids: Vec<u32> = (0..n as u32).map(|i| 200 + i).collect();
    let t0 = Instant::now();
    for _ in 0..steps {
        let mut refs: Vec<&mut afm_lm::Cache> = caches.iter_mut().collect();
        m.forward_batch(&ids, &mut refs)?;
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{n} sequences, {steps} steps: {:.2} ms per step, {:.1} tok/s",
        1e3 * s / steps as f64,
        (n * steps) as f64 / s
    );
    Ok(())
}
