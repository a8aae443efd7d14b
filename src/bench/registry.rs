//! `bench registry`: how fast brokers started from one seed become a full mesh, and how fast a
//! registration reaches every broker.
//!
//! 1. Start the clock, then start `brokers` brokers whose only seed is broker 0
//!    ([`Seeds::First`]); poll every broker's status until each has `brokers − 1` peers up:
//!    that is `formation_ms`.
//! 2. Read every broker's `mesh.links_opened`: half their sum is the links opened in all (each
//!    link counts at both ends); `extra_links` is what that exceeds N(N−1)/2 by.
//! 3. `registrations` times: register a fresh agent (no token) on a random broker, and from its
//!    reply poll every broker's `list` every `POLL` until all of them show the name; that
//!    span is one propagation sample.
//! 4. `propagation_*_ms` are percentiles of those samples.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::spawn::{LocalMesh, Seeds};
use super::{check_brokers, histogram, name_prefix, record, Metrics};
use crate::client::{Client, Connection};
use crate::protocol::{Body, Reply};
use federation::AgentName;

/// What one registry run does.
#[derive(Clone, Debug)]
pub struct Params {
    pub brokers: usize,
    pub registrations: usize,
}

/// How often each broker is asked whether the mesh formed, or a name arrived.
const POLL: Duration = Duration::from_millis(2);
/// How long formation, and each propagation, may take before the run fails.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one registry measurement.
pub async fn run(p: &Params) -> anyhow::Result<Metrics> {
    check_brokers(p.brokers)?;
    anyhow::ensure!(
        p.brokers >= 2,
        "--brokers must be at least 2 to form a mesh"
    );
    anyhow::ensure!(p.registrations >= 1, "--registrations must be at least 1");
    let n = p.brokers;

    let start = Instant::now();
    let mesh = LocalMesh::start_seeded(n, Seeds::First).await?;
    let mut probes = Vec::with_capacity(n);
    for i in 0..n {
        probes.push(Client::connect(mesh.addr(i)).await?);
    }
    let deadline = start + TIMEOUT;
    let mut formed = vec![false; n];
    let mut links_opened = vec![0u64; n];
    // Bounded by the deadline: each round takes at least POLL.
    while formed.iter().any(|f| !f) {
        for (i, probe) in probes.iter_mut().enumerate() {
            if formed[i] {
                continue;
            }
            let s = probe.status().await?;
            formed[i] = s.peers.iter().filter(|p| p.state == "up").count() >= n - 1;
            links_opened[i] = s.mesh.links_opened;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the mesh of {n} brokers did not form within {TIMEOUT:?}: {} of {n} brokers had every peer up",
            formed.iter().filter(|f| **f).count()
        );
        if formed.iter().any(|f| !f) {
            tokio::time::sleep(POLL).await;
        }
    }
    let formation = start.elapsed();
    // Once formed, read the counters again: a broker that formed early may have opened more since.
    for (i, probe) in probes.iter_mut().enumerate() {
        links_opened[i] = probe.status().await?.mesh.links_opened;
    }
    let full = (n * (n - 1) / 2) as f64;
    let extra_links = links_opened.iter().sum::<u64>() as f64 / 2.0 - full;
    for probe in &probes {
        probe.connection().close();
    }

    let lists: Vec<Connection> = {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            v.push(Connection::connect(mesh.addr(i)).await?);
        }
        v
    };
    let prefix = name_prefix();
    let mut h = histogram();
    for k in 0..p.registrations {
        let name = format!("{prefix}-a{k}");
        let at = rand::random_range(0..n);
        let mut agent = Client::connect(mesh.addr(at)).await?;
        agent
            .register(&AgentName::new(name.as_str())?, None)
            .await
            .with_context(|| format!("cannot register {name} on broker {at}"))?;
        let registered = Instant::now();
        let until = registered + TIMEOUT;
        let mut seen = vec![false; n];
        seen[at] = true;
        while seen.iter().any(|s| !s) {
            let unseen: Vec<usize> = (0..n).filter(|i| !seen[*i]).collect();
            let replies =
                futures::future::join_all(unseen.iter().map(|i| lists[*i].call(Body::List))).await;
            for (i, r) in unseen.into_iter().zip(replies) {
                match r? {
                    Reply::Agents { agents } => seen[i] = agents.iter().any(|a| a.name == name),
                    other => anyhow::bail!("unexpected reply to list: {other:?}"),
                }
            }
            if seen.iter().all(|s| *s) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < until,
                "registration {k} ({name}, on broker {at}) reached {} of {n} brokers within {TIMEOUT:?}",
                seen.iter().filter(|s| **s).count()
            );
            tokio::time::sleep(POLL).await;
        }
        record(&mut h, registered.elapsed());
        agent.connection().close();
    }
    for c in &lists {
        c.close();
    }
    drop(mesh);

    let ms = |us: u64| us as f64 / 1000.0;
    Ok(vec![
        (
            "formation_ms",
            (formation.as_secs_f64() * 1e6).round() / 1000.0,
        ),
        ("propagation_p50_ms", ms(h.value_at_quantile(0.50))),
        ("propagation_p99_ms", ms(h.value_at_quantile(0.99))),
        ("propagation_max_ms", ms(h.max())),
        ("extra_links", extra_links),
        ("brokers", n as f64),
        ("registrations", p.registrations as f64),
    ])
}
