"""Opens N TCP connections to HOST:PORT, all at once (connects at most 200 at a time), and only when every
one is open sends one HTTP/1.1 request on each and reads its answer. Prints `ok N` when all N answered 200.

    python many_conns.py HOST PORT N
"""
import asyncio
import resource
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main():
    gate = asyncio.Semaphore(200)

    async def open_one():
        async with gate:
            return await asyncio.wait_for(asyncio.open_connection(host, port), 30)

    conns = await asyncio.gather(*[open_one() for _ in range(n)])
    print(f"open {len(conns)}", flush=True)

    async def ask(i, rw):
        r, w = rw
        w.write(f"GET /conn/{i} HTTP/1.1\r\nHost: vfx\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        head = await asyncio.wait_for(r.readline(), 60)
        w.close()
        return head.startswith(b"HTTP/1.1 200")

    results = await asyncio.gather(*[ask(i, c) for i, c in enumerate(conns)])
    print(f"ok {sum(results)}" if all(results) else f"failed {results.count(False)} of {n}", flush=True)


asyncio.run(main())
