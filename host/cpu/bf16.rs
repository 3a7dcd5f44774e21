//! Rows of values converted to and from bf16 bits, in loops that vectorise (compiled for
//! AVX-512 too and chosen at run time: integer operations, the same bits either way).

use super::tile::bf16_bits;

/// `half::bf16::from_bits(b).to_f32()`, branch-free: NaNs keep their payload with the
/// quiet bit set.
#[inline(always)]
pub fn bf16_value(b: u16) -> f32 {
    let q = if b & 0x7fff > 0x7f80 { b | 0x40 } else { b };
    f32::from_bits(u32::from(q) << 16)
}

/// `out[i]` = the bf16 bits of `row[i]` (rounded to nearest even), over the shorter.
pub fn bits_row(row: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { bits_row_avx512(row, out) };
        return;
    }
    bits_row_any(row, out);
}

/// `out[i]` = the value of the bf16 bits `bits[i]`, over the shorter.
pub fn values_row(bits: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { values_row_avx512(bits, out) };
        return;
    }
    values_row_any(bits, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn bits_row_avx512(row: &[f32], out: &mut [u16]) {
    bits_row_any(row, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn values_row_avx512(bits: &[u16], out: &mut [f32]) {
    values_row_any(bits, out);
}

#[inline(always)]
fn bits_row_any(row: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(row) {
        *o = bf16_bits(v);
    }
}

#[inline(always)]
fn values_row_any(bits: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = bf16_value(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_match_half() {
        let vals: Vec<f32> = (0..=0xffffu32)
            .map(|h| f32::from_bits(h << 16 | (h * 0x9e37) & 0xffff))
            .collect();
        let mut bits = vec![0u16; vals.len()];
        bits_row(&vals, &mut bits);
        let mut back = vec![0f32; vals.len()];
        values_row(&bits, &mut back);
        for ((v, b), x) in vals.iter().zip(&bits).zip(&back) {
            let want = half::bf16::from_f32(*v);
            assert_eq!(*b, want.to_bits(), "{v:e}");
            assert_eq!(x.to_bits(), half::bf16::from_bits(*b).to_f32().to_bits());
        }
    }
}
