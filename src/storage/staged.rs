//! Write grouping: batches are staged in memory and reach the engine beneath once per flush.
//!
//! 1. [`Engine::apply`] puts a batch's ops into the pending layer (a sorted map; a later op on
//!    a key replaces an earlier one). Nothing touches the engine beneath.
//! 2. Reads ([`Engine::get`], [`Engine::scan`]) see the pending layer over the engine beneath,
//!    so every write is visible at once, exactly as if it had been applied.
//! 3. [`Engine::flush`] moves the pending layer aside (still visible to readers), applies it
//!    to the engine beneath as *one* atomic batch, then flushes that engine.
//!
//! Why: sled seals a log buffer per `apply_batch`, so one batch per message made the disk
//! write (and `sync_file_range`) per message, not per flush: about 6,000 messages/s where
//! raw inserts reach ten times that (see docs/benchmarks.md). The broker acknowledges nothing
//! before the flush that covers it, so grouping changes no guarantee; a crash loses the same
//! unacknowledged writes as before, and each flush's group is applied all or nothing.

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Batch, Engine, Op};
use crate::error::Result;

/// A staged write.
#[derive(Clone, Debug)]
enum Write {
    Put(Vec<u8>),
    Delete,
    /// Bytes to add to the end of the value beneath. Only in the pending layer: a flush turns
    /// each into the put of the whole value before the group becomes readable as `applying`.
    Append(Vec<u8>),
}

/// Staged writes by key.
type Layer = BTreeMap<Vec<u8>, Write>;

/// An engine whose writes are grouped into one batch per flush. See the module docs.
pub struct Staged<E> {
    inner: E,
    layers: Mutex<Layers>,
    /// Held for a whole flush: one group reaches the engine beneath at a time, in order.
    flushing: Mutex<()>,
}

#[derive(Default)]
struct Layers {
    /// Written since the last flush began.
    pending: Layer,
    /// The group the running flush is applying beneath (readers still need it until then).
    applying: Option<Arc<Layer>>,
}

impl<E: Engine> Staged<E> {
    pub fn new(inner: E) -> Self {
        Staged {
            inner,
            layers: Mutex::new(Layers::default()),
            flushing: Mutex::new(()),
        }
    }

    fn layers(&self) -> MutexGuard<'_, Layers> {
        self.layers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key` with `tail` appended, reading what it extends from the applying
    /// group or the engine beneath. Call with the layers locked.
    fn appended(&self, l: &Layers, key: &[u8], tail: &[u8]) -> Result<Vec<u8>> {
        let mut v = match l.applying.as_ref().and_then(|a| a.get(key)) {
            Some(Write::Put(v)) => v.clone(),
            Some(_) => Vec::new(),
            None => self.inner.get(key)?.unwrap_or_default(),
        };
        v.extend_from_slice(tail);
        Ok(v)
    }

    /// How many staged ops wait for the next flush (for tests and counters).
    pub fn staged(&self) -> usize {
        self.layers().pending.len()
    }
}

impl<E: Engine> Engine for Staged<E> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        {
            let l = self.layers();
            match l.pending.get(key) {
                Some(Write::Put(v)) => return Ok(Some(v.clone())),
                Some(Write::Delete) => return Ok(None),
                // Read what it extends with the layers locked: no group lands in between.
                Some(Write::Append(tail)) => return self.appended(&l, key, tail).map(Some),
                None => {}
            }
            if let Some(w) = l.applying.as_ref().and_then(|a| a.get(key)) {
                return Ok(match w {
                    Write::Put(v) => Some(v.clone()),
                    _ => None,
                });
            }
        }
        // Not staged when we looked; if a flush lands it beneath meanwhile, we read it there.
        self.inner.get(key)
    }

    fn apply(&self, batch: Batch) -> Result<()> {
        let mut l = self.layers();
        for op in batch.ops {
            match op {
                Op::Put(k, v) => {
                    l.pending.insert(k, Write::Put(v));
                }
                Op::Delete(k) => {
                    l.pending.insert(k, Write::Delete);
                }
                Op::Append(k, tail) => match l.pending.get_mut(&k) {
                    Some(Write::Put(v)) | Some(Write::Append(v)) => v.extend_from_slice(&tail),
                    Some(w @ Write::Delete) => *w = Write::Put(tail),
                    None => {
                        l.pending.insert(k, Write::Append(tail));
                    }
                },
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let l = self.layers();
        if l.pending.is_empty() && l.applying.is_none() {
            drop(l);
            return self.inner.scan(prefix, after, limit);
        }
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let empty = Layer::new();
        let mut staged = Newest {
            newer: staged_range(&l.pending, &start, prefix),
            older: staged_range(l.applying.as_deref().unwrap_or(&empty), &start, prefix),
        }
        .peekable();

        // Merge the staged view with the engine beneath, page by page; staged keys win.
        // Pages start at what was asked for and double: a small scan stays small, and one
        // that must step over many staged deletes does not seek the engine once per key.
        let mut page_size = limit.clamp(1, 1024);
        let mut out = Vec::new();
        let mut below_after = after.map(|a| a.to_vec());
        let mut below = Vec::new().into_iter();
        let mut below_done = false;
        while out.len() < limit {
            if below.as_slice().is_empty() && !below_done {
                let page = self.inner.scan(prefix, below_after.as_deref(), page_size)?;
                below_done = page.len() < page_size;
                page_size = (page_size * 2).min(1024);
                if let Some((k, _)) = page.last() {
                    below_after = Some(k.clone());
                }
                below = page.into_iter();
            }
            let take_staged = match (below.as_slice().first(), staged.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((bk, _)), Some((sk, _))) => {
                    if bk.as_slice() == sk.as_slice() {
                        below.next(); // replaced or deleted by the staged op
                        true
                    } else {
                        sk.as_slice() < bk.as_slice()
                    }
                }
            };
            if take_staged {
                let (k, w) = staged.next().expect("peeked");
                match w {
                    Write::Put(v) => out.push((k.clone(), v.clone())),
                    Write::Delete => {}
                    Write::Append(tail) => out.push((k.clone(), self.appended(&l, k, tail)?)),
                }
            } else {
                out.push(below.next().expect("checked"));
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let group = {
            let mut l = self.layers();
            if l.pending.is_empty() {
                None
            } else {
                // An append becomes the put of the whole value: the engine beneath is not
                // written while we hold the flush turn, so what it holds now is the base.
                for (k, w) in l.pending.iter_mut() {
                    if let Write::Append(tail) = w {
                        let mut v = self.inner.get(k)?.unwrap_or_default();
                        v.extend_from_slice(tail);
                        *w = Write::Put(v);
                    }
                }
                let group = Arc::new(std::mem::take(&mut l.pending));
                l.applying = Some(group.clone());
                Some(group)
            }
        };
        if let Some(group) = group {
            let mut batch = Batch::new();
            batch.ops.reserve(group.len());
            for (k, w) in group.iter() {
                batch.ops.push(match w {
                    Write::Put(v) => Op::Put(k.clone(), v.clone()),
                    Write::Delete => Op::Delete(k.clone()),
                    Write::Append(_) => {
                        unreachable!("appends are resolved when the group is taken")
                    }
                });
            }
            let applied = self.inner.apply(batch);
            let mut l = self.layers();
            let group = l.applying.take().expect("only the flush clears it");
            if let Err(e) = applied {
                // Keep the group staged (under anything written since), so reads stay true to
                // what was acknowledged as written; the caller reports the failure.
                let newer = std::mem::replace(&mut l.pending, (*group).clone());
                for (k, w) in newer {
                    match (l.pending.get_mut(&k), w) {
                        (Some(Write::Put(v)), Write::Append(tail)) => v.extend_from_slice(&tail),
                        (Some(w @ Write::Delete), Write::Append(tail)) => *w = Write::Put(tail),
                        (_, w) => {
                            l.pending.insert(k, w);
                        }
                    }
                }
                return Err(e);
            }
        }
        self.inner.flush()
    }
}

/// Two staged layers as one sorted stream: on equal keys the newer layer's op wins.
struct Newest<'a, I: Iterator<Item = (&'a Vec<u8>, &'a Write)>> {
    newer: Peekable<I>,
    older: Peekable<I>,
}

impl<'a, I> Iterator for Newest<'a, I>
where
    I: Iterator<Item = (&'a Vec<u8>, &'a Write)>,
{
    type Item = (&'a Vec<u8>, &'a Write);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.newer.peek(), self.older.peek()) {
            (None, _) => self.older.next(),
            (_, None) => self.newer.next(),
            (Some((n, _)), Some((o, _))) => {
                if n == o {
                    self.older.next();
                    self.newer.next()
                } else if n < o {
                    self.newer.next()
                } else {
                    self.older.next()
                }
            }
        }
    }
}

/// The staged ops of `layer` from `start` on, while their keys start with `prefix`.
fn staged_range<'a>(
    layer: &'a Layer,
    start: &Bound<Vec<u8>>,
    prefix: &'a [u8],
) -> Peekable<impl Iterator<Item = (&'a Vec<u8>, &'a Write)>> {
    layer
        .range((start.clone(), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
        .peekable()
}
