//! Runs a stack of MoE layers on the CPU and prints per-layer latency and expert load.
//!
//! ```text
//! cargo run --release --example moe_model -- --preset tiny --layers 4 --zipf 1.2
//! cargo run --release --example moe_model -- --checkpoint /models/OLMoE-1B-7B-0924 --layer 0 --layer 1
//! ```

use clap::Parser;
use flashmoe::model::synthetic::SyntheticSpec;
use flashmoe::model::{self, Backend, LoadOptions, MoeModel};
use flashmoe::{Capacity, Dtype, Placement};

#[derive(Parser, Debug)]
#[command(about = "Run MoE layers of a checkpoint or a synthetic model on the CPU")]
struct Args {
    /// Hugging Face checkpoint directory (config.json + *.safetensors).
    #[arg(long, conflicts_with = "preset")]
    checkpoint: Option<std::path::PathBuf>,
    /// Decoder layer to load from the checkpoint (repeatable; default: every MoE layer).
    #[arg(long = "layer")]
    layers: Vec<usize>,
    /// Synthetic preset (tiny, flashmoe-paper, mixtral-8x7b, qwen3-30b-a3b, olmoe-1b-7b, deepseek-v3).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Number of synthetic layers.
    #[arg(long, default_value_t = 4)]
    synthetic_layers: usize,
    /// Zipf exponent of synthetic expert popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Tokens per rank.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Ranks (threads).
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Capacity factor (0 = dropless).
    #[arg(long, default_value_t = 1.25)]
    capacity: f32,
    /// Storage dtype: bf16, f16 or f32 (default: the checkpoint's, bf16 for presets).
    #[arg(long)]
    dtype: Option<String>,
    /// Run the reference instead of the CPU executor.
    #[arg(long)]
    reference: bool,
    /// Forward passes to run.
    #[arg(long, default_value_t = 2)]
    iters: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dtype = match args.dtype.as_deref() {
        None => None,
        Some("bf16") => Some(Dtype::Bf16),
        Some("f16") => Some(Dtype::F16),
        Some("f32") => Some(Dtype::F32),
        Some(other) => return Err(format!("--dtype {other}: use bf16, f16 or f32").into()),
    };
    let capacity = if args.capacity == 0.0 {
        Capacity::Dropless
    } else {
        Capacity::Factor(args.capacity)
    };
    let (layers, inputs) = match &args.checkpoint {
        Some(dir) => {
            let mut opts = LoadOptions::new(args.tokens);
            opts.world = args.world;
            opts.capacity = capacity;
            opts.dtype = dtype;
            opts.layers = (!args.layers.is_empty()).then(|| args.layers.clone());
            let loaded = model::load(dir, &opts)?;
            eprintln!(
                "{}: {} MoE layers loaded, dense layers skipped: {:?}",
                loaded.family.family,
                loaded.layers.len(),
                loaded.skipped_dense
            );
            let spec = SyntheticSpec::new(loaded.layers[0].config.clone(), 1);
            let inputs = spec.inputs(args.tokens, 7);
            (loaded.layers, inputs)
        }
        None => {
            let mut spec = SyntheticSpec::preset(&args.preset, args.synthetic_layers, args.tokens)?
                .with_world(args.world, Placement::Blocked)
                .with_dtype(dtype.unwrap_or(Dtype::Bf16));
            spec.config.capacity = capacity;
            spec.zipf = args.zipf;
            (spec.build()?, spec.inputs(args.tokens, 7))
        }
    };
    let backend = if args.reference {
        Backend::Reference
    } else {
        Backend::Cpu
    };
    let mut m = MoeModel::new(layers, backend)?;
    for it in 0..args.iters {
        let out = m.forward(&inputs)?;
        println!("forward {it}: {:.3} ms", out.latency.as_secs_f64() * 1e3);
        for st in &out.layers {
            println!("  {}  histogram {:?}", st.summary(), st.load_histogram(8));
        }
    }
    Ok(())
}
