"""`relay serve` as a process: SIGKILL mid-burst, SIGTERM with deliveries in flight, SIGHUP.

Crash safety: SIGKILL `relay serve` in the middle of a burst, restart it, and account for
every message.

The promise: a message that got `250` reaches Exchange; a message whose data the client had
not finished sending is never delivered. A message whose final dot was sent but whose reply was
lost in the crash may be delivered (its client saw a dropped connection, as with any MTA). A
duplicate is possible only for a delivery in flight at the kill (its upstream 250 was lost).

CI runs one round of a 600-message burst; RELAY_CHAOS_SCALE=N runs N rounds (marked slow).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from relaykit import wait_until

from relay.spool import QueueAdmin
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.smtp import Phase, delayed

CLIENTS = 8
BURST = 600
SCALE = int(os.environ.get("RELAY_CHAOS_SCALE", "1"))


@dataclass
class Ledger:
    dot_sent: set[str] = field(default_factory=set)  # the whole message was written
    acked: set[str] = field(default_factory=set)  # and the relay answered 250


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    emulator: Emulator,
    sample: SampleTenant,
    tmp: Path,
    port: int,
    connections: int = 3,
    mailbox: str | None = None,
    log_level: str = "WARNING",
) -> Path:
    config = {
        "listen": [{"address": f"127.0.0.1:{port}"}],
        "spool": {"path": str(tmp / "spool"), "retry": ["1s", "2s"]},
        "accounts": {
            "contoso": {
                "tenant_id": sample.tenant_id,
                "client_id": sample.client_id,
                "client_secret": sample.client_secret,
                "endpoints": emulator.endpoints,
                "ca_file": str(emulator.ca_file),
            }
        },
        "routes": [
            {
                "name": "default",
                "account": "contoso",
                "mailbox": mailbox or sample.mailbox,
                "sender": "rewrite",
                "rate": "10000/min",
                "connections": connections,
            }
        ],
        "log": {"level": log_level},
    }
    path = tmp / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_relay(config: Path, port: int, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relay", "serve", "-c", str(config)),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    async def listening() -> bool:
        assert proc.returncode is None, "relay exited; see relay.log"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    await wait_until(listening, limit=20)
    return proc


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def client(port: int, ids: list[str], ledger: Ledger) -> None:
    """Send `ids` one connection each, until the relay dies."""
    for mid in ids:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            assert await reply(reader) == 220
            for command, code in (
                (b"EHLO app.example", 250),
                (b"MAIL FROM:<relay@contoso.com>", 250),
                (b"RCPT TO:<someone@example.org>", 250),
                (b"DATA", 354),
            ):
                writer.write(command + b"\r\n")
                assert await reply(reader) == code
            body = f"Message-ID: <{mid}>\r\nSubject: crash\r\n\r\n".encode() + b"x" * 2000
            writer.write(body + b"\r\n.\r\n")
            await writer.drain()
            ledger.dot_sent.add(mid)
            if await reply(reader) == 250:
                ledger.acked.add(mid)
            writer.write(b"QUIT\r\n")
        except (ConnectionError, AssertionError, OSError):
            return
        finally:
            writer.close()


def message_ids(emulator: Emulator) -> Counter[str]:
    found: Counter[str] = Counter()
    for m in emulator.smtp.messages:
        head = m.data.split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                found[line.split(b"<", 1)[1].split(b">", 1)[0].decode()] += 1
    return found


async def one_round(emulator: Emulator, sample: SampleTenant, tmp: Path, seed: int) -> None:
    rng = random.Random(seed)
    port = free_port()
    config = write_config(emulator, sample, tmp, port)
    log = tmp / "relay.log"
    proc = await start_relay(config, port, log)
    ledger = Ledger()
    ids = [f"r{seed}-m{n}@crash.test" for n in range(BURST)]
    tasks = [asyncio.create_task(client(port, ids[c::CLIENTS], ledger)) for c in range(CLIENTS)]
    kill_after = rng.randint(BURST // 4, BURST * 3 // 4)
    await wait_until(
        lambda: len(ledger.acked) >= kill_after or all(t.done() for t in tasks), limit=60
    )
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await asyncio.gather(*tasks)
    assert len(ledger.acked) >= kill_after, log.read_text()

    proc = await start_relay(config, port, log)
    try:
        await wait_until(lambda: ledger.acked <= set(message_ids(emulator)), limit=60)

        async def drained() -> bool:
            return not await QueueAdmin(tmp / "spool").entries()

        await wait_until(drained, limit=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0, log.read_text()
    delivered = message_ids(emulator)
    ours = Counter({m: n for m, n in delivered.items() if m.startswith(f"r{seed}-")})
    assert ledger.acked <= set(ours), "a message that got 250 was lost"
    assert set(ours) <= ledger.dot_sent, "a message never fully sent was delivered"
    duplicates = sum(n - 1 for n in ours.values())
    print(f"round {seed}: {len(ledger.acked)} acked, {len(ours)} delivered, {duplicates} dup")
    assert duplicates <= 3, f"{duplicates} duplicates: more than the deliveries in flight"
    assert not (tmp / "spool" / "corrupt").exists() or not any(
        (tmp / "spool" / "corrupt").iterdir()
    )


async def test_sigkill_during_a_burst_loses_nothing_that_got_250(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    await one_round(emulator, sample, tmp_path, seed=1)


@pytest.mark.slow
@pytest.mark.skipif(SCALE < 2, reason="set RELAY_CHAOS_SCALE>=2 for repeated kill rounds")
async def test_repeated_sigkill_rounds(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    for seed in range(2, 2 + SCALE):
        (tmp_path / f"round{seed}").mkdir()
        await one_round(emulator, sample, tmp_path / f"round{seed}", seed=seed)


async def smtp_send(port: int, subject: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await reply(reader) == 220
        for command in (
            b"EHLO app.example",
            b"MAIL FROM:<relay@contoso.com>",
            b"RCPT TO:<someone@example.org>",
            b"DATA",
        ):
            writer.write(command + b"\r\n")
            await reply(reader)
        writer.write(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
        return await reply(reader)
    finally:
        writer.close()


async def test_sigterm_finishes_deliveries_in_flight_and_keeps_the_rest(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """SIGTERM while one delivery is in flight and one message waits: newcomers hear 421, the
    delivery in flight completes, the waiting message stays queued and goes after a restart."""
    emulator.smtp.inject(delayed(Phase.DATA, 1.5), headers={"Subject": "slow"})
    port = free_port()
    config = write_config(emulator, sample, tmp_path, port, connections=1)
    log = tmp_path / "relay.log"
    proc = await start_relay(config, port, log)
    assert await smtp_send(port, "slow") == 250
    await wait_until(lambda: not emulator.smtp.pending_faults)  # the upstream is sitting on it
    assert await smtp_send(port, "waiting") == 250
    proc.send_signal(signal.SIGTERM)
    greetings: list[bytes] = []

    async def refused_politely() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greetings.append(await reader.readline())
        writer.close()
        return greetings[-1].startswith(b"421")

    await wait_until(refused_politely)  # the first tries may still be greeted 220
    assert greetings[-1].startswith(b"421 4.3.2 "), greetings
    assert await proc.wait() == 0
    assert [m.data.count(b"Subject: slow") for m in emulator.smtp.messages] == [1]
    (left,) = await QueueAdmin(tmp_path / "spool").entries()
    assert left.envelope.rcpt_tos == ("someone@example.org",)

    proc = await start_relay(config, port, log)
    try:
        await emulator.smtp.wait_for_messages(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    assert b"Subject: waiting" in emulator.smtp.messages[1].data


async def test_sighup_applies_a_good_config_and_keeps_the_running_one_on_a_bad_one(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Reload with the route moved to the shared mailbox: new mail goes out as it. Then a
    broken file: the error is logged with its place, and the relay goes on as it was."""
    port = free_port()
    config = write_config(emulator, sample, tmp_path, port, log_level="INFO")
    log = tmp_path / "relay.log"
    proc = await start_relay(config, port, log)
    try:
        assert await smtp_send(port, "before") == 250
        await emulator.smtp.wait_for_messages(1)
        write_config(
            emulator, sample, tmp_path, port, mailbox=sample.shared_mailbox, log_level="INFO"
        )
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: b"configuration reloaded" in log.read_bytes())
        assert await smtp_send(port, "after") == 250
        await emulator.smtp.wait_for_messages(2)
        config.write_text(config.read_text().replace("routes:", "routez:"))
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: b"reload refused" in log.read_bytes())
        assert await smtp_send(port, "still") == 250
        await emulator.smtp.wait_for_messages(3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    mailboxes = [m.mailbox for m in emulator.smtp.messages]
    assert mailboxes == [sample.mailbox, sample.shared_mailbox, sample.shared_mailbox]
    refused = next(line for line in log.read_text().splitlines() if "reload refused" in line)
    assert "relay.yaml:" in refused and "routez" in refused
