"""tools/list: the nine tools, in order, with input and output schemas."""

import pytest

pytestmark = pytest.mark.anyio

NAMES = [
    "register",
    "send",
    "broadcast",
    "check",
    "wait",
    "list_instances",
    "rename",
    "share_file",
    "mesh_status",
]

REQUIRED = {
    "register": ["instance_id"],
    "send": ["to_id", "content"],
    "broadcast": ["content"],
    "check": [],
    "wait": [],
    "list_instances": [],
    "rename": ["new_id"],
    "share_file": ["to_id", "filepath"],
    "mesh_status": [],
}

OPTIONAL = {
    "send": ["data", "reply_to", "hold"],
    "broadcast": ["data"],
    "check": ["limit", "include_read"],
    "wait": ["timeout_secs"],
    "share_file": ["description"],
}


async def test_tools_list_names_order_and_schemas(mesh):
    async with mesh.session() as s:
        tools = (await s.list_tools()).tools
        assert [t.name for t in tools] == NAMES
        for t in tools:
            schema = t.input_schema
            assert schema["type"] == "object"
            assert schema["additionalProperties"] is False
            assert sorted(schema.get("required", [])) == sorted(REQUIRED[t.name])
            assert sorted(schema["properties"]) == sorted(REQUIRED[t.name] + OPTIONAL.get(t.name, []))
            out = t.output_schema
            assert out["type"] == "object"
            assert "unread" in out["required"], t.name
            assert len(t.description) > 60, t.name
        by_name = {t.name: t for t in tools}
        # The model must learn that messages only arrive through check or wait.
        for name in ["register", "check", "wait", "send"]:
            d = by_name[name].description
            assert "check" in d or "wait" in d, name
        assert by_name["wait"].input_schema["properties"]["timeout_secs"]["maximum"] == 50
        assert by_name["send"].input_schema["properties"]["data"]["type"] == "object"
        assert "from" not in by_name["send"].input_schema["properties"]  # identity is the session's


async def test_tools_list_is_static(mesh):
    async with mesh.session() as s:
        first = (await s.list_tools()).tools
        await s.call_tool("register", {"instance_id": "static"})
        second = (await s.list_tools()).tools
        assert [t.model_dump() for t in first] == [t.model_dump() for t in second]
