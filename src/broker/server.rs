//! The accept loop: a bound listener, a connection limit, and one shape of shutdown.
//!
//! 1. Accept. Under `max_connections`, the connection gets a session.
//! 2. At the limit, it gets a short refusal instead (an `Unavailable` error frame and a
//!    close), so a flood of idle connections costs the newcomer a clear answer rather than a
//!    hang, and every connection already served goes on being served.
//! 3. On shutdown, stop accepting and let every session finish what it has in flight.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{session, Broker};
use crate::auth::ClientSecret;
use crate::config::{self, Config};
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::home::Home;
use crate::storage::SledEngine;

/// Connections being refused at once (over the connection limit). Beyond it, a connection
/// over the limit is closed without a word: that many refusals already mean a flood.
const REFUSALS: usize = 256;
/// How long a refusal may take to write and close.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves clients on `listener` until `shutdown` completes; then stops accepting, lets every
/// connection finish the requests it has in flight, and returns. With `client_auth`, clients
/// must prove that secret before any request.
pub async fn run(
    listener: TcpListener,
    broker: Broker,
    client_auth: Option<ClientSecret>,
    shutdown: impl Future,
) {
    let max = broker.config().broker.max_connections;
    let limit = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(REFUSALS));
    let client_auth = client_auth.map(Arc::new);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    broker.connection_refused();
                    if let Ok(r) = refusals.clone().try_acquire_owned() {
                        tracing::debug!(%peer, max, "connection limit reached; refusing");
                        tracker.spawn(async move {
                            refuse(stream, max).await;
                            drop(r);
                        });
                    }
                    continue;
                };
                let (broker, stop, auth) = (broker.clone(), stop.clone(), client_auth.clone());
                tracker.spawn(async move {
                    session::run(broker, stream, peer, stop, auth).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Tells a connection over the limit so, in the protocol's own terms (an error frame with id
/// 0, as for a bad hello), and closes it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let e = WireError::new(
        ErrorKind::Unavailable,
        format!(
            "the broker is serving its limit of {max} connections ([broker] max_connections); try again later"
        ),
    );
    let body = federation::wire::encode(&crate::protocol::Response {
        id: 0,
        result: Err(e),
    });
    let mut frame = BytesMut::with_capacity(4 + body.len());
    frame.put_u32(body.len() as u32);
    frame.extend_from_slice(&body);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        // Read what the client sent (its hello) until it closes, so the close is orderly and
        // the refusal is not lost to a reset.
        let mut sink = [0u8; 256];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// Raises this process's soft limit on open files to its hard limit: every connection is a
/// file descriptor, and the usual soft limit (1024) is below the default connection limit.
fn raise_fd_limit(max_connections: usize) {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        // Storage, peers and logs need descriptors too.
        if (lim.rlim_cur as u128) < max_connections as u128 + 256 {
            tracing::warn!(
                open_files = lim.rlim_cur,
                max_connections,
                "the open-file limit is below [broker] max_connections plus room for storage; \
                 connections beyond it fail to be accepted (raise LimitNOFILE / ulimit -n)"
            );
        }
    }
}

/// Binds, opens `<home>/broker-<port>/`, serves until `shutdown`, then flushes and returns.
pub async fn serve(config: Config, home: &Home, shutdown: impl Future) -> Result<()> {
    super::mesh::check_exposure(&config, config.broker.listen)?;
    let listener =
        TcpListener::bind(config.broker.listen)
            .await
            .map_err(|e| Error::Unreachable {
                addr: config.broker.listen.to_string(),
                reason: format!("cannot listen there: {e}"),
            })?;
    serve_on(listener, config, home, shutdown).await
}

/// Like [`serve`], on a listener already bound.
pub async fn serve_on(
    listener: TcpListener,
    config: Config,
    home: &Home,
    shutdown: impl Future,
) -> Result<()> {
    let addr = listener.local_addr()?;
    let client_auth = if config.broker.client_auth_required(addr) {
        match config::load_client_secret(&config.mesh)? {
            Some(s) => Some(s),
            None => {
                return Err(Error::Config(format!(
                    "clients of a broker on {addr} must authenticate ([broker] require_client_auth, on by default beyond loopback), which needs a mesh secret: set [mesh] secret_file in mesh.toml, or IPC_MESH_SECRET"
                )))
            }
        }
    } else {
        None
    };
    raise_fd_limit(config.broker.max_connections);
    home.ensure()?;
    let dir = home.broker_dir(addr.port());
    let engine = open_engine(&dir)?;
    let mesh_config = config.clone();
    let (broker, tasks) = Broker::start(engine, config, addr, dir.clone())?;
    super::mesh::start(&broker, &mesh_config, addr, &tasks)?;
    tracing::info!(
        broker = %broker.id(),
        listen = %addr,
        data = %dir.display(),
        client_auth = client_auth.is_some(),
        "broker ready"
    );
    run(listener, broker, client_auth, shutdown).await;
    tasks.shutdown().await;
    tracing::info!("broker stopped; storage flushed");
    Ok(())
}

fn open_engine(dir: &Path) -> Result<Arc<dyn crate::storage::Engine>> {
    Ok(Arc::new(SledEngine::open(dir)?))
}
