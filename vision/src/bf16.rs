//! The weighted sum of values `out = p v` of the encoder's int8 attention path in bfloat16:
//! probabilities and values rounded to bf16 (8 significant bits, round to nearest even),
//! products summed in f32 by AVX-512 BF16 `vdpbf16ps`, 32 multiply-adds per instruction
//! against 16 for an f32 FMA. It replaces the f32 gemm there only on AMD CPUs with the
//! `avx512bf16` feature ([`available`]); elsewhere the int8 path keeps the f32 gemm.
//!
//! # Why AMD only
//! Measured end to end (`afm bench vision --int8`, one 512x512 tile, 2 threads):
//! * AMD EPYC Zen 4 (family 25 model 17): 0.485 s per tile with the f32 gemm, 0.44-0.47 s
//!   with this kernel;
//! * Intel Xeon (family 6 model 207, AVX-512 BF16 too): 0.507-0.545 s with the f32 gemm,
//!   0.581-0.587 s with this kernel (alternated, two rounds each). The kernel ran at about
//!   35 GMAC/s per thread there; likely `vdpbf16ps` does no more multiply-adds per cycle
//!   than the two 512-bit FMAs of Intel's server cores, and the packing into pairs is
//!   extra work.
//!
//! CPUID's feature bits do not tell the two apart, so the vendor does.
//!
//! # Layout
//! `vdpbf16ps` multiplies pairs: lane `c` of the result gains `a[2c] b[2c] + a[2c+1] b[2c+1]`.
//! So the values are packed as pairs of consecutive keys ([`BfValues`]: per pair of keys, one
//! `u32` per value column holding both keys' bf16), and each probability row as pairs of
//! consecutive keys too, one `u32` broadcast to all lanes per step.

/// Rows of probabilities per micro-tile (6 rows x 4 registers of 16 columns = 24
/// accumulators, plus 4 value registers and 1 broadcast: 29 of the 32 registers).
const MR: usize = 6;

/// `x` as bf16 bits, rounded to nearest even (`x` finite; a NaN stays a NaN).
#[inline(always)]
fn bf16(x: f32) -> u32 {
    let b = x.to_bits();
    b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16
}

/// Two values as one pair: `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) | (bf16(hi) << 16)
}

/// Whether the encoder uses [`weighted_sum`]: this CPU runs it ([`runs`]) and is AMD's
/// (module docs: on Intel's AVX-512 cores the f32 gemm measured faster).
pub fn available() -> bool {
    runs() && amd()
}

/// Whether this CPU runs [`weighted_sum`] (AVX-512 F and BF16) and the kernel level in use
/// is AVX-512 (`AFM_ISA` below it, as in the AVX2 proxy, keeps the f32 gemm).
pub fn runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        afm_lm::isa::level() >= afm_lm::isa::Isa::Avx512
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether CPUID's vendor string is "AuthenticAMD", read once (in a VM every `cpuid` exits
/// to the hypervisor, and [`available`] is asked on every attention call).
fn amd() -> bool {
    static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let r = std::arch::x86_64::__cpuid(0);
            [r.ebx, r.edx, r.ecx]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .eq(*b"AuthenticAMD")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// One head's values, packed once per sequence for [`weighted_sum`].
pub struct BfValues {
    /// `keys.div_ceil(2)` rows of `head_dim` pairs; an odd last key pairs with 0.
    pairs: Vec<u32>,
    keys: usize,
    head_dim: usize,
}

impl BfValues {
    /// # Shapes
    /// `v`: `keys` rows of `head_dim` values, row `j` starting at `j * stride`.
    pub fn new(v: &[f32], stride: usize, keys: usize, head_dim: usize) -> Self {
        let np = keys.div_ceil(2);
        let mut pairs = vec![0u32; np * head_dim];
        for (jp, row) in pairs.chunks_exact_mut(head_dim.max(1)).enumerate() {
            let a = &v[2 * jp * stride..][..head_dim];
            if 2 * jp + 1 < keys {
                let b = &v[(2 * jp + 1) * stride..][..head_dim];
                for ((d, &x), &y) in row.iter_mut().zip(a).zip(b) {
                    *d = pair(x, y);
                }
            } else {
                for (d, &x) in row.iter_mut().zip(a) {
                    *d = pair(x, 0.0);
                }
            }
        }
        BfValues {
            pairs,
            keys,
            head_dim,
        }
    }
}

/// `out[r] = f[r] * sum_j p[r][j] v[j]` for `rows` rows, with `p` and `v` in bf16.
///
/// # Shapes
/// `p: (rows, v.keys)` row-major, `f: (rows)`, `out`: `rows` rows of `v.head_dim` floats,
/// row `r` starting at `r * out_stride`.
///
/// # Panics
/// If [`runs`] is false, `v.head_dim` is not a multiple of 16, or `p` or `f` is
/// shorter than its shape; the caller checks the first two.
///
/// # Safety
/// `out` must be valid for writes of `v.head_dim` floats at each of the `rows` row starts,
/// and no other thread may access those floats meanwhile (other threads may write the
/// columns between them: the encoder's heads share output rows).
pub unsafe fn weighted_sum(
    p: &[f32],
    rows: usize,
    f: &[f32],
    v: &BfValues,
    out: *mut f32,
    out_stride: usize,
) {
    let (n, hd) = (v.keys, v.head_dim);
    let np = n.div_ceil(2);
    assert!(
        runs() && hd % 16 == 0,
        "bf16 weighted sum on this CPU / width"
    );
    assert!(p.len() >= rows * n && f.len() >= rows);
    // the probabilities as pairs, rows padded with zeros to a multiple of MR
    let mut pp = vec![0u32; rows.div_ceil(MR) * MR * np];
    for (r, dst) in pp.chunks_exact_mut(np.max(1)).take(rows).enumerate() {
        let src = &p[r * n..(r + 1) * n];
        let mut it = src.chunks_exact(2);
        for (d, s) in dst.iter_mut().zip(&mut it) {
            *d = pair(s[0], s[1]);
        }
        if let [last] = it.remainder() {
            dst[np - 1] = pair(*last, 0.0);
        }
    }
    for r0 in (0..rows).step_by(MR) {
        let m = MR.min(rows - r0);
        let mut c0 = 0;
        while c0 < hd {
            let t = Tile {
                pp: &pp[r0 * np..(r0 + MR) * np],
                np,
                v: &v.pairs,
                hd,
                c0,
                f: &f[r0..r0 + m],
            };
            // SAFETY: `runs()` checked the CPU features the kernels are compiled for;
            // the tile's slices hold MR rows of np pairs and np rows of hd value pairs;
            // columns c0..c0+16*NQ <= hd of the output rows r0..r0+m, which the caller
            // vouches for.
            unsafe {
                let o = out.add(r0 * out_stride);
                match (hd - c0) / 16 {
                    1 => tile::<1>(&t, o, out_stride),
                    2 => tile::<2>(&t, o, out_stride),
                    3 => tile::<3>(&t, o, out_stride),
                    _ => tile::<4>(&t, o, out_stride),
                }
            }
            c0 += 64.min(hd - c0);
        }
    }
}

/// One micro-tile's operands: `MR` probability rows of `np` pairs (zero past the block's
/// last row), the packed values, the column block's start `c0`, and the rows' factors.
struct Tile<'a> {
    pp: &'a [u32],
    np: usize,
    v: &'a [u32],
    hd: usize,
    c0: usize,
    f: &'a [f32],
}

/// `f.len()` rows x `16 * NQ` columns from `c0` of `out`.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16, `c0 + 16 * NQ <= hd`, and `out` as for
/// [`weighted_sum`] for `f.len()` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const NQ: usize>(t: &Tile, out: *mut f32, out_stride: usize) {
    use std::arch::x86_64::*;
    assert!(t.pp.len() >= MR * t.np && t.v.len() >= t.np * t.hd && t.c0 + 16 * NQ <= t.hd);
    let mut acc = [[_mm512_setzero_ps(); NQ]; MR];
    // raw pointers in the loop: with bounds checks there LLVM kept the accumulators in
    // memory (measured: slower than the f32 gemm)
    let (pp, vp) = (t.pp.as_ptr(), t.v.as_ptr().add(t.c0));
    for jp in 0..t.np {
        let mut b = [_mm512_setzero_si512(); NQ];
        for (q, bq) in b.iter_mut().enumerate() {
            // SAFETY: jp < np rows of hd pairs, columns c0 + 16 q + 0..16 < hd (asserted)
            *bq = unsafe { _mm512_loadu_si512(vp.add(jp * t.hd + 16 * q) as *const _) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: r < MR rows of np pairs (asserted)
            let a = _mm512_set1_epi32(unsafe { *pp.add(r * t.np + jp) } as i32);
            // SAFETY (transmute): __m512i and __m512bh are both 64 bytes of lanes; the u32
            // lanes hold bf16 pairs, low half first, as vdpbf16ps reads them.
            let a = std::mem::transmute::<__m512i, __m512bh>(a);
            for (aq, bq) in accr.iter_mut().zip(&b) {
                let bq = std::mem::transmute::<__m512i, __m512bh>(*bq);
                *aq = _mm512_dpbf16_ps(*aq, a, bq);
            }
        }
    }
    for (r, (accr, &f)) in acc.iter().zip(t.f).enumerate() {
        let fv = _mm512_set1_ps(f);
        for (q, aq) in accr.iter().enumerate() {
            // SAFETY: columns c0..c0+16*NQ of row r < f.len(), vouched for by the caller
            unsafe {
                let o = out.add(r * out_stride + t.c0 + 16 * q);
                _mm512_storeu_ps(o, _mm512_mul_ps(*aq, fv));
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const NQ: usize>(_: &Tile, _: *mut f32, _: usize) {
    unreachable!("weighted_sum checks runs()")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `amd()` agrees with `/proc/cpuinfo`'s `vendor_id`.
    #[test]
    fn the_vendor_is_cpuinfos() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            eprintln!("skipped: no /proc/cpuinfo");
            return;
        };
        let Some(vendor) = info.lines().find(|l| l.starts_with("vendor_id")) else {
            eprintln!("skipped: /proc/cpuinfo names no vendor");
            return;
        };
        assert_eq!(amd(), vendor.ends_with("AuthenticAMD"), "{vendor}");
    }

    /// Against an f64 sum over the same bf16-rounded inputs (the kernel's only rounding
    /// after that is f32 accumulation), and against the unrounded product within bf16's
    /// precision; odd key counts, row counts off the tile size, and 16..80 columns.
    #[test]
    fn weighted_sum_matches_its_definition() {
        if !runs() {
            eprintln!(
                "skipped: no AVX-512 BF16 on this CPU, or AFM_ISA caps the level below AVX-512"
            );
            return;
        }
        let unbf = |x: f32| f32::from_bits(bf16(x) << 16) as f64;
        let mut s = 11u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        for (rows, n, hd) in [(13, 71, 64), (6, 2, 16), (1, 1, 80), (7, 128, 48)] {
            let stride = hd + 3;
            let p: Vec<f32> = (0..rows * n).map(|_| rnd()).collect();
            let vv: Vec<f32> = (0..n * stride).map(|_| rnd() * 4.0 - 2.0).collect();
            let f: Vec<f32> = (0..rows).map(|_| 0.5 + rnd()).collect();
            let ostride = hd + 5;
            let mut out = vec![f32::NAN; rows * ostride];
            let bv = BfValues::new(&vv, stride, n, hd);
            // SAFETY: out holds rows rows of ostride >= hd floats
            unsafe { weighted_sum(&p, rows, &f, &bv, out.as_mut_ptr(), ostride) };
            let (mut worst_bf, mut worst_exact, mut norm) = (0f64, 0f64, 0f64);
            for r in 0..rows {
                for c in 0..hd {
                    let (mut want_bf, mut want) = (0f64, 0f64);
                    for j in 0..n {
                        want_bf += unbf(p[r * n + j]) * unbf(vv[j * stride + c]);
                        want += p[r * n + j] as f64 * vv[j * stride + c] as f64;
                    }
                    let got = out[r * ostride + c] as f64;
                    worst_bf = worst_bf.max((got - want_bf * f[r] as f64).abs());
                    worst_exact = worst_exact.max((got - want * f[r] as f64).abs());
                    norm = norm.max((want * f[r] as f64).abs());
                }
                // columns past hd are not written
                assert!(out[r * ostride + hd..(r + 1) * ostride]
                    .iter()
                    .all(|x| x.is_nan()));
            }
            assert!(
                worst_bf < 1e-5 * norm.max(1.0),
                "{rows}x{n}x{hd}: {worst_bf} vs bf16 sum"
            );
            assert!(
                worst_exact < 2e-2 * norm.max(1.0),
                "{rows}x{n}x{hd}: {worst_exact} vs f64"
            );
            assert!(worst_exact > 0.0, "no bf16 rounding seen");
        }
    }
}
