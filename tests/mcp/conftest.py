"""Fixtures for the ipc-mesh MCP suite, driven by the official Python SDK.

Every test gets its own home folder and a free election port, so tests never touch
~/.ipc-mesh or 127.0.0.1:9876 and can run side by side. The binary comes from $IPC_MESH_BIN
(the Rust runners pass env!("CARGO_BIN_EXE_ipc-mesh")).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

BIN = os.environ.get("IPC_MESH_BIN", "")

LEGACY_VERSIONS = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"]


def pytest_configure(config):
    if not BIN or not os.access(BIN, os.X_OK):
        raise pytest.UsageError(
            f"IPC_MESH_BIN must name the ipc-mesh binary (got {BIN!r}); "
            "run the suite through `cargo test --test mcp_conformance`"
        )


@pytest.fixture
def anyio_backend():
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mesh:
    """One test's mesh: a home folder and an election address."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def env(self, agent: str | None = None, **extra: str | None) -> dict[str, str]:
        env = {
            "IPC_MESH_HOME": str(self.home),
            "IPC_MESH_BROKER": self.addr,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
        }
        if agent:
            env["IPC_MESH_AGENT"] = agent
        env.update(extra)
        # A value of None removes the variable (e.g. IPC_MESH_BROKER, to use the config).
        return {k: v for k, v in env.items() if v is not None}

    def write_config(self, text: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "mesh.toml").write_text(text)

    @asynccontextmanager
    async def session(self, agent: str | None = None, args: list[str] | None = None, **kw):
        """An SDK session (legacy handshake done) with one `ipc-mesh mcp` process."""
        env = self.env(agent, **kw.pop("env", {}))
        params = StdioServerParameters(command=BIN, args=["mcp", *(args or [])], env=env)
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write, **kw) as s:
                await s.initialize()
                yield s

    def raw(self, agent: str | None = None, args: list[str] | None = None, **env) -> "Raw":
        r = Raw([BIN, "mcp", *(args or [])], self.env(agent, **env))
        self.procs.append(r.proc)
        return r

    def cli(self, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN, *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


@pytest.fixture
def mesh(tmp_path):
    m = Mesh(tmp_path / "home")
    yield m
    m.close()


class Raw:
    """`ipc-mesh mcp` driven line by line, to check exactly what appears on stdout."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.stdout_log: list[bytes] = []
        self.stderr_log: list[bytes] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines, self.stdout_log), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, None, self.stderr_log), daemon=True).start()
        self.next_id = 1

    @staticmethod
    def _pump(stream, q, log):
        for line in iter(stream.readline, b""):
            log.append(line)
            if q is not None:
                q.put(line)
        if q is not None:
            q.put(None)

    def write(self, obj) -> None:
        data = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        if isinstance(data, str):
            data = data.encode()
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 10) -> dict:
        """The next stdout line, which must be one JSON-RPC message."""
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"stdout closed; stderr: {self.stderr()}"
        msg = json.loads(line)
        assert msg.get("jsonrpc") == "2.0", f"not JSON-RPC: {line!r}"
        return msg

    def request(self, method: str, params=None, timeout: float = 10) -> dict:
        rid = self.next_id
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.write(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.read(max(0.01, deadline - time.monotonic()))
            if reply.get("id") == rid:
                return reply
            # Notifications (channel pushes) may come first.
            assert "id" not in reply or "method" in reply, f"reply to another id: {reply}"

    def initialize(self, version: str = "2025-11-25", capabilities=None) -> dict:
        reply = self.request(
            "initialize",
            {"protocolVersion": version, "capabilities": capabilities or {}, "clientInfo": {"name": "raw", "version": "0"}},
        )
        self.write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply

    def call(self, name: str, arguments=None, timeout: float = 15) -> dict:
        params = {"name": name}
        if arguments is not None:
            params["arguments"] = arguments
        return self.request("tools/call", params, timeout)

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stderr(self) -> str:
        return b"".join(self.stderr_log).decode(errors="replace")

    def all_stdout_is_jsonrpc(self) -> None:
        for line in self.stdout_log:
            msg = json.loads(line)
            assert msg.get("jsonrpc") == "2.0", line


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def until(predicate, timeout: float, interval: float = 0.05):
    """Polls an async predicate until it returns a truthy value (bounded in time)."""
    import anyio

    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await anyio.sleep(interval)
