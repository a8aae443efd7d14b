//! `ipc-mesh mcp [--agent NAME]`: the MCP stdio server an assistant launches.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use federation::AgentName;

use super::Ctx;
use crate::client::Candidates;
use crate::mcp::{self, ChannelMode, Era, Options};

#[derive(Args, Debug)]
pub struct McpArgs {
    /// Register as NAME at start-up (its token is kept in <home>/agents/NAME.token)
    #[arg(long, value_name = "NAME", env = "IPC_MESH_AGENT")]
    pub agent: Option<String>,
    /// Push new messages as notifications/claude/channel: when the client announces the
    /// capability (auto), always, or never
    #[arg(long, value_enum, default_value_t = Channel::Auto, env = "IPC_MESH_CHANNEL")]
    pub channel: Channel,
    /// Protocol eras: auto (initialize and 2026-07-28 server/discover) or legacy (initialize
    /// only, so that dual-era clients use the era where channel pushes work)
    #[arg(long, value_enum, default_value_t = McpEra::Auto, env = "IPC_MESH_MCP_ERA")]
    pub era: McpEra,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Channel {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum McpEra {
    Auto,
    Legacy,
}

pub async fn run(ctx: Ctx, a: McpArgs) -> anyhow::Result<ExitCode> {
    // An empty IPC_MESH_AGENT (a config template left blank) means "no name yet".
    let agent = match a.agent.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(name) => Some(AgentName::new(name).map_err(|e| anyhow::anyhow!("--agent: {e}"))?),
    };
    let options = Options {
        agent,
        channel: match a.channel {
            Channel::Auto => ChannelMode::Auto,
            Channel::Always => ChannelMode::Always,
            Channel::Never => ChannelMode::Never,
        },
        era: match a.era {
            McpEra::Auto => Era::Auto,
            McpEra::Legacy => Era::Legacy,
        },
    };
    // `--broker` (or IPC_MESH_BROKER) pins the broker; otherwise the nearest one is used,
    // and the configured address is where this process hosts one if none answers.
    let candidates = (!ctx.explicit_broker).then(|| Candidates::from_config(&ctx.config));
    let code = mcp::run(ctx.home, ctx.config, ctx.broker, candidates, options).await;
    // Exit here rather than return: rmcp's session is leaked on purpose and tokio's stdin
    // reader thread blocks in read(2); neither must delay the exit (2 s after stdin closes).
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}
