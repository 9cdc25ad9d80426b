"""The SMTP submission transport (STARTTLS + XOAUTH2) against the emulated Exchange Online."""

from __future__ import annotations

import asyncio
import inspect
import ssl
from email import policy
from email.parser import BytesParser

import aiosmtplib
import pytest
from relaykit import secret_account

from relay.errors import (
    DeliveryError,
    PermanentFailure,
    TemporaryFailure,
    TokenRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from relay.identity import MsalTokenProvider
from relay.testing import exchange_replies as ex
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.smtp import (
    Fault,
    Phase,
    daily_quota_exceeded,
    delayed,
    server_busy,
    shutdown,
    smtp_auth_disabled,
)
from relay.tls import client_context
from relay.transports import OutgoingMessage
from relay.transports.smtp import SmtpTransport, map_smtp_error


def message(
    n: int = 0,
    *,
    sender: str = "relay@contoso.com",
    to: str = "someone@example.org",
    extra: bytes = b"",
) -> OutgoingMessage:
    data = (
        (
            f"From: App <{sender}>\r\nTo: {to}\r\nSubject: test {n}\r\n"
            f"Message-ID: <m{n}@app.example>\r\n"
        ).encode()
        + extra
        + b"\r\nHello.\r\n..leading dot stays\r\n"
    )
    return OutgoingMessage(qid=f"Q{n}", mail_from=sender, rcpt_tos=(to,), data=data)


@pytest.fixture
def provider(emulator: Emulator, sample: SampleTenant) -> MsalTokenProvider:
    return MsalTokenProvider(secret_account(emulator, sample))


def transport(emulator: Emulator, provider: MsalTokenProvider, **kw) -> SmtpTransport:
    settings = {
        "host": emulator.smtp_host,
        "port": emulator.smtp_port,
        "mailbox": "relay@contoso.com",
        "tokens": provider,
        "tls_context": client_context(emulator.ca_file),
        "timeout": 5.0,
    }
    return SmtpTransport(**{**settings, **kw})


async def test_delivers_the_exact_bytes_as_the_mailbox(emulator, provider) -> None:
    t = transport(emulator, provider)
    msg = message()
    done = await t.send(msg)
    await t.aclose()
    assert done.accepted == ("someone@example.org",) and not done.refused
    assert done.reply.code == 250 and done.reply.status == "2.0.0"
    assert done.reply.text.startswith("OK <m0@app.example> [Hostname=")
    (got,) = emulator.smtp.messages
    assert got.data == msg.data
    assert got.mailbox == "relay@contoso.com"
    assert (got.mail_from, tuple(got.rcpt_tos)) == ("relay@contoso.com", ("someone@example.org",))


async def test_a_thousand_messages_cost_one_token_and_at_most_three_logins(
    emulator, provider
) -> None:
    t = transport(emulator, provider, connections=3)
    results = await asyncio.gather(*(t.send(message(n)) for n in range(1000)))
    await t.aclose()
    assert all(r.accepted for r in results)
    assert len(emulator.smtp.messages) == 1000
    assert provider.requests == 1
    assert t.logins <= 3
    assert [login.succeeded for login in emulator.smtp.logins] == [True] * t.logins


async def test_535_5_7_3_gets_one_retry_with_a_fresh_token(emulator, provider) -> None:
    emulator.smtp.inject(Fault(Phase.AUTH, reply=ex.AUTH_UNSUCCESSFUL))
    t = transport(emulator, provider)
    await t.send(message())
    await t.aclose()
    assert provider.requests == 2
    assert [login.succeeded for login in emulator.smtp.logins] == [False, True]


async def test_535_twice_waits_instead_of_bouncing(emulator, provider) -> None:
    emulator.smtp.inject(Fault(Phase.AUTH, reply=ex.AUTH_UNSUCCESSFUL), times=2)
    t = transport(emulator, provider)
    with pytest.raises(TokenRejected) as caught:
        await t.send(message())
    assert caught.value.reply[:2] == (535, "5.7.3")
    assert caught.value.reply.text == "Authentication unsuccessful"
    assert isinstance(caught.value, TemporaryFailure)
    assert not emulator.smtp.messages


async def test_mailbox_without_full_access_is_refused(emulator, provider, sample) -> None:
    """The app lost FullAccess on the mailbox: Exchange's 535 5.7.3, after one fresh-token try."""
    tenant = sample.directory.tenant(sample.tenant_id)
    tenant.mailboxes["relay@contoso.com"].full_access.clear()
    t = transport(emulator, provider)
    with pytest.raises(TokenRejected, match=r"535 5\.7\.3 Authentication unsuccessful \["):
        await t.send(message())
    assert provider.requests == 2


async def test_smtp_auth_disabled_is_not_retried(emulator, provider) -> None:
    emulator.smtp.inject(smtp_auth_disabled(tenant=True))
    t = transport(emulator, provider)
    with pytest.raises(TokenRejected, match=r"5\.7\.139 Authentication unsuccessful, Smtp"):
        await t.send(message())
    assert provider.requests == 1


async def test_send_as_denied_is_permanent(emulator, provider) -> None:
    t = transport(emulator, provider)
    with pytest.raises(PermanentFailure) as caught:
        await t.send(message(sender="ceo@contoso.com"))
    assert caught.value.reply[:2] == (554, "5.2.252")
    assert caught.value.reply.text.startswith("SendAsDenied; relay@contoso.com not allowed")


async def test_daily_quota_is_permanent(emulator, provider) -> None:
    emulator.smtp.inject(daily_quota_exceeded())
    t = transport(emulator, provider)
    with pytest.raises(PermanentFailure, match="SubmissionQuotaExceededException"):
        await t.send(message())


@pytest.mark.parametrize("phase", [Phase.MAIL, Phase.RCPT, Phase.DATA])
async def test_451_busy_is_temporary_and_the_connection_is_reused(
    emulator, provider, phase
) -> None:
    emulator.smtp.inject(server_busy(phase))
    t = transport(emulator, provider)
    with pytest.raises(TemporaryFailure) as caught:
        await t.send(message(1))
    assert not isinstance(caught.value, PermanentFailure)
    assert caught.value.reply[:2] == (451, "4.7.500")
    await t.send(message(2))
    await t.aclose()
    assert [m.data.count(b"test 2") for m in emulator.smtp.messages] == [1]


async def test_421_and_disconnect_is_temporary(emulator, provider) -> None:
    emulator.smtp.inject(shutdown(Phase.DATA))
    t = transport(emulator, provider)
    with pytest.raises(UpstreamUnavailable) as caught:
        await t.send(message())
    assert caught.value.reply.code == 421
    await t.send(message(3))  # a fresh connection works
    await t.aclose()
    assert len(emulator.smtp.messages) == 1


async def test_slow_upstream_times_out(emulator, provider) -> None:
    emulator.smtp.inject(delayed(Phase.DATA, 3.0))
    t = transport(emulator, provider, timeout=0.5)
    with pytest.raises(UpstreamTimeout):
        await t.send(message())


async def test_refused_connection_is_temporary(provider) -> None:
    t = SmtpTransport(
        host="127.0.0.1",
        port=9,
        mailbox="relay@contoso.com",
        tokens=provider,
        tls_context=client_context(None),
        timeout=2.0,
    )
    with pytest.raises(UpstreamUnavailable, match=r"4\.4\.1 upstream unreachable"):
        await t.send(message())


async def test_untrusted_certificate_means_no_delivery(emulator, provider) -> None:
    t = transport(emulator, provider, tls_context=client_context(None))
    with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await t.send(message())
    assert not emulator.smtp.messages and not emulator.smtp.logins


async def test_some_recipients_refused(emulator, provider, sample) -> None:
    """Over the mailbox's recipient limit Exchange answers 452 4.5.3 per extra recipient."""
    tenant = sample.directory.tenant(sample.tenant_id)
    tenant.mailboxes["relay@contoso.com"].recipient_limit = 2
    t = transport(emulator, provider)
    msg = message()
    msg = OutgoingMessage(
        qid="Q",
        mail_from=msg.mail_from,
        data=msg.data,
        rcpt_tos=("a@example.org", "b@example.org", "c@example.org"),
    )
    done = await t.send(msg)
    assert done.accepted == ("a@example.org", "b@example.org")
    assert {r: (rep.code, rep.status) for r, rep in done.refused.items()} == {
        "c@example.org": (452, "4.5.3")
    }


async def test_eight_bit_data_and_smtputf8(emulator, provider) -> None:
    t = transport(emulator, provider)
    base = message(extra="X-Note: café\r\n".encode())
    msg = OutgoingMessage(
        qid="Q",
        mail_from=base.mail_from,
        rcpt_tos=("jörg@example.org",),
        data=base.data,
        smtputf8=True,
    )
    await t.send(msg)
    (got,) = emulator.smtp.messages
    assert got.data == base.data and got.rcpt_tos == ("jörg@example.org",)
    assert BytesParser(policy=policy.default).parsebytes(got.data)["X-Note"] == "café"


def test_every_aiosmtplib_exception_is_mapped() -> None:
    """A new exception class in aiosmtplib must not slip through unmapped."""
    classes = [
        c
        for _, c in inspect.getmembers(aiosmtplib.errors, inspect.isclass)
        if issubclass(c, Exception) and c.__module__ == "aiosmtplib.errors"
    ]
    assert len(classes) >= 14
    for cls in classes:
        params = inspect.signature(cls.__init__).parameters
        if "recipients" in params:
            exc = cls([aiosmtplib.SMTPRecipientRefused(450, "busy", "a@x")])
        elif "sender" in params or "recipient" in params:
            exc = cls(550, "no", "a@x")
        elif "code" in params:
            exc = cls(451, "4.3.0 later")
        else:
            exc = cls("message")
        assert isinstance(map_smtp_error(exc), DeliveryError), cls
    assert isinstance(map_smtp_error(ssl.SSLError("x")), UpstreamUnavailable)
    assert isinstance(map_smtp_error(aiosmtplib.SMTPDataError(554, "5.6.0 x")), PermanentFailure)
