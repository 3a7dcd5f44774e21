//! The NVSHMEM world on real GPUs: one process per rank, started by the local launcher.
//!
//! Each rank process (the ignored test `nvshmem_rank_child`, run by the tests above it)
//! runs the same layer twice on its GPU: once as the single-process launch of the whole
//! world (`GpuWorld::Single` for one rank, `GpuWorld::Emulated` for several, every rank's
//! tokens), once as its own rank of the NVSHMEM world. Its rank's gate must be identical
//! and its output equal to the one-launch run's, and within the reference's tolerance.
//!
//! Skips with a printed reason where there is no GPU, no kernels, no NVSHMEM build of the
//! kernel or no NVSHMEM host library (fails instead when `FLASHMOE_EXPECT_GPU` is set).
//! Single-node runs get `NVSHMEM_REMOTE_TRANSPORT=none`, `NVSHMEM_DISABLE_NCCL=1` and
//! `NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo` unless the environment already sets them.

mod gpu_support;

use flashmoe::config::{Dtype, MoeConfig};
use flashmoe::gpu::layer::{
    nvshmem_entry_point, GpuOptions, GpuWorld, MoeLayer, NvshmemLayer, CUBIN, NVSHMEM_CUBIN,
};
use flashmoe::gpu::{kernels, probe};
use flashmoe::reference::{self, RankInput, RouteOverrides};
use flashmoe::weights::{random_tokens, LayerWeights};
use flashmoe::world::{
    emit_result, launch_local_with, BootstrapOptions, LaunchOptions, NvshmemOptions, NvshmemWorld,
    WorldEnv,
};
use flashmoe::LayerPlan;
use gpu_support::rel_err;
use std::time::Duration;

/// The layer every rank runs: small, bf16, 4 experts per rank.
fn config(world: usize) -> MoeConfig {
    let mut cfg = MoeConfig::new(128, 256, 256, 4 * world, 2);
    cfg.world = world;
    cfg.dtype = Dtype::Bf16;
    cfg
}

const SEED: u64 = 11;

/// The number of GPUs when the NVSHMEM path can run here; otherwise prints why `test` is
/// skipped and returns None (or panics when FLASHMOE_EXPECT_GPU is set).
fn nvshmem_gpus(test: &str) -> Option<usize> {
    let why = (|| -> Result<usize, String> {
        let gpus = probe::probe().map_err(|e| e.to_string())?;
        let g = gpus.first().ok_or("no GPU listed")?;
        kernels::cubin(CUBIN).map_err(|e| e.to_string())?;
        kernels::cubin(NVSHMEM_CUBIN).map_err(|e| e.to_string())?;
        kernels::check_device(g.compute_capability).map_err(|e| e.to_string())?;
        let lib = nvshmem_sys::Nvshmem::load().map_err(|e| e.to_string())?;
        lib.check_version().map_err(|e| e.to_string())?;
        Ok(gpus.len())
    })();
    match why {
        Ok(n) => Some(n),
        Err(reason) => {
            assert!(
                !flashmoe::gpu::expect_gpu(),
                "{test}: FLASHMOE_EXPECT_GPU is set but the NVSHMEM path is unusable: {reason}"
            );
            println!("skipped {test}: {reason}");
            None
        }
    }
}

/// Starts `n` rank processes of this test binary's `nvshmem_rank_child` and returns each
/// rank's result.
fn run_ranks(n: usize) -> Vec<serde_json::Value> {
    let exe = std::env::current_exe().expect("test binary path");
    let args: Vec<String> = [
        "--exact",
        "nvshmem_rank_child",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut env = Vec::new();
    for (k, v) in [
        ("NVSHMEM_REMOTE_TRANSPORT", "none"),
        ("NVSHMEM_DISABLE_NCCL", "1"),
        ("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo"),
    ] {
        if std::env::var_os(k).is_none() {
            env.push((k.to_string(), v.to_string()));
        }
    }
    let opts = LaunchOptions {
        timeout: Duration::from_secs(300),
        env,
        forward_stderr: true,
    };
    let reports = launch_local_with(n, &exe, &args, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reports.len(), n);
    reports
        .into_iter()
        .enumerate()
        .map(|(r, rep)| {
            assert_eq!(rep.rank, r);
            rep.result
        })
        .collect()
}

fn check_results(results: &[serde_json::Value]) {
    for (r, v) in results.iter().enumerate() {
        assert_eq!(v["rank"].as_u64(), Some(r as u64), "{v}");
        let vs_launch = v["rel_err_vs_one_launch"].as_f64().expect("number");
        let vs_ref = v["err_vs_reference"].as_f64().expect("number");
        let tol = v["tolerance"].as_f64().expect("number");
        assert!(
            vs_launch <= 1e-3,
            "rank {r}: {vs_launch} vs the one-launch run"
        );
        assert!(vs_ref <= tol, "rank {r}: {vs_ref} > {tol} vs the reference");
        println!("rank {r}: {v}");
    }
}

#[test]
fn one_pe_through_nvshmem_equals_the_single_world() {
    if nvshmem_gpus("one_pe_through_nvshmem_equals_the_single_world").is_none() {
        return;
    }
    check_results(&run_ranks(1));
}

#[test]
fn every_gpu_as_an_nvshmem_pe_matches_the_emulated_world_and_the_reference() {
    let Some(gpus) = nvshmem_gpus("every_gpu_as_an_nvshmem_pe") else {
        return;
    };
    if gpus < 2 {
        println!("skipped every_gpu_as_an_nvshmem_pe: this machine has {gpus} GPU");
        return;
    }
    check_results(&run_ranks(gpus.min(8)));
}

/// One rank: run by the tests above through the launcher, never on its own.
#[test]
#[ignore = "a rank process of the NVSHMEM tests (needs RANK, WORLD_SIZE, ... from the launcher)"]
fn nvshmem_rank_child() {
    let env = WorldEnv::from_process().expect("started by the launcher");
    let (me, n) = (env.rank, env.world_size);
    let cfg = config(n);
    let plan = LayerPlan::new(&cfg).unwrap();
    let w = LayerWeights::random(&cfg, SEED);
    let xs: Vec<Vec<f32>> = (0..n)
        .map(|r| random_tokens(&cfg, cfg.tokens, SEED + 1 + r as u64))
        .collect();
    let inputs: Vec<RankInput> = xs
        .iter()
        .map(|x| RankInput {
            x,
            tokens: cfg.tokens,
            routing: None,
        })
        .collect();
    let ov = RouteOverrides::default();

    let opts = NvshmemOptions {
        bootstrap: BootstrapOptions::from_env(&env),
        library: None,
        report: true,
    };
    let cubin = kernels::cubin(NVSHMEM_CUBIN).unwrap();
    let mut world = NvshmemWorld::init(&env, cubin, nvshmem_entry_point(cfg.dtype), &opts)
        .unwrap_or_else(|e| panic!("rank {me}: NVSHMEM init: {e}"));
    let stream = world.context().new_stream().unwrap();

    // The whole world as one launch on this GPU.
    let one_world = if n == 1 {
        GpuWorld::Single
    } else {
        GpuWorld::Emulated { ranks: n }
    };
    let one = {
        let mut layer = MoeLayer::new(
            stream.clone(),
            plan.clone(),
            &w,
            one_world,
            GpuOptions::default(),
        )
        .unwrap();
        layer.forward_host(&inputs, &ov).unwrap()
    };

    // This rank of the NVSHMEM world.
    let mut layer = NvshmemLayer::new(&mut world, stream, plan.clone(), &w, GpuOptions::default())
        .unwrap_or_else(|e| panic!("rank {me}: NvshmemLayer::new: {e}"));
    assert_eq!(
        layer.layer().world(),
        GpuWorld::Nvshmem { rank: me, world: n }
    );
    assert_eq!(layer.layer().grid().ranks, 1);
    let got = layer
        .forward_host(&mut world, &inputs[me], &ov)
        .unwrap_or_else(|e| panic!("rank {me}: forward: {e}"));
    // Twice: the epoch advances with no reset in between.
    let again = layer.forward_host(&mut world, &inputs[me], &ov).unwrap();
    assert_eq!(layer.epoch().unwrap(), 2);
    assert_eq!(got.out, again.out, "rank {me}: second launch differs");

    let (g, e) = (&got.gates[0], &one.gates[me]);
    assert_eq!(g.ids, e.ids, "rank {me}: routed experts");
    assert_eq!(g.slots, e.slots, "rank {me}: slots");
    assert_eq!(g.expert_counts, e.expert_counts, "rank {me}: expert counts");
    assert_eq!(g.dropped, e.dropped, "rank {me}: dropped");
    for (a, b) in g.weights.iter().zip(&e.weights) {
        assert!((a - b).abs() <= 1e-6, "rank {me}: weight {a} vs {b}");
    }
    let vs_launch = rel_err(&got.out[0], &one.out[me]);

    let want = reference::forward(&plan, &w, &inputs, &ov).unwrap();
    let (mut max_err, mut max_ref) = (0f64, 0f64);
    for (a, b) in got.out[0].iter().zip(&want.out[me]) {
        max_err = max_err.max((f64::from(*a) - f64::from(*b)).abs());
        max_ref = max_ref.max(f64::from(*b).abs());
    }
    let vs_ref = max_err / max_ref.max(1e-30);
    let report = layer.peer_report().clone();
    emit_result(&serde_json::json!({
        "rank": me,
        "rel_err_vs_one_launch": vs_launch,
        "err_vs_reference": vs_ref,
        "tolerance": reference::tolerance(cfg.dtype),
        "p2p": report.p2p,
        "rdma": report.rdma,
        "staging": layer.layer().plan().staging,
    }))
    .unwrap();
    drop(layer);
    world.barrier().unwrap();
}
