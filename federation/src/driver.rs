//! The thin tokio loop that runs a [`Node`] over a real transport.
//!
//! 1. One task owns the node. It wakes on a tick (every 50 ms), on a command from the broker
//!    (a peer connection to adopt, an agent change, a status query), or on an event from a
//!    connection task.
//! 2. It feeds the node and carries out what the node returns: dials run as tasks that report
//!    back `Connected`/`DialFailed`; each connection has a reader task (frames in → events)
//!    and a writer task (a bounded queue of frames out).
//! 3. Notices for the broker (peers up and down, names lost, refusals) go out on a channel.
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
use crate::node::{Action, ConnId, Event, Node, NodeStats, PeerStatus};
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
}

enum Command {
    Accept(PeerFramed, String),
    AddSeed(String),
    /// Actions from a step the broker took itself (an agent change).
    Execute(Vec<Action>),
    /// The store wrote to an outbox or made writes durable: look again.
    StoreChanged,
}

enum Internal {
    Event(Event),
    /// A dial connected and said its hello: the node task adopts it.
    Dialed(PeerFramed, String),
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
}

impl Handle {
    /// Adopts a connection whose peer hello the broker has already read.
    pub async fn accept(&self, framed: PeerFramed, remote: String) {
        let _ = self.tx.send(Command::Accept(framed, remote)).await;
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
        Snapshot {
            id: n.id(),
            peers: n.peer_status(now_ms()),
            agents: n.registry().agents().into_iter().cloned().collect(),
            stats: n.stats().clone(),
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

/// Starts the node task. It stops when `cancel` fires; wait on `tracker` for it and its
/// connection tasks.
pub fn spawn(
    node: Node,
    dialer: Arc<dyn Dialer>,
    store: Arc<dyn MeshStore>,
    notices: mpsc::Sender<Notice>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Handle {
    let (tx, rx) = mpsc::channel(NODE_QUEUE);
    let (itx, irx) = mpsc::channel(NODE_QUEUE);
    let node = Arc::new(Mutex::new(node));
    let driver = Driver {
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
    Handle { node, tx }
}

struct Driver {
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
                    Internal::Event(ev) => self.step(ev),
                    Internal::Dialed(framed, addr) => {
                        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        self.start_conn(conn, framed);
                        self.step(Event::Connected { conn, addr })
                    }
                },
                cmd = commands.recv() => match cmd {
                    None => break,
                    Some(Command::Accept(framed, remote)) => {
                        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                        self.start_conn(conn, framed);
                        self.step(Event::Accepted { conn, remote })
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
                    let _ = self.notices.send(Notice::Refused { addr, reason }).await;
                }
            }
        }
    }

    fn dial(&self, addr: String) {
        let (internal, cancel) = (self.internal.clone(), self.cancel.clone());
        let fut = self.dialer.dial(&addr);
        self.tracker.spawn(async move {
            let result = tokio::select! {
                r = fut => r,
                _ = cancel.cancelled() => return,
            };
            let msg = match result {
                Ok(stream) => {
                    let mut framed = Framed::new(stream, peer_codec());
                    let hello = Bytes::copy_from_slice(&Hello::new(Role::Peer).encode());
                    match framed.send(hello).await {
                        Ok(()) => Internal::Dialed(framed, addr),
                        Err(e) => Internal::Event(Event::DialFailed {
                            addr,
                            error: e.to_string(),
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

    fn start_conn(&mut self, conn: ConnId, framed: PeerFramed) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(SEND_QUEUE);
        let stop = self.cancel.child_token();
        let (mut sink, mut stream) = framed.split();
        let internal = self.internal.clone();
        let stop_r = stop.clone();
        self.tracker.spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = stream.next() => f,
                    _ = stop_r.cancelled() => break,
                };
                let Some(Ok(frame)) = frame else { break };
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
            loop {
                let frame = tokio::select! {
                    f = rx.recv() => f,
                    _ = stop_w.cancelled() => None,
                };
                let Some(frame) = frame else { break };
                let mut ok = sink.feed(frame).await.is_ok();
                while ok {
                    match rx.try_recv() {
                        Ok(f) => ok = sink.feed(f).await.is_ok(),
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
