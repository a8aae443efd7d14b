//! `ipc-mesh check --as NAME`: print unread messages, then mark them read.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{As, Ctx};
use crate::config::parse_duration;
use crate::protocol::MessageView;

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub who: As,
    /// Print JSON: {"messages": [...], "unread": N}
    #[arg(long)]
    pub json: bool,
    /// Wait up to this long for a message when there is none (e.g. 30s; at most 50s)
    #[arg(long, value_name = "DURATION")]
    pub wait: Option<String>,
    /// The most messages to print
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

pub async fn run(ctx: Ctx, a: CheckArgs) -> anyhow::Result<ExitCode> {
    let wait: Option<Duration> = match &a.wait {
        Some(w) => Some(parse_duration("--wait", w).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let mut client = ctx.client_as(&a.who.name).await?;
    let (messages, unread) = client.check(wait, a.limit).await?;
    if a.json {
        let out = serde_json::json!({
            "messages": messages.iter().map(MessageView::to_json).collect::<Vec<_>>(),
            "unread": unread,
        });
        println!("{out}");
    } else if messages.is_empty() {
        println!("no new messages");
    } else {
        for m in &messages {
            print!("{}", human(m));
        }
        if unread > 0 {
            println!("({unread} more unread)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(m: &MessageView) -> String {
    let mut out = format!("{}  from {}  at {}", m.id, m.from, m.sent_at);
    if let Some(r) = &m.reply_to {
        out.push_str(&format!("  (reply to {r})"));
    }
    out.push('\n');
    for line in m.content.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    if let Some(d) = &m.data {
        out.push_str(&format!("  data: {d}\n"));
    }
    out
}
