"""An h2c server (the `h2` protocol library, as hypercorn uses it) that ends things abruptly, to check that
a workload's RST_STREAM and GOAWAY reach the client through the mesh:

    python h2_abrupt.py PORT

- `/rst`: answers 200 and a first DATA frame, then resets the stream (INTERNAL_ERROR) instead of ending it;
- `/goaway`: answers 200 "last" and sends GOAWAY: the connection takes no new stream;
- anything else: 200 "ok".
"""
import asyncio
import sys

import h2.config
import h2.connection
import h2.errors
import h2.events


async def serve(reader, writer):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    while True:
        data = await reader.read(65536)
        if not data:
            break
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            break
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                path = dict(ev.headers).get(":path", "")
                sid = ev.stream_id
                if path == "/rst":
                    conn.send_headers(sid, [(":status", "200")])
                    conn.send_data(sid, b"partial")
                    conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
                elif path == "/goaway":
                    conn.send_headers(sid, [(":status", "200"), ("content-length", "4")])
                    conn.send_data(sid, b"last", end_stream=True)
                    conn.close_connection(last_stream_id=sid)
                else:
                    conn.send_headers(sid, [(":status", "200"), ("content-length", "2")])
                    conn.send_data(sid, b"ok", end_stream=True)
        writer.write(conn.data_to_send())
        await writer.drain()
    writer.close()


async def main():
    server = await asyncio.start_server(serve, None, int(sys.argv[1]))  # every address, IPv4 and IPv6
    async with server:
        await server.serve_forever()


asyncio.run(main())
