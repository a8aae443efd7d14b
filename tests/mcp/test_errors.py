"""Failures the model can act on are isError results; protocol misuse is a JSON-RPC error."""

import pytest

from conftest import text_of
from mcp.shared.exceptions import MCPError

pytestmark = pytest.mark.anyio


async def failed(session, tool, args):
    r = await session.call_tool(tool, args)
    assert r.is_error is True, f"{tool} should fail: {text_of(r)}"
    return text_of(r)


async def test_not_registered_says_to_register(mesh):
    async with mesh.session() as s:
        for tool, args in [
            ("send", {"to_id": "x", "content": "y"}),
            ("check", {}),
            ("wait", {"timeout_secs": 1}),
            ("broadcast", {"content": "y"}),
            ("rename", {"new_id": "z"}),
            ("share_file", {"to_id": "x", "filepath": "/etc/hostname"}),
        ]:
            text = await failed(s, tool, args)
            assert "not registered" in text and "register" in text, (tool, text)


async def test_unknown_recipient_names_the_closest_agents(mesh):
    async with mesh.session(agent="gemini-frontend") as g, mesh.session(agent="claude") as c:
        await c.call_tool("list_instances", {})
        text = await failed(g, "send", {"to_id": "claud", "content": "typo"})
        assert "claud" in text and "claude" in text and "hold" in text
        assert (await c.call_tool("check", {})).structured_content["messages"] == []


async def test_inbox_full_says_to_wait(mesh):
    mesh.write_config("[limits]\ninbox_max = 2\n")
    async with mesh.session(agent="fast") as f, mesh.session(agent="slow") as s:
        await s.call_tool("list_instances", {})
        for i in range(2):
            assert (await f.call_tool("send", {"to_id": "slow", "content": str(i)})).is_error is False
        text = await failed(f, "send", {"to_id": "slow", "content": "one too many"})
        assert "full" in text and "resend" in text


async def test_register_refusals(mesh):
    async with mesh.session(agent="taken") as _owner:
        await _owner.call_tool("list_instances", {})
        async with mesh.session(env={"IPC_MESH_HOME": str(mesh.home) + "-2"}) as other:
            text = await failed(other, "register", {"instance_id": "taken"})
            assert "held by another agent" in text
            text = await failed(other, "register", {"instance_id": "bad name!"})
            assert "1-32" in text
        text = await failed(_owner, "register", {"instance_id": "someone-else"})
        assert "already registered as taken" in text and "rename" in text


async def test_share_file_refuses_what_it_cannot_send(mesh, tmp_path):
    mesh.write_config("[limits]\nmax_message_bytes = 2048\n")
    big = tmp_path / "big.txt"
    big.write_text("x" * 4096)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\xff\xfe binary")
    async with mesh.session(agent="sharer") as s, mesh.session(agent="to") as t:
        await t.call_tool("list_instances", {})
        text = await failed(s, "share_file", {"to_id": "to", "filepath": str(tmp_path)})
        assert "directory" in text
        text = await failed(s, "share_file", {"to_id": "to", "filepath": str(tmp_path / "missing.txt")})
        assert "does not exist" in text
        text = await failed(s, "share_file", {"to_id": "to", "filepath": str(big)})
        assert "too large" in text and "4096" in text
        text = await failed(s, "share_file", {"to_id": "to", "filepath": str(binary)})
        assert "UTF-8" in text
        text = await failed(s, "share_file", {"to_id": "to", "filepath": "/dev/null"})
        assert "not a regular file" in text
        assert (await t.call_tool("check", {})).structured_content["messages"] == []


async def test_message_too_large(mesh):
    mesh.write_config("[limits]\nmax_message_bytes = 1024\n")
    async with mesh.session(agent="verbose") as s:
        text = await failed(s, "send", {"to_id": "verbose", "content": "y" * 2000})
        assert "limit" in text


@pytest.mark.parametrize(
    "tool,args,needle",
    [
        ("no_such_tool", {}, "Unknown tool"),
        ("send", {"to_id": "x"}, "missing required property 'content'"),
        ("send", {"to_id": "x", "content": 5}, "'content' must be a string"),
        ("send", {"to_id": "x", "content": "y", "from": "mallory"}, "unknown property 'from'"),
        ("send", {"to_id": "x", "content": "y", "data": "not an object"}, "'data' must be an object"),
        ("wait", {"timeout_secs": 120}, "between 0 and 50"),
        ("check", {"limit": "ten"}, "'limit' must be an integer"),
        ("register", {}, "missing required property 'instance_id'"),
    ],
)
async def test_protocol_misuse_is_a_json_rpc_error(mesh, tool, args, needle):
    async with mesh.session(agent="misuser") as s:
        with pytest.raises(MCPError) as e:
            await s.call_tool(tool, args)
        assert e.value.code == -32602
        assert needle in str(e.value)


def test_malformed_params_and_unknown_methods(mesh):
    r = mesh.raw()
    r.initialize()
    reply = r.request("tools/call", {"name": "send", "arguments": "oops"})
    assert reply["error"]["code"] == -32602
    reply = r.request("tools/call", {"arguments": {}})
    assert reply["error"]["code"] == -32602
    reply = r.request("no/such/method", {})
    assert reply["error"]["code"] == -32601
    # The session is still fine.
    assert r.request("tools/list")["result"]["tools"][0]["name"] == "register"
    r.all_stdout_is_jsonrpc()
