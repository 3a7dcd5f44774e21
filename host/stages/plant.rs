//! Planted errors: a [`StageRunner`] wrapper that corrupts one value of one stage's
//! capture, so that the harness can be shown to find and name a wrong value (CI runs it
//! against the CPU executor; `flashmoe-bench stages --plant STAGE` does it on any backend).

use super::expect::{kept_pairs, values};
use super::{Capture, Stage, StageRunner};
use crate::config::Dtype;
use crate::error::{Error, Result};
use crate::gpu::layer::to_dtype_bytes;
use crate::plan::{LayerPlan, CELL_RECV};
use crate::reference::{RankInput, RouteOverrides};

/// Where a planted error was put: the fields a [`super::Mismatch`] must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planted {
    /// The stage whose capture was changed.
    pub stage: Stage,
    /// The rank whose memory holds the changed value.
    pub rank: usize,
    /// The expert it belongs to (none for an output value).
    pub expert: Option<usize>,
    /// Its row (token or slot, as the stage's check counts them).
    pub row: usize,
    /// Its column.
    pub column: usize,
}

/// Runs `inner` and corrupts one value of the capture of `stage` (the first kept pair of
/// the last rank, column 3 of rows): see [`plant`].
pub struct PlantingRunner<'a> {
    /// The backend.
    pub inner: &'a mut dyn StageRunner,
    /// The plan it runs.
    pub plan: &'a LayerPlan,
    /// The stage to corrupt.
    pub stage: Stage,
    /// Where the error went, once planted.
    pub planted: Option<Planted>,
}

impl StageRunner for PlantingRunner<'_> {
    fn run_stage(
        &mut self,
        stage: Stage,
        inputs: &[RankInput],
        ov: &RouteOverrides,
    ) -> Result<Capture> {
        let mut cap = self.inner.run_stage(stage, inputs, ov)?;
        if stage == self.stage {
            let k = ov.effective_top_k(&self.plan.config)?;
            self.planted = Some(plant(self.plan, k, &mut cap)?);
        }
        Ok(cap)
    }
}

/// Adds 1 to the value at byte `offset` (one element of `dtype`); false if outside.
fn bump(dtype: Dtype, bytes: &mut [u8], offset: u64) -> bool {
    let Some(v) = values(dtype, bytes, offset, 1).and_then(|v| v.first().copied()) else {
        return false;
    };
    let enc = to_dtype_bytes(dtype, &[(v.abs() + 1.0) * 2.0]);
    let Ok(start) = usize::try_from(offset) else {
        return false;
    };
    match bytes.get_mut(start..start + enc.len()) {
        Some(dst) => {
            dst.copy_from_slice(&enc);
            true
        }
        None => false,
    }
}

/// Corrupts one value of `cap` (routing with effective top-k `k`): an expert id (gate),
/// an element of a token row on its owner (dispatch), of an activation row (GEMM0), of an
/// expert output (GEMM1) or of an output row (combine), of the last rank's first kept pair.
pub fn plant(plan: &LayerPlan, k: usize, cap: &mut Capture) -> Result<Planted> {
    let cfg = &plan.config;
    let s = cfg.world - 1;
    let none = || Error::input("plant", format!("rank {s} has no kept pair to corrupt"));
    let src = cap.ranks.get(s).ok_or_else(none)?;
    let p = *kept_pairs(&src.gate, k, cfg.experts)
        .first()
        .ok_or_else(none)?;
    let route = plan.route(&src.gate.ids, &src.gate.slots, k);
    let i = p.token * k + p.choice;
    let (pair, slot) = (route.pairs[i], route.rank_slots[i] as usize);
    let q = plan.owner_rank(p.expert as u32);
    let ws = &plan.workspace;
    let col = 3;
    let es = cfg.dtype.size() as u64;
    let (rank, expert, row, done) = match cap.stage {
        Stage::Gate => {
            let i = p.token * k + p.choice;
            let g = &mut cap.ranks[s].gate;
            let chosen = &g.ids[p.token * k..(p.token + 1) * k];
            let wrong = (1..cfg.experts as u32)
                .map(|d| (g.ids[i] + d) % cfg.experts as u32)
                .find(|e| !chosen.contains(e));
            if let Some(e) = wrong {
                // Counts stay consistent with the ids, as a backend would store them.
                let old = g.ids[i] as usize;
                g.ids[i] = e;
                if let Some(c) = g.expert_counts.get_mut(old) {
                    *c = c.saturating_sub(1);
                }
                if let Some(c) = g.expert_counts.get_mut(e as usize) {
                    *c += 1;
                }
            }
            // The report names the expected expert, at the token and choice.
            return match wrong {
                Some(_) => Ok(Planted {
                    stage: Stage::Gate,
                    rank: s,
                    expert: Some(p.expert),
                    row: p.token,
                    column: p.choice,
                }),
                None => Err(Error::input("plant", "every expert is chosen: no wrong id")),
            };
        }
        Stage::Dispatch => {
            let off = plan.heap.dispatch_row(CELL_RECV, s, slot) + col * es;
            (q, None, slot, bump(cfg.dtype, &mut cap.ranks[q].heap, off))
        }
        Stage::Gemm0 => {
            let off =
                s as u64 * ws.act_stride_source + u64::from(pair) * ws.act_stride_row + col * es;
            let hit = bump(cfg.dtype, &mut cap.ranks[q].act, off);
            (q, Some(p.expert), pair as usize, hit)
        }
        Stage::Gemm1 => {
            let off = s as u64 * ws.y_stride_source + u64::from(pair) * ws.y_stride_row + col * es;
            let hit = bump(cfg.dtype, &mut cap.ranks[q].y, off);
            (q, Some(p.expert), pair as usize, hit)
        }
        Stage::Combine => {
            let i = p.token * cfg.hidden + col as usize;
            let out = &mut cap.ranks[s].out;
            let hit = out.get_mut(i).map(|v| *v = (v.abs() + 1.0) * 2.0).is_some();
            (s, None, p.token, hit)
        }
    };
    if !done {
        return Err(Error::input(
            "plant",
            "the value to corrupt is outside the capture",
        ));
    }
    Ok(Planted {
        stage: cap.stage,
        rank,
        expert,
        row,
        column: col as usize,
    })
}
