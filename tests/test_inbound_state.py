"""The inbound state (SQLite) and the importer's pure decisions."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from relay.config import InboundConfig
from relay.errors import SpoolError
from relay.graphapi import Answer
from relay.inbound.importer import (
    MAX_RETRY_DELAY,
    delta_gone,
    incoming,
    malformed,
    retry_delay,
    unwanted,
)
from relay.inbound.sinks import Incoming
from relay.inbound.state import ImportState, Record, Stage

SOURCE = "relay@contoso.com/inbox"


def message(n: int, received: str = "2026-03-02T08:15:00Z") -> Incoming:
    return Incoming(
        id=f"AAMkAG{n:04d}=", received=received, internet_message_id=f"<{n}@x>",
        sender="ops@example.org", subject=f"Ticket {n}",
    )  # fmt: skip


async def test_rows_and_the_delta_link_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "inbound" / "helpdesk.sqlite3"
    state = await ImportState.open(path, source=SOURCE)
    assert repr(state) == "<ImportState helpdesk.sqlite3 delta_link=none queued=0>"
    await state.put(Record(message=message(1), stage=Stage.DONE))
    await state.put(Record(message=message(2), stage=Stage.PENDING, attempts=2, next_try=50.0,
                           reason="451 4.3.0 later"))  # fmt: skip
    await state.set_delta_link("https://graph.example/delta?$deltatoken=1")
    await state.aclose()
    state = await ImportState.open(path, source=SOURCE)
    try:
        assert state.delta_link == "https://graph.example/delta?$deltatoken=1"
        assert await state.known([message(n).id for n in (1, 2, 3)]) == {
            message(1).id, message(2).id
        }  # fmt: skip
        assert await state.due(49.0) == []
        assert await state.due(50.0) == [
            Record(message=message(2), stage=Stage.PENDING, attempts=2, next_try=50.0,
                   reason="451 4.3.0 later")
        ]  # fmt: skip
        assert await state.counts() == {Stage.DONE: 1, Stage.PENDING: 1}
    finally:
        await state.aclose()


async def test_another_mailbox_or_folder_drops_the_delta_link(tmp_path: Path) -> None:
    """The link belongs to one folder: after `folder:` changes, the import starts over (the
    rows stay, so nothing already imported comes again)."""
    path = tmp_path / "state.db"
    state = await ImportState.open(path, source=SOURCE)
    await state.set_delta_link("https://graph.example/delta?$deltatoken=1")
    await state.put(Record(message=message(1), stage=Stage.DONE))
    await state.aclose()
    state = await ImportState.open(path, source="relay@contoso.com/support")
    try:
        assert state.delta_link is None
        assert await state.known([message(1).id]) == {message(1).id}
    finally:
        await state.aclose()


async def test_forget_and_sweep_drop_only_final_rows(tmp_path: Path) -> None:
    state = await ImportState.open(tmp_path / "state.db", source=SOURCE)
    try:
        for n, stage in enumerate(Stage):
            await state.put(Record(message=message(n), stage=stage))
        await state.forget([message(n).id for n in range(len(Stage))])
        assert await state.counts() == {Stage.PENDING: 1, Stage.DELIVERED: 1}
        for n, stage in enumerate(Stage):
            await state.put(Record(message=message(n), stage=stage))
        assert await state.sweep({message(2).id}) == 2  # quarantined and gone were not listed
        assert await state.counts() == {Stage.PENDING: 1, Stage.DELIVERED: 1, Stage.DONE: 1}
    finally:
        await state.aclose()


async def test_concurrent_writes_all_land(tmp_path: Path) -> None:
    """Five hundred writers at once share commits; every row is there afterwards, and a
    writer that was cancelled still got its row."""
    state = await ImportState.open(tmp_path / "state.db", source=SOURCE)
    try:
        writes = [
            asyncio.create_task(state.put(Record(message=message(n), stage=Stage.DONE)))
            for n in range(500)
        ]
        await asyncio.sleep(0)
        writes[-1].cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        await state.set_delta_link(None)  # queued after the rest: they are all committed
        assert await state.counts() == {Stage.DONE: 500}
    finally:
        await state.aclose()


async def test_sqlite_errors_are_spool_errors(tmp_path: Path) -> None:
    (tmp_path / "state.db").mkdir()
    with pytest.raises(SpoolError, match=r"^inbound state .*state\.db: unable to open database"):
        await ImportState.open(tmp_path / "state.db", source=SOURCE)
    state = await ImportState.open(tmp_path / "ok.db", source=SOURCE)
    await state.aclose()
    with pytest.raises(SpoolError, match=r"^inbound state .*ok\.db is closed"):
        await state.put(Record(message=message(1), stage=Stage.DONE))
    with pytest.raises(SpoolError, match=r"is closed"):
        await state.known(["x"])


# -- pure decisions ------------------------------------------------------------------------------


def test_incoming_reads_a_delta_entry() -> None:
    entry = {
        "@odata.type": "#microsoft.graph.message",
        "id": "AAMkAG1=",
        "receivedDateTime": "2026-03-02T08:15:00Z",
        "internetMessageId": "<1@x>",
        "subject": "Pump 7",
        "from": {"emailAddress": {"name": "Ops", "address": "ops@example.org"}},
    }
    assert incoming(entry) == Incoming(
        id="AAMkAG1=", received="2026-03-02T08:15:00Z", internet_message_id="<1@x>",
        sender="ops@example.org", subject="Pump 7",
    )  # fmt: skip
    assert incoming({"id": "AAMkAG2=", "from": None, "subject": None}) == Incoming(
        id="AAMkAG2=", received="", internet_message_id="", sender="", subject=""
    )
    assert incoming({"subject": "no id"}) is None


def test_unwanted_by_sender_and_subject() -> None:
    """Globs, any case; a message must match one sender pattern and one subject pattern."""
    config = InboundConfig(
        name="x", account="a", mailbox="m@contoso.com", deliver={},
        senders=("*@plant.example.org",), subjects=("Alarm*", "*[[]urgent]*"),
    )  # fmt: skip

    def verdict(sender: str, subject: str) -> str | None:
        found = Incoming(id="1", received="", internet_message_id="", sender=sender,
                         subject=subject)  # fmt: skip
        return unwanted(config, found)

    assert verdict("PLC@Plant.example.org", "alarm: pump 7") is None
    assert verdict("x@plant.example.org", "Re: [URGENT] valve") is None
    assert verdict("", "Alarm") == "sender (none) matches no match.sender"
    assert verdict("x@example.org", "Alarm") == "sender x@example.org matches no match.sender"
    assert verdict("x@plant.example.org", "Newsletter") == "subject matches no match.subject"
    assert unwanted(dataclasses.replace(config, senders=(), subjects=()), message(1)) is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"Subject: x\r\n\r\nbody", None),
        (b"Subject: x", None),
        (b"Received: from a\r\n by b\r\nSubject: x\n\nbody", None),
        (b"", "empty message"),
        (b" \r\n\t\r\n", "empty message"),
        (b"body only\r\n", "no header fields at the start"),
        (b"\r\nSubject: late\r\n", "no header fields at the start"),
    ],
)
def test_malformed(raw: bytes, problem: str | None) -> None:
    assert malformed(raw) == problem


@pytest.mark.parametrize(
    ("status", "body", "gone"),
    [
        (410, b"", True),
        (400, b'{"error": {"code": "syncStateNotFound", "message": "x"}}', True),
        (404, b'{"error": {"code": "SyncStateNotFound", "message": "x"}}', True),
        (400, b'{"error": {"code": "resyncRequired", "message": "x"}}', True),
        (400, b'{"error": {"code": "BadRequest", "message": "x"}}', False),
        (503, b"<html>busy</html>", False),
    ],
)
def test_delta_gone(status: int, body: bytes, gone: bool) -> None:
    assert delta_gone(Answer(status, body, None)) is gone


def test_retry_delay_doubles_up_to_the_cap_and_honours_retry_after() -> None:
    assert [retry_delay(30, n, None) for n in (1, 2, 3)] == [30, 60, 120]
    assert retry_delay(30, 20, None) == MAX_RETRY_DELAY
    assert retry_delay(30, 100_000, None) == MAX_RETRY_DELAY  # months of failures
    assert retry_delay(30, 1, 300) == 300
    assert retry_delay(0, 5, None) == 0
