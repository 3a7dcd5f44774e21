//! flashmoe against transformers' own outputs, on the fixtures of `tests/fixtures/moe/`
//! (written by `scripts/make_moe_fixtures.py`; versions in `versions.json`).
//!
//! Every fixture is a tiny random checkpoint saved by transformers (`save_pretrained`), in
//! f32 or bf16, plus transformers' outputs in `expected.safetensors`: each MoE block alone
//! on given rows (`block.{l}.*`) and the chain `x = x + moe(norm(x))` over the MoE layers
//! (`chain.*`), with the router's chosen experts per token (`*.topk`). Each is loaded with
//! `flashmoe::model::load` (what `flashmoe-bench model --checkpoint` runs) and run on the
//! f64 reference and on the CPU executor.
//!
//! Two oracles per bf16 fixture ([`Oracle`]): transformers' bf16 run itself, and the same
//! code run in float64 on the same bf16 checkpoint and inputs (`exact.*`; f32 fixtures
//! have only their f32 run).
//!
//! Acceptance: `max |got - want| <= tol * max |want|`, over the tensor and per token row
//! (rows span four decades of scale), with `tol` 1e-5 for f32 and, for bf16, 1e-2 against
//! the exact oracle and transformers' own rounding error against its bf16 run
//! ([`tolerance`]).
//! A token whose expert set differs from transformers' is excluded (and counted) only when
//! the difference is a near-tie: every expert transformers chose instead ranks within the
//! rounding slack of transformers' router ([`ranking`]) of the reference's k-th expert. Any
//! other difference fails, and so do more than [`MAX_EXCLUDED`] excluded tokens.

mod fixture_support;

use fixture_support::*;
use flashmoe::model::{self, Backend, LoadOptions, MoeModel};
use flashmoe::reference;
use flashmoe::Router;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeSet;

#[test]
fn every_fixture_matches_transformers() {
    let mut failures = Vec::new();
    for name in FIXTURES {
        let dir = fixtures_dir().join(name);
        let expected = read_expected(&dir);
        // Every bf16 fixture is checked against both oracles, f32 ones against their run.
        for &oracle in oracles(name) {
            for (backend, label) in [(Backend::Reference, "reference"), (Backend::Cpu, "cpu")] {
                let o = oracle.label();
                match run_fixture(&dir, &expected, &host(backend), oracle) {
                    Ok(results) => {
                        for (what, r) in results {
                            println!(
                                "{name:24} {o:5} {label:9} {what:8} error {:.2e}  row error {:.2e}  excluded {}",
                                r.error, r.row, r.excluded
                            );
                        }
                    }
                    Err(e) => failures.push(format!("{name} ({o}, {label}): {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_is_listed() {
    let mut found: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("fixture.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut listed: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
}

/// Against the exact oracle, the 1e-2 bound is enforced and the oracle must be present.
#[test]
fn exact_oracle_is_enforced() {
    let dir = fixtures_dir().join("mixtral-bf16");
    let good = read_expected(&dir);
    assert!(run_fixture(&dir, &good, &host(Backend::Cpu), Oracle::Exact).is_ok());

    // One value off by 1.2e-2 of the block's largest magnitude.
    let mut bad = read_expected(&dir);
    let out = bad.get_mut("exact.block.0.output").unwrap();
    let scale = out.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    out.data[3 * out.shape[1] + 5] += 1.2e-2 * scale;
    let err = run_fixture(&dir, &bad, &host(Backend::Cpu), Oracle::Exact).unwrap_err();
    assert!(err.contains("block 0: error"), "{err}");

    let mut missing = read_expected(&dir);
    missing.remove("exact.chain.output");
    let err = run_fixture(&dir, &missing, &host(Backend::Cpu), Oracle::Exact).unwrap_err();
    assert!(err.contains("no `exact.chain.output`"), "{err}");
}

/// The comparison rejects a wrong output and a clear routing flip.
#[test]
fn perturbed_expectations_are_rejected() {
    let dir = fixtures_dir().join("mixtral-f32");
    let good = read_expected(&dir);
    assert!(run_fixture(&dir, &good, &host(Backend::Reference), Oracle::Run).is_ok());

    // One value of one token off by 1e-4 of its row's largest magnitude.
    let mut bad = read_expected(&dir);
    let out = bad.get_mut("block.1.output").unwrap();
    let h = out.shape[1];
    let row = &mut out.data[5 * h..6 * h];
    let scale = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    row[7] += 1e-4 * scale;
    let err = run_fixture(&dir, &bad, &host(Backend::Reference), Oracle::Run).unwrap_err();
    assert!(err.contains("block 1: error"), "{err}");

    // The same on the chain output.
    let mut bad = read_expected(&dir);
    let out = bad.get_mut("chain.output").unwrap();
    let v = out.data[3 * h + 2];
    out.data[3 * h + 2] = v + 1e-3 * v.abs().max(1.0);
    let err = run_fixture(&dir, &bad, &host(Backend::Reference), Oracle::Run).unwrap_err();
    assert!(err.contains("chain: error"), "{err}");

    // A token routed to the expert the reference ranks last is a flip, not a near-tie.
    let loaded = load(&dir, 48);
    let layer = &loaded.layers[0];
    let x = &good["block.0.input"].data;
    let k = layer.config.top_k;
    let t = 0;
    let scores =
        reference::selection_scores(&layer.config, &layer.weights, &x[t * h..(t + 1) * h], None);
    let worst = (0..scores.len())
        .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
        .unwrap();
    let mut bad = read_expected(&dir);
    let topk = bad.get_mut("block.0.topk").unwrap();
    topk.data[t * k] = worst as f32;
    if topk.data[t * k + 1] == worst as f32 {
        topk.data[t * k + 1] = topk.data[t * k];
    }
    let err = run_fixture(&dir, &bad, &host(Backend::Reference), Oracle::Run).unwrap_err();
    assert!(err.contains("layer 0 token 0: transformers chose"), "{err}");
}

#[test]
fn selection_verdicts() {
    let scores = [0.40, 0.30, 0.297, 0.03];
    let slack = [0.002; 4];
    let set = |v: &[usize]| v.iter().copied().collect::<BTreeSet<usize>>();
    assert_eq!(
        selection(&set(&[0, 1]), &set(&[0, 1]), &scores, &slack),
        Selection::Same
    );
    match selection(&set(&[0, 2]), &set(&[0, 1]), &scores, &slack) {
        Selection::NearTie(g) => assert!((g - 0.75).abs() < 1e-9, "{g}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        selection(&set(&[0, 3]), &set(&[0, 1]), &scores, &slack),
        Selection::Flip(_)
    ));
    let tight = [1e-4; 4];
    assert!(matches!(
        selection(&set(&[0, 2]), &set(&[0, 1]), &scores, &tight),
        Selection::Flip(_)
    ));
}

/// Qwen3-MoE configs spell the expert count `num_experts` (transformers 4) or
/// `num_local_experts` (transformers 5, as in the fixture): both load the same layers.
#[test]
fn qwen3_expert_count_spellings_load_alike() {
    let src = fixtures_dir().join("qwen3_moe-f32");
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert!(text.contains("\"num_local_experts\""));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        text.replace("\"num_local_experts\"", "\"num_experts\""),
    )
    .unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let a = load(&src, 8);
    let b = load(tmp.path(), 8);
    assert_eq!(a.family, b.family);
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.weights, y.weights);
        assert_eq!(x.config, y.config);
    }
}

/// Qwen3.5-MoE as released is multimodal: `model_type: qwen3_5_moe` with the text model's
/// keys in `text_config` and its layers under `model.language_model.layers`. Rewritten so
/// from the text fixture, it must load the same layers.
#[test]
fn qwen3_5_multimodal_layout_loads_like_the_text_model() {
    let src = fixtures_dir().join("qwen3_5_moe-f32");
    let tmp = tempfile::tempdir().unwrap();
    let text: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let nested = serde_json::json!({"model_type": "qwen3_5_moe", "text_config": text});
    std::fs::write(tmp.path().join("config.json"), nested.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name.replacen("model.layers.", "model.language_model.layers.", 1),
                view,
            )
        })
        .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n.starts_with("model.language_model.layers.0.mlp")));
    safetensors::serialize_to_file(renamed, None, &tmp.path().join("model.safetensors")).unwrap();
    let a = load(&src, 8);
    let b = load(tmp.path(), 8);
    assert_eq!(b.family.layer_prefix, "model.language_model.layers");
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.config, y.config);
        assert_eq!(x.weights, y.weights);
        assert_eq!(x.norm, y.norm);
    }
}

/// DeepSeek-V4's own release keeps its layers under a bare `layers.` (no `model.`); its
/// hash-routed layers (`mlp_layer_types` `hash_moe`) load with their token-id table, and a
/// hash layer without one is refused, naming the tensor.
#[test]
fn deepseek_v4_bare_layers_and_hash_layers_load() {
    let src = fixtures_dir().join("deepseek_v4_hash-f32");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.replacen("model.layers.", "layers.", 1), view))
        .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n == "layers.0.ffn.gate.tid2eid"));
    safetensors::serialize_to_file(renamed, None, &tmp.path().join("model.safetensors")).unwrap();

    let a = load(&src, 8);
    let b = load(tmp.path(), 8);
    assert_eq!(b.family.layer_prefix, "layers");
    assert_eq!(b.family.hash_layers, vec![0]);
    assert_eq!(b.layers.len(), 2);
    assert_eq!(b.layers[0].config.router, Router::HashSqrtSoftplus);
    assert_ne!(b.layers[1].config.router, Router::HashSqrtSoftplus);
    assert!(b.layers[0].weights.router_bias.is_empty());
    let table = b.layers[0].hash_table.as_ref().expect("hash table");
    assert_eq!(table.len(), 16 * 2);
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.weights, y.weights);
        assert_eq!(x.norm, y.norm);
        assert_eq!(x.hash_table, y.hash_table);
    }
    // Routing without token ids is refused, naming the call to make.
    let mut m = MoeModel::new(b.layers.clone(), Backend::Reference).unwrap();
    let e = m.forward(&[vec![0.5; 8 * 64]]).err().unwrap().to_string();
    assert!(e.contains("forward_ids") && e.contains("layer 0"), "{e}");
    let ok = m.forward_ids(&[vec![0.5; 8 * 64]], &[vec![3; 8]]).unwrap();
    assert_eq!(ok.hidden[0].len(), 8 * 64);
    let e = m
        .forward_ids(&[vec![0.5; 8 * 64]], &[vec![16; 8]])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token_ids") && e.contains("16"), "{e}");

    // A `hash_moe` layer whose checkpoint has no table.
    let plain = fixtures_dir().join("deepseek_v4-f32");
    let tmp2 = tempfile::tempdir().unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("config.json")).unwrap()).unwrap();
    cfg["mlp_layer_types"] = serde_json::json!(["hash_moe", "moe"]);
    std::fs::write(tmp2.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        plain.join("model.safetensors"),
        tmp2.path().join("model.safetensors"),
    )
    .unwrap();
    let mut opts = LoadOptions::new(8);
    opts.progress = false;
    let e = model::load(tmp2.path(), &opts).err().unwrap().to_string();
    assert!(e.contains("tid2eid") && e.contains("missing"), "{e}");
}
