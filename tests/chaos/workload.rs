//! The workload: agents on every broker sending direct messages and broadcasts at a fixed
//! rate, and reading everything sent to them; every acknowledged send and every delivery is
//! recorded.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use federation::AgentName;
use ipc_mesh::client::{Client, Reconnect};
use ipc_mesh::home::Home;
use ipc_mesh::protocol::{Outgoing, Reply};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checker::{Delivered, History, Sent};

/// One agent: its name and the broker it is attached to (which a nemesis may change).
pub struct Agent {
    pub name: String,
    pub broker: AtomicUsize,
}

pub struct Workload {
    pub agents: Vec<Arc<Agent>>,
    pub addrs: Vec<String>,
    pub home: Home,
    pub history: Arc<Mutex<History>>,
    pub stop_sending: Arc<AtomicBool>,
    pub stop_reading: Arc<AtomicBool>,
    pub started: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const RECONNECT: Reconnect = Reconnect {
    give_up_after: Duration::from_secs(2),
    initial_backoff: Duration::from_millis(50),
    max_backoff: Duration::from_millis(500),
};

async fn attach(addr: &str, name: &str, home: &Home) -> Option<Client> {
    let c = tokio::time::timeout(Duration::from_secs(3), Client::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut c = c.with_reconnect(RECONNECT);
    tokio::time::timeout(
        Duration::from_secs(3),
        c.register_as(&AgentName::new(name).ok()?, home),
    )
    .await
    .ok()?
    .ok()?;
    Some(c)
}

impl Workload {
    /// `per_broker` agents on each broker, all registered before anything is sent.
    pub async fn start(
        addrs: Vec<String>,
        home: Home,
        per_broker: usize,
        rate_per_agent: f64,
        seed: u64,
    ) -> Workload {
        let mut agents = Vec::new();
        for (b, addr) in addrs.iter().enumerate() {
            for k in 0..per_broker {
                let name = format!("b{b}a{k}");
                attach(addr, &name, &home)
                    .await
                    .expect("agents register at the start");
                agents.push(Arc::new(Agent {
                    name,
                    broker: AtomicUsize::new(b),
                }));
            }
        }
        let history = Arc::new(Mutex::new(History {
            agents: agents.iter().map(|a| a.name.clone()).collect(),
            ..History::default()
        }));
        let mut w = Workload {
            agents,
            addrs,
            home,
            history,
            stop_sending: Arc::default(),
            stop_reading: Arc::default(),
            started: Instant::now(),
            tasks: Vec::new(),
        };
        for (i, a) in w.agents.clone().into_iter().enumerate() {
            let names: Vec<String> = w
                .agents
                .iter()
                .map(|x| x.name.clone())
                .filter(|n| *n != a.name)
                .collect();
            w.tasks.push(tokio::spawn(send_loop(
                a.clone(),
                names,
                w.addrs.clone(),
                w.home.clone(),
                w.history.clone(),
                w.stop_sending.clone(),
                w.started,
                rate_per_agent,
                seed.wrapping_add(i as u64),
            )));
            w.tasks.push(tokio::spawn(read_loop(
                a,
                w.addrs.clone(),
                w.home.clone(),
                w.history.clone(),
                w.stop_reading.clone(),
                w.started,
            )));
        }
        w
    }

    pub fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Stops sending; keeps reading until every acknowledged message arrived (or `within`).
    pub async fn finish(mut self, within: Duration) -> (History, Duration) {
        self.stop_sending.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        loop {
            let done = {
                let h = self.history.lock().unwrap();
                super::checker::check(&h).lost.is_empty()
            };
            if done || start.elapsed() > within {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let drained = start.elapsed();
        // A little longer, so late duplicates would show.
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.stop_reading.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let h = self.history.lock().unwrap().clone();
        (h, drained)
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    a: Arc<Agent>,
    others: Vec<String>,
    addrs: Vec<String>,
    home: Home,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    started: Instant,
    rate: f64,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut client: Option<(usize, Client)> = None;
    let mut seq = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        next += every;
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        let b = a.broker.load(Ordering::SeqCst);
        if client.as_ref().is_none_or(|(cb, _)| *cb != b) {
            client = attach(&addrs[b], &a.name, &home).await.map(|c| (b, c));
        }
        let Some((_, c)) = client.as_mut() else {
            continue;
        };
        seq += 1;
        let scheduled = (next - started).as_millis() as u64;
        let broadcast = seq % 40 == 0;
        let content = if broadcast {
            format!("{}:{seq}:b", a.name)
        } else {
            format!("{}:{seq}", a.name)
        };
        let to = (!broadcast).then(|| others[rng.random_range(0..others.len())].clone());
        history.lock().unwrap().attempted.insert(content.clone());
        let r = match &to {
            Some(to) => {
                c.send(Outgoing {
                    to: to.clone(),
                    content: content.clone(),
                    ..Default::default()
                })
                .await
            }
            None => c.broadcast(&content, None).await,
        };
        let id = match r {
            Ok(Reply::Sent { id, .. }) | Ok(Reply::Broadcast { id, .. }) => id,
            _ => {
                client = None;
                continue;
            }
        };
        history.lock().unwrap().acked.push(Sent {
            from: a.name.clone(),
            to,
            content,
            seq,
            id,
            at_ms: scheduled,
        });
    }
}

async fn read_loop(
    a: Arc<Agent>,
    addrs: Vec<String>,
    home: Home,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    started: Instant,
) {
    let mut client: Option<(usize, Client)> = None;
    let mut shown_unacked: std::collections::HashSet<String> = std::collections::HashSet::new();
    while !stop.load(Ordering::SeqCst) {
        let b = a.broker.load(Ordering::SeqCst);
        if client.as_ref().is_none_or(|(cb, _)| *cb != b) {
            client = attach(&addrs[b], &a.name, &home).await.map(|c| (b, c));
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let (_, c) = client.as_mut().expect("attached");
        let fetched = tokio::time::timeout(
            Duration::from_secs(5),
            c.wait(Duration::from_millis(500), 1000),
        )
        .await;
        let Ok(Ok((msgs, _))) = fetched else {
            client = None;
            continue;
        };
        let at_ms = started.elapsed().as_millis() as u64;
        let ids: Vec<String> = msgs.iter().map(|m| m.id.clone()).collect();
        {
            let mut h = history.lock().unwrap();
            for m in msgs {
                // Shown before but its acknowledgement was lost: the reader's retry, not a
                // second delivery by the mesh.
                if shown_unacked.remove(&m.id) || m.from == "system" {
                    continue;
                }
                h.delivered.push(Delivered {
                    to: a.name.clone(),
                    from: m.from,
                    content: m.content,
                    id: m.id,
                    at_ms,
                });
            }
        }
        if ids.is_empty() {
            continue;
        }
        let acked = tokio::time::timeout(Duration::from_secs(5), c.ack(ids.clone())).await;
        if !matches!(acked, Ok(Ok(_))) {
            shown_unacked.extend(ids);
            client = None;
        }
    }
}
