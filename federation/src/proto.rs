//! The peer protocol: what brokers say to each other over a link.
//!
//! After the connection's hello (role `Peer`, see [`crate::wire`]) every frame is one
//! MessagePack-encoded [`PeerMsg`]. The handshake is `Hello` → `Challenge` → `Proof` → `Ready`
//! (see [`crate::auth`]); either side may answer `Refused` and close. Then both sides send
//! `Ping`/`Pong` heartbeats and registry gossip (`Digest`, `Delta`).

use serde::{Deserialize, Serialize};

use crate::delivery::Envelope;
use crate::registry::AgentEntry;
use crate::BrokerId;

/// A broker as gossiped: its id and the address peers should dial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: BrokerId,
    pub addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Dialer → acceptor, first.
    Hello {
        id: BrokerId,
        /// Random per process start: tells a restarted broker from its old, dead link.
        boot: u64,
        advertise: String,
        nonce: Vec<u8>,
        /// Whether the dialer has a mesh secret (so a mismatch is reported clearly).
        secured: bool,
    },
    /// Acceptor → dialer: its identity, nonce and proof (empty without a secret).
    Challenge {
        id: BrokerId,
        boot: u64,
        advertise: String,
        nonce: Vec<u8>,
        secured: bool,
        proof: Vec<u8>,
    },
    /// Dialer → acceptor: its proof (empty without a secret).
    Proof {
        proof: Vec<u8>,
    },
    /// Acceptor → dialer: the link is up.
    Ready,
    /// Either side: the link is refused, with the reason; a close follows.
    Refused {
        reason: String,
    },
    Ping {
        t: u64,
    },
    Pong {
        t: u64,
    },
    /// Gossip: the brokers the sender knows, and its registry version per owner broker.
    Digest {
        members: Vec<Member>,
        versions: Vec<(BrokerId, u64)>,
        /// The brokers the sender has a link to now (for relaying).
        reach: Vec<BrokerId>,
    },
    /// Registry entries the receiver lacks (newer than its digest).
    Delta {
        entries: Vec<AgentEntry>,
    },
    /// Envelopes for `dest`, each with its position in the sender's outbox, in order.
    Deliver {
        dest: BrokerId,
        entries: Vec<(u64, Envelope)>,
    },
    /// Every envelope for `dest` up to position `upto` is stored durably here.
    DeliverAck {
        dest: BrokerId,
        upto: u64,
    },
}

impl PeerMsg {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMsg::Hello { .. } => "hello",
            PeerMsg::Challenge { .. } => "challenge",
            PeerMsg::Proof { .. } => "proof",
            PeerMsg::Ready => "ready",
            PeerMsg::Refused { .. } => "refused",
            PeerMsg::Ping { .. } => "ping",
            PeerMsg::Pong { .. } => "pong",
            PeerMsg::Digest { .. } => "digest",
            PeerMsg::Delta { .. } => "delta",
            PeerMsg::Deliver { .. } => "deliver",
            PeerMsg::DeliverAck { .. } => "deliver-ack",
        }
    }
}
