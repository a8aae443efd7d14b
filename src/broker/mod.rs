//! The broker: the agents attached to it, their inboxes, and the requests that change them.
//!
//! A request travels like this:
//!
//! 1. [`server`] accepts a TCP connection (bounded by a semaphore) and hands it to `session`.
//! 2. The session reads the hello, answers with a welcome, then reads request frames.
//! 3. Each request goes to [`Broker::handle`], which validates it and, under the broker lock,
//!    applies its writes to the storage engine in one atomic batch. It returns an [`Outcome`]:
//!    a reply now, a reply once the write is durable, or a wait for new messages.
//! 4. The session's writer holds each reply that waits on [`commit`] (group commit: one flush
//!    serves every write before it) and sends all a flush releases in one write. A message is
//!    readable, and its recipient's waiters woken, as soon as it is written; every reply that
//!    shows it waits for a flush that covers it (see `Broker::wake`).
//! 5. [`retention`] sweeps read messages, expired unread ones (telling their senders) and
//!    lapsed names in the background.
//!
//! The lock is a std mutex, never held across an await; storage calls under it are short
//! in-memory sled operations. Only flushes block, and they run on the flusher task.

pub mod commit;
mod dedup;
mod delivery;
mod fence;
pub mod mesh;
mod rate;
pub mod retention;
pub mod server;
mod session;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use federation::delivery::Envelope;
use federation::message::MessageKind;
use federation::{AgentName, BrokerId, DeliveryClock, Dot, Message};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{defaults, Config};
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::identity::{self, AgentRecord, SYSTEM};
use crate::inbox::{self, Entry};
use crate::outbox;
use crate::protocol::{
    AgentView, Body, BrokerView, ClockEntry, Counters, MeshCounters, MessageView, Outgoing,
    PeerView, RefusalView, Reply, Route, Skipped, StatusView,
};
use crate::storage::{keys, Batch, Engine};

use self::commit::{Commit, Durable};
use self::rate::RateLimiter;

/// Sequences reserved (and persisted) at a time, so a restart never reuses one.
const SEQ_BLOCK: u64 = 100_000;
/// The most messages one fetch returns.
pub const FETCH_MAX: u32 = 1000;
/// About how many bytes of content one fetch returns (at least one message).
const FETCH_BYTES: usize = 8 * 1024 * 1024;
/// The deepest JSON nesting accepted in `data`.
pub const MAX_JSON_DEPTH: usize = 32;

/// A cheap, cloneable handle to a running broker's state.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    id: BrokerId,
    config: Config,
    listen: SocketAddr,
    data_dir: PathBuf,
    engine: Arc<dyn Engine>,
    state: Mutex<State>,
    commit: Commit,
    started: Instant,
    counters: CounterCells,
    /// The mesh node, once the server has started it (see [`mesh`]).
    mesh: OnceLock<federation::driver::Handle>,
}

#[derive(Default)]
struct CounterCells {
    messages_accepted: AtomicU64,
    messages_stored: AtomicU64,
    messages_expired: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
    flushes: AtomicU64,
    connections: AtomicU64,
    /// Arriving envelopes dropped because they were delivered before.
    duplicates: AtomicU64,
    relayed: AtomicU64,
    forwarded: AtomicU64,
    /// Fences given up: an agent's old broker never confirmed its earlier messages.
    fences_given_up: AtomicU64,
    connections_refused: AtomicU64,
    auth_failures: AtomicU64,
}

struct State {
    /// Every name this broker knows, including forwarding records of renamed agents.
    agents: BTreeMap<AgentName, Agent>,
    /// Unread messages per recipient, including those held for names not yet registered.
    unread: HashMap<AgentName, u64>,
    /// Each inbox's read floor: every entry below it is read (see [`inbox`]). None: 0.
    read_floor: HashMap<AgentName, u64>,
    /// Send dedup keys ([`dedup`]).
    dedup: dedup::Dedup,
    /// Waiters of each agent, woken when a message for it is written.
    waiters: HashMap<AgentName, Arc<Notify>>,
    next_seq: u64,
    seq_ceiling: u64,
    /// Bumped by every applied batch; see [`commit`].
    epoch: u64,
    /// The highest inbox arrival position written.
    last_arrival: u64,
    /// Recipients of messages put in a batch not yet applied; woken once it is.
    to_wake: Vec<AgentName>,
    rate: RateLimiter,
    /// Names this broker's agents lost to a newer claim elsewhere, with what to tell them.
    lost: HashMap<AgentName, String>,
    /// What has been delivered here, per origin broker (persisted with each delivery).
    clock: DeliveryClock,
    /// Envelopes waiting per destination broker, and in all.
    outbox_depth: BTreeMap<BrokerId, u64>,
    outbox_total: u64,
    /// The last sequence queued for each destination (the `prev` of the next envelope).
    last_to: BTreeMap<BrokerId, u64>,
    /// Every broker this one has linked with, and its address (persisted).
    members: BTreeMap<BrokerId, String>,
    /// Closed fences, and messages waiting for a moved sender's old broker ([`fence`]).
    fences: federation::fence::Fences,
    /// Redirects of moved recipients: copies waiting for a marker ([`fence`]).
    redirects: federation::fence::Fences,
    /// Where this broker last sent each recipient's messages, and the last marker's sequence.
    routes: fence::Routes,
    /// Markers parked until their recipient leaves this broker.
    parked: fence::Parked,
    /// `SEEN` keys written by the arrival batch being built (not in storage yet).
    seen_now: std::collections::HashSet<Vec<u8>>,
}

struct Agent {
    record: AgentRecord,
    /// Open connections registered as this agent.
    online: u32,
}

/// What a connection knows about itself.
#[derive(Debug)]
pub struct SessionCtx {
    pub conn_id: u64,
    pub agent: Option<AgentName>,
}

/// How a request is answered.
pub enum Outcome {
    /// The reply, now.
    Now(Result<Reply, WireError>),
    /// The reply, once every write up to `epoch` is durable.
    AfterCommit { epoch: u64, reply: Reply },
    /// Wait until `agent` has an unread message (or the timeout), then fetch.
    Wait {
        agent: AgentName,
        notify: Arc<Notify>,
        timeout: Duration,
        limit: u32,
        mark_read: bool,
    },
}

impl From<Result<Reply, WireError>> for Outcome {
    fn from(r: Result<Reply, WireError>) -> Self {
        Outcome::Now(r)
    }
}

/// Where a direct message is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// The recipient's inbox here.
    Inbox,
    /// The outbox for the broker the recipient is attached to.
    Outbox(BrokerId),
}

/// What a dedup key remembers of the send that first used it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DedupEntry {
    pub id: String,
    pub route: Route,
    pub at_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn not_registered() -> WireError {
    WireError::new(
        ErrorKind::NotRegistered,
        "this connection is not registered as an agent; register a name first",
    )
}

fn storage_err(e: Error) -> WireError {
    WireError::new(ErrorKind::Unavailable, format!("storage failed: {e}"))
}

/// Background tasks of a broker, stopped by [`BrokerTasks::shutdown`].
pub struct BrokerTasks {
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

impl BrokerTasks {
    /// Stops the flusher and sweeper; the flusher makes a last flush before it returns.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Broker {
    /// Opens the broker's storage and starts its flusher and retention sweeper.
    ///
    /// `listen` is the bound address (it may differ from the configured one when the port was 0).
    pub fn start(
        engine: Arc<dyn Engine>,
        config: Config,
        listen: SocketAddr,
        data_dir: PathBuf,
    ) -> Result<(Broker, BrokerTasks)> {
        let id = match engine.get(&keys::meta("broker_id"))? {
            Some(v) if v.len() == 4 => {
                BrokerId::from_u32(u32::from_be_bytes(v[..4].try_into().expect("4 bytes")))
            }
            Some(_) => return Err(Error::Storage("corrupt broker id".into())),
            None => BrokerId::random(),
        };
        let old_ceiling = match engine.get(&keys::meta("seq_ceiling"))? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
            Some(_) => return Err(Error::Storage("corrupt sequence ceiling".into())),
            None => 0,
        };
        // Whatever the last run used of its block is skipped: sequences are never reused.
        let next_seq = old_ceiling + 1;
        let seq_ceiling = old_ceiling + SEQ_BLOCK;
        let mut b = Batch::new();
        b.put(keys::meta("broker_id"), id.as_u32().to_be_bytes().to_vec());
        b.put(
            keys::meta("seq_ceiling"),
            seq_ceiling.to_be_bytes().to_vec(),
        );
        engine.apply(b)?;
        engine.flush()?;

        let mut agents = BTreeMap::new();
        for (_, v) in engine.scan(&[keys::AGENT], None, usize::MAX)? {
            let record: AgentRecord = federation::wire::decode(&v)
                .map_err(|e| Error::Storage(format!("corrupt agent record: {e}")))?;
            if let Ok(name) = AgentName::new(record.name.clone()) {
                agents.insert(name, Agent { record, online: 0 });
            }
        }
        let upgraded = inbox::upgrade_read_copies(&*engine)?;
        if upgraded > 0 {
            engine.flush()?;
            tracing::info!(
                messages = upgraded,
                "stored read messages in the current layout"
            );
        }
        let mut unread: HashMap<AgentName, u64> = HashMap::new();
        let mut read_floor: HashMap<AgentName, u64> = HashMap::new();
        for (name, (n, floor)) in inbox::count_unread(&*engine)? {
            if n > 0 {
                unread.insert(name.clone(), n);
            }
            read_floor.insert(name, floor);
        }

        let dedup = dedup::Dedup::load(&*engine)?;
        let clock = outbox::load_clock(&*engine)?;
        let members = outbox::load_members(&*engine)?;
        let fences = fence::load(&*engine, fence::Book::Sender)?;
        let redirects = fence::load(&*engine, fence::Book::Recipient)?;
        let (routes, parked) = fence::load_routes(&*engine)?;
        let (outbox_depth, last_to) = outbox::load_depths(&*engine)?;
        let outbox_total = outbox_depth.values().sum();
        let (commit, wake, durable_tx) = Commit::new(Durable {
            epoch: 0,
            arrival: old_ceiling,
            failed: false,
        });
        let rate = RateLimiter::new(config.limits.rate_per_sec, config.limits.rate_burst);
        let broker = Broker {
            inner: Arc::new(Inner {
                id,
                config,
                listen,
                data_dir,
                engine,
                state: Mutex::new(State {
                    agents,
                    unread,
                    read_floor,
                    dedup,
                    waiters: HashMap::new(),
                    next_seq,
                    seq_ceiling,
                    epoch: 0,
                    last_arrival: old_ceiling,
                    to_wake: Vec::new(),
                    rate,
                    lost: HashMap::new(),
                    clock,
                    outbox_depth,
                    outbox_total,
                    last_to,
                    members,
                    fences,
                    redirects,
                    routes,
                    parked,
                    seen_now: Default::default(),
                }),
                commit,
                started: Instant::now(),
                counters: CounterCells::default(),
                mesh: OnceLock::new(),
            }),
        };
        let tasks = BrokerTasks {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        tasks.tracker.spawn(
            broker
                .clone()
                .run_flusher(wake, durable_tx, tasks.cancel.clone()),
        );
        tasks
            .tracker
            .spawn(retention::run(broker.clone(), tasks.cancel.clone()));
        tracing::info!(broker = %id, next_seq, "broker storage opened");
        Ok((broker, tasks))
    }

    pub fn id(&self) -> BrokerId {
        self.inner.id
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn commit(&self) -> &Commit {
        &self.inner.commit
    }

    fn mesh(&self) -> Option<&federation::driver::Handle> {
        self.inner.mesh.get()
    }

    /// The mesh node's handle, for handing it peer connections.
    pub fn mesh_handle(&self) -> Option<federation::driver::Handle> {
        self.inner.mesh.get().cloned()
    }

    /// Connects the broker to its running mesh node and publishes every local agent.
    pub fn attach_mesh(&self, handle: federation::driver::Handle) {
        if self.inner.mesh.set(handle).is_err() {
            return;
        }
        let s = self.state();
        for a in s.agents.values().filter(|a| !a.record.is_forward()) {
            self.publish(a);
        }
    }

    /// Tells the mesh about one of this broker's agents.
    fn publish(&self, a: &Agent) {
        if let Some(m) = self.mesh() {
            m.local(federation::node::Event::AgentChanged {
                name: a.record.name.clone(),
                token_hash: a.record.token_hash.clone(),
                incarnation: a.record.incarnation,
                online: a.online > 0,
                last_seen_ms: a.record.last_seen_ms,
            });
        }
    }

    fn unpublish(&self, name: &AgentName) {
        if let Some(m) = self.mesh() {
            m.local(federation::node::Event::AgentRemoved {
                name: name.to_string(),
            });
        }
    }

    /// The entry of `name` on another broker, if one holds it and its claim has not lapsed.
    fn held_elsewhere(
        &self,
        name: &AgentName,
        now: u64,
    ) -> Option<federation::registry::AgentEntry> {
        let e = self.mesh()?.lookup(name.as_str())?;
        let retention = self.inner.config.limits.retention.as_millis() as u64;
        let lapsed = !e.online && e.last_seen_ms + retention <= now;
        (e.owner != self.inner.id && !lapsed).then_some(e)
    }

    /// The highest incarnation the mesh has seen for `name`.
    fn mesh_incarnation(&self, name: &AgentName) -> u64 {
        self.mesh().map_or(0, |m| m.max_incarnation(name.as_str()))
    }

    /// A peer link came up: remember the broker (durably, with the next flush).
    pub fn member_seen(&self, id: BrokerId, addr: &str) {
        let mut s = self.state();
        if s.members.get(&id).map(|a| a.as_str()) == Some(addr) {
            return;
        }
        let mut b = Batch::new();
        b.put(outbox::member_key(id), addr.as_bytes().to_vec());
        if self.apply(&mut s, b).is_ok() {
            s.members.insert(id, addr.to_string());
        }
    }

    /// The brokers this one linked with before (for dialing at start-up).
    pub fn members(&self) -> Vec<String> {
        self.state().members.values().cloned().collect()
    }

    /// Another broker's entry now holds the name of one of ours: the agent moved there, or
    /// lost a conflicting claim made during a partition. Either way the name is no longer
    /// this broker's; a connection still registered under it is told on its next request.
    pub fn name_superseded(&self, s: federation::registry::Superseded) {
        let Ok(name) = AgentName::new(s.name.clone()) else {
            return;
        };
        let mut st = self.state();
        let Some(a) = st.agents.get(&name) else {
            return;
        };
        if a.record.is_forward() {
            return;
        }
        let why = if s.moved {
            format!(
                "{name} is now attached to broker {}; reconnect there",
                s.winner.owner
            )
        } else {
            format!(
                "the name {name} was claimed by another agent on broker {} (a newer claim, made while the brokers could not reach each other) and is no longer yours; register under another name",
                s.winner.owner
            )
        };
        tracing::info!(agent = %name, winner = %s.winner.owner, moved = s.moved, "name now held elsewhere");
        let mut b = Batch::new();
        b.delete(keys::agent(&name));
        if s.moved {
            // What it sent from here goes before what it sends from there: close its fence,
            // behind everything queued so far.
            let (incarnation, after) = (a.record.incarnation, a.record.after);
            self.emit_fences(&mut st, &mut b, &name, incarnation, after);
        }
        if self.apply(&mut st, b).is_ok() {
            st.agents.remove(&name);
            if s.moved {
                // Its unread messages follow it.
                self.forward_inbox(&mut st, &name, s.winner.owner);
            }
            st.lost.insert(name, why);
        }
        drop(st);
        self.commit().request();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state it guards is still consistent
        // because every mutation is applied to storage before memory.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The flusher: see [`commit`].
    async fn run_flusher(
        self,
        wake: Arc<Notify>,
        durable: watch::Sender<Durable>,
        cancel: CancellationToken,
    ) {
        loop {
            let stopping = tokio::select! {
                _ = wake.notified() => false,
                _ = cancel.cancelled() => true,
            };
            let (epoch, arrival) = {
                let s = self.state();
                (s.epoch, s.last_arrival)
            };
            if epoch > durable.borrow().epoch || stopping {
                let engine = self.inner.engine.clone();
                let flushed = tokio::task::spawn_blocking(move || engine.flush()).await;
                match flushed {
                    Ok(Ok(())) => {
                        self.inner.counters.flushes.fetch_add(1, Ordering::Relaxed);
                        durable.send_modify(|d| {
                            d.epoch = d.epoch.max(epoch);
                            d.arrival = d.arrival.max(arrival);
                        });
                        // New envelopes are streamable, acknowledgements sendable.
                        if let Some(m) = self.mesh() {
                            m.store_changed();
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "flush failed; refusing further acknowledgements");
                        durable.send_modify(|d| d.failed = true);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "flush task panicked");
                        durable.send_modify(|d| d.failed = true);
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Counts a new connection; returns its id.
    pub fn connection_opened(&self) -> u64 {
        self.inner
            .counters
            .connections
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }

    /// Counts a connection refused at the connection limit.
    pub fn connection_refused(&self) {
        let c = &self.inner.counters;
        c.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a client that failed to authenticate.
    pub fn auth_failed(&self) {
        let c = &self.inner.counters;
        c.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Called when a connection closes: the agent it was registered as may go offline.
    pub fn connection_closed(&self, ctx: &SessionCtx) {
        let Some(name) = &ctx.agent else { return };
        let mut s = self.state();
        let now = now_ms();
        if let Some(a) = s.agents.get_mut(name) {
            a.online = a.online.saturating_sub(1);
            a.record.last_seen_ms = now;
            let record = a.record.clone();
            if let Some(a) = s.agents.get(name) {
                self.publish(a);
            }
            let mut b = Batch::new();
            b.put(keys::agent(name), federation::wire::encode(&record));
            // Last-seen is advisory: written now, made durable by the next flush.
            if let Err(e) = self.inner.engine.apply(b) {
                tracing::warn!(error = %e, agent = %name, "could not record last-seen");
            } else {
                s.epoch += 1;
            }
        }
    }

    /// Validates and applies one request. See the module docs for the flow.
    pub fn handle(&self, ctx: &mut SessionCtx, body: Body) -> Outcome {
        let c = &self.inner.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        if !matches!(body, Body::Ping) {
            let who = match &ctx.agent {
                Some(a) => a.to_string(),
                None => format!("conn#{}", ctx.conn_id),
            };
            let limited = self.state().rate.check(&who, Instant::now());
            if let Err(wait) = limited {
                c.rate_limited.fetch_add(1, Ordering::Relaxed);
                c.errors.fetch_add(1, Ordering::Relaxed);
                return Outcome::Now(Err(WireError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "rate limit of {} requests per second exceeded; retry in {} ms",
                        self.inner.config.limits.rate_per_sec,
                        wait.as_millis().max(1)
                    ),
                )));
            }
        }
        if let Some(agent) = &ctx.agent {
            let lost = self.state().lost.get(agent).cloned();
            if let Some(why) = lost {
                if !matches!(
                    body,
                    Body::Register { .. } | Body::Ping | Body::List | Body::Status
                ) {
                    ctx.agent = None;
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    return Outcome::Now(Err(WireError::new(ErrorKind::NameTaken, why)));
                }
            }
        }
        let outcome = match body {
            Body::Ping => Outcome::Now(Ok(Reply::Pong {
                broker_id: self.inner.id.to_string(),
            })),
            Body::Auth { .. } => Outcome::Now(Err(WireError::invalid(
                "this connection needs no authentication: it is authenticated already, or the broker does not require it",
            ))),
            Body::Register { name, token } => self.register(ctx, name, token),
            Body::Send(out) => self.send(ctx, out),
            Body::Broadcast { content, data } => self.broadcast(ctx, content, data),
            Body::Fetch {
                include_read,
                limit,
                mark_read,
            } => match &ctx.agent {
                Some(agent) => self.fetch(agent, include_read, limit, mark_read),
                None => Err(not_registered()).into(),
            },
            Body::Ack { ids } => self.ack(ctx, ids),
            Body::Wait {
                timeout_ms,
                limit,
                mark_read,
            } => match &ctx.agent {
                Some(agent) => Outcome::Wait {
                    agent: agent.clone(),
                    notify: self.waiter(agent),
                    timeout: Duration::from_millis(timeout_ms).min(defaults::WAIT_MAX),
                    limit,
                    mark_read,
                },
                None => Err(not_registered()).into(),
            },
            Body::List => Outcome::Now(Ok(Reply::Agents {
                agents: self.agent_views(),
            })),
            Body::Rename { new_name } => self.rename(ctx, new_name),
            Body::Status => Outcome::Now(Ok(Reply::Status(Box::new(self.status())))),
        };
        if matches!(outcome, Outcome::Now(Err(_))) {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(agent) = &ctx.agent {
            if let Some(a) = self.state().agents.get_mut(agent) {
                a.record.last_seen_ms = now_ms();
            }
        }
        outcome
    }

    fn waiter(&self, agent: &AgentName) -> Arc<Notify> {
        self.state()
            .waiters
            .entry(agent.clone())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Applies a batch and bumps the write epoch; call with the lock held.
    ///
    /// The engine stages the batch until the next flush (`storage::Staged`), so every write
    /// asks for one: writes nobody waits for (an outbox trim, a last-seen) must not pile up in
    /// memory, nor make every scan walk past them.
    fn apply(&self, s: &mut State, batch: Batch) -> Result<u64, WireError> {
        self.inner.engine.apply(batch).map_err(storage_err)?;
        s.epoch += 1;
        self.inner.commit.request();
        for name in std::mem::take(&mut s.to_wake) {
            Self::wake(s, &name);
        }
        Ok(s.epoch)
    }

    /// Wakes whoever waits for `agent`'s messages: one was just written to its inbox.
    ///
    /// A message is readable as soon as it is written, before the flush that makes it
    /// durable: a read that marks it read is answered after the flush covering that mark,
    /// which covers the arrival too, and a read that marks nothing waits for the arrival's
    /// flush ([`Broker::fetch`]). So no reader ever sees a message a crash could take back,
    /// and a delivery costs one flush, not two.
    fn wake(s: &State, agent: &AgentName) {
        if let Some(n) = s.waiters.get(agent) {
            n.notify_waiters();
        }
    }

    /// The next message sequence; reserves (and persists) another block when one runs out.
    fn next_seq(&self, s: &mut State) -> Result<u64, WireError> {
        if s.next_seq > s.seq_ceiling {
            let ceiling = s.seq_ceiling + SEQ_BLOCK;
            let mut b = Batch::new();
            b.put(keys::meta("seq_ceiling"), ceiling.to_be_bytes().to_vec());
            self.inner.engine.apply(b).map_err(storage_err)?;
            // Rare (once per block): the reservation must be durable before any sequence of
            // the new block is handed out.
            self.inner.engine.flush().map_err(storage_err)?;
            s.seq_ceiling = ceiling;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        Ok(seq)
    }

    fn unread_of(s: &State, agent: &AgentName) -> u64 {
        s.unread.get(agent).copied().unwrap_or(0)
    }

    fn is_lapsed(&self, a: &Agent, now: u64) -> bool {
        a.online == 0
            && a.record.last_seen_ms + self.inner.config.limits.retention.as_millis() as u64 <= now
    }

    /// A claim is free for someone else once it lapsed and nothing waits unread for it.
    fn claim_lapsed(&self, s: &State, name: &AgentName, a: &Agent, now: u64) -> bool {
        self.is_lapsed(a, now) && Self::unread_of(s, name) == 0
    }

    fn register(&self, ctx: &mut SessionCtx, name: String, token: Option<String>) -> Outcome {
        let name = match AgentName::new(name) {
            Ok(n) => n,
            Err(e) => return Err(WireError::from(e)).into(),
        };
        if name.as_str() == SYSTEM {
            return Err(WireError::new(
                ErrorKind::NameTaken,
                "the name \"system\" is reserved for notices from the mesh; choose another",
            ))
            .into();
        }
        if let Some(current) = &ctx.agent {
            if *current != name {
                return Err(WireError::invalid(format!(
                    "this connection is already registered as {current}; open a new connection to act as {name}"
                )))
                .into();
            }
        }
        if let Some(t) = &token {
            if !identity::token_shape_ok(t) {
                return Err(WireError::new(
                    ErrorKind::BadToken,
                    format!("that is not a valid token for {name}: tokens are 64 hex digits issued by the broker"),
                ))
                .into();
            }
        }
        let now = now_ms();
        let mut s = self.state();
        let existing = s.agents.get(&name);
        let mut batch = Batch::new();
        let (record, new_token, created) = match existing {
            Some(a) if a.record.is_forward() && a.record.forward_until_ms > now => {
                return Err(WireError::new(
                    ErrorKind::NameTaken,
                    format!(
                        "{name} was renamed to {} and forwards to it until {}; choose another name",
                        a.record.forward_to.as_deref().unwrap_or("?"),
                        rfc3339(a.record.forward_until_ms)
                    ),
                ))
                .into();
            }
            Some(a) if !a.record.is_forward() && !self.claim_lapsed(&s, &name, a, now) => {
                match &token {
                    Some(t) if a.record.token_matches(t) => {
                        let mut r = a.record.clone();
                        r.incarnation = r.incarnation.max(self.mesh_incarnation(&name)) + 1;
                        r.last_seen_ms = now;
                        (r, t.clone(), false)
                    }
                    Some(_) => {
                        return Err(WireError::new(
                        ErrorKind::BadToken,
                        format!("the token does not match {name}; nothing was changed. Use the token {name} was given, or choose another name"),
                    ))
                    .into();
                    }
                    None => {
                        return Err(WireError::new(
                        ErrorKind::NameTaken,
                        format!("{name} is held by another agent; register with its token (the CLI keeps it in <home>/agents/{name}.token) or choose another name"),
                    ))
                    .into();
                    }
                }
            }
            // Free here: never claimed on this broker, a forward that ran out, or a lapsed claim.
            other => {
                let other = other.map(|a| a.record.clone());
                // Held on another broker of the mesh? Then only its token may take it (the
                // agent moving here), with the next incarnation so every registry agrees.
                if let Some(held) = self.held_elsewhere(&name, now) {
                    let moved = token.as_deref().is_some_and(|t| {
                        <[u8; 32]>::try_from(held.token_hash.as_slice()).is_ok_and(|stored| {
                            identity::hashes_equal(&stored, &identity::hash_token(t))
                        })
                    });
                    if !moved {
                        let (kind, what) = if token.is_some() {
                            (
                                ErrorKind::BadToken,
                                "the token does not match it; nothing was changed",
                            )
                        } else {
                            (
                                ErrorKind::NameTaken,
                                "register with its token or choose another name",
                            )
                        };
                        return Err(WireError::new(
                            kind,
                            format!(
                                "{name} is held by another agent on broker {}; {what}",
                                held.owner
                            ),
                        ))
                        .into();
                    }
                    tracing::info!(agent = %name, from = %held.owner, "agent moved here");
                    let r = AgentRecord {
                        name: name.to_string(),
                        token_hash: held.token_hash.clone(),
                        incarnation: self.mesh_incarnation(&name).max(held.incarnation) + 1,
                        registered_at_ms: now,
                        last_seen_ms: now,
                        forward_to: None,
                        forward_until_ms: 0,
                        // What it sent at its old broker comes first, wherever it is read.
                        after: Some(federation::fence::Fence {
                            broker: held.owner,
                            incarnation: held.incarnation,
                        }),
                    };
                    (r, token.clone().expect("a move needs the token"), false)
                } else {
                    if token.is_some() {
                        return Err(WireError::new(
                            ErrorKind::TokenExpired,
                            format!(
                                "the token for {name} has expired (unused for longer than {}, or the broker's data was reset); register {name} again without a token to claim it anew",
                                humantime::format_duration(self.inner.config.limits.retention)
                            ),
                        ))
                        .into();
                    }
                    let incarnation = other
                        .as_ref()
                        .map_or(0, |r| r.incarnation)
                        .max(self.mesh_incarnation(&name))
                        + 1;
                    if other.as_ref().is_some_and(|r| !r.is_forward()) {
                        // A lapsed claim: the new holder must not read the old holder's messages.
                        match inbox::all_keys(&*self.inner.engine, &name) {
                            Ok(keys) => keys.into_iter().for_each(|k| batch.delete(k)),
                            Err(e) => return Err(storage_err(e)).into(),
                        }
                        s.unread.remove(&name);
                        s.read_floor.remove(&name);
                    }
                    let t = identity::new_token();
                    let r = AgentRecord {
                        name: name.to_string(),
                        token_hash: identity::hash_token(&t).to_vec(),
                        incarnation,
                        registered_at_ms: now,
                        last_seen_ms: now,
                        forward_to: None,
                        forward_until_ms: 0,
                        after: None,
                    };
                    (r, t, true)
                }
            }
        };
        batch.put(keys::agent(&name), federation::wire::encode(&record));
        let epoch = match self.apply(&mut s, batch) {
            Ok(e) => e,
            Err(e) => return Err(e).into(),
        };
        let online = s.agents.get(&name).map_or(0, |a| a.online) + u32::from(ctx.agent.is_none());
        let agent = Agent { record, online };
        self.publish(&agent);
        s.agents.insert(name.clone(), agent);
        s.lost.remove(&name);
        let unread = Self::unread_of(&s, &name);
        drop(s);
        if created {
            tracing::info!(agent = %name, conn = ctx.conn_id, "agent claimed a name");
        } else if ctx.agent.is_none() {
            tracing::debug!(agent = %name, conn = ctx.conn_id, "agent registered");
        }
        ctx.agent = Some(name.clone());
        Outcome::AfterCommit {
            epoch,
            reply: Reply::Registered {
                name: name.to_string(),
                token: new_token,
                broker_id: self.inner.id.to_string(),
                created,
                unread,
            },
        }
    }

    /// Checks size and JSON shape of a message body.
    fn validate_body(&self, content: &str, data: &Option<String>) -> Result<(), WireError> {
        let size = content.len() + data.as_ref().map_or(0, |d| d.len());
        let max = self.inner.config.limits.max_message_bytes;
        if size > max {
            return Err(WireError::new(
                ErrorKind::TooLarge,
                format!(
                    "the message is {size} bytes; the limit is {max} bytes. Send less, or split it"
                ),
            ));
        }
        if let Some(d) = data {
            validate_json_object(d)?;
        }
        Ok(())
    }

    /// Follows renames from `name` to the agent that receives its messages now.
    fn resolve(&self, s: &State, name: &AgentName, now: u64) -> Option<AgentName> {
        let mut cur = name.clone();
        for _ in 0..8 {
            match s.agents.get(&cur) {
                Some(a) if a.record.is_forward() => {
                    if a.record.forward_until_ms <= now {
                        return None;
                    }
                    cur = AgentName::new(a.record.forward_to.clone()?).ok()?;
                }
                Some(_) => return Some(cur),
                None => return None,
            }
        }
        None
    }

    fn send(&self, ctx: &SessionCtx, out: Outgoing) -> Outcome {
        let Some(from) = ctx.agent.clone() else {
            return Err(not_registered()).into();
        };
        let Outgoing {
            to,
            content,
            data,
            reply_to,
            hold,
            dedup_key,
        } = out;
        if dedup_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > 64)
        {
            return Err(WireError::invalid("dedup_key must be 1 to 64 bytes")).into();
        }
        if let Err(e) = self.validate_body(&content, &data) {
            return Err(e).into();
        }
        let reply_to = match reply_to.map(|r| r.parse::<Dot>()).transpose() {
            Ok(r) => r,
            Err(e) => return Err(WireError::from(e)).into(),
        };
        let (to_name, remote) = match self.parse_recipient(&to) {
            Ok(n) => n,
            Err(e) => return Err(e).into(),
        };
        let now = now_ms();
        let s = self.state();
        if let Some(k) = &dedup_key {
            match s.dedup.lookup(&*self.inner.engine, &from, k) {
                Ok(Some(first)) => {
                    // A resend: answer as the first time, once that first write is durable
                    // (it is covered by the current epoch).
                    return Outcome::AfterCommit {
                        epoch: s.epoch,
                        reply: Reply::Sent {
                            id: first.id,
                            route: first.route,
                            unread: Self::unread_of(&s, &from),
                        },
                    };
                }
                Ok(None) => {}
                Err(e) => return Err(storage_err(e)).into(),
            }
        }
        let (target, route) = match self.resolve(&s, &to_name, now) {
            Some(t) if t == to_name => (t.clone(), Route::Local { to: t.to_string() }),
            Some(t) => (
                t.clone(),
                Route::Forwarded {
                    from: to_name.to_string(),
                    to: t.to_string(),
                },
            ),
            None if remote.is_some() || self.held_elsewhere(&to_name, now).is_some() => {
                let owner = remote
                    .or_else(|| self.held_elsewhere(&to_name, now).map(|e| e.owner))
                    .expect("checked");
                let route = Route::Remote {
                    to: to_name.to_string(),
                    broker: owner.to_string(),
                };
                return self.store_direct(
                    s,
                    from,
                    to_name,
                    Place::Outbox(owner),
                    route,
                    now,
                    (content, data, reply_to),
                    dedup_key,
                );
            }
            None if hold || s.unread.contains_key(&to_name) => (
                to_name.clone(),
                Route::Held {
                    to: to_name.to_string(),
                },
            ),
            None => {
                let mesh_names: Vec<String> = self
                    .mesh()
                    .map(|m| m.agents().into_iter().map(|e| e.name).collect())
                    .unwrap_or_default();
                let mut names: Vec<&str> = s
                    .agents
                    .iter()
                    .filter(|(_, a)| !a.record.is_forward())
                    .map(|(n, _)| n.as_str())
                    .chain(mesh_names.iter().map(|n| n.as_str()))
                    .collect();
                names.sort_unstable();
                names.dedup();
                let close = closest_names(to_name.as_str(), &names);
                let hint = if close.is_empty() {
                    String::new()
                } else {
                    format!(" Did you mean {}?", close.join(", "))
                };
                return Err(WireError::new(
                    ErrorKind::UnknownRecipient,
                    format!("no agent named {to_name} has ever registered.{hint} To keep the message for an agent that has not registered yet, send it with hold"),
                ))
                .into();
            }
        };
        self.store_direct(
            s,
            from,
            target,
            Place::Inbox,
            route,
            now,
            (content, data, reply_to),
            dedup_key,
        )
    }

    /// `name`, or `name@broker-id` for an agent on a given broker (this one or one the mesh
    /// knows).
    fn parse_recipient(&self, to: &str) -> Result<(AgentName, Option<BrokerId>), WireError> {
        let (name, broker) = match to.split_once('@') {
            Some((n, b)) => (n, Some(b)),
            None => (to, None),
        };
        let name = AgentName::new(name)?;
        if name.as_str() == SYSTEM {
            return Err(WireError::invalid(
                "\"system\" sends notices; it cannot receive messages",
            ));
        }
        let Some(b) = broker else {
            return Ok((name, None));
        };
        let id: BrokerId = b.parse()?;
        if id == self.inner.id {
            return Ok((name, None));
        }
        let known = self.mesh().is_some_and(|m| m.known_brokers().contains(&id));
        if !known {
            return Err(WireError::new(
                ErrorKind::UnknownRecipient,
                format!("broker {id} is not part of this mesh; check the id with `ipc-mesh status`, or address the agent by name alone"),
            ));
        }
        Ok((name, Some(id)))
    }

    /// Stores a direct message: into a local inbox, or into the outbox for the broker that
    /// holds its recipient. One write, made durable before the reply (group commit).
    #[allow(clippy::too_many_arguments)]
    fn store_direct(
        &self,
        mut s: MutexGuard<'_, State>,
        from: AgentName,
        to: AgentName,
        place: Place,
        route: Route,
        now: u64,
        (content, data, reply_to): (String, Option<String>, Option<Dot>),
        dedup_key: Option<String>,
    ) -> Outcome {
        let refusal = match place {
            Place::Inbox => {
                let max = self.inner.config.limits.inbox_max as u64;
                (Self::unread_of(&s, &to) >= max).then(|| WireError::new(
                    ErrorKind::InboxFull,
                    format!("{to}'s inbox is full ({max} unread messages); the message was not sent. Wait until {to} reads its messages, then resend"),
                ))
            }
            Place::Outbox(_) => {
                let max = self.inner.config.limits.outbox_max;
                (s.outbox_total >= max).then(|| WireError::new(
                    ErrorKind::Unavailable,
                    format!("this broker's outbox is full ({max} messages waiting for other brokers); the message was not sent. Retry when the mesh has caught up"),
                ))
            }
        };
        if let Some(e) = refusal {
            return Err(e).into();
        }
        let seq = match self.next_seq(&mut s) {
            Ok(q) => q,
            Err(e) => return Err(e).into(),
        };
        let dot = Dot::new(self.inner.id, seq);
        let message = Message {
            dot,
            from: from.clone(),
            to: to.clone(),
            sent_at_ms: now,
            content,
            data,
            reply_to,
            kind: MessageKind::Direct,
            after: s.agents.get(&from).and_then(|a| a.record.after),
        };
        let mut batch = Batch::new();
        // A moved sender's message may have to wait for what it sent at its old broker, and
        // one for a moved recipient for what this broker sent to its old broker.
        let mut held = false;
        match place {
            Place::Inbox => {
                let me = self.inner.id;
                let wait = self.route_for(&mut s, &mut batch, &to, me);
                held = self.fence_holds(&mut s, &mut batch, &to, &message, wait);
                if !held {
                    inbox::put_unread(&mut batch, &to, seq, inbox::encode_message(&message))
                }
            }
            Place::Outbox(dest) => {
                let mut env = Envelope::new(dot, dest, message, now);
                if let Some(mark) = self.route_for(&mut s, &mut batch, &to, dest) {
                    env.wait.push((to.clone(), mark));
                }
                self.enqueue(&mut s, &mut batch, seq, env)
            }
        }
        if let Some(k) = dedup_key {
            let entry = DedupEntry {
                id: dot.to_string(),
                route: route.clone(),
                at_ms: now,
            };
            s.dedup.record(&mut batch, &from, k, entry);
        }
        let epoch = match self.apply(&mut s, batch) {
            Ok(e) => e,
            Err(e) => return Err(e).into(),
        };
        if place == Place::Inbox && !held {
            *s.unread.entry(to.clone()).or_default() += 1;
            Self::wake(&s, &to);
        }
        s.last_arrival = s.last_arrival.max(seq);
        let unread = Self::unread_of(&s, &from);
        drop(s);
        self.count_stored(1);
        Outcome::AfterCommit {
            epoch,
            reply: Reply::Sent {
                id: dot.to_string(),
                route,
                unread,
            },
        }
    }

    /// Adds `env` to the batch, on this broker's chain to `env.dest`, at outbox position `seq`.
    /// Call with the lock held; the caller applies the batch.
    fn enqueue(&self, s: &mut State, batch: &mut Batch, seq: u64, mut env: Envelope) {
        let dest = env.dest;
        env.prev = s.last_to.get(&dest).copied().unwrap_or(0);
        s.last_to.insert(dest, env.tdot.seq);
        batch.put(outbox::chain_key(dest), env.tdot.seq.to_be_bytes().to_vec());
        batch.put(outbox::key(dest, seq), federation::wire::encode(&env));
        *s.outbox_depth.entry(dest).or_default() += 1;
        s.outbox_total += 1;
    }

    fn count_stored(&self, n: u64) {
        let c = &self.inner.counters;
        c.messages_accepted.fetch_add(1, Ordering::Relaxed);
        c.messages_stored.fetch_add(n, Ordering::Relaxed);
    }

    fn broadcast(&self, ctx: &SessionCtx, content: String, data: Option<String>) -> Outcome {
        let Some(from) = ctx.agent.clone() else {
            return Err(not_registered()).into();
        };
        if let Err(e) = self.validate_body(&content, &data) {
            return Err(e).into();
        }
        let now = now_ms();
        let mut s = self.state();
        // Every other broker of the mesh gets one envelope (one link send per peer), and
        // delivers it to every agent attached there; brokers unreachable now get it when they
        // come back.
        let (remote_brokers, remote_agents, recipients_at) = match self.mesh() {
            Some(m) => {
                let agents = m.agents();
                // Who the registry says is attached where: each broker's envelope names them,
                // so an agent that moved on meanwhile still gets it, forwarded.
                let mut recipients_at: BTreeMap<BrokerId, Vec<AgentName>> = BTreeMap::new();
                for e in agents
                    .iter()
                    .filter(|e| e.owner != self.inner.id && e.name != from.as_str())
                {
                    if let Ok(n) = AgentName::new(e.name.clone()) {
                        recipients_at.entry(e.owner).or_default().push(n);
                    }
                }
                let mut brokers: BTreeSet<BrokerId> = m.known_brokers().into_iter().collect();
                brokers.extend(agents.iter().map(|e| e.owner));
                // Right after a restart gossip has not caught up yet: the members this broker
                // linked with before count too.
                brokers.extend(s.members.keys().copied());
                brokers.remove(&self.inner.id);
                let n = agents
                    .iter()
                    .filter(|e| e.owner != self.inner.id && e.name != from.as_str())
                    .count() as u32;
                (brokers, n, recipients_at)
            }
            None => (BTreeSet::new(), 0, BTreeMap::new()),
        };
        // Everyone this broadcast names somewhere (or delivers here): a broker that finds one
        // of them attached to it without being named for it leaves it to the copy named
        // elsewhere, which follows a moved agent. (Else an agent that read it before moving
        // would get it twice.)
        let locals: Vec<AgentName> = s
            .agents
            .iter()
            .filter(|(n, a)| **n != from && !a.record.is_forward())
            .map(|(n, _)| n.clone())
            .collect();
        let listed: BTreeSet<AgentName> = recipients_at
            .values()
            .flatten()
            .chain(&locals)
            .cloned()
            .collect();
        // Recipients whose messages went to another broker before (they moved): the marker
        // to that broker goes first, on a lower sequence than the broadcast's.
        let me = self.inner.id;
        let mut routes = Batch::new();
        let mut local_waits: HashMap<AgentName, u64> = HashMap::new();
        for r in &locals {
            if let Some(mark) = self.route_for(&mut s, &mut routes, r, me) {
                local_waits.insert(r.clone(), mark);
            }
        }
        let mut remote_waits: BTreeMap<BrokerId, Vec<(AgentName, u64)>> = BTreeMap::new();
        for (dest, rs) in &recipients_at {
            for r in rs {
                if let Some(mark) = self.route_for(&mut s, &mut routes, r, *dest) {
                    remote_waits
                        .entry(*dest)
                        .or_default()
                        .push((r.clone(), mark));
                }
            }
        }
        let seq = match self.next_seq(&mut s) {
            Ok(q) => q,
            Err(e) => return Err(e).into(),
        };
        let dot = Dot::new(me, seq);
        let message = Message {
            dot,
            from: from.clone(),
            to: from.clone(),
            sent_at_ms: now,
            content,
            data,
            reply_to: None,
            kind: MessageKind::Broadcast,
            after: s.agents.get(&from).and_then(|a| a.record.after),
        };
        let (epoch, local, skipped) =
            match self.deliver_to_all(&mut s, routes, message.clone(), &locals, &local_waits) {
                Ok(r) => r,
                Err(e) => return Err(e).into(),
            };
        let epoch = if remote_brokers.is_empty() {
            epoch
        } else {
            let mut batch = Batch::new();
            for dest in remote_brokers {
                let recipients = recipients_at.get(&dest).cloned().unwrap_or_default();
                let mut env = Envelope::new(dot, dest, message.clone(), now);
                env.broadcast = true;
                env.wait = remote_waits.remove(&dest).unwrap_or_default();
                env.elsewhere = listed
                    .iter()
                    .filter(|n| !recipients.contains(n))
                    .cloned()
                    .collect();
                env.recipients = recipients;
                self.enqueue(&mut s, &mut batch, seq, env);
            }
            match self.apply(&mut s, batch) {
                Ok(e) => e,
                Err(e) => return Err(e).into(),
            }
        };
        let reached = local + remote_agents;
        let unread = Self::unread_of(&s, &from);
        drop(s);
        self.count_stored(local as u64);
        Outcome::AfterCommit {
            epoch,
            reply: Reply::Broadcast {
                id: dot.to_string(),
                reached,
                skipped,
                unread,
            },
        }
    }

    /// Puts broadcast `message` into the inbox of each of `recipients` (this broker's agents),
    /// in `batch`; a copy for an agent in `waits` waits for that redirect marker.
    fn deliver_to_all(
        &self,
        s: &mut State,
        mut batch: Batch,
        mut message: Message,
        recipients: &[AgentName],
        waits: &HashMap<AgentName, u64>,
    ) -> Result<(u64, u32, Vec<Skipped>), WireError> {
        let inbox_max = self.inner.config.limits.inbox_max as u64;
        let dot = message.dot;
        let mut reached = Vec::new();
        let mut skipped = Vec::new();
        let mut held = Vec::new();
        for to in recipients.iter().cloned() {
            if Self::unread_of(s, &to) >= inbox_max {
                skipped.push(Skipped {
                    name: to.to_string(),
                    reason: format!("inbox full ({inbox_max} unread)"),
                });
                continue;
            }
            message.to = to.clone();
            let wait = waits.get(&to).copied();
            if self.fence_holds(s, &mut batch, &to, &message, wait) {
                // Stored, waiting for what went before it on another path.
                held.push(to);
                continue;
            }
            inbox::put_unread(&mut batch, &to, dot.seq, inbox::encode_message(&message));
            reached.push(to);
        }
        let epoch = self.apply(s, batch)?;
        for to in &reached {
            *s.unread.entry(to.clone()).or_default() += 1;
        }
        s.last_arrival = s.last_arrival.max(dot.seq);
        for to in &reached {
            Self::wake(s, to);
        }
        Ok((epoch, (reached.len() + held.len()) as u32, skipped))
    }

    /// Unread (and, with `include_read`, read) messages of `agent`.
    pub fn fetch(
        &self,
        agent: &AgentName,
        include_read: bool,
        limit: u32,
        mark_read: bool,
    ) -> Outcome {
        let limit = limit.clamp(1, FETCH_MAX) as usize;
        let engine = &*self.inner.engine;
        // Under the lock: two reads of one inbox at once must not both take a message.
        let mut s = self.state();
        let durable = self.inner.commit.durable().arrival;
        let floor = Self::read_floor(&s, agent);
        let found = match inbox::unread(engine, agent, floor, limit, FETCH_BYTES) {
            Ok(found) => found,
            Err(e) => return Err(storage_err(e)).into(),
        };
        let mut entries = found.entries;
        let mut floor = found.floor;
        // What the reply must wait for: see [`Broker::wake`].
        let mut epoch = None;
        if mark_read && !entries.is_empty() {
            let now = now_ms();
            let mut batch = Batch::new();
            // They are the oldest unread, one run: one range marks them all.
            let (first, last) = (entries[0].arrival, entries[entries.len() - 1].arrival);
            inbox::mark_read_range(&mut batch, agent, first, last, now);
            match self.apply(&mut s, batch) {
                Ok(ep) => epoch = Some(ep),
                Err(e) => return Err(e).into(),
            }
            // Everything from the floor to the last of these is read now.
            floor = last + 1;
            let n = entries.len() as u64;
            if let Some(u) = s.unread.get_mut(agent) {
                *u = u.saturating_sub(n);
            }
        }
        if floor > Self::read_floor(&s, agent) {
            s.read_floor.insert(agent.clone(), floor);
        }
        let unread = Self::unread_of(&s, agent);
        if include_read {
            match inbox::read(engine, agent, limit, FETCH_BYTES) {
                Ok(read) => {
                    // A mark of another read may not be durable yet.
                    if !read.is_empty() {
                        epoch = epoch.or(Some(s.epoch));
                    }
                    entries.extend(read);
                    entries.sort_by_key(|e| e.arrival);
                    entries.truncate(limit);
                }
                Err(e) => return Err(storage_err(e)).into(),
            }
        }
        if entries.iter().any(|e| e.arrival > durable) {
            epoch = epoch.or(Some(s.epoch));
        }
        drop(s);
        let read_now = mark_read;
        let messages = entries
            .iter()
            .map(|e| message_view(e, read_now || e.read_at_ms.is_some()))
            .collect();
        let reply = Reply::Messages { messages, unread };
        match epoch {
            Some(epoch) => Outcome::AfterCommit { epoch, reply },
            None => Outcome::Now(Ok(reply)),
        }
    }

    /// Whether `agent` has an unread message.
    pub fn has_unread(&self, agent: &AgentName) -> bool {
        let floor = Self::read_floor(&self.state(), agent);
        matches!(inbox::unread(&*self.inner.engine, agent, floor, 1, 0), Ok(u) if !u.entries.is_empty())
    }

    /// Where a scan of `agent`'s unread messages starts (see [`inbox`]).
    fn read_floor(s: &State, agent: &AgentName) -> u64 {
        s.read_floor.get(agent).copied().unwrap_or(0)
    }

    fn ack(&self, ctx: &SessionCtx, ids: Vec<String>) -> Outcome {
        let Some(agent) = ctx.agent.clone() else {
            return Err(not_registered()).into();
        };
        let mut wanted = std::collections::HashSet::new();
        for id in ids {
            match id.parse::<Dot>() {
                Ok(d) => {
                    wanted.insert(d);
                }
                Err(e) => return Err(WireError::from(e)).into(),
            }
        }
        let mut s = self.state();
        let floor = Self::read_floor(&s, &agent);
        let entries = match inbox::find_unread(&*self.inner.engine, &agent, floor, &wanted) {
            Ok(e) => e,
            Err(e) => return Err(storage_err(e)).into(),
        };
        let now = now_ms();
        let mut batch = Batch::new();
        let mut marked = 0u32;
        for e in &entries {
            inbox::mark_read(&mut batch, &agent, e.arrival, now);
            marked += 1;
        }
        let epoch = match self.apply(&mut s, batch) {
            Ok(e) => e,
            Err(e) => return Err(e).into(),
        };
        if let Some(u) = s.unread.get_mut(&agent) {
            *u = u.saturating_sub(marked as u64);
        }
        let unread = Self::unread_of(&s, &agent);
        Outcome::AfterCommit {
            epoch,
            reply: Reply::Acked { marked, unread },
        }
    }

    fn rename(&self, ctx: &mut SessionCtx, new_name: String) -> Outcome {
        let Some(old) = ctx.agent.clone() else {
            return Err(not_registered()).into();
        };
        let new = match AgentName::new(new_name) {
            Ok(n) => n,
            Err(e) => return Err(WireError::from(e)).into(),
        };
        if new == old {
            return Err(WireError::invalid(format!("you are already called {old}"))).into();
        }
        if new.as_str() == SYSTEM {
            return Err(WireError::new(
                ErrorKind::NameTaken,
                "the name \"system\" is reserved",
            ))
            .into();
        }
        let now = now_ms();
        let mut s = self.state();
        if let Some(a) = s.agents.get(&new) {
            let free = if a.record.is_forward() {
                a.record.forward_until_ms <= now
            } else {
                self.claim_lapsed(&s, &new, a, now)
            };
            if !free {
                return Err(WireError::new(
                    ErrorKind::NameTaken,
                    format!("{new} is taken; choose another name"),
                ))
                .into();
            }
        }
        if let Some(held) = self.held_elsewhere(&new, now) {
            return Err(WireError::new(
                ErrorKind::NameTaken,
                format!(
                    "{new} is taken by an agent on broker {}; choose another name",
                    held.owner
                ),
            ))
            .into();
        }
        if s.unread.get(&new).is_some_and(|n| *n > 0) && !s.agents.contains_key(&new) {
            return Err(WireError::new(
                ErrorKind::NameTaken,
                format!("messages are being held for an agent called {new}; choose another name"),
            ))
            .into();
        }
        let Some(old_agent) = s.agents.get(&old) else {
            return Err(not_registered()).into();
        };
        let mut new_record = old_agent.record.clone();
        new_record.name = new.to_string();
        new_record.incarnation += 1;
        new_record.last_seen_ms = now;
        let forward = AgentRecord {
            name: old.to_string(),
            token_hash: Vec::new(),
            incarnation: old_agent.record.incarnation + 1,
            registered_at_ms: old_agent.record.registered_at_ms,
            last_seen_ms: now,
            forward_to: Some(new.to_string()),
            forward_until_ms: now + self.inner.config.limits.rename_forward.as_millis() as u64,
            after: None,
        };
        let online = old_agent.online;

        let mut batch = Batch::new();
        // Move the inbox, messages and read marks, to the new name.
        let engine = &*self.inner.engine;
        let (moved, old_keys) = match inbox::entries(engine, &old)
            .and_then(|e| Ok((e, inbox::all_keys(engine, &old)?)))
        {
            Ok(found) => found,
            Err(e) => return Err(storage_err(e)).into(),
        };
        for k in old_keys {
            batch.delete(k);
        }
        for mut e in moved {
            // Rewrite the stored recipient so the message reads as addressed to the new name.
            e.message.to = new.clone();
            inbox::put_unread(
                &mut batch,
                &new,
                e.arrival,
                inbox::encode_message(&e.message),
            );
            if let Some(at) = e.read_at_ms {
                inbox::mark_read(&mut batch, &new, e.arrival, at);
            }
        }
        batch.put(keys::agent(&new), federation::wire::encode(&new_record));
        batch.put(keys::agent(&old), federation::wire::encode(&forward));
        if let Err(e) = self.apply(&mut s, batch) {
            return Err(e).into();
        }
        if let Some(n) = s.unread.remove(&old) {
            s.unread.insert(new.clone(), n);
        }
        // The moved entries keep their positions, which may lie below either floor.
        s.read_floor.remove(&old);
        s.read_floor.remove(&new);
        let renamed = Agent {
            record: new_record,
            online,
        };
        self.unpublish(&old);
        self.publish(&renamed);
        s.agents.insert(new.clone(), renamed);
        s.agents.insert(
            old.clone(),
            Agent {
                record: forward,
                online: 0,
            },
        );
        // Tell everyone else.
        let notice_epoch = self.next_seq(&mut s).and_then(|seq| {
            let system = AgentName::new(SYSTEM).expect("valid");
            let dot = Dot::new(self.inner.id, seq);
            let content = format!("📝 {old} renamed to {new}");
            self.deliver_notice(&mut s, &system, &new, dot, now, content)
        });
        let epoch = match notice_epoch {
            Ok(e) => e,
            Err(e) => return Err(e).into(),
        };
        let unread = Self::unread_of(&s, &new);
        drop(s);
        ctx.agent = Some(new.clone());
        tracing::info!(old = %old, new = %new, "agent renamed");
        Outcome::AfterCommit {
            epoch,
            reply: Reply::Renamed {
                old: old.to_string(),
                new: new.to_string(),
                unread,
            },
        }
    }

    /// A notice from `system` to every registered agent except `except`.
    fn deliver_notice(
        &self,
        s: &mut State,
        system: &AgentName,
        except: &AgentName,
        dot: Dot,
        now: u64,
        content: String,
    ) -> Result<u64, WireError> {
        let inbox_max = self.inner.config.limits.inbox_max as u64;
        let recipients: Vec<AgentName> = s
            .agents
            .iter()
            .filter(|(n, a)| *n != except && !a.record.is_forward())
            .map(|(n, _)| n.clone())
            .collect();
        let mut batch = Batch::new();
        let mut reached = Vec::new();
        for to in recipients {
            // Notices are not worth refusing a rename over; a full inbox just misses one,
            // and the rename itself is visible in `list`.
            if Self::unread_of(s, &to) >= inbox_max {
                tracing::warn!(agent = %to, "inbox full; rename notice not delivered");
                continue;
            }
            let m = Message {
                dot,
                from: system.clone(),
                to: to.clone(),
                sent_at_ms: now,
                content: content.clone(),
                data: None,
                reply_to: None,
                kind: MessageKind::Notice,
                after: None,
            };
            inbox::put_unread(&mut batch, &to, dot.seq, inbox::encode_message(&m));
            reached.push(to);
        }
        let epoch = self.apply(s, batch)?;
        for to in &reached {
            *s.unread.entry(to.clone()).or_default() += 1;
        }
        s.last_arrival = s.last_arrival.max(dot.seq);
        for to in &reached {
            Self::wake(s, to);
        }
        Ok(epoch)
    }

    /// Every agent of the mesh, from the registry (this broker's own are in it too).
    fn agent_views(&self) -> Vec<AgentView> {
        if let Some(m) = self.mesh() {
            return m
                .agents()
                .into_iter()
                .map(|e| AgentView {
                    name: e.name,
                    broker: e.owner.to_string(),
                    online: e.online,
                    last_seen: rfc3339(e.last_seen_ms),
                })
                .collect();
        }
        let s = self.state();
        s.agents
            .iter()
            .filter(|(_, a)| !a.record.is_forward())
            .map(|(n, a)| AgentView {
                name: n.to_string(),
                broker: self.inner.id.to_string(),
                online: a.online > 0,
                last_seen: rfc3339(a.record.last_seen_ms),
            })
            .collect()
    }

    fn peer_views(&self) -> Vec<PeerView> {
        let Some(m) = self.mesh() else {
            return Vec::new();
        };
        let flows = m.with_node(|n| n.outflow_status());
        let now = now_ms();
        let depths = self.state().outbox_depth.clone();
        let snap = m.snapshot();
        let links = snap.links;
        let mut views: Vec<PeerView> = snap
            .peers
            .into_iter()
            .map(|p| {
                let link =
                    p.id.and_then(|id| links.iter().find(|(l, _)| *l == id).map(|(_, s)| s));
                let flow = p.id.and_then(|id| flows.iter().find(|f| f.dest == id));
                let outbox = p.id.and_then(|id| depths.get(&id).copied()).unwrap_or(0);
                PeerView {
                    id: p.id.map_or_else(|| "?".to_string(), |i| i.to_string()),
                    addr: p.addr,
                    state: p.state.as_str().to_string(),
                    rtt_ms: p.rtt_ms,
                    outbox,
                    in_flight: flow.map_or(0, |f| f.in_flight),
                    acked: flow.map_or(0, |f| f.acked),
                    oldest_ms: p
                        .id
                        .filter(|_| outbox > 0)
                        .and_then(|id| self.oldest_queued(id, now)),
                    last_heard_ms: p.last_heard_ms,
                    refused: p.refused,
                    encrypted: link.map(|l| l.encrypted),
                    bytes_in: link.map_or(0, |l| l.bytes_in),
                    throttled: link.map_or(0, |l| l.throttled),
                    throttled_ms: link.map_or(0, |l| l.throttled_ms),
                }
            })
            .collect();
        // Outboxes for brokers known only from the registry (never linked) are shown too.
        for (dest, n) in depths {
            if n > 0 && !views.iter().any(|v| v.id == dest.to_string()) {
                views.push(PeerView {
                    id: dest.to_string(),
                    addr: String::new(),
                    state: "down".into(),
                    rtt_ms: None,
                    outbox: n,
                    in_flight: 0,
                    acked: 0,
                    oldest_ms: self.oldest_queued(dest, now),
                    last_heard_ms: None,
                    refused: None,
                    encrypted: None,
                    bytes_in: 0,
                    throttled: 0,
                    throttled_ms: 0,
                });
            }
        }
        views
    }

    fn oldest_queued(&self, dest: BrokerId, now: u64) -> Option<u64> {
        let first = outbox::read(&*self.inner.engine, dest, 0, u64::MAX, 1).ok()?;
        first.first().map(|(_, e)| now.saturating_sub(e.queued_ms))
    }

    pub fn status(&self) -> StatusView {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let listen = self.inner.listen.to_string();
        let online_connections = {
            let s = self.state();
            s.agents.values().map(|a| a.online as u64).sum::<u64>()
        };
        // Taken here, not inside the literal below: a guard made there lives to the end of
        // the statement, and a second `self.state()` in it would deadlock.
        let messages_fenced = {
            let s = self.state();
            (s.fences.held_count() + s.redirects.held_count()) as u64
        };
        StatusView {
            broker: BrokerView {
                id: self.inner.id.to_string(),
                advertise: self
                    .inner
                    .config
                    .broker
                    .advertise
                    .clone()
                    .unwrap_or_else(|| listen.clone()),
                listen,
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: self.inner.started.elapsed().as_secs(),
                data_dir: self.inner.data_dir.display().to_string(),
                connections: online_connections,
            },
            peers: self.peer_views(),
            agents: self.agent_views(),
            mesh: self
                .mesh()
                .map(|m| {
                    let snap = m.snapshot();
                    let (st, now) = (snap.stats, now_ms());
                    MeshCounters {
                        links_opened: st.links_opened,
                        links_closed: st.links_closed,
                        dials: st.dials,
                        refusals: st.refusals,
                        recent_refusals: snap
                            .refusals
                            .into_iter()
                            .map(|r| RefusalView {
                                addr: r.addr,
                                reason: r.reason,
                                age_ms: now.saturating_sub(r.at_ms),
                            })
                            .collect(),
                    }
                })
                .unwrap_or_default(),
            clock: self
                .state()
                .clock
                .iter()
                .map(|(origin, o)| ClockEntry {
                    origin: origin.to_string(),
                    delivered: o.contiguous,
                })
                .collect(),
            counters: Counters {
                messages_accepted: load(&c.messages_accepted),
                messages_stored: load(&c.messages_stored),
                messages_expired: load(&c.messages_expired),
                requests: load(&c.requests),
                errors: load(&c.errors),
                rate_limited: load(&c.rate_limited),
                flushes: load(&c.flushes),
                duplicates_dropped: load(&c.duplicates),
                relayed: load(&c.relayed),
                forwarded: load(&c.forwarded),
                messages_fenced,
                fences_given_up: load(&c.fences_given_up),
                connections_refused: load(&c.connections_refused),
                auth_failures: load(&c.auth_failures),
            },
            limits: self.limits_view(),
        }
    }
}

impl Broker {
    fn limits_view(&self) -> crate::protocol::LimitsView {
        let cfg = &self.inner.config;
        let l = &cfg.limits;
        crate::protocol::LimitsView {
            rate_per_sec: l.rate_per_sec,
            rate_burst: l.rate_burst,
            max_message_bytes: l.max_message_bytes as u64,
            inbox_max: l.inbox_max as u64,
            outbox_max: l.outbox_max,
            max_connections: cfg.broker.max_connections as u64,
            frame_timeout_ms: l.frame_timeout.as_millis() as u64,
            client_auth: cfg.broker.client_auth_required(self.inner.listen),
        }
    }
}

fn message_view(e: &Entry, read: bool) -> MessageView {
    let m = &e.message;
    MessageView {
        id: m.dot.to_string(),
        from: m.from.to_string(),
        to: m.to.to_string(),
        sent_at: rfc3339(m.sent_at_ms),
        content: m.content.clone(),
        data: m.data.clone(),
        reply_to: m.reply_to.map(|d| d.to_string()),
        kind: match m.kind {
            MessageKind::Direct => "direct",
            MessageKind::Broadcast => "broadcast",
            MessageKind::Notice => "notice",
        }
        .to_string(),
        read,
    }
}

/// `data` must be a JSON object no deeper than [`MAX_JSON_DEPTH`].
pub fn validate_json_object(text: &str) -> Result<(), WireError> {
    // Check depth on the raw text first, so a hostile nesting never reaches the parser.
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(WireError::invalid(format!(
                        "data is nested deeper than {MAX_JSON_DEPTH} levels; flatten it"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(WireError::invalid(
            "data must be a JSON object, like {\"key\": \"value\"}",
        )),
        Err(e) => Err(WireError::invalid(format!("data is not valid JSON: {e}"))),
    }
}

/// Known names close to `wanted`: same letters in another case, a shared prefix, or a small
/// edit distance. At most three, closest first.
pub fn closest_names(wanted: &str, known: &[&str]) -> Vec<String> {
    let w = wanted.to_ascii_lowercase();
    let mut scored: Vec<(usize, &str)> = known
        .iter()
        .filter_map(|k| {
            let kl = k.to_ascii_lowercase();
            let d = edit_distance(&w, &kl);
            let limit = (w.len().max(kl.len()) / 3).max(2);
            if d <= limit || (w.len() >= 3 && (kl.starts_with(&w) || w.starts_with(&kl))) {
                Some((d, *k))
            } else {
                None
            }
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(3)
        .map(|(_, k)| k.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_must_be_a_shallow_object() {
        assert!(validate_json_object(r#"{"a": [1, {"b": "}}}}"}]}"#).is_ok());
        assert!(validate_json_object("[1]").is_err());
        assert!(validate_json_object("{").is_err());
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(40), "]".repeat(40));
        assert!(validate_json_object(&deep)
            .unwrap_err()
            .message
            .contains("deeper"));
        let deep_in_string = format!("{{\"a\":\"{}\"}}", "[".repeat(100));
        assert!(validate_json_object(&deep_in_string).is_ok());
    }

    #[test]
    fn closest_names_catch_typos() {
        let known = ["alice", "bob", "claude-main", "gemini"];
        assert_eq!(closest_names("alcie", &known), vec!["alice"]);
        assert_eq!(closest_names("Claude", &known), vec!["claude-main"]);
        assert!(closest_names("zzzzzzzz", &known).is_empty());
    }
}
