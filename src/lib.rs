//! ipc-mesh: a durable messaging mesh for AI assistants.
//!
//! The library holds everything; the `ipc-mesh` binary parses arguments and calls in.
//!
//! - [`broker`]: the broker process: sessions, requests, group commit, retention.
//! - [`client`]: the client library the CLI (and the MCP server) are built on.
//! - [`protocol`]: the client ↔ broker requests and replies; [`connection`]: their framing.
//! - [`storage`], [`inbox`], [`identity`]: what the broker keeps, and how.
//! - [`auth`]: clients proving the mesh secret to a broker that requires it, and back.
//! - [`config`], [`home`]: the mesh config file and the home folder.
//! - [`mcp`]: the MCP stdio server assistants launch, with the democratic broker election.
//! - [`cli`]: the subcommands.
//! - [`bench`](mod@bench): the load generator behind `ipc-mesh bench`.

pub mod auth;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod demo;
pub mod error;
pub mod home;
pub mod identity;
pub mod inbox;
pub mod mcp;
pub mod outbox;
pub mod protocol;
pub mod storage;

pub use error::{Error, ErrorKind, Result};
