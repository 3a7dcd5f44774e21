//! The scratch of a layer's launches: per launch rank, the region one launch writes and
//! then reads (GEMM0 activations, expert outputs, shared-expert rows, router logits; see
//! [`WorkspaceLayout`](crate::plan::WorkspaceLayout)). Nothing in it outlives a launch, so
//! layers that never run at the same time can share one: a [`GpuModel`](crate::gpu::model::GpuModel)
//! allocates one scratch for all its layers (they run in order on one stream), sized for
//! the largest, instead of one per layer.

use super::device_buffers::DeviceBuffer;
use crate::error::{Error, Result};
use crate::plan::LayerPlan;
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// One scratch region per launch rank (see the [module docs](self)).
#[derive(Debug)]
pub struct Scratch {
    ranks: Vec<DeviceBuffer>,
}

impl Scratch {
    /// Allocates `ranks` regions of `bytes` each (zeroed, at least 256 bytes) on
    /// `stream`'s device: `ranks` is the layers' [`GpuWorld::ranks`](super::GpuWorld::ranks),
    /// `bytes` the largest `plan.workspace.scratch_bytes` of the layers that will share it
    /// ([`Scratch::for_plans`]).
    pub fn new(stream: &Arc<CudaStream>, ranks: usize, bytes: u64) -> Result<Arc<Self>> {
        let bytes = usize::try_from(bytes).map_err(|_| Error::PlanTooLarge {
            what: format!("a scratch of {bytes} bytes does not fit in usize"),
        })?;
        let ranks = (0..ranks)
            .map(|_| DeviceBuffer::zeroed(stream, bytes, "scratch"))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Scratch { ranks }))
    }

    /// Bytes per rank of a scratch that layers of these plans can share: the largest.
    pub fn bytes_for(plans: &[LayerPlan]) -> u64 {
        plans
            .iter()
            .map(|p| p.workspace.scratch_bytes)
            .max()
            .unwrap_or(0)
    }

    /// A scratch for layers of these plans, in a world of `ranks` launch ranks
    /// ([`Scratch::bytes_for`] each).
    pub fn for_plans(
        stream: &Arc<CudaStream>,
        plans: &[LayerPlan],
        ranks: usize,
    ) -> Result<Arc<Self>> {
        Self::new(stream, ranks, Self::bytes_for(plans))
    }

    /// Launch ranks it serves.
    pub fn ranks(&self) -> usize {
        self.ranks.len()
    }

    /// Bytes of each rank's region.
    pub fn bytes(&self) -> usize {
        self.ranks.first().map_or(0, DeviceBuffer::bytes)
    }

    /// Launch rank `g`'s region.
    pub(crate) fn rank(&self, g: usize) -> Option<&DeviceBuffer> {
        self.ranks.get(g)
    }

    /// Checks that it serves `ranks` launch ranks with at least `plan`'s scratch each.
    pub(crate) fn check(&self, plan: &LayerPlan, ranks: usize) -> Result<()> {
        let need = plan.workspace.scratch_bytes;
        if self.ranks() != ranks || (self.bytes() as u64) < need {
            return Err(Error::config(
                "scratch",
                format!("{} rank(s) of {} bytes", self.ranks(), self.bytes()),
                format!("{ranks} rank(s) of at least {need} bytes (the plan's scratch)"),
            ));
        }
        Ok(())
    }
}
