//! One client connection: hello, then requests in, responses out.
//!
//! 1. Read the hello (bounded in time and size). A bad one gets an error frame and a close.
//! 2. Send the welcome. If the broker requires client authentication, it carries a nonce, and
//!    the client must answer with a good `Auth` within 10 s; until then every other request
//!    gets `Unauthorized` and nothing else, frames are limited to 4 KiB, and a wrong proof
//!    closes the connection (see [`crate::auth`]).
//! 3. Read request frames in order (a frame whose first bytes arrived must be whole within
//!    `frame_timeout`, else the connection closes); [`Broker::handle`] runs each one's synchronous part in
//!    arrival order, which is what keeps one sender's messages in order.
//! 4. Replies that wait for a flush go to the writer in order, which keeps them until a flush
//!    covers them, so a pipelining client keeps the flusher busy with many writes per flush
//!    and gets each flush's acknowledgements in one write. Waits for a message run as tasks.
//! 5. The writer task owns the socket's write half and batches replies into few syscalls.
//! 6. On close or shutdown, stop reading, let in-flight replies finish, then go.

use std::collections::VecDeque;
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
use crate::auth::{self, ClientSecret};
use crate::connection::{self, FramedStream, PartialFrame, FRAME_OVERHEAD};
use crate::error::{ErrorKind, WireError};
use crate::protocol::{Body, Reply, Request, Response, Welcome};

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to authenticate, once welcomed, when the broker requires it.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame accepted before the hello and, where required, authentication: nothing
/// said before then needs more, and an unauthenticated stranger gets no bigger buffer.
const PRE_AUTH_MAX_FRAME: usize = 4096;
/// Requests an unauthenticated connection may make (each refused) before it is closed.
const PRE_AUTH_REQUESTS: u32 = 16;
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
    client_auth: Option<std::sync::Arc<ClientSecret>>,
) {
    let _ = stream.set_nodelay(true);
    connection::keepalive(&stream);
    let conn_id = broker.connection_opened();
    // Old claude-ipc-mcp clients send one JSON object per connection. Tell them, in their
    // own format, what they reached.
    // One deadline for the whole hello, however it is dribbled.
    let hello_deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let mut first = [0u8; 1];
    if let Ok(Ok(1)) = tokio::time::timeout_at(hello_deadline, stream.peek(&mut first)).await {
        if first[0] == b'{' {
            legacy_refusal(stream).await;
            return;
        }
    }
    let max_frame = broker.config().limits.max_message_bytes + FRAME_OVERHEAD;
    let mut framed = connection::framed(stream, PRE_AUTH_MAX_FRAME);

    let hello = match tokio::time::timeout_at(hello_deadline, framed.next()).await {
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
        framed.codec_mut().set_max_in(max_frame);
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
    let nonce = client_auth.as_ref().map(|_| auth::new_nonce());
    let welcome = Welcome {
        broker_id: broker.id().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        max_frame_bytes: max_frame as u64,
        auth_nonce: nonce.clone(),
    };
    if framed
        .send(Bytes::from(wire::encode(&welcome)))
        .await
        .is_err()
    {
        return;
    }
    if let (Some(secret), Some(nonce)) = (&client_auth, &nonce) {
        if !authenticate(&mut framed, secret, nonce, peer, &stop).await {
            if !stop.is_cancelled() {
                broker.auth_failed();
            }
            return;
        }
    }
    framed.codec_mut().set_max_in(max_frame);
    let partial = framed.codec().partial();
    let frame_timeout = broker.config().limits.frame_timeout;

    let (sink, mut frames) = framed.split();
    let (tx, rx) = mpsc::channel::<Outbound>(REPLY_QUEUE);
    // Cancelled when replies can no longer be written: the connection is then closed, so the
    // client sees it end instead of waiting for answers that cannot come.
    let broken = CancellationToken::new();
    let writer = tokio::spawn(write_replies(
        sink,
        rx,
        broker.commit().clone(),
        broken.clone(),
        peer,
    ));

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
            _ = stalled(&partial, frame_timeout) => {
                tracing::info!(%peer, "closing a connection whose frame stalled half-sent");
                let msg = format!(
                    "a frame took longer than {} to arrive whole; the connection is closed",
                    humantime::format_duration(frame_timeout)
                );
                let _ = tx
                    .send(error_frame(0, WireError::new(ErrorKind::Protocol, msg)).into())
                    .await;
                break;
            }
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
                        .send(error_frame(0, WireError::new(ErrorKind::TooLarge, msg)).into())
                        .await;
                } else {
                    tracing::debug!(%peer, error = %e, "connection read failed");
                }
                break;
            }
            None => break,
        };
        if let Err(why) = connection::msgpack_depth_ok(&frame, connection::MAX_MSGPACK_DEPTH) {
            let _ = tx
                .send(
                    error_frame(
                        0,
                        WireError::new(ErrorKind::Protocol, format!("{why}; closing")),
                    )
                    .into(),
                )
                .await;
            break;
        }
        let req: Request = match wire::decode(&frame) {
            Ok(r) => r,
            Err(e) => match wire::decode::<Header>(&frame) {
                Ok(h) => {
                    let msg = format!("unknown or malformed request: {e}");
                    if tx
                        .send(error_frame(h.id, WireError::invalid(msg)).into())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
                Err(_) => {
                    let _ = tx
                        .send(
                            error_frame(
                                0,
                                WireError::new(
                                    ErrorKind::Protocol,
                                    format!("undecodable frame, closing: {e}"),
                                ),
                            )
                            .into(),
                        )
                        .await;
                    break;
                }
            },
        };
        let id = req.id;
        match broker.handle(&mut ctx, req.body) {
            Outcome::Now(result) => {
                if tx.send(Response { id, result }.into()).await.is_err() {
                    break;
                }
            }
            Outcome::AfterCommit { epoch, reply } => {
                // The writer holds it until the flush that covers `epoch`, with the others
                // that flush releases: one write for them all.
                if tx
                    .send(Outbound::AfterCommit { epoch, id, reply })
                    .await
                    .is_err()
                {
                    break;
                }
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
                    if !broker.has_unread(&agent) {
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
                    let _ = tx.send(Response { id, result }.into()).await;
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

/// The socket's write half, as the writer owns it.
type ReplySink = futures::stream::SplitSink<connection::FramedStream, Bytes>;

/// What the writer is given to send.
enum Outbound {
    /// A reply to send as soon as possible.
    Now(Response),
    /// A reply to send once every write up to `epoch` is durable.
    AfterCommit { epoch: u64, id: u64, reply: Reply },
}

impl From<Response> for Outbound {
    fn from(r: Response) -> Self {
        Outbound::Now(r)
    }
}

/// The writer: owns the socket's write half. Replies that wait for a flush queue here in
/// arrival order (their epochs only grow) and leave together when a flush covers them, so a
/// pipelining client gets each flush's acknowledgements in one write, not one write apiece.
/// Runs until the reader is gone and every queued reply is written.
async fn write_replies(
    mut sink: ReplySink,
    mut rx: mpsc::Receiver<Outbound>,
    commit: super::commit::Commit,
    broken: CancellationToken,
    peer: SocketAddr,
) {
    let mut durable = commit.subscribe();
    let mut waiting: VecDeque<(u64, u64, Reply)> = VecDeque::new();
    let result: std::io::Result<()> = async {
        let mut reading = true;
        while reading || !waiting.is_empty() {
            let mut ready = Vec::new();
            tokio::select! {
                out = rx.recv(), if reading => match out {
                    Some(out) => ready.push(out),
                    None => reading = false,
                },
                changed = durable.changed(), if !waiting.is_empty() => {
                    if changed.is_err() {
                        // The flusher is gone: nothing queued can become durable now.
                        for (_, id, _) in waiting.drain(..) {
                            let result = Err(super::commit::unavailable());
                            sink.feed(encode(&Response { id, result })).await?;
                        }
                        sink.flush().await?;
                        continue;
                    }
                }
            }
            while let Ok(out) = rx.try_recv() {
                ready.push(out);
            }
            let mut wrote = false;
            for out in ready {
                match out {
                    Outbound::Now(resp) => {
                        sink.feed(encode(&resp)).await?;
                        wrote = true;
                    }
                    Outbound::AfterCommit { epoch, id, reply } => {
                        waiting.push_back((epoch, id, reply));
                    }
                }
            }
            let d = *durable.borrow_and_update();
            while let Some((epoch, _, _)) = waiting.front() {
                let result = if *epoch <= d.epoch {
                    Ok(())
                } else if d.failed {
                    Err(super::commit::unavailable())
                } else {
                    commit.request();
                    break;
                };
                let (_, id, reply) = waiting.pop_front().expect("peeked");
                let result = result.map(|()| reply);
                sink.feed(encode(&Response { id, result })).await?;
                wrote = true;
            }
            if wrote {
                sink.flush().await?;
            }
        }
        sink.close().await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(%peer, error = %e, "cannot write to a client; closing its connection");
        broken.cancel();
    }
}

fn encode(resp: &Response) -> Bytes {
    Bytes::from(wire::encode(resp))
}

/// Completes when a frame has been partly received for `limit` (a slow or stuck sender);
/// never while the connection is merely quiet between frames.
async fn stalled(partial: &PartialFrame, limit: Duration) {
    loop {
        match partial.since() {
            Some(started) => {
                tokio::time::sleep_until((started + limit).into()).await;
                if partial.since() == Some(started) {
                    return;
                }
            }
            // Check again later: a frame may start arriving meanwhile, and is then cut at
            // most `limit` after its first byte (this wake-up comes before that).
            None => tokio::time::sleep(limit).await,
        }
    }
}

/// Runs the authentication exchange on a fresh connection: true once the client proved the
/// secret; false (after telling it why) if it did not, in time or at all.
async fn authenticate(
    framed: &mut FramedStream,
    secret: &ClientSecret,
    nonce: &str,
    peer: SocketAddr,
    stop: &CancellationToken,
) -> bool {
    let broker_nonce = auth::parse_nonce(nonce).expect("our own nonce is well formed");
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let unauthorized = |m: &str| WireError::new(ErrorKind::Unauthorized, m);
    let mut refused = 0u32;
    let (id, outcome) = loop {
        let frame = tokio::select! {
            f = tokio::time::timeout_at(deadline, framed.next()) => f,
            _ = stop.cancelled() => return false,
        };
        let frame = match frame {
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) if connection::is_oversized(&e) => {
                break (
                    0,
                    Err(unauthorized(&format!(
                        "frames before authentication may be at most {PRE_AUTH_MAX_FRAME} bytes; authenticate first"
                    ))),
                )
            }
            Ok(Some(Err(_))) | Ok(None) => return false,
            Err(_) => {
                break (
                    0,
                    Err(unauthorized(
                        "not authenticated within 10 s; this broker requires clients to prove the mesh secret",
                    )),
                )
            }
        };
        let decoded = connection::msgpack_depth_ok(&frame, connection::MAX_MSGPACK_DEPTH)
            .map_err(|e| e.to_string())
            .and_then(|()| wire::decode::<Request>(&frame).map_err(|e| e.to_string()));
        let req = match decoded {
            Ok(r) => r,
            Err(_) => {
                let id = connection::msgpack_depth_ok(&frame, connection::MAX_MSGPACK_DEPTH)
                    .ok()
                    .and_then(|()| wire::decode::<Header>(&frame).ok())
                    .map_or(0, |h| h.id);
                break (
                    id,
                    Err(unauthorized(
                        "undecodable request before authentication; authenticate first",
                    )),
                );
            }
        };
        match req.body {
            Body::Auth {
                client_nonce,
                proof,
            } => {
                let good = auth::parse_nonce(&client_nonce).and_then(|client_nonce| {
                    auth::verify_any(
                        secret,
                        auth::Side::Client,
                        &broker_nonce,
                        &client_nonce,
                        &proof,
                    )
                    .map(|matched| (client_nonce, matched))
                });
                match good {
                    Some((client_nonce, matched)) => {
                        // Answered with the secret the client used (during a rotation, maybe
                        // the previous one), so it can check the answer.
                        let proof =
                            auth::proof(&matched, auth::Side::Broker, &broker_nonce, &client_nonce);
                        let reply = Response {
                            id: req.id,
                            result: Ok(Reply::Authenticated { proof }),
                        };
                        return framed.send(Bytes::from(wire::encode(&reply))).await.is_ok();
                    }
                    None => {
                        tracing::warn!(%peer, "client authentication failed: wrong proof");
                        break (
                            req.id,
                            Err(unauthorized(
                                "authentication failed: the proof does not match this broker's mesh secret; check IPC_MESH_SECRET or [mesh] secret_file",
                            )),
                        );
                    }
                }
            }
            _ => {
                refused += 1;
                let e = unauthorized(
                    "this broker requires clients to prove the mesh secret before any request; set IPC_MESH_SECRET or [mesh] secret_file to the mesh's secret",
                );
                if refused >= PRE_AUTH_REQUESTS {
                    break (req.id, Err(e));
                }
                let reply = Bytes::from(wire::encode(&error_frame(req.id, e)));
                if !matches!(
                    tokio::time::timeout_at(deadline, framed.send(reply)).await,
                    Ok(Ok(()))
                ) {
                    return false;
                }
            }
        }
    };
    let reply = Response {
        id,
        result: outcome,
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        framed.send(Bytes::from(wire::encode(&reply))),
    )
    .await;
    false
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
