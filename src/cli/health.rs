//! `ipc-mesh health`: exit 0 if the broker answers, 1 if not.

use std::process::ExitCode;

use super::Ctx;
use crate::protocol::{Body, Reply};

pub async fn run(ctx: Ctx) -> anyhow::Result<ExitCode> {
    let client = match ctx.connect().await {
        Ok(c) => c,
        // It answered, and asks for a secret this monitor does not hold: it is up.
        Err(e)
            if e.downcast_ref::<crate::Error>().and_then(|e| e.kind())
                == Some(crate::ErrorKind::Unauthorized) =>
        {
            println!(
                "ok: broker at {} (requires client authentication)",
                ctx.broker
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e),
    };
    match client.connection().call(Body::Ping).await? {
        Reply::Pong { broker_id } => {
            println!("ok: broker {broker_id} at {}", ctx.broker);
            Ok(ExitCode::SUCCESS)
        }
        other => anyhow::bail!("unexpected reply to ping: {other:?}"),
    }
}
