"""fdatasync(2) that completes in the event loop, without a thread: Linux AIO.

The spool answers a batch of 250s when the journal's fdatasync returns. Run in a worker thread,
that return needs the GIL back while the loop thread is busy with SMTP sessions, and the loop
then waits for the thread's hand-off; under load both waits leave the loop idle for part of
every commit (about 15 % of its time in `bench/intake_bench.py`). With `IOCB_CMD_FDSYNC`
(Linux 4.18 and later) the kernel runs the sync from its own work queue and signals an eventfd
that the loop watches like a socket: no thread and no GIL hand-off on the path to the 250.

`LoopSync.open(loop)` returns None where this is not available: another OS or architecture, a
kernel without AIO, a seccomp profile that forbids `io_setup`, or `fs.aio-max-nr` used up. The
spool then syncs on its own threads, as it does for test doubles of `Disk`.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import platform
import struct
import sys
from typing import NamedTuple

log = logging.getLogger(__name__)


class _Calls(NamedTuple):
    """The AIO system call numbers of one architecture."""

    setup: int
    destroy: int
    getevents: int
    submit: int


# Little-endian architectures only: the iocb layout below assumes it.
_SYSCALLS = {"x86_64": _Calls(206, 207, 208, 209), "aarch64": _Calls(0, 1, 4, 2)}
_IOCB = struct.Struct("<QIIHhIQQqQII")  # struct iocb, linux/aio_abi.h (64 bytes)
_EVENT = struct.Struct("<QQqq")  # struct io_event: data, obj, res, res2
_FDSYNC = 3  # IOCB_CMD_FDSYNC
_RESFD = 1  # IOCB_FLAG_RESFD: count the completion on aio_resfd (our eventfd)
_SLOTS = 64  # completions the context holds: far more than one journal has in flight


class LoopSync:
    """fdatasync through one Linux AIO context; results arrive as loop callbacks."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, libc: ctypes.CDLL, calls: _Calls, ctx: int
    ) -> None:
        self._loop = loop
        self._libc = libc
        self._calls = calls
        self._ctx = ctx
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events = ctypes.create_string_buffer(_EVENT.size * _SLOTS)
        self._keys = itertools.count(1)
        # key -> the caller's future and the iocb, which must outlive the request
        self._waiting: dict[int, tuple[asyncio.Future[None], ctypes.Array[ctypes.c_char]]] = {}
        loop.add_reader(self._eventfd, self._completed)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop) -> LoopSync | None:
        """A LoopSync for `loop`, or None where Linux AIO cannot be used (the reason is logged
        at debug level)."""
        calls = _SYSCALLS.get(platform.machine())
        if sys.platform != "linux" or calls is None:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if libc.syscall(calls.setup, ctypes.c_long(_SLOTS), ctypes.byref(ctx)) < 0:
            code = ctypes.get_errno()
            log.debug("no Linux AIO for the journal (io_setup: %s)", os.strerror(code))
            return None
        return cls(loop, libc, calls, ctx.value)

    def datasync(self, fd: int) -> asyncio.Future[None]:
        """fdatasync(fd) in the kernel; the future fails with its OSError, if any. Raises
        OSError at once when the kernel refuses the request."""
        key = next(self._keys)
        iocb = ctypes.create_string_buffer(
            _IOCB.pack(key, 0, 0, _FDSYNC, 0, fd, 0, 0, 0, 0, _RESFD, self._eventfd), _IOCB.size
        )
        request = (ctypes.c_void_p * 1)(ctypes.addressof(iocb))
        future = self._loop.create_future()
        self._waiting[key] = (future, iocb)
        if self._call(self._calls.submit, ctypes.c_long(1), request) != 1:
            del self._waiting[key]
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return future

    def close(self) -> None:
        """Stop watching; io_destroy waits for requests in flight, whose waiters are cancelled."""
        self._loop.remove_reader(self._eventfd)
        self._call(self._calls.destroy)
        os.close(self._eventfd)
        for future, _ in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    def _call(self, number: int, *args: object) -> int:
        """System call `number` on our AIO context; -1 and errno on failure."""
        return int(self._libc.syscall(number, ctypes.c_ulong(self._ctx), *args))

    def _completed(self) -> None:
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            return
        while True:
            got = self._call(
                self._calls.getevents, ctypes.c_long(0), ctypes.c_long(_SLOTS), self._events, None
            )
            for i in range(max(got, 0)):
                key, _, result, _ = _EVENT.unpack_from(self._events, i * _EVENT.size)
                future, _ = self._waiting.pop(key)
                if future.done():  # its waiter was cancelled
                    continue
                if result < 0:
                    future.set_exception(OSError(-result, os.strerror(-result)))
                else:
                    future.set_result(None)
            if got < _SLOTS:
                return
