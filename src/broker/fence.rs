//! The broker's side of fences ([`federation::fence`]): per-sender order across a sender's
//! move from one broker to another.
//!
//! 1. A moved agent's record names its previous attachment (`AgentRecord::after`); everything
//!    it sends here carries it (`Message::after`).
//! 2. Before a message goes into a local inbox, [`Broker::fence_holds`] checks its fence: while
//!    the old broker has not said it is done with that sender, the message waits (stored under
//!    `h`, acknowledged like any other: it is durable, just not visible yet).
//! 3. When this broker learns that one of its agents moved away, it queues a closing envelope
//!    to every broker it knows, behind everything that agent sent from here, and closes the
//!    fence for its own inboxes ([`Broker::emit_fences`]). A closing that arrives releases,
//!    in order, what waited ([`Broker::close_fence`]); closed fences are kept under `g`.
//! 4. A fence still open after [`FENCE_WAIT`] is given up: its old broker is presumed gone,
//!    what waited is delivered, and the count shows in status as `fences_given_up`.

use std::collections::BTreeSet;

use federation::delivery::Envelope;
use federation::fence::{Fence, Fences, Held, HeldEntry};
use federation::message::MessageKind;
use federation::{AgentName, BrokerId, Dot, Message};

use super::{Broker, State};
use crate::error::{Error, Result};
use crate::storage::{Batch, Engine};

/// How long a message waits for its sender's old broker before it is delivered anyway.
/// Longer than a restart or a typical partition; short enough that an old broker that never
/// comes back delays its agents' new messages by a minute, not for ever.
pub const FENCE_WAIT_MS: u64 = 60_000;

/// Closed fences: `g` + sender + `\0` + old broker (u32 BE) → highest closed incarnation.
pub const CLOSED: u8 = b'g';
/// Held entries: `h` + sender + `\0` + old broker + position (u64 BE) → encoded entry.
pub const HELD: u8 = b'h';

fn prefix(space: u8, from: &AgentName, broker: BrokerId) -> Vec<u8> {
    let mut k = Vec::with_capacity(from.as_str().len() + 14);
    k.push(space);
    k.extend_from_slice(from.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&broker.as_u32().to_be_bytes());
    k
}

fn held_key(from: &AgentName, broker: BrokerId, pos: u64) -> Vec<u8> {
    let mut k = prefix(HELD, from, broker);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

/// Sender, old broker and (for held entries) position of a fence key.
fn parse(key: &[u8]) -> Option<(AgentName, BrokerId, Option<u64>)> {
    let rest = key.get(1..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let name = AgentName::new(std::str::from_utf8(&rest[..nul]).ok()?).ok()?;
    let tail = &rest[nul + 1..];
    let broker = BrokerId::from_u32(u32::from_be_bytes(tail.get(..4)?.try_into().ok()?));
    let pos = match tail.len() {
        4 => None,
        12 => Some(u64::from_be_bytes(tail[4..12].try_into().ok()?)),
        _ => return None,
    };
    Some((name, broker, pos))
}

/// The fence book as stored.
pub fn load(engine: &dyn Engine) -> Result<Fences> {
    let mut f = Fences::new();
    for (k, v) in engine.scan(&[CLOSED], None, usize::MAX)? {
        let (Some((from, broker, None)), Ok(inc)) = (parse(&k), <[u8; 8]>::try_from(&v[..])) else {
            return Err(Error::Storage("corrupt closed fence".into()));
        };
        f.restore_closed(
            from,
            Fence {
                broker,
                incarnation: u64::from_be_bytes(inc),
            },
        );
    }
    for (k, v) in engine.scan(&[HELD], None, usize::MAX)? {
        let Some((from, _, Some(pos))) = parse(&k) else {
            return Err(Error::Storage("corrupt held entry key".into()));
        };
        let entry: HeldEntry = federation::wire::decode(&v)
            .map_err(|e| Error::Storage(format!("corrupt held entry: {e}")))?;
        f.restore_held(from, pos, entry);
    }
    Ok(f)
}

impl Broker {
    /// If `m` must wait for its sender's old broker, holds it for `to` (in `batch`) and says
    /// so; the caller then does not deliver it. Call with the lock held.
    pub(super) fn fence_holds(
        &self,
        s: &mut State,
        batch: &mut Batch,
        to: &AgentName,
        m: &Message,
    ) -> bool {
        let Some(fence) = m.after else { return false };
        if !s.fences.must_hold(&m.from, Some(fence)) {
            return false;
        }
        let Ok(pos) = self.next_seq(s) else {
            // No position for it: deliver rather than lose it.
            return false;
        };
        let mut m = m.clone();
        m.to = to.clone();
        let item = Held::Message {
            to: to.clone(),
            message: m.clone(),
        };
        let entry = s.fences.hold(&m.from, fence, pos, super::now_ms(), item);
        batch.put(
            held_key(&m.from, fence.broker, pos),
            federation::wire::encode(&entry),
        );
        true
    }

    /// `from`'s attachment `fence` is over (everything it sent from there, towards here, has
    /// arrived): release what waited for it. `after` is the fence of the closing itself (the
    /// attachment before that one), behind which the closing may have to wait in turn. Call
    /// with the lock held.
    pub(super) fn close_fence(
        &self,
        s: &mut State,
        batch: &mut Batch,
        from: &AgentName,
        fence: Fence,
        after: Option<Fence>,
    ) {
        if s.fences.must_hold(from, after) {
            let Some(a) = after else { return };
            if let Ok(pos) = self.next_seq(s) {
                let entry = s
                    .fences
                    .hold(from, a, pos, super::now_ms(), Held::Close(fence));
                batch.put(
                    held_key(from, a.broker, pos),
                    federation::wire::encode(&entry),
                );
            }
            return;
        }
        self.release(s, batch, from, fence);
    }

    fn release(&self, s: &mut State, batch: &mut Batch, from: &AgentName, fence: Fence) {
        let r = s.fences.close(from, fence);
        for (who, f) in &r.closed {
            batch.put(
                prefix(CLOSED, who, f.broker),
                f.incarnation.to_be_bytes().to_vec(),
            );
        }
        for (who, broker, pos) in &r.freed {
            batch.delete(held_key(who, *broker, *pos));
        }
        if !r.deliver.is_empty() {
            tracing::debug!(agent = %from, old = %fence.broker, released = r.deliver.len(), "fence closed: held messages delivered");
        }
        for (to, m) in r.deliver {
            self.put_inbox_now(s, batch, &to, &m);
        }
    }

    /// One of this broker's agents, attached here as `incarnation`, moved to another broker:
    /// tell every broker, behind everything it sent from here, and close the fence here. Call
    /// with the lock held, in the batch that removes the agent.
    pub(super) fn emit_fences(
        &self,
        s: &mut State,
        batch: &mut Batch,
        from: &AgentName,
        incarnation: u64,
        after: Option<Fence>,
    ) {
        let me = self.id();
        let fence = Fence {
            broker: me,
            incarnation,
        };
        let now = super::now_ms();
        let mut dests: BTreeSet<BrokerId> = s.members.keys().copied().collect();
        if let Some(m) = self.mesh() {
            dests.extend(m.known_brokers());
        }
        dests.remove(&me);
        for dest in dests {
            let Ok(seq) = self.next_seq(s) else { break };
            let closing = Message {
                dot: Dot::new(me, seq),
                from: from.clone(),
                to: from.clone(),
                sent_at_ms: now,
                content: String::new(),
                data: None,
                reply_to: None,
                kind: MessageKind::Notice,
                after,
            };
            let mut env = Envelope::new(Dot::new(me, seq), dest, closing, now);
            env.closes = Some(fence);
            self.enqueue(s, batch, seq, env);
            s.last_arrival = seq;
        }
        self.close_fence(s, batch, from, fence, after);
    }

    /// Gives up fences whose old broker has not answered for [`FENCE_WAIT_MS`]: what waited
    /// is delivered now (its order against what that broker may still send is no longer
    /// guaranteed; logged and counted).
    pub fn give_up_overdue_fences(&self) {
        let mut s = self.state();
        let overdue = s.fences.overdue(super::now_ms(), FENCE_WAIT_MS);
        if overdue.is_empty() {
            return;
        }
        let mut batch = Batch::new();
        for (from, fence) in overdue {
            tracing::warn!(agent = %from, old_broker = %fence.broker, "the agent's previous broker has not confirmed its earlier messages for {} s; delivering its newer messages anyway (order against those is not guaranteed)", FENCE_WAIT_MS / 1000);
            self.inner
                .counters
                .fences_given_up
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.release(&mut s, &mut batch, &from, fence);
        }
        if self.apply(&mut s, batch).is_ok() {
            drop(s);
            self.commit().request();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let n = AgentName::new("sam").unwrap();
        let b = BrokerId::from_u32(0xabcd);
        assert_eq!(parse(&prefix(CLOSED, &n, b)), Some((n.clone(), b, None)));
        assert_eq!(parse(&held_key(&n, b, 42)), Some((n, b, Some(42))));
        assert_eq!(parse(b"h"), None);
    }
}
