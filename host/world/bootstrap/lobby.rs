//! Rank 0's lobby: the connections that have not said a valid hello yet.
//!
//! Every new connection gets a challenge at once and is then polled without blocking, so
//! a silent or trickling stranger holds up nobody: it is dropped after the hello timeout.
//! A connection whose hello is not ours, not authenticated, for another world, for a rank
//! out of range or for a rank already taken is refused (the reason is sent back and
//! logged) and rank 0 keeps listening; only its own deadline ends the rendezvous.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::auth::{self, Secret, Token};
use super::wire::{self, Header, Hello, HelloParse, Kind, Reject, HELLO_FRAME};

/// Most connections waiting for their hello at once; more are refused until some leave.
pub const MAX_PENDING: usize = 64;
/// Refusals kept word for word for the final error (the others are counted).
const MAX_REFUSALS_KEPT: usize = 16;

/// A rank that joined: its connection and the nonces of its handshake.
pub struct Joined {
    /// The connection, blocking again.
    pub stream: TcpStream,
    /// (rank 0's nonce, the peer's nonce).
    pub nonces: (Token, Token),
}

struct Pending {
    stream: TcpStream,
    from: SocketAddr,
    nonce: Token,
    buf: Vec<u8>,
    since: Instant,
}

/// The connections of a rendezvous in progress on rank 0.
pub struct Lobby<'a> {
    world: usize,
    secret: Option<&'a Secret>,
    hello_timeout: Duration,
    /// `slots[r]`: rank r once it joined (`slots[0]` stays empty).
    pub slots: Vec<Option<Joined>>,
    pending: Vec<Pending>,
    refused: Vec<String>,
    refused_total: usize,
}

impl<'a> Lobby<'a> {
    /// An empty lobby for `world` ranks (at least 1).
    pub fn new(world: usize, secret: Option<&'a Secret>, hello_timeout: Duration) -> Self {
        Lobby {
            world,
            secret,
            hello_timeout,
            slots: (0..world).map(|_| None).collect(),
            pending: Vec::new(),
            refused: Vec::new(),
            refused_total: 0,
        }
    }

    /// Whether every peer rank joined.
    pub fn full(&self) -> bool {
        self.slots.iter().skip(1).all(Option::is_some)
    }

    /// The peer ranks that have not joined.
    pub fn missing(&self) -> Vec<usize> {
        (1..self.world)
            .filter(|&r| self.slots[r].is_none())
            .collect()
    }

    /// The refusals so far, for the final error ("" when none).
    pub fn refusals(&self) -> String {
        let mut s = self.refused.join("; ");
        if self.refused_total > self.refused.len() {
            s.push_str(&format!(
                "; and {} more",
                self.refused_total - self.refused.len()
            ));
        }
        s
    }

    fn log(&mut self, from: SocketAddr, reason: String) {
        let line = format!("{from}: {reason}");
        eprintln!("flashmoe bootstrap: rank 0 ignored a connection from {line}");
        self.refused_total += 1;
        if self.refused.len() < MAX_REFUSALS_KEPT {
            self.refused.push(line);
        }
    }

    /// Accepts new connections, reads what the waiting ones sent and admits or refuses
    /// them. Returns whether anything happened (the caller sleeps briefly otherwise).
    pub fn step(&mut self, listener: &TcpListener) -> bool {
        let mut progress = self.accept_new(listener);
        let mut i = 0;
        while i < self.pending.len() {
            match self.poll(i) {
                None => i += 1,
                Some(outcome) => {
                    progress = true;
                    let p = self.pending.swap_remove(i);
                    self.settle(p, outcome);
                }
            }
        }
        progress
    }

    fn accept_new(&mut self, listener: &TcpListener) -> bool {
        let mut progress = false;
        loop {
            let (mut stream, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return progress,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of file descriptors: not fatal, the deadline still holds.
                    eprintln!("flashmoe bootstrap: rank 0: accept failed: {e}");
                    return progress;
                }
            };
            progress = true;
            if self.pending.len() >= MAX_PENDING {
                self.log(
                    from,
                    format!("over {MAX_PENDING} connections awaiting a hello"),
                );
                continue;
            }
            let nonce = auth::nonce();
            let mut frame = Header::new(Kind::Challenge, 0, 0).encode().to_vec();
            frame.extend_from_slice(&nonce);
            let ready = stream
                .set_nodelay(true)
                .and_then(|_| {
                    wire::write_full(
                        &mut stream,
                        &frame,
                        Instant::now() + Duration::from_millis(200),
                    )
                })
                .and_then(|_| stream.set_nonblocking(true));
            match ready {
                Ok(()) => self.pending.push(Pending {
                    stream,
                    from,
                    nonce,
                    buf: Vec::with_capacity(HELLO_FRAME),
                    since: Instant::now(),
                }),
                Err(e) => self.log(from, format!("cannot send the challenge: {e}")),
            }
        }
    }

    /// `None` while the hello is incomplete and in time; else what to do with it.
    fn poll(&mut self, i: usize) -> Option<Outcome> {
        let p = &mut self.pending[i];
        loop {
            let need = match wire::parse_hello(&p.buf) {
                HelloParse::NeedMore(n) => n,
                HelloParse::Bad(why) => return Some(Outcome::Refuse(Reject::BadProtocol, why)),
                HelloParse::Done(h) => return Some(Outcome::Hello(h)),
            };
            let mut chunk = [0u8; HELLO_FRAME];
            match p.stream.read(&mut chunk[..need]) {
                Ok(0) => return Some(Outcome::Drop("closed before its hello".into())),
                Ok(n) => p.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return (p.since.elapsed() >= self.hello_timeout).then(|| {
                        Outcome::Drop(format!(
                            "no complete hello within {:.1} s ({} of {HELLO_FRAME} bytes)",
                            self.hello_timeout.as_secs_f64(),
                            p.buf.len()
                        ))
                    });
                }
                Err(e) => return Some(Outcome::Drop(format!("read failed: {e}"))),
            }
        }
    }

    fn settle(&mut self, mut p: Pending, outcome: Outcome) {
        let (why, detail, reason) = match outcome {
            Outcome::Drop(reason) => return self.log(p.from, reason),
            Outcome::Refuse(why, reason) => (why, u32::from(wire::PROTOCOL), reason),
            Outcome::Hello(h) => match self.admit(&h, &p) {
                Ok(()) => {
                    let joined = p.stream.set_nonblocking(false).map(|_| Joined {
                        stream: p.stream,
                        nonces: (p.nonce, h.nonce),
                    });
                    match joined {
                        Ok(j) => self.slots[h.rank as usize] = Some(j),
                        Err(e) => self.log(p.from, format!("rank {}: socket error {e}", h.rank)),
                    }
                    return;
                }
                Err(refusal) => refusal,
            },
        };
        // Best effort: the stream is non-blocking and a 16-byte reply fits any buffer.
        let _ = p
            .stream
            .write(&Header::new(Kind::Reject, why as u32, detail).encode());
        self.log(p.from, reason);
    }

    /// Checks a complete hello: authenticated first, then world, rank, and a free slot.
    fn admit(&self, h: &Hello, p: &Pending) -> Result<(), (Reject, u32, String)> {
        if h.tag != auth::job_tag(self.secret) {
            return Err((
                Reject::BadAuth,
                0,
                format!(
                    "claims rank {}, but its job tag is another secret's",
                    h.rank
                ),
            ));
        }
        if !auth::hello_ok(self.secret, &(p.nonce, h.nonce), h.rank, h.world, &h.proof) {
            return Err((
                Reject::BadAuth,
                0,
                format!("claims rank {}, but its proof does not match", h.rank),
            ));
        }
        let (rank, world) = (h.rank as usize, h.world as usize);
        if world != self.world {
            return Err((
                Reject::WrongWorld,
                self.world as u32,
                format!(
                    "rank {rank} has WORLD_SIZE {world}, rank 0 has {}",
                    self.world
                ),
            ));
        }
        if rank == 0 || rank >= self.world {
            return Err((
                Reject::BadRank,
                h.rank,
                format!("claims rank {rank}, not in 1..{}", self.world),
            ));
        }
        if self.slots[rank].is_some() {
            return Err((
                Reject::DuplicateRank,
                h.rank,
                format!("claims rank {rank}, which already joined"),
            ));
        }
        Ok(())
    }
}

enum Outcome {
    /// Dropped without a reply (closed, silent, broken).
    Drop(String),
    /// Refused with a reply.
    Refuse(Reject, String),
    /// A complete hello to check.
    Hello(Hello),
}
