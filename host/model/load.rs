//! Loading the MoE layers of a checkpoint directory as [`ModelLayer`]s.
//!
//! Both expert layouts are read:
//! - per expert (every released checkpoint, and transformers' `save_original_format`):
//!   `{block}.experts.{j}.{gate,up,down}.weight` (Mixtral: `w1`, `w3`, `w2`);
//! - fused (transformers >= 5 saving with `save_original_format=False`):
//!   `{block}.experts.gate_up_proj` `[E, 2I, H]` (gate rows first) and
//!   `{block}.experts.down_proj` `[E, H, I]`.
//!
//! `{block}` is `model.layers.{i}.mlp`, or for Mixtral `model.layers.{i}.block_sparse_moe`
//! (transformers 5 renames it to `mlp`; both are tried). Dense layers are skipped (see
//! [`families`](super::families)).

use super::checkpoint::Checkpoint;
use super::families::{Family, FamilyConfig, Naming, BARE_LAYERS};
use super::norm::RmsNorm;
use super::ModelLayer;
use crate::config::{Capacity, Dtype, Placement, Router};
use crate::error::{Error, Result};
use crate::weights::{ExpertWeights, LayerWeights};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

/// How to turn a checkpoint into runtime layers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Most tokens per rank per forward.
    pub tokens: usize,
    /// Number of ranks.
    pub world: usize,
    /// Capacity per (source rank, expert).
    pub capacity: Capacity,
    /// Expert placement.
    pub placement: Placement,
    /// Storage dtype of the layers; `None` = the checkpoint's `torch_dtype` (bf16 if absent).
    pub dtype: Option<Dtype>,
    /// Decoder layers to load; `None` = every MoE layer. Naming a dense layer is an error.
    pub layers: Option<Vec<usize>>,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Refuse (before reading any tensor) when the selected layers' weights, held as f32
    /// on the host, would take more bytes than this.
    pub max_host_bytes: u64,
}

/// Default of [`LoadOptions::max_host_bytes`]: 32 GiB.
pub const DEFAULT_MAX_HOST_BYTES: u64 = 32 << 30;

impl LoadOptions {
    /// Defaults: one rank, dropless, blocked placement, the checkpoint's dtype,
    /// every MoE layer, progress bar on, at most [`DEFAULT_MAX_HOST_BYTES`].
    pub fn new(tokens: usize) -> Self {
        LoadOptions {
            tokens,
            world: 1,
            capacity: Capacity::Dropless,
            placement: Placement::Blocked,
            dtype: None,
            layers: None,
            progress: true,
            max_host_bytes: DEFAULT_MAX_HOST_BYTES,
        }
    }
}

/// The MoE layers of a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// What `config.json` said.
    pub family: FamilyConfig,
    /// The loaded MoE layers, in decoder order.
    pub layers: Vec<ModelLayer>,
    /// The checkpoint's dense decoder layers (never loaded: they are not MoE blocks).
    pub skipped_dense: Vec<usize>,
}

/// Opens `dir` and loads the MoE layers `options` selects.
pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<LoadedModel> {
    let ckpt = Checkpoint::open(dir)?;
    load_from(&ckpt, options)
}

/// The family config of an opened checkpoint (its `config.json`). DeepSeek-V4's layer
/// prefix is read off the checkpoint: `model.layers` (transformers' `save_pretrained`)
/// unless only the release's bare `layers` holds the first loadable layer's norm.
pub fn family(ckpt: &Checkpoint) -> Result<FamilyConfig> {
    let config_path = ckpt.dir().join(super::checkpoint::CONFIG_FILE);
    let mut family = FamilyConfig::parse(&config_path, ckpt.config())?;
    if family.family == Family::DeepseekV4 {
        let naming = family.family.naming();
        let layer = family.moe_layers().first().copied().unwrap_or(0);
        if !ckpt.contains(&naming.norm_weight(family.layer_prefix, layer))
            && ckpt.contains(&naming.norm_weight(BARE_LAYERS, layer))
        {
            family.layer_prefix = BARE_LAYERS;
        }
    }
    Ok(family)
}

/// The MoE layers among decoder layers `range` (dense layers in it are skipped), for
/// [`LoadOptions::layers`]. Errors when the range ends past `num_hidden_layers` or holds no
/// MoE layer.
pub fn select_layers(family: &FamilyConfig, range: std::ops::Range<usize>) -> Result<Vec<usize>> {
    if range.end > family.layers {
        return Err(Error::config(
            "layers",
            format!("{}..{}", range.start, range.end),
            format!("num_hidden_layers = {}", family.layers),
        ));
    }
    let list: Vec<usize> = range.clone().filter(|&l| family.is_moe(l)).collect();
    if list.is_empty() {
        return Err(Error::config(
            "layers",
            format!("{}..{}", range.start, range.end),
            format!(
                "selects no MoE layer of this {} checkpoint; MoE layers: {:?}",
                family.family,
                family.moe_layers()
            ),
        ));
    }
    Ok(list)
}

/// Loads from an already opened checkpoint: only the tensors of the selected layers are
/// read (the shards are memory-mapped; other layers' bytes are never touched).
pub fn load_from(ckpt: &Checkpoint, options: &LoadOptions) -> Result<LoadedModel> {
    let family = family(ckpt)?;
    let selected = match &options.layers {
        None => family.moe_layers(),
        Some(list) => {
            if list.len() > super::MAX_LAYERS {
                return Err(Error::config(
                    "layers",
                    list.len(),
                    format!("at most {} layers", super::MAX_LAYERS),
                ));
            }
            for &l in list {
                if l >= family.layers {
                    return Err(Error::config(
                        "layers",
                        l,
                        format!("num_hidden_layers = {}", family.layers),
                    ));
                }
                if !family.is_moe(l) {
                    return Err(Error::config(
                        "layers",
                        l,
                        format!(
                            "layer {l} of this {} checkpoint is dense (not an MoE block); \
                             MoE layers: {:?}",
                            family.family,
                            family.moe_layers()
                        ),
                    ));
                }
            }
            list.clone()
        }
    };
    let skipped_dense = family.dense_layers.clone();
    let dtype = options.dtype.or(family.dtype).unwrap_or(Dtype::Bf16);
    let config = family.layer_config(
        options.tokens,
        dtype,
        options.capacity,
        options.world,
        options.placement.clone(),
    );
    config.validate()?;
    let bytes = host_bytes_per_layer(&family).saturating_mul(selected.len() as u64);
    if bytes > options.max_host_bytes {
        return Err(Error::PlanTooLarge {
            what: format!(
                "loading {} MoE layers of this {} checkpoint takes {bytes} bytes of host \
                 memory (f32), max_host_bytes = {}: select fewer layers",
                selected.len(),
                family.family,
                options.max_host_bytes
            ),
        });
    }

    let per_layer = tensors_per_layer(&family);
    let bar = ProgressBar::new((per_layer * selected.len()) as u64);
    if !options.progress || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut layers = Vec::with_capacity(selected.len());
    for &l in &selected {
        bar.set_message(format!("loading layer {l}"));
        let hash = family.hash_layers.contains(&l);
        let reader = LayerReader {
            ckpt,
            family: &family,
            layer: l,
            dtype,
            bar: &bar,
            hash,
        };
        let weights = reader.weights()?;
        let mut layer_config = config.clone();
        let hash_table = if hash {
            layer_config.router = Router::HashSqrtSoftplus;
            Some(Arc::new(reader.hash_table()?))
        } else {
            None
        };
        let naming = family.family.naming();
        let mut weight = reader.read(
            &naming.norm_weight(family.layer_prefix, l),
            &[family.hidden],
            Some(dtype),
        )?;
        if family.norm_unit_offset {
            // Qwen3-Next / Qwen3.5 scale by (1 + w): stored here as that factor, in the
            // dtype (transformers multiplies in f32 and rounds once; in bf16 the results
            // differ by at most a rounding step).
            weight.iter_mut().for_each(|w| *w = dtype.round(1.0 + *w));
        }
        let bias = if family.layer_norm {
            let name = naming
                .norm_weight(family.layer_prefix, l)
                .replace(".weight", ".bias");
            Some(reader.read(&name, &[family.hidden], Some(dtype))?)
        } else {
            None
        };
        let norm = RmsNorm {
            weight,
            eps: family.eps,
            bias,
        };
        let layer = ModelLayer {
            index: l,
            config: layer_config,
            weights: Arc::new(weights),
            norm,
            logit_bias: None,
            hash_table,
        };
        layer.validate().map_err(|e| Error::ModelLayer {
            layer: l,
            source: Box::new(e),
        })?;
        layers.push(layer);
    }
    bar.finish_and_clear();
    Ok(LoadedModel {
        family,
        layers,
        skipped_dense,
    })
}

/// Host bytes of one MoE layer's weights as f32.
fn host_bytes_per_layer(f: &FamilyConfig) -> u64 {
    let (h, e, i) = (f.hidden as u64, f.experts as u64, f.intermediate as u64);
    let shared = f.shared.map_or(0, |s| {
        (s.count as u64)
            .saturating_mul(s.intermediate as u64)
            .saturating_mul(3)
            .saturating_mul(h)
            .saturating_add(h)
    });
    let experts = e.saturating_mul(3).saturating_mul(i).saturating_mul(h);
    experts
        .saturating_add(e.saturating_mul(h))
        .saturating_add(e)
        .saturating_add(shared)
        .saturating_add(h)
        .saturating_mul(4)
}

/// Tensors read per layer (for the progress bar; the fused layout reads fewer).
fn tensors_per_layer(f: &FamilyConfig) -> usize {
    let naming = f.family.naming();
    2 + usize::from(naming.router_bias.is_some())
        + 3 * f.experts
        + if f.shared.is_some() { 3 } else { 0 }
        + usize::from(naming.shared_gate && f.shared.is_some())
}

struct LayerReader<'a> {
    ckpt: &'a Checkpoint,
    family: &'a FamilyConfig,
    layer: usize,
    dtype: Dtype,
    bar: &'a ProgressBar,
    /// A hash-routed layer: no router bias; a token-id table.
    hash: bool,
}

impl LayerReader<'_> {
    fn read(&self, name: &str, shape: &[usize], round: Option<Dtype>) -> Result<Vec<f32>> {
        let v = self.ckpt.read(name, shape, round)?;
        self.bar.inc(1);
        Ok(v)
    }

    /// A hash layer's token-id table `{block}.gate.tid2eid`: `[vocab][top_k]` expert ids.
    fn hash_table(&self) -> Result<Vec<u32>> {
        let name = format!(
            "{}.{}.tid2eid",
            self.block()?,
            self.family.family.naming().router
        );
        let vocab = self
            .ckpt
            .shape(&name)
            .and_then(|s| s.first().copied())
            .unwrap_or(0);
        let v = self.ckpt.read_ids(&name, &[vocab, self.family.top_k])?;
        self.bar.inc(1);
        Ok(v)
    }

    /// The MoE block's prefix: the first candidate whose router exists.
    fn block(&self) -> Result<String> {
        let naming = self.family.family.naming();
        let candidates: Vec<String> = naming
            .moe_prefixes
            .iter()
            .map(|p| Naming::block(self.family.layer_prefix, self.layer, p))
            .collect();
        let router = naming.router;
        candidates
            .iter()
            .find(|b| self.ckpt.contains(&format!("{b}.{router}.weight")))
            .cloned()
            .ok_or_else(|| Error::Checkpoint {
                path: self.ckpt.dir().to_path_buf(),
                reason: format!(
                    "tensor `{}.{router}.weight` is missing (expected shape [{}, {}]; \
                     the MoE router of layer {})",
                    candidates.first().map(String::as_str).unwrap_or("?"),
                    self.family.experts,
                    self.family.hidden,
                    self.layer
                ),
            })
    }

    fn weights(&self) -> Result<LayerWeights> {
        let f = self.family;
        let naming = f.family.naming();
        let (h, e, i) = (f.hidden, f.experts, f.intermediate);
        let d = Some(self.dtype);
        let block = self.block()?;
        // DeepSeek-V2 and the V3 family keep the router in f32 (`router_f32`): not rounded.
        let router_dtype = if f.router_f32 { None } else { d };
        let router = self.read(
            &format!("{block}.{}.weight", naming.router),
            &[e, h],
            router_dtype,
        )?;
        let router_bias = match naming.router_bias {
            // A hash layer's router has no selection bias.
            Some(_) if self.hash => Vec::new(),
            // Kept in f32 as transformers does (`_keep_in_fp32_modules_strict`).
            Some(at) => self.read(&format!("{block}.{at}"), &[e], None)?,
            None => Vec::new(),
        };
        let fused = format!("{block}.experts.gate_up_proj");
        let experts = if naming.gpt_oss_experts {
            self.gpt_oss_experts(&block, e, h, i)?
        } else if self.ckpt.contains(&fused) && naming.fused_in_out {
            self.fused_in_out(&block, e, h, i)?
        } else if self.ckpt.contains(&fused) {
            let gate_up = self.read(&fused, &[e, 2 * i, h], d)?;
            let down = self.read(&format!("{block}.experts.down_proj"), &[e, h, i], d)?;
            self.bar.inc((e * 3).saturating_sub(2) as u64);
            gate_up
                .chunks_exact(2 * i * h)
                .zip(down.chunks_exact(h * i))
                .map(|(w0, w1)| ExpertWeights {
                    w0: w0.to_vec(),
                    w1: w1.to_vec(),
                    ..ExpertWeights::default()
                })
                .collect()
        } else {
            (0..e)
                .map(|j| self.mlp(&format!("{block}.experts.{j}"), naming.proj, i))
                .collect::<Result<Vec<_>>>()?
        };
        let shared = match (f.shared, naming.shared_module) {
            (Some(s), Some(module)) => Some(self.mlp(
                &format!("{block}.{module}"),
                naming.shared_proj,
                s.count * s.intermediate,
            )?),
            _ => None,
        };
        let shared_gate = if naming.shared_gate && f.shared.is_some() {
            Some(self.read(&format!("{block}.shared_expert_gate.weight"), &[1, h], d)?)
        } else {
            None
        };
        Ok(LayerWeights {
            router,
            router_bias,
            experts,
            shared,
            shared_gate,
        })
    }

    /// Fused experts stored `[E, in, out]` (Llama-4): `gate_up_proj` `[E, H, 2I]` (gate
    /// columns first) and `down_proj` `[E, I, H]`, transposed into the runtime's
    /// `[out, in]` rows.
    fn fused_in_out(
        &self,
        block: &str,
        e: usize,
        h: usize,
        i: usize,
    ) -> Result<Vec<ExpertWeights>> {
        let gate_up = self.in_out(&format!("{block}.experts.gate_up_proj"), e, h, 2 * i)?;
        let down = self.in_out(&format!("{block}.experts.down_proj"), e, i, h)?;
        self.bar.inc((e * 3).saturating_sub(2) as u64);
        Ok(gate_up
            .chunks_exact(h * 2 * i)
            .zip(down.chunks_exact(i * h))
            .map(|(gu, dn)| ExpertWeights {
                w0: transpose(gu, h, 2 * i),
                w1: transpose(dn, i, h),
                ..ExpertWeights::default()
            })
            .collect())
    }

    /// gpt-oss experts: `gate_up_proj` `[E, H, 2I]` with gate and up columns interleaved
    /// (even gate, odd up) and its bias `[E, 2I]` likewise, `down_proj` `[E, I, H]` and its
    /// bias `[E, H]`; de-interleaved into gate rows then up rows and transposed.
    fn gpt_oss_experts(
        &self,
        block: &str,
        e: usize,
        h: usize,
        i: usize,
    ) -> Result<Vec<ExpertWeights>> {
        let d = Some(self.dtype);
        let x = format!("{block}.experts");
        let gate_up = self.in_out(&format!("{x}.gate_up_proj"), e, h, 2 * i)?;
        let gate_up_bias = self.read(&format!("{x}.gate_up_proj_bias"), &[e, 2 * i], d)?;
        let down = self.in_out(&format!("{x}.down_proj"), e, i, h)?;
        let down_bias = self.read(&format!("{x}.down_proj_bias"), &[e, h], d)?;
        self.bar.inc((e * 3).saturating_sub(4) as u64);
        // Column c of the interleaved [2I] goes to row (c odd) * I + c / 2.
        let dest = |c: usize| (c % 2) * i + c / 2;
        Ok(gate_up
            .chunks_exact(h * 2 * i)
            .zip(gate_up_bias.chunks_exact(2 * i))
            .zip(down.chunks_exact(i * h).zip(down_bias.chunks_exact(h)))
            .map(|((gu, gub), (dn, dnb))| {
                let mut w0 = vec![0f32; 2 * i * h];
                for (k, row) in gu.chunks_exact(2 * i).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        w0[dest(c) * h + k] = v;
                    }
                }
                let mut b0 = vec![0f32; 2 * i];
                for (c, &v) in gub.iter().enumerate() {
                    b0[dest(c)] = v;
                }
                ExpertWeights {
                    w0,
                    w1: transpose(dn, i, h),
                    b0,
                    b1: dnb.to_vec(),
                }
            })
            .collect())
    }

    /// Tensor `name` of `e` matrices stored `[in, out]` (`[e, rows, cols]`), rounded to the
    /// dtype; read from its MXFP4 `{name}_blocks` / `{name}_scales` (stored `[out, in]`,
    /// dequantised and transposed) when the checkpoint has those instead.
    fn in_out(&self, name: &str, e: usize, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let blocks = format!("{name}_blocks");
        if !self.ckpt.contains(&blocks) {
            return self.read(name, &[e, rows, cols], Some(self.dtype));
        }
        if !rows.is_multiple_of(32) {
            return Err(Error::input(
                "mxfp4",
                format!("`{name}`: {rows} inputs are not whole groups of 32"),
            ));
        }
        let groups = rows / 32;
        let b = self.ckpt.read_u8(&blocks, &[e, cols, groups, 16])?;
        let s = self
            .ckpt
            .read_u8(&format!("{name}_scales"), &[e, cols, groups])?;
        let out_in = super::mxfp4::dequantize(name, &b, &s)?;
        Ok(out_in
            .chunks_exact(cols * rows)
            .flat_map(|m| transpose(m, cols, rows))
            .map(|v| self.dtype.round(v))
            .collect())
    }

    /// One gated MLP stored as three `[out, in]` matrices under `prefix`.
    fn mlp(&self, prefix: &str, proj: [&str; 3], width: usize) -> Result<ExpertWeights> {
        let h = self.family.hidden;
        let d = Some(self.dtype);
        let mut w0 = self.read(&format!("{prefix}.{}.weight", proj[0]), &[width, h], d)?;
        w0.extend(self.read(&format!("{prefix}.{}.weight", proj[1]), &[width, h], d)?);
        let w1 = self.read(&format!("{prefix}.{}.weight", proj[2]), &[h, width], d)?;
        Ok(ExpertWeights {
            w0,
            w1,
            ..ExpertWeights::default()
        })
    }
}

/// The `[cols, rows]` transpose of a row-major `[rows, cols]` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for (r, row) in m.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}
