"""Two MCP server processes, two agents, talking through the mesh."""

import anyio
import pytest

from conftest import text_of

pytestmark = pytest.mark.anyio


async def ok(session, tool, args=None):
    r = await session.call_tool(tool, args or {})
    assert r.is_error is False, f"{tool}: {text_of(r)}"
    assert isinstance(r.structured_content["unread"], int) or tool in ("list_instances", "mesh_status")
    return r.structured_content


async def test_two_agents_exchange_messages(mesh):
    async with mesh.session(agent="alice") as alice, mesh.session() as bob:
        # bob registers through the tool; alice was registered by IPC_MESH_AGENT.
        reg = await ok(bob, "register", {"instance_id": "bob"})
        assert reg == {"name": "bob", "broker": reg["broker"], "created": True, "unread": 0}

        sent = await ok(alice, "send", {"to_id": "bob", "content": "hello bob", "data": {"task": 7}})
        assert sent["to"] == "bob" and sent["route"] == "local" and sent["id"]

        got = await ok(bob, "check")
        assert got["unread"] == 0
        [m] = got["messages"]
        assert m == {
            "id": sent["id"],
            "from": "alice",
            "to": "bob",
            "sent_at": m["sent_at"],
            "content": "hello bob",
            "data": {"task": 7},
            "reply_to": None,
        }
        assert m["sent_at"].endswith("Z")
        # check marked it read: it does not come back.
        assert (await ok(bob, "check"))["messages"] == []
        assert [x["id"] for x in (await ok(bob, "check", {"include_read": True}))["messages"]] == [sent["id"]]

        # A reply, with reply_to, seen through wait.
        answer = await ok(bob, "send", {"to_id": "alice", "content": "hi alice", "reply_to": sent["id"]})
        waited = await ok(alice, "wait", {"timeout_secs": 5})
        assert waited["timed_out"] is False
        assert [(x["id"], x["reply_to"]) for x in waited["messages"]] == [(answer["id"], sent["id"])]


async def test_wait_wakes_up_when_a_message_arrives(mesh):
    async with mesh.session(agent="waiter") as w, mesh.session(agent="sender") as s:
        await ok(s, "list_instances")  # both registered before the race starts
        result = {}

        async def waiting():
            start = anyio.current_time()
            result["r"] = await ok(w, "wait", {"timeout_secs": 20})
            result["took"] = anyio.current_time() - start

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await anyio.sleep(0.5)
            # A send on another session while the wait blocks: not held up by it.
            with anyio.fail_after(3):
                await ok(s, "send", {"to_id": "waiter", "content": "wake up"})
        assert [m["content"] for m in result["r"]["messages"]] == ["wake up"]
        assert result["took"] < 5


async def test_wait_times_out_empty(mesh):
    async with mesh.session(agent="lonely") as s:
        start = anyio.current_time()
        r = await ok(s, "wait", {"timeout_secs": 0.5})
        assert r == {"messages": [], "timed_out": True, "unread": 0}
        assert 0.4 < anyio.current_time() - start < 5


async def test_concurrent_calls_on_one_session(mesh):
    # A long wait and sends on the same session run at once (pipelined connection).
    async with mesh.session(agent="busy") as s, mesh.session(agent="peer") as p:
        await ok(p, "list_instances")
        async with anyio.create_task_group() as tg:
            tg.start_soon(ok, s, "wait", {"timeout_secs": 3})
            await anyio.sleep(0.2)
            with anyio.fail_after(2):
                for i in range(5):
                    await ok(s, "send", {"to_id": "peer", "content": f"m{i}"})
        got = await ok(p, "check")
        assert [m["content"] for m in got["messages"]] == [f"m{i}" for i in range(5)]


async def test_broadcast_reaches_everyone_else(mesh):
    async with mesh.session(agent="a1") as a1, mesh.session(agent="a2") as a2, mesh.session(agent="a3") as a3:
        await ok(a2, "list_instances")
        await ok(a3, "list_instances")
        b = await ok(a1, "broadcast", {"content": "standup in 5", "data": {"room": "x"}})
        assert b["reached"] == 2 and b["skipped"] == []
        for s in (a2, a3):
            [m] = (await ok(s, "check"))["messages"]
            assert m["content"] == "standup in 5" and m["from"] == "a1" and m["data"] == {"room": "x"}
        assert (await ok(a1, "check"))["messages"] == []


async def test_list_instances_shows_agents_and_you(mesh):
    async with mesh.session(agent="lister") as s, mesh.session(agent="other") as o:
        await ok(o, "list_instances")
        r = await ok(s, "list_instances")
        assert r["you"] == "lister"
        by = {a["name"]: a for a in r["agents"]}
        assert set(by) == {"lister", "other"}
        assert by["other"]["online"] is True
        assert set(by["other"]) == {"name", "broker", "online", "last_seen"}
        assert "lister (you)" in text_of(await s.call_tool("list_instances", {}))


async def test_rename_renames_only_yourself_and_forwards(mesh):
    async with mesh.session(agent="oldname") as me, mesh.session(agent="friend") as friend:
        await ok(friend, "list_instances")
        r = await ok(me, "rename", {"new_id": "newname"})
        assert (r["old"], r["new"]) == ("oldname", "newname")
        # The token moved with the name.
        assert (mesh.home / "agents" / "newname.token").exists()
        assert not (mesh.home / "agents" / "oldname.token").exists()
        # Others were told.
        notices = (await ok(friend, "check"))["messages"]
        assert any("newname" in m["content"] for m in notices), notices
        # The old name forwards.
        sent = await ok(friend, "send", {"to_id": "oldname", "content": "still there?"})
        assert sent["route"] == "forwarded" and sent["to"] == "newname"
        assert [m["content"] for m in (await ok(me, "check"))["messages"]] == ["still there?"]
        assert (await ok(me, "list_instances"))["you"] == "newname"
        # Nobody can take the new name without its token (another home holds no token).
        async with mesh.session(env={"IPC_MESH_HOME": str(mesh.home) + "-other"}) as thief:
            t = await thief.call_tool("register", {"instance_id": "newname"})
            assert t.is_error is True


async def test_share_file_sends_a_text_file(mesh, tmp_path):
    f = tmp_path / "notes.md"
    f.write_text("# Plan\nstep one\n")
    async with mesh.session(agent="sharer") as s, mesh.session(agent="reader") as r:
        await ok(r, "list_instances")
        sent = await ok(s, "share_file", {"to_id": "reader", "filepath": str(f), "description": "the plan"})
        assert sent["file"] == {"path": str(f), "name": "notes.md", "bytes": 16}
        [m] = (await ok(r, "check"))["messages"]
        assert m["id"] == sent["id"]
        assert "# Plan\nstep one\n" in m["content"] and "the plan" in m["content"]
        assert m["data"]["file"]["name"] == "notes.md"


async def test_hold_keeps_a_message_for_an_agent_yet_to_come(mesh):
    async with mesh.session(agent="early") as s:
        r = await ok(s, "send", {"to_id": "latecomer", "content": "for later", "hold": True})
        assert r["route"] == "held"
    async with mesh.session(agent="latecomer") as late:
        assert [m["content"] for m in (await ok(late, "check"))["messages"]] == ["for later"]


async def test_identity_survives_a_restart_with_the_stored_token(mesh):
    async with mesh.session(agent="persistent") as s:
        await ok(s, "list_instances")
    token = (mesh.home / "agents" / "persistent.token").read_text()
    async with mesh.session(agent="writer") as w:
        await ok(w, "send", {"to_id": "persistent", "content": "while you were away"})
    async with mesh.session() as s:
        reg = await ok(s, "register", {"instance_id": "persistent"})
        assert reg["created"] is False and reg["unread"] == 1
        assert (mesh.home / "agents" / "persistent.token").read_text() == token


async def test_mesh_status_reports_the_session(mesh):
    async with mesh.session(agent="host") as h, mesh.session(agent="guest") as g:
        hs = await ok(h, "mesh_status")
        await until_attached(g)
        gs = await ok(g, "mesh_status")
        assert hs["session"] == {"name": "host", "broker_addr": mesh.addr, "hosting": True}
        assert gs["session"]["hosting"] is False
        assert hs["broker"]["id"] == gs["broker"]["id"]
        assert {"peers", "agents", "clock", "counters", "unread"} <= set(gs)


async def until_attached(s):
    r = await s.call_tool("mesh_status", {})
    assert r.is_error is False
    return r
