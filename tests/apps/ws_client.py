"""A WebSocket client (the `websockets` package): connects to URL, sends two text messages and one binary
message, prints each answer, closes. Exit 0 when every answer came back.

    python ws_client.py ws://HOST:PORT/ws
"""
import asyncio
import sys

from websockets.asyncio.client import connect


async def main(url):
    async with connect(url, open_timeout=10) as ws:
        for msg in ["one", "two", b"\x00\x01binary"]:
            await ws.send(msg)
            print(repr(await asyncio.wait_for(ws.recv(), 10)), flush=True)


asyncio.run(main(sys.argv[1]))
