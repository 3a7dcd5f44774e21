//! The plan's layout: disjoint, aligned, in range, consistent with the placement.

use super::*;
use crate::config::{Dtype, MlpKind, Placement, SharedExperts};
use proptest::prelude::*;

/// Half-open byte intervals `[start, end)` with a name, for overlap checks.
type Region = (u64, u64, String);

/// Asserts the regions are pairwise disjoint, inside `[0, total)` and 16-byte aligned.
fn assert_disjoint(mut regions: Vec<Region>, total: u64) -> std::result::Result<(), TestCaseError> {
    regions.sort();
    for (start, end, name) in &regions {
        prop_assert!(start < end, "{} is empty", name);
        prop_assert!(*end <= total, "{} ends at {} past {}", name, end, total);
        prop_assert_eq!(
            start % 16,
            0,
            "{} at {} is not 16-byte aligned",
            name,
            start
        );
    }
    for pair in regions.windows(2) {
        prop_assert!(
            pair[0].1 <= pair[1].0,
            "{} [{}, {}) overlaps {} [{}, {})",
            pair[0].2,
            pair[0].0,
            pair[0].1,
            pair[1].2,
            pair[1].0,
            pair[1].1
        );
    }
    Ok(())
}

fn heap_regions(p: &LayerPlan) -> Vec<Region> {
    let h = &p.heap;
    let mut v = Vec::new();
    for cell in 0..h.cells as usize {
        for peer in 0..p.world() {
            for slot in 0..p.config.tokens {
                let d = h.dispatch_row(cell, peer, slot);
                v.push((
                    d,
                    d + h.stride_row,
                    format!("dispatch row({cell},{peer},{slot})"),
                ));
                let c = h.combine_row(cell, peer, slot);
                v.push((
                    c,
                    c + h.stride_row,
                    format!("combine row({cell},{peer},{slot})"),
                ));
            }
            let counts = h.count(cell, peer, 0);
            v.push((
                counts,
                counts + 4 * p.max_local as u64,
                format!("counts({cell},{peer})"),
            ));
            let pairs = h.pair(cell, peer, 0);
            if p.pair_capacity > 0 {
                v.push((
                    pairs,
                    pairs + 4 * p.pair_capacity as u64,
                    format!("pairs({cell},{peer})"),
                ));
            }
            let rows = h.row_meta(cell, peer, 0, 0);
            let bytes = 8 * (p.config.tokens * p.route_slots) as u64;
            if bytes > 0 {
                v.push((rows, rows + bytes, format!("row meta({cell},{peer})")));
            }
        }
    }
    let words = 8 * p.world() as u64;
    v.push((
        h.dispatch_signals,
        h.dispatch_signals + words,
        "dispatch signals".into(),
    ));
    v.push((
        h.combine_signals,
        h.combine_signals + words,
        "combine signals".into(),
    ));
    v
}

fn workspace_regions(p: &LayerPlan) -> Vec<Region> {
    let w = &p.workspace;
    let c = &p.config;
    let tk = (c.tokens * c.top_k) as u64;
    let blocks = (p.world() * p.max_local * p.tiles.row_blocks) as u64;
    let chunks = c.tokens.div_ceil(GATE_CHUNK).max(1) as u64;
    let world = p.world() as u64;
    let mut v: Vec<Region> = vec![
        (
            w.rank_counts,
            w.rank_counts + 4 * world,
            "rank counts".into(),
        ),
        (
            w.rank_hist,
            w.rank_hist + 4 * chunks * world,
            "rank hist".into(),
        ),
        (
            w.pair_base,
            w.pair_base + 4 * world * p.max_local as u64,
            "pair base".into(),
        ),
        (w.gemm1_done, w.gemm1_done + 4 * world, "gemm1 done".into()),
        (
            w.reduce_done,
            w.reduce_done + 4 * world,
            "reduce done".into(),
        ),
        (w.epoch, w.epoch + 8, "epoch".into()),
        (w.status, w.status + 64, "status".into()),
        (w.dropped, w.dropped + 8, "dropped".into()),
        (
            w.expert_counts,
            w.expert_counts + 4 * c.experts as u64,
            "expert counts".into(),
        ),
        (w.gemm0_done, w.gemm0_done + 4 * blocks, "gemm0 done".into()),
        (w.queue_ctl, w.queue_ctl + 16, "queue ctl".into()),
        (w.queue, w.queue + 8 * w.queue_capacity, "queue".into()),
        (w.sync, w.sync + 16, "sync".into()),
        (
            w.phase_times,
            w.phase_times + (8 * PHASE_WORDS * PHASE_MAX_BLOCKS) as u64,
            "phase times".into(),
        ),
        (
            w.gate_hist,
            w.gate_hist + 4 * (c.tokens.div_ceil(GATE_CHUNK).max(1) * c.experts) as u64,
            "gate hist".into(),
        ),
    ];
    if p.tiles.shared_row_blocks > 0 {
        v.push((
            w.shared_done,
            w.shared_done + 4 * p.tiles.shared_row_blocks as u64,
            "shared done".into(),
        ));
    }
    // Route arrays are empty when the config has no tokens.
    if tk > 0 {
        v.push((
            w.route_rank_slots,
            w.route_rank_slots + 4 * tk,
            "route rank slots".into(),
        ));
        v.push((w.route_ids, w.route_ids + 4 * tk, "route ids".into()));
        v.push((
            w.route_weights,
            w.route_weights + 4 * tk,
            "route weights".into(),
        ));
        v.push((w.route_slots, w.route_slots + 4 * tk, "route slots".into()));
    }
    v
}

/// The scratch's regions (offsets from the scratch's first byte).
fn scratch_regions(p: &LayerPlan) -> Vec<Region> {
    let w = &p.workspace;
    let c = &p.config;
    let world = p.world() as u64;
    let mut v: Vec<Region> = Vec::new();
    // Shared-expert regions exist only with shared experts.
    let srows = (p.tiles.shared_row_blocks * TILE_M) as u64;
    if p.tiles.shared_row_blocks > 0 {
        v.push((
            w.shared_act,
            w.shared_act + srows * w.shared_act_stride_row,
            "shared act".into(),
        ));
        v.push((
            w.shared_out,
            w.shared_out + srows * w.shared_out_stride_row,
            "shared out".into(),
        ));
    }
    // Per-pair regions and logits are empty when the config has no tokens.
    if p.pair_capacity > 0 {
        v.push((w.act, w.act + world * w.act_stride_source, "act".into()));
        v.push((w.y, w.y + world * w.y_stride_source, "y".into()));
    }
    if c.tokens > 0 && c.router != Router::Given {
        let bytes = c.tokens as u64 * w.logits_stride_row;
        v.push((w.logits, w.logits + bytes, "logits".into()));
    }
    v
}

fn valid_config() -> impl Strategy<Value = MoeConfig> {
    (
        (1usize..=8, 1usize..=16, 0usize..=200),
        (1usize..=3, 1usize..=4, any::<bool>()),
        (
            prop_oneof![Just(None), (0.05f32..4.0).prop_map(Some)],
            0usize..3,
            0usize..4,
        ),
        prop::collection::vec(0u32..8, 16),
        any::<bool>(),
    )
        .prop_flat_map(
            |((world, experts, tokens), (h, i, blocked), (factor, dt, mlp), map, shared)| {
                (1..=experts.min(8)).prop_map(move |top_k| {
                    let mut c = MoeConfig::new(tokens, 64 * h, 64 * i, experts, top_k);
                    c.world = world;
                    c.capacity = factor.map_or(Capacity::Dropless, Capacity::Factor);
                    c.dtype = [Dtype::Bf16, Dtype::F16, Dtype::F32][dt];
                    c.mlp = [
                        MlpKind::SwiGlu,
                        MlpKind::GeGlu,
                        MlpKind::Gelu,
                        MlpKind::Relu,
                    ][mlp];
                    c.placement = if blocked {
                        Placement::Blocked
                    } else {
                        Placement::Map(map[..experts].iter().map(|&r| r % world as u32).collect())
                    };
                    c.shared = shared.then_some(SharedExperts {
                        count: 2,
                        intermediate: 64,
                        gated: true,
                    });
                    c
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn layout_is_disjoint_aligned_and_consistent(c in valid_config(), staging in any::<bool>()) {
        let p = LayerPlan::with_staging(&c, staging).expect("valid config plans");
        let h = &p.heap;

        // Capacity: the raw capacity (the token count when dropless); pairs per source
        // bounded by both the tokens' choices and the experts' capacities.
        prop_assert_eq!(p.capacity, raw_capacity(&c));
        if c.capacity == Capacity::Dropless {
            prop_assert_eq!(p.capacity, c.tokens);
        }
        prop_assert_eq!(p.route_slots, c.top_k.min(p.max_local));
        prop_assert_eq!(p.pair_capacity, (c.tokens * p.route_slots).min(p.max_local * p.capacity));

        // Heap: rows, metadata and signals disjoint, in range, aligned; O(world x tokens).
        prop_assert_eq!(h.cells, if staging { 2 } else { 1 });
        prop_assert_eq!(h.stride_row, (c.hidden * c.dtype.size()) as u64);
        assert_disjoint(heap_regions(&p), h.bytes)?;
        prop_assert_eq!(h.dispatch_signal(p.world() - 1) + 8, h.dispatch_signals + 8 * p.world() as u64);
        let rows = 2 * h.cells * (p.world() * c.tokens) as u64 * h.stride_row;
        let meta = h.cells * p.world() as u64
            * (4 * (p.max_local + p.pair_capacity) + 8 * c.tokens * p.route_slots + 3 * 256) as u64;
        prop_assert!(h.bytes <= rows + meta + 4 * 256 + 16 * p.world() as u64,
            "heap {} > rows {} + meta {}", h.bytes, rows, meta);

        // Workspace: disjoint, in range, aligned; per-pair rows fit their strides.
        let w = &p.workspace;
        prop_assert_eq!(w.act_stride_row, (c.intermediate * c.dtype.size()) as u64);
        prop_assert_eq!(w.act_stride_source, p.pair_capacity as u64 * w.act_stride_row);
        prop_assert_eq!(w.y_stride_row, (c.hidden * c.dtype.size()) as u64);
        prop_assert_eq!(w.y_stride_source, p.pair_capacity as u64 * w.y_stride_row);
        assert_disjoint(workspace_regions(&p), w.bytes)?;
        assert_disjoint(scratch_regions(&p), w.scratch_bytes)?;

        // Placement: owners and local lists agree with the config's owner map.
        let owner_ranks = c.expert_owners();
        prop_assert_eq!(p.owners.len(), c.experts);
        prop_assert_eq!(p.local_experts.len(), c.world);
        for (e, o) in p.owners.iter().enumerate() {
            prop_assert_eq!(o.rank, owner_ranks[e]);
            prop_assert_eq!(p.local_experts[o.rank as usize][o.local as usize], e as u32);
        }
        let total: usize = p.local_experts.iter().map(Vec::len).sum();
        prop_assert_eq!(total, c.experts);
        for list in &p.local_experts {
            prop_assert!(list.windows(2).all(|w| w[0] < w[1]), "local order is global order");
        }
        prop_assert_eq!(p.max_local, p.local_experts.iter().map(Vec::len).max().unwrap_or(0).max(1));

        // Tiles.
        let t = &p.tiles;
        prop_assert_eq!(t.row_blocks, p.capacity.div_ceil(TILE_M).max(1));
        // Every possible split of a source's pairs over its experts fits pair_blocks.
        prop_assert!(t.pair_blocks >= (p.pair_capacity.div_ceil(TILE_M)).max(1));
        prop_assert!(t.pair_blocks <= p.max_local * t.row_blocks);
        prop_assert_eq!(t.reduce_row_blocks, c.tokens.div_ceil(TILE_M).max(1));
        prop_assert_eq!(t.reduce_per_block * TILE_N, c.hidden);
        prop_assert_eq!(t.gemm0_per_block * TILE_N, c.intermediate);
        prop_assert_eq!(t.gemm1_per_block * TILE_N, c.hidden);
        let shared_width = c.shared.map_or(0, |s| s.count * s.intermediate);
        if shared_width > 0 {
            prop_assert_eq!(t.shared_row_blocks, c.tokens.div_ceil(TILE_M).max(1));
            prop_assert_eq!(t.shared_gemm0_per_block * TILE_N, shared_width);
            prop_assert_eq!(t.shared_gemm1_per_block * TILE_N, c.hidden);
            prop_assert_eq!(w.shared_act_stride_row, (shared_width * c.dtype.size()) as u64);
            prop_assert_eq!(w.shared_out_stride_row, 4 * c.hidden as u64);
        } else {
            prop_assert_eq!(
                (t.shared_row_blocks, t.shared_gemm0_per_block, t.shared_gemm1_per_block),
                (0, 0, 0)
            );
        }
        prop_assert_eq!(
            t.max_tasks_per_rank,
            c.world * (t.pair_blocks * (t.gemm0_per_block + t.gemm1_per_block)
                + t.reduce_row_blocks * t.reduce_per_block)
                + t.shared_row_blocks * (t.shared_gemm0_per_block + t.shared_gemm1_per_block)
        );
        prop_assert!(t.max_tasks_per_rank < MAX_TASKS, "tasks fit the 30-bit task index");
        prop_assert_eq!(w.queue_capacity, t.max_tasks_per_rank as u64);
    }
}

#[test]
fn blocked_placement_splits_unevenly_front_first() {
    // 10 experts on 4 ranks: 10 = 4 * 2 + 2, so ranks 0 and 1 own 3, ranks 2 and 3 own 2.
    let mut c = MoeConfig::new(16, 64, 64, 10, 2);
    c.world = 4;
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(
        p.local_experts,
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7], vec![8, 9]]
    );
    assert_eq!(p.max_local, 3);
    assert_eq!(p.owners[5], Owner { rank: 1, local: 2 });
    assert_eq!(p.owners[6], Owner { rank: 2, local: 0 });

    // 3 experts on 5 ranks: ranks 3 and 4 own nothing, the heap still has one expert slot.
    c.experts = 3;
    c.world = 5;
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(
        p.local_experts,
        vec![vec![0], vec![1], vec![2], vec![], vec![]]
    );
    assert_eq!(p.max_local, 1);
}

#[test]
fn a_map_with_an_empty_rank() {
    let mut c = MoeConfig::new(16, 64, 64, 5, 1);
    c.world = 3;
    c.placement = Placement::Map(vec![2, 0, 2, 2, 0]);
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(p.local_experts, vec![vec![1, 4], vec![], vec![0, 2, 3]]);
    assert_eq!(p.max_local, 3);
    assert_eq!(p.owners[3], Owner { rank: 2, local: 2 });
}

#[test]
fn memory_figure_of_a_small_layer() {
    // 128 tokens, hidden 64, intermediate 128, 4 experts, top-2, bf16, SwiGLU, world 2.
    let mut c = MoeConfig::new(128, 64, 128, 4, 2);
    c.world = 2;
    let p = LayerPlan::new(&c).expect("plan");
    // Dropless: capacity = tokens; 2 local experts, route slots min(2, 2) = 2.
    assert_eq!((p.capacity, p.route_slots, p.pair_capacity), (128, 2, 256));
    // Heap: rows 64 * 2 = 128 B; 2 peers x 128 rows = 32 KiB per row region, 2 regions;
    // metadata per peer: counts 8 B -> 256, pairs 1 KiB, row meta 128 x 2 x 8 = 2 KiB
    // = 3328 B, x 2 peers; two signal arrays of 2 words, each padded to 256 B.
    assert_eq!(p.heap.bytes, 65_536 + 2 * 3_328 + 512);
    let m = p.memory(0);
    assert_eq!(m.heap, p.heap.bytes);
    // Weights of rank 0: 2 experts * (w0 256 x 64 + w1 64 x 128) * 2 B = 98 304, plus the
    // router 4 x 64 * 2 B = 512 and its f32 bias 16 B.
    assert_eq!(m.weights, 98_304 + 512 + 16);
    // Tokens in and out: 2 * 128 * 64 * 2 B.
    assert_eq!(m.tokens, 32_768);
    assert_eq!(m.workspace, p.workspace.bytes);
    assert_eq!(m.scratch, p.workspace.scratch_bytes);
    assert_eq!(
        m.total(),
        m.heap + m.workspace + m.scratch + m.weights + m.tokens
    );
    // A rank that does not exist owns no experts.
    assert_eq!(p.memory(9).weights, 512 + 16);

    // Shared experts (2 x 64, gated): w0 256 x 64 + w1 64 x 128 = 24 576 values = 49 152 B,
    // plus the gate vector 64 * 2 B.
    c.shared = Some(SharedExperts {
        count: 2,
        intermediate: 64,
        gated: true,
    });
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(p.memory(0).weights, 98_304 + 512 + 16 + 49_152 + 128);
    assert!(p.memory(0).to_string().contains("MiB per rank"));
}

#[test]
fn dropless_deepseek_v3_heap_fits_in_1_5_gb_per_rank() {
    // DeepSeek-V3: hidden 7168, expert intermediate 2048, 256 experts, top-8, 8 ranks,
    // 4096 tokens per rank, bf16, dropless.
    let mut c = MoeConfig::new(4096, 7168, 2048, 256, 8);
    c.world = 8;
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(p.capacity, 4096);
    // 2 regions x 8 peers x 4096 rows x 14 336 B = 939.5 MB, plus about 3 MB of metadata.
    assert!(p.heap.bytes <= 1_500_000_000, "{}", p.heap.bytes);
    assert!(p.heap.bytes >= 2 * 8 * 4096 * 14_336);
}

#[test]
fn a_capacity_factor_bounds_the_pairs() {
    // 256 tokens, 16 experts on 2 ranks, top-4: factor 1.0 -> 64 pairs per expert.
    let mut c = MoeConfig::new(256, 64, 64, 16, 4);
    c.world = 2;
    c.capacity = Capacity::Factor(1.0);
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(p.capacity, 64);
    // min(256 tokens x 4 route slots, 8 local experts x 64) = 512.
    assert_eq!(p.pair_capacity, 512);
    assert_eq!(p.tiles.row_blocks, 1);
}

#[test]
fn plans_that_overflow_are_typed_errors() {
    let mut c = MoeConfig::new(crate::config::MAX_TOKENS, 65_536, 65_536, 1024, 16);
    c.world = 1024;
    c.capacity = Capacity::Dropless;
    assert!(matches!(
        LayerPlan::new(&c),
        Err(Error::PlanTooLarge { .. })
    ));
}

#[test]
fn one_signal_per_rank_whatever_the_placement() {
    // 32 ranks, every one of 1024 experts on rank 0: still 32 dispatch signals per rank.
    let mut c = MoeConfig::new(64, 64, 64, 1024, 2);
    c.world = 32;
    c.placement = Placement::Map(vec![0; 1024]);
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(p.heap.combine_signals - p.heap.dispatch_signals, 256);
    assert_eq!(p.max_local, 1024);
    assert_eq!(p.route_slots, 2);
}

#[test]
fn the_tile_rule_by_rows() {
    use crate::config::Dtype::{Bf16, F16, F32};
    for dtype in [Bf16, F16] {
        for mode in [TileMode::Auto, TileMode::Narrow] {
            for (rows, tokens) in [(1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (32, 32)] {
                assert_eq!(
                    tile_for(mode, dtype, rows),
                    TileShape::Decode { tokens },
                    "{mode:?} {rows} rows"
                );
            }
            for rows in (DECODE_MAX_ROWS + 1)..=TILE_M {
                let shape = tile_for(mode, dtype, rows);
                assert_eq!(shape, TileShape::Prefill, "{rows} rows");
                assert_eq!(
                    shape.rows(),
                    TILE_M,
                    "a prefill tile covers the whole block"
                );
            }
            // Past one block (only auto's wide tasks have such rows): the wide tile.
            for rows in (TILE_M + 1)..=WIDE_ROWS {
                assert_eq!(tile_for(mode, dtype, rows), TileShape::Wide, "{rows} rows");
            }
            // Every task of 1..=WIDE_ROWS rows gets a shape that covers its rows.
            for rows in 1..=WIDE_ROWS {
                assert!(tile_for(mode, dtype, rows).rows() >= rows, "{rows} rows");
            }
        }
        for rows in 1..=WIDE_ROWS {
            assert_eq!(tile_for(TileMode::Classic, dtype, rows), TileShape::Classic);
        }
    }
    assert_eq!(TileShape::Wide.rows(), 2 * TILE_M);
    // f32: the FFMA decode tile up to DECODE_MAX_ROWS rows, no prefill tile above.
    for mode in [TileMode::Auto, TileMode::Narrow] {
        for (rows, tokens) in [(1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (32, 32)] {
            assert_eq!(
                tile_for(mode, F32, rows),
                TileShape::Decode { tokens },
                "f32, {rows} rows"
            );
        }
        for rows in (DECODE_MAX_ROWS + 1)..=TILE_M {
            assert_eq!(tile_for(mode, F32, rows), TileShape::Classic);
        }
    }
    for rows in 1..=TILE_M {
        assert_eq!(tile_for(TileMode::Classic, F32, rows), TileShape::Classic);
    }
    assert_eq!("classic".parse::<TileMode>(), Ok(TileMode::Classic));
    assert_eq!("auto".parse::<TileMode>(), Ok(TileMode::Auto));
    assert_eq!("narrow".parse::<TileMode>(), Ok(TileMode::Narrow));
    assert_eq!("auto-serial".parse::<TileMode>(), Ok(TileMode::AutoSerial));
    let err = "prefill".parse::<TileMode>().unwrap_err();
    assert!(
        err.contains("auto") && err.contains("narrow") && err.contains("classic"),
        "{err}"
    );
    // auto-serial changes only the kernel's pipeline: auto's tasks and shapes everywhere.
    for dtype in [Bf16, F16, F32] {
        for count in 0..=300usize {
            for rb in 0..count.div_ceil(TILE_M) {
                assert_eq!(
                    task_rows(TileMode::AutoSerial, dtype, count, rb),
                    task_rows(TileMode::Auto, dtype, count, rb)
                );
            }
        }
        for rows in 1..=WIDE_ROWS {
            assert_eq!(
                tile_for(TileMode::AutoSerial, dtype, rows),
                tile_for(TileMode::Auto, dtype, rows)
            );
        }
    }
    for m in TileMode::ALL {
        assert_eq!(m.name().parse::<TileMode>(), Ok(m));
    }
    let codes: Vec<u32> = TileMode::ALL.iter().map(|m| m.code()).collect();
    assert_eq!(codes, [0, 1, 2, 3]);
}

#[test]
fn task_rows_pairs_blocks_into_wide_tasks() {
    use crate::config::Dtype::{Bf16, F16, F32};
    let rows = |mode, dtype, count: usize| -> Vec<usize> {
        (0..count.div_ceil(TILE_M))
            .map(|rb| task_rows(mode, dtype, count, rb))
            .collect()
    };
    for dtype in [Bf16, F16] {
        let auto = |count| rows(TileMode::Auto, dtype, count);
        // One block: never wide.
        assert_eq!(auto(1), [1]);
        assert_eq!(auto(64), [64]);
        // 100 = 64 + 36 (36 > 32): one wide task.
        assert_eq!(auto(100), [100, 0]);
        assert_eq!(tile_for(TileMode::Auto, dtype, 100), TileShape::Wide);
        // 90 = 64 + 26 (26 <= 32): a prefill block and a decode block.
        assert_eq!(auto(90), [64, 26]);
        assert_eq!(tile_for(TileMode::Auto, dtype, 64), TileShape::Prefill);
        assert_eq!(
            tile_for(TileMode::Auto, dtype, 26),
            TileShape::Decode { tokens: 32 }
        );
        // The edge: block 1 of 32 rows stays apart, of 33 joins block 0.
        assert_eq!(auto(96), [64, 32]);
        assert_eq!(auto(97), [97, 0]);
        assert_eq!(auto(128), [128, 0]);
        // 3 * 64 + 40: two wide tasks.
        assert_eq!(auto(3 * 64 + 40), [128, 0, 104, 0]);
        // 2 * 64 + 40: a wide task, then a prefill block of its own (block 2 is even).
        assert_eq!(auto(2 * 64 + 40), [128, 0, 40]);
        // 3 * 64 + 10: a wide task, then two blocks apart (block 3 has 10 rows).
        assert_eq!(auto(3 * 64 + 10), [128, 0, 64, 10]);
        for count in [1, 64, 90, 100, 3 * 64 + 40, 1000] {
            assert!(rows(TileMode::Narrow, dtype, count)
                .iter()
                .all(|&r| r <= TILE_M));
            assert!(rows(TileMode::Classic, dtype, count)
                .iter()
                .all(|&r| r <= TILE_M));
        }
        assert_eq!(rows(TileMode::Narrow, dtype, 100), [64, 36]);
        assert_eq!(rows(TileMode::Classic, dtype, 100), [64, 36]);
    }
    // f32 has no wide tile: every task one block, whatever the mode.
    for mode in TileMode::ALL {
        assert_eq!(rows(mode, F32, 100), [64, 36]);
        assert_eq!(rows(mode, F32, 3 * 64 + 40), [64, 64, 64, 40]);
    }
    // Every count: the task rows sum to the count, each task's shape covers it, a tail
    // follows every wide task, and `tasks` lists the non-empty ones in order.
    for dtype in [Bf16, F16, F32] {
        for mode in TileMode::ALL {
            for count in 0..=600 {
                let r = rows(mode, dtype, count);
                assert_eq!(r.iter().sum::<usize>(), count, "{mode:?} {dtype:?} {count}");
                for (rb, &n) in r.iter().enumerate() {
                    if n > TILE_M {
                        assert!(rb.is_multiple_of(2) && r[rb + 1] == 0, "{mode:?} {count}");
                        assert!(n > TILE_M + DECODE_MAX_ROWS && n <= WIDE_ROWS);
                        assert!(wide_tasks(mode, dtype));
                    }
                    if n == 0 {
                        assert!(
                            !rb.is_multiple_of(2) && r[rb - 1] > TILE_M,
                            "{mode:?} {count}"
                        );
                    }
                    if n > 0 {
                        assert!(tile_for(mode, dtype, n).rows() >= n);
                    }
                }
                let listed: Vec<(usize, usize)> = tasks(mode, dtype, count).collect();
                let want: Vec<(usize, usize)> = r
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(|(rb, &n)| (rb * TILE_M, n))
                    .collect();
                assert_eq!(listed, want);
            }
        }
    }
    // Past the list: no rows.
    assert_eq!(task_rows(TileMode::Auto, Bf16, 64, 1), 0);
}

#[test]
fn the_tile_census_counts_tasks() {
    let c = MoeConfig {
        dtype: Dtype::Bf16,
        ..MoeConfig::new(256, 64, 64, 8, 2)
    };
    let p = LayerPlan::new(&c).expect("plan");
    assert_eq!(p.tile_mode, TileMode::Auto);
    let lists = [0, 20, 64, 90, 100, 130];
    // 0: no task; 20: decode; 64: prefill; 90 = 64 + 26: prefill and decode;
    // 100 = 64 + 36: one wide task; 130 = 64 + 64 + 2: one wide task and a decode.
    let census = p.tile_census(lists);
    assert_eq!(
        census,
        TileCensus {
            decode: 3,
            prefill: 2,
            wide: 2,
            classic: 0
        }
    );
    assert_eq!(census.total(), 7);
    assert_eq!(
        census.to_string(),
        "3 decode + 2 prefill + 2 wide + 0 classic tile tasks"
    );
    assert_eq!(p.task_rows(100, 0), 100);
    assert_eq!(p.task_rows(100, 1), 0);
    assert_eq!(p.tasks(130).collect::<Vec<_>>(), [(0, 128), (128, 2)]);
    // Narrow: the same lists in blocks, no wide task.
    let narrow = p
        .clone()
        .with_tile_mode(TileMode::Narrow)
        .tile_census(lists);
    assert_eq!(
        narrow,
        TileCensus {
            decode: 3,
            prefill: 6,
            wide: 0,
            classic: 0
        }
    );
    let classic = p.with_tile_mode(TileMode::Classic).tile_census(lists);
    assert_eq!(classic.classic, 9);
    assert_eq!(
        classic.to_string(),
        "0 decode + 0 prefill + 0 wide + 9 classic tile tasks"
    );
}

/// Tasks the scheduler and the completion steps create on one rank for the given kept pair
/// counts (`counts[source][local]`) and token rows per source, task by task through the
/// tile rule (a wide task has the column tiles of one block: it covers two blocks' rows).
fn tasks_for(p: &LayerPlan, counts: &[Vec<usize>], rows: &[usize]) -> usize {
    let t = &p.tiles;
    let mut n = 0;
    for (src, list) in counts.iter().enumerate() {
        for &c in list {
            for (_, r) in p.tasks(c) {
                let shape = p.tile_for(r);
                assert!(shape.rows() >= r);
                n += t.gemm0_per_block + t.gemm1_per_block;
            }
        }
        n += rows[src].div_ceil(TILE_M) * t.reduce_per_block;
    }
    n + t.shared_row_blocks * (t.shared_gemm0_per_block + t.shared_gemm1_per_block)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The queue capacity bounds the tasks of any routing, in every tile mode.
    #[test]
    fn queue_capacity_bounds_every_routing(
        c in valid_config(),
        mode in 0usize..3,
        seed in any::<u64>(),
    ) {
        let mode = TileMode::ALL[mode];
        let p = LayerPlan::new(&c).expect("valid config plans").with_tile_mode(mode);
        let local = p.local_experts.iter().map(Vec::len).max().unwrap_or(0);
        // Each source splits at most pair_capacity pairs over the local experts, each at
        // most `capacity`, with a deterministic pseudo-random split.
        let mut x = seed | 1;
        let mut next = |m: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (m as u64 + 1)) as usize
        };
        let mut counts = vec![vec![0usize; local]; c.world];
        for list in &mut counts {
            let mut left = p.pair_capacity;
            for v in list.iter_mut() {
                *v = next(p.capacity.min(left));
                left -= *v;
            }
        }
        let rows = vec![c.tokens; c.world];
        let n = tasks_for(&p, &counts, &rows);
        prop_assert!(n <= p.tiles.max_tasks_per_rank, "{} tasks > {}", n, p.tiles.max_tasks_per_rank);
        // The full split (every expert at capacity as far as the pair capacity goes) too.
        for list in &mut counts {
            let mut left = p.pair_capacity;
            for v in list.iter_mut() {
                *v = p.capacity.min(left);
                left -= *v;
            }
        }
        prop_assert!(tasks_for(&p, &counts, &rows) <= p.tiles.max_tasks_per_rank);
    }
}
