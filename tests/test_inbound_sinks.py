"""Each sink, through the importer against the emulated Graph, and on its own: what the
application receives, and what a refusal or an unreachable receiver becomes."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from inboundkit import (
    HttpReceiver,
    SmtpReceiver,
    http_receiver,
    importer,
    inbound,
    mail,
    maildir_files,
    one_round,
    smtp_receiver,
)

from relay.errors import TemporaryFailure, UpstreamUnavailable
from relay.inbound.importer import Importer, Outcome
from relay.inbound.sinks import DirectorySink, HttpSink, Incoming, MaildirSink, SmtpSink
from relay.inbound.state import ImportState, Stage
from relay.reply import Reply
from relay.testing.emulator import Emulator, SampleTenant

MESSAGE = Incoming(
    id="AAMkAGI2TG93AAA=",
    received="2026-03-02T08:15:00Z",
    internet_message_id="<a@example.org>",
    sender="ops@example.org",
    subject="Pump 7",
)


def counts(**outcomes: int) -> Counter[Outcome]:
    return Counter({Outcome(name): n for name, n in outcomes.items()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def rows(imp: Importer) -> dict[Stage, int]:
    state = await ImportState.open(imp.state_path, source=imp.source)
    try:
        return await state.counts()
    finally:
        await state.aclose()


# -- maildir and directory ---------------------------------------------------------------------


async def test_maildir_gets_exact_bytes_under_stable_names(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Each message is one file in new/, byte for byte as `$value` gave it, named
    `<received epoch>.<key>.relay`; tmp/ is left empty and cur/ exists for the reader."""
    raw = mail(1)
    graph_id = emulator.graph.deliver(sample.mailbox, raw)
    box = tmp_path / "Maildir"
    imp = importer(emulator, sample, inbound(sample, {"maildir": box}), tmp_path / "state.db")
    await one_round(imp)
    [stored] = emulator.graph.messages(sample.mailbox)
    [path] = maildir_files(box)
    key = Incoming(id=graph_id, received="", internet_message_id="", sender="", subject="").key
    assert path.name == f"{int(stored.received.timestamp())}.{key}.relay"
    assert path.parent.name == "new"
    assert path.read_bytes() == raw
    assert list((box / "tmp").iterdir()) == [] and (box / "cur").is_dir()


async def test_directory_gets_one_eml_per_message(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    for n in range(3):
        emulator.graph.deliver(sample.mailbox, mail(n))
    drop = tmp_path / "drop"
    imp = importer(emulator, sample, inbound(sample, {"directory": drop}), tmp_path / "state.db")
    assert (await one_round(imp)).counts == counts(imported=3)
    files = sorted(p for p in drop.iterdir() if p.is_file())
    assert [p.suffix for p in files] == [".eml"] * 3
    assert sorted(p.read_bytes() for p in files) == sorted(mail(n) for n in range(3))
    assert list((drop / ".relay-tmp").iterdir()) == []


@pytest.mark.parametrize("sink_class", [MaildirSink, DirectorySink])
async def test_put_and_commit_again_make_no_second_file(
    tmp_path: Path, sink_class: type[MaildirSink | DirectorySink]
) -> None:
    """A crash between the steps repeats them: put rewrites the same temporary file, and a
    second commit finds nothing left to rename, even when the reader took the file away."""
    sink = sink_class(tmp_path / "out")
    await sink.open()
    await sink.put(MESSAGE, b"Subject: half\r\n")
    await sink.put(MESSAGE, b"Subject: whole\r\n\r\nbody\r\n")
    await sink.commit(MESSAGE)
    [delivered] = [p for p in sink.delivered.iterdir() if p.is_file()]
    assert delivered.read_bytes() == b"Subject: whole\r\n\r\nbody\r\n"
    await sink.commit(MESSAGE)
    delivered.unlink()  # the application took it
    await sink.commit(MESSAGE)
    assert [p for p in sink.delivered.iterdir() if p.is_file()] == []
    assert list(sink.staging.iterdir()) == []


async def test_a_file_sink_that_cannot_write_is_a_temporary_failure(tmp_path: Path) -> None:
    sink = MaildirSink(tmp_path / "box")
    await sink.open()
    (tmp_path / "box" / "tmp").rmdir()
    with pytest.raises(TemporaryFailure) as caught:
        await sink.put(MESSAGE, b"Subject: x\r\n\r\n")
    name = sink.name(MESSAGE)
    assert caught.value.reply == Reply(
        451, "4.3.0", f"cannot write {tmp_path}/box/tmp/{name}: No such file or directory"
    )
    (tmp_path / "box" / "tmp").mkdir()
    await sink.put(MESSAGE, b"Subject: x\r\n\r\n")
    (tmp_path / "box" / "new").rmdir()
    with pytest.raises(TemporaryFailure, match=r"cannot write .*/box/new/"):
        await sink.commit(MESSAGE)


async def test_a_sink_directory_that_cannot_be_made_fails_the_start(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a directory")
    config = inbound(sample, {"maildir": tmp_path / "file" / "box"})
    imp = importer(emulator, sample, config, tmp_path / "state.db")
    with pytest.raises(NotADirectoryError):
        await imp.start()
    assert repr(imp).startswith("<Importer helpdesk relay@contoso.com/inbox -> maildir stopped")


# -- smtp ----------------------------------------------------------------------------------------


def smtp_importer(
    emulator: Emulator, sample: SampleTenant, receiver: SmtpReceiver, tmp_path: Path
) -> Importer:
    config = inbound(sample, {"smtp": ("127.0.0.1", receiver.port)})
    return importer(emulator, sample, config, tmp_path / "state.db")


async def test_smtp_sink_delivers_to_the_mailbox_from_the_sender(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """MAIL FROM the message's From address, RCPT TO the mailbox it came from, the bytes as
    Graph gave them (8-bit included)."""
    raw = mail(1, body="Pumpe 7: Druck zu niedrig, bitte prüfen.\n")
    emulator.graph.deliver(sample.mailbox, raw)
    async with smtp_receiver() as receiver:
        imp = smtp_importer(emulator, sample, receiver, tmp_path)
        assert (await one_round(imp)).counts == counts(imported=1)
    assert receiver.received == [("ops@example.org", [sample.mailbox], raw)]


async def test_smtp_4xx_is_retried_and_5xx_quarantined(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 451 defers the message to the next round; a 554 quarantines it: it stays in the
    mailbox unread, a warning says why, and it is never tried again."""
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.deliver(sample.mailbox, mail(2))
    async with smtp_receiver() as receiver:
        receiver.refusals = ["451 4.3.0 Mailbox busy", "554 5.6.0 Message rejected"]
        imp = smtp_importer(emulator, sample, receiver, tmp_path)
        await imp.start()
        try:
            first = await imp.poll()
            second = await imp.poll()
            third = await imp.poll()
        finally:
            await imp.stop()
    assert first.counts == counts(deferred=1, quarantined=1)
    assert (second.counts, third.counts) == (counts(imported=1), counts())
    [(_, _, delivered)] = receiver.received
    unread = [m for m in emulator.graph.messages(sample.mailbox) if not m.is_read]
    assert [m.mime for m in unread] != [delivered] and len(unread) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "attempt 1, next in 0s): 451 4.3.0 Mailbox busy" in w and "delivery of <ticket-" in w
        for w in warnings
    )
    assert any(
        "refused: 554 5.6.0 Message rejected; it stays in the mailbox" in w and "quarantined" in w
        for w in warnings
    )
    assert await rows(imp) == {Stage.DONE: 1, Stage.QUARANTINED: 1}


async def test_an_unreachable_smtp_server_defers(tmp_path: Path) -> None:
    sink = SmtpSink(host="127.0.0.1", port=free_port(), mailbox="relay@contoso.com")
    with pytest.raises(UpstreamUnavailable) as caught:
        await sink.put(MESSAGE, b"Subject: x\r\n\r\n")
    assert caught.value.reply.status == "4.4.1"


# -- http ------------------------------------------------------------------------------------------


def http_importer(
    emulator: Emulator, sample: SampleTenant, receiver: HttpReceiver, tmp_path: Path
) -> Importer:
    config = inbound(sample, {"http": receiver.url})
    return importer(emulator, sample, config, tmp_path / "state.db")


async def test_http_sink_posts_the_message_with_an_idempotency_key(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    raw = mail(1)
    graph_id = emulator.graph.deliver(sample.mailbox, raw)
    async with http_receiver() as receiver:
        imp = http_importer(emulator, sample, receiver, tmp_path)
        assert (await one_round(imp)).counts == counts(imported=1)
    [(headers, body)] = receiver.received
    key = Incoming(id=graph_id, received="", internet_message_id="", sender="", subject="").key
    assert body == raw
    assert headers["Content-Type"] == "message/rfc822"
    assert (headers["Idempotency-Key"], headers["X-Relay-Inbound"]) == (key, "helpdesk")
    assert headers["Content-Length"] == str(len(raw))


async def test_http_non_2xx_is_retried_with_backoff(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """500, then 404 (a redirect or a wrong path is no confirmation either): deferred twice,
    with the endpoint's answer in the log; the third round delivers it, once."""
    emulator.graph.deliver(sample.mailbox, mail(1))
    async with http_receiver() as receiver:
        receiver.statuses = [500, 302]
        imp = http_importer(emulator, sample, receiver, tmp_path)
        await imp.start()
        try:
            reports = [await imp.poll() for _ in range(4)]
        finally:
            await imp.stop()
    assert [r.counts for r in reports] == [
        counts(deferred=1), counts(deferred=1), counts(imported=1), counts()
    ]  # fmt: skip
    assert len(receiver.received) == 1
    assert "next in 0s): 451 4.3.0 HTTP endpoint answered 500 Internal Server Error: answer" \
        " 500 from the app" in caplog.text  # fmt: skip
    assert "(attempt 2, next in 0s): 451 4.3.0 HTTP endpoint answered 302 Found" in caplog.text


async def test_http_retry_after_is_honoured(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """503 with Retry-After: 120: the message is not tried again before two minutes."""
    emulator.graph.deliver(sample.mailbox, mail(1))
    async with http_receiver() as receiver:
        receiver.statuses, receiver.retry_after = [503], "120"
        imp = http_importer(emulator, sample, receiver, tmp_path)
        await imp.start()
        try:
            first = await imp.poll()
            second = await imp.poll()
        finally:
            await imp.stop()
    assert (first.counts, second.counts) == (counts(deferred=1), counts())
    state = await ImportState.open(imp.state_path, source=imp.source)
    try:
        assert await state.due(time.time() + 100) == []
        [pending] = await state.due(time.time() + 130)
    finally:
        await state.aclose()
    assert (pending.stage, pending.attempts) == (Stage.PENDING, 1)
    assert pending.reason.startswith("451 4.3.0 HTTP endpoint answered 503 Service Unavailable")


async def test_an_unreachable_http_endpoint_defers(tmp_path: Path) -> None:
    sink = HttpSink(url=f"http://127.0.0.1:{free_port()}/mail", inbound="helpdesk")
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await sink.put(MESSAGE, b"Subject: x\r\n\r\n")
    finally:
        await sink.aclose()
    assert caught.value.reply.text.startswith("HTTP endpoint unreachable: ClientConnectorError: ")


def test_maildir_names_sort_by_arrival_and_differ_by_id() -> None:
    other = Incoming(
        id="AAMkAGI2TG94AAA=", received="2026-03-02T08:15:01Z", internet_message_id="",
        sender="", subject="",
    )  # fmt: skip
    sink = MaildirSink(Path("box"))
    first, second = sink.name(MESSAGE), sink.name(other)
    assert first < second and first.split(".")[1] != second.split(".")[1]
    assert first.startswith("1772439300.")
    assert DirectorySink(Path("drop")).name(MESSAGE).startswith("20260302T081500Z-")
    assert os.sep not in first
