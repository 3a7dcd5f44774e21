//! [`GpuModel`]: a stack of MoE blocks, each `x = x + moe(rms_norm(x))`, run layer after
//! layer on ONE stream of one GPU with no host synchronisation between layers.
//!
//! One [`MoeLayer`] per layer (all in the layers' world:
//! [`GpuWorld::Single`](crate::gpu::layer::GpuWorld::Single) or
//! [`GpuWorld::Emulated`](crate::gpu::layer::GpuWorld::Emulated)), the norm weights uploaded once, and per rank an f32 residual
//! state, a normalised-input buffer and a layer-output buffer reused by every layer. The
//! layers also share one [`Scratch`] per rank (GEMM0 activations, expert outputs, logits:
//! what a launch writes and then reads), sized for the largest layer, since they run one
//! at a time: a deep model needs one layer's scratch, not one per layer. A
//! forward enqueues, per layer: the norm kernel (`kernel/model_ops.cu`), the layer's
//! cooperative launch, the residual-add kernel, with timing events around each, and
//! nothing else; the host waits once, at the end, then reads every layer's status
//! (errors come back as [`Error::ModelLayer`] naming the layer) and statistics.
//!
//! The maths is the host driver's ([`crate::model::MoeModel`]): the input is rounded to
//! layer 0's dtype; the norm computes `w * round(x * rsqrt(mean(x^2) + eps))` (sum of
//! squares in f64, the rest in f32, rounded to the layer dtype where the host rounds); the
//! state after a layer is `round(state + out)` in that layer's dtype, kept as f32 so that
//! layers of different dtypes can follow each other.
//!
//! Status: written and compiled on a machine without a GPU; tests/gpu_model.rs is the
//! check to run on one (it skips where there is none).
//!
//! # Engine-facing use
//!
//! [`GpuModel::forward`] runs the stack in place over the caller's device state
//! (f32, or the layers' dtype when they all share it), asynchronously;
//! [`GpuModel::status`] waits and returns the per-layer statistics.

mod hash;
mod host_io;
mod ops;
mod sizing;
mod trace;

pub use ops::{entry_point, ModelOps, NormParams, Op, ResidualParams, MODEL_OP_THREADS};
pub use sizing::ModelShape;
pub use trace::GpuTrace;

use trace::{copy, snapshot, Snapshot};

use crate::config::Dtype;
use crate::error::{Error, Result};
use crate::gpu::layer::device_buffers::{cuda, poison, DeviceBuffer};
use crate::gpu::layer::pack::nan_pattern;
use crate::gpu::layer::{DeviceRouting, GpuOptions, MoeLayer, RankIo, Scratch};
use crate::model::{LayerStats, ModelLayer};
use crate::plan::{LayerPlan, TileMode};
use cudarc::driver::{sys, CudaEvent, CudaStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of a [`GpuModel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuModelOptions {
    /// Options of every layer's [`MoeLayer`].
    pub layer: GpuOptions,
    /// [`GpuModel::forward_host`] fills each layer's output with NaN before its launch, so
    /// that an unwritten row shows up in the final state (a memset per layer).
    pub poison: bool,
    /// The tile rule of every layer's routed expert GEMMs.
    pub tiles: TileMode,
}

impl Default for GpuModelOptions {
    fn default() -> Self {
        GpuModelOptions {
            layer: GpuOptions::default(),
            poison: true,
            tiles: TileMode::Auto,
        }
    }
}

/// One rank's residual state for [`GpuModel::forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelRankIo {
    /// Device address of the state `[tokens][hidden]` (the state dtype), read as the
    /// model input and overwritten with the output.
    pub state: u64,
    /// Tokens of this rank (at most [`GpuModel::max_tokens`]).
    pub tokens: usize,
}

/// Timing events of one layer.
struct LayerEvents {
    start: CudaEvent,
    moe_start: CudaEvent,
    moe_end: CudaEvent,
    end: CudaEvent,
}

/// One layer on the device.
struct DeviceLayer {
    index: usize,
    dtype: Dtype,
    eps: f32,
    config_top_k: usize,
    logit_bias: Option<Vec<f32>>,
    events: LayerEvents,
    norm_weight: DeviceBuffer,
    /// LayerNorm's bias (PhiMoE), or `None` for RMSNorm.
    norm_bias: Option<DeviceBuffer>,
    /// A hash layer's `tid2eid` table (`[vocab][top_k]`): its routing comes from the
    /// forward's token ids ([`GpuModel::forward_ids`]).
    hash_table: Option<Arc<Vec<u32>>>,
    moe: MoeLayer,
}

/// One rank's buffers.
#[derive(Debug)]
struct RankBuffers {
    state: DeviceBuffer,
    normed: DeviceBuffer,
    out: DeviceBuffer,
    /// Per layer: state after it, its input and output (traced forwards only), allocated
    /// on first use.
    snapshots: Vec<Snapshot>,
}

/// A stack of MoE blocks resident on one GPU. See the [module docs](self).
pub struct GpuModel {
    // Drop order: wait (Drop), then the layers, then the buffers, the stream last.
    done: CudaEvent,
    layers: Vec<DeviceLayer>,
    ranks: Vec<RankBuffers>,
    ops: ModelOps,
    stream: Arc<CudaStream>,
    shape: ModelShape,
    opts: GpuModelOptions,
    top_k: Option<usize>,
}

impl Drop for GpuModel {
    fn drop(&mut self) {
        // The buffers must outlive the last forward; errors cannot be reported from Drop.
        let _ = self.wait_done();
    }
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("layers", &self.layers.len())
            .field("shape", &self.shape)
            .field("top_k", &self.top_k)
            .finish_non_exhaustive()
    }
}

/// One scratch for every layer (they run one at a time on the model's stream), sized for
/// the largest; refused before allocating when the device has not that much free.
fn shared_scratch(
    stream: &Arc<CudaStream>,
    plans: &[LayerPlan],
    ranks: usize,
) -> Result<Arc<Scratch>> {
    let need = Scratch::bytes_for(plans).saturating_mul(ranks as u64);
    let (free, _) = stream
        .context()
        .mem_get_info()
        .map_err(cuda("memory info"))?;
    if need > free as u64 {
        return Err(Error::PlanTooLarge {
            what: format!(
                "the model's shared scratch needs {:.1} MiB ({ranks} rank(s)), {:.1} MiB are free",
                need as f64 / 1048576.0,
                free as f64 / 1048576.0
            ),
        });
    }
    Scratch::for_plans(stream, plans, ranks)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Wraps a layer's error so that it names the layer.
fn in_layer(layer: usize) -> impl Fn(Error) -> Error {
    move |e| Error::ModelLayer {
        layer,
        source: Box::new(e),
    }
}

impl GpuModel {
    /// Builds the model on `stream`'s device: validates the stack, creates one
    /// [`MoeLayer`] per layer (with its logit bias as a route override) and uploads the
    /// norm weights. Errors: as [`MoeLayer::new`] (wrapped in [`Error::ModelLayer`]),
    /// [`Error::InvalidConfig`] for a stack of mixed hidden sizes or worlds.
    pub fn new(
        stream: Arc<CudaStream>,
        layers: Vec<ModelLayer>,
        opts: GpuModelOptions,
    ) -> Result<Self> {
        let shape = ModelShape::of(&layers)?;
        let world = shape.gpu_world();
        let ctx = stream.context().clone();
        ctx.bind_to_thread().map_err(cuda("bind context"))?;
        let ops = ModelOps::load(&ctx)?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || ctx.new_event(timing).map_err(cuda("create event"));
        let plans = layers
            .iter()
            .map(|l| {
                LayerPlan::new(&l.config)
                    .map(|p| p.with_tile_mode(opts.tiles))
                    .map_err(in_layer(l.index))
            })
            .collect::<Result<Vec<_>>>()?;
        let scratch = shared_scratch(&stream, &plans, world.ranks())?;
        let mut built = Vec::with_capacity(layers.len());
        for (layer, plan) in layers.into_iter().zip(plans) {
            let index = layer.index;
            let mut moe = MoeLayer::with_scratch(
                stream.clone(),
                plan,
                &layer.weights,
                world,
                opts.layer.clone(),
                Some(Arc::clone(&scratch)),
            )
            .map_err(in_layer(index))?;
            moe.set_route_overrides(None, layer.logit_bias.as_deref())
                .map_err(in_layer(index))?;
            let norm_weight =
                DeviceBuffer::from_bytes(&stream, &f32_bytes(&layer.norm.weight), "norm weight")?;
            let norm_bias = match &layer.norm.bias {
                Some(b) => Some(DeviceBuffer::from_bytes(
                    &stream,
                    &f32_bytes(b),
                    "norm bias",
                )?),
                None => None,
            };
            built.push(DeviceLayer {
                index,
                dtype: layer.config.dtype,
                eps: layer.norm.eps,
                config_top_k: layer.config.top_k,
                logit_bias: layer.logit_bias,
                events: LayerEvents {
                    start: event()?,
                    moe_start: event()?,
                    moe_end: event()?,
                    end: event()?,
                },
                norm_weight,
                norm_bias,
                hash_table: layer.hash_table,
                moe,
            });
        }
        let mut ranks = Vec::with_capacity(shape.world);
        for _ in 0..shape.world {
            ranks.push(RankBuffers {
                state: DeviceBuffer::zeroed(&stream, shape.state_bytes, "model state")?,
                normed: DeviceBuffer::zeroed(&stream, shape.io_bytes, "normed input")?,
                out: DeviceBuffer::zeroed(&stream, shape.io_bytes, "layer output")?,
                snapshots: Vec::new(),
            });
        }
        stream.synchronize().map_err(cuda("model buffers"))?;
        let done = ctx.new_event(None).map_err(cuda("create event"))?;
        Ok(GpuModel {
            done,
            layers: built,
            ranks,
            ops,
            stream,
            shape,
            opts,
            top_k: None,
        })
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Always false: a model has at least one layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Switches the NaN fill of each layer's output in [`GpuModel::forward_host`] on or
    /// off (e.g. off for timed runs after a checked one).
    pub fn set_poison(&mut self, on: bool) {
        self.opts.poison = on;
    }

    /// Hidden size, world and buffer sizes.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// Hidden size.
    pub fn hidden(&self) -> usize {
        self.shape.hidden
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.shape.world
    }

    /// Most tokens a rank may bring.
    pub fn max_tokens(&self) -> usize {
        self.shape.tokens
    }

    /// The model's stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The layer runtimes, in order (grid, memory, plan of each).
    pub fn layers(&self) -> impl Iterator<Item = &MoeLayer> {
        self.layers.iter().map(|l| &l.moe)
    }

    /// Routes every layer with fewer experts per token (`1..=` each layer's top-k); `None`
    /// restores the configured top-k. Each layer keeps its logit bias. Waits for the
    /// forward in flight.
    pub fn set_top_k(&mut self, top_k: Option<usize>) -> Result<()> {
        self.wait_done()?;
        for l in &mut self.layers {
            if let Some(k) = top_k {
                if k == 0 || k > l.config_top_k {
                    return Err(Error::ModelLayer {
                        layer: l.index,
                        source: Box::new(Error::input(
                            "overrides.top_k",
                            format!("{k} is not in 1..={}", l.config_top_k),
                        )),
                    });
                }
            }
        }
        for l in &mut self.layers {
            l.moe
                .set_route_overrides(top_k, l.logit_bias.as_deref())
                .map_err(in_layer(l.index))?;
        }
        self.top_k = top_k;
        Ok(())
    }

    /// Checks `io` and the state dtype; returns the tokens per rank.
    fn check_io(&self, io: &[ModelRankIo], state: Dtype) -> Result<Vec<usize>> {
        if io.len() != self.shape.world {
            return Err(Error::input(
                "io",
                format!(
                    "{} ranks given, the model's world is {}",
                    io.len(),
                    self.shape.world
                ),
            ));
        }
        if state != Dtype::F32 {
            if let Some(l) = self.layers.iter().find(|l| l.dtype != state) {
                return Err(Error::input(
                    "state dtype",
                    format!(
                        "a {} state needs every layer in {}; layer {} is {} (use an f32 state)",
                        state.name(),
                        state.name(),
                        l.index,
                        l.dtype.name()
                    ),
                ));
            }
        }
        let mut tokens = Vec::with_capacity(io.len());
        for (r, rio) in io.iter().enumerate() {
            if rio.tokens > self.shape.tokens {
                return Err(Error::input(
                    "io.tokens",
                    format!(
                        "rank {r}: {} > the model's max tokens = {}",
                        rio.tokens, self.shape.tokens
                    ),
                ));
            }
            if rio.tokens > 0 && rio.state == 0 {
                return Err(Error::input("io.state", format!("rank {r}: null pointer")));
            }
            tokens.push(rio.tokens);
        }
        Ok(tokens)
    }

    /// Runs every layer in place over the caller's state on `stream`, asynchronously: per
    /// layer a norm launch, the layer's cooperative launch and a residual-add launch, with
    /// no host synchronisation and no copy. Call [`GpuModel::status`] to wait and read the
    /// per-layer outcome. `state` is the dtype of the state buffers: f32 (any layers), or
    /// the dtype every layer shares.
    ///
    /// # Safety
    /// For every rank, `state` must address `tokens * hidden` elements of the state dtype
    /// in this model's CUDA context, live and not used by other work until the forward has
    /// finished.
    pub unsafe fn forward(
        &mut self,
        io: &[ModelRankIo],
        state: Dtype,
        stream: &CudaStream,
    ) -> Result<()> {
        // SAFETY: this function's contract.
        unsafe { self.forward_ids(io, None, state, stream) }
    }

    /// [`GpuModel::forward`] for a model with hash layers: `token_ids[r]` are rank `r`'s
    /// token ids (one per token), which each hash layer maps to its experts through its
    /// table on the host ([`GivenRouting::from_table`](crate::config::GivenRouting::from_table)).
    /// The routing is copied into the layers' buffers before the stack is enqueued, which
    /// synchronises `stream` once (after the previous forward). `None` is refused when
    /// the model has a hash layer.
    ///
    /// # Safety
    /// As [`GpuModel::forward`].
    pub unsafe fn forward_ids(
        &mut self,
        io: &[ModelRankIo],
        token_ids: Option<&[&[u32]]>,
        state: Dtype,
        stream: &CudaStream,
    ) -> Result<()> {
        let tokens = self.check_io(io, state)?;
        let routing = self.stage_hash_routing(token_ids, &tokens, stream)?;
        let ptrs: Vec<u64> = io.iter().map(|r| r.state).collect();
        // SAFETY: the caller's pointers (this function's contract); the model's own
        // buffers are sized for max_tokens >= tokens (checked).
        unsafe { self.enqueue(&ptrs, &tokens, &routing, state, stream, false, false) }
    }

    /// Enqueues the whole stack. `poison` fills each layer's output with NaN first;
    /// `traced` copies the state after each layer into the snapshot buffers.
    ///
    /// # Safety
    /// `states[r]` must address `tokens[r] * hidden` elements of `state` dtype, live until
    /// the forward has finished; `tokens` were checked against `max_tokens`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn enqueue(
        &mut self,
        states: &[u64],
        tokens: &[usize],
        routing: &[Vec<Option<DeviceRouting>>],
        state: Dtype,
        stream: &CudaStream,
        poison_out: bool,
        traced: bool,
    ) -> Result<()> {
        let h = self.shape.hidden;
        let rows = ops::rows_array(tokens)?;
        // The model's buffers are shared by consecutive forwards: order after the last.
        stream
            .wait(&self.done)
            .map_err(cuda("order after the previous forward"))?;
        let mut norm = NormParams {
            rows,
            hidden: h as u32,
            ..NormParams::default()
        };
        let mut residual = ResidualParams {
            rows,
            hidden: h as u32,
            ..ResidualParams::default()
        };
        for (r, rb) in self.ranks.iter().enumerate() {
            norm.x[r] = states[r];
            norm.out[r] = rb.normed.ptr();
            residual.state[r] = states[r];
            residual.y[r] = rb.out.ptr();
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            // A hash layer's routing was staged by `stage_hash_routing`; others have none.
            let io: Vec<RankIo> = self
                .ranks
                .iter()
                .zip(tokens)
                .enumerate()
                .map(|(r, (rb, &t))| RankIo {
                    x: rb.normed.ptr(),
                    out: rb.out.ptr(),
                    tokens: t,
                    routing: routing.get(l).and_then(|v| v.get(r)).copied().flatten(),
                })
                .collect();
            let ev = &layer.events;
            ev.start.record(stream).map_err(cuda("record event"))?;
            norm.weight = layer.norm_weight.ptr();
            norm.bias = layer.norm_bias.as_ref().map_or(0, DeviceBuffer::ptr);
            norm.eps = layer.eps;
            // SAFETY: state pointers per the contract; `normed` holds max_tokens * hidden
            // elements of the widest layer dtype; the weight holds `hidden` f32.
            unsafe {
                self.ops
                    .rms_norm(stream, state, layer.dtype, &norm, tokens)
                    .map_err(in_layer(layer.index))?
            };
            if poison_out {
                for (rb, &t) in self.ranks.iter().zip(tokens) {
                    // SAFETY: `out` holds max_tokens * hidden >= t * hidden elements.
                    unsafe {
                        poison(
                            stream,
                            rb.out.ptr(),
                            t * h,
                            nan_pattern(layer.dtype),
                            "poison",
                        )?
                    };
                }
            }
            ev.moe_start.record(stream).map_err(cuda("record event"))?;
            // SAFETY: `normed` and `out` are this model's buffers sized for the tokens;
            // nothing else writes them until the forward has finished (`done`).
            unsafe {
                layer
                    .moe
                    .forward(&io, stream)
                    .map_err(in_layer(layer.index))?
            };
            ev.moe_end.record(stream).map_err(cuda("record event"))?;
            if traced {
                let io_bytes = |t: usize| t * h * layer.dtype.size();
                for (rb, &t) in self.ranks.iter().zip(tokens) {
                    let snap = snapshot(rb, l)?;
                    // SAFETY: normed/out and their snapshots all hold io_bytes(max_tokens).
                    unsafe {
                        copy(&snap.normed, rb.normed.ptr(), io_bytes(t), stream)?;
                        copy(&snap.out, rb.out.ptr(), io_bytes(t), stream)?;
                    }
                }
            }
            // SAFETY: as for the norm.
            unsafe {
                self.ops
                    .residual_add(stream, state, layer.dtype, &residual, tokens)
                    .map_err(in_layer(layer.index))?
            };
            ev.end.record(stream).map_err(cuda("record event"))?;
            if traced {
                for ((rb, &src), &t) in self.ranks.iter().zip(states).zip(tokens) {
                    // SAFETY: the state holds t * hidden elements (the contract); the
                    // snapshot max_tokens * hidden f32.
                    unsafe { copy(&snapshot(rb, l)?.state, src, t * h * state.size(), stream)? };
                }
            }
        }
        self.done.record(stream).map_err(cuda("record event"))
    }

    /// Waits for the forward in flight (polling, with the layers' host deadline per
    /// layer) without reading anything.
    fn wait_done(&self) -> Result<()> {
        let o = &self.opts.layer;
        let per_layer = o.host_timeout.unwrap_or_else(|| {
            o.timeout
                .saturating_mul(4)
                .saturating_add(Duration::from_secs(10))
        });
        let limit = per_layer.saturating_mul(self.layers.len().max(1) as u32);
        let start = Instant::now();
        let mut nap = Duration::from_micros(5);
        loop {
            if self.done.try_is_complete().map_err(cuda("model forward"))? {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(Error::Timeout {
                    rank: 0,
                    stage: "host",
                    awaited: "completion of the model forward (no device watchdog fired; \
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

    /// Waits (once) for the forward in flight, then checks every layer's status words in
    /// layer order and returns each layer's statistics: expert counts and drops summed
    /// over ranks, `latency` the device time of norm + layer + residual (and the NaN fill
    /// of the output when poisoning; in a traced forward also the input/output snapshot
    /// copies) and `backend_latency` that of the layer launch alone (from the events). The first
    /// failing layer's error comes back as [`Error::ModelLayer`].
    pub fn status(&self) -> Result<Vec<LayerStats>> {
        self.wait_done()?;
        let ms = |a: &CudaEvent, b: &CudaEvent| -> Result<Duration> {
            let t = a.elapsed_ms(b).map_err(cuda("elapsed time"))?;
            Ok(Duration::from_secs_f64(f64::from(t.max(0.0)) / 1e3))
        };
        let mut stats = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let s = l.moe.status().map_err(in_layer(l.index))?;
            let ev = &l.events;
            stats.push(LayerStats {
                layer: l.index,
                latency: ms(&ev.start, &ev.end)?,
                backend_latency: ms(&ev.moe_start, &ev.moe_end)?,
                expert_counts: s.total_expert_counts(),
                dropped: s.total_dropped(),
                wire: None,
            });
        }
        Ok(stats)
    }

    /// Device time of the last forward's whole stack: from the first layer's first event
    /// to the last layer's last (norms, layer launches, residual adds and the gaps between
    /// them). Waits for the forward.
    pub fn device_time(&self) -> Result<Duration> {
        self.wait_done()?;
        let (Some(first), Some(last)) = (self.layers.first(), self.layers.last()) else {
            return Ok(Duration::ZERO);
        };
        let t = first
            .events
            .start
            .elapsed_ms(&last.events.end)
            .map_err(cuda("elapsed time"))?;
        Ok(Duration::from_secs_f64(f64::from(t.max(0.0)) / 1e3))
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<GpuModel>();
    }

    #[test]
    fn layer_errors_are_wrapped_with_the_layer_index() {
        let e = in_layer(7)(Error::input("x", "bad"));
        assert!(matches!(e, Error::ModelLayer { layer: 7, .. }));
        assert!(e.to_string().contains("model layer 7"), "{e}");
    }

    #[test]
    fn default_options_poison_outputs() {
        let o = GpuModelOptions::default();
        assert!(o.poison);
        assert_eq!(o.layer, GpuOptions::default());
    }
}
