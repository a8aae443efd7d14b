//! The mesh node: a synchronous state machine, one per broker, with no I/O of its own.
//!
//! The driver (the tokio loop in [`crate::driver`], or the simulator in [`crate::sim`]) feeds
//! it [`Event`]s and the time, and carries out the [`Action`]s it returns:
//!
//! 1. `tick(now)`: dial the addresses it should (seeds, siblings, gossiped members) when their
//!    backoff allows; send heartbeats and gossip digests on the links that are up; close links
//!    that missed their heartbeats or handshakes; age out old registry entries.
//! 2. `Connected`/`Accepted`: a new link starts its handshake (see [`crate::auth`]).
//! 3. `Received`: handshake steps, heartbeats, digests (answered with deltas) and deltas
//!    (applied, forwarded, and checked for names this broker lost).
//! 4. `Closed`/`DialFailed`: the link is gone; the peer is down; a redial is scheduled.
//! 5. `AgentChanged`/`AgentRemoved`: the broker's own agents, pushed to every peer at once.
//!
//! The dial rule: the broker with the lower id dials. Before ids are known (seeds), anyone
//! dials; if two links to one peer come up, both sides keep the one whose dialer has the lower
//! id (or, same dialer, the newer), so a pair ends with exactly one link. A higher-id broker
//! dials a known lower-id peer only after that peer has been down for `yield_ms`, so a peer
//! that does not know our address still gets a link.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::collections::VecDeque;

use crate::auth::{self, Nonce, Secret, Side};
use crate::delivery::{Envelope, MAX_HOPS};
use crate::proto::{Member, PeerMsg};
use crate::registry::{AgentEntry, Registry, Superseded};
use crate::BrokerId;

/// About how many bytes of messages one `Deliver` frame carries.
pub const FRAME_BUDGET: usize = 4 * 1024 * 1024;

/// A connection, numbered by the driver.
pub type ConnId = u64;

/// Timers, in milliseconds. Defaults suit a LAN; tests shrink them.
#[derive(Clone, Debug)]
pub struct Timing {
    pub heartbeat_ms: u64,
    /// A link with nothing heard for this long is closed and its peer marked down.
    pub failure_ms: u64,
    pub gossip_ms: u64,
    pub handshake_ms: u64,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// How long a higher-id broker waits for a lower-id peer to dial before dialing itself.
    pub yield_ms: u64,
    /// Envelopes in flight (sent, not yet acknowledged) per destination.
    pub window: usize,
    /// With nothing acknowledged for this long, the unacknowledged envelopes go again.
    pub ack_timeout_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 500,
            failure_ms: 3000,
            gossip_ms: 1000,
            handshake_ms: 5000,
            backoff_min_ms: 100,
            backoff_max_ms: 5000,
            yield_ms: 3000,
            window: 1024,
            ack_timeout_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: BrokerId,
    /// What peers should dial to reach this broker.
    pub advertise: String,
    /// Addresses to dial from the start: configured peers, `--peer` flags.
    pub seeds: Vec<String>,
    /// Sibling brokers on this host: dialed like seeds, but not shown until they answer.
    pub siblings: Vec<String>,
    pub secret: Option<Secret>,
    pub timing: Timing,
    pub retention_ms: u64,
    /// Seeds the node's randomness (nonces, jitter). Real brokers pass OS entropy.
    pub rng_seed: u64,
    /// The wall clock at start, in ms: the floor of this broker's registry versions.
    pub started_ms: u64,
}

/// What happened, as the driver saw it.
#[derive(Clone, Debug)]
pub enum Event {
    /// A dial to `addr` connected.
    Connected {
        conn: ConnId,
        addr: String,
    },
    DialFailed {
        addr: String,
        error: String,
    },
    /// Someone dialed us.
    Accepted {
        conn: ConnId,
        remote: String,
    },
    /// The link layer refused a link before the peer protocol began (an encrypted handshake
    /// that failed, a plaintext hello where encryption is required). `dialed`: we dialed
    /// `addr`, which then counts as a failed dial; otherwise `addr` is the remote socket.
    LinkRefused {
        addr: String,
        reason: String,
        dialed: bool,
    },
    Received {
        conn: ConnId,
        msg: PeerMsg,
    },
    /// The connection is gone (by the other side or the network).
    Closed {
        conn: ConnId,
    },
    /// One of this broker's agents changed (registered, came online, went offline).
    AgentChanged {
        name: String,
        token_hash: Vec<u8>,
        incarnation: u64,
        online: bool,
        last_seen_ms: u64,
    },
    /// One of this broker's agents is gone from here (renamed away, lapsed).
    AgentRemoved {
        name: String,
    },
    /// The outboxes that hold envelopes now, and how many (after a write or a flush).
    Outbox {
        depths: Vec<(BrokerId, u64)>,
    },
    /// The answer to [`Action::ReadOutbox`].
    OutboxRead {
        dest: BrokerId,
        conn: ConnId,
        entries: Vec<(u64, Envelope)>,
    },
    /// The answer to [`Action::Accept`]: stored, durable once the store reaches `epoch`.
    Stored {
        conn: ConnId,
        dest: BrokerId,
        upto: u64,
        epoch: u64,
    },
    /// The store made everything up to `epoch` durable.
    Durable {
        epoch: u64,
    },
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Dial {
        addr: String,
    },
    Send {
        conn: ConnId,
        msg: PeerMsg,
    },
    /// Close the connection. The node has already forgotten it; no `Closed` is needed.
    Close {
        conn: ConnId,
        reason: String,
    },
    PeerUp {
        id: BrokerId,
        addr: String,
    },
    PeerDown {
        id: BrokerId,
        reason: String,
    },
    /// One of this broker's agents lost its name to another broker's entry.
    Superseded(Superseded),
    /// A link was refused (by us or by the peer): logged, and shown in status.
    Refused {
        addr: String,
        reason: String,
    },
    /// Read up to `limit` durable envelopes for `dest` after `after`; answer with
    /// [`Event::OutboxRead`].
    ReadOutbox {
        dest: BrokerId,
        conn: ConnId,
        after: u64,
        limit: usize,
    },
    /// Store what arrived; answer with [`Event::Stored`].
    Accept {
        conn: ConnId,
        dest: BrokerId,
        upto: u64,
        entries: Vec<Envelope>,
    },
    /// The next hop has everything for `dest` up to `upto`: delete it.
    Trim {
        dest: BrokerId,
        upto: u64,
    },
}

/// A peer as `status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerStatus {
    pub id: Option<BrokerId>,
    pub addr: String,
    pub state: LinkState,
    pub rtt_ms: Option<f64>,
    /// Milliseconds since anything was heard on the link.
    pub last_heard_ms: Option<u64>,
    /// Why the last attempt was refused, if it was.
    pub refused: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Up,
    Connecting,
    Down,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Connecting => "connecting",
            LinkState::Down => "down",
        }
    }
}

#[derive(Clone, Debug)]
struct PeerInfo {
    id: BrokerId,
    boot: u64,
    advertise: String,
}

#[derive(Debug)]
enum Stage {
    /// Acceptor, before the dialer's hello.
    AwaitHello,
    /// Dialer, hello sent.
    AwaitChallenge {
        nonce: Nonce,
    },
    /// Acceptor, challenge sent.
    AwaitProof {
        peer: PeerInfo,
        dialer_nonce: Nonce,
        my_nonce: Nonce,
    },
    /// Dialer, proof sent.
    AwaitReady {
        peer: PeerInfo,
    },
    Up {
        peer: PeerInfo,
    },
}

#[derive(Debug)]
struct Link {
    /// The dialed address, or the remote socket address of an accepted link.
    addr: String,
    dialer: bool,
    opened: u64,
    last_heard: u64,
    last_ping: u64,
    last_gossip: u64,
    stage: Stage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Seed,
    Sibling,
    Gossip,
}

#[derive(Debug)]
struct Addr {
    id: Option<BrokerId>,
    source: Source,
    dialing: bool,
    backoff: u64,
    next_attempt: u64,
    refused: Option<String>,
    is_self: bool,
    /// Answered at least once (siblings are listed only after that).
    answered: bool,
}

#[derive(Debug)]
struct Peer {
    addr: String,
    link: Option<ConnId>,
    boot: u64,
    rtt_ms: Option<f64>,
    last_heard: Option<u64>,
    down_since: u64,
}

/// Counters for status and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub links_opened: u64,
    pub links_closed: u64,
    pub dials: u64,
    pub refusals: u64,
    /// Envelopes sent (including retransmissions) and acknowledged.
    pub envelopes_sent: u64,
    pub envelopes_acked: u64,
    pub envelopes_received: u64,
}

/// One outbox as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutflowStatus {
    pub dest: BrokerId,
    /// Envelopes waiting (including those in flight).
    pub depth: u64,
    pub in_flight: u64,
    /// The highest position acknowledged by the next hop.
    pub acked: u64,
    /// The peer it currently goes through (the destination itself, or a relay).
    pub via: Option<BrokerId>,
}

/// The sending side of one destination's outbox.
#[derive(Debug, Default)]
struct Outflow {
    /// The link it streams over now.
    path: Option<ConnId>,
    acked: u64,
    sent: u64,
    in_flight: VecDeque<u64>,
    /// A read of the outbox is under way.
    reading: bool,
    depth: u64,
    /// When the last acknowledgement came (or the first send since), for retransmission.
    progress_at: u64,
}

pub struct Node {
    cfg: NodeConfig,
    boot: u64,
    rng: StdRng,
    links: BTreeMap<ConnId, Link>,
    addrs: BTreeMap<String, Addr>,
    peers: BTreeMap<BrokerId, Peer>,
    registry: Registry,
    stats: NodeStats,
    last_age_out: u64,
    out: Vec<Action>,
    outflows: BTreeMap<BrokerId, Outflow>,
    /// The brokers each peer reaches directly, from its digests.
    reach: BTreeMap<BrokerId, Vec<BrokerId>>,
    /// Acknowledgements waiting for the store's flush: (conn, dest, upto, epoch).
    pending_acks: Vec<(ConnId, BrokerId, u64, u64)>,
    durable: u64,
}

impl Node {
    pub fn new(cfg: NodeConfig) -> Node {
        let mut rng = StdRng::seed_from_u64(cfg.rng_seed);
        let boot = rng.random();
        let mut node = Node {
            registry: Registry::new(cfg.id, cfg.started_ms.saturating_mul(1000)),
            boot,
            rng,
            links: BTreeMap::new(),
            addrs: BTreeMap::new(),
            peers: BTreeMap::new(),
            stats: NodeStats::default(),
            last_age_out: 0,
            out: Vec::new(),
            outflows: BTreeMap::new(),
            reach: BTreeMap::new(),
            pending_acks: Vec::new(),
            durable: 0,
            cfg,
        };
        for s in node.cfg.seeds.clone() {
            node.learn_addr(&s, None, Source::Seed);
        }
        for s in node.cfg.siblings.clone() {
            node.learn_addr(&s, None, Source::Sibling);
        }
        node
    }

    pub fn id(&self) -> BrokerId {
        self.cfg.id
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Adds a seed address at run time (e.g. `--peer`).
    pub fn add_seed(&mut self, addr: &str) {
        self.learn_addr(addr, None, Source::Seed);
    }

    /// The peers `status` lists: every broker known by id, and seeds not reached yet.
    pub fn peer_status(&self, now: u64) -> Vec<PeerStatus> {
        let mut out = Vec::new();
        for (id, p) in &self.peers {
            let addr_state = self.addrs.get(&p.addr);
            let connecting = addr_state.is_some_and(|a| a.dialing)
                || self.links.values().any(|l| {
                    matches!(&l.stage, Stage::AwaitReady { peer } | Stage::AwaitProof { peer, .. } if peer.id == *id)
                });
            out.push(PeerStatus {
                id: Some(*id),
                addr: p.addr.clone(),
                state: if p.link.is_some() {
                    LinkState::Up
                } else if connecting {
                    LinkState::Connecting
                } else {
                    LinkState::Down
                },
                rtt_ms: p.rtt_ms,
                last_heard_ms: p.last_heard.map(|t| now.saturating_sub(t)),
                refused: if p.link.is_some() {
                    None
                } else {
                    addr_state.and_then(|a| a.refused.clone())
                },
            });
        }
        for (addr, a) in &self.addrs {
            let listed = a.id.is_some_and(|id| self.peers.contains_key(&id));
            let worth_showing = a.source == Source::Seed || a.answered || a.refused.is_some();
            if a.is_self || listed || !worth_showing {
                continue;
            }
            out.push(PeerStatus {
                id: a.id,
                addr: addr.clone(),
                state: if a.dialing {
                    LinkState::Connecting
                } else {
                    LinkState::Down
                },
                rtt_ms: None,
                last_heard_ms: None,
                refused: a.refused.clone(),
            });
        }
        out
    }

    /// The connection of the link to `id`, while it is up.
    pub fn link_of(&self, id: BrokerId) -> Option<ConnId> {
        self.peers.get(&id).and_then(|p| p.link)
    }

    /// Every broker this node has heard of (linked or not).
    pub fn known_brokers(&self) -> Vec<BrokerId> {
        self.peers.keys().copied().collect()
    }

    /// Ids of the peers with a link up now.
    pub fn up_peers(&self) -> Vec<BrokerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.link.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Advances timers.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        self.dial_due(now);
        let t = self.cfg.timing.clone();
        let mut to_close = Vec::new();
        let mut pings = Vec::new();
        let mut gossip = Vec::new();
        for (conn, l) in &mut self.links {
            match l.stage {
                Stage::Up { .. } => {
                    if now.saturating_sub(l.last_heard) > t.failure_ms {
                        to_close.push((*conn, "no heartbeat".to_string()));
                        continue;
                    }
                    if now.saturating_sub(l.last_ping) >= t.heartbeat_ms {
                        l.last_ping = now;
                        pings.push(*conn);
                    }
                    if now.saturating_sub(l.last_gossip) >= t.gossip_ms {
                        l.last_gossip = now;
                        gossip.push(*conn);
                    }
                }
                _ => {
                    if now.saturating_sub(l.opened) > t.handshake_ms {
                        to_close.push((*conn, "handshake timed out".to_string()));
                    }
                }
            }
        }
        for (conn, reason) in to_close {
            self.close(now, conn, &reason);
        }
        for conn in pings {
            self.send(conn, PeerMsg::Ping { t: now });
        }
        for conn in gossip {
            let d = self.digest();
            self.send(conn, d);
        }
        if now.saturating_sub(self.last_age_out) >= t.gossip_ms {
            self.last_age_out = now;
            self.registry.age_out(now, self.cfg.retention_ms);
        }
        let timeout = t.ack_timeout_ms;
        for of in self.outflows.values_mut() {
            if !of.in_flight.is_empty() && now.saturating_sub(of.progress_at) > timeout {
                // Acknowledgements stopped coming on a link that still looks alive: send the
                // unacknowledged again (the receiver drops what it already has).
                of.sent = of.acked;
                of.in_flight.clear();
                of.reading = false;
                of.progress_at = now;
            }
        }
        self.pump();
        std::mem::take(&mut self.out)
    }

    /// Handles one event.
    pub fn step(&mut self, now: u64, event: Event) -> Vec<Action> {
        match event {
            Event::Connected { conn, addr } => {
                if let Some(a) = self.addrs.get_mut(&addr) {
                    a.dialing = false;
                }
                let nonce: Nonce = self.rng.random();
                self.links.insert(
                    conn,
                    Link {
                        addr,
                        dialer: true,
                        opened: now,
                        last_heard: now,
                        last_ping: now,
                        last_gossip: now,
                        stage: Stage::AwaitChallenge { nonce },
                    },
                );
                self.stats.links_opened += 1;
                let hello = PeerMsg::Hello {
                    id: self.cfg.id,
                    boot: self.boot,
                    advertise: self.cfg.advertise.clone(),
                    nonce: nonce.to_vec(),
                    secured: self.cfg.secret.is_some(),
                };
                self.send(conn, hello);
            }
            Event::DialFailed { addr, error: _ } => self.dial_failed(now, &addr),
            Event::LinkRefused {
                addr,
                reason,
                dialed,
            } => {
                if dialed {
                    self.note_refusal(&addr, None, &reason);
                    self.dial_failed(now, &addr);
                } else {
                    // Not an address to dial: only counted and reported.
                    self.stats.refusals += 1;
                    self.out.push(Action::Refused { addr, reason });
                }
            }
            Event::Accepted { conn, remote } => {
                self.links.insert(
                    conn,
                    Link {
                        addr: remote,
                        dialer: false,
                        opened: now,
                        last_heard: now,
                        last_ping: now,
                        last_gossip: now,
                        stage: Stage::AwaitHello,
                    },
                );
                self.stats.links_opened += 1;
            }
            Event::Received { conn, msg } => self.received(now, conn, msg),
            Event::Closed { conn } => self.forget_link(now, conn, "connection closed"),
            Event::AgentChanged {
                name,
                token_hash,
                incarnation,
                online,
                last_seen_ms,
            } => {
                let e = self.registry.upsert_local(
                    &name,
                    token_hash,
                    incarnation,
                    online,
                    last_seen_ms,
                );
                self.broadcast_delta(vec![e], None);
            }
            Event::AgentRemoved { name } => {
                if let Some(e) = self.registry.remove_local(&name, now) {
                    self.broadcast_delta(vec![e], None);
                }
            }
            Event::Outbox { depths } => {
                for of in self.outflows.values_mut() {
                    of.depth = 0;
                }
                for (dest, n) in depths {
                    if dest != self.cfg.id {
                        self.outflows.entry(dest).or_default().depth = n;
                    }
                }
                self.pump();
            }
            Event::OutboxRead {
                dest,
                conn,
                entries,
            } => self.outbox_read(now, dest, conn, entries),
            Event::Stored {
                conn,
                dest,
                upto,
                epoch,
            } => {
                self.pending_acks.push((conn, dest, upto, epoch));
                self.send_due_acks();
            }
            Event::Durable { epoch } => {
                self.durable = self.durable.max(epoch);
                self.send_due_acks();
                self.pump();
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Outboxes as `status` shows them.
    pub fn outflow_status(&self) -> Vec<OutflowStatus> {
        self.outflows
            .iter()
            .map(|(dest, of)| OutflowStatus {
                dest: *dest,
                depth: of.depth,
                in_flight: of.in_flight.len() as u64,
                acked: of.acked,
                via: of.path.and_then(|c| self.peer_of(c)),
            })
            .collect()
    }

    /// The link an envelope for `dest` should take: its own, else a peer that reaches it.
    fn path_to(&self, dest: BrokerId) -> Option<ConnId> {
        if let Some(c) = self.peers.get(&dest).and_then(|p| p.link) {
            return Some(c);
        }
        self.reach
            .iter()
            .filter(|(via, reached)| **via != dest && reached.contains(&dest))
            .filter_map(|(via, _)| self.peers.get(via).and_then(|p| p.link))
            .next()
    }

    /// Starts outbox reads wherever a path exists and the window has room.
    fn pump(&mut self) {
        let window = self.cfg.timing.window;
        let dests: Vec<BrokerId> = self.outflows.keys().copied().collect();
        for dest in dests {
            let path = self.path_to(dest);
            let of = self.outflows.get_mut(&dest).expect("listed");
            if of.path != path {
                // A new path: everything unacknowledged goes again, in order, over it.
                of.path = path;
                of.sent = of.acked;
                of.in_flight.clear();
                of.reading = false;
            }
            let Some(conn) = of.path else { continue };
            if of.reading || of.depth == 0 || of.in_flight.len() >= window {
                continue;
            }
            of.reading = true;
            let (after, limit) = (of.sent, window - of.in_flight.len());
            self.out.push(Action::ReadOutbox {
                dest,
                conn,
                after,
                limit,
            });
        }
    }

    fn outbox_read(
        &mut self,
        now: u64,
        dest: BrokerId,
        conn: ConnId,
        mut entries: Vec<(u64, Envelope)>,
    ) {
        let relay = self.peers.get(&dest).and_then(|p| p.link) != Some(conn);
        let Some(of) = self.outflows.get_mut(&dest) else {
            return;
        };
        of.reading = false;
        if of.path != Some(conn) {
            // The path changed while reading; pump reads again from the right place.
            self.pump();
            return;
        }
        entries.retain(|(pos, _)| *pos > of.sent);
        if relay {
            // Past the hop limit only the destination's own link may carry an envelope.
            if let Some(i) = entries.iter().position(|(_, e)| e.hops >= MAX_HOPS) {
                entries.truncate(i);
            }
        }
        // One frame carries at most about FRAME_BUDGET bytes of messages (always at least one
        // envelope), well under the peer frame limit; the rest goes in the next frame.
        let mut bytes = 0usize;
        let mut truncated = false;
        if let Some(cut) = entries.iter().position(|(_, e)| {
            bytes += e.message.content.len() + e.message.data.as_ref().map_or(0, |d| d.len()) + 256;
            bytes > FRAME_BUDGET
        }) {
            entries.truncate(cut.max(1));
            truncated = true;
        }
        if entries.is_empty() {
            return;
        }
        let last = entries.last().map(|(p, _)| *p).expect("non-empty");
        let full =
            truncated || entries.len() >= self.cfg.timing.window.saturating_sub(of.in_flight.len());
        if of.in_flight.is_empty() {
            of.progress_at = now;
        }
        of.in_flight.extend(entries.iter().map(|(p, _)| *p));
        of.sent = last;
        self.stats.envelopes_sent += entries.len() as u64;
        self.send(conn, PeerMsg::Deliver { dest, entries });
        if !full {
            // Everything durable was read: the next read waits for new envelopes.
            if let Some(of) = self.outflows.get_mut(&dest) {
                of.depth = of.depth.min(of.in_flight.len() as u64);
            }
        }
        self.pump();
    }

    /// Sends the acknowledgements whose writes are durable, one per link and destination.
    fn send_due_acks(&mut self) {
        let durable = self.durable;
        let (due, waiting): (Vec<_>, Vec<_>) = self
            .pending_acks
            .drain(..)
            .partition(|(_, _, _, e)| *e <= durable);
        self.pending_acks = waiting;
        let mut best: BTreeMap<(ConnId, BrokerId), u64> = BTreeMap::new();
        for (conn, dest, upto, _) in due {
            let e = best.entry((conn, dest)).or_default();
            *e = (*e).max(upto);
        }
        for ((conn, dest), upto) in best {
            if self.links.contains_key(&conn) {
                self.send(conn, PeerMsg::DeliverAck { dest, upto });
            }
        }
    }

    fn send(&mut self, conn: ConnId, msg: PeerMsg) {
        self.out.push(Action::Send { conn, msg });
    }

    fn digest(&self) -> PeerMsg {
        let mut members: Vec<Member> = self
            .peers
            .iter()
            .map(|(id, p)| Member {
                id: *id,
                addr: p.addr.clone(),
            })
            .collect();
        members.push(Member {
            id: self.cfg.id,
            addr: self.cfg.advertise.clone(),
        });
        PeerMsg::Digest {
            members,
            versions: self.registry.digest(),
            reach: self.up_peers(),
        }
    }

    fn learn_addr(&mut self, addr: &str, id: Option<BrokerId>, source: Source) {
        if addr == self.cfg.advertise {
            return;
        }
        let min = self.cfg.timing.backoff_min_ms;
        let a = self.addrs.entry(addr.to_string()).or_insert(Addr {
            id,
            source,
            dialing: false,
            backoff: min,
            next_attempt: 0,
            refused: None,
            is_self: false,
            answered: false,
        });
        if id.is_some() {
            a.id = id;
        }
        if source == Source::Seed {
            a.source = Source::Seed;
        }
    }

    /// Starts the dials that are due.
    fn dial_due(&mut self, now: u64) {
        let me = self.cfg.id;
        let yield_ms = self.cfg.timing.yield_ms;
        let mut due = Vec::new();
        for (addr, a) in &self.addrs {
            if a.is_self || a.dialing || a.next_attempt > now {
                continue;
            }
            let ok = match a.id {
                None => true,
                Some(id) => match self.peers.get(&id) {
                    Some(p) if p.link.is_some() => false,
                    Some(p) if p.addr != *addr => false,
                    Some(p) => me < id || now.saturating_sub(p.down_since) >= yield_ms,
                    None => true,
                },
            };
            // Not while a handshake with that address is already under way.
            let busy = self
                .links
                .values()
                .any(|l| l.addr == *addr && !matches!(l.stage, Stage::Up { .. }));
            if ok && !busy {
                due.push(addr.clone());
            }
        }
        for addr in due {
            if let Some(a) = self.addrs.get_mut(&addr) {
                a.dialing = true;
            }
            self.stats.dials += 1;
            self.out.push(Action::Dial { addr });
        }
    }

    fn dial_failed(&mut self, now: u64, addr: &str) {
        let (min, max) = (
            self.cfg.timing.backoff_min_ms,
            self.cfg.timing.backoff_max_ms,
        );
        let jitter: f64 = self.rng.random_range(0.5..1.5);
        if let Some(a) = self.addrs.get_mut(addr) {
            a.dialing = false;
            a.next_attempt = now + (a.backoff as f64 * jitter) as u64;
            a.backoff = (a.backoff * 2).clamp(min, max);
        }
    }

    fn received(&mut self, now: u64, conn: ConnId, msg: PeerMsg) {
        let Some(link) = self.links.get_mut(&conn) else {
            return;
        };
        link.last_heard = now;
        let stage = std::mem::replace(&mut link.stage, Stage::AwaitHello);
        let dialed_addr = link.addr.clone();
        match (stage, msg) {
            (_, PeerMsg::Refused { reason }) => {
                self.note_refusal(
                    &dialed_addr,
                    None,
                    &format!("refused by the peer: {reason}"),
                );
                self.close_quietly(now, conn);
                self.dial_failed(now, &dialed_addr);
            }
            (
                Stage::AwaitHello,
                PeerMsg::Hello {
                    id,
                    boot,
                    advertise,
                    nonce,
                    secured,
                },
            ) => {
                if id == self.cfg.id {
                    self.refuse(now, conn, &advertise, Some(id), "connected to itself");
                    return;
                }
                let Ok(dialer_nonce) = <Nonce>::try_from(nonce.as_slice()) else {
                    self.refuse(now, conn, &advertise, Some(id), "malformed nonce");
                    return;
                };
                if let Some(reason) = self.secret_mismatch(secured) {
                    self.refuse(now, conn, &advertise, Some(id), &reason);
                    return;
                }
                let my_nonce: Nonce = self.rng.random();
                let proof = match &self.cfg.secret {
                    Some(s) => {
                        auth::proof(s, Side::Acceptor, &dialer_nonce, &my_nonce, id, self.cfg.id)
                    }
                    None => Vec::new(),
                };
                let challenge = PeerMsg::Challenge {
                    id: self.cfg.id,
                    boot: self.boot,
                    advertise: self.cfg.advertise.clone(),
                    nonce: my_nonce.to_vec(),
                    secured: self.cfg.secret.is_some(),
                    proof,
                };
                self.set_stage(
                    conn,
                    Stage::AwaitProof {
                        peer: PeerInfo {
                            id,
                            boot,
                            advertise,
                        },
                        dialer_nonce,
                        my_nonce,
                    },
                );
                self.send(conn, challenge);
            }
            (
                Stage::AwaitChallenge { nonce: my_nonce },
                PeerMsg::Challenge {
                    id,
                    boot,
                    advertise,
                    nonce,
                    secured,
                    proof,
                },
            ) => {
                if id == self.cfg.id {
                    if let Some(a) = self.addrs.get_mut(&dialed_addr) {
                        a.is_self = true;
                    }
                    self.close(now, conn, "connected to itself");
                    return;
                }
                if let Some(a) = self.addrs.get_mut(&dialed_addr) {
                    a.id = Some(id);
                    a.answered = true;
                }
                let Ok(their_nonce) = <Nonce>::try_from(nonce.as_slice()) else {
                    self.refuse(now, conn, &dialed_addr, Some(id), "malformed nonce");
                    return;
                };
                if let Some(reason) = self.secret_mismatch(secured) {
                    self.refuse(now, conn, &dialed_addr, Some(id), &reason);
                    return;
                }
                let my_proof = match &self.cfg.secret {
                    Some(s) => {
                        if !auth::verify(
                            s,
                            Side::Acceptor,
                            &my_nonce,
                            &their_nonce,
                            self.cfg.id,
                            id,
                            &proof,
                        ) {
                            self.refuse(
                                now,
                                conn,
                                &dialed_addr,
                                Some(id),
                                "the peer could not prove it knows the mesh secret (wrong secret?)",
                            );
                            return;
                        }
                        auth::proof(s, Side::Dialer, &my_nonce, &their_nonce, self.cfg.id, id)
                    }
                    None => Vec::new(),
                };
                self.set_stage(
                    conn,
                    Stage::AwaitReady {
                        peer: PeerInfo {
                            id,
                            boot,
                            advertise,
                        },
                    },
                );
                self.send(conn, PeerMsg::Proof { proof: my_proof });
            }
            (
                Stage::AwaitProof {
                    peer,
                    dialer_nonce,
                    my_nonce,
                },
                PeerMsg::Proof { proof },
            ) => {
                if let Some(s) = &self.cfg.secret {
                    if !auth::verify(
                        s,
                        Side::Dialer,
                        &dialer_nonce,
                        &my_nonce,
                        peer.id,
                        self.cfg.id,
                        &proof,
                    ) {
                        let adv = peer.advertise.clone();
                        self.refuse(
                            now,
                            conn,
                            &adv,
                            Some(peer.id),
                            "the peer could not prove it knows the mesh secret (wrong secret?)",
                        );
                        return;
                    }
                }
                self.send(conn, PeerMsg::Ready);
                self.link_up(now, conn, peer);
            }
            (Stage::AwaitReady { peer }, PeerMsg::Ready) => self.link_up(now, conn, peer),
            (stage @ Stage::Up { .. }, msg) => {
                self.set_stage(conn, stage);
                self.on_link_msg(now, conn, msg);
            }
            (_, msg) => {
                let reason = format!(
                    "protocol violation: unexpected {} during the handshake",
                    msg.kind()
                );
                let addr = dialed_addr.clone();
                self.refuse(now, conn, &addr, None, &reason);
            }
        }
    }

    fn set_stage(&mut self, conn: ConnId, stage: Stage) {
        if let Some(l) = self.links.get_mut(&conn) {
            l.stage = stage;
        }
    }

    /// Why a link cannot be authenticated, when one side has a secret and the other does not.
    fn secret_mismatch(&self, peer_secured: bool) -> Option<String> {
        match (self.cfg.secret.is_some(), peer_secured) {
            (true, false) => Some("the peer has no mesh secret; this mesh requires one".into()),
            (false, true) => {
                Some("the peer requires a mesh secret and this broker has none".into())
            }
            _ => None,
        }
    }

    fn note_refusal(&mut self, addr: &str, id: Option<BrokerId>, reason: &str) {
        self.stats.refusals += 1;
        if !addr.is_empty() {
            self.learn_addr(addr, id, Source::Gossip);
            if let Some(a) = self.addrs.get_mut(addr) {
                a.refused = Some(reason.to_string());
                a.answered = true;
            }
        }
        self.out.push(Action::Refused {
            addr: addr.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Refuses a link: tells the peer why, records it for status, closes.
    fn refuse(&mut self, now: u64, conn: ConnId, addr: &str, id: Option<BrokerId>, reason: &str) {
        self.send(
            conn,
            PeerMsg::Refused {
                reason: reason.to_string(),
            },
        );
        self.note_refusal(addr, id, reason);
        let dialer = self.links.get(&conn).is_some_and(|l| l.dialer);
        let dialed = self.links.get(&conn).map(|l| l.addr.clone());
        self.close(now, conn, reason);
        if dialer {
            if let Some(d) = dialed {
                self.dial_failed(now, &d);
            }
        }
    }

    fn link_up(&mut self, now: u64, conn: ConnId, peer: PeerInfo) {
        let me = self.cfg.id;
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        let new_dialer = if link.dialer { me } else { peer.id };
        let dialed_addr = link.dialer.then(|| link.addr.clone());
        if let Some(old) = self.peers.get(&peer.id).and_then(|p| p.link) {
            if old != conn {
                let same_boot = self.peers[&peer.id].boot == peer.boot;
                let old_dialer = match self.links.get(&old) {
                    Some(l) if l.dialer => me,
                    _ => peer.id,
                };
                // The lower dialer's link wins; with the same dialer (or a restarted peer),
                // the newer link does.
                let keep_old = same_boot && old_dialer < new_dialer;
                if keep_old {
                    self.close(now, conn, "duplicate link");
                    return;
                }
                self.close(now, old, "replaced by a newer link");
            }
        }
        if let Some(l) = self.links.get_mut(&conn) {
            l.stage = Stage::Up { peer: peer.clone() };
            l.last_gossip = now;
        }
        self.learn_addr(&peer.advertise, Some(peer.id), Source::Gossip);
        for a in [Some(peer.advertise.clone()), dialed_addr]
            .into_iter()
            .flatten()
        {
            if let Some(a) = self.addrs.get_mut(&a) {
                a.id = Some(peer.id);
                a.backoff = self.cfg.timing.backoff_min_ms;
                a.refused = None;
                a.answered = true;
                a.dialing = false;
            }
        }
        let p = self.peers.entry(peer.id).or_insert(Peer {
            addr: peer.advertise.clone(),
            link: None,
            boot: peer.boot,
            rtt_ms: None,
            last_heard: None,
            down_since: now,
        });
        p.addr = peer.advertise.clone();
        p.link = Some(conn);
        p.boot = peer.boot;
        p.last_heard = Some(now);
        self.out.push(Action::PeerUp {
            id: peer.id,
            addr: peer.advertise,
        });
        // Only the new peer now: pushing to everyone on every link-up makes brokers learn of
        // each other on both sides at once and dial simultaneously (duplicate links).
        let d = self.digest();
        self.send(conn, d);
        self.pump();
    }

    /// Sends a digest to every peer that is up now.
    fn push_digest(&mut self) {
        let d = self.digest();
        let conns: Vec<ConnId> = self.peers.values().filter_map(|p| p.link).collect();
        for conn in conns {
            self.send(conn, d.clone());
        }
    }

    fn on_link_msg(&mut self, now: u64, conn: ConnId, msg: PeerMsg) {
        let Some(peer) = self.peer_of(conn) else {
            return;
        };
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_heard = Some(now);
        }
        match msg {
            PeerMsg::Ping { t } => self.send(conn, PeerMsg::Pong { t }),
            PeerMsg::Pong { t } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rtt_ms = Some(now.saturating_sub(t) as f64);
                }
            }
            PeerMsg::Digest {
                members,
                versions,
                reach,
            } => {
                for m in members {
                    self.learn_member(m);
                }
                if self.reach.get(&peer) != Some(&reach) {
                    self.reach.insert(peer, reach);
                    self.pump();
                }
                let entries = self.registry.delta_since(&versions);
                if !entries.is_empty() {
                    self.send(conn, PeerMsg::Delta { entries });
                }
            }
            PeerMsg::Delta { entries } => {
                let changed = self.registry.apply(entries);
                if changed.is_empty() {
                    return;
                }
                self.broadcast_delta(changed, Some(conn));
                let (lost, tombstones) = self.registry.take_superseded(now);
                for s in lost {
                    self.out.push(Action::Superseded(s));
                }
                if !tombstones.is_empty() {
                    self.broadcast_delta(tombstones, None);
                }
            }
            PeerMsg::Deliver { dest, entries } => {
                let Some(upto) = entries.last().map(|(p, _)| *p) else {
                    return;
                };
                self.stats.envelopes_received += entries.len() as u64;
                self.out.push(Action::Accept {
                    conn,
                    dest,
                    upto,
                    entries: entries.into_iter().map(|(_, e)| e).collect(),
                });
            }
            PeerMsg::DeliverAck { dest, upto } => {
                if let Some(of) = self.outflows.get_mut(&dest) {
                    if upto > of.acked {
                        let before = of.in_flight.len();
                        while of.in_flight.front().is_some_and(|p| *p <= upto) {
                            of.in_flight.pop_front();
                        }
                        let n = (before - of.in_flight.len()) as u64;
                        of.depth = of.depth.saturating_sub(n);
                        of.acked = upto;
                        of.progress_at = now;
                        self.stats.envelopes_acked += n;
                        self.out.push(Action::Trim { dest, upto });
                        self.pump();
                    }
                }
            }
            other => {
                let reason = format!(
                    "protocol violation: {} on an established link",
                    other.kind()
                );
                self.close(now, conn, &reason);
            }
        }
    }

    /// A broker someone gossiped: remember where to dial it.
    fn learn_member(&mut self, m: Member) {
        if m.id == self.cfg.id {
            return;
        }
        if let Some(p) = self.peers.get_mut(&m.id) {
            if p.addr != m.addr && p.link.is_none() {
                // It moved (restarted on a new address): forget the old address unless
                // someone configured it.
                let old = std::mem::replace(&mut p.addr, m.addr.clone());
                if self
                    .addrs
                    .get(&old)
                    .is_some_and(|a| a.source != Source::Seed)
                {
                    self.addrs.remove(&old);
                }
            }
        }
        self.learn_addr(&m.addr, Some(m.id), Source::Gossip);
    }

    /// Sends entries to every peer that is up, except `skip`.
    fn broadcast_delta(&mut self, entries: Vec<AgentEntry>, skip: Option<ConnId>) {
        let conns: Vec<ConnId> = self
            .peers
            .values()
            .filter_map(|p| p.link)
            .filter(|c| Some(*c) != skip)
            .collect();
        for conn in conns {
            self.send(
                conn,
                PeerMsg::Delta {
                    entries: entries.clone(),
                },
            );
        }
    }

    fn peer_of(&self, conn: ConnId) -> Option<BrokerId> {
        match &self.links.get(&conn)?.stage {
            Stage::Up { peer } => Some(peer.id),
            _ => None,
        }
    }

    /// Closes a link we decided to close.
    fn close(&mut self, now: u64, conn: ConnId, reason: &str) {
        if self.links.contains_key(&conn) {
            self.out.push(Action::Close {
                conn,
                reason: reason.to_string(),
            });
            self.forget_link(now, conn, reason);
        }
    }

    /// Closes without telling the peer anything more (it refused us).
    fn close_quietly(&mut self, now: u64, conn: ConnId) {
        self.close(now, conn, "refused");
    }

    fn forget_link(&mut self, now: u64, conn: ConnId, reason: &str) {
        let Some(link) = self.links.remove(&conn) else {
            return;
        };
        self.stats.links_closed += 1;
        match link.stage {
            Stage::Up { peer } => {
                self.reach.remove(&peer.id);
                self.pending_acks.retain(|(c, ..)| *c != conn);
                for of in self.outflows.values_mut() {
                    if of.path == Some(conn) {
                        of.path = None;
                        of.sent = of.acked;
                        of.in_flight.clear();
                        of.reading = false;
                    }
                }
                if let Some(p) = self.peers.get_mut(&peer.id) {
                    if p.link == Some(conn) {
                        p.link = None;
                        p.down_since = now;
                        self.out.push(Action::PeerDown {
                            id: peer.id,
                            reason: reason.to_string(),
                        });
                        // Peers relay by what we reach: tell them at once.
                        self.push_digest();
                    }
                }
            }
            _ if link.dialer => self.dial_failed(now, &link.addr),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32, secret: &str, seed: u64) -> Node {
        Node::new(NodeConfig {
            id: BrokerId::from_u32(id),
            advertise: format!("n{id}:1"),
            seeds: Vec::new(),
            siblings: Vec::new(),
            secret: Some(Secret::new(secret.as_bytes().to_vec()).unwrap()),
            timing: Timing::default(),
            retention_ms: 1_000_000,
            rng_seed: seed,
            started_ms: 0,
        })
    }

    fn sent(actions: &[Action]) -> Vec<PeerMsg> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { msg, .. } => Some(msg.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_recorded_handshake_cannot_be_replayed() {
        let secret = "shared secret of sixteen+ bytes";
        let mut acceptor = node(1, secret, 1);
        let mut dialer = node(2, secret, 2);

        // A genuine handshake, recorded.
        let hello = sent(&dialer.step(
            0,
            Event::Connected {
                conn: 1,
                addr: "n1:1".into(),
            },
        ));
        acceptor.step(
            0,
            Event::Accepted {
                conn: 1,
                remote: "x".into(),
            },
        );
        let challenge = sent(&acceptor.step(
            0,
            Event::Received {
                conn: 1,
                msg: hello[0].clone(),
            },
        ));
        let proof = sent(&dialer.step(
            0,
            Event::Received {
                conn: 1,
                msg: challenge[0].clone(),
            },
        ));
        let ready = acceptor.step(
            0,
            Event::Received {
                conn: 1,
                msg: proof[0].clone(),
            },
        );
        assert!(
            ready.iter().any(|a| matches!(a, Action::PeerUp { .. })),
            "the genuine one works"
        );

        // The same bytes replayed on a new connection: the acceptor's nonce is new, so the
        // recorded proof does not match.
        acceptor.step(
            1,
            Event::Accepted {
                conn: 2,
                remote: "attacker".into(),
            },
        );
        acceptor.step(
            1,
            Event::Received {
                conn: 2,
                msg: hello[0].clone(),
            },
        );
        let out = acceptor.step(
            1,
            Event::Received {
                conn: 2,
                msg: proof[0].clone(),
            },
        );
        assert!(
            sent(&out)
                .iter()
                .any(|m| matches!(m, PeerMsg::Refused { .. })),
            "{out:?}"
        );
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Close { conn: 2, .. })));
        assert!(!out.iter().any(|a| matches!(a, Action::PeerUp { .. })));

        // Replaying the acceptor's recorded challenge to a dialer fails the same way.
        let mut dialer2 = node(3, secret, 3);
        dialer2.step(
            2,
            Event::Connected {
                conn: 9,
                addr: "n1:1".into(),
            },
        );
        let out = dialer2.step(
            2,
            Event::Received {
                conn: 9,
                msg: challenge[0].clone(),
            },
        );
        assert!(
            sent(&out)
                .iter()
                .any(|m| matches!(m, PeerMsg::Refused { .. })),
            "{out:?}"
        );
    }
}
