//! The nemeses, scheduled from a seed: the same seed gives the same schedule.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The brokers split into two random halves.
    PartitionHalves(Vec<usize>, Vec<usize>),
    /// One broker cut off from all others.
    Isolate(usize),
    /// Bytes from the first broker to the second stop; the other way still flows.
    OneWay(usize, usize),
    /// `kill -9`, restarted when the fault ends.
    Kill(usize),
    /// SIGSTOP for longer than failure detection, then SIGCONT.
    Pause(usize),
    /// The broker's links dropped (mid-frame) every 300 ms.
    Flap(usize),
    /// Every link slowed down.
    Delay(u64),
    /// Agent (by index) moves to another broker.
    Move(usize, usize),
    /// The broker is isolated and another broker's outbox for it is filled to its bound.
    FullOutbox(usize),
}

#[derive(Clone, Debug)]
pub struct Step {
    pub at_ms: u64,
    pub hold_ms: u64,
    pub fault: Fault,
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::PartitionHalves(..) => "partition-halves",
            Fault::Isolate(_) => "isolate",
            Fault::OneWay(..) => "one-way-cut",
            Fault::Kill(_) => "kill-9",
            Fault::Pause(_) => "pause",
            Fault::Flap(_) => "flap",
            Fault::Delay(_) => "delay",
            Fault::Move(..) => "move-agent",
            Fault::FullOutbox(_) => "full-outbox",
        }
    }
}

fn random_fault(rng: &mut StdRng, kind: usize, brokers: usize, agents: usize) -> Fault {
    let b = rng.random_range(0..brokers);
    let other = (b + rng.random_range(1..brokers)) % brokers;
    match kind {
        0 => {
            let mut all: Vec<usize> = (0..brokers).collect();
            for i in (1..all.len()).rev() {
                let j = rng.random_range(0..=i);
                all.swap(i, j);
            }
            let cut = rng.random_range(1..brokers);
            let right = all.split_off(cut);
            Fault::PartitionHalves(all, right)
        }
        1 => Fault::Isolate(b),
        2 => Fault::OneWay(b, other),
        3 => Fault::Kill(b),
        4 => Fault::Pause(b),
        5 => Fault::Flap(b),
        6 => Fault::Delay(rng.random_range(20..120)),
        7 => Fault::Move(rng.random_range(0..agents), other),
        _ => Fault::FullOutbox(b),
    }
}

pub const KINDS: usize = 9;

/// Every kind once, in a seeded order (the short CI mix).
pub fn every_kind(seed: u64, brokers: usize, agents: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kinds: Vec<usize> = (0..KINDS).collect();
    for i in (1..kinds.len()).rev() {
        let j = rng.random_range(0..=i);
        kinds.swap(i, j);
    }
    let mut at = 2_000;
    let mut out = Vec::new();
    for k in kinds {
        let fault = random_fault(&mut rng, k, brokers, agents);
        let hold_ms = if matches!(fault, Fault::Pause(_)) {
            4_500
        } else {
            rng.random_range(2_500..4_500)
        };
        out.push(Step {
            at_ms: at,
            hold_ms,
            fault,
        });
        at += hold_ms + 2_000;
    }
    out
}

/// Random faults, back to back with short gaps, for `total_ms`.
pub fn random(seed: u64, brokers: usize, agents: usize, total_ms: u64) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = 2_000;
    let mut out = Vec::new();
    while at < total_ms {
        let kind = rng.random_range(0..KINDS);
        let fault = random_fault(&mut rng, kind, brokers, agents);
        let hold_ms = if matches!(fault, Fault::Pause(_)) {
            rng.random_range(4_000..8_000)
        } else {
            rng.random_range(1_000..10_000)
        };
        out.push(Step {
            at_ms: at,
            hold_ms,
            fault,
        });
        at += hold_ms + rng.random_range(1_000..4_000);
    }
    out
}
