//! The kernel's status words (`ws_status`, 8 x u64 per rank) turned into typed errors, and
//! the per-launch statistics. Pure, tested on the CPU.
//!
//! Words: `[0]` code `FM_STATUS_*`, `[1]` stage `FM_STAGE_*`, `[2]` where, `[3]` expected,
//! `[4]` observed, `[5]` nanoseconds waited (CONTRACT.md "Kernel ABI").

use crate::error::{Error, Result};
use crate::params::{stage, status};

/// Number of u64 status words per rank.
pub const STATUS_WORDS: usize = 8;

/// What one launch reports besides its output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerStats {
    /// Dropped (token, expert) pairs, per rank.
    pub dropped: Vec<u64>,
    /// Pairs routed to each expert (kept and dropped), per rank: `[rank][expert]`.
    pub expert_counts: Vec<Vec<u32>>,
}

impl LayerStats {
    /// Dropped pairs over all ranks.
    pub fn total_dropped(&self) -> u64 {
        self.dropped.iter().sum()
    }

    /// Pairs routed to each expert, summed over ranks.
    pub fn total_expert_counts(&self) -> Vec<u64> {
        let experts = self.expert_counts.first().map_or(0, Vec::len);
        let mut sum = vec![0u64; experts];
        for counts in &self.expert_counts {
            for (s, &c) in sum.iter_mut().zip(counts) {
                *s += u64::from(c);
            }
        }
        sum
    }
}

/// Describes what a wait at `where_` in `stage_code` was waiting for. Signal waits index
/// their signal word as `peer * max_local + local` (plan.rs `dispatch_signal` /
/// `combine_signal`).
pub fn describe_wait(stage_code: u64, where_: u64, max_local: usize) -> String {
    let l = max_local.max(1) as u64;
    match stage_code {
        stage::DISPATCH => format!(
            "dispatch signal from rank {} for local expert {}",
            where_ / l,
            where_ % l
        ),
        stage::COMBINE => format!(
            "combine signal from rank {} for its local expert {}",
            where_ / l,
            where_ % l
        ),
        other => format!("{} wait #{where_}", stage::name(other)),
    }
}

/// Decodes one rank's status words: `Ok(())` when the code is `FM_STATUS_OK`.
pub fn decode(rank: usize, words: &[u64; STATUS_WORDS], max_local: usize) -> Result<()> {
    let [code, st, where_, expected, observed, waited_ns, ..] = *words;
    let stage_name = stage::name(st);
    let what = |kind: &str| format!("{kind} at {}", describe_wait(st, where_, max_local));
    match code {
        status::OK => Ok(()),
        status::TIMEOUT => Err(Error::Timeout {
            rank,
            stage: stage_name,
            awaited: describe_wait(st, where_, max_local),
            expected,
            observed,
            waited_ms: waited_ns / 1_000_000,
        }),
        status::BAD_PARAMS => Err(Error::Device {
            rank,
            stage: stage_name,
            what: format!("kernel parameters refused (field #{where_})"),
            expected,
            observed,
        }),
        status::BAD_ROUTING => Err(Error::Device {
            rank,
            stage: stage_name,
            what: format!("invalid routing at (token, choice) pair #{where_}"),
            expected,
            observed,
        }),
        status::BAD_SIGNAL => Err(Error::Device {
            rank,
            stage: stage_name,
            what: what("signal with an impossible row count"),
            expected,
            observed,
        }),
        status::QUEUE_OVERFLOW => Err(Error::Device {
            rank,
            stage: stage_name,
            what: format!("task queue overflow at entry {where_}"),
            expected,
            observed,
        }),
        other => Err(Error::Device {
            rank,
            stage: stage_name,
            what: format!("unknown status code {other} (where {where_})"),
            expected,
            observed,
        }),
    }
}

/// The error of a launch from every rank's status words: the first non-timeout error in
/// rank order (the cause: a timeout elsewhere is usually its consequence), else the first
/// timeout, else `Ok(())`.
pub fn first_error(words: &[[u64; STATUS_WORDS]], max_local: usize) -> Result<()> {
    let errors: Vec<Error> = words
        .iter()
        .enumerate()
        .filter_map(|(rank, w)| decode(rank, w, max_local).err())
        .collect();
    let mut first_timeout = None;
    for e in errors {
        if matches!(e, Error::Timeout { .. }) {
            first_timeout.get_or_insert(e);
        } else {
            return Err(e);
        }
    }
    first_timeout.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(code: u64, st: u64, where_: u64) -> [u64; STATUS_WORDS] {
        [code, st, where_, 11, 7, 2_500_000_000, 0, 0]
    }

    #[test]
    fn ok_is_ok() {
        assert!(decode(0, &[0; STATUS_WORDS], 4).is_ok());
        assert!(first_error(&[[0; STATUS_WORDS]; 3], 4).is_ok());
    }

    #[test]
    fn timeout_names_rank_stage_and_awaited_peer() {
        // rank 2 waited for the dispatch signal of source rank 1, local expert 3 (max_local 4).
        let e = decode(2, &words(status::TIMEOUT, stage::DISPATCH, 4 + 3), 4).unwrap_err();
        match e {
            Error::Timeout {
                rank,
                stage,
                awaited,
                expected,
                observed,
                waited_ms,
            } => {
                assert_eq!(rank, 2);
                assert_eq!(stage, "dispatch");
                assert!(awaited.contains("rank 1"), "{awaited}");
                assert!(awaited.contains("local expert 3"), "{awaited}");
                assert_eq!((expected, observed, waited_ms), (11, 7, 2500));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn device_errors_are_typed() {
        for code in [
            status::BAD_PARAMS,
            status::BAD_ROUTING,
            status::BAD_SIGNAL,
            status::QUEUE_OVERFLOW,
            99,
        ] {
            match decode(5, &words(code, stage::GATE, 3), 2) {
                Err(Error::Device { rank, stage, .. }) => {
                    assert_eq!(rank, 5);
                    assert_eq!(stage, "gate");
                }
                other => panic!("code {code}: {other:?}"),
            }
        }
    }

    #[test]
    fn cause_is_preferred_over_consequent_timeouts() {
        let all = [
            words(status::TIMEOUT, stage::COMBINE, 1),
            words(status::BAD_ROUTING, stage::GATE, 9),
            words(status::TIMEOUT, stage::DISPATCH, 1),
        ];
        assert!(matches!(
            first_error(&all, 2),
            Err(Error::Device { rank: 1, .. })
        ));
        let timeouts = [[0; STATUS_WORDS], words(status::TIMEOUT, stage::COMBINE, 1)];
        assert!(matches!(
            first_error(&timeouts, 2),
            Err(Error::Timeout { rank: 1, .. })
        ));
    }

    #[test]
    fn stats_sum_over_ranks() {
        let s = LayerStats {
            dropped: vec![2, 3],
            expert_counts: vec![vec![1, 2, 3], vec![4, 0, 6]],
        };
        assert_eq!(s.total_dropped(), 5);
        assert_eq!(s.total_expert_counts(), vec![5, 2, 9]);
        assert!(LayerStats::default().total_expert_counts().is_empty());
    }
}
