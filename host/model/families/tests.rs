use super::*;
use crate::error::Error;
use serde_json::json;

fn parse(v: Value) -> Result<FamilyConfig> {
    FamilyConfig::parse(Path::new("/ckpt/config.json"), &v)
}

/// Config values as in the released checkpoints (shared/notes/model-families.md §1).
fn mixtral() -> Value {
    json!({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
           "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 32,
           "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "bfloat16"})
}

fn qwen15() -> Value {
    json!({"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
           "moe_intermediate_size": 1408, "num_experts": 60, "num_experts_per_tok": 4,
           "shared_expert_intermediate_size": 5632, "norm_topk_prob": false,
           "num_hidden_layers": 24, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "decoder_sparse_step": 1, "mlp_only_layers": []})
}

fn ds_v2_lite() -> Value {
    json!({"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_experts_per_tok": 6,
           "n_shared_experts": 2, "norm_topk_prob": false, "topk_method": "greedy",
           "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_hidden_layers": 27,
           "rms_norm_eps": 1e-6, "hidden_act": "silu", "torch_dtype": "bfloat16"})
}

fn ds_v3() -> Value {
    json!({"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
           "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
           "n_shared_experts": 1, "norm_topk_prob": true, "topk_method": "noaux_tc",
           "scoring_func": "sigmoid", "n_group": 8, "topk_group": 4,
           "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "moe_layer_freq": 1,
           "num_hidden_layers": 61, "rms_norm_eps": 1e-6, "hidden_act": "silu"})
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

#[test]
fn mixtral_renormalises_without_shared_experts() {
    let f = parse(mixtral()).unwrap();
    assert_eq!(f.family, Family::Mixtral);
    assert_eq!(
        (f.hidden, f.intermediate, f.experts, f.top_k),
        (4096, 14336, 8, 2)
    );
    assert_eq!(f.router, Router::Softmax { renormalize: true });
    assert_eq!(
        (f.routed_scale, f.shared, f.mlp),
        (1.0, None, MlpKind::SwiGlu)
    );
    assert_eq!((f.eps, f.dtype), (1e-5, Some(Dtype::Bf16)));
    assert_eq!(f.moe_layers().len(), 32);
    assert!(f.dense_layers.is_empty());
    // Even an explicit norm_topk_prob = false does not switch Mixtral's renormalisation off.
    let f = parse(with(mixtral(), "norm_topk_prob", json!(false))).unwrap();
    assert_eq!(f.router, Router::Softmax { renormalize: true });
}

#[test]
fn qwen2_moe_has_a_gated_shared_expert_and_no_renormalisation() {
    let f = parse(qwen15()).unwrap();
    assert_eq!(f.family, Family::Qwen2Moe);
    assert_eq!((f.intermediate, f.experts, f.top_k), (1408, 60, 4));
    assert_eq!(f.router, Router::Softmax { renormalize: false });
    assert_eq!(
        f.shared,
        Some(SharedExperts {
            count: 1,
            intermediate: 5632,
            gated: true
        })
    );
    assert_eq!(f.dtype, None);
}

#[test]
fn qwen_dense_layer_rule() {
    let v = with(qwen15(), "mlp_only_layers", json!([0, 5]));
    let f = parse(with(v, "decoder_sparse_step", json!(2))).unwrap();
    // dense iff in mlp_only_layers or (i + 1) % step != 0
    let expect: Vec<usize> = (0..24)
        .filter(|i| *i == 0 || *i == 5 || (i + 1) % 2 != 0)
        .collect();
    assert_eq!(f.dense_layers, expect);
    assert!(f.is_moe(3) && !f.is_moe(5) && !f.is_moe(4) && !f.is_moe(24));
}

#[test]
fn qwen3_and_olmoe_follow_norm_topk_prob() {
    let q3 = json!({"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
        "num_hidden_layers": 48, "hidden_act": "silu"});
    let f = parse(q3.clone()).unwrap();
    assert_eq!(f.router, Router::Softmax { renormalize: true });
    assert_eq!((f.intermediate, f.shared, f.eps), (768, None, 1e-6));
    let f = parse(with(q3, "norm_topk_prob", json!(false))).unwrap();
    assert_eq!(f.router, Router::Softmax { renormalize: false });

    let olmoe = json!({"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": false,
        "num_hidden_layers": 16, "hidden_act": "silu"});
    let f = parse(olmoe).unwrap();
    assert_eq!(f.router, Router::Softmax { renormalize: false });
    // rms_norm_eps absent -> OLMoE's default 1e-5
    assert_eq!((f.intermediate, f.eps), (1024, 1e-5));
}

#[test]
fn deepseek_v2_lite_scales_without_renormalising_and_skips_the_dense_layer() {
    let f = parse(ds_v2_lite()).unwrap();
    assert_eq!(f.router, Router::Softmax { renormalize: false });
    assert_eq!(f.routed_scale, 1.0);
    assert_eq!(
        f.shared,
        Some(SharedExperts {
            count: 2,
            intermediate: 1408,
            gated: false
        })
    );
    assert_eq!(f.dense_layers, vec![0]);
    assert_eq!(f.moe_layers().len(), 26);
    // DeepSeek-V2 (236B) values: scale 16, and the router still does not renormalise even
    // if norm_topk_prob is set (transformers ignores it for V2).
    let v = with(ds_v2_lite(), "routed_scaling_factor", json!(16.0));
    let f = parse(with(v, "norm_topk_prob", json!(true))).unwrap();
    assert_eq!(
        (f.routed_scale, f.router),
        (16.0, Router::Softmax { renormalize: false })
    );
}

#[test]
fn group_limited_selection_is_read_as_a_group_limit() {
    use crate::config::GroupLimit;
    let v = with(ds_v2_lite(), "topk_method", json!("group_limited_greedy"));
    let v = with(v, "n_group", json!(8));
    let f = parse(with(v.clone(), "topk_group", json!(3))).unwrap();
    assert_eq!(f.group_limit, Some(GroupLimit { groups: 8, keep: 3 }));
    assert!(
        f.router_f32,
        "transformers keeps DeepSeek-V2's gate.weight in f32 (_keep_in_fp32_modules_strict)"
    );
    // Every group kept: the selection is plain top-k.
    assert_eq!(
        parse(with(v, "topk_group", json!(8))).unwrap().group_limit,
        None
    );
    // Greedy V2 ignores the group keys.
    let v = with(
        with(ds_v2_lite(), "n_group", json!(8)),
        "topk_group",
        json!(3),
    );
    assert_eq!(parse(v).unwrap().group_limit, None);

    // DeepSeek-V3 as released (8/4), with its router in f32; absent keys are transformers'
    // defaults (8/4); 1/1 is no limit.
    let f = parse(ds_v3()).unwrap();
    assert_eq!(f.group_limit, Some(GroupLimit { groups: 8, keep: 4 }));
    assert!(f.router_f32);
    let mut absent = ds_v3();
    absent.as_object_mut().unwrap().remove("n_group");
    absent.as_object_mut().unwrap().remove("topk_group");
    assert_eq!(
        parse(absent).unwrap().group_limit,
        Some(GroupLimit { groups: 8, keep: 4 })
    );
    let v = with(with(ds_v3(), "n_group", json!(1)), "topk_group", json!(1));
    let f = parse(v).unwrap();
    assert_eq!(f.group_limit, None);
    assert_eq!(f.router, Router::SigmoidBias { renormalize: true });
    assert_eq!(f.routed_scale, 2.5);
    assert_eq!(f.dense_layers, vec![0, 1, 2]);
    assert_eq!(
        f.shared.map(|s| (s.count, s.intermediate, s.gated)),
        Some((1, 2048, false))
    );
    // Kimi-K2 and GLM-4.5 configs are read as DeepSeek-V3.
    for mt in ["kimi_k2", "glm4_moe"] {
        let f = parse(with(ds_v3(), "model_type", json!(mt))).unwrap();
        assert_eq!(f.family, Family::DeepseekV3, "{mt}");
        assert!(f.router_f32, "{mt}");
    }
    // An impossible group count is refused by the config's validation.
    let bad = with(with(ds_v3(), "n_group", json!(7)), "topk_group", json!(3));
    let f = parse(bad).unwrap();
    let cfg = f.layer_config(
        16,
        crate::config::Dtype::Bf16,
        crate::config::Capacity::Dropless,
        1,
        crate::config::Placement::Blocked,
    );
    assert!(matches!(
        cfg.validate(),
        Err(Error::InvalidConfig {
            field: "group_limit.groups",
            ..
        })
    ));
}

#[test]
fn qwen3_reads_either_spelling_of_the_expert_count() {
    let v = json!({"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
        "num_hidden_layers": 48, "hidden_act": "silu"});
    let n = parse(v.clone()).unwrap().experts;
    let mut t5 = v;
    let e = t5.as_object_mut().unwrap().remove("num_experts").unwrap();
    t5.as_object_mut()
        .unwrap()
        .insert("num_local_experts".into(), e);
    assert_eq!(parse(t5).unwrap().experts, n);
}

#[test]
fn phimoe_routes_with_sparsemixer_and_normalises_with_layernorm() {
    let v = with(mixtral(), "model_type", json!("phimoe"));
    let f = parse(with(v.clone(), "router_jitter_noise", json!(0.02))).unwrap();
    assert_eq!(f.router, Router::sparse_mixer(0.02));
    assert!(f.layer_norm);
    // The key's default is PhiMoE's 0.01.
    assert_eq!(parse(v.clone()).unwrap().router, Router::sparse_mixer(0.01));
    // Sparsemixer picks exactly two experts.
    match parse(with(v, "num_experts_per_tok", json!(3))) {
        Err(Error::UnsupportedModel { key, .. }) => assert_eq!(key, "num_experts_per_tok"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bad_and_unknown_keys_name_the_key() {
    match parse(with(mixtral(), "model_type", json!("llama"))) {
        Err(Error::UnsupportedModel { key, value, .. }) => {
            assert_eq!((key.as_str(), value.as_str()), ("model_type", "llama"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut v = mixtral();
    v.as_object_mut().unwrap().remove("num_local_experts");
    match parse(v) {
        Err(Error::Checkpoint { reason, .. }) => assert!(reason.contains("num_local_experts")),
        other => panic!("unexpected {other:?}"),
    }
    match parse(with(mixtral(), "hidden_size", json!("big"))) {
        Err(Error::Checkpoint { reason, .. }) => {
            assert!(reason.contains("hidden_size") && reason.contains("\"big\""))
        }
        other => panic!("unexpected {other:?}"),
    }
    match parse(with(mixtral(), "hidden_act", json!("gelu"))) {
        Err(Error::UnsupportedModel { key, .. }) => assert_eq!(key, "hidden_act"),
        other => panic!("unexpected {other:?}"),
    }
    match parse(with(ds_v2_lite(), "moe_layer_freq", json!(2))) {
        Err(Error::UnsupportedModel { key, .. }) => assert_eq!(key, "moe_layer_freq"),
        other => panic!("unexpected {other:?}"),
    }
    let f = parse(with(mixtral(), "hidden_act", json!("gelu_pytorch_tanh"))).unwrap();
    assert_eq!(f.mlp, MlpKind::GeGlu);
}

#[test]
fn dtype_keys() {
    let mut v = mixtral();
    v.as_object_mut().unwrap().remove("torch_dtype");
    assert_eq!(parse(v.clone()).unwrap().dtype, None);
    assert_eq!(
        parse(with(v.clone(), "dtype", json!("float16")))
            .unwrap()
            .dtype,
        Some(Dtype::F16)
    );
    assert_eq!(
        parse(with(v.clone(), "dtype", json!("float32")))
            .unwrap()
            .dtype,
        Some(Dtype::F32)
    );
    assert!(matches!(
        parse(with(v, "torch_dtype", json!("float8_e4m3fn"))),
        Err(Error::UnsupportedModel { key, .. }) if key == "torch_dtype"
    ));
}

#[test]
fn layer_config_carries_the_runtime_fields() {
    let f = parse(ds_v2_lite()).unwrap();
    let cfg = f.layer_config(128, Dtype::Bf16, Capacity::Dropless, 2, Placement::Blocked);
    assert_eq!(
        (cfg.tokens, cfg.world, cfg.capacity),
        (128, 2, Capacity::Dropless)
    );
    assert_eq!((cfg.experts, cfg.top_k, cfg.intermediate), (64, 6, 1408));
    cfg.validate().unwrap();
}

#[test]
fn model_types_round_trip() {
    for f in FAMILIES {
        assert_eq!(Family::from_model_type(f.model_type()), Some(f));
        assert_eq!(f.to_string(), f.model_type());
    }
    assert_eq!(Family::from_model_type("llama"), None);
}

#[test]
fn a_huge_layer_count_is_refused_at_once() {
    let start = std::time::Instant::now();
    for v in [qwen15(), ds_v3(), mixtral()] {
        match parse(with(v, "num_hidden_layers", json!(1u64 << 40))) {
            Err(Error::UnsupportedModel { key, .. }) => assert_eq!(key, "num_hidden_layers"),
            other => panic!("{other:?}"),
        }
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
}

/// Any JSON value, up to a small depth.
fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z_]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What the loader does with a parsed config: none of it may panic or hang.
fn use_config(f: &FamilyConfig) {
    let _ = f.moe_layers();
    let c = f.layer_config(
        8,
        crate::config::Dtype::Bf16,
        crate::config::Capacity::Dropless,
        1,
        crate::config::Placement::Blocked,
    );
    let _ = c.validate();
}

const KEYS: [&str; 16] = [
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_experts_per_tok",
    "hidden_act",
    "num_local_experts",
    "num_experts",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "first_k_dense_replace",
    "mlp_only_layers",
    "decoder_sparse_step",
    "shared_expert_intermediate_size",
    "rms_norm_eps",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Arbitrary JSON gives a typed error or a config, never a panic.
    #[test]
    fn arbitrary_json_never_panics_the_config_parser(v in any_json()) {
        if let Ok(f) = parse(v) {
            use_config(&f);
        }
    }

    /// Released configs with one key set to an arbitrary value (huge counts included)
    /// give a typed error or a config, never a panic, and quickly.
    #[test]
    fn released_configs_with_one_arbitrary_key_never_panic(
        base in 0usize..4, key in 0usize..KEYS.len(), value in any_json(),
        big in proptest::prelude::any::<u64>(), use_big in proptest::prelude::any::<bool>(),
    ) {
        let v = [mixtral(), qwen15(), ds_v2_lite(), ds_v3()][base].clone();
        let value = if use_big { json!(big) } else { value };
        let start = std::time::Instant::now();
        if let Ok(f) = parse(with(v, KEYS[key], value)) {
            use_config(&f);
        }
        proptest::prop_assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    /// Arbitrary text as a config file gives a typed error or a value, never a panic.
    #[test]
    fn arbitrary_text_never_panics_the_json_reader(text in "\\PC{0,200}") {
        let _ = crate::model::checkpoint::parse_json(Path::new("config.json"), &text);
    }
}

#[test]
fn gpt_oss_reads_the_clamped_swiglu_and_its_mxfp4_config() {
    let mut v = json!({"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
        "num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4,
        "hidden_act": "silu", "swiglu_limit": 7.0, "rms_norm_eps": 1e-5});
    let f = parse(v.clone()).unwrap();
    assert_eq!(f.family, Family::GptOss);
    assert_eq!(f.router, Router::TopkSoftmax);
    assert_eq!(f.mlp, MlpKind::clamped_swiglu(1.702, 7.0));
    assert_eq!((f.experts, f.top_k, f.intermediate), (32, 4, 2880));
    assert!(f.family.naming().gpt_oss_experts);
    // The MXFP4 release is read (its experts dequantised on load); other schemes are not.
    v["quantization_config"] = json!({"quant_method": "mxfp4"});
    assert_eq!(parse(v.clone()).unwrap().mlp, f.mlp);
    v["quantization_config"] = json!({"quant_method": "awq"});
    let e = parse(v).unwrap_err().to_string();
    assert!(e.contains("quantization_config"), "{e}");
}

#[test]
fn deepseek_v4_reads_the_clamp_the_router_and_the_hash_layers() {
    let mut v = json!({"model_type": "deepseek_v4", "hidden_size": 4096,
        "moe_intermediate_size": 2048, "num_hidden_layers": 43, "n_routed_experts": 256,
        "num_experts_per_tok": 6, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
        "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "dtype": "bfloat16"});
    let f = parse(v.clone()).unwrap();
    assert_eq!(f.family, Family::DeepseekV4);
    assert_eq!(f.router, Router::SqrtSoftplusBias { renormalize: true });
    assert_eq!(f.mlp, MlpKind::clamped_silu_glu(10.0));
    assert_eq!(f.routed_scale, 1.5);
    assert_eq!(
        f.shared,
        Some(SharedExperts {
            count: 1,
            intermediate: 2048,
            gated: false
        })
    );
    // transformers' default: the first three layers are hash-routed (MoE blocks too).
    assert_eq!(f.hash_layers, vec![0, 1, 2]);
    assert!(f.is_moe(2) && f.is_moe(3));
    assert_eq!(f.moe_layers().len(), 43);
    let naming = f.family.naming();
    assert_eq!(
        naming.norm_weight(LAYERS, 3),
        "model.layers.3.ffn_norm.weight"
    );
    assert_eq!(naming.router_bias, Some("gate.bias"));

    v["num_hidden_layers"] = json!(4);
    v["mlp_layer_types"] = json!(["moe", "hash_moe", "moe", "moe"]);
    assert_eq!(parse(v.clone()).unwrap().hash_layers, vec![1]);
    v["mlp_layer_types"] = json!(["moe", "dense", "moe", "moe"]);
    let e = parse(v.clone()).unwrap_err().to_string();
    assert!(e.contains("mlp_layer_types"), "{e}");
    v["mlp_layer_types"] = Value::Null;
    v["num_hash_layers"] = json!(0);
    assert!(parse(v.clone()).unwrap().hash_layers.is_empty());
    v["n_shared_experts"] = json!(2);
    let e = parse(v.clone()).unwrap_err().to_string();
    assert!(e.contains("n_shared_experts"), "{e}");
    v["n_shared_experts"] = json!(1);
    v["quantization_config"] = json!({"quant_method": "fp8"});
    let e = parse(v).unwrap_err().to_string();
    assert!(e.contains("quantization_config"), "{e}");
}
