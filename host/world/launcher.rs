//! Starts one process per rank on this machine, the way torchrun would, and collects each
//! rank's JSON result.
//!
//! Every child gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT` and a fresh random
//! `FLASHMOE_BOOTSTRAP_SECRET` (unless [`LaunchOptions::env`] sets one), so only its own
//! children can join the bootstrap. A child reports its result by printing
//! one line `FLASHMOE_RESULT <json>` on stdout ([`emit_result`]); other output is allowed.
//! When a rank fails (non-zero exit, no result line) or the deadline passes, every other
//! child is killed and waited for, and the error names the rank with its exit status and
//! the tail of its stderr. Children are also killed and reaped when the launcher unwinds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::world::env;

/// Prefix of the result line a rank prints on stdout.
pub const RESULT_MARKER: &str = "FLASHMOE_RESULT ";

/// Longest deadline of a launch (one week).
pub const MAX_LAUNCH_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

/// Lines of stderr kept per rank for error reports.
pub const STDERR_TAIL_LINES: usize = 20;
const MAX_LINE: usize = 1000;

/// Prints `value` as this rank's result line and flushes stdout.
pub fn emit_result<T: serde::Serialize>(value: &T) -> Result<()> {
    let json = serde_json::to_string(value).map_err(|e| Error::input("result", e))?;
    let mut out = std::io::stdout().lock();
    // The leading newline keeps the marker at the start of a line even when something
    // (a test harness, a library) left a partial line on stdout.
    writeln!(out, "\n{RESULT_MARKER}{json}")
        .and_then(|_| out.flush())
        .map_err(|source| Error::Io {
            path: "<stdout>".into(),
            source,
        })
}

/// Options of [`launch_local_with`].
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Deadline of the whole run (more than 0, at most [`MAX_LAUNCH_TIMEOUT`]).
    pub timeout: Duration,
    /// Extra environment variables for every child.
    pub env: Vec<(String, String)>,
    /// Copy each child's stderr to this process's stderr, prefixed with `[rank r]`.
    pub forward_stderr: bool,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            env: Vec::new(),
            forward_stderr: false,
        }
    }
}

/// What one rank reported.
#[derive(Debug, Clone, PartialEq)]
pub struct RankReport {
    /// The rank.
    pub rank: usize,
    /// The JSON of its last result line.
    pub result: serde_json::Value,
    /// The last lines of its stderr.
    pub stderr_tail: String,
    /// Time from start to exit, as observed by the launcher.
    pub elapsed: Duration,
}

/// A free TCP port on `ip` (bound, read, released: another process may still take it).
pub fn free_port(ip: IpAddr) -> Result<u16> {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            path: format!("tcp port on {ip}").into(),
            source,
        })
}

#[derive(Default)]
struct Captured {
    results: Vec<String>,
    tail: std::collections::VecDeque<String>,
    closed_at: Option<Instant>,
}

impl Captured {
    fn tail_text(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

fn truncate(mut line: String) -> String {
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(" [...]");
    }
    line
}

fn spawn_reader(
    pipe: impl Read + Send + 'static,
    sink: Arc<Mutex<Captured>>,
    stdout: bool,
    forward: Option<usize>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if let Some(rank) = forward {
                eprintln!("[rank {rank}] {line}");
            }
            let Ok(mut c) = sink.lock() else { return };
            if stdout {
                if let Some(pos) = line.find(RESULT_MARKER) {
                    c.results
                        .push(line[pos + RESULT_MARKER.len()..].to_string());
                }
            } else {
                c.tail.push_back(truncate(line));
                if c.tail.len() > STDERR_TAIL_LINES {
                    c.tail.pop_front();
                }
            }
        }
        if let Ok(mut c) = sink.lock() {
            c.closed_at = Some(Instant::now());
        }
    });
}

struct Rank {
    child: Child,
    status: Option<ExitStatus>,
    exited_at: Option<Instant>,
    out: Arc<Mutex<Captured>>,
    err: Arc<Mutex<Captured>>,
}

/// The children of one launch; killed and reaped on drop.
struct Group {
    ranks: Vec<Rank>,
}

impl Group {
    fn kill_all(&mut self) {
        for r in &mut self.ranks {
            if r.status.is_none() {
                let _ = r.child.kill();
                if let Ok(st) = r.child.wait() {
                    r.status = Some(st);
                }
            }
        }
    }

    /// Waits briefly for the readers of rank `i` to see end-of-file, then returns its tail.
    fn stderr_tail(&self, i: usize, grace: Duration) -> String {
        let until = Instant::now() + grace;
        loop {
            let done = self.ranks[i]
                .err
                .lock()
                .map(|c| c.closed_at.is_some())
                .unwrap_or(true);
            if done || Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.ranks[i]
            .err
            .lock()
            .map(|c| c.tail_text())
            .unwrap_or_default()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Starts `nproc` ranks of `exe args` with the default [`LaunchOptions`] and returns their
/// reports in rank order.
pub fn launch_local(nproc: usize, exe: &Path, args: &[String]) -> Result<Vec<RankReport>> {
    launch_local_with(nproc, exe, args, &LaunchOptions::default())
}

/// Starts `nproc` ranks of `exe args` and returns their reports in rank order; see the
/// module documentation for the contract with the children.
pub fn launch_local_with(
    nproc: usize,
    exe: &Path,
    args: &[String],
    opts: &LaunchOptions,
) -> Result<Vec<RankReport>> {
    if nproc == 0 || nproc > crate::config::MAX_WORLD {
        return Err(Error::config(
            "nproc",
            nproc,
            format!("1..={}", crate::config::MAX_WORLD),
        ));
    }
    if opts.timeout.is_zero() || opts.timeout > MAX_LAUNCH_TIMEOUT {
        return Err(Error::config(
            "launch.timeout",
            format!("{:?}", opts.timeout),
            format!("more than 0 and at most {} s", MAX_LAUNCH_TIMEOUT.as_secs()),
        ));
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let port = free_port(ip)?;
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let secret = crate::world::bootstrap::Secret::generate_text();
    let mut group = Group {
        ranks: Vec::with_capacity(nproc),
    };
    for rank in 0..nproc {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env(env::RANK, rank.to_string())
            .env(env::WORLD_SIZE, nproc.to_string())
            .env(env::LOCAL_RANK, rank.to_string())
            .env(env::LOCAL_WORLD_SIZE, nproc.to_string())
            .env(env::MASTER_ADDR, ip.to_string())
            .env(env::MASTER_PORT, port.to_string())
            .env(env::BOOTSTRAP_SECRET, &secret)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| Error::Io {
            path: exe.to_path_buf(),
            source,
        })?; // `group` drops here on error: the ranks started so far are killed.
        let out = Arc::new(Mutex::new(Captured::default()));
        let err = Arc::new(Mutex::new(Captured::default()));
        if let Some(p) = child.stdout.take() {
            spawn_reader(p, out.clone(), true, None);
        }
        if let Some(p) = child.stderr.take() {
            spawn_reader(p, err.clone(), false, opts.forward_stderr.then_some(rank));
        }
        group.ranks.push(Rank {
            child,
            status: None,
            exited_at: None,
            out,
            err,
        });
    }

    loop {
        let mut running = Vec::new();
        let mut failed = Vec::new();
        for (i, r) in group.ranks.iter_mut().enumerate() {
            if r.status.is_some() {
                continue;
            }
            match r.child.try_wait() {
                Ok(Some(st)) => {
                    r.status = Some(st);
                    r.exited_at = Some(Instant::now());
                    if !st.success() {
                        failed.push(i);
                    }
                }
                Ok(None) => running.push(i),
                Err(e) => {
                    let reason = format!("cannot poll its process: {e}");
                    group.kill_all();
                    return Err(Error::RankFailed {
                        rank: i,
                        reason,
                        stderr_tail: String::new(),
                    });
                }
            }
        }
        if !failed.is_empty() {
            // Of the ranks seen failing in the same round, blame the one whose stderr
            // closed first: the others most likely failed because of it.
            let closed = |i: usize| {
                group.ranks[i]
                    .err
                    .lock()
                    .ok()
                    .and_then(|c| c.closed_at)
                    .unwrap_or_else(Instant::now)
            };
            std::thread::sleep(Duration::from_millis(20));
            let first = failed
                .iter()
                .copied()
                .min_by_key(|&i| closed(i))
                .unwrap_or(failed[0]);
            group.kill_all();
            let status = group.ranks[first]
                .status
                .map_or("unknown status".to_string(), |s| s.to_string());
            let killed: Vec<usize> = running;
            let mut reason = status;
            if !killed.is_empty() {
                reason.push_str(&format!("; killed the other running ranks {killed:?}"));
            }
            return Err(Error::RankFailed {
                rank: first,
                reason,
                stderr_tail: group.stderr_tail(first, Duration::from_secs(1)),
            });
        }
        if running.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            group.kill_all();
            let first = running[0];
            return Err(Error::RankFailed {
                rank: first,
                reason: format!(
                    "still running after the launcher's deadline of {:.1} s; killed ranks {running:?}",
                    opts.timeout.as_secs_f64()
                ),
                stderr_tail: group.stderr_tail(first, Duration::from_secs(1)),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut reports = Vec::with_capacity(nproc);
    for i in 0..nproc {
        // Wait (briefly) for the stdout reader to reach end-of-file.
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until
            && group.ranks[i]
                .out
                .lock()
                .map(|c| c.closed_at.is_none())
                .unwrap_or(false)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let last = group.ranks[i]
            .out
            .lock()
            .ok()
            .and_then(|c| c.results.last().cloned());
        let tail = group.stderr_tail(i, Duration::from_millis(200));
        let Some(line) = last else {
            return Err(Error::RankFailed {
                rank: i,
                reason: format!(
                    "exited successfully without a `{}` line on stdout",
                    RESULT_MARKER.trim_end()
                ),
                stderr_tail: tail,
            });
        };
        let result = serde_json::from_str(&line).map_err(|e| Error::RankFailed {
            rank: i,
            reason: format!(
                "its result line is not JSON ({e}): {}",
                truncate(line.clone())
            ),
            stderr_tail: tail.clone(),
        })?;
        let elapsed = group.ranks[i].exited_at.unwrap_or_else(Instant::now) - start;
        reports.push(RankReport {
            rank: i,
            result,
            stderr_tail: tail,
            elapsed,
        });
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_LINE);
        let t = truncate(s);
        assert!(t.ends_with(" [...]"));
        assert!(t.len() <= MAX_LINE + 6);
        assert_eq!(truncate("short".into()), "short");
    }

    #[test]
    fn zero_ranks_are_refused() {
        let err = launch_local(0, Path::new("/bin/true"), &[]).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { field: "nproc", .. }),
            "{err}"
        );
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["-c".to_string(), script.to_string()]
    }

    #[test]
    fn shell_ranks_report_their_environment() {
        let script = r#"echo "noise"; echo "FLASHMOE_RESULT {\"rank\":$RANK,\"world\":$WORLD_SIZE,\"local\":$LOCAL_RANK,\"port\":$MASTER_PORT,\"addr\":\"$MASTER_ADDR\"}""#;
        let reports = launch_local(3, Path::new("/bin/sh"), &sh(script)).unwrap();
        assert_eq!(reports.len(), 3);
        let port = reports[0].result["port"].as_u64().unwrap();
        for (i, r) in reports.iter().enumerate() {
            assert_eq!(r.rank, i);
            assert_eq!(r.result["rank"], i as u64);
            assert_eq!(r.result["local"], i as u64);
            assert_eq!(r.result["world"], 3);
            assert_eq!(r.result["addr"], "127.0.0.1");
            assert_eq!(r.result["port"].as_u64().unwrap(), port);
        }
        assert!(port > 0);
    }

    #[test]
    fn a_rank_without_result_line_is_named() {
        let err = launch_local(
            2,
            Path::new("/bin/sh"),
            &sh(r#"[ "$RANK" = 1 ] || echo 'FLASHMOE_RESULT {}'; echo oops >&2"#),
        )
        .unwrap_err();
        match err {
            Error::RankFailed {
                rank,
                reason,
                stderr_tail,
            } => {
                assert_eq!(rank, 1);
                assert!(reason.contains("without"), "{reason}");
                assert_eq!(stderr_tail, "oops");
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn a_failing_rank_is_named_with_status_and_stderr_and_the_others_are_killed() {
        let start = Instant::now();
        let script =
            r#"if [ "$RANK" = 2 ]; then echo "rank two broke" >&2; exit 7; fi; exec sleep 30"#;
        let err = launch_local(3, Path::new("/bin/sh"), &sh(script)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        let msg = err.to_string();
        match err {
            Error::RankFailed {
                rank,
                reason,
                stderr_tail,
            } => {
                assert_eq!(rank, 2, "{msg}");
                assert!(reason.contains('7'), "{reason}");
                assert!(reason.contains("[0, 1]"), "{reason}");
                assert_eq!(stderr_tail, "rank two broke");
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn the_deadline_kills_every_rank_and_names_them() {
        let opts = LaunchOptions {
            timeout: Duration::from_millis(500),
            ..LaunchOptions::default()
        };
        let start = Instant::now();
        let err =
            launch_local_with(2, Path::new("/bin/sh"), &sh("exec sleep 30"), &opts).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let msg = err.to_string();
        assert!(msg.contains("deadline") && msg.contains("[0, 1]"), "{msg}");
    }

    #[test]
    fn unrepresentable_or_zero_deadlines_are_refused_before_spawning() {
        for timeout in [Duration::MAX, Duration::ZERO, MAX_LAUNCH_TIMEOUT * 2] {
            let opts = LaunchOptions {
                timeout,
                ..LaunchOptions::default()
            };
            let err = launch_local_with(1, Path::new("/bin/true"), &[], &opts).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidConfig {
                        field: "launch.timeout",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn every_child_gets_the_same_fresh_secret() {
        let script = r#"echo "FLASHMOE_RESULT {\"s\":\"$FLASHMOE_BOOTSTRAP_SECRET\"}""#;
        let a = launch_local(2, Path::new("/bin/sh"), &sh(script)).unwrap();
        let b = launch_local(1, Path::new("/bin/sh"), &sh(script)).unwrap();
        let s = a[0].result["s"].as_str().unwrap();
        assert_eq!(s.len(), 64, "{s}");
        assert_eq!(a[1].result["s"], a[0].result["s"]);
        assert_ne!(b[0].result["s"], a[0].result["s"], "a secret was reused");
    }

    #[test]
    fn a_missing_executable_is_an_io_error_naming_it() {
        let err = launch_local(2, Path::new("/nonexistent/flashmoe-rank"), &[]).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/flashmoe-rank"),
            "{err}"
        );
    }
}
