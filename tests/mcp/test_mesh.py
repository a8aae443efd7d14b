"""The MCP tools across a federated mesh: two brokers, an agent on each."""

import subprocess
import time

from conftest import BIN, free_port


def start_broker(mesh, port, *peers):
    args = [BIN, "broker", "--listen", f"127.0.0.1:{port}"]
    for p in peers:
        args += ["--peer", f"127.0.0.1:{p}"]
    proc = subprocess.Popen(args, env=mesh.env(IPC_MESH_BROKER=None), stderr=subprocess.DEVNULL)
    mesh.procs.append(proc)
    deadline = time.monotonic() + 10
    while subprocess.run([BIN, "--broker", f"127.0.0.1:{port}", "health"], env=mesh.env()).returncode != 0:
        assert time.monotonic() < deadline, "broker did not start"
        time.sleep(0.1)
    return proc


def test_agents_on_two_brokers_message_each_other(mesh):
    p1, p2 = free_port(), free_port()
    start_broker(mesh, p1)
    start_broker(mesh, p2, p1)
    alice = mesh.raw(agent="alice", IPC_MESH_BROKER=f"127.0.0.1:{p1}")
    bob = mesh.raw(agent="bob", IPC_MESH_BROKER=f"127.0.0.1:{p2}")
    alice.initialize()
    bob.initialize()
    assert bob.call("mesh_status", {})["result"]["isError"] is False

    # The registries converge: alice sees bob on the other broker (bounded wait).
    deadline = time.monotonic() + 15
    while True:
        agents = alice.call("list_instances", {})["result"]["structuredContent"]["agents"]
        if any(a["name"] == "bob" for a in agents):
            break
        assert time.monotonic() < deadline, f"bob never appeared: {agents}"
        time.sleep(0.2)

    sent = alice.call("send", {"to_id": "bob", "content": "across the mesh"})["result"]
    assert sent["isError"] is False, sent
    assert sent["structuredContent"]["route"] == "remote"
    got = bob.call("wait", {"timeout_secs": 15})["result"]["structuredContent"]
    assert [m["content"] for m in got["messages"]] == ["across the mesh"]
    assert got["messages"][0]["from"] == "alice"
    alice.all_stdout_is_jsonrpc()
    bob.all_stdout_is_jsonrpc()
