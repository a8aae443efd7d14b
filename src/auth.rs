//! Client authentication: a client proves it knows the mesh secret, and the broker proves it back.
//!
//! 1. A broker that requires authentication puts a fresh 16-byte nonce `nb` in its welcome.
//! 2. The client picks its own nonce `nc` and sends `Auth { client_nonce: nc, proof }` with
//!    `proof = HMAC-SHA256(secret, "ipc-mesh client v1\0" ‖ nb ‖ nc)`.
//! 3. The broker checks the proof (constant time). If it is right it answers
//!    `Authenticated { proof: HMAC-SHA256(secret, "ipc-mesh broker v1\0" ‖ nb ‖ nc) }`, which the
//!    client checks, so it knows it reached a broker that holds the secret; if it is wrong the
//!    broker answers `Unauthorized` and closes.
//!
//! The secret never crosses the wire. The broker's nonce is fresh per connection, so a recorded
//! client proof is worthless on another connection; the client's nonce does the same for the
//! broker's proof. The two labels differ, so neither proof can be reflected as the other.
//!
//! HMAC is written out here over `sha2` (RFC 2104, checked against RFC 4231's vectors below)
//! rather than taken from the `hmac` crate: it is twenty lines, and it keeps this crate's
//! dependency set as it is.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Bytes in a nonce.
pub const NONCE_LEN: usize = 16;

/// The mesh secret as a client or broker uses it for client authentication: the current one,
/// and during a rotation the previous ones, which a broker still accepts from clients.
#[derive(Clone)]
pub struct ClientSecret {
    current: Vec<u8>,
    previous: Vec<Vec<u8>>,
}

impl ClientSecret {
    /// At least 16 bytes, like the peer secret (it is the same secret).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<ClientSecret> {
        Ok(ClientSecret {
            current: long_enough(bytes.into())?,
            previous: Vec::new(),
        })
    }

    /// The secret file's text: one secret per non-empty line (whitespace trimmed), the current
    /// one first, as for peers.
    pub fn from_lines(text: &[u8]) -> Result<ClientSecret> {
        let (first, previous) = crate::config::secret_lines(text)?;
        let mut secret = ClientSecret::new(first.to_vec())?;
        for previous in previous {
            secret.previous.push(long_enough(previous.to_vec())?);
        }
        Ok(secret)
    }

    fn all(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.current.as_slice()).chain(self.previous.iter().map(|p| p.as_slice()))
    }
}

fn long_enough(bytes: Vec<u8>) -> Result<Vec<u8>> {
    if bytes.len() < 16 {
        return Err(Error::Config(
            "the mesh secret must be at least 16 bytes long".into(),
        ));
    }
    Ok(bytes)
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(..)")
    }
}

/// Which side a proof is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Broker,
}

/// A fresh random nonce, as lowercase hex (how it travels).
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; NONCE_LEN]>())
}

/// Decodes a nonce sent as hex; anything but 16 bytes of hex is refused.
pub fn parse_nonce(text: &str) -> Option<[u8; NONCE_LEN]> {
    if text.len() != NONCE_LEN * 2 {
        return None;
    }
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

/// The proof `side` sends with the current secret, as hex.
pub fn proof(
    secret: &ClientSecret,
    side: Side,
    broker_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> String {
    hex::encode(mac(&secret.current, side, broker_nonce, client_nonce))
}

/// Checks a proof (hex) against the current secret and then any previous one, each in time
/// independent of where it differs. Returns the secret that matched (to answer with).
pub fn verify_any(
    secret: &ClientSecret,
    side: Side,
    broker_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    proof: &str,
) -> Option<ClientSecret> {
    let given = hex::decode(proof).ok()?;
    let given = <[u8; 32]>::try_from(given.as_slice()).ok()?;
    secret
        .all()
        .find(|key| {
            crate::identity::hashes_equal(&mac(key, side, broker_nonce, client_nonce), &given)
        })
        .map(|key| ClientSecret {
            current: key.to_vec(),
            previous: Vec::new(),
        })
}

/// Checks a proof (hex) made with the current secret.
pub fn verify(
    secret: &ClientSecret,
    side: Side,
    broker_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    proof: &str,
) -> bool {
    let current = ClientSecret {
        current: secret.current.clone(),
        previous: Vec::new(),
    };
    verify_any(&current, side, broker_nonce, client_nonce, proof).is_some()
}

fn mac(
    key: &[u8],
    side: Side,
    broker_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> [u8; 32] {
    let label: &[u8] = match side {
        Side::Client => b"ipc-mesh client v1\0",
        Side::Broker => b"ipc-mesh broker v1\0",
    };
    hmac_sha256(key, &[label, broker_nonce, client_nonce])
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2: a short key.
        assert_eq!(
            hex::encode(hmac_sha256(
                b"Jefe",
                &[b"what do ya want ", b"for nothing?"]
            )),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                &[b"Test Using Larger Than Block-Size Key - Hash Key First"]
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_and_side() {
        let secret = ClientSecret::new("correct horse battery staple").unwrap();
        let other = ClientSecret::new("another secret, long enough").unwrap();
        let (nb, nc) = ([1u8; 16], [2u8; 16]);
        let p = proof(&secret, Side::Client, &nb, &nc);
        assert!(verify(&secret, Side::Client, &nb, &nc, &p));
        assert!(!verify(&other, Side::Client, &nb, &nc, &p), "wrong secret");
        assert!(!verify(&secret, Side::Broker, &nb, &nc, &p), "reflection");
        assert!(
            !verify(&secret, Side::Client, &[9; 16], &nc, &p),
            "replay on a new connection"
        );
        assert!(!verify(&secret, Side::Client, &nb, &nc, "zz"));
        assert!(!verify(&secret, Side::Client, &nb, &nc, ""));
    }

    #[test]
    fn nonces_are_fresh_and_parsed_strictly() {
        let (a, b) = (new_nonce(), new_nonce());
        assert_ne!(a, b);
        assert!(parse_nonce(&a).is_some());
        assert!(parse_nonce("00").is_none());
        assert!(parse_nonce(&"g".repeat(32)).is_none());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(ClientSecret::new("short").is_err());
        assert!(ClientSecret::from_lines(b"long enough secret one\nshort\n").is_err());
        assert!(ClientSecret::from_lines(b"\n  \n").is_err());
    }

    #[test]
    fn during_a_rotation_the_previous_secret_is_still_accepted() {
        let old = ClientSecret::new("the old secret, long enough").unwrap();
        let broker =
            ClientSecret::from_lines(b"the new secret, long enough\nthe old secret, long enough\n")
                .unwrap();
        let (nb, nc) = ([3u8; 16], [4u8; 16]);
        let p = proof(&old, Side::Client, &nb, &nc);
        let matched = verify_any(&broker, Side::Client, &nb, &nc, &p).expect("previous accepted");
        let answer = proof(&matched, Side::Broker, &nb, &nc);
        assert!(
            verify(&old, Side::Broker, &nb, &nc, &answer),
            "answered with the old one"
        );
        assert!(
            !verify(&broker, Side::Client, &nb, &nc, &p),
            "verify checks current only"
        );
    }
}
