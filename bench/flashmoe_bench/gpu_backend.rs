//! The GPU runner of `flashmoe-bench`: one `MoeLayer` (single or emulated world), timed
//! with device events around each launch (inputs staged once), peaks from the roofline.

use crate::args::WorldArg;
use crate::backend::Runner;
use crate::report::Peaks;
use cudarc::driver::CudaContext;
use flashmoe::gpu::layer::{GpuOptions, GpuWorld, MoeLayer};
use flashmoe::gpu::model::{GpuModel, GpuModelOptions};
use flashmoe::gpu::roofline::{self, RooflineOptions};
use flashmoe::model::ModelLayer;
use flashmoe::reference::{LayerOutput, RankInput, RouteOverrides};
use flashmoe::weights::LayerWeights;
use flashmoe::{Error, LayerPlan, Result};

struct Gpu {
    layer: MoeLayer,
    name: String,
}

/// Builds the GPU runner on device 0.
pub fn runner(
    plan: &LayerPlan,
    weights: &LayerWeights,
    world: WorldArg,
) -> Result<Box<dyn Runner>> {
    let gpu_world = match world.ranks() {
        1 => GpuWorld::Single,
        ranks => GpuWorld::Emulated { ranks },
    };
    let ctx = CudaContext::new(0).map_err(|e| Error::Cuda(e.to_string()))?;
    let name = ctx.name().map_err(|e| Error::Cuda(e.to_string()))?;
    let stream = ctx.new_stream().map_err(|e| Error::Cuda(e.to_string()))?;
    let opts = GpuOptions {
        print_memory: true,
        ..GpuOptions::default()
    };
    let layer = MoeLayer::new(stream, plan.clone(), weights, gpu_world, opts)?;
    let g = layer.grid();
    let name = format!(
        "gpu {name} ({:?}, {} x {} blocks of {} threads)",
        gpu_world, g.ranks, g.blocks_per_rank, g.threads
    );
    Ok(Box::new(Gpu { layer, name }))
}

impl Runner for Gpu {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn run(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput> {
        self.layer.forward_host(inputs, ov)
    }

    fn time(
        &mut self,
        inputs: &[RankInput],
        ov: &RouteOverrides,
        warmup: usize,
        iters: usize,
    ) -> Result<Vec<f64>> {
        self.layer.time_launches(inputs, ov, warmup, iters, true)
    }

    fn peaks(&mut self) -> Result<Option<Peaks>> {
        let r = roofline::measure(self.layer.stream(), RooflineOptions::default())?;
        Ok(Some(Peaks {
            flops: r.flops_per_s,
            bytes_per_s: r.bytes_per_s,
        }))
    }
}

/// A model whose every layer runs on GPU 0 as one [`GpuModel`]: norm, layer launch and
/// residual add of every layer enqueued on one stream with no host synchronisation between
/// layers (single-rank world, or emulated when the layers' world is larger).
pub fn model(layers: Vec<ModelLayer>) -> Result<GpuModel> {
    let ctx = CudaContext::new(0).map_err(|e| Error::Cuda(e.to_string()))?;
    let stream = ctx.new_stream().map_err(|e| Error::Cuda(e.to_string()))?;
    GpuModel::new(stream, layers, GpuModelOptions::default())
}
