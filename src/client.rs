//! The client library: what the CLI, the MCP server and the bench use to talk to a broker.
//!
//! [`Connection`] is one TCP connection: hello, welcome, then pipelined requests. Any number
//! of tasks may call it at once; each call gets its own request id, and a reader task hands
//! every response to the call waiting for that id.
//!
//! [`Client`] acts for one agent on top of that: it registers with the stored token (or
//! claims the name and stores the new token), and when the connection drops it reconnects
//! with backoff, registers again, and retries the request if retrying cannot duplicate it.
//!
//! A broker that requires client authentication says so in its welcome; the connection then
//! proves the mesh secret (see [`crate::auth`]) before anything else, and checks the broker's
//! proof in return. The secret comes from [`set_default_secret`] (the CLI and the MCP server
//! set it from the config) or `IPC_MESH_SECRET`, or is passed to [`Connection::connect_with`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use federation::wire::{self, Hello, Role};
use federation::AgentName;

use crate::auth::{self, ClientSecret};
use crate::connection::{self, CLIENT_MAX_FRAME};
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::home::Home;
use crate::protocol::{Body, MessageView, Outgoing, Reply, Request, Response, StatusView, Welcome};

/// How long to wait for a broker to accept a connection and answer the hello.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Requests queued for the writer of one connection; full, callers wait.
const REQUEST_QUEUE: usize = 1024;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, WireError>>>>>;

/// The secret connections use by default: set once by the program (from its config), or
/// failing that `IPC_MESH_SECRET`. An error is kept to explain a refusal later.
static DEFAULT_SECRET: OnceLock<Result<Option<ClientSecret>, String>> = OnceLock::new();

/// Sets the secret [`Connection::connect`] proves to brokers that ask; `Err` says why none
/// could be loaded (shown if a broker then requires one). Only the first call counts.
pub fn set_default_secret(secret: Result<Option<ClientSecret>, String>) {
    let _ = DEFAULT_SECRET.set(secret);
}

/// The default secret (see [`set_default_secret`]).
pub fn default_secret() -> Result<Option<ClientSecret>, String> {
    DEFAULT_SECRET
        .get_or_init(|| {
            crate::config::load_client_secret(&crate::config::Config::default().mesh)
                .map_err(|e| e.to_string())
        })
        .clone()
}

/// One pipelined connection to a broker. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    tx: mpsc::Sender<Request>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    closed: CancellationToken,
    welcome: Arc<Welcome>,
    addr: String,
}

impl Connection {
    /// Connects, says hello, reads the welcome, and authenticates with the default secret if
    /// the broker asks (see [`set_default_secret`]).
    pub async fn connect(addr: &str) -> Result<Connection> {
        Self::connect_with(addr, default_secret()).await
    }

    /// Like [`connect`](Connection::connect), proving `secret` if the broker asks.
    pub async fn connect_with(
        addr: &str,
        secret: Result<Option<ClientSecret>, String>,
    ) -> Result<Connection> {
        let unreachable = |reason: String| Error::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        connection::keepalive(&stream);
        let remote = stream
            .peer_addr()
            .map(|a| !a.ip().is_loopback())
            .unwrap_or(true);
        let mut framed = connection::framed(stream, CLIENT_MAX_FRAME);
        framed
            .send(Bytes::copy_from_slice(&Hello::new(Role::Client).encode()))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let first = tokio::time::timeout(CONNECT_TIMEOUT, framed.next())
            .await
            .map_err(|_| unreachable("no welcome from the broker".into()))?
            .ok_or_else(|| unreachable("closed before the welcome".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        connection::msgpack_depth_ok(&first, connection::MAX_MSGPACK_DEPTH)
            .map_err(|e| unreachable(format!("not an ipc-mesh broker: {e}")))?;
        let welcome: Welcome = match wire::decode(&first) {
            Ok(w) => w,
            Err(_) => {
                // Not a welcome: the broker refused us with an error frame.
                let resp: Response = wire::decode(&first).map_err(|e| {
                    unreachable(format!("not an ipc-mesh broker (bad welcome: {e})"))
                })?;
                return Err(match resp.result {
                    Err(e) => Error::Remote(e),
                    Ok(_) => unreachable("unexpected first frame".into()),
                });
            }
        };
        // Request ids start after the one authentication may use.
        let mut next_id = 1;
        match (&welcome.auth_nonce, secret) {
            (Some(nonce), Ok(Some(secret))) => {
                authenticate(&mut framed, &secret, nonce)
                    .await
                    .map_err(|e| match e {
                        Error::Remote(_) => e,
                        other => unreachable(format!("authentication failed: {other}")),
                    })?;
                next_id = 2;
            }
            (Some(_), secret) => {
                let why = match secret {
                    Err(e) => format!(" (the configured secret could not be loaded: {e})"),
                    Ok(_) => String::new(),
                };
                return Err(Error::Remote(WireError::new(
                    ErrorKind::Unauthorized,
                    format!(
                        "the broker at {addr} requires clients to prove the mesh secret; set IPC_MESH_SECRET or [mesh] secret_file{why}"
                    ),
                )));
            }
            (None, Ok(Some(_))) if remote => {
                // Every broker beyond loopback requires authentication; one that does not
                // cannot prove it holds the secret, so it may not be the mesh's broker.
                return Err(unreachable(
                    "the broker did not ask this client to authenticate, though it is beyond loopback; it cannot prove it belongs to the mesh, so it is not trusted".into(),
                ));
            }
            (None, _) => {}
        }

        let (mut sink, mut frames) = framed.split();
        let (tx, mut rx) = mpsc::channel::<Request>(REQUEST_QUEUE);
        let pending: Pending = Arc::default();
        let closed = CancellationToken::new();

        let writer_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    r = rx.recv() => r,
                    _ = writer_closed.cancelled() => None,
                };
                let Some(req) = req else { break };
                let mut ok = sink.feed(Bytes::from(wire::encode(&req))).await.is_ok();
                while ok {
                    match rx.try_recv() {
                        Ok(req) => ok = sink.feed(Bytes::from(wire::encode(&req))).await.is_ok(),
                        Err(_) => break,
                    }
                }
                if !ok || sink.flush().await.is_err() {
                    break;
                }
            }
            writer_closed.cancel();
        });

        let reader_pending = pending.clone();
        let reader_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = frames.next() => f,
                    _ = reader_closed.cancelled() => None,
                };
                let Some(Ok(frame)) = frame else { break };
                // A hostile "broker" must not crash the client with deep nesting either.
                let shallow =
                    connection::msgpack_depth_ok(&frame, connection::MAX_MSGPACK_DEPTH).is_ok();
                let Some(resp) = shallow
                    .then(|| wire::decode::<Response>(&frame).ok())
                    .flatten()
                else {
                    tracing::warn!("undecodable response from broker; closing");
                    break;
                };
                if resp.id == 0 {
                    // An error about the connection itself: it is about to close.
                    if let Err(e) = &resp.result {
                        tracing::warn!(error = %e, "broker closed the connection");
                    }
                    continue;
                }
                let waiter = reader_pending.lock().unwrap().remove(&resp.id);
                if let Some(w) = waiter {
                    let _ = w.send(resp.result);
                }
            }
            reader_closed.cancel();
            // Dropping the senders tells every waiting call the connection is gone.
            reader_pending.lock().unwrap().clear();
        });

        Ok(Connection {
            tx,
            pending,
            next_id: Arc::new(AtomicU64::new(next_id)),
            closed,
            welcome: Arc::new(welcome),
            addr: addr.to_string(),
        })
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Completes when the connection is gone (the broker closed it, died, or [`close`] was
    /// called), so a supervisor can react at once instead of polling [`is_closed`].
    ///
    /// [`close`]: Connection::close
    /// [`is_closed`]: Connection::is_closed
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Sends one request and waits for its response.
    pub async fn call(&self, body: Body) -> Result<Reply> {
        self.submit(body).await?.await
    }

    /// Queues one request and returns a future for its response. Requests go out in the order
    /// `submit` calls complete, so a caller that awaits each `submit` before the next keeps
    /// its requests in order while their responses are still outstanding (pipelining).
    pub async fn submit(
        &self,
        body: Body,
    ) -> Result<impl std::future::Future<Output = Result<Reply>> + Send + 'static> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (otx, orx) = oneshot::channel();
        if self.closed.is_cancelled() {
            return Err(Error::Disconnected);
        }
        self.pending.lock().unwrap().insert(id, otx);
        if self.tx.send(Request { id, body }).await.is_err() {
            self.pending.lock().unwrap().remove(&id);
            return Err(Error::Disconnected);
        }
        Ok(async move {
            match orx.await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(e)) => Err(Error::Remote(e)),
                Err(_) => Err(Error::Disconnected),
            }
        })
    }

    /// Closes the connection; calls in flight fail with [`Error::Disconnected`].
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// Proves `secret` to the broker whose welcome carried `nonce`, and checks its proof back.
async fn authenticate(
    framed: &mut connection::FramedStream,
    secret: &ClientSecret,
    nonce: &str,
) -> Result<()> {
    let bad = |m: &str| Error::Remote(WireError::new(ErrorKind::Unauthorized, m));
    let broker_nonce =
        auth::parse_nonce(nonce).ok_or_else(|| bad("the broker sent a malformed nonce"))?;
    let client_nonce = rand::random::<[u8; auth::NONCE_LEN]>();
    let req = Request {
        id: 1,
        body: Body::Auth {
            client_nonce: hex::encode(client_nonce),
            proof: auth::proof(secret, auth::Side::Client, &broker_nonce, &client_nonce),
        },
    };
    framed.send(Bytes::from(wire::encode(&req))).await?;
    let frame = tokio::time::timeout(CONNECT_TIMEOUT, framed.next())
        .await
        .map_err(|_| Error::Timeout(CONNECT_TIMEOUT))?
        .ok_or(Error::Disconnected)??;
    connection::msgpack_depth_ok(&frame, connection::MAX_MSGPACK_DEPTH)
        .map_err(|e| bad(&format!("undecodable answer to auth: {e}")))?;
    let resp: Response = wire::decode(&frame)?;
    match resp.result {
        Ok(Reply::Authenticated { proof })
            if auth::verify(
                secret,
                auth::Side::Broker,
                &broker_nonce,
                &client_nonce,
                &proof,
            ) =>
        {
            Ok(())
        }
        Ok(Reply::Authenticated { .. }) => Err(bad(
            "the broker's proof does not match the mesh secret: it is not the mesh's broker, or its secret differs",
        )),
        Ok(other) => Err(bad(&format!("unexpected answer to auth: {other:?}"))),
        Err(e) => Err(Error::Remote(e)),
    }
}

/// Whether resending `body` after a lost connection is safe: it cannot deliver or mark
/// anything twice.
pub fn retry_safe(body: &Body) -> bool {
    match body {
        Body::Ping
        | Body::Auth { .. }
        | Body::Register { .. }
        | Body::List
        | Body::Status
        | Body::Ack { .. } => true,
        Body::Fetch { mark_read, .. } | Body::Wait { mark_read, .. } => !mark_read,
        // A send with a dedup key is answered once, however often it arrives.
        Body::Send(out) => out.dedup_key.is_some(),
        Body::Broadcast { .. } | Body::Rename { .. } => false,
    }
}

/// The brokers a client may attach to, nearest first.
///
/// Local brokers (this host: the configured address and the sibling ports) come before remote
/// ones (the mesh config's peers), whatever their round trips; within each group the lowest
/// measured round trip wins.
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    pub local: Vec<String>,
    pub remote: Vec<String>,
}

/// How long a candidate may take to answer a ping before it is passed over.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

impl Candidates {
    /// The configured broker and its siblings on this host, then the configured peers.
    pub fn from_config(config: &crate::config::Config) -> Candidates {
        let listen = config.broker.listen;
        let ip = if listen.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            listen.ip()
        };
        let mut local = vec![std::net::SocketAddr::new(ip, listen.port()).to_string()];
        let (lo, hi) = config.mesh.sibling_ports;
        for port in lo..=hi {
            let a = std::net::SocketAddr::new(ip, port).to_string();
            if !local.contains(&a) {
                local.push(a);
            }
        }
        Candidates {
            local,
            remote: config.mesh.peers.clone(),
        }
    }

    pub fn all(&self) -> Vec<String> {
        self.local
            .iter()
            .chain(self.remote.iter())
            .cloned()
            .collect()
    }

    /// Pings every candidate at once; returns those that answered, nearest first.
    pub async fn rank(&self) -> Vec<(String, Duration)> {
        async fn probe(addr: String) -> Option<(String, Duration)> {
            let start = tokio::time::Instant::now();
            let r = tokio::time::timeout(PROBE_TIMEOUT, async {
                let c = Connection::connect(&addr).await.ok()?;
                let r = c.call(Body::Ping).await.ok();
                c.close();
                r
            })
            .await;
            matches!(r, Ok(Some(Reply::Pong { .. }))).then(|| (addr, start.elapsed()))
        }
        let local = futures::future::join_all(self.local.iter().cloned().map(probe));
        let remote = futures::future::join_all(self.remote.iter().cloned().map(probe));
        let (local, remote) = futures::join!(local, remote);
        let mut out = Vec::new();
        for mut group in [local, remote] {
            group.sort_by_key(|r| r.as_ref().map(|(_, d)| *d));
            out.extend(group.into_iter().flatten());
        }
        out
    }
}

/// How a [`Client`] reconnects.
#[derive(Clone, Debug)]
pub struct Reconnect {
    /// Give up after this long without a connection.
    pub give_up_after: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            give_up_after: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// An agent's session with a broker.
pub struct Client {
    /// Where to reconnect, best first; the current broker is one of them.
    candidates: Vec<String>,
    conn: Connection,
    agent: Option<(AgentName, String)>,
    home: Option<Home>,
    reconnect: Reconnect,
}

impl Client {
    /// Connects to `addr` with no agent yet.
    pub async fn connect(addr: &str) -> Result<Client> {
        Ok(Client {
            candidates: vec![addr.to_string()],
            conn: Connection::connect(addr).await?,
            agent: None,
            home: None,
            reconnect: Reconnect::default(),
        })
    }

    /// Connects to the nearest broker of `candidates` (see [`Candidates::rank`]); when it
    /// dies, the client moves to the next one that answers.
    pub async fn connect_nearest(candidates: &Candidates) -> Result<Client> {
        let ranked = candidates.rank().await;
        let Some((first, _)) = ranked.first() else {
            // A broker that refused us (it wants a secret we lack, or it is full) does not
            // rank; its reason beats "no broker answered".
            for addr in &candidates.local {
                if let Err(e @ Error::Remote(_)) = Connection::connect(addr).await {
                    return Err(e);
                }
            }
            return Err(Error::Unreachable {
                addr: candidates.all().join(", "),
                reason: "no broker answered; start one with `ipc-mesh broker`".into(),
            });
        };
        let conn = Connection::connect(first).await?;
        let mut order: Vec<String> = ranked.into_iter().map(|(a, _)| a).collect();
        for a in candidates.all() {
            if !order.contains(&a) {
                order.push(a);
            }
        }
        Ok(Client {
            candidates: order,
            conn,
            agent: None,
            home: None,
            reconnect: Reconnect::default(),
        })
    }

    pub fn with_reconnect(mut self, r: Reconnect) -> Self {
        self.reconnect = r;
        self
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn agent(&self) -> Option<&AgentName> {
        self.agent.as_ref().map(|(n, _)| n)
    }

    /// Registers as `name`: with the token stored in `home` if there is one, else claiming the
    /// name and storing the token the broker issues.
    pub async fn register_as(&mut self, name: &AgentName, home: &Home) -> Result<Reply> {
        let token = home.load_token(name)?;
        let reply = self
            .conn
            .call(Body::Register {
                name: name.to_string(),
                token: token.clone(),
            })
            .await?;
        if let Reply::Registered { token: issued, .. } = &reply {
            if token.as_deref() != Some(issued.as_str()) {
                home.store_token(name, issued)?;
            }
            self.agent = Some((name.clone(), issued.clone()));
        }
        self.home = Some(home.clone());
        Ok(reply)
    }

    /// Registers with an explicit token (or none), without touching any token file.
    pub async fn register(&mut self, name: &AgentName, token: Option<String>) -> Result<Reply> {
        let reply = self
            .conn
            .call(Body::Register {
                name: name.to_string(),
                token,
            })
            .await?;
        if let Reply::Registered { token, .. } = &reply {
            self.agent = Some((name.clone(), token.clone()));
        }
        Ok(reply)
    }

    /// One request, reconnecting (and re-registering) first if the connection is gone, and
    /// retrying once more if the request is safe to repeat.
    pub async fn call(&mut self, body: Body) -> Result<Reply> {
        if self.conn.is_closed() {
            self.reestablish().await?;
        }
        match self.conn.call(body.clone()).await {
            Err(Error::Disconnected) if retry_safe(&body) => {
                self.reestablish().await?;
                self.conn.call(body).await
            }
            other => other,
        }
    }

    /// Reconnects with jittered exponential backoff, then registers again as the same agent.
    async fn reestablish(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.reconnect.give_up_after;
        let mut backoff = self.reconnect.initial_backoff;
        loop {
            // The broker we had first (it may be back), then the others in order.
            let mut last_err = None;
            for addr in self.candidates.clone() {
                match Connection::connect(&addr).await {
                    Ok(conn) => {
                        self.conn = conn;
                        if let Some((name, token)) = self.agent.clone() {
                            self.conn
                                .call(Body::Register {
                                    name: name.to_string(),
                                    token: Some(token),
                                })
                                .await?;
                        }
                        // Prefer this one next time too.
                        self.candidates.retain(|a| *a != addr);
                        self.candidates.insert(0, addr);
                        return Ok(());
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            let e = last_err.unwrap_or(Error::Disconnected);
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(e);
            }
            let jitter = rand::random_range(0.5..1.5);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(self.reconnect.max_backoff);
        }
    }

    /// Sends a direct message. Unless the caller set one, a fresh dedup key is attached, so
    /// the send is retried safely if the connection drops with it in flight.
    pub async fn send(&mut self, mut out: Outgoing) -> Result<Reply> {
        if out.dedup_key.is_none() {
            out.dedup_key = Some(hex::encode(rand::random::<[u8; 16]>()));
        }
        self.call(Body::Send(out)).await
    }

    pub async fn broadcast(&mut self, content: &str, data: Option<String>) -> Result<Reply> {
        self.call(Body::Broadcast {
            content: content.to_string(),
            data,
        })
        .await
    }

    /// Unread messages, without marking them read.
    pub async fn fetch(
        &mut self,
        include_read: bool,
        limit: u32,
    ) -> Result<(Vec<MessageView>, u64)> {
        messages(
            self.call(Body::Fetch {
                include_read,
                limit,
                mark_read: false,
            })
            .await?,
        )
    }

    /// Waits up to `timeout` for an unread message; returns the unread ones (not marked read).
    pub async fn wait(&mut self, timeout: Duration, limit: u32) -> Result<(Vec<MessageView>, u64)> {
        messages(
            self.call(Body::Wait {
                timeout_ms: timeout.as_millis() as u64,
                limit,
                mark_read: false,
            })
            .await?,
        )
    }

    /// Marks messages read; returns the unread count after.
    pub async fn ack(&mut self, ids: Vec<String>) -> Result<u64> {
        match self.call(Body::Ack { ids }).await? {
            Reply::Acked { unread, .. } => Ok(unread),
            other => Err(unexpected(other)),
        }
    }

    /// Fetches (or waits for) unread messages, then marks exactly those read: a message shown
    /// is never lost, and one not acknowledged comes back next time.
    pub async fn check(
        &mut self,
        wait: Option<Duration>,
        limit: u32,
    ) -> Result<(Vec<MessageView>, u64)> {
        let (msgs, unread) = match wait {
            Some(t) => self.wait(t, limit).await?,
            None => self.fetch(false, limit).await?,
        };
        let ids: Vec<String> = msgs
            .iter()
            .filter(|m| !m.read)
            .map(|m| m.id.clone())
            .collect();
        if ids.is_empty() {
            return Ok((msgs, unread));
        }
        let unread = self.ack(ids).await?;
        Ok((msgs, unread))
    }

    pub async fn rename(&mut self, new_name: &AgentName) -> Result<Reply> {
        let reply = self
            .call(Body::Rename {
                new_name: new_name.to_string(),
            })
            .await?;
        if let (Some((old, token)), Reply::Renamed { .. }) = (self.agent.clone(), &reply) {
            if let Some(home) = &self.home {
                home.store_token(new_name, &token)?;
                home.remove_token(&old)?;
            }
            self.agent = Some((new_name.clone(), token));
        }
        Ok(reply)
    }

    pub async fn status(&mut self) -> Result<StatusView> {
        match self.call(Body::Status).await? {
            Reply::Status(s) => Ok(*s),
            other => Err(unexpected(other)),
        }
    }
}

fn messages(reply: Reply) -> Result<(Vec<MessageView>, u64)> {
    match reply {
        Reply::Messages { messages, unread } => Ok((messages, unread)),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: Reply) -> Error {
    Error::Remote(WireError::new(
        ErrorKind::Internal,
        format!("unexpected reply from the broker: {reply:?}"),
    ))
}
