//! The roofline ceilings measured on a real GPU (skips without one).

mod gpu_support;

use flashmoe::gpu::roofline::{measure, RooflineOptions};

#[test]
fn ceilings_are_measured_and_plausible() {
    let Some((_gpu, stream)) = gpu_support::gpu_stream("ceilings_are_measured_and_plausible")
    else {
        return;
    };
    // SAFETY: only tries to dlopen libcublas.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        assert!(
            !flashmoe::gpu::expect_gpu(),
            "FLASHMOE_EXPECT_GPU is set but libcublas is not found"
        );
        println!(
            "skipped ceilings_are_measured_and_plausible: libcublas not found (LD_LIBRARY_PATH)"
        );
        return;
    }
    let opts = RooflineOptions {
        gemm_n: 4096,
        copy_bytes: 256 << 20,
        warmup: 2,
        reps: 7,
    };
    let r = measure(&stream, opts).unwrap();
    println!(
        "bf16 GEMM {:.1} TFLOP/s, device copy {:.0} GB/s",
        r.flops_per_s / 1e12,
        r.bytes_per_s / 1e9
    );
    // Between a small laptop GPU and far beyond any current part.
    assert!(r.flops_per_s > 1e12 && r.flops_per_s < 1e16, "{r:?}");
    assert!(r.bytes_per_s > 5e10 && r.bytes_per_s < 5e13, "{r:?}");
    // Two runs agree within 30% (the same ceilings, not noise).
    let again = measure(&stream, opts).unwrap();
    let ratio = again.flops_per_s / r.flops_per_s;
    assert!((0.7..1.3).contains(&ratio), "GEMM rate moved by {ratio}");
    let ratio = again.bytes_per_s / r.bytes_per_s;
    assert!(
        (0.7..1.3).contains(&ratio),
        "copy bandwidth moved by {ratio}"
    );
}

#[test]
fn bad_sizes_are_refused() {
    let Some((_gpu, stream)) = gpu_support::gpu_stream("bad_sizes_are_refused") else {
        return;
    };
    let opts = RooflineOptions {
        gemm_n: 0,
        ..RooflineOptions::default()
    };
    assert!(matches!(
        measure(&stream, opts),
        Err(flashmoe::Error::InvalidInput { .. })
    ));
}
