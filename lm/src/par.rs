//! Data parallelism on candle's CPU thread pool (the calling thread takes part), the pool
//! candle's own ops use, so our kernels and candle's never compete for the cores.

use std::ops::Range;

thread_local! {
    /// Set while this thread runs one of several coarse tasks that already share the cores
    /// (the server model's parallel tracks): our kernels then run on this thread alone
    /// instead of queueing for the whole pool.
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

/// Runs `f` over chunks of `0..n`, on candle's pool (or on this thread alone inside
/// [`inline`]).
pub fn par_ranges(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if INLINE.with(|c| c.get()) {
        if n > 0 {
            f(0..n);
        }
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, f);
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
}
