//! [`MoeLayer`]: one MoE layer on one GPU, as one cooperative launch of the persistent
//! kernel per forward.
//!
//! Creation does everything once: it shows the memory the plan needs before allocating,
//! uploads the weights in the layer dtype (each rank its own experts, packed
//! `[local][...]`), allocates and zeroes every rank's symmetric heap and workspace, builds
//! the peers and expert-owner tables, and sizes the grid from the occupancy query. A
//! forward is then a single launch with no allocation, no copy and no reset: signals
//! carry the epoch that the kernel itself advances, so launches (and CUDA-graph replays)
//! follow each other directly.
//!
//! Worlds on one GPU: [`GpuWorld::Single`] is one rank; [`GpuWorld::Emulated`] runs R ranks
//! as R block groups of the same launch, each with its own heap and workspace, talking only
//! through the peers table and signals exactly as separate GPUs would. Across GPUs and
//! processes, [`GpuWorld::Nvshmem`] is one rank per process, created with
//! [`NvshmemLayer::new`] from an initialised [`NvshmemWorld`](crate::world::NvshmemWorld).
//!
//! Status: written and compiled on a machine without a GPU; tests/gpu_layer.rs is the
//! check to run on one (it skips where there is none).
//!
//! # Engine-facing use
//!
//! An engine that owns its CUDA context, buffers and stream (candle, mistral.rs, ...)
//! passes raw device pointers; nothing is copied:
//!
//! ```no_run
//! use flashmoe::gpu::layer::{GpuOptions, GpuWorld, MoeLayer, RankIo};
//! use flashmoe::{LayerPlan, LayerWeights, MoeConfig};
//! use std::sync::Arc;
//!
//! # fn main() -> flashmoe::Result<()> {
//! # let (x_ptr, out_ptr, raw_stream): (u64, u64, cudarc::driver::sys::CUstream) = (0, 0, std::ptr::null_mut());
//! let cfg = MoeConfig::new(128, 1024, 512, 64, 8);
//! let plan = LayerPlan::new(&cfg)?;
//! let weights = LayerWeights::random(&cfg, 0);
//! let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| flashmoe::Error::Cuda(e.to_string()))?;
//! // The engine's own stream, borrowed (not destroyed when dropped).
//! // SAFETY: `raw_stream` belongs to `ctx` and outlives `stream`.
//! let stream = unsafe { ctx.wrap_borrowed_stream(raw_stream) };
//! let mut layer = MoeLayer::new(stream.clone(), plan, &weights, GpuWorld::Single, GpuOptions::default())?;
//! // x_ptr / out_ptr: bf16 [tokens][hidden] device buffers of the engine.
//! let io = [RankIo { x: x_ptr, out: out_ptr, tokens: 100, routing: None }];
//! // SAFETY: the pointers address 100 x 1024 bf16 values each in this context, and stay
//! // alive until the launch has finished.
//! unsafe { layer.forward(&io, &stream)? };     // asynchronous
//! let stats = layer.status()?;                  // waits; typed errors on timeout/device faults
//! println!("dropped {} pairs", stats.total_dropped());
//! # Ok(()) }
//! ```

mod backend;
pub(crate) mod device_buffers;
mod epoch;
mod grid;
mod host_io;
mod nvshmem;
pub(crate) mod pack;
mod phases;
mod scratch;
mod stages;
mod status;

pub use grid::{blocks_per_rank, GridShape, Residency};
pub use nvshmem::{agree, nvshmem_entry_point, NvshmemLayer, NVSHMEM_CUBIN};
pub use pack::{from_dtype_bytes, pack_rank_experts, to_dtype_bytes, PackedExperts};
pub use phases::PhaseSplit;
pub use scratch::Scratch;
pub use status::{
    describe_wait, is_consequence, wait_budget, LayerStats, StatusContext, STATUS_WORDS,
};

use crate::config::{Dtype, MoeConfig};
use crate::error::{Error, Result};
use crate::gpu::kernels;
use crate::params::{
    entry_point, expert_owner_table, smem_bytes, KernelParams, LayerParams, RankParams,
    BLOCK_THREADS, MAX_LAUNCH_RANKS, MIN_BLOCKS_PER_RANK, NO_FAULT, SCOPE_GPU, SCOPE_SYSTEM,
};
use crate::plan::{LayerPlan, MemoryFigure, PHASE_MAX_BLOCKS, PHASE_WORDS, TILE_N};
use crate::weights::LayerWeights;
use cudarc::driver::{result, sys, CudaEvent, CudaFunction, CudaGraph, CudaStream};
use cudarc::nvrtc::Ptx;
use device_buffers::{cuda, DeviceBuffer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the layer kernel's cubin (`kernel/flashmoe.cu`) for [`kernels::cubin`]; the
/// entry point per dtype is [`entry_point`].
pub const CUBIN: &str = "flashmoe";

/// Which ranks one [`MoeLayer`] runs on its GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuWorld {
    /// One rank (the plan's world must be 1).
    Single,
    /// `ranks` ranks (2..=8) as block groups of one launch on one GPU (the plan's world
    /// must equal `ranks`).
    Emulated {
        /// Number of emulated ranks.
        ranks: usize,
    },
    /// Rank `rank` of an NVSHMEM world of `world` processes, one GPU each (the plan's world
    /// must equal `world`). The launch runs this rank only; create it with
    /// [`NvshmemLayer::new`].
    Nvshmem {
        /// This process's rank (NVSHMEM PE).
        rank: usize,
        /// Number of ranks (PEs).
        world: usize,
    },
}

impl GpuWorld {
    /// Ranks in the launch (block groups of one launch on this GPU).
    pub fn ranks(self) -> usize {
        match self {
            GpuWorld::Single | GpuWorld::Nvshmem { .. } => 1,
            GpuWorld::Emulated { ranks } => ranks,
        }
    }

    /// Ranks in the whole world (the plan's world).
    pub fn world_size(self) -> usize {
        match self {
            GpuWorld::Single => 1,
            GpuWorld::Emulated { ranks } => ranks,
            GpuWorld::Nvshmem { world, .. } => world,
        }
    }

    /// The world rank each block group of the launch plays, in group order.
    pub fn launch_ranks(self) -> Vec<usize> {
        match self {
            GpuWorld::Single => vec![0],
            GpuWorld::Emulated { ranks } => (0..ranks).collect(),
            GpuWorld::Nvshmem { rank, .. } => vec![rank],
        }
    }

    /// Checks the world against the plan and the kernel's limit.
    pub fn check(self, plan: &LayerPlan) -> Result<()> {
        match self {
            GpuWorld::Emulated { ranks } if !(2..=MAX_LAUNCH_RANKS).contains(&ranks) => {
                return Err(Error::config(
                    "GpuWorld::Emulated.ranks",
                    ranks,
                    format!("between 2 and {MAX_LAUNCH_RANKS} (FM_MAX_LAUNCH_RANKS)"),
                ));
            }
            GpuWorld::Nvshmem { rank, world } if rank >= world => {
                return Err(Error::config(
                    "GpuWorld::Nvshmem.rank",
                    rank,
                    format!("below the world size {world}"),
                ));
            }
            _ => {}
        }
        if plan.world() != self.world_size() {
            return Err(Error::config(
                "world",
                plan.world(),
                format!("must equal the {} rank(s) of {self:?}", self.world_size()),
            ));
        }
        Ok(())
    }
}

/// A symmetric heap allocated outside the layer (NVSHMEM), with the peers table and the
/// kernel of the module registered with NVSHMEM.
struct ExternalHeap {
    /// Device address of this rank's heap.
    ptr: u64,
    /// Its size in bytes.
    bytes: usize,
    /// Address of every rank's heap as seen from this GPU, 0 for peers reached by RDMA.
    peers: Vec<u64>,
    /// The NVSHMEM build's entry point for the layer dtype.
    func: CudaFunction,
}

/// Options of a [`MoeLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuOptions {
    /// Deadline of every wait inside the kernel; on expiry the kernel reports
    /// [`Error::Timeout`] instead of hanging.
    pub timeout: Duration,
    /// How long [`MoeLayer::status`] waits for the launch on the host before giving up
    /// (a safety net should the device watchdog itself fail). Default: 4 x `timeout` + 10 s.
    pub host_timeout: Option<Duration>,
    /// Blocks per rank group; `None` uses every co-resident block.
    pub blocks_per_rank: Option<usize>,
    /// Print the memory figure to stderr before allocating.
    pub print_memory: bool,
    /// Test hook: this rank sends no signal, so its peers must time out.
    pub fault_silent_rank: Option<usize>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            timeout: Duration::from_secs(5),
            host_timeout: None,
            blocks_per_rank: None,
            print_memory: false,
            fault_silent_rank: None,
        }
    }
}

/// Routing given by the caller on the device ([`Router::Given`]): `i32 [tokens][top_k]`
/// expert ids and `f32 [tokens][top_k]` weights, rows of the config's `top_k`; with a
/// top-k override the first `k` choices of each row are used, verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRouting {
    /// Device address of the ids.
    pub ids: u64,
    /// Device address of the weights.
    pub weights: u64,
}

/// One rank's device buffers for a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankIo {
    /// Device address of the input, dtype `[tokens][hidden]`.
    pub x: u64,
    /// Device address of the output, dtype `[tokens][hidden]`.
    pub out: u64,
    /// Tokens this rank brings (at most the config's `tokens`).
    pub tokens: usize,
    /// The caller's routing (required with [`Router::Given`], refused otherwise).
    pub routing: Option<DeviceRouting>,
}

/// Device memory of one rank.
#[derive(Debug)]
struct RankBuffers {
    heap: DeviceBuffer,
    workspace: DeviceBuffer,
    peers: DeviceBuffer,
    w0: DeviceBuffer,
    w1: DeviceBuffer,
    /// Expert biases (gpt-oss), f32, when any local expert has them.
    b0: Option<DeviceBuffer>,
    b1: Option<DeviceBuffer>,
    /// Token buffers used by [`MoeLayer::forward_host`].
    x: DeviceBuffer,
    out: DeviceBuffer,
    given_ids: Option<DeviceBuffer>,
    given_weights: Option<DeviceBuffer>,
}

/// Device tables every rank of the launch reads.
#[derive(Debug)]
struct Tables {
    expert_owner: DeviceBuffer,
    router: DeviceBuffer,
    router_bias: Option<DeviceBuffer>,
    logit_bias: DeviceBuffer,
    shared_w0: Option<DeviceBuffer>,
    shared_w1: Option<DeviceBuffer>,
    shared_gate: Option<DeviceBuffer>,
}

/// A captured launch and the stream it replays on.
struct LayerGraph {
    graph: CudaGraph,
    stream: Arc<CudaStream>,
}

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised
// (CUDA driver API, "Graph object thread safety"); it is only reached through
// `&mut MoeLayer` (capture, replay) or dropped with it, and `LayerGraph` is not `Sync`.
unsafe impl Send for LayerGraph {}

/// One MoE layer resident on one GPU. See the [module docs](self).
pub struct MoeLayer {
    // Fields drop in this order: the graph and the event first, then the device memory,
    // then the kernel module, the stream last (after `Drop` has waited for the launch).
    graph: Option<LayerGraph>,
    done: CudaEvent,
    ranks: Vec<RankBuffers>,
    /// Per launch rank, the launch's transient rows: the layer's own, or one shared with
    /// the other layers of a GPU model ([`Scratch`]).
    scratch: Arc<Scratch>,
    tables: Tables,
    func: CudaFunction,
    stream: Arc<CudaStream>,
    plan: LayerPlan,
    world: GpuWorld,
    opts: GpuOptions,
    grid: GridShape,
    memory: Vec<MemoryFigure>,
    params: KernelParams,
    top_k: usize,
    logit_bias_on: bool,
    /// The heap belongs to an NVSHMEM world: resets after an error are collective (done by
    /// [`NvshmemLayer`]), never local.
    external_heap: bool,
    /// Launches since the last reset (the epoch tags are 32 bits).
    epochs: epoch::EpochGuard,
}

impl Drop for MoeLayer {
    fn drop(&mut self) {
        // The memory must outlive the last launch; a hung launch is bounded by the host
        // deadline, and an error here cannot be reported from Drop.
        let _ = self.wait_done();
    }
}

impl std::fmt::Debug for MoeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeLayer")
            .field("world", &self.world)
            .field("grid", &self.grid)
            .field("top_k", &self.top_k)
            .field("graph", &self.graph.is_some())
            .finish_non_exhaustive()
    }
}

/// The router weights `[experts][hidden]` followed by zero rows up to a multiple of
/// `TILE_N` experts: the kernel's router tiles read whole 64-expert tiles (params.h).
fn padded_router(cfg: &MoeConfig, router: &[f32]) -> Vec<f32> {
    let rows = cfg.experts.div_ceil(TILE_N) * TILE_N;
    let mut padded = router.to_vec();
    padded.resize(rows * cfg.hidden, 0.0);
    padded
}

/// The memory every rank of `world` allocates for `plan`, known before anything is
/// allocated.
pub fn memory_required(plan: &LayerPlan, world: GpuWorld) -> Vec<MemoryFigure> {
    world
        .launch_ranks()
        .into_iter()
        .map(|r| plan.memory(r))
        .collect()
}

fn bytes_of_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl MoeLayer {
    /// Creates the layer on `stream`'s device: see the [module docs](self). Errors:
    /// [`Error::NoKernels`] without kernels, [`Error::NoGpu`] for a device that cannot run
    /// them or cooperative launches, [`Error::InvalidConfig`] for a world or grid that
    /// cannot fit, [`Error::PlanTooLarge`] when the memory does not fit, [`Error::Cuda`].
    /// [`GpuWorld::Nvshmem`] layers are created with [`NvshmemLayer::new`] instead.
    pub fn new(
        stream: Arc<CudaStream>,
        plan: LayerPlan,
        weights: &LayerWeights,
        world: GpuWorld,
        opts: GpuOptions,
    ) -> Result<Self> {
        Self::with_scratch(stream, plan, weights, world, opts, None)
    }

    /// [`MoeLayer::new`], over `scratch` when given: a [`Scratch`] shared with other
    /// layers (e.g. every MoE layer of a model), so that their transient rows take the
    /// memory of one layer, not one each. Layers sharing a scratch must never have
    /// launches in flight at the same time: run them in order on one stream (a condition
    /// of [`MoeLayer::forward`]; the GPU model does so). Errors as [`MoeLayer::new`], and
    /// [`Error::InvalidConfig`] when the scratch serves another number of ranks or is
    /// smaller than the plan's.
    pub fn with_scratch(
        stream: Arc<CudaStream>,
        plan: LayerPlan,
        weights: &LayerWeights,
        world: GpuWorld,
        opts: GpuOptions,
        scratch: Option<Arc<Scratch>>,
    ) -> Result<Self> {
        if let GpuWorld::Nvshmem { .. } = world {
            return Err(Error::config(
                "world",
                format!("{world:?}"),
                "NVSHMEM layers need the world's symmetric heap: use NvshmemLayer::new",
            ));
        }
        Self::build(stream, plan, weights, world, opts, None, scratch)
    }

    /// [`MoeLayer::new`] with, for NVSHMEM, the heap, peers and kernel of the world, and
    /// optionally a shared scratch.
    fn build(
        stream: Arc<CudaStream>,
        plan: LayerPlan,
        weights: &LayerWeights,
        world: GpuWorld,
        opts: GpuOptions,
        external: Option<ExternalHeap>,
        shared_scratch: Option<Arc<Scratch>>,
    ) -> Result<Self> {
        world.check(&plan)?;
        let cfg = plan.config.clone();
        weights.validate(&cfg)?;
        let biased = |e: &crate::weights::ExpertWeights| !e.b0.is_empty() || !e.b1.is_empty();
        if weights.shared.iter().any(biased) {
            return Err(Error::input(
                "weights.shared.b0",
                "shared-expert biases are not implemented by the GPU kernel (CPU executor only)",
            ));
        }
        if let Some(r) = opts.fault_silent_rank {
            if r >= world.world_size() {
                return Err(Error::config(
                    "GpuOptions::fault_silent_rank",
                    r,
                    format!("a rank < {}", world.world_size()),
                ));
            }
        }
        if let Some(ext) = &external {
            if (ext.bytes as u64) < plan.heap.bytes || ext.peers.len() != plan.world() {
                return Err(Error::config(
                    "symmetric heap",
                    format!("{} bytes, {} peers", ext.bytes, ext.peers.len()),
                    format!(
                        "at least {} bytes and {} peers (the plan's)",
                        plan.heap.bytes,
                        plan.world()
                    ),
                ));
            }
        }
        let launch_ranks = world.launch_ranks();
        if let Some(s) = &shared_scratch {
            s.check(&plan, launch_ranks.len())?;
        }
        let timeout_ns = u64::try_from(opts.timeout.as_nanos()).unwrap_or(u64::MAX);
        if timeout_ns == 0 {
            return Err(Error::config("GpuOptions::timeout", "0", "must be > 0"));
        }

        // Memory figure first, before any allocation.
        let memory = memory_required(&plan, world);
        let mut need: u64 = memory.iter().map(MemoryFigure::total).sum();
        if external.is_some() {
            // The symmetric heap is already allocated (NVSHMEM's reserved region).
            need = need.saturating_sub(plan.heap.bytes);
        }
        if shared_scratch.is_some() {
            // Already allocated, by the model that shares it.
            let own: u64 = memory.iter().map(|m| m.scratch).sum();
            need = need.saturating_sub(own);
        }
        if opts.print_memory {
            for (r, m) in launch_ranks.iter().zip(&memory) {
                eprintln!("flashmoe: rank {r}: {m}");
            }
        }

        let ctx = stream.context().clone();
        ctx.bind_to_thread().map_err(cuda("bind context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda("compute capability"))?;
        kernels::check_device((major.max(0) as u32, minor.max(0) as u32))?;
        let coop = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)
            .map_err(cuda("device attribute"))?;
        if coop == 0 {
            return Err(Error::NoGpu(
                "the device does not support cooperative launches".into(),
            ));
        }
        let (free, _total) = ctx.mem_get_info().map_err(cuda("memory info"))?;
        if need > free as u64 {
            return Err(Error::PlanTooLarge {
                what: format!(
                    "the layer needs {:.1} MiB on the device ({} rank(s)), {:.1} MiB are free",
                    need as f64 / 1048576.0,
                    world.ranks(),
                    free as f64 / 1048576.0
                ),
            });
        }

        // Kernel and grid.
        let (func, external) = match external {
            Some(ext) => (ext.func.clone(), Some(ext)),
            None => {
                let image = kernels::cubin(CUBIN)?;
                let module = ctx
                    .load_module(Ptx::from_binary(image.to_vec()))
                    .map_err(cuda("load kernel module"))?;
                let func = module
                    .load_function(entry_point(cfg.dtype))
                    .map_err(cuda("find kernel entry point"))?;
                (func, None)
            }
        };
        let smem = smem_bytes(cfg.dtype);
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(cuda("set dynamic shared memory"))?;
        // Ask for the carveout that holds BLOCKS_PER_SM blocks (bf16/f16: the largest, 228
        // KiB on Hopper) rather than rely on the driver's choice, so that the occupancy
        // below is what the cooperative launch gets; the rest stays L1.
        let attr = |a| ctx.attribute(a).map_err(cuda("device attribute"));
        let sm_shared = attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
        )?;
        let reserved =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK)?;
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            grid::carveout_percent(
                smem,
                reserved.max(0) as u32,
                grid::BLOCKS_PER_SM,
                sm_shared.max(0) as u32,
            ),
        )
        .map_err(cuda("set the shared-memory carveout"))?;
        let per_sm = func
            .occupancy_max_active_blocks_per_multiprocessor(BLOCK_THREADS, smem as usize, None)
            .map_err(cuda("occupancy query"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda("device attribute"))?;
        let residency = Residency {
            blocks_per_sm: per_sm as usize,
            sms: sms.max(0) as usize,
            min_blocks_per_rank: MIN_BLOCKS_PER_RANK as usize,
        };
        let bpr = blocks_per_rank(residency, world.ranks(), opts.blocks_per_rank)?;
        let grid = GridShape {
            ranks: world.ranks() as u32,
            blocks_per_rank: u32::try_from(bpr)
                .map_err(|_| Error::config("GpuOptions::blocks_per_rank", bpr, "fits in u32"))?,
            threads: BLOCK_THREADS,
            smem_bytes: smem,
        };

        // Tables shared by all ranks.
        let dtype = cfg.dtype;
        let owner_bytes: Vec<u8> = expert_owner_table(&plan)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let tables = Tables {
            expert_owner: DeviceBuffer::from_bytes(&stream, &owner_bytes, "expert_owner")?,
            router: DeviceBuffer::from_bytes(
                &stream,
                &to_dtype_bytes(
                    if cfg.router_f32 { Dtype::F32 } else { dtype },
                    &padded_router(&cfg, &weights.router),
                ),
                "router weights",
            )?,
            router_bias: if cfg.router.has_bias() {
                Some(DeviceBuffer::from_bytes(
                    &stream,
                    &bytes_of_f32(&weights.router_bias),
                    "router bias",
                )?)
            } else {
                None
            },
            logit_bias: DeviceBuffer::zeroed(&stream, 4 * cfg.experts, "logit bias")?,
            shared_w0: weights
                .shared
                .as_ref()
                .map(|s| {
                    DeviceBuffer::from_bytes(&stream, &to_dtype_bytes(dtype, &s.w0), "shared w0")
                })
                .transpose()?,
            shared_w1: weights
                .shared
                .as_ref()
                .map(|s| {
                    DeviceBuffer::from_bytes(&stream, &to_dtype_bytes(dtype, &s.w1), "shared w1")
                })
                .transpose()?,
            shared_gate: weights
                .shared_gate
                .as_ref()
                .map(|g| {
                    DeviceBuffer::from_bytes(&stream, &to_dtype_bytes(dtype, g), "shared gate")
                })
                .transpose()?,
        };

        // Per-rank memory.
        let token_bytes = cfg.tokens * cfg.hidden * dtype.size();
        let pairs = cfg.tokens * cfg.top_k;
        let given = cfg.router.takes_ids();
        let mut ranks = Vec::with_capacity(world.ranks());
        for &r in &launch_ranks {
            let packed = pack_rank_experts(&plan, weights, r);
            let heap = match &external {
                // SAFETY: the symmetric heap lives as long as the `NvshmemLayer` that owns
                // both it and this layer (which drops first, after waiting for its launch);
                // its size was checked against the plan above.
                Some(ext) => unsafe { DeviceBuffer::borrowed(ctx.clone(), ext.ptr, ext.bytes) },
                None => DeviceBuffer::zeroed(&stream, plan.heap.bytes as usize, "heap")?,
            };
            ranks.push(RankBuffers {
                heap,
                workspace: DeviceBuffer::zeroed(
                    &stream,
                    plan.workspace.bytes as usize,
                    "workspace",
                )?,
                peers: DeviceBuffer::zeroed(&stream, 8 * world.world_size(), "peers table")?,
                w0: DeviceBuffer::from_bytes(&stream, &packed.w0, "expert w0")?,
                w1: DeviceBuffer::from_bytes(&stream, &packed.w1, "expert w1")?,
                b0: (!packed.b0.is_empty())
                    .then(|| DeviceBuffer::from_bytes(&stream, &packed.b0, "expert b0"))
                    .transpose()?,
                b1: (!packed.b1.is_empty())
                    .then(|| DeviceBuffer::from_bytes(&stream, &packed.b1, "expert b1"))
                    .transpose()?,
                x: DeviceBuffer::zeroed(&stream, token_bytes, "tokens in")?,
                out: DeviceBuffer::zeroed(&stream, token_bytes, "tokens out")?,
                given_ids: given
                    .then(|| DeviceBuffer::zeroed(&stream, 4 * pairs, "given ids"))
                    .transpose()?,
                given_weights: given
                    .then(|| DeviceBuffer::zeroed(&stream, 4 * pairs, "given weights"))
                    .transpose()?,
            });
        }
        // Every rank of one GPU reaches every peer heap by direct stores; NVSHMEM peers
        // through `nvshmem_ptr` (0: by RDMA, staged and put by the NVSHMEM kernel).
        let heaps: Vec<u8> = match &external {
            Some(ext) => ext.peers.iter().flat_map(|p| p.to_le_bytes()).collect(),
            None => ranks
                .iter()
                .flat_map(|rb| rb.heap.ptr().to_le_bytes())
                .collect(),
        };
        for rb in &ranks {
            rb.peers.upload(&stream, 0, &heaps, "peers table")?;
        }
        stream.synchronize().map_err(cuda("initial zeroing"))?;

        let mut layer_params = LayerParams::from_plan(&plan, timeout_ns);
        layer_params.expert_owner = tables.expert_owner.ptr();
        layer_params.router_weight = tables.router.ptr();
        layer_params.router_bias = tables.router_bias.as_ref().map_or(0, DeviceBuffer::ptr);
        layer_params.logit_bias = 0;
        layer_params.fault_silent_rank = opts.fault_silent_rank.map_or(NO_FAULT, |r| r as u32);
        // Every heap of a single or emulated world is on this GPU: gpu-scope fences and
        // acquires order everything; NVSHMEM peers may be other GPUs (system scope).
        layer_params.peer_scope = if external.is_some() {
            SCOPE_SYSTEM
        } else {
            SCOPE_GPU
        };
        let scratch = match shared_scratch {
            Some(s) => s,
            None => Scratch::new(&stream, launch_ranks.len(), plan.workspace.scratch_bytes)?,
        };
        let mut params = KernelParams {
            layer: layer_params,
            launch_ranks: world.ranks() as u32,
            ..KernelParams::default()
        };
        for (g, (rb, &r)) in ranks.iter().zip(&launch_ranks).enumerate() {
            params.rank[g] = RankParams {
                rank: r as u32,
                tokens: 0,
                local_experts: plan.local_experts.get(r).map_or(0, Vec::len) as u32,
                heap: rb.heap.ptr(),
                peers: rb.peers.ptr(),
                workspace: rb.workspace.ptr(),
                scratch: scratch.rank(g).map_or(0, DeviceBuffer::ptr),
                w0: rb.w0.ptr(),
                w1: rb.w1.ptr(),
                b0: rb.b0.as_ref().map_or(0, DeviceBuffer::ptr),
                b1: rb.b1.as_ref().map_or(0, DeviceBuffer::ptr),
                shared_w0: tables.shared_w0.as_ref().map_or(0, DeviceBuffer::ptr),
                shared_w1: tables.shared_w1.as_ref().map_or(0, DeviceBuffer::ptr),
                shared_gate: tables.shared_gate.as_ref().map_or(0, DeviceBuffer::ptr),
                ..RankParams::default()
            };
        }
        let done = ctx.new_event(None).map_err(cuda("create event"))?;
        let top_k = cfg.top_k;
        Ok(MoeLayer {
            plan,
            world,
            opts,
            stream,
            func,
            grid,
            memory,
            graph: None,
            done,
            ranks,
            scratch,
            tables,
            params,
            top_k,
            logit_bias_on: false,
            external_heap: external.is_some(),
            epochs: epoch::EpochGuard::default(),
        })
    }

    /// The world rank block group `g` of the launch plays.
    fn rank_of(&self, g: usize) -> usize {
        self.params.rank.get(g).map_or(g, |r| r.rank as usize)
    }

    /// Launch rank `g`'s scratch region.
    fn scratch_of(&self, g: usize) -> Result<&DeviceBuffer> {
        self.scratch.rank(g).ok_or_else(|| {
            Error::input(
                "rank group",
                format!("{g} >= the scratch's {} ranks", self.scratch.ranks()),
            )
        })
    }

    /// The block group of the launch that plays world rank `rank`.
    fn group_of(&self, rank: usize) -> Result<usize> {
        (0..self.ranks.len())
            .find(|&g| self.rank_of(g) == rank)
            .ok_or_else(|| {
                Error::input(
                    "rank",
                    format!(
                        "{rank} is not run by this layer (it runs {:?})",
                        self.world.launch_ranks()
                    ),
                )
            })
    }

    /// The plan.
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// The world.
    pub fn world(&self) -> GpuWorld {
        self.world
    }

    /// The launch shape chosen from the occupancy query.
    pub fn grid(&self) -> GridShape {
        self.grid
    }

    /// The memory figure of every rank (as shown before allocation).
    pub fn memory(&self) -> &[MemoryFigure] {
        &self.memory
    }

    /// The layer's own stream (used by [`MoeLayer::forward_host`]).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The effective top-k of the next launches.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Sets the research overrides of the next launches: a smaller top-k
    /// (`1..=config.top_k`) and an additive per-expert logit bias (`experts` finite values).
    /// `None` restores the config's top-k / removes the bias. Waits for the upload.
    pub fn set_route_overrides(
        &mut self,
        top_k: Option<usize>,
        logit_bias: Option<&[f32]>,
    ) -> Result<()> {
        // One validation for every backend: the reference's.
        let k = crate::reference::RouteOverrides {
            top_k,
            logit_bias: logit_bias.map(<[f32]>::to_vec),
        }
        .effective_top_k(&self.plan.config)?;
        if let Some(b) = logit_bias {
            // Earlier launches may still read the old bias.
            self.wait_done()?;
            self.tables.logit_bias.upload(
                &self.stream,
                0,
                &bytes_of_f32(b),
                "overrides.logit_bias",
            )?;
        }
        self.top_k = k;
        self.logit_bias_on = logit_bias.is_some();
        Ok(())
    }

    fn check_io(&self, io: &[RankIo]) -> Result<()> {
        let cfg = &self.plan.config;
        if io.len() != self.world.ranks() {
            return Err(Error::input(
                "io",
                format!(
                    "{} ranks given, the world has {}",
                    io.len(),
                    self.world.ranks()
                ),
            ));
        }
        let given = cfg.router.takes_ids();
        for (r, rio) in io.iter().enumerate() {
            if rio.tokens > cfg.tokens {
                return Err(Error::input(
                    "io.tokens",
                    format!("rank {r}: {} > config tokens = {}", rio.tokens, cfg.tokens),
                ));
            }
            if rio.tokens > 0 && (rio.x == 0 || rio.out == 0) {
                return Err(Error::input("io.x/out", format!("rank {r}: null pointer")));
            }
            match (given, rio.routing) {
                (true, None) if rio.tokens > 0 => {
                    return Err(Error::input(
                        "io.routing",
                        format!("rank {r}: the Given router needs the caller's routing"),
                    ))
                }
                (true, Some(d)) if rio.tokens > 0 && (d.ids == 0 || d.weights == 0) => {
                    return Err(Error::input(
                        "io.routing",
                        format!("rank {r}: null pointer"),
                    ))
                }
                (false, Some(_)) => {
                    return Err(Error::input(
                        "io.routing",
                        format!("rank {r}: routing given but the router is {:?}", cfg.router),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The parameters of a launch over `io` (checked).
    fn launch_params(&self, io: &[RankIo]) -> Result<KernelParams> {
        self.check_io(io)?;
        let mut p = self.params;
        // layer.top_k stays the config's (row stride of given_*); route_k is this call's k.
        p.layer.route_k = self.top_k as u32;
        p.layer.logit_bias = if self.logit_bias_on {
            self.tables.logit_bias.ptr()
        } else {
            0
        };
        for (g, (rio, rb)) in io.iter().zip(&self.ranks).enumerate() {
            let rp = &mut p.rank[g];
            rp.tokens = rio.tokens as u32;
            rp.x = rio.x;
            rp.out = rio.out;
            // The kernel wants the routing pointers of the Given router even for a rank
            // with no token: the layer's own (unread) buffers stand in.
            let own = |b: &Option<DeviceBuffer>| b.as_ref().map_or(0, DeviceBuffer::ptr);
            rp.given_ids = rio.routing.map_or(own(&rb.given_ids), |d| d.ids);
            rp.given_weights = rio.routing.map_or(own(&rb.given_weights), |d| d.weights);
        }
        Ok(p)
    }

    /// Enqueues the cooperative launch on `stream`.
    fn launch_raw(&self, params: &KernelParams, stream: &CudaStream) -> Result<()> {
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda("bind context"))?;
        let mut p = *params;
        let mut args = [&mut p as *mut KernelParams as *mut std::ffi::c_void];
        // SAFETY: the kernel's one parameter is an `FmKernelParams` passed by value, which
        // `KernelParams` mirrors exactly (tests/params_layout.rs); the driver copies it
        // before returning. Every pointer in it is a live allocation of this layer or one
        // the caller vouched for in `forward`'s contract. The grid was sized from the
        // occupancy query so every block is co-resident.
        unsafe {
            result::launch_cooperative_kernel(
                self.func.cu_function(),
                (self.grid.blocks(), 1, 1),
                (self.grid.threads, 1, 1),
                self.grid.smem_bytes,
                stream.cu_stream(),
                &mut args,
            )
        }
        .map_err(cuda("cooperative launch"))
    }

    /// Launches the layer over the caller's device buffers on `stream`, asynchronously:
    /// no copy, no allocation. Call [`MoeLayer::status`] to wait and read the outcome.
    ///
    /// # Safety
    /// For every rank, `x` and `out` must address `tokens * hidden` elements of the layer
    /// dtype, and `routing` (Given router) `tokens * top_k` ids (i32) and weights (f32),
    /// all in this layer's CUDA context, live and not written by other work until the
    /// launch has finished; and no other layer sharing this layer's scratch
    /// ([`MoeLayer::with_scratch`]) may have a launch in flight until this one has
    /// finished (launch them in order on one stream).
    pub unsafe fn forward(&mut self, io: &[RankIo], stream: &CudaStream) -> Result<()> {
        self.guard_epochs()?;
        let p = self.launch_params(io)?;
        // Launches of one layer share its heaps and workspaces: order this one after the
        // previous launch even when it was issued on another stream.
        stream
            .wait(&self.done)
            .map_err(cuda("order after the previous launch"))?;
        self.launch_raw(&p, stream)?;
        self.epochs.launched();
        self.done.record(stream).map_err(cuda("record event"))
    }

    /// Resets before a launch whose 32-bit epoch tag would repeat an earlier one (see
    /// `epoch.rs`). In an NVSHMEM world the reset must be collective, so the launch is
    /// refused with an error saying so instead.
    fn guard_epochs(&self) -> Result<()> {
        if !self.epochs.needs_reset() {
            return Ok(());
        }
        if self.external_heap {
            return Err(Error::Device {
                rank: self.rank_of(0),
                stage: "setup",
                what: "the epoch tags would wrap: call NvshmemLayer::reset (collective) before the next launch"
                    .into(),
                expected: epoch::LAUNCHES_PER_RESET,
                observed: self.epochs.launches(),
            });
        }
        self.reset()
    }

    /// Waits for the last launch (with the host deadline) without reading anything. Polls
    /// the event with naps of at most 100 us, so a short launch is not made long.
    fn wait_done(&self) -> Result<()> {
        let limit = self.opts.host_timeout.unwrap_or_else(|| {
            self.opts
                .timeout
                .saturating_mul(4)
                .saturating_add(Duration::from_secs(10))
        });
        let start = Instant::now();
        let mut nap = Duration::from_micros(5);
        loop {
            if self.done.try_is_complete().map_err(cuda("launch"))? {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(Error::Timeout {
                    rank: self.rank_of(0),
                    stage: "host",
                    awaited: "completion of the launch (the device watchdog did not fire; \
                              the context is unusable)"
                        .into(),
                    expected: 1,
                    observed: 0,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_micros(100));
        }
    }

    /// Waits for the last launch and reads every rank's status words, dropped count and
    /// expert counts. A device error ([`Error::Timeout`] naming the rank, the stage and
    /// what it awaited, or [`Error::Device`]) is returned after the layer is reset
    /// ([`MoeLayer::reset`]) so that the next launch starts clean. In an NVSHMEM world the
    /// reset must be collective: this returns the error without resetting, and
    /// [`NvshmemLayer`] resets every rank together.
    pub fn status(&self) -> Result<LayerStats> {
        self.wait_done()?;
        let experts = self.plan.config.experts;
        let ws = &self.plan.workspace;
        let mut words = Vec::with_capacity(self.ranks.len());
        let mut stats = LayerStats::default();
        for rb in &self.ranks {
            let mut raw = [0u8; 8 * STATUS_WORDS];
            rb.workspace
                .download(&self.stream, ws.status as usize, &mut raw, "status words")?;
            let mut w = [0u64; STATUS_WORDS];
            for (v, b) in w.iter_mut().zip(raw.chunks_exact(8)) {
                *v = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            }
            words.push(w);
            let mut d = [0u8; 8];
            rb.workspace
                .download(&self.stream, ws.dropped as usize, &mut d, "dropped count")?;
            stats.dropped.push(u64::from_le_bytes(d));
            let mut c = vec![0u8; 4 * experts];
            rb.workspace.download(
                &self.stream,
                ws.expert_counts as usize,
                &mut c,
                "expert counts",
            )?;
            stats.expert_counts.push(
                c.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        let cx = StatusContext {
            world: self.plan.world(),
            top_k: self.plan.config.top_k,
        };
        if self.external_heap {
            // One rank per process: its status words are its own (named by world rank).
            for (g, w) in words.iter().enumerate() {
                status::decode(self.rank_of(g), w, cx)?;
            }
            return Ok(stats);
        }
        if let Err(e) = status::first_error(&words, cx) {
            self.reset()?;
            return Err(e);
        }
        Ok(stats)
    }

    /// Where the last launch's time went: every block's phase times of every rank this
    /// layer runs (device `%globaltimer`, written by the kernel at each block's exit).
    pub fn phases(&self) -> Result<PhaseSplit> {
        self.wait_done()?;
        let blocks = (self.grid.blocks_per_rank as usize).min(PHASE_MAX_BLOCKS);
        let mut raw = vec![0u8; 8 * PHASE_WORDS * blocks];
        let mut split = PhaseSplit::default();
        for rb in &self.ranks {
            rb.workspace.download(
                &self.stream,
                self.plan.workspace.phase_times as usize,
                &mut raw,
                "phase times",
            )?;
            let words: Vec<u64> = raw
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect();
            split.add_records(&words, blocks);
        }
        Ok(split)
    }

    /// Zeroes every heap and workspace (signals, epochs, status, counters), as at
    /// creation. Needed only after a device error, whose aborted launch leaves ranks at
    /// different epochs; [`MoeLayer::status`] does it itself when it reports one.
    pub fn reset(&self) -> Result<()> {
        self.wait_done()?;
        for rb in &self.ranks {
            rb.heap.zero(&self.stream, "reset heap")?;
            rb.workspace.zero(&self.stream, "reset workspace")?;
        }
        self.stream.synchronize().map_err(cuda("reset"))?;
        self.epochs.was_reset();
        Ok(())
    }

    /// The epoch (completed launches) of world rank `rank` (one this layer runs), read
    /// from its workspace.
    pub fn epoch(&self, rank: usize) -> Result<u64> {
        let rb = &self.ranks[self.group_of(rank)?];
        self.wait_done()?;
        let mut b = [0u8; 8];
        rb.workspace.download(
            &self.stream,
            self.plan.workspace.epoch as usize,
            &mut b,
            "epoch",
        )?;
        Ok(u64::from_le_bytes(b))
    }

    /// The tile rule of the next launches ([`crate::plan::TileMode`]): the A/B switch
    /// between the rule with wide tasks (auto), without them (narrow), the classic path,
    /// and auto without the early first stage of the next task (auto-serial). A captured
    /// graph keeps the mode it was captured with.
    pub fn set_tile_mode(&mut self, mode: crate::plan::TileMode) {
        self.plan.tile_mode = mode;
        self.params.layer.tile_mode = mode.code();
    }

    /// Test hook: from the next launch on, `rank` sends no signal (its peers then time
    /// out); `None` switches the fault off. A captured graph keeps the setting it was
    /// captured with.
    pub fn set_fault_silent_rank(&mut self, rank: Option<usize>) -> Result<()> {
        if let Some(r) = rank {
            if r >= self.world.world_size() {
                return Err(Error::config(
                    "GpuOptions::fault_silent_rank",
                    r,
                    format!("a rank < {}", self.world.world_size()),
                ));
            }
        }
        self.opts.fault_silent_rank = rank;
        self.params.layer.fault_silent_rank = rank.map_or(NO_FAULT, |r| r as u32);
        Ok(())
    }

    /// Diagnostic: a copy of `rank`'s whole symmetric heap after the last launch (laid out
    /// as `plan().heap` says), for tests that check where every row landed. `rank` is a
    /// world rank this layer runs.
    pub fn download_heap(&self, rank: usize) -> Result<Vec<u8>> {
        let rb = &self.ranks[self.group_of(rank)?];
        self.wait_done()?;
        let mut out = vec![0u8; self.plan.heap.bytes as usize];
        rb.heap.download(&self.stream, 0, &mut out, "heap")?;
        Ok(out)
    }

    /// Captures one launch over `io` into a CUDA graph on `stream` (replacing any earlier
    /// one). Replays ([`MoeLayer::replay`]) need no reset: the kernel advances the epoch.
    /// The graph keeps the overrides and fault setting of the moment of capture. Waits on
    /// the host for the previous launch first (a capture cannot wait on it on the device).
    ///
    /// # Safety
    /// As [`MoeLayer::forward`], for as long as the graph is replayed.
    pub unsafe fn capture_graph(&mut self, io: &[RankIo], stream: &Arc<CudaStream>) -> Result<()> {
        let p = self.launch_params(io)?;
        self.wait_done()?;
        self.graph = None;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda("begin graph capture"))?;
        let launched = self.launch_raw(&p, stream);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        launched?;
        let graph = graph.map_err(cuda("end graph capture"))?;
        let graph =
            graph.ok_or_else(|| Error::Cuda("graph capture produced an empty graph".into()))?;
        self.graph = Some(LayerGraph {
            graph,
            stream: stream.clone(),
        });
        Ok(())
    }

    /// Launches the captured graph (asynchronously, on the stream it was captured on).
    pub fn replay(&mut self) -> Result<()> {
        self.guard_epochs()?;
        let LayerGraph { graph, stream } = self
            .graph
            .as_ref()
            .ok_or_else(|| Error::input("graph", "no graph captured: call capture_graph first"))?;
        stream
            .wait(&self.done)
            .map_err(cuda("order after the previous launch"))?;
        graph.launch().map_err(cuda("graph launch"))?;
        self.epochs.launched();
        self.done.record(stream).map_err(cuda("record event"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MoeConfig;

    fn plan(world: usize) -> LayerPlan {
        let mut cfg = MoeConfig::new(64, 128, 128, 16, 2);
        cfg.world = world;
        LayerPlan::new(&cfg).unwrap()
    }

    #[test]
    fn worlds_must_match_the_plan_and_the_launch_limit() {
        assert!(GpuWorld::Single.check(&plan(1)).is_ok());
        assert!(GpuWorld::Emulated { ranks: 4 }.check(&plan(4)).is_ok());
        assert!(GpuWorld::Emulated { ranks: 8 }.check(&plan(8)).is_ok());
        for (w, p) in [(GpuWorld::Single, 2), (GpuWorld::Emulated { ranks: 2 }, 4)] {
            assert!(matches!(
                w.check(&plan(p)),
                Err(Error::InvalidConfig { field: "world", .. })
            ));
        }
        for ranks in [0, 1, 9, 16] {
            assert!(matches!(
                GpuWorld::Emulated { ranks }.check(&plan(ranks.max(1))),
                Err(Error::InvalidConfig {
                    field: "GpuWorld::Emulated.ranks",
                    ..
                })
            ));
        }
        assert_eq!(GpuWorld::Emulated { ranks: 3 }.ranks(), 3);
        assert_eq!(GpuWorld::Single.ranks(), 1);
    }

    #[test]
    fn memory_is_known_per_rank_before_allocation() {
        let p = plan(4);
        let m = memory_required(&p, GpuWorld::Emulated { ranks: 4 });
        assert_eq!(m.len(), 4);
        for (r, fig) in m.iter().enumerate() {
            assert_eq!(*fig, p.memory(r));
            assert_eq!(fig.heap, p.heap.bytes);
            assert!(fig.total() > fig.heap);
        }
    }

    #[test]
    fn layer_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<MoeLayer>();
    }

    #[test]
    fn embedded_layer_cubin_has_every_entry_point() {
        if !kernels::built_with_kernels() {
            return;
        }
        let bytes = kernels::cubin(CUBIN).unwrap();
        for dtype in [
            crate::config::Dtype::Bf16,
            crate::config::Dtype::F16,
            crate::config::Dtype::F32,
        ] {
            let name = entry_point(dtype).as_bytes();
            assert!(
                bytes.windows(name.len()).any(|w| w == name),
                "cubin `{CUBIN}` lacks `{}`",
                entry_point(dtype)
            );
        }
    }

    #[test]
    fn default_options_have_a_finite_deadline_and_no_fault() {
        let o = GpuOptions::default();
        assert!(o.timeout > Duration::ZERO);
        assert_eq!(o.fault_silent_rank, None);
        assert_eq!(o.blocks_per_rank, None);
    }
}
