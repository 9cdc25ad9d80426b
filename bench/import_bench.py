"""Inbound import throughput: messages per second from the emulated Graph (which, like Exchange
Online, allows 4 concurrent requests per mailbox) into a sink, on this machine.

The emulator runs in its own process with the sample tenant and a mailbox seeded with N
messages of about 3 KB; this process runs one importer (the real MSAL token provider, HTTPS
with the emulator's CA) and times one full round: listing the folder by delta pages, fetching
each message's MIME, delivering it (fsync'ed), recording it, and the `after:` action.

    python bench/import_bench.py [--messages 2000] [--rounds 3]

Prints a table (median of the rounds) per sink and `after:` action.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from relay.config import (
    AccountConfig,
    AfterImport,
    Cloud,
    Credential,
    CredentialKind,
    Endpoints,
    InboundConfig,
    Secret,
)
from relay.identity import MsalTokenProvider
from relay.inbound import Importer

EMULATOR = textwrap.dedent(
    """
    import asyncio, json, sys
    from email.message import EmailMessage
    from pathlib import Path
    from relay.testing.emulator import Emulator, sample_tenant

    def message(n):
        m = EmailMessage()
        m["From"] = "Plant 4 <plc@plant.example.org>"
        m["To"] = "relay@contoso.com"
        m["Subject"] = f"Alarm {n}: pressure low on pump {n % 17}"
        m["Message-ID"] = f"<alarm-{n}@plant.example.org>"
        m.set_content(("Pressure below threshold. " * 100 + "\\n") * 1)
        return m.as_bytes()

    async def main(state, count):
        sample = sample_tenant()
        async with Emulator(sample.directory, state_dir=Path(state)) as emulator:
            for n in range(count):
                emulator.graph.deliver(sample.mailbox, message(n))
            print(json.dumps({
                "authority": emulator.authority, "graph": emulator.graph_url,
                "ca_file": str(emulator.ca_file), "tenant_id": sample.tenant_id,
                "client_id": sample.client_id, "secret": sample.client_secret,
                "mailbox": sample.mailbox,
            }), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            throttled = sum(r.status == 429 for r in emulator.graph.requests)
            print(json.dumps({"requests": len(emulator.graph.requests),
                              "throttled": throttled}), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def one_round(
    sink: str, after: AfterImport, count: int, tmp: Path
) -> tuple[float, dict[str, int]]:
    emulator = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EMULATOR, str(tmp / "emulator"), str(count),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert emulator.stdout is not None and emulator.stdin is not None
    settings = json.loads(await emulator.stdout.readline())
    account = AccountConfig(
        name="contoso",
        cloud=Cloud.GLOBAL,
        tenant_id=settings["tenant_id"],
        client_id=settings["client_id"],
        credential=Credential(kind=CredentialKind.SECRET, secret=Secret(settings["secret"])),
        endpoints=Endpoints(
            authority=settings["authority"],
            smtp_host="127.0.0.1",
            smtp_port=587,
            graph=settings["graph"],
        ),
        ca_file=Path(settings["ca_file"]),
    )
    config = InboundConfig(
        name="bench",
        account="contoso",
        mailbox=settings["mailbox"],
        poll_interval=3600,
        deliver={sink: tmp / "out"},
        after=after,
        move_to="Imported" if after is AfterImport.MOVE_TO else None,
    )
    tokens = MsalTokenProvider(account)
    await tokens.token("https://graph.microsoft.com/.default")  # not part of the import
    importer = Importer(
        config, account=account, tokens=tokens, state_path=tmp / "spool" / "bench.sqlite3"
    )
    started = time.perf_counter()
    await importer.start()
    report = await importer.poll()
    elapsed = time.perf_counter() - started
    await importer.stop()
    emulator.stdin.close()
    stats = json.loads(await emulator.stdout.readline())
    await emulator.wait()
    assert report.error is None and sum(report.counts.values()) == count, report
    return count / elapsed, stats


async def main(count: int, rounds: int) -> None:
    cells = [
        ("maildir", AfterImport.MARK_READ),
        ("maildir", AfterImport.MOVE_TO),
        ("directory", AfterImport.DELETE),
    ]
    print(f"{count} messages per round, {rounds} rounds, median messages/s")
    print(f"{'sink':10} {'after':10} {'msg/s':>8}  {'min':>8} {'max':>8}  requests  429s")
    for sink, after in cells:
        rates = []
        stats: dict[str, int] = {}
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                rate, stats = await one_round(sink, after, count, Path(tmp))
            rates.append(rate)
        print(
            f"{sink:10} {after.value:10} {statistics.median(rates):8.0f}  {min(rates):8.0f}"
            f" {max(rates):8.0f}  {stats['requests']:8}  {stats['throttled']:4}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.rounds))
