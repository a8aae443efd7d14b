//! The mesh with real broker processes on distinct loopback addresses.

mod support;

use std::time::Duration;

use support::*;

struct Three {
    homes: Vec<tempfile::TempDir>,
    addrs: Vec<String>,
    procs: Vec<BrokerProc>,
}

/// Three brokers on 127.0.0.2, .3 and .4; the second and third have the first as their seed.
fn three(extra: &[&str]) -> Three {
    let homes: Vec<_> = (0..3).map(|_| temp_home()).collect();
    let addrs: Vec<String> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| format!("{ip}:{}", free_port(ip)))
        .collect();
    let mut procs = vec![BrokerProc::start_with(homes[0].path(), &addrs[0], extra)];
    for i in 1..3 {
        procs.push(BrokerProc::start_full(
            homes[i].path(),
            &addrs[i],
            extra,
            &["--peer", &addrs[0]],
        ));
    }
    Three {
        homes,
        addrs,
        procs,
    }
}

impl Three {
    fn h(&self, i: usize) -> &std::path::Path {
        self.homes[i].path()
    }

    fn id(&self, i: usize) -> String {
        status_json(self.h(i), &self.addrs[i])["broker"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn full_mesh(&self) -> bool {
        (0..3).all(|i| {
            self.procs[i].child.is_none() || peers_up(self.h(i), &self.addrs[i]).len() == 2
        })
    }
}

#[test]
fn three_brokers_from_one_seed_form_a_mesh_and_share_agents() {
    let m = three(&[]);
    let took = eventually(Duration::from_secs(15), "full mesh", || m.full_mesh());
    eprintln!("full mesh of 3 in {took:?}");

    // An agent registered on one broker is listed by the other two, with its broker.
    cli_ok(m.h(0), &m.addrs[0], &["check", "--as", "alice"]);
    let id0 = m.id(0);
    for i in 1..3 {
        eventually(Duration::from_secs(5), "alice listed", || {
            let v: serde_json::Value =
                serde_json::from_str(&cli_ok(m.h(i), &m.addrs[i], &["list", "--json"])).unwrap();
            v["agents"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == "alice" && a["broker"] == id0.as_str())
        });
    }
    let human = cli_ok(m.h(0), &m.addrs[0], &["status"]);
    assert!(
        human.contains("IN FLIGHT") && human.contains(" up "),
        "{human}"
    );
    // Each pair keeps exactly one link.
    for i in 0..3 {
        let up = peers_up(m.h(i), &m.addrs[i]);
        let mut dedup = up.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(
            up.len(),
            dedup.len(),
            "broker {i} lists a peer twice: {up:?}"
        );
    }
}

#[test]
fn a_killed_broker_is_marked_down_and_heals_without_duplicate_links() {
    let mut m = three(&[]);
    eventually(Duration::from_secs(15), "full mesh", || m.full_mesh());
    let id2 = m.id(2);
    m.procs[2].kill9();
    let took = eventually(Duration::from_secs(10), "broker 3 marked down", || {
        (0..2).all(|i| !peers_up(m.h(i), &m.addrs[i]).contains(&id2))
    });
    eprintln!("failure detected in {took:?}");
    let v = status_json(m.h(0), &m.addrs[0]);
    let p = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id2.as_str())
        .unwrap()
        .clone();
    assert_ne!(p["state"], "up");

    m.procs[2].restart();
    eventually(Duration::from_secs(15), "healed", || m.full_mesh());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(m.full_mesh(), "still a full mesh after settling");
    for i in 0..3 {
        assert_eq!(peers_up(m.h(i), &m.addrs[i]).len(), 2);
    }
    // Links opened beyond one per pair stay small: the restart costs a couple, not a storm.
    let opened: u64 = (0..3)
        .map(|i| {
            status_json(m.h(i), &m.addrs[i])["mesh"]["links_opened"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(
        opened <= 2 * 3 + 6,
        "links opened (both ends counted): {opened}"
    );
}

#[test]
fn an_agent_moving_to_another_broker_updates_every_registry() {
    let m = three(&[]);
    eventually(Duration::from_secs(15), "full mesh", || m.full_mesh());
    let shared_home = temp_home();
    cli_ok(shared_home.path(), &m.addrs[0], &["check", "--as", "mover"]);
    // Without the token, the name is refused on another broker too.
    let err = cli_err(m.h(1), &m.addrs[1], &["check", "--as", "mover"]);
    assert!(err.contains("held by another agent"), "{err}");
    // With it (same home), the agent moves.
    cli_ok(shared_home.path(), &m.addrs[1], &["check", "--as", "mover"]);
    let id1 = m.id(1);
    for i in 0..3 {
        eventually(Duration::from_secs(5), "mover listed on broker 2", || {
            let v: serde_json::Value =
                serde_json::from_str(&cli_ok(m.h(i), &m.addrs[i], &["list", "--json"])).unwrap();
            let a: Vec<_> = v["agents"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["name"] == "mover")
                .collect();
            a.len() == 1 && a[0]["broker"] == id1.as_str()
        });
    }
}

#[test]
fn wrong_secrets_are_refused_and_shown() {
    let dir = temp_home();
    let write = |name: &str, text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("[mesh]\nsecret_file = {:?}\n", p)).unwrap();
        cfg.to_str().unwrap().to_string()
    };
    let right = write("right", "the right secret, long enough\n", 0o600);
    let wrong = write("wrong", "a different secret, long enough", 0o600);
    let (ha, hb) = (temp_home(), temp_home());
    let a_addr = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let b_addr = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let _a = BrokerProc::start_with(ha.path(), &a_addr, &["--config", &right]);
    let _b = BrokerProc::start_full(
        hb.path(),
        &b_addr,
        &["--config", &wrong],
        &["--peer", &a_addr],
    );
    eventually(Duration::from_secs(10), "refusal shown in status", || {
        let v = status_json(hb.path(), &b_addr);
        v["peers"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["refused"].as_str().is_some_and(|r| r.contains("secret")))
        })
    });
    assert!(peers_up(ha.path(), &a_addr).is_empty());
    eventually(
        Duration::from_secs(5),
        "refusal logged by the acceptor",
        || _a.log_text().contains("refused"),
    );

    // A secret file others can read is refused outright.
    let loose = write("loose", "a secret anyone can read, sadly", 0o644);
    let out = std::process::Command::new(BIN)
        .args([
            "--home",
            hb.path().to_str().unwrap(),
            "--config",
            &loose,
            "broker",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));

    // Beyond loopback without a secret: refuse to start.
    let out = std::process::Command::new(BIN)
        .args([
            "--home",
            hb.path().to_str().unwrap(),
            "broker",
            "--listen",
            "0.0.0.0:0",
        ])
        .env_remove("IPC_MESH_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("secret"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_paused_broker_is_detected_by_missed_heartbeats() {
    let m = three(&[]);
    eventually(Duration::from_secs(15), "full mesh", || m.full_mesh());
    let id2 = m.id(2);
    let pid = m.procs[2].pid() as i32;
    // SIGSTOP: the sockets stay open, nothing is answered; only heartbeats can tell.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let took = eventually(Duration::from_secs(15), "paused broker marked down", || {
        (0..2).all(|i| !peers_up(m.h(i), &m.addrs[i]).contains(&id2))
    });
    unsafe { libc::kill(pid, libc::SIGCONT) };
    eprintln!("failure detected after {took:?} of silence");
    eventually(Duration::from_secs(15), "back up after SIGCONT", || {
        m.full_mesh()
    });
}
