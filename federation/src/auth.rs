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
use zeroize::{Zeroize, Zeroizing};

use crate::BrokerId;

/// A nonce: 16 random bytes.
pub type Nonce = [u8; 16];

/// Length of one proof (HMAC-SHA-256).
pub const PROOF_LEN: usize = 32;

/// The most secrets one broker accepts at once: the current one and, during a rotation, the
/// previous ones (see docs/security.md, "Rotating the mesh secret").
pub const MAX_SECRETS: usize = 4;

/// The mesh secret: the current one, and during a rotation also the secrets it replaces.
///
/// Proofs and link keys are made with every one of them, and a peer's proof is accepted if it
/// verifies under any, so brokers that share at least one secret link up. The bytes are wiped
/// from memory when the value is dropped.
#[derive(Clone)]
pub struct Secret(Vec<Zeroizing<Vec<u8>>>);

impl Secret {
    /// A secret must have at least 16 bytes; shorter ones are too easy to guess.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, crate::Error> {
        let bytes = Zeroizing::new(bytes.into());
        check_len(&bytes)?;
        Ok(Secret(vec![bytes]))
    }

    /// Adds a secret that is still accepted while the mesh moves to the current one.
    pub fn with_previous(mut self, bytes: impl Into<Vec<u8>>) -> Result<Secret, crate::Error> {
        let bytes = Zeroizing::new(bytes.into());
        check_len(&bytes)?;
        if self.0.len() >= MAX_SECRETS {
            return Err(crate::Error::Invalid(format!(
                "at most {MAX_SECRETS} mesh secrets (the current one and previous ones) at once"
            )));
        }
        if !self.0.iter().any(|k| **k == *bytes) {
            self.0.push(bytes);
        }
        Ok(self)
    }

    /// How many secrets are accepted (1 outside a rotation).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One pre-shared key for the encrypted link layer per secret, current first:
    /// HKDF-SHA-256 (RFC 5869) of the secret with a fixed salt and label, so the link keys
    /// are independent of the HMAC proofs made with the secret itself. Wiped on drop.
    pub fn link_keys(&self) -> Vec<Zeroizing<[u8; 32]>> {
        self.0
            .iter()
            .map(|k| {
                hkdf_sha256(
                    b"ipc-mesh link psk v1",
                    k,
                    b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
                )
            })
            .collect()
    }
}

fn check_len(bytes: &[u8]) -> Result<(), crate::Error> {
    if bytes.len() < 16 {
        return Err(crate::Error::Invalid(
            "the mesh secret must be at least 16 bytes long".into(),
        ));
    }
    Ok(())
}

/// HKDF-SHA-256 with a 32-byte output (one block of RFC 5869's expand step).
fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut extract = Hmac::<Sha256>::new_from_slice(salt).expect("HMAC takes any key length");
    extract.update(ikm);
    let mut prk: [u8; 32] = extract.finalize().into_bytes().into();
    let mut expand = Hmac::<Sha256>::new_from_slice(&prk).expect("HMAC takes any key length");
    prk.zeroize();
    expand.update(info);
    expand.update(&[1]);
    Zeroizing::new(expand.finalize().into_bytes().into())
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

/// The proof `side` sends for this handshake: one HMAC per secret, current first,
/// concatenated (so a peer that knows any one of them can check it).
pub fn proof(
    secret: &Secret,
    side: Side,
    dialer_nonce: &Nonce,
    acceptor_nonce: &Nonce,
    dialer: BrokerId,
    acceptor: BrokerId,
) -> Vec<u8> {
    secret
        .0
        .iter()
        .flat_map(|key| {
            mac(key, side, dialer_nonce, acceptor_nonce, dialer, acceptor)
                .finalize()
                .into_bytes()
        })
        .collect()
}

/// Checks a proof in constant time per comparison: it holds if any of its HMACs verifies
/// under any of our secrets.
pub fn verify(
    secret: &Secret,
    side: Side,
    dialer_nonce: &Nonce,
    acceptor_nonce: &Nonce,
    dialer: BrokerId,
    acceptor: BrokerId,
    proof: &[u8],
) -> bool {
    if proof.is_empty() || proof.len() % PROOF_LEN != 0 || proof.len() > PROOF_LEN * MAX_SECRETS {
        return false;
    }
    let mut ok = false;
    for chunk in proof.chunks(PROOF_LEN) {
        for key in &secret.0 {
            ok |= mac(key, side, dialer_nonce, acceptor_nonce, dialer, acceptor)
                .verify_slice(chunk)
                .is_ok();
        }
    }
    ok
}

fn mac(
    key: &[u8],
    side: Side,
    dialer_nonce: &Nonce,
    acceptor_nonce: &Nonce,
    dialer: BrokerId,
    acceptor: BrokerId,
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
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
    fn during_a_rotation_either_secret_links() {
        let (a, b) = (BrokerId::from_u32(1), BrokerId::from_u32(2));
        let (nd, na) = ([1u8; 16], [2u8; 16]);
        let old = s("the old secret, long enough");
        let both = s("the new secret, long enough")
            .with_previous(b"the old secret, long enough".to_vec())
            .unwrap();
        let p = proof(&both, Side::Dialer, &nd, &na, a, b);
        assert_eq!(p.len(), 2 * PROOF_LEN);
        assert!(verify(&old, Side::Dialer, &nd, &na, a, b, &p));
        let p = proof(&old, Side::Acceptor, &nd, &na, a, b);
        assert!(verify(&both, Side::Acceptor, &nd, &na, a, b, &p));
        let other = s("an unrelated secret, long enough");
        assert!(!verify(
            &other,
            Side::Dialer,
            &nd,
            &na,
            a,
            b,
            &proof(&both, Side::Dialer, &nd, &na, a, b)
        ));
        assert_eq!(both.link_keys()[1], old.link_keys()[0]);
        assert_ne!(both.link_keys()[0], old.link_keys()[0]);
    }

    #[test]
    fn hkdf_matches_rfc_5869_test_case_1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let okm = hkdf_sha256(&salt, &ikm, &info);
        let want = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf";
        let got: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Secret::new(b"short".to_vec()).is_err());
    }
}
