//! Times continuous batching's decode step (`DeviceModel::forward_batch`) for one count of
//! sequences, long enough to profile (`perf record`).
//!
//! ```text
//! cargo run --release -p afm-lm --example batch_step -- MODEL.gguf [SEQUENCES] [STEPS] [KV_BITS]
//! ```
//!
//! Each sequence is prefilled with the same 24-token prompt; then `STEPS` (default 200)
//! batched steps run, once untimed (so that the weights are paged in) and then timed, and
//! the tokens per second of the timed steps are printed. `KV_BITS` 8 keeps
//! the K/V cache in int8 (scales calibrated as `--kv 8` does), 16 in f16, 32 in f32 (the default).
use afm_lm::{Checkpoint, LanguageModel, LogitsFor};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = a.first() else {
        return Err("usage: batch_step MODEL.gguf [SEQUENCES] [STEPS] [KV_BITS]".into());
    };
    let n: usize = a.get(1).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let steps: usize = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let mut ck = Checkpoint::load_with(std::path::Path::new(path), &Default::default())?;
    if let Some(bits) = a.get(3).map(|s| s.parse::<u32>()).transpose()? {
        let cal = ck.tokenizer.encode(afm_lm::kv8::CALIBRATION_TEXT)?;
        ck.model.apply_kv_bits(bits, &cal)?;
    }
    let m = &ck.model;
    let prompt: Vec<u32> = (0..24u32).map(|i| 100 + 37 * i).collect();
    let mut caches = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = m.new_cache();
        m.forward_tokens(&prompt, &mut c, &LogitsFor::Last)?;
        caches.push(c);
    }
    let ids: Vec<u32> = (0..n as u32).map(|i| 200 + i).collect();
    let fresh = caches.clone();
    for _ in 0..steps {
        let mut refs: Vec<&mut afm_lm::Cache> = caches.iter_mut().collect();
        m.forward_batch(&ids, &mut refs)?;
    }
    // AFM_REPEAT=R runs the timed steps R times from the same caches (a longer profile of
    // the same sequence lengths); the time printed is the median run's.
    let repeat: usize = std::env::var("AFM_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut runs = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        caches = fresh.clone();
        let t0 = Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut afm_lm::Cache> = caches.iter_mut().collect();
            m.forward_batch(&ids, &mut refs)?;
        }
        runs.push(t0.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    let s = runs[runs.len() / 2];
    println!(
        "{n} sequences, {steps} steps: {:.2} ms per step, {:.1} tok/s",
        1e3 * s / steps as f64,
        (n * steps) as f64 / s
    );
    Ok(())
}
