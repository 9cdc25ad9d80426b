"""The inbound importer against the emulated Graph over HTTPS: paging, rounds, each `after:`
action, filters, and the lifecycle."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from inboundkit import importer, inbound, mail, maildir_files, message_id
from relaykit import secret_account, wait_until

from relay.config import AfterImport
from relay.identity import MsalTokenProvider
from relay.inbound.importer import Outcome
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
    await imp.start()
    try:
        assert (await imp.poll()).counts == counts(imported=1)
    finally:
        await imp.stop()
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
    await imp.start()
    try:
        assert (await imp.poll()).counts == counts(imported=5)
    finally:
        await imp.stop()
    assert [m.is_read for m in emulator.graph.messages(sample.mailbox, "inbox")] == [True] * 5
    assert tokens.requests == 1
