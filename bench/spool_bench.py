"""Spool enqueue throughput: relay's journaled group commit against a naive file per message.

For 1, 8 and 32 concurrent callers, each cell enqueues a fixed number of messages (2 KB by
default) into a fresh directory and reports:

  * intake msg/s: until every enqueue has returned (the point where a listener sends its 250);
  * drained msg/s: until the spool is closed, i.e. every message also has its own file in queue/
    and the journal is checkpointed (the naive baseline has nothing more to do, so it is equal).

The baseline writes each message as tmp file, fsync, rename, fsync(dir), in a worker thread
(the "durable spool" figure in shared/reference/test-tooling.md). A fixed count, not a fixed
time, because fsync cost varies run to run.

    .venv/bin/python bench/spool_bench.py [--count 2000] [--size 2048] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.spool import Envelope, Spool

CONCURRENCY = (1, 8, 32)


def _naive_write(directory: Path, name: str, data: bytes) -> None:
    tmp = directory / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rename(directory / name)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def _drive(count: int, callers: int, enqueue: Callable[[int], Awaitable[object]]) -> float:
    """Run `count` enqueues from `callers` concurrent tasks; seconds until all returned."""
    numbers = iter(range(count))

    async def caller() -> None:
        for n in numbers:
            await enqueue(n)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return time.perf_counter() - start


async def bench_naive(base: Path, count: int, callers: int, body: bytes) -> tuple[float, float]:
    directory = base / f"naive-{callers}"
    directory.mkdir()
    seconds = await _drive(
        count, callers, lambda n: asyncio.to_thread(_naive_write, directory, f"m{n}", body)
    )
    return seconds, seconds


async def bench_spool(base: Path, count: int, callers: int, body: bytes) -> tuple[float, float]:
    spool = await Spool.open(base / f"spool-{callers}", rescan_interval=None)
    envelope = Envelope("app@example.com", ("user@example.com",), "bench", "127.0.0.1")
    start = time.perf_counter()
    intake = await _drive(count, callers, lambda n: spool.enqueue(envelope, body))
    await spool.aclose()
    return intake, time.perf_counter() - start


async def main(count: int, size: int, base: Path) -> None:
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"x" * (size % 78)
    print(f"{count} messages of {len(body)} bytes per cell, in {base}")
    print(f"{'callers':>7}  {'naive msg/s':>11}  {'spool intake msg/s':>18}  {'drained msg/s':>13}")
    for callers in CONCURRENCY:
        naive, _ = await bench_naive(base, count, callers, body)
        intake, drained = await bench_spool(base, count, callers, body)
        print(
            f"{callers:>7}  {count / naive:>11.0f}  {count / intake:>18.0f}  "
            f"{count / drained:>13.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dir", type=Path, help="where to write (default: a new temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
    try:
        asyncio.run(main(args.count, args.size, base))
    finally:
        shutil.rmtree(base)
