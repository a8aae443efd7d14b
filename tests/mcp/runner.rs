//! Runs the Python suite in `tests/mcp/` with the virtual environment's pytest.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole suite finishes in well under a minute; this bound only catches a hang.
const SUITE_BOUND: Duration = Duration::from_secs(600);
/// The SDK version the suite is written against (tests/mcp/requirements.txt).
const SDK_VERSION: &str = "2.3.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$IPC_MESH_PYTHON`, else `<repo>/.venv/bin/python`; panics with directions when missing.
fn python() -> PathBuf {
    let python = match std::env::var_os("IPC_MESH_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo().join(".venv/bin/python"),
    };
    let how = "create it with:\n    python3 -m venv .venv && .venv/bin/pip install -r tests/mcp/requirements.txt\n(or point IPC_MESH_PYTHON at a python that has them)";
    assert!(
        python.exists(),
        "the MCP conformance suite needs a Python virtual environment at {}; {how}",
        python.display()
    );
    let probe = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m, pytest, anyio; print(m.version('mcp'))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let version = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    assert!(
        probe.status.success() && version == SDK_VERSION,
        "{} lacks the pinned MCP SDK (mcp=={SDK_VERSION}, pytest, anyio; found mcp {version:?}): {}\n{how}",
        python.display(),
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    python
}

/// Runs pytest in `tests/mcp/` with `args`; panics if it fails or overruns [`SUITE_BOUND`].
pub fn pytest(args: &[&str]) {
    let python = python();
    let dir: &Path = &repo().join("tests/mcp");
    let mut child = Command::new(&python)
        .args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"])
        .args(args)
        .current_dir(dir)
        .env("IPC_MESH_BIN", env!("CARGO_BIN_EXE_ipc-mesh"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("IPC_MESH_HOME")
        .env_remove("IPC_MESH_BROKER")
        .env_remove("IPC_MESH_AGENT")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start pytest with {}: {e}", python.display()));
    let deadline = Instant::now() + SUITE_BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("can wait for pytest") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the MCP suite ran longer than {SUITE_BOUND:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "the MCP suite failed ({status}); pytest's report is above"
    );
}
