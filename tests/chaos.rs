//! The chaos suite: real brokers, a steady workload, seeded faults, and a checker over the
//! complete history. See docs/testing.md.
//!
//! 1. Start N brokers on distinct loopback addresses, every peer link through a proxy.
//! 2. Register agents everywhere; they send direct messages and broadcasts at a fixed rate and
//!    read everything sent to them; every acknowledgement and delivery is recorded.
//! 3. Play the fault schedule (printed with its seed; the same seed replays it).
//! 4. Heal everything, let the outboxes drain, check: lost, duplicated, reordered, unexpected,
//!    registry disagreement; measure latencies, outbox peak and drain, links.
//! 5. Write history, schedule and summary to `<target tmp>/chaos-<seed>/`; fail on any anomaly.
//!
//! `cargo nextest run --test chaos` runs the short mix (every nemesis once). The long run:
//! `IPC_MESH_CHAOS_SECS=600 cargo test --release --test chaos -- --ignored --nocapture`.

mod support;

#[path = "chaos/checker.rs"]
mod checker;
#[path = "chaos/cluster.rs"]
mod cluster;
#[path = "chaos/nemesis.rs"]
mod nemesis;
#[path = "chaos/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use federation::AgentName;
use ipc_mesh::client::Client;
use ipc_mesh::home::Home;
use ipc_mesh::protocol::{Outgoing, Reply};

use checker::{check, Delivered, History, Sent};
use cluster::Cluster;
use nemesis::{Fault, Step};
use workload::Workload;

struct Run {
    seed: u64,
    brokers: usize,
    per_broker: usize,
    rate: f64,
    outbox_max: u64,
    schedule: Vec<Step>,
}

fn seed() -> u64 {
    std::env::var("IPC_MESH_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_seeded_mix_of_every_nemesis() {
    let seed = seed();
    let (brokers, per_broker) = (3, 2);
    run(Run {
        seed,
        brokers,
        per_broker,
        rate: 4.0,
        outbox_max: 400,
        schedule: nemesis::every_kind(seed, brokers, brokers * per_broker),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: set IPC_MESH_CHAOS_SECS and run with --ignored"]
async fn long_run() {
    let seed = seed();
    let secs: u64 = std::env::var("IPC_MESH_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let (brokers, per_broker) = (4, 2);
    run(Run {
        seed,
        brokers,
        per_broker,
        rate: 5.0,
        outbox_max: 2_000,
        schedule: nemesis::random(seed, brokers, brokers * per_broker, secs * 1000),
    })
    .await;
}

async fn run(r: Run) {
    let out_dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{}", r.seed));
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut schedule_text = format!("seed {}\n", r.seed);
    for s in &r.schedule {
        let _ = writeln!(
            schedule_text,
            "t={:>7}ms hold {:>5}ms {:?}",
            s.at_ms, s.hold_ms, s.fault
        );
    }
    eprintln!(
        "chaos seed {} (rerun with IPC_MESH_CHAOS_SEED={})\n{schedule_text}",
        r.seed, r.seed
    );
    std::fs::write(out_dir.join("schedule.txt"), &schedule_text).unwrap();

    let mut cluster = Cluster::start(r.brokers, r.outbox_max);
    cluster.wait_full_mesh(Duration::from_secs(20));
    let agent_home = support::temp_home();
    let home = Home::at(agent_home.path());
    let w = Workload::start(
        cluster.addrs.clone(),
        home.clone(),
        r.per_broker,
        r.rate,
        r.seed,
    )
    .await;
    // Every agent known everywhere before faults start.
    let n_agents = w.agents.len();
    support::eventually(Duration::from_secs(10), "registry formed", || {
        (0..cluster.len()).all(|i| {
            cluster.status(i)["agents"]
                .as_array()
                .is_some_and(|a| a.len() >= n_agents)
        })
    });

    // Outbox depth, sampled.
    let samples: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (addrs, homes): (Vec<String>, Vec<std::path::PathBuf>) = (
            cluster.addrs.clone(),
            cluster
                .homes
                .iter()
                .map(|h| h.path().to_path_buf())
                .collect(),
        );
        let (samples, sampling, started) = (samples.clone(), sampling.clone(), w.started);
        std::thread::spawn(move || {
            while sampling.load(Ordering::SeqCst) {
                let mut total = 0;
                for (a, h) in addrs.iter().zip(&homes) {
                    let v = support::status_json(h, a);
                    total += v["peers"].as_array().map_or(0, |ps| {
                        ps.iter()
                            .map(|p| p["outbox"].as_u64().unwrap_or(0))
                            .sum::<u64>()
                    });
                }
                samples
                    .lock()
                    .unwrap()
                    .push((started.elapsed().as_millis() as u64, total));
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };

    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut windows: Vec<(u64, u64)> = Vec::new();
    for step in &r.schedule {
        let wait = step.at_ms.saturating_sub(w.ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let t0 = w.ms();
        eprintln!("t={t0:>7}ms {:?}", step.fault);
        *faults.entry(step.fault.kind()).or_default() += 1;
        apply(&mut cluster, &w, &step.fault, step.hold_ms, &home).await;
        cluster.heal();
        windows.push((t0, w.ms()));
    }
    let healed_at = w.ms();
    let converge = Instant::now();
    cluster.heal();
    cluster.wait_full_mesh(Duration::from_secs(60));
    let (history, drained) = w.finish(Duration::from_secs(120)).await;
    sampling.store(false, Ordering::SeqCst);
    let _ = sampler.join();

    // Registries agree.
    let views: Vec<Vec<(String, String)>> = (0..cluster.len())
        .map(|i| {
            let mut v: Vec<(String, String)> = cluster.status(i)["agents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    (
                        a["name"].as_str().unwrap().to_string(),
                        a["broker"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            v.sort();
            v
        })
        .collect();
    let disagree = views.windows(2).filter(|w| w[0] != w[1]).count();
    let converged_in = converge.elapsed();

    let report = check(&history);
    let links: (u64, u64) = (0..cluster.len()).fold((0, 0), |acc, i| {
        let m = &cluster.status(i)["mesh"];
        (
            acc.0 + m["links_opened"].as_u64().unwrap_or(0),
            acc.1 + m["links_closed"].as_u64().unwrap_or(0),
        )
    });
    let (during, after) = latencies(&history, &windows);
    let samples = samples.lock().unwrap().clone();
    let peak = samples.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let drain_ms = samples
        .iter()
        .filter(|(t, n)| *t >= healed_at && *n == 0)
        .map(|(t, _)| t - healed_at)
        .next();

    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "chaos run, seed {}: {} brokers, {} agents, {} faults",
        r.seed,
        r.brokers,
        n_agents,
        r.schedule.len()
    );
    let _ = writeln!(summary, "  acknowledged   {:>7}", history.acked.len());
    let _ = writeln!(summary, "  delivered      {:>7}", history.delivered.len());
    let _ = writeln!(summary, "  lost           {:>7}", report.lost.len());
    let _ = writeln!(summary, "  duplicated     {:>7}", report.duplicated.len());
    let _ = writeln!(summary, "  reordered      {:>7}", report.reordered.len());
    let _ = writeln!(summary, "  unexpected     {:>7}", report.unexpected.len());
    let _ = writeln!(summary, "  registry views that disagree {disagree}");
    let _ = writeln!(
        summary,
        "  faults: {}",
        faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        summary,
        "  converged {} ms after the last heal; every acknowledged message in {} ms",
        converged_in.as_millis(),
        drained.as_millis()
    );
    let _ = writeln!(summary, "  delivery latency during faults: {during}");
    let _ = writeln!(summary, "  delivery latency otherwise:     {after}");
    let _ = writeln!(
        summary,
        "  outbox peak {peak} messages; drained {} after the last heal",
        drain_ms.map_or("(not within the run)".to_string(), |d| format!("{d} ms"))
    );
    let _ = writeln!(
        summary,
        "  links opened {} / closed {} (both ends counted)",
        links.0, links.1
    );
    eprintln!("{summary}");
    std::fs::write(out_dir.join("summary.txt"), &summary).unwrap();
    std::fs::write(
        out_dir.join("history.json"),
        serde_json::to_string(&history_json(&history)).unwrap(),
    )
    .unwrap();
    eprintln!("history, schedule and summary in {}", out_dir.display());

    assert!(
        report.ok(),
        "anomalies (seed {}): lost {:?} duplicated {:?} reordered {:?} unexpected {:?}",
        r.seed,
        first(&report.lost),
        first(&report.duplicated),
        first(&report.reordered),
        first(&report.unexpected)
    );
    assert_eq!(disagree, 0, "registries disagree: {views:?}");
    assert!(history.acked.len() > 100, "the workload ran");
}

fn first<T: std::fmt::Debug>(v: &[T]) -> &[T] {
    &v[..v.len().min(5)]
}

fn history_json(h: &History) -> serde_json::Value {
    serde_json::json!({ "agents": h.agents, "acked": h.acked, "delivered": h.delivered, "attempted": h.attempted.len() })
}

/// Delivery latency percentiles (ms) of direct messages sent during a fault window, and not.
fn latencies(h: &History, windows: &[(u64, u64)]) -> (String, String) {
    let sent: std::collections::HashMap<&str, &Sent> =
        h.acked.iter().map(|s| (s.content.as_str(), s)).collect();
    let (mut during, mut after) = (Vec::new(), Vec::new());
    for d in &h.delivered {
        let Some(s) = sent.get(d.content.as_str()) else {
            continue;
        };
        if s.to.is_none() {
            continue;
        }
        let lat = d.at_ms.saturating_sub(s.at_ms);
        if windows.iter().any(|(a, b)| s.at_ms >= *a && s.at_ms <= *b) {
            during.push(lat);
        } else {
            after.push(lat);
        }
    }
    (pcts(&mut during), pcts(&mut after))
}

fn pcts(v: &mut [u64]) -> String {
    if v.is_empty() {
        return "(none)".into();
    }
    v.sort_unstable();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    format!(
        "p50 {} p90 {} p99 {} max {} (n={})",
        p(0.5),
        p(0.9),
        p(0.99),
        v[v.len() - 1],
        v.len()
    )
}

async fn apply(c: &mut Cluster, w: &Workload, fault: &Fault, hold_ms: u64, home: &Home) {
    let hold = Duration::from_millis(hold_ms);
    match fault {
        Fault::PartitionHalves(l, r) => {
            c.partition(l, r);
            tokio::time::sleep(hold).await;
        }
        Fault::Isolate(b) => {
            let others: Vec<usize> = (0..c.len()).filter(|i| i != b).collect();
            c.partition(&[*b], &others);
            tokio::time::sleep(hold).await;
        }
        Fault::OneWay(a, b) => {
            c.one_way(*a, *b);
            tokio::time::sleep(hold).await;
        }
        Fault::Kill(b) => {
            c.kill9(*b);
            tokio::time::sleep(hold).await;
            c.restart(*b);
        }
        Fault::Pause(b) => {
            c.pause(*b);
            tokio::time::sleep(hold).await;
            c.resume(*b);
        }
        Fault::Flap(b) => {
            let end = Instant::now() + hold;
            while Instant::now() < end {
                c.reset_links(*b);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Fault::Delay(ms) => {
            c.set_delay(Duration::from_millis(*ms));
            tokio::time::sleep(hold).await;
        }
        Fault::Move(agent, to) => {
            w.agents[*agent].broker.store(*to, Ordering::SeqCst);
            tokio::time::sleep(hold).await;
        }
        Fault::FullOutbox(b) => {
            let others: Vec<usize> = (0..c.len()).filter(|i| i != b).collect();
            c.partition(&[*b], &others);
            tokio::time::sleep(Duration::from_millis(3_500)).await;
            // A flooder on another broker fills that broker's outbox for `b` to its bound.
            let from = others[0];
            let to_agent = w
                .agents
                .iter()
                .find(|a| a.broker.load(Ordering::SeqCst) == *b)
                .map(|a| a.name.clone());
            if let Some(to) = to_agent {
                flood(&c.addrs[from], home, &to, w, hold).await;
            }
            tokio::time::sleep(hold).await;
        }
    }
}

/// Sends to `to` until the outbox says it is full (or `within` passes); records what was
/// acknowledged.
async fn flood(addr: &str, home: &Home, to: &str, w: &Workload, within: Duration) {
    let name = format!("flood{}", w.ms());
    let Ok(mut c) = Client::connect(addr).await else {
        return;
    };
    if c.register_as(&AgentName::new(name.clone()).unwrap(), home)
        .await
        .is_err()
    {
        return;
    }
    let end = Instant::now() + within + Duration::from_secs(10);
    let mut seq = 0;
    while Instant::now() < end {
        seq += 1;
        let content = format!("{name}:{seq}");
        w.history.lock().unwrap().attempted.insert(content.clone());
        match c
            .send(Outgoing {
                to: to.into(),
                content: content.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(Reply::Sent { id, .. }) => w.history.lock().unwrap().acked.push(Sent {
                from: name.clone(),
                to: Some(to.into()),
                content,
                seq,
                id,
                at_ms: w.ms(),
            }),
            Err(e) => {
                eprintln!("flooder stopped after {} sends: {e}", seq - 1);
                assert!(
                    e.to_string().contains("outbox is full"),
                    "a full outbox is a clear error: {e}"
                );
                return;
            }
            Ok(other) => panic!("{other:?}"),
        }
    }
}

#[test]
fn the_checker_reports_each_kind_of_anomaly() {
    let sent = |from: &str, to: &str, seq: u64| Sent {
        from: from.into(),
        to: Some(to.into()),
        content: format!("{from}:{seq}"),
        seq,
        id: format!("x:{seq}"),
        at_ms: 0,
    };
    let got = |to: &str, from: &str, seq: u64| Delivered {
        to: to.into(),
        from: from.into(),
        content: format!("{from}:{seq}"),
        id: format!("x:{seq}"),
        at_ms: 0,
    };
    let base = History {
        agents: vec!["a".into(), "b".into()],
        acked: vec![sent("a", "b", 1), sent("a", "b", 2), sent("a", "b", 3)],
        attempted: ["a:1", "a:2", "a:3"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        delivered: vec![got("b", "a", 1), got("b", "a", 2), got("b", "a", 3)],
    };
    assert!(check(&base).ok());

    let mut lost = base.clone();
    lost.delivered.remove(1);
    assert_eq!(
        check(&lost).lost,
        vec![("b".to_string(), "a:2".to_string())]
    );

    let mut dup = base.clone();
    dup.delivered.push(got("b", "a", 3));
    assert_eq!(
        check(&dup).duplicated,
        vec![("b".to_string(), "a:3".to_string())]
    );

    let mut reordered = base.clone();
    reordered.delivered.swap(0, 2);
    assert!(!check(&reordered).reordered.is_empty());

    let mut unexpected = base.clone();
    unexpected.delivered.push(got("b", "a", 99));
    assert_eq!(
        check(&unexpected).unexpected,
        vec![("b".to_string(), "a:99".to_string())]
    );

    // A broadcast must reach every other agent once.
    let mut bcast = base.clone();
    bcast.acked.push(Sent {
        to: None,
        content: "a:4:b".into(),
        seq: 4,
        ..sent("a", "b", 4)
    });
    assert_eq!(
        check(&bcast).lost,
        vec![("b".to_string(), "a:4:b".to_string())]
    );
}
