//! Two brokers in two network namespaces joined by a veth pair: the mesh across real
//! interfaces, and a link cut by taking an interface down.
//!
//! Needs root and `ip` (iproute2). Where namespaces cannot be created, the test says so
//! plainly and passes only if IPC_MESH_ALLOW_NO_NETNS=1; otherwise it fails, so a CI machine
//! that silently lost the ability is noticed.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// The namespaces and veth pair of one test run, removed on drop.
struct Hosts {
    a: String,
    b: String,
    veth_a: String,
}

const IP_A: &str = "10.213.7.1";
const IP_B: &str = "10.213.7.2";

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    fn create() -> Result<Hosts, String> {
        let tag = std::process::id() % 100_000;
        let h = Hosts {
            a: format!("ipcm-a{tag}"),
            b: format!("ipcm-b{tag}"),
            veth_a: format!("ipcmva{tag}"),
        };
        let veth_b = format!("ipcmvb{tag}");
        sh(&["ip", "netns", "add", &h.a])?;
        sh(&["ip", "netns", "add", &h.b])?;
        sh(&[
            "ip", "link", "add", &h.veth_a, "type", "veth", "peer", "name", &veth_b,
        ])?;
        sh(&["ip", "link", "set", &h.veth_a, "netns", &h.a])?;
        sh(&["ip", "link", "set", &veth_b, "netns", &h.b])?;
        for (ns, dev, ip) in [(&h.a, &h.veth_a, IP_A), (&h.b, &veth_b, IP_B)] {
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "ip",
                "addr",
                "add",
                &format!("{ip}/30"),
                "dev",
                dev,
            ])?;
            sh(&["ip", "netns", "exec", ns, "ip", "link", "set", dev, "up"])?;
            sh(&["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    fn link(&self, up: bool) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.a,
            "ip",
            "link",
            "set",
            &self.veth_a,
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.a]);
        let _ = sh(&["ip", "netns", "del", &self.b]);
    }
}

/// A broker process inside a namespace.
struct NsBroker {
    child: std::process::Child,
}

impl Drop for NsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SECRET: &str = "netns test secret, long enough";

fn start(ns: &str, home: &std::path::Path, listen: &str, peer: Option<&str>) -> NsBroker {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        BIN,
        "--home",
        home.to_str().unwrap(),
        "broker",
        "--listen",
        listen,
    ]);
    if let Some(p) = peer {
        cmd.args(["--peer", p]);
    }
    let log = std::fs::File::create(home.join("broker.log")).unwrap();
    let child = cmd
        .env("IPC_MESH_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    NsBroker { child }
}

fn in_ns(ns: &str, home: &std::path::Path, broker: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            BIN,
            "--home",
            home.to_str().unwrap(),
            "--broker",
            broker,
        ])
        .args(args)
        .env("IPC_MESH_SECRET", SECRET)
        .output()
        .unwrap()
}

fn ns_peers_up(ns: &str, home: &std::path::Path, broker: &str) -> usize {
    let out = in_ns(ns, home, broker, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["state"] == "up").count())
}

#[test]
fn the_mesh_works_across_real_interfaces_and_heals_after_a_cut() {
    let hosts = match Hosts::create() {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "CANNOT CREATE NETWORK NAMESPACES HERE ({e}); this test needs root and iproute2"
            );
            assert!(
                std::env::var_os("IPC_MESH_ALLOW_NO_NETNS").is_some(),
                "network namespaces unavailable: {e}"
            );
            return;
        }
    };
    let (ha, hb) = (temp_home(), temp_home());
    let a_addr = format!("{IP_A}:9876");
    let b_addr = format!("{IP_B}:9876");
    let _a = start(&hosts.a, ha.path(), &a_addr, None);
    let _b = start(&hosts.b, hb.path(), &b_addr, Some(&a_addr));

    eventually(
        Duration::from_secs(20),
        "link up across the veth pair",
        || {
            ns_peers_up(&hosts.a, ha.path(), &a_addr) == 1
                && ns_peers_up(&hosts.b, hb.path(), &b_addr) == 1
        },
    );
    // Beyond loopback, a broker with a secret encrypts its peer links by default.
    let out = in_ns(&hosts.a, ha.path(), &a_addr, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        v["peers"][0]["encrypted"],
        serde_json::json!(true),
        "the link across real interfaces is encrypted: {v}"
    );
    let out = in_ns(
        &hosts.a,
        ha.path(),
        &a_addr,
        &["check", "--as", "netns-agent"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(5),
        "agent listed on the other host",
        || {
            let out = in_ns(&hosts.b, hb.path(), &b_addr, &["list", "--json"]);
            String::from_utf8_lossy(&out.stdout).contains("netns-agent")
        },
    );

    // Cut the wire: heartbeats stop, both sides mark the link down.
    hosts.link(false);
    let took = eventually(Duration::from_secs(15), "cut detected", || {
        ns_peers_up(&hosts.a, ha.path(), &a_addr) == 0
            && ns_peers_up(&hosts.b, hb.path(), &b_addr) == 0
    });
    eprintln!("cut detected after {took:?}");
    hosts.link(true);
    eventually(Duration::from_secs(30), "healed", || {
        ns_peers_up(&hosts.a, ha.path(), &a_addr) == 1
            && ns_peers_up(&hosts.b, hb.path(), &b_addr) == 1
    });
}
