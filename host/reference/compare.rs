//! How executors' outputs are compared with the reference.

use crate::config::Dtype;

/// The largest `|got - want|` divided by the largest `|want|` (max-abs-normalised error).
///
/// Infinite when the lengths differ or `got` holds a non-finite value (an unwritten,
/// NaN-poisoned row fails); 0 for two empty slices; when `want` is all zeros, the largest
/// `|got|` itself.
pub fn normalised_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let worst = got.iter().zip(want).fold(0f64, |m, (a, b)| {
        m.max((f64::from(*a) - f64::from(*b)).abs())
    });
    if scale > 0.0 {
        worst / scale
    } else {
        worst
    }
}

/// The accepted [`normalised_error`] against the reference: 1e-5 for f32, 2e-2 for bf16
/// and f16 (the CPU executor, a plain implementation in the dtype, stays below about 1e-2).
pub fn tolerance(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 1e-5,
        Dtype::Bf16 | Dtype::F16 => 2e-2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_by_the_largest_reference_value() {
        assert_eq!(normalised_error(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(normalised_error(&[], &[]), 0.0);
        assert_eq!(normalised_error(&[0.5, 0.0], &[0.0, 0.0]), 0.5);
        assert_eq!(normalised_error(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(
            normalised_error(&[f32::NAN, 2.0], &[1.0, 2.0]),
            f64::INFINITY
        );
        assert!(tolerance(Dtype::F32) < tolerance(Dtype::Bf16));
    }
}
