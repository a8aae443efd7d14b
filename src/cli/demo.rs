//! `ipc-mesh demo`: start a small mesh, show messages crossing it and surviving a crash.

use std::process::ExitCode;

use super::Ctx;

pub async fn run(_ctx: Ctx) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout();
    crate::demo::run(&mut out).await?;
    Ok(ExitCode::SUCCESS)
}
