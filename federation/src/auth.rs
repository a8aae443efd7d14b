//! Peer authentication: a mutual challenge–response over fresh nonces from both sides.
//!
//! 1. The dialer sends its nonce `nd` in its hello.
//! 2. The acceptor answers with its own nonce `na` and `HMAC(secret, "acceptor" ‖ nd ‖ na ‖ ids)`.
//! 3. The dialer checks that proof, then sends `HMAC(secret, "dialer" ‖ nd ‖ na ‖ ids)`.
//! 4. The acceptor checks it and the link is up.
//!
//! The secret never crosses the wire. Both nonces are fresh per connection, so a recorded
//! handshake replayed against either side fails: the replayed proof covers the old nonce of the
//! side being fooled. The two roles use different labels, so one side's proof can never be
//! reflected back as the other's.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::BrokerId;

/// A nonce: 16 random bytes.
pub type Nonce = [u8; 16];

/// The mesh secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret must have at least 16 bytes; shorter ones are too easy to guess.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, crate::Error> {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            return Err(crate::Error::Invalid(
                "the mesh secret must be at least 16 bytes long".into(),
            ));
        }
        Ok(Secret(bytes))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Which side of the handshake a proof is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Dialer,
    Acceptor,
}

/// The proof `side` sends for this handshake.
pub fn proof(
    secret: &Secret,
    side: Side,
    dialer_nonce: &Nonce,
    acceptor_nonce: &Nonce,
    dialer: BrokerId,
    acceptor: BrokerId,
) -> Vec<u8> {
    mac(secret, side, dialer_nonce, acceptor_nonce, dialer, acceptor)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Checks a proof in constant time.
pub fn verify(
    secret: &Secret,
    side: Side,
    dialer_nonce: &Nonce,
    acceptor_nonce: &Nonce,
    dialer: BrokerId,
    acceptor: BrokerId,
    proof: &[u8],
) -> bool {
    mac(secret, side, dialer_nonce, acceptor_nonce, dialer, acceptor)
        .verify_slice(proof)
        .is_ok()
}

fn mac(
    secret: &Secret,
    side: Side,
    dialer_nonce: &Nonce,
    acceptor_nonce: &Nonce,
    dialer: BrokerId,
    acceptor: BrokerId,
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes any key length");
    m.update(match side {
        Side::Dialer => b"ipc-mesh peer dialer v1\0",
        Side::Acceptor => b"ipc-mesh peer accept v1\0",
    });
    m.update(dialer_nonce);
    m.update(acceptor_nonce);
    m.update(&dialer.as_u32().to_be_bytes());
    m.update(&acceptor.as_u32().to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Secret {
        Secret::new(x.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_and_side() {
        let (a, b) = (BrokerId::from_u32(1), BrokerId::from_u32(2));
        let (nd, na) = ([1u8; 16], [2u8; 16]);
        let secret = s("correct horse battery staple");
        let p = proof(&secret, Side::Acceptor, &nd, &na, a, b);
        assert!(verify(&secret, Side::Acceptor, &nd, &na, a, b, &p));
        assert!(!verify(
            &s("wrong secret, long enough"),
            Side::Acceptor,
            &nd,
            &na,
            a,
            b,
            &p
        ));
        assert!(
            !verify(&secret, Side::Dialer, &nd, &na, a, b, &p),
            "reflection"
        );
        assert!(
            !verify(&secret, Side::Acceptor, &[9; 16], &na, a, b, &p),
            "replay, new nonce"
        );
        assert!(!verify(&secret, Side::Acceptor, &nd, &na, b, a, &p));
        assert!(!verify(&secret, Side::Acceptor, &nd, &na, a, b, &[]));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Secret::new(b"short".to_vec()).is_err());
    }
}
