//! `ipc-mesh bench`: load generator; see [`crate::bench`] for the flow of each scenario.
//!
//! Without `--broker` every run starts its own brokers and removes them after; Ctrl-C or
//! SIGTERM stops the scenario, and the same clean-up runs before the process exits.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::Ctx;
use crate::bench::{
    self, baseline, drain, failover, latency, link, registry, throughput, Metrics, Summary, Target,
    MAX_RUNS,
};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Durable sends per second from many senders, and deliveries per second
    Throughput(ThroughputArgs),
    /// Send → delivery latency percentiles at a fixed rate (HDR histogram)
    Latency(LatencyArgs),
    /// This machine's limits: loopback TCP round trip and throughput, sled inserts with flushes
    Baseline(BaselineArgs),
    /// The CPU cost of encrypting a peer link: Noise seal + open of frames, against a copy
    Link(LinkArgs),
    /// Brokers started from one seed: time to a full mesh, and a registration's spread
    Registry(RegistryArgs),
    /// An mcp-style client whose broker is killed: time until its next request is served
    Failover(FailoverArgs),
    /// A backlog queued for a dead peer: its memory, and how fast it drains once the peer is back
    Drain(DrainArgs),
}

/// Flags of every scenario.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Repeat the scenario this many times; report the median and min–max
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_RUNS as i64))]
    pub runs: u32,
    /// Print one JSON object (medians when --runs > 1)
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ThroughputArgs {
    /// Brokers to spread the agents over (senders on the first, recipients on the last)
    #[arg(long, default_value_t = 1)]
    pub brokers: usize,
    /// Sending agents, each with its own connection
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Receiving agents, each with its own connection
    #[arg(long, default_value_t = 4)]
    pub recipients: usize,
    /// Messages in all
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Content bytes per message
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Sends in flight per sender
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Give the bench's brokers a mesh secret and encrypted peer links (loopback too)
    #[arg(long)]
    pub encrypt: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct LatencyArgs {
    /// Brokers (sender on the first, recipient on the last)
    #[arg(long, default_value_t = 1)]
    pub brokers: usize,
    /// Messages per second
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// How long to send, like "10s"
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Content bytes per message
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Give the bench's brokers a mesh secret and encrypted peer links (loopback too)
    #[arg(long)]
    pub encrypt: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct BaselineArgs {
    /// sled inserts per measurement (the TCP measurements scale from it)
    #[arg(long, default_value_t = 50_000)]
    pub ops: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct LinkArgs {
    /// Frames sealed and opened per measurement
    #[arg(long, default_value_t = 20_000)]
    pub frames: u64,
    /// Bytes per frame (a Deliver frame batches many messages; up to about 4 MiB)
    #[arg(long, default_value_t = 65_536)]
    pub size: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct RegistryArgs {
    /// Brokers, each given only the first as its seed (2 to 10)
    #[arg(long, default_value_t = 10)]
    pub brokers: usize,
    /// Fresh agents registered, each on a random broker, to time propagation
    #[arg(long, default_value_t = 100, hide = true)]
    pub registrations: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Kills per run (the broker is restarted between them); the median is reported
    #[arg(long, default_value_t = 5)]
    pub kills: u32,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Messages queued for the dead peer
    #[arg(long, default_value_t = 100_000)]
    pub backlog: u64,
    /// Content bytes per message
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Sends in flight
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    #[command(flatten)]
    pub common: Common,
}

/// Runs a scenario `--runs` times, stopping early (with clean-up) on Ctrl-C or SIGTERM.
pub async fn run(ctx: Ctx, cmd: BenchCommand, explicit_broker: bool) -> anyhow::Result<ExitCode> {
    let target = |brokers: usize, encrypt: bool| -> anyhow::Result<Target> {
        if explicit_broker {
            anyhow::ensure!(
                !encrypt,
                "--encrypt with --broker: the running broker's own config decides its links"
            );
            anyhow::ensure!(
                brokers == 1,
                "--brokers {brokers} with --broker: name one running broker, or leave out --broker to let the bench start its own"
            );
            Ok(Target::External {
                addr: ctx.broker.clone(),
            })
        } else {
            bench::check_brokers(brokers)?;
            Ok(Target::Local { brokers, encrypt })
        }
    };
    let (title, common, summary) = match cmd {
        BenchCommand::Throughput(a) => {
            let t = target(a.brokers, a.encrypt)?;
            let p = throughput::Params {
                senders: a.senders,
                recipients: a.recipients,
                messages: a.messages,
                size: a.size,
                window: a.window,
            };
            let s = repeat(&a.common, || throughput::run(&t, &p)).await?;
            ("throughput", a.common, s)
        }
        BenchCommand::Latency(a) => {
            let t = target(a.brokers, a.encrypt)?;
            let p = latency::Params {
                rate: a.rate,
                duration: a.duration,
                size: a.size,
            };
            let s = repeat(&a.common, || latency::run(&t, &p)).await?;
            ("latency", a.common, s)
        }
        BenchCommand::Baseline(a) => {
            let p = baseline::Params { ops: a.ops };
            let s = repeat(&a.common, || baseline::run(&p)).await?;
            ("baseline", a.common, s)
        }
        BenchCommand::Link(a) => {
            let p = link::Params {
                frames: a.frames,
                size: a.size,
            };
            let s = repeat(&a.common, || link::run(&p)).await?;
            ("link", a.common, s)
        }
        BenchCommand::Registry(a) => {
            own_brokers(explicit_broker, "registry")?;
            let p = registry::Params {
                brokers: a.brokers,
                registrations: a.registrations,
            };
            let s = repeat(&a.common, || registry::run(&p)).await?;
            ("registry", a.common, s)
        }
        BenchCommand::Failover(a) => {
            own_brokers(explicit_broker, "failover")?;
            let p = failover::Params { kills: a.kills };
            let s = repeat(&a.common, || failover::run(&p)).await?;
            ("failover", a.common, s)
        }
        BenchCommand::Drain(a) => {
            own_brokers(explicit_broker, "drain")?;
            let p = drain::Params {
                backlog: a.backlog,
                size: a.size,
                window: a.window,
            };
            let s = repeat(&a.common, || drain::run(&p)).await?;
            ("drain", a.common, s)
        }
    };
    if common.json {
        println!("{}", summary.to_json());
    } else {
        print!("{}", summary.to_table(title));
    }
    Ok(ExitCode::SUCCESS)
}

/// Scenarios that kill or shape brokers cannot run against someone else's.
fn own_brokers(explicit_broker: bool, scenario: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !explicit_broker,
        "bench {scenario} starts (and kills) its own brokers; leave out --broker"
    );
    Ok(())
}

async fn repeat<F, Fut>(common: &Common, mut scenario: F) -> anyhow::Result<Summary>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Metrics>>,
{
    let mut runs = Vec::with_capacity(common.runs as usize);
    for i in 0..common.runs {
        // Dropping the scenario on a signal drops its brokers, which stops and removes them.
        let m = tokio::select! {
            m = scenario() => m?,
            s = stop_signal() => anyhow::bail!("interrupted by {s}; the bench's brokers were stopped and removed"),
        };
        if !common.json && common.runs > 1 {
            eprintln!("run {}/{} done", i + 1, common.runs);
        }
        runs.push(m);
    }
    Ok(Summary::of(&runs))
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}
