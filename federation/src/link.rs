//! What guards one peer link, below the peer protocol: whether it is encrypted, and how fast
//! a peer may make us read.
//!
//! 1. A dialer asks for encryption in its hello when [`LinkConfig::wants_encryption`] says so
//!    for the address it dials.
//! 2. An acceptor admits the hello or refuses it ([`LinkConfig::admits`]): a broker configured
//!    to encrypt never takes a plaintext peer beyond what its policy allows (no downgrade).
//! 3. Every frame read from a link is charged to a token bucket ([`Throttle`]); when the peer
//!    is over its rate, the reader waits before reading on. Nothing is dropped: TCP's window
//!    fills and the peer's writer slows down. Each wait is counted for `status`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::auth::Secret;

/// When peer links are encrypted (`[mesh] encrypt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encrypt {
    /// Whenever a mesh secret is set; links whose two ends are on loopback stay plaintext if
    /// `plain_loopback` is on.
    #[default]
    Auto,
    /// Every peer link, loopback too; plaintext peers are refused.
    Always,
    /// No peer link; the broker must listen on loopback only.
    Never,
}

impl Encrypt {
    pub fn parse(s: &str) -> Option<Encrypt> {
        match s {
            "auto" => Some(Encrypt::Auto),
            "always" => Some(Encrypt::Always),
            "never" => Some(Encrypt::Never),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encrypt::Auto => "auto",
            Encrypt::Always => "always",
            Encrypt::Never => "never",
        }
    }
}

/// Inbound limits per peer link; 0 turns a limit off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundLimit {
    pub bytes_per_sec: u64,
    pub frames_per_sec: u64,
}

/// The link-level configuration of a broker's mesh driver.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub encrypt: Encrypt,
    pub plain_loopback: bool,
    /// The mesh secret the link keys are derived from. Without one nothing is encrypted.
    pub secret: Option<Secret>,
    pub limit: InboundLimit,
    /// How long an encrypted handshake may take.
    pub handshake_timeout: Duration,
}

impl LinkConfig {
    /// Plaintext links without limits (tests, and brokers without a secret).
    pub fn plain() -> LinkConfig {
        LinkConfig {
            encrypt: Encrypt::Auto,
            plain_loopback: true,
            secret: None,
            limit: InboundLimit::default(),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Encrypted links everywhere with `secret`.
    pub fn encrypted(secret: Secret) -> LinkConfig {
        LinkConfig {
            encrypt: Encrypt::Always,
            secret: Some(secret),
            ..LinkConfig::plain()
        }
    }

    /// Whether a dial to `addr` asks for an encrypted link.
    pub fn wants_encryption(&self, addr: &str) -> bool {
        if self.secret.is_none() {
            return false;
        }
        match self.encrypt {
            Encrypt::Always => true,
            Encrypt::Never => false,
            Encrypt::Auto => !(self.plain_loopback && is_loopback(addr)),
        }
    }

    /// Whether a peer hello from `remote` is admitted; the error is the reason given to it.
    pub fn admits(&self, encrypted: bool, remote: &str) -> Result<(), String> {
        let Some(_) = &self.secret else {
            return if encrypted {
                Err("this broker has no mesh secret, so it cannot set up an encrypted link".into())
            } else {
                Ok(())
            };
        };
        if encrypted {
            return Ok(());
        }
        match self.encrypt {
            Encrypt::Never => Ok(()),
            Encrypt::Auto if self.plain_loopback && is_loopback(remote) => Ok(()),
            Encrypt::Auto => Err(format!(
                "plaintext peer link from {remote} refused: this broker encrypts every peer \
                 link{} (encrypt = \"auto\"); a peer with the mesh secret asks for encryption \
                 itself, so this is a peer without the secret, a misconfigured one, or a \
                 downgrade attempt",
                if self.plain_loopback {
                    " beyond loopback"
                } else {
                    ", loopback too (plain_loopback = false)"
                }
            )),
            Encrypt::Always => Err(format!(
                "plaintext peer link from {remote} refused: this broker requires encrypted \
                 links (encrypt = \"always\")"
            )),
        }
    }
}

/// Whether `addr` (`ip:port`, or `localhost:port`) is on loopback. Names other than
/// `localhost` count as remote: they could resolve anywhere.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return a.ip().is_loopback();
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    matches!(addr.rsplit_once(':'), Some(("localhost", _)))
}

/// A token bucket on bytes and frames read from one link. Each bucket holds at most one
/// second of its rate; a frame may take it below zero (a frame is never split or refused),
/// and the reader then waits until it is back at zero.
#[derive(Debug)]
pub struct Throttle {
    limit: InboundLimit,
    bytes: f64,
    frames: f64,
    at: tokio::time::Instant,
}

impl Throttle {
    pub fn new(limit: InboundLimit, now: tokio::time::Instant) -> Throttle {
        Throttle {
            limit,
            bytes: limit.bytes_per_sec as f64,
            frames: limit.frames_per_sec as f64,
            at: now,
        }
    }

    pub fn is_off(&self) -> bool {
        self.limit.bytes_per_sec == 0 && self.limit.frames_per_sec == 0
    }

    /// Charges what was read; returns how long to wait before reading on.
    pub fn charge(&mut self, now: tokio::time::Instant, bytes: usize, frames: u32) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let mut wait: f64 = 0.0;
        for (tokens, rate, cost) in [
            (
                &mut self.bytes,
                self.limit.bytes_per_sec as f64,
                bytes as f64,
            ),
            (
                &mut self.frames,
                self.limit.frames_per_sec as f64,
                frames as f64,
            ),
        ] {
            if rate == 0.0 {
                continue;
            }
            *tokens = (*tokens + elapsed * rate).min(rate) - cost;
            if *tokens < 0.0 {
                wait = wait.max(-*tokens / rate);
            }
        }
        Duration::from_secs_f64(wait)
    }
}

/// Counters of one link, shared between its reader task and `status`.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub encrypted: bool,
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// How often reading paused for the inbound limit, and for how long in all.
    pub throttled: AtomicU64,
    pub throttled_ms: AtomicU64,
}

/// A link's counters as `status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub encrypted: bool,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub throttled: u64,
    pub throttled_ms: u64,
}

impl LinkCounters {
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            encrypted: self.encrypted,
            frames_in: self.frames_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            throttled_ms: self.throttled_ms.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"correct horse battery staple".to_vec()).unwrap()
    }

    fn cfg(encrypt: Encrypt, plain_loopback: bool) -> LinkConfig {
        LinkConfig {
            encrypt,
            plain_loopback,
            secret: Some(secret()),
            ..LinkConfig::plain()
        }
    }

    #[test]
    fn loopback_is_recognised() {
        assert!(is_loopback("127.0.0.3:9876"));
        assert!(is_loopback("[::1]:9876"));
        assert!(is_loopback("localhost:9876"));
        assert!(!is_loopback("10.0.0.5:9876"));
        assert!(!is_loopback("build-box:9876"));
        assert!(!is_loopback("mem-1:9876"));
    }

    #[test]
    fn who_encrypts() {
        assert!(!LinkConfig::plain().wants_encryption("10.0.0.5:1"));
        let auto = cfg(Encrypt::Auto, true);
        assert!(auto.wants_encryption("10.0.0.5:1"));
        assert!(auto.wants_encryption("build-box:1"));
        assert!(!auto.wants_encryption("127.0.0.2:1"));
        assert!(cfg(Encrypt::Auto, false).wants_encryption("127.0.0.2:1"));
        assert!(cfg(Encrypt::Always, true).wants_encryption("127.0.0.2:1"));
        assert!(!cfg(Encrypt::Never, true).wants_encryption("10.0.0.5:1"));
    }

    #[test]
    fn no_downgrade() {
        let auto = cfg(Encrypt::Auto, true);
        assert!(auto.admits(true, "10.0.0.5:1").is_ok());
        assert!(auto.admits(false, "127.0.0.2:1").is_ok());
        let e = auto.admits(false, "10.0.0.5:1").unwrap_err();
        assert!(e.contains("downgrade"), "{e}");
        assert!(cfg(Encrypt::Auto, false)
            .admits(false, "127.0.0.2:1")
            .is_err());
        assert!(cfg(Encrypt::Always, true)
            .admits(false, "127.0.0.2:1")
            .is_err());
        assert!(LinkConfig::plain().admits(true, "127.0.0.2:1").is_err());
        assert!(LinkConfig::plain().admits(false, "10.0.0.5:1").is_ok());
    }

    #[test]
    fn throttle_waits_instead_of_dropping() {
        let t0 = tokio::time::Instant::now();
        let limit = InboundLimit {
            bytes_per_sec: 1000,
            frames_per_sec: 0,
        };
        let mut t = Throttle::new(limit, t0);
        assert_eq!(t.charge(t0, 1000, 1), Duration::ZERO, "one second of burst");
        let w = t.charge(t0, 500, 1);
        assert_eq!(w, Duration::from_millis(500));
        // After waiting, the debt is paid.
        let t1 = t0 + w;
        assert_eq!(t.charge(t1, 0, 1), Duration::ZERO);
        let mut f = Throttle::new(
            InboundLimit {
                bytes_per_sec: 0,
                frames_per_sec: 10,
            },
            t0,
        );
        for _ in 0..10 {
            assert_eq!(f.charge(t0, 1 << 20, 1), Duration::ZERO);
        }
        assert_eq!(f.charge(t0, 1, 1), Duration::from_millis(100));
        assert!(Throttle::new(InboundLimit::default(), t0).is_off());
    }
}
