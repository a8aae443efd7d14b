//! The checker: given everything sent and everything received, what went wrong.
//!
//! Every acknowledged direct message must reach its recipient exactly once; every acknowledged
//! broadcast every other agent exactly once; per (sender, recipient) the arrivals keep the
//! send order; nothing arrives that was never sent.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// A send the broker acknowledged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sent {
    pub from: String,
    /// `None` for a broadcast.
    pub to: Option<String>,
    /// Unique per message: `<from>:<seq>`.
    pub content: String,
    pub seq: u64,
    pub id: String,
    /// When the send was scheduled (ms since the run began).
    pub at_ms: u64,
}

/// A message an agent received.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivered {
    pub to: String,
    pub from: String,
    pub content: String,
    pub id: String,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    pub agents: Vec<String>,
    pub acked: Vec<Sent>,
    /// Contents of every send attempted, acknowledged or not (a send whose reply was lost may
    /// still be delivered: that is not "unexpected").
    pub attempted: HashSet<String>,
    pub delivered: Vec<Delivered>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// (recipient, content) acknowledged and never delivered.
    pub lost: Vec<(String, String)>,
    /// (recipient, content) delivered more than once.
    pub duplicated: Vec<(String, String)>,
    /// (sender, recipient, seq that arrived after a later one).
    pub reordered: Vec<(String, String, u64)>,
    /// (recipient, content) delivered but never sent (to it).
    pub unexpected: Vec<(String, String)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.reordered.is_empty()
            && self.unexpected.is_empty()
    }
}

/// Checks a history.
pub fn check(h: &History) -> Report {
    let mut r = Report::default();
    let mut expected: HashSet<(String, String)> = HashSet::new();
    let mut seq_of: HashMap<String, (String, u64)> = HashMap::new();
    for s in &h.acked {
        seq_of.insert(s.content.clone(), (s.from.clone(), s.seq));
        match &s.to {
            Some(to) => {
                expected.insert((to.clone(), s.content.clone()));
            }
            None => {
                for a in h.agents.iter().filter(|a| **a != s.from) {
                    expected.insert((a.clone(), s.content.clone()));
                }
            }
        }
    }
    let mut count: BTreeMap<(String, String), usize> = BTreeMap::new();
    for d in &h.delivered {
        *count.entry((d.to.clone(), d.content.clone())).or_default() += 1;
    }
    for ((to, content), n) in &count {
        if *n > 1 {
            r.duplicated.push((to.clone(), content.clone()));
        }
        let sent_to_them = expected.contains(&(to.clone(), content.clone()));
        if !sent_to_them && !h.attempted.contains(content) {
            r.unexpected.push((to.clone(), content.clone()));
        }
    }
    for (to, content) in &expected {
        if !count.contains_key(&(to.clone(), content.clone())) {
            r.lost.push((to.clone(), content.clone()));
        }
    }
    r.lost.sort();
    // Order: per (sender, recipient), sequence numbers must rise in arrival order.
    let mut last: HashMap<(String, String), u64> = HashMap::new();
    for d in &h.delivered {
        let Some((from, seq)) = seq_of
            .get(&d.content)
            .cloned()
            .or_else(|| parse_seq(&d.content))
        else {
            continue;
        };
        let key = (from.clone(), d.to.clone());
        if let Some(prev) = last.get(&key) {
            if seq < *prev {
                r.reordered.push((from, d.to.clone(), seq));
                continue;
            }
        }
        last.insert(key, seq);
    }
    r
}

/// `<from>:<seq>` (a broadcast adds `:b`).
pub fn parse_seq(content: &str) -> Option<(String, u64)> {
    let mut parts = content.split(':');
    let from = parts.next()?.to_string();
    let seq = parts.next()?.parse().ok()?;
    Some((from, seq))
}
