//! Stage checks: run the layer up to one stage, read back what that stage wrote, and compare
//! it with what the CPU side says it must be, naming the first wrong value.
//!
//! A backend (the GPU kernel through `stop_after` in its parameters, or the CPU executor,
//! which follows the same plan and protocol) implements [`StageRunner`]: it runs a launch
//! that stops cleanly after a [`Stage`] and returns a [`Capture`] of every rank's state in
//! the plan's layout (routing, symmetric heap, GEMM0 activations, output). [`check`] compares
//! a capture with expectations computed here from the definitions:
//!
//! | stage | read back | expected from |
//! |---|---|---|
//! | gate | ids, weights, expert counts | the f64 reference router (near-ties counted, not failed) |
//! | dispatch | slots, rank slots, drops, token rows, metadata, dispatch signals | slots by running count over the backend's own ids; each token row, bit-exact, once per destination rank; every pair and metadata entry where the plan puts it |
//! | gemm0 | activations of every received pair | the reference expert activation (f64) of that pair's row |
//! | gemm1 | expert outputs of every pair | the reference expert MLP (f64) of that pair's row |
//! | combine | the output rows | the reference combine of the backend's routing |
//!
//! Later stages use the backend's own routing (checked at the gate stage) so that a near-tie
//! decided the other way does not show up as a wrong row downstream. [`run`] checks the
//! stages in order and stops at the first that fails, reporting every stage before it.

mod check;
mod expect;
mod plant;
mod report;
#[cfg(test)]
mod tests;

pub use check::check;
pub use expect::TIE_MARGIN;
pub use plant::{plant, Planted, PlantingRunner};
pub use report::{Mismatch, StageReport};

use crate::error::Result;
use crate::plan::LayerPlan;
use crate::reference::{GateOutput, RankInput, RouteOverrides};
use crate::weights::LayerWeights;

/// A stage of the layer after which a launch can stop (`FM_STOP_*` in params.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Router: ids, weights, expert counts.
    Gate,
    /// Slots, drops, token rows in the owners' receive cells, dispatch signals.
    Dispatch,
    /// The expert GEMM0 and its activation, for every received row.
    Gemm0,
    /// The expert GEMM1: every pair's expert output in the owner's scratch.
    Gemm1,
    /// The weighted sum into the output rows (the whole layer).
    Combine,
}

impl Stage {
    /// Every stage, in launch order.
    pub const ALL: [Stage; 5] = [
        Stage::Gate,
        Stage::Dispatch,
        Stage::Gemm0,
        Stage::Gemm1,
        Stage::Combine,
    ];

    /// The `stop_after` code of the kernel parameters (`FM_STOP_GATE` ... `FM_STOP_COMBINE`).
    pub fn code(self) -> u32 {
        match self {
            Stage::Gate => 1,
            Stage::Dispatch => 2,
            Stage::Gemm0 => 3,
            Stage::Gemm1 => 4,
            Stage::Combine => 5,
        }
    }

    /// Lower-case name, as the bench's `--stage` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Gate => "gate",
            Stage::Dispatch => "dispatch",
            Stage::Gemm0 => "gemm0",
            Stage::Gemm1 => "gemm1",
            Stage::Combine => "combine",
        }
    }

    /// The stage of a name given by [`Stage::name`].
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one rank's stages wrote, read back after a launch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankCapture {
    /// The routing as the backend stored it: ids and weights (`tokens * k`), expert counts;
    /// slots and `dropped` from the dispatch stage on.
    pub gate: GateOutput,
    /// The rank's whole symmetric heap, laid out as `plan.heap` says.
    pub heap: Vec<u8>,
    /// The GEMM0 activations, laid out as the scratch's activation region
    /// (`[source][pair][intermediate]` in the dtype, strides from
    /// `plan.workspace.act_stride_*`), from the region's first byte; empty before GEMM0.
    pub act: Vec<u8>,
    /// The GEMM1 expert outputs, laid out as the scratch's output region
    /// (`[source][pair][hidden]` in the dtype, strides from `plan.workspace.y_stride_*`),
    /// from the region's first byte; empty before GEMM1.
    pub y: Vec<u8>,
    /// The output rows, `tokens * hidden` (empty before combine).
    pub out: Vec<f32>,
}

/// Every rank's state after a launch that stopped after `stage`.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    /// The stage the launch stopped after.
    pub stage: Stage,
    /// The launch's epoch: signal words carry its low 32 bits.
    pub epoch: u64,
    /// Per world rank.
    pub ranks: Vec<RankCapture>,
}

/// A backend that can stop a launch after a stage and read back what it wrote.
pub trait StageRunner {
    /// Runs one launch over `inputs` (one per rank) that stops after `stage`, and returns
    /// every rank's state.
    fn run_stage(
        &mut self,
        stage: Stage,
        inputs: &[RankInput],
        ov: &RouteOverrides,
    ) -> Result<Capture>;
}

/// What the checks need besides the capture.
#[derive(Debug, Clone, Copy)]
pub struct Case<'a> {
    /// The plan the backend runs.
    pub plan: &'a LayerPlan,
    /// The weights, as representable in the dtype (as [`LayerWeights::random`] makes them).
    pub weights: &'a LayerWeights,
    /// The inputs of every rank, in the dtype.
    pub inputs: &'a [RankInput<'a>],
    /// The call's overrides.
    pub ov: &'a RouteOverrides,
}

/// Runs and checks every stage in order on `runner`, stopping at the first failure (or
/// backend error): the reports of every stage run, the failing one last. A backend error
/// is returned as is, with the reports so far.
pub fn run(
    runner: &mut dyn StageRunner,
    case: &Case,
) -> (Vec<StageReport>, Option<crate::error::Error>) {
    run_stages(runner, case, &Stage::ALL)
}

/// [`run`] over the given stages only, in the order given.
pub fn run_stages(
    runner: &mut dyn StageRunner,
    case: &Case,
    stages: &[Stage],
) -> (Vec<StageReport>, Option<crate::error::Error>) {
    let mut reports = Vec::new();
    for &stage in stages {
        let report = runner
            .run_stage(stage, case.inputs, case.ov)
            .and_then(|cap| check(case, &cap));
        match report {
            Ok(r) => {
                let failed = !r.passed();
                reports.push(r);
                if failed {
                    break;
                }
            }
            Err(e) => return (reports, Some(e)),
        }
    }
    (reports, None)
}
