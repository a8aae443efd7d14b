//! `ipc-mesh list`: the agents, their broker, and whether they are online.

use std::process::ExitCode;

use clap::Args;

use super::{table, Ctx};
use crate::protocol::{Body, Reply};

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON: {"agents": [{"name", "broker", "online", "last_seen"}]}
    #[arg(long)]
    pub json: bool,
}

pub async fn run(ctx: Ctx, a: ListArgs) -> anyhow::Result<ExitCode> {
    let mut client = ctx.connect().await?;
    let Reply::Agents { agents } = client.call(Body::List).await? else {
        anyhow::bail!("unexpected reply to list");
    };
    if a.json {
        println!("{}", serde_json::json!({ "agents": agents }));
    } else if agents.is_empty() {
        println!("no agents registered");
    } else {
        print!("{}", table::agents(&agents));
    }
    Ok(ExitCode::SUCCESS)
}
