//! The same mesh scenarios over both transports: real TCP on loopback, and the in-memory
//! network. Links are cut with [`Cuts`], which works the same over either.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use federation::driver::{self, Handle, Notice};
use federation::node::{Event, Node, NodeConfig, Timing};
use federation::sim::MemStore;
use federation::transport::{Cuts, Dialer, MemNetwork, TcpDialer};
use federation::BrokerId;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp,
    Mem,
}

struct Broker {
    addr: String,
    handle: Handle,
    notices: mpsc::Receiver<Notice>,
    cancel: CancellationToken,
}

struct Net {
    kind: Kind,
    cuts: Cuts,
    mem: MemNetwork,
    brokers: Vec<Broker>,
    tracker: TaskTracker,
}

fn timing() -> Timing {
    Timing {
        heartbeat_ms: 100,
        failure_ms: 600,
        gossip_ms: 200,
        handshake_ms: 2000,
        backoff_min_ms: 50,
        backoff_max_ms: 500,
        yield_ms: 600,
        window: 64,
        ack_timeout_ms: 2_000,
    }
}

impl Net {
    fn new(kind: Kind) -> Net {
        Net {
            kind,
            cuts: Cuts::new(),
            mem: MemNetwork::new(),
            brokers: Vec::new(),
            tracker: TaskTracker::new(),
        }
    }

    async fn add(&mut self, seeds: &[usize]) -> usize {
        let i = self.brokers.len();
        let (addr, listener) = match self.kind {
            Kind::Tcp => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                (l.local_addr().unwrap().to_string(), Some(l))
            }
            Kind::Mem => (format!("mem-{i}:9876"), None),
        };
        let dialer: Arc<dyn Dialer> = match self.kind {
            Kind::Tcp => Arc::new(self.cuts.wrap(&addr, TcpDialer::default())),
            Kind::Mem => Arc::new(self.cuts.wrap(&addr, self.mem.dialer(&addr))),
        };
        let id = BrokerId::random();
        let node = Node::new(NodeConfig {
            id,
            advertise: addr.clone(),
            seeds: seeds
                .iter()
                .map(|s| self.brokers[*s].addr.clone())
                .collect(),
            siblings: Vec::new(),
            secret: None,
            timing: timing(),
            retention_ms: 3_600_000,
            rng_seed: rand::random(),
            started_ms: driver::now_ms(),
        });
        let cancel = CancellationToken::new();
        let (ntx, nrx) = mpsc::channel(1024);
        let store = Arc::new(MemStore::new(id));
        let handle = driver::spawn(node, dialer, store, ntx, cancel.clone(), &self.tracker);
        common::serve(
            &self.tracker,
            &self.mem,
            &addr,
            listener,
            handle.clone(),
            cancel.clone(),
        );
        self.brokers.push(Broker {
            addr,
            handle,
            notices: nrx,
            cancel,
        });
        i
    }

    fn up(&self, i: usize) -> usize {
        self.brokers[i].handle.with_node(|n| n.up_peers().len())
    }

    fn full_mesh(&self) -> bool {
        let n = self.brokers.len();
        (0..n).all(|i| self.up(i) == n - 1)
    }

    fn agree(&self) -> bool {
        let views: Vec<Vec<(String, BrokerId)>> = self
            .brokers
            .iter()
            .map(|b| {
                b.handle
                    .agents()
                    .into_iter()
                    .map(|e| (e.name, e.owner))
                    .collect()
            })
            .collect();
        views.windows(2).all(|w| w[0] == w[1])
    }

    async fn until(&self, within: Duration, what: &str, f: impl Fn(&Net) -> bool) -> Duration {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < within,
                "{:?}: {what} not reached within {within:?}",
                self.kind
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    fn partition(&self, left: &[usize], right: &[usize]) {
        for a in left {
            for b in right {
                self.cuts
                    .cut(&self.brokers[*a].addr, &self.brokers[*b].addr);
            }
        }
    }

    fn register(&self, i: usize, name: &str, token: u8) {
        let inc = self.brokers[i].handle.max_incarnation(name) + 1;
        self.brokers[i].handle.local(Event::AgentChanged {
            name: name.into(),
            token_hash: vec![token],
            incarnation: inc,
            online: true,
            last_seen_ms: driver::now_ms(),
        });
    }

    async fn stop(self) {
        for b in &self.brokers {
            b.cancel.cancel();
        }
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("driver tasks stop");
    }
}

async fn formation(kind: Kind) {
    let mut net = Net::new(kind);
    let first = net.add(&[]).await;
    for _ in 1..5 {
        net.add(&[first]).await;
    }
    let took = net
        .until(Duration::from_secs(15), "full mesh", |n| n.full_mesh())
        .await;
    eprintln!("{kind:?}: full mesh of 5 in {took:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(net.full_mesh());
    let opened: u64 = net
        .brokers
        .iter()
        .map(|b| b.handle.with_node(|n| n.stats().links_opened))
        .sum::<u64>()
        / 2;
    assert!(
        opened <= 10 + 5,
        "{kind:?}: {opened} links opened for 10 pairs"
    );
    net.stop().await;
}

async fn partition_and_heal(kind: Kind) {
    let mut net = Net::new(kind);
    let first = net.add(&[]).await;
    for _ in 1..4 {
        net.add(&[first]).await;
    }
    net.until(Duration::from_secs(15), "full mesh", |n| n.full_mesh())
        .await;
    net.partition(&[0, 1], &[2, 3]);
    net.until(Duration::from_secs(10), "partition detected", |n| {
        n.up(0) == 1 && n.up(3) == 1
    })
    .await;
    net.register(3, "right", 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(net.brokers[0].handle.lookup("right").is_none());
    net.cuts.heal();
    net.until(Duration::from_secs(15), "heal", |n| {
        n.full_mesh() && n.agree() && n.brokers[0].handle.lookup("right").is_some()
    })
    .await;
    net.stop().await;
}

async fn conflicting_claims(kind: Kind) {
    let mut net = Net::new(kind);
    let first = net.add(&[]).await;
    net.add(&[first]).await;
    net.until(Duration::from_secs(15), "full mesh", |n| n.full_mesh())
        .await;
    net.partition(&[0], &[1]);
    net.until(Duration::from_secs(10), "partition detected", |n| {
        n.up(0) == 0 && n.up(1) == 0
    })
    .await;
    net.register(0, "dup", 0xa);
    net.register(1, "dup", 0xb);
    net.cuts.heal();
    net.until(Duration::from_secs(15), "agreement", |n| {
        n.full_mesh() && n.agree()
    })
    .await;
    let winner = net.brokers[0].handle.lookup("dup").unwrap().owner;
    let ids: Vec<BrokerId> = net
        .brokers
        .iter()
        .map(|b| b.handle.with_node(|n| n.id()))
        .collect();
    assert_eq!(winner, ids[0].max(ids[1]));
    let loser = if winner == ids[0] { 1 } else { 0 };
    let notice = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match net.brokers[loser].notices.recv().await {
                Some(Notice::Superseded(s)) => return s,
                Some(_) => continue,
                None => panic!("notices closed"),
            }
        }
    })
    .await
    .expect("the loser is told");
    assert_eq!(notice.name, "dup");
    assert!(!notice.moved);
    net.stop().await;
}

macro_rules! both {
    ($($name:ident),*) => {
        mod tcp { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Tcp).await } )* }
        mod mem { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Mem).await } )* }
    };
}

both!(formation, partition_and_heal, conflicting_claims);
