"""The whole outbound path: a real SMTP client into the relay, the relay into the emulator.

Each test is a scenario an operator would recognise; assertions are on what arrives at the
emulated Exchange Online, what the spool holds, and the log line an operator would read.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from email import message_from_bytes, policy
from pathlib import Path

from relaykit import relay_config, secret_account, wait_until

from relay.app import build_routes
from relay.config import AfterImport, InboundConfig, Rate, RouteMatch, SenderPolicy
from relay.config import Transport as RouteTransport
from relay.identity import MsalTokenProvider
from relay.spool import QueueAdmin, State
from relay.testing import exchange_replies as ex
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.smtp import Fault, Phase, server_busy, shutdown


def mail(n: int, *, sender: str = "relay@contoso.com", to: str = "someone@example.org") -> bytes:
    return (
        f"From: App <{sender}>\r\nTo: {to}\r\nSubject: scenario {n}\r\n"
        f"Message-ID: <s{n}@app.example>\r\n\r\nBody {n}\r\n.leading dot\r\n"
    ).encode()


def send(
    port: int,
    data: bytes,
    *,
    sender: str = "relay@contoso.com",
    to: tuple[str, ...] = ("someone@example.org",),
) -> str:
    """Send with smtplib as a legacy app would; return the final reply text."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.example")
        client.mail(sender)
        for rcpt in to:
            client.rcpt(rcpt)
        code, text = client.data(data)
        assert code == 250, (code, text)
        return text.decode()


async def spool_states(path: Path) -> dict[State, list]:
    entries = await QueueAdmin(path).entries()
    out: dict[State, list] = {}
    for e in entries:
        out.setdefault(e.state, []).append(e)
    return out


async def test_accepted_mail_arrives_byte_for_byte(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start, caplog
) -> None:
    """A 250 from the relay; the emulator gets the same bytes, as the route's mailbox."""
    caplog.set_level(logging.INFO, logger="relay")
    relay = await start(relay_config(emulator, sample, tmp_path / "spool"))
    reply = await asyncio.to_thread(send, relay.listeners[0].port, mail(1))
    assert reply.startswith("2.0.0 Ok: queued as ")
    qid = reply.rsplit(" ", 1)[1]
    (got,) = await emulator.smtp.wait_for_messages(1)
    assert got.data == mail(1)
    assert got.mailbox == sample.mailbox and got.rcpt_tos == ("someone@example.org",)
    await wait_until(
        lambda: any("delivered" in r.message and qid in r.message for r in caplog.records)
    )
    line = next(
        r.getMessage()
        for r in caplog.records
        if f"{qid}: route=default" in r.message and " delivered " in r.getMessage()
    )
    assert "mailbox=relay@contoso.com delivered to=someone@example.org" in line
    assert "reply=250 2.0.0 OK <s1@app.example>" in line
    await wait_until(lambda: not relay.spool.ready())  # type: ignore[union-attr]


async def test_transient_reply_is_retried_until_delivered(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    emulator.smtp.inject(server_busy(Phase.DATA), times=2)
    relay = await start(relay_config(emulator, sample, tmp_path / "spool", retry=(0.1, 0.2)))
    await asyncio.to_thread(send, relay.listeners[0].port, mail(2))
    await emulator.smtp.wait_for_messages(1)
    deferred = [r.getMessage() for r in caplog.records if " deferred " in r.getMessage()]
    assert len(deferred) == 2
    assert "reply=451 4.7.500 Server busy. Please try again later from [127.0.0.1]" in deferred[0]


async def test_upstream_disconnect_is_retried(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    emulator.smtp.inject(shutdown(Phase.MAIL))
    relay = await start(relay_config(emulator, sample, tmp_path / "spool", retry=(0.1,)))
    await asyncio.to_thread(send, relay.listeners[0].port, mail(3))
    (got,) = await emulator.smtp.wait_for_messages(1)
    assert got.data == mail(3)


async def test_token_endpoint_trouble_defers_then_delivers(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    emulator.identity.faults.unavailable()
    relay = await start(relay_config(emulator, sample, tmp_path / "spool", retry=(0.1,)))
    await asyncio.to_thread(send, relay.listeners[0].port, mail(4))
    await emulator.smtp.wait_for_messages(1)
    assert len(emulator.identity.faults) == 0


async def test_unreachable_upstream_keeps_mail_deferred(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    account = secret_account(emulator, sample)
    dead = replace(account, endpoints=replace(account.endpoints, smtp_port=9))
    spool = tmp_path / "spool"
    relay = await start(relay_config(emulator, sample, spool, account=dead, retry=(60.0,)))
    await asyncio.to_thread(send, relay.listeners[0].port, mail(5))
    await wait_until(lambda: any(e.attempts for e in relay.spool.ready()))  # type: ignore[union-attr]
    (entry,) = relay.spool.ready()  # type: ignore[union-attr]
    assert entry.state is State.DEFERRED
    assert "451 4.4.1 upstream unreachable" in entry.last_reply


async def test_untrusted_upstream_certificate_means_no_delivery(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """Without the emulator's CA the relay must not talk to it: no token, no mail."""
    account = replace(secret_account(emulator, sample), ca_file=None)
    relay = await start(
        relay_config(emulator, sample, tmp_path / "spool", account=account, retry=(60.0,))
    )
    await asyncio.to_thread(send, relay.listeners[0].port, mail(6))
    await wait_until(lambda: any(e.attempts for e in relay.spool.ready()))  # type: ignore[union-attr]
    (entry,) = relay.spool.ready()  # type: ignore[union-attr]
    assert "CERTIFICATE_VERIFY_FAILED" in entry.last_reply or "SSLError" in entry.last_reply
    assert not emulator.smtp.messages and not emulator.smtp.logins


async def test_permanent_failure_bounces_to_the_sender_and_keeps_a_dead_letter(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """Exchange refuses with 5xx: an RFC 3464 DSN goes to the envelope sender through the same
    route, and the message stays in dead/ with the reason."""
    emulator.smtp.inject(
        Fault(Phase.DATA, reply=ex.SUBMISSION_QUOTA_EXCEEDED), headers={"Subject": "scenario 7"}
    )
    spool = tmp_path / "spool"
    relay = await start(relay_config(emulator, sample, spool))
    await asyncio.to_thread(send, relay.listeners[0].port, mail(7))
    (dsn,) = await emulator.smtp.wait_for_messages(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ("relay@contoso.com",)
    report = message_from_bytes(dsn.data, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Final-Recipient: rfc822; someone@example.org" in text
    assert "Status: 5.2.0" in text and "SubmissionQuotaExceededException" in text
    states = await spool_states(spool)
    (dead,) = states[State.DEAD]
    assert "someone@example.org: 554 5.2.0 STOREDRV.Submission" in dead.reason


async def test_a_bounce_is_never_bounced(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """A message from the null sender that fails goes to dead/ and makes no DSN."""
    emulator.smtp.inject(Fault(Phase.DATA, reply=ex.SUBMISSION_QUOTA_EXCEEDED))
    spool = tmp_path / "spool"
    relay = await start(relay_config(emulator, sample, spool))
    await asyncio.to_thread(send, relay.listeners[0].port, mail(8), sender="")
    await wait_until(lambda: bool(emulator.smtp.refused))
    await wait_until(lambda: not relay.spool.ready())  # type: ignore[union-attr]
    states = await spool_states(spool)
    assert len(states[State.DEAD]) == 1 and not emulator.smtp.messages


async def test_past_max_age_the_message_bounces(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    emulator.smtp.inject(server_busy(Phase.DATA), headers={"Subject": "scenario 9"}, times=100)
    spool = tmp_path / "spool"
    relay = await start(relay_config(emulator, sample, spool, retry=(0.05,), max_age=0.3))
    await asyncio.to_thread(send, relay.listeners[0].port, mail(9))
    (dsn,) = await emulator.smtp.wait_for_messages(1)
    assert dsn.mail_from == "" and b"gave up after" in dsn.data
    (dead,) = (await spool_states(spool))[State.DEAD]
    assert "451 4.7.500 Server busy" in dead.reason


async def test_many_messages_never_exceed_three_connections(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    relay = await start(relay_config(emulator, sample, tmp_path / "spool", connections=3))
    port = relay.listeners[0].port
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(8) as clients:  # the apps' threads are not the relay's
        await asyncio.gather(
            *(loop.run_in_executor(clients, send, port, mail(n)) for n in range(60))
        )
    await emulator.smtp.wait_for_messages(60)
    assert all(login.succeeded for login in emulator.smtp.logins)  # no 432 4.3.2
    assert len(emulator.smtp.logins) <= 3
    assert sorted(m.data for m in emulator.smtp.messages) == sorted(mail(n) for n in range(60))


async def test_graph_route_sends_with_sendmail(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """A route with `transport: graph` delivers through Graph sendMail, MIME kept."""
    relay = await start(
        relay_config(emulator, sample, tmp_path / "spool", transport=RouteTransport.GRAPH)
    )
    await asyncio.to_thread(send, relay.listeners[0].port, mail(10))
    await wait_until(lambda: bool(emulator.graph.sent))
    (sent,) = emulator.graph.sent
    assert sent.mailbox == sample.mailbox
    parsed = sent.parsed()
    assert parsed["Subject"] == "scenario 10" and parsed["Message-ID"] == "<s10@app.example>"
    assert not emulator.smtp.messages


def test_routes_through_one_mailbox_share_its_limits(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """Exchange counts connections and rate per mailbox: two routes, one transport and pacer,
    at the strictest rate."""
    base = relay_config(emulator, sample, tmp_path / "spool")
    (route,) = base.routes
    other = replace(route, name="alerts", rate=Rate(count=10, per=60.0), connections=2)
    config = replace(base, routes=(replace(route, match=RouteMatch(senders=("a@*",))), other))
    tokens = {"contoso": MsalTokenProvider(config.accounts["contoso"])}
    runtimes = build_routes(config, tokens)
    assert runtimes["default"].transport is runtimes["alerts"].transport
    assert runtimes["default"].pacer is runtimes["alerts"].pacer
    assert runtimes["default"].pacer.interval == 6.0
    assert "busy=0/3" in repr(runtimes["alerts"].transport)


async def test_relay_imports_inbound_mail_beside_outbound(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """`inbound:` runs inside the relay: a message in the mailbox lands in the maildir once,
    and is marked read in the mailbox afterwards."""
    mime = b"From: a@example.org\r\nTo: relay@contoso.com\r\nSubject: hello\r\n\r\nhi\r\n"
    emulator.graph.deliver(sample.mailbox, mime)
    maildir = tmp_path / "maildir"
    base = relay_config(emulator, sample, tmp_path / "spool")
    inbound = InboundConfig(
        name="inbox",
        account="contoso",
        mailbox=sample.mailbox,
        poll_interval=60.0,
        deliver={"maildir": maildir},
        after=AfterImport.MARK_READ,
    )
    relay = await start(replace(base, inbound=(inbound,)))
    (importer,) = relay.importers
    await wait_until(lambda: (maildir / "new").is_dir() and any((maildir / "new").iterdir()))
    (stored,) = list((maildir / "new").iterdir())
    assert stored.read_bytes().endswith(mime)
    await wait_until(lambda: all(m.is_read for m in emulator.graph.messages(sample.mailbox)))
    assert "maildir" in repr(importer)


async def test_a_reload_whose_import_cannot_start_keeps_outbound_mail_flowing(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start, caplog
) -> None:
    """The new configuration's import cannot create its maildir (a file is in the way): the
    reload says so and the new routes deliver all the same."""
    relay = await start(relay_config(emulator, sample, tmp_path / "spool"))
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the maildir should be")
    inbound = InboundConfig(
        name="inbox", account="contoso", mailbox=sample.mailbox, deliver={"maildir": blocked / "m"}
    )
    (route,) = relay.config.routes
    new = replace(
        relay.config,
        routes=(replace(route, mailbox=sample.shared_mailbox, sender=SenderPolicy.REWRITE),),
        inbound=(inbound,),
    )
    kept = await relay.reload(new, grace=2)
    assert kept == ["inbound import not running (see the error above)"]
    assert "inbound import not started after reload" in caplog.text
    await asyncio.to_thread(send, relay.listeners[0].port, mail(11))
    (got,) = await emulator.smtp.wait_for_messages(1)
    assert got.mailbox == sample.shared_mailbox
