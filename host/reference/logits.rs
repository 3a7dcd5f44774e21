//! Router logits of many tokens at once, each bit for bit [`super::dot64`] of its token and
//! expert: one sequential f64 sum from -0.0 of the exact products (an f32 times an f32 is
//! exact in f64, so a fused multiply-add gives the very bits of a multiply then an add).
//! Only the schedule differs: AVX-512 lanes over experts and several tokens in flight
//! where the CPU has AVX-512F, eight experts' chains interleaved elsewhere.

/// `out[t * experts + e] = dot64(x_t, router_e)` for `tokens` rows of `x` (`[tokens][h]`)
/// and the `experts` rows of `router` (`[experts][h]`).
pub(crate) fn logits64(x: &[f32], tokens: usize, router: &[f32], h: usize) -> Vec<f64> {
    // Large gates in token chunks on the machine's threads (qwen3-30b-a3b at 4096 tokens:
    // 1 G multiply-adds). Each token's logits are computed alone, so the chunks change
    // no value.
    let experts = router.len() / h.max(1);
    let threads = crate::par::threads();
    if threads > 1 && tokens >= 2 * PAR_MIN_TOKENS && tokens * experts * h >= PAR_MIN_WORK {
        let per = tokens.div_ceil(threads).max(PAR_MIN_TOKENS);
        let firsts: Vec<usize> = (0..tokens).step_by(per).collect();
        let parts = crate::par::map_in_order(&firsts, |&t0| {
            let n = per.min(tokens - t0);
            logits64_serial(&x[t0 * h..(t0 + n) * h], n, router, h)
        });
        return parts.concat();
    }
    logits64_serial(x, tokens, router, h)
}

/// Fewest tokens per thread of a threaded [`logits64`].
const PAR_MIN_TOKENS: usize = 64;
/// Fewest multiply-adds (tokens x experts x hidden) worth threads.
const PAR_MIN_WORK: usize = 1 << 24;

/// [`logits64`] on this thread.
fn logits64_serial(x: &[f32], tokens: usize, router: &[f32], h: usize) -> Vec<f64> {
    let experts = router.len() / h.max(1);
    let mut out = vec![0f64; tokens * experts];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && h > 0 {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { avx512::logits(x, tokens, router, h, &mut out) };
        return out;
    }
    for (t, o) in out.chunks_mut(experts.max(1)).enumerate().take(tokens) {
        super::dots64(&x[t * h..(t + 1) * h], router, o);
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Tokens per register tile.
    const TT: usize = 4;

    /// See [`super::logits64`]; `out` is `[tokens][experts]`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn logits(x: &[f32], tokens: usize, router: &[f32], h: usize, out: &mut [f64]) {
        let experts = router.len() / h;
        let lanes = experts.div_ceil(16) * 16;
        // The router as [h][lanes] f64, zero past the experts.
        let mut rt = vec![0f64; h * lanes];
        for (e, row) in router.chunks_exact(h).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                rt[i * lanes + e] = f64::from(v);
            }
        }
        let mut acc = [[0f64; 16]; TT];
        for t0 in (0..tokens).step_by(TT) {
            // Past the last token the last one is repeated and its results dropped.
            let rows: [&[f32]; TT] =
                std::array::from_fn(|j| &x[(t0 + j).min(tokens - 1) * h..][..h]);
            for e0 in (0..lanes).step_by(16) {
                tile(&rows, &rt[e0..], lanes, &mut acc);
                for (j, a) in acc.iter().enumerate().take(tokens - t0) {
                    let n = 16.min(experts.saturating_sub(e0));
                    let o = (t0 + j) * experts + e0;
                    out[o..o + n].copy_from_slice(&a[..n]);
                }
            }
        }
    }

    /// `acc[j][l] = sum_i rows[j][i] * rt[i * lanes + l]` for 16 lanes, each a chain of
    /// FMAs over `i` in order from -0.0.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // j indexes three arrays in step
    fn tile(rows: &[&[f32]; TT], rt: &[f64], lanes: usize, acc: &mut [[f64; 16]; TT]) {
        let h = rows[0].len();
        // Bounds of every read below: rt[i * lanes .. i * lanes + 16] for i < h.
        let rt = &rt[..(h - 1) * lanes + 16];
        let mut c0 = [_mm512_set1_pd(-0.0); TT];
        let mut c1 = [_mm512_set1_pd(-0.0); TT];
        for i in 0..h {
            // SAFETY: i < h and rt holds (h - 1) * lanes + 16 values (checked above).
            let (w0, w1) = unsafe {
                let p = rt.as_ptr().add(i * lanes);
                (_mm512_loadu_pd(p), _mm512_loadu_pd(p.add(8)))
            };
            for j in 0..TT {
                let v = _mm512_set1_pd(f64::from(rows[j][i]));
                c0[j] = _mm512_fmadd_pd(v, w0, c0[j]);
                c1[j] = _mm512_fmadd_pd(v, w1, c1[j]);
            }
        }
        for j in 0..TT {
            // SAFETY: each acc row holds 16 f64: two stores of 8.
            unsafe {
                _mm512_storeu_pd(acc[j].as_mut_ptr(), c0[j]);
                _mm512_storeu_pd(acc[j].as_mut_ptr().add(8), c1[j]);
            }
        }
    }
}
