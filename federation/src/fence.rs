//! Fences: per-sender order when the *sender* moves to another broker.
//!
//! Each broker numbers what it queues from its own chain, so two brokers' chains are
//! independent: when agent `s` moves from broker A to broker B, what it sent at B can overtake
//! what it sent at A (A was down, or cut off, or just slower). A fence puts the two in order.
//!
//! 1. B registers the moved agent with a [`Fence`] naming where it was: A, and the incarnation
//!    it had there. Every message `s` sends at B carries it (`Message::after`).
//! 2. When A learns that `s` moved (the registry says so; after a restart if A was down), it
//!    queues a *closing* envelope for `s` on every chain it has (to every broker it knows),
//!    behind everything `s` sent through A, and closes the fence for its own inboxes.
//! 3. A receiver holds a message whose fence it has not seen closed ([`Fences::hold`]), and
//!    releases what was held, in arrival order, when the closing envelope arrives
//!    ([`Fences::close`]): by then every message `s` sent at A towards this receiver has been
//!    delivered, because the closing envelope came last on A's chain.
//! 4. Moves chain: a closing envelope sent by B carries B's own fence (`after = A`) and is held
//!    like a message until A's fence closes, so a move A → B → C releases in order too.
//! 5. A fence that stays open too long (A gone for good) is given up ([`Fences::overdue`]):
//!    what it held is delivered, counted and logged, rather than kept for ever.
//!
//! The same book serves the *recipient's* move (redirects). A broker that has been sending
//! agent `r`'s messages to broker P and now sends them to broker N (r moved) first queues a
//! [`Marker`] to P, behind everything it sent there, and marks what it sends to N with the
//! marker's sequence (`Envelope::wait`). P passes the marker on after what it forwarded to r
//! (or, if it has not noticed the move yet, after r's inbox when it does). N holds the marked
//! messages until the marker arrives: the book's key is then (recipient, sending broker), and
//! the "incarnation" is the marker's sequence.
//!
//! The book of closed fences and held entries is pure state, testable without a network; the
//! broker keeps it in memory and mirrors every change to storage in the same write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{AgentName, BrokerId, Message};

/// A sender's previous attachment: everything it sent there comes before what names this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fence {
    pub broker: BrokerId,
    pub incarnation: u64,
}

/// A redirect marker: broker `origin` stopped sending `agent`'s messages along the path this
/// marker travels, at its sequence `mark`; everything it sent that way came before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub origin: BrokerId,
    pub agent: AgentName,
    pub mark: u64,
}

/// What a fence can hold: a message for a local inbox, or another broker's closing of a later
/// attachment of the same sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Held {
    Message { to: AgentName, message: Message },
    Close(Fence),
}

/// One held entry, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldEntry {
    /// The fence it waits for (its broker is part of the storage key).
    pub fence: Fence,
    /// When it was held (ms since the epoch).
    pub since_ms: u64,
    pub item: Held,
}

/// What closing a fence let go, in the order it must be delivered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Release {
    /// Messages for local inboxes, in order.
    pub deliver: Vec<(AgentName, Message)>,
    /// Fences now closed: (sender, broker, incarnation), to persist.
    pub closed: Vec<(AgentName, Fence)>,
    /// Held entries no longer held: (sender, broker, position), to delete.
    pub freed: Vec<(AgentName, BrokerId, u64)>,
}

/// Closed fences and what waits for open ones.
#[derive(Debug, Default)]
pub struct Fences {
    /// Per (sender, old broker): the highest incarnation closed there.
    closed: BTreeMap<(AgentName, BrokerId), u64>,
    /// Per (sender, old broker): held entries by position, oldest first.
    held: BTreeMap<(AgentName, BrokerId), BTreeMap<u64, HeldEntry>>,
}

impl Fences {
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores a closed fence read from storage.
    pub fn restore_closed(&mut self, from: AgentName, fence: Fence) {
        let c = self.closed.entry((from, fence.broker)).or_default();
        *c = (*c).max(fence.incarnation);
    }

    /// Restores a held entry read from storage.
    pub fn restore_held(&mut self, from: AgentName, pos: u64, entry: HeldEntry) {
        self.held
            .entry((from, entry.fence.broker))
            .or_default()
            .insert(pos, entry);
    }

    /// Must something from `from` that names `after` wait? Yes while that fence is open.
    /// (Everything a sender sends from one attachment names the same fence, so once it is
    /// closed nothing of that attachment waits any more.)
    pub fn must_hold(&self, from: &AgentName, after: Option<Fence>) -> bool {
        let Some(f) = after else { return false };
        let key = (from.clone(), f.broker);
        self.closed.get(&key).is_none_or(|c| *c < f.incarnation)
    }

    /// Holds `item` behind `fence` at position `pos` (unique, increasing). Returns the entry
    /// to store.
    pub fn hold(
        &mut self,
        from: &AgentName,
        fence: Fence,
        pos: u64,
        now_ms: u64,
        item: Held,
    ) -> HeldEntry {
        let entry = HeldEntry {
            fence,
            since_ms: now_ms,
            item,
        };
        self.held
            .entry((from.clone(), fence.broker))
            .or_default()
            .insert(pos, entry.clone());
        entry
    }

    /// Closes `fence` for `from` (everything `from` sent at `fence.broker` up to that
    /// incarnation has been delivered here) and releases what waited, cascading through held
    /// closings of later attachments.
    pub fn close(&mut self, from: &AgentName, fence: Fence) -> Release {
        let mut out = Release::default();
        self.close_into(from, fence, &mut out);
        out
    }

    fn close_into(&mut self, from: &AgentName, fence: Fence, out: &mut Release) {
        let key = (from.clone(), fence.broker);
        let c = self.closed.entry(key.clone()).or_default();
        if *c >= fence.incarnation {
            return;
        }
        *c = fence.incarnation;
        out.closed.push((from.clone(), fence));
        let Some(queue) = self.held.get_mut(&key) else {
            return;
        };
        let ready: Vec<u64> = queue
            .iter()
            .filter(|(_, e)| e.fence.incarnation <= fence.incarnation)
            .map(|(p, _)| *p)
            .collect();
        let mut items = Vec::with_capacity(ready.len());
        for p in ready {
            let e = queue.remove(&p).expect("listed");
            out.freed.push((from.clone(), fence.broker, p));
            items.push(e.item);
        }
        if queue.is_empty() {
            self.held.remove(&key);
        }
        for item in items {
            match item {
                Held::Message { to, message } => out.deliver.push((to, message)),
                Held::Close(later) => self.close_into(from, later, out),
            }
        }
    }

    /// Fences whose oldest held entry has waited longer than `wait_ms`: the broker they name
    /// is presumed gone, and they are to be given up (closed anyway).
    pub fn overdue(&self, now_ms: u64, wait_ms: u64) -> Vec<(AgentName, Fence)> {
        let mut out = Vec::new();
        for ((from, _), queue) in &self.held {
            let Some(oldest) = queue.values().map(|e| e.since_ms).min() else {
                continue;
            };
            if now_ms.saturating_sub(oldest) >= wait_ms {
                let inc = queue
                    .values()
                    .map(|e| e.fence.incarnation)
                    .max()
                    .expect("not empty");
                let broker = queue.values().next().expect("not empty").fence.broker;
                out.push((
                    from.clone(),
                    Fence {
                        broker,
                        incarnation: inc,
                    },
                ));
            }
        }
        out
    }

    /// How many entries are held in all.
    pub fn held_count(&self) -> usize {
        self.held.values().map(|q| q.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageKind;
    use crate::Dot;

    fn name(n: &str) -> AgentName {
        AgentName::new(n).unwrap()
    }

    fn msg(from: &str, seq: u64) -> Message {
        Message {
            dot: Dot::new(BrokerId::from_u32(2), seq),
            from: name(from),
            to: name("bob"),
            sent_at_ms: 0,
            content: format!("m{seq}"),
            data: None,
            reply_to: None,
            kind: MessageKind::Direct,
            after: None,
        }
    }

    fn fence(b: u32, inc: u64) -> Fence {
        Fence {
            broker: BrokerId::from_u32(b),
            incarnation: inc,
        }
    }

    fn contents(r: &Release) -> Vec<String> {
        r.deliver.iter().map(|(_, m)| m.content.clone()).collect()
    }

    #[test]
    fn held_messages_wait_for_their_fence_and_leave_in_order() {
        let mut f = Fences::new();
        let s = name("sam");
        let a = fence(1, 3);
        assert!(f.must_hold(&s, Some(a)));
        assert!(
            !f.must_hold(&s, None),
            "a sender that never moved is never held"
        );
        for seq in [10, 11, 12] {
            let item = Held::Message {
                to: name("bob"),
                message: msg("sam", seq),
            };
            f.hold(&s, a, seq, 0, item);
        }
        assert_eq!(f.held_count(), 3);
        let r = f.close(&s, a);
        assert_eq!(contents(&r), ["m10", "m11", "m12"]);
        assert_eq!(r.freed.len(), 3);
        assert_eq!(r.closed, vec![(s.clone(), a)]);
        assert!(!f.must_hold(&s, Some(a)), "closed: later ones pass");
        assert!(
            !f.must_hold(&s, Some(fence(1, 2))),
            "an older attachment is closed too"
        );
        assert!(
            f.must_hold(&s, Some(fence(1, 4))),
            "a newer one at the same broker is not"
        );
        assert_eq!(
            f.close(&s, a),
            Release::default(),
            "closing twice is a no-op"
        );
    }

    #[test]
    fn a_chain_of_moves_releases_in_order() {
        // sam: broker 1 (inc 1) → broker 2 (inc 2) → broker 3 (inc 3). Broker 2's messages and
        // its closing wait for broker 1's fence; broker 3's wait for broker 2's.
        let mut f = Fences::new();
        let s = name("sam");
        let m = |seq| Held::Message {
            to: name("bob"),
            message: msg("sam", seq),
        };
        f.hold(&s, fence(2, 2), 5, 0, m(30));
        f.hold(&s, fence(1, 1), 1, 0, m(20));
        f.hold(&s, fence(1, 1), 2, 0, m(21));
        f.hold(&s, fence(1, 1), 3, 0, Held::Close(fence(2, 2)));
        let r = f.close(&s, fence(1, 1));
        assert_eq!(contents(&r), ["m20", "m21", "m30"]);
        assert_eq!(r.closed.len(), 2);
        assert_eq!(f.held_count(), 0);
    }

    #[test]
    fn overdue_fences_are_reported_once_old_enough() {
        let mut f = Fences::new();
        let s = name("sam");
        let item = Held::Message {
            to: name("bob"),
            message: msg("sam", 1),
        };
        f.hold(&s, fence(1, 3), 1, 1_000, item);
        assert!(f.overdue(50_000, 60_000).is_empty());
        assert_eq!(f.overdue(61_000, 60_000), vec![(s.clone(), fence(1, 3))]);
        let r = f.close(&s, fence(1, 3));
        assert_eq!(r.deliver.len(), 1);
        assert!(f.overdue(1_000_000, 60_000).is_empty());
    }

    #[test]
    fn senders_and_brokers_are_independent() {
        let mut f = Fences::new();
        let item = |s| Held::Message {
            to: name("bob"),
            message: msg(s, 1),
        };
        f.hold(&name("sam"), fence(1, 1), 1, 0, item("sam"));
        f.hold(&name("ann"), fence(1, 1), 2, 0, item("ann"));
        let r = f.close(&name("sam"), fence(1, 1));
        assert_eq!(r.deliver.len(), 1);
        assert!(f.must_hold(&name("ann"), Some(fence(1, 1))));
        assert_eq!(f.held_count(), 1);
    }
}
