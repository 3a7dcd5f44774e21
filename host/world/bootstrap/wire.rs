//! Frames of the bootstrap protocol: a 16-byte little-endian header
//! `magic u32 | protocol u16 | kind u16 | a u32 | b u32`, followed by `a` bytes for `DATA`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// First word of every frame ("FMBT").
pub const MAGIC: u32 = 0x464D_4254;
/// Protocol version; both ends must agree.
pub const PROTOCOL: u16 = 1;
/// Largest `DATA` payload accepted (bytes).
pub const MAX_DATA: usize = 64 << 20;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Peer to master: `a` = rank, `b` = world size.
    Hello = 1,
    /// Master to peer: everyone joined; `a` = world size.
    Welcome = 2,
    /// Master to peer: refused or aborted; `a` = [`Reject`] code, `b` = detail.
    Reject = 3,
    /// Either way: `a` = payload length.
    Data = 4,
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

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means "none").
pub fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Writes a frame (and its payload) before `deadline`.
pub fn send(
    s: &mut TcpStream,
    h: Header,
    payload: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    s.set_write_timeout(Some(left(deadline)))?;
    s.write_all(&h.encode())?;
    s.write_all(payload)?;
    s.flush()
}

/// Reads one header before `deadline`.
pub fn recv_header(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Header> {
    s.set_read_timeout(Some(left(deadline)))?;
    let mut b = [0u8; 16];
    s.read_exact(&mut b)?;
    Ok(Header::decode(&b))
}

/// Reads `len` payload bytes before `deadline`.
pub fn recv_payload(s: &mut TcpStream, len: usize, deadline: Instant) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(left(deadline)))?;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
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
        ] {
            assert_eq!(Reject::from_code(r as u32), Some(r));
        }
        assert!(Reject::describe(2, 5).contains("rank 5"));
        assert!(Reject::describe(99, 0).contains("unknown"));
    }
}
