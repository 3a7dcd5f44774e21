//! `flashmoe-bench plan`: the plan of a layer (memory per rank, capacity, tiles, bytes on
//! the wire per launch for a uniform routing) for any preset, world and token count,
//! without allocating anything.

use crate::args::PlanArgs;
use flashmoe::{LayerPlan, Result};

fn gib(b: f64) -> String {
    format!("{:.3} GiB", b / (1u64 << 30) as f64)
}

/// Prints the plan.
pub fn run(a: &PlanArgs) -> Result<()> {
    let mut shape = a.shape.clone();
    if shape.preset == "auto" {
        shape.preset = "tiny".into();
    }
    let (name, cfg) = shape.config(true)?;
    let plan = LayerPlan::new(&cfg)?;
    println!(
        "plan: {name}: {} tokens/rank, hidden {}, intermediate {}, {} experts, top-{}, {:?}, world {}, capacity {} pairs per (source, expert) ({:?}), {} pairs per (source, rank)",
        cfg.tokens, cfg.hidden, cfg.intermediate, cfg.experts, cfg.top_k, cfg.dtype, cfg.world,
        plan.capacity, cfg.capacity, plan.pair_capacity
    );
    println!(
        "protocol: one row per (token, destination rank) with {} metadata entries; heap {} per rank = 2 x {} ranks x {} tokens x {} B rows + metadata",
        plan.route_slots,
        gib(plan.heap.bytes as f64),
        cfg.world,
        cfg.tokens,
        plan.heap.stride_row
    );
    println!(
        "tiles: at most {} row blocks per (source, expert) and {} per source, {} GEMM0 and {} GEMM1 tiles per block, at most {} tasks per rank",
        plan.tiles.row_blocks,
        plan.tiles.pair_blocks,
        plan.tiles.gemm0_per_block,
        plan.tiles.gemm1_per_block,
        plan.tiles.max_tasks_per_rank
    );
    println!("rank  experts  heap        workspace   scratch     weights     tokens      total       sent/launch  received/launch  dispatch vs per-expert (uniform routing)");
    let ranks: Vec<usize> = if cfg.world > 16 && !a.all_ranks {
        vec![0, cfg.world - 1]
    } else {
        (0..cfg.world).collect()
    };
    for r in ranks {
        let m = plan.memory(r);
        let t = plan.traffic_uniform(r);
        println!(
            "{r:<5} {:<8} {:<11} {:<11} {:<11} {:<11} {:<11} {:<11} {:<12} {:<16} {:.2}x fewer bytes",
            plan.local_experts[r].len(),
            gib(m.heap as f64),
            gib(m.workspace as f64),
            gib(m.scratch as f64),
            gib(m.weights as f64),
            gib(m.tokens as f64),
            gib(m.total() as f64),
            gib(t.sent()),
            gib(t.dispatch_received + t.combine_received),
            t.dispatch_saving()
        );
    }
    Ok(())
}
