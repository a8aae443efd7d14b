//! Send dedup keys: a resend with the key of an earlier send is answered as that send was,
//! and stored no second time, for the retention.
//!
//! 1. Each key's record is appended to a *group* of up to [`GROUP`] records (`d` + group
//!    number → the records, one after another), in the batch that stores the message, so
//!    both reach the disk in the same flush or neither does. The staged engine gathers a
//!    flush's appends to a group into one write: a few sled writes for hundreds of sends.
//!    Keyed by the client's key, which is random, a record apiece cost a write into a random
//!    place of sled's tree, and a loaded broker sent about 40 % more per second without them
//!    (docs/benchmarks.md).
//! 2. An index in memory maps a hash of (sender, key) to its record's group: 16 bytes a key,
//!    about 35 MiB for a million. A lookup reads the group and finds the record in it.
//! 3. At start the index is rebuilt from the groups (records of the earlier layout, keyed by
//!    sender and key, are moved into groups), and a new group is opened. The retention sweep
//!    deletes groups from the head whose records are all older than the retention, with their
//!    index slots.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use federation::AgentName;

use super::DedupEntry;
use crate::error::{Error, Result};
use crate::storage::{keys, Batch, Engine};

/// A record of the log.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    sender: String,
    key: String,
    entry: DedupEntry,
}

/// Records a group holds before the next one is opened.
const GROUP: usize = 256;

/// The dedup index. See the module docs.
pub struct Dedup {
    hasher: RandomState,
    /// Hash of (sender, key) → the record's group. The key is a hash already.
    places: HashMap<u64, u64, BuildHasherDefault<AsIs>>,
    /// The group records are appended to, and how many it has.
    group: u64,
    in_group: usize,
}

/// Hashes a u64 that is a hash already: as it is.
#[derive(Default)]
struct AsIs(u64);

impl Hasher for AsIs {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Dedup {
    /// Reads the log into a new index, first moving records of the earlier layout into it.
    pub fn load(engine: &dyn Engine) -> Result<Dedup> {
        let mut d = Dedup {
            hasher: RandomState::new(),
            places: HashMap::default(),
            group: 0,
            in_group: 0,
        };
        let mut last_group = None;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = engine.scan(&[keys::DEDUP_LOG], after.as_deref(), 64)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in &page {
                let group = parse_key(k)?;
                for record in decode_group(v)? {
                    let slot = d.slot(&record.sender, &record.key);
                    d.places.insert(slot, group);
                }
                last_group = Some(group);
            }
            if page.len() < 64 {
                break;
            }
        }
        // A fresh group: records never go into one written before a restart.
        d.group = last_group.map_or(0, |g| g + 1);
        d.upgrade(engine)?;
        Ok(d)
    }

    /// How many keys are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.places.len()
    }

    /// What the send with `key` from `sender` was answered, if there was one.
    pub fn lookup(
        &self,
        engine: &dyn Engine,
        sender: &AgentName,
        key: &str,
    ) -> Result<Option<DedupEntry>> {
        let Some(group) = self.places.get(&self.slot(sender.as_str(), key)) else {
            return Ok(None);
        };
        let Some(v) = engine.get(&keys::dedup_log(*group))? else {
            return Ok(None);
        };
        // Another key with the same hash (or a record whose batch failed) is not in it.
        Ok(decode_group(&v)?
            .into_iter()
            .find(|r| r.sender == sender.as_str() && r.key == key)
            .map(|r| r.entry))
    }

    /// Records `entry` for `key` from `sender` in `batch` (the batch that stores the message).
    pub fn record(
        &mut self,
        batch: &mut Batch,
        sender: &AgentName,
        key: String,
        entry: DedupEntry,
    ) {
        let slot = self.slot(sender.as_str(), &key);
        let record = Record {
            sender: sender.to_string(),
            key,
            entry,
        };
        batch.append(
            keys::dedup_log(self.group),
            federation::wire::encode(&record),
        );
        self.places.insert(slot, self.group);
        self.in_group += 1;
        if self.in_group == GROUP {
            self.group += 1;
            self.in_group = 0;
        }
    }

    /// Adds to `batch` the deletion of up to `max` groups from the head whose records are all
    /// at or before `cutoff` (ms), and forgets their keys; returns how many groups.
    pub fn forget_before(
        &mut self,
        engine: &dyn Engine,
        batch: &mut Batch,
        cutoff: u64,
        max: usize,
    ) -> Result<usize> {
        let page = engine.scan(&[keys::DEDUP_LOG], None, max)?;
        let mut n = 0;
        for (k, v) in page {
            let group = parse_key(&k)?;
            let records = decode_group(&v)?;
            if records.iter().any(|r| r.entry.at_ms > cutoff) {
                break;
            }
            for r in records {
                let slot = self.slot(&r.sender, &r.key);
                if self.places.get(&slot) == Some(&group) {
                    self.places.remove(&slot);
                }
            }
            batch.delete(k);
            n += 1;
        }
        Ok(n)
    }

    fn slot(&self, sender: &str, key: &str) -> u64 {
        self.hasher.hash_one((sender, key))
    }

    /// Moves records of the earlier layout (`k` + sender + `\0` + key → entry) into groups.
    fn upgrade(&mut self, engine: &dyn Engine) -> Result<()> {
        let mut moved = 0u64;
        loop {
            let page = engine.scan(&[keys::DEDUP], None, 1024)?;
            if page.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            for (k, v) in page {
                batch.delete(k.clone());
                let Some(nul) = k.iter().position(|b| *b == 0) else {
                    continue;
                };
                let (Some(sender), Ok(key)) = (
                    std::str::from_utf8(&k[1..nul])
                        .ok()
                        .and_then(|n| AgentName::new(n).ok()),
                    std::str::from_utf8(&k[nul + 1..]),
                ) else {
                    continue;
                };
                let Ok(entry) = federation::wire::decode::<DedupEntry>(&v) else {
                    continue;
                };
                self.record(&mut batch, &sender, key.to_string(), entry);
                moved += 1;
            }
            engine.apply(batch)?;
        }
        if moved > 0 {
            engine.flush()?;
            tracing::info!(keys = moved, "moved send dedup keys into the dedup log");
        }
        Ok(())
    }
}

/// The records of a group, in the order they were appended.
fn decode_group(v: &[u8]) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut rest = std::io::Cursor::new(v);
    while (rest.position() as usize) < v.len() {
        let record: Record = rmp_serde::from_read(&mut rest)
            .map_err(|e| Error::Storage(format!("corrupt dedup record: {e}")))?;
        records.push(record);
    }
    Ok(records)
}

fn parse_key(k: &[u8]) -> Result<u64> {
    let seq: [u8; 8] = k
        .get(1..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::Storage("corrupt dedup log key".into()))?;
    Ok(u64::from_be_bytes(seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Route;
    use crate::storage::{MemoryEngine, Staged};

    fn entry(id: &str, at_ms: u64) -> DedupEntry {
        DedupEntry {
            id: id.into(),
            route: Route::Held { to: "bob".into() },
            at_ms,
        }
    }

    #[test]
    fn remembers_reloads_and_forgets_by_age() {
        let e = Staged::new(MemoryEngine::new());
        let alice = AgentName::new("alice").unwrap();
        let carol = AgentName::new("carol").unwrap();
        let mut d = Dedup::load(&e).unwrap();
        let mut b = Batch::new();
        d.record(&mut b, &alice, "k1".into(), entry("a:1", 100));
        e.apply(b).unwrap();
        let found = d.lookup(&e, &alice, "k1").unwrap().unwrap();
        assert_eq!(found.id, "a:1");
        // The key is the sender's own.
        assert!(d.lookup(&e, &carol, "k1").unwrap().is_none());
        assert!(d.lookup(&e, &alice, "k3").unwrap().is_none());
        e.flush().unwrap();

        // After a restart records go to a new group.
        let mut d = Dedup::load(&e).unwrap();
        let mut b = Batch::new();
        d.record(&mut b, &alice, "k2".into(), entry("a:2", 200));
        e.apply(b).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.lookup(&e, &alice, "k1").unwrap().unwrap().id, "a:1");
        assert_eq!(d.lookup(&e, &alice, "k2").unwrap().unwrap().id, "a:2");

        let mut b = Batch::new();
        assert_eq!(d.forget_before(&e, &mut b, 150, 64).unwrap(), 1);
        e.apply(b).unwrap();
        assert!(d.lookup(&e, &alice, "k1").unwrap().is_none());
        assert!(d.lookup(&e, &alice, "k2").unwrap().is_some());
        assert_eq!(d.len(), 1);
        // A group with a record still young stays whole.
        let mut b = Batch::new();
        assert_eq!(d.forget_before(&e, &mut b, 150, 64).unwrap(), 0);
    }

    #[test]
    fn a_group_gathers_records_across_flushes_and_then_closes() {
        let e = Staged::new(MemoryEngine::new());
        let alice = AgentName::new("alice").unwrap();
        let mut d = Dedup::load(&e).unwrap();
        let n = GROUP + 10;
        for i in 0..n {
            let mut b = Batch::new();
            d.record(&mut b, &alice, format!("k{i}"), entry(&format!("a:{i}"), 1));
            e.apply(b).unwrap();
            if i % 7 == 0 {
                e.flush().unwrap();
            }
        }
        for i in (0..n).step_by(13) {
            let found = d.lookup(&e, &alice, &format!("k{i}")).unwrap().unwrap();
            assert_eq!(found.id, format!("a:{i}"));
        }
        e.flush().unwrap();
        let groups = e.scan(&[keys::DEDUP_LOG], None, 10).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(decode_group(&groups[0].1).unwrap().len(), GROUP);
        let d = Dedup::load(&e).unwrap();
        assert_eq!(d.len(), n);
        assert_eq!(d.group, 2);
    }

    #[test]
    fn records_of_the_earlier_layout_move_into_the_log() {
        let e = MemoryEngine::new();
        let alice = AgentName::new("alice").unwrap();
        let mut b = Batch::new();
        b.put(
            keys::dedup(&alice, "old-key"),
            federation::wire::encode(&entry("a:9", 50)),
        );
        e.apply(b).unwrap();
        let d = Dedup::load(&e).unwrap();
        assert_eq!(d.lookup(&e, &alice, "old-key").unwrap().unwrap().id, "a:9");
        assert!(e.scan(&[keys::DEDUP], None, 10).unwrap().is_empty());
    }
}
