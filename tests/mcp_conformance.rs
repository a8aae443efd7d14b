//! The MCP conformance suite: `tests/mcp/`, driven by the official Python MCP SDK (pinned in
//! `tests/mcp/requirements.txt`), against this build's `ipc-mesh mcp`.
//!
//! 1. Find the Python of the suite's virtual environment: `$IPC_MESH_PYTHON`, else
//!    `<repo>/.venv/bin/python`. Missing, or without the pinned SDK, is a failure that says how
//!    to create it: a conformance suite that silently skips proves nothing.
//! 2. Run pytest on every file but the failover one (that has its own runner, so the two can
//!    be run, and fail, separately), with the binary in `$IPC_MESH_BIN`.
//! 3. Fail with pytest's output when any test fails, or when the suite overruns its bound.

#[path = "mcp/runner.rs"]
mod runner;

#[test]
fn mcp_conformance_suite() {
    runner::pytest(&["--ignore=test_failover.py"]);
}
