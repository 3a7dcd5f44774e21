//! The outcome of one stage check: pass, or the first mismatch and how many there were.

use super::Stage;
use crate::plan::TileCensus;

/// One value that differs from what the CPU side says it must be.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// The rank whose memory holds the value.
    pub rank: usize,
    /// The (global) expert the value belongs to, where it belongs to one.
    pub expert: Option<usize>,
    /// Row: the token (gate, combine) or the slot in the expert's receive or combine cell.
    pub row: usize,
    /// Column: the choice (gate), the element of the row, or 0 for a signal word.
    pub column: usize,
    /// What the value is (`"id"`, `"receive row of source rank 1, token 7"`, ...).
    pub what: String,
    /// The value expected.
    pub expected: f64,
    /// The value found.
    pub got: f64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {}", self.rank)?;
        if let Some(e) = self.expert {
            write!(f, " expert {e}")?;
        }
        write!(
            f,
            " row {} column {} ({}): expected {}, got {}",
            self.row, self.column, self.what, self.expected, self.got
        )
    }
}

/// The outcome of the check of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    /// The stage.
    pub stage: Stage,
    /// Values compared.
    pub checked: u64,
    /// Values that differ (beyond the tolerance for computed values).
    pub mismatches: u64,
    /// The first of them, in (rank, expert or token, row, column) order of the check.
    pub first: Option<Mismatch>,
    /// Router choices that differ from the reference only by a near-tie (gate stage):
    /// counted, not failed.
    pub near_ties: u64,
    /// The largest error of computed values, relative to their row's largest magnitude.
    pub max_error: f64,
    /// The tolerance of that error (0 for stages compared bit for bit).
    pub tolerance: f64,
    /// The GEMM stages: the routed tasks per tile shape of the tile rule (which tile
    /// paths the checked values came from).
    pub tiles: Option<TileCensus>,
}

impl StageReport {
    /// An empty report of `stage`.
    pub fn new(stage: Stage, tolerance: f64) -> Self {
        StageReport {
            stage,
            checked: 0,
            mismatches: 0,
            first: None,
            near_ties: 0,
            max_error: 0.0,
            tolerance,
            tiles: None,
        }
    }

    /// True when nothing differed and something was checked.
    pub fn passed(&self) -> bool {
        self.mismatches == 0 && self.checked > 0
    }

    /// Counts one value compared.
    pub(super) fn ok(&mut self) {
        self.checked += 1;
    }

    /// Counts one wrong value, keeping the first.
    pub(super) fn wrong(&mut self, m: impl FnOnce() -> Mismatch) {
        self.checked += 1;
        self.mismatches += 1;
        if self.first.is_none() {
            self.first = Some(m());
        }
    }

    /// Counts one comparison `got == expected` of values compared bit for bit.
    pub(super) fn exact(&mut self, equal: bool, m: impl FnOnce() -> Mismatch) {
        if equal {
            self.ok();
        } else {
            self.wrong(m);
        }
    }

    /// Compares a computed row with its expected values: an element is wrong when
    /// `|got - want| > tolerance * max |want|` of the row (or not finite). `m(column, want,
    /// got)` names a wrong element.
    pub(super) fn row(
        &mut self,
        got: &[f32],
        want: &[f64],
        m: impl Fn(usize, f64, f64) -> Mismatch,
    ) {
        let scale = want
            .iter()
            .fold(0f64, |s, v| s.max(v.abs()))
            .max(f64::MIN_POSITIVE);
        for (c, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(g) - w).abs() / scale;
            if g.is_finite() && err <= self.tolerance {
                self.max_error = self.max_error.max(err);
                self.ok();
            } else {
                self.max_error = self
                    .max_error
                    .max(if err.is_nan() { f64::INFINITY } else { err });
                self.wrong(|| m(c, w, f64::from(g)));
            }
        }
        for (c, &w) in want.iter().enumerate().skip(got.len()) {
            self.wrong(|| m(c, w, f64::NAN));
        }
    }
}

impl std::fmt::Display for StageReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.stage.name();
        if self.checked == 0 {
            return write!(f, "{name}: FAIL (nothing was checked)");
        }
        let mut details = vec![if self.tolerance > 0.0 {
            format!(
                "max error {:.2e} of tolerance {:.0e}",
                self.max_error, self.tolerance
            )
        } else {
            "bit-exact".to_string()
        }];
        if self.near_ties > 0 {
            details.push(format!("{} near-tie choices", self.near_ties));
        }
        if let Some(t) = &self.tiles {
            details.push(t.to_string());
        }
        if self.passed() {
            return write!(
                f,
                "{name}: pass ({} values, {})",
                self.checked,
                details.join(", ")
            );
        }
        write!(
            f,
            "{name}: FAIL {} of {} values wrong ({})",
            self.mismatches,
            self.checked,
            details.join(", ")
        )?;
        if let Some(m) = &self.first {
            write!(f, "; first: {m}")?;
        }
        Ok(())
    }
}
