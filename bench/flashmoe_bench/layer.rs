//! `flashmoe-bench layer`: check one layer against the reference, then time it.

use crate::args::{LayerArgs, ShapeArgs, WorldArg};
use crate::backend::{self, Runner};
use crate::report::Report;
use crate::stats::summarize;
use flashmoe::config::{GivenRouting, MoeConfig, Router};
use flashmoe::metrics::LayerWork;
use flashmoe::plan::TileMode;
use flashmoe::reference::{self, LayerOutput, RankInput, RouteOverrides};
use flashmoe::weights::{random_tokens, LayerWeights};
use flashmoe::{Error, LayerPlan, Result};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

/// Random caller routing: k distinct experts per token, equal weights.
pub fn random_routing(cfg: &MoeConfig, tokens: usize, seed: u64) -> GivenRouting {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(tokens * cfg.top_k);
    for _ in 0..tokens {
        ids.extend(
            sample(&mut rng, cfg.experts, cfg.top_k)
                .into_iter()
                .map(|e| e as u32),
        );
    }
    GivenRouting {
        weights: vec![1.0 / cfg.top_k as f32; ids.len()],
        ids,
    }
}

/// Token rows to check on each rank: all of them, or `n` spread evenly.
pub fn sample_rows(tokens: usize, n: usize) -> Vec<usize> {
    if tokens <= n {
        return (0..tokens).collect();
    }
    (0..n).map(|i| i * tokens / n).collect()
}

/// Compares the rows `rows[r]` of `out[r]` (rank r's output, `[tokens][hidden]`; may be
/// empty for a rank with no rows to check) with the reference over every rank's `inputs`;
/// returns the max error relative to the reference's largest magnitude.
pub fn check_rows(
    plan: &LayerPlan,
    weights: &LayerWeights,
    inputs: &[RankInput],
    ov: &RouteOverrides,
    out: &[Vec<f32>],
    rows: &[Vec<usize>],
) -> Result<f64> {
    let want = reference::forward_rows(plan, weights, inputs, ov, rows)?;
    compare(plan, out, rows, &want)
}

/// The rows `rows[r]` of `out[r]` against the reference's `want[r]` (from
/// `reference::forward_rows` on the same rows); returns the max error relative to the
/// reference's largest magnitude.
pub fn compare(
    plan: &LayerPlan,
    out: &[Vec<f32>],
    rows: &[Vec<usize>],
    want: &[Vec<Vec<f64>>],
) -> Result<f64> {
    let h = plan.config.hidden;
    let (mut max_err, mut max_ref) = (0.0f64, 0.0f64);
    for (r, rank_rows) in rows.iter().enumerate() {
        for (i, &t) in rank_rows.iter().enumerate() {
            let g = out
                .get(r)
                .and_then(|o| o.get(t * h..(t + 1) * h))
                .ok_or_else(|| {
                    Error::input("output", format!("rank {r} has no row {t} to check"))
                })?;
            for (a, b) in g.iter().zip(&want[r][i]) {
                if !a.is_finite() {
                    return Err(Error::input(
                        "output",
                        format!("rank {r} token {t} holds {a}"),
                    ));
                }
                max_err = max_err.max((*a as f64 - b).abs());
                max_ref = max_ref.max(b.abs());
            }
        }
    }
    Ok(if max_ref > 0.0 {
        max_err / max_ref
    } else {
        max_err
    })
}

/// The outputs of an unchecked run must at least be finite.
pub fn all_finite(out: &[Vec<f32>]) -> Result<()> {
    for (r, o) in out.iter().enumerate() {
        if let Some(i) = o.iter().position(|v| !v.is_finite()) {
            return Err(Error::input(
                "output",
                format!(
                    "rank {r} value {i} is {} (run not checked, but not finite either)",
                    o[i]
                ),
            ));
        }
    }
    Ok(())
}

/// Kept rows per expert over all ranks, from the gates of a run.
pub fn kept_per_expert(cfg: &MoeConfig, out: &LayerOutput) -> Vec<u64> {
    let mut kept = vec![0u64; cfg.experts];
    for g in &out.gates {
        for (&id, &slot) in g.ids.iter().zip(&g.slots) {
            if slot >= 0 {
                kept[id as usize] += 1;
            }
        }
    }
    kept
}

/// Every rank's tokens (and routing with the given router), regenerated from the seed the
/// same way in every process.
pub struct RankData {
    /// Tokens per rank, `[tokens][hidden]`.
    pub xs: Vec<Vec<f32>>,
    /// The caller's routing per rank (given router only).
    pub routing: Vec<Option<GivenRouting>>,
}

impl RankData {
    /// The data of every rank of `cfg.world` for `seed`.
    pub fn generate(cfg: &MoeConfig, seed: u64) -> Self {
        let xs = (0..cfg.world)
            .map(|r| random_tokens(cfg, cfg.tokens, seed.wrapping_add(1 + r as u64)))
            .collect();
        let routing = (0..cfg.world)
            .map(|r| {
                matches!(cfg.router, Router::Given)
                    .then(|| random_routing(cfg, cfg.tokens, seed.wrapping_add(100 + r as u64)))
            })
            .collect();
        RankData { xs, routing }
    }

    /// One input per rank, `tokens` tokens each.
    pub fn inputs(&self, tokens: usize) -> Vec<RankInput<'_>> {
        self.xs
            .iter()
            .zip(&self.routing)
            .map(|(x, g)| RankInput {
                x,
                tokens,
                routing: g.as_ref(),
            })
            .collect()
    }
}

/// Runs the `layer` subcommand.
pub fn run(args: &LayerArgs) -> Result<Report> {
    let shape: &ShapeArgs = &args.shape;
    let gpu = backend::wants_gpu(shape.backend, shape.world)?;
    let (preset, cfg) = shape.config(gpu)?;
    let plan = shape.plan(&cfg)?;
    let memory = plan.memory(0).to_string();
    let estimate = crate::memory::layer(&plan, shape.check_tokens, gpu, shape.world.ranks());
    if !shape.json {
        eprintln!("plan: {memory}");
        eprintln!("memory estimate: {}", estimate.describe());
    }
    estimate.check("flashmoe-bench layer", shape.max_host_memory)?;
    crate::memory::check_device(&estimate, 0)?;
    let data = RankData::generate(&cfg, shape.seed);
    let inputs = data.inputs(cfg.tokens);
    let ov = RouteOverrides::default();
    let rows: Vec<Vec<usize>> = inputs
        .iter()
        .map(|i| sample_rows(i.tokens, shape.check_tokens))
        .collect();
    let (want, mut runner): (_, Box<dyn Runner>) = if gpu {
        let weights = LayerWeights::random(&cfg, shape.seed);
        let want = reference::forward_rows(&plan, &weights, &inputs, &ov, &rows)?;
        (want, backend::gpu_runner(&plan, &weights, shape.world)?)
    } else {
        // The routed experts come one at a time, for the reference and then for packing:
        // the layer is never held as f32 beside its packed copy.
        let gate = LayerWeights::random_gate(&cfg, shape.seed);
        let expert = |e: usize| Ok(LayerWeights::random_expert(&cfg, shape.seed, e));
        let want = reference::forward_rows_streamed(&plan, &gate, &expert, &inputs, &ov, &rows)?;
        (want, backend::cpu_runner_parts(&plan, &gate, &expert)?)
    };
    let first = runner.run(&inputs, &ov)?;
    let tol = reference::tolerance(cfg.dtype);
    // `--check-tokens 0`: nothing is compared, the report says "not checked" (the output
    // must still be finite).
    let err = if shape.check_tokens == 0 {
        all_finite(&first.out)?;
        None
    } else {
        Some(compare(&plan, &first.out, &rows, &want)?)
    };
    if let Some(err) = err.filter(|&e| e > tol) {
        return Err(Error::input(
            "output",
            format!("max relative error {err:.3e} exceeds the tolerance {tol:.0e}: not timing a wrong result"),
        ));
    }
    let samples = runner.time(&inputs, &ov, shape.warmup, shape.iters)?;
    // The last timed launch's phase times (device timestamps), before the roofline runs.
    let phases = runner.phases()?;
    // What the kernel's task counts must be for this routing (the timed launches route
    // exactly as the first, checked one).
    let tasks_expected = match &phases {
        Some(_) => {
            let k = ov.effective_top_k(&cfg)?;
            let routes: Vec<_> = first
                .gates
                .iter()
                .map(|g| plan.route(&g.ids, &g.slots, k))
                .collect();
            let tokens: Vec<usize> = inputs.iter().map(|i| i.tokens).collect();
            Some(plan.expected_tasks(&routes, &tokens).by_kind())
        }
        None => None,
    };
    let latency = summarize(&samples).ok_or_else(|| Error::input("timing", "no finite samples"))?;
    let tiles_compare = if args.compare_tiles {
        compare_tiles(
            &mut *runner,
            &plan,
            &inputs,
            &ov,
            &rows,
            &want,
            latency.median,
            shape,
        )?
    } else {
        Vec::new()
    };
    let kept = kept_per_expert(&cfg, &first);
    let total_tokens = (cfg.tokens * cfg.world) as u64;
    let work = LayerWork::new(&cfg, total_tokens, &kept);
    let secs = latency.median / 1e3;
    let peaks = runner.peaks()?;
    let roofline_fraction = peaks.map(|p| work.floor_seconds(p.flops, p.bytes_per_s) / secs);
    Ok(Report {
        preset,
        config: describe(&cfg, &plan),
        backend: runner.describe(),
        world: match shape.world {
            WorldArg::Emulated(r) => format!("emulated:{r} (one launch)"),
            WorldArg::Ranks(r) => format!("{r} rank(s)"),
        },
        memory,
        latency_ms: latency,
        tokens_per_s: total_tokens as f64 / secs,
        flops_per_s: work.flops / secs,
        bytes_per_s: work.bytes / secs,
        work,
        peaks,
        roofline_fraction,
        max_rel_error: err,
        tolerance: tol,
        checked_tokens: shape.check_tokens.min(cfg.tokens),
        dropped: first.dropped,
        pairs: total_tokens * cfg.top_k as u64,
        wire: Some(wire(&plan, &first, &ov)?),
        tiles: plan.tile_mode.name().to_string(),
        tiles_compare,
        phases,
        tasks_expected,
    })
}

/// `--compare-tiles`: each other tile rule on the same layer (of auto, classic, narrow
/// and auto-serial), checked against the same reference rows and timed like the first; empty when
/// the backend cannot switch.
#[allow(clippy::too_many_arguments)]
fn compare_tiles(
    runner: &mut dyn Runner,
    plan: &LayerPlan,
    inputs: &[RankInput],
    ov: &RouteOverrides,
    rows: &[Vec<usize>],
    want: &[Vec<Vec<f64>>],
    median: f64,
    shape: &ShapeArgs,
) -> Result<Vec<crate::report::TilesCompare>> {
    let mut done = Vec::new();
    for other in TileMode::ALL.into_iter().filter(|&m| m != plan.tile_mode) {
        if !runner.set_tile_mode(other) {
            break;
        }
        let out = runner.run(inputs, ov)?;
        let tol = reference::tolerance(plan.config.dtype);
        if shape.check_tokens > 0 {
            let err = compare(plan, &out.out, rows, want)?;
            if err > tol {
                return Err(Error::input(
                    "output",
                    format!(
                        "--tiles {}: max relative error {err:.3e} exceeds the tolerance {tol:.0e}",
                        other.name()
                    ),
                ));
            }
        }
        let samples = runner.time(inputs, ov, shape.warmup, shape.iters)?;
        let s = summarize(&samples).ok_or_else(|| Error::input("timing", "no finite samples"))?;
        done.push(crate::report::TilesCompare {
            other: other.name().to_string(),
            median_ms: s.median,
            ratio: s.median / median,
        });
    }
    runner.set_tile_mode(plan.tile_mode);
    Ok(done)
}

/// The dispatch bytes of the launch that produced `out`, from every rank's routing.
fn wire(plan: &LayerPlan, out: &LayerOutput, ov: &RouteOverrides) -> Result<crate::report::Wire> {
    let k = ov.effective_top_k(&plan.config)?;
    let w = flashmoe::model::WireBytes::of(plan, &out.gates, k);
    Ok(crate::report::Wire {
        dispatch_bytes: w.dispatch,
        per_expert_bytes: w.per_expert,
    })
}

/// One-line description of a config and its planned capacity.
pub fn describe(cfg: &MoeConfig, plan: &LayerPlan) -> String {
    let router = match cfg.router {
        Router::Softmax { renormalize: true } => "softmax-norm",
        Router::Softmax { renormalize: false } => "softmax",
        Router::SigmoidBias { .. } => "sigmoid-bias",
        Router::SigmoidInput => "sigmoid-input",
        Router::SparseMixer { .. } => "sparse-mixer",
        Router::SqrtSoftplusBias { .. } => "sqrt-softplus-bias",
        Router::TopkSoftmax => "topk-softmax",
        Router::Given => "given",
        Router::HashSqrtSoftplus => "hash-sqrt-softplus",
    };
    let cap = match cfg.capacity {
        flashmoe::Capacity::Factor(f) => {
            format!(
                "capacity {f} ({} pairs per source and expert)",
                plan.capacity
            )
        }
        flashmoe::Capacity::Dropless => "dropless".to_string(),
    };
    let shared = cfg.shared.map_or(String::new(), |s| {
        format!(" shared {}x{}", s.count, s.intermediate)
    });
    format!(
        "tokens/rank {} hidden {} intermediate {} experts {} top-{} {} {} {} x{}{} {}",
        cfg.tokens,
        cfg.hidden,
        cfg.intermediate,
        cfg.experts,
        cfg.top_k,
        cfg.mlp.name(),
        cfg.dtype.name(),
        router,
        cfg.routed_scale,
        shared,
        cap
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_rows_are_distinct_and_in_range() {
        assert_eq!(sample_rows(5, 64), vec![0, 1, 2, 3, 4]);
        let s = sample_rows(1000, 10);
        assert_eq!(s.len(), 10);
        assert!(s.windows(2).all(|w| w[0] < w[1]) && *s.last().unwrap() < 1000);
    }

    #[test]
    fn random_routing_is_valid() {
        let cfg = MoeConfig::new(16, 64, 64, 8, 3);
        let r = random_routing(&cfg, 16, 7);
        r.validate(16, &cfg).unwrap();
    }
}
