//! [`MoeLayer::forward_host`]: the convenience path over host vectors (tests, benches,
//! the model driver): upload, poison the outputs with NaN, launch, wait, check the status,
//! download the outputs and the router's decisions.

use super::device_buffers::{cuda, poison};
use super::pack::{from_dtype_bytes, nan_pattern, to_dtype_bytes};
use super::{DeviceRouting, MoeLayer, RankBuffers, RankIo};
use crate::config::GivenRouting;
use crate::error::{Error, Result};
use crate::reference::{check_input, GateOutput, LayerOutput, RankInput, RouteOverrides};
use cudarc::driver::CudaStream;

fn le_i32(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl MoeLayer {
    /// One forward over host data, one [`RankInput`] per rank of the world. The outputs
    /// are poisoned with NaN before the launch, and a row still NaN afterwards is reported
    /// as [`Error::Device`]; device faults come back as from [`MoeLayer::status`]. The
    /// returned gates are the kernel's own decisions (ids, weights, slots, counts).
    pub fn forward_host(
        &mut self,
        inputs: &[RankInput],
        ov: &RouteOverrides,
    ) -> Result<LayerOutput> {
        let (io, k) = self.stage(inputs, ov)?;
        let stream = self.stream.clone();
        // SAFETY: every pointer is one of this layer's own buffers, sized for the config's
        // tokens (checked by stage); nothing else writes them until status() has returned.
        unsafe { self.forward(&io, &stream)? };
        self.collect(inputs, k)
    }

    /// Benchmark helper: uploads `inputs` once (one checked forward), then times `iters`
    /// launches (after `warmup` untimed ones) with device events around each, on the
    /// layer's stream: as plain cooperative launches, or as replays of a CUDA graph of the
    /// launch when `graph`. Returns milliseconds per launch; the last launch's status is
    /// checked and its output must equal the first one's.
    pub fn time_launches(
        &mut self,
        inputs: &[RankInput],
        ov: &RouteOverrides,
        warmup: usize,
        iters: usize,
        graph: bool,
    ) -> Result<Vec<f64>> {
        if iters == 0 {
            return Err(Error::input("iters", "at least one timed launch"));
        }
        let first = self.forward_host(inputs, ov)?;
        let (io, k) = self.stage(inputs, ov)?;
        let stream = self.stream.clone();
        if graph {
            // SAFETY: as in forward_host; the graph lives in `self` with the buffers.
            unsafe { self.capture_graph(&io, &stream)? };
        }
        let launch = |layer: &mut MoeLayer| -> Result<()> {
            if graph {
                layer.replay()
            } else {
                // SAFETY: as in forward_host.
                unsafe { layer.forward(&io, &stream) }
            }
        };
        for _ in 0..warmup {
            launch(self)?;
        }
        self.status()?;
        let ctx = stream.context().clone();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = ctx.new_event(timing).map_err(cuda("timing event"))?;
            let end = ctx.new_event(timing).map_err(cuda("timing event"))?;
            start.record(&stream).map_err(cuda("timing event"))?;
            launch(self)?;
            end.record(&stream).map_err(cuda("timing event"))?;
            events.push((start, end));
        }
        self.status()?;
        let ms = events
            .iter()
            .map(|(s, e)| s.elapsed_ms(e).map(f64::from).map_err(cuda("elapsed time")))
            .collect::<Result<Vec<f64>>>()?;
        let last = self.collect(inputs, k)?;
        if last.out != first.out {
            return Err(Error::Device {
                rank: self.rank_of(0),
                stage: "combine",
                what: "the timed launches produced a different output than the first".into(),
                expected: 0,
                observed: 1,
            });
        }
        Ok(ms)
    }

    /// Checks `inputs`, applies the overrides, uploads the tokens and the caller's routing
    /// into the layer's buffers and poisons the outputs; returns the launch's buffers and
    /// the effective top-k.
    pub(super) fn stage(
        &mut self,
        inputs: &[RankInput],
        ov: &RouteOverrides,
    ) -> Result<(Vec<RankIo>, usize)> {
        let cfg = self.plan.config.clone();
        let k = ov.effective_top_k(&cfg)?;
        if inputs.len() != self.ranks.len() {
            return Err(Error::input(
                "inputs",
                format!(
                    "{} rank inputs != {} ranks of {:?}",
                    inputs.len(),
                    self.ranks.len(),
                    self.world
                ),
            ));
        }
        for input in inputs {
            check_input(&cfg, input.x, input.tokens, input.routing)?;
        }
        self.set_route_overrides(ov.top_k, ov.logit_bias.as_deref())?;
        // Earlier launches may still use the layer's token buffers.
        self.wait_done()?;

        let (dtype, h) = (cfg.dtype, cfg.hidden);
        let stream = self.stream.clone();
        let mut io = Vec::with_capacity(inputs.len());
        for (rb, input) in self.ranks.iter().zip(inputs) {
            rb.x.upload(&stream, 0, &to_dtype_bytes(dtype, input.x), "x")?;
            // SAFETY: `out` holds config.tokens * hidden elements >= tokens * hidden.
            unsafe {
                poison(
                    &stream,
                    rb.out.ptr(),
                    input.tokens * h,
                    nan_pattern(dtype),
                    "poison out",
                )?
            };
            let routing = match input.routing {
                Some(g) => upload_routing(rb, g, &stream)?,
                None => None,
            };
            io.push(RankIo {
                x: rb.x.ptr(),
                out: rb.out.ptr(),
                tokens: input.tokens,
                routing,
            });
        }
        Ok((io, k))
    }

    /// Uploads each rank's routing (`routing[r]` for local rank `r`, `tokens[r]` tokens:
    /// ids, and weights unless the router computes them) into the layer's own routing
    /// buffers, for a [`Router::takes_ids`](crate::config::Router::takes_ids) router, and
    /// returns what [`RankIo::routing`] takes; `None` for a rank without tokens. The
    /// routing is checked first ([`GivenRouting::validate`]). Synchronises `stream` after
    /// the copies; the caller orders `stream` after the layer's previous launch.
    pub fn upload_given_routing(
        &self,
        routing: &[&GivenRouting],
        tokens: &[usize],
        stream: &CudaStream,
    ) -> Result<Vec<Option<DeviceRouting>>> {
        let cfg = &self.plan.config;
        if !cfg.router.takes_ids() {
            return Err(Error::input(
                "routing",
                format!("the {:?} router takes no given routing", cfg.router),
            ));
        }
        if routing.len() != self.ranks.len() || tokens.len() != self.ranks.len() {
            return Err(Error::input(
                "routing",
                format!(
                    "{} routings for {} token counts and {} ranks",
                    routing.len(),
                    tokens.len(),
                    self.ranks.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(routing.len());
        for ((rb, g), &t) in self.ranks.iter().zip(routing).zip(tokens) {
            g.validate(t, cfg)?;
            out.push(if t == 0 {
                None
            } else {
                upload_routing(rb, g, stream)?
            });
        }
        Ok(out)
    }

    /// Waits for the launch and reads the outputs and the router's decisions back.
    fn collect(&self, inputs: &[RankInput], k: usize) -> Result<LayerOutput> {
        let cfg = &self.plan.config;
        let (dtype, h) = (cfg.dtype, cfg.hidden);
        let stream = &self.stream;
        let tokens: Vec<usize> = inputs.iter().map(|i| i.tokens).collect();
        let gates = self.last_gates(&tokens, k)?;
        let mut outs = Vec::with_capacity(inputs.len());
        for (r, (rb, input)) in self.ranks.iter().zip(inputs).enumerate() {
            let mut raw = vec![0u8; input.tokens * h * dtype.size()];
            rb.out.download(stream, 0, &mut raw, "out")?;
            let out = from_dtype_bytes(dtype, &raw);
            if let Some(i) = out.iter().position(|v| v.is_nan()) {
                return Err(Error::Device {
                    rank: self.rank_of(r),
                    stage: "combine",
                    what: format!(
                        "output row {} (element {}) was not written: still the NaN poison",
                        i / h,
                        i % h
                    ),
                    expected: 0,
                    observed: out[i].to_bits() as u64,
                });
            }
            outs.push(out);
        }
        Ok(LayerOutput::from_ranks(cfg.experts, outs, gates))
    }

    /// Waits for the last launch, checks its status ([`MoeLayer::status`]) and reads the
    /// router's decisions of every rank back: `tokens[r]` tokens of rank `r` (as launched)
    /// with `k` choices each (the effective top-k of that launch).
    pub fn last_gates(&self, tokens: &[usize], k: usize) -> Result<Vec<GateOutput>> {
        let stats = self.status()?;
        if tokens.len() != self.ranks.len() {
            return Err(Error::input(
                "tokens",
                format!(
                    "{} ranks given, the world has {}",
                    tokens.len(),
                    self.ranks.len()
                ),
            ));
        }
        let cfg = &self.plan.config;
        if k == 0 || k > cfg.top_k {
            return Err(Error::input(
                "k",
                format!("{k} is not in 1..={}", cfg.top_k),
            ));
        }
        let stream = &self.stream;
        let ws = self.plan.workspace;
        let mut gates = Vec::with_capacity(tokens.len());
        for (r, (rb, &t)) in self.ranks.iter().zip(tokens).enumerate() {
            if t > cfg.tokens {
                return Err(Error::input(
                    "tokens",
                    format!("rank {r}: {t} > config tokens = {}", cfg.tokens),
                ));
            }
            let pairs = t * k;
            let mut ids = vec![0u8; 4 * pairs];
            let mut weights = vec![0u8; 4 * pairs];
            let mut slots = vec![0u8; 4 * pairs];
            rb.workspace
                .download(stream, ws.route_ids as usize, &mut ids, "route ids")?;
            rb.workspace.download(
                stream,
                ws.route_weights as usize,
                &mut weights,
                "route weights",
            )?;
            rb.workspace
                .download(stream, ws.route_slots as usize, &mut slots, "route slots")?;
            gates.push(GateOutput {
                ids: le_i32(&ids).into_iter().map(|e| e as u32).collect(),
                weights: weights
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                slots: le_i32(&slots),
                expert_counts: stats.expert_counts.get(r).cloned().unwrap_or_default(),
                dropped: stats.dropped.get(r).copied().unwrap_or(0),
            });
        }
        Ok(gates)
    }
}

/// Copies one rank's routing into its routing buffers (ids as i32; the weights unless the
/// hash router computes them on the device); `None` when the layer has no such buffers.
fn upload_routing(
    rb: &RankBuffers,
    g: &GivenRouting,
    stream: &CudaStream,
) -> Result<Option<DeviceRouting>> {
    let (Some(ids), Some(weights)) = (&rb.given_ids, &rb.given_weights) else {
        return Ok(None);
    };
    let id_bytes: Vec<u8> = g
        .ids
        .iter()
        .flat_map(|&e| (e as i32).to_le_bytes())
        .collect();
    ids.upload(stream, 0, &id_bytes, "routing.ids")?;
    if !g.weights.is_empty() {
        let w_bytes: Vec<u8> = g.weights.iter().flat_map(|w| w.to_le_bytes()).collect();
        weights.upload(stream, 0, &w_bytes, "routing.weights")?;
    }
    Ok(Some(DeviceRouting {
        ids: ids.ptr(),
        weights: weights.ptr(),
    }))
}
