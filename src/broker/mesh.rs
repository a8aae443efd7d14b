//! Starting the broker's mesh node, and hearing from it.
//!
//! 1. The node is configured from `mesh.toml`: this broker's id and advertised address, the
//!    seeds (`[mesh] peers` and `--peer`), the sibling ports on this host, the secret.
//! 2. The driver runs it over TCP; peer connections arrive on the broker's own port and are
//!    handed over by the session once their hello says `Peer`.
//! 3. Notices from the node (names lost to other brokers) come back to the broker here.

use std::net::SocketAddr;
use std::sync::Arc;

use federation::driver::{self, Handle, Notice};
use federation::link::{Encrypt, InboundLimit, LinkConfig};
use federation::node::{Node, NodeConfig, Timing};
use federation::transport::TcpDialer;
use tokio::sync::mpsc;

use super::{Broker, BrokerTasks};
use crate::config::{self, Config};
use crate::error::{Error, Result};

/// Checks what must hold before a broker may listen on `listen` at all.
pub fn check_exposure(config: &Config, listen: SocketAddr) -> Result<()> {
    if !listen.ip().is_loopback() && config::load_secret(&config.mesh)?.is_none() {
        return Err(Error::Config(format!(
            "refusing to listen on {listen}: beyond loopback a mesh secret is required \
             (set [mesh] secret_file in mesh.toml, or IPC_MESH_SECRET)"
        )));
    }
    if !listen.ip().is_loopback() && config.mesh.encrypt == Encrypt::Never {
        return Err(Error::Config(format!(
            "refusing to listen on {listen} with [mesh] encrypt = \"never\": peer links \
             beyond loopback must be encrypted (use \"auto\", the default)"
        )));
    }
    Ok(())
}

/// Sibling broker addresses on this host: the other ports of the sibling range, when this
/// broker's own port is in it (a broker on another port is not part of the local family).
pub fn siblings(config: &Config, listen: SocketAddr) -> Vec<String> {
    let (lo, hi) = config.mesh.sibling_ports;
    if !(lo..=hi).contains(&listen.port()) {
        return Vec::new();
    }
    let ip = if listen.ip().is_unspecified() {
        "127.0.0.1".parse().expect("valid")
    } else {
        listen.ip()
    };
    (lo..=hi)
        .filter(|p| *p != listen.port())
        .map(|p| SocketAddr::new(ip, p).to_string())
        .collect()
}

/// Starts the node for `broker` and attaches it.
pub fn start(
    broker: &Broker,
    config: &Config,
    listen: SocketAddr,
    tasks: &BrokerTasks,
) -> Result<Handle> {
    let secret = config::load_secret(&config.mesh)?;
    let links = LinkConfig {
        encrypt: config.mesh.encrypt,
        plain_loopback: config.mesh.plain_loopback,
        secret: secret.clone(),
        limit: InboundLimit {
            bytes_per_sec: config.limits.peer_bytes_per_sec,
            frames_per_sec: config.limits.peer_frames_per_sec,
        },
        ..LinkConfig::plain()
    };
    let advertise = config
        .broker
        .advertise
        .clone()
        .unwrap_or_else(|| listen.to_string());
    let node = Node::new(NodeConfig {
        id: broker.id(),
        advertise,
        // Configured peers, and every broker linked with before (so a restart rejoins even
        // if the configured seed is the one that is down).
        seeds: {
            let mut seeds = config.mesh.peers.clone();
            for m in broker.members() {
                if !seeds.contains(&m) {
                    seeds.push(m);
                }
            }
            seeds
        },
        siblings: siblings(config, listen),
        secret,
        timing: Timing::default(),
        retention_ms: config.limits.retention.as_millis() as u64,
        rng_seed: rand::random(),
        started_ms: driver::now_ms(),
    });
    let (tx, mut rx) = mpsc::channel::<Notice>(1024);
    let handle = driver::spawn_with(
        node,
        Arc::new(TcpDialer {
            bind: (!listen.ip().is_unspecified()).then_some(listen.ip()),
            ..TcpDialer::default()
        }),
        Arc::new(super::delivery::Store(broker.clone())),
        tx,
        tasks.cancel.clone(),
        &tasks.tracker,
        links,
    );
    broker.attach_mesh(handle.clone());
    let b = broker.clone();
    let cancel = tasks.cancel.clone();
    tasks.tracker.spawn(async move {
        // Held messages are checked against the registry every second.
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                n = rx.recv() => match n {
                    Some(Notice::Superseded(s)) => b.name_superseded(s),
                    Some(Notice::PeerUp { id, addr }) => b.member_seen(id, &addr),
                    Some(_) => {}
                    None => return,
                },
                _ = every.tick() => {
                    b.forward_held();
                    b.give_up_overdue_fences();
                }
                _ = cancel.cancelled() => return,
            }
        }
    });
    Ok(handle)
}
