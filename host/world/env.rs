//! The launcher environment (torchrun's convention): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`, plus the optional `LOCAL_WORLD_SIZE`,
//! `FLASHMOE_BOOTSTRAP_TIMEOUT_S` and `FLASHMOE_BOOTSTRAP_SECRET`.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::config::MAX_WORLD;
use crate::error::{Error, Result};

/// Global rank of this process.
pub const RANK: &str = "RANK";
/// Number of ranks.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// Rank of this process on its node (selects the GPU).
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// Number of ranks on this node (optional).
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// Host of rank 0's bootstrap listener.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Port of rank 0's bootstrap listener.
pub const MASTER_PORT: &str = "MASTER_PORT";
/// Deadline of every bootstrap step in seconds (optional, default 60).
pub const BOOTSTRAP_TIMEOUT_S: &str = "FLASHMOE_BOOTSTRAP_TIMEOUT_S";

/// The job's secret that authenticates the bootstrap (optional; the local launcher sets a
/// fresh one for its children; set the same on every node of a multi-node job).
pub const BOOTSTRAP_SECRET: &str = "FLASHMOE_BOOTSTRAP_SECRET";

/// Longest bootstrap deadline accepted from the environment (one day).
pub const MAX_BOOTSTRAP_TIMEOUT_S: f64 = 86_400.0;
/// Shortest bootstrap deadline accepted from the environment (1 ms).
pub const MIN_BOOTSTRAP_TIMEOUT_S: f64 = 0.001;
/// Longest `FLASHMOE_BOOTSTRAP_SECRET` accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 4096;

/// The parsed and checked launcher environment of one rank (`Debug` hides the secret).
#[derive(Clone, PartialEq, Eq)]
pub struct WorldEnv {
    /// Global rank, `< world_size`.
    pub rank: usize,
    /// Number of ranks, `1..=MAX_WORLD`.
    pub world_size: usize,
    /// Rank on this node, `< local_world_size` (or `< world_size` when that is not given).
    pub local_rank: usize,
    /// Ranks on this node, when the launcher said.
    pub local_world_size: Option<usize>,
    /// `MASTER_ADDR` as given.
    pub master_addr: String,
    /// `MASTER_PORT`, `1..=65535`.
    pub master_port: u16,
    /// `MASTER_ADDR:MASTER_PORT` resolved (IPv4 preferred).
    pub master: SocketAddr,
    /// Bootstrap deadline from `FLASHMOE_BOOTSTRAP_TIMEOUT_S`, when set.
    pub bootstrap_timeout: Option<Duration>,
    /// The job's secret from `FLASHMOE_BOOTSTRAP_SECRET`, when set.
    pub bootstrap_secret: Option<String>,
}

impl std::fmt::Debug for WorldEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorldEnv")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("local_world_size", &self.local_world_size)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("master", &self.master)
            .field("bootstrap_timeout", &self.bootstrap_timeout)
            .field(
                "bootstrap_secret",
                &self.bootstrap_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn env_err(var: &'static str, reason: impl ToString) -> Error {
    Error::Env {
        var,
        reason: reason.to_string(),
    }
}

fn required(lookup: &dyn Fn(&str) -> Option<String>, var: &'static str) -> Result<String> {
    match lookup(var) {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        Some(_) => Err(env_err(var, "is set but empty")),
        None => Err(env_err(var, "is not set")),
    }
}

fn number(lookup: &dyn Fn(&str) -> Option<String>, var: &'static str) -> Result<usize> {
    let v = required(lookup, var)?;
    v.parse::<usize>()
        .map_err(|_| env_err(var, format!("`{v}` is not a non-negative integer")))
}

fn optional_number(
    lookup: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<usize>> {
    match lookup(var) {
        None => Ok(None),
        Some(_) => number(lookup, var).map(Some),
    }
}

/// Resolves `host:port`, preferring an IPv4 address.
pub fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

impl WorldEnv {
    /// Parses the environment through `lookup` (a variable name to its value), so tests
    /// need not touch the process environment. Every problem is an [`Error::Env`] naming
    /// the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
        let world_size = number(lookup, WORLD_SIZE)?;
        if world_size == 0 || world_size > MAX_WORLD {
            return Err(env_err(
                WORLD_SIZE,
                format!("{world_size} is outside 1..={MAX_WORLD}"),
            ));
        }
        let rank = number(lookup, RANK)?;
        if rank >= world_size {
            return Err(env_err(
                RANK,
                format!("{rank} is not below WORLD_SIZE {world_size}"),
            ));
        }
        let local_world_size = optional_number(lookup, LOCAL_WORLD_SIZE)?;
        if let Some(l) = local_world_size {
            if l == 0 || l > world_size {
                return Err(env_err(
                    LOCAL_WORLD_SIZE,
                    format!("{l} is outside 1..=WORLD_SIZE {world_size}"),
                ));
            }
        }
        let local_rank = number(lookup, LOCAL_RANK)?;
        let (local_limit, limit_name) = match local_world_size {
            Some(l) => (l, LOCAL_WORLD_SIZE),
            None => (world_size, WORLD_SIZE),
        };
        if local_rank >= local_limit {
            return Err(env_err(
                LOCAL_RANK,
                format!("{local_rank} is not below {limit_name} {local_limit}"),
            ));
        }
        let port_text = required(lookup, MASTER_PORT)?;
        let port = port_text
            .parse::<u32>()
            .map_err(|_| env_err(MASTER_PORT, format!("`{port_text}` is not a port number")))?;
        if port == 0 || port > u32::from(u16::MAX) {
            return Err(env_err(MASTER_PORT, format!("{port} is outside 1..=65535")));
        }
        let master_port = port as u16;
        let master_addr = required(lookup, MASTER_ADDR)?;
        let master = resolve(&master_addr, master_port)
            .map_err(|e| env_err(MASTER_ADDR, format!("cannot resolve `{master_addr}`: {e}")))?;
        let bootstrap_timeout = match lookup(BOOTSTRAP_TIMEOUT_S) {
            None => None,
            Some(_) => {
                let t = required(lookup, BOOTSTRAP_TIMEOUT_S)?;
                let secs = t.parse::<f64>().map_err(|_| {
                    env_err(
                        BOOTSTRAP_TIMEOUT_S,
                        format!("`{t}` is not a number of seconds"),
                    )
                })?;
                if !(MIN_BOOTSTRAP_TIMEOUT_S..=MAX_BOOTSTRAP_TIMEOUT_S).contains(&secs) {
                    return Err(env_err(
                        BOOTSTRAP_TIMEOUT_S,
                        format!(
                            "{t} is outside [{MIN_BOOTSTRAP_TIMEOUT_S}, \
                             {MAX_BOOTSTRAP_TIMEOUT_S}] seconds"
                        ),
                    ));
                }
                Some(Duration::from_secs_f64(secs))
            }
        };
        let bootstrap_secret = match lookup(BOOTSTRAP_SECRET) {
            None => None,
            Some(v) if v.is_empty() => return Err(env_err(BOOTSTRAP_SECRET, "is set but empty")),
            Some(v) if v.len() > MAX_SECRET_BYTES => {
                return Err(env_err(
                    BOOTSTRAP_SECRET,
                    format!("has {} bytes, at most {MAX_SECRET_BYTES}", v.len()),
                ))
            }
            Some(v) => Some(v),
        };
        Ok(Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            master,
            bootstrap_timeout,
            bootstrap_secret,
        })
    }

    /// Parses a map of variables (see [`WorldEnv::from_lookup`]).
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self> {
        Self::from_lookup(|k| map.get(k).cloned())
    }

    /// Parses the process environment. A value that is not valid Unicode is reported as
    /// not being a number or address.
    pub fn from_process() -> Result<Self> {
        Self::from_lookup(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// The variables that describe this environment, as a launcher sets them.
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (RANK, self.rank.to_string()),
            (WORLD_SIZE, self.world_size.to_string()),
            (LOCAL_RANK, self.local_rank.to_string()),
            (MASTER_ADDR, self.master_addr.clone()),
            (MASTER_PORT, self.master_port.to_string()),
        ];
        if let Some(l) = self.local_world_size {
            v.push((LOCAL_WORLD_SIZE, l.to_string()));
        }
        if let Some(t) = self.bootstrap_timeout {
            v.push((BOOTSTRAP_TIMEOUT_S, t.as_secs_f64().to_string()));
        }
        if let Some(s) = &self.bootstrap_secret {
            v.push((BOOTSTRAP_SECRET, s.clone()));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> HashMap<String, String> {
        [
            (RANK, "2"),
            (WORLD_SIZE, "4"),
            (LOCAL_RANK, "2"),
            (MASTER_ADDR, "127.0.0.1"),
            (MASTER_PORT, "29500"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn with(changes: &[(&str, Option<&str>)]) -> Result<WorldEnv> {
        let mut m = good();
        for (k, v) in changes {
            match v {
                Some(v) => m.insert(k.to_string(), v.to_string()),
                None => m.remove(*k),
            };
        }
        WorldEnv::from_map(&m)
    }

    fn expect_var(r: Result<WorldEnv>, var: &str, needle: &str) {
        match r {
            Err(Error::Env { var: v, reason }) => {
                assert_eq!(v, var, "{reason}");
                assert!(reason.contains(needle), "`{reason}` lacks `{needle}`");
            }
            other => panic!("expected Env error on {var}, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_good_environment_and_round_trips() {
        let e = WorldEnv::from_map(&good()).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (2, 4, 2));
        assert_eq!(e.master, "127.0.0.1:29500".parse().unwrap());
        assert_eq!(e.bootstrap_timeout, None);
        let back: HashMap<String, String> = e
            .to_vars()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(WorldEnv::from_map(&back).unwrap(), e);
    }

    #[test]
    fn localhost_and_timeouts_parse() {
        let e = with(&[
            (MASTER_ADDR, Some("localhost")),
            (BOOTSTRAP_TIMEOUT_S, Some("2.5")),
            (LOCAL_WORLD_SIZE, Some("3")),
        ])
        .unwrap();
        assert!(e.master.ip().is_loopback());
        assert_eq!(e.bootstrap_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(e.local_world_size, Some(3));
    }

    #[test]
    fn every_missing_variable_is_named() {
        for var in [RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT] {
            expect_var(with(&[(var, None)]), var, "not set");
            expect_var(with(&[(var, Some("  "))]), var, "empty");
        }
    }

    #[test]
    fn non_numeric_values_are_named() {
        for var in [RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE] {
            expect_var(with(&[(var, Some("two"))]), var, "`two`");
            expect_var(with(&[(var, Some("-1"))]), var, "`-1`");
        }
        expect_var(with(&[(MASTER_PORT, Some("http"))]), MASTER_PORT, "`http`");
        expect_var(
            with(&[(BOOTSTRAP_TIMEOUT_S, Some("soon"))]),
            BOOTSTRAP_TIMEOUT_S,
            "`soon`",
        );
    }

    #[test]
    fn out_of_range_values_are_named_with_the_limit() {
        expect_var(with(&[(RANK, Some("4"))]), RANK, "WORLD_SIZE 4");
        expect_var(with(&[(WORLD_SIZE, Some("0"))]), WORLD_SIZE, "1..=");
        let too_big = (MAX_WORLD + 1).to_string();
        expect_var(with(&[(WORLD_SIZE, Some(&too_big))]), WORLD_SIZE, "1..=");
        expect_var(with(&[(LOCAL_RANK, Some("4"))]), LOCAL_RANK, "WORLD_SIZE 4");
        expect_var(
            with(&[(LOCAL_WORLD_SIZE, Some("2"))]),
            LOCAL_RANK,
            "LOCAL_WORLD_SIZE 2",
        );
        expect_var(
            with(&[(LOCAL_WORLD_SIZE, Some("5"))]),
            LOCAL_WORLD_SIZE,
            "1..=",
        );
        expect_var(
            with(&[(LOCAL_WORLD_SIZE, Some("0"))]),
            LOCAL_WORLD_SIZE,
            "1..=",
        );
        expect_var(with(&[(MASTER_PORT, Some("0"))]), MASTER_PORT, "1..=65535");
        expect_var(
            with(&[(MASTER_PORT, Some("65536"))]),
            MASTER_PORT,
            "1..=65535",
        );
        for t in ["0", "-1", "NaN", "1e9", "1e-300", "inf"] {
            expect_var(
                with(&[(BOOTSTRAP_TIMEOUT_S, Some(t))]),
                BOOTSTRAP_TIMEOUT_S,
                "outside",
            );
        }
    }

    #[test]
    fn the_secret_round_trips_is_hidden_from_debug_and_must_not_be_empty() {
        let e = with(&[(BOOTSTRAP_SECRET, Some("s3cret-value"))]).unwrap();
        assert_eq!(e.bootstrap_secret.as_deref(), Some("s3cret-value"));
        assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
        let back: HashMap<String, String> = e
            .to_vars()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(WorldEnv::from_map(&back).unwrap(), e);
        expect_var(
            with(&[(BOOTSTRAP_SECRET, Some(""))]),
            BOOTSTRAP_SECRET,
            "empty",
        );
        let long = "x".repeat(MAX_SECRET_BYTES + 1);
        expect_var(
            with(&[(BOOTSTRAP_SECRET, Some(&long))]),
            BOOTSTRAP_SECRET,
            "at most",
        );
    }

    #[test]
    fn unresolvable_address_is_named() {
        expect_var(
            with(&[(MASTER_ADDR, Some("no-such-host.invalid"))]),
            MASTER_ADDR,
            "no-such-host.invalid",
        );
        expect_var(
            with(&[(MASTER_ADDR, Some("not an address!"))]),
            MASTER_ADDR,
            "cannot resolve",
        );
    }
}
