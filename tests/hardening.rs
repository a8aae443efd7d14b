//! Adversarial input against a real broker process: thousands of idle connections, senders
//! that dribble a frame, hostile length prefixes and nesting, more connections than the limit.
//! Through each attack a well-behaved client keeps being served: every one of its requests is
//! answered within a generous bound (2 s). That is a liveness check, not a speed figure.

mod support;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use federation::wire::{self, Hello, Role};
use federation::AgentName;
use ipc_mesh::client::Client;
use ipc_mesh::error::ErrorKind;
use ipc_mesh::protocol::{Body, Outgoing, Reply, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Each request of the well-behaved client must be answered within this.
const SERVED_WITHIN: Duration = Duration::from_secs(2);

/// Raises this test process's open-file limit to its hard limit; returns the new soft limit.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// A broker process on a fresh loopback port whose mesh.toml holds `toml`.
fn broker(toml: &str) -> (BrokerProc, tempfile::TempDir) {
    let home = temp_home();
    std::fs::write(home.path().join("mesh.toml"), toml).unwrap();
    let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    (BrokerProc::start(home.path(), &addr), home)
}

fn name(n: &str) -> AgentName {
    AgentName::new(n).unwrap()
}

/// The well-behaved client: registered as `good`, with `friend` to write to.
async fn good_client(addr: &str) -> Client {
    let mut friend = Client::connect(addr).await.unwrap();
    friend.register(&name("friend"), None).await.unwrap();
    let mut c = Client::connect(addr).await.unwrap();
    c.register(&name("good"), None).await.unwrap();
    c
}

/// `rounds` round trips (a ping and a send each); panics if any takes longer than
/// [`SERVED_WITHIN`]. Returns the slowest, for the log.
async fn assert_served(c: &mut Client, rounds: u32, during: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..rounds {
        for body in [
            Body::Ping,
            Body::Send(Outgoing {
                to: "friend".into(),
                content: format!("round {i}"),
                ..Default::default()
            }),
        ] {
            let start = Instant::now();
            let r = tokio::time::timeout(SERVED_WITHIN, c.call(body))
                .await
                .unwrap_or_else(|_| panic!("{during}: a request went unanswered for 2 s"));
            assert!(
                matches!(r, Ok(Reply::Pong { .. }) | Ok(Reply::Sent { .. })),
                "{during}: {r:?}"
            );
            slowest = slowest.max(start.elapsed());
        }
    }
    eprintln!("{during}: slowest round trip {slowest:?}");
    slowest
}

fn frame(body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(body.len() as u32);
    b.extend_from_slice(body);
    b
}

/// A raw connection past the hello and welcome.
async fn hello(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&frame(&Hello::new(Role::Client).encode()))
        .await
        .unwrap();
    read_frame(&mut s).await.expect("welcome");
    s
}

/// The error of the next frame, which must be an error response.
async fn error_of(s: &mut TcpStream) -> (u64, ipc_mesh::error::WireError) {
    let f = read_frame(s)
        .await
        .expect("an error frame before the close");
    let r: Response = wire::decode(&f).expect("a response frame");
    (r.id, r.result.expect_err("an error"))
}

/// Whether the broker closes `s` within `within` (frames before the close are skipped).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_stop_a_well_behaved_client() {
    let fds = raise_fd_limit();
    assert!(
        fds >= 2_500,
        "this test needs 2,500 open files; the hard limit is {fds}"
    );
    let (b, _home) = broker("");
    let addr = b.addr.clone();

    // 1,000 connections that never say hello, and 1,100 that say it and then nothing.
    let mut silent = Vec::new();
    for _ in 0..1_000 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    let mut idle = Vec::new();
    for chunk in 0..11 {
        let batch: Vec<_> = (0..100).map(|_| hello(&addr)).collect();
        idle.extend(futures::future::join_all(batch).await);
        assert_eq!(idle.len(), (chunk + 1) * 100);
    }

    // A newcomer arriving after the flood is accepted and served.
    let mut good = good_client(&addr).await;
    assert_served(&mut good, 20, "2,100 idle connections").await;

    // Those that never said hello are closed after the hello timeout (10 s).
    assert!(
        closed_within(&mut silent[0], Duration::from_secs(15)).await,
        "a connection without a hello is closed"
    );
    // Those that did are kept (an MCP client may rightly be quiet for hours).
    idle[0]
        .write_all(&frame(&wire::encode(&ipc_mesh::protocol::Request {
            id: 9,
            body: Body::Ping,
        })))
        .await
        .unwrap();
    let pong: Response = wire::decode(
        &read_frame_within(&mut idle[0], SERVED_WITHIN)
            .await
            .unwrap(),
    )
    .expect("a response");
    assert_eq!(pong.id, 9);
    assert_served(&mut good, 5, "after the hello timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_are_cut_off_and_delay_no_one() {
    let (b, _home) = broker("[limits]\nframe_timeout = \"2s\"\n");
    let addr = b.addr.clone();
    let mut good = good_client(&addr).await;

    // 50 connections each announce a 100-byte request and send it one byte per second.
    let mut dribblers = Vec::new();
    for _ in 0..50 {
        let mut s = hello(&addr).await;
        dribblers.push(tokio::spawn(async move {
            let start = Instant::now();
            s.write_all(&100u32.to_be_bytes()).await.unwrap();
            for _ in 0..10 {
                if s.write_all(&[0x90]).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                    // An answer (the error frame) or the close: cut off.
                    Ok(_) => return (start.elapsed(), buf),
                    Err(_) => continue,
                }
            }
            (start.elapsed(), [0u8; 512])
        }));
    }
    assert_served(&mut good, 10, "50 slow senders").await;
    for d in dribblers {
        let (took, first) = d.await.unwrap();
        assert!(
            took < Duration::from_secs(8),
            "a slow sender was cut after {took:?}; the frame timeout is 2 s"
        );
        let len = u32::from_be_bytes(first[..4].try_into().unwrap()) as usize;
        let r: Response = wire::decode(&first[4..4 + len]).expect("an error frame first");
        let e = r.result.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
        assert!(e.message.contains("longer than"), "{e}");
    }
    assert_served(&mut good, 5, "after the slow senders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_clear_errors_and_the_broker_keeps_serving() {
    let (mut b, _home) = broker("");
    let addr = b.addr.clone();
    let mut good = good_client(&addr).await;

    // A 4 GiB length prefix after the hello: refused from the prefix, connection closed.
    let mut s = hello(&addr).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let (id, e) = error_of(&mut s).await;
    assert_eq!((id, e.kind), (0, ErrorKind::TooLarge), "{e}");
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);

    // The same instead of a hello.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let (_, e) = error_of(&mut s).await;
    assert_eq!(e.kind, ErrorKind::Protocol, "{e}");
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert_served(&mut good, 3, "after huge length prefixes").await;

    // JSON data nested 100,000 deep: refused before it reaches a parser.
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let r = good
        .call(Body::Send(Outgoing {
            to: "friend".into(),
            content: "deep".into(),
            data: Some(format!("{{\"a\": {deep}}}")),
            ..Default::default()
        }))
        .await;
    let e = r.expect_err("deep JSON is refused");
    assert_eq!(e.kind(), Some(ErrorKind::InvalidInput), "{e}");
    assert!(e.to_string().contains("nested"), "{e}");

    // MessagePack nested 100,000 deep in an unknown field of a request.
    let mut body = vec![0x82, 0xa2, b'i', b'd', 0x07, 0xa1, b'x'];
    body.extend(std::iter::repeat_n(0x91u8, 100_000));
    body.push(0xc0);
    let mut s = hello(&addr).await;
    s.write_all(&frame(&body)).await.unwrap();
    let (_, e) = error_of(&mut s).await;
    assert!(
        matches!(e.kind, ErrorKind::InvalidInput | ErrorKind::Protocol),
        "{e}"
    );

    // Collections and strings claiming 4 G elements with nothing behind them.
    for body in [
        // {"id": 8, "body": {"Ack": {"ids": array32(0xffffffff)}}}
        [
            &[0x82, 0xa2, b'i', b'd', 0x08, 0xa4, b'b', b'o', b'd', b'y'][..],
            &[0x81, 0xa3, b'A', b'c', b'k', 0x81, 0xa3, b'i', b'd', b's'],
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
        ]
        .concat(),
        // {"id": 8, "body": {"Register": {"name": str32(0xffffffff)...}}}
        [
            &[0x82, 0xa2, b'i', b'd', 0x08, 0xa4, b'b', b'o', b'd', b'y'][..],
            &[0x81, 0xa8],
            b"Register",
            &[
                0x82, 0xa4, b'n', b'a', b'm', b'e', 0xdb, 0xff, 0xff, 0xff, 0xff,
            ],
        ]
        .concat(),
    ] {
        let mut s = hello(&addr).await;
        s.write_all(&frame(&body)).await.unwrap();
        let (id, e) = error_of(&mut s).await;
        assert!(id == 8 || id == 0, "{id}");
        assert!(
            matches!(e.kind, ErrorKind::InvalidInput | ErrorKind::Protocol),
            "{e}"
        );
    }

    assert_served(&mut good, 5, "after hostile frames").await;
    assert!(
        b.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the broker is still running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_newcomers_get_a_clear_refusal() {
    let (b, _home) = broker("[broker]\nmax_connections = 40\n");
    let addr = b.addr.clone();
    // Two connections: `good` and `friend`.
    let mut good = good_client(&addr).await;

    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..80 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&frame(&Hello::new(Role::Client).encode()))
            .await
            .unwrap();
        let f = read_frame_within(&mut s, Duration::from_secs(5))
            .await
            .expect("a welcome or a refusal, never silence");
        match wire::decode::<Response>(&f) {
            Ok(Response { result: Err(e), .. }) => refused.push(e),
            _ => held.push(s),
        }
    }
    // The limit is 40; `good` holds one, and the start-up health check's may not have
    // closed yet.
    assert!((37..=39).contains(&held.len()), "{} held", held.len());
    assert_eq!(refused.len(), 80 - held.len());
    for e in &refused {
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.message.contains("max_connections"), "{e}");
    }
    // The client library reports it the same way.
    let e = Client::connect(&addr).await.err().expect("refused");
    assert_eq!(e.kind(), Some(ErrorKind::Unavailable), "{e}");
    assert_served(&mut good, 10, "at the connection limit").await;

    // Room again once connections close; the refusals were counted.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(mut c) = Client::connect(&addr).await {
            break c.status().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no room after the idle ones closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.counters.connections_refused >= 42, "{status:?}");
    assert_eq!(status.limits.max_connections, 40);
}
