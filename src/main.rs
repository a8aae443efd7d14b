//! The `ipc-mesh` binary: parse, build, call; print the whole error chain on one line.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use ipc_mesh::cli::{Cli, Command};

/// jemalloc, not glibc's malloc: under load glibc spent about a third of the broker's CPU in
/// malloc, much of it contending for arena locks (docs/benchmarks.md, "Where the time goes").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ipc-mesh: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(ipc_mesh::cli::run(cli));
    // Do not wait for background tasks (a client's reader) to notice the end.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let _ = writeln!(std::io::stderr(), "ipc-mesh: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. Brokers log at info by default, clients only warnings; `RUST_LOG`
/// overrides both.
fn init_logging(command: &Command) {
    let default = match command {
        Command::Broker(_) => "info",
        // Claude Code shows every stderr line of an MCP server as an error, and rmcp warns
        // about every JSON-RPC error it sends: keep the MCP server quiet unless asked.
        Command::Mcp(_) => "warn,rmcp=error",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
