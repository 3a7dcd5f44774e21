//! `flashmoe-bench stages`: the stage checks of one small layer (gate, dispatch, GEMM0,
//! GEMM1, combine) on the GPU kernel or on the CPU executor, one line per stage, stopping
//! at the first stage that fails (see `flashmoe::stages`).

use crate::args::{StagesArgs, WorldArg};
use crate::backend::wants_gpu;
use flashmoe::config::Router;
use flashmoe::cpu::CpuExecutor;
use flashmoe::reference::{RankInput, RouteOverrides};
use flashmoe::stages::{self, Case, PlantingRunner, Stage, StageRunner};
use flashmoe::weights::{random_tokens, LayerWeights};
use flashmoe::{Error, LayerPlan, Result};
use std::sync::Arc;
use std::time::Duration;

/// The backend the checks run on.
fn runner(
    gpu: bool,
    plan: &LayerPlan,
    w: &LayerWeights,
    world: WorldArg,
    timeout: Duration,
) -> Result<(Box<dyn StageRunner>, String)> {
    if !gpu {
        let mut exec = CpuExecutor::new(plan.clone(), Arc::new(w.clone()))?;
        exec.set_timeout(timeout);
        return Ok((Box::new(exec), "cpu executor".into()));
    }
    gpu_runner(plan, w, world, timeout)
}

/// A stage named on the command line (`what` is the option).
fn stage_arg(what: &'static str, name: Option<&str>) -> Result<Option<Stage>> {
    name.map(|s| {
        Stage::from_name(s)
            .ok_or_else(|| Error::config(what, s, "gate, dispatch, gemm0, gemm1 or combine"))
    })
    .transpose()
}

fn gpu_runner(
    plan: &LayerPlan,
    w: &LayerWeights,
    world: WorldArg,
    timeout: Duration,
) -> Result<(Box<dyn StageRunner>, String)> {
    let opts = flashmoe::gpu::layer::GpuOptions {
        timeout,
        ..Default::default()
    };
    let (layer, what) = crate::gpu_backend::layer_on_gpu0(plan, w, world, opts)?;
    Ok((Box::new(layer), what))
}

/// Runs the checks and prints one line per stage; `Ok(true)` when every stage passed.
pub fn run(a: &StagesArgs) -> Result<bool> {
    let mut shape = a.shape.clone();
    if shape.preset == "auto" {
        shape.preset = "tiny".into();
    }
    let gpu = wants_gpu(shape.backend, shape.world)?;
    let (name, cfg) = shape.config(gpu)?;
    if cfg.router == Router::Given {
        return Err(Error::config(
            "router",
            "given",
            "a router that computes its routing (the gate stage checks it)",
        ));
    }
    let plan = shape.plan(&cfg)?;
    let w = LayerWeights::random(&cfg, shape.seed);
    // Uneven token counts: rank r brings 17 r fewer tokens (cyclically), so ranks differ.
    let tokens: Vec<usize> = (0..cfg.world)
        .map(|r| cfg.tokens - (r * 17) % cfg.tokens.max(1))
        .collect();
    let xs: Vec<Vec<f32>> = tokens
        .iter()
        .enumerate()
        .map(|(r, &t)| random_tokens(&cfg, t, shape.seed + 1 + r as u64))
        .collect();
    let inputs: Vec<RankInput> = RankInput::per_rank(&xs, &tokens);
    let ov = RouteOverrides::default();
    let case = Case {
        plan: &plan,
        weights: &w,
        inputs: &inputs,
        ov: &ov,
    };
    if a.timeout_ms == 0 {
        return Err(Error::config("timeout-ms", 0, "at least 1"));
    }
    let timeout = Duration::from_millis(a.timeout_ms);
    let plant = stage_arg("plant", a.plant.as_deref())?;
    let only = stage_arg("only", a.only.as_deref())?;
    let (mut backend, what) = runner(gpu, &plan, &w, shape.world, timeout)?;
    println!(
        "stages: {name} ({} tokens/rank, hidden {}, intermediate {}, {} experts, top-{}, {:?}), world {}, on {what}",
        cfg.tokens, cfg.hidden, cfg.intermediate, cfg.experts, cfg.top_k, cfg.dtype, cfg.world
    );
    let runs: &[Stage] = match &only {
        Some(s) => std::slice::from_ref(s),
        None => &Stage::ALL,
    };
    let (reports, err) = match plant {
        Some(stage) => {
            let mut p = PlantingRunner {
                inner: backend.as_mut(),
                plan: &plan,
                stage,
                planted: None,
            };
            let res = stages::run_stages(&mut p, &case, runs);
            if let Some(pl) = p.planted {
                println!("planted: {pl:?}");
            }
            res
        }
        None => stages::run_stages(backend.as_mut(), &case, runs),
    };
    for r in &reports {
        println!("stage {r}");
    }
    if let Some(e) = err {
        let at = runs.get(reports.len()).map_or("?", |s| s.name());
        println!("stage {at}: ERROR {e}");
        println!("stages: FAIL at {at}");
        return Ok(false);
    }
    match reports.iter().find(|r| !r.passed()) {
        Some(r) => {
            println!("stages: FAIL at {}", r.stage);
            Ok(false)
        }
        None => {
            let n = reports.len();
            println!("stages: pass ({n} stage{})", if n == 1 { "" } else { "s" });
            Ok(true)
        }
    }
}
