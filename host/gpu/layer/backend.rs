//! [`MoeLayer`] as a [`LayerBackend`] of the model driver: hand it to
//! `MoeModel::with_factory` to run a model's MoE layers on the GPU.

use super::MoeLayer;
use crate::error::Result;
use crate::model::LayerBackend;
use crate::reference::{LayerOutput, RankInput, RouteOverrides};

impl LayerBackend for MoeLayer {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn forward_host(&mut self, inputs: &[RankInput], ov: &RouteOverrides) -> Result<LayerOutput> {
        MoeLayer::forward_host(self, inputs, ov)
    }
}
