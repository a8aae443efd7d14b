//! Cross-broker delivery: what travels, how a receiver decides what to do with it, and the
//! storage it needs.
//!
//! 1. The origin broker writes an [`Envelope`] into its outbox for the destination broker and
//!    flushes before it acknowledges the sender. Each envelope has a transport dot (the broker
//!    that queued it, and that broker's sequence) and `prev`, the previous sequence that broker
//!    queued for the same destination (see [`crate::clock`]).
//! 2. The node streams each outbox in order over the best path (the destination's own link,
//!    else a peer that reaches it), at most a window of envelopes in flight.
//! 3. The receiver [`classify`]s each envelope: a duplicate (its clock has the dot), a delivery
//!    to local inboxes, a relay (it is for another broker), a forward (the recipient moved on),
//!    or a hold (the recipient is not known yet). An envelope that overtook its predecessor
//!    waits in a reorder buffer until that one arrives ([`in_order`]). The receiver stores the
//!    outcome durably, clock included, in one atomic write, and only then acknowledges,
//!    cumulatively per destination.
//! 4. On the acknowledgement the sender deletes what was acknowledged. Anything unacknowledged
//!    is sent again after a reconnect or a restart, with the same dot, and dropped as a
//!    duplicate by a receiver that already has it.

use serde::{Deserialize, Serialize};

use crate::clock::DeliveryClock;
use crate::{AgentName, BrokerId, Dot, Message};

/// How many relay hops an envelope may take before only a direct link may carry it.
pub const MAX_HOPS: u8 = 3;

/// A message or broadcast on its way between brokers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The broker that queued it for `dest`, and that broker's sequence.
    pub tdot: Dot,
    /// The previous sequence `tdot.origin` queued for `dest` (0: none).
    pub prev: u64,
    /// The broker it is for.
    pub dest: BrokerId,
    /// Relays it has passed through.
    pub hops: u8,
    pub broadcast: bool,
    /// For a broadcast: the agents the origin believed attached to `dest` when it was sent.
    /// Those that moved on since get it forwarded; agents attached there that the origin did
    /// not know of get it too.
    #[serde(default)]
    pub recipients: Vec<AgentName>,
    /// The message itself; its own dot is the id the sender was given.
    pub message: Message,
    /// When it was queued (ms since the epoch), for expiry.
    pub queued_ms: u64,
    /// Not a message but a closing: `message.from` has left this attachment of the origin
    /// broker, and everything it sent from there came before this on the chain (see
    /// [`crate::fence`]). `message` carries only the sender and its own fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes: Option<crate::fence::Fence>,
    /// For a broadcast: the agents the origin listed for other brokers (or delivered to
    /// itself). They get their copy there, forwarded if they have moved here since, so this
    /// broker does not count them among the agents the origin did not know of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elsewhere: Vec<AgentName>,
    /// Recipients whose messages the origin re-routed here from another broker, each with the
    /// sequence of the [`crate::fence::Marker`] it sent along the old path: their copies wait
    /// for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wait: Vec<(AgentName, u64)>,
    /// Not a message but a redirect marker (see [`crate::fence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<crate::fence::Marker>,
}

impl Envelope {
    /// A direct envelope for `dest` from the chain position `tdot`; `prev` is filled in when
    /// it is queued.
    pub fn new(tdot: Dot, dest: BrokerId, message: Message, queued_ms: u64) -> Envelope {
        Envelope {
            tdot,
            prev: 0,
            dest,
            hops: 0,
            broadcast: false,
            recipients: Vec::new(),
            message,
            queued_ms,
            closes: None,
            elsewhere: Vec::new(),
            wait: Vec::new(),
            marker: None,
        }
    }
}

/// What a receiver does with an envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Already delivered here: drop it (and count it).
    Duplicate,
    /// Into these local agents' inboxes.
    Deliver(Vec<AgentName>),
    /// For another broker: queue it towards `dest` unchanged (one more hop).
    Relay,
    /// The recipient lives on another broker now: queue it there, from us.
    Forward(BrokerId),
    /// The recipient is known nowhere yet: keep it in a local inbox under its name.
    Hold(AgentName),
    /// A broadcast: into these local inboxes, and on to these agents' new brokers.
    Broadcast {
        deliver: Vec<AgentName>,
        forward: Vec<(AgentName, BrokerId)>,
    },
}

/// Decides what to do with `env` at broker `me`.
///
/// `local` tells whether an agent is attached here; `owner` which broker holds a name now;
/// `local_agents` lists every agent here (for broadcasts).
pub fn classify(
    env: &Envelope,
    me: BrokerId,
    clock: &DeliveryClock,
    local: impl Fn(&AgentName) -> bool,
    owner: impl Fn(&AgentName) -> Option<BrokerId>,
    local_agents: impl Fn() -> Vec<AgentName>,
) -> Arrival {
    if env.dest != me {
        return Arrival::Relay;
    }
    if clock.contains(env.tdot) {
        return Arrival::Duplicate;
    }
    route(env, me, local, owner, local_agents)
}

/// Where an envelope for this broker goes (no duplicate check: for envelopes released from
/// the reorder buffer, which the clock already covers).
pub fn route(
    env: &Envelope,
    me: BrokerId,
    local: impl Fn(&AgentName) -> bool,
    owner: impl Fn(&AgentName) -> Option<BrokerId>,
    local_agents: impl Fn() -> Vec<AgentName>,
) -> Arrival {
    if env.broadcast {
        let from = &env.message.from;
        let mut deliver: Vec<AgentName> = local_agents()
            .into_iter()
            .filter(|a| a != from && !env.elsewhere.contains(a))
            .collect();
        let mut forward = Vec::new();
        for r in env.recipients.iter().filter(|r| *r != from) {
            if local(r) {
                if !deliver.contains(r) {
                    deliver.push(r.clone());
                }
            } else if let Some(b) = owner(r).filter(|b| *b != me) {
                forward.push((r.clone(), b));
            }
        }
        return Arrival::Broadcast { deliver, forward };
    }
    let to = &env.message.to;
    if local(to) {
        return Arrival::Deliver(vec![to.clone()]);
    }
    match owner(to) {
        Some(b) if b != me => Arrival::Forward(b),
        _ => Arrival::Hold(to.clone()),
    }
}

/// Whether `env` can be handed on now: its predecessor from the same broker has been (it is
/// the next in that broker's chain to us). One that is not waits, stored, in a reorder buffer
/// until the gap fills: envelopes can overtake each other when the path changes (a relay
/// acknowledges before the destination has them, and a direct link then carries the next
/// ones), and order per sender must hold anyway.
pub fn in_order(clock: &DeliveryClock, env: &Envelope) -> bool {
    env.prev <= clock.contiguous(env.tdot.origin)
}

/// The storage a node's delivery needs. The broker implements it over sled; the simulator in
/// memory. Calls come from the driver, never under the node's lock.
pub trait MeshStore: Send + Sync {
    /// Durable envelopes queued for `dest` after position `after`, oldest first.
    fn outbox(&self, dest: BrokerId, after: u64, limit: usize) -> Vec<(u64, Envelope)>;
    /// Destinations with queued envelopes, and how many.
    fn outbox_depths(&self) -> Vec<(BrokerId, u64)>;
    /// Deletes `dest`'s envelopes up to position `upto`: the next hop has them.
    fn trim(&self, dest: BrokerId, upto: u64);
    /// Classifies and stores what arrived, clock included, atomically. Returns the write's
    /// epoch: the arrival may be acknowledged once [`MeshStore::durable`] reaches it.
    fn accept(&self, entries: Vec<Envelope>) -> u64;
    /// The latest durable epoch.
    fn durable(&self) -> u64;
}
