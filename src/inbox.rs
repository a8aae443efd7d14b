//! Inboxes: each agent's messages in arrival order, and which of them were read, in the
//! storage engine.
//!
//! A message enters an inbox under a `u` key and stays there until the retention sweep (or a
//! move, or a rename) takes it. Reading marks it, beside it:
//!
//! - a read that hands out the oldest unread messages writes one *read range* (`w` key at
//!   the first position: the last position and when), covering all it handed out;
//! - an acknowledgement of chosen messages writes a *read mark* per message (`r` key at its
//!   position: when).
//!
//! An entry a mark or a range covers is read; any other is unread. So marking a page of
//! messages read is one small write, not a copy of each message.
//!
//! Every scan for unread messages starts at the agent's *read floor*: a position below which
//! every entry is read (or gone). The broker keeps the floors in memory and moves each past
//! what it hands out, so a read never walks the read messages kept for the retention. Floors
//! stay true because new entries always arrive at fresh, higher positions; the one operation
//! that brings old positions into an inbox, a rename, drops the floors it touches.
//!
//! All of it happens in [`Batch`]es the broker applies and then flushes before it answers.

use std::collections::VecDeque;

use federation::{AgentName, Message};

use crate::error::{Error, Result};
use crate::storage::{keys, Batch, Engine};

/// A message as it sits in an inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the inbox (the broker's sequence when the message arrived here).
    pub arrival: u64,
    pub message: Message,
    /// When it was marked read, in ms since the epoch.
    pub read_at_ms: Option<u64>,
}

/// The first unread entries of an inbox, and how far its read floor may move.
#[derive(Debug)]
pub struct Unread {
    pub entries: Vec<Entry>,
    /// Every entry below this position is read (or gone).
    pub floor: u64,
}

pub fn encode_message(m: &Message) -> Vec<u8> {
    federation::wire::encode(m)
}

pub fn decode_message(bytes: &[u8]) -> Result<Message> {
    federation::wire::decode(bytes).map_err(|e| Error::Storage(format!("corrupt message: {e}")))
}

/// Adds `message` to `to`'s inbox, unread, at position `arrival`.
pub fn put_unread(batch: &mut Batch, to: &AgentName, arrival: u64, encoded: Vec<u8>) {
    batch.put(keys::inbox(keys::UNREAD, to, arrival), encoded);
}

/// Marks the entry at `arrival` read at `now_ms`.
pub fn mark_read(batch: &mut Batch, to: &AgentName, arrival: u64, now_ms: u64) {
    batch.put(
        keys::inbox(keys::READ, to, arrival),
        now_ms.to_be_bytes().to_vec(),
    );
}

/// Marks every entry from `first` to `last` read at `now_ms`. Only for a run that [`unread`]
/// returned whole: the entries between those it returned are read already.
pub fn mark_read_range(batch: &mut Batch, to: &AgentName, first: u64, last: u64, now_ms: u64) {
    let mut v = last.to_be_bytes().to_vec();
    v.extend_from_slice(&now_ms.to_be_bytes());
    batch.put(keys::inbox(keys::READ_RANGE, to, first), v);
}

/// Takes the entry at `arrival` out of `to`'s inbox, with its read mark. (A read range
/// covering it stays: it covers other entries too. [`stale_ranges`] finds those that cover
/// nothing any more.)
pub fn remove(batch: &mut Batch, to: &AgentName, arrival: u64) {
    batch.delete(keys::inbox(keys::UNREAD, to, arrival));
    batch.delete(keys::inbox(keys::READ, to, arrival));
}

/// The unread entries of `agent` from its read `floor` on, oldest first: at most `limit`, and
/// at most about `byte_budget` bytes of content (always at least one entry when there is one).
/// The floor it returns has moved past the read entries it stepped over.
pub fn unread(
    engine: &dyn Engine,
    agent: &AgentName,
    floor: u64,
    limit: usize,
    byte_budget: usize,
) -> Result<Unread> {
    let mut out = Unread {
        entries: Vec::new(),
        floor,
    };
    let mut bytes = 0usize;
    // A page no larger than needed: `has_unread` asks for one entry.
    walk(engine, agent, floor, limit.clamp(1, 256), |raw| {
        if out.entries.len() >= limit || (bytes >= byte_budget && !out.entries.is_empty()) {
            return Ok(false);
        }
        if raw.read_at_ms.is_some() {
            if out.entries.is_empty() {
                out.floor = raw.arrival + 1;
            }
            return Ok(true);
        }
        let entry = raw.decode()?;
        bytes += entry.message.content.len() + entry.message.data.as_ref().map_or(0, |d| d.len());
        out.entries.push(entry);
        Ok(true)
    })?;
    Ok(out)
}

/// The unread entries of `agent` (from its read `floor` on) whose message is one of `wanted`,
/// oldest first. Stops reading as soon as every wanted one is found: an acknowledgement names
/// what a fetch just returned, which is the oldest unread, so this reads about a page.
pub fn find_unread(
    engine: &dyn Engine,
    agent: &AgentName,
    floor: u64,
    wanted: &std::collections::HashSet<federation::Dot>,
) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    if wanted.is_empty() {
        return Ok(out);
    }
    walk(engine, agent, floor, 256, |raw| {
        if raw.read_at_ms.is_none() {
            let entry = raw.decode()?;
            if wanted.contains(&entry.message.dot) {
                out.push(entry);
            }
        }
        Ok(out.len() < wanted.len())
    })?;
    Ok(out)
}

/// Read entries of `agent`, oldest first, at most `limit` and about `byte_budget` bytes.
pub fn read(
    engine: &dyn Engine,
    agent: &AgentName,
    limit: usize,
    byte_budget: usize,
) -> Result<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::new();
    let mut bytes = 0usize;
    walk(engine, agent, 0, limit.clamp(1, 256), |raw| {
        if out.len() >= limit || (bytes >= byte_budget && !out.is_empty()) {
            return Ok(false);
        }
        if raw.read_at_ms.is_some() {
            let entry = raw.decode()?;
            bytes += entry.message.content.len();
            out.push(entry);
        }
        Ok(true)
    })?;
    Ok(out)
}

/// Every entry of `agent`'s inbox, read or not, oldest first (for the sweep and renames).
pub fn entries(engine: &dyn Engine, agent: &AgentName) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk(engine, agent, 0, 1024, |raw| {
        out.push(raw.decode()?);
        Ok(true)
    })?;
    Ok(out)
}

/// The read ranges of `agent` that cover no entry below `first_kept` (the lowest entry that
/// stays; `u64::MAX` when none does), to delete with the entries the sweep deletes.
pub fn stale_ranges(
    engine: &dyn Engine,
    agent: &AgentName,
    first_kept: u64,
) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut ranges = Pages::inbox(engine, keys::READ_RANGE, agent, 0, 1024);
    while let Some((first, value)) = ranges.next_at()? {
        if first >= first_kept {
            break;
        }
        let (last, _) = parse_range(&value)?;
        if last < first_kept {
            out.push(keys::inbox(keys::READ_RANGE, agent, first));
        }
    }
    Ok(out)
}

/// Every key of `agent`'s inbox, messages, read marks and ranges, for purging it.
pub fn all_keys(engine: &dyn Engine, agent: &AgentName) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for space in [keys::UNREAD, keys::READ, keys::READ_RANGE] {
        let mut page = Pages::inbox(engine, space, agent, 0, 1024);
        while let Some((arrival, _)) = page.next_at()? {
            out.push(keys::inbox(space, agent, arrival));
        }
    }
    Ok(out)
}

/// An entry as stored, its message not yet decoded (a scan for unread ones skips many).
struct Raw {
    arrival: u64,
    read_at_ms: Option<u64>,
    message: Vec<u8>,
}

impl Raw {
    fn decode(self) -> Result<Entry> {
        Ok(Entry {
            arrival: self.arrival,
            message: decode_message(&self.message)?,
            read_at_ms: self.read_at_ms,
        })
    }
}

/// Calls `visit` with `agent`'s entries from position `from` on, oldest first, each with when
/// it was read, until `visit` returns false. Reads the three spaces side by side, `page` at a
/// time. A range that starts below `from` is not seen: callers start at 0 or at a read floor,
/// and a floor never lies inside a range (it moves past whole runs of read entries).
fn walk(
    engine: &dyn Engine,
    agent: &AgentName,
    from: u64,
    page: usize,
    mut visit: impl FnMut(Raw) -> Result<bool>,
) -> Result<()> {
    let mut messages = Pages::inbox(engine, keys::UNREAD, agent, from, page);
    let mut marks = Pages::inbox(engine, keys::READ, agent, from, page);
    let mut ranges = Pages::inbox(engine, keys::READ_RANGE, agent, from, page);
    // The range reaching furthest among those begun so far: (last, read at).
    let mut cover: Option<(u64, u64)> = None;
    while let Some((arrival, message)) = messages.next_at()? {
        let mut read_at_ms = None;
        // Marks come in the same order; one without its message (there should be none) is
        // stepped over.
        while let Some(mark) = marks.peek_at()? {
            if mark > arrival {
                break;
            }
            let (at, value) = marks.next_at()?.expect("peeked");
            if at == arrival {
                read_at_ms = Some(parse_mark(&value)?);
            }
        }
        while let Some(first) = ranges.peek_at()? {
            if first > arrival {
                break;
            }
            let (_, value) = ranges.next_at()?.expect("peeked");
            let (last, at) = parse_range(&value)?;
            if cover.is_none_or(|(reach, _)| last > reach) {
                cover = Some((last, at));
            }
        }
        if let Some((last, at)) = cover {
            if last >= arrival {
                read_at_ms = Some(read_at_ms.map_or(at, |m: u64| m.min(at)));
            }
        }
        if !visit(Raw {
            arrival,
            read_at_ms,
            message,
        })? {
            break;
        }
    }
    Ok(())
}

/// A read range's value: its last position, and when it was read.
fn parse_range(value: &[u8]) -> Result<(u64, u64)> {
    if value.len() != 16 {
        return Err(Error::Storage("corrupt read range".into()));
    }
    Ok((parse_mark(&value[..8])?, parse_mark(&value[8..])?))
}

/// A read mark's value: when the entry was read.
fn parse_mark(value: &[u8]) -> Result<u64> {
    let at: [u8; 8] = value
        .try_into()
        .map_err(|_| Error::Storage("corrupt read mark".into()))?;
    Ok(u64::from_be_bytes(at))
}

/// The pairs under a key prefix, in order, read a page at a time.
struct Pages<'a> {
    engine: &'a dyn Engine,
    prefix: Vec<u8>,
    /// The last key read (the next page starts after it).
    after: Option<Vec<u8>>,
    buffered: VecDeque<(Vec<u8>, Vec<u8>)>,
    page: usize,
    done: bool,
}

impl<'a> Pages<'a> {
    fn new(engine: &'a dyn Engine, prefix: Vec<u8>, after: Option<Vec<u8>>, page: usize) -> Self {
        Pages {
            engine,
            prefix,
            after,
            buffered: VecDeque::new(),
            page,
            done: false,
        }
    }

    /// One space of one inbox, from position `from` on.
    fn inbox(engine: &'a dyn Engine, space: u8, agent: &AgentName, from: u64, page: usize) -> Self {
        // Positions start at `from`: the page starts after the key just below it.
        let after = from
            .checked_sub(1)
            .map(|below| keys::inbox(space, agent, below));
        Pages::new(engine, keys::inbox_prefix(space, agent), after, page)
    }

    fn fill(&mut self) -> Result<()> {
        if self.buffered.is_empty() && !self.done {
            let page = self
                .engine
                .scan(&self.prefix, self.after.as_deref(), self.page)?;
            self.done = page.len() < self.page;
            // Later pages grow: a long walk should not seek once per few keys.
            self.page = (self.page * 2).min(1024);
            if let Some((k, _)) = page.last() {
                self.after = Some(k.clone());
            }
            self.buffered.extend(page);
        }
        Ok(())
    }

    fn peek(&mut self) -> Result<Option<&(Vec<u8>, Vec<u8>)>> {
        self.fill()?;
        Ok(self.buffered.front())
    }

    fn next(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.fill()?;
        Ok(self.buffered.pop_front())
    }

    /// The inbox position of the next pair.
    fn peek_at(&mut self) -> Result<Option<u64>> {
        self.peek()?.map(|(k, _)| position(k)).transpose()
    }

    /// The next pair, by inbox position.
    fn next_at(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        match self.next()? {
            Some((k, v)) => Ok(Some((position(&k)?, v))),
            None => Ok(None),
        }
    }
}

/// The position in an inbox key.
fn position(key: &[u8]) -> Result<u64> {
    keys::parse_inbox(key)
        .map(|(_, at)| at)
        .ok_or_else(|| Error::Storage("corrupt inbox key".into()))
}

/// Counts the unread entries of every inbox, and where each one's read floor can start
/// (its first unread position), reading both spaces side by side a page at a time.
pub fn count_unread(
    engine: &dyn Engine,
) -> Result<std::collections::HashMap<AgentName, (u64, u64)>> {
    let mut out: std::collections::HashMap<AgentName, (u64, u64)> = Default::default();
    let all = |space: u8| Pages::new(engine, vec![space], None, 1024);
    let (mut messages, mut marks, mut ranges) =
        (all(keys::UNREAD), all(keys::READ), all(keys::READ_RANGE));
    // The range reaching furthest among those begun so far in the current inbox:
    // (the inbox's key prefix, last position).
    let mut cover: Option<(Vec<u8>, u64)> = None;
    while let Some((key, _)) = messages.next()? {
        let mut read = false;
        while let Some((mark, _)) = marks.peek()? {
            if mark[1..] > key[1..] {
                break;
            }
            read |= mark[1..] == key[1..];
            marks.next()?;
        }
        let Some((name, arrival)) = keys::parse_inbox(&key) else {
            return Err(Error::Storage("corrupt inbox key".into()));
        };
        // The inbox's prefix without the space byte: name and NUL.
        let inbox = key[1..key.len() - 8].to_vec();
        while let Some((range, _)) = ranges.peek()? {
            if range[1..] > key[1..] {
                break;
            }
            let (range, value) = ranges.next()?.expect("peeked");
            let (last, _) = parse_range(&value)?;
            let of = range[1..range.len().saturating_sub(8)].to_vec();
            match &mut cover {
                Some((c, reach)) if *c == of => *reach = (*reach).max(last),
                _ => cover = Some((of, last)),
            }
        }
        read |= cover
            .as_ref()
            .is_some_and(|(c, reach)| *c == inbox && *reach >= arrival);
        let Ok(name) = AgentName::new(name) else {
            continue;
        };
        let slot = out.entry(name).or_insert((0, arrival + 1));
        if !read {
            if slot.0 == 0 {
                slot.1 = arrival;
            }
            slot.0 += 1;
        } else if slot.0 == 0 {
            slot.1 = arrival + 1;
        }
    }
    Ok(out)
}

/// Rewrites read entries stored by earlier versions (the `r` value was the read time followed
/// by the whole message, the `u` entry gone) as a message and a read mark. Returns how many.
pub fn upgrade_read_copies(engine: &dyn Engine) -> Result<u64> {
    // Once per database: after that, start-up does not read the marks again.
    let done = keys::meta("inbox_layout");
    if engine.get(&done)?.as_deref() == Some(&[2][..]) {
        return Ok(0);
    }
    let mut n = 0;
    let mut marks = Pages::new(engine, vec![keys::READ], None, 1024);
    let mut batch = Batch::new();
    while let Some((k, v)) = marks.next()? {
        if v.len() > 8 {
            let mut message_key = k.clone();
            message_key[0] = keys::UNREAD;
            batch.put(message_key, v[8..].to_vec());
            batch.put(k, v[..8].to_vec());
            n += 1;
        }
        if batch.ops.len() >= 2048 {
            engine.apply(std::mem::take(&mut batch))?;
        }
    }
    batch.put(done, vec![2]);
    engine.apply(batch)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryEngine;
    use federation::{message::MessageKind, BrokerId, Dot};

    fn msg(seq: u64, content: &str) -> Message {
        Message {
            dot: Dot::new(BrokerId::from_u32(7), seq),
            from: AgentName::new("a").unwrap(),
            to: AgentName::new("b").unwrap(),
            sent_at_ms: 1,
            content: content.into(),
            data: None,
            reply_to: None,
            kind: MessageKind::Direct,
            after: None,
        }
    }

    fn inbox_of(n: u64) -> (MemoryEngine, AgentName) {
        let e = MemoryEngine::new();
        let b_name = AgentName::new("b").unwrap();
        let mut batch = Batch::new();
        for s in 1..=n {
            put_unread(
                &mut batch,
                &b_name,
                s,
                encode_message(&msg(s, "0123456789")),
            );
        }
        e.apply(batch).unwrap();
        (e, b_name)
    }

    fn arrivals(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.arrival).collect()
    }

    #[test]
    fn unread_respects_limit_and_budget() {
        let (e, b) = inbox_of(5);
        assert_eq!(unread(&e, &b, 0, 100, 1 << 20).unwrap().entries.len(), 5);
        assert_eq!(unread(&e, &b, 0, 2, 1 << 20).unwrap().entries.len(), 2);
        assert_eq!(unread(&e, &b, 0, 100, 15).unwrap().entries.len(), 2);
        assert_eq!(unread(&e, &b, 0, 100, 0).unwrap().entries.len(), 1);
        // The floor: nothing below it is looked at.
        assert_eq!(
            arrivals(&unread(&e, &b, 4, 100, 1 << 20).unwrap().entries),
            vec![4, 5]
        );
    }

    #[test]
    fn marking_read_keeps_the_message_and_moves_the_floor() {
        let (e, b) = inbox_of(4);
        let mut batch = Batch::new();
        mark_read(&mut batch, &b, 1, 99);
        mark_read(&mut batch, &b, 2, 99);
        mark_read(&mut batch, &b, 4, 98);
        e.apply(batch).unwrap();
        let u = unread(&e, &b, 0, 10, 1 << 20).unwrap();
        assert_eq!(arrivals(&u.entries), vec![3]);
        // Past the read prefix, not past the unread entry.
        assert_eq!(u.floor, 3);
        let r = read(&e, &b, 10, 1 << 20).unwrap();
        assert_eq!(arrivals(&r), vec![1, 2, 4]);
        assert_eq!(r[0].read_at_ms, Some(99));
        assert_eq!(r[0].message, msg(1, "0123456789"));
        assert_eq!(r[2].read_at_ms, Some(98));
        // All read: the floor moves past the last one.
        let mut batch = Batch::new();
        mark_read(&mut batch, &b, 3, 100);
        e.apply(batch).unwrap();
        let u = unread(&e, &b, 3, 10, 1 << 20).unwrap();
        assert!(u.entries.is_empty());
        assert_eq!(u.floor, 5);
        assert_eq!(entries(&e, &b).unwrap().len(), 4);
        assert_eq!(all_keys(&e, &b).unwrap().len(), 8);
        let counts = count_unread(&e).unwrap();
        assert_eq!(counts.get(&b), Some(&(0, 5)));
    }

    #[test]
    fn find_unread_skips_read_entries_and_stops_when_all_are_found() {
        let (e, b) = inbox_of(6);
        let mut batch = Batch::new();
        mark_read(&mut batch, &b, 2, 1);
        e.apply(batch).unwrap();
        let dot = |s| Dot::new(BrokerId::from_u32(7), s);
        let wanted = [dot(2), dot(3), dot(5)].into_iter().collect();
        let found = find_unread(&e, &b, 0, &wanted).unwrap();
        assert_eq!(arrivals(&found), vec![3, 5]);
        let counts = count_unread(&e).unwrap();
        assert_eq!(counts.get(&b), Some(&(5, 1)));
    }

    #[test]
    fn removing_an_entry_takes_its_mark_too() {
        let (e, b) = inbox_of(2);
        let mut batch = Batch::new();
        mark_read(&mut batch, &b, 1, 5);
        e.apply(batch).unwrap();
        let mut batch = Batch::new();
        remove(&mut batch, &b, 1);
        e.apply(batch).unwrap();
        assert_eq!(all_keys(&e, &b).unwrap().len(), 1);
        assert!(read(&e, &b, 10, 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn a_read_range_covers_its_run_and_outlives_removals_until_stale() {
        let (e, b) = inbox_of(8);
        // A run handed out (1..=3), a mark inside a later range (6), a range over 5..=7.
        let mut batch = Batch::new();
        mark_read_range(&mut batch, &b, 1, 3, 10);
        mark_read(&mut batch, &b, 6, 5);
        mark_read_range(&mut batch, &b, 5, 7, 20);
        e.apply(batch).unwrap();
        let u = unread(&e, &b, 0, 10, 1 << 20).unwrap();
        assert_eq!(arrivals(&u.entries), vec![4, 8]);
        assert_eq!(u.floor, 4);
        let r = read(&e, &b, 10, 1 << 20).unwrap();
        assert_eq!(arrivals(&r), vec![1, 2, 3, 5, 6, 7]);
        // The earlier of a mark and a range is when it was read.
        let at: Vec<_> = r.iter().map(|e| e.read_at_ms.unwrap()).collect();
        assert_eq!(at, vec![10, 10, 10, 20, 5, 20]);
        assert_eq!(count_unread(&e).unwrap().get(&b), Some(&(2, 4)));
        // Removing the range's first entry leaves the rest of it read.
        let mut batch = Batch::new();
        remove(&mut batch, &b, 1);
        e.apply(batch).unwrap();
        assert_eq!(
            arrivals(&read(&e, &b, 10, 1 << 20).unwrap()),
            vec![2, 3, 5, 6, 7]
        );
        // Stale once nothing it covers is kept.
        assert!(stale_ranges(&e, &b, 3).unwrap().is_empty());
        assert_eq!(
            stale_ranges(&e, &b, 4).unwrap(),
            vec![keys::inbox(keys::READ_RANGE, &b, 1)]
        );
        assert_eq!(stale_ranges(&e, &b, u64::MAX).unwrap().len(), 2);
        assert_eq!(all_keys(&e, &b).unwrap().len(), 7 + 1 + 2);
    }

    #[test]
    fn counting_keeps_each_inbox_ranges_apart() {
        let e = MemoryEngine::new();
        let (a, b) = (AgentName::new("a").unwrap(), AgentName::new("b").unwrap());
        let mut batch = Batch::new();
        for s in [1, 3, 5] {
            put_unread(&mut batch, &a, s, encode_message(&msg(s, "x")));
        }
        for s in [2, 4, 6] {
            put_unread(&mut batch, &b, s, encode_message(&msg(s, "x")));
        }
        // a's range reaches past b's positions; it must not cover them.
        mark_read_range(&mut batch, &a, 1, 5, 1);
        mark_read_range(&mut batch, &b, 2, 2, 1);
        e.apply(batch).unwrap();
        let counts = count_unread(&e).unwrap();
        assert_eq!(counts.get(&a), Some(&(0, 6)));
        assert_eq!(counts.get(&b), Some(&(2, 4)));
    }

    #[test]
    fn read_copies_of_earlier_versions_become_marks() {
        let e = MemoryEngine::new();
        let b = AgentName::new("b").unwrap();
        let mut batch = Batch::new();
        let mut old = 42u64.to_be_bytes().to_vec();
        old.extend_from_slice(&encode_message(&msg(1, "old")));
        batch.put(keys::inbox(keys::READ, &b, 1), old);
        put_unread(&mut batch, &b, 2, encode_message(&msg(2, "new")));
        e.apply(batch).unwrap();
        assert_eq!(upgrade_read_copies(&e).unwrap(), 1);
        assert_eq!(upgrade_read_copies(&e).unwrap(), 0);
        let r = read(&e, &b, 10, 1 << 20).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].read_at_ms, Some(42));
        assert_eq!(r[0].message.content, "old");
        assert_eq!(
            arrivals(&unread(&e, &b, 0, 10, 1 << 20).unwrap().entries),
            vec![2]
        );
    }
}
