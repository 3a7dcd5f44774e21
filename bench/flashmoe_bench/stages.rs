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

/// The backend the checks run on.
fn runner(
    gpu: bool,
    plan: &LayerPlan,
    w: &LayerWeights,
    world: WorldArg,
) -> Result<(Box<dyn StageRunner>, String)> {
    if !gpu {
        let exec = CpuExecutor::new(plan.clone(), Arc::new(w.clone()))?;
        return Ok((Box::new(exec), "cpu executor".into()));
    }
    gpu_runner(plan, w, world)
}

fn gpu_runner(
    plan: &LayerPlan,
    w: &LayerWeights,
    world: WorldArg,
) -> Result<(Box<dyn StageRunner>, String)> {
    use cudarc::driver::CudaContext;
    use flashmoe::gpu::layer::{GpuOptions, GpuWorld, MoeLayer};
    let gpu_world = match world.ranks() {
        1 => GpuWorld::Single,
        ranks => GpuWorld::Emulated { ranks },
    };
    let ctx = CudaContext::new(0).map_err(|e| Error::Cuda(e.to_string()))?;
    let name = ctx.name().map_err(|e| Error::Cuda(e.to_string()))?;
    let stream = ctx.new_stream().map_err(|e| Error::Cuda(e.to_string()))?;
    let layer = MoeLayer::new(stream, plan.clone(), w, gpu_world, GpuOptions::default())?;
    let g = layer.grid();
    let what = format!(
        "gpu {name} ({gpu_world:?}, {} x {} blocks)",
        g.ranks, g.blocks_per_rank
    );
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
    let plan = LayerPlan::new(&cfg)?;
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
    let inputs: Vec<RankInput> = xs
        .iter()
        .zip(&tokens)
        .map(|(x, &tokens)| RankInput {
            x,
            tokens,
            routing: None,
        })
        .collect();
    let ov = RouteOverrides::default();
    let case = Case {
        plan: &plan,
        weights: &w,
        inputs: &inputs,
        ov: &ov,
    };
    let (mut backend, what) = runner(gpu, &plan, &w, shape.world)?;
    println!(
        "stages: {name} ({} tokens/rank, hidden {}, intermediate {}, {} experts, top-{}, {:?}), world {}, on {what}",
        cfg.tokens, cfg.hidden, cfg.intermediate, cfg.experts, cfg.top_k, cfg.dtype, cfg.world
    );
    let plant = a.plant.as_deref().map(|s| {
        Stage::from_name(s)
            .ok_or_else(|| Error::config("plant", s, "gate, dispatch, gemm0, gemm1 or combine"))
    });
    let (reports, err) = match plant.transpose()? {
        Some(stage) => {
            let mut p = PlantingRunner {
                inner: backend.as_mut(),
                plan: &plan,
                stage,
                planted: None,
            };
            let res = stages::run(&mut p, &case);
            if let Some(pl) = p.planted {
                println!("planted: {pl:?}");
            }
            res
        }
        None => stages::run(backend.as_mut(), &case),
    };
    for r in &reports {
        println!("stage {r}");
    }
    if let Some(e) = err {
        let at = Stage::ALL.get(reports.len()).map_or("?", |s| s.name());
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
            println!("stages: pass ({} stages)", reports.len());
            Ok(true)
        }
    }
}
