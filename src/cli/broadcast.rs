//! `ipc-mesh broadcast --as NAME TEXT`: one message to every other agent.

use std::process::ExitCode;

use clap::Args;

use super::{parse_data, As, Ctx};
use crate::protocol::Reply;

#[derive(Args, Debug)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub who: As,
    /// The message text
    pub text: String,
    /// Structured data to attach: a JSON object
    #[arg(long, value_name = "JSON")]
    pub data: Option<String>,
}

pub async fn run(ctx: Ctx, a: BroadcastArgs) -> anyhow::Result<ExitCode> {
    let data = parse_data(a.data)?;
    let mut client = ctx.client_as(&a.who.name).await?;
    if let Reply::Broadcast {
        id,
        reached,
        skipped,
        ..
    } = client.broadcast(&a.text, data).await?
    {
        println!("{id}");
        eprintln!(
            "reached {reached} agent{}",
            if reached == 1 { "" } else { "s" }
        );
        for s in &skipped {
            eprintln!("not delivered to {}: {}", s.name, s.reason);
        }
        if !skipped.is_empty() {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}
