//! The crate's one error type, and the error value that crosses the wire.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What kind of failure a broker reports, named for what the caller does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request was malformed or a value was invalid: fix the input.
    InvalidInput,
    /// The request needs a registered agent: register first.
    NotRegistered,
    /// The name is held by another agent: use its token or choose another name.
    NameTaken,
    /// The token does not match: use the right token.
    BadToken,
    /// The token's claim lapsed: register the name anew, without a token.
    TokenExpired,
    /// No such agent anywhere this broker knows: check the name, or send with `hold`.
    UnknownRecipient,
    /// The recipient's inbox is full: wait until it reads, then resend.
    InboxFull,
    /// The message or frame is over the limit: send less.
    TooLarge,
    /// Too many requests: wait and retry.
    RateLimited,
    /// The broker is shutting down or its storage is unavailable: retry, maybe elsewhere.
    Unavailable,
    /// The other side broke the protocol: the connection will close.
    Protocol,
    /// A bug or an unexpected condition on the broker: report it.
    Internal,
    /// The broker requires clients to prove the mesh secret first, or the proof was wrong:
    /// configure the secret (`IPC_MESH_SECRET` or `[mesh] secret_file`).
    Unauthorized,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotRegistered => "not_registered",
            ErrorKind::NameTaken => "name_taken",
            ErrorKind::BadToken => "bad_token",
            ErrorKind::TokenExpired => "token_expired",
            ErrorKind::UnknownRecipient => "unknown_recipient",
            ErrorKind::InboxFull => "inbox_full",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthorized => "unauthorized",
        }
    }

    /// Whether the same request may succeed if simply tried again later.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::RateLimited | ErrorKind::Unavailable)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels in a response frame: a kind to act on and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<federation::Error> for WireError {
    fn from(e: federation::Error) -> Self {
        match e {
            federation::Error::Invalid(m) => WireError::new(ErrorKind::InvalidInput, m),
            federation::Error::Protocol(m) => WireError::new(ErrorKind::Protocol, m),
        }
    }
}

/// Every failure in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker refused the request; its kind says what to do.
    #[error(transparent)]
    Remote(#[from] WireError),
    /// No broker answered at this address: start one, or check `--broker`.
    #[error("cannot reach a broker at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The connection dropped with the request in flight: its outcome is unknown.
    #[error("the connection to the broker was lost")]
    Disconnected,
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The configuration is wrong: fix the named key.
    #[error("{0}")]
    Config(String),
    /// The storage engine failed: the broker cannot continue safely.
    #[error("storage: {0}")]
    Storage(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The wire kind, when the broker said no.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Remote(w) => Some(w.kind),
            _ => None,
        }
    }
}

impl From<federation::Error> for Error {
    fn from(e: federation::Error) -> Self {
        Error::Remote(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
