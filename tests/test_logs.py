"""`log.format`: one event per line, text or JSON; the queue id on every line about a message."""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import sys
from pathlib import Path

from relaykit import relay_config, wait_until

from relay.app import Relay
from relay.logs import TEXT_FORMAT, JsonFormatter, TextFormatter, queue_id
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.smtp import Phase, server_busy


def send(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.example")
        client.mail("relay@contoso.com")
        client.rcpt("someone@example.org")
        code, text = client.data(b"From: relay@contoso.com\r\nSubject: logs\r\n\r\nhi\r\n")
        assert code == 250
        return text.decode().rsplit(" ", 1)[1]


async def test_every_line_about_a_message_carries_its_queue_id(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, caplog
) -> None:
    """Received, deferred, delivered: each line names the message, and its JSON form has `qid`."""
    caplog.set_level(logging.INFO, logger="relay")
    emulator.smtp.inject(server_busy(Phase.DATA))
    relay = Relay(relay_config(emulator, sample, tmp_path / "spool", retry=(0.05,)))
    await relay.start()
    try:
        qid = await asyncio.to_thread(send, relay.listeners[0].port)
        await emulator.smtp.wait_for_messages(1)
        await wait_until(lambda: any(" delivered " in r.getMessage() for r in caplog.records))
    finally:
        await relay.stop(grace=2)
    about = [r for r in caplog.records if qid in r.getMessage()]
    lines = [r.getMessage() for r in about]
    assert " received from=<relay@contoso.com> " in lines[0]
    assert any(" deferred to=someone@example.org " in line for line in lines)
    assert any(" delivered to=someone@example.org " in line for line in lines)
    for record in about:
        assert record.getMessage().startswith(f"{qid}: ")
        assert json.loads(JsonFormatter().format(record))["qid"] == qid


def test_an_event_with_a_traceback_stays_on_one_line() -> None:
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "relay.scheduler",
            logging.ERROR,
            __file__,
            1,
            "%s: spool error",
            ("0" * 22,),
            sys.exc_info(),
        )
    text = TextFormatter(TEXT_FORMAT).format(record)
    assert "\n" not in text and "ValueError: first line\\nsecond line" in text
    event = json.loads(JsonFormatter().format(record))
    assert event["qid"] == "0" * 22 and event["message"] == f"{'0' * 22}: spool error"
    assert "\n" not in JsonFormatter().format(record)
    assert event["exception"].endswith("ValueError: first line\nsecond line")


def test_lines_about_no_message_have_no_qid() -> None:
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, "stopped", (), None)
    assert "qid" not in json.loads(JsonFormatter().format(record))
    assert queue_id("session 5BEAE7136A1BD653 ended") is None
