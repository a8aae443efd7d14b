"""The democratic election: the broker host dies, a survivor takes over, nothing is lost.

Run by tests/mcp_failover.rs. Every loop here is bounded in count and in time.
"""

import collections
import time

import anyio
import pytest

from conftest import text_of, until

pytestmark = pytest.mark.anyio

PER_SENDER = 60
KILL_AFTER = 15


async def status(session):
    r = await session.call_tool("mesh_status", {})
    assert r.is_error is False, text_of(r)
    return r.structured_content


async def drain(session, rounds=20):
    """Every message the session has, via check, until an empty check (bounded)."""
    got = []
    for _ in range(rounds):
        r = await session.call_tool("check", {"limit": 1000})
        assert r.is_error is False, text_of(r)
        if not r.structured_content["messages"]:
            return got
        got += r.structured_content["messages"]
    raise AssertionError("inbox never drained")


async def test_host_killed_with_messages_in_flight(mesh):
    host = mesh.raw(agent="host")
    host.initialize()
    first = host.call("mesh_status", {})["result"]["structuredContent"]
    assert first["session"]["hosting"] is True
    broker_id = first["broker"]["id"]

    async with mesh.session(agent="b") as b, mesh.session(agent="c") as c:
        for s in (b, c):
            st = await status(s)
            assert st["session"]["hosting"] is False and st["broker"]["id"] == broker_id
        # Queued for the host's agent before its process dies.
        r = await b.call_tool("send", {"to_id": "host", "content": "for the host, kept"})
        assert r.is_error is False

        acked = {"b": [], "c": []}  # recipient -> contents whose send returned an id
        failures = []
        times = {}

        async def sender(session, me, to):
            for i in range(PER_SENDER):
                content = f"{me}->{to} #{i}"
                began = time.monotonic()
                r = await session.call_tool("send", {"to_id": to, "content": content})
                if r.is_error:
                    failures.append((content, text_of(r)))
                else:
                    acked[to].append(content)
                    # Failover time: the first call begun after the kill, until it is served.
                    if began > times.get("killed", float("inf")) and "first_after" not in times:
                        times["first_after"] = time.monotonic()
                await anyio.sleep(0.01)

        async def killer():
            await until(lambda: _ready(acked, KILL_AFTER), timeout=20)
            host.kill9()
            times["killed"] = time.monotonic()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sender, b, "b", "c")
                tg.start_soon(sender, c, "c", "b")
                tg.start_soon(killer)

        assert "killed" in times, "the host was never killed"
        assert failures == [], f"sends failed during the hand-over: {failures[:3]}"
        print(f"failover: first send served {times['first_after'] - times['killed']:.3f} s after kill -9")

        # Exactly one survivor hosts; both use the same broker, on the same data directory.
        sb, sc = await status(b), await status(c)
        assert [sb["session"]["hosting"], sc["session"]["hosting"]].count(True) == 1, (sb["session"], sc["session"])
        assert sb["broker"]["id"] == sc["broker"]["id"] == broker_id

        # Every acknowledged message arrives exactly once, in the order it was sent.
        for me, session in (("b", b), ("c", c)):
            contents = [m["content"] for m in await drain(session)]
            counts = collections.Counter(contents)
            dupes = [k for k, n in counts.items() if n > 1]
            assert dupes == [], f"{me} got duplicates: {dupes[:5]}"
            missing = [k for k in acked[me] if k not in counts]
            assert missing == [], f"{me} lost acknowledged messages: {missing[:5]}"
            assert contents == acked[me], f"{me}: out of order"
            assert len(contents) == PER_SENDER

        # The host's agent comes back (new process, same token) and finds its queued message.
        async with mesh.session(agent="host") as back:
            got = [m["content"] for m in await drain(back)]
            assert got == ["for the host, kept"]
            assert (await status(back))["session"]["hosting"] is False


def _ready(acked, n):
    async def check():
        return len(acked["b"]) >= n and len(acked["c"]) >= n

    return check()


async def test_host_exits_cleanly_and_a_survivor_takes_over(mesh):
    host = mesh.raw(agent="h")
    host.initialize()
    assert host.call("mesh_status", {})["result"]["structuredContent"]["session"]["hosting"] is True
    async with mesh.session(agent="s1") as s1, mesh.session(agent="s2") as s2:
        await status(s1)
        await status(s2)
        r = await s1.call_tool("send", {"to_id": "s2", "content": "before"})
        assert r.is_error is False
        host.close_stdin()
        assert host.wait_exit(3) == 0

        async def someone_hosts():
            a, b = await status(s1), await status(s2)
            hosting = [a["session"]["hosting"], b["session"]["hosting"]]
            return hosting.count(True) == 1 and a["broker"]["id"] == b["broker"]["id"]

        await until(someone_hosts, timeout=10, interval=0.1)
        r = await s1.call_tool("send", {"to_id": "s2", "content": "after"})
        assert r.is_error is False
        assert [m["content"] for m in await drain(s2)] == ["before", "after"]


async def test_three_hosts_in_a_row(mesh):
    """Each host in turn is killed; the last one standing still has every message."""
    procs = {f"p{i}": mesh.raw(agent=f"p{i}") for i in range(3)}
    for p in procs.values():
        p.initialize()
        assert p.call("mesh_status", {})["result"]["isError"] is False
    for i in range(2):
        r = procs["p1"].call("send", {"to_id": "p2", "content": f"note {i}"})
        assert r["result"]["isError"] is False
    for _ in range(2):
        alive = {n: p for n, p in procs.items() if p.proc.poll() is None}
        hosting = [n for n, p in alive.items() if p.call("mesh_status", {})["result"]["structuredContent"]["session"]["hosting"]]
        assert len(hosting) == 1, hosting
        alive[hosting[0]].kill9()
    [(name, last)] = [(n, p) for n, p in procs.items() if p.proc.poll() is None]
    st = last.call("mesh_status", {})["result"]["structuredContent"]
    assert st["session"]["hosting"] is True
    # p2's notes are intact, whether p2 survived or comes back as a new process.
    p2 = last if name == "p2" else mesh.raw(agent="p2")
    if p2 is not last:
        p2.initialize()
    got = p2.call("check", {"limit": 100})["result"]
    assert got["isError"] is False, got
    assert [m["content"] for m in got["structuredContent"]["messages"]] == ["note 0", "note 1"]


def test_a_wait_in_flight_rides_out_the_hand_over(mesh):
    host = mesh.raw(agent="w-host")
    host.initialize()
    assert host.call("mesh_status", {})["result"]["structuredContent"]["session"]["hosting"] is True
    waiter, sender = mesh.raw(agent="w-waiter"), mesh.raw(agent="w-sender")
    for p in (waiter, sender):
        p.initialize()
        assert p.call("mesh_status", {})["result"]["structuredContent"]["session"]["hosting"] is False
    waiter.write({"jsonrpc": "2.0", "id": 99, "method": "tools/call",
                  "params": {"name": "wait", "arguments": {"timeout_secs": 30}}})
    time.sleep(0.3)
    host.kill9()
    sent = sender.call("send", {"to_id": "w-waiter", "content": "after the hand-over"})["result"]
    assert sent["isError"] is False, sent
    start = time.monotonic()
    reply = waiter.read(timeout=15)
    assert reply["id"] == 99, reply
    result = reply["result"]
    assert result["isError"] is False, result
    assert [m["content"] for m in result["structuredContent"]["messages"]] == ["after the hand-over"]
    assert time.monotonic() - start < 5
