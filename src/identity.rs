//! Who an agent is: its record, and the token that proves it.
//!
//! A name belongs to whoever holds its token. The broker hands the token out once, when the
//! name is created, and keeps only its SHA-256, so a copy of the broker's data cannot be used
//! to act as an agent.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The sender name of notices the mesh itself sends; no agent may take it.
pub const SYSTEM: &str = "system";

/// Characters in a token: 32 random bytes as lowercase hex.
pub const TOKEN_LEN: usize = 64;

/// A new random token.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Whether `token` has the shape of a token we issue; anything else is refused before hashing.
pub fn token_shape_ok(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares in time independent of where the first difference is.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// What a broker stores about one name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    /// SHA-256 of the agent's token. Empty for a forwarding record.
    pub token_hash: Vec<u8>,
    /// Bumped on every registration: the newest claim wins a conflict.
    pub incarnation: u64,
    pub registered_at_ms: u64,
    pub last_seen_ms: u64,
    /// Set when this name was renamed: messages to it go to `forward_to` until `forward_until_ms`.
    pub forward_to: Option<String>,
    pub forward_until_ms: u64,
    /// For an agent that moved here from another broker: that attachment, whose messages are
    /// delivered before this one's (see `federation::fence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<federation::fence::Fence>,
}

impl AgentRecord {
    pub fn is_forward(&self) -> bool {
        self.forward_to.is_some()
    }

    pub fn token_matches(&self, token: &str) -> bool {
        match <[u8; 32]>::try_from(self.token_hash.as_slice()) {
            Ok(stored) => hashes_equal(&stored, &hash_token(token)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_well_formed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(token_shape_ok(&a));
        assert!(!token_shape_ok("short"));
        assert!(!token_shape_ok(&a.to_uppercase()));
    }

    #[test]
    fn only_the_right_token_matches() {
        let token = new_token();
        let rec = AgentRecord {
            name: "a".into(),
            token_hash: hash_token(&token).to_vec(),
            incarnation: 1,
            registered_at_ms: 0,
            last_seen_ms: 0,
            forward_to: None,
            forward_until_ms: 0,
            after: None,
        };
        assert!(rec.token_matches(&token));
        assert!(!rec.token_matches(&new_token()));
    }
}
