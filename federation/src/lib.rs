//! Everything broker-to-broker in ipc-mesh, and the types both sides of any link share.
//!
//! For now this crate holds the vocabulary of the mesh:
//!
//! 1. [`id`]: agent names, broker ids and message dots, validated where they enter.
//! 2. [`message`]: the message envelope as it is stored and sent.
//! 3. [`clock`]: the per-origin delivery clock that deduplicates retransmissions.
//! 4. [`wire`]: the framing every connection uses (hello with magic, version and role, then
//!    length-delimited MessagePack frames of bounded size).
//!
//! The sans-IO mesh core (discovery, links, gossip, delivery) builds on these.

pub mod clock;
pub mod error;
pub mod id;
pub mod message;
pub mod wire;

pub use clock::DeliveryClock;
pub use error::Error;
pub use id::{AgentName, BrokerId, Dot};
pub use message::Message;
