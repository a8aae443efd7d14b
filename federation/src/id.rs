//! Identifiers: agent names, broker ids and dots.
//!
//! Every identifier is validated when it is built from outside input, so code that holds one
//! may rely on its shape.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The longest agent name accepted, in bytes (names are ASCII).
pub const MAX_AGENT_NAME: usize = 32;

/// An agent's name: 1–32 characters of `[A-Za-z0-9_-]`, case-sensitive.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AgentName(String);

impl AgentName {
    /// Validates `name`; the error says what a valid name looks like.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let valid_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if name.is_empty() || name.len() > MAX_AGENT_NAME || !valid_chars {
            return Err(Error::Invalid(format!(
                "invalid agent name {:?}: use 1-32 characters of letters, digits, '-' or '_'",
                truncate_for_display(&name)
            )));
        }
        Ok(AgentName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AgentName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AgentName::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for AgentName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        AgentName::new(s)
    }
}

impl AsRef<str> for AgentName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A broker's identity: 8 lowercase hex digits, generated once per data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BrokerId(u32);

impl BrokerId {
    pub fn random() -> Self {
        BrokerId(rand::random())
    }

    pub fn from_u32(v: u32) -> Self {
        BrokerId(v)
    }

    pub fn as_u32(self) -> u32 {
        self.0
    }
}

impl fmt::Display for BrokerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl FromStr for BrokerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "invalid broker id {:?}: expected 8 hex digits",
                truncate_for_display(s)
            )));
        }
        u32::from_str_radix(s, 16)
            .map(BrokerId)
            .map_err(|e| Error::Invalid(format!("invalid broker id {s:?}: {e}")))
    }
}

/// A message's identity: the broker that accepted it and that broker's sequence number.
///
/// Sequences are persisted and never reused, so a dot names one message for ever; its text
/// form (`3f9a2c1b:42`) is the message id users see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dot {
    pub origin: BrokerId,
    pub seq: u64,
}

impl Dot {
    pub fn new(origin: BrokerId, seq: u64) -> Self {
        Dot { origin, seq }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.seq)
    }
}

impl FromStr for Dot {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Invalid(format!(
                "invalid message id {:?}: expected BROKER:SEQ, like 3f9a2c1b:42",
                truncate_for_display(s)
            ))
        };
        let (origin, seq) = s.split_once(':').ok_or_else(bad)?;
        let origin = origin.parse().map_err(|_| bad())?;
        let seq = seq.parse().map_err(|_| bad())?;
        Ok(Dot { origin, seq })
    }
}

/// Echoing a megabyte of garbage back in an error helps nobody.
fn truncate_for_display(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names_follow_the_documented_rule() {
        for ok in ["a", "claude-1", "Gemini_CLI", &"x".repeat(32)] {
            assert!(AgentName::new(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "has space",
            "dot.ted",
            "ünï",
            &"x".repeat(33),
            "a/b",
            "a@b",
        ] {
            assert!(AgentName::new(bad).is_err(), "{bad} should be invalid");
        }
    }

    #[test]
    fn names_are_case_sensitive() {
        assert_ne!(
            AgentName::new("Bob").unwrap(),
            AgentName::new("bob").unwrap()
        );
    }

    #[test]
    fn deserializing_validates() {
        let bytes = rmp_serde::to_vec("not valid!").unwrap();
        assert!(rmp_serde::from_slice::<AgentName>(&bytes).is_err());
    }

    #[test]
    fn dot_round_trips_through_text() {
        let dot = Dot::new(BrokerId::from_u32(0x3f9a2c1b), 42);
        assert_eq!(dot.to_string(), "3f9a2c1b:42");
        assert_eq!("3f9a2c1b:42".parse::<Dot>().unwrap(), dot);
        for bad in ["", "3f9a2c1b", "zz:1", "3f9a2c1b:-1", "3f9a2c1b:1:2"] {
            assert!(bad.parse::<Dot>().is_err(), "{bad}");
        }
    }

    #[test]
    fn long_garbage_is_truncated_in_errors() {
        let err = AgentName::new("x".repeat(10_000)).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }
}
