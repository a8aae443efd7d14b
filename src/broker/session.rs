//! One client connection: hello, then requests in, responses out.
//!
//! 1. Read the hello (bounded in time). A bad one gets an error frame and a close.
//! 2. Send the welcome.
//! 3. Read request frames in order; [`Broker::handle`] runs each one's synchronous part in
//!    arrival order, which is what keeps one sender's messages in order.
//! 4. Replies that wait (for a flush, or for a message) run as tasks, so a pipelining client
//!    keeps the flusher busy with many writes per flush; each writes its reply when ready.
//! 5. A writer task owns the socket's write half and batches replies into few syscalls.
//! 6. On close or shutdown, stop reading, let in-flight replies finish, then go.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use federation::wire::{self, Hello, Role};

use super::{Broker, Outcome, SessionCtx};
use crate::connection::{self, FRAME_OVERHEAD};
use crate::error::{ErrorKind, WireError};
use crate::protocol::{Request, Response, Welcome};

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Replies queued for the writer. Full: the reader stops reading until the client catches up,
/// which is the backpressure a client that never reads deserves.
const REPLY_QUEUE: usize = 1024;

/// Only the id of a request, for answering one whose body could not be decoded.
#[derive(serde::Deserialize)]
struct Header {
    id: u64,
}

pub(super) async fn run(
    broker: Broker,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let conn_id = broker.connection_opened();
    // Old claude-ipc-mcp clients send one JSON object per connection. Tell them, in their
    // own format, what they reached.
    let mut first = [0u8; 1];
    if let Ok(Ok(1)) = tokio::time::timeout(HELLO_TIMEOUT, stream.peek(&mut first)).await {
        if first[0] == b'{' {
            legacy_refusal(stream).await;
            return;
        }
    }
    let max_frame = broker.config().limits.max_message_bytes + FRAME_OVERHEAD;
    let mut framed = connection::framed(stream, max_frame);

    let hello = match tokio::time::timeout(HELLO_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(frame))) => Hello::decode(&frame).map_err(WireError::from),
        Ok(Some(Err(e))) if connection::is_oversized(&e) => Err(WireError::new(
            ErrorKind::Protocol,
            "bad hello: the first frame must be the 7-byte hello",
        )),
        Ok(Some(Err(_))) | Ok(None) => return,
        Err(_) => Err(WireError::new(ErrorKind::Protocol, "no hello within 10 s")),
    };
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "bad hello");
            let _ = framed
                .send(Bytes::from(wire::encode(&error_frame(0, e))))
                .await;
            return;
        }
    };
    if hello.role == Role::Peer {
        // Another broker: the mesh node takes the link from here (its own handshake).
        match broker.mesh_handle() {
            Some(mesh) => {
                mesh.accept_hello(federation::driver::rebox(framed), peer.to_string(), hello)
                    .await
            }
            None => {
                let e = WireError::new(ErrorKind::Unavailable, "this broker's mesh is not running");
                let _ = framed
                    .send(Bytes::from(wire::encode(&error_frame(0, e))))
                    .await;
            }
        }
        return;
    }
    let welcome = Welcome {
        broker_id: broker.id().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        max_frame_bytes: max_frame as u64,
    };
    if framed
        .send(Bytes::from(wire::encode(&welcome)))
        .await
        .is_err()
    {
        return;
    }

    let (mut sink, mut frames) = framed.split();
    let (tx, mut rx) = mpsc::channel::<Response>(REPLY_QUEUE);
    // Cancelled when replies can no longer be written: the connection is then closed, so the
    // client sees it end instead of waiting for answers that cannot come.
    let broken = CancellationToken::new();
    let writer_broken = broken.clone();
    let writer = tokio::spawn(async move {
        let result: std::io::Result<()> = async {
            while let Some(resp) = rx.recv().await {
                sink.feed(Bytes::from(wire::encode(&resp))).await?;
                while let Ok(resp) = rx.try_recv() {
                    sink.feed(Bytes::from(wire::encode(&resp))).await?;
                }
                sink.flush().await?;
            }
            sink.close().await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%peer, error = %e, "cannot write to a client; closing its connection");
            writer_broken.cancel();
        }
    });

    let mut ctx = SessionCtx {
        conn_id,
        agent: None,
    };
    let in_flight = TaskTracker::new();
    // Cancelled when this connection stops reading: pending waits return at once.
    let closing = stop.child_token();
    loop {
        let frame = tokio::select! {
            f = frames.next() => f,
            _ = stop.cancelled() => break,
            _ = broken.cancelled() => break,
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                if connection::is_oversized(&e) {
                    let msg = format!(
                        "frame over the {max_frame}-byte limit; the connection is closed (messages may be at most {} bytes)",
                        broker.config().limits.max_message_bytes
                    );
                    let _ = tx
                        .send(error_frame(0, WireError::new(ErrorKind::TooLarge, msg)))
                        .await;
                } else {
                    tracing::debug!(%peer, error = %e, "connection read failed");
                }
                break;
            }
            None => break,
        };
        let req: Request = match wire::decode(&frame) {
            Ok(r) => r,
            Err(e) => match wire::decode::<Header>(&frame) {
                Ok(h) => {
                    let msg = format!("unknown or malformed request: {e}");
                    if tx
                        .send(error_frame(h.id, WireError::invalid(msg)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
                Err(_) => {
                    let _ = tx
                        .send(error_frame(
                            0,
                            WireError::new(
                                ErrorKind::Protocol,
                                format!("undecodable frame, closing: {e}"),
                            ),
                        ))
                        .await;
                    break;
                }
            },
        };
        let id = req.id;
        match broker.handle(&mut ctx, req.body) {
            Outcome::Now(result) => {
                if tx.send(Response { id, result }).await.is_err() {
                    break;
                }
            }
            Outcome::AfterCommit { epoch, reply } => {
                let (commit, tx) = (broker.commit().clone(), tx.clone());
                in_flight.spawn(async move {
                    let result = commit.wait(epoch).await.map(|()| reply);
                    let _ = tx.send(Response { id, result }).await;
                });
            }
            Outcome::Wait {
                agent,
                notify,
                timeout,
                limit,
                mark_read,
            } => {
                let (broker, tx, closing) = (broker.clone(), tx.clone(), closing.clone());
                in_flight.spawn(async move {
                    let notified = notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if !broker.has_visible_unread(&agent) {
                        tokio::select! {
                            _ = notified => {}
                            _ = tokio::time::sleep(timeout) => {}
                            _ = closing.cancelled() => {}
                        }
                    }
                    let result = match broker.fetch(&agent, false, limit, mark_read) {
                        Outcome::Now(r) => r,
                        Outcome::AfterCommit { epoch, reply } => {
                            broker.commit().wait(epoch).await.map(|()| reply)
                        }
                        Outcome::Wait { .. } => Err(WireError::internal("fetch cannot wait")),
                    };
                    let _ = tx.send(Response { id, result }).await;
                });
            }
        }
    }
    closing.cancel();
    in_flight.close();
    in_flight.wait().await;
    drop(tx);
    let _ = writer.await;
    broker.connection_closed(&ctx);
}

fn error_frame(id: u64, e: WireError) -> Response {
    Response { id, result: Err(e) }
}

async fn legacy_refusal(mut stream: TcpStream) {
    let reply = serde_json::json!({
        "status": "error",
        "message": "this is an ipc-mesh broker; it does not speak the claude-ipc-mcp JSON protocol. \
                    Use `ipc-mesh mcp` or the ipc-mesh CLI (see docs/protocol.md)",
    });
    let _ = stream.write_all(reply.to_string().as_bytes()).await;
    let _ = stream.shutdown().await;
}
