"""The spool on real files in tmp_path: intake, delivery states, recovery, failures, operators.

Faults come through the `Disk` seam (a subclass that fails or waits for chosen paths); crashes
are real SIGKILLs of a child process (tests/spool_crash_child.py).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from relay.errors import SpoolError, SpoolFull
from relay.spool import (
    DIRECT_BYTES,
    Disk,
    Envelope,
    Outcome,
    QueueAdmin,
    QueueEntry,
    Recipient,
    Spool,
    State,
    check_id,
)

sys.path.insert(0, str(Path(__file__).parent))
from spool_crash_child import RECIPIENTS, body

ENVELOPE = Envelope(
    "app@example.com",
    ("a@example.com", "b@example.com"),
    "maintenance",
    "127.0.0.1",
    user="ultimo",
    received_at=1_800_000_000.0,
)
CHAOS_SCALE = int(os.environ.get("RELAY_CHAOS_SCALE", "1"))


class FaultyDisk(Disk):
    """A Disk that fails or waits on the paths a test picks.

    `fail_write(path)` / `fail_sync(path)` return an errno to fail with (a failed write first
    writes half its bytes, as a full disk does), or None; `before(op, path)` runs first, with
    op "write" or "sync" (a test may block there).
    """

    loop_sync = False  # every journal write and sync goes through the methods below

    def __init__(self) -> None:
        self.fail_write: Callable[[Path], int | None] = lambda path: None
        self.fail_sync: Callable[[Path], int | None] = lambda path: None
        self.before: Callable[[str, Path], None] = lambda op, path: None
        self._paths: dict[int, Path] = {}

    def open(self, path: Path, flags: int) -> int:
        fd = super().open(path, flags)
        self._paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self.before("write", self._paths[fd])
        code = self.fail_write(self._paths[fd])
        if code:
            super().write(fd, data[: len(data) // 2])
            raise OSError(code, os.strerror(code))
        super().write(fd, data)

    def sync(self, fd: int) -> None:
        self._sync(fd)
        super().sync(fd)

    def datasync(self, fd: int) -> None:
        self._sync(fd)
        super().datasync(fd)

    def sync_batch(self, fds: Sequence[int]) -> None:
        for fd in fds:
            self._sync(fd)
        super().sync_batch(fds)

    def hold_syncs(self, matching: Callable[[Path], bool]) -> tuple[threading.Event, ...]:
        """Syncs of `matching` paths wait until `release` is set; `held` says one is waiting.
        Returns (held, release)."""
        held, release = threading.Event(), threading.Event()

        def hold(op: str, path: Path) -> None:
            if op == "sync" and matching(path) and not release.is_set():
                held.set()
                release.wait()

        self.before = hold
        return held, release

    def _sync(self, fd: int) -> None:
        self.before("sync", self._paths[fd])
        code = self.fail_sync(self._paths[fd])
        if code:
            raise OSError(code, os.strerror(code))


def is_journal(path: Path) -> bool:
    return path.suffix == ".journal"


def is_materialising(path: Path) -> bool:
    return path.suffix == ".tmp"


class Ready:
    """Collects on_ready notifications; `await ready.wait(n)` until n have arrived."""

    def __init__(self, spool: Spool) -> None:
        self.entries: list[QueueEntry] = []
        self._changed = asyncio.Event()
        spool.on_ready(self._add)

    def _add(self, entry: QueueEntry) -> None:
        self.entries.append(entry)
        self._changed.set()

    async def wait(self, count: int) -> list[QueueEntry]:
        while len(self.entries) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.entries


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def spool(path: Path) -> AsyncIterator[Spool]:
    async with await Spool.open(path, rescan_interval=None) as s:
        yield s


def files(path: Path, state: str) -> list[str]:
    return sorted(p.name for p in (path / state).iterdir())


def counts(path: Path, **n: int) -> str:
    states = ["incoming", "queue", "active", "deferred", "hold", "dead", "corrupt"]
    return " ".join(f"{s}={n.get(s, 0)}" for s in states)


# Intake and delivery -------------------------------------------------------------------------


async def test_message_goes_from_enqueue_to_delivered(spool: Spool, path: Path) -> None:
    """enqueue -> on_ready -> claim -> read -> delivered for all recipients -> gone."""
    ready = Ready(spool)
    qid = await spool.enqueue(ENVELOPE, b"Subject: hi\r\n\r\nbody\r\n")
    [entry] = await ready.wait(1)
    assert entry.qid == qid
    assert entry.state is State.QUEUE
    assert entry.envelope == ENVELOPE
    assert entry.pending == ("a@example.com", "b@example.com")
    assert repr(spool) == f"<Spool {path} open {counts(path, queue=1)}>"

    claimed = await spool.claim(qid)
    assert claimed is not None and claimed.state is State.ACTIVE
    assert files(path, "active") == [qid]
    assert await spool.read(qid) == b"Subject: hi\r\n\r\nbody\r\n"
    assert await spool.delivered(qid, ["a@example.com", "b@example.com"]) is None
    assert files(path, "active") == []
    assert repr(spool) == f"<Spool {path} open {counts(path)}>"


async def test_partial_delivery_and_deferral_are_recorded(path: Path) -> None:
    """One recipient delivered, one refused for good, then a 4xx: all of it survives a restart."""
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(
            Envelope("", ("a@x.test", "b@x.test", "c@x.test"), "r", "10.0.0.1"), b"m"
        )
        await ready.wait(1)
        await spool.claim(qid)
        partial = await spool.delivered(qid, ["a@x.test"])
        assert partial is not None and partial.pending == ("b@x.test", "c@x.test")
        deferred = await spool.defer(
            qid,
            reply="451 4.4.1 try later",
            next_attempt=1_900_000_000.0,
            failed={"b@x.test": "550 5.1.1 no such user"},
        )
        assert deferred.state is State.DEFERRED
        assert files(path, "deferred") == [qid]
    async with await Spool.open(path, rescan_interval=None) as spool:
        [entry] = spool.ready()
        assert entry == deferred
        assert entry.attempts == 1
        assert entry.recipients == (
            Recipient("a@x.test", Outcome.DELIVERED),
            Recipient("b@x.test", Outcome.FAILED, "550 5.1.1 no such user"),
            Recipient("c@x.test", Outcome.PENDING),
        )
        assert entry.to_json() == {
            "qid": qid,
            "state": "deferred",
            "size": 1,
            "mail_from": "",
            "rcpt_tos": ("a@x.test", "b@x.test", "c@x.test"),
            "route": "r",
            "client": "10.0.0.1",
            "user": None,
            "smtputf8": False,
            "received_at": entry.envelope.received_at,
            "attempts": 1,
            "next_attempt": 1_900_000_000.0,
            "last_reply": "451 4.4.1 try later",
            "recipients": [
                {"address": "a@x.test", "outcome": "delivered", "reply": ""},
                {"address": "b@x.test", "outcome": "failed", "reply": "550 5.1.1 no such user"},
                {"address": "c@x.test", "outcome": "pending", "reply": ""},
            ],
            "reason": "",
        }
        again = await spool.claim(qid)
        assert again is not None
        assert await spool.delivered(qid, ["c@x.test"]) is not None  # b failed: not done yet


async def test_dead_message_keeps_its_reason(path: Path) -> None:
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(ENVELOPE, b"m")
        await ready.wait(1)
        await spool.claim(qid)
        dead = await spool.dead(
            qid,
            reason="550 5.7.60 SendAs denied",
            failed={"b@example.com": "550 5.7.60"},
            delivered=["a@example.com"],
        )
        assert dead.state is State.DEAD
        assert spool.ready() == []
        assert repr(spool) == f"<Spool {path} open {counts(path, dead=1)}>"
    [entry] = await QueueAdmin(path).entries()
    assert entry.state is State.DEAD
    assert entry.reason == "550 5.7.60 SendAs denied"
    assert entry.recipients == (
        Recipient("a@example.com", Outcome.DELIVERED),
        Recipient("b@example.com", Outcome.FAILED, "550 5.7.60"),
    )


async def test_ready_lists_queue_and_deferred_soonest_first(spool: Spool) -> None:
    ready = Ready(spool)
    first, second, third = [await spool.enqueue(ENVELOPE, b"m") for _ in range(3)]
    await ready.wait(3)
    await spool.claim(first)
    await spool.defer(first, reply="451", next_attempt=1_000.0)
    await spool.claim(second)
    await spool.defer(second, reply="451", next_attempt=2e10)
    assert [e.qid for e in spool.ready()] == [first, third, second]


async def test_claimed_mail_returns_to_queue_at_open(path: Path) -> None:
    """A message claimed when the process stopped is in the queue again after the next open,
    due at once (its arrival), whatever its record said about the next attempt."""
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(ENVELOPE, b"m")
        await ready.wait(1)
        await spool.claim(qid)
        await spool.defer(qid, reply="451", next_attempt=2e10)
        await spool.claim(qid)
        assert files(path, "active") == [qid]
    async with await Spool.open(path, rescan_interval=None) as spool:
        [entry] = spool.ready()
        assert (entry.qid, entry.state, entry.attempts) == (qid, State.QUEUE, 1)
        assert entry.next_attempt == ENVELOPE.received_at
        assert files(path, "active") == []


async def test_hundreds_of_concurrent_enqueues(path: Path) -> None:
    """300 sessions enqueue at once: distinct ids in arrival order, all back after reopening."""
    bodies = [f"message {i}\r\n".encode() * (i + 1) for i in range(300)]
    async with await Spool.open(path, rescan_interval=None) as spool:
        ids = await asyncio.gather(*(spool.enqueue(ENVELOPE, b) for b in bodies))
    assert len(set(ids)) == 300
    assert sorted(ids) == ids
    assert files(path, "incoming") == []  # everything materialised and checkpointed
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert {e.qid for e in spool.ready()} == set(ids)
        for qid, data in zip(ids, bodies, strict=True):
            assert await spool.claim(qid) is not None
            assert await spool.read(qid) == data


async def test_enqueue_many_commits_together(path: Path) -> None:
    """One client message split by route: both parts are stored, or (on a write error) neither."""
    disk = FaultyDisk()
    split = [(ENVELOPE, b"part one"), (Envelope("", ("x@y.test",), "other", "::1"), b"part two")]
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        disk.fail_write = lambda p: errno.ENOSPC if is_journal(p) else None
        with pytest.raises(SpoolFull):
            await spool.enqueue_many(split)
        disk.fail_write = lambda p: None
        ids = await spool.enqueue_many(split)
        with pytest.raises(ValueError, match="at least one recipient"):
            await spool.enqueue_many([(ENVELOPE, b"m"), (Envelope("", (), "r", "::1"), b"m")])
    async with await Spool.open(path, rescan_interval=None) as spool:
        stored = sorted(spool.ready(), key=lambda e: e.qid)
        assert [(e.qid, e.envelope.route) for e in stored] == [
            (ids[0], "maintenance"),
            (ids[1], "other"),
        ]


async def test_segments_rotate_and_are_deleted_once_checkpointed(path: Path) -> None:
    async with await Spool.open(path, rescan_interval=None, segment_bytes=4096) as spool:
        ready = Ready(spool)
        for i in range(20):
            await spool.enqueue(ENVELOPE, bytes([i]) * 3000)
        await ready.wait(20)
        # Each enqueue went into a new segment; all but the current one are gone.
        assert len(files(path, "incoming")) == 1
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert len(spool.ready()) == 20


async def test_a_failing_ready_callback_does_not_stop_the_others(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(entry: QueueEntry) -> None:
        raise RuntimeError("scheduler bug")

    spool.on_ready(broken)
    ready = Ready(spool)
    qid = await spool.enqueue(ENVELOPE, b"m")
    [entry] = await ready.wait(1)
    assert entry.qid == qid
    assert f"spool: on_ready callback failed for {qid}" in caplog.text


async def test_misuse_is_refused(spool: Spool) -> None:
    ready = Ready(spool)
    with pytest.raises(ValueError, match="at least one recipient"):
        await spool.enqueue(Envelope("a@x", (), "r", "127.0.0.1"), b"m")
    with pytest.raises(TypeError, match="not JSON serializable"):
        await spool.enqueue(Envelope("a@x", ("b@y",), "r", object()), b"m")  # type: ignore[arg-type]
    qid = await spool.enqueue(ENVELOPE, b"m")
    await ready.wait(1)
    with pytest.raises(SpoolError, match=f"message {qid} is not claimed \\(it is in queue/\\)"):
        await spool.defer(qid, reply="451", next_attempt=0)
    await spool.claim(qid)
    assert await spool.claim(qid) is None  # already claimed
    with pytest.raises(ValueError, match=r"not recipients of .*\['x@y'\]"):
        await spool.delivered(qid, ["x@y"])
    unknown = "0" * 22
    with pytest.raises(SpoolError, match=f"no message {unknown} in spool"):
        await spool.read(unknown)
    assert await spool.claim(unknown) is None


# Ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "../../etc/passwd", "0661427217cec82ab69f09", "0" * 21, "0" * 23, "0" * 21 + "/", 7]
)
async def test_bad_ids_are_refused_before_any_path(spool: Spool, path: Path, bad: object) -> None:
    with pytest.raises(SpoolError, match="not a queue id"):
        check_id(bad)
    with pytest.raises(SpoolError, match="not a queue id"):
        await spool.claim(bad)  # type: ignore[arg-type]
    with pytest.raises(SpoolError, match="not a queue id"):
        await QueueAdmin(path).delete(bad)  # type: ignore[arg-type]


async def test_ids_sort_by_time_and_differ_across_restarts(path: Path) -> None:
    async with await Spool.open(path, rescan_interval=None) as spool:
        first = await spool.enqueue(ENVELOPE, b"m")
    async with await Spool.open(path, rescan_interval=None) as spool:
        second = await spool.enqueue(ENVELOPE, b"m")
    assert check_id(first) == first and first < second


# Lifecycle -----------------------------------------------------------------------------------


async def test_one_process_per_spool(path: Path) -> None:
    async with await Spool.open(path, rescan_interval=None):
        with pytest.raises(SpoolError, match="is in use by another relay process"):
            await Spool.open(path)
    async with await Spool.open(path, rescan_interval=None):
        pass


async def test_closed_spool_refuses_work_and_closes_once(path: Path) -> None:
    spool = await Spool.open(path, rescan_interval=None)
    await spool.aclose()
    await spool.aclose()
    assert repr(spool) == f"<Spool {path} closed {counts(path)}>"
    with pytest.raises(SpoolError, match="is closed"):
        await spool.enqueue(ENVELOPE, b"m")
    with pytest.raises(SpoolError, match="is closed"):
        await spool.claim("0" * 22)


async def test_cancelled_enqueue_is_never_delivered(path: Path) -> None:
    """A session that goes away before its 250 (its enqueue is cancelled) leaves no message,
    whether the batch was still gathering or already being written."""
    disk = FaultyDisk()
    writing, release = disk.hold_syncs(is_journal)
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        in_flight = asyncio.create_task(spool.enqueue(ENVELOPE, b"first"))
        await asyncio.to_thread(writing.wait)
        gathering = asyncio.create_task(spool.enqueue(ENVELOPE, b"second"))
        await asyncio.sleep(0)  # let it join the next batch
        in_flight.cancel()
        gathering.cancel()
        release.set()
        for task in (in_flight, gathering):
            with pytest.raises(asyncio.CancelledError):
                await task
        kept = await spool.enqueue(ENVELOPE, b"third")
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [kept]


async def test_aclose_flushes_commits_in_flight(path: Path) -> None:
    spool = await Spool.open(path, rescan_interval=None)
    pending = [asyncio.create_task(spool.enqueue(ENVELOPE, b"m")) for _ in range(10)]
    await asyncio.sleep(0)
    await spool.aclose()
    ids = [await t for t in pending]
    assert files(path, "queue") == sorted(ids)


async def test_aclose_waits_for_large_messages_being_stored(path: Path) -> None:
    """The lock is not released while a large message is still being written (a slow sync)."""
    disk = FaultyDisk()
    disk.before = lambda op, p: time.sleep(0.2) if op == "sync" and is_materialising(p) else None
    spool = await Spool.open(path, disk=disk, rescan_interval=None)
    pending = [
        asyncio.create_task(spool.enqueue(ENVELOPE, b"%d" % i * DIRECT_BYTES)) for i in range(3)
    ]
    await asyncio.sleep(0)
    await spool.aclose()
    assert all(t.done() for t in pending)
    assert files(path, "queue") == sorted(t.result() for t in pending)


# Crash safety --------------------------------------------------------------------------------


async def test_replayed_journal_never_brings_back_delivered_mail(
    path: Path, tmp_path: Path
) -> None:
    """A crash while the journal still holds a delivered message's record: it stays delivered."""
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        gone = await spool.enqueue(ENVELOPE, b"delivered")
        kept = await spool.enqueue(ENVELOPE, b"kept")
        await ready.wait(2)
        await spool.claim(gone)
        await spool.delivered(gone, ENVELOPE.rcpt_tos)
        assert len(files(path, "incoming")) == 1  # the segment with both records is still there
        crashed = tmp_path / "crashed"
        shutil.copytree(path, crashed)  # the disk as a crash at this instant would leave it
    async with await Spool.open(crashed, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [kept]


async def test_message_materialised_but_not_checkpointed_is_recovered_once(
    path: Path, tmp_path: Path
) -> None:
    """The message has its file in queue/ but the checkpoint naming it is not written yet when
    the process dies: recovery finds the file and does not replay the record a second time."""
    disk = FaultyDisk()
    writes = 0
    checkpointing, release = threading.Event(), threading.Event()

    def hold_checkpoint(op: str, p: Path) -> None:
        nonlocal writes
        if op == "write" and is_journal(p):
            writes += 1
            if writes == 2:  # 1: the intake batch, 2: the checkpoint naming it
                checkpointing.set()
                release.wait()

    disk.before = hold_checkpoint
    crashed = tmp_path / "crashed"
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        qid = await spool.enqueue(ENVELOPE, b"m")
        await asyncio.to_thread(checkpointing.wait)
        assert files(path, "queue") == [qid]
        assert await spool.claim(qid) is None  # not claimable before its checkpoint
        shutil.copytree(path, crashed)
        release.set()
    async with await Spool.open(crashed, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [qid]
        assert await spool.claim(qid) is not None
        assert await spool.read(qid) == b"m"


async def test_torn_journal_tail_is_cut(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three messages only in the journal (queue/ unwritable), the last one torn by a crash:
    the first two come back byte-exact, the torn one never appears."""
    disk = FaultyDisk()
    disk.fail_write = lambda p: errno.ENOSPC if is_materialising(p) else None
    bodies = [b"one\r\n", b"two\r\n" * 1000, b"three\r\n" * 1000]
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        ids = [await spool.enqueue(ENVELOPE, b) for b in bodies]
    [segment] = (path / "incoming").iterdir()
    written = len(segment.read_bytes().rstrip(b"\0"))  # the rest was zeros written in advance
    os.truncate(segment, written - 2000)  # mid-way through the third record
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == ids[:2]
        for qid, data in zip(ids[:2], bodies, strict=False):
            await spool.claim(qid)
            assert await spool.read(qid) == data
        assert files(path, "incoming") == [f"{int(segment.stem) + 1:012d}.journal"]
    assert re.search(r"ends in \d+ bytes of an unfinished write; ignored", caplog.text)


async def test_zeros_written_in_advance_are_not_a_torn_tail(
    path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment is zero-filled when created; a crash leaves those zeros after the last frame,
    and recovery reads them as the clean end they are."""
    crashed = tmp_path / "crashed"
    async with await Spool.open(path, rescan_interval=None, segment_bytes=64 * 1024) as spool:
        qid = await spool.enqueue(ENVELOPE, b"m")
        [segment] = (path / "incoming").iterdir()
        assert segment.stat().st_size == 64 * 1024
        shutil.copytree(path, crashed)  # the disk as a crash at this instant would leave it
    async with await Spool.open(crashed, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [qid]
    assert "unfinished write" not in caplog.text


async def test_torn_record_update_is_cut(path: Path) -> None:
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(ENVELOPE, b"m")
        await ready.wait(1)
        await spool.claim(qid)
        deferred = await spool.defer(qid, reply="451", next_attempt=5.0)
    message = path / "deferred" / qid
    size = message.stat().st_size
    with message.open("ab") as f:
        f.write(b"RLY1R\x00\x00")  # the start of an update that never finished
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert spool.ready() == [deferred]
    assert message.stat().st_size == size


async def test_unreadable_files_go_to_corrupt(path: Path) -> None:
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        good, flipped = [await spool.enqueue(ENVELOPE, b"0123456789") for _ in range(2)]
        await ready.wait(2)
    garbage = "0" * 22
    (path / "queue" / garbage).write_bytes(b"not a message")
    (path / "deferred" / "notes.txt").write_text("stray")
    data = bytearray((path / "queue" / flipped).read_bytes())
    data[-1] ^= 0xFF  # damage inside the message bytes: found when it is read
    (path / "queue" / flipped).write_bytes(data)
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [good, flipped]
        assert repr(spool) == f"<Spool {path} open {counts(path, queue=2, corrupt=2)}>"
        assert await spool.claim(flipped) is not None
        with pytest.raises(SpoolError, match="does not match its checksum"):
            await spool.read(flipped)
        assert repr(spool) == f"<Spool {path} open {counts(path, queue=1, corrupt=3)}>"
    assert files(path, "corrupt") == sorted([garbage, flipped, "notes.txt"])


def run_and_kill(spool_path: Path, prefix: str, queued: int, delay: float) -> list[str]:
    """Run the child until `queued` enqueues returned and `delay` seconds more (a random
    point in what it does next), SIGKILL it, and return its complete lines."""
    script = Path(__file__).with_name("spool_crash_child.py")
    with subprocess.Popen(
        [sys.executable, str(script), str(spool_path), prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        lines = []
        for line in child.stdout:
            lines.append(line)
            queued -= line.startswith("queued ")
            if queued <= 0:
                break
        time.sleep(delay)
        child.kill()
        lines.extend(child.stdout)  # what it wrote before it died (some is buffered here)
        err = child.stderr.read()
    assert child.returncode == -signal.SIGKILL, f"the child died by itself: {err}"
    return [line.rstrip("\n") for line in lines if line.endswith("\n")]  # not a torn last one


async def crash_rounds(path: Path, rounds: int, seed: int) -> None:
    """Each round a child enqueues and delivers until SIGKILLed at a random point; then the
    spool is recovered and checked against what the child printed:
    queued (and not being delivered) => recovered, byte-exact; recovered => its enqueue had
    started (by body); delivered => never recovered; nothing corrupt."""
    rng = random.Random(seed)
    expected: dict[str, bytes] = {}  # must be there, with these bytes
    delivered: set[str] = set()
    checked: set[str] = set()
    for r in range(rounds):
        prefix, where = f"r{r}", f"seed {seed} round {r}"
        queued, delay = rng.randint(1, 80), rng.uniform(0, 0.005)
        lines = await asyncio.to_thread(run_and_kill, path, prefix, queued, delay)
        started = set()
        for line in lines:
            word, *args = line.split()
            if word == "start":
                started.add(body(prefix, int(args[0])))
            elif word == "queued":
                expected[args[1]] = body(prefix, int(args[0]))
            elif word == "delivering":
                expected.pop(args[0], None)
            elif word == "delivered":
                delivered.add(args[0])
        async with await Spool.open(path, rescan_interval=None) as spool:
            recovered = {e.qid: e for e in spool.ready()}
            assert files(path, "corrupt") == [], where
            assert not delivered & recovered.keys(), f"{where}: delivered mail came back"
            assert expected.keys() <= recovered.keys(), f"{where}: lost mail"
            for qid in recovered.keys() - checked:  # each message is read once
                assert recovered[qid].envelope.rcpt_tos == RECIPIENTS
                data = await spool.read(qid)
                wanted = expected.get(qid)
                ok = data == wanted if wanted is not None else data in started
                assert ok, f"{where}: {qid} is not what was enqueued"
                expected[qid] = data  # recovered once: it must stay
                checked.add(qid)


async def test_sigkill_loses_nothing_and_invents_nothing(path: Path) -> None:
    seed = random.randrange(1 << 32)
    await crash_rounds(path, rounds=3, seed=seed)


@pytest.mark.slow
async def test_sigkill_chaos(path: Path) -> None:
    seed = random.randrange(1 << 32)
    await crash_rounds(path, rounds=12 * CHAOS_SCALE, seed=seed)


# Failures ------------------------------------------------------------------------------------


# Large messages: their own files at once ----------------------------------------------------


async def test_a_large_message_gets_its_files_at_once_without_the_journal(path: Path) -> None:
    """A client message of DIRECT_BYTES or more (here split over two routes) is written once,
    straight to queue/ (through incoming/*.tmp), is claimable when enqueue returns, and never
    touches the journal, so its sync cannot hold up small messages' group commits."""
    disk = FaultyDisk()
    written: list[Path] = []
    disk.before = lambda op, p: written.append(p) if op == "write" else None
    big = b"x" * DIRECT_BYTES
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        ready = Ready(spool)
        ids = await spool.enqueue_many([(ENVELOPE, big[:100]), (ENVELOPE, big)])
        assert files(path, "queue") == sorted(ids)
        assert [e.qid for e in ready.entries] == ids  # no wait for the materialiser
        assert not any(is_journal(p) for p in written)
        small = await spool.enqueue(ENVELOPE, b"small")
        assert [p for p in written if is_journal(p)]  # small ones still go to the journal
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert sorted(e.qid for e in spool.ready()) == sorted([*ids, small])
        await spool.claim(ids[1])
        assert await spool.read(ids[1]) == big


async def test_a_large_message_whose_client_left_is_never_delivered(path: Path) -> None:
    """The enqueue of a large message is cancelled (the session went away) while its file is
    being synced: once the write ends, the file is removed and the message never appears."""
    disk = FaultyDisk()
    syncing, release = disk.hold_syncs(is_materialising)
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        ready = Ready(spool)
        task = asyncio.create_task(spool.enqueue(ENVELOPE, b"x" * DIRECT_BYTES))
        await asyncio.to_thread(syncing.wait)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert files(path, "queue") == []
        assert ready.entries == [] and spool.ready() == []
        assert repr(spool) == f"<Spool {path} open {counts(path)}>"
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert spool.ready() == []


@pytest.mark.parametrize(
    ("code", "error"),
    [(errno.ENOSPC, SpoolFull), (errno.EDQUOT, SpoolFull), (errno.EIO, SpoolError)],
)
async def test_journal_write_failure_refuses_the_batch(
    path: Path, code: int, error: type[SpoolError]
) -> None:
    """A failed journal write (half the bytes written) raises, and the message never appears,
    while the next enqueue works."""
    disk = FaultyDisk()
    disk.fail_write = lambda p: code if is_journal(p) else None
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        with pytest.raises(error, match=f"writing the intake journal: {os.strerror(code)}") as exc:
            await spool.enqueue(ENVELOPE, b"refused" * 1000)
        assert type(exc.value) is error
        disk.fail_write = lambda p: None
        kept = await spool.enqueue(ENVELOPE, b"kept")
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [kept]


async def test_an_unexpected_error_in_a_commit_refuses_the_batch_and_the_spool_goes_on(
    path: Path,
) -> None:
    """A bug below the commit (not an OSError) must not leave the waiters hanging: their
    enqueue fails with SpoolError, nothing of it is kept, and the next one works."""

    class BuggyDisk(FaultyDisk):
        buggy = True

        def write(self, fd: int, data: bytes) -> None:
            if is_journal(self._paths[fd]) and self.buggy:
                raise RuntimeError("a bug")
            super().write(fd, data)

    disk = BuggyDisk()
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        with pytest.raises(SpoolError, match="intake commit failed: RuntimeError"):
            await asyncio.wait_for(spool.enqueue(ENVELOPE, b"refused"), timeout=10)
        disk.buggy = False
        kept = await spool.enqueue(ENVELOPE, b"kept")
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [kept]
        assert await spool.read(kept) == b"kept"


async def test_journal_sync_failure_refuses_the_batch(path: Path) -> None:
    disk = FaultyDisk()
    disk.fail_sync = lambda p: errno.EIO if is_journal(p) else None
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        with pytest.raises(SpoolError, match="Input/output error"):
            await spool.enqueue(ENVELOPE, b"refused")
        disk.fail_sync = lambda p: None
        kept = await spool.enqueue(ENVELOPE, b"kept")
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert [e.qid for e in spool.ready()] == [kept]


async def test_journal_that_cannot_be_cut_is_left_behind(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If even the sync after cutting a failed write fails, the segment is abandoned and the
    next batch goes into a new one."""
    disk = FaultyDisk()
    disk.fail_sync = lambda p: errno.EIO if p.name == "000000000001.journal" else None
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        with pytest.raises(SpoolError, match="writing the intake journal: Input/output error"):
            await spool.enqueue(ENVELOPE, b"refused")
        assert "cannot cut a failed write from journal segment 1 (Input/output error)" in (
            caplog.text
        )
        kept = await spool.enqueue(ENVELOPE, b"kept")
    assert files(path, "incoming") == []  # both segments deleted once all was checkpointed
    assert files(path, "queue") == [kept]


async def test_materialisation_failure_is_retried(path: Path) -> None:
    """queue/ cannot be written for a while: enqueue still answers (the journal has the mail),
    and the message becomes claimable once the disk recovers."""
    disk = FaultyDisk()
    failures = 0

    def fail_twice(p: Path) -> int | None:
        nonlocal failures
        if is_materialising(p) and failures < 2:
            failures += 1
            return errno.ENOSPC
        return None

    disk.fail_write = fail_twice
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(ENVELOPE, b"m")
        [entry] = await ready.wait(1)
        assert entry.qid == qid and failures == 2
        assert files(path, "incoming")[0].endswith(".journal")


async def test_materialised_batch_is_synced_before_it_enters_queue(path: Path) -> None:
    """A batch of files is made durable with one batch sync while still incoming/*.tmp; only
    then are they renamed into queue/, so a crash never leaves a torn file there."""
    disk = FaultyDisk()
    synced: list[tuple[str, list[str]]] = []

    def look(op: str, p: Path) -> None:
        if op == "sync" and is_materialising(p):
            synced.append((p.name, files(path, "queue")))

    disk.before = look
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        ready = Ready(spool)
        ids = await spool.enqueue_many([(ENVELOPE, b"one"), (ENVELOPE, b"two")])
        await ready.wait(2)
        assert synced == [(f"{qid}.tmp", []) for qid in ids]
        assert files(path, "queue") == ids


async def test_failed_batch_sync_leaves_nothing_in_queue_and_is_retried(path: Path) -> None:
    """The batch sync fails once (EIO): its .tmp files are removed, queue/ stays empty, and the
    retry from the journal brings the messages in, byte-exact."""
    disk = FaultyDisk()
    failed = threading.Event()

    def fail_once(p: Path) -> int | None:
        if is_materialising(p) and not failed.is_set():
            failed.set()
            return errno.EIO
        return None

    disk.fail_sync = fail_once
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(ENVELOPE, b"kept")
        [entry] = await ready.wait(1)
        assert failed.is_set() and entry.qid == qid
        assert files(path, "queue") == [qid]
        assert [n for n in files(path, "incoming") if n.endswith(".tmp")] == []
        await spool.claim(qid)
        assert await spool.read(qid) == b"kept"


async def test_full_backlog_with_failing_disk_refuses_intake(path: Path) -> None:
    """While messages cannot be moved out of the journal and the backlog is full, enqueue says
    SpoolFull instead of waiting for a disk that may not come back."""
    disk = FaultyDisk()
    failed = threading.Event()

    def no_room(p: Path) -> int | None:
        if is_materialising(p):
            failed.set()
            return errno.ENOSPC
        return None

    disk.fail_write = no_room
    async with await Spool.open(path, disk=disk, rescan_interval=None, max_backlog=10) as spool:
        await spool.enqueue(ENVELOPE, b"x" * 100)
        await asyncio.to_thread(failed.wait)
        for _ in range(10):  # the failure is recorded right after the failed attempt returns
            await asyncio.sleep(0)
        with pytest.raises(SpoolFull, match="writing messages to queue/: No space left on device"):
            await spool.enqueue(ENVELOPE, b"y")
        assert repr(spool) == f"<Spool {path} open {counts(path, incoming=1)}>"
    async with await Spool.open(path, rescan_interval=None) as spool:
        assert len(spool.ready()) == 1


async def test_record_update_failure_raises_and_keeps_the_old_record(path: Path) -> None:
    disk = FaultyDisk()
    async with await Spool.open(path, disk=disk, rescan_interval=None) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(ENVELOPE, b"m")
        await ready.wait(1)
        await spool.claim(qid)
        disk.fail_write = lambda p: errno.ENOSPC if p.name == qid else None
        with pytest.raises(SpoolFull, match=f"updating active/{qid}: No space left on device"):
            await spool.defer(qid, reply="451", next_attempt=1.0)
    async with await Spool.open(path, rescan_interval=None) as spool:
        [entry] = spool.ready()
        assert (entry.state, entry.attempts, entry.last_reply) == (State.QUEUE, 0, "")


async def test_spool_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_text("not a directory")
    with pytest.raises(SpoolError, match=f"creating spool directories under {path}: File exists"):
        await Spool.open(path)


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """chattr +i: the one way to make a directory unwritable for root too (ext4 and others)."""
    marked: list[Path] = []

    def mark(p: Path) -> None:
        result = subprocess.run(["chattr", "+i", str(p)], capture_output=True, check=False)
        if result.returncode:
            pytest.skip(f"chattr +i not possible here: {result.stderr.decode().strip()}")
        marked.append(p)

    yield mark
    for p in marked:
        subprocess.run(["chattr", "-i", str(p)], check=True)


async def test_unwritable_spool_directory(
    tmp_path: Path, immutable: Callable[[Path], None]
) -> None:
    path = tmp_path / "spool"
    path.mkdir()
    immutable(path)
    with pytest.raises(SpoolError, match=r"creating spool directories under .*: Operation not"):
        await Spool.open(path)


async def test_unwritable_incoming_directory(path: Path, immutable: Callable[[Path], None]) -> None:
    async with await Spool.open(path, rescan_interval=None):
        pass
    immutable(path / "incoming")
    with pytest.raises(SpoolError, match="creating an intake journal segment: Operation not"):
        await Spool.open(path)
    async with await Spool.open(path.parent / "other", rescan_interval=None):
        pass  # the lock was released: nothing leaked


# Operators -----------------------------------------------------------------------------------


async def test_operators_act_while_the_spool_serves(path: Path) -> None:
    """hold, retry, delete from another 'process' (QueueAdmin); the server follows."""
    admin = QueueAdmin(path)
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        held, retried, deleted = [await spool.enqueue(ENVELOPE, b"m") for _ in range(3)]
        await ready.wait(3)
        await spool.claim(retried)
        await spool.defer(retried, reply="451", next_attempt=2e10)

        assert (await admin.hold(held)).state is State.HOLD
        assert await spool.claim(held) is None

        assert (await admin.retry(retried)).state is State.QUEUE
        await spool.rescan()
        assert ready.entries[-1].qid == retried and ready.entries[-1].state is State.QUEUE
        assert [e.qid for e in spool.ready()] == [retried, deleted]

        assert (await admin.delete(deleted)).qid == deleted
        await spool.rescan()
        assert repr(spool) == f"<Spool {path} open {counts(path, queue=1, hold=1)}>"

        claimed = await spool.claim(retried)
        assert claimed is not None
        with pytest.raises(SpoolError, match=f"message {retried} is being delivered"):
            await admin.delete(retried)
        with pytest.raises(SpoolError, match=f"message {retried} is in active/; cannot move it"):
            await admin.hold(retried)
        listed = await admin.entries()
        assert [(e.qid, e.state) for e in listed] == [(held, State.HOLD), (retried, State.ACTIVE)]
        assert (await admin.show(held)).state is State.HOLD


async def test_claim_follows_a_message_an_operator_retried(spool: Spool, path: Path) -> None:
    ready = Ready(spool)
    qid = await spool.enqueue(ENVELOPE, b"m")
    await ready.wait(1)
    await spool.claim(qid)
    await spool.defer(qid, reply="451", next_attempt=2e10)
    await QueueAdmin(path).retry(qid)  # deferred/ -> queue/ without a rescan
    claimed = await spool.claim(qid)
    assert claimed is not None and claimed.attempts == 1


async def test_retrying_a_dead_message_makes_its_recipients_pending(path: Path) -> None:
    admin = QueueAdmin(path)
    async with await Spool.open(path, rescan_interval=0.01) as spool:
        ready = Ready(spool)
        qid = await spool.enqueue(ENVELOPE, b"m")
        await ready.wait(1)
        await spool.claim(qid)
        await spool.dead(qid, reason="bounced", failed={"a@example.com": "550 5.1.1"})
        revived = await admin.retry(qid)
        assert (revived.state, revived.reason, revived.pending) == (
            State.QUEUE,
            "",
            ENVELOPE.rcpt_tos,
        )
        [_, again] = await ready.wait(2)  # found by the periodic rescan
        assert again.qid == qid and again.pending == ENVELOPE.rcpt_tos


async def test_operator_errors(path: Path) -> None:
    admin = QueueAdmin(path)
    async with await Spool.open(path, rescan_interval=None) as spool:
        ready = Ready(spool)
        queued, dead = [await spool.enqueue(ENVELOPE, b"m") for _ in range(2)]
        await ready.wait(2)
        await spool.claim(dead)
        await spool.dead(dead, reason="expired")
    with pytest.raises(SpoolError, match=f"no message {'0' * 22} in spool"):
        await admin.show("0" * 22)
    assert (await admin.retry(queued)).state is State.QUEUE  # already queued: nothing to do
    assert (await admin.hold(queued)).state is State.HOLD
    assert (await admin.hold(queued)).state is State.HOLD  # and again: still held
    with pytest.raises(SpoolError, match=f"message {dead} is in dead/; cannot move it"):
        await admin.hold(dead)
    assert (await admin.delete(dead)).state is State.DEAD
    with pytest.raises(SpoolError, match=f"no message {dead} in spool"):
        await admin.delete(dead)


async def test_rescan_skips_files_it_cannot_read(
    spool: Spool, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stray = "0" * 22
    (path / "queue" / stray).write_bytes(b"dropped here by hand")
    await spool.rescan()
    assert spool.ready() == []
    assert f"queue/{stray}: not a message file (left for the next start to set aside)" in (
        caplog.text
    )
