//! The kernel's status words (`ws_status`, 8 x u64 per rank) turned into typed errors, and
//! the per-launch statistics. Pure, tested on the CPU.
//!
//! Words: `[0]` code `FM_STATUS_*`, `[1]` stage `FM_STAGE_*`, `[2]` where, `[3]` expected,
//! `[4]` observed, `[5]` nanoseconds waited (CONTRACT.md "Kernel ABI").

use crate::error::{Error, Result};
use crate::params::{stage, status, status_word as sw};

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

/// `where` flag of a rank-group barrier wait (`0x2000000 | barrier index`).
const WHERE_BARRIER: u64 = 0x200_0000;
/// `where` flag of an expert-stage wait for a task (`0x1000000 | queue ticket`).
const WHERE_TICKET: u64 = 0x100_0000;
/// `where` of the combine wait for the local shared-expert tiles.
const WHERE_SHARED: u64 = 0xFFFF_FFFF;

/// True when a wait at `where_` in `stage_code` can only be a consequence of another wait
/// of its rank (a queue ticket, a rank barrier, the local shared-expert tiles): the kernel
/// gives those `CONSEQUENCE_WAIT_FACTOR` x the timeout, so that a wait on a peer's signal
/// (the possible cause) reports first and they leave on the abort flag instead.
pub fn is_consequence(stage_code: u64, where_: u64, world: usize) -> bool {
    let barrier =
        where_ != WHERE_SHARED && where_ & WHERE_BARRIER != 0 && (where_ >> 16) >= world as u64;
    barrier
        || (stage_code == stage::EXPERT && where_ & WHERE_TICKET != 0)
        || (stage_code == stage::COMBINE && where_ == WHERE_SHARED)
}

/// The deadline the kernel gives a wait at `where_` in `stage_code`: `timeout` for a wait
/// on a peer's signal, `CONSEQUENCE_WAIT_FACTOR x timeout` for a consequence
/// ([`is_consequence`]).
pub fn wait_budget(
    timeout: std::time::Duration,
    stage_code: u64,
    where_: u64,
    world: usize,
) -> std::time::Duration {
    if is_consequence(stage_code, where_, world) {
        timeout.saturating_mul(crate::params::CONSEQUENCE_WAIT_FACTOR)
    } else {
        timeout
    }
}

/// Describes what a wait at `where_` in `stage_code` was waiting for (kernel/README.md,
/// "Status"). Signal waits encode `peer << 16` (one signal per rank pair); `world` tells a
/// barrier flag apart from a large peer id.
pub fn describe_wait(stage_code: u64, where_: u64, world: usize) -> String {
    let peer = where_ >> 16;
    if where_ != WHERE_SHARED && where_ & WHERE_BARRIER != 0 && peer >= world as u64 {
        return format!(
            "the rank-group barrier #{} of stage {}",
            where_ & (WHERE_BARRIER - 1),
            stage::name(stage_code)
        );
    }
    match stage_code {
        stage::DISPATCH => format!("the dispatch signal from rank {peer}"),
        stage::COMBINE if where_ == WHERE_SHARED => "the local shared-expert tiles".into(),
        stage::COMBINE => format!("the combine signal from rank {peer}"),
        stage::EXPERT if where_ & WHERE_TICKET != 0 => {
            format!("a task for queue ticket {}", where_ & (WHERE_TICKET - 1))
        }
        other => format!("{} wait at {where_:#x}", stage::name(other)),
    }
}

/// `where` low bits of a `BAD_SIGNAL` on a source's row count (expected = tokens_max).
const WHERE_ROWS: u64 = 0xFFFF;
/// `where` low bits of a `BAD_SIGNAL` on a `row_meta` pair index (expected = pairs sent).
const WHERE_ROW_META: u64 = 0xFFFE;

/// Describes an impossible signal or metadata value (`FM_STATUS_BAD_SIGNAL`, kernel/README.md
/// "Status"): `(source or owner << 16) | detail`.
pub fn describe_bad_signal(stage_code: u64, where_: u64) -> String {
    let peer = where_ >> 16;
    match (stage_code, where_ & 0xFFFF) {
        (stage::COMBINE, _) => {
            format!("the combine signal from rank {peer} (expected = rows sent, observed = rows)")
        }
        (_, WHERE_ROWS) => {
            format!("the dispatch signal from rank {peer} (expected = tokens_max, observed = rows)")
        }
        (_, WHERE_ROW_META) => format!(
            "a row_meta entry from rank {peer} (expected = pairs sent, observed = pair index)"
        ),
        (_, local) => format!(
            "the pair metadata from rank {peer} for local expert {local} (a count above \
             capacity, a pair sum above pair_capacity, or a pair-list row past the rows sent)"
        ),
    }
}

/// Names the parameter a `FM_STATUS_BAD_PARAMS` refers to (`where` 1..=19).
pub fn bad_param_name(where_: u64) -> &'static str {
    match where_ {
        1 => "params version",
        2 => "tile sizes",
        3 => "dtype of the entry point",
        4 => "grid / blocks per rank",
        5 => "top_k",
        6 => "experts",
        7 => "launch_ranks",
        8 => "block size",
        9 => "a peers table entry is 0",
        10 => "dynamic shared memory too small",
        11 => "world / rank / local_experts / tokens",
        12 => "world above 1024 (the scheduler's signal mask)",
        13 => "unknown router or MLP code",
        14 => "a pointer the config needs is 0",
        15 => "unknown stop_after stage",
        16 => "group-limited selection: n_group / topk_group out of range",
        17 => "route_slots out of 1..=min(top_k, max_local)",
        18 => "a tile task index does not fit 30 bits",
        19 => "unknown tile mode",
        _ => "unknown parameter",
    }
}

/// The pointer a `BAD_PARAMS` 14 names by its observed value.
pub fn null_pointer_name(observed: u64) -> &'static str {
    match observed {
        0 => "expert_owner",
        1 => "router_weight",
        2 => "router_bias",
        3 => "given_ids / given_weights",
        4 => "x / out",
        5 => "w0 / w1",
        6 => "shared_w0 / shared_w1",
        7 => "shared_gate",
        8 => "heap / peers / workspace",
        9 => "scratch",
        _ => "unknown pointer",
    }
}

/// What [`decode`] needs to know about the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusContext {
    /// Ranks in the world.
    pub world: usize,
    /// The config's top-k (row stride of the caller's routing).
    pub top_k: usize,
}

/// Decodes one rank's status words: `Ok(())` when the code is `FM_STATUS_OK`.
pub fn decode(rank: usize, words: &[u64; STATUS_WORDS], cx: StatusContext) -> Result<()> {
    let (code, st, where_) = (words[sw::CODE], words[sw::STAGE], words[sw::WHERE]);
    let (expected, observed) = (words[sw::EXPECTED], words[sw::OBSERVED]);
    let waited_ns = words[sw::WAITED];
    let stage_name = stage::name(st);
    let device = |what: String| Error::Device {
        rank,
        stage: stage_name,
        what,
        expected,
        observed,
    };
    let k = cx.top_k.max(1) as u64;
    match code {
        status::OK => Ok(()),
        status::TIMEOUT => Err(Error::Timeout {
            rank,
            stage: stage_name,
            awaited: if is_consequence(st, where_, cx.world) {
                format!(
                    "{} (a consequence wait, with {}x the deadline of signal waits: no \
                     signal wait of any rank reported first)",
                    describe_wait(st, where_, cx.world),
                    crate::params::CONSEQUENCE_WAIT_FACTOR
                )
            } else {
                describe_wait(st, where_, cx.world)
            },
            expected,
            observed,
            waited_ms: waited_ns / 1_000_000,
        }),
        status::BAD_PARAMS if where_ == 14 => Err(device(format!(
            "kernel refused its parameters: {} ({})",
            bad_param_name(where_),
            null_pointer_name(observed)
        ))),
        status::BAD_PARAMS => Err(device(format!(
            "kernel refused its parameters: {}",
            bad_param_name(where_)
        ))),
        status::BAD_ROUTING => Err(device(format!(
            "invalid routing at token {} choice {} (expected = experts, observed = id or weight bits)",
            where_ / k,
            where_ % k
        ))),
        status::BAD_SIGNAL => Err(device(format!(
            "impossible value in {}",
            describe_bad_signal(st, where_)
        ))),
        status::QUEUE_OVERFLOW => Err(device(
            "task queue overflow (expected = capacity, observed = entries needed)".into(),
        )),
        other => Err(device(format!(
            "unknown status code {other} (where {where_:#x})"
        ))),
    }
}

/// The error of a launch from every rank's status words, the likeliest cause first:
/// any non-timeout error (in rank order), else a timeout on a dispatch signal (it names the
/// rank that never sent), else on a combine signal, else any other timeout (a task or a
/// barrier, usually a consequence), each in rank order; `Ok(())` when all are OK.
pub fn first_error(words: &[[u64; STATUS_WORDS]], cx: StatusContext) -> Result<()> {
    let priority = |w: &[u64; STATUS_WORDS]| match (w[sw::CODE], w[sw::STAGE]) {
        (status::TIMEOUT, stage::DISPATCH) if w[sw::WHERE] & WHERE_BARRIER == 0 => 1,
        (status::TIMEOUT, stage::COMBINE) if w[sw::WHERE] & WHERE_BARRIER == 0 => 2,
        (status::TIMEOUT, _) => 3,
        _ => 0,
    };
    let best = words
        .iter()
        .enumerate()
        .filter(|(_, w)| w[sw::CODE] != status::OK)
        .min_by_key(|(rank, w)| (priority(w), *rank));
    match best {
        Some((rank, w)) => decode(rank, w, cx),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CX: StatusContext = StatusContext { world: 4, top_k: 2 };

    fn words(code: u64, st: u64, where_: u64) -> [u64; STATUS_WORDS] {
        [code, st, where_, 11, 7, 2_500_000_000, 0, 0]
    }

    #[test]
    fn ok_is_ok() {
        assert!(decode(0, &[0; STATUS_WORDS], CX).is_ok());
        assert!(first_error(&[[0; STATUS_WORDS]; 3], CX).is_ok());
    }

    #[test]
    fn timeout_names_rank_stage_and_awaited_peer() {
        // rank 2 waited for the dispatch signal of source rank 1.
        let e = decode(2, &words(status::TIMEOUT, stage::DISPATCH, 1 << 16), CX).unwrap_err();
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
                assert!(awaited.ends_with("from rank 1"), "{awaited}");
                assert_eq!((expected, observed, waited_ms), (11, 7, 2500));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn waits_are_described_by_stage() {
        let d = |st, w| describe_wait(st, w, 4);
        assert!(d(stage::COMBINE, (3 << 16) | 1).contains("combine signal from rank 3"));
        assert!(d(stage::COMBINE, WHERE_SHARED).contains("shared-expert"));
        assert!(d(stage::EXPERT, WHERE_TICKET | 17).contains("ticket 17"));
        assert!(d(stage::GATE, WHERE_BARRIER | 2).contains("barrier #2"));
        assert!(d(stage::DISPATCH, WHERE_BARRIER | 5).contains("barrier #5"));
        // With a large world the same bits are a peer id.
        assert!(describe_wait(stage::DISPATCH, WHERE_BARRIER | 5, 1024).contains("rank 512"));
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
            match decode(5, &words(code, stage::GATE, 3), CX) {
                Err(Error::Device { rank, stage, .. }) => {
                    assert_eq!(rank, 5);
                    assert_eq!(stage, "gate");
                }
                other => panic!("code {code}: {other:?}"),
            }
        }
        match decode(0, &words(status::BAD_ROUTING, stage::GATE, 7), CX) {
            Err(Error::Device { what, .. }) => assert!(what.contains("token 3 choice 1"), "{what}"),
            other => panic!("{other:?}"),
        }
        let mut null = words(status::BAD_PARAMS, stage::SETUP, 14);
        null[4] = 3;
        match decode(0, &null, CX) {
            Err(Error::Device { what, .. }) => assert!(what.contains("given_ids"), "{what}"),
            other => panic!("{other:?}"),
        }
        match decode(0, &words(status::BAD_PARAMS, stage::SETUP, 4), CX) {
            Err(Error::Device { what, .. }) => assert!(what.contains("blocks per rank"), "{what}"),
            other => panic!("{other:?}"),
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
            first_error(&all, CX),
            Err(Error::Device { rank: 1, .. })
        ));
        let timeouts = [[0; STATUS_WORDS], words(status::TIMEOUT, stage::COMBINE, 1)];
        assert!(matches!(
            first_error(&timeouts, CX),
            Err(Error::Timeout { rank: 1, .. })
        ));
        // A dispatch-signal timeout names the silent rank: preferred over a task wait of a
        // lower rank and over combine waits.
        let mixed = [
            words(status::TIMEOUT, stage::EXPERT, WHERE_TICKET | 3),
            words(status::TIMEOUT, stage::COMBINE, 2 << 16),
            words(status::TIMEOUT, stage::DISPATCH, 3 << 16),
            words(status::TIMEOUT, stage::DISPATCH, WHERE_BARRIER | 1),
        ];
        match first_error(&mixed, CX) {
            Err(Error::Timeout { rank, awaited, .. }) => {
                assert_eq!(rank, 2);
                assert!(awaited.ends_with("from rank 3"), "{awaited}");
            }
            other => panic!("{other:?}"),
        }
        let no_dispatch = [
            words(status::TIMEOUT, stage::EXPERT, WHERE_TICKET | 3),
            words(status::TIMEOUT, stage::COMBINE, 2 << 16),
        ];
        assert!(matches!(
            first_error(&no_dispatch, CX),
            Err(Error::Timeout { rank: 1, .. })
        ));
    }

    #[test]
    fn consequence_waits_have_the_longer_budget_and_say_so() {
        use std::time::Duration;
        let t = Duration::from_millis(200);
        let long = t * crate::params::CONSEQUENCE_WAIT_FACTOR;
        const { assert!(crate::params::CONSEQUENCE_WAIT_FACTOR >= 2) };
        // Causes: a peer's dispatch or combine signal.
        assert_eq!(wait_budget(t, stage::DISPATCH, (3 << 16) | 1, 4), t);
        assert_eq!(wait_budget(t, stage::COMBINE, 2 << 16, 4), t);
        // Consequences: tickets, barriers, the shared-expert tiles.
        assert_eq!(wait_budget(t, stage::EXPERT, WHERE_TICKET | 9, 4), long);
        assert_eq!(wait_budget(t, stage::GATE, WHERE_BARRIER | 1, 4), long);
        assert_eq!(wait_budget(t, stage::DISPATCH, WHERE_BARRIER | 3, 4), long);
        assert_eq!(wait_budget(t, stage::COMBINE, WHERE_SHARED, 4), long);
        // A silent rank 1 in a world of 2: rank 0's scheduler names rank 1 at the timeout;
        // its ticket waits would only have reported at twice that, and rank 1's own
        // scheduler (silent towards itself too) names itself. The cause is chosen.
        let silent = [
            words(status::TIMEOUT, stage::DISPATCH, 1 << 16),
            words(status::TIMEOUT, stage::DISPATCH, 1 << 16),
        ];
        match first_error(&silent, CX) {
            Err(Error::Timeout { rank, awaited, .. }) => {
                assert_eq!(rank, 0);
                assert!(awaited.contains("from rank 1"), "{awaited}");
                assert!(!awaited.contains("consequence"), "{awaited}");
            }
            other => panic!("{other:?}"),
        }
        // A consequence reported alone says it is one.
        match decode(
            0,
            &words(status::TIMEOUT, stage::EXPERT, WHERE_TICKET | 4),
            CX,
        ) {
            Err(Error::Timeout { awaited, .. }) => {
                assert!(awaited.contains("ticket 4"), "{awaited}");
                assert!(awaited.contains("consequence"), "{awaited}");
            }
            other => panic!("{other:?}"),
        }
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
