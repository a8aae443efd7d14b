//! Everything broker-to-broker in ipc-mesh, and the types both sides of any link share.
//!
//! 1. [`id`], [`message`], [`clock`], [`wire`]: the vocabulary (names, broker ids, dots, the
//!    message envelope, the delivery clock, the hello that opens every connection).
//! 2. [`node`]: the mesh as a synchronous state machine (events and time in, actions out):
//!    discovery, links, the authenticated handshake ([`auth`]), heartbeats, and registry
//!    gossip ([`registry`], over the messages of [`proto`]).
//! 3. [`sim`]: a deterministic, seeded network of nodes in memory that can cut, delay, reorder
//!    and drop, so mesh scenarios run in milliseconds.
//! 4. [`delivery`] and [`fence`]: what crosses between brokers for each message, and how
//!    order per sender holds across crashes, path changes and the sender's own moves.
//! 5. [`transport`] and [`driver`]: the thin tokio layer that runs a node over real TCP (or the
//!    in-memory transport), used by the broker.

pub mod auth;
pub mod clock;
pub mod delivery;
pub mod driver;
pub mod error;
pub mod fence;
pub mod id;
pub mod link;
pub mod message;
pub mod node;
pub mod noise;
pub mod proto;
pub mod registry;
pub mod sim;
pub mod transport;
pub mod wire;

pub use clock::DeliveryClock;
pub use error::Error;
pub use id::{AgentName, BrokerId, Dot};
pub use message::Message;
