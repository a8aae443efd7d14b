//! A deterministic network of [`Node`]s in memory, for scenario tests.
//!
//! Everything runs on a virtual clock from one seed: message delays, drops, reordering, dial
//! outcomes. The same seed replays the same history, so a failing scenario can be rerun and
//! printed step by step (`SIM_TRACE=1`).
//!
//! 1. `add` nodes (each an address `sim-N:9876` and a broker id from the seed).
//! 2. Shape the network: `cut`, `cut_one_way`, `heal`, `crash`, `restart`, `pause`, `resume`.
//! 3. `run_for` or `run_until`: events are delivered in time order; every node ticks every
//!    `tick_ms` of virtual time; each action a node returns becomes future events.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::sync::{Arc, Mutex};

use crate::auth::Secret;
use crate::clock::DeliveryClock;
use crate::delivery::{classify, in_order, route, Arrival, Envelope, MeshStore};
use crate::message::MessageKind;
use crate::node::{Action, ConnId, Event, Node, NodeConfig, Timing};
use crate::registry::Superseded;
use crate::BrokerId;
use crate::{AgentName, Dot, Message};

/// How the simulated network behaves.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub seed: u64,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Probability that a message breaks its connection instead of arriving.
    pub drop_rate: f64,
    /// Let frames on one connection overtake each other. No TCP connection does, and the
    /// cumulative acknowledgements rely on that; across connections (a retransmission on a new
    /// link overtaking the old link's frames) overtaking always happens with random delays.
    pub reorder: bool,
    /// Probability that a delivery frame arrives twice (right after itself).
    pub duplicate_rate: f64,
    pub tick_ms: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            seed: 1,
            min_delay_ms: 1,
            max_delay_ms: 5,
            drop_rate: 0.0,
            reorder: false,
            duplicate_rate: 0.0,
            tick_ms: 50,
        }
    }
}

#[derive(Debug)]
struct SimConn {
    dialer: usize,
    acceptor: usize,
    open: bool,
    /// Last scheduled arrival per direction (0: dialer → acceptor), for FIFO delivery.
    last_at: [u64; 2],
}

/// A network of simulated brokers.
pub struct Sim {
    pub now: u64,
    net: NetConfig,
    rng: StdRng,
    nodes: Vec<Option<Node>>,
    configs: Vec<NodeConfig>,
    /// Each node's storage: it survives crashes, like a disk.
    pub stores: Vec<Arc<MemStore>>,
    paused: BTreeSet<usize>,
    held: Vec<(usize, Event)>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    pending: HashMap<u64, (usize, Event)>,
    seq: u64,
    conns: BTreeMap<ConnId, SimConn>,
    next_conn: ConnId,
    cuts: BTreeSet<(usize, usize)>,
    /// Frames sent across a cut on a connection that is still open: like TCP, they arrive
    /// once the cut heals, unless the connection dies first.
    stalled: Vec<(ConnId, usize, crate::proto::PeerMsg)>,
    next_tick: u64,
    trace: bool,
    /// Names lost by each node's agents, in order.
    pub superseded: Vec<(usize, Superseded)>,
    /// Refusals seen by each node: (node, addr, reason).
    pub refusals: Vec<(usize, String, String)>,
}

impl Sim {
    pub fn new(net: NetConfig) -> Sim {
        Sim {
            now: 1_000_000,
            rng: StdRng::seed_from_u64(net.seed),
            net,
            nodes: Vec::new(),
            configs: Vec::new(),
            stores: Vec::new(),
            paused: BTreeSet::new(),
            held: Vec::new(),
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            conns: BTreeMap::new(),
            next_conn: 1,
            cuts: BTreeSet::new(),
            stalled: Vec::new(),
            next_tick: 0,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            superseded: Vec::new(),
            refusals: Vec::new(),
        }
    }

    pub fn addr(i: usize) -> String {
        format!("sim-{i}:9876")
    }

    /// Timers suited to the simulation (the defaults, which the real broker uses too).
    pub fn timing() -> Timing {
        Timing::default()
    }

    /// Adds a node seeded with the addresses of `seeds`; returns its index.
    pub fn add(&mut self, seeds: &[usize], secret: Option<&str>) -> usize {
        let i = self.nodes.len();
        let cfg = NodeConfig {
            id: BrokerId::from_u32(self.rng.random()),
            advertise: Self::addr(i),
            seeds: seeds.iter().map(|s| Self::addr(*s)).collect(),
            siblings: Vec::new(),
            secret: secret.map(|s| Secret::new(s.as_bytes().to_vec()).expect("test secret")),
            timing: Self::timing(),
            retention_ms: 7 * 24 * 3600 * 1000,
            rng_seed: self.rng.random(),
            started_ms: self.now,
        };
        self.nodes.push(Some(Node::new(cfg.clone())));
        self.stores.push(Arc::new(MemStore::new(cfg.id)));
        self.configs.push(cfg);
        i
    }

    /// Attaches agent `name` to node `i` (online).
    pub fn register(&mut self, i: usize, name: &str) {
        let n = AgentName::new(name).expect("valid name");
        self.stores[i].inner.lock().unwrap().agents.insert(n);
        let inc = self.node(i).registry().max_incarnation(name) + 1;
        let now = self.now;
        self.local(
            i,
            Event::AgentChanged {
                name: name.into(),
                token_hash: name.as_bytes().to_vec(),
                incarnation: inc,
                online: true,
                last_seen_ms: now,
            },
        );
    }

    /// Agent `from` on node `i` sends `content` to `to`, as a broker would: into a local inbox,
    /// or queued for the broker that holds `to`. Returns the message's id.
    pub fn send(&mut self, i: usize, from: &str, to: &str, content: &str) -> Dot {
        let owner = self.node(i).registry().lookup(to).map(|e| e.owner);
        let dot = self.stores[i].submit(from, to, content, owner, false, Vec::new(), self.now);
        self.store_changed(i);
        dot
    }

    /// Agent `from` on node `i` broadcasts `content`: every local agent but `from`, and one
    /// envelope for every other broker node `i` knows.
    pub fn broadcast(&mut self, i: usize, from: &str, content: &str) -> Dot {
        let mut brokers: BTreeSet<BrokerId> = self.node(i).registry().owners().collect();
        brokers.extend(self.node(i).known_brokers());
        brokers.remove(&self.id(i));
        // As the broker does: each envelope names the agents the registry places there.
        let mut at: BTreeMap<BrokerId, Vec<AgentName>> = BTreeMap::new();
        for e in self.node(i).registry().agents() {
            if e.name != from {
                if let Ok(n) = AgentName::new(e.name.clone()) {
                    at.entry(e.owner).or_default().push(n);
                }
            }
        }
        let dests = brokers
            .into_iter()
            .map(|b| (b, at.remove(&b).unwrap_or_default()))
            .collect();
        let dot = self.stores[i].submit(from, "", content, None, true, dests, self.now);
        self.store_changed(i);
        dot
    }

    /// What agent `name` on node `i` has received, in order.
    pub fn inbox(&self, i: usize, name: &str) -> Vec<Message> {
        let n = AgentName::new(name).expect("valid name");
        self.stores[i]
            .inner
            .lock()
            .unwrap()
            .inboxes
            .get(&n)
            .cloned()
            .unwrap_or_default()
    }

    fn store_changed(&mut self, i: usize) {
        if self.nodes[i].is_none() || self.paused.contains(&i) {
            return;
        }
        let depths = self.stores[i].outbox_depths();
        let durable = self.stores[i].durable();
        let now = self.now;
        let node = self.nodes[i].as_mut().expect("running");
        let mut actions = node.step(now, Event::Outbox { depths });
        actions.extend(node.step(now, Event::Durable { epoch: durable }));
        self.apply(i, actions);
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn id(&self, i: usize) -> BrokerId {
        self.configs[i].id
    }

    /// Gives node `i` an event from its broker (an agent change), now.
    pub fn local(&mut self, i: usize, event: Event) {
        let now = self.now;
        let actions = self.nodes[i].as_mut().expect("running").step(now, event);
        self.apply(i, actions);
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&mut self, a: usize, b: usize) {
        self.cuts.insert((a, b));
        self.cuts.insert((b, a));
        self.log(format!("cut n{a} <-> n{b}"));
    }

    /// Messages from `a` to `b` vanish; dials between them fail.
    pub fn cut_one_way(&mut self, a: usize, b: usize) {
        self.cuts.insert((a, b));
        self.log(format!("cut n{a} -> n{b}"));
    }

    /// Cuts every link between the two groups.
    pub fn partition(&mut self, left: &[usize], right: &[usize]) {
        for a in left {
            for b in right {
                self.cut(*a, *b);
            }
        }
    }

    /// Restores both directions between `a` and `b`.
    pub fn uncut(&mut self, a: usize, b: usize) {
        self.cuts.remove(&(a, b));
        self.cuts.remove(&(b, a));
        self.log(format!("uncut n{a} <-> n{b}"));
        self.release_stalled();
    }

    pub fn heal(&mut self) {
        self.cuts.clear();
        self.log("heal".into());
        self.release_stalled();
    }

    /// Frames held by a cut that has healed go on, in order, if their connection lives.
    fn release_stalled(&mut self) {
        let stalled = std::mem::take(&mut self.stalled);
        for (conn, to, msg) in stalled {
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            if !c.open {
                continue;
            }
            let from = if c.dialer == to { c.acceptor } else { c.dialer };
            if self.cuts.contains(&(from, to)) {
                self.stalled.push((conn, to, msg));
                continue;
            }
            let dir = usize::from(c.dialer != from);
            let at = (self.now + self.delay()).max(self.conns[&conn].last_at[dir]);
            self.conns.get_mut(&conn).expect("exists").last_at[dir] = at;
            self.schedule(at, to, Event::Received { conn, msg });
        }
    }

    /// Kills node `i`; the kernel closes its sockets, so peers see their links close.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i] = None;
        self.paused.remove(&i);
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.open && (c.dialer == i || c.acceptor == i))
            .map(|(id, _)| *id)
            .collect();
        for conn in ids {
            self.close_conn(conn, Some(i));
        }
        self.log(format!("crash n{i}"));
    }

    /// Starts node `i` again (same id, fresh memory), optionally on a new address.
    pub fn restart(&mut self, i: usize, new_addr: Option<String>) {
        assert!(self.nodes[i].is_none(), "crash it first");
        let mut cfg = self.configs[i].clone();
        if let Some(a) = new_addr {
            cfg.advertise = a;
        }
        cfg.rng_seed = self.rng.random();
        cfg.started_ms = self.now;
        self.configs[i] = cfg.clone();
        self.nodes[i] = Some(Node::new(cfg));
        self.log(format!("restart n{i} at {}", self.configs[i].advertise));
    }

    /// SIGSTOP: the node hears nothing and does nothing until resumed.
    pub fn pause(&mut self, i: usize) {
        self.paused.insert(i);
        self.log(format!("pause n{i}"));
    }

    pub fn resume(&mut self, i: usize) {
        self.paused.remove(&i);
        let held: Vec<(usize, Event)> = std::mem::take(&mut self.held);
        for (n, ev) in held {
            if n == i {
                self.deliver(n, ev);
            } else {
                self.held.push((n, ev));
            }
        }
        self.log(format!("resume n{i}"));
    }

    pub fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        self.run_to(end);
    }

    /// Runs until `done` holds (checked every tick) or `max_ms` passes; returns the time taken.
    pub fn run_until(&mut self, max_ms: u64, mut done: impl FnMut(&Sim) -> bool) -> Option<u64> {
        let start = self.now;
        let end = self.now + max_ms;
        while self.now < end {
            if done(self) {
                return Some(self.now - start);
            }
            let step_end = (self.now + self.net.tick_ms).min(end);
            self.run_to(step_end);
        }
        done(self).then(|| self.now - start)
    }

    /// Open connections between running nodes whose both ends consider the link up.
    pub fn links_up(&self) -> usize {
        (0..self.len())
            .filter(|i| self.is_up(*i))
            .map(|i| self.node(i).up_peers().len())
            .sum::<usize>()
            / 2
    }

    /// Whether every running node has a link to every other running node.
    pub fn full_mesh(&self) -> bool {
        let running: Vec<usize> = (0..self.len()).filter(|i| self.is_up(*i)).collect();
        running.iter().all(|i| {
            let up = self.node(*i).up_peers();
            running
                .iter()
                .filter(|j| *j != i)
                .all(|j| up.contains(&self.id(*j)))
        })
    }

    /// Whether every running node resolves every name the same way.
    pub fn registries_agree(&self) -> bool {
        let views: Vec<Vec<(String, BrokerId, bool)>> = (0..self.len())
            .filter(|i| self.is_up(*i))
            .map(|i| {
                self.node(i)
                    .registry()
                    .agents()
                    .iter()
                    .map(|e| (e.name.clone(), e.owner, e.online))
                    .collect()
            })
            .collect();
        views.windows(2).all(|w| w[0] == w[1])
    }

    fn run_to(&mut self, end: u64) {
        loop {
            let next_event = self.queue.peek().map(|Reverse((at, _))| *at);
            let next = match next_event {
                Some(at) if at <= self.next_tick.max(self.now) => at,
                _ => self.next_tick.max(self.now),
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = next;
            if next_event == Some(next) {
                let Reverse((_, seq)) = self.queue.pop().expect("peeked");
                let (target, ev) = self.pending.remove(&seq).expect("pending event");
                self.deliver(target, ev);
            } else {
                self.next_tick = self.now + self.net.tick_ms;
                for i in 0..self.nodes.len() {
                    if self.paused.contains(&i) {
                        continue;
                    }
                    self.store_changed(i);
                    let now = self.now;
                    if let Some(n) = self.nodes[i].as_mut() {
                        let actions = n.tick(now);
                        self.apply(i, actions);
                    }
                }
            }
        }
    }

    fn deliver(&mut self, target: usize, ev: Event) {
        if self.paused.contains(&target) {
            self.held.push((target, ev));
            return;
        }
        // Messages on a connection that has since closed are lost with it.
        let conn_of = match &ev {
            Event::Received { conn, .. } => Some(*conn),
            _ => None,
        };
        if let Some(c) = conn_of {
            if !self.conns.get(&c).is_some_and(|c| c.open) {
                return;
            }
        }
        if self.trace {
            self.log(format!("n{target} <= {}", describe(&ev)));
        }
        let now = self.now;
        let Some(node) = self.nodes[target].as_mut() else {
            return;
        };
        let actions = node.step(now, ev);
        self.apply(target, actions);
    }

    fn schedule(&mut self, at: u64, target: usize, ev: Event) {
        self.seq += 1;
        self.pending.insert(self.seq, (target, ev));
        self.queue.push(Reverse((at, self.seq)));
    }

    fn delay(&mut self) -> u64 {
        self.rng
            .random_range(self.net.min_delay_ms..=self.net.max_delay_ms.max(self.net.min_delay_ms))
    }

    fn apply(&mut self, from: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Dial { addr } => self.dial(from, addr),
                Action::Send { conn, msg } => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    if !c.open {
                        continue;
                    }
                    let (to, dir) = if c.dialer == from {
                        (c.acceptor, 0)
                    } else {
                        (c.dialer, 1)
                    };
                    if self.cuts.contains(&(from, to)) {
                        self.stalled.push((conn, to, msg));
                        continue;
                    }
                    if self.net.drop_rate > 0.0 && self.rng.random_bool(self.net.drop_rate) {
                        self.log(format!(
                            "drop n{from} -> n{to} {}: connection breaks",
                            msg.kind()
                        ));
                        self.close_conn(conn, None);
                        continue;
                    }
                    let mut at = self.now + self.delay();
                    if !self.net.reorder {
                        let c = self.conns.get_mut(&conn).expect("exists");
                        at = at.max(c.last_at[dir]);
                        c.last_at[dir] = at;
                    }
                    let twice = matches!(msg, crate::proto::PeerMsg::Deliver { .. })
                        && self.net.duplicate_rate > 0.0
                        && self.rng.random_bool(self.net.duplicate_rate);
                    if twice {
                        self.schedule(
                            at,
                            to,
                            Event::Received {
                                conn,
                                msg: msg.clone(),
                            },
                        );
                    }
                    self.schedule(at, to, Event::Received { conn, msg });
                }
                Action::Close { conn, .. } => self.close_conn(conn, Some(from)),
                Action::Superseded(s) => {
                    if s.moved {
                        // As the broker does: the agent's unread messages follow it.
                        self.stores[from].forward_inbox(&s.name, s.winner.owner);
                        self.store_changed(from);
                    }
                    self.superseded.push((from, s));
                }
                Action::Refused { addr, reason } => self.refusals.push((from, addr, reason)),
                Action::PeerUp { .. } | Action::PeerDown { .. } => {}
                Action::ReadOutbox {
                    dest,
                    conn,
                    after,
                    limit,
                } => {
                    let entries = self.stores[from].outbox(dest, after, limit);
                    let now = self.now;
                    if let Some(n) = self.nodes[from].as_mut() {
                        let more = n.step(
                            now,
                            Event::OutboxRead {
                                dest,
                                conn,
                                entries,
                            },
                        );
                        self.apply(from, more);
                    }
                }
                Action::Accept {
                    conn,
                    dest,
                    upto,
                    entries,
                } => {
                    let owners: BTreeMap<String, BrokerId> = self
                        .node(from)
                        .registry()
                        .agents()
                        .iter()
                        .map(|e| (e.name.clone(), e.owner))
                        .collect();
                    *self.stores[from].owners.lock().unwrap() = owners;
                    let epoch = self.stores[from].accept(entries);
                    let now = self.now;
                    if let Some(n) = self.nodes[from].as_mut() {
                        let mut more = n.step(
                            now,
                            Event::Stored {
                                conn,
                                dest,
                                upto,
                                epoch,
                            },
                        );
                        more.extend(n.step(now, Event::Durable { epoch }));
                        self.apply(from, more);
                    }
                    self.store_changed(from);
                }
                Action::Trim { dest, upto } => self.stores[from].trim(dest, upto),
            }
        }
    }

    fn dial(&mut self, from: usize, addr: String) {
        let target = (0..self.nodes.len())
            .find(|j| self.nodes[*j].is_some() && self.configs[*j].advertise == addr);
        let at = self.now + self.delay();
        match target {
            Some(j) if !self.cuts.contains(&(from, j)) && !self.cuts.contains(&(j, from)) => {
                let conn = self.next_conn;
                self.next_conn += 1;
                self.conns.insert(
                    conn,
                    SimConn {
                        dialer: from,
                        acceptor: j,
                        open: true,
                        last_at: [at, at],
                    },
                );
                let remote = format!("sim-{from}:{}", 40000 + conn);
                self.schedule(at, j, Event::Accepted { conn, remote });
                self.schedule(at, from, Event::Connected { conn, addr });
            }
            _ => {
                let error = "connection refused".to_string();
                self.schedule(at, from, Event::DialFailed { addr, error });
            }
        }
    }

    /// Closes a connection; each side other than `closer` hears `Closed`.
    fn close_conn(&mut self, conn: ConnId, closer: Option<usize>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.open {
            return;
        }
        c.open = false;
        let sides = [c.dialer, c.acceptor];
        for side in sides {
            if Some(side) != closer {
                let at = self.now + self.delay();
                self.schedule(at, side, Event::Closed { conn });
            }
        }
    }

    fn log(&self, line: String) {
        if self.trace {
            eprintln!("t={:>8} {line}", self.now);
        }
    }
}

fn describe(ev: &Event) -> String {
    match ev {
        Event::Received { conn, msg } => format!("#{conn} {}", msg.kind()),
        Event::Connected { conn, addr } => format!("#{conn} connected to {addr}"),
        Event::Accepted { conn, remote } => format!("#{conn} accepted from {remote}"),
        Event::Closed { conn } => format!("#{conn} closed"),
        Event::DialFailed { addr, .. } => format!("dial {addr} failed"),
        Event::LinkRefused { addr, reason, .. } => format!("link {addr} refused: {reason}"),
        Event::AgentChanged { name, .. } => format!("agent {name} changed"),
        Event::AgentRemoved { name } => format!("agent {name} removed"),
        Event::Outbox { depths } => format!("outbox depths {depths:?}"),
        Event::OutboxRead { dest, entries, .. } => format!("read {} for {dest}", entries.len()),
        Event::Stored { dest, upto, .. } => format!("stored for {dest} up to {upto}"),
        Event::Durable { epoch } => format!("durable {epoch}"),
    }
}

/// A node's storage in the simulation: inboxes, outboxes and the delivery clock, all in memory,
/// durable the moment they are written (a crash of the node keeps them, like a disk).
pub struct MemStore {
    me: BrokerId,
    inner: Mutex<MemInner>,
    /// Who holds each name, refreshed from the node's registry before each accept.
    owners: Mutex<BTreeMap<String, BrokerId>>,
}

#[derive(Default)]
struct MemInner {
    epoch: u64,
    seq: u64,
    outbox: BTreeMap<(BrokerId, u64), Envelope>,
    last_to: BTreeMap<BrokerId, u64>,
    clock: DeliveryClock,
    agents: BTreeSet<AgentName>,
    inboxes: BTreeMap<AgentName, Vec<Message>>,
    /// Envelopes that overtook their predecessor, by (origin, sequence).
    pending: BTreeMap<(BrokerId, u64), Envelope>,
    /// Duplicates dropped.
    pub duplicates: u64,
}

impl MemStore {
    pub fn new(me: BrokerId) -> MemStore {
        MemStore {
            me,
            inner: Mutex::new(MemInner::default()),
            owners: Mutex::new(BTreeMap::new()),
        }
    }

    /// Into an inbox, unless that inbox had this message already (a copy that followed a
    /// moved agent while another reached it directly).
    fn push(g: &mut MemInner, to: &AgentName, m: Message) {
        let inbox = g.inboxes.entry(to.clone()).or_default();
        if inbox.iter().any(|x| x.dot == m.dot) {
            g.duplicates += 1;
            return;
        }
        inbox.push(m);
    }

    /// Delivers, holds or forwards an envelope whose turn it is.
    fn hand_on(&self, g: &mut MemInner, owners: &BTreeMap<String, BrokerId>, env: Envelope) {
        let agents = g.agents.clone();
        match route(
            &env,
            self.me,
            |a| agents.contains(a),
            |a| owners.get(a.as_str()).copied(),
            || agents.iter().cloned().collect(),
        ) {
            Arrival::Deliver(to) => {
                for a in to {
                    let mut m = env.message.clone();
                    m.to = a.clone();
                    Self::push(g, &a, m);
                }
            }
            Arrival::Hold(to) => Self::push(g, &to, env.message),
            Arrival::Forward(b) => Self::queue(g, self.me, b, env, true),
            Arrival::Broadcast { deliver, forward } => {
                for a in deliver {
                    let mut m = env.message.clone();
                    m.to = a.clone();
                    Self::push(g, &a, m);
                }
                for (a, b) in forward {
                    let mut e = env.clone();
                    e.broadcast = false;
                    e.recipients.clear();
                    e.message.to = a;
                    Self::queue(g, self.me, b, e, true);
                }
            }
            Arrival::Duplicate | Arrival::Relay => {}
        }
    }

    /// Moves agent `name`'s inbox to broker `to` (it moved there).
    fn forward_inbox(&self, name: &str, to: BrokerId) {
        let Ok(n) = AgentName::new(name) else { return };
        let mut g = self.inner.lock().unwrap();
        g.agents.remove(&n);
        let msgs = g.inboxes.remove(&n).unwrap_or_default();
        for m in msgs {
            let env = Envelope {
                tdot: m.dot,
                prev: 0,
                dest: to,
                hops: 0,
                broadcast: false,
                recipients: Vec::new(),
                message: m,
                queued_ms: 0,
                closes: None,
                elsewhere: Vec::new(),
                wait: Vec::new(),
                marker: None,
            };
            Self::queue(&mut g, self.me, to, env, true);
        }
    }

    /// Duplicates this store has dropped.
    pub fn duplicates(&self) -> u64 {
        self.inner.lock().unwrap().duplicates
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        from: &str,
        to: &str,
        content: &str,
        owner: Option<BrokerId>,
        broadcast: bool,
        brokers: Vec<(BrokerId, Vec<AgentName>)>,
        now: u64,
    ) -> Dot {
        let mut g = self.inner.lock().unwrap();
        g.seq += 1;
        g.epoch += 1;
        let dot = Dot::new(self.me, g.seq);
        let from = AgentName::new(from).expect("valid name");
        let mut message = Message {
            dot,
            from: from.clone(),
            to: from.clone(),
            sent_at_ms: now,
            content: content.into(),
            data: None,
            reply_to: None,
            kind: if broadcast {
                MessageKind::Broadcast
            } else {
                MessageKind::Direct
            },
            after: None,
        };
        let dests = if broadcast {
            let locals: Vec<AgentName> = g.agents.iter().filter(|a| **a != from).cloned().collect();
            for a in locals {
                let mut m = message.clone();
                m.to = a.clone();
                Self::push(&mut g, &a, m);
            }
            brokers
        } else {
            let to = AgentName::new(to).expect("valid name");
            message.to = to.clone();
            match owner {
                Some(b) if b != self.me => vec![(b, Vec::new())],
                _ => {
                    g.inboxes.entry(to).or_default().push(message.clone());
                    Vec::new()
                }
            }
        };
        for (dest, recipients) in dests {
            let prev = g.last_to.get(&dest).copied().unwrap_or(0);
            g.last_to.insert(dest, dot.seq);
            let env = Envelope {
                tdot: dot,
                prev,
                dest,
                hops: 0,
                broadcast,
                recipients,
                message: message.clone(),
                queued_ms: now,
                closes: None,
                elsewhere: Vec::new(),
                wait: Vec::new(),
                marker: None,
            };
            g.outbox.insert((dest, dot.seq), env);
        }
        dot
    }

    fn queue(g: &mut MemInner, me: BrokerId, dest: BrokerId, mut env: Envelope, reoriginate: bool) {
        g.seq += 1;
        let pos = g.seq;
        if reoriginate {
            let prev = g.last_to.get(&dest).copied().unwrap_or(0);
            g.last_to.insert(dest, pos);
            env.tdot = Dot::new(me, pos);
            env.prev = prev;
            env.dest = dest;
            env.hops = 0;
        } else {
            env.hops += 1;
        }
        g.outbox.insert((dest, pos), env);
    }
}

impl MeshStore for MemStore {
    fn outbox(&self, dest: BrokerId, after: u64, limit: usize) -> Vec<(u64, Envelope)> {
        let g = self.inner.lock().unwrap();
        g.outbox
            .range((dest, after + 1)..=(dest, u64::MAX))
            .take(limit)
            .map(|((_, p), e)| (*p, e.clone()))
            .collect()
    }

    fn outbox_depths(&self) -> Vec<(BrokerId, u64)> {
        let g = self.inner.lock().unwrap();
        let mut d: BTreeMap<BrokerId, u64> = BTreeMap::new();
        for (dest, _) in g.outbox.keys() {
            *d.entry(*dest).or_default() += 1;
        }
        d.into_iter().collect()
    }

    fn trim(&self, dest: BrokerId, upto: u64) {
        let mut g = self.inner.lock().unwrap();
        g.outbox.retain(|(d, p), _| *d != dest || *p > upto);
    }

    fn accept(&self, entries: Vec<Envelope>) -> u64 {
        let owners = self.owners.lock().unwrap().clone();
        let mut g = self.inner.lock().unwrap();
        for env in entries {
            let agents = g.agents.clone();
            let arrival = classify(
                &env,
                self.me,
                &g.clock,
                |a| agents.contains(a),
                |a| owners.get(a.as_str()).copied(),
                || agents.iter().cloned().collect(),
            );
            match arrival {
                Arrival::Duplicate => g.duplicates += 1,
                Arrival::Relay => {
                    let dest = env.dest;
                    Self::queue(&mut g, self.me, dest, env, false);
                }
                _ if !in_order(&g.clock, &env) => {
                    g.clock.accept(env.tdot, env.prev);
                    g.pending.insert((env.tdot.origin, env.tdot.seq), env);
                }
                _ => {
                    let origin = env.tdot.origin;
                    g.clock.accept(env.tdot, env.prev);
                    self.hand_on(&mut g, &owners, env);
                    // Whatever waited for this one goes now, in order.
                    let upto = g.clock.contiguous(origin);
                    let ready: Vec<(BrokerId, u64)> = g
                        .pending
                        .range((origin, 0)..=(origin, upto))
                        .map(|(k, _)| *k)
                        .collect();
                    for k in ready {
                        let env = g.pending.remove(&k).expect("listed");
                        self.hand_on(&mut g, &owners, env);
                    }
                }
            }
        }
        g.epoch += 1;
        g.epoch
    }

    fn durable(&self) -> u64 {
        self.inner.lock().unwrap().epoch
    }
}
