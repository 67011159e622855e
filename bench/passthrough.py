"""The Python floor: a bare ASGI pass-through (uvicorn + uvloop + httptools, relaying with aiohttp).

No parsing, no auth, no metering: the request body goes upstream as it came (with the upstream key),
the answer comes back byte for byte, a stream chunk by chunk as read. `--client pyreqwest` relays with
the gateway's own upstream client instead, for the floor of that client.

    python bench/passthrough.py --port 8201 --upstream http://127.0.0.1:8101 --key sk-upstream-test
"""

import argparse

import aiohttp
import uvicorn
from pyreqwest.client import ClientBuilder

args = argparse.Namespace()
state = {}  # type: ignore[var-annotated]


async def lifespan(receive, send):  # type: ignore[no-untyped-def]
    while (await receive())["type"] != "lifespan.shutdown":
        if args.client == "pyreqwest":
            state["client"] = ClientBuilder().build()
        else:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            state["client"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        await send({"type": "lifespan.startup.complete"})
    await state["client"].close()
    return await send({"type": "lifespan.shutdown.complete"})


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    headers = {"authorization": f"Bearer {args.key}", "content-type": "application/json"}
    if args.client == "pyreqwest":
        request = state["client"].post(args.upstream + scope["path"]).headers(headers).body_bytes(body)
        async with request.streamed_read_buffer_limit(1).build_streamed() as r:
            out = [(b"content-type", r.headers.get("content-type", "application/json").encode())]
            await send({"type": "http.response.start", "status": r.status, "headers": out})
            while (chunk := await r.body_reader.read_chunk()) is not None:
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        return
    async with state["client"].post(args.upstream + scope["path"], data=body, headers=headers) as r:
        out = [(b"content-type", r.headers.get("content-type", "application/json").encode())]
        await send({"type": "http.response.start", "status": r.status, "headers": out})
        async for chunk in r.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:8101")
    parser.add_argument("--key", default="sk-upstream-test")
    parser.add_argument("--client", choices=("aiohttp", "pyreqwest"), default="aiohttp")
    parser.parse_args(namespace=args)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )
