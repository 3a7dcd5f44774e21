//! What runs one MoE layer of a model: the reference, the CPU executor, or (later) the GPU.
//!
//! The model driver talks to every layer through [`LayerBackend`], the same host-side
//! interface the layer runtimes already share (`forward` over [`RankInput`]s returning a
//! [`LayerOutput`]). The GPU layer (`gpu::layer::MoeLayer`, written separately) plugs in by
//! implementing this trait and being handed to
//! [`MoeModel::with_factory`](super::MoeModel::with_factory); the driver does not depend
//! on it, so the crate's CPU side builds and tests without it.

use crate::cpu::CpuExecutor;
use crate::error::Result;
use crate::plan::LayerPlan;
use crate::reference::{self, LayerOutput, RankInput, RouteOverrides};
use crate::weights::LayerWeights;
use std::sync::Arc;
use std::time::Duration;

/// One MoE layer that can run a forward pass on host-resident rank inputs.
///
/// `inputs` holds one entry per rank of the layer's world (`plan.world()`), each with at
/// most `config.tokens` rows of `hidden` values; the output holds one row block per rank,
/// rounded to the layer dtype, plus the routing and the counts.
pub trait LayerBackend {
    /// A short name for reports (`reference`, `cpu`, `gpu`).
    fn name(&self) -> &'static str;

    /// Runs the layer once.
    fn forward_host(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput>;
}

/// The reference implementation (`reference::forward`) as a backend: the oracle, slow.
#[derive(Debug, Clone)]
pub struct ReferenceLayer {
    plan: LayerPlan,
    weights: Arc<LayerWeights>,
}

impl ReferenceLayer {
    /// Wraps a plan and its weights (validated on the first forward by the reference).
    pub fn new(plan: LayerPlan, weights: Arc<LayerWeights>) -> Self {
        ReferenceLayer { plan, weights }
    }
}

impl LayerBackend for ReferenceLayer {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn forward_host(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput> {
        reference::forward(&self.plan, &self.weights, inputs, ov)
    }
}

impl LayerBackend for CpuExecutor {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward_host(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput> {
        self.forward(inputs, ov)
    }
}

/// The built-in backends a model can be built with. The GPU layer is attached through
/// [`MoeModel::with_factory`](super::MoeModel::with_factory) instead (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `reference::forward` per layer.
    Reference,
    /// One [`CpuExecutor`] per layer (threads as ranks), with its default wait deadline.
    #[default]
    Cpu,
    /// One [`CpuExecutor`] per layer with the given wait deadline.
    CpuWithTimeout(Duration),
}

impl Backend {
    /// Builds this backend for one layer.
    pub fn build(
        self,
        plan: LayerPlan,
        weights: Arc<LayerWeights>,
    ) -> Result<Box<dyn LayerBackend>> {
        Ok(match self {
            Backend::Reference => Box::new(ReferenceLayer::new(plan, weights)),
            Backend::Cpu => Box::new(CpuExecutor::new(plan, weights)?),
            Backend::CpuWithTimeout(t) => {
                let mut ex = CpuExecutor::new(plan, weights)?;
                ex.set_timeout(t);
                Box::new(ex)
            }
        })
    }
}
