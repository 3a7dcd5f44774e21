//! gpt-oss's MXFP4 experts: the dequantiser against transformers' own
//! (`scripts/make_mxfp4_fixture.py`, transformers 5.24), and a gpt-oss checkpoint stored
//! in MXFP4 loading to the same weights as the same values stored as plain f32 tensors.

use flashmoe::model::{self, mxfp4, LoadOptions};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as St, SafeTensors};
use std::path::Path;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `[e][rows][cols]` -> `[e][cols][rows]`.
fn transpose(m: &[f32], e: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for x in 0..e {
        for r in 0..rows {
            for c in 0..cols {
                t[x * rows * cols + c * rows + r] = m[x * rows * cols + r * cols + c];
            }
        }
    }
    t
}

fn f32s(v: &TensorView) -> Vec<f32> {
    v.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn dequantisation_equals_transformers_bit_for_bit() {
    let bytes = std::fs::read(fixtures().join("mxfp4.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in ["gate_up_proj", "down_proj"] {
        let blocks = st.tensor(&format!("{name}_blocks")).unwrap();
        let scales = st.tensor(&format!("{name}_scales")).unwrap();
        let want = st.tensor(&format!("{name}_dequantized")).unwrap();
        let (e, rows) = (blocks.shape()[0], blocks.shape()[1]);
        let cols = blocks.shape()[2] * 32;
        let got = mxfp4::dequantize(name, blocks.data(), scales.data()).unwrap();
        // transformers returns [E, in, out]; the dequantiser [E, out, in].
        let got = transpose(&got, e, rows, cols);
        let want = f32s(&want);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name} value {i}: {g} vs {w}");
        }
    }
}

/// Random MXFP4 blocks and scales for `e` matrices of `out` rows and `inp` inputs.
fn random_mxfp4(seed: u64, e: usize, out: usize, inp: usize) -> (Vec<u8>, Vec<u8>) {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u8
    };
    let blocks = (0..e * out * inp / 2).map(|_| next()).collect();
    let scales = (0..e * out * inp / 32).map(|_| 122 + next() % 10).collect();
    (blocks, scales)
}

#[test]
fn an_mxfp4_checkpoint_loads_the_dequantised_weights() {
    let src = fixtures().join("moe/gpt_oss-f32");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let (h, i, e) = (64usize, 64usize, 4usize);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let layer = "model.layers.0.mlp.experts";
    let (gu_b, gu_s) = random_mxfp4(1, e, 2 * i, h);
    let (dn_b, dn_s) = random_mxfp4(2, e, h, i);
    // The same values as plain [E, in, out] f32 tensors.
    let gate_up = transpose(&mxfp4::dequantize("g", &gu_b, &gu_s).unwrap(), e, 2 * i, h);
    let down = transpose(&mxfp4::dequantize("d", &dn_b, &dn_s).unwrap(), e, h, i);
    let to_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (gate_up, down) = (to_bytes(&gate_up), to_bytes(&down));

    let write = |dir: &Path, quantised: bool| {
        let mut tensors: Vec<(String, TensorView)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| {
                n != &format!("{layer}.gate_up_proj") && n != &format!("{layer}.down_proj")
            })
            .collect();
        let mut cfg = config.clone();
        if quantised {
            cfg["quantization_config"] = serde_json::json!({"quant_method": "mxfp4"});
            // Stored [out, in]: [E, 2I, H/32, 16] and [E, H, I/32, 16].
            for (n, shape, d) in [
                ("gate_up_proj_blocks", vec![e, 2 * i, h / 32, 16], &gu_b),
                ("gate_up_proj_scales", vec![e, 2 * i, h / 32], &gu_s),
                ("down_proj_blocks", vec![e, h, i / 32, 16], &dn_b),
                ("down_proj_scales", vec![e, h, i / 32], &dn_s),
            ] {
                let view = TensorView::new(St::U8, shape, d).unwrap();
                tensors.push((format!("{layer}.{n}"), view));
            }
            safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
        } else {
            let gu = TensorView::new(St::F32, vec![e, h, 2 * i], &gate_up).unwrap();
            let dn = TensorView::new(St::F32, vec![e, i, h], &down).unwrap();
            tensors.push((format!("{layer}.gate_up_proj"), gu));
            tensors.push((format!("{layer}.down_proj"), dn));
            safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), false);
    write(b.path(), true);
    let mut opts = LoadOptions::new(8);
    opts.progress = false;
    let plain = model::load(a.path(), &opts).unwrap();
    let quant = model::load(b.path(), &opts).unwrap();
    assert_eq!(plain.layers.len(), 1);
    let (p, q) = (&plain.layers[0].weights, &quant.layers[0].weights);
    assert_eq!(
        p.experts, q.experts,
        "MXFP4 and plain checkpoints load different experts"
    );
    // The values really came from the blocks: not the fixture's own weights.
    let orig = model::load(&src, &opts).unwrap();
    assert_ne!(orig.layers[0].weights.experts, q.experts);
}
