//! `flashmoe-bench`: checks and times flashmoe MoE layers and models.
//!
//! Every benchmark checks its output against the f64 reference before it is timed, and
//! refuses to time a wrong result.

mod args;
mod backend;
mod gpu_backend;
mod layer;
mod memory;
mod model;
mod model_driver;
mod nproc;
mod plan_cmd;
mod rank;
mod report;
mod stages;
mod stats;

use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;

fn probe() -> flashmoe::Result<()> {
    use flashmoe::gpu::{kernels, probe};
    if kernels::built_with_kernels() {
        println!(
            "kernels: {} for {}",
            kernels::names().join(", "),
            kernels::arch().unwrap_or("?")
        );
        for (name, why) in kernels::skipped() {
            println!("kernels: {name} not built: {why}");
        }
    } else if let Err(e) = kernels::cubin(backend::LAYER_KERNEL) {
        println!("kernels: {e}");
    }
    match probe::probe() {
        Ok(gpus) => {
            for g in gpus {
                println!(
                    "gpu {}: {}, {} SMs, {:.1} GiB, sm_{}{}, driver CUDA {}.{}",
                    g.ordinal,
                    g.name,
                    g.sms,
                    g.memory_bytes as f64 / (1u64 << 30) as f64,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.driver_version.0,
                    g.driver_version.1
                );
            }
        }
        Err(e) => println!("gpu: {e}"),
    }
    Ok(())
}

/// `flashmoe-bench layer` in this process (single GPU, emulated world, or CPU threads).
fn single_layer(a: &args::LayerArgs) -> flashmoe::Result<()> {
    layer::run(a).map(|r| {
        if a.shape.json {
            match serde_json::to_string(&r) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("flashmoe-bench: cannot encode the report: {e}"),
            }
        } else {
            r.print_table();
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Layer(a) if a.nproc.is_some() => nproc::run(a),
        Command::Layer(a) => match rank::world_env() {
            // One rank of a multi-process world (started by --nproc, torchrun, srun, ...).
            Ok(Some(env)) => rank::run(a, &env),
            Ok(None) => single_layer(a),
            Err(e) => Err(e),
        },
        Command::Model(a) => model::run(a),
        Command::Plan(a) => plan_cmd::run(a),
        Command::Stages(a) => match stages::run(a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Probe => probe(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flashmoe-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
