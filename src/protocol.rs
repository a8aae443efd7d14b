//! The client ↔ broker protocol: what a client may ask, and what it gets back.
//!
//! After the hello (see [`federation::wire`]) the broker answers with a [`Welcome`] frame (or a
//! [`Response`] whose result is an error, and a close). Then the client sends [`Request`]
//! frames, each with an id of its choosing, and the broker answers each with one [`Response`]
//! frame carrying the same id. Responses may come out of order, so a client can pipeline.
//!
//! A connection acts for at most one agent: [`Body::Register`] binds it, and every later request
//! on that connection acts as that agent. No request names its own sender, so none can forge one.

use serde::{Deserialize, Serialize};

use crate::error::WireError;

/// The broker's first frame after a good hello.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Welcome {
    pub broker_id: String,
    pub version: String,
    /// The largest frame this broker accepts, in bytes.
    pub max_frame_bytes: u64,
    /// Present when this broker requires clients to prove the mesh secret before anything
    /// else: its fresh nonce (16 bytes as hex) for [`Body::Auth`]. Absent on a broker that
    /// does not (loopback, by default); an older broker never sends it.
    #[serde(default)]
    pub auth_nonce: Option<String>,
}

/// A request frame.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub id: u64,
    pub body: Body,
}

/// A response frame: the id of the request it answers, and its outcome.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub id: u64,
    pub result: Result<Reply, WireError>,
}

/// What a client can ask.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Body {
    /// Answered with `Pong`; needs no registration. Used for health checks and round trips.
    Ping,
    /// Proves the mesh secret to a broker whose welcome carried an `auth_nonce` (see
    /// [`crate::auth`]): the client's own nonce and its proof, both hex. Answered with
    /// `Authenticated`, or `Unauthorized` and a close.
    Auth {
        client_nonce: String,
        proof: String,
    },
    /// Claim `name` (no token: a new name) or reclaim it (with the token it was given).
    Register {
        name: String,
        token: Option<String>,
    },
    Send(Outgoing),
    Broadcast {
        content: String,
        data: Option<String>,
    },
    /// Unread messages (and read ones too with `include_read`), oldest first, at most
    /// `limit`. With `mark_read`, the unread ones returned are marked read atomically.
    Fetch {
        include_read: bool,
        limit: u32,
        mark_read: bool,
    },
    /// Mark these messages read.
    Ack {
        ids: Vec<String>,
    },
    /// Block until an unread message exists (or `timeout_ms` passes), then fetch.
    Wait {
        timeout_ms: u64,
        limit: u32,
        mark_read: bool,
    },
    List,
    Rename {
        new_name: String,
    },
    Status,
}

/// A direct message to send.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Outgoing {
    /// `name`, or `name@broker-id`.
    pub to: String,
    pub content: String,
    /// A JSON object, as text.
    pub data: Option<String>,
    pub reply_to: Option<String>,
    /// Keep the message for a recipient never seen, instead of refusing it.
    pub hold: bool,
    /// A key of the sender's choosing (at most 64 bytes). A second send with the same key
    /// within the retention is not stored again: it gets the first one's reply. This is what
    /// makes resending after a lost connection safe.
    pub dedup_key: Option<String>,
}

/// What a client gets back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Reply {
    Pong {
        broker_id: String,
    },
    /// The broker's proof that it holds the mesh secret too (hex).
    Authenticated {
        proof: String,
    },
    Registered {
        name: String,
        token: String,
        broker_id: String,
        /// True when this registration created the name.
        created: bool,
        unread: u64,
    },
    Sent {
        id: String,
        route: Route,
        unread: u64,
    },
    Broadcast {
        id: String,
        reached: u32,
        skipped: Vec<Skipped>,
        unread: u64,
    },
    Messages {
        messages: Vec<MessageView>,
        unread: u64,
    },
    Acked {
        marked: u32,
        unread: u64,
    },
    Agents {
        agents: Vec<AgentView>,
    },
    Renamed {
        old: String,
        new: String,
        unread: u64,
    },
    Status(Box<StatusView>),
}

/// Where a sent message went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Route {
    /// Into the inbox of an agent of this broker.
    Local { to: String },
    /// Addressed to an old name; delivered to the agent's new name.
    Forwarded { from: String, to: String },
    /// The recipient was never seen; held for it (the sender asked for `hold`).
    Held { to: String },
    /// Queued for the broker the recipient is attached to; delivered when it can be reached
    /// (the recipient may be offline: it waits there).
    Remote { to: String, broker: String },
}

/// A broadcast recipient that did not get the message, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// A message as clients see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageView {
    pub id: String,
    pub from: String,
    pub to: String,
    /// RFC 3339, UTC.
    pub sent_at: String,
    pub content: String,
    /// A JSON object as text, or none.
    pub data: Option<String>,
    pub reply_to: Option<String>,
    /// `direct`, `broadcast` or `notice`.
    pub kind: String,
    pub read: bool,
}

impl MessageView {
    /// The message as the documented JSON object (`check --json`, MCP `structuredContent`):
    /// `id`, `from`, `to`, `sent_at`, `content`, `data` (object or null), `reply_to`.
    pub fn to_json(&self) -> serde_json::Value {
        let data = self
            .data
            .as_deref()
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "id": self.id,
            "from": self.from,
            "to": self.to,
            "sent_at": self.sent_at,
            "content": self.content,
            "data": data,
            "reply_to": self.reply_to,
        })
    }
}

/// An agent as `list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentView {
    pub name: String,
    pub broker: String,
    pub online: bool,
    /// RFC 3339, UTC.
    pub last_seen: String,
}

/// What `status` reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusView {
    pub broker: BrokerView,
    pub peers: Vec<PeerView>,
    pub agents: Vec<AgentView>,
    /// Per origin broker, the highest contiguous sequence delivered here.
    pub clock: Vec<ClockEntry>,
    pub counters: Counters,
    pub mesh: MeshCounters,
    /// The limits this broker enforces (absent from an older broker).
    #[serde(default)]
    pub limits: LimitsView,
}

/// The limits a broker enforces, per identity and per connection, as configured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitsView {
    /// Requests per second per agent (or unregistered connection); 0: unlimited.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub max_message_bytes: u64,
    pub inbox_max: u64,
    pub outbox_max: u64,
    pub max_connections: u64,
    pub frame_timeout_ms: u64,
    /// Whether clients must prove the mesh secret.
    pub client_auth: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerView {
    pub id: String,
    pub listen: String,
    pub advertise: String,
    pub version: String,
    pub uptime_secs: u64,
    pub data_dir: String,
    pub connections: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    /// The peer's broker id, or `?` for a configured address that never answered.
    pub id: String,
    pub addr: String,
    /// `up`, `connecting` or `down`.
    pub state: String,
    pub rtt_ms: Option<f64>,
    /// Messages waiting for this peer (including those in flight).
    pub outbox: u64,
    /// Sent to it and not yet acknowledged.
    pub in_flight: u64,
    /// The highest outbox position it acknowledged.
    pub acked: u64,
    /// Age of the oldest message waiting for it, in milliseconds.
    pub oldest_ms: Option<u64>,
    /// Milliseconds since the peer was last heard.
    pub last_heard_ms: Option<u64>,
    /// Why the last link attempt was refused, if it was (a wrong secret, say).
    pub refused: Option<String>,
    /// While the link is up: whether it is encrypted (absent from an older broker).
    #[serde(default)]
    pub encrypted: Option<bool>,
    /// Bytes read from this peer's link, as received (sealed size when encrypted).
    #[serde(default)]
    pub bytes_in: u64,
    /// How often reading from this peer paused for `[limits] peer_bytes_per_sec` or
    /// `peer_frames_per_sec`, and for how long in all (milliseconds).
    #[serde(default)]
    pub throttled: u64,
    #[serde(default)]
    pub throttled_ms: u64,
}

/// Link counters of the mesh node since the broker started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshCounters {
    pub links_opened: u64,
    pub links_closed: u64,
    pub dials: u64,
    pub refusals: u64,
    /// The latest refused peer links (wrong or missing secret, a plaintext downgrade, a
    /// replayed handshake), oldest first; older ones are in the log only.
    #[serde(default)]
    pub recent_refusals: Vec<RefusalView>,
}

/// A refused peer link.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusalView {
    /// The address dialed, or the remote socket address of an accepted connection.
    pub addr: String,
    pub reason: String,
    /// How long ago, in milliseconds.
    pub age_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClockEntry {
    pub origin: String,
    pub delivered: u64,
}

/// Counters since the broker started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub messages_accepted: u64,
    pub messages_stored: u64,
    pub messages_expired: u64,
    pub requests: u64,
    pub errors: u64,
    pub rate_limited: u64,
    pub flushes: u64,
    /// Messages from other brokers dropped because they had been delivered already.
    pub duplicates_dropped: u64,
    /// Envelopes passed on towards another broker.
    pub relayed: u64,
    /// Messages sent on to the broker their recipient moved to.
    pub forwarded: u64,
    /// Messages from a moved sender waiting (stored) for its old broker's earlier messages.
    #[serde(default)]
    pub messages_fenced: u64,
    /// Fences given up: a moved sender's old broker never confirmed its earlier messages.
    #[serde(default)]
    pub fences_given_up: u64,
    /// Connections refused at the connection limit.
    #[serde(default)]
    pub connections_refused: u64,
    /// Clients that failed to authenticate (wrong proof, or none in time).
    #[serde(default)]
    pub auth_failures: u64,
}
