//! Times the text-line reader's forward and backward passes on one training batch.
//! Usage: reader_speed [BATCH]
use afm_train::reader_train::{batch, ctc_loss, init_params, reader_of, ReaderTrainConfig};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = ReaderTrainConfig::afm_tiny();
    if let Some(b) = std::env::args().nth(1) {
        cfg.batch_size = b.parse()?;
    }
    let params = init_params(&cfg.model, 1)?;
    for step in 0..3 {
        let t0 = Instant::now();
        let lines = batch(&cfg, step);
        let t1 = Instant::now();
        let r = reader_of(&cfg.model, &params)?;
        let loss = ctc_loss(&r, &lines)?;
        let t2 = Instant::now();
        let _g = loss.backward()?;
        let t3 = Instant::now();
        let wmax = lines.iter().map(|l| l.1).max().unwrap_or(0);
        println!(
            "step {step}: {} lines, widest {wmax} px: data {:.3} s, forward+ctc {:.3} s, backward {:.3} s",
            lines.len(),
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
    }
    Ok(())
}
