//! The retention sweep: what the broker forgets, and whom it tells.
//!
//! Every sweep (a twentieth of the retention, between 1 s and 10 min apart):
//!
//! 1. Read messages older than the retention (since they were read) are deleted.
//! 2. Unread messages older than the retention (since they were sent) expire: they are
//!    deleted and their sender, if it is an agent of this broker, gets a notice naming them.
//! 3. Forwarding records whose window has passed are deleted, freeing the old name.
//! 4. Agents unseen for longer than the retention, offline and with nothing unread, are
//!    forgotten: their claim lapses and their token stops working.

use std::time::Duration;

use federation::message::MessageKind;
use federation::{AgentName, Dot, Message};
use tokio_util::sync::CancellationToken;

use super::{now_ms, Broker};
use crate::identity::SYSTEM;
use crate::inbox;
use crate::storage::{keys, Batch};

pub(super) async fn run(broker: Broker, cancel: CancellationToken) {
    let every = (broker.config().limits.retention / 20)
        .clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cancel.cancelled() => return,
        }
        let b = broker.clone();
        match tokio::task::spawn_blocking(move || b.sweep(now_ms())).await {
            Ok(Ok(n)) if n.expired > 0 || n.deleted > 0 || n.forgotten > 0 => {
                tracing::info!(
                    expired = n.expired,
                    deleted = n.deleted,
                    forgotten = n.forgotten,
                    "retention sweep"
                );
                broker.commit().request();
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "retention sweep failed"),
            Err(e) => tracing::warn!(error = %e, "retention sweep panicked"),
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Unread messages expired (their senders told).
    pub expired: u64,
    /// Read messages deleted.
    pub deleted: u64,
    /// Names forgotten (lapsed claims and ended forwards).
    pub forgotten: u64,
}

impl Broker {
    /// One retention sweep at time `now` (ms). Blocking: call it off the runtime.
    pub fn sweep(&self, now: u64) -> crate::error::Result<Swept> {
        let retention = self.config().limits.retention.as_millis() as u64;
        let cutoff = now.saturating_sub(retention);
        let mut swept = Swept::default();
        let names: Vec<AgentName> = {
            let s = self.state();
            s.agents.keys().chain(s.unread.keys()).cloned().collect()
        };
        let engine = &*self.inner.engine;
        for name in names {
            let mut s = self.state();
            let mut batch = Batch::new();
            let mut expired: Vec<Message> = Vec::new();
            let mut first_kept = u64::MAX;
            for e in inbox::entries(engine, &name)? {
                match e.read_at_ms {
                    Some(read_at) if read_at <= cutoff => {
                        inbox::remove(&mut batch, &name, e.arrival);
                        swept.deleted += 1;
                    }
                    None if e.message.sent_at_ms <= cutoff => {
                        inbox::remove(&mut batch, &name, e.arrival);
                        expired.push(e.message);
                    }
                    _ => first_kept = first_kept.min(e.arrival),
                }
            }
            for k in inbox::stale_ranges(engine, &name, first_kept)? {
                batch.delete(k);
            }
            if batch.is_empty() {
                continue;
            }
            let n_expired = expired.len() as u64;
            // Tell each sender, one notice per expired message.
            for m in expired {
                if m.from.as_str() == SYSTEM || !s.agents.contains_key(&m.from) {
                    continue;
                }
                let text = format!(
                    "⌛ your message {} to {} expired unread after {}: {}",
                    m.dot,
                    m.to,
                    humantime::format_duration(self.config().limits.retention),
                    preview(&m.content)
                );
                if !self.notify_expired(&mut s, &mut batch, &m, text, now) {
                    break;
                }
            }
            self.apply(&mut s, batch)
                .map_err(|e| crate::error::Error::Storage(e.message))?;
            if let Some(u) = s.unread.get_mut(&name) {
                *u = u.saturating_sub(n_expired);
                if *u == 0 {
                    s.unread.remove(&name);
                }
            }
            swept.expired += n_expired;
        }

        // Envelopes that waited for another broker longer than the retention expire; their
        // senders (when attached here) are told.
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = engine.scan(&[keys::OUTBOX], after.as_deref(), 1024)?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            let mut s = self.state();
            let mut batch = Batch::new();
            for (k, v) in &page {
                let Ok(env) = crate::outbox::decode(v) else {
                    continue;
                };
                if env.queued_ms > cutoff {
                    continue;
                }
                let Some((dest, _)) = crate::outbox::parse_key(k) else {
                    continue;
                };
                batch.delete(k.clone());
                if let Some(d) = s.outbox_depth.get_mut(&dest) {
                    *d = d.saturating_sub(1);
                }
                s.outbox_total = s.outbox_total.saturating_sub(1);
                swept.expired += 1;
                if env.closes.is_some() {
                    // A fence closing, not a message: nobody to tell (receivers waiting for it
                    // gave it up long ago).
                    continue;
                }
                let m = env.message;
                let sender_here = s
                    .agents
                    .get(&m.from)
                    .is_some_and(|a| !a.record.is_forward());
                if !sender_here || m.from.as_str() == SYSTEM {
                    tracing::warn!(id = %m.dot, to = %m.to, "a message expired undelivered; its sender is not attached here to be told");
                    continue;
                }
                let to = if env.broadcast {
                    "everyone".to_string()
                } else {
                    m.to.to_string()
                };
                let text = format!(
                    "⌛ your message {} to {to} expired undelivered after {} (broker {dest} could not be reached): {}",
                    m.dot,
                    humantime::format_duration(self.config().limits.retention),
                    preview(&m.content)
                );
                if !self.notify_expired(&mut s, &mut batch, &m, text, now) {
                    break;
                }
            }
            if !batch.is_empty() {
                self.apply(&mut s, batch)
                    .map_err(|e| crate::error::Error::Storage(e.message))?;
            }
        }

        // Forget which messages reached which inbox, once older than the retention.
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = engine.scan(&[keys::SEEN], after.as_deref(), 1024)?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            let mut batch = Batch::new();
            for (k, v) in &page {
                let sent = <[u8; 8]>::try_from(&v[..])
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if sent <= cutoff {
                    batch.delete(k.clone());
                }
            }
            if !batch.is_empty() {
                let mut s = self.state();
                self.apply(&mut s, batch)
                    .map_err(|e| crate::error::Error::Storage(e.message))?;
            }
        }

        // Forget send dedup keys older than the retention: the head of the log, a page at a time.
        loop {
            let mut s = self.state();
            let mut batch = Batch::new();
            let n = s.dedup.forget_before(engine, &mut batch, cutoff, 1024)?;
            if n > 0 {
                self.apply(&mut s, batch)
                    .map_err(|e| crate::error::Error::Storage(e.message))?;
            }
            if n < 1024 {
                break;
            }
        }

        // Forget ended forwards and lapsed claims.
        let mut s = self.state();
        let forget: Vec<AgentName> = s
            .agents
            .iter()
            .filter(|(n, a)| {
                if a.record.is_forward() {
                    a.record.forward_until_ms <= now
                } else {
                    self.claim_lapsed(&s, n, a, now)
                }
            })
            .map(|(n, _)| n.clone())
            .collect();
        if !forget.is_empty() {
            let mut batch = Batch::new();
            for n in &forget {
                batch.delete(keys::agent(n));
                for k in inbox::all_keys(engine, n)? {
                    batch.delete(k);
                }
            }
            self.apply(&mut s, batch)
                .map_err(|e| crate::error::Error::Storage(e.message))?;
            for n in &forget {
                if s.agents.remove(n).is_some_and(|a| !a.record.is_forward()) {
                    self.unpublish(n);
                }
                s.waiters.remove(n);
            }
            swept.forgotten = forget.len() as u64;
        }
        drop(s);
        self.inner
            .counters
            .messages_expired
            .fetch_add(swept.expired, std::sync::atomic::Ordering::Relaxed);
        Ok(swept)
    }
}

impl Broker {
    /// Puts a notice from `system` about expired message `m` into its sender's inbox. Call
    /// with the lock held; false if no sequence could be had (storage failing).
    fn notify_expired(
        &self,
        s: &mut super::State,
        batch: &mut Batch,
        m: &Message,
        content: String,
        now: u64,
    ) -> bool {
        let Ok(seq) = self.next_seq(s) else {
            return false;
        };
        let notice = Message {
            dot: Dot::new(self.id(), seq),
            from: AgentName::new(SYSTEM).expect("valid"),
            to: m.from.clone(),
            sent_at_ms: now,
            content,
            data: Some(
                serde_json::json!({"expired": m.dot.to_string(), "to": m.to.to_string()})
                    .to_string(),
            ),
            reply_to: Some(m.dot),
            kind: MessageKind::Notice,
            after: None,
        };
        inbox::put_unread(batch, &m.from, seq, inbox::encode_message(&notice));
        *s.unread.entry(m.from.clone()).or_default() += 1;
        s.last_arrival = s.last_arrival.max(seq);
        s.to_wake.push(m.from.clone());
        true
    }
}

fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(60).collect();
    if p.len() < s.len() {
        p.push('…');
    }
    p
}
