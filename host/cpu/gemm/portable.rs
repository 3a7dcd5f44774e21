//! The portable register tile: weights widened to f32 one depth at a time, then a
//! multiply and an add per product (no FMA), in plain loops the compiler vectorises.

use super::{Lhs, PackedMatrix, Step, NR};
use crate::Dtype;

/// Depth `i` of panel `p` of `w` (laid out `[k][NR]`) as f32.
fn widen(w: &PackedMatrix, p: usize, i: usize) -> [f32; NR] {
    let mut out = [0f32; NR];
    match w.dtype() {
        Dtype::F32 => out.copy_from_slice(&w.panel_f32(p)[i * NR..(i + 1) * NR]),
        Dtype::Bf16 => {
            for (o, &b) in out.iter_mut().zip(&w.panel_u16(p)[i * NR..(i + 1) * NR]) {
                *o = half::bf16::from_bits(b).to_f32();
            }
        }
        Dtype::F16 => {
            for (o, &b) in out.iter_mut().zip(&w.panel_u16(p)[i * NR..(i + 1) * NR]) {
                *o = half::f16::from_bits(b).to_f32();
            }
        }
    }
    out
}

/// One register tile (see [`Step`]): `acc[r][c] = acc[r][c] + x[r0 + r][i] * w[i][c]` for
/// each depth `i` in order.
pub(super) fn tile(x: &Lhs, w: &PackedMatrix, s: Step, acc: &mut [[f32; NR]]) {
    let (k, xs) = (x.k(), x.f32_rows());
    if s.first {
        acc.iter_mut().for_each(|a| *a = [0.0; NR]);
    }
    for i in s.k0..s.k0 + s.kc {
        let b = widen(w, s.p, i);
        for (r, a) in acc.iter_mut().enumerate() {
            let v = xs[(s.r0 + r) * k + i];
            for (o, bw) in a.iter_mut().zip(&b) {
                *o += v * bw;
            }
        }
    }
}
