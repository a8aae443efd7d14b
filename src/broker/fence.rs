//! The broker's side of fences ([`federation::fence`]): per-pair order across a move of the
//! sender or of the recipient from one broker to another.
//!
//! Sender moves:
//! 1. A moved agent's record names its previous attachment (`AgentRecord::after`); everything
//!    it sends here carries it (`Message::after`).
//! 2. Before a message goes into a local inbox, [`Broker::fence_holds`] checks its fence: while
//!    the old broker has not said it is done with that sender, the message waits (stored under
//!    `h`, acknowledged like any other: it is durable, just not visible yet).
//! 3. When this broker learns that one of its agents moved away, it queues a closing envelope
//!    to every broker it knows, behind everything that agent sent from here, and closes the
//!    fence for its own inboxes ([`Broker::emit_fences`]). A closing that arrives releases,
//!    in order, what waited ([`Broker::close_fence`]); closed fences are kept under `g`.
//!
//! Recipient moves:
//! 4. This broker remembers where it last sent each recipient's messages (`t`). When that
//!    changes from broker P to another (the recipient moved), [`Broker::route_for`] queues a
//!    marker to P first, and the new copies carry the marker's sequence (`Envelope::wait`).
//! 5. P passes the marker on to where the recipient is now, behind what it forwarded to it;
//!    if P still has the recipient attached (it has not heard of the move), the marker is
//!    parked (`v`) and follows the recipient's inbox when P does hear of it.
//! 6. The new broker holds the marked copies (`j`) until the marker arrives (closed under `i`).
//!
//! A fence or marker still missing after `FENCE_WAIT_MS` is given up: its old broker is
//! presumed gone, what waited is delivered, and the count shows in status as
//! `fences_given_up`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use federation::delivery::Envelope;
use federation::fence::{Fence, Fences, Held, HeldEntry, Marker};
use federation::message::MessageKind;
use federation::{AgentName, BrokerId, Dot, Message};

use super::{Broker, State};
use crate::error::{Error, Result};
use crate::storage::{keys, Batch, Engine};

/// How long a message waits for its sender's old broker before it is delivered anyway.
/// Longer than a restart or a typical partition; short enough that an old broker that never
/// comes back delays its agents' new messages by a minute, not for ever.
pub const FENCE_WAIT_MS: u64 = 60_000;

/// The two books: fences of moved senders, redirects of moved recipients.
#[derive(Clone, Copy)]
pub(super) enum Book {
    Sender,
    Recipient,
}

impl Book {
    fn spaces(self) -> (u8, u8) {
        match self {
            Book::Sender => (keys::FENCE_CLOSED, keys::FENCE_HELD),
            Book::Recipient => (keys::REDIRECTED, keys::REDIRECT_WAITING),
        }
    }

    fn of(self, s: &mut State) -> &mut Fences {
        match self {
            Book::Sender => &mut s.fences,
            Book::Recipient => &mut s.redirects,
        }
    }
}

fn prefix(space: u8, from: &AgentName, broker: BrokerId) -> Vec<u8> {
    let mut k = keys::inbox_prefix(space, from);
    k.extend_from_slice(&broker.as_u32().to_be_bytes());
    k
}

fn held_key(space: u8, from: &AgentName, broker: BrokerId, pos: u64) -> Vec<u8> {
    let mut k = prefix(space, from, broker);
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

/// One book as stored.
pub(super) fn load(engine: &dyn Engine, book: Book) -> Result<Fences> {
    let (closed, held) = book.spaces();
    let mut f = Fences::new();
    for (k, v) in engine.scan(&[closed], None, usize::MAX)? {
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
    for (k, v) in engine.scan(&[held], None, usize::MAX)? {
        let Some((from, _, Some(pos))) = parse(&k) else {
            return Err(Error::Storage("corrupt held entry key".into()));
        };
        let entry: HeldEntry = federation::wire::decode(&v)
            .map_err(|e| Error::Storage(format!("corrupt held entry: {e}")))?;
        f.restore_held(from, pos, entry);
    }
    Ok(f)
}

/// Routes and parked markers as stored.
pub(super) type Routes = HashMap<AgentName, (BrokerId, u64)>;
pub(super) type Parked = BTreeMap<AgentName, Vec<(u64, Marker)>>;

pub(super) fn load_routes(engine: &dyn Engine) -> Result<(Routes, Parked)> {
    let mut routes = Routes::new();
    for (k, v) in engine.scan(&[keys::ROUTE], None, usize::MAX)? {
        let name = std::str::from_utf8(&k[1..k.len().saturating_sub(1)])
            .ok()
            .and_then(|n| AgentName::new(n).ok());
        let (Some(name), true) = (name, v.len() == 12) else {
            return Err(Error::Storage("corrupt route".into()));
        };
        let broker = BrokerId::from_u32(u32::from_be_bytes(v[..4].try_into().expect("4")));
        let mark = u64::from_be_bytes(v[4..].try_into().expect("8"));
        routes.insert(name, (broker, mark));
    }
    let mut parked = Parked::new();
    for (k, v) in engine.scan(&[keys::PARKED_MARKER], None, usize::MAX)? {
        let rest = &k[1..];
        let nul = rest.iter().position(|b| *b == 0);
        let name = nul
            .and_then(|n| std::str::from_utf8(&rest[..n]).ok())
            .and_then(|n| AgentName::new(n).ok());
        let pos = nul
            .and_then(|n| <[u8; 8]>::try_from(&rest[n + 1..]).ok())
            .map(u64::from_be_bytes);
        let (Some(name), Some(pos), Ok(m)) = (name, pos, federation::wire::decode::<Marker>(&v))
        else {
            return Err(Error::Storage("corrupt parked marker".into()));
        };
        parked.entry(name).or_default().push((pos, m));
    }
    Ok((routes, parked))
}

fn route_key(name: &AgentName) -> Vec<u8> {
    keys::inbox_prefix(keys::ROUTE, name)
}

fn parked_key(name: &AgentName, pos: u64) -> Vec<u8> {
    let mut k = keys::inbox_prefix(keys::PARKED_MARKER, name);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

impl Broker {
    /// If `m`, for local agent `to`, must wait (for its moved sender's old broker, or for the
    /// marker `wait` of its origin's redirect), holds it (in `batch`) and says so; the caller
    /// then does not deliver it. Call with the lock held.
    pub(super) fn fence_holds(
        &self,
        s: &mut State,
        batch: &mut Batch,
        to: &AgentName,
        m: &Message,
        wait: Option<u64>,
    ) -> bool {
        // Most messages wait for nothing: decide before copying anything.
        let (book, who, fence) =
            if let Some(f) = m.after.filter(|f| s.fences.must_hold(&m.from, Some(*f))) {
                (Book::Sender, &m.from, f)
            } else if let Some(f) = wait
                .map(|mark| Fence {
                    broker: m.dot.origin,
                    incarnation: mark,
                })
                .filter(|f| s.redirects.must_hold(to, Some(*f)))
            {
                (Book::Recipient, to, f)
            } else {
                return false;
            };
        let mut message = m.clone();
        message.to = to.clone();
        let item = Held::Message {
            to: to.clone(),
            message,
        };
        self.hold(s, batch, book, &who.clone(), fence, item)
    }

    /// Holds `item` behind `fence` in `book`, keyed by `who` (the sender, or the recipient).
    fn hold(
        &self,
        s: &mut State,
        batch: &mut Batch,
        book: Book,
        who: &AgentName,
        fence: Fence,
        item: Held,
    ) -> bool {
        let Ok(pos) = self.next_seq(s) else {
            // No position for it: deliver rather than lose it.
            return false;
        };
        let entry = book.of(s).hold(who, fence, pos, super::now_ms(), item);
        batch.put(
            held_key(book.spaces().1, who, fence.broker, pos),
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
        if let Some(a) = after.filter(|a| s.fences.must_hold(from, Some(*a))) {
            self.hold(s, batch, Book::Sender, from, a, Held::Close(fence));
            return;
        }
        self.release(s, batch, Book::Sender, from, fence);
    }

    fn release(&self, s: &mut State, batch: &mut Batch, book: Book, who: &AgentName, fence: Fence) {
        let (closed_space, held_space) = book.spaces();
        let r = book.of(s).close(who, fence);
        for (w, f) in &r.closed {
            batch.put(
                prefix(closed_space, w, f.broker),
                f.incarnation.to_be_bytes().to_vec(),
            );
        }
        for (w, broker, pos) in &r.freed {
            batch.delete(held_key(held_space, w, *broker, *pos));
        }
        if !r.deliver.is_empty() {
            tracing::debug!(agent = %who, broker = %fence.broker, released = r.deliver.len(), "held messages delivered");
        }
        for (to, m) in r.deliver {
            self.put_inbox_now(s, batch, &to, &m);
        }
    }

    /// One of this broker's agents, attached here as `incarnation`, moved to another broker:
    /// tell every broker, behind everything it sent from here, and close the fence here. Call
    /// with the lock held, once its inbox has been forwarded.
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
            let mut closing = notice(me, seq, from, now);
            closing.after = after;
            let mut env = Envelope::new(Dot::new(me, seq), dest, closing, now);
            env.closes = Some(fence);
            self.enqueue(s, batch, seq, env);
            s.last_arrival = s.last_arrival.max(seq);
        }
        self.close_fence(s, batch, from, fence, after);
    }

    /// This broker is about to send `to`'s message to `dest` (itself: a local inbox). If it
    /// sent `to`'s messages to another broker before, a marker goes there first, and the
    /// copy for `dest` must wait for it: returns the marker's sequence. Call with the lock
    /// held, in the batch of the message.
    pub(super) fn route_for(
        &self,
        s: &mut State,
        batch: &mut Batch,
        to: &AgentName,
        dest: BrokerId,
    ) -> Option<u64> {
        let me = self.id();
        match s.routes.get(to).copied() {
            Some((p, mark)) if p == dest => (mark > 0).then_some(mark),
            Some((p, _)) if p != me => {
                let Ok(seq) = self.next_seq(s) else {
                    return None;
                };
                let now = super::now_ms();
                let mut env = Envelope::new(Dot::new(me, seq), p, notice(me, seq, to, now), now);
                env.marker = Some(Marker {
                    origin: me,
                    agent: to.clone(),
                    mark: seq,
                });
                self.enqueue(s, batch, seq, env);
                s.last_arrival = s.last_arrival.max(seq);
                self.set_route(s, batch, to, dest, seq);
                Some(seq)
            }
            // First time; or it was attached here, and its inbox follows it on this broker's
            // own chain to `dest`, ahead of anything new.
            _ => {
                self.set_route(s, batch, to, dest, 0);
                None
            }
        }
    }

    fn set_route(
        &self,
        s: &mut State,
        batch: &mut Batch,
        to: &AgentName,
        dest: BrokerId,
        mark: u64,
    ) {
        let mut v = dest.as_u32().to_be_bytes().to_vec();
        v.extend_from_slice(&mark.to_be_bytes());
        batch.put(route_key(to), v);
        s.routes.insert(to.clone(), (dest, mark));
    }

    /// A redirect marker arrived. On the old path (straight from its origin) it follows the
    /// recipient: on to where it lives now, or parked until it leaves. Where the recipient
    /// lives, it releases the copies that waited for it. Call with the lock held.
    pub(super) fn on_marker(
        &self,
        s: &mut State,
        batch: &mut Batch,
        from_chain: BrokerId,
        mk: Marker,
    ) {
        let me = self.id();
        let local = s
            .agents
            .get(&mk.agent)
            .is_some_and(|a| !a.record.is_forward());
        let owner = self
            .mesh()
            .and_then(|m| m.lookup(mk.agent.as_str()))
            .map(|e| e.owner)
            .filter(|o| *o != me);
        let on_old_path = from_chain == mk.origin;
        match (local, owner) {
            (true, _) if !on_old_path => {
                let fence = Fence {
                    broker: mk.origin,
                    incarnation: mk.mark,
                };
                self.release(s, batch, Book::Recipient, &mk.agent.clone(), fence);
            }
            (false, Some(dest)) => self.forward_marker(s, batch, dest, mk),
            _ => {
                // Still attached here (this broker has not heard of the move yet), or known
                // nowhere: it leaves with the agent's inbox.
                let Ok(pos) = self.next_seq(s) else { return };
                batch.put(parked_key(&mk.agent, pos), federation::wire::encode(&mk));
                s.parked
                    .entry(mk.agent.clone())
                    .or_default()
                    .push((pos, mk));
            }
        }
    }

    fn forward_marker(&self, s: &mut State, batch: &mut Batch, dest: BrokerId, mk: Marker) {
        let me = self.id();
        let Ok(seq) = self.next_seq(s) else { return };
        let now = super::now_ms();
        let mut env = Envelope::new(
            Dot::new(me, seq),
            dest,
            notice(me, seq, &mk.agent, now),
            now,
        );
        env.marker = Some(mk);
        self.enqueue(s, batch, seq, env);
        s.last_arrival = s.last_arrival.max(seq);
    }

    /// Sends the markers parked for `name` after it, to `dest` (behind its inbox). Call with
    /// the lock held.
    pub(super) fn forward_parked(
        &self,
        s: &mut State,
        batch: &mut Batch,
        name: &AgentName,
        dest: BrokerId,
    ) {
        for (pos, mk) in s.parked.remove(name).unwrap_or_default() {
            batch.delete(parked_key(name, pos));
            self.forward_marker(s, batch, dest, mk);
        }
    }

    /// Gives up fences and redirects whose old broker has not answered for
    /// `FENCE_WAIT_MS`: what waited is delivered now (its order against what that broker may
    /// still send is no longer guaranteed; logged and counted).
    pub fn give_up_overdue_fences(&self) {
        let mut s = self.state();
        let now = super::now_ms();
        let mut batch = Batch::new();
        for book in [Book::Sender, Book::Recipient] {
            for (who, fence) in book.of(&mut s).overdue(now, FENCE_WAIT_MS) {
                tracing::warn!(agent = %who, broker = %fence.broker, "a moved agent's previous broker has not confirmed its earlier messages for {} s; delivering the newer ones anyway (their order against those is not guaranteed)", FENCE_WAIT_MS / 1000);
                self.inner
                    .counters
                    .fences_given_up
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.release(&mut s, &mut batch, book, &who, fence);
            }
        }
        if batch.is_empty() {
            return;
        }
        if self.apply(&mut s, batch).is_ok() {
            drop(s);
            self.commit().request();
        }
    }
}

/// The carrier of a closing or a marker: a notice about `agent`, from this broker's chain.
fn notice(me: BrokerId, seq: u64, agent: &AgentName, now: u64) -> Message {
    Message {
        dot: Dot::new(me, seq),
        from: agent.clone(),
        to: agent.clone(),
        sent_at_ms: now,
        content: String::new(),
        data: None,
        reply_to: None,
        kind: MessageKind::Notice,
        after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let n = AgentName::new("sam").unwrap();
        let b = BrokerId::from_u32(0xabcd);
        assert_eq!(
            parse(&prefix(keys::FENCE_CLOSED, &n, b)),
            Some((n.clone(), b, None))
        );
        assert_eq!(
            parse(&held_key(keys::FENCE_HELD, &n, b, 42)),
            Some((n, b, Some(42)))
        );
        assert_eq!(parse(b"h"), None);
    }
}
