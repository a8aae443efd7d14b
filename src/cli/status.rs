//! `ipc-mesh status`: the broker, its peers, the agents and the delivery clock.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{table, Ctx};
use crate::protocol::StatusView;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    /// Redraw every second until interrupted
    #[arg(long)]
    pub watch: bool,
}

pub async fn run(ctx: Ctx, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = ctx.connect().await?;
    loop {
        let status = client.status().await?;
        if a.json {
            println!("{}", serde_json::to_string(&status)?);
        } else {
            if a.watch {
                // Clear the screen and home the cursor.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", human(&status));
        }
        if !a.watch {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn human(s: &StatusView) -> String {
    let b = &s.broker;
    let mut out = format!(
        "broker {}  listen {}  advertise {}  up {}\n  data {}  version {}  agents online {}\n",
        b.id,
        b.listen,
        b.advertise,
        humantime::format_duration(Duration::from_secs(b.uptime_secs)),
        b.data_dir,
        b.version,
        b.connections
    );
    out.push_str("\npeers\n");
    if s.peers.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.id.clone(),
                    p.addr.clone(),
                    match &p.refused {
                        Some(r) if p.state != "up" => format!("{} (refused: {r})", p.state),
                        _ => p.state.clone(),
                    },
                    p.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms")),
                    p.outbox.to_string(),
                    p.in_flight.to_string(),
                    p.oldest_ms.map_or("-".into(), |ms| {
                        humantime::format_duration(Duration::from_millis(ms - ms % 1000))
                            .to_string()
                    }),
                    match p.encrypted {
                        Some(true) => "encrypted".into(),
                        Some(false) => "plain".into(),
                        None => "-".into(),
                    },
                    if p.throttled == 0 {
                        "0".into()
                    } else {
                        format!("{} ({} ms)", p.throttled, p.throttled_ms)
                    },
                ]
            })
            .collect();
        out.push_str(&table::render(
            &[
                "ID",
                "ADDR",
                "STATE",
                "RTT",
                "OUTBOX",
                "IN FLIGHT",
                "OLDEST",
                "LINK",
                "THROTTLED",
            ],
            &rows,
        ));
    }
    if !s.mesh.recent_refusals.is_empty() {
        out.push_str(&format!(
            "\nrefused peer links ({} since start; latest last)\n",
            s.mesh.refusals
        ));
        for r in &s.mesh.recent_refusals {
            out.push_str(&format!(
                "  {} ago  {}  {}\n",
                humantime::format_duration(Duration::from_secs(r.age_ms / 1000)),
                r.addr,
                r.reason
            ));
        }
    }
    out.push_str("\nagents\n");
    if s.agents.is_empty() {
        out.push_str("  (none)\n");
    } else {
        out.push_str(&table::agents(&s.agents));
    }
    out.push_str("\ndelivery clock\n");
    for c in &s.clock {
        out.push_str(&format!("  {}  {}\n", c.origin, c.delivered));
    }
    let c = &s.counters;
    out.push_str(&format!(
        "\ncounters\n  accepted {}  stored {}  expired {}  requests {}  errors {}  rate-limited {}  flushes {}\n  duplicates dropped {}  relayed {}  forwarded {}  fenced {}  fences given up {}\n",
        c.messages_accepted, c.messages_stored, c.messages_expired, c.requests, c.errors, c.rate_limited, c.flushes,
        c.duplicates_dropped, c.relayed, c.forwarded, c.messages_fenced, c.fences_given_up
    ));
    let l = &s.limits;
    out.push_str(&format!(
        "\nlimits\n  rate {}/s per agent (burst {})  message {} bytes  inbox {}  outbox {}\n  connections {} (refused {})  frame timeout {}  client auth {} (failures {})\n",
        l.rate_per_sec,
        l.rate_burst,
        l.max_message_bytes,
        l.inbox_max,
        l.outbox_max,
        l.max_connections,
        c.connections_refused,
        humantime::format_duration(Duration::from_millis(l.frame_timeout_ms)),
        if l.client_auth { "required" } else { "off" },
        c.auth_failures
    ));
    out
}
