//! The GPU layer against the reference, on a real GPU.
//!
//! Every test prints "skipped <test>: <reason>" and passes where there is no usable GPU or
//! the library was built without kernels (set FLASHMOE_EXPECT_GPU=1 to make that a
//! failure instead).

mod gpu_support;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use flashmoe::config::{
    Capacity, Dtype, GivenRouting, MlpKind, MoeConfig, Placement, Router, SharedExperts,
};
use flashmoe::gpu::layer::{
    from_dtype_bytes, to_dtype_bytes, GpuOptions, GpuWorld, MoeLayer, RankIo,
};
use flashmoe::plan::{TileMode, CELL_RECV};
use flashmoe::reference::{self, RankInput, RouteOverrides};
use flashmoe::weights::random_tokens;
use flashmoe::{Error, ExpertWeights, LayerPlan, LayerWeights};
use gpu_support::{check_against_reference, gpu_stream};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const DTYPES: [Dtype; 3] = [Dtype::Bf16, Dtype::F16, Dtype::F32];
const MLPS: [MlpKind; 6] = [
    MlpKind::SwiGlu,
    MlpKind::GeGlu,
    MlpKind::Gelu,
    MlpKind::Relu,
    MlpKind::ClampedSwiGlu {
        alpha_bits: 0x3fd9_db23,     // 1.702
        limit_bits: 0x3fc0_0000,     // 1.5: the clamps bite on random data
        up_offset_bits: 0x3f80_0000, // 1.0 (gpt-oss)
    },
    // DeepSeek-V4: silu(min(g, 1.5)) * clamp(u, ±1.5).
    MlpKind::ClampedSwiGlu {
        alpha_bits: 0x3f80_0000,
        limit_bits: 0x3fc0_0000,
        up_offset_bits: 0,
    },
];
const ROUTERS: [Router; 8] = [
    Router::Softmax { renormalize: true },
    Router::Softmax { renormalize: false },
    Router::SigmoidBias { renormalize: true },
    Router::SigmoidInput,
    Router::TopkSoftmax,
    Router::SqrtSoftplusBias { renormalize: true },
    Router::Given,
    Router::HashSqrtSoftplus,
];
const EXPERTS: [usize; 3] = [8, 64, 128];
const TOP_K: [usize; 3] = [1, 2, 8];
const TOKENS: [usize; 4] = [1, 7, 128, 4096];
const WORLDS: [usize; 4] = [1, 2, 4, 8];
/// (token, choice) pairs over all ranks that one sampled case may cost the reference.
const PAIR_BUDGET: usize = 40_000;

fn world(ranks: usize) -> GpuWorld {
    if ranks == 1 {
        GpuWorld::Single
    } else {
        GpuWorld::Emulated { ranks }
    }
}

/// One point of the cross product: indices into the dimension lists above, plus dropless.
type Point = [usize; 9];

fn point_cost(p: &Point) -> usize {
    TOKENS[p[5]] * WORLDS[p[6]] * TOP_K[p[4]]
}

/// A point the config accepts within the budget: top-k at most the experts, and top-1 for
/// the input-scaling router (Llama-4).
fn feasible(p: &Point) -> bool {
    point_cost(p) <= PAIR_BUDGET
        && TOP_K[p[4]] <= EXPERTS[p[3]]
        && (!ROUTERS[p[2]].scales_input() || TOP_K[p[4]] == 1)
}

/// Pairwise (all-pairs) sample of the cross product within the budget: greedily keeps a
/// shuffled point when it covers a pair of (dimension, value) not covered yet. Every
/// feasible pair of values of two dimensions appears in at least one case.
fn sample_cases() -> Vec<Point> {
    let dims = [
        DTYPES.len(),
        MLPS.len(),
        ROUTERS.len(),
        EXPERTS.len(),
        TOP_K.len(),
        TOKENS.len(),
        WORLDS.len(),
        2,
        1,
    ];
    let mut all: Vec<Point> = vec![[0; 9]];
    for (d, &n) in dims.iter().enumerate() {
        all = all
            .into_iter()
            .flat_map(|p| {
                (0..n).map(move |v| {
                    let mut q = p;
                    q[d] = v;
                    q
                })
            })
            .collect();
    }
    all.retain(feasible);
    all.shuffle(&mut StdRng::seed_from_u64(2025));
    let mut covered = HashSet::new();
    let mut cases = Vec::new();
    for p in all {
        let mut new = false;
        for a in 0..8 {
            for b in a + 1..8 {
                new |= covered.insert((a, p[a], b, p[b]));
            }
        }
        if new {
            cases.push(p);
        }
    }
    cases
}

struct Case {
    cfg: MoeConfig,
    ranks: usize,
    override_k: Option<usize>,
    logit_bias: bool,
    seed: u64,
}

fn case_from_point(p: &Point, i: usize) -> Case {
    let ranks = WORLDS[p[6]];
    let experts = EXPERTS[p[3]];
    let mut cfg = MoeConfig::new(
        TOKENS[p[5]],
        128,
        if i.is_multiple_of(3) { 192 } else { 128 },
        experts,
        TOP_K[p[4]],
    );
    cfg.dtype = DTYPES[p[0]];
    cfg.mlp = MLPS[p[1]];
    cfg.router = ROUTERS[p[2]];
    cfg.capacity = if p[7] == 1 {
        Capacity::Dropless
    } else {
        Capacity::Factor(0.75)
    };
    cfg.world = ranks;
    if ranks > 1 && i % 3 == 1 {
        // Uneven placement: the last rank owns no expert.
        cfg.placement = Placement::Map((0..experts).map(|e| (e % (ranks - 1)) as u32).collect());
    }
    if i % 4 == 1 {
        cfg.shared = Some(SharedExperts {
            count: 1,
            intermediate: 64,
            gated: i % 8 == 1,
        });
    }
    if i % 5 == 2 {
        cfg.routed_scale = 2.5;
    }
    let overridable = cfg.top_k > 1 && i % 6 == 3;
    Case {
        override_k: overridable.then_some(cfg.top_k / 2),
        logit_bias: cfg.router != Router::Given && i % 7 == 4,
        cfg,
        ranks,
        seed: 1000 + i as u64,
    }
}

/// Caller routing with a hot expert 0 (half the tokens pick it first), so capacities drop.
fn given_routing(cfg: &MoeConfig, tokens: usize, rng: &mut StdRng) -> GivenRouting {
    let mut ids = Vec::with_capacity(tokens * cfg.top_k);
    let mut weights = Vec::with_capacity(tokens * cfg.top_k);
    let mut all: Vec<u32> = (0..cfg.experts as u32).collect();
    for _ in 0..tokens {
        all.shuffle(rng);
        if rng.random_bool(0.5) {
            let z = all.iter().position(|&e| e == 0).unwrap();
            all.swap(0, z);
        }
        ids.extend_from_slice(&all[..cfg.top_k]);
        weights.extend((0..cfg.top_k).map(|_| rng.random_range(0.05f32..1.0)));
    }
    GivenRouting { ids, weights }
}

/// Tokens each rank brings: the config's, except the last rank of a multi-rank world,
/// which brings half (0 for a one-token config).
fn rank_tokens(cfg: &MoeConfig, r: usize) -> usize {
    if cfg.world > 1 && r == cfg.world - 1 {
        cfg.tokens / 2
    } else {
        cfg.tokens
    }
}

struct Inputs {
    xs: Vec<Vec<f32>>,
    routing: Vec<Option<GivenRouting>>,
}

impl Inputs {
    fn random(cfg: &MoeConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let xs = (0..cfg.world)
            .map(|r| random_tokens(cfg, rank_tokens(cfg, r), seed * 31 + r as u64))
            .collect();
        let routing = (0..cfg.world)
            .map(|r| {
                cfg.router.takes_ids().then(|| {
                    let mut g = given_routing(cfg, rank_tokens(cfg, r), &mut rng);
                    // The hash router takes ids only (its table's lookup).
                    if cfg.router == Router::HashSqrtSoftplus {
                        g.weights.clear();
                    }
                    g
                })
            })
            .collect();
        Inputs { xs, routing }
    }

    fn rank_inputs(&self, cfg: &MoeConfig) -> Vec<RankInput<'_>> {
        (0..cfg.world)
            .map(|r| RankInput {
                x: &self.xs[r],
                tokens: rank_tokens(cfg, r),
                routing: self.routing[r].as_ref(),
            })
            .collect()
    }
}

#[test]
fn matches_reference_across_sampled_configs() {
    let Some((_gpu, stream)) = gpu_stream("matches_reference_across_sampled_configs") else {
        return;
    };
    let cases = sample_cases();
    println!("{} sampled cases", cases.len());
    for (i, p) in cases.iter().enumerate() {
        let case = case_from_point(p, i);
        let cfg = &case.cfg;
        let label = format!(
            "case {i}: {} {} {:?} E{} k{} T{} R{} {:?} shared={:?} scale={} override_k={:?} bias={}",
            cfg.dtype.name(),
            cfg.mlp.name(),
            cfg.router,
            cfg.experts,
            cfg.top_k,
            cfg.tokens,
            case.ranks,
            cfg.capacity,
            cfg.shared,
            cfg.routed_scale,
            case.override_k,
            case.logit_bias
        );
        let plan = LayerPlan::new(cfg).unwrap();
        let w = LayerWeights::random(cfg, case.seed);
        let inputs = Inputs::random(cfg, case.seed);
        let rank_inputs = inputs.rank_inputs(cfg);
        let mut rng = StdRng::seed_from_u64(case.seed);
        let ov = RouteOverrides {
            top_k: case.override_k,
            logit_bias: case.logit_bias.then(|| {
                (0..cfg.experts)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect()
            }),
        };
        let mut layer = MoeLayer::new(
            stream.clone(),
            plan.clone(),
            &w,
            world(case.ranks),
            GpuOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let got = layer
            .forward_host(&rank_inputs, &ov)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let (err, tol, flipped) =
            check_against_reference(&plan, &w, &rank_inputs, &ov, &got, &label);
        println!(
            "{label}: rel err {err:.2e} (tol {tol:.2e}), dropped {}, near-tie flips {flipped}",
            got.dropped
        );
        // A second forward on the same layer (epoch 2, nothing reset) gives the same result.
        let again = layer.forward_host(&rank_inputs, &ov).unwrap();
        assert_eq!(again.out, got.out, "{label}: second launch differs");
        assert_eq!(layer.epoch(0).unwrap(), 2, "{label}: epoch");
    }
}

/// Identity experts (ReLU, W0 = W1 = I) on positive rows that encode (rank, token) in
/// exactly representable values, with power-of-two routing weights: every operation is
/// exact in every dtype, so the output is checked bit for bit, and every token row is
/// found in the dispatch row and its owner's partial in the combine row the plan names.
#[test]
fn provenance_rows_land_where_the_plan_says() {
    let Some((_gpu, stream)) = gpu_stream("provenance_rows_land_where_the_plan_says") else {
        return;
    };
    let h = 64;
    let mut n = 0;
    for dtype in DTYPES {
        for ranks in WORLDS {
            for (k, capacity) in [
                (1, Capacity::Dropless),
                (2, Capacity::Factor(0.5)),
                (8, Capacity::Factor(1.0)),
            ] {
                let tokens = if n % 2 == 0 { 128 } else { 100 };
                n += 1;
                let mut cfg = MoeConfig::new(tokens, h, h, 16, k);
                cfg.dtype = dtype;
                cfg.mlp = MlpKind::Relu;
                cfg.router = Router::Given;
                cfg.capacity = capacity;
                cfg.world = ranks;
                let label = format!("{} R{ranks} k{k} {capacity:?} T{tokens}", dtype.name());
                let plan = LayerPlan::new(&cfg).unwrap();
                let eye: Vec<f32> = (0..h * h)
                    .map(|i| f32::from(u8::from(i / h == i % h)))
                    .collect();
                let w = LayerWeights {
                    router: vec![0.0; cfg.experts * h],
                    router_bias: Vec::new(),
                    experts: (0..cfg.experts)
                        .map(|_| ExpertWeights {
                            w0: eye.clone(),
                            w1: eye.clone(),
                            ..ExpertWeights::default()
                        })
                        .collect(),
                    shared: None,
                    shared_gate: None,
                };
                // Column 0: 1; columns 1..4: rank bits; columns 4..16: token bits (1 or 2).
                let encode = |r: usize, t: usize| -> Vec<f32> {
                    (0..h)
                        .map(|c| match c {
                            1..=3 => 1.0 + ((r >> (c - 1)) & 1) as f32,
                            4..=15 => 1.0 + ((t >> (c - 4)) & 1) as f32,
                            _ => 1.0,
                        })
                        .collect()
                };
                let mut rng = StdRng::seed_from_u64(n as u64);
                let xs: Vec<Vec<f32>> = (0..ranks)
                    .map(|r| (0..tokens).flat_map(|t| encode(r, t)).collect())
                    .collect();
                let routing: Vec<GivenRouting> = (0..ranks)
                    .map(|_| {
                        let mut g = given_routing(&cfg, tokens, &mut rng);
                        for (i, wt) in g.weights.iter_mut().enumerate() {
                            *wt = 0.5f32.powi(1 + (i % k) as i32);
                        }
                        g
                    })
                    .collect();
                let inputs: Vec<RankInput> = (0..ranks)
                    .map(|r| RankInput {
                        x: &xs[r],
                        tokens,
                        routing: Some(&routing[r]),
                    })
                    .collect();
                let ov = RouteOverrides::default();
                let mut layer = MoeLayer::new(
                    stream.clone(),
                    plan.clone(),
                    &w,
                    world(ranks),
                    GpuOptions::default(),
                )
                .unwrap();
                let got = layer.forward_host(&inputs, &ov).unwrap();
                let want = reference::forward(&plan, &w, &inputs, &ov).unwrap();
                assert_eq!(got.gates, want.gates, "{label}: gates");
                assert_eq!(got.out, want.out, "{label}: outputs must be exact");
                // Decode every output row without the reference.
                for r in 0..ranks {
                    let g = &got.gates[r];
                    for t in 0..tokens {
                        let s: f32 = (0..k)
                            .filter(|&j| g.slots[t * k + j] >= 0)
                            .map(|j| 0.5f32.powi(1 + j as i32))
                            .sum();
                        let row = &got.out[r][t * h..(t + 1) * h];
                        let x = encode(r, t);
                        for c in 0..h {
                            assert_eq!(row[c], s * x[c], "{label}: rank {r} token {t} column {c}");
                        }
                    }
                }
                // Every token's row in its dispatch row on each owner rank of its choices
                // (owner's heap), and that owner's partial (the weighted sum of the token's
                // kept choices there) in its combine row (source's heap), both at the
                // token's rank slot: the number of earlier tokens that went to that owner.
                let heaps: Vec<Vec<u8>> = (0..ranks)
                    .map(|r| layer.download_heap(r).unwrap())
                    .collect();
                let row_bytes = h * dtype.size();
                let read_row = |heap: &[u8], off: u64| {
                    let off = off as usize;
                    from_dtype_bytes(dtype, &heap[off..off + row_bytes])
                };
                for src in 0..ranks {
                    let g = &got.gates[src];
                    let mut next_slot = vec![0usize; ranks];
                    for t in 0..tokens {
                        let choices = t * k..(t + 1) * k;
                        let owner = |i: usize| plan.owners[g.ids[i] as usize].rank as usize;
                        let mut owners: Vec<usize> = choices.clone().map(owner).collect();
                        owners.sort_unstable();
                        owners.dedup();
                        for o in owners {
                            let rs = next_slot[o];
                            next_slot[o] += 1;
                            let d = plan.heap.dispatch_row(CELL_RECV, src, rs);
                            assert_eq!(
                                read_row(&heaps[o], d),
                                encode(src, t),
                                "{label}: dispatch row of rank {src} token {t} on rank {o}"
                            );
                            let w: f32 = choices
                                .clone()
                                .filter(|&i| owner(i) == o && g.slots[i] >= 0)
                                .map(|i| 0.5f32.powi(1 + (i % k) as i32))
                                .sum();
                            let want: Vec<f32> = encode(src, t).iter().map(|v| w * v).collect();
                            let c = plan.heap.combine_row(CELL_RECV, o, rs);
                            assert_eq!(
                                read_row(&heaps[src], c),
                                want,
                                "{label}: combine row of rank {src} token {t} from rank {o}"
                            );
                        }
                    }
                }
            }
        }
    }
}

fn upload(stream: &Arc<CudaStream>, bytes: &[u8]) -> CudaSlice<u8> {
    stream.clone_htod(bytes).unwrap()
}

fn ptr(stream: &Arc<CudaStream>, s: &CudaSlice<u8>) -> u64 {
    s.device_ptr(stream).0
}

fn nan_bytes(dtype: Dtype, n: usize) -> Vec<u8> {
    to_dtype_bytes(dtype, &vec![f32::NAN; n])
}

/// Device buffers of a world: inputs and `sets` output sets.
struct DeviceIo {
    xs: Vec<CudaSlice<u8>>,
    outs: Vec<Vec<CudaSlice<u8>>>,
    tokens: Vec<usize>,
}

impl DeviceIo {
    fn new(stream: &Arc<CudaStream>, cfg: &MoeConfig, inputs: &Inputs, sets: usize) -> Self {
        let tokens: Vec<usize> = (0..cfg.world).map(|r| rank_tokens(cfg, r)).collect();
        DeviceIo {
            xs: inputs
                .xs
                .iter()
                .map(|x| upload(stream, &to_dtype_bytes(cfg.dtype, x)))
                .collect(),
            outs: (0..sets)
                .map(|_| {
                    tokens
                        .iter()
                        .map(|&t| upload(stream, &nan_bytes(cfg.dtype, t * cfg.hidden)))
                        .collect()
                })
                .collect(),
            tokens,
        }
    }

    fn io(&self, stream: &Arc<CudaStream>, set: usize) -> Vec<RankIo> {
        (0..self.xs.len())
            .map(|r| RankIo {
                x: ptr(stream, &self.xs[r]),
                out: ptr(stream, &self.outs[set][r]),
                tokens: self.tokens[r],
                routing: None,
            })
            .collect()
    }

    fn read(&self, stream: &Arc<CudaStream>, dtype: Dtype, set: usize) -> Vec<Vec<f32>> {
        self.outs[set]
            .iter()
            .map(|o| from_dtype_bytes(dtype, &stream.clone_dtoh(o).unwrap()))
            .collect()
    }

    fn poison(&mut self, stream: &Arc<CudaStream>, dtype: Dtype, set: usize) {
        for o in self.outs[set].iter_mut() {
            let poison = nan_bytes(dtype, o.len() / dtype.size());
            stream.memcpy_htod(&poison, o).unwrap();
        }
    }
}

fn engine_config(ranks: usize) -> MoeConfig {
    let mut cfg = MoeConfig::new(128, 256, 128, 64, 2);
    cfg.world = ranks;
    cfg
}

/// 1000 launches back to back through the device API (no sync between them, rotating
/// over 8 poisoned output sets) give exactly the first launch's output and counts.
#[test]
fn thousand_back_to_back_launches_equal_the_first() {
    let Some((_gpu, stream)) = gpu_stream("thousand_back_to_back_launches_equal_the_first") else {
        return;
    };
    for ranks in [1, 4] {
        let cfg = engine_config(ranks);
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, 5);
        let inputs = Inputs::random(&cfg, 5);
        let mut layer = MoeLayer::new(
            stream.clone(),
            plan.clone(),
            &w,
            world(ranks),
            GpuOptions::default(),
        )
        .unwrap();
        let sets = 8;
        let mut dio = DeviceIo::new(&stream, &cfg, &inputs, sets);
        // SAFETY: the buffers hold tokens * hidden dtype values and outlive the launches.
        unsafe { layer.forward(&dio.io(&stream, 0), &stream).unwrap() };
        let first_stats = layer.status().unwrap();
        let first = dio.read(&stream, cfg.dtype, 0);
        // The engine path and the host path agree, and match the reference.
        let ov = RouteOverrides::default();
        let host = layer.forward_host(&inputs.rank_inputs(&cfg), &ov).unwrap();
        assert_eq!(host.out, first, "R{ranks}: forward vs forward_host");
        check_against_reference(
            &plan,
            &w,
            &inputs.rank_inputs(&cfg),
            &ov,
            &host,
            "engine config",
        );
        for s in 0..sets {
            dio.poison(&stream, cfg.dtype, s);
        }
        stream.synchronize().unwrap();
        let before = layer.epoch(0).unwrap();
        for i in 1..=1000 {
            // SAFETY: as above.
            unsafe { layer.forward(&dio.io(&stream, i % sets), &stream).unwrap() };
        }
        let stats = layer.status().unwrap();
        assert_eq!(stats, first_stats, "R{ranks}: counts after 1000 launches");
        for r in 0..ranks {
            assert_eq!(
                layer.epoch(r).unwrap(),
                before + 1000,
                "R{ranks}: epoch of rank {r}"
            );
        }
        for s in 0..sets {
            assert_eq!(
                dio.read(&stream, cfg.dtype, s),
                first,
                "R{ranks}: output set {s}"
            );
        }
    }
}

/// A captured graph replayed 100 times without any reset gives the first launch's output;
/// the last replay writes a freshly poisoned output.
#[test]
fn graph_replays_equal_and_need_no_reset() {
    let Some((_gpu, stream)) = gpu_stream("graph_replays_equal_and_need_no_reset") else {
        return;
    };
    for ranks in [1, 2] {
        let cfg = engine_config(ranks);
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, 9);
        let inputs = Inputs::random(&cfg, 9);
        let mut layer = MoeLayer::new(
            stream.clone(),
            plan,
            &w,
            world(ranks),
            GpuOptions::default(),
        )
        .unwrap();
        let mut dio = DeviceIo::new(&stream, &cfg, &inputs, 1);
        let io = dio.io(&stream, 0);
        // SAFETY: the buffers hold tokens * hidden dtype values and outlive the graph.
        unsafe { layer.forward(&io, &stream).unwrap() };
        let first_stats = layer.status().unwrap();
        let first = dio.read(&stream, cfg.dtype, 0);
        assert!(first.iter().flatten().all(|v| v.is_finite()));
        // SAFETY: as above.
        unsafe { layer.capture_graph(&io, &stream).unwrap() };
        let before = layer.epoch(0).unwrap();
        for _ in 0..99 {
            layer.replay().unwrap();
        }
        assert_eq!(layer.status().unwrap(), first_stats);
        dio.poison(&stream, cfg.dtype, 0);
        layer.replay().unwrap();
        assert_eq!(layer.status().unwrap(), first_stats);
        assert_eq!(
            layer.epoch(0).unwrap(),
            before + 100,
            "R{ranks}: every replay ran"
        );
        assert_eq!(
            dio.read(&stream, cfg.dtype, 0),
            first,
            "R{ranks}: replayed output"
        );
    }
}

/// A rank that sends no signal makes its peers time out: Error::Timeout names the waiting
/// rank, the stage and the silent rank it waited for; the layer then recovers.
#[test]
fn silent_rank_times_out_naming_the_rank_and_layer_recovers() {
    let Some((_gpu, stream)) =
        gpu_stream("silent_rank_times_out_naming_the_rank_and_layer_recovers")
    else {
        return;
    };
    for (ranks, silent) in [(2, 1), (4, 2), (1, 0)] {
        let cfg = engine_config(ranks);
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, 3);
        let inputs = Inputs::random(&cfg, 3);
        let opts = GpuOptions {
            timeout: Duration::from_millis(200),
            fault_silent_rank: Some(silent),
            ..GpuOptions::default()
        };
        let mut layer =
            MoeLayer::new(stream.clone(), plan.clone(), &w, world(ranks), opts).unwrap();
        let ov = RouteOverrides::default();
        let started = std::time::Instant::now();
        match layer.forward_host(&inputs.rank_inputs(&cfg), &ov) {
            Err(Error::Timeout {
                rank,
                stage,
                awaited,
                waited_ms,
                ..
            }) => {
                println!("R{ranks} silent {silent}: rank {rank} stage {stage}: {awaited} after {waited_ms} ms");
                assert!(rank < ranks);
                assert!(
                    matches!(stage, "dispatch" | "expert" | "combine"),
                    "{stage}"
                );
                assert!(
                    awaited.contains(&format!("rank {silent} ")),
                    "R{ranks}: `{awaited}` does not name rank {silent}"
                );
                assert!(waited_ms >= 150, "{waited_ms}");
            }
            other => panic!("R{ranks} silent {silent}: expected a timeout, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the timeout took {:?}",
            started.elapsed()
        );
        layer.set_fault_silent_rank(None).unwrap();
        let got = layer.forward_host(&inputs.rank_inputs(&cfg), &ov).unwrap();
        check_against_reference(
            &plan,
            &w,
            &inputs.rank_inputs(&cfg),
            &ov,
            &got,
            "after recovery",
        );
    }
}

#[test]
fn grid_that_cannot_be_co_resident_is_a_typed_error() {
    let Some((_gpu, stream)) = gpu_stream("grid_that_cannot_be_co_resident_is_a_typed_error")
    else {
        return;
    };
    let cfg = engine_config(8);
    let plan = LayerPlan::new(&cfg).unwrap();
    let w = LayerWeights::random(&cfg, 1);
    let opts = GpuOptions {
        blocks_per_rank: Some(100_000),
        ..GpuOptions::default()
    };
    match MoeLayer::new(stream.clone(), plan.clone(), &w, world(8), opts) {
        Err(Error::InvalidConfig { field, limit, .. }) => {
            assert_eq!(field, "GpuOptions::blocks_per_rank");
            assert!(limit.contains("co-resident"), "{limit}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let opts = GpuOptions {
        blocks_per_rank: Some(1),
        ..GpuOptions::default()
    };
    assert!(matches!(
        MoeLayer::new(stream.clone(), plan.clone(), &w, world(8), opts),
        Err(Error::InvalidConfig {
            field: "GpuOptions::blocks_per_rank",
            ..
        })
    ));
    // The default grid fits, and reports its shape.
    let layer = MoeLayer::new(stream, plan, &w, world(8), GpuOptions::default()).unwrap();
    let g = layer.grid();
    assert_eq!(g.ranks, 8);
    assert!(g.blocks_per_rank >= 2);
}

// ---- CPU checks of the test machinery itself (run everywhere) ----

#[test]
fn sampled_cases_cover_every_pair_of_values_within_the_budget() {
    let cases = sample_cases();
    let lens = [
        DTYPES.len(),
        MLPS.len(),
        ROUTERS.len(),
        EXPERTS.len(),
        TOP_K.len(),
        TOKENS.len(),
        WORLDS.len(),
        2,
    ];
    for (d, &n) in lens.iter().enumerate() {
        for v in 0..n {
            assert!(
                cases.iter().any(|p| p[d] == v),
                "dimension {d} value {v} never sampled"
            );
        }
    }
    // Every pair of values that fits the budget appears together.
    for a in 0..8 {
        for b in a + 1..8 {
            for va in 0..lens[a] {
                for vb in 0..lens[b] {
                    let feasible = (0..lens[4]).any(|k| {
                        (0..lens[5]).any(|t| {
                            (0..lens[6]).any(|r| {
                                let mut p: Point = [0; 9];
                                p[4] = k;
                                p[5] = t;
                                p[6] = r;
                                p[a] = va;
                                p[b] = vb;
                                feasible(&p)
                            })
                        })
                    });
                    if feasible {
                        assert!(
                            cases.iter().any(|p| p[a] == va && p[b] == vb),
                            "pair ({a}={va}, {b}={vb}) not covered"
                        );
                    }
                }
            }
        }
    }
    assert!(cases.iter().all(|p| point_cost(p) <= PAIR_BUDGET));
    let pairs: usize = cases.iter().map(point_cost).sum();
    println!(
        "{} cases, {pairs} (token, choice) pairs in all",
        cases.len()
    );
    assert!(
        cases.len() < 120,
        "{} cases is too many to run in minutes",
        cases.len()
    );
    for (i, p) in cases.iter().enumerate() {
        let case = case_from_point(p, i);
        LayerPlan::new(&case.cfg).unwrap_or_else(|e| panic!("case {i}: {e}"));
    }
}

/// The comparison accepts the reference's own output and rejects a perturbed one: the GPU
/// tests cannot pass by a lenient checker.
#[test]
fn reference_check_accepts_the_oracle_and_rejects_a_perturbation() {
    for dtype in DTYPES {
        let mut cfg = MoeConfig::new(16, 64, 64, 8, 2);
        cfg.dtype = dtype;
        cfg.world = 2;
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, 4);
        let inputs = Inputs::random(&cfg, 4);
        let ri = inputs.rank_inputs(&cfg);
        let ov = RouteOverrides::default();
        let want = reference::forward(&plan, &w, &ri, &ov).unwrap();
        let (err, tol, flipped) = check_against_reference(&plan, &w, &ri, &ov, &want, "oracle");
        assert_eq!((err, flipped), (0.0, 0));
        if dtype == Dtype::F32 {
            assert_eq!(tol, 1e-5);
        } else {
            assert!(tol > 1e-2 && tol < 0.1, "{} tolerance {tol}", dtype.name());
        }
        let mut bad = want.clone();
        for v in bad.out[1].iter_mut().take(cfg.hidden) {
            *v = -*v + 0.5;
        }
        let r = std::panic::catch_unwind(|| {
            check_against_reference(&plan, &w, &ri, &ov, &bad, "perturbed output")
        });
        assert!(r.is_err(), "{}: a wrong output row passed", dtype.name());
        let mut bad = want.clone();
        bad.gates[0].slots[0] = -1;
        let r = std::panic::catch_unwind(|| {
            check_against_reference(&plan, &w, &ri, &ov, &bad, "perturbed slots")
        });
        assert!(r.is_err(), "{}: a wrong slot passed", dtype.name());
        let mut bad = want.clone();
        bad.gates[1].ids.swap(0, 1);
        let r = std::panic::catch_unwind(|| {
            check_against_reference(&plan, &w, &ri, &ov, &bad, "swapped choices")
        });
        assert!(r.is_err(), "{}: swapped choices passed", dtype.name());
    }
}

#[test]
fn plan_larger_than_the_device_is_refused_before_allocating() {
    // Small weights, 1M dropless tokens of 8192 bf16: 32 GiB of heap rows and 128 GiB of
    // expert outputs (8 pairs per token) in the workspace.
    let mut cfg = MoeConfig::new(1 << 20, 8192, 64, 8, 8);
    cfg.capacity = Capacity::Dropless;
    let plan = LayerPlan::new(&cfg).unwrap();
    assert!(plan.memory(0).total() > 100 << 30);
    let Some((_gpu, stream)) =
        gpu_stream("plan_larger_than_the_device_is_refused_before_allocating")
    else {
        return;
    };
    let w = LayerWeights::random(&cfg, 1);
    let (free_before, _) = stream.context().mem_get_info().unwrap();
    match MoeLayer::new(
        stream.clone(),
        plan,
        &w,
        GpuWorld::Single,
        GpuOptions::default(),
    ) {
        Err(Error::PlanTooLarge { what }) => assert!(what.contains("free"), "{what}"),
        other => panic!("expected PlanTooLarge, got {other:?}"),
    }
    let (free_after, _) = stream.context().mem_get_info().unwrap();
    assert!(
        free_after + (64 << 20) >= free_before,
        "memory was allocated before refusing"
    );
}

#[test]
fn bad_launch_inputs_are_refused_before_launching() {
    let Some((_gpu, stream)) = gpu_stream("bad_launch_inputs_are_refused_before_launching") else {
        return;
    };
    let cfg = engine_config(2);
    let plan = LayerPlan::new(&cfg).unwrap();
    let w = LayerWeights::random(&cfg, 2);
    let inputs = Inputs::random(&cfg, 2);
    let mut layer =
        MoeLayer::new(stream.clone(), plan, &w, world(2), GpuOptions::default()).unwrap();
    let dio = DeviceIo::new(&stream, &cfg, &inputs, 1);
    let good = dio.io(&stream, 0);
    let mut cases: Vec<(&str, Vec<RankIo>)> = vec![("one rank missing", good[..1].to_vec())];
    let mut too_many = good.clone();
    too_many[0].tokens = cfg.tokens + 1;
    cases.push(("too many tokens", too_many));
    let mut null = good.clone();
    null[1].out = 0;
    cases.push(("null output", null));
    let mut routed = good.clone();
    routed[0].routing = Some(flashmoe::gpu::layer::DeviceRouting {
        ids: good[0].x,
        weights: good[0].x,
    });
    cases.push(("routing with a softmax router", routed));
    for (what, io) in cases {
        // SAFETY: refused before any launch (the valid pointers are live anyway).
        let r = unsafe { layer.forward(&io, &stream) };
        assert!(
            matches!(r, Err(Error::InvalidInput { .. })),
            "{what}: {r:?}"
        );
    }
    // Overrides are checked too.
    assert!(layer.set_route_overrides(Some(0), None).is_err());
    assert!(layer
        .set_route_overrides(Some(cfg.top_k + 1), None)
        .is_err());
    assert!(layer.set_route_overrides(None, Some(&[0.0; 3])).is_err());
    assert!(layer
        .set_route_overrides(None, Some(&vec![f32::NAN; cfg.experts]))
        .is_err());
    // And the layer still works.
    // SAFETY: valid buffers.
    unsafe { layer.forward(&good, &stream).unwrap() };
    layer.status().unwrap();
}

#[test]
fn timed_launches_are_checked_and_sampled_per_launch() {
    let Some((_gpu, stream)) = gpu_stream("timed_launches_are_checked_and_sampled_per_launch")
    else {
        return;
    };
    let cfg = engine_config(2);
    let plan = LayerPlan::new(&cfg).unwrap();
    let w = LayerWeights::random(&cfg, 6);
    let inputs = Inputs::random(&cfg, 6);
    let ri = inputs.rank_inputs(&cfg);
    let ov = RouteOverrides::default();
    let mut layer = MoeLayer::new(stream, plan, &w, world(2), GpuOptions::default()).unwrap();
    for graph in [false, true] {
        let ms = layer.time_launches(&ri, &ov, 3, 9, graph).unwrap();
        assert_eq!(ms.len(), 9);
        assert!(
            ms.iter().all(|t| t.is_finite() && *t > 0.0 && *t < 1e4),
            "{ms:?}"
        );
        println!("graph={graph}: {ms:?} ms");
    }
    assert!(layer.time_launches(&ri, &ov, 0, 0, false).is_err());
}

/// A three-layer synthetic model with every MoE layer on the GPU (through the model
/// driver's `LayerBackend` hook) against the same model on the reference backend.
#[test]
fn model_runs_its_layers_on_the_gpu() {
    let Some((_gpu, stream)) = gpu_stream("model_runs_its_layers_on_the_gpu") else {
        return;
    };
    use flashmoe::model::{Backend, LayerBackend, MoeModel};
    for ranks in [1, 2] {
        let mut cfg = MoeConfig::new(64, 128, 128, 16, 2);
        cfg.dtype = Dtype::F32;
        let spec = flashmoe::model::synthetic::SyntheticSpec::new(cfg, 3)
            .with_world(ranks, Placement::Blocked);
        let layers = spec.build().unwrap();
        let mut reference = MoeModel::new(layers.clone(), Backend::Reference).unwrap();
        let mut gpu = MoeModel::with_factory(layers, |_, plan, weights| {
            let layer = MoeLayer::new(
                stream.clone(),
                plan,
                &weights,
                world(ranks),
                GpuOptions::default(),
            )?;
            Ok(Box::new(layer) as Box<dyn LayerBackend>)
        })
        .unwrap();
        assert_eq!(gpu.backend_names(), vec!["gpu"; 3]);
        let x: Vec<Vec<f32>> = (0..ranks)
            .map(|r| random_tokens(&spec.config, spec.config.tokens, 70 + r as u64))
            .collect();
        let want = reference.forward(&x).unwrap();
        let got = gpu.forward(&x).unwrap();
        let err = reference::normalised_error(
            &gpu_support::flat(&got.hidden),
            &gpu_support::flat(&want.hidden),
        );
        println!("R{ranks}: 3-layer model, normalised error {err:e}");
        assert!(err < 1e-4, "R{ranks}: model output error {err:e}");
    }
}

/// The phase record's task counts by kind equal the tasks the plan's rule gives the
/// kernel's own routing, under every tile mode, on 1 and 2 (emulated) ranks with a shared
/// expert: the wide tasks' protocol (one reservation per pair list, GEMM1 counters advanced
/// by the row blocks a task covers, the published total) runs each task exactly once.
#[test]
fn phase_record_counts_the_tasks_the_rule_gives() {
    let Some((_gpu, stream)) = gpu_stream("phase_record_counts_the_tasks_the_rule_gives") else {
        return;
    };
    for ranks in [1, 2] {
        // 4 experts, top-2, 256 tokens per rank (128 on the last of two): pair lists of about
        // 128 pairs on one rank (wide tasks), 64 and 32 per source on two (prefill, decode).
        let mut cfg = MoeConfig::new(256, 256, 128, 4, 2);
        cfg.world = ranks;
        cfg.shared = Some(SharedExperts {
            count: 1,
            intermediate: 128,
            gated: false,
        });
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, 11);
        let data = Inputs::random(&cfg, 11);
        let inputs = data.rank_inputs(&cfg);
        let tokens: Vec<usize> = inputs.iter().map(|i| i.tokens).collect();
        let ov = RouteOverrides::default();
        let mut layer = MoeLayer::new(
            stream.clone(),
            plan.clone(),
            &w,
            world(ranks),
            GpuOptions::default(),
        )
        .unwrap();
        let mut wide = 0;
        for mode in TileMode::ALL {
            layer.set_tile_mode(mode);
            let out = layer.forward_host(&inputs, &ov).unwrap();
            check_against_reference(&plan, &w, &inputs, &ov, &out, "phase record");
            let rule = plan.clone().with_tile_mode(mode);
            let routes: Vec<_> = out
                .gates
                .iter()
                .map(|g| rule.route(&g.ids, &g.slots, cfg.top_k))
                .collect();
            let want = rule.expected_tasks(&routes, &tokens);
            let got = layer.phases().unwrap();
            println!("R{ranks} {mode:?}: {}", got.describe());
            assert_eq!(
                got.kind_tasks,
                want.by_kind(),
                "R{ranks} {mode:?}: tasks by kind"
            );
            assert_eq!(
                got.tasks,
                want.by_kind().iter().sum::<u64>(),
                "R{ranks} {mode:?}"
            );
            if matches!(mode, TileMode::Classic | TileMode::AutoSerial) {
                assert_eq!(
                    got.staged_tasks, 0,
                    "R{ranks} {mode:?}: no early first stage"
                );
            }
            assert!(got.staged_tasks <= got.kind_tasks[0] + got.kind_tasks[1]);
            if mode == TileMode::Auto {
                let lists = out.gates.iter().flat_map(|g| g.expert_counts.iter());
                wide += rule.tile_census(lists.map(|&c| c as usize)).wide;
            }
        }
        if ranks == 1 {
            assert!(wide > 0, "the one-rank case must run wide tasks");
        }
    }
}

/// The early first stage (kernel/include/flashmoe/next_stage.cuh) runs and changes no bit.
/// 8 blocks against hundreds of routed GEMM tasks, so tiles take their next ticket ahead
/// while published entries wait, and some routed tasks must start with their step 0
/// already in flight under auto and narrow; none under auto-serial. Prefill shapes: 1024
/// tokens on 4 experts, top-2 (pair lists of about 512 pairs: 128-row wide tasks under
/// auto, 64-row prefill tasks under narrow); decode shapes: 128 tokens on 32 experts, top-2
/// (about 8 pairs per list). auto and auto-serial run the same tiles in the same order per
/// output, so their outputs are equal bit for bit; every mode matches the reference.
#[test]
fn early_first_stage_runs_and_changes_no_bit() {
    let Some((_gpu, stream)) = gpu_stream("early_first_stage_runs_and_changes_no_bit") else {
        return;
    };
    let shapes = [(1024, 4), (128, 32)];
    for (dtype, (tokens, experts)) in [Dtype::Bf16, Dtype::F16]
        .into_iter()
        .flat_map(|d| shapes.map(|s| (d, s)))
    {
        let mut cfg = MoeConfig::new(tokens, 512, 256, experts, 2);
        cfg.dtype = dtype;
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, 21);
        let data = Inputs::random(&cfg, 21);
        let inputs = data.rank_inputs(&cfg);
        let ov = RouteOverrides::default();
        let opts = GpuOptions {
            blocks_per_rank: Some(8),
            ..GpuOptions::default()
        };
        let mut layer = MoeLayer::new(stream.clone(), plan.clone(), &w, world(1), opts).unwrap();
        let mut outs = Vec::new();
        for mode in [TileMode::AutoSerial, TileMode::Auto, TileMode::Narrow] {
            layer.set_tile_mode(mode);
            let out = layer.forward_host(&inputs, &ov).unwrap();
            check_against_reference(&plan, &w, &inputs, &ov, &out, "early first stage");
            let p = layer.phases().unwrap();
            println!("{dtype:?} {tokens}x{experts} {mode:?}: {}", p.describe());
            let routed = p.kind_tasks[0] + p.kind_tasks[1];
            if mode == TileMode::AutoSerial {
                assert_eq!(p.staged_tasks, 0, "{dtype:?} {tokens}x{experts} {mode:?}");
            } else {
                assert!(
                    p.staged_tasks > 0 && p.staged_tasks <= routed,
                    "{dtype:?} {tokens}x{experts} {mode:?}: {} of {routed} routed tasks staged",
                    p.staged_tasks
                );
            }
            outs.push(out.out);
        }
        assert!(
            outs[0] == outs[1],
            "{dtype:?}: auto differs from auto-serial"
        );
    }
}
