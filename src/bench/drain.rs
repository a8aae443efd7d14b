//! `bench drain`: a backlog for a dead peer, its memory cost, and how fast it drains.
//!
//! 1. Start two linked brokers, A and B. Register the recipient on B (keeping its token) and a
//!    sender on A, and wait until A lists the recipient.
//! 2. `kill -9` B. The sender sends `backlog` messages of `size` bytes to the recipient,
//!    pipelined (`window` in flight); A acknowledges each once it is durable in its outbox for
//!    B. `queued_per_sec` is backlog over the time to the last acknowledgement.
//! 3. `rss_mib` is A's resident memory with the whole backlog queued.
//! 4. Restart B; once it answers, start the clock. The recipient registers again with its
//!    token and fetches pages of `PAGE` (`mark_read`) until it has every message; A's status
//!    is polled until its outbox for B is empty. `drain_ms` is until both are true;
//!    `drain_per_sec` is backlog over that.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};

use super::spawn::{rss_mib, LocalMesh};
use super::{await_known, await_links, connect_as, content, name_prefix, Metrics};
use crate::client::Connection;
use crate::protocol::{Body, Outgoing, Reply};

/// What one drain run does.
#[derive(Clone, Debug)]
pub struct Params {
    pub backlog: u64,
    pub size: usize,
    pub window: usize,
}

/// Messages per fetch (the broker's fetch maximum).
const PAGE: u32 = 1000;
/// Pause after a fetch that returned nothing (the backlog is still crossing the link).
const IDLE: Duration = Duration::from_millis(5);

/// Runs one drain measurement.
pub async fn run(p: &Params) -> anyhow::Result<Metrics> {
    anyhow::ensure!(p.backlog >= 1, "--backlog must be at least 1");
    anyhow::ensure!(p.window >= 1, "--window must be at least 1");
    // Generous: a broker a hundred times slower than the targets still finishes.
    let deadline = Duration::from_secs(60) + Duration::from_millis(2 * p.backlog);
    let mut mesh = LocalMesh::start(2).await?;
    let (a, b) = (mesh.addr(0).to_string(), mesh.addr(1).to_string());
    await_links(&[a.clone(), b.clone()]).await?;
    let prefix = name_prefix();
    let recipient = format!("{prefix}-r0");
    let token = register(&b, &recipient, None).await?.1;
    let sender = connect_as(&a, &format!("{prefix}-s0")).await?;
    await_known(&sender, std::slice::from_ref(&recipient)).await?;

    mesh.kill9(1);
    let start = Instant::now();
    tokio::time::timeout(deadline, send_all(&sender, &recipient, &prefix, p))
        .await
        .map_err(|_| anyhow::anyhow!("the backlog was not queued within {deadline:?}"))??;
    let queued = start.elapsed();
    sender.close();
    let rss = rss_mib(mesh.pid(0));

    mesh.restart(1).await?;
    let start = Instant::now();
    tokio::time::timeout(deadline, async {
        let (conn, _) = register(&b, &recipient, Some(token)).await?;
        let (got, ()) = futures::try_join!(fetch_all(&conn, p.backlog, &prefix), outbox_empty(&a))?;
        conn.close();
        anyhow::ensure!(
            got == p.backlog,
            "the recipient got {got} of {} messages",
            p.backlog
        );
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("the backlog did not drain within {deadline:?}"))??;
    let drained = start.elapsed();
    drop(mesh);

    let per_sec = |d: Duration| (p.backlog as f64 / d.as_secs_f64().max(1e-9)).round();
    let mut m: Metrics = vec![
        ("backlog", p.backlog as f64),
        ("queued_per_sec", per_sec(queued)),
        ("drain_ms", (drained.as_secs_f64() * 1e6).round() / 1000.0),
        ("drain_per_sec", per_sec(drained)),
        ("size", p.size as f64),
    ];
    if let Some(r) = rss {
        m.push(("rss_mib", (r * 10.0).round() / 10.0));
    }
    Ok(m)
}

/// Connects and registers `name` (with `token` to reclaim it); returns the connection and the
/// token the broker issued.
async fn register(
    addr: &str,
    name: &str,
    token: Option<String>,
) -> anyhow::Result<(Connection, String)> {
    let conn = Connection::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the broker at {addr}"))?;
    match conn
        .call(Body::Register {
            name: name.to_string(),
            token,
        })
        .await
        .with_context(|| format!("cannot register bench agent {name}"))?
    {
        Reply::Registered { token, .. } => Ok((conn, token)),
        other => anyhow::bail!("unexpected reply to register: {other:?}"),
    }
}

/// Sends the backlog with up to `window` sends in flight; each is acknowledged once durable.
async fn send_all(conn: &Connection, to: &str, prefix: &str, p: &Params) -> anyhow::Result<()> {
    let mut in_flight = FuturesUnordered::new();
    for k in 0..p.backlog {
        while in_flight.len() >= p.window {
            sent(in_flight.next().await)?;
        }
        let out = Outgoing {
            to: to.to_string(),
            content: content(k, p.size),
            dedup_key: Some(format!("{prefix}-{k}")),
            ..Outgoing::default()
        };
        in_flight.push(conn.submit(Body::Send(out)).await.context("send failed")?);
    }
    // Bounded: at most `window` left.
    while !in_flight.is_empty() {
        sent(in_flight.next().await)?;
    }
    Ok(())
}

fn sent(r: Option<crate::Result<Reply>>) -> anyhow::Result<()> {
    match r {
        Some(Ok(Reply::Sent { .. })) | None => Ok(()),
        Some(Ok(other)) => anyhow::bail!("unexpected reply to a send: {other:?}"),
        Some(Err(e)) => Err(e).context("the broker refused a send"),
    }
}

/// Fetches pages (marking them read) until `want` messages from this run arrived; the
/// caller's deadline bounds the idle polls.
async fn fetch_all(conn: &Connection, want: u64, prefix: &str) -> anyhow::Result<u64> {
    let mut got = 0u64;
    while got < want {
        let reply = conn
            .call(Body::Fetch {
                include_read: false,
                limit: PAGE,
                mark_read: true,
            })
            .await
            .context("the recipient could not fetch")?;
        let Reply::Messages { messages, .. } = reply else {
            anyhow::bail!("unexpected reply to a fetch: {reply:?}");
        };
        if messages.is_empty() {
            tokio::time::sleep(IDLE).await;
        }
        got += messages
            .iter()
            .filter(|m| m.from.starts_with(prefix))
            .count() as u64;
    }
    Ok(got)
}

/// Polls A's status until its outbox for every peer is empty; the caller's deadline bounds it.
async fn outbox_empty(addr: &str) -> anyhow::Result<()> {
    let conn = Connection::connect(addr).await?;
    loop {
        let s = match conn.call(Body::Status).await? {
            Reply::Status(s) => s,
            other => anyhow::bail!("unexpected reply to status: {other:?}"),
        };
        if !s.peers.is_empty() && s.peers.iter().all(|p| p.outbox == 0) {
            conn.close();
            return Ok(());
        }
        tokio::time::sleep(IDLE).await;
    }
}
