//! Cross-broker delivery on the deterministic in-memory network: exactly once, in order,
//! through partitions, crashes, lossy links, relays and moves. `SIM_TRACE=1` prints each step.

use federation::delivery::MeshStore;
use federation::sim::{NetConfig, Sim};

fn net(seed: u64) -> NetConfig {
    NetConfig {
        seed,
        ..NetConfig::default()
    }
}

/// A mesh of `n` nodes, all seeded with node 0, formed.
fn mesh(cfg: NetConfig, n: usize) -> Sim {
    let mut sim = Sim::new(cfg);
    let first = sim.add(&[], None);
    for _ in 1..n {
        sim.add(&[first], None);
    }
    assert!(
        sim.run_until(30_000, |s| s.full_mesh()).is_some(),
        "mesh formed"
    );
    sim
}

/// `got` holds exactly the contents `want`, once each, in that order.
fn exactly_once_in_order(got: &[federation::Message], want: &[String]) {
    let contents: Vec<&str> = got.iter().map(|m| m.content.as_str()).collect();
    let want: Vec<&str> = want.iter().map(|s| s.as_str()).collect();
    assert_eq!(contents, want);
}

#[test]
fn messages_cross_a_partition_that_heals() {
    let mut sim = mesh(net(1), 3);
    sim.register(0, "alice");
    sim.register(2, "bob");
    sim.run_until(2_000, |s| s.registries_agree()).unwrap();
    sim.partition(&[0], &[1, 2]);
    sim.run_for(5_000);
    let sent: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    for m in &sent {
        sim.send(0, "alice", "bob", m);
    }
    sim.run_for(3_000);
    assert!(sim.inbox(2, "bob").is_empty(), "nothing crosses the cut");
    assert_eq!(
        sim.stores[0]
            .outbox_depths()
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>(),
        50
    );
    sim.heal();
    assert!(sim
        .run_until(30_000, |s| s.inbox(2, "bob").len() == 50)
        .is_some());
    sim.run_for(3_000);
    exactly_once_in_order(&sim.inbox(2, "bob"), &sent);
    assert!(
        sim.stores[0].outbox_depths().is_empty(),
        "the outbox drained"
    );
}

#[test]
fn a_broker_killed_with_a_full_outbox_delivers_after_restart() {
    let mut sim = mesh(net(2), 2);
    sim.register(0, "alice");
    sim.register(1, "bob");
    sim.run_until(2_000, |s| s.registries_agree()).unwrap();
    sim.cut(0, 1);
    sim.run_for(4_000);
    let sent: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    for m in &sent {
        sim.send(0, "alice", "bob", m);
    }
    sim.crash(0);
    sim.run_for(1_000);
    sim.restart(0, None);
    sim.heal();
    assert!(sim
        .run_until(30_000, |s| s.inbox(1, "bob").len() >= 200)
        .is_some());
    sim.run_for(3_000);
    exactly_once_in_order(&sim.inbox(1, "bob"), &sent);
}

#[test]
fn a_receiver_killed_mid_stream_loses_nothing_and_duplicates_nothing() {
    let mut sim = mesh(net(3), 2);
    sim.register(0, "alice");
    sim.register(1, "bob");
    sim.run_until(2_000, |s| s.registries_agree()).unwrap();
    let sent: Vec<String> = (0..3000).map(|i| format!("m{i}")).collect();
    for (i, m) in sent.iter().enumerate() {
        sim.send(0, "alice", "bob", m);
        if i == 1500 {
            sim.run_for(3);
            sim.crash(1);
            sim.run_for(500);
            sim.restart(1, None);
        }
    }
    assert!(sim
        .run_until(60_000, |s| s.inbox(1, "bob").len() >= 3000)
        .is_some());
    sim.run_for(3_000);
    exactly_once_in_order(&sim.inbox(1, "bob"), &sent);
}

#[test]
fn lossy_links_and_duplicated_frames_deliver_exactly_once_in_order() {
    for seed in 1..=3 {
        let mut sim = mesh(
            NetConfig {
                seed,
                min_delay_ms: 1,
                max_delay_ms: 30,
                drop_rate: 0.01,
                reorder: false,
                duplicate_rate: 0.2,
                tick_ms: 50,
            },
            3,
        );
        sim.register(0, "alice");
        sim.register(2, "bob");
        sim.run_until(5_000, |s| s.registries_agree()).unwrap();
        let sent: Vec<String> = (0..500).map(|i| format!("m{i}")).collect();
        for (i, m) in sent.iter().enumerate() {
            sim.send(0, "alice", "bob", m);
            if i % 50 == 0 {
                sim.run_for(20);
            }
        }
        assert!(
            sim.run_until(120_000, |s| s.inbox(2, "bob").len() >= 500)
                .is_some(),
            "seed {seed}"
        );
        sim.run_for(5_000);
        exactly_once_in_order(&sim.inbox(2, "bob"), &sent);
        assert!(
            sim.stores[2].duplicates() > 0,
            "seed {seed}: duplicates were injected and dropped"
        );
    }
}

#[test]
fn messages_relay_through_a_middle_broker() {
    let mut sim = Sim::new(net(4));
    let b = sim.add(&[], None);
    let a = sim.add(&[b], None);
    let c = sim.add(&[b], None);
    // A and C can never reach each other; both reach B.
    sim.cut(a, c);
    assert!(sim
        .run_until(20_000, |s| s.node(b).up_peers().len() == 2)
        .is_some());
    sim.register(a, "alice");
    sim.register(c, "carol");
    sim.run_until(5_000, |s| s.registries_agree()).unwrap();
    let sent: Vec<String> = (0..100).map(|i| format!("r{i}")).collect();
    for m in &sent {
        sim.send(a, "alice", "carol", m);
    }
    assert!(sim
        .run_until(20_000, |s| s.inbox(c, "carol").len() >= 100)
        .is_some());
    sim.run_for(2_000);
    exactly_once_in_order(&sim.inbox(c, "carol"), &sent);
    // And back.
    sim.send(c, "carol", "alice", "reply");
    assert!(sim
        .run_until(10_000, |s| s.inbox(a, "alice").len() == 1)
        .is_some());
}

#[test]
fn a_broadcast_reaches_a_broker_that_comes_back_late_once() {
    let mut sim = mesh(net(5), 3);
    sim.register(0, "alice");
    sim.register(1, "bob");
    sim.register(2, "carol");
    sim.register(2, "dave");
    sim.run_until(2_000, |s| s.registries_agree()).unwrap();
    sim.partition(&[2], &[0, 1]);
    sim.run_for(4_000);
    sim.broadcast(0, "alice", "hello all");
    sim.run_for(2_000);
    assert_eq!(sim.inbox(1, "bob").len(), 1);
    assert!(sim.inbox(2, "carol").is_empty());
    sim.heal();
    assert!(sim
        .run_until(20_000, |s| s.inbox(2, "carol").len() == 1
            && s.inbox(2, "dave").len() == 1)
        .is_some());
    sim.run_for(3_000);
    for (n, a) in [(1, "bob"), (2, "carol"), (2, "dave")] {
        assert_eq!(sim.inbox(n, a).len(), 1, "{a} got it once");
    }
    assert!(sim.inbox(0, "alice").is_empty(), "not to the sender");
}

#[test]
fn a_retransmission_of_a_very_old_dot_is_recognised() {
    let mut sim = mesh(net(6), 2);
    sim.register(0, "alice");
    sim.register(1, "bob");
    sim.run_until(2_000, |s| s.registries_agree()).unwrap();
    sim.send(0, "alice", "bob", "once");
    sim.run_until(5_000, |s| s.inbox(1, "bob").len() == 1)
        .unwrap();
    let old = sim.inbox(1, "bob")[0].clone();
    // Many messages later and a long (virtual) day after, the first one comes again.
    for i in 0..100 {
        sim.send(0, "alice", "bob", &format!("later {i}"));
    }
    sim.run_for(24 * 3600 * 1000 / 100);
    sim.run_until(10_000, |s| s.inbox(1, "bob").len() == 101)
        .unwrap();
    let replay = federation::delivery::Envelope {
        tdot: old.dot,
        prev: 0,
        dest: sim.id(1),
        hops: 0,
        broadcast: false,
        recipients: Vec::new(),
        message: old,
        queued_ms: 0,
        closes: None,
        elsewhere: Vec::new(),
        wait: Vec::new(),
        marker: None,
    };
    let before = sim.stores[1].duplicates();
    sim.stores[1].accept(vec![replay]);
    assert_eq!(sim.stores[1].duplicates(), before + 1);
    assert_eq!(sim.inbox(1, "bob").len(), 101);
}

#[test]
fn messages_follow_an_agent_that_moved() {
    let mut sim = mesh(net(7), 3);
    sim.register(0, "alice");
    sim.register(1, "bob");
    sim.run_until(2_000, |s| s.registries_agree()).unwrap();
    let first: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    for m in &first {
        sim.send(0, "alice", "bob", m);
    }
    sim.run_until(5_000, |s| s.inbox(1, "bob").len() == 20)
        .unwrap();
    // Bob moves to node 2 while node 1 still holds his messages, and more are on the way.
    sim.cut(0, 1);
    sim.run_for(4_000);
    let second: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    for m in &second {
        sim.send(0, "alice", "bob", m);
    }
    sim.register(2, "bob");
    sim.heal();
    assert!(sim
        .run_until(30_000, |s| s.inbox(2, "bob").len() >= 40)
        .is_some());
    sim.run_for(3_000);
    let all: Vec<String> = first.iter().chain(second.iter()).cloned().collect();
    exactly_once_in_order(&sim.inbox(2, "bob"), &all);
}

#[test]
fn order_holds_when_the_path_changes_from_a_relay_to_a_direct_link() {
    for seed in 1..=4 {
        let mut sim = Sim::new(NetConfig {
            seed,
            ..NetConfig::default()
        });
        let b = sim.add(&[], None);
        let a = sim.add(&[b], None);
        let c = sim.add(&[b], None);
        sim.cut(a, c);
        assert!(sim
            .run_until(20_000, |s| s.node(b).up_peers().len() == 2)
            .is_some());
        sim.register(a, "alice");
        sim.register(c, "carol");
        sim.run_until(5_000, |s| s.registries_agree()).unwrap();
        // B's frames to C vanish, but the link still looks up for a while: B stores (and
        // acknowledges) what A relays through it, and cannot pass it on.
        sim.cut_one_way(b, c);
        let sent: Vec<String> = (0..200).map(|i| format!("m{i:03}")).collect();
        for m in &sent[..100] {
            sim.send(a, "alice", "carol", m);
        }
        sim.run_for(200);
        // Now A and C get a direct link, and the rest goes that way, overtaking the relay.
        sim.uncut(a, c);
        assert!(sim
            .run_until(20_000, |s| s.node(a).up_peers().contains(&s.id(c)))
            .is_some());
        for m in &sent[100..] {
            sim.send(a, "alice", "carol", m);
        }
        sim.run_for(2_000);
        sim.uncut(b, c);
        assert!(
            sim.run_until(30_000, |s| s.inbox(c, "carol").len() >= 200)
                .is_some(),
            "seed {seed}"
        );
        sim.run_for(3_000);
        exactly_once_in_order(&sim.inbox(c, "carol"), &sent);
    }
}

/// Regression (chaos seed 7): a broadcast racing an agent's move reached it twice (once
/// directly, once forwarded with its inbox) or not at all (arriving at its old broker after it
/// left, and at its new one before it came).
#[test]
fn a_broadcast_reaches_an_agent_that_moves_while_it_travels_exactly_once() {
    for reach_new_first in [true, false] {
        let mut sim = mesh(net(11), 3);
        sim.register(0, "alice");
        sim.register(1, "bob");
        sim.register(2, "carol");
        sim.run_until(5_000, |s| s.registries_agree()).unwrap();
        sim.cut(0, 1);
        sim.cut(0, 2);
        if reach_new_first {
            // No relays either: broker 1's copy can only arrive when we say so.
            sim.cut(1, 2);
        }
        sim.run_for(4_000);
        sim.broadcast(0, "alice", "news");
        if reach_new_first {
            // The copy for broker 2 lands while bob is still on 1...
            sim.uncut(0, 2);
            sim.run_for(4_000);
            // ...bob moves to 2, broker 1 hears of it...
            sim.register(2, "bob");
            sim.uncut(1, 2);
            sim.run_for(4_000);
            // ...and only then does broker 1's copy arrive there.
            sim.uncut(0, 1);
        } else {
            // Bob moves first; broker 2's copy finds him there, broker 1's is forwarded.
            sim.register(2, "bob");
            sim.run_for(3_000);
            sim.uncut(0, 2);
            sim.run_for(3_000);
            sim.uncut(0, 1);
        }
        sim.run_for(10_000);
        let bob: Vec<_> = sim
            .inbox(2, "bob")
            .into_iter()
            .chain(sim.inbox(1, "bob"))
            .filter(|m| m.content == "news")
            .collect();
        assert_eq!(
            bob.len(),
            1,
            "bob got the broadcast once (reach_new_first = {reach_new_first})"
        );
        assert_eq!(sim.inbox(2, "carol").len(), 1);
    }
}
