//! The CPU executor: the layer's protocol with one thread per rank, and helper threads
//! for each rank's compute.
//!
//! It runs a [`LayerPlan`] through the same symmetric layout and protocol as the GPU
//! kernel, with threads as ranks and atomics as the interconnect:
//!
//! 1. gate (the reference router, on the tokens rounded to the dtype), slots by prefix sums;
//! 2. dispatch: each token row once to each rank its choices go to, with its metadata
//!    (pair indices and weights), the pair lists and counts (through the source's send cell
//!    when the plan stages), then one signal `(epoch << 32) | rows` per rank, 0 rows
//!    included (the protocol of [`crate::plan`]);
//! 3. experts: as dispatch signals arrive, the owner runs each local expert over its pairs
//!    task by task (a `TILE_M` row block, or two as a wide task under the plan's tile rule;
//!    `TILE_N` column tiles) into its output buffer; once a
//!    source's pairs are all done it reduces each row over its experts (weights applied),
//!    writes the partial into the source's heap and signals combine;
//! 4. combine: the source waits for every rank's combine signal and sums the partials in
//!    rank order, plus the shared experts computed on its own rows.
//!
//! Threads: one rank thread per rank runs the protocol (gate, dispatch, every wait);
//! the compute of steps 3 and 4 (expert tasks, the shared experts and the combine
//! over token chunks) is cut into units that the rank thread and its helper threads
//! share. [`CpuExecutor::set_threads`] sets the total (default: the machine's available
//! parallelism); the threads beyond one per rank are dealt out evenly as helpers. Every
//! output value is computed by one unit in a fixed order of operations, so results are
//! bit-identical whatever the thread count. Helpers are scoped threads spawned per
//! forward (tens of microseconds); with fewer threads than ranks there are none and each
//! rank thread computes alone, as before.
//!
//! Everything stored in a heap is in the layer's dtype, the activation between the GEMMs
//! too, so results match the device's rounding. Epochs advance per forward; nothing is
//! reset between calls. Every wait has a deadline ([`CpuExecutor::set_timeout`]) and ends in
//! [`Error::Timeout`] naming the rank, the stage and the signal it awaited. Protocol
//! violations (a signal with an impossible row count, an access outside a heap) are
//! reported as [`Error::Device`], as the kernel reports them through its status word.

mod act;
mod bf16;
mod gemm;
mod heap;
mod packed;
mod rank;
mod signal;
mod stages;
mod tile;
mod units;
mod work;

pub use gemm::Kernel;
pub use heap::SymHeap;
pub use packed::packing_threads;
pub use signal::word as signal_word;

use crate::error::{Error, Result};
use crate::plan::LayerPlan;
use crate::reference::{check_input, GateOutput, LayerOutput, RankInput, RouteOverrides};
use crate::weights::{ExpertWeights, LayerWeights};
use packed::PackedLayer;
use signal::{next_epoch, Stop};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default longest wait for one signal.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a layer on the CPU with one thread per rank (plus helper threads for compute).
#[derive(Debug)]
pub struct CpuExecutor {
    plan: LayerPlan,
    /// The router, its bias and the shared gate, rounded to the dtype; the expert
    /// matrices are left empty here: they live in `packed`.
    weights: Arc<LayerWeights>,
    packed: Arc<PackedLayer>,
    heaps: Vec<SymHeap>,
    epoch: u64,
    timeout: Duration,
    silent: Option<usize>,
    threads: usize,
    /// Stage checks: the stage the next forward stops after (see `stages.rs`).
    stop: Option<crate::stages::Stage>,
    /// Stage checks: per rank, the GEMM0 activations in the scratch layout (empty unless
    /// a stage check asked for them).
    act: Vec<SymHeap>,
    /// Per rank, the expert output of every pair it serves, in the scratch layout.
    y: Vec<SymHeap>,
}

/// The machine's available parallelism (1 when unknown).
/// Most threads a forward uses beyond one per rank (see [`CpuExecutor::set_threads`]).
pub const MAX_THREADS: usize = 1024;

fn default_threads() -> usize {
    crate::par::threads()
}

/// Helper threads of rank `rank` out of `threads` in all for `world` ranks: the threads
/// beyond one per rank, dealt out evenly (lower ranks take the remainder).
fn helpers_of(threads: usize, world: usize, rank: usize) -> usize {
    let extra = threads.saturating_sub(world);
    let world = world.max(1);
    extra / world + usize::from(rank < extra % world)
}

/// What the gate and the combine read of `w`: the router (kept f32 when `router_f32`, the
/// DeepSeek-V3 family) and the shared gate rounded to `dtype` (the router bias stays f32),
/// with empty expert matrices (one per expert, and one for the shared experts when
/// present), which the executor keeps packed instead.
fn gate_weights(w: &LayerWeights, dtype: crate::Dtype, router_f32: bool) -> LayerWeights {
    let r = |v: &[f32]| v.iter().map(|&x| dtype.round(x)).collect::<Vec<f32>>();
    let empty = ExpertWeights::default;
    LayerWeights {
        router: if router_f32 {
            w.router.clone()
        } else {
            r(&w.router)
        },
        router_bias: w.router_bias.clone(),
        experts: w.experts.iter().map(|_| empty()).collect(),
        shared: w.shared.as_ref().map(|_| empty()),
        shared_gate: w.shared_gate.as_deref().map(r),
    }
}

impl CpuExecutor {
    /// An executor for `plan` with `weights`, which are checked against the config.
    /// Weights are rounded to the dtype (as an upload to the device would; the router bias
    /// stays f32) and the expert matrices packed for the GEMM kernel in the dtype itself:
    /// no f32 copy of them is kept, nor `weights`. When this holds the only reference to
    /// `weights`, each expert's f32 matrices are freed as soon as they are packed.
    pub fn new(plan: LayerPlan, weights: Arc<LayerWeights>) -> Result<Self> {
        match Arc::try_unwrap(weights) {
            Ok(owned) => Self::from_owned(plan, owned),
            Err(shared) => Self::from_weights(plan, &shared),
        }
    }

    /// As [`CpuExecutor::new`], from borrowed weights (nothing of them is kept).
    pub fn from_weights(plan: LayerPlan, weights: &LayerWeights) -> Result<Self> {
        weights.validate(&plan.config)?;
        let packed = PackedLayer::new(weights, &plan.config);
        let gate = gate_weights(weights, plan.config.dtype, plan.config.router_f32);
        Self::with_packed(plan, gate, packed)
    }

    /// As [`CpuExecutor::new`], consuming the weights: each expert's f32 matrices are
    /// freed once packed, so the layer's weights are never held twice.
    pub fn from_owned(plan: LayerPlan, mut weights: LayerWeights) -> Result<Self> {
        weights.validate(&plan.config)?;
        let packed = PackedLayer::take(&mut weights, &plan.config);
        let gate = gate_weights(&weights, plan.config.dtype, plan.config.router_f32);
        Self::with_packed(plan, gate, packed)
    }

    /// An executor whose routed experts come one at a time from `expert` (checked and
    /// packed as they come, never all held as f32), with the router, bias and shared
    /// experts of `gate` (its routed experts are not read).
    pub fn from_parts(
        plan: LayerPlan,
        gate: &LayerWeights,
        expert: &crate::reference::ExpertSource,
    ) -> Result<Self> {
        gate.validate_gate(&plan.config)?;
        let packed = PackedLayer::generate(gate, expert, &plan.config)?;
        let gw = gate_weights(gate, plan.config.dtype, plan.config.router_f32);
        Self::with_packed(plan, gw, packed)
    }

    fn with_packed(plan: LayerPlan, gate: LayerWeights, packed: PackedLayer) -> Result<Self> {
        let (weights, packed) = (Arc::new(gate), Arc::new(packed));
        let heaps = (0..plan.world())
            .map(|r| SymHeap::new(r, plan.heap.bytes, plan.config.dtype))
            .collect::<Result<Vec<_>>>()?;
        let y_bytes = plan.y_region_bytes().next_multiple_of(8);
        let y = (0..plan.world())
            .map(|r| SymHeap::new(r, y_bytes, plan.config.dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuExecutor {
            plan,
            weights,
            packed,
            heaps,
            epoch: 0,
            timeout: DEFAULT_TIMEOUT,
            silent: None,
            threads: default_threads(),
            stop: None,
            act: Vec::new(),
            y,
        })
    }

    /// The plan.
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// Bytes of the packed expert weights (in the dtype's own width).
    pub fn weight_bytes(&self) -> usize {
        self.packed.bytes()
    }

    /// The GEMM kernel this executor's expert weights are packed for (chosen from the
    /// dtype and the CPU: see [`Kernel`]).
    pub fn kernel(&self) -> Kernel {
        self.packed
            .experts
            .first()
            .map_or_else(|| Kernel::detect(self.plan.config.dtype), |e| e.w0.kernel())
    }

    /// Longest a rank waits for one signal before failing with [`Error::Timeout`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Total threads a forward uses, rank threads included: `n` (0 restores the default,
    /// the machine's available parallelism). There is always one thread per rank, even
    /// when `n` is smaller than the world; the threads beyond those are helpers, dealt
    /// out evenly over the ranks, that share each rank's expert, shared-expert and
    /// combine work. Results do not depend on it. More than [`MAX_THREADS`] (or the
    /// world size, when larger) is capped there: spawning more only fails.
    pub fn set_threads(&mut self, n: usize) {
        let cap = MAX_THREADS.max(self.plan.world());
        self.threads = if n == 0 {
            default_threads()
        } else {
            n.min(cap)
        };
    }

    /// Total threads a forward uses (see [`CpuExecutor::set_threads`]); at least the
    /// world size in practice.
    pub fn threads(&self) -> usize {
        self.threads.max(self.plan.world())
    }

    /// Test hook (fault injection): rank `rank` sends no signals at all, so its peers'
    /// waits end in [`Error::Timeout`]. `None` turns it off.
    pub fn set_silent_rank(&mut self, rank: Option<usize>) {
        self.silent = rank;
    }

    /// The epoch of the last forward (0 before the first); signal words carry its low 32
    /// bits.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Rank `rank`'s symmetric heap, for inspection after a forward.
    pub fn heap(&self, rank: usize) -> Option<&SymHeap> {
        self.heaps.get(rank)
    }

    /// One forward over every rank: `inputs[r]` are rank r's tokens.
    pub fn forward(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput> {
        let (outs, gates) = self.run(inputs, ov)?;
        Ok(LayerOutput::from_ranks(
            self.plan.config.experts,
            outs,
            gates,
        ))
    }

    /// One forward (or, for stage checks, the part up to `self.stop`): every rank's output
    /// rows (empty when stopped before combine) and gate decisions.
    fn run(
        &mut self,
        inputs: &[RankInput],
        ov: &RouteOverrides,
    ) -> Result<(Vec<Vec<f32>>, Vec<GateOutput>)> {
        let cfg = &self.plan.config;
        let k = ov.effective_top_k(cfg)?;
        if inputs.len() != cfg.world {
            return Err(Error::input(
                "inputs",
                format!("{} rank inputs != world = {}", inputs.len(), cfg.world),
            ));
        }
        for input in inputs {
            check_input(cfg, input.x, input.tokens, input.routing)?;
        }
        // The epoch advances even if this forward fails, so its signals are never
        // mistaken for the next one's.
        let epoch = next_epoch(self.epoch);
        self.epoch = epoch;
        let abort = AtomicBool::new(false);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let shared = rank::Shared {
            plan: &self.plan,
            w: &self.weights,
            packed: &self.packed,
            heaps: &self.heaps,
            epoch,
            k,
            logit_bias: ov.logit_bias.as_deref(),
            silent: self.silent,
            timeout: self.timeout,
            abort: &abort,
            stop: self.stop,
            act: if self.stop.is_some() { &self.act } else { &[] },
            y: &self.y,
        };
        let (threads, world) = (self.threads, cfg.world);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(r, input)| {
                    let (shared, abort, first_error) = (&shared, &abort, &first_error);
                    scope.spawn(move || {
                        let res = rank::run(shared, r, input, helpers_of(threads, world, r));
                        if let Err(Stop::Failed(e)) = res {
                            // The first failure is the cause; later ones are its echoes.
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                            abort.store(true, Ordering::Relaxed);
                            return None;
                        }
                        res.ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let first = first_error.into_inner().ok().flatten();
        if let Some(e) = first {
            return Err(e);
        }
        let mut outs = Vec::with_capacity(results.len());
        let mut gates = Vec::with_capacity(results.len());
        for (r, res) in results.into_iter().enumerate() {
            let (out, g) = res.ok_or_else(|| Error::Device {
                rank: r,
                stage: "forward",
                what: "rank stopped without an error".into(),
                expected: 0,
                observed: 1,
            })?;
            outs.push(out);
            gates.push(g);
        }
        Ok((outs, gates))
    }
}

#[cfg(test)]
mod tests {
    use super::helpers_of;

    #[test]
    fn helpers_are_the_threads_beyond_one_per_rank_dealt_evenly() {
        for world in 1..6 {
            for threads in 0..20 {
                let h: Vec<usize> = (0..world).map(|r| helpers_of(threads, world, r)).collect();
                assert_eq!(h.iter().sum::<usize>(), threads.saturating_sub(world));
                let (lo, hi) = (h.iter().min(), h.iter().max());
                assert!(hi.zip(lo).is_some_and(|(a, b)| a - b <= 1), "{h:?}");
            }
        }
    }
}
