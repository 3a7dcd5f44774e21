//! Criterion bench of the CPU executor on small layers (world 1 and 4), output checked
//! against the reference before timing. Each runs with the default thread count (the
//! machine's available parallelism) and with one thread per rank (no helpers), so the
//! helpers' gain shows on the same run.

use criterion::{criterion_group, criterion_main, Criterion};
use flashmoe::config::MoeConfig;
use flashmoe::cpu::CpuExecutor;
use flashmoe::reference::{self, RankInput, RouteOverrides};
use flashmoe::weights::{random_tokens, LayerWeights};
use flashmoe::LayerPlan;
use std::sync::Arc;

fn executor(c: &mut Criterion) {
    for world in [1usize, 4] {
        let mut cfg = MoeConfig::new(128, 256, 512, 16, 2);
        cfg.world = world;
        let Ok(plan) = LayerPlan::new(&cfg) else {
            return;
        };
        let weights = Arc::new(LayerWeights::random(&cfg, 1));
        let xs: Vec<Vec<f32>> = (0..world)
            .map(|r| random_tokens(&cfg, cfg.tokens, 10 + r as u64))
            .collect();
        let inputs: Vec<RankInput> = xs
            .iter()
            .map(|x| RankInput {
                x,
                tokens: cfg.tokens,
                routing: None,
            })
            .collect();
        let ov = RouteOverrides::default();
        let Ok(mut exec) = CpuExecutor::new(plan.clone(), weights.clone()) else {
            return;
        };
        // Check before timing: a wrong executor must not produce a number.
        let (Ok(got), Ok(want)) = (
            exec.forward(&inputs, &ov),
            reference::forward(&plan, &weights, &inputs, &ov),
        ) else {
            panic!("cpu executor or reference failed");
        };
        for (g, w) in got.out.iter().zip(&want.out) {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            assert!(err < 2e-2, "cpu executor differs from the reference: {err}");
        }
        c.bench_function(
            &format!("cpu_executor/128tok_256x512_16e_top2/world{world}"),
            |b| b.iter(|| exec.forward(&inputs, &ov)),
        );
        exec.set_threads(world);
        c.bench_function(
            &format!("cpu_executor/128tok_256x512_16e_top2/world{world}/1_thread_per_rank"),
            |b| b.iter(|| exec.forward(&inputs, &ov)),
        );
    }
}

criterion_group!(benches, executor);
criterion_main!(benches);
