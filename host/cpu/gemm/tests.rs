use super::*;
use crate::Dtype;

/// xorshift values in [-1, 1), rounded to `dtype`.
fn values(n: usize, seed: u32, dtype: Dtype) -> Vec<f32> {
    let mut s = seed.max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            dtype.round((s as f32 / u32::MAX as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// Every (dtype, kernel) pair this CPU runs, the portable kernel for every dtype included.
fn kernels() -> Vec<(Dtype, Kernel)> {
    let all = [
        Kernel::F32Fma,
        Kernel::Bf16Amx,
        Kernel::Bf16Dot,
        Kernel::Bf16Fma,
        Kernel::F16Fma,
        Kernel::Portable,
    ];
    [Dtype::F32, Dtype::Bf16, Dtype::F16]
        .into_iter()
        .flat_map(|d| all.into_iter().map(move |k| (d, k)))
        .filter(|(d, k)| k.fits(*d) && k.supported())
        .collect()
}

fn run(x: &[f32], rows: usize, k: usize, w: &PackedMatrix, col0: usize, ncols: usize) -> Vec<f32> {
    let lhs = Lhs::new(x, rows, k, w.kernel());
    let ldo = ncols + 3;
    let mut out = vec![f32::NAN; rows * ldo];
    gemm(&lhs, w, col0, ncols, &mut out, ldo);
    for r in 0..rows {
        assert!(
            out[r * ldo + ncols..(r + 1) * ldo]
                .iter()
                .all(|v| v.is_nan()),
            "past the columns"
        );
    }
    (0..rows)
        .flat_map(|r| out[r * ldo..r * ldo + ncols].to_vec())
        .collect()
}

const SHAPES: [(usize, usize, usize); 9] = [
    (33, 40, 96),
    (20, 64, 70),
    (1, 1, 1),
    (3, 5, 13),
    (8, 32, 64),
    (9, 45, 67),
    (17, 64, 300),
    (32, 70, 513),
    (5, 33, 2),
];

#[test]
fn every_kernel_matches_f64_on_odd_shapes() {
    for (dtype, kernel) in kernels() {
        for (i, &(rows, n, k)) in SHAPES.iter().enumerate() {
            let x = values(rows * k, 7 + i as u32, dtype);
            let wv = values((n + 1) * k, 99 + i as u32, dtype);
            let w = PackedMatrix::pack_for(&wv, n + 1, k, dtype, kernel);
            assert_eq!(w.kernel(), kernel);
            let got = run(&x, rows, k, &w, 1, n);
            for r in 0..rows {
                for c in 0..n {
                    let (xr, wc) = (&x[r * k..(r + 1) * k], &wv[(c + 1) * k..(c + 2) * k]);
                    let want: f64 = xr
                        .iter()
                        .zip(wc)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let scale: f64 = xr
                        .iter()
                        .zip(wc)
                        .map(|(a, b)| f64::from((a * b).abs()))
                        .sum();
                    let err = (f64::from(got[r * n + c]) - want).abs();
                    assert!(
                        err <= 1e-6 * scale.max(1e-30) * (k as f64).sqrt() + 1e-30,
                        "{kernel:?} {dtype:?} {rows}x{n}x{k} at ({r}, {c}): {} vs {want}",
                        got[r * n + c]
                    );
                }
            }
        }
    }
}

#[test]
fn every_output_is_bit_identical_whatever_the_block() {
    // An output must not depend on the other rows or columns computed with it: the whole
    // block, each row alone, and a column range that starts inside a panel agree bit for
    // bit. This is what makes results independent of the thread count.
    for (dtype, kernel) in kernels() {
        for (i, &(rows, n, k)) in SHAPES.iter().enumerate() {
            let x = values(rows * k, 3 + i as u32, dtype);
            let w =
                PackedMatrix::pack_for(&values(n * k, 5 + i as u32, dtype), n, k, dtype, kernel);
            let all = run(&x, rows, k, &w, 0, n);
            for r in 0..rows {
                let one = run(&x[r * k..(r + 1) * k], 1, k, &w, 0, n);
                assert_eq!(
                    bits(&one),
                    bits(&all[r * n..(r + 1) * n]),
                    "{kernel:?} row {r}"
                );
                let c0 = n / 3;
                let part = run(&x[r * k..(r + 1) * k], 1, k, &w, c0, n - c0);
                assert_eq!(
                    bits(&part),
                    bits(&all[r * n + c0..(r + 1) * n]),
                    "{kernel:?} from {c0}"
                );
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn fma_kernels_are_one_fma_chain_per_output() {
    // The documented order: acc = fma(x[i], w[i], acc) for i = 0 .. k (f32::mul_add is an
    // exact fused multiply-add wherever it runs); the portable kernel multiplies then adds.
    for (dtype, kernel) in kernels().into_iter().filter(|(_, k)| !k.pairs()) {
        let (rows, n, k) = (5, 40, 300);
        let x = values(rows * k, 11, dtype);
        let wv = values(n * k, 13, dtype);
        let got = run(
            &x,
            rows,
            k,
            &PackedMatrix::pack_for(&wv, n, k, dtype, kernel),
            0,
            n,
        );
        for r in 0..rows {
            for c in 0..n {
                let pairs = x[r * k..(r + 1) * k].iter().zip(&wv[c * k..(c + 1) * k]);
                let want = if kernel == Kernel::Portable {
                    pairs.fold(0f32, |acc, (a, b)| acc + a * b)
                } else {
                    pairs.fold(0f32, |acc, (a, b)| a.mul_add(*b, acc))
                };
                assert_eq!(
                    got[r * n + c].to_bits(),
                    want.to_bits(),
                    "{kernel:?} ({r}, {c})"
                );
            }
        }
    }
}

#[test]
fn detection_picks_a_kernel_for_every_dtype() {
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        let k = Kernel::detect(dtype);
        assert!(k.fits(dtype) && k.supported(), "{dtype:?}: {k:?}");
    }
    // A kernel this CPU or dtype cannot run falls back to the portable one.
    let w = PackedMatrix::pack_for(&[1.0; 4], 2, 2, Dtype::F32, Kernel::Bf16Dot);
    assert_eq!(w.kernel(), Kernel::Portable);
}

#[test]
fn packed_weights_keep_their_dtype_width() {
    let (n, k) = (64, 256);
    let w = values(n * k, 1, Dtype::Bf16);
    assert_eq!(PackedMatrix::pack(&w, n, k, Dtype::Bf16).bytes(), n * k * 2);
    assert_eq!(PackedMatrix::pack(&w, n, k, Dtype::F16).bytes(), n * k * 2);
    assert_eq!(PackedMatrix::pack(&w, n, k, Dtype::F32).bytes(), n * k * 4);
}

/// Throughput of every kernel on expert-unit shapes (not a check: run by hand with
/// `cargo test --lib gemm_speed -- --ignored --nocapture`).
#[test]
#[ignore]
fn gemm_speed() {
    for (dtype, kernel) in kernels() {
        for (rows, n, k) in [
            (64, 2048, 2048),
            (33, 2048, 2048),
            (8, 2048, 2048),
            (32, 1024, 4096),
        ] {
            let x = values(rows * k, 1, dtype);
            let w = PackedMatrix::pack_for(&values(n * k, 2, dtype), n, k, dtype, kernel);
            let mut out = vec![0f32; rows * n];
            let mut s = f64::MAX;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                let lhs = Lhs::new(&x, rows, k, kernel);
                for c0 in (0..n).step_by(64) {
                    gemm(&lhs, &w, c0, 64, &mut out[c0..], n);
                }
                s = s.min(t.elapsed().as_secs_f64());
            }
            let gf = 2.0 * (rows * n * k) as f64 / s / 1e9;
            println!("{kernel:?} {dtype:?} {rows}x{n}x{k}: {gf:.1} GFLOP/s (best of 20)");
        }
    }
}

#[test]
fn row_tiles_cover_the_rows_evenly() {
    for rows in 0..100 {
        let t: Vec<(usize, usize)> = row_tiles(rows).collect();
        assert_eq!(t.len(), rows.div_ceil(MR));
        let mut next = 0;
        for &(r0, m) in &t {
            assert_eq!(r0, next);
            assert!((1..=MR).contains(&m));
            next += m;
        }
        assert_eq!(next, rows);
        let (lo, hi) = (t.iter().map(|x| x.1).min(), t.iter().map(|x| x.1).max());
        assert!(hi.zip(lo).is_none_or(|(h, l)| h - l <= 1), "{rows}: {t:?}");
    }
}
