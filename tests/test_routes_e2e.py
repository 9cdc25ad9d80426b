"""Routing and sender policy through the whole relay, checked at the emulated Exchange Online.

Two routes through two mailboxes of the sample tenant; a message whose recipients match both
is split into one upstream transaction per route; `keep` refuses at SMTP time what Exchange
would refuse later; `rewrite` changes From, Reply-To and the envelope and nothing else.
"""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import replace
from pathlib import Path

import pytest
from relaykit import relay_config

from relay.config import RouteMatch, SenderPolicy
from relay.testing.emulator import Emulator, SampleTenant

BODY = b"\r\nbody line one\r\n\xc3\xa9 eight-bit line, kept as bytes\r\n..dotted\r\n"


def message(sender: str, to: str, extra: bytes = b"") -> bytes:
    return (
        (
            f"From: Ops Team <{sender}>\r\nTo: {to}\r\nSubject: split test\r\n"
            "X-Custom:  spacing   kept\r\n"
        ).encode()
        + extra
        + BODY
    )


def two_routes(emulator: Emulator, sample: SampleTenant, tmp: Path, **default: object):
    base = relay_config(emulator, sample, tmp / "spool")
    (route,) = base.routes
    internal = replace(
        route,
        name="internal",
        mailbox=sample.shared_mailbox,
        match=RouteMatch(recipients=("*@contoso.com",)),
        sender=SenderPolicy.REWRITE,
    )
    return replace(base, routes=(internal, replace(route, **default)))


def transact(port: int, sender: str, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.example")
        code, text = client.mail(sender)
        if code != 250:
            return code, text
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                return code, text
        return client.data(data)


@pytest.fixture
async def relay_port(emulator: Emulator, sample: SampleTenant, tmp_path: Path):
    from relay.app import Relay

    relay = Relay(two_routes(emulator, sample, tmp_path))
    await relay.start()
    yield relay.listeners[0].port
    await relay.stop(grace=2)


async def test_recipients_of_two_routes_are_split_each_delivered_once(
    emulator: Emulator, sample: SampleTenant, relay_port: int
) -> None:
    data = message("relay@contoso.com", "a@contoso.com, x@example.org")
    rcpts = ["a@contoso.com", "x@example.org", "b@contoso.com"]
    code, _ = await asyncio.to_thread(transact, relay_port, "relay@contoso.com", rcpts, data)
    assert code == 250
    got = await emulator.smtp.wait_for_messages(2)
    by_mailbox = {m.mailbox: m for m in got}
    internal, default = by_mailbox[sample.shared_mailbox], by_mailbox[sample.mailbox]
    assert internal.rcpt_tos == ("a@contoso.com", "b@contoso.com")
    assert default.rcpt_tos == ("x@example.org",)
    assert default.data == data  # keep: not a byte changed
    # rewrite: envelope and From are the shared mailbox, the old From is the Reply-To
    assert internal.mail_from == sample.shared_mailbox
    head, body = internal.data.split(b"\r\n\r\n", 1)
    assert b"\r\n" + body == BODY
    lines = head.split(b"\r\n")
    assert b"From: Ops Team <shared@contoso.com>" in lines
    assert b"Reply-To: Ops Team <relay@contoso.com>" in lines
    assert b"X-Custom:  spacing   kept" in lines
    others = [line for line in lines if not line.startswith((b"From:", b"Reply-To:"))]
    assert others == data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]  # bytes and order kept


async def test_keep_refuses_a_foreign_sender_at_smtp_time(
    emulator: Emulator, sample: SampleTenant, relay_port: int
) -> None:
    """Exchange would answer SendAsDenied after queueing; the relay refuses while the app still
    listens, and says which route and mailbox."""
    code, text = await asyncio.to_thread(
        transact,
        relay_port,
        "ceo@contoso.com",
        ["x@example.org"],
        message("ceo@contoso.com", "x@example.org"),
    )
    assert code == 550
    reply = text.decode()
    assert reply.startswith("5.7.60 SMTP; Client does not have permissions to send as this sender")
    assert "relay@contoso.com" in reply and "route default" in reply
    assert not emulator.smtp.messages


async def test_keep_checks_the_from_header_too(
    emulator: Emulator, sample: SampleTenant, relay_port: int
) -> None:
    code, text = await asyncio.to_thread(
        transact,
        relay_port,
        "relay@contoso.com",
        ["x@example.org"],
        message("ceo@contoso.com", "x@example.org"),
    )
    assert code == 550 and b"5.7.60" in text
    assert not emulator.smtp.messages


async def test_send_as_grant_is_honoured(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    from relay.app import Relay

    config = two_routes(emulator, sample, tmp_path, send_as=(sample.send_as,))
    relay = Relay(config)
    await relay.start()
    try:
        data = message(sample.send_as, "x@example.org")
        code, _ = await asyncio.to_thread(
            transact, relay.listeners[0].port, sample.send_as, ["x@example.org"], data
        )
        assert code == 250
        (got,) = await emulator.smtp.wait_for_messages(1)
        assert got.mail_from == sample.send_as and got.data == data
    finally:
        await relay.stop(grace=2)


async def test_no_matching_route_is_refused_with_what_did_not_match(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    from relay.app import Relay

    base = relay_config(emulator, sample, tmp_path / "spool")
    (route,) = base.routes
    config = replace(base, routes=(replace(route, match=RouteMatch(senders=("*@erp.local",))),))
    relay = Relay(config)
    await relay.start()
    try:
        code, text = await asyncio.to_thread(
            transact, relay.listeners[0].port, "relay@contoso.com", ["x@example.org"], b"x"
        )
    finally:
        await relay.stop(grace=2)
    assert code == 550
    assert text.decode().startswith("5.7.1 No route for ")
    assert "*@erp.local" in text.decode()
