//! The democratic election under `kill -9`: `tests/mcp/test_failover.py`, driven by the
//! official Python MCP SDK against this build's `ipc-mesh mcp` processes.
//!
//! 1. Three `ipc-mesh mcp` processes share a home and a free election port; the first hosts.
//! 2. The host is killed with messages in flight; exactly one survivor must take over, the
//!    other reattach, and every acknowledged message must arrive exactly once, in order.
//! 3. Also: a clean exit of the host, and hosts killed one after another.
//!
//! The Python environment is found as in `mcp_conformance.rs`; missing, it is a failure.

#[path = "mcp/runner.rs"]
mod runner;

#[test]
fn mcp_failover_suite() {
    runner::pytest(&["test_failover.py"]);
}
