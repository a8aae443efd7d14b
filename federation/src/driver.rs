//! The thin tokio loop that runs a [`Node`] over a real transport.
//!
//! 1. One task owns the node. It wakes on a tick (every 50 ms), on a command from the broker
//!    (a peer connection to adopt, an agent change, a status query), or on an event from a
//!    connection task.
//! 2. It feeds the node and carries out what the node returns: dials run as tasks that report
//!    back `Connected`/`DialFailed`; each connection has a reader task (frames in → events)
//!    and a writer task (a bounded queue of frames out).
//! 3. Notices for the broker (peers up and down, names lost, refusals) go out on a channel.
//! 4. Below the peer protocol sits the link layer ([`crate::link`], [`crate::noise`]): a dial
//!    asks for encryption in its hello when the policy says so and runs the Noise handshake
//!    before the node sees the link; an accepted hello is admitted or refused by the policy
//!    (no downgrade), and an encrypted one runs the handshake in a task of its own. Every
//!    frame read is charged to the link's inbound limit; over it, the reader waits.
//!
//! A connection whose outgoing queue is full (a peer that stopped reading) is closed rather
//! than buffered without bound; the node sees it as closed and the link is redialled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::MeshStore;
use crate::link::{LinkConfig, LinkCounters, LinkStats, Throttle};
use crate::node::{Action, ConnId, Event, Node, NodeStats, PeerStatus};
use crate::noise::{self, Cipher, Opener, Sealer};
use crate::proto::PeerMsg;
use crate::registry::{AgentEntry, Superseded};
use crate::transport::{BoxStream, Dialer};
use crate::wire::{self, Hello, Role};
use crate::BrokerId;

/// The largest peer frame: a registry delta of a busy broker fits comfortably.
pub const MAX_PEER_FRAME: usize = 16 * 1024 * 1024;
/// Frames queued for one peer before the link is considered stuck and closed.
const SEND_QUEUE: usize = 4096;
/// Commands and connection events queued for the node task; senders wait when full.
const NODE_QUEUE: usize = 4096;
/// Refusals kept for `status`, newest last; older ones are forgotten (they are in the log).
const REFUSALS_KEPT: usize = 16;
const TICK: Duration = Duration::from_millis(50);

pub type PeerFramed = Framed<BoxStream, LengthDelimitedCodec>;

/// What the driver tells the broker.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    PeerUp { id: BrokerId, addr: String },
    PeerDown { id: BrokerId, reason: String },
    Superseded(Superseded),
    Refused { addr: String, reason: String },
}

/// A consistent view of the node, for `status`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub id: BrokerId,
    pub peers: Vec<PeerStatus>,
    pub agents: Vec<AgentEntry>,
    pub stats: NodeStats,
    /// The link of each peer that is up: encrypted or not, inbound counters, throttling.
    pub links: Vec<(BrokerId, LinkStats)>,
    /// The latest refusals, oldest first.
    pub refusals: Vec<Refusal>,
}

/// A refused link, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub addr: String,
    pub reason: String,
    pub at_ms: u64,
}

/// State the driver task and the handle share, for `status`.
#[derive(Default)]
struct Shared {
    links: Mutex<HashMap<ConnId, Arc<LinkCounters>>>,
    refusals: Mutex<std::collections::VecDeque<Refusal>>,
}

/// A connection ready for the node: past its hello and, if encrypted, its Noise handshake.
struct Ready {
    framed: PeerFramed,
    cipher: Option<Cipher>,
    /// The dialed address, or the remote socket address of an accepted link.
    addr: String,
}

enum Command {
    Accept(PeerFramed, String, Hello),
    AddSeed(String),
    /// Actions from a step the broker took itself (an agent change).
    Execute(Vec<Action>),
    /// The store wrote to an outbox or made writes durable: look again.
    StoreChanged,
}

enum Internal {
    Event(Event),
    /// A dial connected and said its hello: the node task adopts it.
    Dialed(Ready),
    /// An accepted connection passed the link layer: the node task adopts it.
    Accepted(Ready),
}

/// The broker's handle on its running node. Cheap to clone.
///
/// The node sits behind a std mutex: the driver task and the broker's request handlers both
/// step it, each for microseconds, never across an await. What a step returns is carried out
/// by the driver task.
#[derive(Clone)]
pub struct Handle {
    node: Arc<Mutex<Node>>,
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Handle {
    /// Adopts a connection whose plaintext peer hello the broker has already read.
    pub async fn accept(&self, framed: PeerFramed, remote: String) {
        self.accept_hello(framed, remote, Hello::new(Role::Peer))
            .await
    }

    /// Adopts a connection whose peer `hello` the broker has already read: the link policy
    /// admits or refuses it, and an encrypted one does its handshake first.
    pub async fn accept_hello(&self, framed: PeerFramed, remote: String, hello: Hello) {
        let _ = self.tx.send(Command::Accept(framed, remote, hello)).await;
    }

    /// Tells the node one of this broker's agents changed. If the driver's queue is full the
    /// push to peers is skipped; the change is in the registry and the next gossip round
    /// (a digest every second) carries it.
    pub fn local(&self, event: Event) {
        let actions = self.lock().step(now_ms(), event);
        if !actions.is_empty() && self.tx.try_send(Command::Execute(actions)).is_err() {
            tracing::warn!(
                "mesh driver busy; the registry change will spread with the next gossip round"
            );
        }
    }

    /// Tells the node the store changed (an envelope queued, a flush done). Dropped when the
    /// driver is busy: it looks at the store on every tick anyway.
    pub fn store_changed(&self) {
        let _ = self.tx.try_send(Command::StoreChanged);
    }

    pub async fn add_seed(&self, addr: String) {
        let _ = self.tx.send(Command::AddSeed(addr)).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let n = self.lock();
        let conns = self.shared.links.lock().unwrap_or_else(|p| p.into_inner());
        let links = n
            .up_peers()
            .into_iter()
            .filter_map(|id| {
                let c = conns.get(&n.link_of(id)?)?;
                Some((id, c.stats()))
            })
            .collect();
        drop(conns);
        Snapshot {
            id: n.id(),
            peers: n.peer_status(now_ms()),
            agents: n.registry().agents().into_iter().cloned().collect(),
            stats: n.stats().clone(),
            links,
            refusals: self
                .shared
                .refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }

    /// The registry entry that holds `name` now.
    pub fn lookup(&self, name: &str) -> Option<AgentEntry> {
        self.lock().registry().lookup(name).cloned()
    }

    /// The highest incarnation `name` has had anywhere this broker has heard of.
    pub fn max_incarnation(&self, name: &str) -> u64 {
        self.lock().registry().max_incarnation(name)
    }

    /// Every broker the node has heard of.
    pub fn known_brokers(&self) -> Vec<BrokerId> {
        self.lock().known_brokers()
    }

    /// Every agent of the mesh (the winning entry of each name).
    pub fn agents(&self) -> Vec<AgentEntry> {
        self.lock()
            .registry()
            .agents()
            .into_iter()
            .cloned()
            .collect()
    }

    /// Runs `f` on the node (for tests and status details).
    pub fn with_node<T>(&self, f: impl FnOnce(&Node) -> T) -> T {
        f(&self.lock())
    }
}

/// Wall-clock milliseconds: the node's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Turns a framed connection over any stream into one over a boxed stream, keeping whatever
/// was already read past the hello.
pub fn rebox<S: crate::transport::PeerStream, C>(framed: Framed<S, C>) -> PeerFramed {
    let parts = framed.into_parts();
    let mut p = FramedParts::new::<Bytes>(Box::new(parts.io) as BoxStream, peer_codec());
    p.read_buf = parts.read_buf;
    p.write_buf = parts.write_buf;
    Framed::from_parts(p)
}

fn peer_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_PEER_FRAME)
        .new_codec()
}

/// The same codec with another frame limit, keeping what was already read.
fn recodec(framed: PeerFramed, max: usize) -> PeerFramed {
    let parts = framed.into_parts();
    let codec = LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(max)
        .new_codec();
    let mut p = FramedParts::new::<Bytes>(parts.io, codec);
    p.read_buf = parts.read_buf;
    p.write_buf = parts.write_buf;
    Framed::from_parts(p)
}

/// Starts the node task over plaintext links without limits. It stops when `cancel` fires;
/// wait on `tracker` for it and its connection tasks.
pub fn spawn(
    node: Node,
    dialer: Arc<dyn Dialer>,
    store: Arc<dyn MeshStore>,
    notices: mpsc::Sender<Notice>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Handle {
    spawn_with(
        node,
        dialer,
        store,
        notices,
        cancel,
        tracker,
        LinkConfig::plain(),
    )
}

/// Starts the node task with the link layer configured by `links` (encryption, limits).
pub fn spawn_with(
    node: Node,
    dialer: Arc<dyn Dialer>,
    store: Arc<dyn MeshStore>,
    notices: mpsc::Sender<Notice>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
    links: LinkConfig,
) -> Handle {
    let (tx, rx) = mpsc::channel(NODE_QUEUE);
    let (itx, irx) = mpsc::channel(NODE_QUEUE);
    let node = Arc::new(Mutex::new(node));
    let shared = Arc::new(Shared::default());
    let driver = Driver {
        links: Arc::new(links),
        shared: shared.clone(),
        node: node.clone(),
        dialer,
        store,
        notices,
        conns: HashMap::new(),
        next_conn: AtomicU64::new(1),
        internal: itx,
        cancel: cancel.clone(),
        tracker: tracker.clone(),
    };
    tracker.spawn(driver.run(rx, irx));
    Handle { node, tx, shared }
}

struct Driver {
    links: Arc<LinkConfig>,
    shared: Arc<Shared>,
    node: Arc<Mutex<Node>>,
    dialer: Arc<dyn Dialer>,
    store: Arc<dyn MeshStore>,
    notices: mpsc::Sender<Notice>,
    conns: HashMap<ConnId, Conn>,
    next_conn: AtomicU64,
    internal: mpsc::Sender<Internal>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

struct Conn {
    tx: mpsc::Sender<Bytes>,
    stop: CancellationToken,
}

impl Driver {
    fn lock(&self) -> std::sync::MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(&self, ev: Event) -> Vec<Action> {
        self.lock().step(now_ms(), ev)
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let actions = tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tick.tick() => {
                    let mut a = self.store_events();
                    a.extend(self.lock().tick(now_ms()));
                    a
                }
                Some(msg) = internal.recv() => match msg {
                    Internal::Event(ev) => {
                        if let Event::Closed { conn } = ev {
                            self.forget_counters(conn);
                        }
                        self.step(ev)
                    }
                    Internal::Dialed(ready) => {
                        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        let addr = ready.addr.clone();
                        self.start_conn(conn, ready, true);
                        self.step(Event::Connected { conn, addr })
                    }
                    Internal::Accepted(ready) => {
                        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        let remote = ready.addr.clone();
                        self.start_conn(conn, ready, false);
                        self.step(Event::Accepted { conn, remote })
                    }
                },
                cmd = commands.recv() => match cmd {
                    None => break,
                    Some(Command::Accept(framed, remote, hello)) => {
                        self.accept(framed, remote, hello);
                        Vec::new()
                    }
                    Some(Command::AddSeed(a)) => {
                        self.lock().add_seed(&a);
                        Vec::new()
                    }
                    Some(Command::Execute(actions)) => actions,
                    Some(Command::StoreChanged) => self.store_events(),
                },
            };
            self.execute(actions).await;
        }
        for (_, c) in self.conns.drain() {
            c.stop.cancel();
        }
    }

    /// What the store says now: outbox depths and durability.
    fn store_events(&self) -> Vec<Action> {
        let depths = self.store.outbox_depths();
        let durable = self.store.durable();
        let mut a = self.step(Event::Outbox { depths });
        a.extend(self.step(Event::Durable { epoch: durable }));
        a
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::ReadOutbox {
                    dest,
                    conn,
                    after,
                    limit,
                } => {
                    let entries = self.store.outbox(dest, after, limit);
                    queue.extend(self.step(Event::OutboxRead {
                        dest,
                        conn,
                        entries,
                    }));
                }
                Action::Accept {
                    conn,
                    dest,
                    upto,
                    entries,
                } => {
                    let epoch = self.store.accept(entries);
                    queue.extend(self.step(Event::Stored {
                        conn,
                        dest,
                        upto,
                        epoch,
                    }));
                }
                Action::Trim { dest, upto } => self.store.trim(dest, upto),
                Action::Dial { addr } => self.dial(addr),
                Action::Send { conn, msg } => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    if c.tx.try_send(Bytes::from(wire::encode(&msg))).is_err() {
                        tracing::warn!(conn, "peer is not reading; closing the link");
                        if let Some(c) = self.conns.remove(&conn) {
                            c.stop.cancel();
                        }
                        queue.extend(self.step(Event::Closed { conn }));
                    }
                }
                Action::Close { conn, reason } => {
                    tracing::debug!(conn, %reason, "closing peer link");
                    if let Some(c) = self.conns.remove(&conn) {
                        c.stop.cancel();
                    }
                    self.forget_counters(conn);
                }
                Action::PeerUp { id, addr } => {
                    tracing::info!(peer = %id, %addr, "peer link up");
                    let _ = self.notices.send(Notice::PeerUp { id, addr }).await;
                }
                Action::PeerDown { id, reason } => {
                    tracing::info!(peer = %id, %reason, "peer link down");
                    let _ = self.notices.send(Notice::PeerDown { id, reason }).await;
                }
                Action::Superseded(s) => {
                    tracing::info!(agent = %s.name, winner = %s.winner.owner, moved = s.moved, "agent's name is held elsewhere now");
                    let _ = self.notices.send(Notice::Superseded(s)).await;
                }
                Action::Refused { addr, reason } => {
                    tracing::warn!(peer = %addr, %reason, "peer link refused");
                    {
                        let mut r = self
                            .shared
                            .refusals
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if r.len() >= REFUSALS_KEPT {
                            r.pop_front();
                        }
                        r.push_back(Refusal {
                            addr: addr.clone(),
                            reason: reason.clone(),
                            at_ms: now_ms(),
                        });
                    }
                    let _ = self.notices.send(Notice::Refused { addr, reason }).await;
                }
            }
        }
    }

    fn forget_counters(&self, conn: ConnId) {
        self.shared
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
    }

    fn dial(&self, addr: String) {
        let (internal, cancel) = (self.internal.clone(), self.cancel.clone());
        let links = self.links.clone();
        let fut = self.dialer.dial(&addr);
        self.tracker.spawn(async move {
            let result = tokio::select! {
                r = fut => r,
                _ = cancel.cancelled() => return,
            };
            let msg = match result {
                Ok(stream) => {
                    let framed = Framed::new(stream, peer_codec());
                    match tokio::select! {
                        r = open_dialed(framed, &addr, &links) => r,
                        _ = cancel.cancelled() => return,
                    } {
                        Ok(ready) => Internal::Dialed(ready),
                        Err(DialError::Io(error)) => {
                            Internal::Event(Event::DialFailed { addr, error })
                        }
                        Err(DialError::Refused(reason)) => Internal::Event(Event::LinkRefused {
                            addr,
                            reason,
                            dialed: true,
                        }),
                    }
                }
                Err(e) => Internal::Event(Event::DialFailed {
                    addr,
                    error: e.to_string(),
                }),
            };
            let _ = internal.send(msg).await;
        });
    }

    /// Admits or refuses an accepted peer hello; an encrypted link does its handshake in a
    /// task of its own, so a slow or silent dialer holds up nothing else.
    fn accept(&self, mut framed: PeerFramed, remote: String, hello: Hello) {
        let (internal, cancel) = (self.internal.clone(), self.cancel.clone());
        let links = self.links.clone();
        self.tracker.spawn(async move {
            let refuse = |reason: String| {
                Internal::Event(Event::LinkRefused {
                    addr: remote.clone(),
                    reason,
                    dialed: false,
                })
            };
            let msg = if let Err(reason) = links.admits(hello.encrypted, &remote) {
                // Said in plaintext: the dialer reads it as the peer protocol's refusal.
                let _ = send_refusal(&mut framed, &reason).await;
                refuse(reason)
            } else if !hello.encrypted {
                Internal::Accepted(Ready {
                    framed,
                    cipher: None,
                    addr: remote.clone(),
                })
            } else {
                let secret = links.secret.clone().expect("admits checked the secret");
                let mut framed = recodec(framed, noise::MAX_MESSAGE);
                let first = tokio::select! {
                    r = tokio::time::timeout(links.handshake_timeout, framed.next()) => r,
                    _ = cancel.cancelled() => return,
                };
                match first {
                    Ok(Some(Ok(first))) => match noise::respond(&secret, &hello.encode(), &first) {
                        Ok((cipher, answer)) => {
                            if framed.send(Bytes::from(answer)).await.is_ok() {
                                Internal::Accepted(Ready {
                                    framed,
                                    cipher: Some(cipher),
                                    addr: remote.clone(),
                                })
                            } else {
                                return;
                            }
                        }
                        Err(e) => {
                            let reason = e.to_string();
                            let _ = send_refusal(&mut framed, &reason).await;
                            refuse(reason)
                        }
                    },
                    Ok(Some(Err(e))) => refuse(format!("unreadable encrypted handshake: {e}")),
                    Ok(None) => return,
                    Err(_) => refuse("no encrypted handshake within the time allowed".into()),
                }
            };
            let _ = internal.send(msg).await;
        });
    }

    fn start_conn(&mut self, conn: ConnId, ready: Ready, dialed: bool) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(SEND_QUEUE);
        let stop = self.cancel.child_token();
        let counters = Arc::new(LinkCounters {
            encrypted: ready.cipher.is_some(),
            ..LinkCounters::default()
        });
        self.shared
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, counters.clone());
        let (mut sealer, mut opener): (Option<Sealer>, Option<Opener>) = match ready.cipher {
            Some(c) => {
                let (s, o) = c.split(MAX_PEER_FRAME);
                (Some(s), Some(o))
            }
            None => (None, None),
        };
        let framed = if opener.is_some() {
            recodec(ready.framed, noise::MAX_MESSAGE)
        } else {
            ready.framed
        };
        let (mut sink, mut stream) = framed.split();
        let internal = self.internal.clone();
        let stop_r = stop.clone();
        let remote = ready.addr;
        let mut throttle = Throttle::new(self.links.limit, tokio::time::Instant::now());
        self.tracker.spawn(async move {
            let mut opened_any = false;
            loop {
                let frame = tokio::select! {
                    f = stream.next() => f,
                    _ = stop_r.cancelled() => break,
                };
                let Some(Ok(frame)) = frame else { break };
                counters
                    .bytes_in
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                let frame = match opener.as_mut().map(|o| o.open(&frame)) {
                    None => frame.freeze(),
                    Some(Ok(Some(f))) => f,
                    Some(Ok(None)) => continue,
                    Some(Err(e)) => {
                        tracing::warn!(conn, peer = %remote, error = %e, "closing encrypted peer link");
                        if !opened_any {
                            // Nothing ever opened: the handshake was replayed, or the keys
                            // are not the peer's. Counted as a refusal, not a lost link.
                            let _ = internal
                                .send(Internal::Event(Event::LinkRefused {
                                    addr: remote.clone(),
                                    reason: format!(
                                        "the first encrypted frame did not open ({e}): a \
                                         replayed handshake, or a peer without the keys"
                                    ),
                                    dialed,
                                }))
                                .await;
                        }
                        break;
                    }
                };
                opened_any = true;
                counters.frames_in.fetch_add(1, Ordering::Relaxed);
                if !throttle.is_off() {
                    let wait = throttle.charge(tokio::time::Instant::now(), frame.len(), 1);
                    if !wait.is_zero() {
                        // Backpressure: stop reading until the peer is within its rate again.
                        counters.throttled.fetch_add(1, Ordering::Relaxed);
                        counters
                            .throttled_ms
                            .fetch_add(wait.as_millis() as u64, Ordering::Relaxed);
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop_r.cancelled() => break,
                        }
                    }
                }
                let msg = match wire::decode::<PeerMsg>(&frame) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(conn, error = %e, "undecodable peer frame; closing");
                        break;
                    }
                };
                if internal
                    .send(Internal::Event(Event::Received { conn, msg }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            stop_r.cancel();
            let _ = internal.send(Internal::Event(Event::Closed { conn })).await;
        });
        let stop_w = stop.clone();
        self.tracker.spawn(async move {
            let mut feed = async |sink: &mut futures::stream::SplitSink<PeerFramed, Bytes>,
                                  frame: Bytes|
                   -> bool {
                match sealer.as_mut() {
                    None => sink.feed(frame).await.is_ok(),
                    Some(s) => {
                        for m in s.seal(&frame) {
                            if sink.feed(m).await.is_err() {
                                return false;
                            }
                        }
                        true
                    }
                }
            };
            loop {
                let frame = tokio::select! {
                    f = rx.recv() => f,
                    _ = stop_w.cancelled() => None,
                };
                let Some(frame) = frame else { break };
                let mut ok = feed(&mut sink, frame).await;
                while ok {
                    match rx.try_recv() {
                        Ok(f) => ok = feed(&mut sink, f).await,
                        Err(_) => break,
                    }
                }
                if !ok || sink.flush().await.is_err() {
                    break;
                }
            }
            stop_w.cancel();
            let _ = sink.close().await;
        });
        self.conns.insert(conn, Conn { tx, stop });
    }
}

enum DialError {
    /// The connection failed: redial with backoff.
    Io(String),
    /// The peer or the handshake refused the link: shown in status.
    Refused(String),
}

/// Says the hello on a dialed connection and, when the policy asks for it, runs the Noise
/// handshake.
async fn open_dialed(
    mut framed: PeerFramed,
    addr: &str,
    links: &LinkConfig,
) -> Result<Ready, DialError> {
    let io = |e: std::io::Error| DialError::Io(e.to_string());
    let secret = links
        .secret
        .as_ref()
        .filter(|_| links.wants_encryption(addr));
    let Some(secret) = secret else {
        let hello = Hello::new(Role::Peer).encode();
        framed
            .send(Bytes::copy_from_slice(&hello))
            .await
            .map_err(io)?;
        return Ok(Ready {
            framed,
            cipher: None,
            addr: addr.to_string(),
        });
    };
    let hello = Hello::encrypted_peer().encode();
    framed
        .send(Bytes::copy_from_slice(&hello))
        .await
        .map_err(io)?;
    let mut framed = recodec(framed, noise::MAX_MESSAGE);
    let (initiator, first) = noise::Initiator::start(secret, &hello);
    framed.send(Bytes::from(first)).await.map_err(io)?;
    let answer = match tokio::time::timeout(links.handshake_timeout, framed.next()).await {
        Ok(Some(Ok(a))) => a,
        Ok(Some(Err(e))) => return Err(io(e)),
        Ok(None) => {
            return Err(DialError::Io(
                "closed during the encrypted handshake".into(),
            ))
        }
        Err(_) => {
            return Err(DialError::Io(
                "no answer to the encrypted handshake in time".into(),
            ))
        }
    };
    // A broker that will not encrypt with us says why, in plaintext.
    if let Ok(PeerMsg::Refused { reason }) = wire::decode::<PeerMsg>(&answer) {
        return Err(DialError::Refused(format!("refused by the peer: {reason}")));
    }
    match initiator.finish(&answer) {
        Ok(cipher) => Ok(Ready {
            framed,
            cipher: Some(cipher),
            addr: addr.to_string(),
        }),
        Err(e) => Err(DialError::Refused(e.to_string())),
    }
}

async fn send_refusal(framed: &mut PeerFramed, reason: &str) -> std::io::Result<()> {
    let msg = PeerMsg::Refused {
        reason: reason.to_string(),
    };
    framed.send(Bytes::from(wire::encode(&msg))).await?;
    SinkExt::<Bytes>::close(framed).await
}
