//! `ipc-mesh rename --as NAME NEW`: rename yourself.

use std::process::ExitCode;

use clap::Args;
use federation::AgentName;

use super::{As, Ctx};
use crate::protocol::Reply;

#[derive(Args, Debug)]
pub struct RenameArgs {
    #[command(flatten)]
    pub who: As,
    /// The new name
    pub new_name: String,
}

pub async fn run(ctx: Ctx, a: RenameArgs) -> anyhow::Result<ExitCode> {
    let new = AgentName::new(a.new_name)?;
    let mut client = ctx.client_as(&a.who.name).await?;
    if let Reply::Renamed { old, new, .. } = client.rename(&new).await? {
        println!("renamed {old} to {new}; messages to {old} forward to {new} for a while");
    }
    Ok(ExitCode::SUCCESS)
}
