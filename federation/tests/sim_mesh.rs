//! Mesh scenarios on the deterministic in-memory network. Each runs in virtual time from a
//! seed; `SIM_TRACE=1` prints every step.

use federation::node::{Event, LinkState};
use federation::sim::{NetConfig, Sim};

fn net(seed: u64) -> NetConfig {
    NetConfig {
        seed,
        ..NetConfig::default()
    }
}

fn register(sim: &mut Sim, node: usize, name: &str, token: u8, incarnation: u64) {
    let now = sim.now;
    sim.local(
        node,
        Event::AgentChanged {
            name: name.into(),
            token_hash: vec![token],
            incarnation,
            online: true,
            last_seen_ms: now,
        },
    );
}

#[test]
fn ten_brokers_from_one_seed_form_a_full_mesh() {
    for seed in 1..=5 {
        let mut sim = Sim::new(net(seed));
        let first = sim.add(&[], None);
        for _ in 1..10 {
            sim.add(&[first], None);
        }
        let took = sim.run_until(10_000, |s| s.full_mesh());
        assert!(took.is_some(), "seed {seed}: no full mesh after 10 s");
        // Let duplicate links settle, then check there is exactly one link per pair.
        sim.run_for(5_000);
        assert!(sim.full_mesh());
        assert_eq!(sim.links_up(), 45, "seed {seed}");
        let opened: u64 = (0..10)
            .map(|i| sim.node(i).stats().links_opened)
            .sum::<u64>()
            / 2;
        eprintln!(
            "seed {seed}: full mesh in {} ms, {opened} links opened for 45 pairs",
            took.unwrap()
        );
        assert!(opened <= 45 + 10, "seed {seed}: {opened} links opened");
    }
}

#[test]
fn registrations_reach_every_broker() {
    let mut sim = Sim::new(net(7));
    let a = sim.add(&[], None);
    for _ in 1..5 {
        sim.add(&[a], None);
    }
    sim.run_until(10_000, |s| s.full_mesh()).unwrap();
    register(&mut sim, 3, "alice", 1, 1);
    let took = sim.run_until(2_000, |s| {
        (0..5).all(|i| s.node(i).registry().lookup("alice").is_some())
    });
    assert!(
        took.unwrap() < 200,
        "pushed at once, not on the next gossip round"
    );
    assert!(sim.registries_agree());
    assert_eq!(
        sim.node(0).registry().lookup("alice").unwrap().owner,
        sim.id(3)
    );
}

#[test]
fn partition_and_heal_converge() {
    let mut sim = Sim::new(net(11));
    let a = sim.add(&[], None);
    for _ in 1..4 {
        sim.add(&[a], None);
    }
    sim.run_until(10_000, |s| s.full_mesh()).unwrap();
    register(&mut sim, 0, "left-agent", 1, 1);
    sim.run_for(500);

    sim.partition(&[0, 1], &[2, 3]);
    // Failure detection: both sides mark the other half down within a few seconds.
    let took = sim.run_until(10_000, |s| {
        s.node(0).up_peers().len() == 1 && s.node(3).up_peers().len() == 1
    });
    assert!(took.unwrap() <= 4_000, "detected in {took:?}");
    let st = sim.node(0).peer_status(sim.now);
    assert_eq!(st.iter().filter(|p| p.state == LinkState::Up).count(), 1);

    register(&mut sim, 2, "right-agent", 2, 1);
    register(&mut sim, 1, "left-agent-2", 3, 1);
    sim.run_for(2_000);
    assert!(
        sim.node(0).registry().lookup("right-agent").is_none(),
        "no gossip across the cut"
    );

    sim.heal();
    let took = sim.run_until(30_000, |s| {
        s.full_mesh() && s.registries_agree() && s.node(0).registry().agents().len() == 3
    });
    assert!(took.is_some(), "no convergence after heal");
    assert_eq!(sim.links_up(), 6);
}

#[test]
fn conflicting_claims_resolve_the_same_everywhere_and_the_loser_is_told() {
    let mut sim = Sim::new(net(3));
    let a = sim.add(&[], None);
    for _ in 1..4 {
        sim.add(&[a], None);
    }
    sim.run_until(10_000, |s| s.full_mesh()).unwrap();
    sim.partition(&[0, 1], &[2, 3]);
    sim.run_for(5_000);
    // Two different agents (different tokens) claim "dup" on either side.
    register(&mut sim, 0, "dup", 0xaa, 1);
    register(&mut sim, 3, "dup", 0xbb, 1);
    sim.run_for(1_000);
    sim.heal();
    sim.run_until(30_000, |s| s.full_mesh() && s.registries_agree())
        .expect("converged");

    let winner = sim.node(1).registry().lookup("dup").unwrap().clone();
    let expected = sim.id(0).max(sim.id(3));
    assert_eq!(
        winner.owner, expected,
        "same incarnation: the higher broker id wins"
    );
    for i in 0..4 {
        assert_eq!(
            sim.node(i).registry().lookup("dup").unwrap().owner,
            expected
        );
    }
    let loser = if expected == sim.id(0) { 3 } else { 0 };
    let told: Vec<_> = sim
        .superseded
        .iter()
        .filter(|(n, s)| *n == loser && s.name == "dup")
        .collect();
    assert_eq!(
        told.len(),
        1,
        "the loser's broker is told once: {:?}",
        sim.superseded
    );
    assert!(!told[0].1.moved);
}

#[test]
fn a_newer_claim_wins_and_a_moved_agent_is_not_a_conflict() {
    let mut sim = Sim::new(net(5));
    let a = sim.add(&[], None);
    sim.add(&[a], None);
    sim.add(&[a], None);
    sim.run_until(10_000, |s| s.full_mesh()).unwrap();
    register(&mut sim, 0, "mover", 9, 1);
    sim.run_for(500);
    // The same agent (same token) reattaches to node 2 with the next incarnation.
    register(&mut sim, 2, "mover", 9, 2);
    sim.run_until(2_000, |s| s.registries_agree()).unwrap();
    for i in 0..3 {
        assert_eq!(
            sim.node(i).registry().lookup("mover").unwrap().owner,
            sim.id(2)
        );
    }
    assert_eq!(sim.superseded.len(), 1);
    assert!(sim.superseded[0].1.moved);
    assert_eq!(
        sim.node(1).registry().agents().len(),
        1,
        "one entry per name in every view"
    );
}

#[test]
fn a_broker_restarting_on_a_new_address_rejoins_without_duplicate_links() {
    let mut sim = Sim::new(net(21));
    let a = sim.add(&[], None);
    sim.add(&[a], None);
    let c = sim.add(&[a], None);
    sim.run_until(10_000, |s| s.full_mesh()).unwrap();
    sim.crash(c);
    sim.run_until(10_000, |s| s.node(0).up_peers().len() == 1)
        .unwrap();
    sim.restart(c, Some("sim-moved:9999".into()));
    let took = sim.run_until(20_000, |s| s.full_mesh());
    assert!(took.is_some(), "the restarted broker rejoined");
    sim.run_for(5_000);
    assert_eq!(sim.links_up(), 3);
    let p = sim.node(1).peer_status(sim.now);
    let moved = p.iter().find(|p| p.id == Some(sim.id(c))).unwrap();
    assert_eq!(moved.addr, "sim-moved:9999");
    assert_eq!(moved.state, LinkState::Up);
}

#[test]
fn a_crashed_peer_is_marked_down_and_comes_back_up() {
    let mut sim = Sim::new(net(9));
    let a = sim.add(&[], None);
    let b = sim.add(&[a], None);
    sim.run_until(10_000, |s| s.full_mesh()).unwrap();
    // A pause looks like a dead peer: silence, no close.
    sim.pause(b);
    let took = sim
        .run_until(10_000, |s| s.node(a).up_peers().is_empty())
        .unwrap();
    assert!(took <= 4_000, "down after {took} ms");
    sim.resume(b);
    assert!(sim.run_until(15_000, |s| s.full_mesh()).is_some());
    assert_eq!(sim.links_up(), 1);
}

#[test]
fn wrong_or_missing_secrets_are_refused_on_both_sides() {
    let mut sim = Sim::new(net(13));
    let a = sim.add(&[], Some("the right secret, long enough"));
    let b = sim.add(&[a], Some("the right secret, long enough"));
    let wrong = sim.add(&[a], Some("a wrong secret, also long enough"));
    let none = sim.add(&[a], None);
    sim.run_for(10_000);
    assert_eq!(sim.node(a).up_peers(), vec![sim.id(b)]);
    assert!(sim.node(wrong).up_peers().is_empty());
    assert!(sim.node(none).up_peers().is_empty());
    let refused_at = |n: usize| sim.refusals.iter().filter(|(i, _, _)| *i == n).count();
    assert!(
        refused_at(a) >= 2,
        "the acceptor logged refusals: {:?}",
        sim.refusals
    );
    assert!(refused_at(wrong) >= 1 && refused_at(none) >= 1);
    assert!(sim.refusals.iter().any(|(_, _, r)| r.contains("secret")));
    // Status on both sides says why.
    let st = sim.node(wrong).peer_status(sim.now);
    assert!(
        st.iter()
            .any(|p| p.refused.as_deref().is_some_and(|r| r.contains("secret"))),
        "{st:?}"
    );
    let st = sim.node(a).peer_status(sim.now);
    assert!(
        st.iter()
            .any(|p| p.state != LinkState::Up && p.refused.is_some()),
        "{st:?}"
    );
}

#[test]
fn formation_survives_lossy_reordering_networks() {
    let mut sim = Sim::new(NetConfig {
        seed: 99,
        min_delay_ms: 1,
        max_delay_ms: 40,
        drop_rate: 0.01,
        reorder: false,
        duplicate_rate: 0.0,
        tick_ms: 50,
    });
    let a = sim.add(&[], None);
    for _ in 1..6 {
        sim.add(&[a], None);
    }
    register(&mut sim, 4, "x", 1, 1);
    let took = sim.run_until(60_000, |s| {
        s.full_mesh() && s.registries_agree() && s.node(0).registry().lookup("x").is_some()
    });
    assert!(took.is_some(), "lossy network converged");
}

#[test]
fn the_same_seed_replays_the_same_history() {
    let run = |seed| {
        let mut sim = Sim::new(NetConfig {
            seed,
            max_delay_ms: 30,
            drop_rate: 0.02,
            ..NetConfig::default()
        });
        let a = sim.add(&[], None);
        for _ in 1..5 {
            sim.add(&[a], None);
        }
        sim.run_for(8_000);
        (0..5)
            .map(|i| sim.node(i).stats().clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(4), run(4));
}
