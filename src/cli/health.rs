//! `ipc-mesh health`: exit 0 if the broker answers, 1 if not.

use std::process::ExitCode;

use super::Ctx;
use crate::protocol::{Body, Reply};

pub async fn run(ctx: Ctx) -> anyhow::Result<ExitCode> {
    let client = ctx.connect().await?;
    match client.connection().call(Body::Ping).await? {
        Reply::Pong { broker_id } => {
            println!("ok: broker {broker_id} at {}", ctx.broker);
            Ok(ExitCode::SUCCESS)
        }
        other => anyhow::bail!("unexpected reply to ping: {other:?}"),
    }
}
