"""An ASGI app for hypercorn that answers with what it received, as JSON: the method token, the raw
request target, the HTTP version and every header. Served over HTTP/1.1 and h2c (prior knowledge) by
hypercorn, a server nobody in this project wrote, so the tests see exactly what reached the workload.

    hypercorn --bind '[::]:5000' tests/apps/echo.py:app

`/trailers` answers with a trailer (`x-echo-trailer: done`) when the client accepts trailers.
`/ws` is a WebSocket echo (hypercorn's own implementation of RFC 6455).
"""
import json


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await send({"type": "websocket.send", "text": "echo:" + msg["text"]})
            else:
                await send({"type": "websocket.send", "bytes": msg["bytes"]})
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    doc = {
        "method": scope["method"],
        "raw_path": scope["raw_path"].decode("latin-1"),
        "query": scope["query_string"].decode("latin-1"),
        "http_version": scope["http_version"],
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_len": len(body),
    }
    out = json.dumps(doc).encode()
    trailers = scope["path"] == "/trailers" and "http.response.trailers" in scope.get("extensions", {})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    if trailers:
        headers = [(b"content-type", b"application/json"), (b"trailer", b"x-echo-trailer")]
    await send({"type": "http.response.start", "status": 200, "headers": headers, "trailers": trailers})
    await send({"type": "http.response.body", "body": out, "more_body": False})
    if trailers:
        await send({"type": "http.response.trailers", "headers": [(b"x-echo-trailer", b"done")], "more_trailers": False})
