"""The inbound importer against the emulated Graph over HTTPS: paging, rounds, each `after:`
action, filters, and the lifecycle."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from inboundkit import importer, inbound, mail, maildir_files, message_id, one_round
from relaykit import secret_account, wait_until

from relay.config import (
    CLOUD_ENDPOINTS,
    AccountConfig,
    AfterImport,
    Cloud,
    Config,
    Credential,
    CredentialKind,
    InboundConfig,
    Secret,
    SpoolConfig,
)
from relay.identity import MsalTokenProvider
from relay.inbound import build_importers
from relay.inbound.importer import Outcome
from relay.metrics import Metrics
from relay.testing.emulator import Emulator, SampleTenant


def counts(**outcomes: int) -> Counter[Outcome]:
    return Counter({Outcome(name): n for name, n in outcomes.items()})


async def test_a_thousand_messages_across_pages_are_imported_once(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """1,000 messages in the inbox, 100 to a delta page: one round imports every one into the
    maildir and marks it read, never more than 4 requests at Graph (no 429). The next round sees
    them all again (marking read changed them) and imports nothing."""
    for n in range(1000):
        emulator.graph.deliver(sample.mailbox, mail(n))
    box = tmp_path / "Maildir"
    imp = importer(emulator, sample, inbound(sample, {"maildir": box}), tmp_path / "state.db")
    await imp.start()
    try:
        first = await imp.poll()
        second = await imp.poll()
    finally:
        await imp.stop()
    assert (first.counts, first.full, first.error) == (counts(imported=1000), True, None)
    assert (second.counts, second.full, second.error) == (counts(), False, None)
    ids = Counter(message_id(p.read_bytes()) for p in maildir_files(box))
    assert ids == Counter(f"<ticket-{n}@app.example.org>" for n in range(1000))
    assert all(m.is_read for m in emulator.graph.messages(sample.mailbox, "inbox"))
    statuses = Counter(r.status for r in emulator.graph.requests)
    assert 429 not in statuses
    deltas = [r for r in emulator.graph.requests if r.path.endswith("/messages/delta")]
    assert len(deltas) == 10 + 10  # ten pages a round: all new, then all changed


async def test_new_mail_between_polls(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Mail that arrives after a round is imported by the next, on the timer, and only it."""
    emulator.graph.deliver(sample.mailbox, mail(1))
    box = tmp_path / "Maildir"
    config = inbound(sample, {"maildir": box}, poll_interval=0.05)
    imp = importer(emulator, sample, config, tmp_path / "state.db")
    await imp.start()
    try:
        await wait_until(lambda: len(maildir_files(box)) == 1)
        emulator.graph.deliver(sample.mailbox, mail(2))
        emulator.graph.deliver(sample.mailbox, mail(3))
        await wait_until(lambda: len(maildir_files(box)) == 3)
        rounds = imp.rounds
        await wait_until(lambda: imp.rounds > rounds + 1)
    finally:
        await imp.stop()
    ids = sorted(message_id(p.read_bytes()) for p in maildir_files(box))
    assert ids == [f"<ticket-{n}@app.example.org>" for n in (1, 2, 3)]


@pytest.mark.parametrize("move_to", ["Imported", "Processed/2026"])
async def test_after_move_to_makes_the_folder_once(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, move_to: str
) -> None:
    """`after: {move_to: ...}`: the folder (a path of display names from the top) is made when
    missing, once, and every imported message is moved there (under a new id)."""
    for n in range(12):
        emulator.graph.deliver(sample.mailbox, mail(n))
    config = inbound(sample, {"maildir": tmp_path / "box"}, after=AfterImport.MOVE_TO,
                     move_to=move_to)  # fmt: skip
    imp = importer(emulator, sample, config, tmp_path / "state.db")
    await imp.start()
    try:
        report = await imp.poll()
        emulator.graph.deliver(sample.mailbox, mail(12))
        again = await imp.poll()
    finally:
        await imp.stop()
    assert (report.counts, again.counts) == (counts(imported=12), counts(imported=1))
    folders = {f.id: f for f in emulator.graph.folders(sample.mailbox)}
    *parents, leaf = move_to.split("/")
    [target] = [f for f in folders.values() if f.display_name == leaf]
    if parents:
        assert folders[target.parent_id].display_name == parents[0]
    assert emulator.graph.messages(sample.mailbox, "inbox") == []
    moved = emulator.graph.messages(sample.mailbox, target.id)
    assert sorted(message_id(m.mime) for m in moved) == sorted(
        f"<ticket-{n}@app.example.org>" for n in range(13)
    )
    made = [r for r in emulator.graph.requests if r.method == "POST" and "Folders" in r.path]
    assert len(made) == len(move_to.split("/"))


async def test_after_move_to_a_well_known_folder(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    config = inbound(sample, {"maildir": tmp_path / "box"}, after=AfterImport.MOVE_TO,
                     move_to="Archive")  # fmt: skip
    imp = importer(emulator, sample, config, tmp_path / "state.db")
    assert (await one_round(imp)).counts == counts(imported=1)
    [archived] = emulator.graph.messages(sample.mailbox, "archive")
    assert message_id(archived.mime) == "<ticket-1@app.example.org>"


async def test_after_delete(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> None:
    for n in range(3):
        emulator.graph.deliver(sample.mailbox, mail(n))
    config = inbound(sample, {"maildir": tmp_path / "box"}, after=AfterImport.DELETE)
    imp = importer(emulator, sample, config, tmp_path / "state.db")
    await imp.start()
    try:
        assert (await imp.poll()).counts == counts(imported=3)
        assert (await imp.poll()).counts == counts()
    finally:
        await imp.stop()
    assert emulator.graph.messages(sample.mailbox) == []
    assert len(maildir_files(tmp_path / "box")) == 3


async def test_after_mark_read_with_the_real_token_provider(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """MSAL against the emulated identity platform: one token for the whole import."""
    for n in range(5):
        emulator.graph.deliver(sample.mailbox, mail(n))
    tokens = MsalTokenProvider(secret_account(emulator, sample))
    config = inbound(sample, {"maildir": tmp_path / "box"})
    imp = importer(emulator, sample, config, tmp_path / "state.db", tokens=tokens)
    assert (await one_round(imp)).counts == counts(imported=5)
    assert [m.is_read for m in emulator.graph.messages(sample.mailbox, "inbox")] == [True] * 5
    assert tokens.requests == 1


async def test_imports_are_counted(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    for n in range(3):
        emulator.graph.deliver(sample.mailbox, mail(n))
    emulator.graph.deliver(sample.mailbox, b"not a message")
    metrics = Metrics()
    config = inbound(sample, {"maildir": tmp_path / "box"})
    imp = importer(emulator, sample, config, tmp_path / "state.db", metrics=metrics)
    await one_round(imp)
    assert b'relay_inbound_imported_total{mailbox="relay@contoso.com"} 3.0' in (
        metrics.exposition()
    )


# -- lifecycle -------------------------------------------------------------------------------------


async def test_lifecycle_is_guarded_and_printed(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.deliver(sample.mailbox, mail(1))
    imp = importer(emulator, sample, inbound(sample, {"maildir": tmp_path / "box"}),
                   tmp_path / "state.db")  # fmt: skip
    assert repr(imp) == "<Importer helpdesk relay@contoso.com/inbox -> maildir new rounds=0>"
    with pytest.raises(RuntimeError, match="importer helpdesk is new"):
        imp.poll()
    await imp.start()
    with pytest.raises(RuntimeError, match="importer helpdesk is running; it starts only once"):
        await imp.start()
    await imp.poll()
    assert repr(imp) == (
        "<Importer helpdesk relay@contoso.com/inbox -> maildir running rounds=1 last: imported=1"
        " deferred=0 quarantined=0 gone=0 filtered=0 full>"
    )
    await imp.stop()
    await imp.stop()
    assert repr(imp).startswith("<Importer helpdesk relay@contoso.com/inbox -> maildir stopped")
    with pytest.raises(RuntimeError, match="importer helpdesk is stopped; it starts only once"):
        await imp.start()
    with pytest.raises(RuntimeError, match="importer helpdesk is stopped"):
        imp.poll()


async def test_stop_before_start(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> None:
    imp = importer(emulator, sample, inbound(sample, {"maildir": tmp_path / "box"}),
                   tmp_path / "state.db")  # fmt: skip
    await imp.stop()
    assert imp.state.value == "stopped" and not (tmp_path / "state.db").exists()


async def test_stop_cancels_what_is_in_flight_after_grace_and_a_restart_finishes(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Graph holds every request: stop(grace=0) cancels the round (polls waiting for it and
    for the next get an error), and a new importer on the same state imports each message
    once."""
    for n in range(10):
        emulator.graph.deliver(sample.mailbox, mail(n))
    config = inbound(sample, {"maildir": tmp_path / "box"})
    hold = emulator.graph.hold(sample.mailbox)
    imp = importer(emulator, sample, config, tmp_path / "state.db", page_size=4)
    await imp.start()
    waiting = imp.poll()
    await hold.arrived(1)
    later = imp.poll()
    await imp.stop(grace=0)
    for poll in (waiting, later):
        with pytest.raises(RuntimeError, match="importer helpdesk stopped"):
            await poll
    hold.release()
    again = importer(emulator, sample, config, tmp_path / "state.db", page_size=4)
    report = await one_round(again)
    assert report.counts == counts(imported=10)
    ids = Counter(message_id(p.read_bytes()) for p in maildir_files(tmp_path / "box"))
    assert ids == Counter(f"<ticket-{n}@app.example.org>" for n in range(10))


async def test_stop_lets_messages_in_flight_finish_and_starts_no_others(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Two workers, twenty messages: stop while two fetches are held at Graph. Those two are
    delivered and marked read; no other starts and no delta link is saved; the next start
    imports the other eighteen, and nothing twice."""
    for n in range(20):
        emulator.graph.deliver(sample.mailbox, mail(n))
    config = inbound(sample, {"maildir": tmp_path / "box"})
    listing = emulator.graph.hold(sample.mailbox)
    imp = importer(emulator, sample, config, tmp_path / "state.db", workers=2)
    await imp.start()
    polling = imp.poll()
    await listing.arrived(1)
    fetches = emulator.graph.hold(sample.mailbox)  # for the requests after the listing
    listing.release()
    await fetches.arrived(2)
    stopping = asyncio.create_task(imp.stop(grace=30))
    await wait_until(lambda: imp.state.value == "stopped")
    fetches.release()
    await stopping
    report = await polling
    assert (report.counts, report.error) == (counts(imported=2), None)
    assert sum(m.is_read for m in emulator.graph.messages(sample.mailbox)) == 2
    again = importer(emulator, sample, config, tmp_path / "state.db")
    assert (await one_round(again)).counts == counts(imported=18)
    ids = Counter(message_id(p.read_bytes()) for p in maildir_files(tmp_path / "box"))
    assert ids == Counter(f"<ticket-{n}@app.example.org>" for n in range(20))


async def test_a_second_stop_finishes_what_a_cancelled_first_left(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """relay's forced stop: the first stop (waiting for a held request) is cancelled, and a
    second stop with no grace cancels the round and closes."""
    emulator.graph.deliver(sample.mailbox, mail(1))
    hold = emulator.graph.hold(sample.mailbox)
    imp = importer(emulator, sample, inbound(sample, {"maildir": tmp_path / "box"}),
                   tmp_path / "state.db")  # fmt: skip
    await imp.start()
    await hold.arrived(1)
    first = asyncio.create_task(imp.stop(grace=30))
    await wait_until(lambda: imp.state.value == "stopped")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await imp.stop(grace=0)
    hold.release()
    assert imp.rounds == 0 and maildir_files(tmp_path / "box") == []


def test_build_importers_one_per_entry_sharing_each_mailbox(tmp_path: Path) -> None:
    """Two imports of one mailbox share Graph's 4 requests; state files go under the spool."""
    account = AccountConfig(
        name="contoso",
        cloud=Cloud.GLOBAL,
        tenant_id="6f3b9c2e-41d7-4a58-9c0e-2d7f5b1a8e34",
        client_id="0e8f4a6d-93b2-4c71-a5d8-7b1e2f9c3a60",
        credential=Credential(kind=CredentialKind.SECRET, secret=Secret("s")),
        endpoints=CLOUD_ENDPOINTS[Cloud.GLOBAL],
    )
    entries = tuple(
        InboundConfig(
            name=name,
            account="contoso",
            mailbox=mailbox,
            folder=folder,
            deliver={"maildir": tmp_path / name},
        )
        for name, mailbox, folder in [
            ("helpdesk", "help@contoso.com", "inbox"),
            ("invoices", "Help@contoso.com", "Invoices"),
            ("alerts", "alerts@contoso.com", "inbox"),
        ]
    )
    config = Config(listeners=(), accounts={"contoso": account}, routes=(), inbound=entries,
                    spool=SpoolConfig(path=tmp_path / "spool"))  # fmt: skip
    importers = build_importers(config, {"contoso": IssuerTokensStub()})
    assert [repr(i) for i in importers] == [
        "<Importer helpdesk help@contoso.com/inbox -> maildir new rounds=0>",
        "<Importer invoices Help@contoso.com/Invoices -> maildir new rounds=0>",
        "<Importer alerts alerts@contoso.com/inbox -> maildir new rounds=0>",
    ]
    assert [(i.max_concurrency, i.state_path) for i in importers] == [
        (2, tmp_path / "spool" / "inbound" / "helpdesk.sqlite3"),
        (2, tmp_path / "spool" / "inbound" / "invoices.sqlite3"),
        (4, tmp_path / "spool" / "inbound" / "alerts.sqlite3"),
    ]


class IssuerTokensStub:
    async def token(self, scope: str) -> str:
        raise AssertionError("no request is made")

    def invalidate(self, scope: str) -> None:
        raise AssertionError("no request is made")
