"""Push: notifications/claude/channel where the client takes them, nothing otherwise."""

import json
import time

import anyio
import pytest
from pydantic import BaseModel

from mcp.client.extension import NotificationBinding

pytestmark = pytest.mark.anyio


class ChannelParams(BaseModel):
    content: str
    meta: dict[str, str]


def push_of(r, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = r.read(timeout=max(0.01, deadline - time.monotonic()))
        if msg.get("method") == "notifications/claude/channel":
            return msg["params"]
    raise AssertionError("no channel notification")


def test_client_announcing_claude_channel_gets_pushes(mesh):
    r = mesh.raw(agent="listener")
    r.initialize(capabilities={"experimental": {"claude/channel": {}}})
    assert r.call("list_instances", {})["result"]["isError"] is False
    sender = mesh.raw(agent="talker")
    sender.initialize()
    sent = sender.call("send", {"to_id": "listener", "content": "pushed!", "data": {"n": 1}})
    mid = sent["result"]["structuredContent"]["id"]
    params = push_of(r)
    assert params["content"] == "pushed!"
    meta = params["meta"]
    assert meta["message_id"] == mid and meta["from"] == "talker" and json.loads(meta["data"]) == {"n": 1}
    # Claude Code drops meta keys outside [A-Za-z0-9_].
    assert all(k.replace("_", "").isalnum() for k in meta)
    # Pushed messages are delivered: check does not show them again.
    time.sleep(0.3)
    assert r.call("check", {})["result"]["structuredContent"]["messages"] == []


def test_without_the_capability_nothing_is_pushed(mesh):
    r = mesh.raw(agent="plain")
    r.initialize()
    assert r.call("list_instances", {})["result"]["isError"] is False
    sender = mesh.raw(agent="talker2")
    sender.initialize()
    sender.call("send", {"to_id": "plain", "content": "not pushed"})
    time.sleep(1.0)
    got = r.call("check", {})["result"]["structuredContent"]["messages"]
    assert [m["content"] for m in got] == ["not pushed"]
    assert not any(b"notifications/claude/channel" in line for line in r.stdout_log)


async def test_sdk_receives_pushes_with_channel_always(mesh):
    got: list[ChannelParams] = []
    arrived = anyio.Event()

    async def on_channel(p: ChannelParams):
        got.append(p)
        arrived.set()

    binding = NotificationBinding(method="notifications/claude/channel", params_type=ChannelParams, handler=on_channel)
    # The SDK cannot announce experimental client capabilities, so force it server-side.
    async with mesh.session(agent="sdk-listener", env={"IPC_MESH_CHANNEL": "always"}, notification_bindings=[binding]) as s:
        await s.call_tool("list_instances", {})
        async with mesh.session(agent="sdk-talker") as t:
            await t.call_tool("send", {"to_id": "sdk-listener", "content": "over the channel"})
        with anyio.fail_after(5):
            await arrived.wait()
        assert got[0].content == "over the channel"
        assert got[0].meta["from"] == "sdk-talker"
