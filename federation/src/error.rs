//! The federation crate's one error type.

/// What went wrong, named for what the caller does next.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input was malformed; fix it, retrying the same bytes will not help.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The other side speaks something else, or another version: close the connection.
    #[error("protocol mismatch: {0}")]
    Protocol(String),
}
