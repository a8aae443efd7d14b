//! Send dedup keys: a resend with the key of an earlier send is answered as that send was,
//! and stored no second time, for the retention.
//!
//! 1. Each key's record goes into a log in the order of the messages' sequences (`d` + the
//!    message's sequence → sender, key and what the send was answered), in the batch that
//!    stores the message. It lands at the end of its keyspace, where sled's writes are
//!    cheapest. Keyed by the client's key, which is
//!    random, the same record cost a write into a random place of the tree: a loaded broker
//!    sent about 40 % more per second without it (docs/benchmarks.md).
//! 2. An index in memory maps a hash of (sender, key) to its record's sequence: 16 bytes a key,
//!    about 35 MiB for a million. A lookup reads the record there and checks it is the one
//!    asked for.
//! 3. At start the index is rebuilt from the log (records of the earlier layout, keyed by
//!    sender and key, are moved into it). The retention sweep deletes records from the head of
//!    the log, with their index slots; sequences grow with time, so the oldest come first.

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

/// The index of the dedup log. See the module docs.
pub struct Dedup {
    hasher: RandomState,
    /// Hash of (sender, key) → the record's sequence. The key is a hash already.
    places: HashMap<u64, u64, BuildHasherDefault<AsIs>>,
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
        };
        d.upgrade(engine)?;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = engine.scan(&[keys::DEDUP_LOG], after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in &page {
                let record = decode(v)?;
                let slot = d.slot(&record.sender, &record.key);
                d.places.insert(slot, parse_key(k)?);
            }
            if page.len() < 1024 {
                break;
            }
        }
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
        let Some(seq) = self.places.get(&self.slot(sender.as_str(), key)) else {
            return Ok(None);
        };
        let Some(v) = engine.get(&keys::dedup_log(*seq))? else {
            return Ok(None);
        };
        let record = decode(&v)?;
        // Another key with the same hash (or a record whose batch failed) is not a match.
        Ok((record.sender == sender.as_str() && record.key == key).then_some(record.entry))
    }

    /// Records `entry` for `key` from `sender` in `batch`, at sequence `seq` (the message's).
    pub fn record(
        &mut self,
        batch: &mut Batch,
        sender: &AgentName,
        key: String,
        entry: DedupEntry,
        seq: u64,
    ) {
        let slot = self.slot(sender.as_str(), &key);
        let record = Record {
            sender: sender.to_string(),
            key,
            entry,
        };
        batch.put(keys::dedup_log(seq), federation::wire::encode(&record));
        self.places.insert(slot, seq);
    }

    /// Adds to `batch` the deletion of up to `max` records at or before `cutoff` (ms), from the
    /// head of the log, and forgets them; returns how many.
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
            let seq = parse_key(&k)?;
            if let Ok(record) = decode(&v) {
                if record.entry.at_ms > cutoff {
                    break;
                }
                let slot = self.slot(&record.sender, &record.key);
                if self.places.get(&slot) == Some(&seq) {
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

    /// Moves records of the earlier layout (`k` + sender + `\0` + key → entry) into the log,
    /// at the lowest free sequences: below any message sent since (those were sent before).
    fn upgrade(&mut self, engine: &dyn Engine) -> Result<()> {
        let mut moved = 0u64;
        let mut seq = 0u64;
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
                let (Ok(sender), Ok(key)) = (
                    std::str::from_utf8(&k[1..nul]),
                    std::str::from_utf8(&k[nul + 1..]),
                ) else {
                    continue;
                };
                let Ok(entry) = federation::wire::decode::<DedupEntry>(&v) else {
                    continue;
                };
                let record = Record {
                    sender: sender.to_string(),
                    key: key.to_string(),
                    entry,
                };
                while engine.get(&keys::dedup_log(seq))?.is_some() {
                    seq += 1;
                }
                batch.put(keys::dedup_log(seq), federation::wire::encode(&record));
                seq += 1;
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

fn decode(v: &[u8]) -> Result<Record> {
    federation::wire::decode(v).map_err(|e| Error::Storage(format!("corrupt dedup record: {e}")))
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
    use crate::storage::MemoryEngine;

    fn entry(id: &str, at_ms: u64) -> DedupEntry {
        DedupEntry {
            id: id.into(),
            route: Route::Held { to: "bob".into() },
            at_ms,
        }
    }

    #[test]
    fn remembers_reloads_and_forgets_by_age() {
        let e = MemoryEngine::new();
        let alice = AgentName::new("alice").unwrap();
        let carol = AgentName::new("carol").unwrap();
        let mut d = Dedup::load(&e).unwrap();
        let mut b = Batch::new();
        d.record(&mut b, &alice, "k1".into(), entry("a:1", 100), 1);
        d.record(&mut b, &alice, "k2".into(), entry("a:2", 200), 2);
        e.apply(b).unwrap();
        let found = d.lookup(&e, &alice, "k1").unwrap().unwrap();
        assert_eq!(found.id, "a:1");
        // The key is the sender's own.
        assert!(d.lookup(&e, &carol, "k1").unwrap().is_none());
        assert!(d.lookup(&e, &alice, "k3").unwrap().is_none());

        let mut d = Dedup::load(&e).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.lookup(&e, &alice, "k2").unwrap().unwrap().id, "a:2");

        let mut b = Batch::new();
        assert_eq!(d.forget_before(&e, &mut b, 150, 1024).unwrap(), 1);
        e.apply(b).unwrap();
        assert!(d.lookup(&e, &alice, "k1").unwrap().is_none());
        assert!(d.lookup(&e, &alice, "k2").unwrap().is_some());
        assert_eq!(d.len(), 1);
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
