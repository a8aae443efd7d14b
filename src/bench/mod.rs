//! The load generator behind `ipc-mesh bench`: what a broker can do, measured against what this
//! machine can do at all.
//!
//! A scenario runs like this:
//!
//! 1. [`Target`] decides where to measure: brokers the bench starts itself ([`spawn::LocalMesh`]:
//!    child processes of this executable, loopback ports, temporary homes, a config without
//!    rate limits), or a running broker named with `--broker`.
//! 2. With several brokers, wait until each has its peer links up ([`await_links`]).
//!    ([`registry`], [`failover`] and [`drain`] start their own brokers, since they shape the
//!    mesh or kill brokers: one seed for all, or a broker killed and restarted.)
//! 3. The scenario ([`throughput`], [`latency`], [`baseline`]) registers its own agents under a
//!    fresh random prefix (senders on the first broker, recipients on the last, and waits until
//!    the first lists the recipients: [`await_known`]), drives load with pipelined
//!    [`Connection`]s, and returns a [`Metrics`] list of named numbers.
//! 4. With `--runs N` the scenario repeats, each run against fresh brokers; [`Summary`] keeps
//!    the median and the min–max of every field.
//! 5. The CLI prints a table for people or one JSON object (the medians) for scripts.
//! 6. However the bench ends (done, error, Ctrl-C), dropping the [`spawn::LocalMesh`] stops
//!    every broker it started and removes every directory it made.
//!
//! Each loop in here is bounded twice: by a count (messages, runs, polls) and by a deadline.
//!
//! [`Connection`]: crate::client::Connection

pub mod baseline;
pub mod drain;
pub mod failover;
pub mod latency;
pub mod link;
pub mod registry;
pub mod spawn;
pub mod throughput;

use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::client::Connection;
use crate::protocol::{Body, Reply};

/// The most runs `--runs` accepts, so a typo cannot keep the machine busy for a day.
pub const MAX_RUNS: u32 = 100;

/// Named numbers, in the order they are printed.
pub type Metrics = Vec<(&'static str, f64)>;

/// Where a scenario measures.
#[derive(Clone, Debug)]
pub enum Target {
    /// Start `brokers` broker processes for each run, and stop them after. `encrypt`: the
    /// brokers share a mesh secret and encrypt every peer link (loopback too).
    Local { brokers: usize, encrypt: bool },
    /// A running broker; nothing is started or stopped.
    External { addr: String },
}

impl Target {
    /// How many brokers the scenario spans.
    pub fn brokers(&self) -> usize {
        match self {
            Target::Local { brokers, .. } => *brokers,
            Target::External { .. } => 1,
        }
    }
}

/// The brokers one run measures, and their processes when the bench owns them.
pub struct Brokers {
    /// Where senders attach (the first broker).
    pub send_addr: String,
    /// Where recipients attach (the last broker; the same as `send_addr` with one broker).
    pub recv_addr: String,
    /// Present when the bench started the brokers; dropping it stops them.
    pub mesh: Option<spawn::LocalMesh>,
}

impl Brokers {
    /// Starts fresh brokers (local target) or names the running one (external target).
    pub async fn open(target: &Target) -> anyhow::Result<Brokers> {
        match target {
            Target::External { addr } => Ok(Brokers {
                send_addr: addr.clone(),
                recv_addr: addr.clone(),
                mesh: None,
            }),
            Target::Local { brokers, encrypt } => {
                check_brokers(*brokers)?;
                let links = if *encrypt {
                    spawn::Links::Encrypted
                } else {
                    spawn::Links::Plain
                };
                let mesh = spawn::LocalMesh::start_with(*brokers, spawn::Seeds::All, links).await?;
                if mesh.len() > 1 {
                    let addrs: Vec<String> =
                        (0..mesh.len()).map(|i| mesh.addr(i).to_string()).collect();
                    await_links(&addrs).await?;
                }
                Ok(Brokers {
                    send_addr: mesh.addr(0).to_string(),
                    recv_addr: mesh.addr(mesh.len() - 1).to_string(),
                    mesh: Some(mesh),
                })
            }
        }
    }

    /// Whether senders and recipients are on different brokers.
    pub fn cross(&self) -> bool {
        self.send_addr != self.recv_addr
    }

    /// Resident memory of the first (the sending) broker in MiB, when the bench owns it.
    pub fn rss_mib(&self) -> Option<f64> {
        self.mesh.as_ref().and_then(|m| spawn::rss_mib(m.pid(0)))
    }
}

/// The most brokers one bench starts.
pub const MAX_BROKERS: usize = 10;
/// How long brokers may take to link up, and a registration to reach every broker.
const MESH_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks `--brokers`: 1 to [`MAX_BROKERS`].
pub fn check_brokers(brokers: usize) -> anyhow::Result<()> {
    match brokers {
        0 => anyhow::bail!("--brokers must be at least 1"),
        n if n > MAX_BROKERS => anyhow::bail!("--brokers {n}: at most {MAX_BROKERS}"),
        _ => Ok(()),
    }
}

/// Polls (bounded) until the broker at each address has a link up to every other one.
pub async fn await_links(addrs: &[String]) -> anyhow::Result<()> {
    let want = addrs.len().saturating_sub(1);
    let deadline = std::time::Instant::now() + MESH_TIMEOUT;
    for addr in addrs {
        let conn = Connection::connect(addr).await?;
        let polls = MESH_TIMEOUT.as_millis() / 20;
        let mut up = 0;
        for _ in 0..polls {
            up = match conn.call(Body::Status).await? {
                Reply::Status(s) => s.peers.iter().filter(|p| p.state == "up").count(),
                other => anyhow::bail!("unexpected reply to status: {other:?}"),
            };
            if up >= want || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        conn.close();
        anyhow::ensure!(
            up >= want,
            "the broker at {addr} has {up} of {want} peer links up after {MESH_TIMEOUT:?}"
        );
    }
    Ok(())
}

/// Polls (bounded) until the broker behind `conn` lists every one of `names`: a sender's
/// broker must know a recipient on another broker before it accepts a message for it.
pub async fn await_known(conn: &Connection, names: &[String]) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + MESH_TIMEOUT;
    for _ in 0..MESH_TIMEOUT.as_millis() / 20 {
        let known = match conn.call(Body::List).await? {
            Reply::Agents { agents } => agents,
            other => anyhow::bail!("unexpected reply to list: {other:?}"),
        };
        if names.iter().all(|n| known.iter().any(|a| &a.name == n)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the sending broker did not learn of the recipients within {MESH_TIMEOUT:?}")
}

/// A random prefix for this run's agent names, so runs against a shared broker never collide.
/// Names stay within the 32-character limit: prefix (9) + `-s` + index.
pub fn name_prefix() -> String {
    format!("b{}", hex::encode(rand::random::<[u8; 4]>()))
}

/// Connects and registers `name` (a new name; its token is not kept).
pub async fn connect_as(addr: &str, name: &str) -> anyhow::Result<Connection> {
    let conn = Connection::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the broker at {addr}"))?;
    match conn
        .call(Body::Register {
            name: name.to_string(),
            token: None,
        })
        .await
        .with_context(|| format!("cannot register bench agent {name}"))?
    {
        Reply::Registered { .. } => Ok(conn),
        other => anyhow::bail!("unexpected reply to register: {other:?}"),
    }
}

/// Message content of exactly `size` bytes, starting with `seq` so a recipient can tell which
/// message it got (and so when it was scheduled).
pub fn content(seq: u64, size: usize) -> String {
    let mut s = format!("{seq} ");
    if s.len() < size {
        s.push_str(&"x".repeat(size - s.len()));
    }
    s
}

/// The sequence number at the start of [`content`].
pub fn parse_seq(content: &str) -> Option<u64> {
    content.split(' ').next()?.parse().ok()
}

/// A histogram of durations in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Percentiles of `h` in milliseconds, under `prefix` (`""` or `"ack_"`).
pub fn percentiles(h: &Histogram<u64>, names: [&'static str; 5]) -> Metrics {
    let ms = |us: u64| us as f64 / 1000.0;
    vec![
        (names[0], ms(h.value_at_quantile(0.50))),
        (names[1], ms(h.value_at_quantile(0.90))),
        (names[2], ms(h.value_at_quantile(0.99))),
        (names[3], ms(h.value_at_quantile(0.999))),
        (names[4], ms(h.max())),
    ]
}

/// Every field of several runs: the median, and the min–max.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub runs: usize,
    /// `(name, median, min, max)`, in the order of the first run.
    pub fields: Vec<(&'static str, f64, f64, f64)>,
}

impl Summary {
    /// Summarises runs. A field missing from some runs is summarised over the runs that have it.
    pub fn of(runs: &[Metrics]) -> Summary {
        let mut names: Vec<&'static str> = Vec::new();
        for run in runs {
            for (n, _) in run {
                if !names.contains(n) {
                    names.push(n);
                }
            }
        }
        let fields = names
            .into_iter()
            .map(|name| {
                let mut values: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.iter().find(|(n, _)| *n == name).map(|(_, v)| *v))
                    .collect();
                values.sort_by(f64::total_cmp);
                let (min, max) = (values[0], values[values.len() - 1]);
                (name, median(&values), min, max)
            })
            .collect();
        Summary {
            runs: runs.len(),
            fields,
        }
    }

    /// One JSON object: each field's median, plus `runs`, and `min`/`max` objects when
    /// there was more than one run.
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        for (name, med, _, _) in &self.fields {
            obj.insert(name.to_string(), json_number(*med));
        }
        obj.insert("runs".into(), self.runs.into());
        if self.runs > 1 {
            let pick = |f: fn(&(&'static str, f64, f64, f64)) -> f64| {
                serde_json::Value::Object(
                    self.fields
                        .iter()
                        .map(|t| (t.0.to_string(), json_number(f(t))))
                        .collect(),
                )
            };
            obj.insert("min".into(), pick(|t| t.2));
            obj.insert("max".into(), pick(|t| t.3));
        }
        serde_json::Value::Object(obj)
    }

    /// An aligned table for people.
    pub fn to_table(&self, title: &str) -> String {
        let width = self.fields.iter().map(|f| f.0.len()).max().unwrap_or(0);
        let mut out = if self.runs > 1 {
            format!("{title} ({} runs: median, min–max)\n", self.runs)
        } else {
            format!("{title}\n")
        };
        for (name, med, min, max) in &self.fields {
            if self.runs > 1 {
                out.push_str(&format!(
                    "  {name:<width$}  {:>12}  ({} – {})\n",
                    fmt_num(*med),
                    fmt_num(*min),
                    fmt_num(*max)
                ));
            } else {
                out.push_str(&format!("  {name:<width$}  {:>12}\n", fmt_num(*med)));
            }
        }
        out
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Whole numbers print as integers, others with three decimals.
fn json_number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        serde_json::Value::from(v as i64)
    } else {
        serde_json::Value::from((v * 1000.0).round() / 1000.0)
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_median_and_range() {
        let runs = vec![
            vec![("a", 3.0), ("b", 10.0)],
            vec![("a", 1.0), ("b", 30.0)],
            vec![("a", 2.0), ("b", 20.0)],
        ];
        let s = Summary::of(&runs);
        assert_eq!(
            s.fields,
            vec![("a", 2.0, 1.0, 3.0), ("b", 20.0, 10.0, 30.0)]
        );
        let j = s.to_json();
        assert_eq!(j["a"], 2);
        assert_eq!(j["runs"], 3);
        assert_eq!(j["min"]["b"], 10);
        assert_eq!(j["max"]["a"], 3);
    }

    #[test]
    fn even_runs_average_the_middle_two() {
        let s = Summary::of(&[vec![("x", 1.0)], vec![("x", 2.0)]]);
        assert_eq!(s.fields[0].1, 1.5);
    }

    #[test]
    fn content_has_exact_size_and_carries_its_sequence() {
        let c = content(42, 200);
        assert_eq!(c.len(), 200);
        assert_eq!(parse_seq(&c), Some(42));
        // Shorter than the sequence itself: the sequence wins, the size is a floor.
        assert_eq!(parse_seq(&content(123456, 2)), Some(123456));
    }

    #[test]
    fn broker_counts_are_bounded() {
        assert!(check_brokers(1).is_ok());
        assert!(check_brokers(2).is_ok());
        assert!(check_brokers(0).is_err());
        assert!(check_brokers(MAX_BROKERS + 1).is_err());
    }
}
