"""Drives the gateway's MCP endpoint with the official MCP Python SDK.

Used by tests/tests/mcp_endpoint.rs: reads a plan as JSON on stdin

    {"url": ..., "mode": "auto" | "legacy" | "2026-07-28", "token": ...,
     "steps": [{"op": "tools"}, {"op": "call", "tool": ..., "args": {...}}, ...]}

connects with the SDK's Streamable HTTP client (bearer token in the
Authorization header), runs the steps in one connection and prints one JSON
object with what the client saw. It asserts nothing: the Rust test does.
The token is never printed.
"""

import asyncio
import base64
import json
import sys

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def content_of(item):
    out = {"type": item.type}
    if item.type == "text":
        out["text"] = item.text
    elif item.type == "resource":
        res = item.resource
        out["uri"] = str(res.uri)
        out["mimeType"] = res.mime_type
        blob = getattr(res, "blob", None)
        if blob is not None:
            out["blob_bytes"] = len(base64.b64decode(blob))
            out["blob_b64"] = blob
    return out


async def run(plan):
    headers = {"Authorization": f"Bearer {plan['token']}"}
    seen = {"steps": []}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(plan["url"], http_client=http), mode=plan["mode"]) as client:
            seen["protocol_version"] = client.protocol_version
            info = client.server_info
            seen["server_name"] = info.name if info else None
            for step in plan["steps"]:
                try:
                    if step["op"] == "tools":
                        tools = await client.list_tools()
                        seen["steps"].append({
                            "tools": [
                                {
                                    "name": t.name,
                                    "inputSchema": t.input_schema,
                                    "annotations": t.annotations.model_dump(by_alias=True, exclude_none=True) if t.annotations else None,
                                }
                                for t in tools.tools
                            ]
                        })
                    elif step["op"] == "call":
                        r = await client.call_tool(step["tool"], step.get("args", {}))
                        seen["steps"].append({
                            "is_error": bool(r.is_error),
                            "structured": r.structured_content,
                            "content": [content_of(c) for c in r.content],
                        })
                except MCPError as e:
                    seen["steps"].append({"rpc_error": {"code": e.code, "message": str(e)}})
    return seen


def describe(e):
    """An exception, with the leaves of an exception group."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(describe(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}"


def main():
    plan = json.load(sys.stdin)
    try:
        seen = asyncio.run(run(plan))
    except Exception as e:  # noqa: BLE001 - reported to the Rust test as data
        seen = {"failed": describe(e).replace(plan["token"], "[token]")}
    json.dump(seen, sys.stdout)


if __name__ == "__main__":
    main()
