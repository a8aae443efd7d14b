//! `bench latency`: send → delivery latency at a fixed rate, without coordinated omission.
//!
//! 1. Open the brokers; register one sender on the first and one recipient on the last.
//! 2. Fix the schedule: message `i` is due at `start + i / rate`. Its content starts with `i`,
//!    so the recipient knows when it was due without any shared clock but this process's.
//! 3. A pacing thread (an OS thread: its sleeps are finer than the async timer's millisecond)
//!    submits each send at its due time, or at once if it is late. A late send is never
//!    skipped or rescheduled: its latency still counts from when it was due, so a broker that
//!    stalls the sender is charged for every message the stall delayed.
//! 4. Each acknowledgement is recorded (ack latency: due → acknowledged after flush).
//! 5. The recipient long-polls with `Wait` (not marking read, so the reply does not wait for a
//!    flush), records due → received for each new message, and acknowledges them without
//!    waiting for the answer.
//! 6. When every message arrived (or the grace period ran out: an error), report HDR
//!    percentiles in milliseconds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use super::{
    await_known, connect_as, content, histogram, name_prefix, parse_seq, percentiles, record,
    Brokers, Metrics, Target,
};
use crate::client::Connection;
use crate::protocol::{Body, Outgoing, Reply};

#[derive(Clone, Debug)]
pub struct Params {
    /// Messages per second.
    pub rate: u32,
    pub duration: Duration,
    pub size: usize,
}

/// The most messages one run sends, whatever rate × duration asks for.
const MAX_MESSAGES: u64 = 10_000_000;
/// How long after the last due time every message must have arrived.
const GRACE: Duration = Duration::from_secs(30);
/// How long past its own timeout a wait may go unanswered before the run fails.
const UNANSWERED: Duration = Duration::from_secs(10);
/// Head start for the recipient's first long poll before the first send is due.
const LEAD_IN: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Acks {
    count: u64,
    errors: u64,
    first_error: Option<String>,
}

pub async fn run(target: &Target, p: &Params) -> anyhow::Result<Metrics> {
    anyhow::ensure!(p.rate >= 1, "--rate must be at least 1");
    anyhow::ensure!(!p.duration.is_zero(), "--duration must be longer than zero");
    let total = ((p.rate as f64 * p.duration.as_secs_f64()).ceil() as u64).clamp(1, MAX_MESSAGES);
    let period = Duration::from_secs_f64(1.0 / p.rate as f64);

    let brokers = Brokers::open(target).await?;
    let prefix = name_prefix();
    let recipient_name = format!("{prefix}-r0");
    let recipient = connect_as(&brokers.recv_addr, &recipient_name).await?;
    let sender = connect_as(&brokers.send_addr, &format!("{prefix}-s0")).await?;

    if brokers.cross() {
        await_known(&sender, std::slice::from_ref(&recipient_name)).await?;
    }
    let start = Instant::now() + LEAD_IN;
    let due = move |i: u64| start + period.mul_f64(i as f64);
    let deadline = due(total) + GRACE;

    let delivered = {
        let (conn, prefix) = (recipient.clone(), prefix.clone());
        tokio::spawn(async move { receive(conn, total, &prefix, due, deadline).await })
    };

    let ack_hist = Arc::new(Mutex::new(histogram()));
    let acks = Arc::new(Mutex::new(Acks::default()));
    let pacer = {
        let (conn, size, handle) = (sender.clone(), p.size, tokio::runtime::Handle::current());
        let (ack_hist, acks) = (ack_hist.clone(), acks.clone());
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                pace(
                    conn,
                    handle,
                    recipient_name,
                    total,
                    size,
                    due,
                    deadline,
                    ack_hist,
                    acks,
                )
            })
            .context("cannot start the pacing thread")?
    };
    match tokio::task::spawn_blocking(move || pacer.join()).await {
        Ok(Ok(r)) => r?,
        _ => anyhow::bail!("the pacing thread failed"),
    }

    // Every acknowledgement is in, or the deadline passed.
    let polls = GRACE.as_millis() as u64 / 5;
    for _ in 0..polls {
        if acks.lock().unwrap().count >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivery_hist = delivered.await.context("the recipient task failed")??;
    sender.close();
    recipient.close();

    let a = acks.lock().unwrap();
    if let Some(e) = &a.first_error {
        anyhow::bail!("{} of {total} sends failed; the first: {e}", a.errors);
    }
    anyhow::ensure!(
        a.count >= total,
        "only {} of {total} sends were acknowledged in time",
        a.count
    );
    let mut m: Metrics = vec![("rate", p.rate as f64), ("messages", total as f64)];
    m.extend(percentiles(
        &delivery_hist,
        ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"],
    ));
    m.extend(percentiles(
        &ack_hist.lock().unwrap(),
        [
            "ack_p50_ms",
            "ack_p90_ms",
            "ack_p99_ms",
            "ack_p999_ms",
            "ack_max_ms",
        ],
    ));
    m.extend([
        ("size", p.size as f64),
        ("brokers", target.brokers() as f64),
    ]);
    Ok(m)
}

/// The pacing loop, on its own thread: one send per due time, late ones at once.
#[allow(clippy::too_many_arguments)]
fn pace(
    conn: Connection,
    handle: tokio::runtime::Handle,
    to: String,
    total: u64,
    size: usize,
    due: impl Fn(u64) -> Instant,
    deadline: Instant,
    ack_hist: Arc<Mutex<Histogram<u64>>>,
    acks: Arc<Mutex<Acks>>,
) -> anyhow::Result<()> {
    for i in 0..total {
        let when = due(i);
        let now = Instant::now();
        if now > deadline {
            anyhow::bail!(
                "the sender fell {:?} behind its schedule; lower --rate",
                now - when
            );
        }
        if when > now {
            std::thread::sleep(when - now);
        }
        let out = Outgoing {
            to: to.clone(),
            content: content(i, size),
            ..Outgoing::default()
        };
        // The connection's queue is a tokio channel, usable from any thread. When it is full
        // this blocks, and the delay counts against the broker (measured from `when`).
        let reply =
            futures::executor::block_on(conn.submit(Body::Send(out))).context("send failed")?;
        let (ack_hist, acks) = (ack_hist.clone(), acks.clone());
        handle.spawn(async move {
            let r = reply.await;
            let took = when.elapsed();
            let mut a = acks.lock().unwrap();
            match r {
                Ok(Reply::Sent { .. }) => record(&mut ack_hist.lock().unwrap(), took),
                Ok(other) => {
                    a.errors += 1;
                    a.first_error
                        .get_or_insert(format!("unexpected reply {other:?}"));
                }
                Err(e) => {
                    a.errors += 1;
                    a.first_error.get_or_insert(e.to_string());
                }
            }
            a.count += 1;
        });
    }
    Ok(())
}

/// Long-polls until all `total` messages arrived; records due → received for each.
async fn receive(
    conn: Connection,
    total: u64,
    prefix: &str,
    due: impl Fn(u64) -> Instant,
    deadline: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = histogram();
    let mut seen = vec![false; total as usize];
    let mut got = 0u64;
    // Bounded by count (each poll either brings a new message, returns one not yet marked
    // read, or waits out its timeout) and by the deadline.
    let max_polls = 4 * total + 10_000;
    for _ in 0..max_polls {
        if got >= total {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(
            !left.is_zero(),
            "only {got} of {total} messages were delivered in time"
        );
        let wait_ms = left.as_millis().clamp(1, 1000) as u64;
        let wait = conn.call(Body::Wait {
            timeout_ms: wait_ms,
            limit: 1000,
            mark_read: false,
        });
        // The broker owes an answer within the wait's own timeout; far past it, say so
        // instead of hanging.
        let reply = tokio::time::timeout(Duration::from_millis(wait_ms) + UNANSWERED, wait)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the recipient's wait ({wait_ms} ms) went unanswered for {:?}, with {got} of {total} messages delivered",
                    Duration::from_millis(wait_ms) + UNANSWERED
                )
            })?
            .context("the recipient could not wait for messages")?;
        let now = Instant::now();
        let Reply::Messages { messages, .. } = reply else {
            anyhow::bail!("unexpected reply to a wait: {reply:?}");
        };
        let mut ids = Vec::with_capacity(messages.len());
        for m in messages {
            // Anything else in the inbox (a notice) is acknowledged too, or it would come back.
            let seq = m
                .from
                .starts_with(prefix)
                .then(|| parse_seq(&m.content))
                .flatten();
            if let Some(i) = seq.filter(|i| *i < total) {
                if !seen[i as usize] {
                    seen[i as usize] = true;
                    got += 1;
                    record(&mut hist, now.saturating_duration_since(due(i)));
                }
            }
            ids.push(m.id);
        }
        if !ids.is_empty() {
            // Marked read in request order, before the next wait is handled; the answer
            // itself (after a flush) is not needed.
            drop(conn.submit(Body::Ack { ids }).await.context("ack failed")?);
        }
    }
    anyhow::ensure!(
        got >= total,
        "only {got} of {total} messages were delivered"
    );
    Ok(hist)
}
