"""Crash safety of the inbound import: SIGKILL the importer (a child process) at random moments
while it imports, restart it, and check that every message is in the maildir exactly once.

The emulator runs in this process; the child reaches it over HTTPS with the real token provider.
Each round kills the child once it has imported a random number of new messages, plus a random
fraction of a millisecond-scale delay, so kills land in every step: fetching, writing the
temporary file, recording, renaming, moving the message in the mailbox. New mail arrives between
rounds. The last child runs until the folder is empty.

CI runs a few kills; RELAY_CHAOS_SCALE=N runs 20*N (marked slow).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
from inboundkit import mail, maildir_files, message_id
from relaykit import wait_until

from relay.testing.emulator import Emulator, SampleTenant

SCALE = int(os.environ.get("RELAY_CHAOS_SCALE", "1"))
CHILD = Path(__file__).with_name("inbound_crash_child.py")
FIRST = 300  # messages in the mailbox at the start
PER_ROUND = 40  # arriving between kills


def write_settings(
    emulator: Emulator, sample: SampleTenant, tmp: Path, after: str
) -> tuple[Path, Path]:
    maildir = tmp / "Maildir"
    settings = {
        "tenant_id": sample.tenant_id,
        "client_id": sample.client_id,
        "secret": sample.client_secret,
        "authority": emulator.authority,
        "graph": emulator.graph_url,
        "ca_file": str(emulator.ca_file),
        "mailbox": sample.mailbox,
        "maildir": str(maildir),
        "state": str(tmp / "spool" / "inbound" / "crash.sqlite3"),
        "after": after,
    }
    path = tmp / "child.json"
    path.write_text(json.dumps(settings))
    return path, maildir


async def spawn(settings: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), str(settings), stdout=stderr, stderr=stderr
        )


def imported(maildir: Path) -> int:
    new = maildir / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def busy_until(child: asyncio.subprocess.Process, maildir: Path, target: int) -> bool:
    """The child has imported `target` messages in all, or has died."""
    return imported(maildir) >= target or child.returncode is not None


def settled(emulator: Emulator, mailbox: str, after: str) -> bool:
    """Every message's `after:` action is done (so it was delivered first)."""
    if after == "move_to":
        return emulator.graph.messages(mailbox, "inbox") == []
    if after == "delete":
        return emulator.graph.messages(mailbox) == []
    return all(m.is_read for m in emulator.graph.messages(mailbox))


async def kill_and_restart(
    emulator: Emulator, sample: SampleTenant, tmp: Path, *, after: str, kills: int, seed: int
) -> None:
    rng = random.Random(seed)
    settings, maildir = write_settings(emulator, sample, tmp, after)
    log = tmp / "child.log"
    total = 0
    for _ in range(FIRST):
        emulator.graph.deliver(sample.mailbox, mail(total))
        total += 1
    for _ in range(kills):
        child = await spawn(settings, log)
        target = min(total, imported(maildir) + rng.randint(1, PER_ROUND))
        try:
            await wait_until(functools.partial(busy_until, child, maildir, target), limit=60)
            assert child.returncode is None, log.read_text()
            await asyncio.sleep(rng.random() * 0.01)  # a random moment in what comes next
        finally:
            if child.returncode is None:
                child.send_signal(signal.SIGKILL)
            await child.wait()
        for _ in range(rng.randint(0, PER_ROUND)):
            emulator.graph.deliver(sample.mailbox, mail(total))
            total += 1
    child = await spawn(settings, log)
    try:
        await wait_until(lambda: settled(emulator, sample.mailbox, after), limit=120)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    ids = Counter(message_id(p.read_bytes()) for p in maildir_files(maildir))
    expected = Counter(f"<ticket-{n}@app.example.org>" for n in range(total))
    assert ids - expected == Counter(), f"duplicates (seed {seed}): {ids - expected}"
    assert expected - ids == Counter(), f"lost (seed {seed}): {expected - ids}"
    assert list((maildir / "tmp").iterdir()) == [], f"a temporary file left (seed {seed})"
    if after == "move_to":
        folders = emulator.graph.folders(sample.mailbox)
        [folder] = [f for f in folders if f.display_name == "Imported"]
        assert len(emulator.graph.messages(sample.mailbox, folder.id)) == total


async def test_sigkill_and_restart_loses_nothing_and_duplicates_nothing(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Four kills while 300+ messages are imported and moved to Imported: in the end every
    message is in the maildir exactly once and in Imported, and no temporary file is left."""
    seed = random.randrange(2**32)
    await kill_and_restart(emulator, sample, tmp_path, after="move_to", kills=4, seed=seed)


@pytest.mark.slow
@pytest.mark.skipif(SCALE < 2, reason="set RELAY_CHAOS_SCALE>=2 for repeated kill rounds")
@pytest.mark.parametrize("after", ["move_to", "mark_read", "delete"])
async def test_sigkill_many_times(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, after: str
) -> None:
    seed = random.randrange(2**32)
    await kill_and_restart(emulator, sample, tmp_path, after=after, kills=20 * SCALE, seed=seed)
