//! `bench baseline`: the physical limits of this machine, measured in the same session as the
//! broker figures, so each of those can be printed as a fraction of what is possible at all.
//!
//! 1. TCP round trip: an in-process echo server on a loopback port; one client writes 8 bytes
//!    and reads them back, `ops / 5` times, with `TCP_NODELAY` as the broker uses it. Median.
//! 2. TCP pipelined: the same kind of server echoing length-delimited frames of 200 bytes (the
//!    broker's framing); one task writes `4 × ops` frames, batching them into few writes the way
//!    the client library does, another counts the echoes. Frames per second.
//! 3. sled: a fresh database in a temporary directory; `ops` inserts of 200-byte values with a
//!    flush after every 100, and again after every 1000. Inserts per second. A broker that
//!    acknowledges only flushed sends cannot beat the first by much on its own disk.
//!
//! Everything is loopback and temporary; the directory is removed when the run ends.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::{histogram, record, Metrics};

#[derive(Clone, Debug)]
pub struct Params {
    /// The sled inserts per measurement; the TCP tests scale from it.
    pub ops: u64,
}

/// Payload size of the pipelined TCP frames and sled values: the message size.
const PAYLOAD: usize = 200;
/// The most time one measurement may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(p: &Params) -> anyhow::Result<Metrics> {
    anyhow::ensure!(p.ops >= 10, "--ops must be at least 10");
    let rtt = timed("tcp round trip", tcp_rtt_p50_ms((p.ops / 5).max(10))).await?;
    let piped = timed("tcp pipelined", tcp_pipelined_per_sec(p.ops * 4)).await?;
    let ops = p.ops;
    let (f100, f1000) = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, f64)> {
        Ok((sled_per_sec(ops, 100)?, sled_per_sec(ops, 1000)?))
    })
    .await
    .context("the sled measurement failed")??;
    Ok(vec![
        ("tcp_rtt_p50_ms", (rtt * 1000.0).round() / 1000.0),
        ("tcp_pipelined_per_sec", piped.round()),
        ("sled_flush100_per_sec", f100.round()),
        ("sled_flush1000_per_sec", f1000.round()),
    ])
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what} did not finish within {STEP_TIMEOUT:?}"))?
}

/// Median of `n` 8-byte round trips over one loopback connection, in milliseconds.
async fn tcp_rtt_p50_ms(n: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 8];
        for _ in 0..n {
            s.read_exact(&mut buf).await?;
            s.write_all(&buf).await?;
        }
        std::io::Result::Ok(())
    });
    let mut c = TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let mut hist = histogram();
    let mut buf = [0u8; 8];
    for i in 0..n {
        let t = Instant::now();
        c.write_all(&i.to_le_bytes()).await?;
        c.read_exact(&mut buf).await?;
        record(&mut hist, t.elapsed());
    }
    server.await??;
    Ok(hist.value_at_quantile(0.5) as f64 / 1000.0)
}

/// Frames per second through a loopback echo of length-delimited 200-byte frames.
async fn tcp_pipelined_per_sec(n: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let (mut sink, mut frames) = Framed::new(s, LengthDelimitedCodec::new()).split();
        let mut echoed = 0u64;
        // Echo in batches: feed everything that is ready, then flush once.
        while echoed < n {
            let Some(f) = frames.next().await else { break };
            sink.feed(f?.freeze()).await?;
            echoed += 1;
            while echoed < n {
                match futures::FutureExt::now_or_never(frames.next()) {
                    Some(Some(f)) => {
                        sink.feed(f?.freeze()).await?;
                        echoed += 1;
                    }
                    _ => break,
                }
            }
            sink.flush().await?;
        }
        std::io::Result::Ok(())
    });
    let c = TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let (mut sink, mut frames) = Framed::new(c, LengthDelimitedCodec::new()).split();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            sink.feed(payload.clone()).await?;
            if i % 64 == 63 {
                sink.flush().await?;
            }
        }
        sink.flush().await?;
        std::io::Result::Ok(sink)
    });
    let mut got = 0u64;
    while got < n {
        match frames.next().await {
            Some(f) => {
                f?;
                got += 1;
            }
            None => break,
        }
    }
    let elapsed = start.elapsed();
    let _sink = writer.await??;
    server.await??;
    anyhow::ensure!(got == n, "the echo server returned {got} of {n} frames");
    Ok(n as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Inserts per second into a fresh sled database, flushing every `every` inserts.
fn sled_per_sec(n: u64, every: u64) -> anyhow::Result<f64> {
    let dir = tempfile::Builder::new()
        .prefix("ipc-mesh-bench-sled-")
        .tempdir()
        .context("cannot create a temporary directory for sled")?;
    let db = sled::open(dir.path()).context("cannot open sled")?;
    let value = vec![7u8; PAYLOAD];
    let start = Instant::now();
    for i in 0..n {
        db.insert(i.to_be_bytes(), value.as_slice())?;
        if (i + 1) % every == 0 {
            db.flush()?;
        }
    }
    db.flush()?;
    let elapsed = start.elapsed();
    drop(db);
    Ok(n as f64 / elapsed.as_secs_f64().max(1e-9))
}
