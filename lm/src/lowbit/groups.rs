//! 2-bit and 4-bit matrices with rows interleaved in groups of [`G`], for the AVX-512 VNNI
//! and AVX2 kernels.
//!
//! In the row layout ([`super::LowBitMatrix`]) each weight row's product with an activation
//! row ends in a vector that is scaled per pair of blocks and summed horizontally, and the
//! 2-bit codes of a pair (16 bytes) are few next to that work. Here 16 weight rows share each
//! 512-bit register: lane `i` of a `vpdpbusd` holds row `i`'s integer dot product of one
//! 32-value block (8 instructions against broadcast activation bytes), and one convert +
//! one FMA scales the 16 rows' block sums at once (their 16 scales are one vector). The
//! grid offset comes off at the end through the activation group sums, as in the row layout.
//!
//! # Layout
//! The same codes and scales as the row layout, permuted. Rows `0 .. rows / G * G` form
//! groups; rows past the last whole group keep the row layout at their usual offsets. Group
//! `g`, block `b` (32 values) holds [`block_bytes`] code bytes at `(g * nb + b) *
//! block_bytes`, made of eight 4-byte lanes per row: lane `v` (`0..8`) of row `i` holds
//! values `4v .. 4v + 4` (byte `t` value `4v + t`), stored
//! * 2-bit: in load `v / 4` (64 bytes each), bits `2 (v % 4)`: byte `(v / 4) * 64 + 4i + t`;
//! * 4-bit: in load `v / 2`, nibble `v % 2`: byte `(v / 2) * 64 + 4i + t` (Q4_1's grouped
//!   form, [`crate::quant`]).
//!
//! So a 64-byte load, shifted and masked, gives four values of all 16 rows, one lane per row.
//! The scales of weight group `s` of the 16 rows sit at `(g * ng + s) * G + i` (`ng` scales
//! per row).
//!
//! # Unpacking 2-bit codes
//! The one-row kernels and AVX-512's take the four 2-bit fields of a byte with one shift per
//! load and one AND per field: `v & 3`, `v & 12`, `(v >> 4) & 3`, `(v >> 4) & 12` (five
//! operations where three shifts and four ANDs took seven), so the odd fields hold 4 times
//! their codes. Their products go to a second partial sum, which is then divided by 4
//! exactly (it is a multiple of 4); AVX2's i16 sums stay below 4 x 2 x 12 x 127 = 12,192.
//! AVX2's kernel for 2 to 4 activation rows keeps the shifted fields: it unpacks a block
//! once for all its rows, and the division would cost one more operation per row.

use super::{offset, pack_pair, Act, BLOCK, PAIR};

/// Rows per group: one 512-bit lane of 4 bytes per row.
pub(super) const G: usize = 16;

/// How far ahead of the block in hand the SIMD kernels prefetch a group's code bytes: 4 KiB
/// (32 blocks of 2-bit codes, 16 of 4-bit). The hardware prefetchers stop at each 4 KiB
/// page and restart on every task's run of groups; at one activation row the kernel then
/// waited on memory for much of its time. On an Intel Xeon (family 6 model 207, AVX-512,
/// 2 vCPUs) the 3.1B model's 2-bit decode went from 15.0-15.4 to 20.3-21.1 tok/s
/// (`bench lm`, alternated; 2, 8 and 16 KiB read the same as 4). On the Zen 4 of earlier
/// sessions prefetching these codes made no difference.
const PREFETCH_BYTES: usize = 4096;

/// Prefetches the code bytes [`PREFETCH_BYTES`] past block `b` (`bb` bytes per block) of
/// the group at `q`: past the group's end, the next group's (the groups lie end to end).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(q: *const u8, b: usize, bb: usize) {
    crate::isa::prefetch_lines(q.wrapping_add(b * bb + PREFETCH_BYTES), bb);
}

/// Weight groups between the block in hand and the one [`prefetch_ahead`] fetches codes
/// for: how far ahead [`prefetch_scales`] goes. Computed once per kernel call, outside the
/// loop over blocks.
#[cfg(target_arch = "x86_64")]
fn scales_ahead(m: &Meta) -> usize {
    PREFETCH_BYTES / block_bytes(m.bits) / m.gpb
}

/// Prefetches the f16 scales at `d` (the group's, `G` per weight group) of weight group `s +
/// ahead` ([`scales_ahead`]), as far ahead as [`prefetch_ahead`] the codes; called at weight
/// group `s`'s first block, it fetches a line each time the scales in hand reach a new one
/// (`G` scales are 32 bytes): past the group's end, the next group's (the groups' scales lie
/// end to end too). The scales are a second stream beside the codes (a fifth of the 2-bit
/// matrices' bytes at 32 values per scale) that only the hardware prefetchers fetched ahead.
/// On the Intel Xeon (family 6 model 207) the 3.1B model's 2-bit decode went from a median
/// of 21.5 to 22.0 tok/s (20.0-21.8 and 21.3-22.8) in six alternated rounds of `bench lm`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_scales(d: *const u16, s: usize, ahead: usize) {
    if (s * G * 2).is_multiple_of(64) {
        crate::isa::prefetch_lines(d.wrapping_add((s + ahead) * G) as *const u8, 64);
    }
}

/// The weight group of block `b` and whether `b` is its first block. At the default group
/// (one block per scale) without an integer division: the kernels' loops over blocks ran one
/// per block.
#[inline(always)]
fn group_of(m: &Meta, b: usize) -> (usize, bool) {
    if m.gpb == 1 {
        (b, true)
    } else {
        (b / m.gpb, b.is_multiple_of(m.gpb))
    }
}

/// Code bytes of one group's block: 32 values of 16 rows.
pub(super) fn block_bytes(bits: u32) -> usize {
    4 * bits as usize * G
}

/// Where value `k` (`0..32`) of row `i` lies in a group's block: byte offset and bit shift.
#[inline(always)]
fn place(bits: u32, i: usize, k: usize) -> (usize, u32) {
    let (v, t) = (k / 4, k % 4);
    if bits == 2 {
        ((v / 4) * 4 * G + i * 4 + t, 2 * (v % 4) as u32)
    } else {
        ((v / 2) * 4 * G + i * 4 + t, 4 * (v % 2) as u32)
    }
}

/// Value `k` of row `i` of a group's block.
#[inline(always)]
fn grouped_code(bits: u32, blk: &[u8], i: usize, k: usize) -> u8 {
    let (o, sh) = place(bits, i, k);
    (blk[o] >> sh) & ((1u8 << bits) - 1)
}

/// The shape facts the kernels need.
#[derive(Clone, Copy)]
pub(super) struct Meta {
    pub bits: u32,
    /// 32-value blocks per (padded) row.
    pub nb: usize,
    /// Blocks per weight group.
    pub gpb: usize,
    /// The padded row width (`nb * 32`).
    pub kp: usize,
}

impl Meta {
    fn ng(&self) -> usize {
        self.nb / self.gpb
    }
}

/// Row-layout codes and scales to the group layout (`to_groups`) or back, for the first
/// `rows / G * G` rows; the tail rows are left as they are. The groups are permuted in
/// parallel (each touches only its own bytes), and into the group layout a word at a time
/// ([`block_to_group`]): value by value on one thread, this was most of the 3.1B model's
/// load (7.0-7.6 s on an Intel Xeon, now 2.0-2.4 s).
pub(super) fn permute(m: &Meta, qs: &mut [u8], d: &mut [u16], rows: usize, to_groups: bool) {
    use rayon::prelude::*;
    let rb = m.kp * m.bits as usize / 8;
    let pb = PAIR * m.bits as usize / 8;
    let bb = block_bytes(m.bits);
    let ng = m.ng();
    let groups = rows / G;
    let qs = &mut qs[..groups * G * rb];
    let d = &mut d[..groups * G * ng];
    qs.par_chunks_mut(G * rb)
        .zip(d.par_chunks_mut(G * ng))
        .for_each(|(qsg, dg)| {
            let (src_q, src_d) = (qsg.to_vec(), dg.to_vec());
            if to_groups {
                // every byte of the group is written: each row's lanes of each block
                for i in 0..G {
                    let row = &src_q[i * rb..(i + 1) * rb];
                    for b in 0..m.nb {
                        block_to_group(
                            m.bits,
                            &row[(b / 2) * pb..(b / 2 + 1) * pb],
                            b % 2,
                            i,
                            &mut qsg[b * bb..(b + 1) * bb],
                        );
                    }
                    for s in 0..ng {
                        dg[s * G + i] = src_d[i * ng + s];
                    }
                }
            } else {
                let mut codes = vec![0u8; m.kp];
                for i in 0..G {
                    for b in 0..m.nb {
                        for k in 0..BLOCK {
                            codes[b * BLOCK + k] =
                                grouped_code(m.bits, &src_q[b * bb..(b + 1) * bb], i, k);
                        }
                    }
                    for (p, out) in qsg[i * rb..(i + 1) * rb].chunks_exact_mut(pb).enumerate() {
                        pack_pair(m.bits, &codes[p * PAIR..(p + 1) * PAIR], out);
                    }
                    for s in 0..ng {
                        dg[i * ng + s] = src_d[s * G + i];
                    }
                }
            }
        });
}

/// Row `i`'s block `half` (0 or 1) of the row-layout pair `pair` (16 or 32 bytes) into its
/// lanes of the group block `out` ([`block_bytes`] bytes; the other rows' bytes are left as
/// they are), a word at a time: the same bytes as placing each value with [`place`], at a
/// fraction of the cost (the 3.1B model's 3.1 billion values, one by one, took most of its
/// load time).
fn block_to_group(bits: u32, pair: &[u8], half: usize, i: usize, out: &mut [u8]) {
    // the 32 codes of the block, one per byte, as eight little-endian words (word v holds
    // values 4v .. 4v + 4)
    let mut w = [0u32; 8];
    if bits == 2 {
        // value k of the pair at byte k % 16, bits 2 (k / 16): this block's values 0..16 at
        // shift 4 half, 16..32 at 4 half + 2
        let p = u128::from_le_bytes(pair[..16].try_into().expect("a 2-bit pair is 16 bytes"));
        let mask = u128::from_le_bytes([3; 16]);
        let s = 4 * half as u32;
        let (a, b) = ((p >> s) & mask, (p >> (s + 2)) & mask);
        for j in 0..4 {
            w[j] = (a >> (32 * j)) as u32;
            w[4 + j] = (b >> (32 * j)) as u32;
        }
        // load l: lanes 4l .. 4l + 4 at bits 0, 2, 4, 6
        for l in 0..2 {
            let v = w[4 * l] | w[4 * l + 1] << 2 | w[4 * l + 2] << 4 | w[4 * l + 3] << 6;
            out[l * 4 * G + 4 * i..][..4].copy_from_slice(&v.to_le_bytes());
        }
    } else {
        // value k of the pair at byte k % 32, bits 4 (k / 32): this block's at shift 4 half
        let s = 4 * half as u32;
        for (v, c) in w.iter_mut().zip(pair[..32].chunks_exact(4)) {
            let x = u32::from_le_bytes(c.try_into().expect("4 bytes"));
            *v = (x >> s) & 0x0F0F_0F0F;
        }
        // load l: lanes 2l, 2l + 1 in the low and high nibbles
        for l in 0..4 {
            let v = w[2 * l] | w[2 * l + 1] << 4;
            out[l * 4 * G + 4 * i..][..4].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Row `r`'s codes (`kp` of them, one per byte) and scales, read from the group layout; `r`
/// must lie in a whole group.
pub(super) fn row_of(m: &Meta, qs: &[u8], d: &[u16], r: usize) -> (Vec<u8>, Vec<u16>) {
    let (g, i) = (r / G, r % G);
    let bb = block_bytes(m.bits);
    let ng = m.ng();
    let base = g * m.nb * bb;
    let codes = (0..m.kp)
        .map(|j| {
            let b = j / BLOCK;
            grouped_code(
                m.bits,
                &qs[base + b * bb..base + (b + 1) * bb],
                i,
                j % BLOCK,
            )
        })
        .collect();
    let scales = (0..ng).map(|s| d[(g * ng + s) * G + i]).collect();
    (codes, scales)
}

/// One group's arrays: codes `(nb, block_bytes)` and scales `(ng, G)`.
#[derive(Clone, Copy)]
pub(super) struct Group<'a> {
    pub qs: &'a [u8],
    pub d: &'a [u16],
}

/// A group's 16 rows against activation rows `c0 .. c0 + C`: `out[c][i]` is row `i`.
pub(super) type GroupKernel<const C: usize> = fn(&Meta, Group<'_>, &Act, usize) -> [[f32; G]; C];

/// The portable definition, in the order of the SIMD kernels so that they agree bit for bit:
/// per row and block the exact integer dot product of the 32 values, added as
/// `(s_w * d_x).mul_add(dot, acc)`; at each weight group's first block the offset term
/// `s_w.mul_add(sg, corr)`; the result `(-c).mul_add(corr, acc)`.
pub(super) fn scalar<const C: usize>(m: &Meta, w: Group<'_>, a: &Act, c0: usize) -> [[f32; G]; C] {
    let bb = block_bytes(m.bits);
    let ng = m.ng();
    let mut out = [[0f32; G]; C];
    for (c, o) in out.iter_mut().enumerate() {
        let col = c0 + c;
        let y = &a.qs[col * m.kp..(col + 1) * m.kp];
        for (i, oi) in o.iter_mut().enumerate() {
            let (mut acc, mut corr) = (0f32, 0f32);
            for b in 0..m.nb {
                let blk = &w.qs[b * bb..(b + 1) * bb];
                let dot: i32 = (0..BLOCK)
                    .map(|k| grouped_code(m.bits, blk, i, k) as i32 * y[b * BLOCK + k] as i32)
                    .sum();
                let (s, first) = group_of(m, b);
                let dw = super::h(w.d[s * G + i]);
                acc = (dw * a.d[col * m.nb + b]).mul_add(dot as f32, acc);
                if first {
                    corr = dw.mul_add(a.sg[col * ng + s], corr);
                }
            }
            *oi = (-offset(m.bits)).mul_add(corr, acc);
        }
    }
    out
}

/// Panics unless group `w` and activation rows `c0 .. c0 + c` hold every value a SIMD kernel
/// reads: the bound its `unsafe` loads rely on.
fn check_bounds(m: &Meta, w: &Group<'_>, a: &Act, c0: usize, c: usize) {
    assert!(
        (m.bits == 2 || m.bits == 4)
            && m.gpb >= 1
            && m.nb.is_multiple_of(m.gpb)
            && m.kp == m.nb * BLOCK
            && w.qs.len() == m.nb * block_bytes(m.bits)
            && w.d.len() == m.ng() * G
            && a.qs.len() >= (c0 + c) * m.kp
            && a.d.len() >= (c0 + c) * m.nb
            && a.sg.len() >= (c0 + c) * m.ng()
    );
}

crate::isa::group_kernels!(GroupKernel, kernel_vnni);

impl GroupKernels {
    /// Activation rows `c0 .. c0 + n` (`n` in 1..=4) against group `w`, into `r[..n]`.
    fn run(&self, m: &Meta, w: Group<'_>, a: &Act, c0: usize, n: usize, r: &mut [[f32; G]; 4]) {
        match n {
            4 => *r = (self.k4)(m, w, a, c0),
            3 => r[..3].copy_from_slice(&(self.k3)(m, w, a, c0)),
            2 => r[..2].copy_from_slice(&(self.k2)(m, w, a, c0)),
            _ => r[0] = (self.k1)(m, w, a, c0)[0],
        }
    }
}

/// `(n, cols) @ W^T` for the grouped rows `0 .. groups * G` into `out` (`(n, rows)`), the
/// groups split over the pool ([`crate::par::row_groups`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    k: GroupKernels,
    meta: &Meta,
    qs: &[u8],
    d: &[u16],
    groups: usize,
    rows: usize,
    act: &Act,
    n: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let (bb, ng) = (block_bytes(meta.bits), meta.ng());
    assert!(
        groups * G <= rows
            && qs.len() >= groups * meta.nb * bb
            && d.len() >= groups * ng * G
            && act.qs.len() == n * meta.kp
            && act.d.len() == n * meta.nb
            && act.sg.len() == n * ng
            && out.len() == n * rows
    );
    crate::par::row_groups::<G>(groups, rows, n, out, |g, c0, c, r| {
        let w = Group {
            qs: &qs[g * meta.nb * bb..(g + 1) * meta.nb * bb],
            d: &d[g * ng * G..(g + 1) * ng * G],
        };
        k.run(meta, w, act, c0, c, r)
    });
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{block_bytes, offset, Act, Group, Meta, BLOCK, G};
    use std::arch::x86_64::*;

    pub fn kernel<const C: usize>(m: &Meta, w: Group<'_>, a: &Act, c0: usize) -> [[f32; G]; C] {
        super::check_bounds(m, &w, a, c0, C);
        // SAFETY: `GroupKernels::avx512` hands out this kernel only when the CPU has
        // AVX-512 F/BW/VL/VNNI with AVX2/FMA/F16C (`Isa::Avx512`); `check_bounds` keeps
        // every load below inside the slices.
        unsafe {
            if m.bits == 2 {
                lowbit::<C, 2>(m, w, a, c0)
            } else {
                lowbit::<C, 4>(m, w, a, c0)
            }
        }
    }

    /// A block's eight lanes of 4 values for the 16 rows (module docs of the layout). At
    /// 2 bits the odd lanes hold 4 times their codes (module docs, "Unpacking 2-bit codes").
    ///
    /// # Safety
    /// `p` must be valid for `block_bytes(B)` bytes; the caller runs with AVX-512 F/BW.
    #[inline(always)]
    unsafe fn unpack<const B: u32>(p: *const u8) -> [__m512i; 8] {
        let mut x = [_mm512_setzero_si512(); 8];
        // SAFETY: every load lies in the `block_bytes(B)` the caller vouches for.
        unsafe {
            if B == 2 {
                let (m1, m4) = (_mm512_set1_epi8(3), _mm512_set1_epi8(12));
                for l in 0..2 {
                    let v = _mm512_loadu_si512(p.add(l * 64) as *const _);
                    let w = _mm512_srli_epi16(v, 4);
                    x[4 * l] = _mm512_and_si512(v, m1);
                    x[4 * l + 1] = _mm512_and_si512(v, m4);
                    x[4 * l + 2] = _mm512_and_si512(w, m1);
                    x[4 * l + 3] = _mm512_and_si512(w, m4);
                }
            } else {
                let mask = _mm512_set1_epi8(0x0F);
                for l in 0..4 {
                    let v = _mm512_loadu_si512(p.add(l * 64) as *const _);
                    x[2 * l] = _mm512_and_si512(v, mask);
                    x[2 * l + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                }
            }
        }
        x
    }

    /// One block's 32 products for the 16 rows against the activation bytes at `y`, in two
    /// chains of four `vpdpbusd` (unsigned codes first): the even lanes' and the odd lanes',
    /// the latter at 2 bits 4 times the products. The two sums are added in f32, the odd one
    /// times 0.25, which is exact (both are integers below 2^24 in magnitude): an arithmetic
    /// shift of the odd sum in i32 instead made the kernel 1.5x slower on an Intel Xeon
    /// (family 6 model 207; `lowbit_speed`, one thread), where it cost nothing at 256 bits.
    ///
    /// # Safety
    /// `y` must be valid for 32 bytes; the caller runs with AVX-512 F/VNNI.
    #[inline(always)]
    unsafe fn block_dot<const B: u32>(x: &[__m512i; 8], y: *const i32) -> __m512 {
        let mut s = [_mm512_setzero_si512(); 2];
        for k in 0..8 {
            // SAFETY: k < 8, so the 4 bytes at y + 4k lie in the 32 the caller vouches for.
            let v = _mm512_set1_epi32(unsafe { std::ptr::read_unaligned(y.add(k)) });
            s[k % 2] = _mm512_dpbusd_epi32(s[k % 2], x[k], v);
        }
        if B == 2 {
            _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(s[1]),
                _mm512_set1_ps(0.25),
                _mm512_cvtepi32_ps(s[0]),
            )
        } else {
            _mm512_cvtepi32_ps(_mm512_add_epi32(s[0], s[1]))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn lowbit<const C: usize, const B: u32>(
        m: &Meta,
        w: Group<'_>,
        a: &Act,
        c0: usize,
    ) -> [[f32; G]; C] {
        let (bb, ng) = (block_bytes(B), m.nb / m.gpb);
        let mut acc = [_mm512_setzero_ps(); C];
        let mut corr = [_mm512_setzero_ps(); C];
        let ahead = super::scales_ahead(m);
        for b in 0..m.nb {
            super::prefetch_ahead(w.qs.as_ptr(), b, bb);
            let (s, first) = super::group_of(m, b);
            if first {
                super::prefetch_scales(w.d.as_ptr(), s, ahead);
            }
            let x = unpack::<B>(w.qs.as_ptr().add(b * bb));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(s * G) as *const _));
            for c in 0..C {
                let col = c0 + c;
                let y = a.qs.as_ptr().add(col * m.kp + b * BLOCK) as *const i32;
                let dot = block_dot::<B>(&x, y);
                let dx = _mm512_set1_ps(*a.d.get_unchecked(col * m.nb + b));
                acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, dx), acc[c]);
                if first {
                    let sg = _mm512_set1_ps(*a.sg.get_unchecked(col * ng + s));
                    corr[c] = _mm512_fmadd_ps(dw, sg, corr[c]);
                }
            }
        }
        let c = _mm512_set1_ps(offset(B));
        let mut out = [[0f32; G]; C];
        for (o, (a, k)) in out.iter_mut().zip(acc.into_iter().zip(corr)) {
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_fnmadd_ps(c, k, a));
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod simd256 {
    use super::{block_bytes, offset, Act, Group, Meta, BLOCK, G};
    use std::arch::x86_64::*;

    pub fn kernel<const C: usize>(m: &Meta, w: Group<'_>, a: &Act, c0: usize) -> [[f32; G]; C] {
        super::check_bounds(m, &w, a, c0, C);
        let mut out = [[0f32; G]; C];
        if C == 1 {
            // SAFETY: `GroupKernels::avx2` hands out this kernel only when the CPU has AVX2,
            // FMA and F16C; `check_bounds` (one activation row from c0) keeps every load of
            // `lowbit1` inside the slices.
            out[0] = unsafe {
                if m.bits == 2 {
                    lowbit1::<2>(m, w, a, c0)
                } else {
                    lowbit1::<4>(m, w, a, c0)
                }
            };
            return out;
        }
        for half in 0..2 {
            // SAFETY: `GroupKernels::avx2` hands out this kernel only when the CPU has AVX2,
            // FMA and F16C; `check_bounds` keeps every load below inside the slices.
            let o = unsafe {
                if m.bits == 2 {
                    lowbit::<C, 2>(m, w, a, c0, half)
                } else {
                    lowbit::<C, 4>(m, w, a, c0, half)
                }
            };
            for (oc, h) in out.iter_mut().zip(o) {
                oc[half * 8..half * 8 + 8].copy_from_slice(&h);
            }
        }
        out
    }

    /// [`kernel`] on a CPU with the 256-bit `vpdpbusd`: one activation row (a decode step)
    /// takes [`lowbit1_avxvnni`] or [`lowbit1_evex`]; more rows stay on the AVX2 kernels.
    pub fn kernel_vnni<const C: usize>(
        m: &Meta,
        w: Group<'_>,
        a: &Act,
        c0: usize,
    ) -> [[f32; G]; C] {
        if C != 1 {
            return kernel::<C>(m, w, a, c0);
        }
        super::check_bounds(m, &w, a, c0, 1);
        let mut out = [[0f32; G]; C];
        let vex = crate::isa::has_avx_vnni();
        // SAFETY: `GroupKernels::avx2_vnni` hands out this kernel only when the CPU has AVX2,
        // FMA, F16C and AVX-VNNI (`vex`) or AVX-512 VNNI + VL (its level is at least
        // `Avx2Vnni`); `check_bounds` (one activation row from c0) keeps every load inside
        // the slices.
        out[0] = unsafe {
            match (vex, m.bits) {
                (true, 2) => lowbit1_avxvnni::<2>(m, w, a, c0),
                (true, _) => lowbit1_avxvnni::<4>(m, w, a, c0),
                (false, 2) => lowbit1_evex::<2>(m, w, a, c0),
                (false, _) => lowbit1_evex::<4>(m, w, a, c0),
            }
        };
        out
    }

    /// Field `k` (`0 .. 8 / B`) of every byte of `v`, given `w`, `v` shifted right by 4 bits
    /// in 16-bit lanes. At 2 bits the odd fields are 4 times their codes (module docs): each
    /// field is one AND.
    ///
    /// # Safety
    /// The caller runs with AVX2.
    #[inline(always)]
    unsafe fn field<const B: u32>(v: __m256i, w: __m256i, k: usize) -> __m256i {
        let src = if k * B as usize >= 4 { w } else { v };
        let mask = match (B, k % 2) {
            (2, 0) => 0x03,
            (2, _) => 0x0C,
            _ => 0x0F,
        };
        _mm256_and_si256(src, _mm256_set1_epi8(mask))
    }

    /// Generates the kernel for one activation row (a decode step) of [`lowbit`]'s rows, both
    /// halves of the group in one pass: each broadcast of 4 activation bytes serves all 16
    /// rows, and each code vector is unpacked as it is used. At one row the kernel is bound by
    /// its vector operations (the codes are few next to the work), and per block this saves
    /// eight broadcasts, a scale broadcast and the second pass's loop.
    ///
    /// `|t, x, y| step` and `|s| widen` sum the products per half of the group, and at 2
    /// bits `|s| quarter` first adds the 4x fields' sum, divided by 4, to the other
    /// ([`crate::isa::dot_step_variants`] gives them for AVX2 and both VNNI forms): the exact
    /// integer sums, and the float steps after them are [`lowbit`]'s: the same bits.
    macro_rules! lowbit1 {
        ($(#[$attr:meta])* $name:ident, $parts:literal,
         |$t:ident, $x:ident, $y:ident| $step:expr,
         |$s:ident| $widen:expr,
         |$q:ident| $quarter:expr) => {
            $(#[$attr])*
            ///
            /// # Safety
            /// The CPU must have the features enabled above, and `check_bounds(m, &w, a, c0,
            /// 1)` must hold.
            unsafe fn $name<const B: u32>(m: &Meta, w: Group<'_>, a: &Act, c0: usize) -> [f32; G] {
                let (bb, ng) = (block_bytes(B), m.nb / m.gpb);
                // 64-byte loads per block, and values per byte
                let (loads, per) = if B == 2 { (2, 4) } else { (4, 2) };
                let mut acc = [_mm256_setzero_ps(); 2];
                let mut corr = [_mm256_setzero_ps(); 2];
                let ahead = super::scales_ahead(m);
                for b in 0..m.nb {
                    super::prefetch_ahead(w.qs.as_ptr(), b, bb);
                    let (s, first) = super::group_of(m, b);
                    if first {
                        super::prefetch_scales(w.d.as_ptr(), s, ahead);
                    }
                    let base = w.qs.as_ptr().add(b * bb);
                    let y = a.qs.as_ptr().add(c0 * m.kp + b * BLOCK) as *const i32;
                    // [half][partial sum]
                    let mut t = [[_mm256_setzero_si256(); 2]; 2];
                    for l in 0..loads {
                        let v = [
                            _mm256_loadu_si256(base.add(l * 64) as *const __m256i),
                            _mm256_loadu_si256(base.add(l * 64 + 32) as *const __m256i),
                        ];
                        let vw = v.map(|vh| _mm256_srli_epi16::<4>(vh));
                        for k in 0..per {
                            let yv =
                                _mm256_set1_epi32(std::ptr::read_unaligned(y.add(l * per + k)));
                            // 2 bits: the 4x fields into their own sum
                            let p = if B == 2 { k % 2 } else { l % $parts };
                            for (th, (&vh, &wh)) in t.iter_mut().zip(v.iter().zip(&vw)) {
                                let ($t, $x, $y) = (th[p], field::<B>(vh, wh, k), yv);
                                th[p] = $step;
                            }
                        }
                    }
                    let dx = _mm256_set1_ps(*a.d.get_unchecked(c0 * m.nb + b));
                    for h in 0..2 {
                        let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                            w.d.as_ptr().add(s * G + h * 8) as *const __m128i,
                        ));
                        let $s = if B == 2 {
                            let $q = t[h];
                            [$quarter, _mm256_setzero_si256()]
                        } else {
                            t[h]
                        };
                        let dot = _mm256_cvtepi32_ps($widen);
                        acc[h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, dx), acc[h]);
                        if first {
                            let sg = _mm256_set1_ps(*a.sg.get_unchecked(c0 * ng + s));
                            corr[h] = _mm256_fmadd_ps(dw, sg, corr[h]);
                        }
                    }
                }
                let c = _mm256_set1_ps(offset(B));
                let mut out = [0f32; G];
                for h in 0..2 {
                    _mm256_storeu_ps(
                        out.as_mut_ptr().add(h * 8),
                        _mm256_fnmadd_ps(c, corr[h], acc[h]),
                    );
                }
                out
            }
        };
    }
    crate::isa::dot_step_variants!(lowbit1, lowbit1, lowbit1_avxvnni, lowbit1_evex);

    /// Rows `8 * half .. 8 * half + 8` of a group: per block and activation row, the eight
    /// `vpmaddubsw` products of the 32 values summed in i16 (at most 8 * 2 * 15 * 127 =
    /// 30,480: no saturation; activations lie in -127..=127), widened by one `vpmaddwd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lowbit<const C: usize, const B: u32>(
        m: &Meta,
        w: Group<'_>,
        a: &Act,
        c0: usize,
        half: usize,
    ) -> [[f32; 8]; C] {
        let (bb, ng) = (block_bytes(B), m.nb / m.gpb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); C];
        let mut corr = [_mm256_setzero_ps(); C];
        let ahead = super::scales_ahead(m);
        for b in 0..m.nb {
            let (s, first) = super::group_of(m, b);
            if half == 0 {
                super::prefetch_ahead(w.qs.as_ptr(), b, bb);
                if first {
                    super::prefetch_scales(w.d.as_ptr(), s, ahead);
                }
            }
            let base = w.qs.as_ptr().add(b * bb + half * 32);
            let mut x = [_mm256_setzero_si256(); 8];
            if B == 2 {
                let mask = _mm256_set1_epi8(3);
                for l in 0..2 {
                    let v = _mm256_loadu_si256(base.add(l * 64) as *const __m256i);
                    x[4 * l] = _mm256_and_si256(v, mask);
                    x[4 * l + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
                    x[4 * l + 2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    x[4 * l + 3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
                }
            } else {
                let mask = _mm256_set1_epi8(0x0F);
                for l in 0..4 {
                    let v = _mm256_loadu_si256(base.add(l * 64) as *const __m256i);
                    x[2 * l] = _mm256_and_si256(v, mask);
                    x[2 * l + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                w.d.as_ptr().add(s * G + half * 8) as *const __m128i
            ));
            for c in 0..C {
                let col = c0 + c;
                let y = a.qs.as_ptr().add(col * m.kp + b * BLOCK) as *const i32;
                let mut t = _mm256_setzero_si256();
                for (v, xv) in x.iter().enumerate() {
                    let yv = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(v)));
                    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(*xv, yv));
                }
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(t, ones));
                let dx = _mm256_set1_ps(*a.d.get_unchecked(col * m.nb + b));
                acc[c] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, dx), acc[c]);
                if first {
                    let sg = _mm256_set1_ps(*a.sg.get_unchecked(col * ng + s));
                    corr[c] = _mm256_fmadd_ps(dw, sg, corr[c]);
                }
            }
        }
        let c = _mm256_set1_ps(offset(B));
        let mut out = [[0f32; 8]; C];
        for (o, (a, k)) in out.iter_mut().zip(acc.into_iter().zip(corr)) {
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_fnmadd_ps(c, k, a));
        }
        out
    }
}
