//! Bounds of library knobs that take a bare count.

use flashmoe::cpu::MAX_THREADS;
use flashmoe::reference::{RankInput, RouteOverrides};
use flashmoe::weights::{random_tokens, LayerWeights};
use flashmoe::{CpuExecutor, LayerPlan, MoeConfig};
use std::sync::Arc;

/// `set_threads(200_000)` used to try to spawn them all; it is capped and still runs.
#[test]
fn a_huge_thread_count_is_capped_and_the_forward_still_runs() {
    let cfg = MoeConfig::new(8, 64, 64, 4, 2);
    let plan = LayerPlan::new(&cfg).unwrap();
    let mut ex = CpuExecutor::new(plan, Arc::new(LayerWeights::random(&cfg, 1))).unwrap();
    ex.set_threads(200_000);
    assert_eq!(ex.threads(), MAX_THREADS);
    ex.set_threads(3);
    assert_eq!(ex.threads(), 3);
    ex.set_threads(200_000);
    let x = random_tokens(&cfg, 8, 2);
    let input = [RankInput {
        x: &x,
        tokens: 8,
        routing: None,
    }];
    let out = ex.forward(&input, &RouteOverrides::default()).unwrap();
    assert!(out.out[0].iter().all(|v| v.is_finite()));
}
