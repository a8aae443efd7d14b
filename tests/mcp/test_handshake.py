"""Both protocol eras: the initialize handshake and 2026-07-28 server/discover."""

import time
from contextlib import asynccontextmanager

import pytest

from conftest import BIN, LEGACY_VERSIONS
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _modern(mesh, args=None):
    """A session without the handshake, for the 2026-07-28 era."""
    params = StdioServerParameters(command=BIN, args=["mcp", *(args or [])], env=mesh.env())
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            yield s


@pytest.mark.parametrize("version", LEGACY_VERSIONS)
def test_initialize_echoes_every_handshake_version(mesh, version):
    r = mesh.raw()
    reply = r.initialize(version)
    result = reply["result"]
    assert result["protocolVersion"] == version
    assert result["serverInfo"]["name"] == "ipc-mesh"
    assert result["serverInfo"]["version"]
    assert "tools" in result["capabilities"]
    assert result["capabilities"]["experimental"] == {"claude/channel": {}}
    assert "check" in result["instructions"]


@pytest.mark.parametrize("version", ["2099-01-01", "1999-01-01", "2026-07-28"])
def test_initialize_with_an_unknown_version_is_answered_not_refused(mesh, version):
    r = mesh.raw()
    reply = r.initialize(version)
    assert "error" not in reply, reply
    assert reply["result"]["protocolVersion"] == "2025-11-25"


def test_initialize_is_answered_in_milliseconds_without_a_broker(mesh):
    # Nothing listens on the election address yet: the reply must not wait for the election.
    r = mesh.raw(agent="fast")
    reply = r.initialize()
    elapsed = time.monotonic() - r.started
    assert "result" in reply
    assert elapsed < 1.0, f"initialize took {elapsed:.3f} s from spawn"


async def test_sdk_legacy_handshake(mesh):
    async with mesh.session() as s:
        assert s.protocol_version == "2025-11-25"
        assert s.initialize_result.server_info.name == "ipc-mesh"


async def test_sdk_discover_then_stateless_tool_calls(mesh):
    async with _modern(mesh) as s:
        d = await s.discover()
        assert "2026-07-28" in d.supported_versions
        for v in LEGACY_VERSIONS:
            assert v in d.supported_versions
        assert s.protocol_version == "2026-07-28"
        assert s.server_info.name == "ipc-mesh"
        listed = await s.list_tools()
        assert [t.name for t in listed.tools][0] == "register"
        r = await s.call_tool("register", {"instance_id": "modern"})
        assert r.is_error is False, r
        assert r.structured_content["name"] == "modern"


async def test_raw_discover_does_not_lock_the_era(mesh):
    async with _modern(mesh) as s:
        raw = await s.send_discover("2026-07-28")
        assert raw["resultType"] == "complete"
        assert raw["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "ipc-mesh"
        init = await s.initialize()
        assert init.protocol_version == "2025-11-25"


async def test_legacy_era_answers_discover_with_method_not_found(mesh):
    async with _modern(mesh, args=["--era", "legacy"]) as s:
        with pytest.raises(MCPError) as e:
            await s.discover()
        assert e.value.code == -32601
        init = await s.initialize()
        assert init.protocol_version == "2025-11-25"


async def test_high_level_client_in_auto_mode(mesh):
    params = StdioServerParameters(command=BIN, args=["mcp"], env=mesh.env())
    async with Client(params, mode="auto") as c:
        r = await c.call_tool("list_instances", {})
        assert r.is_error is False
        assert r.structured_content["agents"] == []
        assert r.structured_content["unread"] is None


def test_ping_before_and_after_initialize(mesh):
    r = mesh.raw()
    assert r.request("ping")["result"] == {}
    r.initialize()
    assert r.request("ping")["result"] == {}


def test_notifications_before_initialize_are_ignored(mesh):
    r = mesh.raw()
    r.write({"jsonrpc": "2.0", "method": "notifications/initialized"})
    r.write({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 9}})
    r.write("this is not json")
    reply = r.initialize()
    assert reply["result"]["serverInfo"]["name"] == "ipc-mesh"
