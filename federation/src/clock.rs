//! The delivery clock: per origin broker, which sequences have been delivered.
//!
//! A dot `(origin, seq)` is delivered at most once. For each origin the clock keeps the highest
//! contiguous sequence delivered plus the few delivered sequences above it, so its size is
//! O(origins) plus the current gaps, with no time window: a retransmission a day later is still
//! recognised.

use std::collections::{BTreeMap, BTreeSet};

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
    /// Delivered sequences above `contiguous + 1`; never contains `contiguous + 1`.
    pub above: BTreeSet<u64>,
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

    /// Records `dot` as delivered. Returns false, changing nothing, if it already was.
    pub fn insert(&mut self, dot: Dot) -> bool {
        self.origins.entry(dot.origin).or_default().insert(dot.seq)
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

    pub fn origin(&self, origin: BrokerId) -> Option<&OriginClock> {
        self.origins.get(&origin)
    }

    pub fn iter(&self) -> impl Iterator<Item = (BrokerId, &OriginClock)> {
        self.origins.iter().map(|(k, v)| (*k, v))
    }
}

impl OriginClock {
    fn contains(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) || seq == 0 {
            return false;
        }
        self.above.insert(seq);
        self.compact();
        true
    }

    /// Folds `above` into `contiguous` while the next sequence is present.
    fn compact(&mut self) {
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(o.above.iter().copied().collect::<Vec<_>>(), vec![9]);
        assert!(c.insert(dot(7)));
        assert!(c.insert(dot(8)));
        assert_eq!(c.origin(BrokerId::from_u32(1)).unwrap().contiguous, 9);
    }
}
