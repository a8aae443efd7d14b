//! The real engine: one sled tree.

use std::path::Path;

use super::{Batch, Engine, Op};
use crate::error::{Error, Result};

pub struct SledEngine {
    db: ::sled::Db,
}

impl SledEngine {
    /// Opens (or creates) the database in `dir`. Fails if another process has it open.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = ::sled::Config::new()
            .path(dir)
            // Flushes are ours to order (group commit); sled's timer would only add fsyncs.
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                ::sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    Error::Storage(format!(
                        "{} is in use by another broker process",
                        dir.display()
                    ))
                }
                other => Error::Storage(format!("cannot open {}: {other}", dir.display())),
            })?;
        Ok(SledEngine { db })
    }
}

fn storage(e: ::sled::Error) -> Error {
    Error::Storage(e.to_string())
}

impl Engine for SledEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key).map_err(storage)?.map(|v| v.to_vec()))
    }

    fn apply(&self, batch: Batch) -> Result<()> {
        let mut b = ::sled::Batch::default();
        for op in batch.ops {
            match op {
                Op::Put(k, v) => b.insert(k, v),
                Op::Delete(k) => b.remove(k),
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
