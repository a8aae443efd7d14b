//! What the transport tests share: accepting peer connections the way the broker does.

use futures::StreamExt;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use federation::driver::{self, Handle};
use federation::transport::{MemNetwork, PeerStream};
use federation::wire::{Hello, Role};

/// Reads the hello of an accepted connection and hands a peer's to the driver, as the broker's
/// session does.
pub async fn adopt<S: PeerStream>(handle: Handle, stream: S, remote: String) {
    let mut framed = Framed::new(stream, LengthDelimitedCodec::new());
    if let Some(Ok(frame)) = framed.next().await {
        if let Ok(h) = Hello::decode(&frame) {
            if h.role == Role::Peer {
                handle.accept_hello(driver::rebox(framed), remote, h).await;
            }
        }
    }
}

/// Accepts peer connections for `handle` until `cancel`: from `listener` when given (TCP),
/// else from the in-memory network at `addr`.
pub fn serve(
    tracker: &TaskTracker,
    mem: &MemNetwork,
    addr: &str,
    listener: Option<tokio::net::TcpListener>,
    handle: Handle,
    cancel: CancellationToken,
) {
    match listener {
        Some(l) => {
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        a = l.accept() => if let Ok((s, remote)) = a {
                            tokio::spawn(adopt(handle.clone(), s, remote.to_string()));
                        },
                        _ = cancel.cancelled() => return,
                    }
                }
            });
        }
        None => {
            let mut rx = mem.listen(addr);
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        a = rx.recv() => match a {
                            Some((s, remote)) => { tokio::spawn(adopt(handle.clone(), s, remote)); }
                            None => return,
                        },
                        _ = cancel.cancelled() => return,
                    }
                }
            });
        }
    }
}
