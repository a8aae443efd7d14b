//! Cross-broker delivery with real broker processes: crashes, cut links, and a relay.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use federation::AgentName;
use ipc_mesh::client::Client;
use ipc_mesh::home::Home;
use ipc_mesh::protocol::{Body, Outgoing, Reply};
use support::proxy::Proxy;
use support::*;

/// A broker with an optional advertised address (a proxy in front of it) and seeds.
fn broker(
    home: &std::path::Path,
    addr: &str,
    advertise: Option<&str>,
    peers: &[&str],
) -> BrokerProc {
    let cfg = home.join("mesh.toml");
    let mut text = String::new();
    if let Some(a) = advertise {
        text.push_str(&format!("[broker]\nadvertise = {a:?}\n"));
    }
    std::fs::write(&cfg, text).unwrap();
    let mut args: Vec<&str> = Vec::new();
    for p in peers {
        args.push("--peer");
        args.push(p);
    }
    BrokerProc::start_full(home, addr, &["--config", cfg.to_str().unwrap()], &args)
}

async fn agent(addr: &str, home: &std::path::Path, name: &str) -> Client {
    let mut c = Client::connect(addr).await.unwrap();
    c.register_as(&AgentName::new(name).unwrap(), &Home::at(home))
        .await
        .unwrap();
    c
}

/// Waits until broker `addr` lists `name` on another broker.
fn until_listed(home: &std::path::Path, addr: &str, name: &str) {
    eventually(
        Duration::from_secs(15),
        &format!("{name} listed at {addr}"),
        || cli_ok(home, addr, &["list", "--json"]).contains(&format!("\"{name}\"")),
    );
}

/// Sends `n` numbered messages from `from` (at `addr`) to `to`, pipelined; records the ids
/// acknowledged with their numbers.
async fn send_numbered(
    addr: String,
    home: std::path::PathBuf,
    from: &str,
    to: &str,
    n: usize,
    acked: Arc<Mutex<Vec<(usize, String)>>>,
    count: Arc<AtomicUsize>,
) {
    let client = agent(&addr, &home, from).await;
    let conn = client.connection().clone();
    let window = Arc::new(tokio::sync::Semaphore::new(64));
    let mut waits = Vec::new();
    for i in 0..n {
        let permit = window.clone().acquire_owned().await.unwrap();
        let body = Body::Send(Outgoing {
            to: to.into(),
            content: format!("{i:06}"),
            ..Default::default()
        });
        let reply = conn
            .submit(body)
            .await
            .expect("the sending broker stays up");
        let (acked, count) = (acked.clone(), count.clone());
        waits.push(tokio::spawn(async move {
            let r = reply.await;
            drop(permit);
            match r {
                Ok(Reply::Sent { id, .. }) => {
                    acked.lock().unwrap().push((i, id));
                    count.fetch_add(1, Ordering::SeqCst);
                }
                other => panic!("send {i} failed: {other:?}"),
            }
        }));
    }
    for w in waits {
        w.await.unwrap();
    }
}

/// Drains `name`'s inbox at `addr` until `want` messages arrived (or the deadline), then checks
/// every acknowledged message is there exactly once, in order.
async fn check_exactly_once(
    addr: &str,
    home: &std::path::Path,
    name: &str,
    acked: &[(usize, String)],
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut got = Vec::new();
    let mut client: Option<Client> = None;
    while got.len() < acked.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} delivered",
            got.len(),
            acked.len()
        );
        if client.is_none() {
            client = Client::connect(addr).await.ok();
            if let Some(c) = client.as_mut() {
                if c.register_as(&AgentName::new(name).unwrap(), &Home::at(home))
                    .await
                    .is_err()
                {
                    client = None;
                }
            }
        }
        let Some(c) = client.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        match c.check(Some(Duration::from_millis(500)), 1000).await {
            Ok((msgs, _)) => got.extend(msgs),
            Err(_) => client = None,
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for m in &got {
        *seen.entry(m.id.as_str()).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "delivered twice: {:?}",
        &dups[..dups.len().min(5)]
    );
    let missing: Vec<_> = acked
        .iter()
        .filter(|(_, id)| !seen.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let numbers: Vec<usize> = got.iter().map(|m| m.content.parse().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "out of order");
    assert_eq!(got.len(), acked.len(), "nothing unexpected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_survive_two_kills_of_the_receiving_broker() {
    let (ha, hb) = (temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let _a = broker(ha.path(), &a_addr, None, &[]);
    let mut b = broker(hb.path(), &b_addr, None, &[&a_addr]);
    drop(agent(&b_addr, hb.path(), "bob").await);
    until_listed(ha.path(), &a_addr, "bob");

    const N: usize = 10_000;
    let acked: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn(send_numbered(
        a_addr.clone(),
        ha.path().to_path_buf(),
        "alice",
        "bob",
        N,
        acked.clone(),
        count.clone(),
    ));
    for threshold in [N / 3, 2 * N / 3] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while count.load(Ordering::SeqCst) < threshold {
            assert!(Instant::now() < deadline, "sending stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.restart();
    }
    sender.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), N);
    check_exactly_once(&b_addr, hb.path(), "bob", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_survive_a_flapping_link() {
    let (ha, hb) = (temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    // Every peer link goes through a proxy, whichever side dials.
    let pa = Proxy::start("127.0.0.5", &a_addr);
    let pb = Proxy::start("127.0.0.5", &b_addr);
    let _a = broker(ha.path(), &a_addr, Some(&pa.addr), &[]);
    let _b = broker(hb.path(), &b_addr, Some(&pb.addr), &[&pa.addr]);
    drop(agent(&b_addr, hb.path(), "bob").await);
    until_listed(ha.path(), &a_addr, "bob");

    const N: usize = 10_000;
    let acked: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn(send_numbered(
        a_addr.clone(),
        ha.path().to_path_buf(),
        "alice",
        "bob",
        N,
        acked.clone(),
        count.clone(),
    ));
    for threshold in [N / 4, N / 2, 3 * N / 4] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while count.load(Ordering::SeqCst) < threshold {
            assert!(Instant::now() < deadline, "sending stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pa.cut();
        pb.cut();
        tokio::time::sleep(Duration::from_millis(700)).await;
        pa.heal();
        pb.heal();
    }
    sender.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    check_exactly_once(&b_addr, hb.path(), "bob", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_relay_through_the_broker_both_sides_can_reach() {
    let (ha, hb, hc) = (temp_home(), temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let c_addr = format!("127.0.0.4:{}", free_port("127.0.0.4"));
    // A and C are reachable only through proxies that refuse each other's address.
    let pa = Proxy::start("127.0.0.5", &a_addr);
    let pc = Proxy::start("127.0.0.5", &c_addr);
    pa.block_from("127.0.0.4");
    pc.block_from("127.0.0.2");
    let _b = broker(hb.path(), &b_addr, None, &[]);
    let _a = broker(ha.path(), &a_addr, Some(&pa.addr), &[&b_addr]);
    let _c = broker(hc.path(), &c_addr, Some(&pc.addr), &[&b_addr]);
    eventually(Duration::from_secs(15), "B links to both", || {
        peers_up(hb.path(), &b_addr).len() == 2
    });
    drop(agent(&c_addr, hc.path(), "carol").await);
    until_listed(ha.path(), &a_addr, "carol");
    assert_eq!(
        peers_up(ha.path(), &a_addr).len(),
        1,
        "A cannot reach C directly"
    );

    let acked: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    send_numbered(
        a_addr.clone(),
        ha.path().to_path_buf(),
        "alice",
        "carol",
        200,
        acked.clone(),
        Arc::default(),
    )
    .await;
    let acked = acked.lock().unwrap().clone();
    check_exactly_once(&c_addr, hc.path(), "carol", &acked).await;
    let relayed = status_json(hb.path(), &b_addr)["counters"]["relayed"]
        .as_u64()
        .unwrap();
    assert!(relayed >= 200, "B relayed {relayed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_every_broker_once() {
    let (ha, hb, hc) = (temp_home(), temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let c_addr = format!("127.0.0.4:{}", free_port("127.0.0.4"));
    let _a = broker(ha.path(), &a_addr, None, &[]);
    let _b = broker(hb.path(), &b_addr, None, &[&a_addr]);
    let mut c = broker(hc.path(), &c_addr, None, &[&a_addr]);
    drop(agent(&b_addr, hb.path(), "bob").await);
    drop(agent(&c_addr, hc.path(), "carol").await);
    drop(agent(&c_addr, hc.path(), "dave").await);
    until_listed(ha.path(), &a_addr, "bob");
    until_listed(ha.path(), &a_addr, "dave");
    // C is down when the broadcast goes out; it gets it when it comes back.
    c.kill9();
    let mut alice = agent(&a_addr, ha.path(), "alice").await;
    match alice.broadcast("all hands", None).await.unwrap() {
        Reply::Broadcast { reached, .. } => assert_eq!(reached, 3),
        r => panic!("{r:?}"),
    }
    c.restart();
    for (addr, home, name) in [
        (&b_addr, hb.path(), "bob"),
        (&c_addr, hc.path(), "carol"),
        (&c_addr, hc.path(), "dave"),
    ] {
        let mut cl = agent(addr, home, name).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.is_empty() {
            assert!(Instant::now() < deadline, "{name} never got the broadcast");
            got = cl
                .check(Some(Duration::from_millis(500)), 10)
                .await
                .unwrap()
                .0;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        got.extend(cl.check(None, 10).await.unwrap().0);
        assert_eq!(got.len(), 1, "{name} got it once");
        assert_eq!(got[0].content, "all hands");
        assert_eq!(got[0].from, "alice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waits_past_the_retention_expires_and_its_sender_is_told() {
    let (ha, hb) = (temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let cfg = ha.path().join("short.toml");
    std::fs::write(&cfg, "[limits]\nretention = \"3s\"\n").unwrap();
    let _a = BrokerProc::start_full(
        ha.path(),
        &a_addr,
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let mut b = broker(hb.path(), &b_addr, None, &[&a_addr]);
    drop(agent(&b_addr, hb.path(), "bob").await);
    until_listed(ha.path(), &a_addr, "bob");
    b.kill9();
    let mut alice = agent(&a_addr, ha.path(), "alice").await;
    let id = match alice
        .send(Outgoing {
            to: "bob".into(),
            content: "are you there?".into(),
            ..Default::default()
        })
        .await
        .unwrap()
    {
        Reply::Sent { id, .. } => id,
        r => panic!("{r:?}"),
    };
    // Alice stays connected (her own claim does not lapse); the notice comes to her.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no expiry notice");
        let (msgs, _) = alice.check(Some(Duration::from_secs(2)), 10).await.unwrap();
        if let Some(n) = msgs.iter().find(|m| m.from == "system") {
            assert!(
                n.content.contains(&id) && n.content.contains("expired undelivered"),
                "{}",
                n.content
            );
            assert_eq!(n.reply_to.as_deref(), Some(id.as_str()));
            break;
        }
    }
    let v = status_json(ha.path(), &a_addr);
    assert!(v["counters"]["messages_expired"].as_u64().unwrap() >= 1);
}

/// Regression (chaos seed 7): a broker that restarted and had not heard from its peers yet
/// queued broadcasts for no one, and agents elsewhere never got them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_sent_right_after_a_restart_reaches_every_broker() {
    let (ha, hb) = (temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let pa = Proxy::start("127.0.0.5", &a_addr);
    let pb = Proxy::start("127.0.0.5", &b_addr);
    let mut a = broker(ha.path(), &a_addr, Some(&pa.addr), &[]);
    let _b = broker(hb.path(), &b_addr, Some(&pb.addr), &[&pa.addr]);
    drop(agent(&b_addr, hb.path(), "bob").await);
    until_listed(ha.path(), &a_addr, "bob");
    drop(agent(&a_addr, ha.path(), "alice").await);

    // A restarts while neither can reach the other: it knows B only from before.
    pa.cut();
    pb.cut();
    a.kill9();
    a.restart();
    let mut alice = agent(&a_addr, ha.path(), "alice").await;
    alice.broadcast("after my restart", None).await.unwrap();
    assert!(
        peers_up(ha.path(), &a_addr).is_empty(),
        "the link was still cut when it was sent"
    );
    pa.heal();
    pb.heal();

    let mut bob = agent(&b_addr, hb.path(), "bob").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "bob never got the broadcast");
        let (msgs, _) = bob
            .check(Some(Duration::from_millis(500)), 10)
            .await
            .unwrap();
        if let Some(m) = msgs.iter().find(|m| m.content == "after my restart") {
            assert_eq!(m.from, "alice");
            break;
        }
    }
}

/// Regression (bench drain): a backlog queued for a dead broker drains when it restarts, and
/// the recipient reads all of it, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_for_a_dead_broker_drains_after_it_restarts() {
    let (ha, hb) = (temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let _a = broker(ha.path(), &a_addr, None, &[]);
    let mut b = broker(hb.path(), &b_addr, None, &[&a_addr]);
    drop(agent(&b_addr, hb.path(), "bob").await);
    until_listed(ha.path(), &a_addr, "bob");
    b.kill9();
    const N: usize = 3000;
    let acked: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    send_numbered(
        a_addr.clone(),
        ha.path().to_path_buf(),
        "alice",
        "bob",
        N,
        acked.clone(),
        Arc::default(),
    )
    .await;
    b.restart();
    let mut bob = agent(&b_addr, hb.path(), "bob").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = 0;
    while got < N {
        assert!(
            Instant::now() < deadline,
            "only {got} of {N} arrived; status of A: {}",
            status_json(ha.path(), &a_addr)
        );
        let reply = bob
            .call(Body::Fetch {
                include_read: false,
                limit: 1000,
                mark_read: true,
            })
            .await
            .unwrap();
        let Reply::Messages { messages, .. } = reply else {
            panic!()
        };
        if messages.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got += messages.len();
    }
    assert_eq!(got, N);
}

/// Reads `name`'s messages at `addr` until `want` arrived (or 60 s), in arrival order.
async fn read_n(addr: &str, home: &std::path::Path, name: &str, want: usize) -> Vec<String> {
    let mut c = agent(addr, home, name).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < want {
        assert!(
            Instant::now() < deadline,
            "only {} of {want} arrived: {got:?}",
            got.len()
        );
        let (msgs, _) = c
            .check(Some(Duration::from_millis(500)), 1000)
            .await
            .unwrap();
        got.extend(msgs.into_iter().map(|m| m.content));
    }
    got
}

/// Three brokers A, B and C on 127.0.0.2–4, each reached by its peers only through a proxy of
/// its own (on 127.0.0.5), so that a test can cut any one of them off and heal it again.
struct Proxied {
    homes: Vec<tempfile::TempDir>,
    addrs: Vec<String>,
    proxies: Vec<Proxy>,
    _brokers: Vec<BrokerProc>,
}

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

impl Proxied {
    fn start() -> Proxied {
        let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
        let homes: Vec<_> = ips.iter().map(|_| temp_home()).collect();
        let addrs: Vec<String> = ips
            .iter()
            .map(|ip| format!("{ip}:{}", free_port(ip)))
            .collect();
        let proxies: Vec<Proxy> = addrs.iter().map(|a| Proxy::start("127.0.0.5", a)).collect();
        let seed = proxies[A].addr.clone();
        let brokers = (0..3)
            .map(|i| {
                let peers: Vec<&str> = if i == A { vec![] } else { vec![&seed] };
                broker(homes[i].path(), &addrs[i], Some(&proxies[i].addr), &peers)
            })
            .collect();
        Proxied {
            homes,
            addrs,
            proxies,
            _brokers: brokers,
        }
    }

    fn home(&self, i: usize) -> &std::path::Path {
        self.homes[i].path()
    }

    fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    /// Cuts broker `i` off from both others, both ways.
    fn isolate(&self, i: usize) {
        let ip = self.addrs[i].split(':').next().unwrap().to_string();
        self.proxies[i].cut();
        for (j, p) in self.proxies.iter().enumerate() {
            if j != i {
                p.block_from(&ip);
            }
        }
    }

    fn heal(&self) {
        self.proxies.iter().for_each(Proxy::heal);
    }

    fn status(&self, i: usize) -> serde_json::Value {
        status_json(self.home(i), self.addr(i))
    }
}

/// Sends messages numbered `range` to `to`, each acknowledged before the next.
async fn send_range(client: &mut Client, to: &str, range: std::ops::Range<usize>) {
    for i in range {
        client
            .send(Outgoing {
                to: to.into(),
                content: format!("{i:03}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Asserts `client` has nothing to read now; `what` says what would have gone wrong.
async fn assert_nothing_yet(client: &mut Client, what: &str) {
    let (early, _) = client
        .check(Some(Duration::from_millis(500)), 1000)
        .await
        .unwrap();
    assert!(
        early.is_empty(),
        "{what}: {:?}",
        early.iter().map(|m| &m.content).collect::<Vec<_>>()
    );
}

/// Reads `n` messages for `name` at broker `at` and asserts they are 000.. in order, and that
/// the broker holds nothing back any more and gave up no fence.
async fn assert_all_in_order(
    mesh: &Proxied,
    at: usize,
    home: &std::path::Path,
    name: &str,
    n: usize,
) {
    let got = read_n(mesh.addr(at), home, name, n).await;
    let want: Vec<String> = (0..n).map(|i| format!("{i:03}")).collect();
    assert_eq!(got, want, "every message once, in the order sent");
    let s = mesh.status(at);
    assert_eq!(s["counters"]["messages_fenced"], 0);
    assert_eq!(s["counters"]["fences_given_up"], 0);
}

/// Waits until broker `at` holds `n` messages back.
fn until_fenced(mesh: &Proxied, at: usize, n: u64, what: &str) {
    eventually(Duration::from_secs(15), what, || {
        mesh.status(at)["counters"]["messages_fenced"] == n
    });
}

/// The scenario the chaos suite found: alice sends from broker A while A is cut off, moves to
/// broker B and goes on sending. B's messages must not overtake A's: bob (on C) sees none of
/// them until A is back and has delivered its own, then all of them in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_moves_while_its_old_broker_is_cut_off_stays_in_order() {
    let m = Proxied::start();
    drop(agent(m.addr(C), m.home(C), "bob").await);
    // alice keeps her token in A's home, and takes it along when she moves. She stays
    // connected to A (registering there again during the cut would bump her claim past the
    // one B knows of, and her move to B would then tie with it).
    let mut alice = agent(m.addr(A), m.home(A), "alice").await;
    until_listed(m.home(A), m.addr(A), "bob");
    until_listed(m.home(B), m.addr(B), "alice");

    // A is cut off from both: what alice sends there waits in A's outbox.
    m.isolate(A);
    send_range(&mut alice, "bob", 0..50).await;
    drop(alice);
    // alice moves to B and goes on.
    let mut alice = agent(m.addr(B), m.home(A), "alice").await;
    send_range(&mut alice, "bob", 50..100).await;
    until_fenced(&m, C, 50, "C holds B's 50");
    let mut bob = agent(m.addr(C), m.home(C), "bob").await;
    assert_nothing_yet(
        &mut bob,
        "alice's messages from B overtook those still at A",
    )
    .await;
    drop(bob);

    m.heal();
    assert_all_in_order(&m, C, m.home(C), "bob", 100).await;
}

/// The scenario the chaos suite found: bob reads a broadcast on broker B, then moves to broker
/// C, which had been cut off when the broadcast was sent. C's copy, arriving late, must not
/// reach bob a second time (the broadcast named bob for B), while C's own agents still get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_read_before_its_recipient_moved_is_not_delivered_again() {
    let m = Proxied::start();
    drop(agent(m.addr(B), m.home(B), "bob").await);
    drop(agent(m.addr(C), m.home(C), "carol").await);
    until_listed(m.home(A), m.addr(A), "bob");
    until_listed(m.home(A), m.addr(A), "carol");
    until_listed(m.home(C), m.addr(C), "bob");
    // bob stays connected to B (registering again there would bump his claim past the one C
    // saw before the cut, and his move to C would then lose).
    let mut bob_b = agent(m.addr(B), m.home(B), "bob").await;
    until_listed(m.home(C), m.addr(C), "bob");

    // C is cut off from both: the broadcast waits in A's outbox for it.
    m.isolate(C);
    let mut alice = agent(m.addr(A), m.home(A), "alice").await;
    match alice.broadcast("all hands", None).await.unwrap() {
        Reply::Broadcast { reached, .. } => assert_eq!(reached, 2),
        r => panic!("{r:?}"),
    }
    // bob reads it on B, then moves to C (which knows him from before the cut).
    let (got, _) = bob_b
        .check(Some(Duration::from_secs(10)), 10)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].content, "all hands");
    drop(bob_b);
    let mut bob = agent(m.addr(C), m.home(B), "bob").await;

    m.heal();
    assert_eq!(
        read_n(m.addr(C), m.home(C), "carol", 1).await,
        ["all hands"]
    );
    // carol's copy and any copy for bob came in the same envelope; give forwarding a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_nothing_yet(&mut bob, "bob got the broadcast a second time after moving").await;
}

/// The scenario the chaos suite found: alice's messages to bob wait in her broker's outbox for
/// broker B, which is cut off; bob moves to broker C and alice goes on sending, now straight
/// to C. Those must not overtake the ones stuck on the way to B: C holds them until B, back,
/// has passed the earlier ones on, then bob gets all of them in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_that_moves_while_messages_to_it_are_stuck_gets_them_in_order() {
    let m = Proxied::start();
    drop(agent(m.addr(B), m.home(B), "bob").await);
    let mut alice = agent(m.addr(A), m.home(A), "alice").await;
    until_listed(m.home(A), m.addr(A), "bob");
    until_listed(m.home(C), m.addr(C), "bob");

    // B is cut off from both: what alice sends bob waits in A's outbox for B.
    m.isolate(B);
    send_range(&mut alice, "bob", 0..50).await;
    // bob moves to C; once A has heard, alice's messages go straight there.
    let mut bob = agent(m.addr(C), m.home(B), "bob").await;
    let c_id = m.status(C)["broker"]["id"].clone();
    eventually(Duration::from_secs(15), "A routes bob to C", || {
        m.status(A)["agents"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["name"] == "bob" && e["broker"] == c_id))
    });
    send_range(&mut alice, "bob", 50..100).await;
    until_fenced(&m, C, 50, "C holds A's 50 for bob");
    assert_nothing_yet(
        &mut bob,
        "messages sent to bob at C overtook those stuck on the way to B",
    )
    .await;
    drop(bob);

    m.heal();
    assert_all_in_order(&m, C, m.home(B), "bob", 100).await;
}
