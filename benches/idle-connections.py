"""Holds N idle keep-alive HTTP/1.1 connections to 127.0.0.1:PORT, each after one request.

    python3 benches/idle-connections.py PORT N KEY

Prints "holding N" once every connection has had its answer, then keeps them open until it
is killed (benches/latency-matrix.sh measures the server's memory meanwhile). A connection that
fails is reported on stderr and the script exits 1.
"""

import asyncio
import sys


async def one(port: int, key: str, sem: asyncio.Semaphore, keep: list) -> None:
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /bench/x HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\n\r\n"
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n")[0].decode(errors="replace"))
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        keep.append(writer)


async def main() -> None:
    port, count, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    keep: list = []
    sem = asyncio.Semaphore(256)
    try:
        await asyncio.gather(*(one(port, key, sem, keep) for _ in range(count)))
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"connection failed after {len(keep)}: {e!r}", file=sys.stderr)
        sys.exit(1)
    print(f"holding {len(keep)}", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
