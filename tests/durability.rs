//! Crash durability: what a broker acknowledged survives `kill -9`, exactly once, in order.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use federation::AgentName;
use ipc_mesh::client::{Client, Connection};
use ipc_mesh::home::Home;
use ipc_mesh::protocol::{Body, Outgoing, Reply};
use support::*;

const SENDERS: usize = 5;
const PER_SENDER: usize = 200;
/// In flight per sender at once: the sends are pipelined on one connection.
const WINDOW: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_kill_9_exactly_once_in_order() {
    let (home, addr, mut broker) = start();
    let h = Home::at(home.path());

    let bob = AgentName::new("bob").unwrap();
    let receiver = connect_as(&addr, &h, &bob).await;
    drop(receiver);

    let acked: Arc<Mutex<Vec<(usize, usize, String)>>> = Arc::default();
    let acked_count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let (addr, h, acked, acked_count) =
            (addr.clone(), h.clone(), acked.clone(), acked_count.clone());
        tasks.push(tokio::spawn(async move {
            let name = AgentName::new(format!("sender{s}")).unwrap();
            let client = connect_as(&addr, &h, &name).await;
            // Use the raw pipelined connection: after the kill, calls fail instead of retrying.
            let conn: Connection = client.connection().clone();
            let contents = (0..PER_SENDER).map(|i| format!("s{s}-{i:05}")).collect();
            send_pipelined(conn, contents, move |i, id| {
                acked.lock().unwrap().push((s, i, id));
                acked_count.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        }));
    }

    // Kill the broker mid-stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked_count.load(Ordering::SeqCst) < (SENDERS * PER_SENDER) / 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sends never got going"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    broker.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    eprintln!("acknowledged before the kill: {}", acked.len());

    broker.restart();
    let mut receiver = connect_as(&addr, &h, &bob).await;
    let mut delivered = Vec::new();
    loop {
        let (msgs, _) = receiver.check(None, 1000).await.unwrap();
        if msgs.is_empty() {
            break;
        }
        delivered.extend(msgs);
    }

    // Every acknowledged message is there exactly once...
    let mut seen_ids = HashMap::new();
    for m in &delivered {
        *seen_ids.entry(m.id.clone()).or_insert(0) += 1;
    }
    assert!(
        seen_ids.values().all(|n| *n == 1),
        "a message was delivered twice"
    );
    let missing: Vec<_> = acked
        .iter()
        .filter(|(_, _, id)| !seen_ids.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // ...with the content it was sent with...
    let by_id: HashMap<&str, &str> = delivered
        .iter()
        .map(|m| (m.id.as_str(), m.content.as_str()))
        .collect();
    for (s, i, id) in &acked {
        assert_eq!(by_id[id.as_str()], format!("s{s}-{i:05}"));
    }
    // ...and each sender's messages arrive in the order they were sent.
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut contents = HashSet::new();
    for m in &delivered {
        let (s, i) = m.content.split_once('-').unwrap();
        let i: usize = i.parse().unwrap();
        if let Some(prev) = last.insert(s.to_string(), i) {
            assert!(i > prev, "{s}: {i} after {prev}");
        }
        assert!(
            contents.insert(m.content.clone()),
            "content {} twice",
            m.content
        );
    }
}

/// A message read (and answered) before a crash is not delivered again after it, an unread
/// one is, and the read ones are still there, marked read, for `include_read`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_read_before_kill_9_are_not_delivered_again() {
    const MESSAGES: usize = 600;
    let (home, addr, mut broker) = start();
    let h = Home::at(home.path());

    let bob = AgentName::new("bob").unwrap();
    let receiver = connect_as(&addr, &h, &bob).await;
    let reader: Connection = receiver.connection().clone();
    let sender = connect_as(&addr, &h, &AgentName::new("alice").unwrap()).await;
    let conn: Connection = sender.connection().clone();

    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sending = {
        let acked = acked.clone();
        let contents = (0..MESSAGES).map(|i| format!("m{i:05}")).collect();
        tokio::spawn(send_pipelined(conn, contents, move |_, id| {
            acked.lock().unwrap().insert(id);
        }))
    };

    // Read (marking read) while the sends go on; kill the broker a third of the way in.
    let mut read_before: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while read_before.len() < MESSAGES / 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reads never got going"
        );
        let body = Body::Fetch {
            include_read: false,
            limit: 50,
            mark_read: true,
        };
        if let Ok(Reply::Messages { messages, .. }) = reader.call(body).await {
            read_before.extend(messages.into_iter().map(|m| m.id));
        }
    }
    broker.kill9();
    sending.await.unwrap();
    let acked = acked.lock().unwrap().clone();

    broker.restart();
    let mut receiver = connect_as(&addr, &h, &bob).await;
    let mut read_after = Vec::new();
    loop {
        let (msgs, _) = receiver.check(None, 1000).await.unwrap();
        if msgs.is_empty() {
            break;
        }
        read_after.extend(msgs.into_iter().map(|m| m.id));
    }

    let mut times: HashMap<&str, usize> = HashMap::new();
    for id in read_before.iter().chain(&read_after) {
        *times.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| !times.contains_key(id.as_str()))
        .collect();
    assert!(lost.is_empty(), "{} acknowledged messages lost", lost.len());

    // What was read before the crash is kept, marked read.
    let body = Body::Fetch {
        include_read: true,
        limit: 1000,
        mark_read: false,
    };
    let Reply::Messages { messages, unread } = receiver.connection().call(body).await.unwrap()
    else {
        panic!("not a message list");
    };
    assert_eq!(unread, 0);
    let kept: HashSet<&str> = messages
        .iter()
        .filter(|m| m.read)
        .map(|m| m.id.as_str())
        .collect();
    for id in &read_before {
        assert!(
            kept.contains(id.as_str()),
            "{id} read before the crash is gone"
        );
    }
}

/// Sends each of `contents` to bob on `conn`, in order, up to `WINDOW` awaiting their replies
/// at once; `on_ack(i, id)` for each one acknowledged. Stops at the first that cannot be
/// submitted (the broker is gone), once the replies in flight are in.
async fn send_pipelined(
    conn: Connection,
    contents: Vec<String>,
    on_ack: impl Fn(usize, String) + Clone + Send + 'static,
) {
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let mut inflight = Vec::new();
    for (i, content) in contents.into_iter().enumerate() {
        let permit = window.clone().acquire_owned().await.unwrap();
        let body = Body::Send(Outgoing {
            to: "bob".into(),
            content,
            ..Default::default()
        });
        // Submitted in order; the replies are awaited concurrently.
        let Ok(reply) = conn.submit(body).await else {
            break;
        };
        let on_ack = on_ack.clone();
        inflight.push(tokio::spawn(async move {
            if let Ok(Reply::Sent { id, .. }) = reply.await {
                on_ack(i, id);
            }
            drop(permit);
        }));
    }
    for t in inflight {
        let _ = t.await;
    }
}

/// A send acknowledged before a crash and resent after it, with its dedup key, is answered
/// with the first send's id and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_kill_9_is_recognised_by_its_dedup_key() {
    let (home, addr, mut broker) = start();
    let h = Home::at(home.path());
    let bob = AgentName::new("bob").unwrap();
    let alice = AgentName::new("alice").unwrap();
    let receiver = connect_as(&addr, &h, &bob).await;
    drop(receiver);

    let send = |key: &str| {
        Body::Send(Outgoing {
            to: "bob".into(),
            content: format!("sent with {key}"),
            dedup_key: Some(key.into()),
            ..Default::default()
        })
    };
    let sender = connect_as(&addr, &h, &alice).await;
    let mut first = Vec::new();
    for key in ["k-1", "k-2", "k-3"] {
        match sender.connection().call(send(key)).await.unwrap() {
            Reply::Sent { id, .. } => first.push(id),
            other => panic!("{other:?}"),
        }
    }
    broker.kill9();
    broker.restart();

    let sender = connect_as(&addr, &h, &alice).await;
    for (key, id) in ["k-1", "k-2", "k-3"].into_iter().zip(&first) {
        match sender.connection().call(send(key)).await.unwrap() {
            Reply::Sent { id: again, .. } => assert_eq!(&again, id, "{key}"),
            other => panic!("{other:?}"),
        }
    }
    let mut receiver = connect_as(&addr, &h, &bob).await;
    let (msgs, _) = receiver.check(None, 100).await.unwrap();
    let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, first.iter().map(|s| s.as_str()).collect::<Vec<_>>());
}

/// A broker process on a free loopback port, in a fresh home.
fn start() -> (tempfile::TempDir, String, BrokerProc) {
    let home = temp_home();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let broker = BrokerProc::start(home.path(), &addr);
    (home, addr, broker)
}

/// A client registered as `name` (its token kept in `h`).
async fn connect_as(addr: &str, h: &Home, name: &AgentName) -> Client {
    let mut client = Client::connect(addr).await.unwrap();
    client.register_as(name, h).await.unwrap();
    client
}
