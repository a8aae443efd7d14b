"""Measures what the MCP server promises on timing (not a test; run by hand).

    IPC_MESH_BIN=target/release/ipc-mesh python tests/mcp/measure.py [runs]

1. Start-up: time from spawning `ipc-mesh mcp --agent NAME` (fresh home, free port, so the
   process also becomes the broker) to the `initialize` reply on stdout.
2. Failover: two processes, the first hosting the broker; the host is killed with SIGKILL and
   the survivor is immediately asked for a `send`. Time from the kill to that reply.
Prints each sample and the median of each.
"""

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from conftest import Mesh


def startup(runs: int) -> list[float]:
    samples = []
    for i in range(runs):
        home = Path(tempfile.mkdtemp())
        mesh = Mesh(home / "home")
        try:
            r = mesh.raw(agent=f"m{i}")
            reply = r.initialize()
            took = time.monotonic() - r.started
            assert reply["result"]["serverInfo"]["name"] == "ipc-mesh"
            samples.append(took)
            r.close_stdin()
            r.wait_exit(5)
        finally:
            mesh.close()
            shutil.rmtree(home, ignore_errors=True)
    return samples


def failover(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        home = Path(tempfile.mkdtemp())
        mesh = Mesh(home / "home")
        try:
            host = mesh.raw(agent="host")
            host.initialize()
            assert host.call("mesh_status", {})["result"]["structuredContent"]["session"]["hosting"]
            survivor = mesh.raw(agent="survivor")
            survivor.initialize()
            st = survivor.call("mesh_status", {})["result"]["structuredContent"]
            assert st["session"]["hosting"] is False
            time.sleep(0.2)
            host.kill9()
            killed = time.monotonic()
            reply = survivor.call("send", {"to_id": "survivor", "content": "after the kill"})
            took = time.monotonic() - killed
            assert reply["result"]["isError"] is False, reply
            assert survivor.call("mesh_status", {})["result"]["structuredContent"]["session"]["hosting"]
            samples.append(took)
            survivor.close_stdin()
            survivor.wait_exit(5)
        finally:
            mesh.close()
            shutil.rmtree(home, ignore_errors=True)
    return samples


def report(name: str, samples: list[float]) -> None:
    ms = ", ".join(f"{s * 1000:.1f}" for s in samples)
    print(f"{name}: median {statistics.median(samples) * 1000:.1f} ms over {len(samples)} runs ({ms})")


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    report("spawn -> initialize reply", startup(runs))
    report("kill -9 of the broker host -> next tool call served", failover(runs))
