//! The command line: arguments parsed into plain structs, then one file per command.

mod bench;
mod broadcast;
mod broker;
mod check;
mod demo;
mod health;
mod list;
mod mcp;
mod rename;
mod send;
mod status;
mod table;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use federation::AgentName;

use crate::client::{Candidates, Client};
use crate::config::{Config, DEFAULT_LISTEN};
use crate::home::Home;

#[derive(Parser, Debug)]
#[command(
    name = "ipc-mesh",
    version,
    about = "A durable messaging mesh for AI assistants",
    long_about = "A durable messaging mesh for AI assistants.\n\nAgents register a name, send, broadcast and check messages through a broker; acknowledged messages survive broker crashes."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Home folder for broker data and agent tokens [default: $IPC_MESH_HOME or ~/.ipc-mesh]
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Mesh config file [default: <home>/mesh.toml when present]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Broker to talk to [default: the config's [broker] listen, else 127.0.0.1:9876]
    #[arg(long, global = true, value_name = "ADDR", env = "IPC_MESH_BROKER")]
    pub broker: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a broker in the foreground (SIGINT/SIGTERM stop it cleanly)
    Broker(broker::BrokerArgs),
    /// Send a message; prints its id
    Send(send::SendArgs),
    /// Send a message to every other agent
    Broadcast(broadcast::BroadcastArgs),
    /// Print unread messages and mark them read
    Check(check::CheckArgs),
    /// List the agents this broker knows
    List(list::ListArgs),
    /// Show the broker's status
    Status(status::StatusArgs),
    /// Exit 0 if the broker answers, 1 if not
    Health,
    /// Start three brokers here, show agents messaging across them and a crash survived; exits
    Demo,
    /// Rename yourself; the old name forwards for a while and others are told
    Rename(rename::RenameArgs),
    /// MCP stdio server for one assistant; attaches to the broker, or becomes it
    Mcp(mcp::McpArgs),
    /// Load generator: throughput, latency and this machine's baseline
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// What every command has once the global flags are resolved.
pub struct Ctx {
    pub home: Home,
    pub config: Config,
    /// The broker named by `--broker` (or `IPC_MESH_BROKER`), else the configured one.
    pub broker: String,
    /// Whether `--broker` named it; if not, clients attach to the nearest broker.
    pub explicit_broker: bool,
}

impl Global {
    /// Resolves home, config and broker address from flags, environment and files.
    pub fn resolve(&self) -> anyhow::Result<Ctx> {
        let home = Home::resolve(self.home.clone())?;
        let config = match &self.config {
            Some(path) => Config::load(path)?,
            None if home.config_file().exists() => Config::load(&home.config_file())?,
            None => Config::default(),
        };
        // Brokers that require client authentication get the mesh secret from here; one that
        // cannot be loaded is reported only if a broker asks for it.
        crate::client::set_default_secret(
            crate::config::load_client_secret(&config.mesh).map_err(|e| e.to_string()),
        );
        let broker = match &self.broker {
            Some(b) => b.clone(),
            None if self.config.is_some() || home.config_file().exists() => {
                config.broker.listen.to_string()
            }
            None => DEFAULT_LISTEN.to_string(),
        };
        Ok(Ctx {
            home,
            config,
            broker,
            explicit_broker: self.broker.is_some(),
        })
    }
}

/// The identity flag of the agent commands.
#[derive(Args, Debug, Clone)]
pub struct As {
    /// The agent to act as; registers it on first use and keeps its token in <home>/agents/
    #[arg(long = "as", value_name = "NAME")]
    pub name: String,
}

impl Ctx {
    /// Connects and registers as `name` with its stored token.
    pub async fn client_as(&self, name: &str) -> anyhow::Result<Client> {
        let name = AgentName::new(name)?;
        let mut client = self.connect().await?;
        client
            .register_as(&name, &self.home)
            .await
            .with_context(|| format!("cannot act as {name}"))?;
        Ok(client)
    }

    /// The broker `--broker` names, else the nearest one (local siblings, then peers).
    pub async fn connect(&self) -> anyhow::Result<Client> {
        if self.explicit_broker {
            return Ok(Client::connect(&self.broker).await?);
        }
        Ok(Client::connect_nearest(&Candidates::from_config(&self.config)).await?)
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let ctx = cli.global.resolve()?;
    match cli.command {
        Command::Broker(a) => broker::run(ctx, a).await,
        Command::Send(a) => send::run(ctx, a).await,
        Command::Broadcast(a) => broadcast::run(ctx, a).await,
        Command::Check(a) => check::run(ctx, a).await,
        Command::List(a) => list::run(ctx, a).await,
        Command::Status(a) => status::run(ctx, a).await,
        Command::Health => health::run(ctx).await,
        Command::Demo => demo::run(ctx).await,
        Command::Rename(a) => rename::run(ctx, a).await,
        Command::Mcp(a) => mcp::run(ctx, a).await,
        Command::Bench(a) => bench::run(ctx, a, cli.global.broker.is_some()).await,
    }
}

/// Parses `--data`: it must be a JSON object.
fn parse_data(data: Option<String>) -> anyhow::Result<Option<String>> {
    match data {
        None => Ok(None),
        Some(d) => {
            crate::broker::validate_json_object(&d).map_err(|e| anyhow::anyhow!("--data: {e}"))?;
            Ok(Some(d))
        }
    }
}
