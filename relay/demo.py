"""`relay demo`: the whole path on one machine, in a few seconds, with nothing to set up.

Starts the Exchange Online emulator (sample tenant contoso.com), writes a relay.yaml that points
an account at it, starts the relay from that file, sends a message into the relay with plain
SMTP as a legacy application would, and shows it arriving at "Exchange": queued on disk, then
submitted with STARTTLS + XOAUTH2 as relay@contoso.com. Everything it writes goes to
`--state-dir` (the spool, the emulator's CA, the relay.yaml it used).
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import yaml

from relay.app import Relay
from relay.config import LogConfig, load
from relay.logs import configure as configure_logging
from relay.testing.emulator import SAMPLE_MAILBOX, Emulator, sample_tenant

WAIT = 30.0  # seconds to wait for the message to reach the emulator


def demo_config(emulator: Emulator, state_dir: Path, client_id: str, secret: str) -> str:
    """The relay.yaml the demo runs with: one loopback listener, one account, one route."""
    config = {
        "listen": [{"address": "127.0.0.1:0", "networks": ["127.0.0.0/8", "::1/128"]}],
        "spool": {"path": str(state_dir / "spool"), "retry": ["2s", "10s", "1m"]},
        "accounts": {
            "contoso": {
                "tenant_id": emulator.directory.tenant("contoso.com").tenant_id,  # type: ignore[union-attr]
                "client_id": client_id,
                "client_secret": secret,
                "endpoints": emulator.endpoints,
                "ca_file": str(emulator.ca_file),
            }
        },
        "routes": [
            {
                "name": "default",
                "match": {"sender": "*@contoso.com"},
                "account": "contoso",
                "mailbox": SAMPLE_MAILBOX,
                "sender": "rewrite",
                "rate": "600/min",
            }
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def _send(port: int) -> str:
    msg = EmailMessage()
    msg["From"] = "Maintenance App <ultimo@contoso.com>"
    msg["To"] = "technician@example.org"
    msg["Subject"] = "Work order 4711 is due"
    msg.set_content("Pump P-12 needs its yearly inspection.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("legacy-app.local")
        client.send_message(msg)
        return client.noop()[1].decode()  # session still healthy after the 250


async def run_demo(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    configure_logging(LogConfig())  # the relay's own log lines show what happens, on stderr
    sample = sample_tenant()
    print("relay demo: emulator + relay + a legacy app, all on 127.0.0.1\n")
    async with Emulator(sample.directory, state_dir=state_dir / "emulator") as emulator:
        print(
            f"1. Exchange Online emulator up: SMTP {emulator.endpoints['smtp']}, "
            f"identity platform {emulator.authority}"
        )
        config_file = state_dir / "relay.yaml"
        await asyncio.to_thread(
            config_file.write_text,
            demo_config(emulator, state_dir, sample.client_id, sample.client_secret),
        )
        relay = Relay(load(config_file))
        await relay.start()
        try:
            port = relay.listeners[0].port
            print(f"2. relay listening on 127.0.0.1:{port} (config: {config_file})")
            started = time.monotonic()
            await asyncio.to_thread(_send, port)
            print(
                "3. the app sent 'Work order 4711 is due' as ultimo@contoso.com: "
                "the relay answered 250 once the message was on disk"
            )
            try:
                async with asyncio.timeout(WAIT):
                    (got,) = await emulator.smtp.wait_for_messages(1)
            except TimeoutError:
                print(f"   ... nothing reached the emulator within {WAIT:.0f}s: see the log above")
                return 1
            took = time.monotonic() - started
            print(f"4. Exchange (emulator) accepted it after {took:.2f}s:")
            print(f"     authenticated as {got.mailbox} with XOAUTH2 (app {got.app_id})")
            print(f"     MAIL FROM:<{got.mail_from}>  RCPT TO:{', '.join(got.rcpt_tos)}")
            print(f"     reply: {got.reply}")
            headers = got.data.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
            print("     headers as delivered (sender: rewrite puts the mailbox in From):")
            for line in headers.splitlines():
                print(f"       {line}")
        finally:
            await relay.stop(grace=5)
    print(
        "\nDone. Next: `relay emulator` to try your own application, "
        "`relay check -c relay.yaml` for your own configuration."
    )
    return 0
