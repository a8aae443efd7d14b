//! The mesh config file (`mesh.toml`) and every default, in one place.
//!
//! Every key is optional. Unknown keys and bad values are errors that name the key and the
//! value, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The well-known broker address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9876";

/// Defaults, named so that docs and code agree.
pub mod defaults {
    use std::time::Duration;

    pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
    pub const INBOX_MAX: usize = 10_000;
    pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const MAX_CONNECTIONS: usize = 4096;
    /// How long a frame whose first bytes arrived may take to arrive whole.
    pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
    pub const RATE_PER_SEC: u32 = 10_000;
    pub const RATE_BURST: u32 = 20_000;
    /// How long an old name keeps forwarding to the new one after a rename.
    pub const RENAME_FORWARD: Duration = Duration::from_secs(2 * 3600);
    /// The longest a `wait` request may block.
    pub const WAIT_MAX: Duration = Duration::from_secs(50);
    pub const SIBLING_PORTS: (u16, u16) = (9876, 9885);
    pub const OUTBOX_MAX: u64 = 1_000_000;
    /// Links between two loopback addresses stay plaintext under `encrypt = "auto"`.
    pub const PLAIN_LOOPBACK: bool = true;
    /// Inbound limits per peer link (0 = off): bytes and frames a peer may make us read
    /// per second.
    pub const PEER_BYTES_PER_SEC: u64 = 0;
    pub const PEER_FRAMES_PER_SEC: u64 = 0;
}

/// The largest config file read; a bigger one is refused rather than parsed.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// The largest secret file read.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// The whole configuration, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub broker: BrokerConfig,
    pub mesh: MeshConfig,
    pub limits: Limits,
}

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// What peers should dial, when it differs from `listen`.
    pub advertise: Option<String>,
    pub max_connections: usize,
    /// Whether clients must prove the mesh secret (see [`crate::auth`]). `None`: only when
    /// listening beyond loopback. It cannot be turned off beyond loopback.
    pub require_client_auth: Option<bool>,
}

impl BrokerConfig {
    /// Whether a broker listening on `listen` requires client authentication.
    pub fn client_auth_required(&self, listen: SocketAddr) -> bool {
        self.require_client_auth
            .unwrap_or(!listen.ip().is_loopback())
    }
}

#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub peers: Vec<String>,
    pub sibling_ports: (u16, u16),
    pub secret_file: Option<PathBuf>,
    /// When peer links are encrypted (with a key derived from the secret).
    pub encrypt: federation::link::Encrypt,
    pub plain_loopback: bool,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub inbox_max: usize,
    /// How long read messages, and agents unseen, are kept.
    pub retention: Duration,
    /// Requests per second per identity; 0 turns the limit off.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub rename_forward: Duration,
    /// Envelopes waiting for other brokers, at most; beyond it sends are refused.
    pub outbox_max: u64,
    /// Bytes per second one peer link may make this broker read; 0 turns the limit off.
    pub peer_bytes_per_sec: u64,
    /// Frames per second one peer link may make this broker read; 0 turns the limit off.
    pub peer_frames_per_sec: u64,
    /// A frame whose first bytes arrived must be complete within this; else the connection
    /// is closed (a slow sender cannot hold a connection with a frame half sent).
    pub frame_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker: BrokerConfig {
                listen: DEFAULT_LISTEN.parse().expect("valid default"),
                advertise: None,
                max_connections: defaults::MAX_CONNECTIONS,
                require_client_auth: None,
            },
            mesh: MeshConfig {
                peers: Vec::new(),
                sibling_ports: defaults::SIBLING_PORTS,
                secret_file: None,
                encrypt: federation::link::Encrypt::Auto,
                plain_loopback: defaults::PLAIN_LOOPBACK,
            },
            limits: Limits::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            inbox_max: defaults::INBOX_MAX,
            retention: defaults::RETENTION,
            rate_per_sec: defaults::RATE_PER_SEC,
            rate_burst: defaults::RATE_BURST,
            rename_forward: defaults::RENAME_FORWARD,
            outbox_max: defaults::OUTBOX_MAX,
            peer_bytes_per_sec: defaults::PEER_BYTES_PER_SEC,
            peer_frames_per_sec: defaults::PEER_FRAMES_PER_SEC,
            frame_timeout: defaults::FRAME_TIMEOUT,
        }
    }
}

/// The file as written: everything optional, unknown keys refused.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    broker: RawBroker,
    #[serde(default)]
    mesh: RawMesh,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    listen: Option<String>,
    advertise: Option<String>,
    max_connections: Option<usize>,
    require_client_auth: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    peers: Option<Vec<String>>,
    sibling_ports: Option<String>,
    secret_file: Option<PathBuf>,
    encrypt: Option<String>,
    plain_loopback: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<usize>,
    inbox_max: Option<usize>,
    retention: Option<String>,
    rate_per_sec: Option<u32>,
    rate_burst: Option<u32>,
    rename_forward: Option<String>,
    outbox_max: Option<u64>,
    peer_bytes_per_sec: Option<u64>,
    peer_frames_per_sec: Option<u64>,
    frame_timeout: Option<String>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let cannot =
            |e: String| Error::Config(format!("cannot read config {}: {e}", path.display()));
        let bytes = read_capped(path, MAX_CONFIG_BYTES).map_err(cannot)?;
        let text = String::from_utf8(bytes).map_err(|_| cannot("not UTF-8 text".into()))?;
        Config::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses and validates config text; the error names the bad key and value.
    pub fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        let mut c = Config::default();

        if let Some(listen) = raw.broker.listen {
            c.broker.listen = parse_addr("[broker] listen", &listen)?;
        }
        if let Some(adv) = raw.broker.advertise {
            check_host_port("[broker] advertise", &adv)?;
            c.broker.advertise = Some(adv);
        }
        if let Some(n) = raw.broker.max_connections {
            c.broker.max_connections = positive("[broker] max_connections", n)?;
        }
        if let Some(b) = raw.broker.require_client_auth {
            if !b && !c.broker.listen.ip().is_loopback() {
                return Err(format!(
                    "[broker] require_client_auth = false: cannot be turned off when listening on {} (beyond loopback); clients there must prove the mesh secret",
                    c.broker.listen
                ));
            }
            c.broker.require_client_auth = Some(b);
        }

        if let Some(peers) = raw.mesh.peers {
            for p in &peers {
                check_host_port("[mesh] peers", p)?;
            }
            c.mesh.peers = peers;
        }
        if let Some(range) = raw.mesh.sibling_ports {
            c.mesh.sibling_ports = parse_port_range("[mesh] sibling_ports", &range)?;
        }
        c.mesh.secret_file = raw.mesh.secret_file;
        if let Some(e) = raw.mesh.encrypt {
            c.mesh.encrypt = federation::link::Encrypt::parse(&e).ok_or_else(|| {
                format!("[mesh] encrypt = {e:?}: expected \"auto\", \"always\" or \"never\"")
            })?;
        }
        if let Some(b) = raw.mesh.plain_loopback {
            c.mesh.plain_loopback = b;
        }

        let l = raw.limits;
        if let Some(n) = l.max_message_bytes {
            c.limits.max_message_bytes = positive("[limits] max_message_bytes", n)?;
            if n > 64 * 1024 * 1024 {
                return Err(format!(
                    "[limits] max_message_bytes = {n}: at most 67108864 (64 MiB)"
                ));
            }
        }
        if let Some(n) = l.inbox_max {
            c.limits.inbox_max = positive("[limits] inbox_max", n)?;
        }
        if let Some(d) = l.retention {
            c.limits.retention = parse_duration("[limits] retention", &d)?;
        }
        if let Some(n) = l.rate_per_sec {
            c.limits.rate_per_sec = n;
        }
        if let Some(n) = l.rate_burst {
            c.limits.rate_burst = n;
        }
        if let Some(n) = l.peer_bytes_per_sec {
            c.limits.peer_bytes_per_sec = n;
        }
        if let Some(n) = l.peer_frames_per_sec {
            c.limits.peer_frames_per_sec = n;
        }
        if let Some(n) = l.outbox_max {
            c.limits.outbox_max = positive("[limits] outbox_max", n as usize)? as u64;
        }
        if let Some(d) = l.frame_timeout {
            c.limits.frame_timeout = parse_duration("[limits] frame_timeout", &d)?;
        }
        if let Some(d) = l.rename_forward {
            c.limits.rename_forward = parse_duration("[limits] rename_forward", &d)?;
        }
        Ok(c)
    }
}

/// The mesh secret: `$IPC_MESH_SECRET` if set, else the `[mesh] secret_file`.
///
/// A secret file readable by other users is refused: anyone who can read it can join the
/// mesh. Surrounding whitespace (a trailing newline) is not part of the secret.
pub fn load_secret(mesh: &MeshConfig) -> Result<Option<federation::auth::Secret>> {
    match load_secret_bytes(mesh)? {
        None => Ok(None),
        Some(bytes) => parse_secrets(&bytes).map(Some),
    }
}

/// One peer secret per non-empty line (surrounding whitespace trimmed), the current one
/// first; the others are still accepted from peers while a rotation is under way (see
/// docs/security.md). The bytes read are wiped once parsed.
fn parse_secrets(text: &[u8]) -> Result<federation::auth::Secret> {
    let text = zeroize::Zeroizing::new(text.to_vec());
    let bad = |e: federation::Error| Error::Config(format!("mesh secret: {e}"));
    let (first, previous) = secret_lines(&text)?;
    let mut secret = federation::auth::Secret::new(first.to_vec()).map_err(bad)?;
    for previous in previous {
        secret = secret.with_previous(previous.to_vec()).map_err(bad)?;
    }
    Ok(secret)
}

/// A secret file's secrets: one per non-empty line, surrounding whitespace trimmed; the
/// current one, and the previous ones still accepted during a rotation.
pub(crate) fn secret_lines(text: &[u8]) -> Result<(&[u8], Vec<&[u8]>)> {
    let mut lines = text
        .split(|b| *b == b'\n')
        .map(|l| l.trim_ascii())
        .filter(|l| !l.is_empty());
    let first = lines
        .next()
        .ok_or_else(|| Error::Config("the mesh secret is empty".into()))?;
    Ok((first, lines.collect()))
}

/// The mesh secret for client authentication, from the same place as [`load_secret`].
pub fn load_client_secret(mesh: &MeshConfig) -> Result<Option<crate::auth::ClientSecret>> {
    load_secret_bytes(mesh)?
        .map(|bytes| crate::auth::ClientSecret::from_lines(&bytes))
        .transpose()
}

/// The mesh secret's bytes: `$IPC_MESH_SECRET` if set, else the `[mesh] secret_file` (which
/// must not be readable by other users, and at most [`MAX_SECRET_BYTES`] long).
fn load_secret_bytes(mesh: &MeshConfig) -> Result<Option<Vec<u8>>> {
    let bytes = match std::env::var("IPC_MESH_SECRET") {
        Ok(v) if !v.trim().is_empty() => v.trim().as_bytes().to_vec(),
        _ => match &mesh.secret_file {
            None => return Ok(None),
            Some(path) => {
                use std::os::unix::fs::PermissionsExt;
                let expanded = match (path.strip_prefix("~"), std::env::var_os("HOME")) {
                    (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
                    _ => path.clone(),
                };
                let path = &expanded;
                let meta = std::fs::metadata(path).map_err(|e| {
                    Error::Config(format!("[mesh] secret_file {}: {e}", path.display()))
                })?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(Error::Config(format!(
                        "[mesh] secret_file {} is readable by other users; run `chmod 600 {}`",
                        path.display(),
                        path.display()
                    )));
                }
                let text = read_capped(path, MAX_SECRET_BYTES).map_err(|e| {
                    Error::Config(format!("[mesh] secret_file {}: {e}", path.display()))
                })?;
                String::from_utf8_lossy(&text).trim().as_bytes().to_vec()
            }
        },
    };
    if bytes.len() < 16 {
        return Err(Error::Config(
            "the mesh secret must be at least 16 bytes long".into(),
        ));
    }
    Ok(Some(bytes))
}

/// Reads a regular file of at most `max` bytes; anything else is an error saying why.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > max {
        return Err(format!("larger than the limit of {max} bytes"));
    }
    Ok(buf)
}

/// Parses a humantime duration such as `30s` or `7d`.
pub fn parse_duration(key: &str, value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value).map_err(|e| {
        format!("{key} = {value:?}: not a duration ({e}); write it like \"30s\" or \"7d\"")
    })?;
    if d.is_zero() {
        return Err(format!("{key} = {value:?}: must be longer than zero"));
    }
    Ok(d)
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{key} = {value:?}: expected IP:PORT, like \"127.0.0.1:9876\""))
}

fn check_host_port(key: &str, value: &str) -> Result<(), String> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "{key}: {value:?} is not HOST:PORT, like \"build-box:9876\""
        )),
    }
}

fn parse_port_range(key: &str, value: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{key} = {value:?}: expected a port range like \"9876-9885\"");
    let (lo, hi) = value.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi || hi - lo > 100 {
        return Err(format!(
            "{key} = {value:?}: the range must be non-empty, start above 0 and span at most 100 ports"
        ));
    }
    Ok((lo, hi))
}

fn positive(key: &str, n: usize) -> Result<usize, String> {
    if n == 0 {
        Err(format!("{key} = 0: must be at least 1"))
    } else {
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.broker.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.limits.inbox_max, 10_000);
        assert_eq!(c.limits.retention, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            r#"
            [broker]
            listen = "127.0.0.1:9999"
            advertise = "10.0.0.4:9876"
            [mesh]
            peers = ["10.0.0.5:9876", "build-box:9876"]
            sibling_ports = "9876-9885"
            secret_file = "/etc/ipc-mesh/secret"
            [limits]
            max_message_bytes = 1000
            inbox_max = 5
            retention = "30s"
            "#,
        )
        .unwrap();
        assert_eq!(c.broker.listen.port(), 9999);
        assert_eq!(c.mesh.peers.len(), 2);
        assert_eq!(c.limits.retention, Duration::from_secs(30));
        assert_eq!(c.limits.inbox_max, 5);
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let e = Config::parse("[limits]\nretention = \"7x\"").unwrap_err();
        assert!(e.contains("retention") && e.contains("7x"), "{e}");
        let e = Config::parse("[broker]\nlisten = \"nowhere\"").unwrap_err();
        assert!(e.contains("listen") && e.contains("nowhere"), "{e}");
        let e = Config::parse("[mesh]\npeers = [\"nope\"]").unwrap_err();
        assert!(e.contains("peers") && e.contains("nope"), "{e}");
        let e = Config::parse("[limits]\ninbox_max = 0").unwrap_err();
        assert!(e.contains("inbox_max"), "{e}");
        let e = Config::parse("[mesh]\nsibling_ports = \"9885-9876\"").unwrap_err();
        assert!(e.contains("sibling_ports"), "{e}");
    }

    #[test]
    fn link_keys_parse() {
        let c = Config::parse(
            "[mesh]\nencrypt = \"always\"\nplain_loopback = false\n\
             [limits]\npeer_bytes_per_sec = 1000\npeer_frames_per_sec = 10\n",
        )
        .unwrap();
        assert_eq!(c.mesh.encrypt, federation::link::Encrypt::Always);
        assert!(!c.mesh.plain_loopback);
        assert_eq!(c.limits.peer_bytes_per_sec, 1000);
        assert_eq!(c.limits.peer_frames_per_sec, 10);
        let d = Config::parse("").unwrap();
        assert_eq!(d.mesh.encrypt, federation::link::Encrypt::Auto);
        assert!(d.mesh.plain_loopback);
        let e = Config::parse("[mesh]\nencrypt = \"yes\"").unwrap_err();
        assert!(e.contains("encrypt") && e.contains("yes"), "{e}");
    }

    #[test]
    fn a_secret_file_may_hold_the_previous_secret() {
        let s = parse_secrets(b"  the new secret, long enough\nthe old secret, long enough\n\n")
            .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            parse_secrets(b"one secret only, long enough\n")
                .unwrap()
                .len(),
            1
        );
        assert!(parse_secrets(b"long enough secret here\nshort\n").is_err());
        assert!(parse_secrets(b"\n \n").is_err());
    }

    #[test]
    fn client_auth_follows_the_listen_address_and_cannot_be_turned_off_beyond_loopback() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        let c = Config::parse("").unwrap();
        assert!(!c.broker.client_auth_required(lo));
        assert!(c.broker.client_auth_required(any));
        let c = Config::parse("[broker]\nrequire_client_auth = true").unwrap();
        assert!(c.broker.client_auth_required(lo));
        let e = Config::parse("[broker]\nlisten = \"0.0.0.0:9876\"\nrequire_client_auth = false")
            .unwrap_err();
        assert!(e.contains("require_client_auth"), "{e}");
        let c = Config::parse("[limits]\nframe_timeout = \"5s\"").unwrap();
        assert_eq!(c.limits.frame_timeout, Duration::from_secs(5));
    }

    #[test]
    fn files_are_read_within_limits_and_secrets_only_when_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = Config::load(&big).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        let e = Config::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");

        if std::env::var("IPC_MESH_SECRET").is_ok_and(|v| !v.trim().is_empty()) {
            // The environment's secret would win over the file under test.
            eprintln!("IPC_MESH_SECRET is set: the secret file checks cannot run");
            return;
        }
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "a secret of more than sixteen bytes\n").unwrap();
        let mesh = MeshConfig {
            secret_file: Some(secret.clone()),
            ..Config::default().mesh
        };
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_secret_bytes(&mesh).unwrap_err().to_string();
            assert!(
                e.contains("readable by other users") && e.contains("chmod 600"),
                "{e}"
            );
        }
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_secret_bytes(&mesh).unwrap().is_some());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::parse("[limits]\nretension = \"7d\"").unwrap_err();
        assert!(e.contains("retension"), "{e}");
        assert!(Config::parse("[brokr]\n").is_err());
    }
}
