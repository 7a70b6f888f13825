//! A background load for the benchmarks' `--busy` runs: one thread spinning on a core, as a
//! desktop app's cores are shared with other programs. Bounded: it stops when dropped, and
//! after [`MAX`] in any case.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a busy loop runs, whatever happens to the benchmark.
pub const MAX: Duration = Duration::from_secs(30 * 60);

pub struct BusyLoop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl BusyLoop {
    /// Starts one spinning thread (not on any of the pools: a plain OS thread).
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("afm-bench-busy".into())
            .spawn(move || {
                let t0 = Instant::now();
                let mut x = 0x9E37_79B9_7F4A_7C15u64;
                let mut n = 0u64;
                while !s.load(Ordering::Relaxed) && t0.elapsed() < MAX {
                    for _ in 0..4096 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                    }
                    n += 1;
                }
                std::hint::black_box(x);
                n
            })
            .ok();
        if thread.is_none() {
            eprintln!("warning: could not start the background busy loop");
        }
        Self { stop, thread }
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `Some(BusyLoop)` when `on`, with a note on stderr.
pub fn maybe(on: bool) -> Option<BusyLoop> {
    on.then(|| {
        eprintln!("bench: a background busy loop holds one core for the whole run (--busy)");
        BusyLoop::start()
    })
}
