//! [`NvshmemLayer`]: one rank of a multi-process world, one GPU per process, the layer's
//! symmetric heap in NVSHMEM's symmetric region.
//!
//! Creation is collective (every rank calls [`NvshmemLayer::new`] with the same plan): the
//! heap comes from [`NvshmemWorld::alloc_heap`] (with send cells when some peer is reached
//! by RDMA only: [`NvshmemWorld::needs_staging`]), the peers table holds `nvshmem_ptr` of
//! every rank's heap (0 for RDMA peers, which the NVSHMEM kernel reaches by put-with-signal
//! from the send cells), and the kernel is the NVSHMEM build's entry point from the module
//! the world loaded and registered (`nvshmemx_cumodule_init`). The launch runs this rank
//! only (`launch_ranks = 1`, `rank = my PE`), with the weights of this rank's experts.
//!
//! Launches, epochs, status words and the device watchdog are those of [`MoeLayer`]. What
//! differs is recovery: after an error, ranks may stand at different epochs and peers may
//! still be writing into this heap, so no rank resets alone. [`NvshmemLayer::status`] and
//! [`NvshmemLayer::forward_host`] share every rank's outcome over the world's TCP
//! rendezvous; when any rank failed, all reset together between two NVSHMEM barriers and
//! every rank returns an error (its own, else the first failing rank's as
//! [`Error::RankFailed`]).
//!
//! Status: compiled only; no GPU (and no NVSHMEM runtime) has run it. tests/gpu_nvshmem.rs
//! is the check to run on a GPU machine.

use super::{ExternalHeap, GpuOptions, GpuWorld, LayerStats, MoeLayer, RankIo};
use crate::config::Dtype;
use crate::error::{Error, Result};
use crate::plan::LayerPlan;
use crate::reference::{LayerOutput, RankInput, RouteOverrides};
use crate::weights::LayerWeights;
use crate::world::{NvshmemWorld, PeerReport, SymmetricHeap};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// Name of the NVSHMEM build of the layer kernel (`kernel/flashmoe_nvshmem.cu`) for
/// [`kernels::cubin`](crate::gpu::kernels::cubin).
pub const NVSHMEM_CUBIN: &str = "flashmoe_nvshmem";

/// Name of the NVSHMEM build's entry point for `dtype`.
pub fn nvshmem_entry_point(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "flashmoe_layer_nvshmem_bf16",
        Dtype::F16 => "flashmoe_layer_nvshmem_f16",
        Dtype::F32 => "flashmoe_layer_nvshmem_f32",
    }
}

/// Longest error text one rank shares with the others.
const MAX_SHARED_ERROR: usize = 4096;

/// The plan a world needs: `plan` itself, or the same config planned with send cells when
/// some peer is reached by RDMA only.
pub(crate) fn plan_for(plan: LayerPlan, needs_staging: bool) -> Result<LayerPlan> {
    if needs_staging && !plan.staging {
        Ok(LayerPlan::with_staging(&plan.config, true)?.with_tile_mode(plan.tile_mode))
    } else {
        Ok(plan)
    }
}

/// What this rank tells the others about a step: empty when it succeeded, else `!` and
/// the error text (bounded).
fn outcome_bytes<T>(local: &Result<T>) -> Vec<u8> {
    match local {
        Ok(_) => Vec::new(),
        Err(e) => {
            let mut text = format!("!{e}").into_bytes();
            text.truncate(MAX_SHARED_ERROR);
            text
        }
    }
}

/// The first rank whose contribution reports a failure, with its text.
fn first_failure(all: &[Vec<u8>]) -> Option<(usize, String)> {
    all.iter()
        .enumerate()
        .find(|(_, m)| !m.is_empty())
        .map(|(rank, m)| (rank, String::from_utf8_lossy(&m[1..]).into_owned()))
}

/// This rank's result of a step once every rank's outcome is known: its own error first,
/// else the first failing rank's as [`Error::RankFailed`].
fn combine<T>(local: Result<T>, all: &[Vec<u8>], step: &str) -> Result<T> {
    let value = local?;
    match first_failure(all) {
        None => Ok(value),
        Some((rank, text)) => Err(Error::RankFailed {
            rank,
            reason: format!("{step}: {text}"),
            stderr_tail: String::new(),
        }),
    }
}

/// Shares the outcome of a step that every rank of `world` takes (collective): returns
/// this rank's value when every rank succeeded, else this rank's own error, else
/// [`Error::RankFailed`] naming the first failing rank. So no rank goes on to a collective
/// call that a failed rank will never make.
pub fn agree<T>(world: &mut NvshmemWorld, step: &str, local: Result<T>) -> Result<T> {
    let all = world.rendezvous().all_gather(&outcome_bytes(&local))?;
    combine(local, &all, step)
}

/// One rank's MoE layer in an NVSHMEM world: the heap is NVSHMEM's symmetric allocation,
/// the peers table `nvshmem_ptr` of every rank's heap (0 for RDMA peers), the kernel the
/// NVSHMEM build registered by the world, and the launch runs this rank only. Launches,
/// epochs and status words are those of [`MoeLayer`]; recovery after an error is
/// collective ([`NvshmemLayer::status`]). Not `Send`: it lives on the thread of its
/// [`NvshmemWorld`].
pub struct NvshmemLayer {
    // Drop order: the layer first (it waits for its last launch), then the heap (whose
    // collective free needs every rank to drop its layers in the same order).
    layer: MoeLayer,
    heap: SymmetricHeap,
    report: PeerReport,
}

impl std::fmt::Debug for NvshmemLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvshmemLayer")
            .field("layer", &self.layer)
            .field("heap", &self.heap)
            .field("report", &self.report)
            .finish()
    }
}

impl NvshmemLayer {
    /// Creates this rank's layer on `stream` (which must belong to the world's GPU).
    /// Collective: every rank calls it with the same plan and weights, and all succeed or
    /// all fail (a rank that fails locally makes the others fail with
    /// [`Error::RankFailed`] instead of waiting for it). `plan` is replanned with send
    /// cells when the world needs staging. Only this rank's experts are uploaded.
    pub fn new(
        world: &mut NvshmemWorld,
        stream: Arc<CudaStream>,
        plan: LayerPlan,
        weights: &LayerWeights,
        opts: GpuOptions,
    ) -> Result<Self> {
        let gpu_world = GpuWorld::Nvshmem {
            rank: world.rank(),
            world: world.world(),
        };
        let checked = (|| -> Result<(LayerPlan, cudarc::driver::CudaFunction)> {
            let plan = plan_for(plan, world.needs_staging())?;
            gpu_world.check(&plan)?;
            weights.validate(&plan.config)?;
            if stream.context().ordinal() != world.context().ordinal() {
                return Err(Error::input(
                    "stream",
                    format!(
                        "on GPU {}, the NVSHMEM world of rank {} uses GPU {}",
                        stream.context().ordinal(),
                        world.rank(),
                        world.context().ordinal()
                    ),
                ));
            }
            let module = world.module().ok_or_else(|| {
                Error::NoKernels("the NVSHMEM world has no registered kernel module".into())
            })?;
            let entry = nvshmem_entry_point(plan.config.dtype);
            let func = module
                .load_function(entry)
                .map_err(|e| Error::Cuda(format!("kernel `{entry}` in the NVSHMEM module: {e}")))?;
            Ok((plan, func))
        })();
        let (plan, func) = agree(world, "checking the layer", checked)?;

        // Collective: every rank passed the checks above.
        let heap = world.alloc_heap(&plan)?;
        let external = ExternalHeap {
            ptr: heap.ptr(),
            bytes: heap.bytes(),
            peers: heap.peers().to_vec(),
            func,
        };
        let built = MoeLayer::build(stream, plan, weights, gpu_world, opts, Some(external), None);
        // On failure the heap drops here, on every rank (a collective free, same order).
        let layer = agree(world, "creating the layer", built)?;
        Ok(NvshmemLayer {
            layer,
            heap,
            report: world.report().clone(),
        })
    }

    /// The layer (plan, grid, memory figure, epoch, ...). Its status and resets are the
    /// local ones; use this type's collective methods to recover from errors.
    pub fn layer(&self) -> &MoeLayer {
        &self.layer
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.report.rank
    }

    /// Which peers this rank reaches by P2P and which by RDMA, as decided at start-up.
    pub fn peer_report(&self) -> &PeerReport {
        &self.report
    }

    /// The symmetric heap (this rank's address and every peer's as seen from here).
    pub fn heap(&self) -> &SymmetricHeap {
        &self.heap
    }

    /// The number of launches this rank has completed (its workspace epoch).
    pub fn epoch(&self) -> Result<u64> {
        self.layer.epoch(self.rank())
    }

    /// Launches this rank's part of the layer over the caller's buffers, asynchronously.
    /// Every rank must launch for any to finish (the kernel's watchdog bounds the wait).
    /// Follow with [`NvshmemLayer::status`] on every rank.
    ///
    /// # Safety
    /// As [`MoeLayer::forward`] for this rank's `io`.
    pub unsafe fn forward(&mut self, io: &RankIo, stream: &CudaStream) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.layer.forward(std::slice::from_ref(io), stream) }
    }

    /// Waits for this rank's launch and shares the outcome with every rank (collective).
    /// When any rank failed, every rank resets (heap and workspace) together and returns
    /// an error: its own, else [`Error::RankFailed`] naming the first failing rank.
    pub fn status(&mut self, world: &mut NvshmemWorld) -> Result<LayerStats> {
        let local = self.layer.status();
        self.settle(world, "the layer launch", local)
    }

    /// One forward of this rank over host data (collective: every rank calls it with its
    /// own tokens). Returns this rank's output and gate (one entry each); errors as
    /// [`NvshmemLayer::status`].
    pub fn forward_host(
        &mut self,
        world: &mut NvshmemWorld,
        input: &RankInput,
        ov: &RouteOverrides,
    ) -> Result<LayerOutput> {
        let local = self.layer.forward_host(std::slice::from_ref(input), ov);
        self.settle(world, "the layer forward", local)
    }

    /// Times `iters` launches of this rank after `warmup` (collective), as
    /// [`MoeLayer::time_launches`]; the ranks start together (NVSHMEM barrier). Each rank's
    /// time includes its waits for its peers.
    pub fn time_launches(
        &mut self,
        world: &mut NvshmemWorld,
        input: &RankInput,
        ov: &RouteOverrides,
        warmup: usize,
        iters: usize,
        graph: bool,
    ) -> Result<Vec<f64>> {
        world.barrier()?;
        let local = self
            .layer
            .time_launches(std::slice::from_ref(input), ov, warmup, iters, graph);
        self.settle(world, "the timed launches", local)
    }

    /// Zeroes every rank's heap and workspace (collective): all ranks stop at a barrier
    /// (which also completes outstanding puts), reset, and meet again before any may
    /// launch.
    pub fn reset(&mut self, world: &mut NvshmemWorld) -> Result<()> {
        world.barrier()?;
        let local = self.layer.reset();
        world.barrier()?;
        local
    }

    /// Shares `local`'s outcome; resets every rank together when any failed.
    fn settle<T>(&mut self, world: &mut NvshmemWorld, step: &str, local: Result<T>) -> Result<T> {
        // A transport failure here leaves the ranks unable to agree: no collective reset is
        // attempted (it could wait forever); the world is unusable.
        let all = world.rendezvous().all_gather(&outcome_bytes(&local))?;
        if first_failure(&all).is_some() {
            self.reset(world)?;
        }
        combine(local, &all, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MoeConfig;

    #[test]
    fn entry_points_name_their_dtype_and_differ_from_the_p2p_build() {
        for d in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let e = nvshmem_entry_point(d);
            assert!(e.starts_with("flashmoe_layer_nvshmem_"), "{e}");
            assert!(e.ends_with(d.name()), "{e} for {d:?}");
            assert_ne!(e, crate::params::entry_point(d));
        }
    }

    #[test]
    fn embedded_nvshmem_cubin_has_every_entry_point() {
        // Without nvcc or the NVSHMEM device library the cubin is not built: nothing to see.
        let Ok(bytes) = crate::gpu::kernels::cubin(NVSHMEM_CUBIN) else {
            return;
        };
        for d in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let name = nvshmem_entry_point(d).as_bytes();
            assert!(
                bytes.windows(name.len()).any(|w| w == name),
                "cubin `{NVSHMEM_CUBIN}` lacks `{}`",
                nvshmem_entry_point(d)
            );
        }
    }

    #[test]
    fn staging_is_added_only_when_needed() {
        let mut cfg = MoeConfig::new(64, 128, 128, 16, 2);
        cfg.world = 2;
        let p = LayerPlan::new(&cfg).unwrap();
        assert!(!p.staging);
        let same = plan_for(p.clone(), false).unwrap();
        assert!(!same.staging);
        assert_eq!(same.heap.bytes, p.heap.bytes);
        let staged = plan_for(p.clone(), true).unwrap();
        assert!(staged.staging);
        assert!(staged.heap.bytes > p.heap.bytes);
        // Already staged: kept as is.
        let again = plan_for(staged.clone(), true).unwrap();
        assert_eq!(again.heap.bytes, staged.heap.bytes);
    }

    #[test]
    fn outcomes_name_the_first_failing_rank() {
        let ok: Result<u32> = Ok(7);
        let bad: Result<u32> = Err(Error::input("x", "broken on rank 2"));
        let all = vec![
            outcome_bytes(&ok),
            outcome_bytes(&ok),
            outcome_bytes(&bad),
            outcome_bytes(&bad),
        ];
        assert!(all[0].is_empty() && all[2][0] == b'!');
        // A healthy rank gets the first failing rank's error.
        match combine(Ok(7u32), &all, "the layer launch") {
            Err(Error::RankFailed { rank, reason, .. }) => {
                assert_eq!(rank, 2);
                assert!(reason.starts_with("the layer launch: "), "{reason}");
                assert!(reason.contains("broken on rank 2"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // A failing rank keeps its own error.
        let own = combine(Err::<u32, _>(Error::input("y", "mine")), &all, "s");
        assert!(matches!(own, Err(Error::InvalidInput { field: "y", .. })));
        // Nobody failed.
        let fine = vec![Vec::new(); 3];
        assert_eq!(combine(Ok(5u32), &fine, "s").unwrap(), 5);
    }

    #[test]
    fn shared_error_text_is_bounded() {
        let long: Result<()> = Err(Error::input("x", "e".repeat(3 * MAX_SHARED_ERROR)));
        assert_eq!(outcome_bytes(&long).len(), MAX_SHARED_ERROR);
    }

    #[test]
    fn nvshmem_world_checks_rank_and_size_against_the_plan() {
        let mut cfg = MoeConfig::new(64, 128, 128, 16, 2);
        cfg.world = 4;
        let p = LayerPlan::new(&cfg).unwrap();
        let w = GpuWorld::Nvshmem { rank: 3, world: 4 };
        assert!(w.check(&p).is_ok());
        assert_eq!(
            (w.ranks(), w.world_size(), w.launch_ranks()),
            (1, 4, vec![3])
        );
        assert!(matches!(
            GpuWorld::Nvshmem { rank: 4, world: 4 }.check(&p),
            Err(Error::InvalidConfig {
                field: "GpuWorld::Nvshmem.rank",
                ..
            })
        ));
        assert!(matches!(
            GpuWorld::Nvshmem { rank: 0, world: 2 }.check(&p),
            Err(Error::InvalidConfig { field: "world", .. })
        ));
    }
}
