//! Configuration of one MoE layer and its validation.
//!
//! [`MoeConfig::validate`] is the single gate every other part of the crate relies on: a
//! config that passes it can be planned, allocated and launched without any arithmetic
//! overflow or out-of-range index. Every refusal is an [`Error::InvalidConfig`] that
//! names the field and the limit.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Hidden and intermediate sizes must be multiples of this: it is the K and N depth of
/// one GEMM tile in the kernel, and it keeps every row 16-byte aligned in every dtype.
pub const DIM_MULTIPLE: usize = 64;
/// Largest hidden or intermediate size accepted (per expert).
pub const MAX_DIM: usize = 65_536;
/// Largest number of tokens per rank in one launch.
pub const MAX_TOKENS: usize = 1 << 20;
/// Largest number of routed experts.
pub const MAX_EXPERTS: usize = 1024;
/// Largest top-k (the kernel keeps a token's k choices in registers).
pub const MAX_TOP_K: usize = 16;
/// Largest world (number of ranks).
pub const MAX_WORLD: usize = 1024;
/// Largest number of shared experts.
pub const MAX_SHARED_EXPERTS: usize = 16;
/// Largest capacity factor; beyond it, use [`Capacity::Dropless`].
pub const MAX_CAPACITY_FACTOR: f32 = 1024.0;

/// Storage type of tokens and weights on the device. Accumulation is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

impl Dtype {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// Rounds an f32 to the nearest value this dtype can store (round to nearest even).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
            Dtype::F16 => half::f16::from_f32(x).to_f32(),
            Dtype::F32 => x,
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        }
    }
}

/// The expert MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MlpKind {
    /// `down(silu(gate x) * up x)`.
    SwiGlu,
    /// `down(gelu(gate x) * up x)` (tanh approximation of GELU).
    GeGlu,
    /// `down(gelu(up x))` (tanh approximation of GELU).
    Gelu,
    /// `down(relu(up x))`.
    Relu,
    /// The clamped SwiGLU of gpt-oss and DeepSeek-V4: `g = min(gate x, limit)`,
    /// `u = clamp(up x, -limit, limit)`, `down((u + up_offset) * g * sigmoid(alpha * g))`.
    /// gpt-oss uses `alpha` 1.702 and `up_offset` 1 ([`MlpKind::clamped_swiglu`]);
    /// DeepSeek-V4 uses `alpha` 1 and `up_offset` 0, i.e. `silu(g) * u`
    /// ([`MlpKind::clamped_silu_glu`]). The parameters are kept as their f32 bits (so that
    /// the kind stays `Eq` and `Hash`); read them with [`MlpKind::clamp_params`].
    ClampedSwiGlu {
        /// `alpha.to_bits()`.
        alpha_bits: u32,
        /// `limit.to_bits()`.
        limit_bits: u32,
        /// `up_offset.to_bits()`: added to the clamped up projection (1 for gpt-oss, 0 for
        /// DeepSeek-V4).
        up_offset_bits: u32,
    },
}

/// The parameters of [`MlpKind::ClampedSwiGlu`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClampParams {
    /// Scale inside the gate's sigmoid.
    pub alpha: f32,
    /// The clamp: the gate is clamped above at `limit`, the up projection to `±limit`.
    pub limit: f32,
    /// Added to the clamped up projection.
    pub up_offset: f32,
}

impl MlpKind {
    /// Whether the first GEMM produces a gate and an up projection.
    pub fn is_gated(self) -> bool {
        matches!(
            self,
            MlpKind::SwiGlu | MlpKind::GeGlu | MlpKind::ClampedSwiGlu { .. }
        )
    }

    /// The clamped SwiGLU of gpt-oss with sigmoid scale `alpha` and clamp `limit`:
    /// `(clamp(u, -limit, limit) + 1) * g * sigmoid(alpha g)`, `g = min(gate, limit)`.
    pub fn clamped_swiglu(alpha: f32, limit: f32) -> Self {
        MlpKind::ClampedSwiGlu {
            alpha_bits: alpha.to_bits(),
            limit_bits: limit.to_bits(),
            up_offset_bits: 1f32.to_bits(),
        }
    }

    /// The clamped SwiGLU of DeepSeek-V4 (`swiglu_limit`): `silu(min(gate, limit)) *
    /// clamp(up, -limit, limit)`, i.e. [`MlpKind::ClampedSwiGlu`] with `alpha` 1 and
    /// `up_offset` 0.
    pub fn clamped_silu_glu(limit: f32) -> Self {
        MlpKind::ClampedSwiGlu {
            alpha_bits: 1f32.to_bits(),
            limit_bits: limit.to_bits(),
            up_offset_bits: 0f32.to_bits(),
        }
    }

    /// The parameters of [`MlpKind::ClampedSwiGlu`]; `None` for the other kinds.
    pub fn clamp_params(self) -> Option<ClampParams> {
        match self {
            MlpKind::ClampedSwiGlu {
                alpha_bits,
                limit_bits,
                up_offset_bits,
            } => Some(ClampParams {
                alpha: f32::from_bits(alpha_bits),
                limit: f32::from_bits(limit_bits),
                up_offset: f32::from_bits(up_offset_bits),
            }),
            _ => None,
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            MlpKind::SwiGlu => "swiglu",
            MlpKind::GeGlu => "geglu",
            MlpKind::Gelu => "gelu",
            MlpKind::Relu => "relu",
            MlpKind::ClampedSwiGlu {
                up_offset_bits: 0, ..
            } => "clamped-silu-glu",
            MlpKind::ClampedSwiGlu { .. } => "clamped-swiglu",
        }
    }
}

/// How tokens pick their experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Router {
    /// Softmax over all experts' logits, then top-k; with `renormalize`, the k weights are
    /// divided by their sum (Mixtral, Qwen3); without, the raw probabilities are used.
    Softmax {
        /// Divide the k selected probabilities by their sum.
        renormalize: bool,
    },
    /// DeepSeek-V3: sigmoid scores; a per-expert bias is added for the selection only; the
    /// weights are the unbiased scores, renormalised over the k chosen if asked.
    SigmoidBias {
        /// Divide the k selected scores by their sum.
        renormalize: bool,
    },
    /// Llama-4: top-k on the logits; the chosen expert's input is scaled by
    /// `sigmoid(logit)` (times `routed_scale`) and its output added with weight 1.
    SigmoidInput,
    /// DeepSeek-V4: scores `sqrt(softplus(logit))`, the selection bias added for the
    /// choice only, weights the chosen scores (divided by their sum + 1e-20 when
    /// `renormalize`) times `routed_scale`.
    SqrtSoftplusBias {
        /// Divide the k selected scores by their sum.
        renormalize: bool,
    },
    /// gpt-oss: `logits = x . W^T + b` (the router bias, `LayerWeights::router_bias`), the
    /// top-k of the logits, weighted by the softmax over those k logits.
    TopkSoftmax,
    /// PhiMoE's sparsemixer at inference (top-2): the first choice is the largest logit
    /// `m1`, weighted by the softmax over the experts whose logit is within relative
    /// distance `2 eps` of `m1` (`(m1 - s_j) / max(|s_j|, m1) <= 2 eps`); the second is the
    /// largest of the others, `m2`, weighted likewise over the others within `2 eps` of
    /// `m2`. `jitter_bits` holds `eps` (`router_jitter_noise`) as f32 bits: see
    /// [`Router::sparse_mixer`].
    SparseMixer {
        /// `eps.to_bits()`.
        jitter_bits: u32,
    },
    /// The caller gives the expert ids and weights of every token.
    Given,
    /// DeepSeek-V4's hash layers: the caller gives each token's expert ids
    /// (`GivenRouting::ids`, looked up by token id in the layer's table: see
    /// [`GivenRouting::from_table`]) and no weights; the weights are the chosen experts'
    /// `sqrt(softplus(logit))` scores divided by their sum + 1e-20, times `routed_scale`.
    HashSqrtSoftplus,
}

impl Router {
    /// PhiMoE's sparsemixer with jitter epsilon `eps` (`router_jitter_noise`, 0.01).
    pub fn sparse_mixer(eps: f32) -> Router {
        Router::SparseMixer {
            jitter_bits: eps.to_bits(),
        }
    }

    /// True when the router has a per-expert bias `[experts]` (`LayerWeights::router_bias`):
    /// a selection bias (sigmoid-bias, sqrt-softplus-bias) or gpt-oss's logit bias.
    pub fn has_bias(self) -> bool {
        matches!(
            self,
            Router::SigmoidBias { .. } | Router::SqrtSoftplusBias { .. } | Router::TopkSoftmax
        )
    }

    /// The sparsemixer's epsilon (0 for other routers).
    pub fn jitter(self) -> f32 {
        match self {
            Router::SparseMixer { jitter_bits } => f32::from_bits(jitter_bits),
            _ => 0.0,
        }
    }

    /// True when the routing weight scales the expert's input rather than its output
    /// ([`Router::SigmoidInput`]).
    pub fn scales_input(self) -> bool {
        matches!(self, Router::SigmoidInput)
    }

    /// True when the caller gives the expert ids ([`Router::Given`], and
    /// [`Router::HashSqrtSoftplus`] from its token-id table).
    pub fn takes_ids(self) -> bool {
        matches!(self, Router::Given | Router::HashSqrtSoftplus)
    }
}

/// How many rows each (source rank, expert) pair may send.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Capacity {
    /// `ceil(factor * tokens * top_k / experts)` rows, rounded up to the tile height; pairs
    /// past it are dropped and counted.
    Factor(f32),
    /// Room for every token: nothing is ever dropped.
    Dropless,
}

/// Which rank owns which expert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// Contiguous blocks: with E experts on R ranks, the first `E % R` ranks own
    /// `E / R + 1` experts and the others `E / R`.
    Blocked,
    /// An explicit expert -> rank map of length `experts`; ranks may own different numbers
    /// of experts, including none.
    Map(Vec<u32>),
}

/// Group-limited expert selection (DeepSeek `n_group` / `topk_group`): the experts are split
/// into `groups` equal groups of consecutive ids; each group is scored (softmax router: the
/// largest probability in the group, as DeepSeek-V2's `group_limited_greedy`; sigmoid-bias
/// router: the sum of the group's two largest biased scores, as DeepSeek-V3's `noaux_tc`),
/// the `keep` best groups are kept (ties to the lower group), and the top-k is taken over the
/// kept groups' experts; the others rank last (transformers 5 masks them with -inf for the
/// sigmoid router, with probability 0 for softmax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimit {
    /// Number of groups (`n_group`), dividing `experts`; at most [`MAX_GROUPS`].
    pub groups: usize,
    /// Groups kept per token (`topk_group`), `1..=groups`.
    pub keep: usize,
}

/// Most expert groups of [`GroupLimit`] (the kernel scores one group per lane of a warp).
pub const MAX_GROUPS: usize = 32;

/// Experts that every token goes through, on its own rank (DeepSeekMoE, Qwen2-MoE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedExperts {
    /// Number of shared experts (DeepSeek fuses them into one MLP of `count * intermediate`).
    pub count: usize,
    /// Intermediate size of each shared expert.
    pub intermediate: usize,
    /// Scale the shared output by `sigmoid(x . w_gate)` (Qwen2-MoE's `shared_expert_gate`).
    pub gated: bool,
}

/// One MoE layer as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Largest number of tokens any rank brings to one launch (ranks may bring fewer).
    pub tokens: usize,
    /// Model (hidden) size.
    pub hidden: usize,
    /// Intermediate size of one routed expert.
    pub intermediate: usize,
    /// Number of routed experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Capacity per (source rank, expert).
    pub capacity: Capacity,
    /// Storage type of tokens and weights.
    pub dtype: Dtype,
    /// The expert MLP.
    pub mlp: MlpKind,
    /// The router.
    pub router: Router,
    /// Multiplier applied to the routed weights after selection and renormalisation
    /// (DeepSeek's `routed_scaling_factor`; 1.0 elsewhere).
    pub routed_scale: f32,
    /// Always-on experts, if any.
    pub shared: Option<SharedExperts>,
    /// Number of ranks.
    pub world: usize,
    /// Expert placement.
    pub placement: Placement,
    /// Group-limited selection, if any (DeepSeek-V2 236B, V3/R1, Kimi-K2, GLM-4.5).
    #[serde(default)]
    pub group_limit: Option<GroupLimit>,
    /// The router weight stays f32 whatever `dtype` (DeepSeek-V3 family: transformers keeps
    /// `gate.weight` in f32 and computes the logits in f32); otherwise it is rounded to
    /// `dtype` like every other weight.
    #[serde(default)]
    pub router_f32: bool,
}

impl MoeConfig {
    /// A small single-rank config with sensible defaults (softmax top-k, SwiGLU, bf16,
    /// dropless: every token reaches every one of its top-k experts).
    pub fn new(
        tokens: usize,
        hidden: usize,
        intermediate: usize,
        experts: usize,
        top_k: usize,
    ) -> Self {
        MoeConfig {
            tokens,
            hidden,
            intermediate,
            experts,
            top_k,
            capacity: Capacity::Dropless,
            dtype: Dtype::Bf16,
            mlp: MlpKind::SwiGlu,
            router: Router::Softmax { renormalize: true },
            routed_scale: 1.0,
            shared: None,
            world: 1,
            placement: Placement::Blocked,
            group_limit: None,
            router_f32: false,
        }
    }

    /// Checks every field; the first violation is returned as [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<()> {
        if self.tokens > MAX_TOKENS {
            return Err(Error::config(
                "tokens",
                self.tokens,
                format!("at most {MAX_TOKENS} per rank"),
            ));
        }
        check_dim("hidden", self.hidden)?;
        check_dim("intermediate", self.intermediate)?;
        if let Some(ClampParams {
            alpha,
            limit,
            up_offset,
        }) = self.mlp.clamp_params()
        {
            if !(alpha.is_finite() && limit.is_finite() && limit > 0.0 && up_offset.is_finite()) {
                return Err(Error::config(
                    "mlp",
                    format!("clamped-swiglu alpha {alpha} limit {limit} up offset {up_offset}"),
                    "a finite alpha, a finite positive limit and a finite up offset",
                ));
            }
        }
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            return Err(Error::config(
                "experts",
                self.experts,
                format!("between 1 and {MAX_EXPERTS}"),
            ));
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(Error::config(
                "top_k",
                self.top_k,
                format!("between 1 and {MAX_TOP_K}"),
            ));
        }
        if self.top_k > self.experts {
            return Err(Error::config(
                "top_k",
                self.top_k,
                format!("at most `experts` = {}", self.experts),
            ));
        }
        if let Capacity::Factor(f) = self.capacity {
            if !f.is_finite() || f <= 0.0 || f > MAX_CAPACITY_FACTOR {
                return Err(Error::config(
                    "capacity",
                    f,
                    format!("a finite factor in (0, {MAX_CAPACITY_FACTOR}], or Dropless"),
                ));
            }
        }
        if !self.routed_scale.is_finite() || self.routed_scale <= 0.0 {
            return Err(Error::config(
                "routed_scale",
                self.routed_scale,
                "finite and > 0",
            ));
        }
        if let Some(s) = &self.shared {
            if s.count == 0 || s.count > MAX_SHARED_EXPERTS {
                return Err(Error::config(
                    "shared.count",
                    s.count,
                    format!("between 1 and {MAX_SHARED_EXPERTS} (use None for no shared experts)"),
                ));
            }
            check_dim("shared.intermediate", s.intermediate)?;
        }
        self.check_group_limit()?;
        if self.router.scales_input() && self.top_k != 1 {
            // One row per (token, rank) carries the token once, so it cannot carry a
            // different input scale per expert; Llama-4 routes top-1.
            return Err(Error::config(
                "top_k",
                self.top_k,
                "1 with the sigmoid-input router (Llama-4)",
            ));
        }
        if let Router::SparseMixer { .. } = self.router {
            let eps = self.router.jitter();
            if !eps.is_finite() || !(0.0..1.0).contains(&eps) {
                return Err(Error::config("router.jitter", eps, "finite, in [0, 1)"));
            }
            if self.top_k != 2 {
                return Err(Error::config(
                    "top_k",
                    self.top_k,
                    "2 with the sparsemixer router (PhiMoE)",
                ));
            }
        }
        if self.world == 0 || self.world > MAX_WORLD {
            return Err(Error::config(
                "world",
                self.world,
                format!("between 1 and {MAX_WORLD}"),
            ));
        }
        if let Placement::Map(map) = &self.placement {
            if map.len() != self.experts {
                return Err(Error::config(
                    "placement",
                    format!("a map of length {}", map.len()),
                    format!("length must equal `experts` = {}", self.experts),
                ));
            }
            if let Some((e, r)) = map
                .iter()
                .enumerate()
                .find(|(_, &r)| r as usize >= self.world)
            {
                return Err(Error::config(
                    "placement",
                    format!("expert {e} -> rank {r}"),
                    format!("ranks must be < `world` = {}", self.world),
                ));
            }
        }
        Ok(())
    }

    fn check_group_limit(&self) -> Result<()> {
        let Some(g) = self.group_limit else {
            return Ok(());
        };
        if g.groups == 0 || g.groups > MAX_GROUPS || !self.experts.is_multiple_of(g.groups) {
            return Err(Error::config(
                "group_limit.groups",
                g.groups,
                format!(
                    "between 1 and {MAX_GROUPS}, dividing `experts` = {}",
                    self.experts
                ),
            ));
        }
        if g.keep == 0 || g.keep > g.groups {
            return Err(Error::config(
                "group_limit.keep",
                g.keep,
                format!("between 1 and `group_limit.groups` = {}", g.groups),
            ));
        }
        if self.top_k > g.keep * (self.experts / g.groups) {
            return Err(Error::config(
                "top_k",
                self.top_k,
                format!(
                    "at most the experts of the kept groups = {}",
                    g.keep * (self.experts / g.groups)
                ),
            ));
        }
        if !matches!(
            self.router,
            Router::Softmax { .. } | Router::SigmoidBias { .. } | Router::SqrtSoftplusBias { .. }
        ) {
            return Err(Error::config(
                "group_limit",
                "Some",
                "only with the softmax, sigmoid-bias and sqrt-softplus-bias routers",
            ));
        }
        Ok(())
    }

    /// The rank that owns each expert (validated config assumed; unknown ranks are kept).
    pub fn expert_owners(&self) -> Vec<u32> {
        match &self.placement {
            Placement::Map(map) => map.clone(),
            Placement::Blocked => {
                let (e, r) = (self.experts, self.world.max(1));
                let (base, extra) = (e / r, e % r);
                let mut owners = Vec::with_capacity(e);
                for rank in 0..r {
                    let n = base + usize::from(rank < extra);
                    owners.extend(std::iter::repeat_n(rank as u32, n));
                }
                owners
            }
        }
    }

    /// Width of the first GEMM's output: `2 * intermediate` when gated.
    pub fn gemm0_width(&self) -> usize {
        if self.mlp.is_gated() {
            2 * self.intermediate
        } else {
            self.intermediate
        }
    }
}

fn check_dim(field: &'static str, v: usize) -> Result<()> {
    if v == 0 || v > MAX_DIM || !v.is_multiple_of(DIM_MULTIPLE) {
        return Err(Error::config(
            field,
            v,
            format!("a multiple of {DIM_MULTIPLE} between {DIM_MULTIPLE} and {MAX_DIM}"),
        ));
    }
    Ok(())
}

/// Routing given by the caller for [`Router::Given`]: `ids[t * top_k + j]` is token t's
/// j-th expert and `weights[t * top_k + j]` its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct GivenRouting {
    /// Expert ids, `tokens * top_k`.
    pub ids: Vec<u32>,
    /// Weights, `tokens * top_k`.
    pub weights: Vec<f32>,
}

impl GivenRouting {
    /// The routing of a hash layer ([`Router::HashSqrtSoftplus`]): token t's `top_k`
    /// expert ids are row `token_ids[t]` of `table` (`[vocab][top_k]`, DeepSeek-V4's
    /// `tid2eid`). A token id past the table is an error naming the token.
    pub fn from_table(table: &[u32], top_k: usize, token_ids: &[u32]) -> Result<Self> {
        let vocab = table.len().checked_div(top_k).unwrap_or(0);
        let mut ids = Vec::with_capacity(token_ids.len().saturating_mul(top_k));
        for (t, &tok) in token_ids.iter().enumerate() {
            let row = (tok as usize) * top_k;
            let Some(experts) = table
                .get(row..row + top_k)
                .filter(|_| (tok as usize) < vocab)
            else {
                return Err(Error::input(
                    "token_ids",
                    format!("token {t}: id {tok} >= the hash table's vocabulary of {vocab}"),
                ));
            };
            ids.extend_from_slice(experts);
        }
        Ok(GivenRouting {
            ids,
            weights: Vec::new(),
        })
    }

    /// Checks the token count (at most `cfg.tokens`), lengths, ids in range, no repeated
    /// expert within a token, finite weights.
    pub fn validate(&self, tokens: usize, cfg: &MoeConfig) -> Result<()> {
        if tokens > cfg.tokens {
            return Err(Error::input(
                "tokens",
                format!("{tokens} > config.tokens = {}", cfg.tokens),
            ));
        }
        let n = tokens.checked_mul(cfg.top_k).ok_or_else(|| {
            Error::input(
                "routing.ids",
                format!("tokens * top_k = {tokens} * {} overflows", cfg.top_k),
            )
        })?;
        if self.ids.len() != n {
            return Err(Error::input(
                "routing.ids",
                format!("length {} != tokens * top_k = {n}", self.ids.len()),
            ));
        }
        // The hash router computes the weights itself: none may be given.
        let weights = if cfg.router == Router::HashSqrtSoftplus {
            0
        } else {
            n
        };
        if self.weights.len() != weights {
            return Err(Error::input(
                "routing.weights",
                format!(
                    "length {} != {weights} ({} router)",
                    self.weights.len(),
                    if weights == 0 {
                        "the hash"
                    } else {
                        "tokens * top_k for the given"
                    }
                ),
            ));
        }
        for (i, &id) in self.ids.iter().enumerate() {
            if id as usize >= cfg.experts {
                return Err(Error::input(
                    "routing.ids",
                    format!(
                        "token {} choice {}: expert {id} >= experts = {}",
                        i / cfg.top_k,
                        i % cfg.top_k,
                        cfg.experts
                    ),
                ));
            }
            let t0 = i - i % cfg.top_k;
            if self.ids[t0..i].contains(&id) {
                return Err(Error::input(
                    "routing.ids",
                    format!("token {} names expert {id} twice", i / cfg.top_k),
                ));
            }
        }
        if let Some(i) = self.weights.iter().position(|w| !w.is_finite()) {
            return Err(Error::input(
                "routing.weights",
                format!(
                    "token {} choice {}: weight {} is not finite",
                    i / cfg.top_k,
                    i % cfg.top_k,
                    self.weights[i]
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
