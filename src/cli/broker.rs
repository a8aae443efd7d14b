//! `ipc-mesh broker`: run a dedicated broker in the foreground.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct BrokerArgs {
    /// Address to listen on [default: the config's [broker] listen, else 127.0.0.1:9876]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// A peer broker to join (HOST:PORT); repeat for several. Added to the config's peers.
    #[arg(long = "peer", value_name = "ADDR")]
    pub peers: Vec<String>,
}

pub async fn run(ctx: Ctx, args: BrokerArgs) -> anyhow::Result<ExitCode> {
    let mut config = ctx.config;
    if let Some(l) = args.listen {
        config.broker.listen = l;
    }
    for p in args.peers {
        let ok = p
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            anyhow::bail!("--peer {p:?}: expected HOST:PORT, like build-box:9876");
        }
        config.mesh.peers.push(p);
    }
    crate::broker::server::serve(config, &ctx.home, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
