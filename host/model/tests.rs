use super::synthetic::SyntheticSpec;
use super::*;
use crate::config::{Capacity, Dtype};
use crate::reference::{self, LayerOutput};

fn spec(layers: usize, world: usize) -> SyntheticSpec {
    let cfg = MoeConfig {
        capacity: Capacity::Dropless,
        ..MoeConfig::new(32, 64, 64, 8, 2)
    };
    SyntheticSpec::new(cfg, layers)
        .with_dtype(Dtype::F32)
        .with_world(world, crate::config::Placement::Blocked)
}

/// Residual stream computed here from the reference directly, for comparison.
fn by_hand(layers: &[ModelLayer], x: &[Vec<f32>], top_k: Option<usize>) -> Vec<Vec<f32>> {
    let mut state = x.to_vec();
    for l in layers {
        let plan = LayerPlan::new(&l.config).unwrap();
        let normed: Vec<Vec<f32>> = state
            .iter()
            .map(|r| l.norm.apply(r, l.config.dtype))
            .collect();
        let inputs: Vec<RankInput> = normed
            .iter()
            .map(|x| RankInput {
                x,
                tokens: x.len() / l.config.hidden,
                routing: None,
            })
            .collect();
        let ov = RouteOverrides {
            top_k,
            logit_bias: l.logit_bias.clone(),
        };
        let out = reference::forward(&plan, &l.weights, &inputs, &ov).unwrap();
        for (s, o) in state.iter_mut().zip(&out.out) {
            for (a, b) in s.iter_mut().zip(o) {
                *a += b;
            }
        }
    }
    state
}

#[test]
fn reference_backend_matches_the_chained_reference() {
    let s = spec(3, 2);
    let layers = s.build().unwrap();
    let mut m = MoeModel::new(layers.clone(), Backend::Reference).unwrap();
    assert_eq!(
        (m.len(), m.hidden(), m.world(), m.max_tokens()),
        (3, 64, 2, 32)
    );
    assert_eq!(m.backend_names(), vec!["reference"; 3]);
    // Ranks bring different token counts.
    let x = vec![s.inputs(32, 1).remove(0), s.inputs(17, 2).remove(0)];
    let (out, trace) = m.forward_traced(&x).unwrap();
    assert_eq!(trace.len(), 3);
    assert_eq!(out.hidden, trace[2]);
    assert_eq!(out.hidden, by_hand(&layers, &x, None));
    assert_eq!(out.layers.len(), 3);
    for (l, st) in out.layers.iter().enumerate() {
        assert_eq!(st.layer, l);
        assert_eq!(st.routed(), (32 + 17) * 2);
        assert_eq!(st.dropped, 0);
    }
    // The residual is there: the output is not the last MoE output alone.
    assert_ne!(out.hidden, x);
}

#[test]
fn top_k_override_reaches_every_layer() {
    let s = spec(2, 1);
    let layers = s.build().unwrap();
    let mut m = MoeModel::new(layers.clone(), Backend::Reference).unwrap();
    m.set_top_k(Some(1));
    let x = s.inputs(32, 5);
    let out = m.forward(&x).unwrap();
    assert_eq!(out.hidden, by_hand(&layers, &x, Some(1)));
    assert!(out.layers.iter().all(|st| st.routed() == 32));
    m.set_top_k(Some(3));
    assert!(m.forward(&x).is_err());
}

#[test]
fn capacity_drops_are_reported_per_layer() {
    let mut s = spec(2, 1);
    // 256 tokens x top-2 on 8 experts, capacity 0.25 x 256 x 2 / 8 = 16 pairs, strong
    // popularity skew: the most popular expert receives far more than 16 pairs.
    s.config.tokens = 256;
    s.config.capacity = Capacity::Factor(0.25);
    s.zipf = 3.0;
    let layers = s.build().unwrap();
    let mut m = MoeModel::new(layers.clone(), Backend::Reference).unwrap();
    let x = s.inputs(256, 9);
    let out = m.forward(&x).unwrap();
    assert_eq!(out.hidden, by_hand(&layers, &x, None));
    assert!(out.layers[0].dropped > 0, "{}", out.layers[0].summary());
    let plan = LayerPlan::new(&layers[0].config).unwrap();
    assert_eq!(plan.capacity, 16);
    let normed = layers[0].norm.apply(&x[0], Dtype::F32);
    let r: LayerOutput = reference::forward(
        &plan,
        &layers[0].weights,
        &[RankInput {
            x: &normed,
            tokens: 256,
            routing: None,
        }],
        &RouteOverrides {
            top_k: None,
            logit_bias: layers[0].logit_bias.clone(),
        },
    )
    .unwrap();
    assert_eq!(out.layers[0].dropped, r.dropped);
    assert_eq!(out.layers[0].expert_counts, r.expert_counts);
    let kept: u64 = r.expert_counts.iter().map(|&c| c.min(16)).sum();
    assert_eq!(kept + r.dropped, 512);
}

#[test]
fn inputs_are_checked() {
    let s = spec(1, 2);
    let mut m = MoeModel::new(s.build().unwrap(), Backend::Reference).unwrap();
    let one = s.inputs(4, 0);
    assert!(matches!(
        m.forward(&one[..1]),
        Err(Error::InvalidInput { field: "x", .. })
    ));
    let ragged = vec![vec![0.0; 65], vec![0.0; 64]];
    assert!(matches!(
        m.forward(&ragged),
        Err(Error::InvalidInput { field: "x", .. })
    ));
    let too_many = vec![vec![0.0; 64 * 33], vec![0.0; 64]];
    assert!(matches!(
        m.forward(&too_many),
        Err(Error::InvalidInput { field: "x", .. })
    ));
}

#[test]
fn layers_must_agree_and_be_valid() {
    assert!(matches!(
        MoeModel::new(Vec::new(), Backend::Reference),
        Err(Error::InvalidConfig {
            field: "layers",
            ..
        })
    ));
    let mut layers = spec(2, 1).build().unwrap();
    let mut other = spec(1, 1);
    other.config.hidden = 128;
    layers.push(other.build().unwrap().remove(0));
    assert!(matches!(
        MoeModel::new(layers, Backend::Reference),
        Err(Error::InvalidConfig {
            field: "hidden",
            ..
        })
    ));
    let mut layers = spec(1, 1).build().unwrap();
    layers[0].logit_bias = Some(vec![0.0; 3]);
    assert!(matches!(
        MoeModel::new(layers, Backend::Reference),
        Err(Error::InvalidInput {
            field: "logit_bias",
            ..
        })
    ));
    let mut layers = spec(1, 1).build().unwrap();
    layers[0].config.router = crate::config::Router::Given;
    assert!(matches!(
        MoeModel::new(layers, Backend::Reference),
        Err(Error::InvalidConfig {
            field: "router",
            ..
        })
    ));
    let mut layers = spec(1, 1).build().unwrap();
    layers[0].norm.weight.pop();
    assert!(matches!(
        MoeModel::new(layers, Backend::Reference),
        Err(Error::InvalidInput {
            field: "norm.weight",
            ..
        })
    ));
}

/// A custom backend through the factory hook (what the GPU layer will use).
#[test]
fn factory_hook_runs_custom_backends() {
    struct Halving(ReferenceLayer);
    impl LayerBackend for Halving {
        fn name(&self) -> &'static str {
            "halving"
        }
        fn forward_host(
            &mut self,
            inputs: &[RankInput],
            ov: &RouteOverrides,
        ) -> Result<LayerOutput> {
            let mut out = self.0.forward_host(inputs, ov)?;
            for r in &mut out.out {
                r.iter_mut().for_each(|v| *v *= 0.5);
            }
            Ok(out)
        }
    }
    let s = spec(1, 1);
    let layers = s.build().unwrap();
    let mut m = MoeModel::with_factory(layers.clone(), |_, plan, w| {
        Ok(Box::new(Halving(ReferenceLayer::new(plan, w))))
    })
    .unwrap();
    assert_eq!(m.backend_names(), vec!["halving"]);
    let x = s.inputs(8, 3);
    let got = m.forward(&x).unwrap().hidden;
    let full = by_hand(&layers, &x, None);
    for ((g, f), x0) in got[0].iter().zip(&full[0]).zip(&x[0]) {
        assert!((g - (x0 + 0.5 * (f - x0))).abs() < 1e-5);
    }
    // A backend returning the wrong number of ranks is caught.
    struct Empty;
    impl LayerBackend for Empty {
        fn name(&self) -> &'static str {
            "empty"
        }
        fn forward_host(&mut self, _: &[RankInput], _: &RouteOverrides) -> Result<LayerOutput> {
            Ok(LayerOutput::from_ranks(8, Vec::new(), Vec::new()))
        }
    }
    let mut m = MoeModel::with_factory(layers, |_, _, _| Ok(Box::new(Empty))).unwrap();
    assert!(matches!(
        m.forward(&x),
        Err(Error::InvalidInput {
            field: "backend output",
            ..
        })
    ));
}

#[test]
fn cpu_backend_agrees_with_the_reference_on_two_ranks() {
    let s = spec(3, 2);
    let layers = s.build().unwrap();
    let mut cpu = MoeModel::new(layers.clone(), Backend::Cpu).unwrap();
    assert_eq!(cpu.backend_names(), vec!["cpu"; 3]);
    let mut refm = MoeModel::new(layers, Backend::Reference).unwrap();
    let x = s.inputs(32, 21);
    for _ in 0..2 {
        // Two forwards: the executors' epochs advance without a reset.
        let (a, b) = (cpu.forward(&x).unwrap(), refm.forward(&x).unwrap());
        for (ra, rb) in a.hidden.iter().zip(&b.hidden) {
            let scale = rb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = ra
                .iter()
                .zip(rb)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(err <= 1e-5 * scale, "err {err} scale {scale}");
        }
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            assert_eq!(
                (&la.expert_counts, la.dropped),
                (&lb.expert_counts, lb.dropped)
            );
        }
    }
}

/// Hash routing needs ids, one list per rank and one id per token, each within the table.
#[test]
fn hash_routing_checks_the_ids() {
    // Vocabulary 3, top-2.
    let table = [0u32, 1, 2, 3, 1, 3];
    let a = [1u32, 2, 0];
    let b = [2u32];
    let got = super::hash_routing_of(&table, 2, 7, Some(&[&a[..], &b[..]]), &[3, 1]).unwrap();
    assert_eq!(got[0].ids, vec![2, 3, 1, 3, 0, 1]);
    assert_eq!(got[1].ids, vec![1, 3]);
    assert!(super::hash_routing_of(&table, 2, 7, Some(&[&a[..0], &[]]), &[0, 0]).is_ok());
    let e = super::hash_routing_of::<&[u32]>(&table, 2, 7, None, &[3, 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_ids") && e.contains("layer 7"), "{e}");
    let e = super::hash_routing_of(&table, 2, 7, Some(&[&a[..]]), &[3, 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_ids") && e.contains("world is 2"), "{e}");
    let e = super::hash_routing_of(&table, 2, 7, Some(&[&a[..], &b[..]]), &[2, 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 0: 3 ids for 2 tokens"), "{e}");
    let c = [3u32];
    let e = super::hash_routing_of(&table, 2, 7, Some(&[&c[..], &b[..]]), &[1, 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary of 3"), "{e}");
}
