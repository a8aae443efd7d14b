//! The mesh registry: which agent is attached to which broker, gossiped by digest and delta.
//!
//! Each broker owns the entries of the agents attached to it and numbers its changes with a
//! version of its own. A digest is one version per owner; a peer answers a digest with the
//! entries newer than it (the delta). Entries are never edited by anyone but their owner, so
//! applying deltas in any order, any number of times, converges.
//!
//! A name may have entries on several brokers (an agent that moved, or two agents that claimed
//! one name during a partition). Everyone resolves it the same way: the entry with the highest
//! incarnation wins, then the highest broker id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BrokerId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEntry {
    pub name: String,
    /// The broker the agent is attached to.
    pub owner: BrokerId,
    /// SHA-256 of the agent's token, so any broker can check a reattaching agent.
    pub token_hash: Vec<u8>,
    /// Bumped by every claim of the name, wherever it happens: the newest claim wins.
    pub incarnation: u64,
    pub online: bool,
    pub last_seen_ms: u64,
    /// The owner's registry version when this entry last changed.
    pub version: u64,
    /// Kept (for the retention) so that the removal spreads like any other change.
    pub removed: bool,
}

impl AgentEntry {
    /// The order that decides a contested name.
    fn rank(&self) -> (u64, BrokerId) {
        (self.incarnation, self.owner)
    }
}

#[derive(Clone, Debug, Default)]
struct Owned {
    version: u64,
    entries: BTreeMap<String, AgentEntry>,
}

/// One broker's view of the whole mesh's agents.
#[derive(Clone, Debug)]
pub struct Registry {
    me: BrokerId,
    owners: BTreeMap<BrokerId, Owned>,
}

/// A local entry that lost its name to another broker's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superseded {
    pub name: String,
    pub winner: AgentEntry,
    /// The winner holds the same token: the agent moved, it did not lose its name.
    pub moved: bool,
}

impl Registry {
    /// `version_floor` starts this broker's own versions above anything a previous run used
    /// (the wall clock in microseconds serves).
    pub fn new(me: BrokerId, version_floor: u64) -> Registry {
        let mut owners = BTreeMap::new();
        owners.insert(
            me,
            Owned {
                version: version_floor,
                entries: BTreeMap::new(),
            },
        );
        Registry { me, owners }
    }

    pub fn me(&self) -> BrokerId {
        self.me
    }

    pub fn digest(&self) -> Vec<(BrokerId, u64)> {
        self.owners.iter().map(|(id, o)| (*id, o.version)).collect()
    }

    /// Entries newer than `digest`, for the peer that sent it.
    pub fn delta_since(&self, digest: &[(BrokerId, u64)]) -> Vec<AgentEntry> {
        let theirs: BTreeMap<BrokerId, u64> = digest.iter().copied().collect();
        let mut out = Vec::new();
        for (id, o) in &self.owners {
            let since = theirs.get(id).copied().unwrap_or(0);
            if o.version > since {
                out.extend(o.entries.values().filter(|e| e.version > since).cloned());
            }
        }
        out
    }

    /// Applies gossiped entries; returns the ones that changed this registry.
    ///
    /// Our own entries coming back are ignored, except that a version above ours (from a
    /// previous run of this broker) moves our counter past it, so our next changes win.
    /// Versions come from peers, so the counter saturates rather than overflow.
    pub fn apply(&mut self, entries: Vec<AgentEntry>) -> Vec<AgentEntry> {
        let mut changed = Vec::new();
        for e in entries {
            if e.owner == self.me {
                let own = self.owners.get_mut(&self.me).expect("own entry");
                if e.version > own.version {
                    own.version = e.version;
                }
                continue;
            }
            let o = self.owners.entry(e.owner).or_default();
            let newer = o
                .entries
                .get(&e.name)
                .is_none_or(|cur| e.version > cur.version);
            if newer {
                o.version = o.version.max(e.version);
                o.entries.insert(e.name.clone(), e.clone());
                changed.push(e);
            }
        }
        changed
    }

    /// Creates or updates an entry of this broker; returns it with its new version.
    pub fn upsert_local(
        &mut self,
        name: &str,
        token_hash: Vec<u8>,
        incarnation: u64,
        online: bool,
        last_seen_ms: u64,
    ) -> AgentEntry {
        let me = self.me;
        let own = self.owners.get_mut(&me).expect("own entry");
        own.version = own.version.saturating_add(1);
        let e = AgentEntry {
            name: name.to_string(),
            owner: me,
            token_hash,
            incarnation,
            online,
            last_seen_ms,
            version: own.version,
            removed: false,
        };
        own.entries.insert(name.to_string(), e.clone());
        e
    }

    /// Marks an entry of this broker removed; returns the tombstone to gossip.
    pub fn remove_local(&mut self, name: &str, now_ms: u64) -> Option<AgentEntry> {
        let own = self.owners.get_mut(&self.me).expect("own entry");
        let cur = own.entries.get(name)?;
        if cur.removed {
            return None;
        }
        own.version = own.version.saturating_add(1);
        let mut e = cur.clone();
        e.removed = true;
        e.online = false;
        e.last_seen_ms = now_ms;
        e.version = own.version;
        own.entries.insert(name.to_string(), e.clone());
        Some(e)
    }

    /// Every entry of this broker, re-versioned (after a restart, so peers take them).
    pub fn republish_local(&mut self) -> Vec<AgentEntry> {
        let own = self.owners.get_mut(&self.me).expect("own entry");
        let mut out = Vec::new();
        for e in own.entries.values_mut() {
            own.version = own.version.saturating_add(1);
            e.version = own.version;
            out.push(e.clone());
        }
        out
    }

    /// The entry that holds `name` now, by the conflict rule.
    pub fn lookup(&self, name: &str) -> Option<&AgentEntry> {
        self.owners
            .values()
            .filter_map(|o| o.entries.get(name))
            .filter(|e| !e.removed)
            .max_by_key(|e| e.rank())
    }

    /// The highest incarnation any entry (even a removed one) has had for `name`.
    pub fn max_incarnation(&self, name: &str) -> u64 {
        self.owners
            .values()
            .filter_map(|o| o.entries.get(name))
            .map(|e| e.incarnation)
            .max()
            .unwrap_or(0)
    }

    /// The winning entry of every name, sorted by name.
    pub fn agents(&self) -> Vec<&AgentEntry> {
        let mut names: Vec<&str> = self
            .owners
            .values()
            .flat_map(|o| o.entries.keys().map(|k| k.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().filter_map(|n| self.lookup(n)).collect()
    }

    /// Local entries whose name is now held by another broker's entry. They are removed here
    /// (tombstoned) so that every broker converges; the caller tells the agents.
    pub fn take_superseded(&mut self, now_ms: u64) -> (Vec<Superseded>, Vec<AgentEntry>) {
        let mine: Vec<AgentEntry> = self.owners[&self.me]
            .entries
            .values()
            .filter(|e| !e.removed)
            .cloned()
            .collect();
        let mut lost = Vec::new();
        let mut tombstones = Vec::new();
        for e in mine {
            let Some(winner) = self.lookup(&e.name).cloned() else {
                continue;
            };
            if winner.owner != self.me {
                if let Some(t) = self.remove_local(&e.name, now_ms) {
                    tombstones.push(t);
                }
                lost.push(Superseded {
                    name: e.name.clone(),
                    moved: winner.token_hash == e.token_hash,
                    winner,
                });
            }
        }
        (lost, tombstones)
    }

    /// Forgets entries (of any owner) removed or offline for longer than `retention_ms`.
    pub fn age_out(&mut self, now_ms: u64, retention_ms: u64) -> usize {
        let mut n = 0;
        for o in self.owners.values_mut() {
            let before = o.entries.len();
            o.entries.retain(|_, e| {
                (e.online && !e.removed) || e.last_seen_ms.saturating_add(retention_ms) > now_ms
            });
            n += before - o.entries.len();
        }
        n
    }

    /// Brokers that own at least one live entry.
    pub fn owners(&self) -> impl Iterator<Item = BrokerId> + '_ {
        self.owners.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> BrokerId {
        BrokerId::from_u32(n)
    }

    #[test]
    fn digest_and_delta_carry_only_what_is_newer() {
        let mut a = Registry::new(id(1), 0);
        let mut b = Registry::new(id(2), 0);
        a.upsert_local("alice", vec![1], 1, true, 10);
        a.upsert_local("ann", vec![2], 1, true, 10);
        let d = a.delta_since(&b.digest());
        assert_eq!(d.len(), 2);
        assert_eq!(b.apply(d.clone()).len(), 2);
        assert!(b.apply(d).is_empty(), "applying twice changes nothing");
        assert!(a.delta_since(&b.digest()).is_empty());
        a.upsert_local("alice", vec![1], 1, false, 20);
        let d = a.delta_since(&b.digest());
        assert_eq!(d.len(), 1);
        assert!(!d[0].online);
        b.apply(d);
        assert!(!b.lookup("alice").unwrap().online);
    }

    #[test]
    fn conflicts_resolve_by_incarnation_then_broker_id_everywhere() {
        let mut a = Registry::new(id(1), 0);
        let mut b = Registry::new(id(2), 0);
        a.upsert_local("x", vec![0xa], 3, true, 0);
        b.upsert_local("x", vec![0xb], 3, true, 0);
        let (da, db) = (a.delta_since(&[]), b.delta_since(&[]));
        a.apply(db);
        b.apply(da);
        assert_eq!(a.lookup("x").unwrap().owner, id(2));
        assert_eq!(b.lookup("x").unwrap().owner, id(2));
        let (lost, tomb) = a.take_superseded(5);
        assert_eq!(lost.len(), 1);
        assert!(!lost[0].moved);
        assert_eq!(tomb.len(), 1);
        assert!(b.take_superseded(5).0.is_empty(), "the winner keeps it");
        // A newer claim wins over a higher broker id.
        a.upsert_local("x", vec![0xa], 4, true, 0);
        b.apply(a.delta_since(&b.digest()));
        assert_eq!(b.lookup("x").unwrap().owner, id(1));
        let (lost, _) = b.take_superseded(6);
        assert_eq!(lost[0].winner.owner, id(1));
    }

    #[test]
    fn a_moved_agent_is_recognised_by_its_token() {
        let mut a = Registry::new(id(1), 0);
        let mut b = Registry::new(id(2), 0);
        a.upsert_local("m", vec![7], 1, true, 0);
        b.apply(a.delta_since(&[]));
        b.upsert_local("m", vec![7], 2, true, 0);
        a.apply(b.delta_since(&a.digest()));
        let (lost, tomb) = a.take_superseded(1);
        assert!(lost[0].moved);
        b.apply(tomb);
        assert_eq!(b.agents().len(), 1);
        assert_eq!(b.lookup("m").unwrap().owner, id(2));
    }

    #[test]
    fn own_entries_coming_back_lift_the_version_floor() {
        let mut a = Registry::new(id(1), 0);
        let stale = AgentEntry {
            name: "z".into(),
            owner: id(1),
            token_hash: vec![],
            incarnation: 1,
            online: true,
            last_seen_ms: 0,
            version: 500,
            removed: false,
        };
        assert!(a.apply(vec![stale]).is_empty());
        let e = a.upsert_local("z", vec![], 2, true, 0);
        assert!(e.version > 500);
    }

    #[test]
    fn offline_entries_age_out() {
        let mut a = Registry::new(id(1), 0);
        a.upsert_local("on", vec![], 1, true, 0);
        a.upsert_local("off", vec![], 1, false, 0);
        assert_eq!(a.age_out(1000, 100), 1);
        assert!(a.lookup("on").is_some());
        assert!(a.lookup("off").is_none());
    }

    /// Found by the node fuzz target's harness: a peer gossiping one of our own entries at
    /// version u64::MAX moved our counter there, and the next local change overflowed it
    /// (a panic with overflow checks, a wrap to 0 without).
    #[test]
    fn own_version_gossiped_at_the_maximum_does_not_overflow() {
        let mut a = Registry::new(id(1), 0);
        a.upsert_local("x", vec![1], 1, true, 0);
        let mut e = a.delta_since(&[]).remove(0);
        e.version = u64::MAX;
        a.apply(vec![e]);
        assert_eq!(a.upsert_local("x", vec![1], 2, true, 1).version, u64::MAX);
        assert_eq!(a.remove_local("x", 2).unwrap().version, u64::MAX);
        assert!(a.republish_local().iter().all(|e| e.version == u64::MAX));
    }

    /// Found by the node fuzz target's harness: an entry gossiped with `last_seen_ms` near
    /// u64::MAX overflowed the retention sum in `age_out`.
    #[test]
    fn last_seen_at_the_end_of_time_does_not_overflow_age_out() {
        let mut a = Registry::new(id(1), 0);
        let mut b = Registry::new(id(2), 0);
        b.upsert_local("late", vec![1], 1, false, u64::MAX);
        a.apply(b.delta_since(&[]));
        assert_eq!(a.age_out(1000, 100), 0);
        assert!(a.lookup("late").is_some());
    }
}
