//! Hash layers on the device stack (DeepSeek-V4 `hash_moe`): each hash layer's experts
//! come from the forward's token ids through its `tid2eid` table, looked up on the host
//! and copied into the layer's routing buffers before the stack is enqueued; the gate
//! then computes the weights on the device (`Router::HashSqrtSoftplus`).

use super::{in_layer, GpuModel};
use crate::config::GivenRouting;
use crate::error::Result;
use crate::gpu::layer::DeviceRouting;
use crate::model::hash_routing_of;
use cudarc::driver::CudaStream;

impl GpuModel {
    /// Whether some layer routes by token id.
    pub fn has_hash_layers(&self) -> bool {
        self.layers.iter().any(|l| l.hash_table.is_some())
    }

    /// Per layer, per rank: the routing of the hash layers from `token_ids` (empty for
    /// the other layers; [`hash_routing_of`] checks the ids). Orders `stream` after the
    /// previous forward before the copies.
    pub(super) fn stage_hash_routing(
        &self,
        token_ids: Option<&[&[u32]]>,
        tokens: &[usize],
        stream: &CudaStream,
    ) -> Result<Vec<Vec<Option<DeviceRouting>>>> {
        let mut out = vec![Vec::new(); self.layers.len()];
        if !self.has_hash_layers() {
            return Ok(out);
        }
        // The layers' routing buffers may still be read by the previous forward.
        stream
            .wait(&self.done)
            .map_err(crate::gpu::layer::device_buffers::cuda(
                "order after the previous forward",
            ))?;
        for (layer, staged) in self.layers.iter().zip(&mut out) {
            let Some(table) = &layer.hash_table else {
                continue;
            };
            let index = layer.index;
            let routed = hash_routing_of(table, layer.config_top_k, index, token_ids, tokens)
                .map_err(in_layer(index))?;
            let refs: Vec<&GivenRouting> = routed.iter().collect();
            *staged = layer
                .moe
                .upload_given_routing(&refs, tokens, stream)
                .map_err(in_layer(index))?;
        }
        Ok(out)
    }
}
