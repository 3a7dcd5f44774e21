//! The AVX-512 register tiles proper. `M` rows (1 to 8) of `x` against one panel block:
//! `2 * M` accumulators of 16 f32, one weight load (two registers) per depth (or pair of
//! depths) and one broadcast of `x` per row.
//!
//! Every function checks its slices' lengths up front (a slice index, which panics on a
//! caller's bug), then reads them through raw pointers in the inner loop, where a bounds
//! check per row and depth would cost as much as the arithmetic.
//!
//! The AVX-512 intrinsics are stable since Rust 1.89, the crate's MSRV.

use super::super::{Step, NR};
use std::arch::x86_64::*;

/// Depths ahead that the weight stream is prefetched into L1: the weights come from
/// memory (or L2, see [`f32_fma`]) once per unit, and the loads of a register tile would
/// otherwise wait on them.
const AHEAD: usize = 16;

/// Prefetches the cache line at `p` (a hint: never faults, whatever the address).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    // SAFETY: prefetch reads nothing architecturally and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) };
}

/// The `M` rows' accumulators: zero when `first`, else loaded from `acc`.
#[inline]
#[target_feature(enable = "avx512f")]
fn load<const M: usize>(acc: &[[f32; NR]], first: bool) -> ([__m512; M], [__m512; M]) {
    let acc = &acc[..M];
    let mut c0 = [_mm512_setzero_ps(); M];
    let mut c1 = [_mm512_setzero_ps(); M];
    if !first {
        for r in 0..M {
            // SAFETY: each row of `acc` holds NR = 32 f32: two loads of 16.
            unsafe {
                c0[r] = _mm512_loadu_ps(acc[r].as_ptr());
                c1[r] = _mm512_loadu_ps(acc[r].as_ptr().add(16));
            }
        }
    }
    (c0, c1)
}

/// Stores the `M` rows' accumulators into `acc`.
#[inline]
#[target_feature(enable = "avx512f")]
fn store<const M: usize>(acc: &mut [[f32; NR]], c0: [__m512; M], c1: [__m512; M]) {
    let acc = &mut acc[..M];
    for r in 0..M {
        // SAFETY: each row of `acc` holds NR = 32 f32: two stores of 16.
        unsafe {
            _mm512_storeu_ps(acc[r].as_mut_ptr(), c0[r]);
            _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), c1[r]);
        }
    }
}

/// Pointers to depth `k0` of the `M` rows of `x` (row stride `ldx`), each with `kc`
/// values from there (checked).
#[inline]
fn rows<T, const M: usize>(x: &[T], ldx: usize, k0: usize, kc: usize) -> [*const T; M] {
    let mut p = [std::ptr::null(); M];
    for (r, p) in p.iter_mut().enumerate() {
        *p = x[r * ldx + k0..r * ldx + k0 + kc].as_ptr();
    }
    p
}

/// Prefetches the cache line at `p` into L2 (a hint: never faults, whatever the address).
#[inline(always)]
fn prefetch_l2<T>(p: *const T) {
    // SAFETY: prefetch reads nothing architecturally and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast::<i8>()) };
}

/// f32 weights (`b`: `[kc][NR]`, the panel's depths `k0 .. k0 + kc`), an f32 row tile
/// (`x`: `[k][M]`, from depth 0): `acc += x . b` over those depths, one FMA per depth.
///
/// The weights come from memory once per unit and the row tiles pass over each block in
/// turn, so the next block (the `kc * NR` values after `b` in the panels) is prefetched
/// into L2 a share per pass (depths `pass`, `pass + passes`, ...): a steady stream over
/// the whole block's time, not a burst at the first pass. The first pass also prefetches
/// the block itself into L1, [`AHEAD`] depths ahead; the later ones find it there.
#[target_feature(enable = "avx512f")]
pub(super) fn f32_fma<const M: usize>(x: &[f32], s: Step, b: &[f32], acc: &mut [[f32; NR]]) {
    let (k0, kc) = (s.k0, s.kc);
    let xp = x[k0 * M..(k0 + kc) * M].as_ptr();
    let bp = b[..kc * NR].as_ptr();
    let next = bp.wrapping_add(kc * NR);
    let (mut c0, mut c1) = load::<M>(acc, s.first);
    let mut due = s.pass;
    let lead = s.pass == 0;
    for i in 0..kc {
        if lead {
            prefetch(bp.wrapping_add((i + AHEAD) * NR));
            prefetch(bp.wrapping_add((i + AHEAD) * NR + 16));
        }
        if due == 0 {
            prefetch_l2(next.wrapping_add(i * NR));
            prefetch_l2(next.wrapping_add(i * NR + 16));
            due = s.passes;
        }
        due -= 1;
        // SAFETY: i < kc and r < M; `b` holds kc * NR values and `xp` kc * M.
        unsafe {
            let b0 = _mm512_loadu_ps(bp.add(i * NR));
            let b1 = _mm512_loadu_ps(bp.add(i * NR + 16));
            for r in 0..M {
                let a = _mm512_set1_ps(*xp.add(i * M + r));
                c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
                c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
            }
        }
    }
    store::<M>(acc, c0, c1);
}

/// Sixteen 16-bit floats widened to f32: f16 by `vcvtph2ps`, bf16 by a shift.
#[inline]
#[target_feature(enable = "avx512f")]
fn widen<const F16: bool>(v: __m256i) -> __m512 {
    if F16 {
        _mm512_cvtph_ps(v)
    } else {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }
}

/// bf16 or f16 weights (`b`: `[kc][NR]`, widened in registers), an f32 row tile as for
/// [`f32_fma`]: as [`f32_fma`], bit for bit on the same values.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) fn u16_fma<const F16: bool, const M: usize>(
    x: &[f32],
    k0: usize,
    kc: usize,
    b: &[u16],
    acc: &mut [[f32; NR]],
    first: bool,
) {
    let xp = x[k0 * M..(k0 + kc) * M].as_ptr();
    let bp = b[..kc * NR].as_ptr();
    let (mut c0, mut c1) = load::<M>(acc, first);
    for i in 0..kc {
        prefetch(bp.wrapping_add((i + AHEAD) * NR));
        // SAFETY: i < kc and r < M; `b` holds kc * NR values (two loads of 16 u16 at
        // i * NR) and `xp` kc * M.
        unsafe {
            let b0 = widen::<F16>(_mm256_loadu_si256(bp.add(i * NR).cast()));
            let b1 = widen::<F16>(_mm256_loadu_si256(bp.add(i * NR + 16).cast()));
            for r in 0..M {
                let a = _mm512_set1_ps(*xp.add(i * M + r));
                c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
                c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
            }
        }
    }
    store::<M>(acc, c0, c1);
}

/// 64 bytes of bf16 pairs as the `vdpbf16ps` operand type.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte vectors and every bit pattern is a valid bf16 vector.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// bf16 weights in pairs (`b`: `[ni][NR][2]`), rows of bf16 pairs (`x`: `u32` each, row
/// stride `ldx` pairs, from pair `i0`): `acc += x . b`, one `vdpbf16ps` per pair.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) fn bf16_dot<const M: usize>(
    x: &[u32],
    ldx: usize,
    i0: usize,
    ni: usize,
    b: &[u16],
    acc: &mut [[f32; NR]],
    first: bool,
) {
    let xp = rows::<u32, M>(x, ldx, i0, ni);
    let bp = b[..ni * 2 * NR].as_ptr();
    let (mut c0, mut c1) = load::<M>(acc, first);
    for i in 0..ni {
        prefetch(bp.wrapping_add((i + AHEAD / 2) * 2 * NR));
        prefetch(bp.wrapping_add((i + AHEAD / 2) * 2 * NR + NR));
        // SAFETY: i < ni; `b` holds ni * 2 * NR u16 (two 64-byte loads at i * 2 * NR)
        // and every row pointer ni pairs.
        unsafe {
            let b0 = bh(_mm512_loadu_si512(bp.add(i * 2 * NR).cast()));
            let b1 = bh(_mm512_loadu_si512(bp.add(i * 2 * NR + NR).cast()));
            for r in 0..M {
                let a = bh(_mm512_set1_epi32(*xp[r].add(i) as i32));
                c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
            }
        }
    }
    store::<M>(acc, c0, c1);
}
