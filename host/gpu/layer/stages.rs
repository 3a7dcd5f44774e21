//! [`MoeLayer`] as a [`StageRunner`]: a launch with `stop_after` set in its parameters,
//! then every rank's routing, symmetric heap, GEMM0 activations, GEMM1 expert outputs and
//! output read back in the plan's layout (see [`crate::stages`]).

use super::device_buffers::poison;
use super::pack::{from_dtype_bytes, nan_pattern};
use super::MoeLayer;
use crate::error::{Error, Result};
use crate::params::STOP_NONE;
use crate::reference::{RankInput, RouteOverrides};
use crate::stages::{Capture, RankCapture, Stage, StageRunner};

impl MoeLayer {
    /// Stage checks: from the next launch on, the kernel stops cleanly after `stage`
    /// (status OK, epoch advanced); `None` runs the whole layer again. A captured graph
    /// keeps the setting it was captured with.
    pub fn set_stop_after(&mut self, stage: Option<Stage>) {
        self.params.layer.stop_after = stage.map_or(STOP_NONE, Stage::code);
    }

    /// Poisons every rank's heap, activation and expert-output regions with NaN, so that a
    /// value a stage should have written and did not shows up as a mismatch. Signal words
    /// then carry an epoch tag no launch uses.
    fn poison_stage_memory(&self) -> Result<()> {
        let cfg = &self.plan.config;
        let es = cfg.dtype.size();
        let ws = &self.plan.workspace;
        let act_bytes = self.plan.act_region_bytes() as usize;
        let y_bytes = self.plan.y_region_bytes() as usize;
        for (g, rb) in self.ranks.iter().enumerate() {
            let scratch = self.scratch_of(g)?.ptr();
            // SAFETY: every range lies inside this rank's heap and scratch allocations,
            // sized by the plan; no launch is in flight (waited for by `stage`).
            unsafe {
                poison(
                    &self.stream,
                    rb.heap.ptr(),
                    rb.heap.bytes() / es,
                    nan_pattern(cfg.dtype),
                    "poison heap",
                )?;
                poison(
                    &self.stream,
                    scratch + ws.act,
                    act_bytes / es,
                    nan_pattern(cfg.dtype),
                    "poison activations",
                )?;
                poison(
                    &self.stream,
                    scratch + ws.y,
                    y_bytes / es,
                    nan_pattern(cfg.dtype),
                    "poison expert outputs",
                )?;
            }
        }
        Ok(())
    }

    /// Every rank's state after the last launch.
    fn capture(&self, stage: Stage, inputs: &[RankInput], k: usize) -> Result<Capture> {
        let cfg = &self.plan.config;
        let tokens: Vec<usize> = inputs.iter().map(|i| i.tokens).collect();
        // Waits for the launch and turns a device error into a typed one.
        let gates = self.last_gates(&tokens, k)?;
        let mut ranks = Vec::with_capacity(gates.len());
        for (g, gate) in gates.into_iter().enumerate() {
            let rb = &self.ranks[g];
            let heap = self.download_heap(self.rank_of(g))?;
            // As the CPU executor's capture: activations at every stage, outputs from GEMM1.
            let act = self.download_region(g, true, Region::Act)?;
            let y = self.download_region(g, stage >= Stage::Gemm1, Region::Y)?;
            let out = if stage == Stage::Combine {
                let mut raw = vec![0u8; tokens[g] * cfg.hidden * cfg.dtype.size()];
                rb.out.download(&self.stream, 0, &mut raw, "out")?;
                from_dtype_bytes(cfg.dtype, &raw)
            } else {
                Vec::new()
            };
            ranks.push(RankCapture {
                gate,
                heap,
                act,
                y,
                out,
            });
        }
        Ok(Capture {
            stage,
            epoch: self.epoch(self.rank_of(0))?,
            ranks,
        })
    }

    /// Rank group `g`'s activation or expert-output region (the whole region, from its
    /// first byte), or nothing when the stage has not written it (`wanted` false).
    fn download_region(&self, g: usize, wanted: bool, region: Region) -> Result<Vec<u8>> {
        if !wanted {
            return Ok(Vec::new());
        }
        let ws = &self.plan.workspace;
        let (at, bytes, what) = match region {
            Region::Act => (ws.act, self.plan.act_region_bytes(), "activations"),
            Region::Y => (ws.y, self.plan.y_region_bytes(), "expert outputs"),
        };
        let mut raw = vec![0u8; bytes as usize];
        self.scratch_of(g)?
            .download(&self.stream, at as usize, &mut raw, what)?;
        Ok(raw)
    }
}

/// A per-pair workspace region a stage capture reads back.
#[derive(Debug, Clone, Copy)]
enum Region {
    /// GEMM0 activations (`plan.workspace.act`).
    Act,
    /// GEMM1 expert outputs (`plan.workspace.y`).
    Y,
}

impl StageRunner for MoeLayer {
    /// One launch stopped after `stage` over the layer's own buffers (Single and Emulated
    /// worlds: every rank's memory is read back from this process).
    fn run_stage(
        &mut self,
        stage: Stage,
        inputs: &[RankInput],
        ov: &RouteOverrides,
    ) -> Result<Capture> {
        if self.external_heap {
            return Err(Error::input(
                "stage checks",
                "run them in the Single or Emulated world: an NVSHMEM rank cannot read its peers' memory",
            ));
        }
        let (io, k) = self.stage(inputs, ov)?;
        self.poison_stage_memory()?;
        self.set_stop_after(Some(stage));
        let stream = self.stream.clone();
        // SAFETY: every pointer is one of this layer's own buffers, sized for the config's
        // tokens (checked by `stage`); nothing else writes them until the capture is read.
        let launched = unsafe { self.forward(&io, &stream) };
        self.set_stop_after(None);
        launched?;
        self.capture(stage, inputs, k)
    }
}
