"""The emulated Exchange Online submission endpoint, driven by real clients over loopback.

Each test is a scenario: smtplib (in a thread), aiosmtplib, or raw lines where the exact bytes
matter, against `SmtpSubmission` on 127.0.0.1 port 0, asserting Exchange's wording from
reference/exchange-online.md §1.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
import pytest

from relay.reply import Reply
from relay.testing import exchange_replies as ex
from relay.testing.directory import (
    MAIL_SEND,
    SMTP_SEND_AS_APP,
    App,
    Directory,
    Mailbox,
    Tenant,
)
from relay.testing.pki import EmulatorPKI
from relay.testing.smtp import (
    Fault,
    Phase,
    SmtpSubmission,
    daily_quota_exceeded,
    delayed,
    dropped,
    parse_xoauth2,
    server_busy,
    shutdown,
    smtp_auth_disabled,
)
from relay.testing.tokens import EXCHANGE_AUDIENCE, GRAPH_AUDIENCE, TokenIssuer

HOST = "EM1PR01CA0001.outlook.office365.com"
MAILBOX_SERVER = "EM1PR01MB0001.EURPRD01.PROD.OUTLOOK.COM"
SENDER = "sender@contoso.com"
SECOND = "second@contoso.com"
EHLO_BEFORE_TLS = [
    f"250-{HOST} Hello [127.0.0.1]",
    "250-SIZE 157286400",
    "250-PIPELINING",
    "250-DSN",
    "250-ENHANCEDSTATUSCODES",
    "250-STARTTLS",
    "250-8BITMIME",
    "250-BINARYMIME",
    "250-CHUNKING",
    "250 SMTPUTF8",
]
EHLO_AFTER_TLS = [
    line.replace("250-STARTTLS", "250-AUTH LOGIN XOAUTH2") for line in EHLO_BEFORE_TLS
]


# --- the world the tests run in -------------------------------------------------------------


class Clock:
    """The emulator's clock; tests move it instead of sleeping.

    It starts two days back, so that moving it a day forward still issues tokens whose `iat`
    is in the past (PyJWT refuses tokens from the future).
    """

    def __init__(self) -> None:
        self.now = time.time() - 2 * 24 * 3600

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    directory: Directory
    tenant: Tenant
    app: App
    sender: Mailbox
    issuer: TokenIssuer
    pki: EmulatorPKI
    clock: Clock

    def token(
        self,
        *,
        app: App | None = None,
        tenant_id: str | None = None,
        audience: str = EXCHANGE_AUDIENCE,
        roles: frozenset[str] = frozenset({SMTP_SEND_AS_APP}),
        issued_at: float | None = None,
    ) -> str:
        app = app or self.app
        return self.issuer.issue(
            audience=audience,
            tenant_id=tenant_id or self.tenant.tenant_id,
            app_id=app.client_id,
            roles=roles,
            object_id=app.object_id,
            lifetime=3600,
            issued_at=self.clock() if issued_at is None else issued_at,
        )

    def stamp(self, session_id: str) -> str:
        iso = datetime.fromtimestamp(self.clock(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        return f"[{HOST} {iso[:-3]}Z {session_id}]"


@pytest.fixture
def world() -> World:
    directory = Directory()
    tenant = directory.add_tenant(domain="contoso.com")
    app = tenant.add_app(secret="s3cret")
    sender = tenant.add_mailbox(SENDER, full_access=[app], send_as=["alerts@contoso.com"])
    tenant.add_mailbox(SECOND, full_access=[app])
    tenant.add_mailbox("nogrant@contoso.com")
    return World(directory, tenant, app, sender, TokenIssuer(), EmulatorPKI(), Clock())


@asynccontextmanager
async def serving(world: World, **options: Any) -> AsyncIterator[SmtpSubmission]:
    service = SmtpSubmission(
        world.directory,
        world.issuer,
        tls_context=world.pki.server_context(),
        clock=world.clock,
        **options,
    )
    await service.start("127.0.0.1", 0)
    try:
        yield service
    finally:
        await service.aclose()


@pytest.fixture
async def smtp(world: World) -> AsyncIterator[SmtpSubmission]:
    async with serving(world) as service:
        yield service


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def message(
    *,
    sender: str = SENDER,
    subject: str = "hello",
    message_id: str | None = "<m1@contoso.com>",
    body: str = "Hi.\r\n",
) -> bytes:
    headers = [f"From: {sender}", "To: someone@example.org", f"Subject: {subject}"]
    if message_id:
        headers.append(f"Message-ID: {message_id}")
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


# --- clients --------------------------------------------------------------------------------


class Raw:
    """Lines on a socket, for the exact bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.banner: list[str] = []

    @property
    def session_id(self) -> str:
        m = re.search(r"\[([0-9A-F]{16})\]$", self.banner[0])
        assert m, self.banner
        return m.group(1)

    async def read(self) -> list[str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise EOFError(f"connection closed after {lines}")
            text = line.decode().rstrip("\r\n")
            lines.append(text)
            if text[3:4] != "-":
                return lines

    async def send(self, data: str | bytes) -> None:
        self.writer.write(data if isinstance(data, bytes) else data.encode() + b"\r\n")
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> list[str]:
        await self.send(line)
        return await self.read()

    async def reply(self, line: str | bytes) -> str:
        [answer] = await self.cmd(line)
        return answer

    async def closed(self) -> bool:
        """True when the server ends the connection without sending anything more."""
        try:
            return await self.reader.read() == b""
        except (ConnectionError, ssl.SSLError):
            return True

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert await self.reply("STARTTLS") == "220 2.0.0 SMTP server ready"
        await self.writer.start_tls(ctx, server_hostname="127.0.0.1")


@asynccontextmanager
async def raw(port: int) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    client = Raw(reader, writer)
    try:
        yield client
    finally:
        writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@asynccontextmanager
async def tls_session(
    smtp: SmtpSubmission, world: World, *, user: str | None = None, token: str | None = None
) -> AsyncIterator[Raw]:
    """Greeting, EHLO, STARTTLS, EHLO; then AUTH XOAUTH2 as `user` if given (must succeed)."""
    async with raw(smtp.port) as client:
        client.banner = await client.read()
        await client.cmd("EHLO client.example.net")
        await client.starttls(world.pki.client_context())
        assert await client.cmd("EHLO client.example.net") == EHLO_AFTER_TLS
        if user is not None:
            auth = await client.reply(f"AUTH XOAUTH2 {xoauth2(user, token or world.token())}")
            assert auth == "235 2.7.0 Authentication successful"
        yield client


def smtplib_submit(
    port: int,
    ctx: ssl.SSLContext,
    user: str,
    token: str,
    data: bytes,
    *,
    rcpt_tos: list[str] | None = None,
    mail_from: str = SENDER,
    initial_response_ok: bool = True,
) -> dict[str, tuple[int, bytes]]:
    """One smtplib session: STARTTLS, EHLO again (smtplib does not), XOAUTH2, one message."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.ehlo()
        client.auth(
            "XOAUTH2",
            lambda challenge=None: (
                "" if challenge else f"user={user}\x01auth=Bearer {token}\x01\x01"
            ),
            initial_response_ok=initial_response_ok,
        )
        return client.sendmail(mail_from, rcpt_tos or ["someone@example.org"], data)


@asynccontextmanager
async def aiosmtplib_client(smtp: SmtpSubmission, world: World) -> AsyncIterator[aiosmtplib.SMTP]:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=smtp.port, tls_context=world.pki.client_context(), timeout=10
    )
    await client.connect()
    try:
        yield client
    finally:
        if client.is_connected:
            with suppress(aiosmtplib.SMTPException):
                await client.quit()


# --- wording --------------------------------------------------------------------------------


def test_every_exchange_reply_has_a_status_of_its_class() -> None:
    replies = [v for v in vars(ex).values() if isinstance(v, Reply)] + [
        ex.unrecognized_command("FOO"),
        ex.send_as_denied("a@x", "b@x"),
        ex.queued("<id@x>", "HOST"),
        ex.server_busy("192.0.2.1"),
    ]
    assert len(replies) > 25
    for reply in replies:
        if reply.status:
            assert reply.status[0] == str(reply.code)[0], reply


def test_xoauth2_official_test_vector_parses() -> None:
    """§1.3: Microsoft's sample blob decodes to its user and token."""
    blob = base64.b64decode(
        "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0oz"
        "VmUwYmpMQldaV0NjbFJDM0VvQUEBAQ=="
    )
    assert parse_xoauth2(blob) == (
        "test@contoso.onmicrosoft.com",
        "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
    )
    assert parse_xoauth2(b"user=a@b\x01auth=Basic x\x01\x01") is None
    assert parse_xoauth2(b"user=a@b\x01auth=Bearer x") is None
    assert parse_xoauth2(b"\xff\xfe") is None


# --- session --------------------------------------------------------------------------------


async def test_banner_and_ehlo_match_exchange_before_and_after_starttls(
    smtp: SmtpSubmission, world: World
) -> None:
    """Connect, EHLO, STARTTLS, EHLO: the banner, both capability lists and their order (§1.2)."""
    async with raw(smtp.port) as client:
        [banner] = await client.read()
        when = datetime.fromtimestamp(world.clock(), UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
        assert re.fullmatch(
            rf"220 {re.escape(HOST)} Microsoft ESMTP MAIL Service ready at "
            rf"{re.escape(when)} \[[0-9A-F]{{16}}\]",
            banner,
        )
        assert await client.cmd("EHLO relay.example.net") == EHLO_BEFORE_TLS
        await client.starttls(world.pki.client_context())
        assert await client.cmd("EHLO relay.example.net") == EHLO_AFTER_TLS


async def test_before_starttls_only_ehlo_noop_quit_and_starttls_are_taken(
    smtp: SmtpSubmission,
) -> None:
    async with raw(smtp.port) as client:
        await client.read()
        await client.cmd("EHLO relay.example.net")
        must = "530 5.7.0 Must issue a STARTTLS command first"
        assert await client.reply("AUTH XOAUTH2 abc") == must
        assert await client.reply("MAIL FROM:<sender@contoso.com>") == must
        assert await client.reply("HELO relay.example.net") == must
        assert await client.reply("NOOP") == "250 2.0.0 OK"
        assert await client.reply("QUIT") == "221 2.0.0 Service closing transmission channel"


async def test_exchange_transcript_from_auth_to_quit(smtp: SmtpSubmission, world: World) -> None:
    """The happy path of §1.2 line by line, and the message recorded exactly as sent."""
    data = message(body="Hi.\r\n..a line that starts with a dot\r\n")
    async with tls_session(smtp, world) as client:
        token = world.token()
        assert (
            await client.reply(f"AUTH XOAUTH2 {xoauth2(SENDER, token)}")
            == "235 2.7.0 Authentication successful"
        )
        assert await client.reply("MAIL FROM:<sender@contoso.com>") == "250 2.1.0 Sender OK"
        assert await client.reply("RCPT TO:<someone@example.org>") == "250 2.1.5 Recipient OK"
        assert await client.reply("DATA") == "354 Start mail input; end with <CRLF>.<CRLF>"
        queued = await client.reply(data + b".\r\n")
        assert queued == f"250 2.0.0 OK <m1@contoso.com> [Hostname={MAILBOX_SERVER}]"
        assert await client.reply("RSET") == "250 2.0.0 Resetting"
        assert await client.reply("QUIT") == "221 2.0.0 Service closing transmission channel"
    [record] = smtp.messages
    assert record.data == data.replace(b"\r\n..", b"\r\n.")
    assert (record.mail_from, record.rcpt_tos) == (SENDER, ("someone@example.org",))
    assert (record.mailbox, record.app_id, record.tenant_id) == (
        SENDER,
        world.app.client_id,
        world.tenant.tenant_id,
    )
    assert record.session_id == client.session_id
    assert str(record.reply) == queued
    assert record.at == datetime.fromtimestamp(world.clock(), UTC)
    [login] = smtp.logins
    assert (login.mechanism, login.user, login.app_id, login.succeeded) == (
        "XOAUTH2",
        SENDER,
        world.app.client_id,
        True,
    )


async def test_protocol_errors_in_exchange_wording(smtp: SmtpSubmission, world: World) -> None:
    async with tls_session(smtp, world, user=SENDER) as client:
        assert await client.reply("RCPT TO:<a@example.org>") == "503 5.5.2 Need mail command"
        assert await client.reply("MAIL FROM:<sender@contoso.com>") == "250 2.1.0 Sender OK"
        assert (
            await client.reply("MAIL FROM:<sender@contoso.com>")
            == "503 5.5.2 Sender already specified"
        )
        assert await client.reply("DATA") == "503 5.5.2 Need rcpt command"
        assert await client.reply("FOO bar") == "500 5.3.3 Unrecognized command 'FOO'"
        stamp = world.stamp(client.session_id)
        assert await client.reply("EHLO bad!name") == f"501 5.5.4 Invalid domain name {stamp}"
        assert await client.reply("HELO bad!name") == f"501 5.5.4 Invalid domain name {stamp}"
        assert await client.reply("HELO relay.example.net") == f"250 {HOST} Hello [127.0.0.1]"


async def test_a_session_without_ehlo_is_told_to_say_hello(
    smtp: SmtpSubmission, world: World
) -> None:
    async with raw(smtp.port) as client:
        await client.read()
        await client.starttls(world.pki.client_context())
        assert await client.reply("AUTH XOAUTH2 abc") == "503 5.5.2 Send hello first"
        assert await client.reply("MAIL FROM:<a@b.c>") == "503 5.5.2 Send hello first"


# --- AUTH -----------------------------------------------------------------------------------


@pytest.mark.parametrize("initial_response_ok", [True, False], ids=["sasl-ir", "two-step"])
async def test_smtplib_xoauth2_both_wire_forms(
    smtp: SmtpSubmission, world: World, initial_response_ok: bool
) -> None:
    """smtplib sends `AUTH XOAUTH2 <b64>` or `AUTH XOAUTH2`, `334 `, `<b64>`; both work."""
    data = message(body="line one\r\n.dot line\r\n")
    refused = await asyncio.to_thread(
        smtplib_submit,
        smtp.port,
        world.pki.client_context(),
        SENDER,
        world.token(),
        data,
        initial_response_ok=initial_response_ok,
    )
    assert refused == {}
    [record] = await smtp.wait_for_messages(1)
    assert record.data == data
    assert [login.succeeded for login in smtp.logins] == [True]
    assert smtp.connections == 1


async def test_two_step_xoauth2_gets_an_empty_334(smtp: SmtpSubmission, world: World) -> None:
    async with tls_session(smtp, world) as client:
        assert await client.cmd("AUTH XOAUTH2") == ["334 "]
        reply = await client.reply(xoauth2(SENDER, world.token()))
        assert reply == "235 2.7.0 Authentication successful"


async def test_aiosmtplib_auth_xoauth2_and_send(smtp: SmtpSubmission, world: World) -> None:
    data = message(message_id=None)
    async with aiosmtplib_client(smtp, world) as client:
        response = await client.auth_xoauth2(SENDER, world.token())
        assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
        _, reply = await client.sendmail(SENDER, ["a@example.org", "b@example.org"], data)
    assert re.fullmatch(
        rf"2\.0\.0 OK <[0-9A-F]{{32}}@{re.escape(MAILBOX_SERVER)}> \[Hostname={MAILBOX_SERVER}\]",
        reply,
    )
    [record] = smtp.messages
    assert record.rcpt_tos == ("a@example.org", "b@example.org")
    assert record.data == data


async def test_logins_log_no_token_and_no_warning(
    smtp: SmtpSubmission, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Both wire forms at DEBUG: the token is nowhere in the log, and nothing is a warning."""
    caplog.set_level(logging.DEBUG)
    token = world.token()
    async with tls_session(smtp, world, user=SENDER, token=token):
        pass
    async with tls_session(smtp, world) as client:
        await client.cmd("AUTH XOAUTH2")
        assert (await client.reply(xoauth2(SENDER, token))).startswith("235 ")
    assert [login.succeeded for login in smtp.logins] == [True, True]
    assert token not in caplog.text
    assert xoauth2(SENDER, token) not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_mechanism_is_case_insensitive(smtp: SmtpSubmission, world: World) -> None:
    async with tls_session(smtp, world) as client:
        reply = await client.reply(f"auth xoauth2 {xoauth2(SENDER, world.token())}")
        assert reply == "235 2.7.0 Authentication successful"


async def test_a_token_of_several_kilobytes_is_read_whole(
    smtp: SmtpSubmission, world: World
) -> None:
    """An 8 KB token in both wire forms gets Exchange's 535, not aiosmtpd's `500 line too long`."""
    token = "x" * 8192
    async with tls_session(smtp, world) as client:
        answer = await client.reply(f"AUTH XOAUTH2 {xoauth2(SENDER, token)}")
        assert answer.startswith("535 5.7.3 Authentication unsuccessful [")
    async with tls_session(smtp, world) as client:
        assert await client.cmd("AUTH XOAUTH2") == ["334 "]
        answer = await client.reply(xoauth2(SENDER, token))
        assert answer.startswith("535 5.7.3 Authentication unsuccessful [")


def _expired(world: World) -> str:
    return world.token(issued_at=world.clock() - 7200)


def _graph_audience(world: World) -> str:
    return world.token(audience=GRAPH_AUDIENCE)


def _no_smtp_role(world: World) -> str:
    return world.token(roles=frozenset({MAIL_SEND}))


def _unknown_app(world: World) -> str:
    return world.token(app=App("00000000-0000-0000-0000-000000000001"))


def _other_tenant(world: World) -> str:
    other = world.directory.add_tenant(domain="fabrikam.com")
    return world.token(app=other.add_app(client_id=world.app.client_id), tenant_id=other.tenant_id)


def _foreign_issuer(world: World) -> str:
    return TokenIssuer().issue(
        audience=EXCHANGE_AUDIENCE,
        tenant_id=world.tenant.tenant_id,
        app_id=world.app.client_id,
        roles={SMTP_SEND_AS_APP},
        object_id=world.app.object_id,
        lifetime=3600,
    )


@pytest.mark.parametrize(
    ("user", "make_token"),
    [
        (SENDER, _expired),
        (SENDER, _graph_audience),
        (SENDER, _no_smtp_role),
        (SENDER, _unknown_app),
        (SENDER, _other_tenant),
        (SENDER, _foreign_issuer),
        (SENDER, lambda w: "not-a-jwt"),
        ("nogrant@contoso.com", lambda w: w.token()),
        ("nobody@contoso.com", lambda w: w.token()),
    ],
    ids=[
        "expired",
        "wrong-audience",
        "missing-role",
        "app-not-in-tenant",
        "mailbox-in-other-tenant",
        "bad-signature",
        "malformed",
        "no-full-access",
        "unknown-mailbox",
    ],
)
async def test_refused_tokens_get_535_5_7_3_and_the_connection_closes(
    smtp: SmtpSubmission, world: World, user: str, make_token: Callable[[World], str]
) -> None:
    async with tls_session(smtp, world) as client:
        answer = await client.reply(f"AUTH XOAUTH2 {xoauth2(user, make_token(world))}")
        assert answer == f"535 5.7.3 Authentication unsuccessful {world.stamp(client.session_id)}"
        assert await client.closed()
    [login] = smtp.logins
    assert (login.user, login.succeeded, login.reply.code) == (user, False, 535)


@pytest.mark.parametrize(
    "blob",
    [
        base64.b64encode(b"user=sender@contoso.com\x01auth=Bearer\x01\x01").decode(),
        base64.b64encode(b"just garbage").decode(),
        "=",
    ],
    ids=["no-token", "not-xoauth2", "empty"],
)
async def test_malformed_xoauth2_blob_gets_535(
    smtp: SmtpSubmission, world: World, blob: str
) -> None:
    async with tls_session(smtp, world) as client:
        answer = await client.reply(f"AUTH XOAUTH2 {blob}")
        assert answer == f"535 5.7.3 Authentication unsuccessful {world.stamp(client.session_id)}"


async def test_sasl_answers_that_are_not_base64_or_cancel(
    smtp: SmtpSubmission, world: World
) -> None:
    async with tls_session(smtp, world) as client:
        assert await client.reply("AUTH XOAUTH2 %%%") == "501 5.5.2 Can't decode base64"
        assert await client.cmd("AUTH XOAUTH2") == ["334 "]
        assert await client.reply("*") == "501 5.7.0 Auth aborted"
        assert await client.cmd("AUTH XOAUTH2") == ["334 "]
        reply = await client.reply(xoauth2(SENDER, world.token()))
        assert reply == "235 2.7.0 Authentication successful"
    assert [login.reply.code for login in smtp.logins] == [501, 501, 235]


@pytest.mark.parametrize("scope", ["Tenant", "Mailbox"])
async def test_smtp_auth_switched_off_gets_535_5_7_139(
    smtp: SmtpSubmission, world: World, scope: str
) -> None:
    if scope == "Tenant":
        world.tenant.smtp_auth_enabled = False
    else:
        world.sender.smtp_auth_enabled = False
    async with tls_session(smtp, world) as client:
        answer = await client.reply(f"AUTH XOAUTH2 {xoauth2(SENDER, world.token())}")
        assert answer == (
            f"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
            f"for the {scope}. Visit https://aka.ms/smtp_auth_disabled for more information. "
            f"{world.stamp(client.session_id)}"
        )
        assert await client.closed()


async def test_basic_auth_login_is_retired(smtp: SmtpSubmission, world: World) -> None:
    """AUTH LOGIN asks for user name and password as Exchange does, then 550 5.7.30 (§5.2)."""
    async with tls_session(smtp, world) as client:
        assert await client.cmd("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]  # "Username:"
        assert await client.cmd(base64.b64encode(SENDER.encode()).decode()) == ["334 UGFzc3dvcmQ6"]
        answer = await client.reply(base64.b64encode(b"password").decode())
        assert answer == "550 5.7.30 Basic authentication is not supported for Client Submission."
    [login] = smtp.logins
    assert (login.mechanism, login.user, login.succeeded) == ("LOGIN", SENDER, False)


def _smtplib_login(port: int, ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.ehlo()
        client.login(SENDER, "password")


async def test_smtplib_login_fails_with_550(smtp: SmtpSubmission, world: World) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        await asyncio.to_thread(_smtplib_login, smtp.port, world.pki.client_context())
    assert (caught.value.smtp_code, caught.value.smtp_error) == (
        550,
        b"5.7.30 Basic authentication is not supported for Client Submission.",
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5", "plain"])
async def test_unknown_mechanisms_get_504_5_7_4(
    smtp: SmtpSubmission, world: World, mechanism: str
) -> None:
    async with tls_session(smtp, world) as client:
        answer = await client.reply(f"AUTH {mechanism} AGEAYg==")
        assert answer == "504 5.7.4 Unrecognized authentication type"


async def test_auth_after_success_is_503(smtp: SmtpSubmission, world: World) -> None:
    async with tls_session(smtp, world, user=SENDER) as client:
        answer = await client.reply(f"AUTH XOAUTH2 {xoauth2(SENDER, world.token())}")
        assert answer == "503 5.5.2 Already authenticated"


async def test_fourth_connection_of_a_mailbox_gets_432(smtp: SmtpSubmission, world: World) -> None:
    """Three connections hold an AUTH for sender@; the fourth gets 432 4.3.2; once one of the
    three quits, a new one gets in. Other mailboxes are not affected."""
    async with (
        aiosmtplib_client(smtp, world) as one,
        aiosmtplib_client(smtp, world) as two,
        aiosmtplib_client(smtp, world) as three,
        aiosmtplib_client(smtp, world) as four,
        aiosmtplib_client(smtp, world) as other,
    ):
        for client in (one, two, three):
            await client.auth_xoauth2(SENDER, world.token())
        assert smtp.authenticated_connections(SENDER) == 3
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await four.auth_xoauth2(SENDER, world.token())
        assert (caught.value.code, caught.value.message) == (
            432,
            "4.3.2 Concurrent connections limit exceeded.",
        )
        await other.auth_xoauth2(SECOND, world.token())
        await one.quit()
        await smtp.wait_for(lambda: smtp.authenticated_connections(SENDER) == 2)
        response = await four.auth_xoauth2(SENDER, world.token())
        assert response.code == 235
    assert [login.reply.code for login in smtp.logins] == [235, 235, 235, 432, 235, 235]
    await smtp.wait_for(lambda: smtp.authenticated_connections(SENDER) == 0)


async def test_gmail_style_challenge_on_bad_token(smtp: SmtpSubmission, world: World) -> None:
    """With the switch on, a bad token gets Gmail's 334 JSON challenge, then 535 5.7.8 (§1.4)."""
    smtp.gmail_style_challenge = True
    async with tls_session(smtp, world) as client:
        challenge = await client.cmd(f"AUTH XOAUTH2 {xoauth2(SENDER, 'bad')}")
        assert challenge == [
            "334 eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29v"
            "Z2xlLmNvbS8ifQ=="
        ]
        assert await client.cmd("") == [
            "535-5.7.8 Username and Password not accepted. For more information, go to",
            "535 5.7.8  https://support.google.com/mail/?p=BadCredentials",
        ]
    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        await asyncio.to_thread(
            smtplib_submit, smtp.port, world.pki.client_context(), SENDER, "bad", message()
        )
    assert caught.value.smtp_code == 535
    async with aiosmtplib_client(smtp, world) as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            await client.auth_xoauth2(SENDER, "bad")
        assert failed.value.code == 535
    # a good token is not affected by the switch
    async with tls_session(smtp, world, user=SENDER):
        pass


# --- MAIL / RCPT / DATA ---------------------------------------------------------------------


async def test_mail_before_auth_gets_530_5_7_57(smtp: SmtpSubmission, world: World) -> None:
    async with tls_session(smtp, world) as client:
        answer = await client.reply("MAIL FROM:<sender@contoso.com>")
        stamp = world.stamp(client.session_id)
        assert answer == f"530 5.7.57 Client not authenticated to send mail. {stamp}"


@pytest.mark.parametrize("where", ["envelope", "header"])
async def test_sending_as_another_address_is_denied_at_end_of_data(
    smtp: SmtpSubmission, world: World, where: str
) -> None:
    mail_from = "other@contoso.com" if where == "envelope" else SENDER
    data = message(sender="other@contoso.com" if where == "header" else SENDER)
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(
            smtplib_submit,
            smtp.port,
            world.pki.client_context(),
            SENDER,
            world.token(),
            data,
            mail_from=mail_from,
        )
    expected = (
        "5.2.252 SendAsDenied; sender@contoso.com not allowed to send as other@contoso.com; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
        "Failed to process message due to a permanent exception with message "
        "[BeginDiagnosticData]Cannot submit message."
    )
    assert (caught.value.smtp_code, caught.value.smtp_error.decode()) == (554, expected)
    assert smtp.messages == []
    [refused] = smtp.refused
    assert (refused.reply.code, refused.data) == (554, data)


async def test_send_as_grant_lets_the_mailbox_send_as_another_address(
    smtp: SmtpSubmission, world: World
) -> None:
    data = message(sender="Alerts <alerts@contoso.com>")
    await asyncio.to_thread(
        smtplib_submit,
        smtp.port,
        world.pki.client_context(),
        SENDER,
        world.token(),
        data,
        mail_from="alerts@contoso.com",
    )
    [record] = smtp.messages
    assert (record.mailbox, record.mail_from) == (SENDER, "alerts@contoso.com")


async def test_over_the_mailbox_max_send_size_gets_554_5_2_0(
    smtp: SmtpSubmission, world: World
) -> None:
    world.sender.max_send_size = 1000
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(
            smtplib_submit,
            smtp.port,
            world.pki.client_context(),
            SENDER,
            world.token(),
            message(body="x" * 80 + "\r\n") * 20,
        )
    assert caught.value.smtp_code == 554
    assert caught.value.smtp_error.decode() == (
        "5.2.0 MapiExceptionMaxSubmissionExceeded; Message size exceeds maximum size limit.; "
        "STOREDRV.Submission.Exception:MessageSubmissionExceededException."
        "MapiExceptionMaxSubmissionExceeded; Failed to process message due to a permanent "
        "exception with message [BeginDiagnosticData]Cannot save changes made to an item to store."
    )


async def test_mail_size_over_the_service_limit_gets_552_5_3_4(
    smtp: SmtpSubmission, world: World
) -> None:
    async with tls_session(smtp, world, user=SENDER) as client:
        answer = await client.reply("MAIL FROM:<sender@contoso.com> SIZE=157286401")
        assert answer == "552 5.3.4 Message size exceeds fixed maximum message size"
        assert await client.reply("MAIL FROM:<sender@contoso.com> SIZE=157286400") == (
            "250 2.1.0 Sender OK"
        )


async def test_data_over_the_service_limit_gets_552_5_3_4(world: World) -> None:
    """The service limit is lowered so the test stays fast; EHLO advertises the lowered one."""
    async with (
        serving(world, service_max_size=10_000) as smtp,
        raw(smtp.port) as client,
    ):
        await client.read()
        assert "250-SIZE 10000" in await client.cmd("EHLO relay.example.net")
        await client.starttls(world.pki.client_context())
        await client.cmd("EHLO relay.example.net")
        await client.reply(f"AUTH XOAUTH2 {xoauth2(SENDER, world.token())}")
        await client.reply("MAIL FROM:<sender@contoso.com>")
        await client.reply("RCPT TO:<a@example.org>")
        await client.reply("DATA")
        answer = await client.reply(message(body="y" * 998 + "\r\n") * 20 + b".\r\n")
        assert answer == "552 5.3.4 Message size exceeds fixed maximum message size"
        assert smtp.messages == smtp.refused == []


async def test_recipients_over_the_mailbox_limit_get_452_4_5_3(
    smtp: SmtpSubmission, world: World
) -> None:
    world.sender.recipient_limit = 2
    refused = await asyncio.to_thread(
        smtplib_submit,
        smtp.port,
        world.pki.client_context(),
        SENDER,
        world.token(),
        message(),
        rcpt_tos=["a@example.org", "b@example.org", "c@example.org"],
    )
    assert refused == {"c@example.org": (452, b"4.5.3 Too many recipients")}
    [record] = smtp.messages
    assert record.rcpt_tos == ("a@example.org", "b@example.org")


async def test_daily_recipient_quota_over_a_rolling_day(smtp: SmtpSubmission, world: World) -> None:
    """3 recipients a day: 2 pass, 2 more are refused with 554 5.2.0; a day later they pass."""
    world.sender.daily_recipient_limit = 3
    two = ["a@example.org", "b@example.org"]
    ctx = world.pki.client_context()
    await asyncio.to_thread(
        smtplib_submit, smtp.port, ctx, SENDER, world.token(), message(), rcpt_tos=two
    )
    assert smtp.recipients_sent(SENDER) == 2
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(
            smtplib_submit, smtp.port, ctx, SENDER, world.token(), message(), rcpt_tos=two
        )
    assert (caught.value.smtp_code, caught.value.smtp_error) == (
        554,
        b"5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    )
    world.clock.now += 24 * 3600
    assert smtp.recipients_sent(SENDER) == 0
    await asyncio.to_thread(
        smtplib_submit, smtp.port, ctx, SENDER, world.token(), message(), rcpt_tos=two
    )
    assert len(smtp.messages) == 2


async def test_pipelined_commands_are_answered_in_order(smtp: SmtpSubmission, world: World) -> None:
    async with tls_session(smtp, world, user=SENDER) as client:
        await client.send(
            b"MAIL FROM:<sender@contoso.com>\r\nRCPT TO:<a@example.org>\r\n"
            b"RCPT TO:<b@example.org>\r\nDATA\r\n"
        )
        assert [(await client.read())[0] for _ in range(4)] == [
            "250 2.1.0 Sender OK",
            "250 2.1.5 Recipient OK",
            "250 2.1.5 Recipient OK",
            "354 Start mail input; end with <CRLF>.<CRLF>",
        ]
        assert (await client.reply(message() + b".\r\n")).startswith("250 2.0.0 OK <m1@")


async def test_8bitmime_and_smtputf8_parameters(smtp: SmtpSubmission, world: World) -> None:
    data = "From: sender@contoso.com\r\nSubject: Grüße\r\n\r\nJörg, ça va?\r\n".encode()
    async with tls_session(smtp, world, user=SENDER) as client:
        answer = await client.reply("MAIL FROM:<sender@contoso.com> BODY=8BITMIME SMTPUTF8")
        assert answer == "250 2.1.0 Sender OK"
        assert await client.reply("RCPT TO:<jörg@example.org>") == "250 2.1.5 Recipient OK"
        await client.reply("DATA")
        assert (await client.reply(data + b".\r\n")).startswith("250 2.0.0 OK <")
    [record] = smtp.messages
    assert record.mail_options == ("BODY=8BITMIME", "SMTPUTF8")
    assert record.rcpt_tos == ("jörg@example.org",)
    assert record.data == data


async def test_null_reverse_path_is_taken(smtp: SmtpSubmission, world: World) -> None:
    """`MAIL FROM:<>` (bounces) is accepted; the From: header is still checked; `RCPT TO:<>` is
    not an address."""
    async with tls_session(smtp, world, user=SENDER) as client:
        assert await client.reply("MAIL FROM:<> SIZE=100") == "250 2.1.0 Sender OK"
        assert await client.reply("RCPT TO:<>") == "501 5.1.3 Invalid address"
        assert await client.reply("RCPT TO:<a@example.org>") == "250 2.1.5 Recipient OK"
        await client.reply("DATA")
        assert (await client.reply(message() + b".\r\n")).startswith("250 2.0.0 OK <m1@")
        await client.reply("MAIL FROM:<>")
        await client.reply("RCPT TO:<a@example.org>")
        await client.reply("DATA")
        refused = await client.reply(message(sender="other@contoso.com") + b".\r\n")
        assert refused.startswith("554 5.2.252 SendAsDenied; sender@contoso.com not allowed")
    [record] = smtp.messages
    assert (record.mail_from, record.rcpt_tos) == ("", ("a@example.org",))


# --- faults ---------------------------------------------------------------------------------


async def test_shutdown_fault_answers_421_and_closes(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(shutdown(Phase.MAIL))
    async with tls_session(smtp, world, user=SENDER) as client:
        answer = await client.reply("MAIL FROM:<sender@contoso.com>")
        assert answer == "421 4.3.2 Service not available, closing transmission channel"
        assert await client.closed()
    assert smtp.pending_faults == []


async def test_server_busy_fault_at_rcpt_is_used_once(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(server_busy(Phase.RCPT))
    async with tls_session(smtp, world, user=SENDER) as client:
        await client.reply("MAIL FROM:<sender@contoso.com>")
        assert await client.reply("RCPT TO:<a@example.org>") == (
            "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (AS761)"
        )
        assert await client.reply("RCPT TO:<a@example.org>") == "250 2.1.5 Recipient OK"


async def test_any_reply_at_the_end_of_data(smtp: SmtpSubmission, world: World) -> None:
    full = Reply(
        554,
        "5.2.2",
        "mailbox full; STOREDRV.Submission.Exception:QuotaExceededException."
        "MapiExceptionShutoffQuotaExceeded",
    )
    smtp.inject(Fault(Phase.DATA, reply=full))
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(
            smtplib_submit, smtp.port, world.pki.client_context(), SENDER, world.token(), message()
        )
    assert caught.value.smtp_code == 554
    assert caught.value.smtp_error.decode() == f"5.2.2 {full.text}"
    [refused] = smtp.refused
    assert refused.reply == full


async def test_daily_quota_fault(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(daily_quota_exceeded(), mailbox=SENDER)
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(
            smtplib_submit, smtp.port, world.pki.client_context(), SENDER, world.token(), message()
        )
    assert caught.value.smtp_error == (
        b"5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
    )


async def test_auth_disabled_fault_for_one_mailbox(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(smtp_auth_disabled(tenant=False), mailbox=SENDER)
    smtp.inject(smtp_auth_disabled(tenant=True), mailbox=SENDER)
    async with tls_session(smtp, world, user=SECOND):
        pass
    for scope in ("Mailbox", "Tenant"):
        async with tls_session(smtp, world) as client:
            answer = await client.reply(f"AUTH XOAUTH2 {xoauth2(SENDER, world.token())}")
            assert answer.startswith(
                f"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                f"disabled for the {scope}."
            )
            assert answer.endswith(world.stamp(client.session_id))
            assert await client.closed()
    async with tls_session(smtp, world, user=SENDER):
        pass


async def test_delay_fault_holds_the_reply(smtp: SmtpSubmission, world: World) -> None:
    """A 60 s delay at MAIL outlasts the client's 0.3 s timeout; closing the emulator then cuts
    the held connection."""
    smtp.inject(delayed(Phase.MAIL, 60))
    async with aiosmtplib_client(smtp, world) as client:
        await client.auth_xoauth2(SENDER, world.token())
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await client.mail(SENDER, timeout=0.3)
    await smtp.aclose()
    assert repr(smtp).startswith("<SmtpSubmission closed")


async def test_a_short_delay_then_the_normal_answer(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(delayed(Phase.DATA, 0.01))
    async with tls_session(smtp, world, user=SENDER) as client:
        await client.reply("MAIL FROM:<sender@contoso.com>")
        await client.reply("RCPT TO:<a@example.org>")
        await client.reply("DATA")
        assert (await client.reply(message() + b".\r\n")).startswith("250 2.0.0 OK <m1@")
    assert len(smtp.messages) == 1


async def test_drop_fault_at_end_of_data(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(dropped(Phase.DATA))
    with pytest.raises(smtplib.SMTPServerDisconnected):
        await asyncio.to_thread(
            smtplib_submit, smtp.port, world.pki.client_context(), SENDER, world.token(), message()
        )
    assert smtp.messages == smtp.refused == []


async def test_faults_at_connect(smtp: SmtpSubmission) -> None:
    smtp.inject(dropped(Phase.CONNECT))
    smtp.inject(shutdown(Phase.CONNECT))
    async with raw(smtp.port) as client:
        with pytest.raises((EOFError, ConnectionError)):
            await client.read()
    async with raw(smtp.port) as client:
        answer = await client.read()
        assert answer == ["421 4.3.2 Service not available, closing transmission channel"]
        assert await client.closed()
    async with raw(smtp.port) as client:
        assert (await client.read())[0].startswith(f"220 {HOST} Microsoft ESMTP")
    assert smtp.connections == 3


async def test_fault_matched_on_a_header(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(Fault(Phase.DATA, reply=Reply(451, "4.3.0", "boom")), headers={"Subject": "boom"})
    ctx = world.pki.client_context()
    await asyncio.to_thread(
        smtplib_submit, smtp.port, ctx, SENDER, world.token(), message(subject="calm")
    )
    with pytest.raises(smtplib.SMTPDataError) as caught:
        await asyncio.to_thread(
            smtplib_submit, smtp.port, ctx, SENDER, world.token(), message(subject="boom")
        )
    assert (caught.value.smtp_code, caught.value.smtp_error) == (451, b"4.3.0 boom")
    assert [m.reply.code for m in smtp.messages] == [250]


async def test_fault_for_the_next_messages_of_one_mailbox(
    smtp: SmtpSubmission, world: World
) -> None:
    smtp.inject(server_busy(Phase.DATA), mailbox=SENDER, times=2)
    assert len(smtp.pending_faults) == 2
    ctx = world.pki.client_context()
    await asyncio.to_thread(
        smtplib_submit,
        smtp.port,
        ctx,
        SECOND,
        world.token(),
        message(sender=SECOND),
        mail_from=SECOND,
    )
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as caught:
            await asyncio.to_thread(
                smtplib_submit, smtp.port, ctx, SENDER, world.token(), message()
            )
        assert caught.value.smtp_code == 451
    await asyncio.to_thread(smtplib_submit, smtp.port, ctx, SENDER, world.token(), message())
    assert [m.mailbox for m in smtp.messages] == [SECOND, SENDER]
    assert smtp.pending_faults == []


async def test_faults_are_used_in_the_order_injected(smtp: SmtpSubmission, world: World) -> None:
    smtp.inject(Fault(Phase.MAIL, reply=Reply(451, "4.4.1", "first")))
    smtp.inject(Fault(Phase.MAIL, reply=Reply(452, "4.4.2", "second")))
    async with tls_session(smtp, world, user=SENDER) as client:
        assert await client.reply("MAIL FROM:<sender@contoso.com>") == "451 4.4.1 first"
        assert await client.reply("MAIL FROM:<sender@contoso.com>") == "452 4.4.2 second"
        assert await client.reply("MAIL FROM:<sender@contoso.com>") == "250 2.1.0 Sender OK"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Fault(Phase.MAIL), "must reply, close or delay"),
        (lambda: Fault(Phase.MAIL, reply=Reply(250, "2.0.0", "OK")), "not 250"),
        (lambda: Fault(Phase.CONNECT, reply=ex.SERVICE_NOT_AVAILABLE), "close=True"),
        (lambda: Fault(Phase.MAIL, delay=-1), "negative"),
    ],
)
def test_faults_that_make_no_sense_are_refused(make: Callable[[], Fault], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_inject_refuses_matches_that_cannot_happen(world: World) -> None:
    smtp = SmtpSubmission(world.directory, world.issuer, tls_context=world.pki.server_context())
    with pytest.raises(ValueError, match="end of DATA"):
        smtp.inject(server_busy(Phase.MAIL), headers={"Subject": "x"})
    with pytest.raises(ValueError, match="not known"):
        smtp.inject(dropped(Phase.CONNECT), mailbox=SENDER)
    with pytest.raises(ValueError, match="at least 1"):
        smtp.inject(dropped(Phase.MAIL), times=0)


# --- records and lifecycle ------------------------------------------------------------------


async def test_waiting_for_messages_wakes_on_arrival(smtp: SmtpSubmission, world: World) -> None:
    waiter = asyncio.create_task(smtp.wait_for_messages(2))
    ctx = world.pki.client_context()
    for _ in range(2):
        await asyncio.to_thread(smtplib_submit, smtp.port, ctx, SENDER, world.token(), message())
    async with asyncio.timeout(5):
        records = await waiter
    assert len(records) == 2
    assert smtp.connections == 2
    assert [login.succeeded for login in smtp.logins] == [True, True]


async def test_lifecycle_is_guarded(world: World) -> None:
    smtp = SmtpSubmission(world.directory, world.issuer, tls_context=world.pki.server_context())
    with pytest.raises(RuntimeError, match="not started"):
        _ = smtp.port
    assert repr(smtp) == "<SmtpSubmission new connections=0 messages=0 faults=0>"
    await smtp.start("127.0.0.1", 0)
    assert repr(smtp) == (
        f"<SmtpSubmission running 127.0.0.1:{smtp.port} connections=0 messages=0 faults=0>"
    )
    with pytest.raises(RuntimeError, match="starts only once"):
        await smtp.start("127.0.0.1", 0)
    await smtp.aclose()
    await smtp.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await smtp.start("127.0.0.1", 0)
    async with SmtpSubmission(
        world.directory, world.issuer, tls_context=world.pki.server_context()
    ) as unstarted:
        assert "new" in repr(unstarted)
