//! The backends a benchmark can run on, behind one trait.

use crate::args::{Backend, WorldArg};
use crate::report::Peaks;
use flashmoe::cpu::CpuExecutor;
use flashmoe::reference::{LayerOutput, RankInput, RouteOverrides};
use flashmoe::weights::LayerWeights;
use flashmoe::{Error, LayerPlan, Result};
use std::time::Instant;

/// The cubin of the persistent layer kernel (`kernel/flashmoe.cu`).
pub const LAYER_KERNEL: &str = "flashmoe";

/// A way of running one layer.
pub trait Runner {
    /// Backend and device, for the report.
    fn describe(&self) -> String;
    /// One forward whose output is returned (used for the check).
    fn run(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput>;
    /// `warmup` untimed then `iters` timed forwards; milliseconds per forward.
    fn time(
        &mut self,
        inputs: &[RankInput],
        ov: &RouteOverrides,
        warmup: usize,
        iters: usize,
    ) -> Result<Vec<f64>>;
    /// The device's peaks measured now, if this backend has a roofline.
    fn peaks(&mut self) -> Result<Option<Peaks>>;
    /// Switches the tile rule of the next launches; false when this backend cannot (its
    /// tiles are fixed by the plan it was built with).
    fn set_tile_mode(&mut self, _mode: flashmoe::plan::TileMode) -> bool {
        false
    }
    /// Where the last launch's time went, from device timestamps (GPU only).
    fn phases(&mut self) -> Result<Option<flashmoe::gpu::layer::PhaseSplit>> {
        Ok(None)
    }
}

/// Whether the run goes to the GPU; `--backend gpu` without a usable GPU is an error.
pub fn wants_gpu(backend: Backend, world: WorldArg) -> Result<bool> {
    let usable = || -> Result<()> {
        flashmoe::gpu::kernels::cubin(LAYER_KERNEL)?;
        flashmoe::gpu::probe::probe().map(|_| ())
    };
    match backend {
        Backend::Cpu => Ok(false),
        Backend::Gpu => {
            usable()?;
            if let WorldArg::Ranks(r) = world {
                if r > 1 {
                    return Err(Error::config(
                        "world",
                        r,
                        "on one GPU use emulated:R; real multi-GPU worlds run under --nproc",
                    ));
                }
            }
            Ok(true)
        }
        Backend::Auto => Ok(usable().is_ok() && !matches!(world, WorldArg::Ranks(r) if r > 1)),
    }
}

struct Cpu {
    exec: CpuExecutor,
    ranks: usize,
}

/// The CPU executor (one thread per rank), its routed experts packed one at a time as
/// `expert` produces them, the rest from `gate`.
pub fn cpu_runner_parts(
    plan: &LayerPlan,
    gate: &LayerWeights,
    expert: &flashmoe::reference::ExpertSource,
) -> Result<Box<dyn Runner>> {
    Ok(Box::new(Cpu {
        exec: CpuExecutor::from_parts(plan.clone(), gate, expert)?,
        ranks: plan.world(),
    }))
}

impl Runner for Cpu {
    fn describe(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "cpu executor ({} rank(s), {} thread(s) on {cores} core(s))",
            self.ranks,
            self.exec.threads()
        )
    }

    fn run(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput> {
        self.exec.forward(inputs, ov)
    }

    fn time(
        &mut self,
        inputs: &[RankInput],
        ov: &RouteOverrides,
        warmup: usize,
        iters: usize,
    ) -> Result<Vec<f64>> {
        for _ in 0..warmup {
            self.exec.forward(inputs, ov)?;
        }
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = Instant::now();
            self.exec.forward(inputs, ov)?;
            samples.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(samples)
    }

    fn peaks(&mut self) -> Result<Option<Peaks>> {
        Ok(None)
    }
}

/// The GPU kernel (single or emulated world).
pub fn gpu_runner(
    plan: &LayerPlan,
    weights: &LayerWeights,
    world: WorldArg,
) -> Result<Box<dyn Runner>> {
    crate::gpu_backend::runner(plan, weights, world)
}
