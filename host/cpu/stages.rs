//! The CPU executor as a [`StageRunner`]: the same stage outputs the kernel leaves, in the
//! same layout, so the stage-check harness runs against it in CI.

use super::heap::SymHeap;
use super::CpuExecutor;
use crate::error::Result;
use crate::reference::{RankInput, RouteOverrides};
use crate::stages::{Capture, RankCapture, Stage, StageRunner};

impl CpuExecutor {
    /// The heaps that keep the GEMM0 activations (the scratch's activation region of the
    /// plan, per rank), allocated on first use.
    fn act_heaps(&mut self) -> Result<()> {
        if !self.act.is_empty() {
            return Ok(());
        }
        let bytes = self.plan.act_region_bytes().next_multiple_of(8);
        self.act = (0..self.plan.world())
            .map(|r| SymHeap::new(r, bytes, self.plan.config.dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(())
    }
}

impl StageRunner for CpuExecutor {
    fn run_stage(
        &mut self,
        stage: Stage,
        inputs: &[RankInput],
        ov: &RouteOverrides,
    ) -> Result<Capture> {
        self.act_heaps()?;
        self.stop = Some(stage);
        let res = self.run(inputs, ov);
        self.stop = None;
        let (outs, gates) = res?;
        let ranks = gates
            .into_iter()
            .zip(outs)
            .enumerate()
            .map(|(r, (gate, out))| RankCapture {
                gate,
                heap: self.heaps.get(r).map(SymHeap::to_bytes).unwrap_or_default(),
                act: self.act.get(r).map(SymHeap::to_bytes).unwrap_or_default(),
                y: if stage >= Stage::Gemm1 {
                    self.y.get(r).map(SymHeap::to_bytes).unwrap_or_default()
                } else {
                    Vec::new()
                },
                out,
            })
            .collect();
        Ok(Capture {
            stage,
            epoch: self.epoch,
            ranks,
        })
    }
}
