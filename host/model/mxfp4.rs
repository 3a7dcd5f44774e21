//! MXFP4 (OCP microscaling FP4), the format of gpt-oss's released expert weights:
//! `{name}_blocks` `[.., rows, groups, 16]` u8 hold 32 E2M1 values per group, two per byte
//! (low nibble first), and `{name}_scales` `[.., rows, groups]` u8 one E8M0 scale per group:
//! `value = E2M1[nibble] * 2^(scale - 127)`. Rows are the weight's output rows, so the
//! result is `[rows][groups * 32]`, the `[out, in]` layout.

use crate::error::{Error, Result};

/// The 16 E2M1 values, by nibble.
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// `2^(s - 127)` for an E8M0 scale byte, exactly; `None` for 255 (NaN in E8M0).
fn scale(s: u8) -> Option<f32> {
    match s {
        255 => None,
        // 2^-127 is the subnormal with only bit 22 set.
        0 => Some(f32::from_bits(1 << 22)),
        s => Some(f32::from_bits(u32::from(s) << 23)),
    }
}

/// Dequantises `blocks` (16 bytes per group) with `scales` (one byte per group) into
/// `scales.len() * 32` values; `name` names the tensor in errors.
pub fn dequantize(name: &str, blocks: &[u8], scales: &[u8]) -> Result<Vec<f32>> {
    if blocks.len() != scales.len() * 16 {
        return Err(Error::input(
            "mxfp4",
            format!(
                "`{name}_blocks` holds {} bytes for {} scales (16 per scale expected)",
                blocks.len(),
                scales.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(scales.len() * 32);
    for (group, &s) in blocks.chunks_exact(16).zip(scales) {
        let k = scale(s).ok_or_else(|| {
            Error::input(
                "mxfp4",
                format!("`{name}_scales` holds 255, a NaN scale in E8M0"),
            )
        })?;
        for &b in group {
            out.push(E2M1[usize::from(b & 0x0F)] * k);
            out.push(E2M1[usize::from(b >> 4)] * k);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_low_first_and_scales_exact() {
        // 0x21: low nibble 1 (0.5), high nibble 2 (1.0); scale 128 = 2^1.
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x21;
        blocks[15] = 0xF8; // low 8 (-0.0), high 15 (-6.0)
        let v = dequantize("t", &blocks, &[128]).unwrap();
        assert_eq!((v[0], v[1]), (1.0, 2.0));
        assert_eq!(v[31], -12.0);
        assert!(v[30] == 0.0 && v[30].is_sign_negative());
        assert_eq!(scale(127), Some(1.0));
        assert_eq!(scale(0), Some(2f32.powi(-127)));
        assert!(dequantize("t", &blocks, &[255]).is_err());
        assert!(dequantize("t", &blocks[..15], &[127]).is_err());
    }
}
