//! Where one source rank's choices go under the rank-level protocol: the row slot of each
//! token on each destination rank and the pair index of each kept choice (steps 1 and 2 of
//! the protocol in [`super`]). The CPU executor dispatches with it and the stage checks
//! recompute it from a backend's own routing.

use super::{LayerPlan, NO_PAIR};

/// One source rank's routing laid out for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankRoute {
    /// `[tokens * k]`: the token's row slot on the rank that owns the choice's expert.
    pub rank_slots: Vec<u32>,
    /// `[tokens * k]`: the choice's pair index on that rank, or [`NO_PAIR`] when dropped.
    pub pairs: Vec<u32>,
    /// `[world]`: token rows sent to each rank.
    pub rank_counts: Vec<u32>,
    /// `[world][local experts of that rank]`: kept pairs per local expert.
    pub counts: Vec<Vec<u32>>,
    /// Every token's distinct destination ranks in ascending order, each with the token's
    /// row slot there; token t's are `dests[dest_start[t]..dest_start[t + 1]]`.
    dests: Vec<(usize, u32)>,
    dest_start: Vec<usize>,
}

impl RankRoute {
    /// The distinct destination ranks of token `t` in ascending order, each with the
    /// token's row slot there (empty for a token past the routing).
    pub fn destinations(&self, t: usize) -> &[(usize, u32)] {
        match (self.dest_start.get(t), self.dest_start.get(t + 1)) {
            (Some(&a), Some(&b)) => &self.dests[a..b],
            _ => &[],
        }
    }
}

impl LayerPlan {
    /// The wire layout of a source's routing: `ids` and `slots` (`-1`: dropped) of its
    /// `tokens * k` choices, as [`crate::reference::GateOutput`] holds them.
    pub fn route(&self, ids: &[u32], slots: &[i32], k: usize) -> RankRoute {
        let world = self.world();
        let tokens = ids.len().checked_div(k).unwrap_or(0);
        let mut rank_counts = vec![0u32; world];
        let mut rank_slots = vec![0u32; ids.len()];
        let mut dests = Vec::with_capacity(ids.len());
        let mut dest_start = Vec::with_capacity(tokens + 1);
        for t in 0..tokens {
            dest_start.push(dests.len());
            for j in 0..k {
                let i = t * k + j;
                let r = self.owner_rank(ids[i]);
                // The first choice of the token on rank r takes the next row slot there;
                // later choices on r share it.
                let earlier = (0..j).find(|&j2| self.owner_rank(ids[t * k + j2]) == r);
                rank_slots[i] = match earlier {
                    Some(j2) => rank_slots[t * k + j2],
                    None => {
                        let q = rank_counts[r];
                        rank_counts[r] += 1;
                        dests.push((r, q));
                        q
                    }
                };
            }
            let first = dest_start[t];
            dests[first..].sort_unstable();
        }
        dest_start.push(dests.len());
        let mut counts: Vec<Vec<u32>> = self
            .local_experts
            .iter()
            .map(|l| vec![0u32; l.len()])
            .collect();
        for (&e, &s) in ids.iter().zip(slots) {
            if let (true, Some(o)) = (s >= 0, self.owners.get(e as usize)) {
                counts[o.rank as usize][o.local as usize] += 1;
            }
        }
        let bases: Vec<Vec<u32>> = counts
            .iter()
            .map(|c| {
                c.iter()
                    .scan(0u32, |acc, &n| {
                        let b = *acc;
                        *acc += n;
                        Some(b)
                    })
                    .collect()
            })
            .collect();
        let pairs = ids
            .iter()
            .zip(slots)
            .map(|(&e, &s)| match self.owners.get(e as usize) {
                Some(o) if s >= 0 => bases[o.rank as usize][o.local as usize] + s as u32,
                _ => NO_PAIR,
            })
            .collect();
        RankRoute {
            rank_slots,
            pairs,
            rank_counts,
            counts,
            dests,
            dest_start,
        }
    }

    /// The rank that owns expert `e` (rank 0 for an id past the experts, which only a
    /// faulty backend produces and the stage checks report on their own).
    pub fn owner_rank(&self, e: u32) -> usize {
        self.owners.get(e as usize).map_or(0, |o| o.rank as usize)
    }
}
