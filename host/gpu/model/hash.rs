//! Hash layers on the device stack (DeepSeek-V4 `hash_moe`): each hash layer's experts
//! come from the forward's token ids through its `tid2eid` table, looked up on the host
//! and copied into the layer's routing buffers before the stack is enqueued; the gate
//! then computes the weights on the device (`Router::HashSqrtSoftplus`).

use super::{in_layer, GpuModel};
use crate::config::GivenRouting;
use crate::error::{Error, Result};
use crate::gpu::layer::DeviceRouting;
use cudarc::driver::CudaStream;

impl GpuModel {
    /// Whether some layer routes by token id.
    pub fn has_hash_layers(&self) -> bool {
        self.layers.iter().any(|l| l.hash_table.is_some())
    }

    /// Per layer, per rank: the routing of the hash layers from `token_ids` (empty for
    /// the other layers). Checks that ids are given exactly when a hash layer needs them,
    /// one per token. Orders `stream` after the previous forward before the copies.
    pub(super) fn stage_hash_routing(
        &self,
        token_ids: Option<&[&[u32]]>,
        tokens: &[usize],
        stream: &CudaStream,
    ) -> Result<Vec<Vec<Option<DeviceRouting>>>> {
        let Some(ids) = token_ids else {
            if let Some(l) = self.layers.iter().find(|l| l.hash_table.is_some()) {
                return Err(Error::input(
                    "token_ids",
                    format!(
                        "layer {} routes by token id (hash layer): use forward_ids",
                        l.index
                    ),
                ));
            }
            return Ok(vec![Vec::new(); self.layers.len()]);
        };
        check_ids(ids, tokens)?;
        // The layers' routing buffers may still be read by the previous forward.
        stream
            .wait(&self.done)
            .map_err(crate::gpu::layer::device_buffers::cuda(
                "order after the previous forward",
            ))?;
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let Some(table) = &layer.hash_table else {
                out.push(Vec::new());
                continue;
            };
            let routed = ids
                .iter()
                .map(|r| GivenRouting::from_table(table, layer.config_top_k, r))
                .collect::<Result<Vec<_>>>()
                .map_err(in_layer(layer.index))?;
            let refs: Vec<&GivenRouting> = routed.iter().collect();
            out.push(
                layer
                    .moe
                    .upload_given_routing(&refs, tokens, stream)
                    .map_err(in_layer(layer.index))?,
            );
        }
        Ok(out)
    }
}

/// One id list per rank, one id per token.
fn check_ids(ids: &[&[u32]], tokens: &[usize]) -> Result<()> {
    if ids.len() != tokens.len() {
        return Err(Error::input(
            "token_ids",
            format!(
                "{} rank lists, the model's world is {}",
                ids.len(),
                tokens.len()
            ),
        ));
    }
    for (r, (i, &t)) in ids.iter().zip(tokens).enumerate() {
        if i.len() != t {
            return Err(Error::input(
                "token_ids",
                format!("rank {r}: {} ids for {t} tokens", i.len()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_match_ranks_and_tokens() {
        let a = [1u32, 2, 3];
        let b = [4u32];
        assert!(check_ids(&[&a, &b], &[3, 1]).is_ok());
        assert!(check_ids(&[&a[..0], &[]], &[0, 0]).is_ok());
        let e = check_ids(&[&a], &[3, 1]).unwrap_err().to_string();
        assert!(e.contains("token_ids") && e.contains("world is 2"), "{e}");
        let e = check_ids(&[&a, &b], &[2, 1]).unwrap_err().to_string();
        assert!(e.contains("rank 0: 3 ids for 2 tokens"), "{e}");
    }
}
