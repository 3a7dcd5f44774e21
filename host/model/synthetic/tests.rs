use super::*;
use crate::config::{Capacity, Router, SharedExperts};
use crate::model::{Backend, MoeModel};

fn tiny(layers: usize) -> SyntheticSpec {
    let cfg = MoeConfig {
        capacity: Capacity::Dropless,
        ..MoeConfig::new(64, 64, 64, 16, 2)
    };
    SyntheticSpec::new(cfg, layers).with_dtype(Dtype::F32)
}

#[test]
fn every_preset_exists_validates_and_keeps_its_shape() {
    for name in PRESETS {
        let s = SyntheticSpec::preset(name, 3, 128).unwrap();
        s.config.validate().unwrap();
        assert_eq!((s.layers, s.config.tokens), (3, 128));
    }
    let ds = preset_config("deepseek-v3").unwrap();
    assert_eq!(
        (ds.hidden, ds.intermediate, ds.experts, ds.top_k),
        (7168, 2048, 256, 8)
    );
    assert_eq!(ds.router, Router::SigmoidBias { renormalize: true });
    assert_eq!(ds.routed_scale, 2.5);
    let mx = preset_config("mixtral-8x7b").unwrap();
    assert_eq!(
        (mx.hidden, mx.intermediate, mx.experts, mx.top_k),
        (4096, 14336, 8, 2)
    );
    match preset_config("gpt-5") {
        Err(Error::InvalidConfig { field, limit, .. }) => {
            assert_eq!(field, "preset");
            assert!(limit.contains("olmoe-1b-7b"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn big_presets_are_refused_before_allocating() {
    let s = SyntheticSpec::preset("deepseek-v3", 2, 16).unwrap();
    // 256 experts * 3 * 7168 * 2048 f32 per layer: far above the default cap.
    assert!(s.host_bytes() > 40 << 30);
    assert!(matches!(s.build(), Err(Error::PlanTooLarge { .. })));
}

#[test]
fn host_bytes_counts_the_built_weights() {
    let mut s = tiny(2);
    s.config.shared = Some(SharedExperts {
        count: 2,
        intermediate: 64,
        gated: true,
    });
    s.config.router = Router::SigmoidBias { renormalize: true };
    let layers = s.build().unwrap();
    let counted: usize = layers
        .iter()
        .map(|l| {
            let w = &l.weights;
            w.router.len()
                + w.router_bias.len()
                + w.experts
                    .iter()
                    .map(|e| e.w0.len() + e.w1.len())
                    .sum::<usize>()
                + w.shared.as_ref().map_or(0, |e| e.w0.len() + e.w1.len())
                + w.shared_gate.as_ref().map_or(0, Vec::len)
                + l.norm.weight.len()
        })
        .sum();
    assert_eq!(s.host_bytes(), 4 * counted as u64);
}

#[test]
fn zipf_bias_is_a_permutation_of_log_ranks() {
    let mut rng = StdRng::seed_from_u64(7);
    let b = zipf_logit_bias(10, 1.2, &mut rng);
    let mut sorted = b.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let want: Vec<f32> = (1..=10).map(|r| (-1.2 * (r as f64).ln()) as f32).collect();
    assert_eq!(sorted, want);
    assert_ne!(b, want, "the order should be shuffled");
}

#[test]
fn build_is_deterministic_and_layers_differ() {
    let a = tiny(2).build().unwrap();
    let b = tiny(2).build().unwrap();
    assert_eq!(a[0].weights, b[0].weights);
    assert_eq!(a[1].logit_bias, b[1].logit_bias);
    assert_ne!(a[0].weights, a[1].weights);
    assert_ne!(a[0].logit_bias, a[1].logit_bias);
    let mut other = tiny(2);
    other.seed = 1;
    assert_ne!(other.build().unwrap()[0].weights, a[0].weights);
    let mut flat = tiny(1);
    flat.zipf = 0.0;
    assert_eq!(flat.build().unwrap()[0].logit_bias, None);
}

#[test]
fn bad_specs_name_the_field() {
    let mut s = tiny(1);
    s.zipf = -1.0;
    assert!(matches!(
        s.build(),
        Err(Error::InvalidConfig { field: "zipf", .. })
    ));
    assert!(matches!(
        tiny(0).build(),
        Err(Error::InvalidConfig {
            field: "layers",
            ..
        })
    ));
    let mut s = tiny(1);
    s.config.hidden = 65;
    assert!(matches!(
        s.build(),
        Err(Error::InvalidConfig {
            field: "hidden",
            ..
        })
    ));
}

/// The spread of per-expert loads grows with the Zipf exponent.
#[test]
fn skew_grows_with_the_exponent() {
    let imbalance = |zipf: f64| {
        let mut s = tiny(1);
        s.zipf = zipf;
        s.seed = 3;
        let mut m = MoeModel::new(s.build().unwrap(), Backend::Reference).unwrap();
        let out = m.forward(&s.inputs(64, 11)).unwrap();
        let st = &out.layers[0];
        assert_eq!(st.routed(), 64 * 2);
        st.max_load() as f64 / st.mean_load()
    };
    let (flat, skewed) = (imbalance(0.0), imbalance(2.0));
    assert!(
        skewed > flat + 1.0,
        "imbalance flat {flat}, zipf 2 {skewed}"
    );
}
