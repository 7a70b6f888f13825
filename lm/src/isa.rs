//! Run-time choice of the SIMD kernels: which instruction-set level this CPU runs, capped by
//! the `AFM_ISA` environment variable.
//!
//! The release build targets baseline x86-64 (no `target-cpu=native`), so one binary runs on
//! any x86-64 CPU; the integer kernels (`quant`, `int8`) are compiled per level with
//! `#[target_feature]` and picked here with `is_x86_feature_detected!`.
//!
//! `AFM_ISA=portable|avx2|avx2-vnni|avx512` caps the level (the lower of the cap and what the
//! CPU has is used): to measure the AVX2 kernels on an AVX-512 machine, or to check that the
//! portable definitions are what the SIMD kernels compute. An unknown value is ignored with a
//! warning on stderr.

use std::sync::OnceLock;

/// Instruction-set levels of the kernels, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA + F16C (Haswell, Zen 1-3): `vpmaddubsw` / `vpmaddwd` integer products.
    Avx2,
    /// AVX2 with 256-bit `vpdpbusd`: AVX-VNNI (Alder Lake and later client chips) or
    /// AVX-512 VNNI with VL.
    Avx2Vnni,
    /// AVX-512 F/BW/VL with VNNI (Ice Lake server and later, Zen 4 and later).
    Avx512,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx2Vnni, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx2Vnni => "avx2-vnni",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses an `AFM_ISA` value.
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The levels this CPU runs (every level up to [`detected`]), lowest first.
    pub fn supported() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|&i| i <= detected())
    }
}

/// The highest level this CPU runs, from CPUID (cached).
pub fn detected() -> Isa {
    static D: OnceLock<Isa> = OnceLock::new();
    *D.get_or_init(detect)
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        if !avx2 {
            return Isa::Portable;
        }
        let v512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni");
        if v512 {
            return Isa::Avx512;
        }
        if has!("avxvnni") {
            return Isa::Avx2Vnni;
        }
        Isa::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Portable
}

/// Whether this CPU has the VEX-encoded AVX-VNNI (`_mm256_dpbusd_avx_epi32`); at
/// [`Isa::Avx2Vnni`] without it the kernels use the EVEX form of AVX-512 VNNI + VL.
pub fn has_avx_vnni() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avxvnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Prefetches the `bytes` at `p` into L1, one 64-byte line at a time: the group kernels
/// (`quant::groups`, `lowbit::groups`) call it for the weight bytes some distance ahead of
/// the block in hand. A prefetch never faults, so `p` may lie past the matrix's end (the
/// next allocation's bytes, or nothing of use).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_lines(p: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for l in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults and changes nothing but timing, whatever the
        // address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(l) as *const i8) };
    }
}

/// The cap from `AFM_ISA` (None when unset or invalid).
pub fn cap() -> Option<Isa> {
    static C: OnceLock<Option<Isa>> = OnceLock::new();
    *C.get_or_init(|| {
        let v = std::env::var("AFM_ISA").ok()?;
        let parsed = Isa::parse(&v);
        if parsed.is_none() {
            eprintln!(
                "warning: AFM_ISA={v:?} is not one of portable, avx2, avx2-vnni, avx512; ignored"
            );
        }
        parsed
    })
}

/// The level the kernels use: what the CPU runs, capped by `AFM_ISA`.
pub fn level() -> Isa {
    let d = detected();
    cap().map_or(d, |c| c.min(d))
}

/// Runs `f` compiled for the vector width of the level in use ([`level`]): 256-bit `ymm`
/// registers at AVX2, 512-bit `zmm` at AVX-512, the baseline target's 128-bit SSE2 below.
///
/// For the plain Rust loops that LLVM vectorises (the softmax's `exp`, the encoder's GELU,
/// the int8 activation quantiser): the release build targets baseline x86-64, so without this
/// they run 4 lanes wide on every CPU. Mark the closure `#[inline(always)]`: only code
/// inlined into the feature-enabled frame gets the wider registers (a closure left out of
/// line is compiled for the baseline target), and so must everything it calls be.
///
/// The same operations per element at every width, so the same bits: Rust never contracts
/// `a * b + c` into a fused multiply-add, and lane counts change only the grouping of loops
/// that are written lane-parallel already (16 running maxima or sums, as `max_of` does).
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn ymm<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn zmm<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match level() {
            // SAFETY: `level` never exceeds what CPUID reports (`detected`), and the AVX-512
            // level requires F, BW and VL besides AVX2, FMA and F16C (`detect`).
            Isa::Avx512 => unsafe { zmm(f) },
            // SAFETY: as above; the AVX2 levels require AVX2, FMA and F16C.
            Isa::Avx2 | Isa::Avx2Vnni => unsafe { ymm(f) },
            Isa::Portable => f(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        f()
    }
}

/// One line for benchmark tables: the CPU model (from `/proc/cpuinfo`), its SIMD flags that
/// matter here, and the kernel level in use.
pub fn describe_cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    // Virtual machines often show a bare "AMD EPYC": the family and model say which one
    // (family 25 is Zen 3 / Zen 4, family 23 Zen 1 / Zen 2).
    if let (Some(fam), Some(m)) = (field("cpu family"), field("model\t")) {
        model = format!("{model} (family {fam} model {m})");
    }
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx_vnni",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "amx_int8",
    ];
    let have: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| flags.split_whitespace().any(|f| f == *w))
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{model}, {cores} logical CPUs, flags: {}; kernels: {}{}; {}",
        if have.is_empty() {
            "none of avx2/avx512".to_string()
        } else {
            have.join(" ")
        },
        level().name(),
        match cap() {
            Some(c) if c < detected() => format!(" (capped by AFM_ISA={})", c.name()),
            _ => String::new(),
        },
        gemm_kernels()
    )
}

/// Which kernels candle's f32 matmul (the `gemm` crate) uses: `AFM_ISA` does not reach them.
/// gemm picks at run time, as here: AVX-512 when the CPU has AVX-512F and the build has gemm's
/// `x86-v4` feature (this crate's default feature `avx512-gemm`; a build without it stops at
/// AVX2), else AVX2 + FMA when the CPU has FMA, else its portable loops.
fn gemm_isa(avx512f: bool, fma: bool) -> &'static str {
    if !cfg!(target_arch = "x86_64") {
        "f32 matmul: gemm"
    } else if avx512f && cfg!(feature = "avx512-gemm") {
        "f32 matmul: gemm AVX-512"
    } else if !fma {
        "f32 matmul: gemm portable (no FMA)"
    } else if avx512f {
        "f32 matmul: gemm up to AVX2 (built without the avx512-gemm feature)"
    } else {
        "f32 matmul: gemm AVX2"
    }
}

/// [`gemm_isa`] for this CPU, detected at run time as gemm does.
fn gemm_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        gemm_isa(has!("avx512f"), has!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        gemm_isa(false, false)
    }
}

/// The kernel set of a group layout (16 interleaved weight rows; `quant::groups`,
/// `lowbit::groups`): declares `GroupKernels` (the kernels for 1, 2, 3 and 4 activation rows,
/// of the invoking module's type `$kernel<C>`) with its constructors from the invoking
/// module's `scalar::<C>` (portable), `simd::kernel::<C>` (AVX-512 VNNI) and
/// `simd256::kernel::<C>` (AVX2), the kernels for the 256-bit `vpdpbusd` (VEX or EVEX) named
/// by the second argument (`group_kernels!(GroupKernel, kernel_vnni)` takes
/// `simd256::kernel_vnni::<C>`; without it the AVX2 kernels serve that level too), and
/// `at(level)`: the fastest at a kernel level.
macro_rules! group_kernels {
    ($kernel:ident) => {
        crate::isa::group_kernels!($kernel, kernel);
    };
    ($kernel:ident, $vnni:ident) => {
        /// The kernels for groups: 1, 2, 3 and 4 activation rows at a time.
        #[derive(Clone, Copy)]
        pub(super) struct GroupKernels {
            k1: $kernel<1>,
            k2: $kernel<2>,
            k3: $kernel<3>,
            k4: $kernel<4>,
        }

        impl GroupKernels {
            pub(super) fn portable() -> Self {
                Self {
                    k1: scalar::<1>,
                    k2: scalar::<2>,
                    k3: scalar::<3>,
                    k4: scalar::<4>,
                }
            }

            /// The AVX-512 VNNI kernels where the CPU has them (else `None`).
            pub(super) fn avx512() -> Option<Self> {
                #[cfg(target_arch = "x86_64")]
                if crate::isa::detected() == crate::isa::Isa::Avx512 {
                    return Some(Self {
                        k1: simd::kernel::<1>,
                        k2: simd::kernel::<2>,
                        k3: simd::kernel::<3>,
                        k4: simd::kernel::<4>,
                    });
                }
                None
            }

            /// The AVX2 kernels where the CPU has AVX2, FMA and F16C (else `None`).
            pub(super) fn avx2() -> Option<Self> {
                #[cfg(target_arch = "x86_64")]
                if crate::isa::detected() >= crate::isa::Isa::Avx2 {
                    return Some(Self {
                        k1: simd256::kernel::<1>,
                        k2: simd256::kernel::<2>,
                        k3: simd256::kernel::<3>,
                        k4: simd256::kernel::<4>,
                    });
                }
                None
            }

            /// The kernels for CPUs with the 256-bit `vpdpbusd` (AVX-VNNI, or AVX-512 VNNI
            /// with VL), else `None`.
            pub(super) fn avx2_vnni() -> Option<Self> {
                #[cfg(target_arch = "x86_64")]
                if crate::isa::detected() >= crate::isa::Isa::Avx2Vnni {
                    return Some(Self {
                        k1: simd256::$vnni::<1>,
                        k2: simd256::$vnni::<2>,
                        k3: simd256::$vnni::<3>,
                        k4: simd256::$vnni::<4>,
                    });
                }
                None
            }

            /// The fastest kernels at kernel level `isa` (capped to what the CPU runs).
            pub(super) fn at(isa: crate::isa::Isa) -> Self {
                use crate::isa::Isa;
                let fast = match isa.min(crate::isa::detected()) {
                    Isa::Avx512 => Self::avx512(),
                    Isa::Avx2Vnni => Self::avx2_vnni(),
                    Isa::Avx2 => Self::avx2(),
                    Isa::Portable => None,
                };
                fast.unwrap_or_else(Self::portable)
            }
        }
    };
}
pub(crate) use group_kernels;

/// Instantiates a one-row kernel macro of the group layouts (`lowbit::groups`, `quant::groups`)
/// three times, as `$avx2`, `$avxvnni` and `$evex`: the macro is given the functions' attributes (a
/// doc line, the target features and, for AVX2's single sum, clippy's leave for `l % 1`), name, the
/// number of partial sums per half of the group (`parts`: loads alternate between them), `|t, x, y|
/// step` (add the products of unsigned code bytes `x` and signed activation bytes `y` to the sums
/// `t`) and `|s| widen` (a half's partial sums to one sum of i32). AVX2 sums `vpmaddubsw` products
/// in one i16 sum and widens it with one `vpmaddwd`; the VNNI forms add each `vpdpbusd` into two
/// i32 sums (even and odd loads, so that no chain of `vpdpbusd` is longer than four). The products
/// of 4-bit or 2-bit codes and activations in -127..=127 never saturate `vpmaddubsw`, and the
/// kernels add at most 8 of its results in i16 (8 x 2 x 15 x 127 = 30,480 at most), so all three
/// give the exact integer sums, and the same bits. `|s| quarter` is for the 2-bit kernel, which
/// splits its two partial sums by field instead of by load (`lowbit::groups`, "Unpacking 2-bit
/// codes"; AVX2 then has two i16 sums too): it adds a quarter of the second, whose products are
/// of 4 times the codes, to the first, by an arithmetic shift: exact, as that sum is a multiple
/// of 4.
macro_rules! dot_step_variants {
    ($kernel:ident, $avx2:ident, $avxvnni:ident, $evex:ident) => {
        $kernel!(
            /// AVX2: `vpmaddubsw` and an i16 add per step, one `vpmaddwd` per half and block.
            // one sum: `l % 1` is 0, every load into it
            #[allow(clippy::modulo_one)]
            #[target_feature(enable = "avx2,fma,f16c")]
            $avx2,
            1,
            |t, x, y| _mm256_add_epi16(t, _mm256_maddubs_epi16(x, y)),
            |s| _mm256_madd_epi16(s[0], _mm256_set1_epi16(1)),
            |s| _mm256_add_epi16(s[0], _mm256_srai_epi16::<2>(s[1]))
        );
        $kernel!(
            /// AVX-VNNI: one `vpdpbusd` (VEX) per step, into i32.
            #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
            $avxvnni,
            2,
            |t, x, y| _mm256_dpbusd_avx_epi32(t, x, y),
            |s| _mm256_add_epi32(s[0], s[1]),
            |s| _mm256_add_epi32(s[0], _mm256_srai_epi32::<2>(s[1]))
        );
        $kernel!(
            /// AVX-512 VNNI + VL: one `vpdpbusd` (EVEX, 256 bits) per step, into i32.
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
            $evex,
            2,
            |t, x, y| _mm256_dpbusd_epi32(t, x, y),
            |s| _mm256_add_epi32(s[0], s[1]),
            |s| _mm256_add_epi32(s[0], _mm256_srai_epi32::<2>(s[1]))
        );
    };
}
pub(crate) use dot_step_variants;

#[cfg(test)]
mod tests {
    use super::*;

    /// The workspace's build settings must not pin the build to the building machine's CPU
    /// (`target-cpu=native` made binaries that crash elsewhere): every test of this suite
    /// then runs on a baseline x86-64 build, with the kernels chosen at run time.
    #[test]
    // the `cfg!(target_feature)` assertion is a constant by design: the build is under test
    #[allow(clippy::assertions_on_constants)]
    fn the_build_targets_baseline_x86_64() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in [".cargo/config.toml", ".cargo/config"] {
            if let Ok(s) = std::fs::read_to_string(root.join(f)) {
                let code: String = s
                    .lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .collect::<Vec<_>>()
                    .join("\n");
                assert!(
                    !code.contains("target-cpu") && !code.contains("target-feature"),
                    "{f} pins the target CPU:\n{code}"
                );
            }
        }
        // and the compiler was not told about AVX2 some other way (RUSTFLAGS)
        if std::env::var("AFM_ALLOW_NATIVE").is_err() {
            assert!(
                !cfg!(target_feature = "avx2"),
                "this test binary was built for AVX2 (RUSTFLAGS?): set AFM_ALLOW_NATIVE=1 to allow"
            );
        }
    }

    #[test]
    fn names_round_trip_and_levels_are_ordered() {
        for i in Isa::ALL {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert_eq!(Isa::parse(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse9"), None);
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2Vnni < Isa::Avx512);
        assert!(level() <= detected());
        assert_eq!(Isa::supported().next(), Some(Isa::Portable));
        assert!(describe_cpu().contains("kernels: "));
        assert!(describe_cpu().contains("f32 matmul: gemm"));
    }

    /// The bench header says whether candle's matmul can reach AVX-512, which `AFM_ISA` does
    /// not cap: only a build without `avx512-gemm` stops it at AVX2 on an AVX-512 CPU.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn gemm_isa_names_the_build() {
        assert_eq!(gemm_isa(false, true), "f32 matmul: gemm AVX2");
        assert_eq!(gemm_isa(false, false), "f32 matmul: gemm portable (no FMA)");
        if cfg!(feature = "avx512-gemm") {
            assert_eq!(gemm_isa(true, true), "f32 matmul: gemm AVX-512");
        } else {
            assert!(gemm_isa(true, true).contains("up to AVX2"));
        }
        // this machine's line names the kernels gemm picks here
        assert!(
            describe_cpu().ends_with(gemm_kernels()),
            "{}",
            describe_cpu()
        );
    }
}
