//! Protocol behaviour against in-process brokers on port 0: pipelining, bad input, limits.

mod support;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use federation::wire::{self, Hello, Role};
use federation::AgentName;
use ipc_mesh::client::{Client, Connection};
use ipc_mesh::config::Config;
use ipc_mesh::error::{Error, ErrorKind};
use ipc_mesh::protocol::{Body, Outgoing, Reply, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

fn name(n: &str) -> AgentName {
    AgentName::new(n).unwrap()
}

async fn agent(addr: &str, n: &str) -> Client {
    let mut c = Client::connect(addr).await.unwrap();
    c.register(&name(n), None).await.unwrap();
    c
}

fn send(to: &str, content: &str) -> Body {
    Body::Send(Outgoing {
        to: to.into(),
        content: content.into(),
        ..Default::default()
    })
}

fn kind(r: Result<Reply, Error>) -> ErrorKind {
    match r {
        Err(Error::Remote(e)) => e.kind,
        other => panic!("expected a broker error, got {other:?}"),
    }
}

async fn write_frame(s: &mut TcpStream, body: &[u8]) {
    let mut b = BytesMut::new();
    b.put_u32(body.len() as u32);
    b.extend_from_slice(body);
    s.write_all(&b).await.unwrap();
}

/// A raw connection that has said a good hello and read the welcome.
async fn raw(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    write_frame(&mut s, &Hello::new(Role::Client).encode()).await;
    read_frame(&mut s).await.expect("welcome");
    s
}

/// Reads until the broker closes; returns the error responses seen.
async fn errors_until_close(s: &mut TcpStream) -> Vec<Response> {
    let mut out = Vec::new();
    let read = async {
        while let Some(f) = read_frame(s).await {
            if let Ok(r) = wire::decode::<Response>(&f) {
                out.push(r);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("broker closed the connection");
    out
}

#[tokio::test]
async fn pipelined_replies_match_their_requests() {
    let b = InProc::start().await;
    let mut bob = agent(&b.addr, "bob").await;
    let alice = agent(&b.addr, "alice").await;
    let conn: Connection = alice.connection().clone();

    let mut calls = Vec::new();
    for i in 0..300 {
        let conn = conn.clone();
        calls.push(tokio::spawn(async move {
            let body = match i % 3 {
                0 => send("bob", &format!("m{i}")),
                1 => Body::Ping,
                _ => Body::List,
            };
            (i, conn.call(body).await.unwrap())
        }));
    }
    let mut sent = std::collections::HashMap::new();
    for c in calls {
        let (i, reply) = c.await.unwrap();
        match (i % 3, reply) {
            (0, Reply::Sent { id, .. }) => {
                sent.insert(id, format!("m{i}"));
            }
            (1, Reply::Pong { .. }) | (2, Reply::Agents { .. }) => {}
            (k, r) => panic!("request kind {k} got {r:?}"),
        }
    }
    let (msgs, _) = bob.fetch(false, 1000).await.unwrap();
    assert_eq!(msgs.len(), 100);
    for m in msgs {
        assert_eq!(
            sent[&m.id], m.content,
            "reply id matched to the wrong request"
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_others_are_served() {
    let b = InProc::start().await;
    let mut good = agent(&b.addr, "good").await;
    let served = |r: Result<Reply, Error>| assert!(matches!(r, Ok(Reply::Pong { .. })), "{r:?}");

    // Random bytes instead of a hello.
    let mut s = TcpStream::connect(&b.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 0xde, 0xad, 0xbe, 0x0f, 0x13])
        .await
        .unwrap();
    let errs = errors_until_close(&mut s).await;
    assert_eq!(
        errs[0].result.as_ref().unwrap_err().kind,
        ErrorKind::Protocol
    );
    served(good.call(Body::Ping).await);

    // Wrong magic.
    let mut s = TcpStream::connect(&b.addr).await.unwrap();
    write_frame(&mut s, b"NOPE\x00\x01\x01").await;
    let errs = errors_until_close(&mut s).await;
    assert!(errs[0]
        .result
        .as_ref()
        .unwrap_err()
        .message
        .contains("magic"));
    served(good.call(Body::Ping).await);

    // A 4 GiB length prefix after a good hello: refused from the prefix, not buffered.
    let mut s = raw(&b.addr).await;
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    let errs = errors_until_close(&mut s).await;
    assert_eq!(
        errs[0].result.as_ref().unwrap_err().kind,
        ErrorKind::TooLarge
    );
    served(good.call(Body::Ping).await);

    // An unknown request kind: an error for that id, and the connection keeps working.
    let mut s = raw(&b.addr).await;
    #[derive(serde::Serialize)]
    struct Unknown {
        id: u64,
        body: &'static str,
    }
    write_frame(
        &mut s,
        &wire::encode(&Unknown {
            id: 7,
            body: "Teleport",
        }),
    )
    .await;
    let r: Response = wire::decode(&read_frame(&mut s).await.unwrap()).unwrap();
    assert_eq!(r.id, 7);
    assert_eq!(r.result.unwrap_err().kind, ErrorKind::InvalidInput);
    write_frame(
        &mut s,
        &wire::encode(&ipc_mesh::protocol::Request {
            id: 8,
            body: Body::Ping,
        }),
    )
    .await;
    let r: Response = wire::decode(&read_frame(&mut s).await.unwrap()).unwrap();
    assert_eq!(r.id, 8);
    assert!(r.result.is_ok());

    // Garbage after the hello: a protocol error and a close.
    write_frame(&mut s, &[0xc1, 0xc1, 0xc1]).await;
    let errs = errors_until_close(&mut s).await;
    assert_eq!(
        errs[0].result.as_ref().unwrap_err().kind,
        ErrorKind::Protocol
    );

    // Invalid names, and a message over the limit.
    let mut c = Client::connect(&b.addr).await.unwrap();
    for bad in ["", "has space", &"x".repeat(33), "ünï", "a/b"] {
        let r = c
            .call(Body::Register {
                name: bad.to_string(),
                token: None,
            })
            .await;
        assert_eq!(kind(r), ErrorKind::InvalidInput, "{bad:?}");
    }
    c.register(&name("ok"), None).await.unwrap();
    let big = "x".repeat(256 * 1024 + 1);
    assert_eq!(kind(c.call(send("good", &big)).await), ErrorKind::TooLarge);
    assert_eq!(
        kind(
            c.call(Body::Send(Outgoing {
                to: "good".into(),
                content: "x".into(),
                data: Some("[1]".into()),
                ..Default::default()
            }))
            .await
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.call(send("bad name", "x")).await),
        ErrorKind::InvalidInput
    );

    // Nothing was stored by any of it.
    let (msgs, unread) = good.fetch(false, 100).await.unwrap();
    assert!(msgs.is_empty() && unread == 0, "{msgs:?}");
    served(good.call(Body::Ping).await);
    b.stop().await;
}

#[tokio::test]
async fn a_frame_just_over_the_limit_is_refused() {
    let b = InProc::start().await;
    let mut s = raw(&b.addr).await;
    let mut len = BytesMut::new();
    len.put_u32((256 * 1024 + 64 * 1024 + 1) as u32);
    s.write_all(&len).await.unwrap();
    let errs = errors_until_close(&mut s).await;
    assert_eq!(
        errs[0].result.as_ref().unwrap_err().kind,
        ErrorKind::TooLarge
    );
    b.stop().await;
}

#[tokio::test]
async fn legacy_json_clients_are_told_what_they_reached() {
    let b = InProc::start().await;
    let mut s = TcpStream::connect(&b.addr).await.unwrap();
    s.write_all(br#"{"action": "register", "instance_id": "old"}"#)
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["status"], "error");
    assert!(v["message"].as_str().unwrap().contains("ipc-mesh"));
    b.stop().await;
}

#[tokio::test]
async fn requests_before_registering_are_refused() {
    let b = InProc::start().await;
    let mut c = Client::connect(&b.addr).await.unwrap();
    for body in [
        send("x", "y"),
        Body::Fetch {
            include_read: false,
            limit: 1,
            mark_read: false,
        },
        Body::Rename {
            new_name: "z".into(),
        },
    ] {
        assert_eq!(kind(c.call(body).await), ErrorKind::NotRegistered);
    }
    b.stop().await;
}

#[tokio::test]
async fn a_connection_acts_for_one_agent_only() {
    let b = InProc::start().await;
    let mut c = agent(&b.addr, "first").await;
    assert_eq!(
        kind(
            c.call(Body::Register {
                name: "second".into(),
                token: None
            })
            .await
        ),
        ErrorKind::InvalidInput
    );
    b.stop().await;
}

#[tokio::test]
async fn full_inboxes_and_rate_limits_are_errors_not_drops() {
    let mut config = Config::default();
    config.limits.inbox_max = 3;
    let b = InProc::start_with(config).await;
    let _bob = agent(&b.addr, "bob").await;
    let mut carol = agent(&b.addr, "carol").await;
    let mut alice = agent(&b.addr, "alice").await;
    for i in 0..3 {
        alice.call(send("bob", &format!("{i}"))).await.unwrap();
    }
    let e = alice.call(send("bob", "one too many")).await.unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::InboxFull));
    assert!(e.to_string().contains("bob"), "{e}");
    match alice
        .call(Body::Broadcast {
            content: "all".into(),
            data: None,
        })
        .await
        .unwrap()
    {
        Reply::Broadcast {
            reached, skipped, ..
        } => {
            assert_eq!(reached, 1, "carol got it");
            assert_eq!(skipped.len(), 1);
            assert_eq!(skipped[0].name, "bob");
        }
        r => panic!("{r:?}"),
    }
    let (msgs, _) = carol.fetch(false, 10).await.unwrap();
    assert_eq!(msgs[0].content, "all");
    b.stop().await;

    let mut config = Config::default();
    config.limits.rate_per_sec = 5;
    config.limits.rate_burst = 5;
    let b = InProc::start_with(config).await;
    let mut c = agent(&b.addr, "chatty").await;
    let mut limited = 0;
    for _ in 0..20 {
        if let Err(e) = c.call(Body::List).await {
            assert_eq!(e.kind(), Some(ErrorKind::RateLimited));
            assert!(e.to_string().contains("retry"), "{e}");
            limited += 1;
        }
    }
    assert!(limited >= 10, "only {limited} of 20 limited");
    b.stop().await;
}

#[tokio::test]
async fn wait_returns_when_a_message_arrives() {
    let b = InProc::start().await;
    let mut waiter = agent(&b.addr, "waiter").await;
    let mut sender = agent(&b.addr, "sender").await;
    let started = tokio::time::Instant::now();
    let w = tokio::spawn(async move { waiter.wait(Duration::from_secs(30), 10).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sender.call(send("waiter", "wake up")).await.unwrap();
    let (msgs, _) = w.await.unwrap();
    assert_eq!(msgs[0].content, "wake up");
    assert!(started.elapsed() < Duration::from_secs(20));
    b.stop().await;
}

#[tokio::test]
async fn resent_messages_with_a_dedup_key_are_stored_once() {
    let b = InProc::start().await;
    let mut bob = agent(&b.addr, "bob").await;
    let mut alice = agent(&b.addr, "alice").await;
    let out = Outgoing {
        to: "bob".into(),
        content: "once".into(),
        dedup_key: Some("k1".into()),
        ..Default::default()
    };
    let first = alice.call(Body::Send(out.clone())).await.unwrap();
    let again = alice.call(Body::Send(out)).await.unwrap();
    match (first, again) {
        (Reply::Sent { id: a, .. }, Reply::Sent { id: b, .. }) => assert_eq!(a, b),
        r => panic!("{r:?}"),
    }
    let (msgs, _) = bob.fetch(false, 10).await.unwrap();
    assert_eq!(msgs.len(), 1);
    b.stop().await;
}

#[tokio::test]
async fn unread_messages_expire_and_the_sender_is_told() {
    let mut config = Config::default();
    config.limits.retention = Duration::from_secs(1);
    let b = InProc::start_with(config).await;
    let mut alice = agent(&b.addr, "alice").await;
    alice
        .call(Body::Send(Outgoing {
            to: "nobody-yet".into(),
            content: "anyone?".into(),
            hold: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    // Alice stays connected (so her own claim does not lapse) and waits for the notice.
    let (msgs, _) = alice.wait(Duration::from_secs(10), 10).await.unwrap();
    assert_eq!(msgs[0].from, "system");
    assert!(
        msgs[0].content.contains("expired") && msgs[0].content.contains("nobody-yet"),
        "{}",
        msgs[0].content
    );
    b.stop().await;
}

#[tokio::test]
async fn clients_attach_to_the_nearest_broker_and_move_on_when_it_dies() {
    use ipc_mesh::client::Candidates;
    let near = InProc::start().await;
    let far = InProc::start().await;
    let dead = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let candidates = Candidates {
        local: vec![dead.clone(), near.addr.clone()],
        remote: vec![far.addr.clone()],
    };
    let ranked = candidates.rank().await;
    let order: Vec<&str> = ranked.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        order,
        vec![near.addr.as_str(), far.addr.as_str()],
        "local first; the dead one left out"
    );

    let mut c = Client::connect_nearest(&candidates).await.unwrap();
    let near_id = match c.call(Body::Ping).await.unwrap() {
        Reply::Pong { broker_id } => broker_id,
        r => panic!("{r:?}"),
    };
    near.stop().await;
    // The next call notices the dead connection and moves to the next broker that answers.
    let moved = match c.call(Body::Ping).await.unwrap() {
        Reply::Pong { broker_id } => broker_id,
        r => panic!("{r:?}"),
    };
    assert_ne!(near_id, moved);
    far.stop().await;
}

/// Regression (bench drain, and a `wait` that never returned): a reply larger than the
/// largest *request* a broker accepts used to fail to encode; the writer died silently and the
/// client waited for ever. Replies have their own limit now, and a broken writer closes the
/// connection.
#[tokio::test]
async fn a_fetch_reply_larger_than_a_request_may_be_is_answered() {
    let mut config = Config::default();
    config.limits.max_message_bytes = 4096;
    let b = InProc::start_with(config).await;
    let mut bob = agent(&b.addr, "bob").await;
    let mut alice = agent(&b.addr, "alice").await;
    let body = "x".repeat(3000);
    for _ in 0..100 {
        alice.call(send("bob", &body)).await.unwrap();
    }
    // 100 × 3,000 bytes: far over the 4,096 + 64 KiB a request frame may have.
    let (msgs, _) = tokio::time::timeout(Duration::from_secs(10), bob.fetch(false, 1000))
        .await
        .expect("the fetch was answered")
        .unwrap();
    assert_eq!(msgs.len(), 100);
    b.stop().await;
}
