//! The message envelope, as stored in inboxes and (later) outboxes.

use serde::{Deserialize, Serialize};

use crate::{AgentName, Dot};

/// One message. Immutable once its dot is assigned: retransmissions carry it unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub dot: Dot,
    pub from: AgentName,
    pub to: AgentName,
    /// Milliseconds since the Unix epoch, UTC, when the origin broker accepted it.
    pub sent_at_ms: u64,
    pub content: String,
    /// A JSON object as text, already validated by the origin broker; `None` when absent.
    pub data: Option<String>,
    pub reply_to: Option<Dot>,
    /// What kind of message this is, so a reader can tell a notice from a person's words.
    pub kind: MessageKind,
    /// Where the sender was attached before it moved to the broker that accepted this: what
    /// it sent there is delivered first (see [`crate::fence`]). `None` for a sender that
    /// never moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<crate::fence::Fence>,
}

/// Messages agents send, and notices the mesh itself sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    Direct,
    Broadcast,
    /// From `system`: renames, expiries and other facts about the mesh.
    Notice,
}
