//! Encrypted peer links, end to end through the driver: over real TCP on loopback and over the
//! in-memory transport. Every byte a dialer sends and receives is recorded, so a test can say
//! what an eavesdropper on the link would have seen.
//!
//! Scenarios: two brokers with the secret link up encrypted and gossip a registration; the
//! recording holds none of its text. A broker with the wrong secret, and one that dials in
//! plaintext where encryption is required (a downgrade), are refused, and both sides record
//! the refusal. A recorded handshake replayed against the acceptor is refused too.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use federation::auth::Secret;
use federation::driver::{self, Handle, Notice};
use federation::link::{Encrypt, LinkConfig};
use federation::node::{Event, Node, NodeConfig, Timing};
use federation::sim::MemStore;
use federation::transport::{BoxStream, DialFuture, Dialer, MemNetwork, TcpDialer};
use federation::BrokerId;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp,
    Mem,
}

const SECRET: &str = "correct horse battery staple";

fn secret(s: &str) -> Secret {
    Secret::new(s.as_bytes().to_vec()).unwrap()
}

fn timing() -> Timing {
    Timing {
        heartbeat_ms: 100,
        failure_ms: 600,
        gossip_ms: 200,
        handshake_ms: 2000,
        backoff_min_ms: 50,
        backoff_max_ms: 300,
        yield_ms: 600,
        window: 64,
        ack_timeout_ms: 2_000,
    }
}

/// Every byte written to and read from the streams a dialer opens.
#[derive(Clone, Default)]
struct Tape(Arc<Mutex<Vec<u8>>>);

impl Tape {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
    fn contains(&self, needle: &[u8]) -> bool {
        self.bytes().windows(needle.len()).any(|w| w == needle)
    }
}

struct Recording<D> {
    inner: D,
    tape: Tape,
}

impl<D: Dialer> Dialer for Recording<D> {
    fn dial(&self, addr: &str) -> DialFuture {
        let (fut, tape) = (self.inner.dial(addr), self.tape.clone());
        Box::pin(async move {
            let s = fut.await?;
            Ok(Box::new(Recorded { inner: s, tape }) as BoxStream)
        })
    }
}

struct Recorded {
    inner: BoxStream,
    tape: Tape,
}

impl AsyncRead for Recorded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.tape.0.lock().unwrap().extend_from_slice(&new);
        r
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.tape.0.lock().unwrap().extend_from_slice(&buf[..*n]);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Broker {
    addr: String,
    handle: Handle,
    _notices: mpsc::Receiver<Notice>,
    tape: Tape,
}

struct Net {
    kind: Kind,
    mem: MemNetwork,
    brokers: Vec<Broker>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Net {
    fn new(kind: Kind) -> Net {
        Net {
            kind,
            mem: MemNetwork::new(),
            brokers: Vec::new(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// A broker with `node_secret` for the peer protocol and `links` for the link layer.
    async fn add(
        &mut self,
        seeds: &[usize],
        node_secret: Option<Secret>,
        links: LinkConfig,
    ) -> usize {
        let i = self.brokers.len();
        let (addr, listener) = match self.kind {
            Kind::Tcp => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                (l.local_addr().unwrap().to_string(), Some(l))
            }
            Kind::Mem => (format!("mem-{i}:9876"), None),
        };
        let tape = Tape::default();
        let dialer: Arc<dyn Dialer> = match self.kind {
            Kind::Tcp => Arc::new(Recording {
                inner: TcpDialer::default(),
                tape: tape.clone(),
            }),
            Kind::Mem => Arc::new(Recording {
                inner: self.mem.dialer(&addr),
                tape: tape.clone(),
            }),
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
            secret: node_secret,
            timing: timing(),
            retention_ms: 3_600_000,
            rng_seed: rand::random(),
            started_ms: driver::now_ms(),
        });
        let (ntx, nrx) = mpsc::channel(1024);
        let store = Arc::new(MemStore::new(id));
        let cancel = self.cancel.clone();
        let handle = driver::spawn_with(
            node,
            dialer,
            store,
            ntx,
            cancel.clone(),
            &self.tracker,
            links,
        );
        common::serve(
            &self.tracker,
            &self.mem,
            &addr,
            listener,
            handle.clone(),
            cancel,
        );
        self.brokers.push(Broker {
            addr,
            handle,
            _notices: nrx,
            tape,
        });
        i
    }

    fn up(&self, i: usize) -> usize {
        self.brokers[i].handle.with_node(|n| n.up_peers().len())
    }

    fn refusals(&self, i: usize) -> Vec<String> {
        self.brokers[i]
            .handle
            .snapshot()
            .refusals
            .into_iter()
            .map(|r| r.reason)
            .collect()
    }

    async fn until(&self, within: Duration, what: &str, f: impl Fn(&Net) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < within,
                "{:?}: {what} not reached within {within:?}",
                self.kind
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("driver tasks stop");
    }
}

fn encrypted() -> LinkConfig {
    LinkConfig::encrypted(secret(SECRET))
}

async fn links_are_encrypted_and_carry_no_plaintext(kind: Kind) {
    let mut net = Net::new(kind);
    let a = net.add(&[], Some(secret(SECRET)), encrypted()).await;
    let b = net.add(&[a], Some(secret(SECRET)), encrypted()).await;
    net.until(Duration::from_secs(10), "link up", |n| {
        n.up(a) == 1 && n.up(b) == 1
    })
    .await;
    let name = "zebra-on-the-wire";
    let inc = net.brokers[b].handle.max_incarnation(name) + 1;
    net.brokers[b].handle.local(Event::AgentChanged {
        name: name.into(),
        token_hash: vec![7],
        incarnation: inc,
        online: true,
        last_seen_ms: driver::now_ms(),
    });
    net.until(Duration::from_secs(10), "registration gossiped", |n| {
        n.brokers[a].handle.lookup(name).is_some()
    })
    .await;
    let snap = net.brokers[a].handle.snapshot();
    assert_eq!(snap.links.len(), 1);
    assert!(snap.links[0].1.encrypted, "{kind:?}: the link is encrypted");
    assert!(snap.links[0].1.frames_in > 0);
    let tape = &net.brokers[b].tape;
    assert!(
        tape.bytes().len() > 200,
        "{kind:?}: the dialer's bytes were recorded"
    );
    assert!(
        !tape.contains(name.as_bytes()),
        "{kind:?}: an agent name crossed in plaintext"
    );
    assert!(
        !tape.contains(b"Hello"),
        "{kind:?}: a peer message name crossed in plaintext"
    );
    assert!(
        !tape.contains(net.brokers[b].addr.as_bytes()),
        "{kind:?}: the advertised address crossed in plaintext"
    );
    net.stop().await;
}

/// The control for the test above: the same scenario over plaintext links shows the name on
/// the tape, so the recording does see what crosses.
async fn plaintext_links_show_the_text(kind: Kind) {
    let mut net = Net::new(kind);
    let a = net.add(&[], None, LinkConfig::plain()).await;
    let b = net.add(&[a], None, LinkConfig::plain()).await;
    net.until(Duration::from_secs(10), "link up", |n| {
        n.up(a) == 1 && n.up(b) == 1
    })
    .await;
    let name = "zebra-on-the-wire";
    net.brokers[b].handle.local(Event::AgentChanged {
        name: name.into(),
        token_hash: vec![7],
        incarnation: 1,
        online: true,
        last_seen_ms: driver::now_ms(),
    });
    net.until(Duration::from_secs(10), "registration gossiped", |n| {
        n.brokers[a].handle.lookup(name).is_some()
    })
    .await;
    assert!(!net.brokers[a].handle.snapshot().links[0].1.encrypted);
    assert!(net.brokers[b].tape.contains(name.as_bytes()));
    net.stop().await;
}

async fn a_wrong_secret_is_refused(kind: Kind) {
    let mut net = Net::new(kind);
    let a = net.add(&[], Some(secret(SECRET)), encrypted()).await;
    let other = "an entirely different secret";
    let b = net
        .add(
            &[a],
            Some(secret(other)),
            LinkConfig::encrypted(secret(other)),
        )
        .await;
    net.until(Duration::from_secs(10), "refusals on both sides", |n| {
        !n.refusals(a).is_empty() && !n.refusals(b).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        net.up(a) + net.up(b),
        0,
        "{kind:?}: no link with a wrong secret"
    );
    let ra = net.refusals(a).join(" | ");
    assert!(
        ra.contains("mesh secret"),
        "{kind:?}: acceptor says why: {ra}"
    );
    let rb = net.refusals(b).join(" | ");
    assert!(
        rb.contains("refused by the peer"),
        "{kind:?}: dialer is told: {rb}"
    );
    assert!(net.brokers[a].handle.snapshot().stats.refusals > 0);
    net.stop().await;
}

async fn a_peer_without_the_secret_is_refused(kind: Kind) {
    let mut net = Net::new(kind);
    let a = net.add(&[], Some(secret(SECRET)), encrypted()).await;
    let b = net.add(&[a], None, LinkConfig::plain()).await;
    net.until(Duration::from_secs(10), "refusals on both sides", |n| {
        !n.refusals(a).is_empty() && !n.refusals(b).is_empty()
    })
    .await;
    assert_eq!(net.up(a) + net.up(b), 0);
    let ra = net.refusals(a).join(" | ");
    assert!(ra.contains("plaintext peer link"), "{kind:?}: {ra}");
    net.stop().await;
}

/// A dialer that has the secret but asks for a plaintext link (a downgrade, as an attacker in
/// the middle would strip the flag) is refused by a broker that requires encryption, even
/// though the HMAC handshake inside would have passed.
async fn a_plaintext_downgrade_is_refused(kind: Kind) {
    let mut net = Net::new(kind);
    let a = net.add(&[], Some(secret(SECRET)), encrypted()).await;
    let never = LinkConfig {
        encrypt: Encrypt::Never,
        ..encrypted()
    };
    let b = net.add(&[a], Some(secret(SECRET)), never).await;
    net.until(Duration::from_secs(10), "refusals on both sides", |n| {
        !n.refusals(a).is_empty() && !n.refusals(b).is_empty()
    })
    .await;
    assert_eq!(
        net.up(a) + net.up(b),
        0,
        "{kind:?}: downgraded link came up"
    );
    let rb = net.refusals(b).join(" | ");
    assert!(rb.contains("requires encrypted links"), "{kind:?}: {rb}");
    net.stop().await;
}

/// The first two frames a real dialer sent (the hello and the first handshake message) plus
/// its first sealed frame, replayed on a new connection: the acceptor answers the handshake
/// (it cannot tell yet), but the sealed frame does not open under the new keys.
async fn a_replayed_handshake_is_refused(kind: Kind) {
    let mut net = Net::new(kind);
    let a = net.add(&[], Some(secret(SECRET)), encrypted()).await;
    let b = net.add(&[a], Some(secret(SECRET)), encrypted()).await;
    net.until(Duration::from_secs(10), "link up", |n| n.up(a) == 1)
        .await;
    let before = net.brokers[a].handle.snapshot().stats.refusals;
    // The dialer's side of the tape starts with its frames: hello, handshake, sealed hello.
    // Take the dialer's first three frames (length-prefixed) from the tape.
    let tape = net.brokers[b].tape.bytes();
    let mut frames = Vec::new();
    let mut at = 0;
    // The tape interleaves both directions; the dialer wrote hello + first handshake message
    // before reading anything, so the first two frames are the dialer's.
    while frames.len() < 2 {
        let len = u32::from_be_bytes(tape[at..at + 4].try_into().unwrap()) as usize;
        frames.push(tape[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    // Skip the acceptor's answer (1 + 48 bytes).
    let len = u32::from_be_bytes(tape[at..at + 4].try_into().unwrap()) as usize;
    assert_eq!(len, 49, "the acceptor's answer follows");
    at += 4 + len;
    let len = u32::from_be_bytes(tape[at..at + 4].try_into().unwrap()) as usize;
    frames.push(tape[at + 4..at + 4 + len].to_vec());

    let stream: BoxStream = match kind {
        Kind::Tcp => Box::new(
            tokio::net::TcpStream::connect(&net.brokers[a].addr)
                .await
                .unwrap(),
        ),
        Kind::Mem => net
            .mem
            .dialer("mem-replay:1")
            .dial(&net.brokers[a].addr)
            .await
            .unwrap(),
    };
    let mut framed = Framed::new(stream, LengthDelimitedCodec::new());
    for f in &frames {
        framed.send(bytes::Bytes::from(f.clone())).await.unwrap();
    }
    net.until(Duration::from_secs(10), "the replay refused", |n| {
        n.brokers[a].handle.snapshot().stats.refusals > before
    })
    .await;
    let r = net.refusals(a).join(" | ");
    assert!(r.contains("replayed handshake"), "{kind:?}: {r}");
    assert_eq!(net.up(a), 1, "{kind:?}: the real link is unharmed");
    net.stop().await;
}

/// A peer over its inbound frame rate is read more slowly, not cut off: everything it sent
/// arrives, the link stays up, and the pauses are counted.
async fn an_inbound_limit_slows_reading_and_loses_nothing(kind: Kind) {
    let mut net = Net::new(kind);
    let limited = LinkConfig {
        limit: federation::link::InboundLimit {
            bytes_per_sec: 0,
            frames_per_sec: 40,
        },
        ..encrypted()
    };
    let a = net.add(&[], Some(secret(SECRET)), limited).await;
    let b = net.add(&[a], Some(secret(SECRET)), encrypted()).await;
    net.until(Duration::from_secs(10), "link up", |n| {
        n.up(a) == 1 && n.up(b) == 1
    })
    .await;
    let closed_before = net.brokers[a].handle.snapshot().stats.links_closed;
    for i in 0..120 {
        net.brokers[b].handle.local(Event::AgentChanged {
            name: format!("agent-{i}"),
            token_hash: vec![1],
            incarnation: 1,
            online: true,
            last_seen_ms: driver::now_ms(),
        });
    }
    net.until(Duration::from_secs(20), "every registration arrived", |n| {
        (0..120).all(|i| n.brokers[a].handle.lookup(&format!("agent-{i}")).is_some())
    })
    .await;
    let snap = net.brokers[a].handle.snapshot();
    let link = &snap.links[0].1;
    assert!(link.throttled > 0, "{kind:?}: the reader paused ({link:?})");
    assert!(link.throttled_ms > 0);
    assert_eq!(
        snap.stats.links_closed, closed_before,
        "{kind:?}: the link stayed up"
    );
    assert_eq!(net.up(a), 1);
    net.stop().await;
}

/// A rotation under way: a broker holding the new and the old secret links with one that has
/// only the old and with one that has only the new; those two do not link with each other.
async fn during_a_rotation_either_secret_links(kind: Kind) {
    let mut net = Net::new(kind);
    let (new, old) = ("the new secret, long enough", "the old secret, long enough");
    let both = || secret(new).with_previous(old.as_bytes().to_vec()).unwrap();
    let a = net
        .add(&[], Some(both()), LinkConfig::encrypted(both()))
        .await;
    let b = net
        .add(&[a], Some(secret(old)), LinkConfig::encrypted(secret(old)))
        .await;
    let c = net
        .add(&[a], Some(secret(new)), LinkConfig::encrypted(secret(new)))
        .await;
    net.until(
        Duration::from_secs(10),
        "both linked with the rotating broker",
        |n| n.up(a) == 2,
    )
    .await;
    // b and c learn each other's address from a's digest; their links are refused.
    net.until(Duration::from_secs(10), "b and c refuse each other", |n| {
        !n.refusals(b).is_empty() || !n.refusals(c).is_empty()
    })
    .await;
    assert_eq!(net.up(b), 1, "{kind:?}: b links only with a");
    assert_eq!(net.up(c), 1, "{kind:?}: c links only with a");
    assert!(net.brokers[a]
        .handle
        .snapshot()
        .links
        .iter()
        .all(|(_, l)| l.encrypted));
    net.stop().await;
}

macro_rules! both {
    ($($name:ident),*) => {
        mod tcp { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Tcp).await } )* }
        mod mem { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Mem).await } )* }
    };
}

both!(
    links_are_encrypted_and_carry_no_plaintext,
    plaintext_links_show_the_text,
    a_wrong_secret_is_refused,
    a_peer_without_the_secret_is_refused,
    a_plaintext_downgrade_is_refused,
    a_replayed_handshake_is_refused,
    an_inbound_limit_slows_reading_and_loses_nothing,
    during_a_rotation_either_secret_links
);
