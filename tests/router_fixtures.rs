//! The gpt-oss and DeepSeek-V4 routers against transformers' own router modules on random
//! weights and tokens (`scripts/make_router_fixtures.py`, transformers 5.24): the reference
//! router must choose the same experts with the same weights. (Their families' expert MLPs
//! are not implemented yet, so whole-block fixtures cannot be compared.)

use flashmoe::reference::{self, RouteOverrides};
use flashmoe::{Capacity, Dtype, LayerPlan, LayerWeights, MoeConfig, Router};
use safetensors::SafeTensors;
use std::collections::HashMap;

const H: usize = 64;
const E: usize = 8;
const K: usize = 4;

fn read(name: &str) -> HashMap<String, Vec<f32>> {
    let path = format!(
        "{}/tests/fixtures/routers/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| {
                    let raw = [b[0], b[1], b[2], b[3]];
                    match v.dtype() {
                        safetensors::Dtype::I32 => i32::from_le_bytes(raw) as f32,
                        _ => f32::from_le_bytes(raw),
                    }
                })
                .collect();
            (n, vals)
        })
        .collect()
}

/// Routes the fixture's tokens with `router` and compares with transformers' choices (as
/// sets: DeepSeek-V4 does not sort its top-k) and weights; returns the largest weight error.
fn compare(name: &str, router: Router, scale: f32) -> f64 {
    let t = read(name);
    let cfg = MoeConfig {
        dtype: Dtype::F32,
        capacity: Capacity::Dropless,
        router,
        routed_scale: scale,
        ..MoeConfig::new(64, H, 64, E, K)
    };
    let plan = LayerPlan::new(&cfg).unwrap();
    let mut w = LayerWeights::random(&cfg, 1);
    w.router = t["weight"].clone();
    w.router_bias = t["bias"].clone();
    let tokens = t["x"].len() / H;
    let g = reference::gate(&plan, &w, &t["x"], tokens, None, &RouteOverrides::default()).unwrap();
    let mut worst = 0f64;
    for tok in 0..tokens {
        let mut want: Vec<(u32, f32)> = (0..K)
            .map(|j| (t["ids"][tok * K + j] as u32, t["weights"][tok * K + j]))
            .collect();
        let mut got: Vec<(u32, f32)> = (0..K)
            .map(|j| (g.ids[tok * K + j], g.weights[tok * K + j]))
            .collect();
        want.sort_by_key(|p| p.0);
        got.sort_by_key(|p| p.0);
        for ((we, ww), (ge, gw)) in want.iter().zip(&got) {
            assert_eq!(we, ge, "{name} token {tok}: experts {want:?} vs {got:?}");
            worst = worst.max(f64::from((ww - gw).abs()) / f64::from(ww.abs()).max(1e-6));
        }
    }
    println!("{name}: {tokens} tokens, same experts, max relative weight error {worst:.2e}");
    worst
}

#[test]
fn gpt_oss_router_matches_transformers() {
    assert!(compare("gpt_oss", Router::TopkSoftmax, 1.0) < 1e-5);
}

#[test]
fn deepseek_v4_router_matches_transformers() {
    let scale = read("deepseek_v4")["scale"][0];
    let err = compare(
        "deepseek_v4",
        Router::SqrtSoftplusBias { renormalize: true },
        scale,
    );
    assert!(err < 1e-5);
}

#[test]
fn a_wrong_router_is_caught() {
    // Softmax over all experts instead of over the chosen k: same experts, other weights.
    let r = std::panic::catch_unwind(|| {
        compare("gpt_oss", Router::Softmax { renormalize: false }, 1.0)
    });
    assert!(r.map_or(true, |err| err > 1e-2), "a wrong router passed");
}
