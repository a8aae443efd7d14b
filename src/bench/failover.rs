//! `bench failover`: how long an `mcp`-style client is without a broker when its broker dies.
//!
//! 1. Start two linked brokers, A and B. A client connects the way `ipc-mesh mcp` does
//!    ([`Client::connect_nearest`] over A as the local candidate and B as the remote one) and
//!    registers with a token kept in a temporary home ([`Client::register_as`]).
//! 2. `kill -9` A and start the clock; at once, and again until one is served, ask `list`
//!    through the client: it finds its connection gone, moves to the next candidate, and
//!    registers there again with its token. The clock stops at the first `list` served:
//!    one `failover_ms` sample.
//! 3. Restart A, wait for the link, attach a new client to A (the old one is on B now) with the
//!    same token, and repeat from 2 for `kills` kills. The median is `failover_ms`.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::spawn::LocalMesh;
use super::{await_links, name_prefix, Metrics};
use crate::client::{Candidates, Client};
use crate::home::Home;
use crate::protocol::{Body, Reply};
use federation::AgentName;

/// What one failover run does.
#[derive(Clone, Debug)]
pub struct Params {
    pub kills: u32,
}

/// How long the client may take to be served again after a kill before the run fails.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two unanswered attempts (the client's own reconnect backoff comes on top).
const RETRY: Duration = Duration::from_millis(1);

/// Runs one failover measurement: `kills` kills, each a sample.
pub async fn run(p: &Params) -> anyhow::Result<Metrics> {
    anyhow::ensure!(p.kills >= 1, "--kills must be at least 1");
    let mut mesh = LocalMesh::start(2).await?;
    let (a, b) = (mesh.addr(0).to_string(), mesh.addr(1).to_string());
    await_links(&[a.clone(), b.clone()]).await?;
    let home_dir = mesh
        .root()
        .context("the bench's brokers have no directory")?
        .join("client-home");
    std::fs::create_dir_all(&home_dir)?;
    let home = Home::at(home_dir);
    let name = AgentName::new(format!("{}-mcp", name_prefix()))?;
    let candidates = Candidates {
        local: vec![a.clone()],
        remote: vec![b.clone()],
    };

    let mut samples = Vec::with_capacity(p.kills as usize);
    for kill in 0..p.kills {
        let mut client = Client::connect_nearest(&candidates).await?;
        anyhow::ensure!(
            client.connection().addr() == a,
            "the client attached to {} instead of the local broker {a}",
            client.connection().addr()
        );
        match client.register_as(&name, &home).await? {
            Reply::Registered { .. } => {}
            other => anyhow::bail!("unexpected reply to register: {other:?}"),
        }

        mesh.kill9(0);
        let killed = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match client.call(Body::List).await {
                Ok(Reply::Agents { .. }) => break,
                Ok(other) => anyhow::bail!("unexpected reply to list: {other:?}"),
                Err(e) => e,
            };
            anyhow::ensure!(
                killed.elapsed() < TIMEOUT,
                "kill {kill}: the client was not served within {TIMEOUT:?} ({attempts} attempts; last error: {err})"
            );
            tokio::time::sleep(RETRY).await;
        }
        samples.push(killed.elapsed());
        anyhow::ensure!(
            client.connection().addr() == b,
            "after the kill the client was served by {}, not {b}",
            client.connection().addr()
        );
        client.connection().close();

        mesh.restart(0).await?;
        await_links(&[a.clone(), b.clone()]).await?;
    }
    drop(mesh);

    samples.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1000.0;
    let n = samples.len();
    let median = (samples[(n - 1) / 2] + samples[n / 2]) / 2;
    Ok(vec![
        ("failover_ms", ms(median)),
        ("failover_min_ms", ms(samples[0])),
        ("failover_max_ms", ms(samples[n - 1])),
        ("kills", p.kills as f64),
    ])
}
