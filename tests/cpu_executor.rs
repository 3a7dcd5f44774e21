//! The CPU executor against the reference, over a randomized matrix of configs, plus
//! provenance (every row lands where the plan says), epochs and the timeout path.

use flashmoe::cpu::signal_word;
use flashmoe::plan::{meta_parts, TileMode, CELL_RECV, CELL_SEND, NO_PAIR};
use flashmoe::reference::{self, LayerOutput, RankInput, RouteOverrides};
use flashmoe::weights::random_tokens;
use flashmoe::{
    Capacity, CpuExecutor, Dtype, Error, GivenRouting, LayerPlan, LayerWeights, MlpKind, MoeConfig,
    Placement, Router, SharedExperts,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const ROUTERS: [Router; 10] = [
    Router::Softmax { renormalize: true },
    Router::Softmax { renormalize: false },
    Router::SigmoidBias { renormalize: true },
    Router::SigmoidBias { renormalize: false },
    Router::SigmoidInput,
    Router::TopkSoftmax,
    Router::SqrtSoftplusBias { renormalize: true },
    Router::SparseMixer {
        jitter_bits: 0x3c23_d70a, // 0.01
    },
    Router::Given,
    Router::HashSqrtSoftplus,
];
const MLPS: [MlpKind; 6] = [
    MlpKind::SwiGlu,
    MlpKind::GeGlu,
    MlpKind::Gelu,
    MlpKind::Relu,
    // gpt-oss (random weights then carry expert biases); limit 1.5 so the clamps bite.
    MlpKind::ClampedSwiGlu {
        alpha_bits: 0x3fd9_db23,     // 1.702
        limit_bits: 0x3fc0_0000,     // 1.5
        up_offset_bits: 0x3f80_0000, // 1.0 (gpt-oss)
    },
    // DeepSeek-V4: silu(min(g, 1.5)) * clamp(u, ±1.5).
    MlpKind::ClampedSwiGlu {
        alpha_bits: 0x3f80_0000,
        limit_bits: 0x3fc0_0000,
        up_offset_bits: 0,
    },
];

/// One test case: config, staging, per-rank token counts, overrides.
#[derive(Debug, Clone)]
struct Case {
    cfg: MoeConfig,
    staging: bool,
    tokens: Vec<usize>,
    ov: RouteOverrides,
    seed: u64,
}

impl Case {
    fn new(cfg: MoeConfig) -> Self {
        let tokens = vec![cfg.tokens; cfg.world];
        Case {
            cfg,
            staging: false,
            tokens,
            ov: RouteOverrides::default(),
            seed: 1,
        }
    }
}

/// `k` distinct experts per token, in random order, with random weights.
fn random_routing(rng: &mut StdRng, tokens: usize, experts: usize, k: usize) -> GivenRouting {
    let mut ids = Vec::with_capacity(tokens * k);
    let mut perm: Vec<u32> = (0..experts as u32).collect();
    for _ in 0..tokens {
        for j in 0..k {
            let p = rng.random_range(j..experts);
            perm.swap(j, p);
        }
        ids.extend_from_slice(&perm[..k]);
    }
    let weights = (0..ids.len())
        .map(|_| rng.random_range(0.05..1.0))
        .collect();
    GivenRouting { ids, weights }
}

struct Inputs {
    tokens: Vec<usize>,
    x: Vec<Vec<f32>>,
    routing: Vec<Option<GivenRouting>>,
}

impl Inputs {
    fn random(case: &Case) -> Self {
        let mut rng = StdRng::seed_from_u64(case.seed ^ 0x5eed);
        let cfg = &case.cfg;
        let x = case
            .tokens
            .iter()
            .enumerate()
            .map(|(r, &t)| random_tokens(cfg, t, case.seed * 100 + r as u64))
            .collect();
        let routing = case
            .tokens
            .iter()
            .map(|&t| {
                cfg.router.takes_ids().then(|| {
                    let mut r = random_routing(&mut rng, t, cfg.experts, cfg.top_k);
                    // The hash router takes ids only (from its token-id table).
                    if cfg.router == Router::HashSqrtSoftplus {
                        r.weights.clear();
                    }
                    r
                })
            })
            .collect();
        Inputs {
            tokens: case.tokens.clone(),
            x,
            routing,
        }
    }

    fn rank_inputs(&self) -> Vec<RankInput<'_>> {
        self.x
            .iter()
            .zip(&self.routing)
            .zip(&self.tokens)
            .map(|((x, r), &tokens)| RankInput {
                x,
                tokens,
                routing: r.as_ref(),
            })
            .collect()
    }
}

/// Asserts the executor's output equals the reference's: gates exactly, outputs within
/// the dtype's tolerance relative to the largest reference value of the rank.
fn assert_matches(what: &str, dtype: Dtype, got: &LayerOutput, want: &LayerOutput) {
    assert_eq!(got.gates, want.gates, "{what}: gate decisions differ");
    assert_eq!(got.dropped, want.dropped, "{what}: dropped");
    assert_eq!(
        got.expert_counts, want.expert_counts,
        "{what}: expert counts"
    );
    assert_eq!(got.out.len(), want.out.len(), "{what}: ranks");
    for (r, (g, w)) in got.out.iter().zip(&want.out).enumerate() {
        let err = reference::normalised_error(g, w);
        assert!(
            err <= reference::tolerance(dtype),
            "{what}: rank {r}: normalised error {err:e} (lengths {} / {})",
            g.len(),
            w.len()
        );
    }
}

/// Runs one case through the reference and the executor; returns the executor's output.
fn check(case: &Case) -> LayerOutput {
    let cfg = &case.cfg;
    let plan = LayerPlan::with_staging(cfg, case.staging).expect("valid case");
    let w = Arc::new(LayerWeights::random(cfg, case.seed));
    let inputs = Inputs::random(case);
    let ri = inputs.rank_inputs();
    let want = reference::forward(&plan, &w, &ri, &case.ov).expect("reference");
    let mut ex = CpuExecutor::new(plan, w).expect("executor");
    let got = ex.forward(&ri, &case.ov).expect("executor forward");
    assert_matches(&format!("{case:?}"), cfg.dtype, &got, &want);
    got
}

fn base(world: usize, experts: usize, top_k: usize) -> MoeConfig {
    let mut c = MoeConfig::new(24, 64, 64, experts, top_k);
    c.world = world;
    c.dtype = Dtype::F32;
    c
}

/// A random valid config: world 1..=8, uneven maps (sometimes a rank with no experts),
/// every router, MLP kind and dtype, shared experts, capacity factors and dropless.
fn random_case(rng: &mut StdRng, seed: u64) -> Case {
    let world = rng.random_range(1..=8usize);
    let experts = rng.random_range(world.max(2)..=16usize);
    let top_k = rng.random_range(1..=experts.min(8));
    let tokens = if rng.random_bool(0.2) {
        rng.random_range(65..=100)
    } else {
        rng.random_range(1..=40)
    };
    let mut c = MoeConfig::new(
        tokens,
        [64, 128][rng.random_range(0..2)],
        [64, 128][rng.random_range(0..2)],
        experts,
        top_k,
    );
    c.world = world;
    c.router = ROUTERS[rng.random_range(0..ROUTERS.len())];
    if matches!(c.router, Router::SparseMixer { .. }) {
        // PhiMoE's sparsemixer picks exactly two experts.
        c.top_k = 2;
    }
    if c.router.scales_input() {
        // Llama-4's input-scaling router is top-1.
        c.top_k = 1;
    }
    c.mlp = MLPS[rng.random_range(0..MLPS.len())];
    c.dtype = [Dtype::F32, Dtype::Bf16, Dtype::F16][rng.random_range(0..3)];
    c.capacity = if rng.random_bool(0.3) {
        Capacity::Dropless
    } else {
        Capacity::Factor(rng.random_range(0.1..2.0))
    };
    c.routed_scale = if rng.random_bool(0.5) { 1.0 } else { 2.5 };
    // Group-limited selection where the router allows it: a divisor of the expert count
    // as the group count, and enough groups kept for top-k.
    if matches!(
        c.router,
        Router::Softmax { .. } | Router::SigmoidBias { .. } | Router::SqrtSoftplusBias { .. }
    ) && rng.random_bool(0.3)
    {
        let divisors: Vec<usize> = (2..=experts.min(32)).filter(|g| experts % g == 0).collect();
        if !divisors.is_empty() {
            let groups = divisors[rng.random_range(0..divisors.len())];
            let size = experts / groups;
            let keep = rng.random_range(top_k.div_ceil(size).max(1)..=groups);
            c.group_limit = Some(flashmoe::config::GroupLimit { groups, keep });
        }
    }
    c.router_f32 = rng.random_bool(0.3);
    c.shared = match rng.random_range(0..3) {
        0 => None,
        n => Some(SharedExperts {
            count: rng.random_range(1..=2),
            intermediate: 64,
            gated: n == 2,
        }),
    };
    if rng.random_bool(0.6) {
        // Leave the last rank without experts half of the time (when possible).
        let ranks = if world > 1 && rng.random_bool(0.5) {
            world - 1
        } else {
            world
        };
        c.placement = Placement::Map(
            (0..experts)
                .map(|_| rng.random_range(0..ranks) as u32)
                .collect(),
        );
    }
    let tokens = (0..world)
        .map(|_| match rng.random_range(0..5) {
            0 => 0,
            1 => c.tokens,
            _ => rng.random_range(0..=c.tokens),
        })
        .collect();
    let mut ov = RouteOverrides::default();
    if rng.random_bool(0.2) {
        ov.top_k = Some(rng.random_range(1..=c.top_k));
    }
    if c.router != Router::Given && rng.random_bool(0.2) {
        ov.logit_bias = Some((0..experts).map(|_| rng.random_range(-1.0..1.0)).collect());
    }
    Case {
        cfg: c,
        staging: rng.random_bool(0.5),
        tokens,
        ov,
        seed,
    }
}

/// A random case whose pair lists are long enough for wide tasks: bf16 or f16, 97 to 160
/// tokens on every rank, dropless, and every token routed (given ids) to every expert, so
/// that each (source, expert) pair list holds all of the source's tokens.
fn wide_case(rng: &mut StdRng, seed: u64) -> Case {
    let mut case = random_case(rng, seed);
    let c = &mut case.cfg;
    c.dtype = [Dtype::Bf16, Dtype::F16][rng.random_range(0..2)];
    c.tokens = rng.random_range(97..=160);
    c.capacity = Capacity::Dropless;
    c.router = Router::Given;
    c.group_limit = None;
    c.top_k = c.experts;
    case.tokens = vec![c.tokens; c.world];
    case.ov = RouteOverrides::default();
    case
}

/// Tasks per tile shape `[decode, prefill, wide, classic]` that a forward with `plan` ran:
/// every kept (source, expert) pair list in tasks, through the plan's tile rule.
fn tile_census(plan: &LayerPlan, out: &LayerOutput) -> [usize; 4] {
    let lists = out
        .gates
        .iter()
        .flat_map(|g| g.expert_counts.iter())
        .map(|&c| (c as usize).min(plan.capacity));
    let census = plan.tile_census(lists);
    [census.decode, census.prefill, census.wide, census.classic]
}

#[test]
fn randomized_matrix_matches_the_reference() {
    let mut rng = StdRng::seed_from_u64(2026);
    let (mut dropped_cases, mut empty_rank_cases) = (0, 0);
    let mut shapes = [0usize; 4];
    // 300 random cases, then a few whose lists are long enough for wide tasks.
    for seed in 0..306 {
        let case = if seed < 300 {
            random_case(&mut rng, seed)
        } else {
            wide_case(&mut rng, seed)
        };
        let out = check(&case);
        dropped_cases += usize::from(out.dropped > 0);
        empty_rank_cases += usize::from(case.tokens.contains(&0));
        let plan = LayerPlan::with_staging(&case.cfg, case.staging).expect("valid case");
        let census = tile_census(&plan, &out);
        shapes.iter_mut().zip(census).for_each(|(s, n)| *s += n);
    }
    // The matrix must actually reach the edge cases it claims to cover.
    assert!(dropped_cases > 0, "no case dropped anything");
    assert!(empty_rank_cases > 0, "no case had a rank with 0 tokens");
    // ... and every tile shape of the rule (decode, prefill, wide, classic).
    assert!(
        shapes.iter().all(|&n| n > 0),
        "tile shapes used: {shapes:?}"
    );
}

/// The bits of everything a forward returns.
fn bits(out: &LayerOutput) -> (Vec<Vec<u32>>, String) {
    let values = out
        .out
        .iter()
        .map(|o| o.iter().map(|v| v.to_bits()).collect())
        .collect();
    (
        values,
        format!("{:?} {} {:?}", out.gates, out.dropped, out.expert_counts),
    )
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // Same randomized matrix generator, with more tokens so that ranks have several
    // expert and token units to share; every thread count must give the same bits.
    let mut rng = StdRng::seed_from_u64(77);
    let mut multi_unit_cases = 0;
    for seed in 0..60 {
        let mut case = random_case(&mut rng, seed);
        if seed % 2 == 0 {
            case.cfg.tokens = rng.random_range(65..=160);
            case.tokens = vec![case.cfg.tokens; case.cfg.world];
        }
        let cfg = &case.cfg;
        let plan = LayerPlan::with_staging(cfg, case.staging).expect("valid case");
        let w = Arc::new(LayerWeights::random(cfg, case.seed));
        let inputs = Inputs::random(&case);
        let ri = inputs.rank_inputs();
        let mut ex = CpuExecutor::new(plan, w).expect("executor");
        ex.set_threads(1);
        assert_eq!(ex.threads(), cfg.world, "one thread per rank at least");
        let want = ex.forward(&ri, &case.ov).expect("forward");
        multi_unit_cases += usize::from(case.tokens.iter().any(|&t| t > 64));
        for threads in [cfg.world + 1, 2 * cfg.world + 1, 4 * cfg.world + 3] {
            ex.set_threads(threads);
            assert_eq!(ex.threads(), threads);
            let got = ex.forward(&ri, &case.ov).expect("forward");
            assert!(
                bits(&got) == bits(&want),
                "{threads} threads differ from {} on {case:?}",
                cfg.world
            );
        }
    }
    assert!(
        multi_unit_cases > 10,
        "too few cases with several units per rank"
    );
}

#[test]
fn every_tile_mode_gives_the_same_bits() {
    // The tile rule only changes how the pair lists are cut into tasks (wide tasks under
    // auto) and the shape each task is computed with: auto, narrow and classic outputs
    // must be bit-identical, over decode-, prefill- and wide-sized cases.
    let mut rng = StdRng::seed_from_u64(4242);
    let mut shapes = [0usize; 4];
    for seed in 0..68 {
        let mut case = if seed < 60 {
            random_case(&mut rng, seed)
        } else {
            wide_case(&mut rng, seed)
        };
        if seed < 60 && seed % 3 == 0 {
            case.cfg.tokens = rng.random_range(65..=160);
            case.tokens = vec![case.cfg.tokens; case.cfg.world];
        }
        let cfg = &case.cfg;
        let plan = LayerPlan::with_staging(cfg, case.staging).expect("valid case");
        assert_eq!(plan.tile_mode, TileMode::Auto, "auto is the default");
        let w = Arc::new(LayerWeights::random(cfg, case.seed));
        let inputs = Inputs::random(&case);
        let ri = inputs.rank_inputs();
        let mut auto = CpuExecutor::new(plan.clone(), w.clone()).expect("executor");
        let got = auto.forward(&ri, &case.ov).expect("auto forward");
        for mode in [TileMode::Narrow, TileMode::Classic] {
            let mut other =
                CpuExecutor::new(plan.clone().with_tile_mode(mode), w.clone()).expect("executor");
            let want = other.forward(&ri, &case.ov).expect("forward");
            assert!(
                bits(&got) == bits(&want),
                "auto differs from {} on {case:?}",
                mode.name()
            );
        }
        let census = tile_census(&plan, &got);
        shapes.iter_mut().zip(census).for_each(|(s, n)| *s += n);
    }
    let [decode, prefill, wide, classic] = shapes;
    assert!(decode > 50, "too few decode tasks: {shapes:?}");
    assert!(prefill > 10, "too few prefill tasks: {shapes:?}");
    assert!(wide > 10, "too few wide tasks: {shapes:?}");
    assert!(
        classic > 10,
        "too few classic (f32 over 32 rows) tasks: {shapes:?}"
    );
}

#[test]
fn every_router_and_mlp_kind() {
    for (i, &router) in ROUTERS.iter().enumerate() {
        for (j, &mlp) in MLPS.iter().enumerate() {
            let mut c = base(3, 7, 2);
            c.router = router;
            c.mlp = mlp;
            c.hidden = 128;
            if router.scales_input() {
                c.top_k = 1;
            }
            let mut case = Case::new(c);
            case.seed = (10 * i + j) as u64;
            check(&case);
        }
    }
}

#[test]
fn bf16_and_f16_within_tolerance() {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let mut c = base(4, 8, 2);
        c.dtype = dtype;
        c.hidden = 128;
        c.intermediate = 128;
        c.shared = Some(SharedExperts {
            count: 1,
            intermediate: 64,
            gated: true,
        });
        check(&Case::new(c));
    }
}

#[test]
fn uneven_placement_with_a_rank_that_owns_nothing() {
    let mut c = base(4, 6, 3);
    c.placement = Placement::Map(vec![0, 0, 0, 2, 2, 3]);
    let plan = LayerPlan::new(&c).expect("plan");
    assert!(plan.local_experts[1].is_empty());
    let mut case = Case::new(c);
    case.tokens = vec![5, 24, 0, 17];
    check(&case);
}

#[test]
fn blocked_placement_with_uneven_split_and_staging() {
    let mut c = base(3, 8, 2);
    c.tokens = 40;
    let mut case = Case::new(c);
    case.staging = true;
    case.tokens = vec![40, 1, 13];
    check(&case);
}

#[test]
fn zero_tokens_everywhere() {
    let mut case = Case::new(base(3, 4, 2));
    case.tokens = vec![0, 0, 0];
    let out = check(&case);
    assert!(out.out.iter().all(Vec::is_empty));
    assert_eq!(out.expert_counts, vec![0; 4]);
}

/// Every token of every rank on expert `e` (and the next ids for the other choices).
fn all_on_one_expert(c: &MoeConfig, tokens: &[usize], e: u32) -> Vec<GivenRouting> {
    tokens
        .iter()
        .map(|&t| GivenRouting {
            ids: (0..t)
                .flat_map(|_| (0..c.top_k as u32).map(move |j| (e + j) % c.experts as u32))
                .collect(),
            weights: vec![0.5; t * c.top_k],
        })
        .collect()
}

fn run_given(
    c: &MoeConfig,
    tokens: &[usize],
    routing: &[GivenRouting],
) -> (LayerOutput, LayerOutput) {
    let plan = LayerPlan::new(c).expect("plan");
    let w = Arc::new(LayerWeights::random(c, 3));
    let x: Vec<Vec<f32>> = tokens
        .iter()
        .enumerate()
        .map(|(r, &t)| random_tokens(c, t, r as u64))
        .collect();
    let ri: Vec<RankInput> = x
        .iter()
        .zip(routing)
        .zip(tokens)
        .map(|((x, r), &tokens)| RankInput {
            x,
            tokens,
            routing: Some(r),
        })
        .collect();
    let ov = RouteOverrides::default();
    let want = reference::forward(&plan, &w, &ri, &ov).expect("reference");
    let got = CpuExecutor::new(plan, w)
        .expect("executor")
        .forward(&ri, &ov)
        .expect("forward");
    assert_matches("given routing", c.dtype, &got, &want);
    (got, want)
}

#[test]
fn every_token_on_one_expert_overflows_capacity() {
    let mut c = base(2, 4, 1);
    c.router = Router::Given;
    c.tokens = 100;
    c.capacity = Capacity::Factor(1.0); // ceil(100 / 4) = 25 pairs per (source, expert)
    let tokens = [100, 70];
    let (got, _) = run_given(&c, &tokens, &all_on_one_expert(&c, &tokens, 2));
    // Each source rank keeps 25 rows of expert 2 and drops the rest.
    assert_eq!(got.dropped, (100 - 25) + (70 - 25));
    assert_eq!(got.expert_counts, vec![0, 0, 170, 0]);
    assert_eq!(got.gates[0].dropped, 75);
    assert_eq!(got.gates[1].dropped, 45);
}

#[test]
fn dropless_keeps_every_pair() {
    let mut c = base(3, 4, 2);
    c.router = Router::Given;
    c.tokens = 130;
    c.capacity = Capacity::Dropless;
    let tokens = [130, 0, 129];
    let (got, _) = run_given(&c, &tokens, &all_on_one_expert(&c, &tokens, 1));
    assert_eq!(got.dropped, 0);
    assert_eq!(got.expert_counts, vec![0, 259, 259, 0]);
}

#[test]
fn top_k_from_1_to_8() {
    for k in 1..=8 {
        let mut c = base(2, 10, k);
        c.router = if k % 2 == 0 {
            Router::Softmax { renormalize: true }
        } else {
            Router::SigmoidBias { renormalize: true }
        };
        let mut case = Case::new(c);
        case.seed = k as u64;
        let out = check(&case);
        assert_eq!(out.gates[0].ids.len(), 24 * k);
    }
}

#[test]
fn shared_experts_gated_and_ungated() {
    for gated in [false, true] {
        for count in [1, 3] {
            let mut c = base(2, 4, 2);
            c.shared = Some(SharedExperts {
                count,
                intermediate: 64,
                gated,
            });
            c.routed_scale = 2.5;
            let mut case = Case::new(c);
            case.tokens = vec![24, 3];
            check(&case);
        }
    }
}

#[test]
fn back_to_back_forwards_advance_epochs_and_repeat_results() {
    let mut c = base(4, 8, 2);
    c.placement = Placement::Map(vec![0, 1, 1, 1, 3, 3, 0, 1]);
    c.dtype = Dtype::Bf16;
    let plan = LayerPlan::new(&c).expect("plan");
    let w = Arc::new(LayerWeights::random(&c, 5));
    let mut ex = CpuExecutor::new(plan.clone(), w.clone()).expect("executor");
    let ov = RouteOverrides::default();
    let xs: Vec<Vec<f32>> = (0..4).map(|r| random_tokens(&c, 24, r)).collect();
    let ri: Vec<RankInput> = xs
        .iter()
        .map(|x| RankInput {
            x,
            tokens: 24,
            routing: None,
        })
        .collect();
    let first = ex.forward(&ri, &ov).expect("first");
    assert_eq!(ex.epoch(), 1);
    let second = ex.forward(&ri, &ov).expect("second");
    assert_eq!(ex.epoch(), 2);
    assert_eq!(
        first, second,
        "the same inputs must give bit-identical outputs"
    );
    // Fewer tokens next: stale rows and signals of the last epoch must not leak in.
    let ri2: Vec<RankInput> = xs
        .iter()
        .enumerate()
        .map(|(r, x)| RankInput {
            x: &x[..r * 5 * c.hidden],
            tokens: r * 5,
            routing: None,
        })
        .collect();
    let third = ex.forward(&ri2, &ov).expect("third");
    let want = reference::forward(&plan, &w, &ri2, &ov).expect("reference");
    assert_matches("third forward", c.dtype, &third, &want);
}

#[test]
fn a_silent_rank_ends_in_a_typed_timeout_and_the_executor_recovers() {
    // (world, silent rank, threads): without helpers, and with helpers waiting on the
    // ranks' queues when the wait fails.
    for (world, silent, threads) in [(3, 1, 3), (3, 1, 10), (1, 0, 4)] {
        let c = base(world, 6, 2);
        let plan = LayerPlan::new(&c).expect("plan");
        let w = Arc::new(LayerWeights::random(&c, 8));
        let mut ex = CpuExecutor::new(plan.clone(), w.clone()).expect("executor");
        ex.set_timeout(Duration::from_millis(200));
        ex.set_threads(threads);
        ex.set_silent_rank(Some(silent));
        let xs: Vec<Vec<f32>> = (0..world as u64)
            .map(|r| random_tokens(&c, 24, r))
            .collect();
        let ri: Vec<RankInput> = xs
            .iter()
            .map(|x| RankInput {
                x,
                tokens: 24,
                routing: None,
            })
            .collect();
        let ov = RouteOverrides::default();
        let started = std::time::Instant::now();
        match ex.forward(&ri, &ov) {
            Err(Error::Timeout {
                stage,
                awaited,
                expected,
                observed,
                waited_ms,
                ..
            }) => {
                assert!(stage == "dispatch" || stage == "combine", "{stage}");
                assert!(awaited.contains(&format!("rank {silent}")), "{awaited}");
                assert_eq!(expected, 1);
                assert_eq!(observed, 0);
                assert!(waited_ms >= 200);
            }
            other => panic!("{threads} threads: expected a timeout, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the other ranks and the helpers must give up"
        );
        ex.set_silent_rank(None);
        let got = ex.forward(&ri, &ov).expect("recovered");
        assert_eq!(ex.epoch(), 2);
        let want = reference::forward(&plan, &w, &ri, &ov).expect("reference");
        assert_matches("after timeout", c.dtype, &got, &want);
    }
}

#[test]
fn invalid_inputs_are_refused_before_any_thread_starts() {
    let c = base(2, 4, 2);
    let plan = LayerPlan::new(&c).expect("plan");
    let w = Arc::new(LayerWeights::random(&c, 1));
    let mut ex = CpuExecutor::new(plan, w).expect("executor");
    let x = random_tokens(&c, 2, 0);
    let one = [RankInput {
        x: &x,
        tokens: 2,
        routing: None,
    }];
    let field = |r: flashmoe::Result<LayerOutput>| match r {
        Err(Error::InvalidInput { field, .. }) => field,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    assert_eq!(
        field(ex.forward(&one, &RouteOverrides::default())),
        "inputs"
    );
    let two = [one[0], one[0]];
    let ov = RouteOverrides {
        top_k: Some(3),
        logit_bias: None,
    };
    assert_eq!(field(ex.forward(&two, &ov)), "overrides.top_k");
    let bad = [
        one[0],
        RankInput {
            x: &x[1..],
            tokens: 2,
            routing: None,
        },
    ];
    assert_eq!(field(ex.forward(&bad, &RouteOverrides::default())), "x");
    assert_eq!(ex.epoch(), 0, "refused calls do not start an epoch");
    let mut wrong = LayerWeights::random(&c, 1);
    wrong.experts.pop();
    assert!(matches!(
        CpuExecutor::new(LayerPlan::new(&c).expect("plan"), Arc::new(wrong)),
        Err(Error::InvalidInput {
            field: "weights.experts",
            ..
        })
    ));
}

/// Token rows that say where they come from, exact in bf16: element 0 is the rank,
/// element 1 the token, the rest small integers mixing both.
fn provenance_row(rank: usize, token: usize, hidden: usize) -> Vec<f32> {
    (0..hidden)
        .map(|j| match j {
            0 => rank as f32,
            1 => token as f32,
            _ => ((rank * 31 + token * 17 + j) % 64) as f32 / 8.0 - 4.0,
        })
        .collect()
}

#[test]
fn provenance_every_row_and_signal_lands_where_the_plan_says() {
    for staging in [false, true] {
        let mut c = base(4, 7, 3);
        c.dtype = Dtype::Bf16;
        c.router = Router::Given;
        c.tokens = 90;
        c.capacity = Capacity::Factor(1.0);
        c.placement = Placement::Map(vec![3, 0, 0, 3, 2, 0, 3]);
        let plan = LayerPlan::with_staging(&c, staging).expect("plan");
        let h = c.hidden;
        let tokens = [90, 0, 33, 64];
        let mut rng = StdRng::seed_from_u64(77);
        let xs: Vec<Vec<f32>> = tokens
            .iter()
            .enumerate()
            .map(|(r, &t)| (0..t).flat_map(|i| provenance_row(r, i, h)).collect())
            .collect();
        for x in &xs {
            assert!(
                x.iter().all(|&v| Dtype::Bf16.round(v) == v),
                "rows must be bf16-exact"
            );
        }
        let routing: Vec<GivenRouting> = tokens
            .iter()
            .map(|&t| {
                let mut r = random_routing(&mut rng, t, 7, 3);
                // Skew towards expert 1 so some pairs overflow its capacity of 39.
                for tok in 0..t {
                    if !r.ids[tok * 3..tok * 3 + 3].contains(&1) {
                        r.ids[tok * 3] = 1;
                    }
                }
                r
            })
            .collect();
        let ri: Vec<RankInput> = xs
            .iter()
            .zip(&routing)
            .zip(&tokens)
            .map(|((x, r), &tokens)| RankInput {
                x,
                tokens,
                routing: Some(r),
            })
            .collect();
        let w = Arc::new(LayerWeights::random(&c, 4));
        let mut ex = CpuExecutor::new(plan.clone(), w.clone()).expect("executor");
        let ov = RouteOverrides::default();
        let got = ex.forward(&ri, &ov).expect("forward");
        let want = reference::forward(&plan, &w, &ri, &ov).expect("reference");
        assert_matches("provenance", c.dtype, &got, &want);
        assert!(got.dropped > 0, "the case must overflow");
        let epoch = ex.epoch();
        for (s, g) in got.gates.iter().enumerate() {
            check_provenance(&ex, &plan, &w, s, g, epoch, staging);
        }
    }
}

/// Rank `s`'s rows, metadata, partials and signals, derived here from its routing `g`
/// alone (independently of the plan's own routing code): every token row lands once on
/// each rank its choices go to, in token order; its metadata names exactly its kept
/// choices there; every partial is the sum of exactly those experts' outputs.
fn check_provenance(
    ex: &CpuExecutor,
    plan: &LayerPlan,
    w: &LayerWeights,
    s: usize,
    g: &flashmoe::reference::GateOutput,
    epoch: u64,
    staging: bool,
) {
    let (c, hl, k) = (&plan.config, &plan.heap, 3);
    let h = c.hidden;
    let tokens = g.ids.len() / k;
    let owner = |e: u32| plan.owners[e as usize];
    let mut rows_to = vec![0usize; c.world];
    let mut kept = vec![0u32; c.experts];
    for t in 0..tokens {
        let choices = &g.ids[t * k..(t + 1) * k];
        let mut ranks: Vec<usize> = choices.iter().map(|&e| owner(e).rank as usize).collect();
        ranks.sort_unstable();
        ranks.dedup();
        for r in ranks {
            let q = rows_to[r];
            rows_to[r] += 1;
            let heap = ex.heap(r).expect("heap");
            let row = heap
                .values(hl.dispatch_row(CELL_RECV, s, q), h)
                .expect("row");
            assert_eq!(
                row,
                provenance_row(s, t, h),
                "rank {s} token {t} -> rank {r} slot {q}"
            );
            if staging && r != s {
                let mine = ex.heap(s).expect("heap");
                let staged = mine
                    .values(hl.dispatch_row(CELL_SEND, r, q), h)
                    .expect("row");
                assert_eq!(
                    staged, row,
                    "staged copy of rank {s} token {t} for rank {r}"
                );
            }
            let mut meta = vec![0u64; plan.route_slots];
            heap.read_words(hl.row_meta(CELL_RECV, s, q, 0), &mut meta)
                .expect("meta");
            let mine: Vec<usize> = (0..k)
                .filter(|&j| owner(choices[j]).rank as usize == r && g.slots[t * k + j] >= 0)
                .collect();
            let mut partial = vec![0f64; h];
            for (i, &m) in meta.iter().enumerate() {
                let (pair, wt) = meta_parts(m);
                let Some(&j) = mine.get(i) else {
                    assert_eq!(
                        pair, NO_PAIR,
                        "rank {s} token {t}: entry {i} on rank {r} must be unused"
                    );
                    continue;
                };
                let e = choices[j];
                kept[e as usize] += 1;
                assert_eq!(
                    wt,
                    g.weights[t * k + j],
                    "weight of rank {s} token {t} choice {j}"
                );
                // The pair list maps the pair back to this row; pairs of one expert are
                // contiguous and in token order: base(local) + slot.
                let mut back = [0u32; 2];
                heap.read_u32s(hl.pair(CELL_RECV, s, pair as usize & !1), &mut back)
                    .expect("pair");
                assert_eq!(
                    back[pair as usize % 2] as usize,
                    q,
                    "pair {pair} of rank {s} on rank {r}"
                );
                let o = owner(e);
                let mut counts = vec![0u32; plan.local_experts[r].len()];
                heap.read_u32s(hl.count(CELL_RECV, s, 0), &mut counts)
                    .expect("counts");
                let base: u32 = counts[..o.local as usize].iter().sum();
                assert_eq!(
                    pair,
                    base + g.slots[t * k + j] as u32,
                    "pair index of rank {s} token {t}"
                );
                let y = reference::expert_mlp(c, &w.experts[e as usize], c.intermediate, &row);
                partial
                    .iter_mut()
                    .zip(&y)
                    .for_each(|(a, v)| *a += f64::from(wt) * v);
            }
            let got = ex
                .heap(s)
                .expect("heap")
                .values(hl.combine_row(CELL_RECV, r, q), h)
                .expect("partial");
            let scale = partial.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(&partial) {
                assert!(
                    (f64::from(*a) - b).abs() <= 2e-2 * scale,
                    "partial of rank {r} for rank {s} token {t}"
                );
            }
        }
    }
    for (r, &rows) in rows_to.iter().enumerate() {
        let dsig = ex
            .heap(r)
            .expect("heap")
            .load_signal(hl.dispatch_signal(s))
            .expect("signal");
        assert_eq!(
            dsig,
            signal_word(epoch, rows),
            "dispatch signal {s} -> rank {r}"
        );
        let csig = ex
            .heap(s)
            .expect("heap")
            .load_signal(hl.combine_signal(r))
            .expect("signal");
        assert_eq!(
            csig,
            signal_word(epoch, rows),
            "combine signal rank {r} -> {s}"
        );
    }
    for (e, &kept) in kept.iter().enumerate() {
        assert_eq!(
            kept,
            g.expert_counts[e].min(plan.capacity as u32),
            "kept pairs of expert {e} from rank {s}"
        );
    }
}

#[test]
fn experts_packed_one_at_a_time_give_the_same_output() {
    let mut c = base(2, 6, 2);
    c.shared = Some(SharedExperts {
        count: 1,
        intermediate: 64,
        gated: false,
    });
    let plan = LayerPlan::new(&c).expect("plan");
    let xs = [random_tokens(&c, 24, 1), random_tokens(&c, 17, 2)];
    let inputs = RankInput::per_rank(&xs, &[24, 17]);
    let ov = RouteOverrides::default();
    let whole = Arc::new(LayerWeights::random(&c, 3));
    let want = CpuExecutor::new(plan.clone(), whole)
        .expect("executor")
        .forward(&inputs, &ov)
        .expect("forward");
    let gate = LayerWeights::random_gate(&c, 3);
    let expert = |e: usize| Ok(LayerWeights::random_expert(&c, 3, e));
    let got = CpuExecutor::from_parts(plan.clone(), &gate, &expert)
        .expect("executor")
        .forward(&inputs, &ov)
        .expect("forward");
    assert_eq!(got.out, want.out);
    // A wrong expert is refused, naming the tensor.
    let bad = |e: usize| {
        let mut w = LayerWeights::random_expert(&c, 3, e);
        w.w1.pop();
        Ok(w)
    };
    let err = CpuExecutor::from_parts(plan, &gate, &bad).expect_err("short w1");
    assert!(err.to_string().contains("weights.experts[].w1"), "{err}");
}

#[test]
fn hash_routing_weights_the_table_ids_by_their_scores() {
    // A 5-token vocabulary, top-2 of 6 experts: token id v picks experts v and v + 1.
    let mut c = base(2, 6, 2);
    c.router = Router::HashSqrtSoftplus;
    c.routed_scale = 1.5;
    let table: Vec<u32> = (0..5u32).flat_map(|v| [v, v + 1]).collect();
    let token_ids = [[4u32, 0, 2, 2], [1, 3, 0, 4]];
    let routing: Vec<GivenRouting> = token_ids
        .iter()
        .map(|t| GivenRouting::from_table(&table, 2, t).expect("in the table"))
        .collect();
    let plan = LayerPlan::new(&c).expect("plan");
    let w = Arc::new(LayerWeights::random(&c, 8));
    let xs = [random_tokens(&c, 4, 1), random_tokens(&c, 4, 2)];
    let ri: Vec<RankInput> = xs
        .iter()
        .zip(&routing)
        .map(|(x, r)| RankInput {
            x,
            tokens: 4,
            routing: Some(r),
        })
        .collect();
    let ov = RouteOverrides::default();
    let want = reference::forward(&plan, &w, &ri, &ov).expect("reference");
    let got = CpuExecutor::new(plan, w.clone())
        .expect("executor")
        .forward(&ri, &ov)
        .expect("forward");
    assert_matches("hash", c.dtype, &got, &want);
    // By hand: the ids of the table, weights sqrt(softplus(logit)) renormalised x 1.5.
    let h = c.hidden;
    for (r, g) in want.gates.iter().enumerate() {
        for (t, &tok) in token_ids[r].iter().enumerate() {
            assert_eq!(&g.ids[2 * t..2 * t + 2], &[tok, tok + 1]);
            let x = &xs[r][t * h..(t + 1) * h];
            let score = |e: u32| {
                let l: f64 = x
                    .iter()
                    .zip(&w.router[e as usize * h..(e as usize + 1) * h])
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                (l.max(0.0) + (-l.abs()).exp().ln_1p()).sqrt()
            };
            let (a, b) = (score(tok), score(tok + 1));
            let want_w = [1.5 * a / (a + b), 1.5 * b / (a + b)];
            for (j, ww) in want_w.iter().enumerate() {
                assert!((f64::from(g.weights[2 * t + j]) - ww).abs() < 1e-6);
            }
        }
    }
    // A token id past the table, given weights, or no routing at all are refused.
    assert!(GivenRouting::from_table(&table, 2, &[5]).is_err());
    let mut with_weights = routing[0].clone();
    with_weights.weights = vec![0.5; 8];
    let bad = [
        RankInput {
            x: &xs[0],
            tokens: 4,
            routing: Some(&with_weights),
        },
        ri[1],
    ];
    let err = reference::forward(&LayerPlan::new(&c).expect("plan"), &w, &bad, &ov);
    assert!(matches!(err, Err(Error::InvalidInput { .. })), "{err:?}");
}
