//! Command line of `flashmoe-bench`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use flashmoe::config::{
    Capacity, Dtype, GroupLimit, MlpKind, MoeConfig, Placement, Router, SharedExperts,
};
use flashmoe::plan::{LayerPlan, TileMode};
use flashmoe::{presets, Error, Result};

/// Most timed or warm-up iterations.
pub const MAX_ITERS: usize = 1_000_000;

/// Benchmarks flashmoe MoE layers and models; every run checks its output against the
/// reference before it is timed.
#[derive(Debug, Parser)]
#[command(name = "flashmoe-bench", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Time one MoE layer (default: the `auto` preset).
    Layer(LayerArgs),
    /// Time a stack of MoE layers (synthetic or from a checkpoint).
    Model(ModelArgs),
    /// Stage checks of one small layer: stop after each stage (gate, dispatch, GEMM0,
    /// GEMM1, combine), read back what it wrote and compare it with the CPU side.
    Stages(StagesArgs),
    /// The plan of a layer (memory per rank, tiles, bytes per launch), nothing allocated.
    Plan(PlanArgs),
    /// Report the GPUs and kernels this build can use.
    Probe,
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The GPU when one is usable and the kernels were built, else the CPU executor.
    Auto,
    /// The CPU executor (one thread per rank).
    Cpu,
    /// The persistent CUDA kernel.
    Gpu,
}

/// The world of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorldArg {
    /// R ranks: threads on the CPU, emulated block groups on one GPU.
    Ranks(usize),
    /// R ranks emulated inside one GPU launch (`emulated:R`).
    Emulated(usize),
}

impl WorldArg {
    /// Number of ranks.
    pub fn ranks(self) -> usize {
        match self {
            WorldArg::Ranks(r) | WorldArg::Emulated(r) => r,
        }
    }
}

fn parse_world(s: &str) -> std::result::Result<WorldArg, String> {
    let bad = || format!("`{s}`: expected N or emulated:R (R in 1..=8)");
    if let Some(r) = s.strip_prefix("emulated:") {
        let r: usize = r.parse().map_err(|_| bad())?;
        if !(1..=8).contains(&r) {
            return Err(bad());
        }
        return Ok(WorldArg::Emulated(r));
    }
    let n: usize = s.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    Ok(WorldArg::Ranks(n))
}

fn parse_groups(s: &str) -> std::result::Result<GroupLimit, String> {
    let bad = || format!("`{s}`: expected GROUPS/KEEP, e.g. 8/4");
    let (g, k) = s.split_once('/').ok_or_else(bad)?;
    Ok(GroupLimit {
        groups: g.parse().map_err(|_| bad())?,
        keep: k.parse().map_err(|_| bad())?,
    })
}

fn parse_capacity(s: &str) -> std::result::Result<Capacity, String> {
    if s == "dropless" {
        return Ok(Capacity::Dropless);
    }
    s.parse::<f32>()
        .map(Capacity::Factor)
        .map_err(|_| format!("`{s}`: expected a factor such as 1.25, or `dropless`"))
}

/// Router choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RouterArg {
    /// Softmax, top-k, renormalised.
    SoftmaxNorm,
    /// Softmax, top-k, raw probabilities.
    Softmax,
    /// Sigmoid scores + selection bias, renormalised (DeepSeek-V3).
    SigmoidBias,
    /// Top-k logits, sigmoid weight scaling the expert's input (Llama-4).
    SigmoidInput,
    /// PhiMoE's sparsemixer, epsilon 0.01 (top-2).
    SparseMixer,
    /// sqrt(softplus) scores + selection bias, renormalised (DeepSeek-V4).
    SqrtSoftplusBias,
    /// Top-k of the biased logits, softmax over the k (gpt-oss).
    TopkSoftmax,
    /// Routing given by the caller (random, uniform).
    Given,
}

/// Storage dtype on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

/// MLP kind on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MlpArg {
    /// Gated SiLU.
    Swiglu,
    /// Gated GELU.
    Geglu,
    /// Plain GELU.
    Gelu,
    /// Plain ReLU.
    Relu,
    /// gpt-oss's clamped SwiGLU (alpha 1.702, limit 7; random weights get expert biases).
    ClampedSwiglu,
}

/// The layer shape and run options shared by `layer` and `model`.
#[derive(Debug, Clone, Args)]
pub struct ShapeArgs {
    /// Layer shape preset: auto (flashmoe-paper on a GPU, tiny on the CPU), tiny,
    /// flashmoe-paper, mixtral-8x7b, qwen3-30b-a3b, olmoe-1b-7b, deepseek-v3.
    #[arg(long, default_value = "auto")]
    pub preset: String,
    /// Tokens per rank (default: the preset's).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Intermediate size of one expert.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Number of routed experts.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Storage dtype.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Expert MLP.
    #[arg(long, value_enum)]
    pub mlp: Option<MlpArg>,
    /// Router.
    #[arg(long, value_enum)]
    pub router: Option<RouterArg>,
    /// Capacity factor, or `dropless`.
    #[arg(long, value_parser = parse_capacity)]
    pub capacity: Option<Capacity>,
    /// Number of shared experts (each as wide as a routed expert).
    #[arg(long)]
    pub shared: Option<usize>,
    /// World: N ranks, or emulated:R on one GPU.
    #[arg(long, value_parser = parse_world, default_value = "1")]
    pub world: WorldArg,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Timed iterations.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Seed of weights and tokens.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Tokens per rank checked against the f64 reference (all when the layer is small);
    /// 0 skips the check (the report then says "not checked").
    #[arg(long, default_value_t = 64)]
    pub check_tokens: usize,
    /// Host memory the run may take (e.g. 16G), instead of what the system says is
    /// available; the run is refused before allocating when its estimate exceeds it.
    #[arg(long, value_parser = flashmoe::memory::parse_size)]
    pub max_host_memory: Option<u64>,
    /// Group-limited expert selection GROUPS/KEEP (DeepSeek `n_group`/`topk_group`).
    #[arg(long, value_parser = parse_groups)]
    pub groups: Option<GroupLimit>,
    /// Keep the router weight in f32 whatever the dtype (the DeepSeek-V3 family).
    #[arg(long)]
    pub router_f32: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Tile rule of the routed expert GEMMs: `auto` (in bf16/f16, row blocks 2j and 2j+1 of
    /// a pair list form one 128-row wide task when block 2j+1 has more than 32 rows; other
    /// blocks: decode tiles for at most 32 rows, in f32 too; above, prefill tiles with
    /// larger warp tiles in bf16/f16 and the classic tile in f32; the decode and prefill
    /// tiles take the block's next ticket ahead, and on one node a routed tile issues the
    /// next task's first stage before its completion step), `narrow` (auto without wide
    /// tasks: every task one 64-row block), `classic` (every block the 64x64 classic tile,
    /// the path before the rule) or `auto-serial` (auto without the early first stage).
    /// Used by `layer`, `stages` and `model` (every layer).
    #[arg(long, default_value = "auto", value_parser = parse_tiles)]
    pub tiles: TileMode,
}

fn parse_tiles(s: &str) -> std::result::Result<TileMode, String> {
    s.parse()
}

/// `flashmoe-bench layer`.
#[derive(Debug, Clone, Args)]
pub struct LayerArgs {
    /// Shape and run options.
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Start N local ranks (one process per GPU, NVSHMEM world) and gather their results.
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Also check and time the other tile rules (`--tiles`) in the same process (GPU,
    /// single or emulated world) and report the ratios of the medians.
    #[arg(long)]
    pub compare_tiles: bool,
}

/// `flashmoe-bench plan`.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Shape (`--preset auto` means `tiny` here; run options are unused).
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Print every rank even in worlds above 16 (else the first and the last).
    #[arg(long)]
    pub all_ranks: bool,
}

/// `flashmoe-bench stages`.
#[derive(Debug, Clone, Args)]
pub struct StagesArgs {
    /// Shape and backend (`--preset auto` means `tiny` here; timing options are unused).
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Test hook: corrupt one value of this stage's capture (gate, dispatch, gemm0, gemm1,
    /// combine) to show that the check finds and names it.
    #[arg(long)]
    pub plant: Option<String>,
    /// Run and check this stage only (`combine`: the whole layer once), e.g. under
    /// compute-sanitizer.
    #[arg(long)]
    pub only: Option<String>,
    /// Deadline of every wait inside the kernel (or of the CPU executor's), milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// `flashmoe-bench model`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Shape and run options (preset shapes for synthetic models).
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Hugging Face style checkpoint directory (config.json + safetensors).
    #[arg(long)]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Layers: a count for synthetic models, or a range `a..b` of a checkpoint's layers.
    #[arg(long, default_value = "4")]
    pub layers: String,
    /// Skew of synthetic expert popularity (Zipf exponent; 0 = uniform).
    #[arg(long, default_value_t = 1.0)]
    pub skew: f64,
}

impl ShapeArgs {
    /// The plan of `cfg` with this run's tile mode.
    pub fn plan(&self, cfg: &MoeConfig) -> Result<LayerPlan> {
        Ok(LayerPlan::new(cfg)?.with_tile_mode(self.tiles))
    }

    /// Checks the run counts: iterations within `1..=MAX_ITERS`, warm-up within
    /// `0..=MAX_ITERS`, checked tokens within the most tokens a rank can have.
    pub fn check_counts(&self) -> Result<()> {
        if self.iters == 0 || self.iters > MAX_ITERS {
            return Err(Error::config(
                "iters",
                self.iters,
                format!("between 1 and {MAX_ITERS}"),
            ));
        }
        if self.warmup > MAX_ITERS {
            return Err(Error::config(
                "warmup",
                self.warmup,
                format!("at most {MAX_ITERS}"),
            ));
        }
        let max_tokens = flashmoe::config::MAX_TOKENS;
        if self.check_tokens > max_tokens {
            return Err(Error::config(
                "check_tokens",
                self.check_tokens,
                format!("at most {max_tokens}"),
            ));
        }
        Ok(())
    }

    /// Builds and validates the layer config: preset first, then every explicit option.
    pub fn config(&self, gpu: bool) -> Result<(String, MoeConfig)> {
        let name = match self.preset.as_str() {
            "auto" if gpu => "flashmoe-paper",
            "auto" => "tiny",
            other => other,
        };
        let mut c = presets::preset(name)?.config;
        if let Some(v) = self.tokens {
            c.tokens = v;
        }
        if let Some(v) = self.hidden {
            c.hidden = v;
        }
        if let Some(v) = self.intermediate {
            c.intermediate = v;
        }
        if let Some(v) = self.experts {
            c.experts = v;
        }
        if let Some(v) = self.top_k {
            c.top_k = v;
        }
        if let Some(v) = self.dtype {
            c.dtype = match v {
                DtypeArg::Bf16 => Dtype::Bf16,
                DtypeArg::F16 => Dtype::F16,
                DtypeArg::F32 => Dtype::F32,
            };
        }
        if let Some(v) = self.mlp {
            c.mlp = match v {
                MlpArg::Swiglu => MlpKind::SwiGlu,
                MlpArg::Geglu => MlpKind::GeGlu,
                MlpArg::Gelu => MlpKind::Gelu,
                MlpArg::Relu => MlpKind::Relu,
                MlpArg::ClampedSwiglu => MlpKind::clamped_swiglu(1.702, 7.0),
            };
        }
        if let Some(v) = self.router {
            c.router = match v {
                RouterArg::SoftmaxNorm => Router::Softmax { renormalize: true },
                RouterArg::Softmax => Router::Softmax { renormalize: false },
                RouterArg::SigmoidBias => Router::SigmoidBias { renormalize: true },
                RouterArg::SigmoidInput => Router::SigmoidInput,
                RouterArg::SparseMixer => Router::sparse_mixer(0.01),
                RouterArg::SqrtSoftplusBias => Router::SqrtSoftplusBias { renormalize: true },
                RouterArg::TopkSoftmax => Router::TopkSoftmax,
                RouterArg::Given => Router::Given,
            };
        }
        if let Some(v) = self.capacity {
            c.capacity = v;
        }
        match self.shared {
            Some(0) => c.shared = None,
            Some(n) => {
                c.shared = Some(SharedExperts {
                    count: n,
                    intermediate: c.intermediate,
                    gated: false,
                })
            }
            None => {}
        }
        c.world = self.world.ranks();
        c.placement = Placement::Blocked;
        if self.groups.is_some() {
            c.group_limit = self.groups;
        }
        c.router_f32 |= self.router_f32;
        self.check_counts()?;
        c.validate()?;
        Ok((name.to_string(), c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_parses_counts_and_emulated() {
        assert_eq!(parse_world("4"), Ok(WorldArg::Ranks(4)));
        assert_eq!(parse_world("emulated:8"), Ok(WorldArg::Emulated(8)));
        assert!(parse_world("emulated:9").is_err());
        assert!(parse_world("0").is_err());
        assert!(parse_world("x").is_err());
    }

    #[test]
    fn tiles_parse_auto_narrow_and_classic() {
        assert_eq!(parse_tiles("auto"), Ok(TileMode::Auto));
        assert_eq!(parse_tiles("classic"), Ok(TileMode::Classic));
        assert_eq!(parse_tiles("narrow"), Ok(TileMode::Narrow));
        assert_eq!(parse_tiles("auto-serial"), Ok(TileMode::AutoSerial));
        assert!(parse_tiles("wide").is_err());
        let cli =
            Cli::try_parse_from(["flashmoe-bench", "stages", "--tiles", "narrow"]).expect("parses");
        let Command::Stages(a) = cli.command else {
            panic!("not the stages command");
        };
        assert_eq!(a.shape.tiles, TileMode::Narrow);
        let cli =
            Cli::try_parse_from(["flashmoe-bench", "layer", "--tiles", "classic"]).expect("parses");
        let Command::Layer(a) = cli.command else {
            panic!("not the layer command");
        };
        assert_eq!(a.shape.tiles, TileMode::Classic);
        let cfg = MoeConfig::new(16, 64, 64, 4, 2);
        assert_eq!(
            a.shape.plan(&cfg).expect("plan").tile_mode,
            TileMode::Classic
        );
    }

    #[test]
    fn capacity_parses_factor_and_dropless() {
        assert_eq!(parse_capacity("dropless"), Ok(Capacity::Dropless));
        assert_eq!(parse_capacity("1.5"), Ok(Capacity::Factor(1.5)));
        assert!(parse_capacity("lots").is_err());
    }

    fn layer(args: &[&str]) -> ShapeArgs {
        let mut argv = vec!["flashmoe-bench", "layer"];
        argv.extend_from_slice(args);
        match Cli::parse_from(argv).command {
            Command::Layer(a) => a.shape,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn huge_counts_are_typed_errors() {
        let max = u64::MAX.to_string();
        for (flag, field) in [
            ("--iters", "iters"),
            ("--warmup", "warmup"),
            ("--check-tokens", "check_tokens"),
        ] {
            let s = layer(&["--preset", "tiny", flag, &max]);
            match s.config(false) {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{flag}: {other:?}"),
            }
        }
        assert!(matches!(
            layer(&["--iters", "0"]).check_counts(),
            Err(Error::InvalidConfig { field: "iters", .. })
        ));
        let s = layer(&["--max-host-memory", "2G"]);
        assert_eq!(s.max_host_memory, Some(2 << 30));
        assert!(
            Cli::try_parse_from(["flashmoe-bench", "layer", "--max-host-memory", "lots"]).is_err()
        );
    }

    #[test]
    fn explicit_options_override_the_preset_and_are_validated() {
        let cli = Cli::parse_from([
            "flashmoe-bench",
            "layer",
            "--preset",
            "tiny",
            "--top-k",
            "3",
            "--world",
            "2",
        ]);
        let Command::Layer(a) = cli.command else {
            panic!("not layer")
        };
        let (name, c) = a.shape.config(false).unwrap();
        assert_eq!((name.as_str(), c.top_k, c.world), ("tiny", 3, 2));
        let cli = Cli::parse_from([
            "flashmoe-bench",
            "layer",
            "--preset",
            "tiny",
            "--top-k",
            "99",
        ]);
        let Command::Layer(a) = cli.command else {
            panic!("not layer")
        };
        assert!(matches!(
            a.shape.config(false),
            Err(Error::InvalidConfig { field: "top_k", .. })
        ));
    }
}
