"""relay.fdsync: fdatasync through Linux AIO, completed in the event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import platform
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.fdsync import LoopSync
from relay.spool import LOOP_WRITE_MAX, Disk, Envelope, Spool

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="Linux AIO is used on x86_64 and aarch64 Linux only",
)

ENVELOPE = Envelope("app@example.com", ("a@example.com",), "maintenance", "127.0.0.1")


@pytest.fixture
async def sync() -> AsyncIterator[LoopSync]:
    opened = LoopSync.open(asyncio.get_running_loop())
    assert opened is not None, "io_setup failed on this machine"
    yield opened
    opened.close()


async def test_syncs_complete_in_the_loop(sync: LoopSync, tmp_path: Path) -> None:
    """Several syncs in flight at once each complete, on the loop's thread, with no worker
    thread started for them."""
    fds = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600) for i in range(10)]
    try:
        threads = set(threading.enumerate())
        for fd in fds:
            os.write(fd, b"data" * 1000)
        results = await asyncio.gather(*(sync.datasync(fd) for fd in fds))
        assert results == [None] * 10
        assert set(threading.enumerate()) == threads
    finally:
        for fd in fds:
            os.close(fd)


async def test_a_pipe_is_refused_at_once(sync: LoopSync) -> None:
    """A descriptor without fsync: the kernel refuses the request itself (EINVAL)."""
    read, write = os.pipe()
    try:
        with pytest.raises(OSError) as exc:
            sync.datasync(read)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(read)
        os.close(write)


async def test_a_closed_descriptor_is_refused_at_once(sync: LoopSync, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(OSError) as exc:
        sync.datasync(fd)
    assert exc.value.errno == errno.EBADF


async def test_close_stops_watching_the_eventfd(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    sync = LoopSync.open(loop)
    assert sync is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        await sync.datasync(fd)
        eventfd = sync._eventfd
        sync.close()
        assert not loop.remove_reader(eventfd)  # nothing was registered any more
        with pytest.raises(OSError):
            os.fstat(eventfd)
    finally:
        os.close(fd)


async def test_no_aio_on_an_architecture_without_known_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the system call numbers are not known, the spool syncs on threads instead."""
    monkeypatch.setattr(platform, "machine", lambda: "s390x")
    assert LoopSync.open(asyncio.get_running_loop()) is None


class CountingDisk(Disk):
    """The stock Disk (journal syncs may go through AIO) that counts thread-side datasyncs
    and notes which thread wrote each journal batch."""

    def __init__(self) -> None:
        self.datasyncs = 0
        self.journal_writers: list[str] = []

    def write(self, fd: int, data: bytes) -> None:
        if Path(f"/proc/self/fd/{fd}").readlink().suffix == ".journal":
            self.journal_writers.append(threading.current_thread().name)
        super().write(fd, data)

    def datasync(self, fd: int) -> None:
        self.datasyncs += 1
        super().datasync(fd)


async def test_the_spool_journal_syncs_without_a_thread(tmp_path: Path) -> None:
    """With the stock Disk, intake commits sync through AIO: Disk.datasync (the thread path)
    is never called, and the messages are on disk for the next open."""
    disk = CountingDisk()
    async with await Spool.open(tmp_path / "spool", disk=disk, rescan_interval=None) as spool:
        ids = await asyncio.gather(*(spool.enqueue(ENVELOPE, b"m%d" % i) for i in range(20)))
        assert disk.datasyncs == 0
        assert set(disk.journal_writers) == {threading.current_thread().name}  # the loop's
    async with await Spool.open(tmp_path / "spool", rescan_interval=None) as spool:
        assert sorted(e.qid for e in spool.ready()) == sorted(ids)


async def test_a_refused_aio_request_falls_back_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel refusing the AIO request itself (as EAGAIN or EINVAL would) is not a disk
    error: the batch is still accepted, synced on a thread, and so is every later one."""

    def refuse(self: LoopSync, fd: int) -> asyncio.Future[None]:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(LoopSync, "datasync", refuse)
    disk = CountingDisk()
    caplog.set_level(logging.WARNING, logger="relay.spool")
    async with await Spool.open(tmp_path / "spool", disk=disk, rescan_interval=None) as spool:
        first = await spool.enqueue(ENVELOPE, b"first")
        second = await spool.enqueue(ENVELOPE, b"second")
        assert disk.datasyncs >= 2
    assert "Linux AIO refused the journal's sync (Resource temporarily unavailable)" in (
        caplog.text
    )
    assert caplog.text.count("Linux AIO refused") == 1
    async with await Spool.open(tmp_path / "spool", rescan_interval=None) as spool:
        assert sorted(e.qid for e in spool.ready()) == sorted([first, second])


async def test_a_large_message_is_written_on_a_thread_and_synced_through_aio(
    tmp_path: Path,
) -> None:
    """A batch over LOOP_WRITE_MAX is framed and written on a spool thread (the loop must not
    copy and checksum megabytes); its sync still goes through AIO, and it reads back whole."""
    disk = CountingDisk()
    big = os.urandom(LOOP_WRITE_MAX * 3)
    async with await Spool.open(tmp_path / "spool", disk=disk, rescan_interval=None) as spool:
        qid = await spool.enqueue(ENVELOPE, big)
        assert disk.datasyncs == 0
        [writer] = disk.journal_writers
        assert writer.startswith("spool")
    async with await Spool.open(tmp_path / "spool", rescan_interval=None) as spool:
        assert await spool.claim(qid) is not None
        assert await spool.read(qid) == big
