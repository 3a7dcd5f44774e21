//! The roofline of a layer: its FLOPs and bytes (pure, per DESIGN.md "Performance
//! accounting") and the two ceilings measured on the device in the same process: the bf16
//! GEMM rate through cuBLAS (f32 compute) and the device-to-device copy bandwidth.
//!
//! The floor of a launch is `max(FLOPs / peak FLOP/s, bytes / peak B/s)`; a benchmark
//! reports its measured time against it ([`Roofline::fraction`]).

use crate::config::MoeConfig;
use crate::error::{Error, Result};
use crate::metrics::LayerWork;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{sys, CudaStream, DriverError};
use std::sync::Arc;

/// FLOPs of one layer forward over all ranks (the accounting of
/// [`LayerWork`](crate::metrics::LayerWork), DESIGN.md "Performance accounting").
///
/// `routed_rows`: kept (token, expert) pairs (dropped pairs cost nothing); `tokens`: tokens
/// over all ranks (they pay the gate, `2 * hidden * experts` each unless the routing is
/// given, and the shared experts). Each routed row costs
/// `2 * hidden * intermediate * (3 if gated else 2)`.
pub fn layer_flops(cfg: &MoeConfig, routed_rows: u64, tokens: u64) -> f64 {
    LayerWork::new(cfg, tokens, &[routed_rows]).flops
}

/// Fewest bytes one layer forward must move through device memory, over all ranks (as
/// [`LayerWork`](crate::metrics::LayerWork)): the weights of the experts that received at
/// least one row (`experts_touched`), the router (unless the routing is given), the shared
/// experts, and every token read once and written once.
pub fn layer_bytes(cfg: &MoeConfig, experts_touched: usize, tokens: u64) -> f64 {
    LayerWork::new(cfg, tokens, &vec![1; experts_touched]).bytes
}

/// Kept rows and experts touched from a launch's statistics: `expert_counts` summed over
/// ranks (kept and dropped pairs) and the total dropped.
pub fn routed_work(expert_counts: &[u64], dropped: u64) -> (u64, usize) {
    let pairs: u64 = expert_counts.iter().sum();
    let touched = expert_counts.iter().filter(|&&c| c > 0).count();
    (pairs.saturating_sub(dropped), touched)
}

/// The two ceilings of one device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roofline {
    /// Dense bf16 GEMM rate (f32 accumulation), FLOP/s.
    pub flops_per_s: f64,
    /// Device memory bandwidth (bytes read + bytes written by a large copy), B/s.
    pub bytes_per_s: f64,
}

impl Roofline {
    /// The floor of a launch: `max(flops / peak, bytes / bandwidth)`, seconds.
    pub fn floor_s(&self, flops: f64, bytes: f64) -> f64 {
        (flops / self.flops_per_s).max(bytes / self.bytes_per_s)
    }

    /// How close a measured time is to the floor: `floor / measured`, in (0, 1] for a
    /// plausible measurement.
    pub fn fraction(&self, measured_s: f64, flops: f64, bytes: f64) -> f64 {
        self.floor_s(flops, bytes) / measured_s
    }

    /// Whether the floor is set by arithmetic (true) or memory traffic (false).
    pub fn compute_bound(&self, flops: f64, bytes: f64) -> bool {
        flops / self.flops_per_s >= bytes / self.bytes_per_s
    }
}

/// Sizes and repetitions of [`measure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RooflineOptions {
    /// Square GEMM size (m = n = k).
    pub gemm_n: usize,
    /// Bytes of the copy.
    pub copy_bytes: usize,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs; the median is kept.
    pub reps: usize,
}

impl Default for RooflineOptions {
    fn default() -> Self {
        RooflineOptions {
            gemm_n: 8192,
            copy_bytes: 1 << 30,
            warmup: 3,
            reps: 20,
        }
    }
}

fn cuda(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Deterministic pseudo-random bf16 values in [-1, 1) (never zeros: timing on zeros lies).
fn random_bf16(n: usize, seed: u64) -> Vec<half::bf16> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            half::bf16::from_f32(2.0 * u - 1.0)
        })
        .collect()
}

/// Times `reps` runs of `f` with device events on `stream`; median milliseconds.
fn time_ms(
    stream: &Arc<CudaStream>,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize().map_err(cuda("warm-up"))?;
    let ctx = stream.context();
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = ctx.new_event(flags).map_err(cuda("event"))?;
        let end = ctx.new_event(flags).map_err(cuda("event"))?;
        start.record(stream).map_err(cuda("event record"))?;
        f()?;
        end.record(stream).map_err(cuda("event record"))?;
        end.synchronize().map_err(cuda("event sync"))?;
        times.push(start.elapsed_ms(&end).map_err(cuda("elapsed"))? as f64);
    }
    Ok(median(times))
}

/// Measures both ceilings on `stream`'s device (needs libcublas on the loader path;
/// [`Error::Cuda`] saying so otherwise): a bf16 `gemm_n`^3 cuBLAS GEMM with f32
/// compute (its result spot-checked against the host) and a `copy_bytes` device-to-device
/// copy counted as bytes read plus bytes written. Medians of `reps` event-timed runs.
pub fn measure(stream: &Arc<CudaStream>, opts: RooflineOptions) -> Result<Roofline> {
    let n = opts.gemm_n;
    if n == 0 || n > 32768 || opts.copy_bytes < 4 {
        return Err(Error::input(
            "RooflineOptions",
            "gemm_n must be in 1..=32768 and copy_bytes >= 4",
        ));
    }
    // SAFETY: only tries to dlopen libcublas; cudarc would panic on first use without it.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "libcublas not found (tried libcublas.so, .so.13, .so.12, ...): put the CUDA \
             toolkit's lib64/ or the nvidia-cublas wheel's lib/ on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let blas_err = |what: &'static str| move |e| Error::Cuda(format!("{what}: {e:?}"));
    let blas = CudaBlas::new(stream.clone()).map_err(blas_err("cuBLAS handle"))?;
    let a_host = random_bf16(n * n, 1);
    let b_host = random_bf16(n * n, 2);
    let a = stream.clone_htod(&a_host).map_err(cuda("GEMM input"))?;
    let b = stream.clone_htod(&b_host).map_err(cuda("GEMM input"))?;
    let mut c = stream
        .alloc_zeros::<half::bf16>(n * n)
        .map_err(cuda("GEMM output"))?;
    let ni = n as i32;
    let cfg = GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: ni,
        n: ni,
        k: ni,
        alpha: half::bf16::ONE,
        lda: ni,
        ldb: ni,
        beta: half::bf16::ZERO,
        ldc: ni,
    };
    let gemm_ms = time_ms(stream, opts.warmup, opts.reps, || {
        // SAFETY: a, b, c hold n*n elements each and the leading dimensions are n.
        unsafe { blas.gemm(cfg, &a, &b, &mut c) }.map_err(blas_err("cuBLAS GEMM"))
    })?;
    // Spot check (column-major): C(i, j) = sum_l A(i, l) * B(l, j).
    let c_host = stream.clone_dtoh(&c).map_err(cuda("GEMM result"))?;
    for &(i, j) in &[(0usize, 0usize), (n - 1, 0), (n / 2, n - 1), (n - 1, n - 1)] {
        let want: f64 = (0..n)
            .map(|l| a_host[i + l * n].to_f64() * b_host[l + j * n].to_f64())
            .sum();
        let got = c_host[i + j * n].to_f64();
        let tol = 2e-2 * (n as f64).sqrt() * 0.6 + 1e-2 * want.abs();
        if !got.is_finite() || (got - want).abs() > tol {
            return Err(Error::Device {
                rank: 0,
                stage: "roofline",
                what: format!("cuBLAS GEMM result C({i},{j}) = {got}, host says {want}"),
                expected: want.to_bits(),
                observed: got.to_bits(),
            });
        }
    }
    drop((a, b, c));

    let words = opts.copy_bytes / 4;
    let mut src = stream
        .alloc_zeros::<u32>(words)
        .map_err(cuda("copy source"))?;
    let mut dst = stream
        .alloc_zeros::<u32>(words)
        .map_err(cuda("copy destination"))?;
    {
        use cudarc::driver::DevicePtrMut;
        let (p, _rec) = src.device_ptr_mut(stream);
        // SAFETY: fills exactly the `words` u32 elements of `src` with a non-zero pattern.
        unsafe { sys::cuMemsetD32Async(p, 0xA5C3_5A3C, words, stream.cu_stream()) }
            .result()
            .map_err(cuda("copy source fill"))?;
    }
    let copy_ms = time_ms(stream, opts.warmup, opts.reps, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(cuda("device copy"))
    })?;
    let flops = 2.0 * (n as f64).powi(3);
    let bytes = 2.0 * (words * 4) as f64;
    Ok(Roofline {
        flops_per_s: flops / (gemm_ms * 1e-3),
        bytes_per_s: bytes / (copy_ms * 1e-3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MlpKind, SharedExperts};

    fn cfg() -> MoeConfig {
        MoeConfig::new(256, 1024, 512, 64, 8)
    }

    #[test]
    fn flops_count_three_matrices_when_gated_two_otherwise() {
        let mut c = cfg();
        let base = layer_flops(&c, 0, 100);
        assert_eq!(base, 2.0 * 100.0 * 1024.0 * 64.0);
        let gated = layer_flops(&c, 10, 100) - base;
        assert_eq!(gated, 2.0 * 10.0 * 1024.0 * 512.0 * 3.0);
        c.mlp = MlpKind::Relu;
        let plain = layer_flops(&c, 10, 100) - base;
        assert_eq!(plain * 3.0, gated * 2.0);
    }

    #[test]
    fn flops_are_linear_in_rows_and_include_shared_experts() {
        let mut c = cfg();
        let f1 = layer_flops(&c, 7, 50);
        let f2 = layer_flops(&c, 14, 50);
        let f0 = layer_flops(&c, 0, 50);
        assert!((f2 - f0 - 2.0 * (f1 - f0)).abs() < 1e-6 * f2);
        c.shared = Some(SharedExperts {
            count: 2,
            intermediate: 256,
            gated: true,
        });
        let with = layer_flops(&c, 7, 50);
        let expect = 50.0 * (2.0 * 1024.0 * 512.0 * 3.0 + 2.0 * 1024.0);
        assert!((with - f1 - expect).abs() < 1e-6 * with);
    }

    #[test]
    fn bytes_count_touched_experts_router_and_tokens_once() {
        let c = cfg();
        let es = 2.0;
        let per_expert = (2.0 * 512.0 * 1024.0 + 1024.0 * 512.0) * es;
        let router = 64.0 * 1024.0 * es;
        let io = 2.0 * 300.0 * 1024.0 * es;
        assert_eq!(layer_bytes(&c, 5, 300), 5.0 * per_expert + router + io);
        let mut f = c.clone();
        f.dtype = crate::config::Dtype::F32;
        assert_eq!(layer_bytes(&f, 5, 300), 2.0 * layer_bytes(&c, 5, 300));
    }

    #[test]
    fn given_routing_costs_no_gate() {
        let mut c = cfg();
        c.router = crate::config::Router::Given;
        assert_eq!(layer_flops(&c, 10, 100), 2.0 * 10.0 * 1024.0 * 512.0 * 3.0);
        let with_router = layer_bytes(&cfg(), 5, 300);
        assert_eq!(layer_bytes(&c, 5, 300), with_router - 64.0 * 1024.0 * 2.0);
    }

    #[test]
    fn routed_work_subtracts_drops() {
        assert_eq!(routed_work(&[3, 0, 5, 1], 2), (7, 3));
        assert_eq!(routed_work(&[], 0), (0, 0));
    }

    #[test]
    fn floor_takes_the_slower_ceiling() {
        let r = Roofline {
            flops_per_s: 1e15,
            bytes_per_s: 3e12,
        };
        assert_eq!(r.floor_s(1e12, 3e9), 1e-3);
        assert_eq!(r.floor_s(1e9, 3e9), 1e-3);
        assert!(r.compute_bound(2e12, 3e9));
        assert!(!r.compute_bound(1e9, 3e9));
        assert!((r.fraction(2e-3, 1e12, 0.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn timing_inputs_are_never_zero() {
        let v = random_bf16(10_000, 1);
        let nonzero = v.iter().filter(|x| x.to_f32() != 0.0).count();
        assert!(nonzero > 9_900, "{nonzero}");
        assert!(v.iter().all(|x| x.to_f32().abs() <= 1.0));
    }
}
