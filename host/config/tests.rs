//! Every refusal of `MoeConfig::validate` and `GivenRouting::validate`, by field.

use super::*;
use proptest::prelude::*;

fn ok() -> MoeConfig {
    let mut c = MoeConfig::new(128, 256, 512, 8, 2);
    c.world = 4;
    c
}

/// The field named by the `InvalidConfig` that `c` is refused with.
fn refused(c: &MoeConfig) -> &'static str {
    match c.validate() {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{c:?}: expected InvalidConfig, got {other:?}"),
    }
}

fn with(f: impl FnOnce(&mut MoeConfig)) -> MoeConfig {
    let mut c = ok();
    f(&mut c);
    c
}

#[test]
fn the_base_config_is_valid() {
    ok().validate().expect("valid");
    with(|c| c.tokens = 0)
        .validate()
        .expect("no tokens is a valid (empty) layer");
    with(|c| c.tokens = MAX_TOKENS)
        .validate()
        .expect("the largest token count");
    with(|c| c.experts = MAX_EXPERTS)
        .validate()
        .expect("the most experts");
    with(|c| c.capacity = Capacity::Factor(MAX_CAPACITY_FACTOR))
        .validate()
        .expect("the largest factor");
}

#[test]
fn sizes_out_of_range() {
    assert_eq!(refused(&with(|c| c.tokens = MAX_TOKENS + 1)), "tokens");
    assert_eq!(refused(&with(|c| c.tokens = usize::MAX)), "tokens");
    for bad in [0, 1, 63, 65, 100, MAX_DIM + DIM_MULTIPLE, usize::MAX] {
        assert_eq!(refused(&with(|c| c.hidden = bad)), "hidden", "{bad}");
        assert_eq!(
            refused(&with(|c| c.intermediate = bad)),
            "intermediate",
            "{bad}"
        );
    }
    assert_eq!(refused(&with(|c| c.experts = 0)), "experts");
    assert_eq!(refused(&with(|c| c.experts = MAX_EXPERTS + 1)), "experts");
    assert_eq!(refused(&with(|c| c.top_k = 0)), "top_k");
    assert_eq!(refused(&with(|c| c.top_k = MAX_TOP_K + 1)), "top_k");
    assert_eq!(refused(&with(|c| c.world = 0)), "world");
    assert_eq!(refused(&with(|c| c.world = MAX_WORLD + 1)), "world");
}

#[test]
fn top_k_above_experts() {
    let c = with(|c| {
        c.experts = 3;
        c.top_k = 4;
    });
    match c.validate() {
        Err(Error::InvalidConfig {
            field,
            value,
            limit,
        }) => {
            assert_eq!(field, "top_k");
            assert_eq!(value, "4");
            assert!(limit.contains('3'), "{limit}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn bad_capacity_factor() {
    for f in [
        0.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        MAX_CAPACITY_FACTOR * 2.0,
    ] {
        assert_eq!(
            refused(&with(|c| c.capacity = Capacity::Factor(f))),
            "capacity",
            "{f}"
        );
    }
}

#[test]
fn bad_routed_scale() {
    for s in [0.0, -2.5, f32::NAN, f32::INFINITY] {
        assert_eq!(
            refused(&with(|c| c.routed_scale = s)),
            "routed_scale",
            "{s}"
        );
    }
}

#[test]
fn bad_shared_experts() {
    let shared = |count, intermediate| {
        with(|c| {
            c.shared = Some(SharedExperts {
                count,
                intermediate,
                gated: false,
            })
        })
    };
    assert_eq!(refused(&shared(0, 512)), "shared.count");
    assert_eq!(
        refused(&shared(MAX_SHARED_EXPERTS + 1, 512)),
        "shared.count"
    );
    assert_eq!(refused(&shared(1, 0)), "shared.intermediate");
    assert_eq!(refused(&shared(1, 96)), "shared.intermediate");
    assert_eq!(refused(&shared(1, MAX_DIM + 64)), "shared.intermediate");
    shared(MAX_SHARED_EXPERTS, 64).validate().expect("valid");
}

#[test]
fn bad_placement_maps() {
    assert_eq!(
        refused(&with(|c| c.placement = Placement::Map(vec![0; 7]))),
        "placement"
    );
    assert_eq!(
        refused(&with(|c| c.placement = Placement::Map(vec![0; 9]))),
        "placement"
    );
    assert_eq!(
        refused(&with(|c| c.placement = Placement::Map(vec![]))),
        "placement"
    );
    let c = with(|c| c.placement = Placement::Map(vec![0, 1, 2, 3, 4, 0, 1, 2]));
    match c.validate() {
        Err(Error::InvalidConfig { field, value, .. }) => {
            assert_eq!(field, "placement");
            assert!(
                value.contains("expert 4") && value.contains("rank 4"),
                "{value}"
            );
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert_eq!(
        refused(&with(|c| c.placement = Placement::Map(vec![u32::MAX; 8]))),
        "placement"
    );
    with(|c| c.placement = Placement::Map(vec![3; 8]))
        .validate()
        .expect("all experts on one rank is valid");
}

/// The field named by the `InvalidInput` that routing `r` for `tokens` is refused with.
fn routing_refused(r: &GivenRouting, tokens: usize, c: &MoeConfig) -> &'static str {
    match r.validate(tokens, c) {
        Err(Error::InvalidInput { field, .. }) => field,
        other => panic!("{r:?}: expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn given_routing_refusals() {
    let c = with(|c| c.router = Router::Given);
    let good = GivenRouting {
        ids: vec![0, 7, 3, 1],
        weights: vec![0.5, 0.5, 1.0, -2.0],
    };
    good.validate(2, &c).expect("valid");
    let mut r = good.clone();
    r.ids.pop();
    assert_eq!(routing_refused(&r, 2, &c), "routing.ids");
    let mut r = good.clone();
    r.weights.push(1.0);
    assert_eq!(routing_refused(&r, 2, &c), "routing.weights");
    let mut r = good.clone();
    r.ids[2] = 8;
    assert_eq!(routing_refused(&r, 2, &c), "routing.ids");
    let mut r = good.clone();
    r.ids[3] = 3;
    assert_eq!(routing_refused(&r, 2, &c), "routing.ids");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut r = good.clone();
        r.weights[1] = bad;
        assert_eq!(routing_refused(&r, 2, &c), "routing.weights");
    }
    // The same id in two different tokens is fine.
    let r = GivenRouting {
        ids: vec![1, 2, 1, 2],
        weights: vec![1.0; 4],
    };
    r.validate(2, &c).expect("valid");
    assert_eq!(routing_refused(&good, c.tokens + 1, &c), "tokens");
    assert_eq!(routing_refused(&good, usize::MAX, &c), "tokens");
}

fn any_placement() -> impl Strategy<Value = Placement> {
    prop_oneof![
        Just(Placement::Blocked),
        prop::collection::vec(any::<u32>(), 0..40).prop_map(Placement::Map),
        prop::collection::vec(0u32..8, 0..40).prop_map(Placement::Map),
    ]
}

fn any_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        any::<usize>(),
        0usize..70_000,
        (0usize..1100).prop_map(|d| d * 64)
    ]
}

fn any_config() -> impl Strategy<Value = MoeConfig> {
    (
        (
            prop_oneof![any::<usize>(), 0usize..2_000_000],
            any_dim(),
            any_dim(),
        ),
        (
            prop_oneof![any::<usize>(), 0usize..2000],
            prop_oneof![any::<usize>(), 0usize..20],
        ),
        (any::<f32>(), any::<bool>(), any::<f32>()),
        (any::<usize>(), any_dim(), any::<bool>(), any::<bool>()),
        (prop_oneof![any::<usize>(), 0usize..2000], any_placement()),
    )
        .prop_map(
            |(
                (tokens, hidden, intermediate),
                (experts, top_k),
                (f, dropless, scale),
                s,
                (world, placement),
            )| {
                let mut c = MoeConfig::new(tokens, hidden, intermediate, experts, top_k);
                c.capacity = if dropless {
                    Capacity::Dropless
                } else {
                    Capacity::Factor(f)
                };
                c.routed_scale = scale;
                c.shared = s.3.then_some(SharedExperts {
                    count: s.0 % 40,
                    intermediate: s.1,
                    gated: s.2,
                });
                c.world = world;
                c.placement = placement;
                c
            },
        )
}

proptest! {
    #[test]
    fn validate_never_panics_and_valid_configs_plan(c in any_config()) {
        if c.validate().is_ok() {
            // A valid config plans, or is refused as too large; it never panics.
            match crate::plan::LayerPlan::new(&c) {
                Ok(_) | Err(Error::PlanTooLarge { .. }) => {}
                Err(e) => prop_assert!(false, "valid config refused by the plan: {e}"),
            }
            prop_assert_eq!(c.expert_owners().len(), c.experts);
        }
    }

    #[test]
    fn given_routing_validate_never_panics(
        ids in prop::collection::vec(0u32..20, 0..40),
        weights in prop::collection::vec(any::<f32>(), 0..40),
        tokens in prop_oneof![any::<usize>(), 0usize..20],
    ) {
        let c = with(|c| { c.experts = 16; c.top_k = 2; c.tokens = 16; });
        let r = GivenRouting { ids, weights };
        if r.validate(tokens, &c).is_ok() {
            prop_assert_eq!(r.ids.len(), tokens * 2);
            prop_assert!(r.ids.iter().all(|&i| i < 16));
            prop_assert!(r.weights.iter().all(|w| w.is_finite()));
        }
    }
}
