//! The result of one benchmark, as a table or JSON.

use crate::stats::Summary;
use flashmoe::metrics::LayerWork;
use serde::Serialize;

/// Peaks measured in the same run on the same device.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Peaks {
    /// Dense bf16 GEMM FLOP/s (cuBLAS).
    pub flops: f64,
    /// Device-to-device copy bytes/s.
    pub bytes_per_s: f64,
}

/// Bytes the dispatch of one launch put on the wire (all ranks, own rows excluded),
/// measured from the routing of that launch.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Wire {
    /// Token rows with their metadata, one per (token, remote rank), plus pair lists.
    pub dispatch_bytes: f64,
    /// What one row per (token, remote expert) would have sent.
    pub per_expert_bytes: f64,
}

/// One other tile rule timed on the same layer (`--compare-tiles`).
#[derive(Debug, Clone, Serialize)]
pub struct TilesCompare {
    /// Its name (`auto`, `classic`, `narrow` or `auto-serial`).
    pub other: String,
    /// Its median latency (ms).
    pub median_ms: f64,
    /// Its median over the first mode's.
    pub ratio: f64,
}

/// Everything a layer benchmark reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Preset name.
    pub preset: String,
    /// One-line config summary.
    pub config: String,
    /// Backend and device.
    pub backend: String,
    /// World description.
    pub world: String,
    /// Memory per rank as the plan computed it.
    pub memory: String,
    /// Latency of one launch (ms).
    pub latency_ms: Summary,
    /// Tokens (all ranks) per second at the median.
    pub tokens_per_s: f64,
    /// Work of one launch.
    pub work: LayerWork,
    /// Achieved FLOP/s at the median.
    pub flops_per_s: f64,
    /// Achieved bytes/s at the median.
    pub bytes_per_s: f64,
    /// Peaks of the device, when measured.
    pub peaks: Option<Peaks>,
    /// Fraction of the roofline floor reached (floor / median), when peaks are known.
    pub roofline_fraction: Option<f64>,
    /// Largest error relative to the reference's largest magnitude; `None` when the run
    /// was not checked (`--check-tokens 0`).
    pub max_rel_error: Option<f64>,
    /// Tolerance the check used.
    pub tolerance: f64,
    /// Tokens per rank that were checked.
    pub checked_tokens: usize,
    /// Dropped (token, expert) pairs in one launch.
    pub dropped: u64,
    /// (token, expert) pairs routed in one launch.
    pub pairs: u64,
    /// Dispatch bytes on the wire, when measured (single-process runs).
    pub wire: Option<Wire>,
    /// Tile rule of the routed GEMMs (`auto`, `classic`, `narrow` or `auto-serial`).
    pub tiles: String,
    /// The other tile rules on the same layer, when compared (empty otherwise).
    pub tiles_compare: Vec<TilesCompare>,
    /// Where the last timed launch's time went (device timestamps; GPU only).
    pub phases: Option<flashmoe::gpu::layer::PhaseSplit>,
    /// The tasks by kind (GEMM0, GEMM1, shared, reduce) the plan's rule gives the run's
    /// routing ([`flashmoe::plan::LayerPlan::expected_tasks`]), with `phases`.
    pub tasks_expected: Option<[u64; 4]>,
}

fn si(x: f64) -> String {
    let (v, unit) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.2} {unit}")
}

impl Report {
    /// The check's verdict: "ok" only for a run that was checked.
    pub fn check_line(&self) -> String {
        match self.max_rel_error {
            Some(e) => format!(
                "max rel error {e:.2e} on {} tokens/rank vs the f64 reference (tolerance {:.0e}): ok",
                self.checked_tokens, self.tolerance
            ),
            None => "not checked (--check-tokens 0); outputs are finite".to_string(),
        }
    }

    /// Prints the human-readable table.
    pub fn print_table(&self) {
        let l = &self.latency_ms;
        println!("flashmoe-bench layer: preset {}", self.preset);
        println!("  {:<10} {}", "config", self.config);
        println!("  {:<10} {}", "backend", self.backend);
        let others: Vec<String> = self
            .tiles_compare
            .iter()
            .map(|t| {
                format!(
                    "; {} median {:.4} ms = {:.3}x (tile ratio {}/{})",
                    t.other, t.median_ms, t.ratio, t.other, self.tiles
                )
            })
            .collect();
        println!("  {:<10} {}{}", "tiles", self.tiles, others.concat());
        println!("  {:<10} {}", "world", self.world);
        println!("  {:<10} {}", "memory", self.memory);
        println!("  {:<10} {}", "check", self.check_line());
        println!(
            "  {:<10} {} of {} pairs",
            "dropped", self.dropped, self.pairs
        );
        match self.wire {
            Some(w) if w.per_expert_bytes > 0.0 => println!(
                "  {:<10} dispatch {}B per launch, one row per (token, rank); one row per (token, expert) would be {}B ({:.2}x)",
                "wire",
                si(w.dispatch_bytes),
                si(w.per_expert_bytes),
                w.per_expert_bytes / w.dispatch_bytes.max(1.0)
            ),
            Some(_) => println!("  {:<10} nothing leaves a rank (one rank)", "wire"),
            None => println!("  {:<10} not measured (multi-process run)", "wire"),
        }
        println!(
            "  {:<10} median {:.4} ms   p10 {:.4}   p90 {:.4}   ({} timed runs)",
            "latency", l.median, l.p10, l.p90, l.n
        );
        println!(
            "  {:<10} {}tokens/s   {}FLOP/s   {}B/s   ({}FLOP, {}B per launch)",
            "rate",
            si(self.tokens_per_s),
            si(self.flops_per_s),
            si(self.bytes_per_s),
            si(self.work.flops),
            si(self.work.bytes)
        );
        match (self.peaks, self.roofline_fraction) {
            (Some(p), Some(f)) => println!(
                "  {:<10} {:.1}% of the floor max(FLOP/{}FLOP/s, B/{}B/s) measured in this run",
                "roofline",
                100.0 * f,
                si(p.flops),
                si(p.bytes_per_s)
            ),
            _ => println!("  {:<10} not measured on this backend", "roofline"),
        }
        match &self.phases {
            Some(p) => {
                let tasks = match self.tasks_expected {
                    Some(e) if e == p.kind_tasks => " [tasks by kind as planned]".to_string(),
                    Some(e) => format!(
                        " [TASKS DIFFER from the plan's: gemm0/gemm1/shared/reduce {:?} run, {:?} planned]",
                        p.kind_tasks, e
                    ),
                    None => String::new(),
                };
                println!("  {:<10} {}{tasks}", "phases", p.describe())
            }
            None => println!(
                "  {:<10} not measured (device timestamps: GPU only)",
                "phases"
            ),
        }
    }
}
