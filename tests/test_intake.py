"""The relay's intake (router + spool) behind a real listener: what a client hears when the
spool cannot store its message, and that nothing of a refused message is ever delivered."""

from __future__ import annotations

import asyncio
import errno
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
from test_spool import FaultyDisk, is_journal, is_materialising

from relay.app import RelayIntake
from relay.config import Limits, ListenerConfig, RouteConfig
from relay.listener import Listener
from relay.metrics import Metrics
from relay.routing import Router
from relay.spool import DIRECT_BYTES, Spool

DATA = b"From: relay@contoso.com\r\nTo: x@example.org\r\nSubject: s\r\n\r\nbody\r\n"
LARGE = DATA + (b"x" * 76 + b"\r\n") * (DIRECT_BYTES // 78 + 1)  # its own file, not the journal


def send(port: int, data: bytes = DATA) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.example")
        client.mail("relay@contoso.com")
        client.rcpt("x@example.org")
        return client.data(data)


@pytest.mark.parametrize(
    ("data", "written_to"),
    [(DATA, is_journal), (LARGE, is_materialising)],
    ids=["journaled", "large"],
)
@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (errno.ENOSPC, (452, b"4.3.1 Insufficient system storage, try again later")),
        (errno.EIO, (451, b"4.3.0 Temporary failure storing the message, try again later")),
    ],
)
async def test_spool_failure_is_a_temporary_refusal_and_nothing_is_kept(
    tmp_path: Path,
    code: int,
    reply: tuple[int, bytes],
    data: bytes,
    written_to: Callable[[Path], bool],
) -> None:
    disk = FaultyDisk()
    disk.fail_write = lambda p: code if written_to(p) else None
    spool = await Spool.open(tmp_path / "spool", disk=disk, rescan_interval=None)
    route = RouteConfig(name="default", account="contoso", mailbox="relay@contoso.com")
    listener = Listener(
        ListenerConfig(host="127.0.0.1", port=0),
        limits=Limits(),
        users={},
        intake=RelayIntake(Router([route]), spool, Metrics()),
    )
    await listener.start()
    try:
        assert await asyncio.to_thread(send, listener.port, data) == reply
        disk.fail_write = lambda p: None
        code_ok, text = await asyncio.to_thread(send, listener.port, data)
        assert code_ok == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    finally:
        await listener.stop(grace=1)
        await spool.aclose()
    reopened = await Spool.open(tmp_path / "spool", rescan_interval=None)
    try:
        (kept,) = reopened.ready()  # only the message that got its 250
        assert kept.qid == text.decode().rsplit(" ", 1)[1]
        assert await reopened.read(kept.qid) == data
    finally:
        await reopened.aclose()
