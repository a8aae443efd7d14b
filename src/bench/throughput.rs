//! `bench throughput`: how many durable sends a broker acknowledges, and delivers, per second.
//!
//! 1. Open the brokers (fresh ones per run, or the running one) and note the idle RSS.
//! 2. Register `recipients` agents on the last broker and `senders` agents on the first, each
//!    on its own connection, under a fresh random name prefix.
//! 3. Start the clock. Each sender sends its share of `messages`, round-robin over the
//!    recipients, pipelined: up to `window` sends in flight, each acknowledged only once the
//!    broker has flushed it (that is the broker's contract), each with a dedup key as the real
//!    clients send it.
//! 4. At the same time each recipient drains its inbox with long-polling `Wait` requests that
//!    mark what they return read (one request does the work of `check`), until it has every
//!    message meant for it.
//! 5. `acked_per_sec` is messages over the time to the last acknowledgement;
//!    `delivered_per_sec` is messages over the time to the last delivery. Then note the RSS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};

use super::{await_known, connect_as, content, name_prefix, Brokers, Metrics, Target};
use crate::protocol::{Body, Outgoing, Reply};

/// What one throughput run does.
#[derive(Clone, Debug)]
pub struct Params {
    pub senders: usize,
    pub recipients: usize,
    pub messages: u64,
    pub size: usize,
    pub window: usize,
}

/// The most messages one recipient asks for per request (the broker's fetch maximum).
const DRAIN_LIMIT: u32 = 1000;
/// How long one drain request may wait for a message before asking again.
const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// How long past its own timeout a wait may go unanswered before the run fails.
const UNANSWERED: Duration = Duration::from_secs(10);

/// Runs one throughput measurement.
pub async fn run(target: &Target, p: &Params) -> anyhow::Result<Metrics> {
    anyhow::ensure!(p.senders >= 1, "--senders must be at least 1");
    anyhow::ensure!(p.recipients >= 1, "--recipients must be at least 1");
    anyhow::ensure!(p.window >= 1, "--window must be at least 1");
    anyhow::ensure!(p.messages >= 1, "--messages must be at least 1");
    let brokers = Brokers::open(target).await?;
    let rss_idle = brokers.rss_mib();
    let prefix = name_prefix();

    let mut recipients = Vec::with_capacity(p.recipients);
    for j in 0..p.recipients {
        let name = format!("{prefix}-r{j}");
        recipients.push((connect_as(&brokers.recv_addr, &name).await?, name));
    }
    let mut senders = Vec::with_capacity(p.senders);
    for i in 0..p.senders {
        senders.push(connect_as(&brokers.send_addr, &format!("{prefix}-s{i}")).await?);
    }

    let expected = expected_per_recipient(p.senders, p.recipients, p.messages);
    // Generous: a broker a hundred times slower than the target still finishes.
    let deadline = Duration::from_secs(60) + Duration::from_millis(2 * p.messages);

    if brokers.cross() {
        let names: Vec<String> = recipients.iter().map(|(_, n)| n.clone()).collect();
        await_known(&senders[0], &names).await?;
    }
    // Progress, for the error when a run does not finish: (acknowledged, delivered).
    let progress = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let start = Instant::now();
    let mut drains = Vec::with_capacity(p.recipients);
    for ((conn, _name), want) in recipients.iter().zip(&expected) {
        let (conn, want, prefix) = (conn.clone(), *want, prefix.clone());
        let progress = progress.clone();
        drains.push(tokio::spawn(async move {
            drain(conn, want, &prefix, &progress.1).await
        }));
    }
    let mut sends = Vec::with_capacity(p.senders);
    for (i, conn) in senders.iter().enumerate() {
        let to: Vec<String> = recipients.iter().map(|(_, n)| n.clone()).collect();
        let (conn, params, prefix, progress) =
            (conn.clone(), p.clone(), prefix.clone(), progress.clone());
        sends.push(tokio::spawn(async move {
            send_all(conn, i, &to, &params, &prefix, &progress.0).await
        }));
    }

    let work = async {
        let mut last_ack = start;
        for s in sends {
            last_ack = last_ack.max(s.await.context("a sender task failed")??);
        }
        let mut last_delivery = start;
        for d in drains {
            last_delivery = last_delivery.max(d.await.context("a recipient task failed")??);
        }
        anyhow::Ok((last_ack, last_delivery))
    };
    let (last_ack, last_delivery) = tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "throughput run did not finish within {deadline:?}: {} of {} sends acknowledged, {} delivered",
                progress.0.load(Ordering::Relaxed),
                p.messages,
                progress.1.load(Ordering::Relaxed)
            )
        })??;
    let rss_end = brokers.rss_mib();
    for (c, _) in &recipients {
        c.close();
    }
    for c in &senders {
        c.close();
    }

    let per_sec =
        |until: Instant| p.messages as f64 / until.duration_since(start).as_secs_f64().max(1e-9);
    let mut m: Metrics = vec![
        ("acked_per_sec", per_sec(last_ack).round()),
        ("delivered_per_sec", per_sec(last_delivery).round()),
        ("messages", p.messages as f64),
        ("size", p.size as f64),
        ("brokers", target.brokers() as f64),
        ("senders", p.senders as f64),
        ("recipients", p.recipients as f64),
        ("window", p.window as f64),
    ];
    if let Some(r) = rss_idle {
        m.push(("rss_idle_mib", (r * 10.0).round() / 10.0));
    }
    if let Some(r) = rss_end {
        m.push(("rss_mib", (r * 10.0).round() / 10.0));
    }
    Ok(m)
}

/// How many messages sender `i` of `senders` sends: an equal share, the remainder to the first.
fn share(senders: usize, messages: u64, i: usize) -> u64 {
    messages / senders as u64 + u64::from((i as u64) < messages % senders as u64)
}

/// What each recipient should get: sender i's k-th message goes to recipient (i + k) mod R.
fn expected_per_recipient(senders: usize, recipients: usize, messages: u64) -> Vec<u64> {
    let r = recipients as u64;
    let mut expected = vec![0u64; recipients];
    for i in 0..senders {
        let n = share(senders, messages, i);
        for (j, e) in expected.iter_mut().enumerate() {
            // The first k with (i + k) mod R == j, then every R-th after it.
            let first = (j as u64 + r - i as u64 % r) % r;
            if first < n {
                *e += (n - first).div_ceil(r);
            }
        }
    }
    expected
}

/// Sends this sender's share with up to `window` in flight; returns when the last was acknowledged.
async fn send_all(
    conn: crate::client::Connection,
    sender: usize,
    to: &[String],
    p: &Params,
    prefix: &str,
    acked_count: &AtomicU64,
) -> anyhow::Result<Instant> {
    let text = content(sender as u64, p.size);
    let n = share(p.senders, p.messages, sender);
    let mut in_flight = FuturesUnordered::new();
    for k in 0..n {
        while in_flight.len() >= p.window {
            acked(in_flight.next().await)?;
            acked_count.fetch_add(1, Ordering::Relaxed);
        }
        let out = Outgoing {
            to: to[(sender + k as usize) % to.len()].clone(),
            content: text.clone(),
            dedup_key: Some(format!("{prefix}-{sender}-{k}")),
            ..Outgoing::default()
        };
        in_flight.push(conn.submit(Body::Send(out)).await.context("send failed")?);
    }
    // Bounded: at most `window` left.
    while !in_flight.is_empty() {
        acked(in_flight.next().await)?;
        acked_count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Instant::now())
}

fn acked(r: Option<crate::Result<Reply>>) -> anyhow::Result<()> {
    match r {
        Some(Ok(Reply::Sent { .. })) | None => Ok(()),
        Some(Ok(other)) => anyhow::bail!("unexpected reply to a send: {other:?}"),
        Some(Err(e)) => Err(e).context("the broker refused a send"),
    }
}

/// Long-polls until `want` messages from this run arrived; returns when the last one did.
async fn drain(
    conn: crate::client::Connection,
    want: u64,
    prefix: &str,
    delivered: &AtomicU64,
) -> anyhow::Result<Instant> {
    let mut got = 0u64;
    let mut last = Instant::now();
    // Bounded by count (every productive poll takes at least one message; idle polls wait
    // DRAIN_WAIT each and the caller's deadline ends them).
    let max_polls = want + 100_000;
    for _ in 0..max_polls {
        if got >= want {
            break;
        }
        let wait = conn.call(Body::Wait {
            timeout_ms: DRAIN_WAIT.as_millis() as u64,
            limit: DRAIN_LIMIT,
            mark_read: true,
        });
        // The broker owes an answer within DRAIN_WAIT plus one flush; far past that, say so
        // instead of hanging until the run's deadline.
        let reply = tokio::time::timeout(DRAIN_WAIT + UNANSWERED, wait)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "a recipient's wait (timeout {DRAIN_WAIT:?}) went unanswered for {:?}, with {got} of {want} messages delivered",
                    DRAIN_WAIT + UNANSWERED
                )
            })?
            .context("a recipient could not fetch")?;
        let Reply::Messages { messages, .. } = reply else {
            anyhow::bail!("unexpected reply to a wait: {reply:?}");
        };
        let ours = messages
            .iter()
            .filter(|m| m.from.starts_with(prefix))
            .count() as u64;
        if ours > 0 {
            got += ours;
            delivered.fetch_add(ours, Ordering::Relaxed);
            last = Instant::now();
        }
    }
    anyhow::ensure!(got >= want, "a recipient got {got} of {want} messages");
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_expectations_add_up() {
        for (s, r, m) in [(4, 4, 100_000), (3, 5, 7), (1, 1, 1), (2, 7, 3), (5, 2, 11)] {
            let total: u64 = (0..s).map(|i| share(s, m, i)).sum();
            assert_eq!(total, m);
            let exp = expected_per_recipient(s, r, m);
            assert_eq!(exp.iter().sum::<u64>(), m, "{s} {r} {m}");
            // Brute force agrees.
            let mut brute = vec![0u64; r];
            for i in 0..s {
                for k in 0..share(s, m, i) {
                    brute[(i + k as usize) % r] += 1;
                }
            }
            assert_eq!(exp, brute);
        }
    }
}
