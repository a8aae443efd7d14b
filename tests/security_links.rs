//! Encrypted peer links between real broker processes on distinct loopback addresses
//! (127.0.0.2 and 127.0.0.3), with every link running through recording proxies.
//!
//! Each broker advertises its proxy's address, so whichever side dials, the link runs through
//! a proxy and every byte of it is recorded. With encryption the recording holds none of the
//! message text; the control run with `encrypt = "never"` shows the same recording does see
//! the text in plaintext. Then the refusals: a peer without the secret, with the wrong
//! secret, dialling in plaintext where encryption is required (a downgrade), and a recorded
//! handshake replayed: each is refused, in the acceptor's status and log.

mod support;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use support::proxy::Proxy;
use support::*;

const SECRET: &str = "the right secret, long enough";
const TEXT: &str = "the-eagle-lands-at-midnight-7731";

/// Writes `home/mesh.toml` with `mesh` as the `[mesh]` section, and the secret file if given.
fn configure(home: &Path, secret: Option<&str>, mesh: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mut text = format!("[mesh]\n{mesh}\n");
    if let Some(s) = secret {
        let p = home.join("secret");
        std::fs::write(&p, format!("{s}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        text.push_str(&format!("secret_file = {:?}\n", p));
    }
    std::fs::write(home.join("mesh.toml"), text).unwrap();
}

fn addr(ip: &str) -> String {
    format!("{ip}:{}", free_port(ip))
}

/// Two brokers, each reachable only through its own recording proxy.
struct Pair {
    homes: [tempfile::TempDir; 2],
    addrs: [String; 2],
    proxies: [Proxy; 2],
    procs: Vec<BrokerProc>,
}

fn pair(secret: Option<&str>, mesh: &str) -> Pair {
    let homes = [temp_home(), temp_home()];
    let addrs = [addr("127.0.0.2"), addr("127.0.0.3")];
    let proxies = [
        Proxy::start("127.0.0.2", &addrs[0]),
        Proxy::start("127.0.0.3", &addrs[1]),
    ];
    for p in &proxies {
        p.record();
    }
    for i in 0..2 {
        let other = &proxies[1 - i].addr;
        configure(
            homes[i].path(),
            secret,
            &format!("{mesh}\npeers = [{other:?}]"),
        );
        let toml = homes[i].path().join("mesh.toml");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&toml)
            .unwrap();
        writeln!(f, "[broker]\nadvertise = {:?}", proxies[i].addr).unwrap();
    }
    let procs = (0..2)
        .map(|i| BrokerProc::start(homes[i].path(), &addrs[i]))
        .collect();
    Pair {
        homes,
        addrs,
        proxies,
        procs,
    }
}

impl Pair {
    fn h(&self, i: usize) -> &Path {
        self.homes[i].path()
    }

    /// Sends TEXT from an agent on broker 0 to one on broker 1 and reads it there.
    fn exchange(&self) {
        eventually(Duration::from_secs(15), "the link up", || {
            peers_up(self.h(0), &self.addrs[0]).len() == 1
                && peers_up(self.h(1), &self.addrs[1]).len() == 1
        });
        cli_ok(self.h(1), &self.addrs[1], &["check", "--as", "owl"]);
        eventually(Duration::from_secs(10), "owl known at broker 0", || {
            cli_ok(self.h(0), &self.addrs[0], &["list"]).contains("owl")
        });
        cli_ok(
            self.h(0),
            &self.addrs[0],
            &["send", "--as", "hawk", "owl", TEXT],
        );
        eventually(Duration::from_secs(10), "the message delivered", || {
            cli_ok(
                self.h(1),
                &self.addrs[1],
                &["check", "--as", "owl", "--json"],
            )
            .contains(TEXT)
        });
    }

    fn recorded(&self) -> Vec<u8> {
        self.proxies
            .iter()
            .flat_map(|p| p.recorded())
            .collect::<Vec<u8>>()
    }

    fn link_kind(&self, i: usize) -> Vec<serde_json::Value> {
        let v = status_json(self.h(i), &self.addrs[i]);
        v["peers"]
            .as_array()
            .map(|ps| ps.iter().map(|p| p["encrypted"].clone()).collect())
            .unwrap_or_default()
    }
}

/// How many whole length-delimited frames `bytes` starts with.
fn frame_count(bytes: &[u8]) -> usize {
    let (mut n, mut at) = (0, 0);
    while at + 4 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if at + 4 + len > bytes.len() {
            break;
        }
        at += 4 + len;
        n += 1;
    }
    n
}

/// Polls `f` every 50 ms until it gives a value; panics with `what` after `within`.
fn eventually_some<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn encrypted_links_carry_no_message_text() {
    let p = pair(Some(SECRET), "plain_loopback = false");
    p.exchange();
    assert_eq!(p.link_kind(0), vec![serde_json::json!(true)]);
    assert_eq!(p.link_kind(1), vec![serde_json::json!(true)]);
    let bytes = p.recorded();
    assert!(
        bytes.len() > 1000,
        "the proxies recorded the link ({} bytes)",
        bytes.len()
    );
    assert!(
        !contains(&bytes, TEXT.as_bytes()),
        "message text on the wire"
    );
    assert!(!contains(&bytes, b"owl"), "an agent name on the wire");
    assert!(
        !contains(&bytes, p.proxies[0].addr.as_bytes()),
        "an advertised address on the wire"
    );
    drop(p.procs);
}

/// The control: the same recording, plaintext links, shows the text.
#[test]
fn plaintext_links_show_message_text_to_the_recorder() {
    let p = pair(Some(SECRET), "encrypt = \"never\"");
    p.exchange();
    assert_eq!(p.link_kind(0), vec![serde_json::json!(false)]);
    assert!(contains(&p.recorded(), TEXT.as_bytes()));
}

/// An acceptor requiring encryption on 127.0.0.2, and a dialer on 127.0.0.3 configured by
/// `dialer_secret` and `dialer_mesh`. Returns both, once the acceptor shows a refusal whose
/// reason contains `acceptor_says`, and the dialer's status shows the refusal on its peer.
fn refused(
    dialer_secret: Option<&str>,
    dialer_mesh: &str,
    acceptor_says: &str,
) -> (BrokerProc, BrokerProc, [tempfile::TempDir; 2]) {
    let homes = [temp_home(), temp_home()];
    let (a_addr, b_addr) = (addr("127.0.0.2"), addr("127.0.0.3"));
    configure(homes[0].path(), Some(SECRET), "encrypt = \"always\"");
    configure(
        homes[1].path(),
        dialer_secret,
        &format!("{dialer_mesh}\npeers = [{a_addr:?}]"),
    );
    let a = BrokerProc::start(homes[0].path(), &a_addr);
    let b = BrokerProc::start(homes[1].path(), &b_addr);
    eventually(
        Duration::from_secs(15),
        "the refusal in the acceptor's status",
        || {
            let v = status_json(homes[0].path(), &a_addr);
            v["mesh"]["recent_refusals"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["reason"]
                        .as_str()
                        .is_some_and(|s| s.contains(acceptor_says))
                })
            })
        },
    );
    eventually(
        Duration::from_secs(10),
        "the refusal in the dialer's status",
        || {
            let v = status_json(homes[1].path(), &b_addr);
            v["peers"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["refused"].as_str().is_some_and(|r| !r.is_empty()))
            })
        },
    );
    assert!(peers_up(homes[0].path(), &a_addr).is_empty());
    assert!(peers_up(homes[1].path(), &b_addr).is_empty());
    eventually(
        Duration::from_secs(5),
        "the refusal in the acceptor's log",
        || a.log_text().contains("peer link refused") && a.log_text().contains(acceptor_says),
    );
    let human = cli_ok(homes[0].path(), &a_addr, &["status"]);
    assert!(human.contains("refused peer links"), "{human}");
    (a, b, homes)
}

#[test]
fn a_peer_without_the_secret_is_refused() {
    refused(None, "", "plaintext peer link");
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused() {
    let (_a, _b, _h) = refused(
        Some("a different secret, long enough"),
        "plain_loopback = false",
        "does not know the mesh secret",
    );
}

/// The dialer has the right secret but links in plaintext (`encrypt = "never"`): to a broker
/// that requires encryption that is a downgrade, refused although the HMAC inside would pass.
#[test]
fn a_plaintext_downgrade_is_refused() {
    let (_a, b, _h) = refused(
        Some(SECRET),
        "encrypt = \"never\"",
        "requires encrypted links",
    );
    assert!(b.log_text().contains("refused by the peer"));
}

/// The bytes a real dialer sent through the proxy (its hello, its handshake message and its
/// first sealed frames), replayed on a new connection to the acceptor: refused.
#[test]
fn a_replayed_handshake_is_refused() {
    let p = pair(Some(SECRET), "plain_loopback = false");
    eventually(Duration::from_secs(15), "the link up", || {
        peers_up(p.h(0), &p.addrs[0]).len() == 1
    });
    // A connection through proxy i was dialed towards broker i: its upstream bytes are what
    // the dialer said to broker i. Take one that got past the handshake: at least the hello,
    // the first handshake message and one sealed frame.
    let (i, up) = eventually_some(Duration::from_secs(10), "a recorded encrypted dial", || {
        (0..2).find_map(|i| {
            p.proxies[i]
                .recordings()
                .into_iter()
                .map(|(up, _)| up)
                .find(|up| frame_count(up) >= 3)
                .map(|up| (i, up))
        })
    });
    let target = (i, &p.addrs[i]);
    let before = status_json(p.h(target.0), target.1)["mesh"]["refusals"]
        .as_u64()
        .unwrap();
    let mut s = std::net::TcpStream::connect(target.1).unwrap();
    s.write_all(&up).unwrap();
    eventually(Duration::from_secs(10), "the replay refused", || {
        let v = status_json(p.h(target.0), target.1);
        v["mesh"]["refusals"].as_u64().unwrap() > before
            && v["mesh"]["recent_refusals"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["reason"].as_str().unwrap().contains("replayed handshake"))
    });
    assert!(p.procs[target.0].log_text().contains("replayed handshake"));
    assert_eq!(
        peers_up(p.h(0), &p.addrs[0]).len(),
        1,
        "the real link is unharmed"
    );
}
