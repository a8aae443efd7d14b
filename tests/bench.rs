//! `ipc-mesh bench` end to end: each scenario at a tiny size through the real binary.
//!
//! Every test gives the bench its own `$TMPDIR`, so afterwards it can check that the bench left
//! no directory there and no process whose command line names it (the bench's brokers run
//! with `--home` inside it). No test asserts a speed: only that the figures are well-formed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ipc-mesh");

/// Runs `ipc-mesh <args>` with `$TMPDIR` set to `tmp`; insists on success; returns stdout.
fn bench(tmp: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("TMPDIR", tmp)
        .env_remove("IPC_MESH_BROKER")
        .env_remove("IPC_MESH_HOME")
        .env("HOME", tmp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ipc-mesh {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Parses the one JSON object and checks each field is a positive number.
fn fields(stdout: &str, names: &[&str]) -> serde_json::Value {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one JSON object expected, got: {stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for name in names {
        let x = v[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} missing or not a number in {v}"));
        assert!(x > 0.0, "{name} = {x} should be positive in {v}");
    }
    v
}

/// No directory left in `tmp`, and no live process naming it.
fn assert_clean(tmp: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the bench left {left:?} in {}",
        tmp.display()
    );
    let needle = tmp.to_string_lossy().to_string();
    // A broker gets a bounded moment to finish exiting after SIGTERM was answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = processes_naming(&needle);
        if procs.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind: {procs:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        // A zombie has an empty command line; it is gone once reaped.
        if cmd.contains(needle) {
            found.push(format!("{}: {cmd}", name.to_string_lossy()));
        }
    }
    found
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ipc-mesh-benchtest")
        .tempdir()
        .unwrap()
}

#[test]
fn throughput_reports_rates_and_memory_and_cleans_up() {
    let t = tmp();
    let out = bench(
        t.path(),
        &[
            "bench",
            "throughput",
            "--messages",
            "300",
            "--senders",
            "3",
            "--recipients",
            "2",
            "--window",
            "16",
            "--size",
            "64",
            "--json",
        ],
    );
    let v = fields(
        &out,
        &[
            "acked_per_sec",
            "delivered_per_sec",
            "messages",
            "size",
            "brokers",
            "rss_mib",
            "rss_idle_mib",
        ],
    );
    assert_eq!(v["messages"], 300);
    assert_eq!(v["size"], 64);
    assert_eq!(v["brokers"], 1);
    assert_clean(t.path());
}

#[test]
fn latency_reports_percentiles_and_cleans_up() {
    let t = tmp();
    let out = bench(
        t.path(),
        &[
            "bench",
            "latency",
            "--rate",
            "200",
            "--duration",
            "500ms",
            "--json",
        ],
    );
    let v = fields(
        &out,
        &[
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "p999_ms",
            "max_ms",
            "rate",
            "ack_p50_ms",
            "ack_p99_ms",
        ],
    );
    assert_eq!(v["rate"], 200);
    assert_eq!(v["messages"], 100);
    let (p50, p99, max) = (
        v["p50_ms"].as_f64(),
        v["p99_ms"].as_f64(),
        v["max_ms"].as_f64(),
    );
    assert!(p50 <= p99 && p99 <= max, "percentiles out of order: {v}");
    assert_clean(t.path());
}

#[test]
fn baseline_reports_the_machine_limits_and_cleans_up() {
    let t = tmp();
    let out = bench(t.path(), &["bench", "baseline", "--ops", "300", "--json"]);
    fields(
        &out,
        &[
            "tcp_rtt_p50_ms",
            "tcp_pipelined_per_sec",
            "sled_flush100_per_sec",
            "sled_flush1000_per_sec",
        ],
    );
    assert_clean(t.path());
}

#[test]
fn runs_report_medians_with_min_and_max() {
    let t = tmp();
    let out = bench(
        t.path(),
        &[
            "bench",
            "throughput",
            "--messages",
            "50",
            "--runs",
            "3",
            "--json",
        ],
    );
    let v = fields(&out, &["acked_per_sec", "delivered_per_sec"]);
    assert_eq!(v["runs"], 3);
    let (min, med, max) = (
        v["min"]["acked_per_sec"].as_f64().unwrap(),
        v["acked_per_sec"].as_f64().unwrap(),
        v["max"]["acked_per_sec"].as_f64().unwrap(),
    );
    assert!(min <= med && med <= max, "{v}");
    assert_clean(t.path());
}

#[test]
fn the_human_table_names_every_field() {
    let t = tmp();
    let out = bench(t.path(), &["bench", "throughput", "--messages", "20"]);
    for name in [
        "acked_per_sec",
        "delivered_per_sec",
        "messages",
        "size",
        "brokers",
    ] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
    assert_clean(t.path());
}

#[test]
fn a_running_broker_is_measured_and_left_running() {
    let t = tmp();
    let home = t.path().join("home");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut broker = Command::new(BIN)
        .arg("--home")
        .arg(&home)
        .args(["broker", "--listen", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "broker never listened");
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = bench(
        t.path(),
        &[
            "--broker",
            &addr,
            "bench",
            "throughput",
            "--messages",
            "40",
            "--json",
        ],
    );
    let v = fields(&out, &["acked_per_sec", "delivered_per_sec"]);
    // The bench does not own this broker, so it cannot read its memory.
    assert!(v.get("rss_mib").is_none(), "{v}");
    assert!(
        broker.try_wait().unwrap().is_none(),
        "the bench must not stop a broker it did not start"
    );
    broker.kill().unwrap();
    broker.wait().unwrap();
}

#[test]
fn two_brokers_carry_throughput_and_latency_across_the_link_and_clean_up() {
    let t = tmp();
    let out = bench(
        t.path(),
        &[
            "bench",
            "throughput",
            "--brokers",
            "2",
            "--messages",
            "200",
            "--senders",
            "2",
            "--recipients",
            "2",
            "--json",
        ],
    );
    let v = fields(&out, &["acked_per_sec", "delivered_per_sec", "rss_mib"]);
    assert_eq!(v["brokers"], 2);
    let out = bench(
        t.path(),
        &[
            "bench",
            "latency",
            "--brokers",
            "2",
            "--rate",
            "100",
            "--duration",
            "500ms",
            "--json",
        ],
    );
    let v = fields(&out, &["p50_ms", "p99_ms", "max_ms", "rate"]);
    assert_eq!(v["brokers"], 2);
    assert_clean(t.path());
}

#[test]
fn too_many_brokers_are_refused_plainly() {
    let t = tmp();
    let out = Command::new(BIN)
        .args(["bench", "throughput", "--brokers", "11", "--messages", "10"])
        .env("TMPDIR", t.path())
        .env_remove("IPC_MESH_BROKER")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--brokers 11") && !err.contains("panicked"),
        "{err}"
    );
    assert_clean(t.path());
}

#[test]
fn ctrl_c_stops_and_removes_the_bench_brokers() {
    let t = tmp();
    let mut child = Command::new(BIN)
        .args(["bench", "throughput", "--messages", "10000000", "--json"])
        .env("TMPDIR", t.path())
        .env_remove("IPC_MESH_BROKER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until its broker is up (its home exists and a process names it), then interrupt.
    let needle = t.path().to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_naming(&needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the bench never started a broker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the bench ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_clean(t.path());
}

#[test]
fn registry_reports_formation_and_propagation_from_one_seed_and_cleans_up() {
    let t = tmp();
    let out = bench(
        t.path(),
        &[
            "bench",
            "registry",
            "--brokers",
            "3",
            "--registrations",
            "5",
            "--json",
        ],
    );
    let v = fields(
        &out,
        &[
            "formation_ms",
            "propagation_p50_ms",
            "propagation_p99_ms",
            "propagation_max_ms",
            "brokers",
            "registrations",
        ],
    );
    assert_eq!(v["brokers"], 3);
    assert_eq!(v["registrations"], 5);
    // Each of the 3 links is opened at least once, so the excess is never negative.
    let extra = v["extra_links"].as_f64().expect("extra_links is a number");
    assert!(extra >= 0.0, "extra_links = {extra} in {v}");
    assert_clean(t.path());
}

#[test]
fn failover_reports_kill_to_served_and_cleans_up() {
    let t = tmp();
    let out = bench(t.path(), &["bench", "failover", "--kills", "1", "--json"]);
    let v = fields(
        &out,
        &["failover_ms", "failover_min_ms", "failover_max_ms", "kills"],
    );
    assert_eq!(v["kills"], 1);
    assert_clean(t.path());
}

#[test]
fn drain_reports_backlog_memory_and_drain_rate_and_cleans_up() {
    let t = tmp();
    let out = bench(t.path(), &["bench", "drain", "--backlog", "200", "--json"]);
    let v = fields(
        &out,
        &[
            "backlog",
            "queued_per_sec",
            "drain_ms",
            "drain_per_sec",
            "rss_mib",
        ],
    );
    assert_eq!(v["backlog"], 200);
    assert_clean(t.path());
}

#[test]
fn scenarios_that_kill_brokers_refuse_a_running_one() {
    let t = tmp();
    let out = Command::new(BIN)
        .args([
            "--broker",
            "127.0.0.1:9",
            "bench",
            "failover",
            "--kills",
            "1",
        ])
        .env("TMPDIR", t.path())
        .env_remove("IPC_MESH_BROKER")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--broker") && !err.contains("panicked"),
        "{err}"
    );
    assert_clean(t.path());
}
