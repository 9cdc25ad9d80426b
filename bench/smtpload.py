"""A small SMTP load generator: N concurrent clients, M messages each, over loopback.

Plain SMTP with minimal client work (one write per command, no parsing beyond the reply code),
so the server under test, not the client, sets the pace. Prints messages/s and latency
percentiles; exits non-zero if any message was not accepted.

    python bench/smtpload.py --port 2525 --clients 8 --messages 250 --size 2048 [--reuse]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def message(n: int, size: int) -> bytes:
    head = (
        f"From: app@contoso.com\r\nTo: someone@example.org\r\nSubject: load {n}\r\n"
        f"Message-ID: <load-{n}@bench>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def _reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


async def _expect(reader: asyncio.StreamReader, code: int) -> None:
    got = await _reply(reader)
    if got != code:
        raise RuntimeError(f"expected {code}, got {got}")


async def client(host: str, port: int, ids: range, size: int, reuse: bool) -> list[float]:
    latencies: list[float] = []
    reader = writer = None
    for n in ids:
        start = time.perf_counter()
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
            await _expect(reader, 220)
            writer.write(b"EHLO bench.example\r\n")
            await _expect(reader, 250)
        assert reader is not None
        writer.write(b"MAIL FROM:<app@contoso.com>\r\n")
        await _expect(reader, 250)
        writer.write(b"RCPT TO:<someone@example.org>\r\n")
        await _expect(reader, 250)
        writer.write(b"DATA\r\n")
        await _expect(reader, 354)
        writer.write(message(n, size) + b".\r\n")
        await _expect(reader, 250)
        if not reuse:
            writer.write(b"QUIT\r\n")
            await _expect(reader, 221)
            writer.close()
            await writer.wait_closed()
            writer = None
        latencies.append(time.perf_counter() - start)
    if writer is not None:
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221)  # type: ignore[arg-type]
        writer.close()
    return latencies


async def run(host: str, port: int, clients: int, messages: int, size: int, reuse: bool) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(
        *(
            client(host, port, range(c * messages, (c + 1) * messages), size, reuse)
            for c in range(clients)
        )
    )
    elapsed = time.perf_counter() - start
    lat = sorted(x for r in results for x in r)
    return {
        "messages": len(lat),
        "seconds": elapsed,
        "rate": len(lat) / elapsed,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--messages", type=int, default=250, help="per client")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--reuse", action="store_true", help="several messages per connection")
    a = p.parse_args()
    r = asyncio.run(run(a.host, a.port, a.clients, a.messages, a.size, a.reuse))
    print(
        f"{r['messages']} messages in {r['seconds']:.2f}s: {r['rate']:.0f} msg/s, "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
