//! Storage: a small ordered key/value engine trait, with sled as the real engine and an
//! in-memory twin for tests.
//!
//! Everything the broker keeps lives in one keyspace, partitioned by a one-byte prefix (see
//! [`keys`]), so that a [`Batch`] touching inboxes, agents and metadata applies atomically.
//! Writes are visible at once and durable after [`Engine::flush`]; the broker acknowledges
//! nothing before the flush that covers it (see `broker::commit`).

mod memory;
mod sled;
mod staged;

pub use self::memory::MemoryEngine;
pub use self::sled::{SledEngine, SledTree};
pub use self::staged::Staged;

use crate::error::Result;

/// One write in a [`Batch`].
#[derive(Clone, Debug)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Adds bytes to the end of a key's value (making it, when there is none).
    Append(Vec<u8>, Vec<u8>),
}

/// Writes applied all together or not at all.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(key.into(), value.into()));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(key.into()));
    }

    pub fn append(&mut self, key: impl Into<Vec<u8>>, tail: impl Into<Vec<u8>>) {
        self.ops.push(Op::Append(key.into(), tail.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// An ordered key/value store.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Applies every op of the batch atomically.
    fn apply(&self, batch: Batch) -> Result<()>;

    /// Up to `limit` pairs whose keys start with `prefix` and sort after `after` (all of them
    /// when `after` is `None`), in key order.
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Makes every write applied so far durable. Blocking: call it off the async runtime.
    fn flush(&self) -> Result<()>;
}

/// Key layout. Agent names never contain a NUL byte, so `name\0` ends a name unambiguously.
pub mod keys {
    use federation::AgentName;

    /// Broker metadata (`m` + field name).
    pub const META: u8 = b'm';
    /// Inbox messages, read or not: `u` + recipient + `\0` + sequence (u64 BE) → encoded
    /// message (see [`crate::inbox`]).
    pub const UNREAD: u8 = b'u';
    /// Read marks: `r` + recipient + `\0` + sequence → when it was read (u64 BE ms). An inbox
    /// message with a mark is read.
    pub const READ: u8 = b'r';
    /// Read ranges: `w` + recipient + `\0` + first sequence → last sequence (u64 BE) and when
    /// they were read (u64 BE ms). Every inbox message from first to last is read.
    pub const READ_RANGE: u8 = b'w';
    /// Agent records: `a` + name → encoded record.
    pub const AGENT: u8 = b'a';
    /// Outboxes: `o` + destination broker (u32 BE) + position (u64 BE) → encoded envelope.
    pub const OUTBOX: u8 = b'o';
    /// The last sequence queued per destination: `q` + destination → u64 BE.
    pub const CHAIN: u8 = b'q';
    /// Messages that reached an inbox from the mesh: `x` + recipient + `\0` + message dot →
    /// when it was sent. A second copy of one message for one agent (one that followed the
    /// agent's move while another reached it directly) is recognised and dropped.
    pub const SEEN: u8 = b'x';
    /// Brokers of the mesh this broker has linked with: `b` + broker id → advertised address.
    /// Kept so a broker that restarts still knows whom a broadcast must reach (and whom to
    /// dial) before gossip has told it anything.
    pub const MEMBER: u8 = b'b';
    /// The reorder buffer: `p` + origin broker + sequence → an envelope that overtook its
    /// predecessor and waits for it.
    pub const PENDING: u8 = b'p';
    /// The delivery clock: `c` + origin broker → encoded origin clock.
    pub const CLOCK: u8 = b'c';
    /// Send dedup keys as earlier versions stored them: `k` + sender + `\0` + key → encoded
    /// [`crate::broker::DedupEntry`]. Moved into [`DEDUP_LOG`] at start.
    pub const DEDUP: u8 = b'k';
    /// The send dedup log: `d` + group number (u64 BE) → up to 256 records (sender, key and
    /// entry), one after another, appended to (see `broker/dedup.rs`).
    pub const DEDUP_LOG: u8 = b'd';
    /// Fences and redirects (src/broker/fence.rs). Closed fences: `g` + sender + `\0` + old
    /// broker (u32 BE) → highest closed incarnation.
    pub const FENCE_CLOSED: u8 = b'g';
    /// Messages held behind a fence: `h` + sender + `\0` + old broker + position (u64 BE) → encoded entry.
    pub const FENCE_HELD: u8 = b'h';
    /// Redirects seen: `i` + recipient + `\0` + sending broker → highest marker sequence.
    pub const REDIRECTED: u8 = b'i';
    /// Copies waiting for a redirect marker: `j` + recipient + `\0` + sending broker + position.
    pub const REDIRECT_WAITING: u8 = b'j';
    /// Where this broker last sent each recipient's messages: `t` + recipient → broker (u32 BE)
    /// and the sequence of the last marker sent for it (u64 BE).
    pub const ROUTE: u8 = b't';
    /// Markers parked until their recipient leaves: `v` + recipient + `\0` + position → marker.
    pub const PARKED_MARKER: u8 = b'v';

    pub fn meta(field: &str) -> Vec<u8> {
        let mut k = vec![META];
        k.extend_from_slice(field.as_bytes());
        k
    }

    /// The prefix of every key of one agent's inbox in `space`.
    pub fn inbox_prefix(space: u8, agent: &AgentName) -> Vec<u8> {
        let mut k = Vec::with_capacity(agent.as_str().len() + 2);
        k.push(space);
        k.extend_from_slice(agent.as_str().as_bytes());
        k.push(0);
        k
    }

    pub fn inbox(space: u8, agent: &AgentName, seq: u64) -> Vec<u8> {
        let mut k = inbox_prefix(space, agent);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// The recipient and sequence of an inbox key.
    pub fn parse_inbox(key: &[u8]) -> Option<(&str, u64)> {
        let rest = key.get(1..)?;
        let nul = rest.iter().position(|b| *b == 0)?;
        let name = std::str::from_utf8(&rest[..nul]).ok()?;
        let seq: [u8; 8] = rest.get(nul + 1..)?.try_into().ok()?;
        Some((name, u64::from_be_bytes(seq)))
    }

    pub fn dedup(sender: &AgentName, key: &str) -> Vec<u8> {
        let mut k = vec![DEDUP];
        k.extend_from_slice(sender.as_str().as_bytes());
        k.push(0);
        k.extend_from_slice(key.as_bytes());
        k
    }

    pub fn dedup_log(group: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(9);
        k.push(DEDUP_LOG);
        k.extend_from_slice(&group.to_be_bytes());
        k
    }

    pub fn seen(agent: &AgentName, dot: federation::Dot) -> Vec<u8> {
        let mut k = inbox_prefix(SEEN, agent);
        k.extend_from_slice(&dot.origin.as_u32().to_be_bytes());
        k.extend_from_slice(&dot.seq.to_be_bytes());
        k
    }

    pub fn agent(name: &AgentName) -> Vec<u8> {
        let mut k = vec![AGENT];
        k.extend_from_slice(name.as_str().as_bytes());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same contract, run against both engines.
    fn exercise(engine: &dyn Engine) {
        let mut b = Batch::new();
        b.put(b"a1".to_vec(), b"x".to_vec());
        b.put(b"a2".to_vec(), b"y".to_vec());
        b.put(b"a3".to_vec(), b"z".to_vec());
        b.put(b"b1".to_vec(), b"w".to_vec());
        engine.apply(b).unwrap();
        assert_eq!(engine.get(b"a2").unwrap(), Some(b"y".to_vec()));
        assert_eq!(engine.get(b"nope").unwrap(), None);

        let all = engine.scan(b"a", None, 10).unwrap();
        assert_eq!(all.len(), 3);
        let after = engine.scan(b"a", Some(b"a1"), 1).unwrap();
        assert_eq!(after, vec![(b"a2".to_vec(), b"y".to_vec())]);

        let mut b = Batch::new();
        b.delete(b"a1".to_vec());
        b.put(b"a2".to_vec(), b"Y".to_vec());
        engine.apply(b).unwrap();
        let all = engine.scan(b"a", None, 10).unwrap();
        assert_eq!(
            all,
            vec![
                (b"a2".to_vec(), b"Y".to_vec()),
                (b"a3".to_vec(), b"z".to_vec())
            ]
        );
        engine.flush().unwrap();
    }

    #[test]
    fn memory_engine_meets_the_contract() {
        exercise(&MemoryEngine::new());
    }

    #[test]
    fn staged_engine_meets_the_contract_before_and_after_flushes() {
        exercise(&Staged::new(MemoryEngine::new()));
        // The same, with the first writes already beneath when the rest are staged.
        let e = Staged::new(MemoryEngine::new());
        let mut b = Batch::new();
        b.put(b"a1".to_vec(), b"old".to_vec());
        b.put(b"a9".to_vec(), b"gone".to_vec());
        e.apply(b).unwrap();
        e.flush().unwrap();
        let mut b = Batch::new();
        b.delete(b"a9".to_vec());
        e.apply(b).unwrap();
        exercise(&e);
    }

    #[test]
    fn staged_writes_are_read_before_they_reach_the_engine_beneath() {
        let e = Staged::new(MemoryEngine::new());
        let mut b = Batch::new();
        for i in [1u8, 3, 5, 7] {
            b.put(vec![b'a', i], vec![i]);
        }
        e.apply(b).unwrap();
        e.flush().unwrap();
        assert_eq!(e.staged(), 0);
        let mut b = Batch::new();
        b.put(vec![b'a', 2], vec![2]);
        b.delete(vec![b'a', 3]);
        b.put(vec![b'a', 5], vec![50]);
        b.put(vec![b'a', 8], vec![8]);
        b.put(vec![b'b', 0], vec![0]);
        e.apply(b).unwrap();
        assert_eq!(e.staged(), 5);
        let want: Vec<(Vec<u8>, Vec<u8>)> = [(1u8, 1u8), (2, 2), (5, 50), (7, 7), (8, 8)]
            .iter()
            .map(|(k, v)| (vec![b'a', *k], vec![*v]))
            .collect();
        assert_eq!(e.scan(b"a", None, usize::MAX).unwrap(), want);
        assert_eq!(e.scan(b"a", None, 2).unwrap(), want[..2]);
        assert_eq!(e.scan(b"a", Some(&[b'a', 2]), 2).unwrap(), want[2..4]);
        assert_eq!(e.get(&[b'a', 3]).unwrap(), None);
        assert_eq!(e.get(&[b'a', 5]).unwrap(), Some(vec![50]));
        // After the flush the engine beneath holds exactly the same.
        e.flush().unwrap();
        assert_eq!(e.staged(), 0);
        assert_eq!(e.scan(b"a", None, usize::MAX).unwrap(), want);
        assert_eq!(e.get(&[b'a', 3]).unwrap(), None);
    }

    /// Appends, run against an engine: staged or not, flushed between them or not.
    fn appends(engine: &dyn Engine, flush_between: bool) {
        let step = |b: Batch| {
            engine.apply(b).unwrap();
            if flush_between {
                engine.flush().unwrap();
            }
        };
        let mut b = Batch::new();
        b.append(b"g1".to_vec(), b"ab".to_vec());
        b.put(b"g2".to_vec(), b"x".to_vec());
        step(b);
        let mut b = Batch::new();
        b.append(b"g1".to_vec(), b"cd".to_vec());
        b.append(b"g2".to_vec(), b"y".to_vec());
        b.append(b"g1".to_vec(), b"e".to_vec());
        step(b);
        assert_eq!(engine.get(b"g1").unwrap(), Some(b"abcde".to_vec()));
        assert_eq!(
            engine.scan(b"g", None, 10).unwrap(),
            vec![
                (b"g1".to_vec(), b"abcde".to_vec()),
                (b"g2".to_vec(), b"xy".to_vec())
            ]
        );
        let mut b = Batch::new();
        b.delete(b"g2".to_vec());
        b.append(b"g2".to_vec(), b"z".to_vec());
        step(b);
        assert_eq!(engine.get(b"g2").unwrap(), Some(b"z".to_vec()));
        engine.flush().unwrap();
        assert_eq!(engine.get(b"g1").unwrap(), Some(b"abcde".to_vec()));
        assert_eq!(engine.get(b"g2").unwrap(), Some(b"z".to_vec()));
    }

    #[test]
    fn appends_extend_a_value_in_every_engine() {
        appends(&MemoryEngine::new(), false);
        appends(&Staged::new(MemoryEngine::new()), false);
        appends(&Staged::new(MemoryEngine::new()), true);
        let dir = tempfile::tempdir().unwrap();
        appends(&SledEngine::open(dir.path()).unwrap(), false);
        let dir = tempfile::tempdir().unwrap();
        appends(&SledEngine::open(dir.path()).unwrap(), true);
    }

    #[test]
    fn a_scan_pages_past_many_staged_deletes() {
        let e = Staged::new(MemoryEngine::new());
        let mut b = Batch::new();
        for i in 0u16..3000 {
            b.put([b"u".as_slice(), &i.to_be_bytes()].concat(), vec![1]);
        }
        e.apply(b).unwrap();
        e.flush().unwrap();
        let mut b = Batch::new();
        for i in 0u16..2990 {
            b.delete([b"u".as_slice(), &i.to_be_bytes()].concat());
        }
        e.apply(b).unwrap();
        let left = e.scan(b"u", None, 5).unwrap();
        assert_eq!(left.len(), 5);
        assert_eq!(
            left[0].0,
            [b"u".as_slice(), &2990u16.to_be_bytes()].concat()
        );
        assert_eq!(e.scan(b"u", None, usize::MAX).unwrap().len(), 10);
    }

    #[test]
    fn sled_engine_meets_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&SledEngine::open(dir.path()).unwrap());
    }

    #[test]
    fn sled_engine_keeps_flushed_writes_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = SledEngine::open(dir.path()).unwrap();
            let mut b = Batch::new();
            b.put(b"k".to_vec(), b"v".to_vec());
            e.apply(b).unwrap();
            e.flush().unwrap();
        }
        let e = SledEngine::open(dir.path()).unwrap();
        assert_eq!(e.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn inbox_keys_parse_back() {
        let name = federation::AgentName::new("alice").unwrap();
        let k = keys::inbox(keys::UNREAD, &name, 77);
        assert_eq!(keys::parse_inbox(&k), Some(("alice", 77)));
        assert!(k.starts_with(&keys::inbox_prefix(keys::UNREAD, &name)));
        // "al" is a prefix of "alice" as text, but not as an inbox prefix.
        let al = federation::AgentName::new("al").unwrap();
        assert!(!k.starts_with(&keys::inbox_prefix(keys::UNREAD, &al)));
    }
}
