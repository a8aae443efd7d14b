//! The real engine: one sled tree, with writes grouped per flush ([`super::Staged`]).

use std::path::Path;

use super::{Batch, Engine, Op, Staged};
use crate::error::{Error, Result};

/// sled's page cache, in bytes. sled's default is 1 GiB, which a broker holding a large
/// backlog (a dead peer's outbox, an absent agent's inbox) would fill: the backlog lives on
/// disk, and this bounds what of it stays in memory. 32 MiB, not 64: the broker's writes go
/// to the ends of their keyspaces and its reads to the oldest unread messages, so throughput
/// did not change, and a broker holding 1,000,000 queued messages (with their dedup keys
/// indexed in memory) went from 177 – 203 MiB of RSS to 157 (docs/benchmarks.md).
pub const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The broker's engine: sled beneath, batches grouped into one sled batch per flush.
pub type SledEngine = Staged<SledTree>;

/// One sled tree, each batch applied as it comes.
pub struct SledTree {
    db: ::sled::Db,
}

impl Staged<SledTree> {
    /// Opens (or creates) the database in `dir`. Fails if another process has it open.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Staged::new(SledTree::open(dir)?))
    }
}

impl SledTree {
    /// Opens (or creates) the database in `dir`. Fails if another process has it open.
    ///
    /// sled releases its file lock from a background thread shortly after the last handle of
    /// a database is dropped, so a database closed a moment ago in this same process (a
    /// broker hosted in-process, stopped and started again) is retried for up to a second.
    pub fn open(dir: &Path) -> Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let opened = ::sled::Config::new()
                .path(dir)
                .cache_capacity(CACHE_BYTES)
                // Flushes are ours to order (group commit); sled's timer would only add fsyncs.
                .flush_every_ms(None)
                .open();
            match opened {
                Ok(db) => return Ok(SledTree { db }),
                Err(::sled::Error::Io(io)) if is_locked(&io) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::Storage(format!(
                            "{} is in use by another broker process",
                            dir.display()
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(other) => {
                    return Err(Error::Storage(format!(
                        "cannot open {}: {other}",
                        dir.display()
                    )))
                }
            }
        }
    }
}

/// Whether sled could not open a database because its lock file is held.
fn is_locked(io: &std::io::Error) -> bool {
    io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock")
}

fn storage(e: ::sled::Error) -> Error {
    Error::Storage(e.to_string())
}

impl Engine for SledTree {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key).map_err(storage)?.map(|v| v.to_vec()))
    }

    /// Applies the batch atomically. An append reads the value it extends first, so batches
    /// with appends must not be applied concurrently ([`Staged`] applies one group at a time,
    /// and turns its appends into puts before).
    fn apply(&self, batch: Batch) -> Result<()> {
        let mut b = ::sled::Batch::default();
        for op in batch.ops {
            match op {
                Op::Put(k, v) => b.insert(k, v),
                Op::Delete(k) => b.remove(k),
                Op::Append(k, tail) => {
                    let mut v = self.get(&k)?.unwrap_or_default();
                    v.extend_from_slice(&tail);
                    b.insert(k, v)
                }
            }
        }
        self.db.apply_batch(b).map_err(storage)
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let iter = match after {
            Some(after) => {
                let mut start = after.to_vec();
                start.push(0);
                self.db.range(start..)
            }
            None => self.db.range(prefix.to_vec()..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(storage)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(storage).map(|_| ())
    }
}
