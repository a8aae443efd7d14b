//! `ipc-mesh mcp`: the MCP stdio server one assistant launches to join the mesh.
//!
//! 1. Start-up builds the session handle ([`session::Mesh`]) and starts the election task
//!    ([`election`]) in the background, then serves MCP on stdio at once (`adapter.rs`), so
//!    `initialize` is answered in milliseconds whatever the broker is doing.
//! 2. The election attaches to the nearest live broker (local sibling ports first, then the
//!    configured peers; only the one `--broker` names, if given), or binds the election
//!    address and hosts the broker in-process; with `--agent` it registers that name with its stored
//!    token. When the broker goes away, it elects again and re-registers.
//! 3. Tool calls ([`tools`]) go through the session: they wait (bounded) for attachment and
//!    registration, and ride out a hand-over when their request is safe to repeat.
//! 4. Where the client takes them, new messages are pushed as channel notifications
//!    ([`channel`]).
//! 5. When stdin closes (or SIGINT/SIGTERM arrives), calls in flight get a short grace, the
//!    in-process broker, if any, shuts down and flushes so a survivor can take over, and the
//!    process exits, all within 2 s.
//!
//! rmcp's types appear only in `adapter.rs`; everything else speaks this crate's types.

mod adapter;
pub mod channel;
pub mod election;
pub mod session;
pub mod tools;

use std::time::Duration;

use federation::AgentName;
use tokio_util::sync::CancellationToken;

use crate::client::Candidates;
use crate::config::Config;
use crate::home::Home;

/// The longest the in-process broker may take to stop and flush on exit; with the EOF grace
/// this keeps the exit within 2 s of stdin closing.
const BROKER_STOP_BOUND: Duration = Duration::from_millis(1200);

/// When new messages are pushed as `notifications/claude/channel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChannelMode {
    /// When the client announces the experimental `claude/channel` capability.
    #[default]
    Auto,
    /// Always (Claude Code declares no client capability for channels; see docs/mcp.md).
    Always,
    Never,
}

/// Which protocol eras the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Era {
    /// Both: `initialize` and 2026-07-28 `server/discover`.
    #[default]
    Auto,
    /// `initialize` only: `server/discover` is answered "method not found", so dual-era
    /// clients fall back to the handshake era, the only one where channel pushes work.
    Legacy,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Register this name at start-up.
    pub agent: Option<AgentName>,
    pub channel: ChannelMode,
    pub era: Era,
}

/// Runs the MCP server until stdin closes; returns the process exit code.
///
/// `broker` is the election address: the one this process binds when no broker answers.
/// With `candidates`, the nearest of them that answers is attached to first (see
/// [`election`]); without, only `broker` is tried.
pub async fn run(
    home: Home,
    config: Config,
    broker: String,
    candidates: Option<Candidates>,
    options: Options,
) -> i32 {
    let mesh = session::Mesh::new(home, broker, options.agent.clone());
    let election = election::Election::start(mesh.clone(), config, candidates);
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    let exit = adapter::serve_stdio(mesh, options, stop).await;
    election.shutdown(BROKER_STOP_BOUND).await;
    match exit {
        adapter::Exit::Clean => 0,
        adapter::Exit::Failed(e) => {
            tracing::error!(error = %e, "the MCP session failed");
            eprintln!("ipc-mesh mcp: {e}");
            1
        }
    }
}

/// SIGINT or SIGTERM: stop like stdin closing, so a hosted broker flushes and hands over.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::debug!("signal received; shutting down");
    stop.cancel();
}
