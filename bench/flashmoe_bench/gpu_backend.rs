//! The GPU runner of `flashmoe-bench`: one `MoeLayer` (single or emulated world), timed
//! with device events around each launch (inputs staged once), peaks from the roofline;
//! and one rank of an NVSHMEM world ([`nvshmem_rank`]).

use crate::args::WorldArg;
use crate::backend::Runner;
use crate::report::Peaks;
use cudarc::driver::CudaContext;
use flashmoe::gpu::kernels;
use flashmoe::gpu::layer::{
    agree, nvshmem_entry_point, GpuOptions, GpuWorld, MoeLayer, NvshmemLayer, NVSHMEM_CUBIN,
};
use flashmoe::gpu::model::{GpuModel, GpuModelOptions};
use flashmoe::gpu::roofline::{self, RooflineOptions};
use flashmoe::model::ModelLayer;
use flashmoe::reference::{GateOutput, LayerOutput, RankInput, RouteOverrides};
use flashmoe::weights::LayerWeights;
use flashmoe::world::{BootstrapOptions, NvshmemOptions, NvshmemWorld, WorldEnv};
use flashmoe::{Error, LayerPlan, Result};

struct Gpu {
    layer: MoeLayer,
    name: String,
}

/// A [`MoeLayer`] on device 0 (single GPU, or `world` emulated ranks in one launch) with
/// `opts`, and a description of the device and grid for reports.
pub fn layer_on_gpu0(
    plan: &LayerPlan,
    weights: &LayerWeights,
    world: WorldArg,
    opts: GpuOptions,
) -> Result<(MoeLayer, String)> {
    let gpu_world = match world.ranks() {
        1 => GpuWorld::Single,
        ranks => GpuWorld::Emulated { ranks },
    };
    let ctx = CudaContext::new(0).map_err(|e| Error::Cuda(e.to_string()))?;
    let name = ctx.name().map_err(|e| Error::Cuda(e.to_string()))?;
    let stream = ctx.new_stream().map_err(|e| Error::Cuda(e.to_string()))?;
    let layer = MoeLayer::new(stream, plan.clone(), weights, gpu_world, opts)?;
    let g = layer.grid();
    let name = format!(
        "gpu {name} ({:?}, {} x {} blocks of {} threads)",
        gpu_world, g.ranks, g.blocks_per_rank, g.threads
    );
    Ok((layer, name))
}

/// Builds the GPU runner on device 0.
pub fn runner(
    plan: &LayerPlan,
    weights: &LayerWeights,
    world: WorldArg,
) -> Result<Box<dyn Runner>> {
    let opts = GpuOptions {
        print_memory: true,
        ..GpuOptions::default()
    };
    let (layer, name) = layer_on_gpu0(plan, weights, world, opts)?;
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

    fn set_tile_mode(&mut self, mode: flashmoe::plan::TileMode) -> bool {
        self.layer.set_tile_mode(mode);
        true
    }

    fn phases(&mut self) -> Result<Option<flashmoe::gpu::layer::PhaseSplit>> {
        self.layer.phases().map(Some)
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
/// `tiles` is the tile rule of every layer.
pub fn model(layers: Vec<ModelLayer>, tiles: flashmoe::plan::TileMode) -> Result<GpuModel> {
    let ctx = CudaContext::new(0).map_err(|e| Error::Cuda(e.to_string()))?;
    let stream = ctx.new_stream().map_err(|e| Error::Cuda(e.to_string()))?;
    let opts = GpuModelOptions {
        tiles,
        ..GpuModelOptions::default()
    };
    GpuModel::new(stream, layers, opts)
}

/// What one rank of an NVSHMEM world measured.
pub struct RankRun {
    /// The plan the layer ran (with send cells when some peer is reached by RDMA).
    pub plan: LayerPlan,
    /// Backend and device.
    pub backend: String,
    /// The world as this rank saw it (size, P2P and RDMA peers).
    pub world: String,
    /// This rank's milliseconds per launch.
    pub samples: Vec<f64>,
    /// This rank's GPU's peaks.
    pub peaks: Option<Peaks>,
    /// Rows kept per expert over every rank (the checked launch).
    pub kept_per_expert: Vec<u64>,
    /// Dropped pairs over every rank (the checked launch).
    pub dropped: u64,
    /// This rank's error against the reference.
    pub max_rel_error: f64,
}

/// Rows kept per expert by this rank's gate.
fn kept_by(experts: usize, gate: &GateOutput) -> Vec<u64> {
    let mut kept = vec![0u64; experts];
    for (&id, &slot) in gate.ids.iter().zip(&gate.slots) {
        if slot >= 0 {
            if let Some(k) = kept.get_mut(id as usize) {
                *k += 1;
            }
        }
    }
    kept
}

/// Runs this process's rank of an NVSHMEM world on GPU `LOCAL_RANK`: joins the world,
/// creates the layer, runs one forward whose output `check` accepts (every rank must),
/// times `warmup` + `iters` launches, and measures this GPU's peaks. Every step that can
/// fail on one rank is agreed on, so all ranks fail together with the failing rank named.
pub fn nvshmem_rank(
    env: &WorldEnv,
    plan: &LayerPlan,
    weights: &LayerWeights,
    input: &RankInput,
    ov: &RouteOverrides,
    (warmup, iters): (usize, usize),
    check: &dyn Fn(&[f32]) -> Result<f64>,
) -> Result<RankRun> {
    let dtype = plan.config.dtype;
    let cubin = kernels::cubin(NVSHMEM_CUBIN)?;
    let opts = NvshmemOptions {
        bootstrap: BootstrapOptions::from_env(env),
        library: None,
        report: true,
    };
    let mut world = NvshmemWorld::init(env, cubin, nvshmem_entry_point(dtype), &opts)?;
    let ctx = world.context().clone();
    let stream = agree(
        &mut world,
        "creating a stream",
        ctx.new_stream().map_err(|e| Error::Cuda(e.to_string())),
    )?;
    let gpu_opts = GpuOptions {
        print_memory: true,
        ..GpuOptions::default()
    };
    // Declared after the world: dropped first (waits for its launch, frees the heap).
    let mut layer = NvshmemLayer::new(&mut world, stream, plan.clone(), weights, gpu_opts)?;
    let first = layer.forward_host(&mut world, input, ov)?;
    let out = first
        .out
        .first()
        .ok_or_else(|| Error::input("output", "the layer returned no rank output"))?;
    let max_rel_error = agree(&mut world, "checking the output", check(out))?;
    let samples = layer.time_launches(&mut world, input, ov, warmup, iters, false)?;
    let measured = roofline::measure(layer.layer().stream(), RooflineOptions::default());
    let r = agree(&mut world, "measuring the roofline", measured)?;

    // The whole world's kept rows and drops, for the work of one launch.
    let experts = plan.config.experts;
    let gate = first
        .gates
        .first()
        .ok_or_else(|| Error::input("output", "the layer returned no gate"))?;
    let mut mine: Vec<u8> = kept_by(experts, gate)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    mine.extend(gate.dropped.to_le_bytes());
    let all = world.rendezvous().all_gather(&mine)?;
    let (mut kept, mut dropped) = (vec![0u64; experts], 0u64);
    for (rank, bytes) in all.iter().enumerate() {
        if bytes.len() != 8 * (experts + 1) {
            return Err(Error::Bootstrap(format!(
                "rank {rank} sent {} bytes of counts, expected {}",
                bytes.len(),
                8 * (experts + 1)
            )));
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        for (k, w) in kept.iter_mut().zip(&words) {
            *k += w;
        }
        dropped += words[experts];
    }

    let name = ctx.name().map_err(|e| Error::Cuda(e.to_string()))?;
    let g = layer.layer().grid();
    let report = layer.peer_report();
    Ok(RankRun {
        plan: layer.layer().plan().clone(),
        backend: format!(
            "gpu {name} (NVSHMEM rank {} on GPU {}, {} x {} blocks of {} threads)",
            env.rank, env.local_rank, g.ranks, g.blocks_per_rank, g.threads
        ),
        world: format!(
            "nvshmem: {} rank(s), rank {}: P2P peers {:?}, RDMA peers {:?}",
            env.world_size, env.rank, report.p2p, report.rdma
        ),
        samples,
        peaks: Some(Peaks {
            flops: r.flops_per_s,
            bytes_per_s: r.bytes_per_s,
        }),
        kept_per_expert: kept,
        dropped,
        max_rel_error,
    })
}
