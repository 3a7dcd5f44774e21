//! The harness against the CPU executor: every stage passes on correct runs, and a planted
//! wrong value is found and named at its stage, after every earlier stage passed.

use super::*;
use crate::config::{Capacity, Dtype, MlpKind, MoeConfig, Placement, Router, SharedExperts};
use crate::cpu::CpuExecutor;
use crate::weights::random_tokens;
use std::sync::Arc;

/// A small layer: `world` ranks, uneven token counts (the last rank brings fewer).
fn config(world: usize, dtype: Dtype) -> MoeConfig {
    MoeConfig {
        world,
        dtype,
        ..MoeConfig::new(96, 128, 128, 8, 2)
    }
}

struct Setup {
    plan: LayerPlan,
    w: LayerWeights,
    xs: Vec<Vec<f32>>,
    tokens: Vec<usize>,
    ov: RouteOverrides,
}

impl Setup {
    fn new(cfg: MoeConfig, seed: u64) -> Self {
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, seed);
        let tokens: Vec<usize> = (0..cfg.world)
            .map(|r| cfg.tokens - (r * 17) % cfg.tokens)
            .collect();
        let xs = tokens
            .iter()
            .enumerate()
            .map(|(r, &t)| random_tokens(&cfg, t, seed + 1 + r as u64))
            .collect();
        Setup {
            plan,
            w,
            xs,
            tokens,
            ov: RouteOverrides::default(),
        }
    }

    fn inputs(&self) -> Vec<RankInput<'_>> {
        RankInput::per_rank(&self.xs, &self.tokens)
    }

    /// The checks' view of this layer over `inputs` (no overrides).
    fn case<'a>(&'a self, inputs: &'a [RankInput<'a>]) -> Case<'a> {
        Case {
            plan: &self.plan,
            weights: &self.w,
            inputs,
            ov: &self.ov,
        }
    }

    fn executor(&self) -> CpuExecutor {
        CpuExecutor::new(self.plan.clone(), Arc::new(self.w.clone())).unwrap()
    }
}

fn run_cpu(setup: &Setup) -> Vec<StageReport> {
    let inputs = setup.inputs();
    let case = setup.case(&inputs);
    let mut cpu = setup.executor();
    let (reports, err) = run(&mut cpu, &case);
    assert!(err.is_none(), "{err:?}");
    reports
}

fn assert_all_pass(reports: &[StageReport], what: &str) {
    assert_eq!(reports.len(), Stage::ALL.len(), "{what}: {reports:#?}");
    for r in reports {
        assert!(r.passed(), "{what}: {r}");
        assert!(r.checked > 0, "{what}: {r}");
    }
}

#[test]
fn every_stage_passes_on_the_cpu_executor_in_worlds_1_2_4() {
    for world in [1, 2, 4] {
        let s = Setup::new(config(world, Dtype::Bf16), 7);
        assert_all_pass(&run_cpu(&s), &format!("world {world}"));
    }
}

#[test]
fn every_stage_passes_with_drops_shared_experts_sigmoid_and_other_dtypes() {
    let variants = [
        MoeConfig {
            tokens: 256,
            capacity: Capacity::Factor(0.5),
            ..config(2, Dtype::Bf16)
        },
        MoeConfig {
            router: Router::SigmoidBias { renormalize: true },
            routed_scale: 2.5,
            shared: Some(SharedExperts {
                count: 1,
                intermediate: 128,
                gated: true,
            }),
            ..config(2, Dtype::F32)
        },
        MoeConfig {
            mlp: MlpKind::Gelu,
            placement: Placement::Map(vec![1, 1, 1, 1, 1, 0, 1, 1]),
            ..config(2, Dtype::F16)
        },
    ];
    for (i, cfg) in variants.into_iter().enumerate() {
        let dropping = matches!(cfg.capacity, Capacity::Factor(f) if f < 1.0);
        let s = Setup::new(cfg, 11 + i as u64);
        let reports = run_cpu(&s);
        assert_all_pass(&reports, &format!("variant {i}"));
        if dropping {
            // Drops were really exercised: the executor's routing drops pairs.
            let g = crate::reference::gate(
                &s.plan,
                &s.w,
                &s.xs[0],
                s.tokens[0],
                None,
                &RouteOverrides::default(),
            )
            .unwrap();
            assert!(g.dropped > 0, "variant {i} drops nothing");
        }
    }
}

#[test]
fn a_planted_wrong_value_is_found_and_named_at_its_stage() {
    let s = Setup::new(config(2, Dtype::Bf16), 5);
    let inputs = s.inputs();
    let case = s.case(&inputs);
    for stage in Stage::ALL {
        let mut cpu = s.executor();
        let mut planting = PlantingRunner {
            inner: &mut cpu,
            plan: &s.plan,
            stage,
            planted: None,
        };
        let (reports, err) = run(&mut planting, &case);
        assert!(err.is_none(), "{stage}: {err:?}");
        let planted = planting.planted.expect("planted");
        let (last, before) = reports.split_last().expect("reports");
        assert_eq!(last.stage, stage, "stopped at the planted stage");
        for r in before {
            assert!(r.passed(), "{stage}: earlier stage {r}");
        }
        assert!(!last.passed(), "{stage}: the planted value passed: {last}");
        assert_eq!(
            last.mismatches, 1,
            "{stage}: exactly one wrong value: {last}"
        );
        let m = last.first.as_ref().expect("first mismatch");
        assert_eq!(
            (m.rank, m.expert, m.row, m.column),
            (planted.rank, planted.expert, planted.row, planted.column),
            "{stage}: named {m}, planted {planted:?}"
        );
        let line = last.to_string();
        assert!(line.starts_with(&format!("{stage}: FAIL 1 of")), "{line}");
        assert!(line.contains(&format!("rank {}", planted.rank)), "{line}");
    }
}

#[test]
fn a_near_tie_is_counted_not_failed_and_a_real_flip_fails() {
    let mut s = Setup::new(config(1, Dtype::F32), 3);
    // Experts 0 and 1 get the same router row: their scores tie exactly everywhere.
    let h = s.plan.config.hidden;
    let row0 = s.w.router[..h].to_vec();
    s.w.router[h..2 * h].copy_from_slice(&row0);
    let inputs = s.inputs();
    let case = s.case(&inputs);
    let mut cpu = s.executor();
    let cap = cpu.run_stage(Stage::Gate, &inputs, &s.ov).unwrap();
    let k = s.plan.config.top_k;
    let ids = &cap.ranks[0].gate.ids;
    let i = ids
        .iter()
        .position(|&e| e == 0)
        .expect("some token chooses expert 0");
    let t = i / k;
    // Decide the tie the other way: expert 1 instead of 0 (and 0 instead of 1 if both).
    let mut tied = cap.clone();
    for e in &mut tied.ranks[0].gate.ids[t * k..(t + 1) * k] {
        *e = match *e {
            0 => 1,
            1 => 0,
            other => other,
        };
    }
    recount(&mut tied);
    let r = check(&case, &tied).unwrap();
    assert!(r.passed(), "{r}");
    assert!(r.near_ties >= 1, "{r}");
    // The expert with the lowest score is no near-tie.
    let scores = crate::reference::selection_scores(
        &s.plan.config,
        &s.w,
        &s.xs[0][t * h..(t + 1) * h],
        None,
    );
    let worst = (0..scores.len())
        .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
        .unwrap();
    let mut flipped = cap.clone();
    flipped.ranks[0].gate.ids[i] = worst as u32;
    recount(&mut flipped);
    let r = check(&case, &flipped).unwrap();
    assert!(!r.passed(), "{r}");
    let m = r.first.as_ref().unwrap();
    assert_eq!(
        (m.rank, m.row, m.column, m.got),
        (0, t, i % k, worst as f64),
        "{r}"
    );
}

/// Expert counts consistent with the (edited) ids, as a backend would store them.
fn recount(cap: &mut Capture) {
    for r in &mut cap.ranks {
        r.gate.expert_counts.iter_mut().for_each(|c| *c = 0);
        for &e in &r.gate.ids {
            r.gate.expert_counts[e as usize] += 1;
        }
    }
}

#[test]
fn stage_names_and_codes_round_trip() {
    for (i, s) in Stage::ALL.into_iter().enumerate() {
        assert_eq!(s.code() as usize, i + 1);
        assert_eq!(Stage::from_name(s.name()), Some(s));
    }
    assert_eq!(Stage::from_name("nope"), None);
}

#[test]
fn a_capture_of_the_wrong_world_is_a_typed_error() {
    let s = Setup::new(config(2, Dtype::Bf16), 1);
    let inputs = s.inputs();
    let case = s.case(&inputs);
    let cap = Capture {
        stage: Stage::Gate,
        epoch: 1,
        ranks: vec![RankCapture::default()],
    };
    assert!(matches!(
        check(&case, &cap),
        Err(crate::Error::InvalidInput { .. })
    ));
}
