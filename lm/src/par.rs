//! Data parallelism on a thread pool of our own, made for a machine that other programs
//! share: the calling thread takes part, work is claimed in chunks from a shared cursor, a
//! worker that has not woken up yet is never waited for, and every wait spins only briefly
//! before it yields and then sleeps.
//!
//! # Protocol
//! A job is published by the caller (closure, item count, claim divisor, cursor at 0, state
//! *open* with no workers). A worker joins by incrementing the state's worker count while the
//! job is open, claims chunks until the cursor passes the end (each a fraction of what is
//! left, so the last ones are single items), and leaves by decrementing
//! it. The caller claims chunks too; when the cursor is exhausted it *closes* the job (no
//! worker joins any more) and waits only for the workers that joined, which are each inside
//! a chunk. So a worker the OS has not scheduled (another process holds its core) costs
//! nothing: the caller does its share. The caller waits for a preempted worker by sleeping
//! after a short spin (its core then goes idle and the kernel can move the worker there).
//!
//! # Contention
//! When a wait for a joined worker took longer than [`STALL`] (the worker was preempted in
//! the middle of a chunk), the pool runs every job on the calling thread alone for a while,
//! then tries the workers again: on a busy machine N threads are then about as fast as one
//! instead of waiting for descheduled threads. The period starts at [`SOLO_MIN`] and doubles
//! up to [`SOLO`] while stalls recur within [`SOLO`] of the last period's end: a machine
//! whose other programs hold a core soon runs solo for [`SOLO`] at a time, and an idle one
//! whose worker was preempted once (a kernel thread, the hypervisor) loses little. Idle
//! workers spin for at most [`SPIN`] (yielding the core after the first part of it) and then
//! park.
//!
//! The number of threads is `--threads` (through `RAYON_NUM_THREADS`, as candle's), else
//! the physical cores. [`barriers`] counts the jobs given to the pool: the synchronisation
//! points (`afm bench lm` reports them per token).

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job before parking: decode steps issue jobs a
/// few microseconds apart, and waking a parked thread costs tens of microseconds.
pub const SPIN: Duration = Duration::from_micros(200);
/// Of [`SPIN`], how long the worker polls without yielding its core.
const HOT_SPIN: Duration = Duration::from_micros(20);
/// How long the caller polls for joined workers before sleeping.
const WAIT_SPIN: Duration = Duration::from_micros(30);
/// A wait for joined workers longer than this means one was preempted mid-chunk.
pub const STALL: Duration = Duration::from_micros(1500);
/// The longest the pool then runs jobs on the calling thread alone, reached while stalls
/// recur (module docs).
pub const SOLO: Duration = Duration::from_millis(50);
/// The first solo period after a stall that does not follow another period closely. On an
/// idle Intel Xeon VM (2 vCPUs) the worker was preempted mid-chunk 3-19 times in 250
/// decoded tokens of the 3.1B model; with 50 ms each, the solo periods took 1-7% of the
/// decode, at half the bandwidth.
pub const SOLO_MIN: Duration = Duration::from_millis(4);

thread_local! {
    /// Set while this thread runs one of several coarse tasks that already share the cores
    /// (the server model's parallel tracks), and on the pool's workers: our kernels then run
    /// on this thread alone instead of queueing for the whole pool.
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with [`par_ranges`] inline on the current thread (restored afterwards, also on
/// error): for work that is itself one of several tasks run in parallel.
pub fn inline<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INLINE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(INLINE.with(|c| c.replace(true)));
    f()
}

/// The state word: the open bit and the number of workers inside the job.
const OPEN: u64 = 1 << 63;

type Task = dyn Fn(Range<usize>) + Sync;

fn noop(_: Range<usize>) {}
static NOOP: fn(Range<usize>) = noop;

struct Job {
    /// The caller's closure, lifetime erased: only dereferenced by workers that joined the
    /// job, which the caller waits for before it returns (so the closure outlives them).
    f: *const Task,
    n: usize,
    /// Claims take `1 / div` of what is left ([`claim`]).
    div: usize,
}

struct Shared {
    job: UnsafeCell<Job>,
    /// Bumped for every job (workers watch it).
    epoch: AtomicU64,
    state: AtomicU64,
    cursor: AtomicUsize,
    /// Per worker: parked (or about to park) and waiting for an unpark.
    sleeping: Box<[AtomicBool]>,
    threads: OnceLock<Box<[std::thread::Thread]>>,
    /// The caller is parked waiting for the last worker to leave.
    caller: UnsafeCell<Option<std::thread::Thread>>,
    caller_sleeping: AtomicBool,
    /// A panic inside a worker's chunk, re-raised on the caller.
    panicked: AtomicBool,
}

// SAFETY: `job` and `caller` are written only by the caller holding `Pool::lock` while no
// worker is inside a job (state closed and empty), and read by workers only after joining
// (Acquire on `state`, which the caller's Release store of the open state orders after the
// writes); everything else is atomic.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The pool (one per process, [`pool`]).
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time; a second caller (another thread) runs its job inline instead.
    lock: std::sync::Mutex<()>,
    /// Until when jobs run on the caller alone (nanoseconds since `t0`; 0 = never).
    solo_until: AtomicU64,
    /// The length of the last solo period (nanoseconds).
    solo_len: AtomicU64,
    t0: Instant,
    barriers: AtomicU64,
    stalls: AtomicU64,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// The process's pool, started on first use with `threads() - 1` workers.
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(threads().saturating_sub(1)))
}

/// Threads the pool uses, the caller included: `RAYON_NUM_THREADS` (what `--threads` sets)
/// or the physical cores, read once. (candle's `get_num_threads` parses `/proc/cpuinfo` on
/// every call when the variable is unset; the batched attention asks once per layer, which
/// cost a decode step about a fifth of its time.)
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Jobs of more than one item given to the pool since the process started (its
/// synchronisation points, counted also when they ran on the caller alone).
pub fn barriers() -> u64 {
    POOL.get().map_or(0, |p| p.barriers.load(Relaxed))
}

/// Waits for a preempted worker longer than [`STALL`] since the process started.
pub fn stalls() -> u64 {
    POOL.get().map_or(0, |p| p.stalls.load(Relaxed))
}

impl Pool {
    fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(Job {
                f: &NOOP as &Task as *const Task,
                n: 0,
                div: 1,
            }),
            epoch: AtomicU64::new(0),
            state: AtomicU64::new(0),
            cursor: AtomicUsize::new(0),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            threads: OnceLock::new(),
            caller: UnsafeCell::new(None),
            caller_sleeping: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let handles: Vec<std::thread::Thread> = (0..workers)
            .filter_map(|i| {
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("afm-pool-{i}"))
                    .spawn(move || worker(sh, i))
                    .ok()
                    .map(|j| j.thread().clone())
            })
            .collect();
        let workers = handles.len();
        let _ = shared.threads.set(handles.into_boxed_slice());
        Self {
            shared,
            workers,
            lock: std::sync::Mutex::new(()),
            solo_until: AtomicU64::new(0),
            solo_len: AtomicU64::new(0),
            t0: Instant::now(),
            barriers: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// Runs `f` over chunks of `0..n` on the caller and the workers.
    pub fn run(&self, n: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 {
            return f(0..n);
        }
        // a synchronisation point of the algorithm, whether or not workers join it
        self.barriers.fetch_add(1, Relaxed);
        if self.workers == 0 || self.now_ns() < self.solo_until.load(Relaxed) {
            return f(0..n);
        }
        // one job at a time; a concurrent caller (another thread) does its work alone
        let Ok(_guard) = self.lock.try_lock() else {
            return f(0..n);
        };
        let sh = &*self.shared;
        let threads = self.workers + 1;
        // guided claims: large first, single items at the end ([`claim`])
        let div = 2 * threads;
        // SAFETY: we hold the lock and the previous job is closed with no worker inside
        // (the wait below), so nothing reads `job` or `caller` now.
        unsafe {
            let f: *const (dyn Fn(Range<usize>) + Sync + '_) = f;
            // erase the lifetime: workers only use it while joined, and we wait for them
            *sh.job.get() = Job {
                f: std::mem::transmute::<*const (dyn Fn(Range<usize>) + Sync + '_), *const Task>(f),
                n,
                div,
            };
            *sh.caller.get() = Some(std::thread::current());
        }
        sh.cursor.store(0, Relaxed);
        sh.state.store(OPEN, Release);
        sh.epoch.fetch_add(1, SeqCst);
        if let Some(ts) = sh.threads.get() {
            for (s, t) in sh.sleeping.iter().zip(ts.iter()) {
                if s.load(SeqCst) && s.swap(false, SeqCst) {
                    t.unpark();
                }
            }
        }
        // our share, catching a panic so the workers are waited for before it goes on
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while let Some(r) = claim(&sh.cursor, n, div) {
                f(r);
            }
        }));
        // close: no worker joins from now on; wait for those inside
        let st = sh.state.fetch_and(!OPEN, AcqRel);
        if st & !OPEN != 0 {
            let waited = self.wait_for_workers();
            if waited > STALL {
                self.stalls.fetch_add(1, Relaxed);
                self.start_solo();
            }
        }
        let worker_panicked = sh.panicked.swap(false, Relaxed);
        drop(_guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if worker_panicked {
            panic!("a pool worker panicked");
        }
    }

    /// Starts a solo period after a stall: [`SOLO_MIN`], or twice the last one (at most
    /// [`SOLO`]) when that one ended less than [`SOLO`] ago. Only the caller holding the
    /// job lock gets here.
    fn start_solo(&self) {
        let now = self.now_ns();
        let (last_end, last_len) = (self.solo_until.load(Relaxed), self.solo_len.load(Relaxed));
        let len = solo_len(now, last_end, last_len);
        self.solo_len.store(len, Relaxed);
        self.solo_until.store(now + len, Relaxed);
    }

    /// Waits until no worker is inside the (closed) job; returns how long it took.
    fn wait_for_workers(&self) -> Duration {
        let sh = &*self.shared;
        let t = Instant::now();
        let mut i = 0u32;
        loop {
            if sh.state.load(Acquire) == 0 {
                return t.elapsed();
            }
            i += 1;
            if !i.is_multiple_of(64) || t.elapsed() < WAIT_SPIN {
                std::hint::spin_loop();
                continue;
            }
            // sleep until the last worker leaves (it unparks us)
            sh.caller_sleeping.store(true, SeqCst);
            if sh.state.load(SeqCst) == 0 {
                sh.caller_sleeping.store(false, SeqCst);
                return t.elapsed();
            }
            std::thread::park_timeout(Duration::from_millis(1));
            sh.caller_sleeping.store(false, SeqCst);
        }
    }
}

/// The next solo period's length (ns) after a stall at `now`, the last period having ended
/// at `last_end` (0: none yet) and lasted `last_len`.
fn solo_len(now: u64, last_end: u64, last_len: u64) -> u64 {
    let (min, max) = (SOLO_MIN.as_nanos() as u64, SOLO.as_nanos() as u64);
    if last_end != 0 && now < last_end + max {
        (2 * last_len).clamp(min, max)
    } else {
        min
    }
}

/// Claims the next items of a job of `n` from `cursor`: `1 / div` of those left (at least
/// one), so claims shrink as the job runs out and the last ones are single items. With
/// claims of a fixed eighth of the job (before), the thread that finished first waited for
/// up to a whole claim of the other's: for the 3.1B model's 4-bit output head, 20 MB and
/// about 1.4 ms on an Intel Xeon, close to [`STALL`]. There the caller's wait at the end of
/// a job fell from 1.6-4.2 to 0.8-1.2 us on average.
fn claim(cursor: &AtomicUsize, n: usize, div: usize) -> Option<Range<usize>> {
    let mut cur = cursor.load(Relaxed);
    loop {
        if cur >= n {
            return None;
        }
        let end = cur + ((n - cur) / div).max(1);
        match cursor.compare_exchange_weak(cur, end, Relaxed, Relaxed) {
            Ok(_) => return Some(cur..end),
            Err(c) => cur = c,
        }
    }
}

fn worker(sh: Arc<Shared>, me: usize) {
    INLINE.with(|c| c.set(true));
    let mut seen = sh.epoch.load(Acquire);
    loop {
        // wait for a new job: poll, then poll yielding, then park
        let t = Instant::now();
        let mut i = 0u32;
        loop {
            let e = sh.epoch.load(Acquire);
            if e != seen {
                seen = e;
                break;
            }
            i += 1;
            if !i.is_multiple_of(32) {
                std::hint::spin_loop();
                continue;
            }
            let el = t.elapsed();
            if el < HOT_SPIN {
                continue;
            }
            if el < SPIN {
                std::thread::yield_now();
                continue;
            }
            sh.sleeping[me].store(true, SeqCst);
            if sh.epoch.load(SeqCst) == seen {
                std::thread::park();
            }
            sh.sleeping[me].store(false, SeqCst);
        }
        // join if the job is still open
        let mut st = sh.state.load(Acquire);
        let joined = loop {
            if st & OPEN == 0 {
                break false;
            }
            match sh.state.compare_exchange_weak(st, st + 1, AcqRel, Acquire) {
                Ok(_) => break true,
                Err(s) => st = s,
            }
        };
        if !joined {
            continue;
        }
        // the job we joined may be newer than the epoch we saw
        seen = sh.epoch.load(Acquire);
        // SAFETY: joined: the caller wrote `job` and `caller` before opening the state and
        // does not return (or write them again) until we leave.
        let (f, n, div, caller) = unsafe {
            let j = &*sh.job.get();
            (&*j.f, j.n, j.div, (*sh.caller.get()).clone())
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while let Some(r) = claim(&sh.cursor, n, div) {
                f(r);
            }
        }));
        if r.is_err() {
            sh.panicked.store(true, Relaxed);
        }
        // leave; the last one out wakes a sleeping caller
        let before = sh.state.fetch_sub(1, SeqCst);
        if before == 1 && sh.caller_sleeping.load(SeqCst) {
            if let Some(c) = caller {
                c.unpark();
            }
        }
    }
}

/// Runs `f` over chunks of `0..n`, on the pool (or on this thread alone inside [`inline`]
/// and on the pool's own workers).
pub fn par_ranges(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if INLINE.with(|c| c.get()) {
        if n > 0 {
            f(0..n);
        }
        return;
    }
    pool().run(n, &f);
}

/// A `len`-long vector filled by `fill`, which gets its uninitialised storage and must
/// write every element: outputs that are wholly overwritten are not zeroed first (glibc's
/// `memset` of each matmul output was ~5% of a four-sequence decode step on AMD Zen 4).
/// In the crate's unit tests the storage starts as NaN, so that an element `fill` misses
/// shows in the kernels' bit-for-bit comparisons.
///
/// # Safety
/// `fill` must initialise all `len` elements unless it panics.
pub(crate) unsafe fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    #[cfg(test)]
    spare.iter_mut().for_each(|e| {
        e.write(f32::NAN);
    });
    fill(spare);
    // SAFETY: the capacity is at least len, and the caller's `fill` has initialised the
    // first len elements.
    unsafe { v.set_len(len) };
    v
}

/// A raw output pointer shared by the tasks of [`row_groups`] and [`row_tiles`], which write
/// disjoint elements.
struct GroupOut(*mut f32);
// SAFETY: only used in `row_groups` and `row_tiles`, where every task writes the outputs of
// its own weight rows, disjoint from every other task's, in a buffer that outlives the
// parallel region.
unsafe impl Sync for GroupOut {}

/// The parallel driver of the kernels that compute `G` interleaved weight rows at once
/// (`quant::groups`, `lowbit::groups`): the groups `0..groups` are split over the pool, and
/// for each group `g` and each run of at most 4 activation rows `c0 .. c0 + n`, `f(g, c0, n,
/// r)` puts the group's `G` outputs for each of those rows in `r[..n]` (a buffer of the task,
/// entries past `n` unused), written to `out[(c0 + j) * rows + g * G ..][..G]`. `out` need
/// not be initialised: the rows of every group are written for every activation row. (The
/// kernels returned a fresh, zeroed 4-row array per group before: a `memset` and two copies
/// of 256 bytes for 64 bytes of output at one activation row.)
///
/// # Shapes
/// `out: (m, rows)`, `groups * G <= rows`.
pub(crate) fn row_groups<const G: usize>(
    groups: usize,
    rows: usize,
    m: usize,
    out: &mut [MaybeUninit<f32>],
    f: impl Fn(usize, usize, usize, &mut [[f32; G]; 4]) + Sync,
) {
    assert!(groups * G <= rows && out.len() == m * rows);
    let ptr = GroupOut(out.as_mut_ptr().cast::<f32>());
    let ptr = &ptr;
    par_ranges(groups, |range| {
        let mut r = [[0f32; G]; 4];
        for g in range {
            let mut c0 = 0;
            while c0 < m {
                let n = (m - c0).min(4);
                f(g, c0, n, &mut r);
                for (j, v) in r[..n].iter().enumerate() {
                    // SAFETY: rows g * G .. g * G + G belong to this task's group alone and
                    // c0 + j < m, so the G floats at (c0 + j) * rows + g * G lie inside `out`
                    // (m * rows, asserted), which outlives the region and is not read
                    // meanwhile.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            v.as_ptr(),
                            ptr.0.add((c0 + j) * rows + g * G),
                            G,
                        )
                    };
                }
                c0 += n;
            }
        }
    });
}

/// The parallel driver of the row-layout kernels (`quant`, `lowbit`): weight rows `from..rows`
/// in runs of 4 over the pool; `tile(r0, nr, o)` computes rows `r0 .. r0 + nr` against all
/// `m` activation rows into `o` (`(nr, m)`), which is written to `out`. Every element of
/// those rows is written; `out` need not be initialised.
///
/// # Shapes
/// `out: (m, rows)`.
pub(crate) fn row_tiles(
    from: usize,
    rows: usize,
    m: usize,
    out: &mut [MaybeUninit<f32>],
    tile: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert!(from <= rows && out.len() == m * rows);
    let ptr = GroupOut(out.as_mut_ptr().cast::<f32>());
    let ptr = &ptr;
    par_ranges((rows - from).div_ceil(4), |range| {
        let r0 = from + range.start * 4;
        let r1 = (from + range.end * 4).min(rows);
        let mut t = vec![0f32; (r1 - r0) * m];
        tile(r0, r1 - r0, &mut t);
        for i in 0..m {
            for r in r0..r1 {
                // SAFETY: rows r0..r1 belong to this task alone, and i * rows + r is inside
                // `out` (m * rows, asserted), which outlives the parallel region.
                unsafe { *ptr.0.add(i * rows + r) = t[(r - r0) * m + i] };
            }
        }
    });
}

/// Splits `out` into `chunk`-long pieces and runs `f(index, piece)` on each, in parallel.
pub fn par_chunks_mut<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if chunk == 0 || out.is_empty() {
        return;
    }
    let n = out.len().div_ceil(chunk);
    let len = out.len();
    let base = SharedPtr(out.as_mut_ptr());
    let base = &base;
    par_ranges(n, |r| {
        for i in r {
            let start = i * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: piece i covers out[i*chunk .. min((i+1)*chunk, len)]; every index i is
            // handed to exactly one task, so pieces never overlap, and `out` is borrowed
            // mutably for the whole call, outliving the parallel region.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
            f(i, piece);
        }
    });
}

struct SharedPtr<T>(*mut T);
// SAFETY: only dereferenced in `par_chunks_mut`, for disjoint pieces (see there).
unsafe impl<T: Send> Sync for SharedPtr<T> {}

/// `sum(a[i] * b[i])` with 8 independent accumulators so it vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out += w * x`, elementwise.
#[inline]
pub fn axpy(w: f32, x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_everything_once() {
        let mut v = vec![0u32; 1003];
        par_chunks_mut(&mut v, 10, |i, p| {
            p.iter_mut().for_each(|x| *x += i as u32 + 1)
        });
        for (j, x) in v.iter().enumerate() {
            assert_eq!(*x, (j / 10) as u32 + 1);
        }
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..19).map(|i| (i * i) as f32).sum::<f32>());
    }

    /// Claims from one cursor, alone and from two threads at once, cover `0..n` exactly once
    /// in increasing order per thread; alone they shrink and the last ones are single items.
    #[test]
    fn claims_cover_every_item_once_and_shrink() {
        for n in [1usize, 2, 3, 7, 64, 1000, 9600] {
            let cursor = AtomicUsize::new(0);
            let mut seen = Vec::new();
            let mut sizes = Vec::new();
            while let Some(r) = claim(&cursor, n, 4) {
                sizes.push(r.len());
                seen.extend(r);
            }
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
            assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "n = {n}: {sizes:?}");
            assert_eq!(*sizes.last().unwrap(), 1, "n = {n}");
            assert!(sizes[0] == (n / 4).max(1), "n = {n}: {sizes:?}");
            // a geometric number of claims, not one per item
            assert!(
                sizes.len() <= 4 * (n as f64).ln().ceil() as usize + 4,
                "n = {n}: {sizes:?}"
            );
        }
        let n = 100_000;
        let cursor = AtomicUsize::new(0);
        let parts: Vec<Vec<usize>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut v = Vec::new();
                        while let Some(r) = claim(&cursor, n, 4) {
                            v.extend(r);
                        }
                        v
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<usize> = parts.concat();
        assert!(parts.iter().all(|p| p.windows(2).all(|w| w[0] < w[1])));
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    /// Solo periods: the shortest after an isolated stall, doubling while stalls recur soon
    /// after the last one ended, never past `SOLO`, back to the shortest after a quiet spell.
    #[test]
    fn solo_periods_grow_while_stalls_recur() {
        let (min, max) = (SOLO_MIN.as_nanos() as u64, SOLO.as_nanos() as u64);
        assert_eq!(solo_len(5_000_000_000, 0, 0), min);
        let (mut now, mut end, mut len) = (1_000_000_000u64, 0u64, 0u64);
        let mut lens = Vec::new();
        for _ in 0..8 {
            len = solo_len(now, end, len);
            end = now + len;
            lens.push(len);
            now = end + 2_000_000; // the next stall 2 ms after the period ends
        }
        assert_eq!(lens[..4], [min, 2 * min, 4 * min, 8 * min]);
        assert!(lens.windows(2).all(|w| w[1] >= w[0]) && *lens.last().unwrap() == max);
        assert_eq!(solo_len(end + max + 1, end, len), min);
    }

    /// Many jobs of every size from several threads at once (one of them gets the pool, the
    /// others run inline), nested calls, and a panic in a chunk: every item is done exactly
    /// once, the panic reaches the caller, and the pool works afterwards.
    #[test]
    fn jobs_from_many_threads_nested_and_panicking() {
        use std::sync::atomic::AtomicU32;
        std::thread::scope(|s| {
            for t in 0..3u32 {
                s.spawn(move || {
                    for n in (0..300).chain([1000, 4097]) {
                        let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                        par_ranges(n, |r| {
                            for i in r {
                                hits[i].fetch_add(1, Relaxed);
                                if i % 97 == t as usize {
                                    // nested: runs inline on whichever thread got here
                                    par_ranges(3, |q| assert!(q.end <= 3));
                                }
                            }
                        });
                        assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
                    }
                });
            }
        });
        let r = std::panic::catch_unwind(|| {
            par_ranges(64, |r| {
                if r.contains(&40) {
                    panic!("chunk 40");
                }
            })
        });
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        par_ranges(1000, |r| {
            sum.fetch_add(r.sum::<usize>(), Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 999 * 1000 / 2);
    }
}
