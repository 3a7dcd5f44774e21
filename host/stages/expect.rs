//! What the checks read from a capture (dtype values and signal words at plan offsets) and
//! the per-source list of kept (token, choice) pairs that says where every row must be.

use crate::config::Dtype;
use crate::gpu::layer::from_dtype_bytes;
use crate::reference::GateOutput;

/// Near-tie margin of the gate check, in score units (softmax probabilities, or
/// `sigmoid(logit) + bias`): a choice that differs from the reference's is a near-tie, not
/// an error, when the two experts' reference scores are at most this far apart. Scores
/// computed in f32 from dtype values (what a device does) are off by about 1e-6 for hidden
/// sizes up to 8192; 1e-4 leaves room, and random weights give ties this close for about
/// one token in ten thousand.
pub const TIE_MARGIN: f64 = 1e-4;

/// Relative tolerance of the routing weights (f32 softmax or sigmoid on the device against
/// the f64 reference).
pub const WEIGHT_TOLERANCE: f64 = 1e-4;

/// `n` values of `dtype` at byte `offset` of `bytes`, widened to f32; `None` when they are
/// not all inside.
pub fn values(dtype: Dtype, bytes: &[u8], offset: u64, n: usize) -> Option<Vec<f32>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(n.checked_mul(dtype.size())?)?;
    Some(from_dtype_bytes(dtype, bytes.get(start..end)?))
}

/// The u64 word at byte `offset` of `bytes`, if inside.
pub fn word(bytes: &[u8], offset: u64) -> Option<u64> {
    let start = usize::try_from(offset).ok()?;
    let raw = bytes.get(start..start.checked_add(8)?)?;
    let mut w = [0u8; 8];
    w.copy_from_slice(raw);
    Some(u64::from_le_bytes(w))
}

/// The little-endian u32 at byte `offset` (4-aligned) of `bytes`, if inside.
pub fn u32_at(bytes: &[u8], offset: u64) -> Option<u32> {
    let w = word(bytes, offset & !7)?;
    Some((w >> (8 * (offset & 4))) as u32)
}

/// The signal word a stage must leave: `(epoch << 32) | rows` (low 32 bits of the epoch).
pub fn signal(epoch: u64, rows: usize) -> u64 {
    ((epoch & 0xFFFF_FFFF) << 32) | rows as u64
}

/// One kept (token, choice) pair of a source rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    /// Token of the source.
    pub token: usize,
    /// Choice index (0..k).
    pub choice: usize,
    /// Global expert.
    pub expert: usize,
    /// Position among the expert's pairs from this source.
    pub slot: usize,
    /// Routing weight of the choice.
    pub weight: f32,
}

/// The kept pairs of one source's routing (`slots` decide what is kept), in token then
/// choice order. Ids past `experts` are skipped (the gate check reports them).
pub fn kept_pairs(g: &GateOutput, k: usize, experts: usize) -> Vec<Pair> {
    g.ids
        .iter()
        .zip(&g.slots)
        .enumerate()
        .filter_map(|(i, (&e, &slot))| {
            let expert = e as usize;
            (slot >= 0 && expert < experts).then_some(Pair {
                token: i / k.max(1),
                choice: i % k.max(1),
                expert,
                slot: slot as usize,
                weight: g.weights.get(i).copied().unwrap_or(f32::NAN),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_decode_every_dtype_and_refuse_outside() {
        let b: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(values(Dtype::F32, &b, 0, 2), Some(vec![1.5, -2.0]));
        assert_eq!(values(Dtype::F32, &b, 4, 2), None);
        let h: Vec<u8> = [half::bf16::from_f32(0.75).to_bits()]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(values(Dtype::Bf16, &h, 0, 1), Some(vec![0.75]));
        assert_eq!(
            word(&b, 0),
            Some(u64::from_le_bytes(b[..8].try_into().unwrap()))
        );
        assert_eq!(word(&b, 1), None);
        assert_eq!(u32_at(&b, 4), Some((-2.0f32).to_bits()));
        assert_eq!(u32_at(&b, 8), None);
        assert_eq!(signal(0x1_0000_0003, 5), (3 << 32) | 5);
    }

    #[test]
    fn kept_pairs_follow_slots() {
        let g = GateOutput {
            ids: vec![1, 0, 1, 2],
            weights: vec![0.5; 4],
            slots: vec![0, 0, -1, 0],
            expert_counts: vec![1, 2, 1],
            dropped: 1,
        };
        let p = kept_pairs(&g, 2, 3);
        assert_eq!(p.len(), 3);
        assert_eq!((p[2].token, p[2].choice, p[2].expert), (1, 1, 2));
    }
}
