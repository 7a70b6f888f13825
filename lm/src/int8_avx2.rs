//! 256-bit kernels of the int8 path (a child module of `int8`): the same integers as the
//! portable `tile_scalar`, on CPUs without AVX-512.
//!
//! * [`tile_madd`] (AVX2): `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs
//!   into saturating i16, so it cannot take `qx + 128` (up to 255) times `qw`: it takes
//!   `|qw|` times `qx` with the sign of `qw` (pairs stay within `2 * 127 * 127 < 2^15`), then
//!   `vpmaddwd` by ones sums the pairs into i32. That is `sum qx * qw` directly, so the
//!   `128 * sum qw` offsets are not subtracted.
//! * [`tile_wide`] (AVX2, three rows or more, up to 64 at once): the bytes widened to i16,
//!   a block of weights once for all the rows, and `vpmaddwd` by the inputs broadcast: 16
//!   products per multiply instruction with no sign fix-ups. The same integers as
//!   `tile_madd` and the same fused scaling, so the same bits.
//! * [`tile_vnni`] (AVX-VNNI, or AVX-512 VNNI with VL): `vpdpbusd` on `qx + 128` as the
//!   AVX-512 kernel does, minus the offsets.
//!
//! A panel step (4 inputs x 32 channels, 128 bytes) is four 256-bit registers; `tile_madd`
//! and `tile_vnni` take two rows at a time, keeping the 8 accumulators and the 4 weight
//! registers in the 16 `ymm` registers.

use super::{Tile, MB, MR, NR};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Rows per micro-kernel call.
const M2: usize = 2;

/// The four 256-bit weight registers of panel step `kg`.
#[inline(always)]
unsafe fn load_step(b: *const i8, kg: usize) -> [__m256i; 4] {
    let p = b.add(kg * 128) as *const __m256i;
    [
        _mm256_loadu_si256(p),
        _mm256_loadu_si256(p.add(1)),
        _mm256_loadu_si256(p.add(2)),
        _mm256_loadu_si256(p.add(3)),
    ]
}

/// Activation row `r`'s 4 bytes of step `kg`, broadcast.
#[inline(always)]
unsafe fn bcast(t: &Tile, r: usize, kg: usize) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(
        t.a.as_ptr().add(r * t.kp + kg * 4) as *const i32,
    ))
}

#[inline(always)]
unsafe fn store(acc: &mut [[f32; NR]; MR], r: usize, f: &[__m256; 4]) {
    for (j, v) in f.iter().enumerate() {
        _mm256_storeu_ps(acc[r].as_mut_ptr().add(j * 8), *v);
    }
}

/// AVX2 kernel.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the slices of `t` must have the sizes `Tile` documents.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_madd(t: &Tile, acc: &mut [[f32; NR]; MR]) {
    let mut r = 0;
    while r < t.m {
        if t.m - r >= M2 {
            rows_madd::<M2>(t, r, acc);
        } else {
            rows_madd::<1>(t, r, acc);
        }
        r += M2;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rows_madd<const M: usize>(t: &Tile, r0: usize, acc: &mut [[f32; NR]; MR]) {
    let groups = t.kp / 4;
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut f = [[_mm256_setzero_ps(); 4]; M];
    for g in 0..t.ng {
        let mut s = [[_mm256_setzero_si256(); 4]; M];
        for kg in g * t.steps..((g + 1) * t.steps).min(groups) {
            let w = load_step(t.panel.as_ptr(), kg);
            let aw = w.map(|v| _mm256_sign_epi8(v, v));
            for (r, sr) in s.iter_mut().enumerate() {
                // qx + 128 xor 0x80 = qx as i8 (qx in [-127, 127])
                let a = _mm256_xor_si256(bcast(t, r0 + r, kg), flip);
                for j in 0..4 {
                    let p = _mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(a, w[j]));
                    sr[j] = _mm256_add_epi32(sr[j], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for (r, fr) in f.iter_mut().enumerate() {
            let sx = _mm256_set1_ps(*t.sx.get_unchecked((r0 + r) * t.ng + g));
            for j in 0..4 {
                fr[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][j]), sx, fr[j]);
            }
        }
    }
    for (r, fr) in f.iter().enumerate() {
        store(acc, r0 + r, fr);
    }
}

/// Weight steps (4 inputs x 32 channels each) per block of [`tile_wide`]: the block's
/// weights widened to i16 (`KB` x 256 bytes = 8 KiB) stay in L1 while every row runs over
/// them.
const KB: usize = 32;

/// AVX2 kernel for three or more rows, up to [`MB`] at once: bytes widened to i16 and
/// multiplied by `vpmaddwd`, 16 products per instruction with no sign fix-ups, where
/// [`tile_madd`] spends a `vpsignb`, a `vpmaddubsw` and a `vpmaddwd` on 32.
///
/// Per group, per block of [`KB`] steps: the block's weights are widened once for all the
/// rows (`vpmovsxbw`; register `j` of a step holds channels `4j..4j + 4`, each as its 4
/// inputs) and so are the rows' activations (`qx = byte - 128`); then each pair of rows runs
/// over one half of the channels at a time (4 weight registers, 2 x 4 accumulators).
/// `vpmaddwd` by the 4 inputs broadcast leaves each channel's sum in two adjacent lanes
/// (inputs 0-1 and 2-3), added together at the end of the group (`vphaddd`). The same
/// integer sums as the other kernels (exact in i32), scaled into `acc` by the same fused
/// multiply-add as [`tile_madd`], so the same bits as it.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the slices of `t` must have the sizes `Tile` documents;
/// `t.m <= MB` and `acc` holds `t.m` rows.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_wide(t: &Tile, acc: &mut [[f32; NR]]) {
    let groups = t.kp / 4;
    let m = t.m;
    assert!(m <= MB && acc.len() >= m, "tile_wide takes up to {MB} rows");
    // scratch that every use writes first (only the first `n * 8` weight registers and
    // `n * 4` values per row are read): not zeroed, 40 KiB of stack per call
    let mut w = MaybeUninit::<[__m256i; KB * 8]>::uninit();
    let w = w.as_mut_ptr() as *mut __m256i;
    let mut a = MaybeUninit::<[i16; MB * KB * 4]>::uninit();
    let a = a.as_mut_ptr() as *mut i16;
    let mut s = MaybeUninit::<[[__m256i; 8]; MB]>::uninit();
    let s = s.as_mut_ptr() as *mut [__m256i; 8];
    for accr in acc.iter_mut().take(m) {
        *accr = [0.0; NR];
    }
    for g in 0..t.ng {
        let (k0, k1) = (g * t.steps, ((g + 1) * t.steps).min(groups));
        for r in 0..m {
            s.add(r).write([_mm256_setzero_si256(); 8]);
        }
        let mut b0 = k0;
        while b0 < k1 {
            let n = KB.min(k1 - b0);
            let src = t.panel.as_ptr().add(b0 * NR * 4) as *const __m128i;
            for i in 0..n * 8 {
                w.add(i)
                    .write(_mm256_cvtepi8_epi16(_mm_loadu_si128(src.add(i))));
            }
            for r in 0..m {
                let src = &t.a[r * t.kp + b0 * 4..r * t.kp + (b0 + n) * 4];
                let dst = a.add(r * KB * 4);
                for (i, &q) in src.iter().enumerate() {
                    dst.add(i).write(q as i16 - 128);
                }
            }
            for h in 0..2 {
                let mut r = 0;
                while r < m {
                    if m - r >= 2 {
                        wide_rows::<2>(w, a, n, h, s, r);
                    } else {
                        wide_rows::<1>(w, a, n, h, s, r);
                    }
                    r += 2;
                }
            }
            b0 += n;
        }
        for (r, accr) in acc.iter_mut().take(m).enumerate() {
            let sr = &*s.add(r);
            let sx = _mm256_set1_ps(*t.sx.get_unchecked(r * t.ng + g));
            for i in 0..4 {
                // lanes (channel 8i + c, inputs 0-1 | 2-3) -> one lane per channel, in order
                let sum = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(
                    sr[2 * i],
                    sr[2 * i + 1],
                ));
                let p = accr.as_mut_ptr().add(8 * i);
                _mm256_storeu_ps(
                    p,
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sx, _mm256_loadu_ps(p)),
                );
            }
        }
    }
}

/// Rows `r0..r0 + M` of [`tile_wide`] over the widened block (`n` steps at `w`, each
/// row's `n * 4` values at `a + row * KB * 4`), channels `16h..16h + 16`: the running sums
/// `s` stay in registers for the block.
#[inline(always)]
unsafe fn wide_rows<const M: usize>(
    w: *const __m256i,
    a: *const i16,
    n: usize,
    h: usize,
    s: *mut [__m256i; 8],
    r0: usize,
) {
    let mut v = [[_mm256_setzero_si256(); 4]; M];
    for (i, vi) in v.iter_mut().enumerate() {
        let sr = &*s.add(r0 + i);
        vi.copy_from_slice(&sr[4 * h..4 * h + 4]);
    }
    for kg in 0..n {
        let wp = w.add(kg * 8 + 4 * h);
        let wj = [*wp, *wp.add(1), *wp.add(2), *wp.add(3)];
        for (i, vi) in v.iter_mut().enumerate() {
            let x = std::ptr::read_unaligned(a.add((r0 + i) * KB * 4 + kg * 4) as *const i64);
            let b = _mm256_set1_epi64x(x);
            for j in 0..4 {
                vi[j] = _mm256_add_epi32(vi[j], _mm256_madd_epi16(b, wj[j]));
            }
        }
    }
    for (i, vi) in v.iter().enumerate() {
        let sr = &mut *s.add(r0 + i);
        sr[4 * h..4 * h + 4].copy_from_slice(vi);
    }
}

/// `vpdpbusd` kernel: the VEX form (AVX-VNNI) when `avx_vnni`, else the EVEX form (AVX-512
/// VNNI + VL).
///
/// # Safety
/// The CPU must have AVX2, FMA and AVX-VNNI (`avx_vnni`) or AVX-512 VNNI + VL; the slices of
/// `t` must have the sizes `Tile` documents.
pub unsafe fn tile_vnni(t: &Tile, acc: &mut [[f32; NR]; MR], avx_vnni: bool) {
    if avx_vnni {
        tile_avxvnni(t, acc)
    } else {
        tile_evex(t, acc)
    }
}

macro_rules! vnni_kernel {
    ($tile:ident, $rows:ident, $feat:literal, $dp:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $tile(t: &Tile, acc: &mut [[f32; NR]; MR]) {
            let mut r = 0;
            while r < t.m {
                if t.m - r >= M2 {
                    $rows::<M2>(t, r, acc);
                } else {
                    $rows::<1>(t, r, acc);
                }
                r += M2;
            }
        }

        #[target_feature(enable = $feat)]
        unsafe fn $rows<const M: usize>(t: &Tile, r0: usize, acc: &mut [[f32; NR]; MR]) {
            let groups = t.kp / 4;
            let mut f = [[_mm256_setzero_ps(); 4]; M];
            for g in 0..t.ng {
                let mut s = [[_mm256_setzero_si256(); 4]; M];
                for kg in g * t.steps..((g + 1) * t.steps).min(groups) {
                    let w = load_step(t.panel.as_ptr(), kg);
                    for (r, sr) in s.iter_mut().enumerate() {
                        let a = bcast(t, r0 + r, kg);
                        for j in 0..4 {
                            sr[j] = $dp(sr[j], a, w[j]);
                        }
                    }
                }
                let off = t.off.as_ptr().add(g * NR) as *const __m256i;
                let o = [
                    _mm256_loadu_si256(off),
                    _mm256_loadu_si256(off.add(1)),
                    _mm256_loadu_si256(off.add(2)),
                    _mm256_loadu_si256(off.add(3)),
                ];
                for (r, fr) in f.iter_mut().enumerate() {
                    let sx = _mm256_set1_ps(*t.sx.get_unchecked((r0 + r) * t.ng + g));
                    for j in 0..4 {
                        let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(s[r][j], o[j]));
                        fr[j] = _mm256_fmadd_ps(v, sx, fr[j]);
                    }
                }
            }
            for (r, fr) in f.iter().enumerate() {
                store(acc, r0 + r, fr);
            }
        }
    };
}

vnni_kernel!(
    tile_avxvnni,
    rows_avxvnni,
    "avx2,fma,avxvnni",
    _mm256_dpbusd_avx_epi32
);
vnni_kernel!(
    tile_evex,
    rows_evex,
    "avx2,fma,avx512f,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32
);
