//! The by-value kernel parameter ABI, checked on the device with `kernel/abi_probe.cu`.
//!
//! Fills every 8-byte word of a [`KernelParams`] with a distinct value, passes it by value
//! to `flashmoe_abi_probe`, and checks what the kernel reports: the struct sizes and
//! offsets nvcc used, fields read by name, and a word-by-word echo of the whole parameter.
//!
//! Skips with `skipped: <reason>` where there is no GPU, no kernel in this build, or a
//! device the cubins cannot run on; with `FLASHMOE_EXPECT_GPU=1` those cases fail instead.

use std::mem::{offset_of, size_of};

use cudarc::driver::{CudaContext, DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use flashmoe::gpu::{expect_gpu, kernels, probe};
use flashmoe::params::{KernelParams, LayerParams, RankParams, MAX_LAUNCH_RANKS};

/// Header words before the raw echo (`FM_ABI_PROBE_HEADER` in kernel/abi_probe.cu).
const HEADER: usize = 22 + 2 * MAX_LAUNCH_RANKS;

/// `KernelParams` as a by-value kernel argument.
#[repr(transparent)]
struct ByValue(KernelParams);

// SAFETY: KernelParams is #[repr(C)], Pod (no padding, no pointers the device would
// dereference as host memory) and laid out like FmKernelParams (tests/params_layout.rs).
unsafe impl DeviceRepr for ByValue {}

/// Why the test cannot run here, or `None` when it can (device 0).
fn skip_reason() -> Option<String> {
    let gpus = match probe::probe() {
        Ok(g) => g,
        Err(e) => return Some(e.to_string()),
    };
    if !kernels::built_with_kernels() {
        return Some("flashmoe was built without CUDA kernels".into());
    }
    kernels::check_device(gpus[0].compute_capability)
        .err()
        .map(|e| e.to_string())
}

/// A parameter block whose every 8-byte word differs from every other.
fn distinct_params() -> KernelParams {
    let mut p = KernelParams::default();
    let words: &mut [u64] = bytemuck::cast_slice_mut(std::slice::from_mut(&mut p));
    for (i, w) in words.iter_mut().enumerate() {
        let i = i as u64 + 1;
        *w = (i << 40) | (i.wrapping_mul(0x9E37_79B9) & 0xFF_FFFF_FFFF);
    }
    p.layer.routed_scale = 0.75;
    p
}

/// What the kernel must write for `p` (see the layout comment in kernel/abi_probe.cu).
fn expected(p: &KernelParams) -> Vec<u64> {
    let mut e = vec![
        HEADER as u64,
        size_of::<KernelParams>() as u64,
        size_of::<LayerParams>() as u64,
        size_of::<RankParams>() as u64,
        offset_of!(KernelParams, launch_ranks) as u64,
        offset_of!(KernelParams, rank) as u64,
        offset_of!(LayerParams, routed_scale) as u64,
        offset_of!(LayerParams, timeout_ns) as u64,
        offset_of!(LayerParams, heap_stride_row) as u64,
        offset_of!(LayerParams, ws_epoch) as u64,
        offset_of!(LayerParams, logit_bias) as u64,
        offset_of!(RankParams, heap) as u64,
        offset_of!(RankParams, given_weights) as u64,
        p.layer.version as u64,
        p.layer.hidden as u64,
        p.layer.experts as u64,
        p.layer.routed_scale.to_bits() as u64,
        p.layer.fault_silent_rank as u64,
        p.layer.timeout_ns,
        p.layer.ws_bytes,
        p.layer.logit_bias,
        p.launch_ranks as u64,
    ];
    for r in &p.rank {
        e.push(r.rank as u64);
        e.push(r.given_weights);
    }
    assert_eq!(e.len(), HEADER);
    e.extend_from_slice(bytemuck::cast_slice(std::slice::from_ref(p)));
    e
}

#[test]
fn expected_words_are_all_distinct() {
    // Guards the test itself: a field mix-up on the device must change some word.
    let p = distinct_params();
    let raw: &[u64] = bytemuck::cast_slice(std::slice::from_ref(&p));
    let mut sorted = raw.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), raw.len());
    assert_eq!(expected(&p).len(), HEADER + size_of::<KernelParams>() / 8);
}

#[test]
fn kernel_params_arrive_intact_on_the_device() {
    if let Some(why) = skip_reason() {
        assert!(
            !expect_gpu(),
            "FLASHMOE_EXPECT_GPU is set but the GPU test cannot run: {why}"
        );
        println!("skipped: {why}");
        return;
    }
    let ctx = CudaContext::new(0).expect("CUDA context on device 0");
    let cubin = kernels::cubin("abi_probe").expect("abi_probe cubin");
    let module = ctx
        .load_module(Ptx::from_binary(cubin.to_vec()))
        .expect("load abi_probe cubin");
    let f = module
        .load_function("flashmoe_abi_probe")
        .expect("flashmoe_abi_probe entry point");
    let stream = ctx.default_stream();

    let p = distinct_params();
    let want = expected(&p);
    let mut out = stream
        .alloc_zeros::<u64>(want.len())
        .expect("device allocation");
    let arg = ByValue(p);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&arg);
    launch.arg(&mut out);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel takes (FmKernelParams by value, u64*) and writes exactly
    // want.len() words to `out`, which holds that many.
    unsafe { launch.launch(cfg) }.expect("launch flashmoe_abi_probe");
    let got = stream.clone_dtoh(&out).expect("copy back");

    let names = [
        "header words",
        "sizeof(FmKernelParams)",
        "sizeof(FmLayerParams)",
        "sizeof(FmRankParams)",
        "offsetof(FmKernelParams, launch_ranks)",
        "offsetof(FmKernelParams, rank)",
        "offsetof(FmLayerParams, routed_scale)",
        "offsetof(FmLayerParams, timeout_ns)",
        "offsetof(FmLayerParams, heap_stride_row)",
        "offsetof(FmLayerParams, ws_epoch)",
        "offsetof(FmLayerParams, logit_bias)",
        "offsetof(FmRankParams, heap)",
        "offsetof(FmRankParams, given_weights)",
        "layer.version",
        "layer.hidden",
        "layer.experts",
        "layer.routed_scale bits",
        "layer.fault_silent_rank",
        "layer.timeout_ns",
        "layer.ws_bytes",
        "layer.logit_bias",
        "launch_ranks",
    ];
    let describe = |i: usize| -> String {
        if i < names.len() {
            names[i].to_string()
        } else if i < HEADER {
            let r = (i - names.len()) / 2;
            let field = if (i - names.len()).is_multiple_of(2) {
                "rank"
            } else {
                "given_weights"
            };
            format!("rank[{r}].{field}")
        } else {
            format!(
                "raw parameter word {} (byte {})",
                i - HEADER,
                8 * (i - HEADER)
            )
        }
    };
    let wrong: Vec<String> = want
        .iter()
        .zip(&got)
        .enumerate()
        .filter(|(_, (w, g))| w != g)
        .map(|(i, (w, g))| format!("{}: host {w:#x}, device {g:#x}", describe(i)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} words differ:\n{}",
        wrong.len(),
        want.len(),
        wrong.join("\n")
    );
    println!("abi_probe: all {} words agree", want.len());
}
