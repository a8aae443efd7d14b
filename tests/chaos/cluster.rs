//! The brokers under test: real processes on 127.0.0.2, .3, …, every peer link through a
//! fault-injecting proxy (each broker advertises its proxy, and dials from its own address, so
//! the proxies can tell who is calling).

use std::time::Duration;

use crate::support::proxy::{Dir, Proxy};
use crate::support::*;

pub struct Cluster {
    pub ips: Vec<String>,
    pub addrs: Vec<String>,
    pub homes: Vec<tempfile::TempDir>,
    pub brokers: Vec<BrokerProc>,
    pub proxies: Vec<Proxy>,
    pub paused: Vec<bool>,
}

impl Cluster {
    pub fn start(n: usize, outbox_max: u64) -> Cluster {
        let ips: Vec<String> = (0..n).map(|i| format!("127.0.0.{}", 2 + i)).collect();
        let addrs: Vec<String> = ips
            .iter()
            .map(|ip| format!("{ip}:{}", free_port(ip)))
            .collect();
        let proxies: Vec<Proxy> = addrs.iter().map(|a| Proxy::start("127.0.0.1", a)).collect();
        let homes: Vec<tempfile::TempDir> = (0..n).map(|_| temp_home()).collect();
        let mut brokers = Vec::new();
        for i in 0..n {
            let cfg = homes[i].path().join("mesh.toml");
            std::fs::write(
                &cfg,
                format!("[broker]\nadvertise = {:?}\n[limits]\noutbox_max = {outbox_max}\nrate_per_sec = 0\ninbox_max = 1000000\n", proxies[i].addr),
            )
            .unwrap();
            let cfg = cfg.to_str().unwrap().to_string();
            let seed = proxies[0].addr.clone();
            let peer_args: Vec<&str> = if i == 0 {
                vec![]
            } else {
                vec!["--peer", &seed]
            };
            brokers.push(BrokerProc::start_full(
                homes[i].path(),
                &addrs[i],
                &["--config", &cfg],
                &peer_args,
            ));
        }
        Cluster {
            ips,
            addrs,
            homes,
            brokers,
            proxies,
            paused: vec![false; n],
        }
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn full_mesh(&self) -> bool {
        (0..self.len())
            .all(|i| peers_up(self.homes[i].path(), &self.addrs[i]).len() == self.len() - 1)
    }

    pub fn wait_full_mesh(&self, within: Duration) -> Duration {
        eventually(within, "full mesh", || self.full_mesh())
    }

    /// Cuts every link between the groups.
    pub fn partition(&self, left: &[usize], right: &[usize]) {
        for &a in left {
            for &b in right {
                self.proxies[b].block_from(&self.ips[a]);
                self.proxies[a].block_from(&self.ips[b]);
            }
        }
    }

    /// Bytes from `a` to `b` stop flowing (both on links `a` dialled and links `b` dialled).
    pub fn one_way(&self, a: usize, b: usize) {
        self.proxies[b].hold_from(&self.ips[a], Dir::Up);
        self.proxies[a].hold_from(&self.ips[b], Dir::Down);
    }

    /// Drops the connections of every link of `a`, mid-frame if traffic is flowing.
    pub fn reset_links(&self, a: usize) {
        self.proxies[a].reset();
        for (i, p) in self.proxies.iter().enumerate() {
            if i != a {
                p.reset_from(&self.ips[a]);
            }
        }
    }

    pub fn set_delay(&self, d: Duration) {
        for p in &self.proxies {
            p.set_delay(d);
        }
    }

    pub fn heal(&mut self) {
        for p in &self.proxies {
            p.heal();
            p.set_delay(Duration::ZERO);
        }
        for i in 0..self.len() {
            if self.paused[i] {
                self.resume(i);
            }
            if self.brokers[i].child.is_none() {
                self.brokers[i].restart();
            }
        }
    }

    pub fn kill9(&mut self, i: usize) {
        self.brokers[i].kill9();
    }

    pub fn restart(&mut self, i: usize) {
        if self.brokers[i].child.is_none() {
            self.brokers[i].restart();
        }
    }

    pub fn pause(&mut self, i: usize) {
        if let Some(c) = &self.brokers[i].child {
            unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
            self.paused[i] = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        if let Some(c) = &self.brokers[i].child {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.paused[i] = false;
    }

    /// `status --json` of broker `i` (Null if it does not answer).
    pub fn status(&self, i: usize) -> serde_json::Value {
        status_json(self.homes[i].path(), &self.addrs[i])
    }
}
