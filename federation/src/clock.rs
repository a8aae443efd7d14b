//! The delivery clock: per origin broker, which sequences have been delivered.
//!
//! A dot `(origin, seq)` is delivered at most once. For each origin the clock keeps the highest
//! contiguous sequence delivered plus the few delivered sequences above it, so its size is
//! O(origins) plus the current gaps, with no time window: a retransmission a day later is still
//! recognised.
//!
//! An origin numbers everything it sends from one counter, so the sequences one destination
//! sees have gaps (what went elsewhere). Each envelope therefore names `prev`, the sequence of
//! the origin's previous envelope to the same destination: when `prev` is already covered, the
//! gap before this one is known to hold nothing for us and the contiguous mark jumps over it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{BrokerId, Dot};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryClock {
    origins: BTreeMap<BrokerId, OriginClock>,
}

/// What one origin has had delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginClock {
    /// Every sequence in `1..=contiguous` has been delivered.
    pub contiguous: u64,
    /// Delivered sequences above `contiguous`, each with its `prev`, waiting for the gap below
    /// them to fill. Never holds an entry whose `prev` is covered (it would have been folded).
    pub above: BTreeMap<u64, u64>,
}

impl DeliveryClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Has this dot been delivered already?
    pub fn contains(&self, dot: Dot) -> bool {
        self.origins
            .get(&dot.origin)
            .is_some_and(|o| o.contains(dot.seq))
    }

    /// Records `dot` as delivered, its predecessor being the sequence right before it.
    /// Returns false, changing nothing, if it already was.
    pub fn insert(&mut self, dot: Dot) -> bool {
        self.accept(dot, dot.seq.saturating_sub(1))
    }

    /// Records `dot` as delivered, `prev` being the origin's previous sequence to this
    /// destination (0 for its first). Returns false, changing nothing, if it already was.
    pub fn accept(&mut self, dot: Dot, prev: u64) -> bool {
        self.origins
            .entry(dot.origin)
            .or_default()
            .accept(dot.seq, prev)
    }

    /// Marks every sequence of `origin` up to `seq` as accounted for: the origin says none of
    /// them will come this way (they were for other brokers, or already delivered).
    pub fn advance_to(&mut self, origin: BrokerId, seq: u64) {
        let o = self.origins.entry(origin).or_default();
        if seq > o.contiguous {
            o.contiguous = seq;
            o.above = o.above.split_off(&(seq + 1));
            o.compact();
        }
    }

    /// The highest contiguous sequence delivered from `origin` (0 if none).
    pub fn contiguous(&self, origin: BrokerId) -> u64 {
        self.origins.get(&origin).map_or(0, |o| o.contiguous)
    }

    /// A clock from persisted origin entries.
    pub fn from_origins(origins: impl IntoIterator<Item = (BrokerId, OriginClock)>) -> Self {
        DeliveryClock {
            origins: origins.into_iter().collect(),
        }
    }

    pub fn origin(&self, origin: BrokerId) -> Option<&OriginClock> {
        self.origins.get(&origin)
    }

    pub fn iter(&self) -> impl Iterator<Item = (BrokerId, &OriginClock)> {
        self.origins.iter().map(|(k, v)| (*k, v))
    }
}

impl OriginClock {
    fn contains(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.above.contains_key(&seq)
    }

    fn accept(&mut self, seq: u64, prev: u64) -> bool {
        if seq == 0 || prev >= seq || self.contains(seq) {
            return false;
        }
        self.above.insert(seq, prev);
        self.compact();
        true
    }

    /// Folds waiting entries into `contiguous` while the lowest one's predecessor is covered.
    fn compact(&mut self) {
        while let Some((&seq, &prev)) = self.above.first_key_value() {
            if prev > self.contiguous {
                break;
            }
            self.above.remove(&seq);
            self.contiguous = self.contiguous.max(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_with_gaps_stay_compact() {
        // The origin sent 3, 7 and 12 to us (everything else went elsewhere).
        let mut c = DeliveryClock::new();
        let o = BrokerId::from_u32(1);
        assert!(c.accept(Dot::new(o, 12), 7), "out of order: waits above");
        assert_eq!(c.origin(o).unwrap().contiguous, 0);
        assert!(c.accept(Dot::new(o, 3), 0));
        assert_eq!(c.origin(o).unwrap().contiguous, 3);
        assert!(c.accept(Dot::new(o, 7), 3));
        let oc = c.origin(o).unwrap();
        assert_eq!(oc.contiguous, 12, "the chain folded");
        assert!(oc.above.is_empty());
        for s in [3, 7, 12, 5, 10] {
            assert!(c.contains(Dot::new(o, s)), "{s} is covered");
            assert!(!c.accept(Dot::new(o, s), 0), "{s} is a duplicate");
        }
        assert!(c.accept(Dot::new(o, 20), 12));
    }

    fn dot(seq: u64) -> Dot {
        Dot::new(BrokerId::from_u32(1), seq)
    }

    #[test]
    fn in_order_delivery_stays_compact() {
        let mut c = DeliveryClock::new();
        for s in 1..=1000 {
            assert!(c.insert(dot(s)));
        }
        let o = c.origin(BrokerId::from_u32(1)).unwrap();
        assert_eq!(o.contiguous, 1000);
        assert!(o.above.is_empty());
    }

    #[test]
    fn duplicates_are_refused_before_and_after_compaction() {
        let mut c = DeliveryClock::new();
        assert!(c.insert(dot(3)));
        assert!(!c.insert(dot(3)));
        assert!(c.insert(dot(1)));
        assert!(c.insert(dot(2)));
        assert_eq!(c.origin(BrokerId::from_u32(1)).unwrap().contiguous, 3);
        for s in 1..=3 {
            assert!(!c.insert(dot(s)), "seq {s} redelivered");
        }
        assert!(c.contains(dot(2)));
        assert!(!c.contains(dot(4)));
    }

    #[test]
    fn origins_are_independent() {
        let mut c = DeliveryClock::new();
        assert!(c.insert(Dot::new(BrokerId::from_u32(1), 1)));
        assert!(c.insert(Dot::new(BrokerId::from_u32(2), 1)));
    }

    #[test]
    fn advancing_skips_gaps_and_drops_covered_entries() {
        let mut c = DeliveryClock::new();
        c.insert(dot(5));
        c.insert(dot(9));
        c.advance_to(BrokerId::from_u32(1), 6);
        let o = c.origin(BrokerId::from_u32(1)).unwrap();
        assert_eq!(o.contiguous, 6);
        assert_eq!(o.above.keys().copied().collect::<Vec<_>>(), vec![9]);
        assert!(c.insert(dot(7)));
        assert!(c.insert(dot(8)));
        assert_eq!(c.origin(BrokerId::from_u32(1)).unwrap().contiguous, 9);
    }
}
