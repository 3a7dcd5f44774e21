//! `flashmoe-bench model`: a stack of MoE layers (synthetic with a skewed router, or read
//! from a checkpoint), checked layer by layer against the reference on the first run, then
//! timed per layer and in total, with each layer's expert load.

use crate::args::{Backend, ModelArgs};
use crate::layer::sample_rows;
use crate::model_driver::Driver;
use crate::stats::summarize;
use flashmoe::model::synthetic::SyntheticSpec;
use flashmoe::model::{self, LoadOptions, ModelLayer, MoeModel};
use flashmoe::reference::{self, RankInput, RouteOverrides};
use flashmoe::{Error, LayerPlan, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Parses `--layers`: a count `L` (synthetic) or a range `a..b` (checkpoint layers a to
/// b-1), within [`model::MAX_LAYERS`].
pub fn parse_layers(s: &str) -> Result<LayerSel> {
    let max = model::MAX_LAYERS;
    let bad = || {
        Error::config(
            "layers",
            s,
            format!("a count L in 1..={max}, or a range a..b with a < b <= {max}"),
        )
    };
    if let Some((a, b)) = s.split_once("..") {
        let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if a >= b || b > max {
            return Err(bad());
        }
        return Ok(LayerSel::Range(a, b));
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 && n <= max => Ok(LayerSel::Count(n)),
        _ => Err(bad()),
    }
}

/// `model` runs every rank as a thread of one process: under a launcher (`RANK` or
/// `WORLD_SIZE` set) every process would run the whole model on GPU 0, so it is refused.
pub fn refuse_launcher_env(lookup: impl Fn(&str) -> Option<String>) -> Result<()> {
    use flashmoe::world::env::{RANK, WORLD_SIZE};
    for var in [RANK, WORLD_SIZE] {
        if lookup(var).is_some() {
            return Err(Error::Env {
                var,
                reason: "is set, but `flashmoe-bench model` runs all ranks in one process \
                         (--world N) and is not a multi-process rank: unset RANK and \
                         WORLD_SIZE, or run `flashmoe-bench layer` under the launcher"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Host bytes the run may take, for the loaders' own caps.
fn host_cap(shape: &crate::args::ShapeArgs) -> u64 {
    flashmoe::memory::host_budget(shape.max_host_memory).map_or(u64::MAX, |b| b.0)
}

/// Prints the estimate of a model run and refuses it when it does not fit.
fn check_model_memory(
    shape: &crate::args::ShapeArgs,
    cfg: &flashmoe::MoeConfig,
    layers: usize,
    weights_bytes: u64,
    gpu: bool,
) -> Result<()> {
    let plan = LayerPlan::new(cfg)?;
    let e = crate::memory::model(&plan, layers, weights_bytes, shape.check_tokens, gpu);
    if !shape.json {
        eprintln!("memory estimate: {}", e.describe());
    }
    e.check("flashmoe-bench model", shape.max_host_memory)?;
    crate::memory::check_device(&e, 0)
}

/// What `--layers` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSel {
    /// The first L layers (synthetic: L layers).
    Count(usize),
    /// Decoder layers a..b of a checkpoint (its MoE layers; dense ones are skipped).
    Range(usize, usize),
}

fn build_layers(args: &ModelArgs, gpu: bool) -> Result<(String, Vec<ModelLayer>, Vec<Vec<f32>>)> {
    let shape = &args.shape;
    let sel = parse_layers(&args.layers)?;
    match &args.checkpoint {
        Some(dir) => {
            let tokens = shape.tokens.unwrap_or(128);
            let mut opts = LoadOptions::new(tokens);
            opts.world = shape.world.ranks();
            opts.max_host_bytes = host_cap(shape);
            if let Some(c) = shape.capacity {
                opts.capacity = c;
            }
            // Only the selected layers are read: the first n MoE layers, or the MoE layers
            // of a..b (dense ones skipped).
            let ckpt = model::Checkpoint::open(dir)?;
            let family = model::load::family(&ckpt)?;
            opts.layers = Some(match sel {
                LayerSel::Range(a, b) => model::load::select_layers(&family, a..b)?,
                LayerSel::Count(n) => family.moe_layers().into_iter().take(n).collect(),
            });
            let loaded = model::load::load_from(&ckpt, &opts)?;
            let layers = loaded.layers;
            let first = layers
                .first()
                .ok_or_else(|| Error::config("layers", &args.layers, "selects no MoE layer"))?;
            let spec = SyntheticSpec::new(first.config.clone(), 1);
            let weights: u64 = layers
                .iter()
                .map(|l| flashmoe::weights::LayerWeights::host_bytes(&l.config))
                .fold(0, u64::saturating_add);
            check_model_memory(shape, &first.config, layers.len(), weights, gpu)?;
            let name = format!(
                "{} ({}; dense layers skipped: {:?})",
                dir.display(),
                loaded.family.family,
                loaded.skipped_dense
            );
            Ok((name, layers, spec.inputs(tokens, shape.seed)))
        }
        None => {
            let LayerSel::Count(n) = sel else {
                return Err(Error::config(
                    "layers",
                    &args.layers,
                    "a count for synthetic models",
                ));
            };
            let (name, cfg) = shape.config(gpu)?;
            let tokens = cfg.tokens;
            let mut spec = SyntheticSpec::new(cfg.clone(), n);
            spec.zipf = args.skew;
            spec.seed = shape.seed;
            spec.max_host_bytes = host_cap(shape);
            check_model_memory(shape, &cfg, n, spec.host_bytes(), gpu)?;
            let layers = spec.build()?;
            Ok((
                format!("{name} (synthetic, zipf {})", args.skew),
                layers,
                spec.inputs(tokens, shape.seed),
            ))
        }
    }
}

/// Checks every layer of a traced forward against the reference on sampled rows: the
/// input of layer l is the traced state before it, so errors do not compound.
fn check_layers(
    layers: &[ModelLayer],
    x: &[Vec<f32>],
    trace: &[Vec<Vec<f32>>],
    check_tokens: usize,
    token_ids: Option<&[Vec<u32>]>,
) -> Result<f64> {
    let mut worst = 0f64;
    for (l, layer) in layers.iter().enumerate() {
        let cfg = &layer.config;
        let h = cfg.hidden;
        let before: Vec<Vec<f32>> = if l == 0 {
            x.iter()
                .map(|r| r.iter().map(|&v| cfg.dtype.round(v)).collect())
                .collect()
        } else {
            trace[l - 1].clone()
        };
        let normed: Vec<Vec<f32>> = before
            .iter()
            .map(|r| layer.norm.apply(r, cfg.dtype))
            .collect();
        // A hash layer routes each token by its id, through its table.
        let tokens: Vec<usize> = normed.iter().map(|r| r.len() / h).collect();
        let routing = layer.hash_routing(token_ids, &tokens)?;
        let inputs: Vec<RankInput> = normed
            .iter()
            .enumerate()
            .map(|(r, x)| RankInput {
                x,
                tokens: x.len() / h,
                routing: routing.as_ref().and_then(|g| g.get(r)),
            })
            .collect();
        let rows: Vec<Vec<usize>> = inputs
            .iter()
            .map(|i| sample_rows(i.tokens, check_tokens))
            .collect();
        let ov = RouteOverrides {
            top_k: None,
            logit_bias: layer.logit_bias.clone(),
        };
        let plan = LayerPlan::new(cfg)?;
        let want = reference::forward_rows(&plan, &layer.weights, &inputs, &ov, &rows)?;
        let (mut got_rows, mut want_rows) = (Vec::new(), Vec::new());
        for (r, list) in rows.iter().enumerate() {
            for (i, &t) in list.iter().enumerate() {
                got_rows.extend_from_slice(&trace[l][r][t * h..(t + 1) * h]);
                let residual = &before[r][t * h..(t + 1) * h];
                want_rows.extend(
                    residual
                        .iter()
                        .zip(&want[r][i])
                        .map(|(a, b)| (*a as f64 + b) as f32),
                );
            }
        }
        let err = reference::normalised_error(&got_rows, &want_rows);
        let tol = reference::tolerance(cfg.dtype);
        if err > tol {
            return Err(Error::input(
                "output",
                format!(
                    "layer {}: error {err:.3e} vs the reference exceeds {tol:.0e}",
                    layer.index
                ),
            ));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// Token ids for a model with hash layers (DeepSeek-V4): uniform over the first hash
/// table's vocabulary, deterministic in `seed`; `None` without hash layers.
fn token_ids(layers: &[ModelLayer], x: &[Vec<f32>], seed: u64) -> Option<Vec<Vec<u32>>> {
    let l = layers.iter().find(|l| l.hash_table.is_some())?;
    let vocab = l.hash_table.as_ref()?.len() / l.config.top_k.max(1);
    let h = l.config.hidden.max(1);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1d5);
    Some(
        x.iter()
            .map(|r| {
                (0..r.len() / h)
                    .map(|_| rng.random_range(0..vocab.max(1)) as u32)
                    .collect()
            })
            .collect(),
    )
}

/// Runs the `model` subcommand.
pub fn run(args: &ModelArgs) -> Result<()> {
    refuse_launcher_env(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))?;
    let shape = &args.shape;
    shape.check_counts()?;
    let gpu = crate::backend::wants_gpu(shape.backend, shape.world)?;
    if gpu && shape.backend == Backend::Auto && !shape.json {
        eprintln!("backend: gpu");
    }
    let (name, layers, x) = build_layers(args, gpu)?;
    let ids = token_ids(&layers, &x, shape.seed);
    let mut m = if gpu {
        Driver::Gpu(
            crate::gpu_backend::model(layers.clone(), shape.tiles)?,
            ids.clone(),
        )
    } else {
        let cpu = MoeModel::with_factory(layers.clone(), |_, plan, weights| {
            model::Backend::Cpu.build(plan.with_tile_mode(shape.tiles), weights)
        })?;
        Driver::Cpu(cpu, ids.clone())
    };
    let (first, trace) = m.forward_traced(&x)?;
    let err = if shape.check_tokens == 0 {
        crate::layer::all_finite(&first.hidden)?;
        None
    } else {
        Some(check_layers(
            &layers,
            &x,
            &trace,
            shape.check_tokens,
            ids.as_deref(),
        )?)
    };
    let verdict = err.map_or(
        "not checked (--check-tokens 0); outputs are finite".to_string(),
        |e| format!("max rel error {e:.2e} (ok)"),
    );
    m.start_timing();
    for _ in 0..shape.warmup {
        m.forward(&x)?;
    }
    let mut total = Vec::with_capacity(shape.iters);
    let mut device = Vec::with_capacity(shape.iters);
    let mut per_layer = vec![Vec::with_capacity(shape.iters); layers.len()];
    for i in 0..shape.iters {
        let t = m.forward(&x)?;
        if i + 1 == shape.iters && m.deterministic() && t.out.hidden != first.hidden {
            return Err(Error::input(
                "output",
                "the last timed forward differs from the checked first one",
            ));
        }
        total.push(t.out.latency.as_secs_f64() * 1e3);
        device.extend(t.device_ms);
        for (l, st) in t.out.layers.iter().enumerate() {
            per_layer[l].push(st.latency.as_secs_f64() * 1e3);
        }
    }
    let total = summarize(&total).ok_or_else(|| Error::input("timing", "no finite samples"))?;
    // The GPU stack on the device (first norm to last residual), without the upload, the
    // wait and the download that the wall time includes.
    let device = summarize(&device);
    let tokens: usize = x.iter().map(|r| r.len() / m.hidden()).sum();
    let rows: Vec<serde_json::Value> = first
        .layers
        .iter()
        .zip(&per_layer)
        .map(|(st, samples)| {
            serde_json::json!({
                "layer": st.layer,
                "median_ms": summarize(samples).map_or(f64::NAN, |s| s.median),
                "load_min": st.min_load(),
                "load_mean": st.mean_load(),
                "load_max": st.max_load(),
                "idle_experts": st.idle_experts(),
                "dropped": st.dropped,
                "histogram": st.load_histogram(8),
                "dispatch_bytes": st.wire.map(|w| w.dispatch),
                "per_expert_dispatch_bytes": st.wire.map(|w| w.per_expert),
            })
        })
        .collect();
    if shape.json {
        let j = serde_json::json!({
            "model": name, "backend": m.name(), "tiles": shape.tiles.name(),
            "layers": rows, "total_ms": total, "device_total_ms": device, "tokens": tokens,
            "tokens_per_s": tokens as f64 / (total.median / 1e3), "max_rel_error": err,
        });
        println!("{j}");
        return Ok(());
    }
    println!("flashmoe-bench model: {name}");
    println!(
        "  backend {}, tiles {}, {} layers, {} tokens over {} rank(s); check vs the f64 reference: {verdict}",
        m.name(),
        shape.tiles.name(),
        layers.len(),
        tokens,
        m.world()
    );
    println!(
        "  {:>5} {:>10} {:>8} {:>9} {:>8} {:>6} {:>8} {:>22}  load histogram (8 bins up to max)",
        "layer", "median ms", "min", "mean", "max", "idle", "dropped", "wire MB (per-expert)"
    );
    for (st, samples) in first.layers.iter().zip(&per_layer) {
        println!(
            "  {:>5} {:>10.4} {:>8} {:>9.1} {:>8} {:>6} {:>8} {:>22}  {:?}",
            st.layer,
            summarize(samples).map_or(f64::NAN, |s| s.median),
            st.min_load(),
            st.mean_load(),
            st.max_load(),
            st.idle_experts(),
            st.dropped,
            st.wire.map_or("-".to_string(), |w| format!(
                "{:.3} ({:.3})",
                w.dispatch / 1e6,
                w.per_expert / 1e6
            )),
            st.load_histogram(8)
        );
    }
    println!(
        "  total: median {:.4} ms  p10 {:.4}  p90 {:.4}  ({} runs)   {:.0} tokens/s",
        total.median,
        total.p10,
        total.p90,
        total.n,
        tokens as f64 / (total.median / 1e3)
    );
    if let Some(d) = device {
        println!(
            "  device (all layers, one stream): median {:.4} ms  p10 {:.4}  p90 {:.4}   {:.0} tokens/s; per-layer times above are device times",
            d.median,
            d.p10,
            d.p90,
            tokens as f64 / (d.median / 1e3)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_refuses_a_launcher_environment() {
        assert!(refuse_launcher_env(|_| None).is_ok());
        for var in ["RANK", "WORLD_SIZE"] {
            match refuse_launcher_env(|k| (k == var).then(|| "1".to_string())) {
                Err(Error::Env { var: v, .. }) => assert_eq!(v, var),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn layers_parse_counts_and_ranges() {
        assert_eq!(parse_layers("4").unwrap(), LayerSel::Count(4));
        assert_eq!(parse_layers("2..5").unwrap(), LayerSel::Range(2, 5));
        let max = model::MAX_LAYERS;
        assert_eq!(
            parse_layers(&max.to_string()).unwrap(),
            LayerSel::Count(max)
        );
        let over = (max + 1).to_string();
        let range = format!("0..{over}");
        for bad in [
            "0",
            "5..2",
            "3..3",
            "a..b",
            "x",
            "0..18446744073709551615",
            "0..1099511627776",
            "576460752303423488",
            "18446744073709551616",
            &over,
            &range,
        ] {
            assert!(
                matches!(
                    parse_layers(bad),
                    Err(Error::InvalidConfig {
                        field: "layers",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }
}
