//! Per-identity rate limiting: a token bucket for each agent (or anonymous connection).

use std::collections::HashMap;
use std::time::Instant;

/// Buckets keyed by identity. Bounded: when it holds more than `MAX_BUCKETS` identities, full
/// buckets (identities that have been quiet) are forgotten, which costs them nothing.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

const MAX_BUCKETS: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_sec == 0` turns limiting off.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        RateLimiter {
            per_sec: per_sec as f64,
            burst: burst.max(1) as f64,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `who`; on refusal, returns how long until one is available.
    pub fn check(&mut self, who: &str, now: Instant) -> Result<(), std::time::Duration> {
        if self.per_sec == 0.0 {
            return Ok(());
        }
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(who) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.buckets
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < burst);
        }
        let b = self.buckets.entry(who.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - b.tokens) / self.per_sec,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let mut r = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.check("a", t0).is_ok());
        }
        let wait = r.check("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100));
        assert!(r.check("b", t0).is_ok(), "identities are independent");
        assert!(r.check("a", t0 + Duration::from_millis(150)).is_ok());
    }

    #[test]
    fn zero_means_unlimited() {
        let mut r = RateLimiter::new(0, 0);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert!(r.check("a", t0).is_ok());
        }
    }
}
