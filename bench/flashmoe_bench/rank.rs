//! `flashmoe-bench layer` as one rank of an NVSHMEM world: the process found `RANK`,
//! `WORLD_SIZE`, ... in its environment (set by `--nproc`, torchrun, srun, ...).
//!
//! Every rank regenerates the same weights and ALL ranks' tokens from the seed (cheap),
//! runs only its own rank on its GPU (`LOCAL_RANK`), checks its own output rows against
//! the reference (computed over every rank's tokens, since routing crosses ranks), times
//! its launches with device events, and prints its report as one `FLASHMOE_RESULT` line
//! (the launcher, `--nproc`, prints the table).

use crate::args::{Backend, LayerArgs, ShapeArgs, WorldArg};
use crate::gpu_backend::{self, RankRun};
use crate::layer::{describe, sample_rows, RankData};
use crate::report::{Peaks, Report};
use crate::stats::summarize;
use flashmoe::config::MoeConfig;
use flashmoe::metrics::LayerWork;
use flashmoe::reference::{self, RouteOverrides};
use flashmoe::weights::LayerWeights;
use flashmoe::world::env::{MASTER_PORT, RANK, WORLD_SIZE};
use flashmoe::world::{launcher, WorldEnv};
use flashmoe::{Error, Result};

/// Port of flashmoe's own bootstrap listener when `MASTER_PORT` is taken by the launcher
/// (torchrun's agent serves its TCP store there); replaces `MASTER_PORT` when set.
pub const FLASHMOE_MASTER_PORT: &str = "FLASHMOE_MASTER_PORT";

/// Set by torchrun in its workers: its agent already listens on `MASTER_PORT`.
const TORCHELASTIC_USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";

/// The launcher environment of this process through `lookup`: `None` when neither `RANK`
/// nor `WORLD_SIZE` is set (a single-process run), else the parsed environment or its
/// typed error ([`Error::Env`] naming the variable): a half-set environment is refused
/// rather than silently run as a single process. `FLASHMOE_MASTER_PORT` replaces
/// `MASTER_PORT`; under torchrun (whose agent listens on `MASTER_PORT`) it is required.
pub fn world_env_from(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>> {
    if lookup(RANK).is_none() && lookup(WORLD_SIZE).is_none() {
        return Ok(None);
    }
    let own_port = lookup(FLASHMOE_MASTER_PORT);
    let agent_store = lookup(TORCHELASTIC_USE_AGENT_STORE)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"));
    if agent_store && own_port.is_none() {
        return Err(Error::Env {
            var: FLASHMOE_MASTER_PORT,
            reason: "is not set, but under torchrun MASTER_PORT is its agent's own TCP store: \
                     set FLASHMOE_MASTER_PORT to another free port on rank 0's node"
                .into(),
        });
    }
    let env = WorldEnv::from_lookup(|k| match (k, &own_port) {
        (MASTER_PORT, Some(p)) => Some(p.clone()),
        _ => lookup(k),
    });
    match env {
        // A bad FLASHMOE_MASTER_PORT is reported under its own name.
        Err(Error::Env {
            var: MASTER_PORT,
            reason,
        }) if own_port.is_some() => Err(Error::Env {
            var: FLASHMOE_MASTER_PORT,
            reason,
        }),
        other => other.map(Some),
    }
}

/// [`world_env_from`] over the process environment.
pub fn world_env() -> Result<Option<WorldEnv>> {
    world_env_from(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
}

/// The config of a rank: the command line's, with the world of the environment. Refuses
/// the CPU backend (it runs every rank as a thread of one process) and a `--world` that
/// contradicts `WORLD_SIZE`.
pub fn rank_config(shape: &ShapeArgs, env: &WorldEnv) -> Result<(String, MoeConfig)> {
    let (rank, n) = (env.rank, env.world_size);
    if shape.backend == Backend::Cpu {
        return Err(Error::config(
            "backend",
            "cpu",
            format!(
                "rank {rank} of {n}: a multi-process (NVSHMEM) rank runs on its GPU; the CPU \
                 executor runs all ranks as threads of one process: use \
                 `flashmoe-bench layer --backend cpu --world {n}` without --nproc or a launcher"
            ),
        ));
    }
    match shape.world {
        WorldArg::Ranks(r) if r == 1 || r == n => {}
        other => {
            return Err(Error::config(
                "world",
                format!("{other:?}"),
                format!("rank {rank}: the world is WORLD_SIZE = {n} processes; leave --world out"),
            ))
        }
    }
    let mut s = shape.clone();
    s.world = WorldArg::Ranks(n);
    s.config(true)
}

/// Runs this rank and prints its result line.
pub fn run(args: &LayerArgs, env: &WorldEnv) -> Result<()> {
    let shape = &args.shape;
    let (preset, cfg) = rank_config(shape, env)?;
    let plan = shape.plan(&cfg)?;
    let memory = plan.memory(env.rank).to_string();
    let estimate = crate::memory::rank(&plan, env.rank, shape.check_tokens);
    eprintln!(
        "memory estimate of rank {}: {}",
        env.rank,
        estimate.describe()
    );
    estimate.check(&format!("rank {}", env.rank), shape.max_host_memory)?;
    crate::memory::check_device(&estimate, env.local_rank)?;
    let weights = LayerWeights::random(&cfg, shape.seed);
    let data = RankData::generate(&cfg, shape.seed);
    let inputs = data.inputs(cfg.tokens);
    let ov = RouteOverrides::default();
    let me = env.rank;
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); cfg.world];
    rows[me] = sample_rows(cfg.tokens, shape.check_tokens);
    let tol = reference::tolerance(cfg.dtype);
    let check = |out: &[f32]| -> Result<f64> {
        if rows[me].is_empty() {
            // --check-tokens 0: not checked, but the outputs must be finite.
            crate::layer::all_finite(&[out.to_vec()])?;
            return Ok(0.0);
        }
        let mut outs: Vec<Vec<f32>> = vec![Vec::new(); cfg.world];
        outs[me] = out.to_vec();
        let err = crate::layer::check_rows(&plan, &weights, &inputs, &ov, &outs, &rows)?;
        if err > tol {
            return Err(Error::input(
                "output",
                format!(
                    "rank {me}: max relative error {err:.3e} exceeds the tolerance {tol:.0e}: \
                     not timing a wrong result"
                ),
            ));
        }
        Ok(err)
    };
    let run: RankRun = gpu_backend::nvshmem_rank(
        env,
        &plan,
        &weights,
        &inputs[me],
        &ov,
        (shape.warmup, shape.iters),
        &check,
    )?;
    let report = rank_report(&cfg, preset, memory, tol, shape.check_tokens, run)?;
    // A human-readable line for launchers that do not gather the result lines (torchrun).
    eprintln!(
        "flashmoe-bench rank {me} of {}: median {:.4} ms (p10 {:.4}, p90 {:.4}), max rel \
         error {}, dropped {} of {} pairs; {}",
        cfg.world,
        report.latency_ms.median,
        report.latency_ms.p10,
        report.latency_ms.p90,
        report
            .max_rel_error
            .map_or("not checked".to_string(), |e| format!("{e:.2e}")),
        report.dropped,
        report.pairs,
        report.world
    );
    launcher::emit_result(&report)
}

/// The report of one rank: its own latency; work, throughput and drops of the whole
/// world's launch; the roofline floor over `world` GPUs like this rank's.
fn rank_report(
    cfg: &MoeConfig,
    preset: String,
    memory: String,
    tol: f64,
    check_tokens: usize,
    run: RankRun,
) -> Result<Report> {
    let latency =
        summarize(&run.samples).ok_or_else(|| Error::input("timing", "no finite samples"))?;
    let total_tokens = (cfg.tokens * cfg.world) as u64;
    let work = LayerWork::new(cfg, total_tokens, &run.kept_per_expert);
    let secs = latency.median / 1e3;
    let world_peaks = run.peaks.map(|p| Peaks {
        flops: p.flops * cfg.world as f64,
        bytes_per_s: p.bytes_per_s * cfg.world as f64,
    });
    Ok(Report {
        preset,
        config: describe(cfg, &run.plan),
        backend: run.backend,
        world: run.world,
        memory,
        latency_ms: latency,
        tokens_per_s: total_tokens as f64 / secs,
        flops_per_s: work.flops / secs,
        bytes_per_s: work.bytes / secs,
        roofline_fraction: world_peaks.map(|p| work.floor_seconds(p.flops, p.bytes_per_s) / secs),
        work,
        peaks: run.peaks,
        max_rel_error: (check_tokens > 0).then_some(run.max_rel_error),
        tolerance: tol,
        checked_tokens: check_tokens.min(cfg.tokens),
        dropped: run.dropped,
        pairs: total_tokens * cfg.top_k as u64,
        wire: None,
        tiles: run.plan.tile_mode.name().to_string(),
        tiles_compare: Vec::new(),
        phases: None,
        tasks_expected: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::HashMap;

    fn shape(args: &[&str]) -> ShapeArgs {
        let mut argv = vec!["flashmoe-bench", "layer"];
        argv.extend_from_slice(args);
        match crate::args::Cli::parse_from(argv).command {
            crate::args::Command::Layer(a) => a.shape,
            other => panic!("not a layer command: {other:?}"),
        }
    }

    fn env(rank: usize, world: usize) -> WorldEnv {
        let map: HashMap<String, String> = [
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", "29500".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        WorldEnv::from_map(&map).unwrap()
    }

    #[test]
    fn no_rank_variables_means_single_process() {
        assert!(world_env_from(|_| None).unwrap().is_none());
        // Unrelated variables do not switch rank mode on.
        let only_master = |k: &str| (k == "MASTER_ADDR").then(|| "127.0.0.1".to_string());
        assert!(world_env_from(only_master).unwrap().is_none());
    }

    #[test]
    fn a_half_set_environment_is_a_typed_error() {
        let rank_only = |k: &str| (k == "RANK").then(|| "1".to_string());
        assert!(matches!(
            world_env_from(rank_only),
            Err(Error::Env {
                var: "WORLD_SIZE",
                ..
            })
        ));
        let no_master = |k: &str| match k {
            "RANK" | "LOCAL_RANK" => Some("0".to_string()),
            "WORLD_SIZE" => Some("2".to_string()),
            _ => None,
        };
        assert!(matches!(
            world_env_from(no_master),
            Err(Error::Env {
                var: "MASTER_PORT",
                ..
            })
        ));
        let bad_rank = |k: &str| match k {
            "RANK" => Some("2".to_string()),
            "WORLD_SIZE" => Some("2".to_string()),
            _ => None,
        };
        assert!(matches!(
            world_env_from(bad_rank),
            Err(Error::Env { var: "RANK", .. })
        ));
    }

    #[test]
    fn a_full_environment_is_rank_mode() {
        let e = env(1, 2);
        let vars: HashMap<String, String> = e
            .to_vars()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let got = world_env_from(|k| vars.get(k).cloned()).unwrap().unwrap();
        assert_eq!((got.rank, got.world_size), (1, 2));
    }

    #[test]
    fn flashmoe_master_port_replaces_master_port_and_is_required_under_torchrun() {
        let base = |k: &str| match k {
            "RANK" | "LOCAL_RANK" => Some("0".to_string()),
            "WORLD_SIZE" => Some("2".to_string()),
            "MASTER_ADDR" => Some("127.0.0.1".to_string()),
            "MASTER_PORT" => Some("29500".to_string()),
            _ => None,
        };
        assert_eq!(world_env_from(base).unwrap().unwrap().master_port, 29500);
        let own = |k: &str| match k {
            FLASHMOE_MASTER_PORT => Some("29611".to_string()),
            _ => base(k),
        };
        let e = world_env_from(own).unwrap().unwrap();
        assert_eq!((e.master_port, e.master.port()), (29611, 29611));
        let torchrun = |k: &str| match k {
            "TORCHELASTIC_USE_AGENT_STORE" => Some("True".to_string()),
            _ => base(k),
        };
        assert!(matches!(
            world_env_from(torchrun),
            Err(Error::Env {
                var: FLASHMOE_MASTER_PORT,
                ..
            })
        ));
        let torchrun_own = |k: &str| match k {
            "TORCHELASTIC_USE_AGENT_STORE" => Some("True".to_string()),
            _ => own(k),
        };
        assert_eq!(
            world_env_from(torchrun_own).unwrap().unwrap().master_port,
            29611
        );
        let bad = |k: &str| match k {
            FLASHMOE_MASTER_PORT => Some("0".to_string()),
            _ => base(k),
        };
        assert!(matches!(
            world_env_from(bad),
            Err(Error::Env {
                var: FLASHMOE_MASTER_PORT,
                ..
            })
        ));
    }

    #[test]
    fn cpu_backend_is_refused_naming_the_rank() {
        let err = rank_config(&shape(&["--backend", "cpu"]), &env(1, 2)).unwrap_err();
        match &err {
            Error::InvalidConfig { field, limit, .. } => {
                assert_eq!(*field, "backend");
                assert!(limit.contains("rank 1 of 2"), "{limit}");
                assert!(limit.contains("--world 2"), "{limit}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_world_comes_from_the_environment() {
        for args in [
            &["--preset", "tiny"][..],
            &["--preset", "tiny", "--world", "4"],
        ] {
            let (_, cfg) = rank_config(&shape(args), &env(3, 4)).unwrap();
            assert_eq!(cfg.world, 4);
        }
        for bad in ["2", "emulated:4"] {
            let err = rank_config(&shape(&["--preset", "tiny", "--world", bad]), &env(0, 4));
            assert!(
                matches!(err, Err(Error::InvalidConfig { field: "world", .. })),
                "--world {bad}: {err:?}"
            );
        }
    }
}
