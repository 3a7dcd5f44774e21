//! Sizing of the cooperative grid from the occupancy query (pure, tested on the CPU).
//!
//! A cooperative launch fails unless every block can be resident at once, and the
//! persistent kernel hangs (until its watchdog fires) if a rank group has too few blocks
//! to play all of its roles. Both are refused here, before anything is launched, with an
//! [`Error::InvalidConfig`] that names the limit.

use crate::error::{Error, Result};

/// The shape of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridShape {
    /// Block groups (ranks) in the launch.
    pub ranks: u32,
    /// Blocks of each rank group.
    pub blocks_per_rank: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory per block, bytes.
    pub smem_bytes: u32,
}

impl GridShape {
    /// `gridDim.x`: `ranks * blocks_per_rank`.
    pub fn blocks(&self) -> u32 {
        self.ranks * self.blocks_per_rank
    }
}

/// What the device and the kernel allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// Blocks of this kernel one SM holds at once (`cuOccupancyMaxActiveBlocksPerMultiprocessor`).
    pub blocks_per_sm: usize,
    /// Streaming multiprocessors of the device.
    pub sms: usize,
    /// Fewest blocks a rank group needs (the kernel's `FM_MIN_BLOCKS_PER_RANK`).
    pub min_blocks_per_rank: usize,
}

impl Residency {
    /// Blocks that can be co-resident on the whole device.
    pub fn capacity(&self) -> usize {
        self.blocks_per_sm.saturating_mul(self.sms)
    }
}

/// Blocks per SM the kernel is built for (`__launch_bounds__(FM_BLOCK_THREADS, 2)`).
pub const BLOCKS_PER_SM: u32 = 2;

/// The shared-memory carveout to ask for (`CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT`,
/// percent of the SM's `sm_shared` bytes): the least that holds `blocks` blocks of `smem`
/// dynamic bytes and `reserved` driver bytes each, so that the rest stays L1 (bf16/f16 with
/// the wide tile's arena: 96%, which the driver rounds up to its 228 KiB configuration on
/// Hopper; f32: 46%). 100 when the SM's size is unknown (0).
pub fn carveout_percent(smem: u32, reserved: u32, blocks: u32, sm_shared: u32) -> i32 {
    if sm_shared == 0 {
        return 100;
    }
    let need = u64::from(blocks) * (u64::from(smem) + u64::from(reserved));
    (need * 100).div_ceil(u64::from(sm_shared)).min(100) as i32
}

/// Blocks per rank group: `requested` if given (checked), else every co-resident block
/// shared evenly among the `ranks` groups.
pub fn blocks_per_rank(res: Residency, ranks: usize, requested: Option<usize>) -> Result<usize> {
    let cap = res.capacity();
    if cap == 0 {
        return Err(Error::config(
            "kernel occupancy",
            "0 blocks per SM",
            "the kernel's threads, registers and shared memory must fit on one SM",
        ));
    }
    let ranks = ranks.max(1);
    let bpr = match requested {
        Some(req) => {
            let total = req.saturating_mul(ranks);
            if total > cap {
                return Err(Error::config(
                    "GpuOptions::blocks_per_rank",
                    req,
                    format!(
                        "{ranks} rank groups x {req} blocks = {total} blocks cannot be co-resident: \
                         the device holds {cap} ({} per SM x {} SMs)",
                        res.blocks_per_sm, res.sms
                    ),
                ));
            }
            req
        }
        None => cap / ranks,
    };
    if bpr < res.min_blocks_per_rank {
        let field = if requested.is_some() {
            "GpuOptions::blocks_per_rank"
        } else {
            "world"
        };
        let value = if requested.is_some() { bpr } else { ranks };
        return Err(Error::config(
            field,
            value,
            format!(
                "each rank group needs at least {} blocks; {cap} co-resident blocks over {ranks} \
                 rank groups give {}",
                res.min_blocks_per_rank,
                cap / ranks
            ),
        ));
    }
    Ok(bpr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: Residency = Residency {
        blocks_per_sm: 1,
        sms: 132,
        min_blocks_per_rank: 4,
    };

    #[test]
    fn default_fills_the_device_evenly() {
        assert_eq!(blocks_per_rank(H100, 1, None).unwrap(), 132);
        assert_eq!(blocks_per_rank(H100, 8, None).unwrap(), 16);
        let two = Residency {
            blocks_per_sm: 2,
            ..H100
        };
        assert_eq!(blocks_per_rank(two, 3, None).unwrap(), 88);
    }

    #[test]
    fn request_that_fits_is_kept() {
        assert_eq!(blocks_per_rank(H100, 4, Some(33)).unwrap(), 33);
    }

    #[test]
    fn request_past_residency_is_refused_with_the_limit() {
        let e = blocks_per_rank(H100, 4, Some(34)).unwrap_err();
        match e {
            Error::InvalidConfig { field, limit, .. } => {
                assert_eq!(field, "GpuOptions::blocks_per_rank");
                assert!(limit.contains("136"), "{limit}");
                assert!(limit.contains("132"), "{limit}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(blocks_per_rank(H100, 2, Some(usize::MAX)).is_err());
    }

    #[test]
    fn too_few_blocks_per_rank_is_refused() {
        let small = Residency {
            blocks_per_sm: 1,
            sms: 20,
            min_blocks_per_rank: 4,
        };
        match blocks_per_rank(small, 8, None).unwrap_err() {
            Error::InvalidConfig { field, value, .. } => {
                assert_eq!(field, "world");
                assert_eq!(value, "8");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(blocks_per_rank(H100, 1, Some(3)).is_err());
        assert_eq!(blocks_per_rank(small, 5, None).unwrap(), 4);
    }

    #[test]
    fn zero_occupancy_is_refused() {
        let none = Residency {
            blocks_per_sm: 0,
            ..H100
        };
        assert!(matches!(
            blocks_per_rank(none, 1, None),
            Err(Error::InvalidConfig {
                field: "kernel occupancy",
                ..
            })
        ));
    }

    #[test]
    fn shape_counts_blocks() {
        let s = GridShape {
            ranks: 4,
            blocks_per_rank: 33,
            threads: 256,
            smem_bytes: 0,
        };
        assert_eq!(s.blocks(), 132);
    }

    #[test]
    fn carveout_holds_two_blocks_and_leaves_the_rest_to_l1() {
        // H200: 228 KiB per SM, 1 KiB reserved per block.
        let sm = 228 * 1024;
        assert_eq!(carveout_percent(110_848, 1024, 2, sm), 96);
        assert_eq!(carveout_percent(52_480, 1024, 2, sm), 46);
        // The percentage always covers the need, and never exceeds 100.
        for smem in [0u32, 1, 48 * 1024, 83_200, 110_848, 200_000] {
            let p = carveout_percent(smem, 1024, 2, sm) as u64;
            assert!(p <= 100);
            assert!(p == 100 || p * u64::from(sm) >= 2 * (u64::from(smem) + 1024) * 100);
        }
        assert_eq!(carveout_percent(1, 0, 1, 0), 100);
    }
}
