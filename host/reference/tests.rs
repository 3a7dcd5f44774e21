//! Unit tests of the oracle on cases whose answers are derived here from the definitions.
#![allow(clippy::needless_range_loop)]

use super::*;
use crate::config::{Capacity, MlpKind, MoeConfig, Router, SharedExperts};
use crate::weights::{ExpertWeights, LayerWeights};

const H: usize = 64;

fn cfg(experts: usize, top_k: usize, router: Router) -> MoeConfig {
    let mut c = MoeConfig::new(8, H, H, experts, top_k);
    c.router = router;
    c.dtype = crate::Dtype::F32;
    c.capacity = Capacity::Dropless;
    c
}

/// Weights whose router row e is `logit_e * e_0`, so a token `x = e_0` has logits `l`.
fn weights_with_logits(c: &MoeConfig, logits: &[f32]) -> LayerWeights {
    let mut w = LayerWeights::random(c, 7);
    w.router = vec![0.0; c.experts * H];
    for (e, &l) in logits.iter().enumerate() {
        w.router[e * H] = l;
    }
    w
}

fn unit_token() -> Vec<f32> {
    let mut x = vec![0.0; H];
    x[0] = 1.0;
    x
}

fn plan(c: &MoeConfig) -> LayerPlan {
    LayerPlan::new(c).expect("valid test config")
}

fn softmax(l: &[f64]) -> Vec<f64> {
    let z: f64 = l.iter().map(|v| v.exp()).sum();
    l.iter().map(|v| v.exp() / z).collect()
}

fn sig(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

#[test]
fn softmax_two_experts_top1_with_and_without_renormalisation() {
    let logits = [0.25f32, 1.5];
    let p = softmax(&[0.25, 1.5]);
    for renormalize in [false, true] {
        let c = cfg(2, 1, Router::Softmax { renormalize });
        let w = weights_with_logits(&c, &logits);
        let g = gate(
            &plan(&c),
            &w,
            &unit_token(),
            1,
            None,
            &RouteOverrides::default(),
        )
        .expect("gate");
        assert_eq!(g.ids, vec![1]);
        let want = if renormalize { 1.0 } else { p[1] };
        assert!((f64::from(g.weights[0]) - want).abs() < 1e-7, "{g:?}");
        assert_eq!(g.slots, vec![0]);
        assert_eq!(g.expert_counts, vec![0, 1]);
        assert_eq!(g.dropped, 0);
    }
}

#[test]
fn mixtral_top2_renormalised_equals_softmax_over_the_two_logits() {
    // Mixtral: w_t = p_t / sum_T p = softmax over the selected logits.
    let logits = [0.1f32, -0.7, 2.0, 1.3, 0.4, -2.0, 0.9, 1.0];
    let c = cfg(8, 2, Router::Softmax { renormalize: true });
    let w = weights_with_logits(&c, &logits);
    let g = gate(
        &plan(&c),
        &w,
        &unit_token(),
        1,
        None,
        &RouteOverrides::default(),
    )
    .expect("gate");
    assert_eq!(g.ids, vec![2, 3]);
    let pair = softmax(&[2.0, f64::from(1.3f32)]);
    for j in 0..2 {
        assert!((f64::from(g.weights[j]) - pair[j]).abs() < 1e-7, "{g:?}");
    }
}

#[test]
fn qwen_top_k_without_renormalisation_keeps_raw_probabilities() {
    let logits = [0.5f32, 0.2, -1.0, 0.3];
    let l64: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    let p = softmax(&l64);
    let c = cfg(4, 2, Router::Softmax { renormalize: false });
    let w = weights_with_logits(&c, &logits);
    let g = gate(
        &plan(&c),
        &w,
        &unit_token(),
        1,
        None,
        &RouteOverrides::default(),
    )
    .expect("gate");
    assert_eq!(g.ids, vec![0, 3]);
    assert!((f64::from(g.weights[0]) - p[0]).abs() < 1e-7);
    assert!((f64::from(g.weights[1]) - p[3]).abs() < 1e-7);
    assert!(g.weights.iter().map(|&v| f64::from(v)).sum::<f64>() < 1.0);
}

#[test]
fn ties_go_to_the_lower_expert_id() {
    let c = cfg(4, 2, Router::Softmax { renormalize: true });
    let w = weights_with_logits(&c, &[1.0, 2.0, 2.0, 2.0]);
    let g = gate(
        &plan(&c),
        &w,
        &unit_token(),
        1,
        None,
        &RouteOverrides::default(),
    )
    .expect("gate");
    assert_eq!(g.ids, vec![1, 2]);
    assert!((g.weights[0] - 0.5).abs() < 1e-7 && (g.weights[1] - 0.5).abs() < 1e-7);
}

#[test]
fn deepseek_v3_bias_selects_but_does_not_weight() {
    // sigma = sigmoid(s); selection by sigma + b; weights sigma / sum sigma * 2.5.
    let logits = [1.0f32, 0.0, -1.0, 0.5];
    let bias = [0.0f32, 0.0, 3.0, -3.0];
    let mut c = cfg(4, 2, Router::SigmoidBias { renormalize: true });
    c.routed_scale = 2.5;
    let mut w = weights_with_logits(&c, &logits);
    w.router_bias = bias.to_vec();
    let g = gate(
        &plan(&c),
        &w,
        &unit_token(),
        1,
        None,
        &RouteOverrides::default(),
    )
    .expect("gate");
    // sigma+b: [0.731, 0.5, 0.269+3, 0.622-3] -> experts 2 then 0.
    assert_eq!(g.ids, vec![2, 0]);
    let (s2, s0) = (sig(-1.0), sig(1.0));
    let want = [2.5 * s2 / (s2 + s0), 2.5 * s0 / (s2 + s0)];
    for j in 0..2 {
        assert!((f64::from(g.weights[j]) - want[j]).abs() < 1e-6, "{g:?}");
    }
    // Without renormalisation: the raw sigmoid scores, scaled.
    let mut c2 = c.clone();
    c2.router = Router::SigmoidBias { renormalize: false };
    let g = gate(
        &plan(&c2),
        &w,
        &unit_token(),
        1,
        None,
        &RouteOverrides::default(),
    )
    .expect("gate");
    assert!((f64::from(g.weights[0]) - 2.5 * s2).abs() < 1e-6);
    assert!((f64::from(g.weights[1]) - 2.5 * s0).abs() < 1e-6);
}

#[test]
fn routed_scale_multiplies_softmax_weights_but_not_given_ones() {
    let mut c = cfg(2, 2, Router::Softmax { renormalize: true });
    c.routed_scale = 16.0;
    let w = weights_with_logits(&c, &[0.0, 0.0]);
    let g = gate(
        &plan(&c),
        &w,
        &unit_token(),
        1,
        None,
        &RouteOverrides::default(),
    )
    .expect("gate");
    assert_eq!(g.weights, vec![8.0, 8.0]);

    let mut c = cfg(2, 2, Router::Given);
    c.routed_scale = 16.0;
    let w = LayerWeights::random(&c, 1);
    let r = GivenRouting {
        ids: vec![1, 0],
        weights: vec![0.75, -0.5],
    };
    let g = gate(
        &plan(&c),
        &w,
        &unit_token(),
        1,
        Some(&r),
        &RouteOverrides::default(),
    )
    .expect("gate");
    assert_eq!(g.ids, r.ids);
    assert_eq!(g.weights, r.weights);
}

#[test]
fn logit_bias_override_changes_the_selection() {
    let c = cfg(3, 1, Router::Softmax { renormalize: false });
    let w = weights_with_logits(&c, &[1.0, 0.0, 0.0]);
    let ov = RouteOverrides {
        top_k: None,
        logit_bias: Some(vec![0.0, 0.0, 2.0]),
    };
    let g = gate(&plan(&c), &w, &unit_token(), 1, None, &ov).expect("gate");
    assert_eq!(g.ids, vec![2]);
    let p = softmax(&[1.0, 0.0, 2.0]);
    assert!((f64::from(g.weights[0]) - p[2]).abs() < 1e-7);
}

#[test]
fn top_k_override_uses_fewer_choices() {
    let c = cfg(4, 3, Router::Softmax { renormalize: true });
    let w = weights_with_logits(&c, &[3.0, 2.0, 1.0, 0.0]);
    let ov = RouteOverrides {
        top_k: Some(1),
        logit_bias: None,
    };
    let x: Vec<f32> = unit_token().repeat(2);
    let g = gate(&plan(&c), &w, &x, 2, None, &ov).expect("gate");
    assert_eq!(g.ids, vec![0, 0]);
    assert_eq!(g.weights, vec![1.0, 1.0]);
    assert_eq!(g.slots, vec![0, 1]);

    let c = cfg(4, 3, Router::Given);
    let w = LayerWeights::random(&c, 1);
    let r = GivenRouting {
        ids: vec![3, 1, 2],
        weights: vec![0.5, 0.25, 0.25],
    };
    let ov = RouteOverrides {
        top_k: Some(2),
        logit_bias: None,
    };
    let g = gate(&plan(&c), &w, &unit_token(), 1, Some(&r), &ov).expect("gate");
    assert_eq!(g.ids, vec![3, 1]);
    assert_eq!(g.weights, vec![0.5, 0.25]);
}

#[test]
fn invalid_overrides_are_typed_errors() {
    let c = cfg(4, 2, Router::Softmax { renormalize: true });
    let p = plan(&c);
    let w = LayerWeights::random(&c, 1);
    let x = unit_token();
    let cases: Vec<(RouteOverrides, &str)> = vec![
        (
            RouteOverrides {
                top_k: Some(0),
                logit_bias: None,
            },
            "overrides.top_k",
        ),
        (
            RouteOverrides {
                top_k: Some(3),
                logit_bias: None,
            },
            "overrides.top_k",
        ),
        (
            RouteOverrides {
                top_k: None,
                logit_bias: Some(vec![0.0; 3]),
            },
            "overrides.logit_bias",
        ),
        (
            RouteOverrides {
                top_k: None,
                logit_bias: Some(vec![0.0, f32::NAN, 0.0, 0.0]),
            },
            "overrides.logit_bias",
        ),
        (
            RouteOverrides {
                top_k: None,
                logit_bias: Some(vec![0.0, 0.0, f32::INFINITY, 0.0]),
            },
            "overrides.logit_bias",
        ),
    ];
    for (ov, field) in cases {
        match gate(&p, &w, &x, 1, None, &ov) {
            Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field, "{ov:?}"),
            other => panic!("{ov:?}: expected InvalidInput({field}), got {other:?}"),
        }
    }
    let cg = cfg(4, 2, Router::Given);
    let r = GivenRouting {
        ids: vec![0, 1],
        weights: vec![1.0, 1.0],
    };
    let ov = RouteOverrides {
        top_k: None,
        logit_bias: Some(vec![0.0; 4]),
    };
    match gate(
        &plan(&cg),
        &LayerWeights::random(&cg, 1),
        &x,
        1,
        Some(&r),
        &ov,
    ) {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "overrides.logit_bias"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn invalid_inputs_are_typed_errors() {
    let c = cfg(4, 2, Router::Softmax { renormalize: true });
    let p = plan(&c);
    let w = LayerWeights::random(&c, 1);
    let ov = RouteOverrides::default();
    let field_of = |r: Result<GateOutput>| match r {
        Err(Error::InvalidInput { field, .. }) => field,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    assert_eq!(field_of(gate(&p, &w, &[0.0; H - 1], 1, None, &ov)), "x");
    assert_eq!(
        field_of(gate(&p, &w, &vec![0.0; 9 * H], 9, None, &ov)),
        "tokens"
    );
    let mut nan = unit_token();
    nan[5] = f32::NAN;
    assert_eq!(field_of(gate(&p, &w, &nan, 1, None, &ov)), "x");
    let r = GivenRouting {
        ids: vec![0, 1],
        weights: vec![1.0, 1.0],
    };
    assert_eq!(
        field_of(gate(&p, &w, &unit_token(), 1, Some(&r), &ov)),
        "routing"
    );
    let cg = cfg(4, 2, Router::Given);
    let wg = LayerWeights::random(&cg, 1);
    assert_eq!(
        field_of(gate(&plan(&cg), &wg, &unit_token(), 1, None, &ov)),
        "routing"
    );
    let bad = GivenRouting {
        ids: vec![0, 4],
        weights: vec![1.0, 1.0],
    };
    assert_eq!(
        field_of(gate(&plan(&cg), &wg, &unit_token(), 1, Some(&bad), &ov)),
        "routing.ids"
    );
    let mut short = w.clone();
    short.router.pop();
    assert_eq!(
        field_of(gate(&p, &short, &unit_token(), 1, None, &ov)),
        "weights.router"
    );
    let x = unit_token();
    let one = [RankInput {
        x: &x,
        tokens: 1,
        routing: None,
    }];
    let mut c2 = c.clone();
    c2.world = 2;
    match forward(&plan(&c2), &w, &one, &ov) {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "inputs"),
        other => panic!("expected InvalidInput(inputs), got {other:?}"),
    }
}

#[test]
fn slots_are_running_counts_and_overflow_is_dropped() {
    // 70 tokens, top-2, every token on experts 0 and (t % 2) + 1; capacity
    // ceil(1.37 x 70 x 2 / 3) = 64.
    let tokens = 70;
    let mut c = cfg(3, 2, Router::Given);
    c.tokens = tokens;
    c.capacity = Capacity::Factor(1.37);
    let p = plan(&c);
    assert_eq!(p.capacity, 64);
    let ids: Vec<u32> = (0..tokens).flat_map(|t| [0, 1 + (t % 2) as u32]).collect();
    let r = GivenRouting {
        weights: vec![0.5; ids.len()],
        ids,
    };
    let w = LayerWeights::random(&c, 3);
    let x = vec![0.0; tokens * H];
    let g = gate(&p, &w, &x, tokens, Some(&r), &RouteOverrides::default()).expect("gate");
    for t in 0..tokens {
        let want0 = if t < 64 { t as i32 } else { -1 };
        assert_eq!(g.slots[2 * t], want0, "token {t} choice 0");
        assert_eq!(g.slots[2 * t + 1], (t / 2) as i32, "token {t} choice 1");
    }
    assert_eq!(g.expert_counts, vec![70, 35, 35]);
    assert_eq!(g.dropped, 6);
}

#[test]
fn plain_relu_and_gelu_mlp_with_identity_weights() {
    // W0 = I, W1 = I: y = act(x) elementwise.
    for kind in [MlpKind::Relu, MlpKind::Gelu] {
        let mut c = cfg(1, 1, Router::Softmax { renormalize: true });
        c.mlp = kind;
        let mut eye = vec![0.0f32; H * H];
        for i in 0..H {
            eye[i * H + i] = 1.0;
        }
        let ew = ExpertWeights {
            w0: eye.clone(),
            w1: eye,
            ..ExpertWeights::default()
        };
        let x: Vec<f32> = (0..H).map(|i| i as f32 / 8.0 - 4.0).collect();
        let y = expert_mlp(&c, &ew, H, &x);
        for i in 0..H {
            let z = f64::from(x[i]);
            let want = match kind {
                MlpKind::Relu => z.max(0.0),
                _ => {
                    let inner = (2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z.powi(3));
                    0.5 * z * (1.0 + inner.tanh())
                }
            };
            assert!(
                (y[i] - want).abs() < 1e-6,
                "{kind:?} {i}: {} vs {want}",
                y[i]
            );
        }
    }
}

#[test]
fn gated_mlp_multiplies_activation_by_up_projection() {
    // gate rows = I, up rows = 2I, W1 = 0.5 I: y = act(x) * x.
    for kind in [MlpKind::SwiGlu, MlpKind::GeGlu] {
        let mut c = cfg(1, 1, Router::Softmax { renormalize: true });
        c.mlp = kind;
        let mut w0 = vec![0.0f32; 2 * H * H];
        let mut w1 = vec![0.0f32; H * H];
        for i in 0..H {
            w0[i * H + i] = 1.0;
            w0[(H + i) * H + i] = 2.0;
            w1[i * H + i] = 0.5;
        }
        let ew = ExpertWeights {
            w0,
            w1,
            ..ExpertWeights::default()
        };
        let x: Vec<f32> = (0..H).map(|i| i as f32 / 16.0 - 2.0).collect();
        let y = expert_mlp(&c, &ew, H, &x);
        for i in 0..H {
            let z = f64::from(x[i]);
            let act = match kind {
                MlpKind::SwiGlu => z / (1.0 + (-z).exp()),
                _ => activation(MlpKind::Gelu, z),
            };
            let want = f64::from((act * 2.0 * z) as f32) * 0.5;
            assert!(
                (y[i] - want).abs() < 1e-6,
                "{kind:?} {i}: {} vs {want}",
                y[i]
            );
        }
    }
}

#[test]
fn forward_combines_weighted_experts_and_gated_shared_expert() {
    // Two tokens, top-2 softmax on 3 experts, plus one gated shared expert.
    let mut c = cfg(3, 2, Router::Softmax { renormalize: false });
    c.shared = Some(SharedExperts {
        count: 1,
        intermediate: H,
        gated: true,
    });
    let w = LayerWeights::random(&c, 11);
    let x = crate::weights::random_tokens(&c, 2, 5);
    let p = plan(&c);
    let out = forward(
        &p,
        &w,
        &[RankInput {
            x: &x,
            tokens: 2,
            routing: None,
        }],
        &RouteOverrides::default(),
    )
    .expect("forward");
    let sw = w.shared.as_ref().expect("shared weights");
    let sg = w.shared_gate.as_ref().expect("shared gate");
    for t in 0..2 {
        let xt = &x[t * H..(t + 1) * H];
        let logits: Vec<f64> = (0..3)
            .map(|e| dot64(xt, &w.router[e * H..(e + 1) * H]))
            .collect();
        let probs = softmax(&logits);
        let mut order: Vec<usize> = (0..3).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut want = vec![0f64; H];
        for &e in &order[..2] {
            let y = expert_mlp(&c, &w.experts[e], H, xt);
            let wt = f64::from(probs[e] as f32);
            want.iter_mut().zip(&y).for_each(|(a, v)| *a += wt * v);
        }
        let gs = sig(dot64(xt, sg));
        let s = expert_mlp(&c, sw, H, xt);
        want.iter_mut().zip(&s).for_each(|(a, v)| *a += gs * v);
        for i in 0..H {
            assert_eq!(
                out.out[0][t * H + i],
                want[i] as f32,
                "token {t} element {i}"
            );
        }
        assert_eq!(
            out.gates[0].ids[2 * t..2 * t + 2],
            [order[0] as u32, order[1] as u32]
        );
    }
    assert_eq!(out.expert_counts.iter().sum::<u64>(), 4);
}

#[test]
fn dropped_choices_contribute_nothing_and_fully_dropped_rows_are_zero() {
    let tokens = 66;
    let mut c = cfg(2, 1, Router::Given);
    c.tokens = tokens;
    // ceil(1.939 x 66 / 2) = 64.
    c.capacity = Capacity::Factor(1.939);
    c.dtype = crate::Dtype::Bf16;
    let p = plan(&c);
    assert_eq!(p.capacity, 64);
    let r = GivenRouting {
        ids: vec![1; tokens],
        weights: vec![1.0; tokens],
    };
    let w = LayerWeights::random(&c, 2);
    let x = crate::weights::random_tokens(&c, tokens, 9);
    let out = forward(
        &p,
        &w,
        &[RankInput {
            x: &x,
            tokens,
            routing: Some(&r),
        }],
        &RouteOverrides::default(),
    )
    .expect("forward");
    assert_eq!(out.dropped, 2);
    assert_eq!(out.expert_counts, vec![0, 66]);
    for t in 0..tokens {
        let row = &out.out[0][t * H..(t + 1) * H];
        if t < 64 {
            let y = expert_mlp(&c, &w.experts[1], H, &x[t * H..(t + 1) * H]);
            for i in 0..H {
                assert_eq!(row[i], c.dtype.round(y[i] as f32));
            }
        } else {
            assert!(
                row.iter().all(|&v| v == 0.0),
                "token {t} was dropped: row must be 0"
            );
        }
    }
}

#[test]
fn zero_tokens_give_empty_outputs() {
    let mut c = cfg(4, 2, Router::Softmax { renormalize: true });
    c.world = 2;
    let w = LayerWeights::random(&c, 1);
    let x = crate::weights::random_tokens(&c, 3, 1);
    let inputs = [
        RankInput {
            x: &[],
            tokens: 0,
            routing: None,
        },
        RankInput {
            x: &x,
            tokens: 3,
            routing: None,
        },
    ];
    let out = forward(&plan(&c), &w, &inputs, &RouteOverrides::default()).expect("forward");
    assert!(out.out[0].is_empty() && out.gates[0].ids.is_empty());
    assert_eq!(out.out[1].len(), 3 * H);
    assert_eq!(out.expert_counts.iter().sum::<u64>(), 6);
    assert_eq!(out.dropped, 0);
}

#[test]
fn forward_rows_equals_forward_on_the_listed_rows() {
    // Capacity rounds up to 64 rows: 200 tokens on 2 experts overflow it.
    let mut cfg = MoeConfig::new(200, 64, 64, 2, 1);
    cfg.world = 2;
    cfg.capacity = crate::config::Capacity::Factor(0.1);
    cfg.shared = Some(crate::config::SharedExperts {
        count: 1,
        intermediate: 64,
        gated: true,
    });
    let plan = LayerPlan::new(&cfg).unwrap();
    let w = LayerWeights::random(&cfg, 3);
    let xs: Vec<Vec<f32>> = (0..2)
        .map(|r| crate::weights::random_tokens(&cfg, 200, 9 + r))
        .collect();
    let inputs: Vec<RankInput> = xs
        .iter()
        .map(|x| RankInput {
            x,
            tokens: 200,
            routing: None,
        })
        .collect();
    let ov = RouteOverrides::default();
    let full = forward(&plan, &w, &inputs, &ov).unwrap();
    assert!(
        full.dropped > 0,
        "the test needs drops to show slots are kept"
    );
    let rows = vec![vec![0, 17, 199], vec![5, 150]];
    let some = forward_rows(&plan, &w, &inputs, &ov, &rows).unwrap();
    for (r, list) in rows.iter().enumerate() {
        for (i, &t) in list.iter().enumerate() {
            let want = &full.out[r][t * 64..(t + 1) * 64];
            let got: Vec<f32> = some[r][i]
                .iter()
                .map(|&v| cfg.dtype.round(v as f32))
                .collect();
            assert_eq!(got, want, "rank {r} token {t}");
        }
    }
    assert!(forward_rows(&plan, &w, &inputs, &ov, &[vec![200], vec![]]).is_err());
    assert!(forward_rows(&plan, &w, &inputs, &ov, &[vec![0]]).is_err());
}

fn route_one(c: &MoeConfig, w: &LayerWeights) -> GateOutput {
    gate(
        &plan(c),
        w,
        &unit_token(),
        1,
        None,
        &RouteOverrides::default(),
    )
    .expect("gate")
}

#[test]
fn group_limited_softmax_keeps_the_groups_with_the_largest_probability() {
    use crate::config::GroupLimit;
    // Groups of two: maxima 3.0, 2.5, 2.9, 2.8 -> groups 0 and 2 kept (DeepSeek-V2).
    let logits = [3.0f32, -5.0, 2.5, -5.0, 2.9, -5.0, 2.8, 2.7];
    let mut c = cfg(8, 3, Router::Softmax { renormalize: false });
    let w = weights_with_logits(&c, &logits);
    assert_eq!(
        route_one(&c, &w).ids,
        vec![0, 4, 6],
        "no limit: plain top-3"
    );
    c.group_limit = Some(GroupLimit { groups: 4, keep: 2 });
    let g = route_one(&c, &w);
    // Within groups 0 and 2: 3.0, 2.9, then the -5 tie goes to the lower id (1).
    assert_eq!(g.ids, vec![0, 4, 1]);
    // The weights stay the unmasked probabilities.
    let p = softmax(&logits.map(f64::from));
    for (j, &e) in g.ids.iter().enumerate() {
        assert!(
            (f64::from(g.weights[j]) - p[e as usize]).abs() < 1e-6,
            "{g:?}"
        );
    }
}

#[test]
fn group_limited_sigmoid_scores_a_group_by_its_two_best_biased_scores() {
    use crate::config::GroupLimit;
    // Group 0 (experts 0, 1): sigma(2) + sigma(2) = 1.76; group 1 (2, 3): sigma(3) +
    // sigma(-3) = 1.0, though expert 2 alone is the best; group 2 and 3 lower still.
    let logits = [2.0f32, 2.0, 3.0, -3.0, -1.0, -1.0, -2.0, -2.0];
    let mut c = cfg(8, 2, Router::SigmoidBias { renormalize: true });
    let mut w = weights_with_logits(&c, &logits);
    w.router_bias = vec![0.0; 8];
    assert_eq!(route_one(&c, &w).ids, vec![2, 0], "no limit");
    c.group_limit = Some(GroupLimit { groups: 4, keep: 1 });
    let g = route_one(&c, &w);
    assert_eq!(g.ids, vec![0, 1]);
    let s = sig(2.0);
    assert!(
        (f64::from(g.weights[0]) - s / (2.0 * s)).abs() < 1e-6,
        "{g:?}"
    );
    // Negative biases elsewhere move the choice to group 1 (0.95 - 0.55): the masked
    // experts rank last (transformers 5: -inf), so the second choice is expert 3 although
    // its biased score sigma(-3) - 0.6 is below 0.
    w.router_bias = vec![-1.0, -1.0, 0.0, -0.6, -1.0, -1.0, -1.0, -1.0];
    let g = route_one(&c, &w);
    assert_eq!(g.ids, vec![2, 3], "{g:?}");
}

#[test]
fn sigmoid_input_router_scales_the_expert_input_and_sums_with_weight_one() {
    // Llama-4: top-1 of the logits, weight sigmoid(logit) applied to the input.
    let logits = [1.0f32, 3.0, 2.0, -1.0];
    let c = cfg(4, 1, Router::SigmoidInput);
    let w = weights_with_logits(&c, &logits);
    let g = route_one(&c, &w);
    assert_eq!(g.ids, vec![1]);
    assert!((f64::from(g.weights[0]) - sig(3.0)).abs() < 1e-6, "{g:?}");
    let x = unit_token();
    let out = forward(
        &plan(&c),
        &w,
        &[RankInput {
            x: &x,
            tokens: 1,
            routing: None,
        }],
        &RouteOverrides::default(),
    )
    .expect("forward");
    let scaled: Vec<f32> = x.iter().map(|&v| v * g.weights[0]).collect();
    let want = expert_mlp(&c, &w.experts[1], c.intermediate, &scaled);
    for (a, b) in out.out[0].iter().zip(&want) {
        assert!(
            (f64::from(*a) - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{a} vs {b}"
        );
    }
    // Not the output scaled: SwiGLU is not linear, so the two differ.
    let unscaled = expert_mlp(&c, &w.experts[1], c.intermediate, &x);
    let diff = want
        .iter()
        .zip(&unscaled)
        .map(|(a, b)| (a - f64::from(g.weights[0]) * b).abs())
        .fold(0.0, f64::max);
    assert!(
        diff > 1e-6,
        "input and output scaling agree: the test proves nothing"
    );
}

#[test]
fn sigmoid_renormalisation_divides_by_the_sum_plus_1e_20() {
    // Logits so negative that the sigmoids underflow towards 1e-22: DeepSeek-V3's
    // `/ (sum + 1e-20)` then leaves the weights far below 1.
    let logits = [-50.0f32, -51.0, -60.0, -61.0];
    let c = cfg(4, 2, Router::SigmoidBias { renormalize: true });
    let mut w = weights_with_logits(&c, &logits);
    w.router_bias = vec![0.0; 4];
    let g = route_one(&c, &w);
    assert_eq!(g.ids, vec![0, 1]);
    let (a, b) = (sig(-50.0), sig(-51.0));
    let want = a / (a + b + 1e-20);
    assert!(
        (f64::from(g.weights[0]) - want).abs() < 1e-6 * want,
        "{g:?} vs {want}"
    );
    assert!(want < 0.5, "the epsilon must matter in this test: {want}");
}

#[test]
fn dots64_is_dot64_bit_for_bit() {
    for (h, rows) in [(1usize, 1usize), (5, 3), (64, 8), (67, 13), (256, 17)] {
        let x: Vec<f32> = (0..h)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let w: Vec<f32> = (0..h * rows)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
            .collect();
        let mut got = vec![f64::NAN; rows];
        super::dots64(&x, &w, &mut got);
        for (e, g) in got.iter().enumerate() {
            let want = super::dot64(&x, &w[e * h..(e + 1) * h]);
            assert_eq!(g.to_bits(), want.to_bits(), "h {h} row {e}");
        }
    }
}

#[test]
fn logits64_is_dot64_bit_for_bit() {
    for (h, experts, tokens) in [
        (1usize, 1usize, 1usize),
        (5, 3, 7),
        (64, 8, 4),
        (67, 13, 9),
        (256, 40, 5),
        // Threaded in token chunks (tokens x experts x h >= 2^24), with a short last chunk.
        (1024, 64, 257),
    ] {
        let x: Vec<f32> = (0..h * tokens)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let w: Vec<f32> = (0..h * experts)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
            .collect();
        let got = super::logits::logits64(&x, tokens, &w, h);
        for t in 0..tokens {
            for e in 0..experts {
                let want = super::dot64(&x[t * h..(t + 1) * h], &w[e * h..(e + 1) * h]);
                let g = got[t * experts + e];
                assert_eq!(g.to_bits(), want.to_bits(), "h {h} token {t} expert {e}");
            }
        }
    }
}
