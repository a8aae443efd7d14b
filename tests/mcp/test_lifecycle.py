"""Exit on stdin close, cancellation, and nothing but JSON-RPC on stdout."""

import json
import time

import pytest

from conftest import free_port


def exit_after_close(r, bound=2.0) -> tuple[int, float]:
    start = time.monotonic()
    r.close_stdin()
    code = r.wait_exit(bound + 3)
    took = time.monotonic() - start
    assert took < bound, f"exited {took:.2f} s after stdin closed (bound {bound} s)"
    return code, took


def test_exit_0_when_stdin_closes_before_initialize(mesh):
    r = mesh.raw()
    code, _ = exit_after_close(r)
    assert code == 0
    assert r.stdout_log == []


def test_exit_when_stdin_closes_while_idle_and_hosting(mesh):
    r = mesh.raw(agent="idle")
    r.initialize()
    status = r.call("mesh_status", {})["result"]
    assert status["structuredContent"]["session"]["hosting"] is True
    code, _ = exit_after_close(r)
    assert code == 0
    r.all_stdout_is_jsonrpc()
    # The broker was shut down cleanly: another process can open the same data directory.
    r2 = mesh.raw(agent="next")
    r2.initialize()
    st = r2.call("mesh_status", {})["result"]
    assert st["isError"] is False, st
    assert st["structuredContent"]["session"]["hosting"] is True
    assert st["structuredContent"]["broker"]["id"] == status["structuredContent"]["broker"]["id"]


def test_exit_within_2s_with_a_wait_in_flight(mesh):
    r = mesh.raw(agent="waiting")
    r.initialize()
    r.write({"jsonrpc": "2.0", "id": 77, "method": "tools/call", "params": {"name": "wait", "arguments": {"timeout_secs": 50}}})
    time.sleep(0.5)
    code, _ = exit_after_close(r)
    assert code == 0
    r.all_stdout_is_jsonrpc()


def test_cancelled_call_gets_no_reply_and_the_session_goes_on(mesh):
    r = mesh.raw(agent="canceller")
    r.initialize()
    r.write({"jsonrpc": "2.0", "id": 50, "method": "tools/call", "params": {"name": "wait", "arguments": {"timeout_secs": 3}}})
    time.sleep(0.3)
    r.write({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 50, "reason": "user"}})
    reply = r.call("list_instances", {})
    assert reply["result"]["isError"] is False
    time.sleep(3.5)
    assert all(json.loads(line).get("id") != 50 for line in r.stdout_log), "cancelled request was answered"


def test_stdout_is_only_json_rpc_under_errors(mesh, tmp_path):
    # Debug logging on, a broker address nobody can serve (port 1 cannot be bound without
    # privileges... so use an address that is not local), and every kind of bad input.
    r = mesh.raw(
        agent="noisy",
        RUST_LOG="debug",
        IPC_MESH_BROKER="192.0.2.1:9",  # TEST-NET: never answers, never bindable
    )
    reply = r.initialize()
    assert "result" in reply
    r.write("not json at all")
    r.write({"jsonrpc": "2.0", "id": "x", "method": "tools/call", "params": {"name": "send", "arguments": "oops"}})
    assert r.read()["error"]["code"] == -32602
    reply = r.call("nope", {})
    assert reply["error"]["code"] == -32602
    start = time.monotonic()
    reply = r.call("send", {"to_id": "a", "content": "b"}, timeout=20)
    # No broker: a sentence saying what is going on, after the bounded wait.
    assert reply["result"]["isError"] is True
    assert "no broker answered" in reply["result"]["content"][0]["text"]
    assert time.monotonic() - start < 15
    code, _ = exit_after_close(r)
    assert code == 0
    r.all_stdout_is_jsonrpc()
    assert r.stderr(), "debug logs should go to stderr"


def test_bad_flags_fail_on_stderr_not_stdout(mesh):
    r = mesh.raw(IPC_MESH_AGENT="bad name!")
    code = r.wait_exit(5)
    assert code != 0
    assert r.stdout_log == []
    assert "--agent" in r.stderr()


def test_a_dedicated_broker_is_simply_used(mesh):
    port = free_port()
    import subprocess

    from conftest import BIN

    env = mesh.env()
    broker = subprocess.Popen([BIN, "broker", "--listen", f"127.0.0.1:{port}"], env=env, stderr=subprocess.PIPE)
    mesh.procs.append(broker)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run([BIN, "--broker", f"127.0.0.1:{port}", "health"], env=env).returncode != 0:
            assert time.monotonic() < deadline, "broker did not start"
            time.sleep(0.1)
        r = mesh.raw(agent="client", IPC_MESH_BROKER=f"127.0.0.1:{port}")
        r.initialize()
        st = r.call("mesh_status", {})["result"]
        assert st["isError"] is False, st
        assert st["structuredContent"]["session"]["hosting"] is False
        exit_after_close(r)
    finally:
        broker.terminate()
        broker.wait(10)


def adjacent_free_ports() -> int:
    """A port p with p + 1 free as well (bounded attempts)."""
    import socket

    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two adjacent free ports")


def test_without_broker_flag_the_nearest_sibling_is_used(mesh):
    import subprocess

    from conftest import BIN

    p = adjacent_free_ports()
    mesh.write_config(f'[broker]\nlisten = "127.0.0.1:{p}"\n[mesh]\nsibling_ports = "{p}-{p + 1}"\n')
    env = mesh.env(IPC_MESH_BROKER=None)
    sibling = f"127.0.0.1:{p + 1}"
    broker = subprocess.Popen([BIN, "broker", "--listen", sibling], env=env, stderr=subprocess.PIPE)
    mesh.procs.append(broker)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run([BIN, "--broker", sibling, "health"], env=env).returncode != 0:
            assert time.monotonic() < deadline, "broker did not start"
            time.sleep(0.1)
        r = mesh.raw(agent="near", IPC_MESH_BROKER=None)
        r.initialize()
        st = r.call("mesh_status", {})["result"]
        assert st["isError"] is False, st
        assert st["structuredContent"]["session"] == {"name": "near", "broker_addr": sibling, "hosting": False}
        exit_after_close(r)
    finally:
        broker.terminate()
        broker.wait(10)


def test_sigterm_stops_cleanly_and_releases_the_broker(mesh):
    import os
    import signal

    r = mesh.raw(agent="termed")
    r.initialize()
    first = r.call("mesh_status", {})["result"]["structuredContent"]
    assert first["session"]["hosting"] is True
    start = time.monotonic()
    os.kill(r.proc.pid, signal.SIGTERM)
    assert r.wait_exit(5) == 0
    assert time.monotonic() - start < 2
    r.all_stdout_is_jsonrpc()
    # The data directory was released: the next process hosts it, with the same broker id.
    r2 = mesh.raw(agent="next")
    r2.initialize()
    st = r2.call("mesh_status", {})["result"]["structuredContent"]
    assert st["session"]["hosting"] is True and st["broker"]["id"] == first["broker"]["id"]
