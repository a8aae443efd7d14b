//! The bench's own brokers: child processes in a temporary home, stopped and removed on drop.
//!
//! 1. Make one temporary directory (under `$TMPDIR`) holding a home per broker.
//! 2. Pick a free loopback port per broker and write each home's `mesh.toml`: that listen
//!    address, the other brokers as peers (or, with [`Seeds::First`], only the first), a sibling-port range of just its own port (so a
//!    bench broker never joins a real mesh on 9876–9885), and limits that stay out of the way
//!    (`rate_per_sec = 0` turns the per-agent rate limit off; a large `inbox_max`), so the
//!    figures measure the broker rather than its guard rails.
//! 3. Start `<this executable> --home <home> broker --listen <addr>` per broker, logs to a file
//!    in its home, and wait (bounded) until each answers a hello.
//! 4. On drop, whatever the reason (done, error, Ctrl-C unwinding the scenario): SIGTERM each
//!    broker, wait a bounded time, SIGKILL if needed, then remove the directory.
//!
//! The children also get `PR_SET_PDEATHSIG`, so they stop even if the bench itself is killed
//! with SIGKILL and never runs its drop.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::Connection;

/// How long a new broker may take to answer its first hello.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a broker may take to stop after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Large enough that no bench fills an inbox; the default (10,000) would refuse sends.
pub const BENCH_INBOX_MAX: usize = 100_000_000;
/// Large enough that `bench drain --backlog 1000000` fits in one peer's outbox; the default
/// (1,000,000) would refuse the last sends of it.
pub const BENCH_OUTBOX_MAX: u64 = 100_000_000;

/// Which peers each broker's `mesh.toml` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seeds {
    /// Every broker names every other one (a full mesh from the start).
    #[default]
    All,
    /// Every broker names only broker 0 (which names none): the rest of the mesh has to be
    /// learned, as when a fleet is started from one seed.
    First,
}

/// How the bench's brokers link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Links {
    /// No mesh secret: plaintext links (the default for loopback brokers).
    #[default]
    Plain,
    /// A fresh random mesh secret in a 0600 file, and `encrypt = "always"`: every peer link
    /// is encrypted although the brokers are on loopback.
    Encrypted,
}

/// Brokers started by the bench. Dropping it stops them and removes their homes.
pub struct LocalMesh {
    children: Vec<Child>,
    addrs: Vec<String>,
    homes: Vec<PathBuf>,
    root: Option<tempfile::TempDir>,
}

impl LocalMesh {
    /// Starts `n` brokers on free loopback ports, each naming every other as a peer, and waits
    /// until every one answers.
    pub async fn start(n: usize) -> anyhow::Result<LocalMesh> {
        LocalMesh::start_seeded(n, Seeds::All).await
    }

    /// [`LocalMesh::start`] with the peers each broker is given chosen by `seeds`.
    pub async fn start_seeded(n: usize, seeds: Seeds) -> anyhow::Result<LocalMesh> {
        LocalMesh::start_with(n, seeds, Links::Plain).await
    }

    /// [`LocalMesh::start_seeded`], with the links chosen by `links`.
    pub async fn start_with(n: usize, seeds: Seeds, links: Links) -> anyhow::Result<LocalMesh> {
        let root = tempfile::Builder::new()
            .prefix("ipc-mesh-bench-")
            .tempdir()
            .context("cannot create a temporary directory for the bench's brokers")?;
        let exe =
            std::env::current_exe().context("cannot find this executable to start brokers")?;
        let ports = (0..n)
            .map(|_| free_port())
            .collect::<std::io::Result<Vec<u16>>>()
            .context("cannot find a free loopback port")?;
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut mesh = LocalMesh {
            children: Vec::with_capacity(n),
            addrs: addrs.clone(),
            homes: Vec::with_capacity(n),
            root: None,
        };
        let secret_file = match links {
            Links::Plain => None,
            Links::Encrypted => Some(write_secret(root.path())?),
        };
        for (i, port) in ports.iter().enumerate() {
            let home = root.path().join(format!("broker{i}"));
            fs::create_dir_all(&home)?;
            let peers: Vec<&String> = match seeds {
                Seeds::All => addrs.iter().filter(|a| **a != addrs[i]).collect(),
                Seeds::First if i == 0 => Vec::new(),
                Seeds::First => vec![&addrs[0]],
            };
            fs::write(
                home.join("mesh.toml"),
                config_text(&addrs[i], *port, &peers, secret_file.as_deref()),
            )?;
            mesh.homes.push(home);
        }
        // From here on, dropping `mesh` cleans up whatever was started.
        mesh.root = Some(root);
        for i in 0..n {
            let child = spawn_broker(&exe, &mesh.homes[i], &mesh.addrs[i])?;
            mesh.children.push(child);
        }
        for i in 0..n {
            mesh.wait_ready(i).await?;
        }
        Ok(mesh)
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.children[i].id()
    }

    /// Broker `i`'s home.
    pub fn home(&self, i: usize) -> &Path {
        &self.homes[i]
    }

    /// `kill -9` broker `i` (it is restarted with [`LocalMesh::restart`]).
    pub fn kill9(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Starts broker `i` again on its address and home, and waits until it answers.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        self.children[i] = spawn_broker(&exe, &self.homes[i], &self.addrs[i])?;
        self.wait_ready(i).await
    }

    /// The directory holding every broker home (removed on drop).
    pub fn root(&self) -> Option<&Path> {
        self.root.as_ref().map(|r| r.path())
    }

    /// Polls until broker `i` answers a hello, it exits, or the start timeout passes.
    async fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.children[i].try_wait()? {
                anyhow::bail!(
                    "the bench's broker at {} exited at start ({status}): {}",
                    self.addrs[i],
                    log_tail(&self.homes[i])
                );
            }
            if let Ok(conn) = Connection::connect(&self.addrs[i]).await {
                conn.close();
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the bench's broker at {} did not answer within {:?}: {}",
                    self.addrs[i],
                    START_TIMEOUT,
                    log_tail(&self.homes[i])
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        for child in &self.children {
            // SAFETY: kill(2) on a pid we spawned and have not yet reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        // The TempDir removes the homes once the brokers no longer write to them.
        self.root.take();
    }
}

fn config_text(listen: &str, port: u16, peers: &[&String], secret: Option<&Path>) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("{p:?}")).collect();
    let links = match secret {
        Some(path) => format!("secret_file = {:?}\nencrypt = \"always\"\n", path),
        None => String::new(),
    };
    format!(
        "# Written by `ipc-mesh bench`; removed with this directory.\n\
         [broker]\nlisten = \"{listen}\"\n\
         [mesh]\npeers = [{}]\nsibling_ports = \"{port}-{port}\"\n{links}\
         [limits]\nrate_per_sec = 0\ninbox_max = {BENCH_INBOX_MAX}\n\
         outbox_max = {BENCH_OUTBOX_MAX}\n",
        peers.join(", ")
    )
}

/// A fresh random mesh secret in `dir/secret`, readable by its owner only.
fn write_secret(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = dir.join("secret");
    let secret: [u8; 32] = rand::random();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .context("cannot write the bench's mesh secret")?;
    f.write_all(hex::encode(secret).as_bytes())?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

fn spawn_broker(exe: &Path, home: &Path, addr: &str) -> anyhow::Result<Child> {
    let log = fs::File::create(home.join("broker.log"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--home")
        .arg(home)
        .args(["broker", "--listen", addr])
        .env(
            "RUST_LOG",
            std::env::var("IPC_MESH_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("IPC_MESH_BROKER")
        .env_remove("IPC_MESH_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: prctl(2) is async-signal-safe; it only asks the kernel to SIGTERM the child
    // when the spawning thread exits.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start a broker from {}", exe.display()))
}

fn log_tail(home: &Path) -> String {
    let text = fs::read_to_string(home.join("broker.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        "(no log output)".into()
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory of `pid` in MiB (`VmRSS` of `/proc/<pid>/status`), if readable.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss_kib(&status).map(|kib| kib as f64 / 1024.0)
}

fn parse_vmrss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss_is_read_in_kib() {
        let status = "Name:\tipc-mesh\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(5120));
        assert!(rss_mib(std::process::id()).unwrap() > 0.0);
    }

    #[test]
    fn config_parses_and_turns_the_limits_off() {
        let peer = "127.0.0.1:2".to_string();
        let text = config_text("127.0.0.1:1", 1, &[&peer], None);
        let c = crate::config::Config::parse(&text).unwrap();
        assert_eq!(c.limits.rate_per_sec, 0);
        assert_eq!(c.limits.inbox_max, BENCH_INBOX_MAX);
        assert_eq!(c.limits.outbox_max, BENCH_OUTBOX_MAX);
        assert_eq!(c.mesh.peers, vec![peer]);
        assert_eq!(c.mesh.sibling_ports, (1, 1));
        assert!(c.mesh.secret_file.is_none());
    }

    #[test]
    fn encrypted_config_names_the_secret_and_always_encrypts() {
        let dir = tempfile::tempdir().unwrap();
        let secret = write_secret(dir.path()).unwrap();
        let text = config_text("127.0.0.1:1", 1, &[], Some(&secret));
        let c = crate::config::Config::parse(&text).unwrap();
        assert_eq!(c.mesh.encrypt, federation::link::Encrypt::Always);
        let s = crate::config::load_secret(&c.mesh).unwrap().unwrap();
        assert_eq!(s.len(), 1);
    }
}
