//! The model driver: a stack of MoE blocks, each `x = x + moe(rms_norm(x))`, run layer
//! after layer on one backend per layer.
//!
//! This is not a full transformer: attention and dense MLP layers are not part of it. It
//! chains the MoE blocks of a real checkpoint ([`load()`](load::load)) or of a synthetic model
//! ([`synthetic`]), so that routing, load imbalance and dropping can be measured across
//! layers with realistic weights. Every layer keeps its own [`MoeConfig`] (sizes, router,
//! dtype may differ); all layers share the hidden size and the world.
//!
//! - [`checkpoint`]: memory-mapped safetensors shards of a Hugging Face directory.
//! - [`families`]: `config.json` -> runtime config and tensor names, per model family.
//! - [`load()`](load::load): a checkpoint's MoE layers as [`ModelLayer`]s.
//! - [`synthetic`]: random models with skewed expert popularity, from presets.
//! - [`backend`]: the [`LayerBackend`] hook (reference, CPU executor, one GPU layer).
//!
//! On a GPU, [`crate::gpu::model::GpuModel`] runs the same stack (same maths, same
//! [`ModelLayer`]s) with every layer's norm, MoE launch and residual add enqueued on one
//! stream and no host round trip between layers.

/// Most decoder layers of a model (a checkpoint's `num_hidden_layers`, a synthetic
/// model's count, a selected range); the largest released MoE models have under 100.
pub const MAX_LAYERS: usize = 4096;

pub mod backend;
pub mod checkpoint;
pub mod families;
pub mod load;
pub mod mxfp4;
pub mod norm;
pub mod stats;
pub mod synthetic;

pub use backend::{Backend, LayerBackend, ReferenceLayer};
pub use checkpoint::Checkpoint;
pub use families::{Family, FamilyConfig};
pub use load::{load, LoadOptions, LoadedModel};
pub use norm::RmsNorm;
pub use stats::{LayerStats, WireBytes};

use crate::config::{GivenRouting, MoeConfig, Router};
use crate::error::{Error, Result};
use crate::plan::LayerPlan;
use crate::reference::{RankInput, RouteOverrides};
use crate::weights::LayerWeights;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One MoE block of a model.
#[derive(Debug, Clone)]
pub struct ModelLayer {
    /// Decoder layer index in the source model (checkpoint numbering; dense layers skipped).
    pub index: usize,
    /// The layer config (tokens, world and placement are the model's).
    pub config: MoeConfig,
    /// The weights, rounded to `config.dtype`.
    pub weights: Arc<LayerWeights>,
    /// The norm in front of the block.
    pub norm: RmsNorm,
    /// Additive per-expert logit bias passed to the router on every forward (synthetic
    /// models use it to skew expert popularity; checkpoints leave it `None`).
    pub logit_bias: Option<Vec<f32>>,
    /// A hash layer's token-id table (`[vocab][top_k]` expert ids, DeepSeek-V4's
    /// `tid2eid`): present exactly when the router is [`Router::HashSqrtSoftplus`]; the
    /// model then routes each token by its id ([`MoeModel::forward_ids`]).
    pub hash_table: Option<Arc<Vec<u32>>>,
}

/// The routing of hash layer `layer` (`table`: `[vocab][top_k]`, DeepSeek-V4's `tid2eid`)
/// for every rank's tokens (`tokens[r]` each, ids in `token_ids[r]`): each token's experts
/// are its id's row ([`GivenRouting::from_table`]). An error when there are no ids, or not
/// one id per token of every rank. Shared by the host model and the GPU model.
pub(crate) fn hash_routing_of<I: AsRef<[u32]>>(
    table: &[u32],
    top_k: usize,
    layer: usize,
    token_ids: Option<&[I]>,
    tokens: &[usize],
) -> Result<Vec<GivenRouting>> {
    let ids = token_ids.ok_or_else(|| {
        Error::input(
            "token_ids",
            format!("layer {layer} is hash-routed (experts by token id): call forward_ids"),
        )
    })?;
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
        if i.as_ref().len() != t {
            return Err(Error::input(
                "token_ids",
                format!("rank {r}: {} ids for {t} tokens", i.as_ref().len()),
            ));
        }
    }
    ids.iter()
        .map(|r| GivenRouting::from_table(table, top_k, r.as_ref()))
        .collect()
}

impl ModelLayer {
    /// The routing of a hash layer for every rank's tokens (`tokens[r]` each, ids in
    /// `token_ids[r]`): `None` for a layer that routes by itself; an error when a hash
    /// layer gets no ids or ids of the wrong count.
    pub fn hash_routing(
        &self,
        token_ids: Option<&[Vec<u32>]>,
        tokens: &[usize],
    ) -> Result<Option<Vec<GivenRouting>>> {
        match &self.hash_table {
            None => Ok(None),
            Some(table) => {
                hash_routing_of(table, self.config.top_k, self.index, token_ids, tokens).map(Some)
            }
        }
    }

    /// Checks config, weights, norm and logit bias against each other.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        if self.config.router == Router::Given {
            return Err(Error::config(
                "router",
                "Given",
                "a model layer routes by itself: softmax or sigmoid-bias",
            ));
        }
        let hash = self.config.router == Router::HashSqrtSoftplus;
        match &self.hash_table {
            Some(t) if hash => {
                let k = self.config.top_k;
                if t.is_empty() || t.len() % k != 0 {
                    return Err(Error::input(
                        "hash_table",
                        format!(
                            "{} ids is not a whole number of rows of top_k = {k}",
                            t.len()
                        ),
                    ));
                }
                for (v, row) in t.chunks(k).enumerate() {
                    let dup = row.iter().enumerate().any(|(j, e)| row[..j].contains(e));
                    if dup || row.iter().any(|&e| e as usize >= self.config.experts) {
                        return Err(Error::input(
                            "hash_table",
                            format!(
                                "token id {v}: experts {row:?} must be distinct and < {}",
                                self.config.experts
                            ),
                        ));
                    }
                }
            }
            None if !hash => {}
            _ => {
                return Err(Error::input(
                    "hash_table",
                    "present exactly when the router is HashSqrtSoftplus",
                ))
            }
        }
        self.weights.validate(&self.config)?;
        self.norm.validate(self.config.hidden)?;
        if let Some(b) = &self.logit_bias {
            if b.len() != self.config.experts || b.iter().any(|v| !v.is_finite()) {
                return Err(Error::input(
                    "logit_bias",
                    format!(
                        "needs {} finite values, has {}",
                        self.config.experts,
                        b.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What one model forward returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// The final hidden states, one `[tokens_r * hidden]` block per rank.
    pub hidden: Vec<Vec<f32>>,
    /// Per-layer statistics, in layer order.
    pub layers: Vec<LayerStats>,
    /// Wall time of the whole forward.
    pub latency: Duration,
}

struct Slot {
    layer: ModelLayer,
    backend: Box<dyn LayerBackend>,
}

/// A stack of MoE blocks, each with its own backend.
pub struct MoeModel {
    slots: Vec<Slot>,
    hidden: usize,
    world: usize,
    tokens: usize,
    top_k: Option<usize>,
}

impl std::fmt::Debug for MoeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeModel")
            .field("layers", &self.slots.len())
            .field("hidden", &self.hidden)
            .field("world", &self.world)
            .field("tokens", &self.tokens)
            .field("top_k", &self.top_k)
            .finish()
    }
}

/// What every layer of a stack shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackShape {
    /// Hidden size of every layer.
    pub hidden: usize,
    /// Ranks of every layer.
    pub world: usize,
    /// Most tokens a rank may bring: the smallest `config.tokens` over the layers.
    pub tokens: usize,
}

/// Checks a layer stack (at least one layer, each valid, one hidden size, one world) and
/// returns what the layers share. Every model backend builds on this one check.
pub fn check_stack(layers: &[ModelLayer]) -> Result<StackShape> {
    let Some(first) = layers.first() else {
        return Err(Error::config(
            "layers",
            0,
            "a model needs at least one MoE layer",
        ));
    };
    let (hidden, world) = (first.config.hidden, first.config.world);
    let mut tokens = first.config.tokens;
    for layer in layers {
        layer.validate()?;
        if layer.config.hidden != hidden {
            return Err(Error::config(
                "hidden",
                layer.config.hidden,
                format!(
                    "every layer must share hidden = {hidden} (layer {})",
                    layer.index
                ),
            ));
        }
        if layer.config.world != world {
            return Err(Error::config(
                "world",
                layer.config.world,
                format!(
                    "every layer must share world = {world} (layer {})",
                    layer.index
                ),
            ));
        }
        tokens = tokens.min(layer.config.tokens);
    }
    Ok(StackShape {
        hidden,
        world,
        tokens,
    })
}

impl MoeModel {
    /// Builds the model with one of the built-in backends for every layer.
    pub fn new(layers: Vec<ModelLayer>, backend: Backend) -> Result<Self> {
        Self::with_factory(layers, |_, plan, weights| backend.build(plan, weights))
    }

    /// Builds the model with a backend made by `factory` for each layer, from the layer,
    /// its plan and its weights. This is the hook for the GPU layer
    /// ([`crate::gpu::layer::MoeLayer`] implements [`LayerBackend`]), e.g.
    ///
    /// ```no_run
    /// # use flashmoe::model::{MoeModel, ModelLayer};
    /// # use flashmoe::gpu::layer::{GpuOptions, GpuWorld, MoeLayer};
    /// # fn build(layers: Vec<ModelLayer>) -> flashmoe::Result<MoeModel> {
    /// let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| flashmoe::Error::Cuda(e.to_string()))?;
    /// let stream = ctx.default_stream();
    /// MoeModel::with_factory(layers, |_, plan, weights| {
    ///     let layer = MoeLayer::new(stream.clone(), plan, &weights, GpuWorld::Single, GpuOptions::default())?;
    ///     Ok(Box::new(layer) as Box<dyn flashmoe::model::LayerBackend>)
    /// })
    /// # }
    /// ```
    pub fn with_factory<F>(layers: Vec<ModelLayer>, mut factory: F) -> Result<Self>
    where
        F: FnMut(&ModelLayer, LayerPlan, Arc<LayerWeights>) -> Result<Box<dyn LayerBackend>>,
    {
        let StackShape {
            hidden,
            world,
            tokens,
        } = check_stack(&layers)?;
        let mut slots = Vec::with_capacity(layers.len());
        for layer in layers {
            let plan = LayerPlan::new(&layer.config)?;
            let backend = factory(&layer, plan, Arc::clone(&layer.weights))?;
            slots.push(Slot { layer, backend });
        }
        Ok(MoeModel {
            slots,
            hidden,
            world,
            tokens,
            top_k: None,
        })
    }

    /// Number of MoE layers.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Always false: a model has at least one layer.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The layers, in order.
    pub fn layers(&self) -> impl Iterator<Item = &ModelLayer> {
        self.slots.iter().map(|s| &s.layer)
    }

    /// The backend name of each layer.
    pub fn backend_names(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.backend.name()).collect()
    }

    /// Hidden size.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Most tokens a rank may bring (the smallest `config.tokens` over the layers).
    pub fn max_tokens(&self) -> usize {
        self.tokens
    }

    /// Routes every layer with fewer experts per token (1..=each layer's top_k); `None`
    /// restores the configured top-k.
    pub fn set_top_k(&mut self, top_k: Option<usize>) {
        self.top_k = top_k;
    }

    /// Runs every layer on `x` (one `[tokens_r * hidden]` block per rank; the rows are
    /// first rounded to layer 0's dtype).
    pub fn forward(&mut self, x: &[Vec<f32>]) -> Result<ModelOutput> {
        self.run(x, None, None)
    }

    /// Like [`forward`](Self::forward), with each token's id (`token_ids[rank][token]`),
    /// which hash layers ([`Router::HashSqrtSoftplus`], DeepSeek-V4) route by.
    pub fn forward_ids(&mut self, x: &[Vec<f32>], token_ids: &[Vec<u32>]) -> Result<ModelOutput> {
        self.run(x, Some(token_ids), None)
    }

    /// Like [`forward`](Self::forward), and also returns the hidden states after each
    /// layer (`trace[l][rank]`), for layer-by-layer checks.
    pub fn forward_traced(&mut self, x: &[Vec<f32>]) -> Result<(ModelOutput, Vec<Vec<Vec<f32>>>)> {
        self.forward_traced_ids(x, None)
    }

    /// [`forward_traced`](Self::forward_traced) with token ids (see
    /// [`forward_ids`](Self::forward_ids)).
    pub fn forward_traced_ids(
        &mut self,
        x: &[Vec<f32>],
        token_ids: Option<&[Vec<u32>]>,
    ) -> Result<(ModelOutput, Vec<Vec<Vec<f32>>>)> {
        let mut trace = Vec::with_capacity(self.slots.len());
        let out = self.run(x, token_ids, Some(&mut trace))?;
        Ok((out, trace))
    }

    fn run(
        &mut self,
        x: &[Vec<f32>],
        token_ids: Option<&[Vec<u32>]>,
        mut trace: Option<&mut Vec<Vec<Vec<f32>>>>,
    ) -> Result<ModelOutput> {
        let start = Instant::now();
        if x.len() != self.world {
            return Err(Error::input(
                "x",
                format!(
                    "{} rank blocks, the model's world is {}",
                    x.len(),
                    self.world
                ),
            ));
        }
        let mut tokens = Vec::with_capacity(x.len());
        for (r, rows) in x.iter().enumerate() {
            if rows.len() % self.hidden != 0 || rows.len() / self.hidden > self.tokens {
                return Err(Error::input(
                    "x",
                    format!(
                        "rank {r}: {} values is not a whole number of rows of hidden = {} \
                         with at most {} tokens",
                        rows.len(),
                        self.hidden,
                        self.tokens
                    ),
                ));
            }
            tokens.push(rows.len() / self.hidden);
        }
        let dtype0 = self.slots[0].layer.config.dtype;
        let mut state: Vec<Vec<f32>> = x
            .iter()
            .map(|r| r.iter().map(|&v| dtype0.round(v)).collect())
            .collect();
        let mut stats = Vec::with_capacity(self.slots.len());
        for slot in &mut self.slots {
            let t0 = Instant::now();
            let layer = &slot.layer;
            let dtype = layer.config.dtype;
            let normed: Vec<Vec<f32>> = state.iter().map(|r| layer.norm.apply(r, dtype)).collect();
            let routing = layer.hash_routing(token_ids, &tokens)?;
            let mut inputs: Vec<RankInput> = RankInput::per_rank(&normed, &tokens);
            if let Some(r) = &routing {
                inputs
                    .iter_mut()
                    .zip(r)
                    .for_each(|(i, g)| i.routing = Some(g));
            }
            let ov = RouteOverrides {
                top_k: self.top_k,
                logit_bias: layer.logit_bias.clone(),
            };
            let t1 = Instant::now();
            let out = slot.backend.forward_host(&inputs, &ov)?;
            let backend_latency = t1.elapsed();
            if out.out.len() != self.world {
                return Err(Error::input(
                    "backend output",
                    format!(
                        "layer {}: {} rank blocks from {}, expected {}",
                        layer.index,
                        out.out.len(),
                        slot.backend.name(),
                        self.world
                    ),
                ));
            }
            for (r, (s, o)) in state.iter_mut().zip(&out.out).enumerate() {
                if o.len() != s.len() {
                    return Err(Error::input(
                        "backend output",
                        format!(
                            "layer {} rank {r}: {} values from {}, expected {}",
                            layer.index,
                            o.len(),
                            slot.backend.name(),
                            s.len()
                        ),
                    ));
                }
                for (v, &d) in s.iter_mut().zip(o) {
                    *v = dtype.round(*v + d);
                }
            }
            if let Some(t) = trace.as_deref_mut() {
                t.push(state.clone());
            }
            stats.push(LayerStats {
                layer: layer.index,
                latency: t0.elapsed(),
                backend_latency,
                wire: wire_of(&layer.config, &out, ov.effective_top_k(&layer.config)?),
                expert_counts: out.expert_counts,
                dropped: out.dropped,
            });
        }
        Ok(ModelOutput {
            hidden: state,
            layers: stats,
            latency: start.elapsed(),
        })
    }
}

/// The dispatch bytes of a layer's launch, from its routing (when the backend returned
/// one per rank).
fn wire_of(cfg: &MoeConfig, out: &crate::reference::LayerOutput, k: usize) -> Option<WireBytes> {
    let plan = crate::plan::LayerPlan::new(cfg).ok()?;
    (out.gates.len() == cfg.world).then(|| WireBytes::of(&plan, &out.gates, k))
}

#[cfg(test)]
mod tests;
