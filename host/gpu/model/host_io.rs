//! [`GpuModel::forward_host`] and [`GpuModel::forward_traced`]: the model over host
//! vectors (tests, benches): one upload, the stack enqueued with no host synchronisation
//! between layers, one wait, the statuses, the downloads.

use super::trace::{snapshot, GpuTrace, Snapshot};
use super::{in_layer, GpuModel};
use crate::config::Dtype;
use crate::error::{Error, Result};
use crate::gpu::layer::device_buffers::DeviceBuffer;
use crate::gpu::layer::pack::{from_dtype_bytes, to_dtype_bytes};
use crate::model::ModelOutput;
use std::time::Instant;

impl GpuModel {
    /// Runs the model over host data (one `[tokens_r * hidden]` block per rank, rounded to
    /// layer 0's dtype): one upload, the whole stack enqueued with no host synchronisation
    /// between layers, one wait, the statuses, one download. `latency` is the host wall
    /// time of all that; per-layer device times are in the layer stats. Each layer's
    /// output is NaN-poisoned first ([`GpuModelOptions::poison`](super::GpuModelOptions::poison)), and a non-finite final
    /// state is reported as [`Error::Device`].
    pub fn forward_host(&mut self, x: &[Vec<f32>]) -> Result<ModelOutput> {
        self.run_host(x, None, false).map(|(out, _)| out)
    }

    /// [`GpuModel::forward_host`] for a model with hash layers: `token_ids[r]` holds rank
    /// `r`'s token ids, one per token ([`GpuModel::forward_ids`]).
    pub fn forward_host_ids(
        &mut self,
        x: &[Vec<f32>],
        token_ids: &[Vec<u32>],
    ) -> Result<ModelOutput> {
        self.run_host(x, Some(token_ids), false).map(|(out, _)| out)
    }

    /// Like [`GpuModel::forward_host`], and also returns the state after every layer and
    /// every layer's routing (copied on the device as the forward goes, read at the end).
    pub fn forward_traced(&mut self, x: &[Vec<f32>]) -> Result<(ModelOutput, GpuTrace)> {
        self.forward_traced_ids(x, None)
    }

    /// [`GpuModel::forward_traced`] with the token ids of the hash layers (required when
    /// the model has some).
    pub fn forward_traced_ids(
        &mut self,
        x: &[Vec<f32>],
        token_ids: Option<&[Vec<u32>]>,
    ) -> Result<(ModelOutput, GpuTrace)> {
        let (out, trace) = self.run_host(x, token_ids, true)?;
        let trace = trace.ok_or_else(|| Error::input("trace", "no trace was recorded"))?;
        Ok((out, trace))
    }

    fn run_host(
        &mut self,
        x: &[Vec<f32>],
        token_ids: Option<&[Vec<u32>]>,
        traced: bool,
    ) -> Result<(ModelOutput, Option<GpuTrace>)> {
        let start = Instant::now();
        let h = self.shape.hidden;
        if x.len() != self.shape.world {
            return Err(Error::input(
                "x",
                format!(
                    "{} rank blocks, the model's world is {}",
                    x.len(),
                    self.shape.world
                ),
            ));
        }
        let mut tokens = Vec::with_capacity(x.len());
        for (r, rows) in x.iter().enumerate() {
            if rows.len() % h != 0 || rows.len() / h > self.shape.tokens {
                return Err(Error::input(
                    "x",
                    format!(
                        "rank {r}: {} values is not a whole number of rows of hidden = {h} \
                         with at most {} tokens",
                        rows.len(),
                        self.shape.tokens
                    ),
                ));
            }
            if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
                return Err(Error::input(
                    "x",
                    format!("rank {r}: value {i} is not finite"),
                ));
            }
            tokens.push(rows.len() / h);
        }
        // Earlier forwards may still use the state buffers.
        self.wait_done()?;
        let dtype0 = self.layers.first().map_or(Dtype::F32, |l| l.dtype);
        let stream = self.stream.clone();
        if traced {
            let layers = self.layers.len();
            let (state_bytes, io_bytes) = (self.shape.state_bytes, self.shape.io_bytes);
            for rb in &mut self.ranks {
                while rb.snapshots.len() < layers {
                    rb.snapshots.push(Snapshot {
                        state: DeviceBuffer::zeroed(&stream, state_bytes, "trace snapshot")?,
                        normed: DeviceBuffer::zeroed(&stream, io_bytes, "trace snapshot")?,
                        out: DeviceBuffer::zeroed(&stream, io_bytes, "trace snapshot")?,
                    });
                }
            }
        }
        for (rb, rows) in self.ranks.iter().zip(x) {
            let rounded: Vec<f32> = rows.iter().map(|&v| dtype0.round(v)).collect();
            rb.state
                .upload(&stream, 0, &to_dtype_bytes(Dtype::F32, &rounded), "x")?;
        }
        let states: Vec<u64> = self.ranks.iter().map(|rb| rb.state.ptr()).collect();
        let poison_out = self.opts.poison;
        let ids: Option<Vec<&[u32]>> = token_ids.map(|v| v.iter().map(Vec::as_slice).collect());
        let routing = self.stage_hash_routing(ids.as_deref(), &tokens, &stream)?;
        // SAFETY: the model's own state buffers hold max_tokens * hidden f32 >= the
        // checked tokens; nothing else uses them until the forward has finished.
        unsafe {
            self.enqueue(
                &states,
                &tokens,
                &routing,
                Dtype::F32,
                &stream,
                poison_out,
                traced,
            )?
        };
        let layers = self.status()?;

        let download = |buf: &DeviceBuffer, dtype: Dtype, t: usize| -> Result<Vec<f32>> {
            let mut raw = vec![0u8; t * h * dtype.size()];
            buf.download(&stream, 0, &mut raw, "model download")?;
            Ok(from_dtype_bytes(dtype, &raw))
        };
        let trace = if traced {
            let n = self.layers.len();
            let mut trace = GpuTrace {
                states: Vec::with_capacity(n),
                normed: Vec::with_capacity(n),
                moe_out: Vec::with_capacity(n),
                gates: Vec::with_capacity(n),
            };
            for (l, layer) in self.layers.iter().enumerate() {
                let (mut st, mut nx, mut mo) = (Vec::new(), Vec::new(), Vec::new());
                for (rb, &t) in self.ranks.iter().zip(&tokens) {
                    let snap = snapshot(rb, l)?;
                    st.push(download(&snap.state, Dtype::F32, t)?);
                    nx.push(download(&snap.normed, layer.dtype, t)?);
                    mo.push(download(&snap.out, layer.dtype, t)?);
                }
                trace.states.push(st);
                trace.normed.push(nx);
                trace.moe_out.push(mo);
                trace.gates.push(
                    layer
                        .moe
                        .last_gates(&tokens, layer.moe.top_k())
                        .map_err(in_layer(layer.index))?,
                );
            }
            Some(trace)
        } else {
            None
        };
        let mut hidden = Vec::with_capacity(self.ranks.len());
        for (r, (rb, &t)) in self.ranks.iter().zip(&tokens).enumerate() {
            let s = download(&rb.state, Dtype::F32, t)?;
            check_finite(&s, h, r)?;
            hidden.push(s);
        }
        Ok((
            ModelOutput {
                hidden,
                layers,
                latency: start.elapsed(),
            },
            trace,
        ))
    }
}

/// A non-finite value in a state (an unwritten, NaN-poisoned row of some layer's output
/// propagated into it) as [`Error::Device`].
fn check_finite(state: &[f32], hidden: usize, rank: usize) -> Result<()> {
    match state.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Device {
            rank,
            stage: "combine",
            what: format!(
                "state row {} (element {}) is not finite after the layer: an output row \
                 was not written (NaN poison) or overflowed",
                i / hidden.max(1),
                i % hidden.max(1)
            ),
            expected: 0,
            observed: u64::from(state[i].to_bits()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_states_name_rank_row_and_element() {
        assert!(check_finite(&[1.0, 2.0, 3.0, 4.0], 2, 0).is_ok());
        match check_finite(&[1.0, 2.0, 3.0, f32::NAN], 2, 3) {
            Err(Error::Device { rank: 3, what, .. }) => {
                assert!(what.contains("row 1 (element 1)"), "{what}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
