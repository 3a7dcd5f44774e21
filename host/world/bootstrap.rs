//! Rendezvous of the ranks over TCP, and the hand-over of NVSHMEM's unique id.
//!
//! Rank 0 listens on `MASTER_ADDR:MASTER_PORT` and accepts `WORLD_SIZE - 1` peers. Each
//! peer retries connecting until its deadline (rank 0 may start later), then sends a hello
//! (magic, protocol version, rank, world size). Rank 0 refuses a wrong world size, a rank
//! out of range or a rank that already joined, and names the ranks that never joined when
//! its deadline passes. Once everyone joined, it welcomes every peer; the connections stay
//! open for [`Rendezvous::broadcast`] (rank 0's unique id) and [`Rendezvous::all_gather`].
//! Every socket operation has a deadline; when rank 0 fails it tells the connected peers.

mod wire;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::world::env::WorldEnv;
use wire::{Header, Kind, Reject};

pub use wire::{MAGIC, MAX_DATA, PROTOCOL};

/// Bytes of NVSHMEM's unique id.
pub const UNIQUE_ID_BYTES: usize = 128;
/// How long rank 0 waits for the hello of a fresh connection (a peer sends it at once;
/// a silent stranger must not hold up the others).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of each bootstrap step unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Deadlines of the bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootstrapOptions {
    /// Deadline of each step (joining, one broadcast, one gather).
    pub timeout: Duration,
    /// Pause between connection attempts of a peer while rank 0 is not listening yet.
    pub retry_interval: Duration,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            retry_interval: Duration::from_millis(100),
        }
    }
}

impl BootstrapOptions {
    /// Defaults, with the deadline of `FLASHMOE_BOOTSTRAP_TIMEOUT_S` when it was set.
    pub fn from_env(env: &WorldEnv) -> Self {
        Self {
            timeout: env.bootstrap_timeout.unwrap_or(DEFAULT_TIMEOUT),
            ..Self::default()
        }
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

fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| boot(format!("{what} {v} does not fit the protocol's u32")))
}

impl Rendezvous {
    /// Joins the world described by `env`: rank 0 listens on `MASTER_ADDR:MASTER_PORT`,
    /// the others connect to it. A world of one rank opens no socket.
    pub fn connect(env: &WorldEnv, opts: BootstrapOptions) -> Result<Self> {
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

    /// Rank 0's side on an already bound listener: accepts `world - 1` peers before the
    /// deadline and welcomes them.
    pub fn master(listener: TcpListener, world: usize, opts: BootstrapOptions) -> Result<Self> {
        let master = listener
            .local_addr()
            .map_err(|e| boot(format!("rank 0: listener has no address: {e}")))?;
        let world32 = to_u32("world size", world)?;
        let deadline = Instant::now() + opts.timeout;
        let mut slots: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut joined = 1usize;
        let mut refused: Vec<String> = Vec::new();
        listener
            .set_nonblocking(true)
            .map_err(|e| boot(format!("rank 0: cannot poll the listener on {master}: {e}")))?;
        let fail = |slots: &mut Vec<Option<TcpStream>>, detail: u32, msg: String| -> Error {
            for s in slots.iter_mut().flatten() {
                let h = Header::new(Kind::Reject, Reject::Aborted as u32, detail);
                let _ = wire::send(s, h, &[], Instant::now() + Duration::from_millis(200));
            }
            boot(msg)
        };
        while joined < world {
            let (mut s, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|&r| slots[r].is_none()).collect();
                        let mut msg = format!(
                            "rank 0 (listening on {master}): rank(s) {missing:?} of {world} did not \
                             join within {}",
                            secs(opts.timeout)
                        );
                        if !refused.is_empty() {
                            msg.push_str(&format!("; refused: {}", refused.join("; ")));
                        }
                        let first = missing.first().map_or(u32::MAX, |&r| r as u32);
                        return Err(fail(&mut slots, first, msg));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => {
                    return Err(fail(
                        &mut slots,
                        u32::MAX,
                        format!("rank 0: accept on {master} failed: {e}"),
                    ))
                }
            };
            let hello = s
                .set_nonblocking(false)
                .and_then(|_| s.set_nodelay(true))
                .and_then(|_| {
                    wire::recv_header(&mut s, deadline.min(Instant::now() + HELLO_TIMEOUT))
                });
            let h = match hello {
                Ok(h) => h,
                Err(e) => {
                    refused.push(format!(
                        "{from}: no hello ({})",
                        io_reason(&e, opts.timeout)
                    ));
                    continue;
                }
            };
            let reject = |s: &mut TcpStream, why: Reject, detail: u32| {
                let h = Header::new(Kind::Reject, why as u32, detail);
                let _ = wire::send(s, h, &[], Instant::now() + Duration::from_millis(200));
            };
            if !h.is_ours() || h.kind != Kind::Hello as u16 {
                reject(&mut s, Reject::BadProtocol, u32::from(PROTOCOL));
                refused.push(format!(
                    "{from}: not a flashmoe bootstrap hello (magic {:#x}, protocol {}, kind {})",
                    h.magic, h.protocol, h.kind
                ));
                continue;
            }
            let (rank, their_world) = (h.a as usize, h.b as usize);
            if their_world != world {
                reject(&mut s, Reject::WrongWorld, world32);
                return Err(fail(
                    &mut slots,
                    h.a,
                    format!(
                        "rank 0: rank {rank} (from {from}) has WORLD_SIZE {their_world}, rank 0 has {world}"
                    ),
                ));
            }
            if rank == 0 || rank >= world {
                reject(&mut s, Reject::BadRank, h.a);
                return Err(fail(
                    &mut slots,
                    h.a,
                    format!("rank 0: a peer from {from} claims rank {rank}, not in 1..{world}"),
                ));
            }
            if slots[rank].is_some() {
                reject(&mut s, Reject::DuplicateRank, h.a);
                return Err(fail(
                    &mut slots,
                    h.a,
                    format!("rank 0: rank {rank} joined twice (second time from {from})"),
                ));
            }
            slots[rank] = Some(s);
            joined += 1;
        }
        let mut peers = Vec::with_capacity(world - 1);
        for (r, s) in slots.into_iter().enumerate().skip(1) {
            let mut s = s.ok_or_else(|| boot(format!("rank 0: rank {r} lost")))?;
            wire::send(
                &mut s,
                Header::new(Kind::Welcome, world32, 0),
                &[],
                deadline,
            )
            .map_err(|e| {
                boot(format!(
                    "rank 0: cannot welcome rank {r}: {}",
                    io_reason(&e, opts.timeout)
                ))
            })?;
            peers.push(s);
        }
        Ok(Self {
            rank: 0,
            world,
            master,
            opts,
            role: Role::Master { peers },
        })
    }

    /// A peer's side: connects to rank 0 at `master` (retrying until the deadline), says
    /// hello and waits to be welcomed.
    pub fn peer(
        rank: usize,
        world: usize,
        master: SocketAddr,
        opts: BootstrapOptions,
    ) -> Result<Self> {
        if rank == 0 || rank >= world {
            return Err(boot(format!(
                "rank {rank} is not a peer rank of a world of {world}"
            )));
        }
        let (rank32, world32) = (to_u32("rank", rank)?, to_u32("world size", world)?);
        let deadline = Instant::now() + opts.timeout;
        let mut stream = loop {
            let attempt = wire::left(deadline).min(Duration::from_secs(2));
            match TcpStream::connect_timeout(&master, attempt) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() + opts.retry_interval >= deadline {
                        return Err(boot(format!(
                            "rank {rank}: cannot reach rank 0 at MASTER_ADDR:MASTER_PORT = {master} \
                             within {}: {e}",
                            secs(opts.timeout)
                        )));
                    }
                    std::thread::sleep(opts.retry_interval);
                }
            }
        };
        let io = |e: std::io::Error, what: &str| {
            boot(format!(
                "rank {rank}: {what} rank 0 at {master}: {}",
                io_reason(&e, opts.timeout)
            ))
        };
        stream
            .set_nodelay(true)
            .map_err(|e| io(e, "cannot configure the connection to"))?;
        wire::send(
            &mut stream,
            Header::new(Kind::Hello, rank32, world32),
            &[],
            deadline,
        )
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
        Ok(Self {
            rank,
            world,
            master,
            opts,
            role: Role::Peer { stream },
        })
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
        for s in peers.iter_mut() {
            let h = Header::new(Kind::Reject, Reject::Aborted as u32, culprit as u32);
            let _ = wire::send(s, h, &[], Instant::now() + Duration::from_millis(200));
        }
    }

    /// Rank 0 sends `payload` to every rank; every rank returns it. Peers pass `None`
    /// (their argument is ignored).
    pub fn broadcast(&mut self, payload: Option<&[u8]>) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.opts.timeout;
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
        let deadline = Instant::now() + self.opts.timeout;
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
