"""`relay queue ...` against a running relay: what an operator sees and what each action does.

The relay serves a relay.yaml pointing at the emulator; the commands run in this process (or as a
separate `python -m relay` process) on the same spool, and the relay's rescan (called directly
here instead of waiting `RESCAN_INTERVAL`) picks up what they changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import sys
from collections.abc import AsyncIterator
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from opskit import run, write_config
from relaykit import wait_until

from relay.app import Relay
from relay.config import load
from relay.spool import Envelope, QueueAdmin, Spool, State
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.smtp import Phase, server_busy


def send(port: int, n: int, *, sender: str = "alerts@contoso.com") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.example")
        client.mail(sender)
        client.rcpt("someone@example.org")
        code, text = client.data(
            f"From: relay@contoso.com\r\nTo: someone@example.org\r\nSubject: queue {n}\r\n"
            f"Message-ID: <q{n}@app.example>\r\n\r\nbody {n}\r\n".encode()
        )
        assert code == 250
        return text.decode().rsplit(" ", 1)[1]


@pytest.fixture
async def relay(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> AsyncIterator[Relay]:
    """A relay whose upstream answers `451 4.7.500 Server busy` once per message sent in a test
    (so each waits in deferred/ for a minute), with the CLI's relay.yaml beside it."""
    relay = Relay(load(write_config(emulator, sample, tmp_path)))
    await relay.start()
    yield relay
    await relay.stop(grace=2)


@pytest.fixture
def config(tmp_path: Path) -> str:
    return str(tmp_path / "relay.yaml")


async def deferred_message(relay: Relay, emulator: Emulator, n: int, **kw: str) -> str:
    emulator.smtp.inject(server_busy(Phase.DATA))
    qid = await asyncio.to_thread(send, relay.listeners[0].port, n, **kw)
    await wait_until(lambda: any(e.qid == qid and e.attempts for e in relay.spool.ready()))  # type: ignore[union-attr]
    return qid


async def test_list_shows_each_waiting_message_and_why(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1)
    status, out, err = await run("queue", "list", "-c", config)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"{qid}  deferred ")
    assert lines[0].endswith("route=default  attempts=1")
    assert lines[1] == "  from <alerts@contoso.com> to someone@example.org"
    assert lines[2].startswith("  last reply: 451 4.7.500 Server busy. Please try again later")
    assert lines[3].startswith("  next attempt: ")
    assert lines[4].startswith("-- 1 message, ")


async def test_list_json_is_one_object_per_line(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    first = await deferred_message(relay, emulator, 1)
    second = await deferred_message(relay, emulator, 2)
    status, out, _ = await run("queue", "list", "-c", config, "--json")
    assert status == 0
    listed = [json.loads(line) for line in out.splitlines()]
    assert [e["qid"] for e in listed] == [first, second]
    assert listed[0]["state"] == "deferred" and listed[0]["attempts"] == 1
    assert listed[0]["mail_from"] == "alerts@contoso.com"
    assert listed[0]["rcpt_tos"] == ["someone@example.org"]
    assert listed[0]["last_reply"].startswith("451 4.7.500 Server busy.")


async def test_an_empty_queue_says_so(relay: Relay, config: str) -> None:
    assert await run("queue", "list", "-c", config) == (0, "queue is empty\n", "")
    assert await run("queue", "list", "-c", config, "--json") == (0, "", "")


async def test_show_gives_envelope_attempts_last_reply_and_next_attempt(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1)
    status, out, _ = await run("queue", "show", qid.lower(), "-c", config)
    assert status == 0
    fields = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    assert fields["queue id"].strip() == qid
    assert fields["state"].strip() == "deferred"
    assert fields["route"].strip() == "default"
    assert fields["sender"].strip() == "<alerts@contoso.com>"
    assert fields["attempts"].strip() == "1"
    assert fields["last reply"].strip().startswith("451 4.7.500 Server busy.")
    assert fields["next attempt"].strip().endswith("Z")
    assert "  someone@example.org  pending" in out.splitlines()
    status, out, _ = await run("queue", "show", qid, "-c", config, "--json")
    assert json.loads(out)["qid"] == qid


async def test_retry_delivers_a_deferred_message_now(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1)
    assert await run("queue", "retry", qid, "-c", config) == (
        0,
        f"{qid}: queued for delivery now\n",
        "",
    )
    await relay.spool.rescan()  # type: ignore[union-attr]
    (got,) = await emulator.smtp.wait_for_messages(1)
    assert b"Subject: queue 1" in got.data


async def test_retry_all_takes_every_deferred_message(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qids = [await deferred_message(relay, emulator, n) for n in range(3)]
    status, out, _ = await run("queue", "retry", "--all", "-c", config)
    assert status == 0
    assert out.splitlines() == [f"{q}: queued for delivery now" for q in qids]
    await relay.spool.rescan()  # type: ignore[union-attr]
    await emulator.smtp.wait_for_messages(3)


async def test_hold_parks_a_message_until_it_is_retried(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1)
    assert (await run("queue", "hold", qid, "-c", config))[:2] == (0, f"{qid}: held\n")
    await relay.spool.rescan()  # type: ignore[union-attr]
    status, out, _ = await run("queue", "retry", "--all", "-c", config)
    assert (status, out) == (0, "")  # --all is every deferred message, not held ones
    assert (await QueueAdmin(relay.config.spool.path).show(qid)).state is State.HOLD
    assert await run("queue", "retry", qid, "-c", config) == (
        0,
        f"{qid}: queued for delivery now\n",
        "",
    )
    await relay.spool.rescan()  # type: ignore[union-attr]
    await emulator.smtp.wait_for_messages(1)


async def test_delete_removes_a_message_for_good(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1)
    status, out, _ = await run("queue", "delete", qid, "-c", config, "--json")
    assert status == 0 and json.loads(out)["qid"] == qid
    await relay.spool.rescan()  # type: ignore[union-attr]
    assert relay.spool.ready() == []  # type: ignore[union-attr]
    status, out, err = await run("queue", "show", qid, "-c", config)
    assert (status, out) == (1, "")
    assert err == f"relay queue: no message {qid} in spool {relay.config.spool.path}\n"


async def test_bounce_sends_a_dsn_from_the_route_mailbox_and_dead_letters_the_message(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1)
    status, out, err = await run("queue", "bounce", qid, "-c", config)
    assert (status, err) == (0, "")
    dsn_qid = out.split("queued as ")[1].split()[0]
    assert out == (
        f"{qid}: moved to dead-letter; bounce to <alerts@contoso.com> queued as {dsn_qid} "
        "(sent within 5s by a running relay)\n"
    )
    await relay.spool.rescan()  # type: ignore[union-attr]
    (dsn,) = await emulator.smtp.wait_for_messages(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ("alerts@contoso.com",)
    report = message_from_bytes(dsn.data, policy=policy.default)
    assert report["From"] == "Mail Delivery System <relay@contoso.com>"
    text = report.as_string()
    assert "An operator of the relay stopped the delivery." in " ".join(text.split())
    assert "Diagnostic-Code: smtp; 550 5.0.0 delivery cancelled by the relay's operator" in text
    status, out, _ = await run("queue", "dead-letter", "list", "-c", config, "--json")
    (dead,) = [json.loads(line) for line in out.splitlines()]
    assert dead["qid"] == qid and dead["state"] == "dead"
    assert dead["reason"] == (
        "someone@example.org: 550 5.0.0 delivery cancelled by the relay's operator"
    )
    assert dead["recipients"][0]["outcome"] == "failed"


async def test_bouncing_a_bounce_makes_no_new_one(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1, sender="")
    status, out, _ = await run("queue", "bounce", qid, "-c", config)
    assert (status, out) == (0, f"{qid}: moved to dead-letter; no bounce (the sender is empty)\n")
    await relay.spool.rescan()  # type: ignore[union-attr]
    assert relay.spool.ready() == [] and not emulator.smtp.messages  # type: ignore[union-attr]


async def test_dead_letter_requeue_delivers_a_dead_message(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    qid = await deferred_message(relay, emulator, 1, sender="")
    await run("queue", "bounce", qid, "-c", config)
    status, out, _ = await run("queue", "dead-letter", "list", "-c", config)
    assert status == 0 and out.splitlines()[0].startswith(f"{qid}  dead ")
    assert "  reason: someone@example.org: 550 5.0.0 delivery cancelled" in out
    assert await run("queue", "dead-letter", "requeue", qid, "-c", config) == (
        0,
        f"{qid}: queued for delivery now\n",
        "",
    )
    await relay.spool.rescan()  # type: ignore[union-attr]
    (got,) = await emulator.smtp.wait_for_messages(1)
    assert b"Subject: queue 1" in got.data


async def test_refusals_exit_1_and_say_why(relay: Relay, emulator: Emulator, config: str) -> None:
    qid = await deferred_message(relay, emulator, 1)
    status, _, err = await run("queue", "dead-letter", "requeue", qid, "-c", config)
    assert (status, err) == (
        1,
        f"relay queue: message {qid} is not in dead-letter; use `relay queue retry`\n",
    )
    await run("queue", "bounce", qid, "-c", config)
    status, _, err = await run("queue", "bounce", qid, "-c", config)
    assert (status, err) == (1, f"relay queue: message {qid} is already in dead-letter\n")
    missing = "0" * 22
    status, _, err = await run("queue", "delete", missing, "-c", config)
    assert status == 1 and err.startswith(f"relay queue: no message {missing} in spool ")


async def test_usage_problems_exit_2(relay: Relay, tmp_path: Path, config: str) -> None:
    for bad in ("../../etc/passwd", "XYZ", "0" * 23):
        status, _, err = await run("queue", "show", bad, "-c", config)
        assert (status, err) == (
            2,
            f"relay queue: not a queue id: {bad!r} (22 hexadecimal digits)\n",
        )
    spool = str(relay.config.spool.path)
    status, _, err = await run("queue", "bounce", "0" * 22, "--spool", spool)
    assert (status, err) == (
        2,
        "relay queue: bounce needs -c relay.yaml: the bounce is sent from the route's mailbox\n",
    )
    status, _, err = await run("queue", "list", "-c", str(tmp_path / "missing.yaml"))
    assert status == 2 and err.startswith("relay queue: ")


async def test_a_message_being_delivered_is_left_alone(tmp_path: Path) -> None:
    """Claimed by the server (active/): delete and bounce refuse, the file stays."""
    async with await Spool.open(tmp_path / "spool", rescan_interval=None) as spool:
        qid = await spool.enqueue(
            Envelope(
                mail_from="a@contoso.com",
                rcpt_tos=("b@example.org",),
                route="default",
                client="127.0.0.1",
            ),
            b"Subject: x\r\n\r\nx\r\n",
        )
        await wait_until(lambda: bool(spool.ready()))
        await spool.claim(qid)
        status, _, err = await run("queue", "delete", qid, "--spool", str(tmp_path / "spool"))
        assert (status, err) == (
            1,
            f"relay queue: message {qid} is being delivered; try again when it is not\n",
        )
        assert (await QueueAdmin(tmp_path / "spool").show(qid)).state is State.ACTIVE


async def test_queue_commands_work_from_another_process(
    relay: Relay, emulator: Emulator, config: str
) -> None:
    """The real command line, as an operator types it next to `relay serve`."""
    qid = await deferred_message(relay, emulator, 1)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "relay", "queue", "list", "--json", "-c", config],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["qid"] == qid
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "relay", "queue", "show", "nope", "-c", config],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
