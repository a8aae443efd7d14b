//! The fuzz harnesses: one function per target, each feeding arbitrary bytes through the same
//! decoding path the broker uses.
//!
//! The libFuzzer targets in `fuzz_targets/` call these; the main test suite includes this
//! file (`tests/fuzz_corpus.rs`) and replays the committed seeds in `fuzz/seeds/<target>/`
//! through them, so a fixed crash stays fixed without a fuzzer.
//!
//! 1. [`frame`]: a connection's bytes, in chunks, through the broker's frame codec; the first
//!    frame as the hello, the rest as requests (client) or peer messages (peer).
//! 2. [`request`]: one frame body as the broker decodes a request, then the input checks the
//!    broker applies before anything else (names, recipients, message ids, JSON `data`).
//! 3. [`peer`]: one frame body as a peer link decodes a [`PeerMsg`].
//! 4. [`node`]: a script of driver events (connections, decoded peer frames, ticks, store
//!    answers) run through a sans-IO federation [`Node`].
//! 5. [`config`]: `mesh.toml` text through the validating parser.
//!
//! A harness panics only on a real failure: a decoder panicking, or a property that must hold
//! (a decoded value encodes and decodes to itself; an error from the codec is the one the
//! broker recognises) not holding.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use federation::auth::Secret;
use federation::delivery::Envelope;
use federation::message::MessageKind;
use federation::node::{Action, ConnId, Event, Node, NodeConfig, Timing};
use federation::noise;
use federation::proto::PeerMsg;
use federation::wire::{self, Hello, Role};
use federation::{AgentName, BrokerId, Dot, Message};
use ipc_mesh::auth::{self, ClientSecret, Side};
use ipc_mesh::config::{defaults, Config};
use ipc_mesh::connection::{self, FrameCodec, FRAME_OVERHEAD};
use ipc_mesh::protocol::{Body, Request};

/// The broker's incoming frame limit with the default config.
pub const MAX_IN: usize = defaults::MAX_MESSAGE_BYTES + FRAME_OVERHEAD;

/// Only the id of a request, as the session decodes it when the body does not decode
/// (`src/broker/session.rs`).
#[derive(serde::Deserialize)]
struct Header {
    #[allow(dead_code)]
    id: u64,
}

/// The largest frame the session accepts before the hello (and, where the broker requires it,
/// client authentication); `PRE_AUTH_MAX_FRAME` in `src/broker/session.rs`.
pub const PRE_AUTH_MAX_FRAME: usize = 4096;

/// The mesh secret of the harnesses' brokers (the seeds' encrypted handshakes use it).
pub const SECRET: &[u8] = b"the fuzzing mesh secret, 16+ bytes";

/// Where a connection is, as the session and the link driver see it.
enum Conn {
    AwaitHello,
    Client,
    /// A plaintext peer link: every frame a [`PeerMsg`].
    Peer,
    /// An encrypted peer link (after this hello): the next frame is the Noise handshake.
    Noise([u8; wire::HELLO_LEN]),
}

impl Conn {
    /// Handles one whole frame; false when the broker would close the connection.
    fn next(&mut self, codec: &mut FrameCodec, f: &[u8]) -> bool {
        match self {
            Conn::AwaitHello => {
                let Ok(hello) = Hello::decode(f) else {
                    return false;
                };
                assert_eq!(&hello.encode()[..], f, "a hello re-encodes to itself");
                *self = match (hello.role, hello.encrypted) {
                    (Role::Client, _) => Conn::Client,
                    (Role::Peer, false) => Conn::Peer,
                    (Role::Peer, true) => Conn::Noise(hello.encode()),
                };
                codec.set_max_in(match self {
                    Conn::Noise(_) => noise::MAX_MESSAGE,
                    _ => MAX_IN,
                });
                true
            }
            // The session closes the connection on a body it cannot even find an id in.
            Conn::Client => request(f),
            // The driver closes a link on an undecodable frame.
            Conn::Peer => peer(f),
            Conn::Noise(hello) => {
                let secret = Secret::new(SECRET.to_vec()).expect("a long enough secret");
                if let Ok((cipher, answer)) = noise::respond(&secret, &hello[..], f) {
                    assert_eq!(answer.len(), 1 + 32 + 16, "an answer is index, key, tag");
                    // What follows is sealed with keys from our fresh ephemeral key: no input
                    // can be opened, so the link ends here for the fuzzer.
                    let (_, mut opener) = cipher.split(MAX_IN);
                    let _ = opener.open(f);
                }
                false
            }
        }
    }
}

/// A connection's bytes. The first input byte picks the size of the chunks the rest arrives
/// in (1–256 bytes), so partial frames and frame heads split across reads are exercised.
pub fn frame(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    // The session peeks at the first byte: `{` is an old JSON client, answered and closed.
    if stream.first() == Some(&b'{') {
        return;
    }
    let chunk = usize::from(chunk) + 1;
    let mut codec = FrameCodec::new(PRE_AUTH_MAX_FRAME, connection::CLIENT_MAX_FRAME);
    let partial = codec.partial();
    let mut conn = Conn::AwaitHello;
    let mut buf = BytesMut::new();
    // Bytes fed, and up to the end of the last whole frame (the codec may hold a frame's head).
    let (mut fed, mut consumed) = (0usize, 0usize);
    let mut again = BytesMut::new();
    'read: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(partial.since().is_none(), "a whole frame is not partial");
                    consumed = fed - buf.len();
                    // The frame re-encodes to exactly the bytes it came from.
                    codec
                        .encode(Bytes::copy_from_slice(&f), &mut again)
                        .expect("a decoded frame re-encodes");
                    if !conn.next(&mut codec, &f) {
                        break 'read;
                    }
                }
                Ok(None) => {
                    if !buf.is_empty() {
                        assert!(partial.since().is_some(), "bytes waiting: a partial frame");
                    }
                    break;
                }
                Err(e) => {
                    // The only error of the length codec: a length over the limit. The broker
                    // tells it apart by `is_oversized`, which must therefore recognise it.
                    assert!(
                        connection::is_oversized(&e),
                        "unrecognised codec error: {e}"
                    );
                    break 'read;
                }
            }
        }
    }
    assert_eq!(&again[..], &stream[..consumed]);
}

/// One request frame body, decoded as the session does; then the input checks the broker
/// makes before it touches state. Returns whether the session would keep the connection.
pub fn request(body: &[u8]) -> bool {
    // Nesting is measured first, without recursion; a frame too deep is refused and closed.
    if connection::msgpack_depth_ok(body, connection::MAX_MSGPACK_DEPTH).is_err() {
        return false;
    }
    let req: Request = match wire::decode(body) {
        Ok(r) => r,
        // An undecodable request is answered by its id, if that can be found; else closed.
        Err(_) => return wire::decode::<Header>(body).is_ok(),
    };
    let again: Request = wire::decode(&wire::encode(&req)).expect("a decoded request re-decodes");
    assert_eq!(again, req, "a request survives encode and decode");
    match &req.body {
        Body::Register { name, .. } => {
            let _ = AgentName::new(name.as_str());
        }
        Body::Rename { new_name } => {
            let _ = AgentName::new(new_name.as_str());
        }
        Body::Send(out) => {
            recipient(&out.to);
            if let Some(r) = &out.reply_to {
                let _ = r.parse::<Dot>();
            }
            message_body(&out.content, &out.data);
        }
        Body::Broadcast { content, data } => message_body(content, data),
        Body::Auth {
            client_nonce,
            proof,
        } => {
            // As the session checks it before anything else.
            let secret = ClientSecret::new(SECRET.to_vec()).expect("a long enough secret");
            if let Some(client_nonce) = auth::parse_nonce(client_nonce) {
                let broker_nonce = [7u8; auth::NONCE_LEN];
                let _ =
                    auth::verify_any(&secret, Side::Client, &broker_nonce, &client_nonce, proof);
            }
        }
        Body::Ack { ids } => {
            for id in ids {
                let _ = id.parse::<Dot>();
            }
        }
        Body::Ping | Body::Fetch { .. } | Body::Wait { .. } | Body::List | Body::Status => {}
    }
    true
}

/// `name` or `name@broker`, split as the broker splits it.
fn recipient(to: &str) {
    let (name, broker) = match to.split_once('@') {
        Some((n, b)) => (n, Some(b)),
        None => (to, None),
    };
    let _ = AgentName::new(name);
    if let Some(b) = broker {
        let _ = b.parse::<BrokerId>();
    }
}

/// The size check, then the JSON check the broker applies to `data` within the limit.
fn message_body(content: &str, data: &Option<String>) {
    let size = content.len() + data.as_ref().map_or(0, |d| d.len());
    if size > defaults::MAX_MESSAGE_BYTES {
        return;
    }
    if let Some(d) = data {
        let _ = ipc_mesh::broker::validate_json_object(d);
    }
}

/// One peer frame body, decoded as the link driver does. Returns whether it decoded.
pub fn peer(body: &[u8]) -> bool {
    let Ok(msg) = wire::decode::<PeerMsg>(body) else {
        return false;
    };
    let again: PeerMsg = wire::decode(&wire::encode(&msg)).expect("a decoded message re-decodes");
    assert_eq!(again, msg, "a peer message survives encode and decode");
    let _ = msg.kind();
    true
}

/// `mesh.toml` text through the parser; a config that parses is within its documented bounds.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = Config::parse(text) else { return };
    assert!(c.limits.max_message_bytes >= 1 && c.limits.max_message_bytes <= 64 * 1024 * 1024);
    assert!(c.limits.inbox_max >= 1 && c.broker.max_connections >= 1);
    assert!(c.limits.outbox_max >= 1);
    assert!(!c.limits.retention.is_zero() && !c.limits.rename_forward.is_zero());
    let (lo, hi) = c.mesh.sibling_ports;
    assert!(lo >= 1 && lo <= hi && hi - lo <= 100);
}

/// The node under test: broker id 1, no mesh secret (so a fuzzed peer can finish the
/// handshake and reach the established-link code), one seed.
const ME: u32 = 1;
const SEED_ADDR: &str = "seed:9876";
/// A realistic wall clock (ms) to start from.
const START_MS: u64 = 1_700_000_000_000;

/// What one script step does; the step's first byte, modulo the count, picks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Someone dialed us: a new connection.
    Accept = 0,
    /// A dial we were asked for connected: a new connection.
    Connect,
    /// A frame on an open connection: a u16 (BE) length, then the body, decoded as a
    /// [`PeerMsg`]. An undecodable one closes the connection, as the driver does.
    Receive,
    /// An open connection closed.
    Close,
    /// Time passes (the next byte × 50 ms), then a tick.
    Tick,
    /// A dial we were asked for failed.
    DialFail,
    /// One of our agents changed (next bytes: name, incarnation, online).
    AgentChanged,
    /// One of our agents left (next byte: name).
    AgentRemoved,
    /// The outbox depths (next bytes: a destination broker, a depth).
    Outbox,
    /// The oldest unanswered `Accept` is stored (at the next store epoch).
    Store,
    /// The store reaches its latest epoch.
    Durable,
    /// The oldest unanswered `ReadOutbox` is answered (next byte: how many envelopes).
    ReadOutbox,
    /// The link layer refused a link (next byte: odd for one we dialed, from the pending
    /// dials; even for an accepted one).
    LinkRefused,
}

const OPS: u8 = 13;

impl Op {
    fn from_byte(b: u8) -> Op {
        match b % OPS {
            0 => Op::Accept,
            1 => Op::Connect,
            2 => Op::Receive,
            3 => Op::Close,
            4 => Op::Tick,
            5 => Op::DialFail,
            6 => Op::AgentChanged,
            7 => Op::AgentRemoved,
            8 => Op::Outbox,
            9 => Op::Store,
            10 => Op::Durable,
            11 => Op::ReadOutbox,
            _ => Op::LinkRefused,
        }
    }
}

/// Builds node scripts (for the seed corpus): each method appends one step.
#[derive(Default)]
pub struct Script(pub Vec<u8>);

impl Script {
    pub fn op(mut self, op: Op, args: &[u8]) -> Script {
        self.0.push(op as u8);
        self.0.extend_from_slice(args);
        self
    }

    /// A frame on the `pick`-th open connection.
    pub fn receive(mut self, pick: u8, msg: &PeerMsg) -> Script {
        let body = wire::encode(msg);
        self.0.push(Op::Receive as u8);
        self.0.push(pick);
        self.0
            .put_u16(u16::try_from(body.len()).expect("a seed message under 64 KiB"));
        self.0.extend_from_slice(&body);
        self
    }
}

/// The bytes of a script, read front to back; missing bytes read as zero.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

/// A script of driver events through a [`Node`], carrying out its actions the way the driver
/// and the broker's store do (within the script's choices).
pub fn node(data: &[u8]) {
    let mut node = Node::new(NodeConfig {
        id: BrokerId::from_u32(ME),
        advertise: "me:9876".into(),
        seeds: vec![SEED_ADDR.into()],
        siblings: Vec::new(),
        secret: None,
        timing: Timing::default(),
        retention_ms: 60_000,
        rng_seed: 0,
        started_ms: START_MS,
    });
    let mut now = START_MS;
    let mut next_conn: ConnId = 1;
    let mut open: Vec<ConnId> = Vec::new();
    let mut dials: Vec<String> = Vec::new();
    let mut accepts: Vec<(ConnId, BrokerId, u64)> = Vec::new();
    let mut reads: Vec<(BrokerId, ConnId, u64, usize)> = Vec::new();
    let (mut epoch, mut stored_epoch) = (0u64, 0u64);
    let mut input = Input(data);
    let mut steps = 0;
    let actions = node.tick(now);
    carry_out(actions, &mut open, &mut dials, &mut accepts, &mut reads);
    while !input.0.is_empty() && steps < 512 {
        steps += 1;
        let op = Op::from_byte(input.u8());
        let event = match op {
            Op::Accept => {
                let conn = next_conn;
                next_conn += 1;
                open.push(conn);
                Some(Event::Accepted {
                    conn,
                    remote: format!("10.0.0.{}:40000", input.u8()),
                })
            }
            Op::Connect | Op::DialFail => {
                let addr = if dials.is_empty() {
                    SEED_ADDR.to_string()
                } else {
                    let i = usize::from(input.u8()) % dials.len();
                    dials.remove(i)
                };
                if op == Op::Connect {
                    let conn = next_conn;
                    next_conn += 1;
                    open.push(conn);
                    Some(Event::Connected { conn, addr })
                } else {
                    Some(Event::DialFailed {
                        addr,
                        error: "refused".into(),
                    })
                }
            }
            Op::Receive => {
                let pick = input.u8();
                let len = usize::from(input.u16());
                let body = input.take(len);
                let Some(conn) = pick_conn(&open, pick) else {
                    continue;
                };
                match wire::decode::<PeerMsg>(body) {
                    Ok(msg) => Some(Event::Received { conn, msg }),
                    Err(_) => {
                        open.retain(|c| *c != conn);
                        Some(Event::Closed { conn })
                    }
                }
            }
            Op::Close => {
                let Some(conn) = pick_conn(&open, input.u8()) else {
                    continue;
                };
                open.retain(|c| *c != conn);
                Some(Event::Closed { conn })
            }
            Op::Tick => {
                now += u64::from(input.u8()) * 50;
                None
            }
            Op::AgentChanged => {
                let name = format!("agent-{}", input.u8() % 8);
                let incarnation = u64::from(input.u8());
                let online = input.u8() & 1 == 1;
                Some(Event::AgentChanged {
                    name,
                    token_hash: vec![incarnation as u8; 32],
                    incarnation,
                    online,
                    last_seen_ms: now,
                })
            }
            Op::AgentRemoved => Some(Event::AgentRemoved {
                name: format!("agent-{}", input.u8() % 8),
            }),
            Op::Outbox => {
                let dest = BrokerId::from_u32(u32::from(input.u8() % 4));
                let depth = u64::from(input.u8());
                Some(Event::Outbox {
                    depths: vec![(dest, depth)],
                })
            }
            Op::Store => {
                if accepts.is_empty() {
                    continue;
                }
                let (conn, dest, upto) = accepts.remove(0);
                epoch += 1;
                stored_epoch = epoch;
                Some(Event::Stored {
                    conn,
                    dest,
                    upto,
                    epoch,
                })
            }
            Op::LinkRefused => {
                let dialed = input.u8() & 1 == 1;
                let addr = if !dialed {
                    "10.0.0.9:40000".to_string()
                } else if dials.is_empty() {
                    SEED_ADDR.to_string()
                } else {
                    dials.remove(0)
                };
                Some(Event::LinkRefused {
                    addr,
                    reason: "the encrypted handshake failed".into(),
                    dialed,
                })
            }
            Op::Durable => Some(Event::Durable {
                epoch: stored_epoch,
            }),
            Op::ReadOutbox => {
                if reads.is_empty() {
                    continue;
                }
                let (dest, conn, after, limit) = reads.remove(0);
                let n = usize::from(input.u8()).min(limit).min(16);
                let entries = (1..=n as u64)
                    .map(|i| (after + i, envelope(dest, after + i, now)))
                    .collect();
                Some(Event::OutboxRead {
                    dest,
                    conn,
                    entries,
                })
            }
        };
        let actions = match event {
            Some(e) => node.step(now, e),
            None => node.tick(now),
        };
        carry_out(actions, &mut open, &mut dials, &mut accepts, &mut reads);
    }
    // What `status` reads.
    let _ = node.peer_status(now);
    let _ = node.outflow_status();
    let _ = node.registry().agents();
}

fn pick_conn(open: &[ConnId], pick: u8) -> Option<ConnId> {
    if open.is_empty() {
        None
    } else {
        Some(open[usize::from(pick) % open.len()])
    }
}

/// Records what the driver and store would have to answer; every message sent must encode.
fn carry_out(
    actions: Vec<Action>,
    open: &mut Vec<ConnId>,
    dials: &mut Vec<String>,
    accepts: &mut Vec<(ConnId, BrokerId, u64)>,
    reads: &mut Vec<(BrokerId, ConnId, u64, usize)>,
) {
    for a in actions {
        match a {
            Action::Dial { addr } => dials.push(addr),
            Action::Send { msg, .. } => {
                let again: PeerMsg = wire::decode(&wire::encode(&msg)).expect("sent re-decodes");
                assert_eq!(again, msg);
            }
            Action::Close { conn, .. } => open.retain(|c| *c != conn),
            Action::Accept {
                conn, dest, upto, ..
            } => accepts.push((conn, dest, upto)),
            Action::ReadOutbox {
                dest,
                conn,
                after,
                limit,
            } => reads.push((dest, conn, after, limit)),
            Action::PeerUp { .. }
            | Action::PeerDown { .. }
            | Action::Superseded(_)
            | Action::Refused { .. }
            | Action::Trim { .. } => {}
        }
    }
}

/// An envelope as this broker's outbox would hold it at position `pos`.
pub fn envelope(dest: BrokerId, pos: u64, now: u64) -> Envelope {
    let me = BrokerId::from_u32(ME);
    let message = Message {
        dot: Dot::new(me, pos),
        from: AgentName::new("sender").expect("valid"),
        to: AgentName::new("recipient").expect("valid"),
        sent_at_ms: now,
        content: "hello".into(),
        data: None,
        reply_to: None,
        kind: MessageKind::Direct,
        after: None,
    };
    let mut e = Envelope::new(Dot::new(me, pos), dest, message, now);
    e.prev = pos - 1;
    e
}
