//! `flashmoe-bench layer --nproc N`: starts N local ranks of this binary (one process per
//! GPU, torchrun's environment), gathers their JSON reports and prints one table. A rank's
//! failure ends the run with that rank's error; no child outlives the launcher.
//!
//! Each rank runs `flashmoe-bench layer` with the same options; it sees `RANK` etc. in its
//! environment and joins the NVSHMEM world (see `gpu_backend::nvshmem_rank`). Across nodes,
//! start the same command under any launcher that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT` (README).

use crate::args::{Backend, LayerArgs, WorldArg};
use flashmoe::world::launcher;
use flashmoe::{Error, LayerPlan, Result};

/// The command line of a child: ours without `--nproc N`, with `--json`.
pub fn child_args(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut skip = false;
    for a in argv.iter().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if a == "--nproc" {
            skip = true;
            continue;
        }
        if a.starts_with("--nproc=") || a == "--json" {
            continue;
        }
        out.push(a.clone());
    }
    out.push("--json".into());
    out
}

/// What the launcher checks before it spawns anything: the count, the backend, each
/// rank's config and memory, and that the GPUs and the NVSHMEM kernel are there (one
/// process per GPU).
pub fn preflight(args: &LayerArgs, n: usize) -> Result<()> {
    let max = flashmoe::config::MAX_WORLD;
    if n == 0 || n > max {
        return Err(Error::config("nproc", n, format!("between 1 and {max}")));
    }
    if args.shape.backend == Backend::Cpu {
        return Err(Error::config(
            "backend",
            "cpu",
            format!(
                "--nproc starts one process per GPU; the CPU executor runs all ranks as \
                 threads of one process: use `--backend cpu --world {n}` without --nproc"
            ),
        ));
    }
    let mut shape = args.shape.clone();
    shape.world = WorldArg::Ranks(n);
    let (_, cfg) = shape.config(true)?;
    let plan = LayerPlan::new(&cfg)?;
    // Every rank holds this much on this one machine.
    let mut estimate = crate::memory::rank(&plan, 0, shape.check_tokens);
    for part in &mut estimate.host {
        part.1 = part.1.saturating_mul(n as u64);
    }
    estimate.ranks = n;
    eprintln!(
        "memory estimate of the {n} local ranks: {}",
        estimate.describe()
    );
    estimate.check(&format!("{n} local ranks"), shape.max_host_memory)?;
    flashmoe::gpu::kernels::cubin(flashmoe::gpu::layer::NVSHMEM_CUBIN)?;
    let gpus = flashmoe::gpu::probe::probe()?;
    if gpus.len() < n {
        return Err(Error::config(
            "nproc",
            n,
            format!(
                "one process per GPU, and this machine has {} GPU(s)",
                gpus.len()
            ),
        ));
    }
    Ok(())
}

/// Runs the launcher side.
pub fn run(args: &LayerArgs) -> Result<()> {
    let n = args.nproc.unwrap_or(1);
    preflight(args, n)?;
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        path: "<current executable>".into(),
        source,
    })?;
    let argv: Vec<String> = std::env::args().collect();
    // The ranks' stderr (peer report, memory figure, summary line) is shown as it comes,
    // prefixed with `[rank r]`; their results come back through stdout.
    let opts = launcher::LaunchOptions {
        forward_stderr: true,
        ..launcher::LaunchOptions::default()
    };
    let reports = launcher::launch_local_with(n, &exe, &child_args(&argv), &opts)?;
    if args.shape.json {
        let all: Vec<&serde_json::Value> = reports.iter().map(|r| &r.result).collect();
        println!(
            "{}",
            serde_json::Value::from(all.into_iter().cloned().collect::<Vec<_>>())
        );
        return Ok(());
    }
    println!(
        "flashmoe-bench layer --nproc {n}: {} rank(s) reported",
        reports.len()
    );
    println!(
        "  {:>4} {:>12} {:>12} {:>12} {:>10} {:>9}",
        "rank", "median ms", "p10 ms", "p90 ms", "rel err", "dropped"
    );
    for r in &reports {
        let v = &r.result;
        let l = &v["latency_ms"];
        println!(
            "  {:>4} {:>12.4} {:>12.4} {:>12.4} {:>10.2e} {:>9}",
            r.rank,
            l["median"].as_f64().unwrap_or(f64::NAN),
            l["p10"].as_f64().unwrap_or(f64::NAN),
            l["p90"].as_f64().unwrap_or(f64::NAN),
            v["max_rel_error"].as_f64().unwrap_or(f64::NAN),
            v["dropped"]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_args_drop_nproc_and_ask_for_json() {
        let argv: Vec<String> = [
            "bench", "layer", "--nproc", "4", "--preset", "tiny", "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(child_args(&argv), ["layer", "--preset", "tiny", "--json"]);
        let argv: Vec<String> = ["bench", "layer", "--nproc=2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(child_args(&argv), ["layer", "--json"]);
    }
}
