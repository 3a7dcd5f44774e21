//! The kernel's tile rule (`kernel/include/flashmoe/tile_rule.cuh`, evaluated per task on
//! the device) equals the plan's (`flashmoe::plan::task_rows` and `tile_for`, which the CPU
//! executor and the stage checks follow) for every mode, dtype, pair list length and row
//! count of a task: the header is compiled on the host with the C++ compiler (`CXX`,
//! default `c++`), its device qualifiers defined away, and its answers compared with the
//! Rust rule's.

mod host_cc;

use flashmoe::params::dtype_code;
use flashmoe::plan::{task_rows, tile_for, TileMode, TileShape, TILE_M, WIDE_ROWS};
use flashmoe::Dtype;

/// Pair list lengths the `task_rows` comparison covers (`1..=COUNTS`).
const COUNTS: usize = 300;

/// What the compiled header prints: `T mode dtype rows kind tokens` lines (tile_for) and
/// `R mode dtype count rb rows` lines (task_rows).
struct KernelRule {
    tiles: Vec<(u32, u32, usize, u32, usize)>,
    tasks: Vec<(u32, u32, usize, usize, usize)>,
}

fn kernel_rule() -> KernelRule {
    let prog = format!(
        "#include <cstdio>\n#include <cstdint>\n#include <initializer_list>\n\
         #define __device__\n#define __forceinline__ inline\n\
         #include \"flashmoe/tile_rule.cuh\"\n\
         template <uint32_t D> void all(uint32_t mode) {{\n\
           FmLayerParams L{{}};\n  L.tile_mode = mode;\n\
           for (uint32_t rows = 1; rows <= {WIDE_ROWS}; ++rows) {{\n\
             fm::TileChoice c = fm::tile_for<D>(L, rows);\n\
             std::printf(\"T %u %u %u %u %u\\n\", mode, D, rows, c.kind, c.tokens);\n\
           }}\n\
           for (uint32_t count = 1; count <= {COUNTS}; ++count) {{\n\
             for (uint32_t rb = 0; rb * {TILE_M} < count; ++rb) {{\n\
               std::printf(\"R %u %u %u %u %u\\n\", mode, D, count, rb,\n\
                           fm::task_rows<D>(L, count, rb));\n\
             }}\n\
           }}\n}}\n\
         int main() {{\n\
           for (uint32_t mode : {{FM_TILES_AUTO, FM_TILES_CLASSIC, FM_TILES_NARROW, FM_TILES_AUTO_SERIAL}}) {{\n\
             all<FM_DTYPE_BF16>(mode); all<FM_DTYPE_F16>(mode); all<FM_DTYPE_F32>(mode);\n\
           }}\n  return 0;\n}}\n"
    );
    let out = host_cc::build_and_run(host_cc::Lang::Cxx, &prog);
    let mut rule = KernelRule {
        tiles: Vec::new(),
        tasks: Vec::new(),
    };
    for l in out.lines() {
        let (tag, rest) = l.split_once(' ').expect("a tagged line");
        let w: Vec<u64> = rest.split(' ').map(|v| v.parse().unwrap()).collect();
        let (mode, dtype) = (w[0] as u32, w[1] as u32);
        match tag {
            "T" => rule
                .tiles
                .push((mode, dtype, w[2] as usize, w[3] as u32, w[4] as usize)),
            "R" => rule
                .tasks
                .push((mode, dtype, w[2] as usize, w[3] as usize, w[4] as usize)),
            _ => panic!("unknown line {l}"),
        }
    }
    rule
}

/// The kernel's `TileKind` and decode N of a Rust shape.
fn kind(shape: TileShape) -> (u32, usize) {
    match shape {
        TileShape::Classic => (0, 0),
        TileShape::Decode { tokens } => (1, tokens),
        TileShape::Prefill => (2, 0),
        TileShape::Wide => (3, 0),
    }
}

fn mode_of(code: u32) -> TileMode {
    TileMode::ALL
        .into_iter()
        .find(|m| m.code() == code)
        .expect("a known mode")
}

fn dtype_of(code: u32) -> Dtype {
    [Dtype::Bf16, Dtype::F16, Dtype::F32]
        .into_iter()
        .find(|d| dtype_code(*d) == code)
        .expect("a known dtype")
}

#[test]
fn the_kernels_tile_rule_is_the_plans() {
    let rule = kernel_rule();
    let modes = TileMode::ALL.len();
    assert_eq!(modes, 4, "auto, classic, narrow and auto-serial");
    assert_eq!(
        rule.tiles.len(),
        modes * 3 * WIDE_ROWS,
        "one tile_for line per mode, dtype and row count"
    );
    let mut shapes = std::collections::BTreeSet::new();
    for (mode, dtype, rows, k, tokens) in rule.tiles {
        let (m, d) = (mode_of(mode), dtype_of(dtype));
        let want = kind(tile_for(m, d, rows));
        assert_eq!(
            (k, tokens),
            want,
            "mode {m:?} dtype {d:?} rows {rows}: kernel (kind, tokens) vs plan"
        );
        shapes.insert(k);
    }
    // The comparison covers every kind of tile.
    assert_eq!(shapes.len(), 4, "{shapes:?}");

    let blocks: usize = (1..=COUNTS).map(|c| c.div_ceil(TILE_M)).sum();
    assert_eq!(
        rule.tasks.len(),
        modes * 3 * blocks,
        "one task_rows line per mode, dtype, count and row block"
    );
    let mut shapes = std::collections::BTreeSet::new();
    let mut tails = 0;
    for (mode, dtype, count, rb, rows) in rule.tasks {
        let (m, d) = (mode_of(mode), dtype_of(dtype));
        assert_eq!(
            rows,
            task_rows(m, d, count, rb),
            "mode {m:?} dtype {d:?} count {count} block {rb}: kernel rows vs plan"
        );
        if rows == 0 {
            tails += 1;
        } else {
            shapes.insert(kind(tile_for(m, d, rows)).0);
        }
    }
    // The tasks reach every kind of tile, and some blocks are tails of wide tasks.
    assert_eq!(shapes.len(), 4, "{shapes:?}");
    assert!(tails > 0, "no wide task");
}
