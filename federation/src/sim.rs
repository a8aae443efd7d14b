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

use crate::auth::Secret;
use crate::node::{Action, ConnId, Event, Node, NodeConfig, Timing};
use crate::registry::Superseded;
use crate::BrokerId;

/// How the simulated network behaves.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub seed: u64,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Probability that a message breaks its connection instead of arriving.
    pub drop_rate: f64,
    /// Let messages on one connection overtake each other (no real TCP does; tests that the
    /// protocol does not depend on it).
    pub reorder: bool,
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
    paused: BTreeSet<usize>,
    held: Vec<(usize, Event)>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    pending: HashMap<u64, (usize, Event)>,
    seq: u64,
    conns: BTreeMap<ConnId, SimConn>,
    next_conn: ConnId,
    cuts: BTreeSet<(usize, usize)>,
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
            paused: BTreeSet::new(),
            held: Vec::new(),
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            conns: BTreeMap::new(),
            next_conn: 1,
            cuts: BTreeSet::new(),
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
        self.configs.push(cfg);
        i
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

    pub fn heal(&mut self) {
        self.cuts.clear();
        self.log("heal".into());
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
                    self.schedule(at, to, Event::Received { conn, msg });
                }
                Action::Close { conn, .. } => self.close_conn(conn, Some(from)),
                Action::Superseded(s) => self.superseded.push((from, s)),
                Action::Refused { addr, reason } => self.refusals.push((from, addr, reason)),
                Action::PeerUp { .. } | Action::PeerDown { .. } => {}
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
        Event::AgentChanged { name, .. } => format!("agent {name} changed"),
        Event::AgentRemoved { name } => format!("agent {name} removed"),
    }
}
