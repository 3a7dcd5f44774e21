//! What a [`GpuModel`](super::GpuModel) allocates per rank besides its layers, and the
//! checks of a layer stack that one stream of one GPU can run. Pure, tested on the CPU.

use crate::config::Dtype;
use crate::error::{Error, Result};
use crate::gpu::layer::GpuWorld;
use crate::model::{check_stack, ModelLayer, StackShape};

/// Shape shared by every layer of a model, and the per-rank buffer sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Hidden size of every layer.
    pub hidden: usize,
    /// Ranks of every layer.
    pub world: usize,
    /// Most tokens a rank may bring: the smallest `config.tokens` over the layers.
    pub tokens: usize,
    /// Bytes of a rank's f32 residual state `[tokens][hidden]`.
    pub state_bytes: usize,
    /// Bytes of a rank's normalised input, and of its layer output: the largest layer
    /// dtype `[tokens][hidden]` (one buffer each, reused by every layer).
    pub io_bytes: usize,
}

impl ModelShape {
    /// Checks the stack (at least one layer, each valid, one hidden size, one world that
    /// fits one launch) and sizes the buffers.
    pub fn of(layers: &[ModelLayer]) -> Result<Self> {
        let StackShape {
            hidden,
            world,
            tokens,
        } = check_stack(layers)?;
        let widest = layers
            .iter()
            .map(|l| l.config.dtype.size())
            .max()
            .unwrap_or(4);
        let rows = tokens
            .checked_mul(hidden)
            .ok_or_else(|| Error::config("tokens", tokens, "tokens * hidden fits in usize"))?;
        Ok(ModelShape {
            hidden,
            world,
            tokens,
            state_bytes: rows * Dtype::F32.size(),
            io_bytes: rows * widest,
        })
    }

    /// The GPU world every layer runs in: one rank, or `world` emulated ranks.
    pub fn gpu_world(&self) -> GpuWorld {
        match self.world {
            1 => GpuWorld::Single,
            ranks => GpuWorld::Emulated { ranks },
        }
    }

    /// Bytes the model allocates per rank besides its layers: state, normalised input,
    /// layer output, and per layer a snapshot of all three when traced.
    pub fn rank_bytes(&self, layers: usize, traced: bool) -> usize {
        let snapshots = if traced {
            layers * (self.state_bytes + 2 * self.io_bytes)
        } else {
            0
        };
        self.state_bytes + 2 * self.io_bytes + snapshots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MoeConfig;
    use crate::model::RmsNorm;
    use crate::weights::LayerWeights;
    use std::sync::Arc;

    fn layer(index: usize, cfg: MoeConfig) -> ModelLayer {
        ModelLayer {
            index,
            weights: Arc::new(LayerWeights::random(&cfg, index as u64)),
            norm: RmsNorm::ones(cfg.hidden, 1e-6),
            config: cfg,
            logit_bias: None,
            hash_table: None,
        }
    }

    #[test]
    fn buffers_are_sized_for_the_widest_dtype_and_fewest_tokens() {
        let mut a = MoeConfig::new(48, 64, 64, 8, 2);
        a.dtype = Dtype::Bf16;
        let mut b = MoeConfig::new(32, 64, 128, 16, 4);
        b.dtype = Dtype::F32;
        let s = ModelShape::of(&[layer(0, a.clone()), layer(1, b)]).unwrap();
        assert_eq!((s.hidden, s.world, s.tokens), (64, 1, 32));
        assert_eq!(s.state_bytes, 32 * 64 * 4);
        assert_eq!(s.io_bytes, 32 * 64 * 4);
        assert_eq!(s.gpu_world(), GpuWorld::Single);
        let only_bf16 = ModelShape::of(&[layer(0, a)]).unwrap();
        assert_eq!(only_bf16.io_bytes, 48 * 64 * 2);
        assert_eq!(only_bf16.rank_bytes(1, false), 48 * 64 * (4 + 2 * 2));
        assert_eq!(
            only_bf16.rank_bytes(3, true),
            only_bf16.rank_bytes(3, false) + 3 * 48 * 64 * (4 + 2 * 2)
        );
    }

    #[test]
    fn stacks_must_share_hidden_and_world() {
        assert!(matches!(
            ModelShape::of(&[]),
            Err(Error::InvalidConfig {
                field: "layers",
                ..
            })
        ));
        let a = MoeConfig::new(16, 64, 64, 8, 2);
        let mut b = MoeConfig::new(16, 128, 64, 8, 2);
        assert!(matches!(
            ModelShape::of(&[layer(0, a.clone()), layer(1, b.clone())]),
            Err(Error::InvalidConfig {
                field: "hidden",
                ..
            })
        ));
        b.hidden = 64;
        b.world = 2;
        assert!(matches!(
            ModelShape::of(&[layer(0, a), layer(1, b.clone())]),
            Err(Error::InvalidConfig { field: "world", .. })
        ));
        let s = ModelShape::of(&[layer(0, b)]).unwrap();
        assert_eq!(s.gpu_world(), GpuWorld::Emulated { ranks: 2 });
    }
}
