//! Challenge-response authentication of the bootstrap with the per-job secret.
//!
//! The secret never crosses the wire: rank 0 sends a fresh random nonce to every new
//! connection, the peer answers with its own nonce and an HMAC-SHA256 (keyed with the
//! secret) over both nonces, the protocol version, its rank and the world size; rank 0
//! answers the welcome with an HMAC over the same nonces, so a peer also knows that it
//! talks to its own job's rank 0. Without a secret the key is empty: the exchange still
//! runs (and tells jobs apart by nothing), so any host that can reach the port can join.

use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Bytes of a nonce and of a MAC.
pub const AUTH_BYTES: usize = 32;
/// Bytes of the job tag a hello carries (a MAC of a constant: tells another job's peer
/// from a forger in rank 0's log).
pub const TAG_BYTES: usize = 8;

/// A nonce or a MAC.
pub type Token = [u8; AUTH_BYTES];

/// The key derived from a job's secret (SHA-256 of the text); `Debug` does not print it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The key of the secret `text` (any string; the launcher uses 64 hex digits).
    pub fn from_text(text: &str) -> Self {
        Secret(Sha256::digest(text.as_bytes()).into())
    }

    /// A fresh random secret as text (what the local launcher gives its children).
    pub fn generate_text() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A fresh random nonce.
pub fn nonce() -> Token {
    rand::random()
}

fn mac(secret: Option<&Secret>, parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC pads a key shorter than the hash's block (64 bytes) with zeros, so the
    // 32-byte key (or none) padded here is the same HMAC key, without a fallible call.
    let mut key = Key::<Hmac<Sha256>>::default();
    if let Some(s) = secret {
        key[..s.0.len()].copy_from_slice(&s.0);
    }
    let mut m = <Hmac<Sha256> as KeyInit>::new(&key);
    for p in parts {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m
}

fn hello_parts<'a>(
    nonces: &'a (Token, Token),
    rank: &'a [u8; 4],
    world: &'a [u8; 4],
) -> [&'a [u8]; 5] {
    [b"flashmoe-hello-v2", &nonces.0, &nonces.1, rank, world]
}

/// The peer's proof: MAC over (rank 0's nonce, the peer's nonce, rank, world).
pub fn hello_mac(secret: Option<&Secret>, nonces: &(Token, Token), rank: u32, world: u32) -> Token {
    let (r, w) = (rank.to_le_bytes(), world.to_le_bytes());
    mac(secret, &hello_parts(nonces, &r, &w))
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `got` is the peer's proof (constant-time comparison).
pub fn hello_ok(
    secret: Option<&Secret>,
    nonces: &(Token, Token),
    rank: u32,
    world: u32,
    got: &[u8],
) -> bool {
    let (r, w) = (rank.to_le_bytes(), world.to_le_bytes());
    mac(secret, &hello_parts(nonces, &r, &w))
        .verify_slice(got)
        .is_ok()
}

/// Rank 0's proof in the welcome: MAC over both nonces and the world size.
pub fn welcome_mac(secret: Option<&Secret>, nonces: &(Token, Token), world: u32) -> Token {
    mac(
        secret,
        &[
            b"flashmoe-welcome-v2",
            &nonces.0,
            &nonces.1,
            &world.to_le_bytes(),
        ],
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Whether `got` is rank 0's proof (constant-time comparison).
pub fn welcome_ok(
    secret: Option<&Secret>,
    nonces: &(Token, Token),
    world: u32,
    got: &[u8],
) -> bool {
    mac(
        secret,
        &[
            b"flashmoe-welcome-v2",
            &nonces.0,
            &nonces.1,
            &world.to_le_bytes(),
        ],
    )
    .verify_slice(got)
    .is_ok()
}

/// The job tag of a secret (the first bytes of a MAC of a constant).
pub fn job_tag(secret: Option<&Secret>) -> [u8; TAG_BYTES] {
    let full: Token = mac(secret, &[b"flashmoe-job-tag"])
        .finalize()
        .into_bytes()
        .into();
    let mut tag = [0u8; TAG_BYTES];
    tag.copy_from_slice(&full[..TAG_BYTES]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_rank_and_world() {
        let (a, b) = (Secret::from_text("job a"), Secret::from_text("job b"));
        let n = (nonce(), nonce());
        let m = hello_mac(Some(&a), &n, 3, 8);
        assert!(hello_ok(Some(&a), &n, 3, 8, &m));
        assert!(!hello_ok(Some(&b), &n, 3, 8, &m));
        assert!(!hello_ok(None, &n, 3, 8, &m));
        assert!(!hello_ok(Some(&a), &n, 2, 8, &m));
        assert!(!hello_ok(Some(&a), &n, 3, 9, &m));
        assert!(!hello_ok(Some(&a), &(n.1, n.0), 3, 8, &m));
        let w = welcome_mac(Some(&a), &n, 8);
        assert!(welcome_ok(Some(&a), &n, 8, &w));
        assert!(!welcome_ok(Some(&b), &n, 8, &w));
        assert_ne!(w, m, "a hello proof must not double as a welcome");
        assert_ne!(job_tag(Some(&a)), job_tag(Some(&b)));
        assert_eq!(job_tag(None), job_tag(None));
    }

    #[test]
    fn generated_secrets_differ_and_debug_hides_the_key() {
        let (x, y) = (Secret::generate_text(), Secret::generate_text());
        assert_ne!(x, y);
        assert_eq!(x.len(), 64);
        assert_eq!(format!("{:?}", Secret::from_text(&x)), "Secret(<redacted>)");
    }
}
