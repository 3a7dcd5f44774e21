//! Frames of the bootstrap protocol: a 16-byte little-endian header
//! `magic u32 | protocol u16 | kind u16 | a u32 | b u32`, followed by `a` bytes for `DATA`
//! and by a fixed payload for `CHALLENGE`, `HELLO` and `WELCOME` (see [`Kind`]).
//!
//! Every read and write of a frame has one total deadline: a peer that trickles one byte
//! at a time cannot stretch it (the socket timeout is re-armed with the time left before
//! every system call, and the deadline is checked between them).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::auth::{Token, AUTH_BYTES, TAG_BYTES};

/// First word of every frame ("FMBT").
pub const MAGIC: u32 = 0x464D_4254;
/// Protocol version; both ends must agree (2: challenge-response hello).
pub const PROTOCOL: u16 = 2;
/// Largest `DATA` payload accepted (bytes).
pub const MAX_DATA: usize = 64 << 20;
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 16;
/// Payload of a hello: job tag, the peer's nonce, its proof.
pub const HELLO_PAYLOAD: usize = TAG_BYTES + 2 * AUTH_BYTES;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Peer to master: `a` = rank, `b` = world size; payload [`HELLO_PAYLOAD`] bytes:
    /// job tag, the peer's nonce, its proof (`auth::hello_mac`).
    Hello = 1,
    /// Master to peer: everyone joined; `a` = world size; payload: rank 0's proof
    /// (`auth::welcome_mac`).
    Welcome = 2,
    /// Master to peer: refused or aborted; `a` = [`Reject`] code, `b` = detail.
    Reject = 3,
    /// Either way: `a` = payload length.
    Data = 4,
    /// Master to a new connection, first: payload = rank 0's nonce.
    Challenge = 5,
}

/// Why the master refused a peer or aborted the bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The peer's world size differs from the master's (detail: the master's).
    WrongWorld = 1,
    /// Another connection already claimed this rank (detail: the rank).
    DuplicateRank = 2,
    /// The rank is 0 or not below the world size (detail: the rank).
    BadRank = 3,
    /// Wrong magic or protocol version (detail: the master's protocol).
    BadProtocol = 4,
    /// The master gave up (detail: the rank that caused it, or `u32::MAX`).
    Aborted = 5,
    /// The hello's proof or job tag does not match this job's secret.
    BadAuth = 6,
}

impl Reject {
    /// Decodes a reject code.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Reject::WrongWorld,
            2 => Reject::DuplicateRank,
            3 => Reject::BadRank,
            4 => Reject::BadProtocol,
            5 => Reject::Aborted,
            6 => Reject::BadAuth,
            _ => return None,
        })
    }

    /// Human-readable reason, with the detail word.
    pub fn describe(code: u32, detail: u32) -> String {
        match Self::from_code(code) {
            Some(Reject::WrongWorld) => format!("wrong world size (the master's is {detail})"),
            Some(Reject::DuplicateRank) => format!("rank {detail} already joined"),
            Some(Reject::BadRank) => format!("rank {detail} is not a peer rank"),
            Some(Reject::BadProtocol) => format!("protocol mismatch (the master speaks {detail})"),
            Some(Reject::BadAuth) => {
                "not authenticated: FLASHMOE_BOOTSTRAP_SECRET differs from rank 0's (another \
                 job, or the secret is not set the same on every node)"
                    .to_string()
            }
            Some(Reject::Aborted) if detail == u32::MAX => "the master aborted".to_string(),
            Some(Reject::Aborted) => format!("the master aborted because of rank {detail}"),
            None => format!("unknown reject code {code} (detail {detail})"),
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Magic word.
    pub magic: u32,
    /// Protocol version.
    pub protocol: u16,
    /// Raw kind.
    pub kind: u16,
    /// First argument.
    pub a: u32,
    /// Second argument.
    pub b: u32,
}

impl Header {
    /// A header of this protocol.
    pub fn new(kind: Kind, a: u32, b: u32) -> Self {
        Self {
            magic: MAGIC,
            protocol: PROTOCOL,
            kind: kind as u16,
            a,
            b,
        }
    }

    /// The 16 bytes on the wire.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.magic.to_le_bytes());
        out[4..6].copy_from_slice(&self.protocol.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..12].copy_from_slice(&self.a.to_le_bytes());
        out[12..16].copy_from_slice(&self.b.to_le_bytes());
        out
    }

    /// Decodes 16 bytes.
    pub fn decode(b: &[u8; 16]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            magic: u32_at(0),
            protocol: u16::from_le_bytes([b[4], b[5]]),
            kind: u16::from_le_bytes([b[6], b[7]]),
            a: u32_at(8),
            b: u32_at(12),
        }
    }

    /// Whether magic and protocol are ours.
    pub fn is_ours(&self) -> bool {
        self.magic == MAGIC && self.protocol == PROTOCOL
    }
}

/// `now + timeout`, or `None` when that is not representable (`Duration::MAX`).
pub fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Time left until `deadline`; a `TimedOut` error once it passed (a zero socket timeout
/// would mean "none").
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left)
}

/// Writes all of `bytes` before `deadline`, however slowly the other end reads.
pub fn write_full(s: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        s.set_write_timeout(Some(left(deadline)?))?;
        match s.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf` before `deadline`, however slowly the other end writes.
pub fn read_full(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        s.set_read_timeout(Some(left(deadline)?))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a frame (and its payload) before `deadline`.
pub fn send(
    s: &mut TcpStream,
    h: Header,
    payload: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame.extend_from_slice(&h.encode());
    frame.extend_from_slice(payload);
    write_full(s, &frame, deadline)
}

/// Reads one header before `deadline`.
pub fn recv_header(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Header> {
    let mut b = [0u8; HEADER_BYTES];
    read_full(s, &mut b, deadline)?;
    Ok(Header::decode(&b))
}

/// Reads `len` payload bytes before `deadline`; memory grows with what arrived, not with
/// what the header announced.
pub fn recv_payload(s: &mut TcpStream, len: usize, deadline: Instant) -> std::io::Result<Vec<u8>> {
    const CHUNK: usize = 64 << 10;
    let mut out = Vec::with_capacity(len.min(CHUNK));
    let mut chunk = vec![0u8; len.min(CHUNK)];
    while out.len() < len {
        let n = (len - out.len()).min(CHUNK);
        read_full(s, &mut chunk[..n], deadline)?;
        out.extend_from_slice(&chunk[..n]);
    }
    Ok(out)
}

/// Reads a fixed-size token (a nonce or a proof) before `deadline`.
pub fn recv_token(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Token> {
    let mut t = [0u8; AUTH_BYTES];
    read_full(s, &mut t, deadline)?;
    Ok(t)
}

/// A decoded hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Claimed rank.
    pub rank: u32,
    /// Claimed world size.
    pub world: u32,
    /// Job tag of the peer's secret.
    pub tag: [u8; TAG_BYTES],
    /// The peer's nonce.
    pub nonce: Token,
    /// The peer's proof.
    pub proof: Token,
}

impl Hello {
    /// The frame on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Header::new(Kind::Hello, self.rank, self.world)
            .encode()
            .to_vec();
        out.extend_from_slice(&self.tag);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.proof);
        out
    }
}

/// What the bytes received so far on a new connection amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloParse {
    /// A well-formed prefix: this many more bytes are needed.
    NeedMore(usize),
    /// Not a hello of this protocol (the reason, for the log).
    Bad(String),
    /// A complete hello (exactly [`HEADER_BYTES`] + [`HELLO_PAYLOAD`] bytes).
    Done(Hello),
}

/// Total bytes of a hello frame.
pub const HELLO_FRAME: usize = HEADER_BYTES + HELLO_PAYLOAD;

/// Decodes the first bytes a new connection sent; never reads past [`HELLO_FRAME`].
pub fn parse_hello(buf: &[u8]) -> HelloParse {
    if buf.len() > HELLO_FRAME {
        return HelloParse::Bad(format!(
            "{} bytes where a hello has {HELLO_FRAME}",
            buf.len()
        ));
    }
    let Some(head) = buf.get(..HEADER_BYTES) else {
        return HelloParse::NeedMore(HEADER_BYTES - buf.len());
    };
    let mut raw = [0u8; HEADER_BYTES];
    raw.copy_from_slice(head);
    let h = Header::decode(&raw);
    if !h.is_ours() || h.kind != Kind::Hello as u16 {
        return HelloParse::Bad(format!(
            "not a flashmoe bootstrap hello (magic {:#x}, protocol {}, kind {})",
            h.magic, h.protocol, h.kind
        ));
    }
    if buf.len() < HELLO_FRAME {
        return HelloParse::NeedMore(HELLO_FRAME - buf.len());
    }
    let p = &buf[HEADER_BYTES..];
    let mut hello = Hello {
        rank: h.a,
        world: h.b,
        tag: [0; TAG_BYTES],
        nonce: [0; AUTH_BYTES],
        proof: [0; AUTH_BYTES],
    };
    hello.tag.copy_from_slice(&p[..TAG_BYTES]);
    hello
        .nonce
        .copy_from_slice(&p[TAG_BYTES..TAG_BYTES + AUTH_BYTES]);
    hello.proof.copy_from_slice(&p[TAG_BYTES + AUTH_BYTES..]);
    HelloParse::Done(hello)
}

/// Packs per-rank byte strings as `u32 length | bytes` each.
pub fn pack(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Inverse of [`pack`]; `None` when the bytes are not `count` well-formed parts.
pub fn unpack(mut bytes: &[u8], count: usize) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        if bytes.len() < 4 {
            return None;
        }
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        bytes = &bytes[4..];
        if bytes.len() < len {
            return None;
        }
        out.push(bytes[..len].to_vec());
        bytes = &bytes[len..];
    }
    bytes.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header::new(Kind::Hello, 7, 0xDEAD_BEEF);
        let d = Header::decode(&h.encode());
        assert_eq!(d, h);
        assert!(d.is_ours());
        let mut raw = h.encode();
        raw[0] ^= 1;
        assert!(!Header::decode(&raw).is_ours());
    }

    #[test]
    fn pack_unpack_round_trip_and_reject_malformed() {
        let parts = vec![vec![1u8, 2, 3], vec![], vec![9u8; 300]];
        let p = pack(&parts);
        assert_eq!(unpack(&p, 3).unwrap(), parts);
        assert!(unpack(&p, 2).is_none(), "trailing bytes accepted");
        assert!(unpack(&p, 4).is_none(), "missing part accepted");
        assert!(
            unpack(&p[..p.len() - 1], 3).is_none(),
            "short part accepted"
        );
    }

    #[test]
    fn reject_codes_decode_and_describe() {
        for r in [
            Reject::WrongWorld,
            Reject::DuplicateRank,
            Reject::BadRank,
            Reject::BadProtocol,
            Reject::Aborted,
            Reject::BadAuth,
        ] {
            assert_eq!(Reject::from_code(r as u32), Some(r));
        }
        assert!(Reject::describe(2, 5).contains("rank 5"));
        assert!(Reject::describe(99, 0).contains("unknown"));
    }

    #[test]
    fn a_hello_round_trips_through_the_parser_at_every_prefix() {
        let hello = Hello {
            rank: 3,
            world: 8,
            tag: [7; TAG_BYTES],
            nonce: [1; AUTH_BYTES],
            proof: [2; AUTH_BYTES],
        };
        let bytes = hello.encode();
        assert_eq!(bytes.len(), HELLO_FRAME);
        for cut in 0..bytes.len() {
            let rest = if cut < HEADER_BYTES {
                HEADER_BYTES
            } else {
                HELLO_FRAME
            } - cut;
            assert_eq!(parse_hello(&bytes[..cut]), HelloParse::NeedMore(rest));
        }
        assert_eq!(parse_hello(&bytes), HelloParse::Done(hello));
        let mut foreign = bytes.clone();
        foreign[0] ^= 0xFF;
        assert!(matches!(parse_hello(&foreign[..16]), HelloParse::Bad(_)));
    }

    /// A writer that trickles one byte every 50 ms cannot stretch a 300 ms deadline.
    #[test]
    fn a_trickling_peer_cannot_stretch_the_read_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let writer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for b in Header::new(Kind::Data, 4, 0).encode() {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (mut s, _) = l.accept().unwrap();
        let start = Instant::now();
        let err = recv_header(&mut s, start + Duration::from_millis(300)).unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
            "{err}"
        );
        assert!(took < Duration::from_millis(600), "{took:?}");
        drop(s);
        writer.join().unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Arbitrary bytes give a verdict, never a panic; a verdict of `NeedMore` asks
        /// for exactly the rest of the header or of the hello.
        #[test]
        fn arbitrary_bytes_never_panic_the_hello_parser(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)
        ) {
            match parse_hello(&bytes) {
                HelloParse::NeedMore(n) => proptest::prop_assert!(
                    [HEADER_BYTES, HELLO_FRAME].contains(&(n + bytes.len()))
                ),
                HelloParse::Done(h) => {
                    proptest::prop_assert_eq!(bytes.len(), HELLO_FRAME);
                    proptest::prop_assert_eq!(h.encode(), bytes);
                }
                HelloParse::Bad(why) => proptest::prop_assert!(!why.is_empty()),
            }
        }

        /// Arbitrary bytes unpack to parts that pack back to the same bytes, or to `None`.
        #[test]
        fn arbitrary_bytes_never_panic_unpack(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            count in 0usize..8,
        ) {
            if let Some(parts) = unpack(&bytes, count) {
                proptest::prop_assert_eq!(parts.len(), count);
                proptest::prop_assert_eq!(pack(&parts), bytes);
            }
        }
    }
}
