"""What the importer does with each kind of trouble Graph (or a message) can give: the round
goes on where it can, nothing is imported twice, and the log says what happened."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import pytest
from inboundkit import IssuerTokens, importer, inbound, mail, maildir_files, message_id, one_round

from relay.config import AfterImport
from relay.errors import TokenUnavailable
from relay.inbound.importer import Importer, Outcome
from relay.inbound.state import ImportState, Stage
from relay.reply import Reply
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.graph import ITEM_NOT_FOUND

ERROR_TEXT = "Graph 503 ServiceUnavailable: Service Unavailable"


def counts(**outcomes: int) -> Counter[Outcome]:
    return Counter({Outcome(name): n for name, n in outcomes.items()})


def maildir_importer(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, **options: object
) -> Importer:
    config = inbound(sample, {"maildir": tmp_path / "box"}, **options)
    return importer(emulator, sample, config, tmp_path / "state.db")


def imported_ids(tmp_path: Path) -> list[str]:
    return sorted(message_id(p.read_bytes()) for p in maildir_files(tmp_path / "box"))


def requests_to(emulator: Emulator, end: str, status: int | None = None) -> int:
    return sum(
        1
        for r in emulator.graph.requests
        if r.path.endswith(end) and (status is None or r.status == status)
    )


async def state_of(imp: Importer) -> ImportState:
    return await ImportState.open(imp.state_path, source=imp.source)


# -- throttling and service trouble -----------------------------------------------------------


async def test_429_with_a_short_retry_after_is_waited_out(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.throttle(retry_after=0, path="*/$value", times=2)
    imp = maildir_importer(emulator, sample, tmp_path)
    assert (await one_round(imp)).counts == counts(imported=1)
    assert requests_to(emulator, "/$value", 429) == 2
    assert requests_to(emulator, "/$value", 200) == 1


async def test_429_with_a_long_retry_after_defers_the_message_that_long(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.throttle(retry_after=120, path="*/$value")
    imp = maildir_importer(emulator, sample, tmp_path)
    await imp.start()
    try:
        assert (await imp.poll()).counts == counts(deferred=1)
        assert (await imp.poll()).counts == counts()  # not due yet
    finally:
        await imp.stop()
    state = await state_of(imp)
    try:
        [pending] = await state.due(time.time() + 130)
    finally:
        await state.aclose()
    assert pending.reason == (
        "451 4.3.2 Graph 429 ApplicationThrottled: Application is over its MailboxConcurrency"
        " limit."
    )
    assert pending.next_try > time.time() + 100


async def test_503_on_the_listing_ends_the_round(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 without Retry-After on the delta listing: the round reports it, the log says
    it, and the next round imports everything."""
    for n in range(3):
        emulator.graph.deliver(sample.mailbox, mail(n))
    emulator.graph.unavailable(path="*/messages/delta")
    imp = maildir_importer(emulator, sample, tmp_path)
    await imp.start()
    try:
        failed = await imp.poll()
        later = await imp.poll()
    finally:
        await imp.stop()
    assert (failed.counts, failed.error) == (counts(), f"451 4.3.0 {ERROR_TEXT}")
    assert f"inbound helpdesk: round ended early: 451 4.3.0 {ERROR_TEXT}" in caplog.messages
    assert (later.counts, later.full, later.error) == (counts(imported=3), True, None)


async def test_a_round_cut_short_after_some_pages_starts_over_without_duplicates(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Three messages to a page; Graph fails the second page: the first page's messages are
    imported, no delta link is saved, and the next round lists the folder again, skipping
    what is done."""
    for n in range(6):
        emulator.graph.deliver(sample.mailbox, mail(n))
    config = inbound(sample, {"maildir": tmp_path / "box"})
    imp = importer(emulator, sample, config, tmp_path / "state.db", page_size=3)
    hold = emulator.graph.hold(sample.mailbox)
    await imp.start()
    try:
        polling = imp.poll()
        await hold.arrived(1)  # the first page's request, admitted: the fault is for the next
        emulator.graph.unavailable(path="*/messages/delta")
        hold.release()
        first = await polling
        second = await imp.poll()
    finally:
        await imp.stop()
    assert (first.counts, first.error) == (counts(imported=3), f"451 4.3.0 {ERROR_TEXT}")
    assert (second.counts, second.full, second.error) == (counts(imported=3), True, None)
    assert imported_ids(tmp_path) == sorted(f"<ticket-{n}@app.example.org>" for n in range(6))
    assert requests_to(emulator, "/$value") == 6


async def test_503_with_retry_after_is_waited_out(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.unavailable(retry_after=0, path="*/messages/delta")
    imp = maildir_importer(emulator, sample, tmp_path)
    report = await one_round(imp)
    assert (report.counts, report.error) == (counts(imported=1), None)


# -- tokens -------------------------------------------------------------------------------------


async def test_401_gets_one_fresh_token(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    tokens = IssuerTokens(emulator, sample)
    tokens.cached = tokens.issue(lifetime=-60)
    config = inbound(sample, {"maildir": tmp_path / "box"})
    imp = importer(emulator, sample, config, tmp_path / "state.db", tokens=tokens)
    assert (await one_round(imp)).counts == counts(imported=1)
    assert tokens.invalidated == 1
    assert requests_to(emulator, "/messages/delta", 401) == 1


async def test_401_twice_ends_the_round(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    expired = "Lifetime validation failed, the token is expired."
    emulator.graph.fail_next(401, "InvalidAuthenticationToken", expired, times=2)
    tokens = IssuerTokens(emulator, sample)
    config = inbound(sample, {"maildir": tmp_path / "box"})
    imp = importer(emulator, sample, config, tmp_path / "state.db", tokens=tokens)
    await imp.start()
    try:
        failed = await imp.poll()
        later = await imp.poll()
    finally:
        await imp.stop()
    assert failed.error == (
        "451 4.3.0 Graph 401 InvalidAuthenticationToken: Lifetime validation failed, the token"
        " is expired."
    )
    assert tokens.invalidated == 1
    assert later.counts == counts(imported=1)


class NoTokens(IssuerTokens):
    async def token(self, scope: str) -> str:
        raise TokenUnavailable(Reply(451, "4.7.0", "identity platform unreachable"))


async def test_no_token_ends_the_round(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    config = inbound(sample, {"maildir": tmp_path / "box"})
    imp = importer(emulator, sample, config, tmp_path / "state.db",
                   tokens=NoTokens(emulator, sample))  # fmt: skip
    report = await one_round(imp)
    assert report.error == "451 4.7.0 identity platform unreachable"


# -- messages that go away ------------------------------------------------------------------------


async def test_a_message_removed_before_its_mime_is_fetched_is_gone(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "relay.inbound")
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.fail_next(404, "ErrorItemNotFound", ITEM_NOT_FOUND, path="*/$value")
    imp = maildir_importer(emulator, sample, tmp_path)
    report = await one_round(imp)
    assert report.counts == counts(gone=1)
    assert maildir_files(tmp_path / "box") == []
    assert any(
        m.startswith("inbound helpdesk: <ticket-1@app.example.org> (id ")
        and m.endswith("was removed from the folder before it was imported")
        for m in caplog.messages
    )


@pytest.mark.parametrize(
    ("after", "method", "path"),
    [(AfterImport.MARK_READ, "PATCH", None), (AfterImport.DELETE, "DELETE", None),
     (AfterImport.MOVE_TO, "POST", "*/move")],
)  # fmt: skip
async def test_a_message_removed_before_its_after_action_is_done(
    emulator: Emulator,
    sample: SampleTenant,
    tmp_path: Path,
    after: AfterImport,
    method: str,
    path: str | None,
) -> None:
    """Someone deleted the message once it was delivered: the action's 404 means done."""
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.fail_next(404, "ErrorItemNotFound", ITEM_NOT_FOUND, method=method, path=path)
    move_to = "Imported" if after is AfterImport.MOVE_TO else None
    imp = maildir_importer(emulator, sample, tmp_path, after=after, move_to=move_to)
    await imp.start()
    try:
        assert (await imp.poll()).counts == counts(imported=1)
        assert (await imp.poll()).counts == counts()
    finally:
        await imp.stop()
    assert imported_ids(tmp_path) == ["<ticket-1@app.example.org>"]


async def test_a_failed_after_action_is_retried_without_delivering_again(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.unavailable(path="*/move")
    imp = maildir_importer(emulator, sample, tmp_path, after=AfterImport.MOVE_TO,
                           move_to="Imported")  # fmt: skip
    await imp.start()
    try:
        first = await imp.poll()
        second = await imp.poll()
    finally:
        await imp.stop()
    assert (first.counts, second.counts) == (counts(deferred=1), counts(imported=1))
    assert "after: action of <ticket-1@app.example.org>" in caplog.text
    assert f"(attempt 1, next in 0s): 451 4.3.0 {ERROR_TEXT}" in caplog.text
    assert imported_ids(tmp_path) == ["<ticket-1@app.example.org>"]
    assert emulator.graph.messages(sample.mailbox, "inbox") == []
    assert requests_to(emulator, "/$value") == 1


# -- the delta state lost ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["410", "syncStateNotFound", "resyncRequired", "404"])
async def test_a_lost_delta_state_relists_the_folder_without_duplicates(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, how: str
) -> None:
    """Graph forgets the delta token (410 Gone, or a 40x naming syncStateNotFound or
    resyncRequired; or 404, the folder made again): the next round lists the folder in full,
    imports only what is new, and forgets rows of messages no longer there."""
    for n in range(4):
        emulator.graph.deliver(sample.mailbox, mail(n))
    imp = maildir_importer(emulator, sample, tmp_path)
    await imp.start()
    try:
        await imp.poll()
        [gone] = emulator.graph.messages(sample.mailbox)[:1]
        emulator.graph.store(sample.mailbox).remove(gone.id)
        emulator.graph.deliver(sample.mailbox, mail(4))
        if how == "410":
            emulator.graph.invalidate_delta_tokens()
        else:
            status = 404 if how == "404" else 400
            emulator.graph.fail_next(status, how, path="*/messages/delta")
        report = await imp.poll()
    finally:
        await imp.stop()
    assert (report.counts, report.full, report.error) == (counts(imported=1), True, None)
    assert imported_ids(tmp_path) == sorted(f"<ticket-{n}@app.example.org>" for n in range(5))
    state = await state_of(imp)
    try:
        assert await state.counts() == {Stage.DONE: 4}
    finally:
        await state.aclose()


async def test_a_delta_state_lost_twice_in_a_round_ends_it(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    imp = maildir_importer(emulator, sample, tmp_path)
    emulator.graph.fail_next(410, "syncStateNotFound", "gone", path="*/messages/delta", times=2)
    report = await one_round(imp)
    assert report.error == "451 4.3.0 Graph 410 syncStateNotFound: gone"


async def test_removed_messages_are_forgotten(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Moved away by the import itself: the next delta round reports the old ids removed, and
    the state drops their rows."""
    for n in range(3):
        emulator.graph.deliver(sample.mailbox, mail(n))
    imp = maildir_importer(emulator, sample, tmp_path, after=AfterImport.DELETE)
    await imp.start()
    try:
        await imp.poll()
        await imp.poll()
    finally:
        await imp.stop()
    state = await state_of(imp)
    try:
        assert await state.counts() == {}
    finally:
        await state.aclose()


# -- bad messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "malformed: empty message"),
        (b"\r\n\r\n", "malformed: empty message"),
        (b"this is not a message\r\nat all\r\n", "malformed: no header fields at the start"),
    ],
)
async def test_a_malformed_message_is_quarantined_and_the_rest_go_on(
    emulator: Emulator,
    sample: SampleTenant,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    reason: str,
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    bad = emulator.graph.deliver(sample.mailbox, raw)
    emulator.graph.deliver(sample.mailbox, mail(2))
    imp = maildir_importer(emulator, sample, tmp_path)
    await imp.start()
    try:
        assert (await imp.poll()).counts == counts(imported=2, quarantined=1)
        assert (await imp.poll()).counts == counts()
    finally:
        await imp.stop()
    assert imported_ids(tmp_path) == ["<ticket-1@app.example.org>", "<ticket-2@app.example.org>"]
    [left] = [m for m in emulator.graph.messages(sample.mailbox) if not m.is_read]
    assert left.id == bad
    [line] = [m for m in caplog.messages if "quarantined" in m]
    assert line.startswith(f"inbound helpdesk: quarantined <{left.summary.internet_message_id[1:]}")
    assert line.endswith(f"from=<> subject='': {reason}; it stays in the mailbox")


async def test_a_message_over_max_size_is_quarantined(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = mail(2, body="x" * 4000 + "\n")
    emulator.graph.deliver(sample.mailbox, mail(1))
    emulator.graph.deliver(sample.mailbox, big)
    imp = maildir_importer(emulator, sample, tmp_path, max_size=2048)
    assert (await one_round(imp)).counts == counts(imported=1, quarantined=1)
    assert imported_ids(tmp_path) == ["<ticket-1@app.example.org>"]
    assert (
        "inbound helpdesk: quarantined <ticket-2@app.example.org> (id " in caplog.text
        and f"from=<ops@example.org> subject='Ticket 2': larger than max_size ({len(big)} > 2048"
        " bytes); it stays in the mailbox"
        in caplog.text
    )


# -- match: --------------------------------------------------------------------------------------


async def test_match_leaves_other_messages_untouched(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Only messages from a matching sender with a matching subject are imported (globs,
    any case); the others stay unread in the mailbox and get no row."""
    emulator.graph.deliver(sample.mailbox, mail(1, sender="alerts@Plant.example.org"))
    emulator.graph.deliver(sample.mailbox, mail(2, sender="alerts@plant.example.org",
                                                 subject="Newsletter"))  # fmt: skip
    emulator.graph.deliver(sample.mailbox, mail(3, sender="someone@elsewhere.example"))
    emulator.graph.deliver(sample.mailbox, mail(4, sender="ops@example.org",
                                                 subject="[ticket] Pump 4"))  # fmt: skip
    imp = maildir_importer(emulator, sample, tmp_path,
                           senders=("*@plant.example.org", "ops@*"),
                           subjects=("ticket *", "[[]TICKET]*"))  # fmt: skip
    await imp.start()
    try:
        assert (await imp.poll()).counts == counts(imported=2, filtered=2)
        assert (await imp.poll()).counts == counts()  # unchanged messages are not listed again
    finally:
        await imp.stop()
    assert imported_ids(tmp_path) == ["<ticket-1@app.example.org>", "<ticket-4@app.example.org>"]
    unread = [message_id(m.mime) for m in emulator.graph.messages(sample.mailbox)
              if not m.is_read]  # fmt: skip
    assert unread == ["<ticket-2@app.example.org>", "<ticket-3@app.example.org>"]


# -- folders and links -----------------------------------------------------------------------------


async def test_a_folder_by_display_name(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    store = emulator.graph.store(sample.mailbox)
    support = store.create_folder(store.folder("inbox").id, "Support")
    emulator.graph.deliver(sample.mailbox, mail(1), folder=support.id)
    emulator.graph.deliver(sample.mailbox, mail(2))  # in the inbox: not this import's
    imp = maildir_importer(emulator, sample, tmp_path, folder="Inbox/Support")
    assert (await one_round(imp)).counts == counts(imported=1)
    assert imported_ids(tmp_path) == ["<ticket-1@app.example.org>"]


async def test_a_missing_folder_ends_each_round(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    imp = maildir_importer(emulator, sample, tmp_path, folder="Support")
    report = await one_round(imp)
    assert report.error == "451 4.3.0 no folder 'Support' in relay@contoso.com"


async def test_a_link_to_another_host_is_not_followed(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """A delta link is followed verbatim, but only to Graph: it would carry the token."""
    imp = maildir_importer(emulator, sample, tmp_path)
    state = await state_of(imp)
    await state.set_delta_link("https://graph.example.net/v1.0/users/x/messages/delta?t=1")
    await state.aclose()
    report = await one_round(imp)
    assert report.error == "451 4.3.0 Graph gave a link to another host: graph.example.net"
    assert emulator.graph.requests == []


async def test_a_page_that_is_not_a_delta_page_ends_the_round(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.fail_next(200, "Odd", "not a page", path="*/messages/delta")
    imp = maildir_importer(emulator, sample, tmp_path)
    report = await one_round(imp)
    assert report.error == "451 4.3.0 Graph's delta page has no value"
