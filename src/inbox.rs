//! Inboxes: each agent's unread and read messages, in arrival order, in the storage engine.
//!
//! A message enters an inbox unread (`u` keys). Marking it read moves it to the `r` keys with
//! the time it was read, where it stays for the retention. All of it happens in [`Batch`]es
//! the broker applies and then flushes before it answers.

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

pub fn encode_message(m: &Message) -> Vec<u8> {
    federation::wire::encode(m)
}

pub fn decode_message(bytes: &[u8]) -> Result<Message> {
    federation::wire::decode(bytes).map_err(|e| Error::Storage(format!("corrupt message: {e}")))
}

/// Adds `message` to `to`'s unread messages at position `arrival`.
pub fn put_unread(batch: &mut Batch, to: &AgentName, arrival: u64, encoded: Vec<u8>) {
    batch.put(keys::inbox(keys::UNREAD, to, arrival), encoded);
}

/// Moves an unread entry to the read messages.
pub fn mark_read(batch: &mut Batch, to: &AgentName, entry: &Entry, now_ms: u64) {
    batch.delete(keys::inbox(keys::UNREAD, to, entry.arrival));
    let mut v = now_ms.to_be_bytes().to_vec();
    v.extend_from_slice(&encode_message(&entry.message));
    batch.put(keys::inbox(keys::READ, to, entry.arrival), v);
}

/// Unread entries of `agent` with arrival ≤ `visible`, oldest first, at most `limit`, and at
/// most about `byte_budget` bytes of content (always at least one entry when there is one).
pub fn unread(
    engine: &dyn Engine,
    agent: &AgentName,
    visible: u64,
    limit: usize,
    byte_budget: usize,
) -> Result<Vec<Entry>> {
    scan(engine, keys::UNREAD, agent, visible, limit, byte_budget)
}

/// The unread entries of `agent` (arrival ≤ `visible`) whose message is one of `wanted`,
/// oldest first. Stops reading as soon as every wanted one is found: an acknowledgement names
/// what a fetch just returned, which is the oldest unread, so this reads about a page.
pub fn find_unread(
    engine: &dyn Engine,
    agent: &AgentName,
    visible: u64,
    wanted: &std::collections::HashSet<federation::Dot>,
) -> Result<Vec<Entry>> {
    let prefix = keys::inbox_prefix(keys::UNREAD, agent);
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    'pages: while out.len() < wanted.len() {
        let page = engine.scan(&prefix, after.as_deref(), 256)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (k, v) in &page {
            let Some((_, arrival)) = keys::parse_inbox(k) else {
                return Err(Error::Storage("corrupt inbox key".into()));
            };
            if arrival > visible {
                break 'pages;
            }
            let entry = decode_entry(keys::UNREAD, arrival, v)?;
            if wanted.contains(&entry.message.dot) {
                out.push(entry);
                if out.len() == wanted.len() {
                    break 'pages;
                }
            }
        }
    }
    Ok(out)
}

/// Read entries of `agent`, oldest first.
pub fn read(
    engine: &dyn Engine,
    agent: &AgentName,
    limit: usize,
    byte_budget: usize,
) -> Result<Vec<Entry>> {
    scan(engine, keys::READ, agent, u64::MAX, limit, byte_budget)
}

fn scan(
    engine: &dyn Engine,
    space: u8,
    agent: &AgentName,
    visible: u64,
    limit: usize,
    byte_budget: usize,
) -> Result<Vec<Entry>> {
    let prefix = keys::inbox_prefix(space, agent);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut after: Option<Vec<u8>> = None;
    // A page no larger than needed: `has_visible_unread` asks for one entry, and every
    // entry a page holds is a copy out of the engine.
    let page_size = limit.clamp(1, 256);
    'pages: loop {
        let page = engine.scan(&prefix, after.as_deref(), page_size)?;
        if page.is_empty() {
            break;
        }
        for (k, v) in &page {
            let Some((_, arrival)) = keys::parse_inbox(k) else {
                return Err(Error::Storage("corrupt inbox key".into()));
            };
            if arrival > visible || out.len() >= limit || (bytes >= byte_budget && !out.is_empty())
            {
                break 'pages;
            }
            let entry = decode_entry(space, arrival, v)?;
            bytes +=
                entry.message.content.len() + entry.message.data.as_ref().map_or(0, |d| d.len());
            out.push(entry);
        }
        after = page.last().map(|(k, _)| k.clone());
    }
    Ok(out)
}

/// Decodes an inbox value of either space.
pub fn decode_entry(space: u8, arrival: u64, value: &[u8]) -> Result<Entry> {
    if space == keys::READ {
        if value.len() < 8 {
            return Err(Error::Storage("corrupt read entry".into()));
        }
        let read_at = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
        Ok(Entry {
            arrival,
            message: decode_message(&value[8..])?,
            read_at_ms: Some(read_at),
        })
    } else {
        Ok(Entry {
            arrival,
            message: decode_message(value)?,
            read_at_ms: None,
        })
    }
}

/// Every key (both spaces) of `agent`'s inbox, with its value, for moving or purging.
pub fn all_keys(engine: &dyn Engine, agent: &AgentName) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for space in [keys::UNREAD, keys::READ] {
        let prefix = keys::inbox_prefix(space, agent);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = engine.scan(&prefix, after.as_deref(), 1024)?;
            if page.is_empty() {
                break;
            }
            after = page.last().map(|(k, _)| k.clone());
            out.extend(page);
        }
    }
    Ok(out)
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

    #[test]
    fn unread_respects_visibility_limit_and_budget() {
        let e = MemoryEngine::new();
        let b_name = AgentName::new("b").unwrap();
        let mut batch = Batch::new();
        for s in 1..=5 {
            put_unread(
                &mut batch,
                &b_name,
                s,
                encode_message(&msg(s, "0123456789")),
            );
        }
        e.apply(batch).unwrap();
        assert_eq!(unread(&e, &b_name, 3, 100, 1 << 20).unwrap().len(), 3);
        assert_eq!(unread(&e, &b_name, 10, 2, 1 << 20).unwrap().len(), 2);
        assert_eq!(unread(&e, &b_name, 10, 100, 15).unwrap().len(), 2);
        assert_eq!(unread(&e, &b_name, 10, 100, 0).unwrap().len(), 1);
    }

    #[test]
    fn marking_read_moves_the_entry() {
        let e = MemoryEngine::new();
        let b_name = AgentName::new("b").unwrap();
        let mut batch = Batch::new();
        put_unread(&mut batch, &b_name, 1, encode_message(&msg(1, "hi")));
        e.apply(batch).unwrap();
        let entry = unread(&e, &b_name, 10, 10, 1 << 20).unwrap().remove(0);
        let mut batch = Batch::new();
        mark_read(&mut batch, &b_name, &entry, 99);
        e.apply(batch).unwrap();
        assert!(unread(&e, &b_name, 10, 10, 1 << 20).unwrap().is_empty());
        let r = read(&e, &b_name, 10, 1 << 20).unwrap();
        assert_eq!(r[0].read_at_ms, Some(99));
        assert_eq!(r[0].message, msg(1, "hi"));
        assert_eq!(all_keys(&e, &b_name).unwrap().len(), 1);
    }
}
