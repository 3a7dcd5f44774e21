//! The kernel's tile rule (`kernel/include/flashmoe/tile_rule.cuh`, evaluated per task on
//! the device) equals the plan's (`flashmoe::plan::tile_for`, which the CPU executor and the
//! stage checks follow) for every mode, dtype and row count of a block: the header is
//! compiled on the host with the C++ compiler (`CXX`, default `c++`), its device qualifiers
//! defined away, and its answers compared with the Rust rule's.

mod host_cc;

use flashmoe::params::dtype_code;
use flashmoe::plan::{tile_for, TileMode, TileShape, TILE_M};
use flashmoe::Dtype;

/// `mode dtype rows kind tokens` lines from the compiled header.
fn kernel_rule() -> Vec<(u32, u32, usize, u32, usize)> {
    let prog = format!(
        "#include <cstdio>\n#include <cstdint>\n#include <initializer_list>\n\
         #define __device__\n#define __forceinline__ inline\n\
         #include \"flashmoe/tile_rule.cuh\"\n\
         template <uint32_t D> void all(uint32_t mode) {{\n\
           FmLayerParams L{{}};\n  L.tile_mode = mode;\n\
           for (uint32_t rows = 1; rows <= {TILE_M}; ++rows) {{\n\
             fm::TileChoice c = fm::tile_for<D>(L, rows);\n\
             std::printf(\"%u %u %u %u %u\\n\", mode, D, rows, c.kind, c.tokens);\n\
           }}\n}}\n\
         int main() {{\n\
           for (uint32_t mode : {{FM_TILES_AUTO, FM_TILES_CLASSIC}}) {{\n\
             all<FM_DTYPE_BF16>(mode); all<FM_DTYPE_F16>(mode); all<FM_DTYPE_F32>(mode);\n\
           }}\n  return 0;\n}}\n"
    );
    host_cc::build_and_run(host_cc::Lang::Cxx, &prog)
        .lines()
        .map(|l| {
            let w: Vec<u64> = l.split(' ').map(|v| v.parse().unwrap()).collect();
            (
                w[0] as u32,
                w[1] as u32,
                w[2] as usize,
                w[3] as u32,
                w[4] as usize,
            )
        })
        .collect()
}

/// The kernel's `TileKind` and decode N of a Rust shape.
fn kind(shape: TileShape) -> (u32, usize) {
    match shape {
        TileShape::Classic => (0, 0),
        TileShape::Decode { tokens } => (1, tokens),
        TileShape::Prefill => (2, 0),
    }
}

#[test]
fn the_kernels_tile_rule_is_the_plans() {
    let got = kernel_rule();
    assert_eq!(
        got.len(),
        2 * 3 * TILE_M,
        "one line per mode, dtype and row count"
    );
    let mut shapes = std::collections::BTreeSet::new();
    for (mode, dtype, rows, k, tokens) in got {
        let m = [TileMode::Auto, TileMode::Classic]
            .into_iter()
            .find(|m| m.code() == mode)
            .expect("a known mode");
        let d = [Dtype::Bf16, Dtype::F16, Dtype::F32]
            .into_iter()
            .find(|d| dtype_code(*d) == dtype)
            .expect("a known dtype");
        let want = kind(tile_for(m, d, rows));
        assert_eq!(
            (k, tokens),
            want,
            "mode {m:?} dtype {d:?} rows {rows}: kernel (kind, tokens) vs plan"
        );
        shapes.insert(k);
    }
    // The comparison covers every kind of tile.
    assert_eq!(shapes.len(), 3, "{shapes:?}");
}
