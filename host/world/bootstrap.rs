//! Rendezvous of the ranks over TCP, and the hand-over of NVSHMEM's unique id.
//!
//! Rank 0 listens on `MASTER_ADDR:MASTER_PORT` and admits `WORLD_SIZE - 1` peers. Each
//! peer retries connecting until its deadline (rank 0 may start later), receives a
//! challenge (a fresh nonce) and answers with a hello: magic, protocol version, rank,
//! world size, the job tag of its secret, its own nonce and an HMAC-SHA256 proof keyed
//! with the job's secret (`FLASHMOE_BOOTSTRAP_SECRET`; see [`auth`]). Rank 0 refuses, logs
//! and forgets a connection whose hello is foreign, unauthenticated, for another world,
//! for a rank out of range or for a rank already taken (the newcomer is refused, the first
//! claim stays), and keeps listening; a silent or trickling connection is dropped after
//! [`HELLO_TIMEOUT`] without holding up the others. When its deadline passes it names the
//! ranks that never joined and the connections it refused. Once everyone joined, it
//! welcomes every peer with its own proof; the connections stay open for
//! [`Rendezvous::broadcast`] (rank 0's unique id) and [`Rendezvous::all_gather`].
//! Every frame read and write has one total deadline; when rank 0 fails it tells the
//! connected peers.

mod auth;
mod lobby;
mod wire;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::config::MAX_WORLD;
use crate::error::{Error, Result};
use crate::world::env::WorldEnv;
use lobby::Lobby;
use wire::{Header, Kind, Reject};

pub use auth::Secret;
pub use wire::{MAGIC, MAX_DATA, PROTOCOL};

/// Bytes of NVSHMEM's unique id.
pub const UNIQUE_ID_BYTES: usize = 128;
/// How long rank 0 waits for the hello of a fresh connection (a peer sends it at once;
/// a silent stranger is dropped after it, and holds up nobody meanwhile).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of each bootstrap step unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest deadline of a bootstrap step (one day).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Deadlines and secret of the bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootstrapOptions {
    /// Deadline of each step (joining, one broadcast, one gather), at most
    /// [`MAX_TIMEOUT`].
    pub timeout: Duration,
    /// Pause between connection attempts of a peer while rank 0 is not listening yet
    /// (at most `timeout`).
    pub retry_interval: Duration,
    /// The job's secret; `None`: any host that can reach rank 0's port can join.
    pub secret: Option<Secret>,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            retry_interval: Duration::from_millis(100),
            secret: None,
        }
    }
}

impl BootstrapOptions {
    /// Defaults, with the deadline of `FLASHMOE_BOOTSTRAP_TIMEOUT_S` and the secret of
    /// `FLASHMOE_BOOTSTRAP_SECRET` when they were set.
    pub fn from_env(env: &WorldEnv) -> Self {
        Self {
            timeout: env.bootstrap_timeout.unwrap_or(DEFAULT_TIMEOUT),
            secret: env.bootstrap_secret.as_deref().map(Secret::from_text),
            ..Self::default()
        }
    }

    /// Checks the deadlines: a zero or overlong timeout, or a retry interval longer than
    /// the timeout, is an [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<()> {
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err(Error::config(
                "bootstrap.timeout",
                format!("{:?}", self.timeout),
                format!("more than 0 and at most {} s", MAX_TIMEOUT.as_secs()),
            ));
        }
        if self.retry_interval > self.timeout {
            return Err(Error::config(
                "bootstrap.retry_interval",
                format!("{:?}", self.retry_interval),
                format!("at most the timeout ({:?})", self.timeout),
            ));
        }
        Ok(())
    }

    /// The deadline of a step that starts now.
    fn deadline(&self) -> Result<Instant> {
        self.validate()?;
        wire::deadline_after(self.timeout).ok_or_else(|| {
            Error::config(
                "bootstrap.timeout",
                format!("{:?}", self.timeout),
                "not representable as a deadline",
            )
        })
    }
}

enum Role {
    /// `peers[r - 1]` is the connection of rank `r`.
    Master {
        peers: Vec<TcpStream>,
    },
    Peer {
        stream: TcpStream,
    },
}

/// The joined ranks, with their connections to rank 0 kept open.
pub struct Rendezvous {
    rank: usize,
    world: usize,
    master: SocketAddr,
    opts: BootstrapOptions,
    role: Role,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

fn boot(msg: String) -> Error {
    Error::Bootstrap(msg)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn io_reason(e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("nothing within {}", secs(timeout))
        }
        std::io::ErrorKind::UnexpectedEof => "connection closed".to_string(),
        _ => e.to_string(),
    }
}

fn check_world(world: usize) -> Result<u32> {
    if world == 0 || world > MAX_WORLD {
        return Err(Error::config(
            "world",
            world,
            format!("between 1 and {MAX_WORLD}"),
        ));
    }
    Ok(world as u32)
}

/// Said once at start-up by a rank that joins a world without a secret.
fn warn_without_secret(rank: usize, master: SocketAddr) {
    eprintln!(
        "flashmoe bootstrap: rank {rank}: FLASHMOE_BOOTSTRAP_SECRET is not set: any host that \
         can reach {master} can join or disturb this job; set the same secret on every node"
    );
}

impl Rendezvous {
    /// Joins the world described by `env`: rank 0 listens on `MASTER_ADDR:MASTER_PORT`,
    /// the others connect to it. A world of one rank opens no socket.
    pub fn connect(env: &WorldEnv, opts: BootstrapOptions) -> Result<Self> {
        opts.validate()?;
        if env.world_size == 1 {
            return Ok(Self {
                rank: 0,
                world: 1,
                master: env.master,
                opts,
                role: Role::Master { peers: Vec::new() },
            });
        }
        if env.rank == 0 {
            let listener = TcpListener::bind(env.master).map_err(|e| {
                boot(format!(
                    "rank 0 cannot listen on MASTER_ADDR:MASTER_PORT = {} ({}): {e}",
                    env.master, env.master_addr
                ))
            })?;
            Self::master(listener, env.world_size, opts)
        } else {
            Self::peer(env.rank, env.world_size, env.master, opts)
        }
    }

    /// Rank 0's side on an already bound listener: admits `world - 1` authenticated peers
    /// before the deadline (refusing and logging every other connection) and welcomes
    /// them.
    pub fn master(listener: TcpListener, world: usize, opts: BootstrapOptions) -> Result<Self> {
        let world32 = check_world(world)?;
        let deadline = opts.deadline()?;
        let master = listener
            .local_addr()
            .map_err(|e| boot(format!("rank 0: listener has no address: {e}")))?;
        if opts.secret.is_none() && world > 1 {
            warn_without_secret(0, master);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| boot(format!("rank 0: cannot poll the listener on {master}: {e}")))?;
        let mut lobby = Lobby::new(world, opts.secret.as_ref(), HELLO_TIMEOUT.min(opts.timeout));
        while !lobby.full() {
            if Instant::now() >= deadline {
                let missing = lobby.missing();
                let mut msg = format!(
                    "rank 0 (listening on {master}): rank(s) {missing:?} of {world} did not \
                     join within {}",
                    secs(opts.timeout)
                );
                let refused = lobby.refusals();
                if !refused.is_empty() {
                    msg.push_str(&format!("; refused: {refused}"));
                }
                let first = missing.first().map_or(u32::MAX, |&r| r as u32);
                let mut joined: Vec<TcpStream> = lobby
                    .slots
                    .into_iter()
                    .flatten()
                    .map(|j| j.stream)
                    .collect();
                Self::abort_peers_detail(&mut joined, first);
                return Err(boot(msg));
            }
            if !lobby.step(&listener) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let mut peers = Vec::with_capacity(world - 1);
        let slots = std::mem::take(&mut lobby.slots);
        for (r, j) in slots.into_iter().enumerate().skip(1) {
            let Some(mut j) = j else {
                return Err(boot(format!("rank 0: rank {r} lost")));
            };
            let proof = auth::welcome_mac(opts.secret.as_ref(), &j.nonces, world32);
            if let Err(e) = wire::send(
                &mut j.stream,
                Header::new(Kind::Welcome, world32, 0),
                &proof,
                deadline,
            ) {
                Self::abort_peers(&mut peers, r);
                return Err(boot(format!(
                    "rank 0: cannot welcome rank {r}: {}",
                    io_reason(&e, opts.timeout)
                )));
            }
            peers.push(j.stream);
        }
        Ok(Self {
            rank: 0,
            world,
            master,
            opts,
            role: Role::Master { peers },
        })
    }

    /// A peer's side: connects to rank 0 at `master` (retrying until the deadline),
    /// answers its challenge with a hello and waits to be welcomed by a rank 0 that
    /// proves it knows the same secret.
    pub fn peer(
        rank: usize,
        world: usize,
        master: SocketAddr,
        opts: BootstrapOptions,
    ) -> Result<Self> {
        let world32 = check_world(world)?;
        if rank == 0 || rank >= world {
            return Err(boot(format!(
                "rank {rank} is not a peer rank of a world of {world}"
            )));
        }
        let rank32 = rank as u32;
        let deadline = opts.deadline()?;
        if opts.secret.is_none() {
            warn_without_secret(rank, master);
        }
        let mut stream = Self::dial(rank, master, &opts, deadline)?;
        let io = |e: std::io::Error, what: &str| {
            boot(format!(
                "rank {rank}: {what} rank 0 at {master}: {}",
                io_reason(&e, opts.timeout)
            ))
        };
        stream
            .set_nodelay(true)
            .map_err(|e| io(e, "cannot configure the connection to"))?;
        let h = wire::recv_header(&mut stream, deadline).map_err(|e| io(e, "no challenge from"))?;
        Self::expect_from_master(rank, &h, Kind::Challenge)?;
        let theirs =
            wire::recv_token(&mut stream, deadline).map_err(|e| io(e, "no challenge from"))?;
        let nonces = (theirs, auth::nonce());
        let secret = opts.secret.as_ref();
        let hello = wire::Hello {
            rank: rank32,
            world: world32,
            tag: auth::job_tag(secret),
            nonce: nonces.1,
            proof: auth::hello_mac(secret, &nonces, rank32, world32),
        };
        wire::write_full(&mut stream, &hello.encode(), deadline)
            .map_err(|e| io(e, "cannot say hello to"))?;
        let h = wire::recv_header(&mut stream, deadline)
            .map_err(|e| io(e, "no welcome (not every rank joined?) from"))?;
        Self::expect_from_master(rank, &h, Kind::Welcome)?;
        if h.a != world32 {
            return Err(boot(format!(
                "rank {rank}: rank 0 welcomed a world of {}, expected {world}",
                h.a
            )));
        }
        let proof =
            wire::recv_token(&mut stream, deadline).map_err(|e| io(e, "no welcome from"))?;
        if !auth::welcome_ok(secret, &nonces, world32, &proof) {
            return Err(boot(format!(
                "rank {rank}: the listener at {master} could not prove it knows this job's \
                 FLASHMOE_BOOTSTRAP_SECRET: not our rank 0"
            )));
        }
        Ok(Self {
            rank,
            world,
            master,
            opts,
            role: Role::Peer { stream },
        })
    }

    /// Connects to rank 0, retrying until the deadline.
    fn dial(
        rank: usize,
        master: SocketAddr,
        opts: &BootstrapOptions,
        deadline: Instant,
    ) -> Result<TcpStream> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left
                .min(Duration::from_secs(2))
                .max(Duration::from_millis(1));
            match TcpStream::connect_timeout(&master, attempt) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if left <= opts.retry_interval {
                        return Err(boot(format!(
                            "rank {rank}: cannot reach rank 0 at MASTER_ADDR:MASTER_PORT = {master} \
                             within {}: {e}",
                            secs(opts.timeout)
                        )));
                    }
                    std::thread::sleep(opts.retry_interval);
                }
            }
        }
    }

    fn expect_from_master(rank: usize, h: &Header, kind: Kind) -> Result<()> {
        if !h.is_ours() {
            return Err(boot(format!(
                "rank {rank}: rank 0 answered with a foreign frame (magic {:#x}, protocol {})",
                h.magic, h.protocol
            )));
        }
        if h.kind == Kind::Reject as u16 {
            return Err(boot(format!(
                "rank {rank}: refused by rank 0: {}",
                Reject::describe(h.a, h.b)
            )));
        }
        if h.kind != kind as u16 {
            return Err(boot(format!(
                "rank {rank}: expected a {kind:?} frame from rank 0, got kind {}",
                h.kind
            )));
        }
        Ok(())
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0's address.
    pub fn master_addr(&self) -> SocketAddr {
        self.master
    }

    fn abort_peers(peers: &mut [TcpStream], culprit: usize) {
        Self::abort_peers_detail(peers, u32::try_from(culprit).unwrap_or(u32::MAX));
    }

    fn abort_peers_detail(peers: &mut [TcpStream], detail: u32) {
        for s in peers.iter_mut() {
            let h = Header::new(Kind::Reject, Reject::Aborted as u32, detail);
            let _ = wire::send(s, h, &[], Instant::now() + Duration::from_millis(200));
        }
    }

    /// Rank 0 sends `payload` to every rank; every rank returns it. Peers pass `None`
    /// (their argument is ignored).
    pub fn broadcast(&mut self, payload: Option<&[u8]>) -> Result<Vec<u8>> {
        let deadline = self.opts.deadline()?;
        let (rank, timeout) = (self.rank, self.opts.timeout);
        match &mut self.role {
            Role::Master { peers } => {
                let data =
                    payload.ok_or_else(|| boot("rank 0: broadcast without a payload".into()))?;
                if data.len() > MAX_DATA {
                    Self::abort_peers(peers, 0);
                    return Err(boot(format!(
                        "rank 0: broadcast of {} bytes exceeds the limit of {MAX_DATA}",
                        data.len()
                    )));
                }
                let h = Header::new(Kind::Data, data.len() as u32, 0);
                for r in 0..peers.len() {
                    if let Err(e) = wire::send(&mut peers[r], h, data, deadline) {
                        Self::abort_peers(peers, r + 1);
                        return Err(boot(format!(
                            "rank 0: cannot send to rank {}: {}",
                            r + 1,
                            io_reason(&e, timeout)
                        )));
                    }
                }
                Ok(data.to_vec())
            }
            Role::Peer { stream } => Self::recv_data(rank, stream, deadline, timeout),
        }
    }

    fn recv_data(
        rank: usize,
        stream: &mut TcpStream,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let io = |e: std::io::Error| {
            boot(format!(
                "rank {rank}: waiting for rank 0: {}",
                io_reason(&e, timeout)
            ))
        };
        let h = wire::recv_header(stream, deadline).map_err(io)?;
        Self::expect_from_master(rank, &h, Kind::Data)?;
        if h.a as usize > MAX_DATA {
            return Err(boot(format!(
                "rank {rank}: rank 0 announced {} bytes, over the limit of {MAX_DATA}",
                h.a
            )));
        }
        wire::recv_payload(stream, h.a as usize, deadline).map_err(io)
    }

    /// Every rank contributes `mine`; every rank returns all contributions in rank order.
    /// With an empty contribution this is a barrier.
    pub fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let deadline = self.opts.deadline()?;
        let (rank, world, timeout) = (self.rank, self.world, self.opts.timeout);
        let limit = MAX_DATA / world.max(1) - 4;
        if mine.len() > limit {
            return Err(boot(format!(
                "rank {rank}: all-gather contribution of {} bytes exceeds {limit} \
                 (the limit for a world of {world})",
                mine.len()
            )));
        }
        match &mut self.role {
            Role::Master { peers } => {
                let mut parts = Vec::with_capacity(world);
                parts.push(mine.to_vec());
                for r in 1..world {
                    let got = wire::recv_header(&mut peers[r - 1], deadline)
                        .map_err(|e| (e, "sent nothing"))
                        .and_then(|h| {
                            if !h.is_ours() || h.kind != Kind::Data as u16 || h.a as usize > limit {
                                return Err((
                                    std::io::Error::other(format!(
                                        "bad frame (kind {}, {} bytes)",
                                        h.kind, h.a
                                    )),
                                    "sent a bad frame",
                                ));
                            }
                            wire::recv_payload(&mut peers[r - 1], h.a as usize, deadline)
                                .map_err(|e| (e, "sent a short contribution"))
                        });
                    match got {
                        Ok(p) => parts.push(p),
                        Err((e, what)) => {
                            Self::abort_peers(peers, r);
                            return Err(boot(format!(
                                "rank 0: all-gather: rank {r} {what}: {}",
                                io_reason(&e, timeout)
                            )));
                        }
                    }
                }
                let packed = wire::pack(&parts);
                let h = Header::new(Kind::Data, packed.len() as u32, 0);
                for r in 0..peers.len() {
                    if let Err(e) = wire::send(&mut peers[r], h, &packed, deadline) {
                        Self::abort_peers(peers, r + 1);
                        return Err(boot(format!(
                            "rank 0: all-gather: cannot send to rank {}: {}",
                            r + 1,
                            io_reason(&e, timeout)
                        )));
                    }
                }
                Ok(parts)
            }
            Role::Peer { stream } => {
                let h = Header::new(Kind::Data, mine.len() as u32, 0);
                wire::send(stream, h, mine, deadline).map_err(|e| {
                    boot(format!(
                        "rank {rank}: all-gather: cannot send to rank 0: {}",
                        io_reason(&e, timeout)
                    ))
                })?;
                let packed = Self::recv_data(rank, stream, deadline, timeout)?;
                wire::unpack(&packed, world).ok_or_else(|| {
                    boot(format!(
                        "rank {rank}: all-gather: malformed result of {} bytes from rank 0",
                        packed.len()
                    ))
                })
            }
        }
    }

    /// Waits until every rank reached this point.
    pub fn barrier(&mut self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
}

/// Joins the world and hands rank 0's 128-byte unique id (made by `make_id`, called on
/// rank 0 only) to every rank. Returns the id and the open rendezvous.
pub fn exchange_unique_id(
    env: &WorldEnv,
    opts: BootstrapOptions,
    make_id: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES]>,
) -> Result<([u8; UNIQUE_ID_BYTES], Rendezvous)> {
    let mut rv = Rendezvous::connect(env, opts)?;
    let id = if rv.rank() == 0 {
        match make_id() {
            Ok(id) => rv.broadcast(Some(&id))?,
            Err(e) => {
                if let Role::Master { peers } = &mut rv.role {
                    Rendezvous::abort_peers(peers, 0);
                }
                return Err(e);
            }
        }
    } else {
        rv.broadcast(None)?
    };
    let id: [u8; UNIQUE_ID_BYTES] = id.as_slice().try_into().map_err(|_| {
        boot(format!(
            "rank {}: unique id of {} bytes, expected {UNIQUE_ID_BYTES}",
            rv.rank(),
            id.len()
        ))
    })?;
    Ok((id, rv))
}

#[cfg(test)]
mod tests;
