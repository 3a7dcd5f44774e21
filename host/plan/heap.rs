//! Byte layout of the symmetric heap: rank-level dispatch (one row per token and
//! destination rank) and one pre-reduced partial per token and owner on the way back.
//!
//! ```text
//! rows     dispatch [cell][source < world][slot < tokens_max][hidden]   dtype
//!          combine  [cell][owner  < world][slot < tokens_max][hidden]   dtype
//! meta     [cell][source < world] {
//!            counts   u32 [max_local]               pairs per local expert
//!            pairs    u32 [pair_capacity]           slot of each pair, by (local expert, token)
//!            row_meta u64 [tokens_max][route_slots] (f32 weight bits << 32) | pair index
//!          }
//! signals  dispatch u64 [source]   (on the owner's heap)
//!          combine  u64 [owner]    (on the source's heap)
//! ```
//!
//! Cell 0 is where peers write; cell 1 (only when the plan stages, for RDMA peers) is the
//! local copy a put is made from, indexed by the destination instead of the source. A
//! signal word is `(epoch << 32) | rows`.

/// Pair index of an unused `row_meta` entry (a token with fewer local choices than
/// `route_slots`).
pub const NO_PAIR: u32 = u32::MAX;

/// Byte layout of the symmetric heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapLayout {
    /// Bytes of one token row (`hidden` values in the dtype).
    pub stride_row: u64,
    /// Bytes of one peer's rows in a row region: `tokens_max` rows.
    pub stride_peer: u64,
    /// Bytes of one cell of a row region: `world` peers.
    pub stride_cell: u64,
    /// Cells per region (2 with RDMA staging, else 1).
    pub cells: u64,
    /// Offset of the dispatch rows.
    pub dispatch_rows: u64,
    /// Offset of the combine rows.
    pub combine_rows: u64,
    /// Offset of the dispatch metadata.
    pub meta: u64,
    /// Bytes of one source's metadata block.
    pub meta_stride_peer: u64,
    /// Bytes of one cell of metadata: `world` blocks.
    pub meta_stride_cell: u64,
    /// Offset of `counts` inside a metadata block.
    pub meta_counts: u64,
    /// Offset of `pairs` inside a metadata block.
    pub meta_pairs: u64,
    /// Offset of `row_meta` inside a metadata block.
    pub meta_rows: u64,
    /// Entries per token in `row_meta` (the most experts one token can choose on one
    /// rank: `min(top_k, max_local)`).
    pub route_slots: u64,
    /// Offset of the dispatch signal words.
    pub dispatch_signals: u64,
    /// Offset of the combine signal words.
    pub combine_signals: u64,
    /// Total bytes of the heap.
    pub bytes: u64,
}

impl HeapLayout {
    /// Offset of dispatch row `slot` of `peer` in `cell`.
    pub fn dispatch_row(&self, cell: usize, peer: usize, slot: usize) -> u64 {
        self.dispatch_rows + self.row_in(cell, peer, slot)
    }

    /// Offset of combine row `slot` of `peer` in `cell`.
    pub fn combine_row(&self, cell: usize, peer: usize, slot: usize) -> u64 {
        self.combine_rows + self.row_in(cell, peer, slot)
    }

    fn row_in(&self, cell: usize, peer: usize, slot: usize) -> u64 {
        cell as u64 * self.stride_cell
            + peer as u64 * self.stride_peer
            + slot as u64 * self.stride_row
    }

    /// Offset of `peer`'s metadata block in `cell`.
    pub fn meta_block(&self, cell: usize, peer: usize) -> u64 {
        self.meta + cell as u64 * self.meta_stride_cell + peer as u64 * self.meta_stride_peer
    }

    /// Offset of the u32 pair count of local expert `local` in `peer`'s block.
    pub fn count(&self, cell: usize, peer: usize, local: usize) -> u64 {
        self.meta_block(cell, peer) + self.meta_counts + 4 * local as u64
    }

    /// Offset of the u32 slot of pair `pair` in `peer`'s block.
    pub fn pair(&self, cell: usize, peer: usize, pair: usize) -> u64 {
        self.meta_block(cell, peer) + self.meta_pairs + 4 * pair as u64
    }

    /// Offset of the u64 entry `j` of token row `slot` in `peer`'s block.
    pub fn row_meta(&self, cell: usize, peer: usize, slot: usize, j: usize) -> u64 {
        self.meta_block(cell, peer)
            + self.meta_rows
            + 8 * (slot as u64 * self.route_slots + j as u64)
    }

    /// Offset of the dispatch signal from `source`.
    pub fn dispatch_signal(&self, source: usize) -> u64 {
        self.dispatch_signals + 8 * source as u64
    }

    /// Offset of the combine signal from `owner`.
    pub fn combine_signal(&self, owner: usize) -> u64 {
        self.combine_signals + 8 * owner as u64
    }
}

/// A `row_meta` entry: the pair index and the routing weight.
pub fn meta_entry(pair: u32, weight: f32) -> u64 {
    (u64::from(weight.to_bits()) << 32) | u64::from(pair)
}

/// The pair index and weight of a `row_meta` entry.
pub fn meta_parts(entry: u64) -> (u32, f32) {
    (entry as u32, f32::from_bits((entry >> 32) as u32))
}
