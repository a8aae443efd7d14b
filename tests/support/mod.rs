//! Shared test harness: real broker processes, the CLI, and in-process brokers on port 0.
#![allow(dead_code)]

pub mod proxy;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ipc-mesh");

/// The binary the brokers run: `IPC_MESH_TEST_BIN` if set (a long chaos run uses a copy, so a
/// rebuild during the run does not change what a restarted broker runs), else the one built.
pub fn bin() -> String {
    std::env::var("IPC_MESH_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A port that was free a moment ago on `ip`.
pub fn free_port(ip: &str) -> u16 {
    StdListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temporary home folder.
pub fn temp_home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ipc-mesh-test")
        .tempdir()
        .unwrap()
}

/// A broker running as a real process.
pub struct BrokerProc {
    pub child: Option<Child>,
    pub addr: String,
    pub home: PathBuf,
    pub extra: Vec<String>,
    /// Arguments after `broker` (e.g. `--peer ADDR`).
    pub broker_args: Vec<String>,
    pub log: PathBuf,
}

impl BrokerProc {
    /// Starts `ipc-mesh broker` on `addr` with `home`, and waits until it answers.
    pub fn start(home: &Path, addr: &str) -> BrokerProc {
        Self::start_with(home, addr, &[])
    }

    pub fn start_with(home: &Path, addr: &str, extra: &[&str]) -> BrokerProc {
        Self::start_full(home, addr, extra, &[])
    }

    /// `extra` goes before the subcommand (global flags), `broker_args` after it.
    pub fn start_full(home: &Path, addr: &str, extra: &[&str], broker_args: &[&str]) -> BrokerProc {
        let mut b = BrokerProc {
            child: None,
            addr: addr.to_string(),
            home: home.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            broker_args: broker_args.iter().map(|s| s.to_string()).collect(),
            log: home.join(format!("broker-{}.log", addr.replace([':', '.'], "_"))),
        };
        b.restart();
        b
    }

    /// Starts the process again on the same address and home.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin())
            .arg("--home")
            .arg(&self.home)
            .args(&self.extra)
            .args(["broker", "--listen", &self.addr])
            .args(&self.broker_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(15));
    }

    pub fn wait_healthy(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "broker exited early with {status}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                let out = cli(&self.home, &self.addr, &["health"]);
                if out.status.success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "broker at {} never became healthy",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the CLI with `--home` and `--broker`.
pub fn cli(home: &Path, broker: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--home")
        .arg(home)
        .args(["--broker", broker])
        .args(args)
        .env_remove("IPC_MESH_BROKER")
        .env_remove("IPC_MESH_HOME")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs the CLI and insists on success; returns stdout.
pub fn cli_ok(home: &Path, broker: &str, args: &[&str]) -> String {
    let out = cli(home, broker, args);
    assert!(
        out.status.success(),
        "ipc-mesh {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the CLI and insists on failure with exit code 1; returns stderr.
pub fn cli_err(home: &Path, broker: &str, args: &[&str]) -> String {
    let out = cli(home, broker, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "ipc-mesh {args:?} should fail with 1; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains("panicked"), "panic in: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "backtrace hint in: {err}");
    err
}

/// An in-process broker on 127.0.0.1:0, stopped when dropped.
pub struct InProc {
    pub addr: String,
    pub home: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProc {
    pub async fn start() -> InProc {
        Self::start_with(ipc_mesh::config::Config::default()).await
    }

    pub async fn start_with(config: ipc_mesh::config::Config) -> InProc {
        let home = temp_home();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = ipc_mesh::home::Home::at(home.path());
        let task = tokio::spawn(async move {
            ipc_mesh::broker::server::serve_on(listener, config, &h, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        InProc {
            addr,
            home,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the broker cleanly and waits until it has flushed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

/// `ipc-mesh status --json` of the broker at `addr`, parsed.
pub fn status_json(home: &Path, addr: &str) -> serde_json::Value {
    let out = cli(home, addr, &["status", "--json"]);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Ids of the peers a broker reports up.
pub fn peers_up(home: &Path, addr: &str) -> Vec<String> {
    let v = status_json(home, addr);
    v["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["state"] == "up")
                .map(|p| p["id"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `f` every 50 ms until it holds; panics with `what` after `within`.
pub fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// One length-delimited frame from a raw socket, or None at EOF; panics if the broker neither
/// answers nor closes within 10 s.
pub async fn read_frame(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    read_frame_within(s, Duration::from_secs(10)).await
}

/// [`read_frame`], with its own deadline.
pub async fn read_frame_within(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(within, async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.ok()?;
        Some(body)
    })
    .await
    .unwrap_or_else(|_| panic!("the broker neither answered nor closed within {within:?}"))
}
