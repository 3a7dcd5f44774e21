//! AVX-512 register tiles: up to [`MR`] rows of `x` times one panel of [`NR`] columns, the
//! `2 * rows` accumulators held in registers over a block of depths.
//!
//! Each output lane is one chain of FMAs (or of `vdpbf16ps`, one per pair of depths) in
//! depth order, whatever the number of rows in the tile.

use super::{Lhs, PackedMatrix, Step, NR};

/// Evaluates `$call` with the constant `$m` equal to the row count `$rows` (1 to 8).
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($rows:expr, $m:ident => $call:expr) => {
        match $rows {
            1 => {
                const $m: usize = 1;
                $call
            }
            2 => {
                const $m: usize = 2;
                $call
            }
            3 => {
                const $m: usize = 3;
                $call
            }
            4 => {
                const $m: usize = 4;
                $call
            }
            5 => {
                const $m: usize = 5;
                $call
            }
            6 => {
                const $m: usize = 6;
                $call
            }
            7 => {
                const $m: usize = 7;
                $call
            }
            _ => {
                const $m: usize = 8;
                $call
            }
        }
    };
}

/// Whether the CPU has AVX-512F.
pub fn has_f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512F and AVX-512 BF16.
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_f() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One register tile (see [`Step`]) with the kernel `w` is packed for. `w`'s kernel is
/// one this CPU runs ([`PackedMatrix::pack_for`] makes sure of it); were it not, the tile
/// is filled with NaN so that the error cannot pass unseen.
#[cfg(target_arch = "x86_64")]
pub(super) fn tile(x: &Lhs, w: &PackedMatrix, s: Step, acc: &mut [[f32; NR]]) {
    use super::Kernel;
    let rows = acc.len().min(super::MR);
    let acc = &mut acc[..rows];
    match w.kernel() {
        Kernel::Bf16Dot | Kernel::Bf16Amx if has_bf16() => {
            let ldx = x.k().div_ceil(2);
            let (i0, ni) = (s.k0 / 2, s.kc.div_ceil(2));
            let xs = &x.pairs()[s.r0 * ldx..];
            let b = &w.panel_u16(s.p)[i0 * 2 * NR..(i0 + ni) * 2 * NR];
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked just above).
            unsafe { by_rows!(rows, M => kernels::bf16_dot::<M>(xs, ldx, i0, ni, b, acc, s.first)) }
        }
        Kernel::F32Fma if has_f() => {
            let xs = &x.tiles()[s.r0 * x.k()..];
            let b = &w.panel_f32(s.p)[s.k0 * NR..(s.k0 + s.kc) * NR];
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { by_rows!(rows, M => kernels::f32_fma::<M>(xs, s, b, acc)) }
        }
        Kernel::Bf16Fma | Kernel::F16Fma if has_f() => {
            let f16 = w.kernel() == Kernel::F16Fma;
            let xs = &x.tiles()[s.r0 * x.k()..];
            let b = &w.panel_u16(s.p)[s.k0 * NR..(s.k0 + s.kc) * NR];
            let (k0, kc, first) = (s.k0, s.kc, s.first);
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe {
                if f16 {
                    by_rows!(rows, M => kernels::u16_fma::<true, M>(xs, k0, kc, b, acc, first))
                } else {
                    by_rows!(rows, M => kernels::u16_fma::<false, M>(xs, k0, kc, b, acc, first))
                }
            }
        }
        _ => acc.iter_mut().for_each(|a| *a = [f32::NAN; NR]),
    }
}

/// Without x86-64 no AVX-512 kernel is ever packed for; see the x86-64 version.
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn tile(_: &Lhs, _: &PackedMatrix, _: Step, acc: &mut [[f32; NR]]) {
    acc.iter_mut().for_each(|a| *a = [f32::NAN; NR]);
}

#[cfg(target_arch = "x86_64")]
mod kernels;
