//! Criterion bench of planning: config validation and the full layout, per preset.

use criterion::{criterion_group, criterion_main, Criterion};
use flashmoe::{presets, LayerPlan};
use std::hint::black_box;

fn plan(c: &mut Criterion) {
    for name in presets::NAMES {
        let Ok(p) = presets::preset(name) else {
            continue;
        };
        let mut cfg = p.config;
        cfg.world = 8;
        c.bench_function(&format!("plan/{name}/world8"), |b| {
            b.iter(|| LayerPlan::new(black_box(&cfg)))
        });
    }
}

criterion_group!(benches, plan);
criterion_main!(benches);
