"""The scheduler's in-memory decisions: pacing, order of new and deferred mail, route back-off.

These are the parts with no I/O, tested with a controlled clock; the delivery loop itself is
tested end to end in test_relay.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relay.config import Rate, RouteConfig, SpoolConfig
from relay.reply import Reply
from relay.scheduler import ROUTE_BACKOFF_START, Pacer, RouteRuntime, Scheduler, _RouteQueue
from relay.spool import Envelope, Spool
from relay.transports import Delivered, OutgoingMessage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pacer_spaces_sends_at_the_rate() -> None:
    """30/min: one send every 2 s; a burst waits its turn, an idle pacer sends at once."""
    clock = Clock()
    pacer = Pacer(Rate(count=30, per=60.0).interval, clock)
    assert [pacer.reserve() for _ in range(4)] == [0.0, 2.0, 4.0, 6.0]
    clock.now += 60
    assert pacer.reserve() == 0.0
    assert repr(pacer) == "<Pacer every 2s next in 2.00s>"


def queue() -> _RouteQueue:
    route = RouteConfig(name="r", account="a", mailbox="m@x")
    return _RouteQueue(RouteRuntime(config=route, transport=None, pacer=Pacer(0.0)))  # type: ignore[arg-type]


def test_new_and_due_deferred_mail_alternate() -> None:
    q = queue()
    now = time.time()
    for n in range(3):
        q.add(f"new{n}", now - 1)
    # deferred ones that come due by `later`:
    for n in range(3):
        q.add(f"old{n}", now + 0.001 * (n + 1))
    later = now + 1
    taken = [q.take(later) for _ in range(6)]
    assert taken == ["new0", "old0", "new1", "old1", "new2", "old2"]
    assert q.take(later) is None


def test_a_later_notice_replaces_an_earlier_one() -> None:
    """The spool may report a message again (rescan) or with a new due time: one delivery,
    at the latest time."""
    q = queue()
    now = time.time()
    q.add("m", now + 10)
    q.add("m", now + 10)
    q.add("m", now + 20)
    assert q.take(now + 15) == pytest.approx(5.0)
    assert q.take(now + 21) == "m"
    assert q.take(now + 21) is None


def test_route_backs_off_while_its_upstream_is_down() -> None:
    q = queue()
    q.add("m", time.time() - 1)
    q.trouble(retry_first=8.0)
    assert q.backoff == ROUTE_BACKOFF_START
    wait = q.take(time.time())
    assert isinstance(wait, float) and 0 < wait <= ROUTE_BACKOFF_START
    for _ in range(5):
        q.trouble(retry_first=8.0)
    assert q.backoff == 8.0  # doubles, capped at the first retry interval
    q.healthy()
    assert q.take(time.time()) == "m"


class FlakyTransport:
    """Raises a plain bug the first time, then accepts everything."""

    def __init__(self) -> None:
        self.calls = 0
        self.sent = asyncio.Event()

    async def send(self, message: OutgoingMessage) -> Delivered:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in a transport")
        self.sent.set()
        return Delivered(reply=Reply(250, "2.0.0", "OK"), accepted=message.rcpt_tos)

    async def aclose(self) -> None:
        pass


async def test_an_unexpected_error_neither_kills_the_route_nor_strands_the_mail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    route = RouteConfig(name="r", account="a", mailbox="m@x")
    transport = FlakyTransport()
    runtime = RouteRuntime(config=route, transport=transport, pacer=Pacer(0.0))
    async with await Spool.open(tmp_path / "spool", rescan_interval=None) as spool:
        scheduler = Scheduler(
            spool=spool, routes={"r": runtime}, policy=SpoolConfig(path=tmp_path, retry=(0.05,))
        )
        spool.on_ready(scheduler.submit)
        await scheduler.start()
        try:
            await spool.enqueue(
                Envelope("m@x", ("to@y",), "r", "127.0.0.1"), b"Subject: s\r\n\r\nb"
            )
            async with asyncio.timeout(10):
                await transport.sent.wait()
        finally:
            await scheduler.stop(grace=1)
        assert transport.calls == 2
        assert "unexpected error during delivery; retrying later" in caplog.text
        assert not spool.ready()
