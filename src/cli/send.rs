//! `ipc-mesh send --as NAME TO TEXT`: prints the new message's id.

use std::process::ExitCode;

use clap::Args;

use super::{parse_data, As, Ctx};
use crate::protocol::{Outgoing, Reply, Route};

#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub who: As,
    /// Recipient: NAME, or NAME@BROKER-ID
    pub to: String,
    /// The message text
    pub text: String,
    /// Structured data to attach: a JSON object
    #[arg(long, value_name = "JSON")]
    pub data: Option<String>,
    /// The id of the message this answers
    #[arg(long, value_name = "ID")]
    pub reply_to: Option<String>,
    /// Keep the message for an agent that has not registered yet
    #[arg(long)]
    pub hold: bool,
}

pub async fn run(ctx: Ctx, a: SendArgs) -> anyhow::Result<ExitCode> {
    let data = parse_data(a.data)?;
    let mut client = ctx.client_as(&a.who.name).await?;
    let reply = client
        .send(Outgoing {
            to: a.to,
            content: a.text,
            data,
            reply_to: a.reply_to,
            hold: a.hold,
            dedup_key: None,
        })
        .await?;
    if let Reply::Sent { id, route, .. } = reply {
        println!("{id}");
        match route {
            Route::Local { .. } => {}
            Route::Forwarded { from, to } => {
                eprintln!("note: {from} is now {to}; delivered to {to}")
            }
            Route::Held { to } => eprintln!("note: held for {to}, who has not registered yet"),
            Route::Remote { to, broker } => eprintln!("note: queued for {to} on broker {broker}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
