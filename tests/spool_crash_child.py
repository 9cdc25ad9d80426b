"""Child process for test_spool's crash tests: enqueue and deliver until SIGKILLed.

    python spool_crash_child.py SPOOL_PATH PREFIX

Several producers enqueue messages whose bodies carry a sequence number (see `body`); a
deliverer claims each new message and, by its number, delivers it, defers it or leaves it
claimed. Each step is printed to stdout (flushed) so the parent knows what happened before the
kill:

    start N                 before enqueue of message N is called
    queued N ID             after enqueue returned ID
    delivering ID           before delivered() is called (it may or may not complete)
    delivered ID            after delivered() returned: ID must never come back
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

from relay.spool import Envelope, QueueEntry, Spool

PRODUCERS = 8
RECIPIENTS = ("a@example.com", "b@example.com")


def body(prefix: str, n: int) -> bytes:
    """The exact bytes of message `prefix`-`n`: a header naming it, then a sized filler.

    Every 17th is ~150 KB, so a kill often lands inside a large write.
    """
    size = 150_000 if n % 17 == 0 else 200 + (n * 7919) % 5000
    head = f"Subject: {prefix}-{n}\r\n\r\n".encode()
    filler = bytes((n + i) % 251 for i in range(251)) * (size // 251 + 1)
    return head + filler[:size]


def seq_of(data: bytes) -> int:
    """The number in a message made by `body`."""
    subject = data.split(b"\r\n", 1)[0].decode()
    return int(subject.rsplit("-", 1)[1])


async def main(path: Path, prefix: str) -> None:
    spool = await Spool.open(path, rescan_interval=None, segment_bytes=64 * 1024)
    envelope = Envelope("app@example.com", RECIPIENTS, "crash", "127.0.0.1")
    numbers = itertools.count()
    claimable: asyncio.Queue[QueueEntry] = asyncio.Queue()
    spool.on_ready(claimable.put_nowait)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def produce() -> None:
        for n in numbers:
            say(f"start {n}")
            qid = await spool.enqueue(envelope, body(prefix, n))
            say(f"queued {n} {qid}")

    async def deliver() -> None:
        while True:
            entry = await claimable.get()
            claimed = await spool.claim(entry.qid)
            assert claimed is not None
            n = seq_of(await spool.read(entry.qid))
            if n % 3 == 0:
                say(f"delivering {entry.qid}")
                await spool.delivered(entry.qid, RECIPIENTS)
                say(f"delivered {entry.qid}")
            elif n % 3 == 1:
                await spool.defer(entry.qid, reply="451 4.3.0 later", next_attempt=1e10)

    await asyncio.gather(deliver(), *(produce() for _ in range(PRODUCERS)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
