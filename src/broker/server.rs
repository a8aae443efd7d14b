//! The accept loop: a bound listener, a connection limit, and one shape of shutdown.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{session, Broker};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::home::Home;
use crate::storage::SledEngine;

/// Serves clients on `listener` until `shutdown` completes; then stops accepting, lets every
/// connection finish the requests it has in flight, and returns.
pub async fn run(listener: TcpListener, broker: Broker, shutdown: impl Future) {
    let limit = Arc::new(Semaphore::new(broker.config().broker.max_connections));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        // At the limit, wait for a connection to close before accepting another.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (broker, stop) = (broker.clone(), stop.clone());
                tracker.spawn(async move {
                    session::run(broker, stream, peer, stop).await;
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
    home.ensure()?;
    let dir = home.broker_dir(addr.port());
    let engine = open_engine(&dir)?;
    let mesh_config = config.clone();
    let (broker, tasks) = Broker::start(engine, config, addr, dir.clone())?;
    super::mesh::start(&broker, &mesh_config, addr, &tasks)?;
    tracing::info!(broker = %broker.id(), listen = %addr, data = %dir.display(), "broker ready");
    run(listener, broker, shutdown).await;
    tasks.shutdown().await;
    tracing::info!("broker stopped; storage flushed");
    Ok(())
}

fn open_engine(dir: &Path) -> Result<Arc<dyn crate::storage::Engine>> {
    Ok(Arc::new(SledEngine::open(dir)?))
}
