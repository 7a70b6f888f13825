//! 256-bit kernels of the int8 path (a child module of `int8`): the same integers as the
//! portable `tile_scalar`, on CPUs without AVX-512.
//!
//! * [`tile_madd`] (AVX2): `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs
//!   into saturating i16, so it cannot take `qx + 128` (up to 255) times `qw`: it takes
//!   `|qw|` times `qx` with the sign of `qw` (pairs stay within `2 * 127 * 127 < 2^15`), then
//!   `vpmaddwd` by ones sums the pairs into i32. That is `sum qx * qw` directly, so the
//!   `128 * sum qw` offsets are not subtracted.
//! * [`tile_vnni`] (AVX-VNNI, or AVX-512 VNNI with VL): `vpdpbusd` on `qx + 128` as the
//!   AVX-512 kernel does, minus the offsets.
//!
//! A panel step (4 inputs x 32 channels, 128 bytes) is four 256-bit registers; two rows at
//! a time keep the 8 accumulators and the 4 weight registers in the 16 `ymm` registers.

use super::{Tile, MR, NR};
use std::arch::x86_64::*;

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
