"""The SMTP listener, driven by real clients (smtplib, aiosmtplib, raw sockets) on loopback.

Each test starts a Listener on port 0 with a recording intake defined here, speaks SMTP to it and
checks the exact replies, what the intake was asked and what it stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email._header_value_parser import get_angle_addr
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay.listener
from relay.config import (
    Limits,
    ListenerAuth,
    ListenerConfig,
    Secret,
    TlsConfig,
    TlsMode,
    UserConfig,
)
from relay.errors import ConfigError, IntakeRefused
from relay.intake import Client
from relay.listener import (
    CLIENT_FAILURE_WINDOW,
    MAX_AUTH_DELAY,
    MAX_AUTH_FAILURES,
    MAX_CLIENT_FAILURES,
    AuthOffer,
    FailedLogins,
    Listener,
    ListenerState,
    _Content,
    auth_delay,
    auth_offer,
    client_ip,
    mail_policy,
    plain_angle_addr,
)
from relay.passwords import hash_password
from relay.reply import Reply
from relay.routing import PLAIN_ADDR_SPEC
from relay.testing.pki import EmulatorPKI

PASSWORD = "correct horse battery staple"
USERS = {"ultimo": UserConfig(name="ultimo", password_hash=Secret(hash_password(PASSWORD)))}
HOSTNAME = "relay.test"
SLOW = "slow@contoso.com"
MESSAGE = b"From: app@contoso.com\r\nTo: ops@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


# -- the intake the listener talks to --------------------------------------------------------


@dataclass
class Accepted:
    client: Client
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    smtputf8: bool


class RecordingIntake:
    """Records every question; refuses what it is told to; raises `fail` from accept()."""

    def __init__(
        self,
        *,
        senders: dict[str, Reply] | None = None,
        recipients: dict[str, Reply] | None = None,
        fail: Exception | None = None,
    ) -> None:
        self.refuse_senders = senders or {}
        self.refuse_recipients = recipients or {}
        self.fail = fail
        self.senders: list[tuple[Client, str]] = []
        self.recipients: list[tuple[str, str]] = []
        self.accepted: list[Accepted] = []

    def check_sender(self, client: Client, mail_from: str) -> Reply | None:
        self.senders.append((client, mail_from))
        return self.refuse_senders.get(mail_from)

    def check_recipient(self, client: Client, mail_from: str, rcpt: str) -> Reply | None:
        self.recipients.append((mail_from, rcpt))
        return self.refuse_recipients.get(rcpt)

    async def accept(
        self, client: Client, mail_from: str, rcpt_tos: list[str], data: bytes, *, smtputf8: bool
    ) -> str:
        if self.fail is not None:
            raise self.fail
        self.accepted.append(Accepted(client, mail_from, rcpt_tos, data, smtputf8))
        return f"Q{len(self.accepted)}"


class SlowIntake(RecordingIntake):
    """Mail from slow@contoso.com is stored only once `release` is set (`entered` says it is
    waiting), like a spool on a stuck disk; other mail goes through at once."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def accept(
        self, client: Client, mail_from: str, rcpt_tos: list[str], data: bytes, *, smtputf8: bool
    ) -> str:
        if mail_from == SLOW:
            self.entered.set()
            await self.release.wait()
        return await super().accept(client, mail_from, rcpt_tos, data, smtputf8=smtputf8)


class BrokenSenderCheck(RecordingIntake):
    def check_sender(self, client: Client, mail_from: str) -> Reply | None:
        raise RuntimeError("router bug with a secret-looking text")


# -- clients and fixtures --------------------------------------------------------------------


class Wire:
    """A raw SMTP client: bytes out, whole replies in (continuation lines joined by newlines)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        _open_wires.append(self)

    @classmethod
    async def open(
        cls, port: int, host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None
    ) -> tuple[Wire, str]:
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        wire = cls(reader, writer)
        return wire, await wire.reply()

    async def reply(self) -> str:
        lines = []
        async with asyncio.timeout(10):
            while True:
                line = (await self.reader.readline()).decode()
                if not line:
                    raise ConnectionError(f"closed after {lines!r}")
                lines.append(line.rstrip("\r\n"))
                if line[3:4] != "-":
                    return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        """True once the server has closed the connection and sent nothing more."""
        return await self.rest() == b""

    async def rest(self) -> bytes:
        """Whatever the server still sends, up to its close."""
        async with asyncio.timeout(10):
            return await self.reader.read()

    async def transaction(self, data: bytes, sender: str = "a@contoso.com") -> str:
        """MAIL, RCPT, DATA; `data` goes on the wire as given. Returns the reply to the data."""
        assert await self.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"
        assert await self.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"
        assert await self.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        await self.send(data)
        return await self.reply()

    async def aclose(self) -> None:
        if self in _open_wires:
            _open_wires.remove(self)
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


_open_wires: list[Wire] = []


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    """Every raw client a test opened is closed after it (after its listeners have stopped)."""
    yield
    while _open_wires:
        await _open_wires.pop().aclose()


Serve = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start listeners on port 0 (loopback unless told); all are stopped after the test."""
    started: list[Listener] = []

    async def start(
        intake: Any = None,
        *,
        host: str = "127.0.0.1",
        networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
        tls: TlsConfig | None = None,
        auth_required: bool = False,
        users: dict[str, UserConfig] = USERS,
        limits: Limits | None = None,
    ) -> Listener:
        config = ListenerConfig(
            host=host,
            port=0,
            networks=tuple(ipaddress.ip_network(n) for n in networks),
            tls=tls or TlsConfig(),
            auth=ListenerAuth(required=auth_required),
        )
        listener = Listener(
            config,
            limits=limits or Limits(max_message_size=256 * 1024, max_recipients=3),
            users=users,
            intake=intake if intake is not None else RecordingIntake(),
            hostname=HOSTNAME,
            auth_failure_delay=0.01,
        )
        await listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        await listener.stop(0)


async def ehlo(port: int, host: str = "127.0.0.1") -> tuple[Wire, str]:
    wire, greeting = await Wire.open(port, host)
    assert greeting == f"220 {HOSTNAME} ESMTP relay"
    return wire, await wire.cmd("EHLO app.example")


@pytest.fixture
def pki() -> EmulatorPKI:
    return EmulatorPKI()


@pytest.fixture
def outside_ip() -> str:
    """A local address that is not loopback, so a client can come from outside `networks`."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        ip = probe.getsockname()[0]
    except OSError:
        pytest.skip("no non-loopback IPv4 address on this machine")
    finally:
        probe.close()
    if ip.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this machine")
    return str(ip)


def tls_config(pki: EmulatorPKI, tmp_path: Path, mode: TlsMode, *hosts: str) -> TlsConfig:
    cert, key = pki.issue("127.0.0.1", "localhost", *hosts)
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    return TlsConfig(mode=mode, cert_file=tmp_path / "cert.pem", key_file=tmp_path / "key.pem")


def plain(user: str = "ultimo", password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# -- EHLO and replies ------------------------------------------------------------------------


async def test_ehlo_advertises_the_extensions_and_auth_on_loopback(serve: Serve) -> None:
    """Loopback client, users configured: SIZE from the limits, AUTH PLAIN LOGIN, no STARTTLS."""
    listener = await serve()
    wire, reply = await ehlo(listener.port)
    assert reply.splitlines() == [
        f"250-{HOSTNAME}",
        "250-SIZE 262144",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250 AUTH PLAIN LOGIN",
    ]
    assert await wire.cmd("NOOP") == "250 2.0.0 Ok"
    assert await wire.cmd("RSET") == "250 2.0.0 Ok"
    assert await wire.cmd("QUIT") == "221 2.0.0 Bye"
    assert await wire.closed()


async def test_without_users_auth_is_neither_offered_nor_accepted(serve: Serve) -> None:
    listener = await serve(users={})
    wire, reply = await ehlo(listener.port)
    assert "AUTH" not in reply
    assert await wire.cmd(f"AUTH PLAIN {plain()}") == (
        "502 5.5.1 AUTH not available: this relay has no users"
    )


async def test_malformed_commands_get_precise_replies_with_status_codes(serve: Serve) -> None:
    listener = await serve()
    wire, _ = await Wire.open(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "503 5.5.1 Error: send HELO first"
    assert await wire.cmd("EHLO") == "501 5.5.4 Syntax: EHLO hostname"
    await wire.cmd("EHLO app.example")
    assert await wire.cmd("FROB") == '500 5.5.2 Error: command "FROB" not recognized'
    assert await wire.cmd("RCPT TO:<b@example.org>") == "503 5.5.1 Error: need MAIL command"
    assert await wire.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
    assert await wire.cmd("MAIL TO:<a@contoso.com>") == (
        "501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
    )
    assert await wire.cmd("MAIL FROM:<a@>") == "553 5.1.3 Error: malformed address"
    assert await wire.cmd("MAIL FROM:<a@[1.2.3>") == "553 5.1.3 Error: malformed address"
    assert await wire.cmd('MAIL FROM:<"a@contoso.com>') == (
        '553 5.1.7 Malformed address: <"a@contoso.com>">'
    )
    assert await wire.cmd("MAIL FROM:<postmaster>") == "553 5.1.7 Malformed address: <postmaster>"
    assert await wire.cmd("MAIL FROM:<a@contoso.com> BODY=BINARYMIME") == (
        "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"
    )
    assert await wire.cmd("MAIL FROM:<a@contoso.com> SMTPUTF8=yes") == (
        "501 5.5.4 Error: SMTPUTF8 takes no arguments"
    )
    assert await wire.cmd("MAIL FROM:<a@contoso.com> RET=HDRS") == (
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
    )
    assert await wire.cmd("MAIL FROM:<" + "a" * 600 + "@contoso.com>") == (
        "500 5.5.2 Command line too long"
    )
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "250 2.1.0 Ok"
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "503 5.5.1 Error: nested MAIL command"
    assert await wire.cmd("RCPT TO:<b@example.org> NOTIFY=NEVER") == (
        "555 5.5.4 RCPT TO parameters not recognized or not implemented"
    )
    assert await wire.cmd("RCPT TO:<b@example>") == "250 2.1.5 Ok"
    assert await wire.cmd("RCPT TO:<nodomain>") == "553 5.1.3 Malformed address: <nodomain>"
    assert await wire.cmd("RCPT TO:<Postmaster>") == "250 2.1.5 Ok"
    assert await wire.cmd("DATA now") == "501 5.5.4 Syntax: DATA"


# -- transactions ----------------------------------------------------------------------------


async def test_a_message_reaches_the_intake_with_its_envelope(serve: Serve) -> None:
    """smtplib sends one message to two recipients; the intake sees the envelope the hooks built."""
    intake = RecordingIntake()
    listener = await serve(intake)

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", listener.port) as client:
            return client.sendmail(
                "app@contoso.com", ["ops@example.org", "boss@example.org"], MESSAGE
            )

    assert await asyncio.to_thread(send) == {}
    [got] = intake.accepted
    assert got.mail_from == "app@contoso.com"
    assert got.rcpt_tos == ["ops@example.org", "boss@example.org"]
    assert got.data == MESSAGE
    assert not got.smtputf8
    assert got.client == Client(
        address="127.0.0.1", listener="127.0.0.1:0", helo="[127.0.0.1]", user=None, tls=False
    )
    assert intake.senders == [(got.client, "app@contoso.com")]
    assert intake.recipients == [
        ("app@contoso.com", "ops@example.org"),
        ("app@contoso.com", "boss@example.org"),
    ]


async def test_an_idle_session_is_closed_and_each_command_puts_that_off(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session with no command for IDLE_TIMEOUT is closed; one that keeps sending commands
    stays open past several timeouts, and is closed once it stops."""
    monkeypatch.setattr(relay.listener, "IDLE_TIMEOUT", 0.4)
    listener = await serve()
    busy, _ = await ehlo(listener.port)
    idle, _ = await ehlo(listener.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 1.3:  # more than three timeouts, a command every 0.1 s
        assert await busy.cmd("NOOP") == "250 2.0.0 Ok"
        await asyncio.sleep(0.1)
    assert idle.reader.at_eof() or await idle.closed()
    assert await busy.closed()
    assert loop.time() - start < 1.3 + 0.4 + 1.0


async def test_replies_name_the_queue_id_and_the_session_goes_on(serve: Serve) -> None:
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    assert await wire.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q1"
    assert await wire.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q2"
    assert [a.data for a in intake.accepted] == [MESSAGE, MESSAGE]


async def test_null_sender_and_mail_parameters_are_accepted(serve: Serve) -> None:
    """`MAIL FROM:<>` (a bounce) with SIZE and BODY; the intake sees the null sender as ""."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<> SIZE=1000 BODY=8BITMIME") == "250 2.1.0 Ok"
    assert await wire.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"
    assert await wire.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    await wire.send("Subject: caf\u00e9\r\n\r\n8bit \u00e9\r\n.\r\n".encode())
    assert await wire.reply() == "250 2.0.0 Ok: queued as Q1"
    [got] = intake.accepted
    assert (got.mail_from, got.rcpt_tos) == ("", ["b@example.org"])
    assert intake.senders[0][1] == "" and intake.recipients == [("", "b@example.org")]
    assert got.data == "Subject: caf\u00e9\r\n\r\n8bit \u00e9\r\n".encode()


async def test_smtputf8_addresses(serve: Serve) -> None:
    """Non-ASCII addresses need the SMTPUTF8 parameter; the intake is told it was given."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<j\u00f6rg@contoso.com>") == (
        "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    )
    assert await wire.cmd("MAIL FROM:<app@contoso.com>") == "250 2.1.0 Ok"
    assert await wire.cmd("RCPT TO:<j\u00f6rg@example.org>") == (
        "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    )
    assert await wire.cmd("RSET") == "250 2.0.0 Ok"
    await wire.send(b"MAIL FROM:<bad\xff@contoso.com> SMTPUTF8\r\n")
    assert await wire.reply() == "553 5.1.7 Malformed address: not valid UTF-8"
    assert await wire.cmd("MAIL FROM:<j\u00f6rg@contoso.com> SMTPUTF8") == "250 2.1.0 Ok"
    assert await wire.cmd("RCPT TO:<\u00e5sa@example.org>") == "250 2.1.5 Ok"
    assert await wire.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    await wire.send(MESSAGE + b".\r\n")
    assert await wire.reply() == "250 2.0.0 Ok: queued as Q1"
    [got] = intake.accepted
    assert (got.mail_from, got.rcpt_tos, got.smtputf8) == (
        "j\u00f6rg@contoso.com",
        ["\u00e5sa@example.org"],
        True,
    )


async def test_pipelined_commands_are_answered_in_order(serve: Serve) -> None:
    """MAIL, two RCPTs and DATA in one write; then the data, the dot and the next MAIL at once."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    await wire.send(
        b"MAIL FROM:<a@contoso.com>\r\nRCPT TO:<b@example.org>\r\n"
        b"RCPT TO:<c@example.org>\r\nDATA\r\n"
    )
    assert [await wire.reply() for _ in range(4)] == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    await wire.send(MESSAGE + b".\r\nMAIL FROM:<d@contoso.com>\r\nRCPT TO:<e@example.org>\r\n")
    assert [await wire.reply() for _ in range(3)] == [
        "250 2.0.0 Ok: queued as Q1",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
    ]
    assert intake.accepted[0].rcpt_tos == ["b@example.org", "c@example.org"]


async def test_a_helo_client_sends_without_extensions(serve: Serve) -> None:
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await Wire.open(listener.port)
    assert await wire.cmd("HELO printer") == f"250 {HOSTNAME}"
    assert await wire.cmd("MAIL FROM:<scan@contoso.com> SIZE=10") == (
        "501 5.5.4 Syntax: MAIL FROM: <address>"
    )
    assert await wire.transaction(MESSAGE + b".\r\n", sender="scan@contoso.com") == (
        "250 2.0.0 Ok: queued as Q1"
    )
    assert intake.accepted[0].client.helo == "printer"


async def test_an_ipv6_loopback_listener(serve: Serve) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    intake = RecordingIntake()
    listener = await serve(intake, host="::1")
    wire, reply = await ehlo(listener.port, "::1")
    assert reply.endswith("250 AUTH PLAIN LOGIN")
    assert await wire.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q1"
    assert intake.accepted[0].client.address == "::1"
    assert intake.accepted[0].client.listener == "[::1]:0"


def _stdlib_getaddr(arg: str) -> tuple[str | None, str | None] | type[Exception]:
    """What aiosmtpd's own parser makes of a MAIL/RCPT argument (or the exception it raises)."""
    try:
        address, rest = get_angle_addr(arg)
        return address.addr_spec, rest
    except Exception as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(rf" *<{PLAIN_ADDR_SPEC}>[ \t(]*( [A-Z=0-9 ()\t]*)?", fullmatch=True)
    | st.text(alphabet='<>@a.- ="\\[]()\t', max_size=24).map(lambda t: "<" + t)
)
def test_plain_angle_addr_reads_what_the_stdlib_parser_reads(arg: str) -> None:
    """The fast path for `<local@domain> PARAMS` gives aiosmtpd's answer, or steps aside."""
    plain = plain_angle_addr(arg)
    if plain is not None:
        assert plain == _stdlib_getaddr(arg)


def test_plain_angle_addr_steps_aside_for_anything_unusual() -> None:
    assert plain_angle_addr("<app@contoso.com> SIZE=2048") == ("app@contoso.com", "SIZE=2048")
    assert plain_angle_addr("  <a.b+c@d.e>") == ("a.b+c@d.e", "")
    for arg in (
        "<>",
        "app@contoso.com",
        '<"q r"@d>',
        "<a@[1.2.3.4]>",
        "<a@b> (c)",
        "<a@b>x",
        "<a@b>\tSIZE=1",
        "<zoë@d>",
        "<a..b@d>",
    ):
        assert plain_angle_addr(arg) is None, arg


def test_an_ipv4_mapped_client_is_an_ipv4_client() -> None:
    assert str(client_ip(("::ffff:127.0.0.1", 2525, 0, 0))) == "127.0.0.1"
    assert client_ip(("::ffff:127.0.0.1", 2525, 0, 0)).is_loopback
    assert str(client_ip(("2001:db8::1", 2525, 0, 0))) == "2001:db8::1"


async def test_aiosmtplib_client(serve: Serve) -> None:
    intake = RecordingIntake()
    listener = await serve(intake)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, start_tls=False) as c:
        response = await c.sendmail("app@contoso.com", ["ops@example.org"], MESSAGE)
    assert response[1] == "2.0.0 Ok: queued as Q1"
    assert intake.accepted[0].data == MESSAGE


# -- the intake's answers --------------------------------------------------------------------


async def test_intake_refusals_go_to_the_client_verbatim(serve: Serve) -> None:
    sender_no = Reply(550, "5.7.60", "SendAs denied: no route sends as boss@contoso.com")
    rcpt_no = Reply(550, "5.1.1", "No route for nobody@example.org")
    intake = RecordingIntake(
        senders={"boss@contoso.com": sender_no}, recipients={"nobody@example.org": rcpt_no}
    )
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<boss@contoso.com>") == str(sender_no)
    assert await wire.cmd("MAIL FROM:<app@contoso.com>") == "250 2.1.0 Ok"
    assert await wire.cmd("RCPT TO:<nobody@example.org>") == str(rcpt_no)
    assert await wire.cmd("RCPT TO:<ops@example.org>") == "250 2.1.5 Ok"
    assert await wire.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    await wire.send(MESSAGE + b".\r\n")
    assert await wire.reply() == "250 2.0.0 Ok: queued as Q1"
    assert intake.accepted[0].rcpt_tos == ["ops@example.org"]


async def test_intake_refused_at_data_gives_its_reply(serve: Serve) -> None:
    full = Reply(452, "4.3.1", "Insufficient system storage, try again later")
    listener = await serve(RecordingIntake(fail=IntakeRefused(full)))
    wire, _ = await ehlo(listener.port)
    assert await wire.transaction(MESSAGE + b".\r\n") == str(full)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "250 2.1.0 Ok"  # envelope was reset


async def test_an_intake_crash_is_a_451_with_the_session_in_the_log(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() raises: the client hears a generic 451, the log has the session id and the error."""
    listener = await serve(RecordingIntake(fail=RuntimeError("disk on fire")))
    wire, _ = await ehlo(listener.port)
    with caplog.at_level(logging.ERROR, logger="relay.listener"):
        reply = await wire.transaction(MESSAGE + b".\r\n")
    assert reply == "451 4.3.0 Internal error, try again later"
    [record] = [r for r in caplog.records if r.name == "relay.listener"]
    assert record.getMessage().startswith("session ") and "internal error" in record.getMessage()
    assert record.exc_info is not None and "disk on fire" in str(record.exc_info[1])
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "250 2.1.0 Ok"


async def test_a_crash_in_a_check_is_a_451_without_details(serve: Serve) -> None:
    listener = await serve(BrokenSenderCheck())
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == (
        "451 4.3.0 Internal error, try again later"
    )
    assert await wire.cmd("NOOP") == "250 2.0.0 Ok"


async def test_a_slow_intake_does_not_block_other_sessions(serve: Serve) -> None:
    """Session A's accept() hangs; session B meanwhile connects and completes a transaction."""
    intake = SlowIntake()
    listener = await serve(intake)
    a, _ = await ehlo(listener.port)
    a_reply = asyncio.create_task(a.transaction(MESSAGE + b".\r\n", sender=SLOW))
    await intake.entered.wait()
    b, _ = await ehlo(listener.port)
    assert await b.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q1"
    assert not a_reply.done()
    intake.release.set()
    assert await a_reply == "250 2.0.0 Ok: queued as Q2"
    await b.aclose()


# -- limits ----------------------------------------------------------------------------------


async def test_declared_size_over_the_limit_is_refused_at_mail(serve: Serve) -> None:
    listener = await serve()
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com> SIZE=262145") == (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    )
    assert await wire.cmd("MAIL FROM:<a@contoso.com> SIZE=262144") == "250 2.1.0 Ok"


async def test_data_over_the_limit_is_refused_after_the_dot(serve: Serve) -> None:
    """No SIZE given; the data is over the limit: 552 after the final dot, intake not called."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    body = (b"x" * 998 + b"\r\n") * 300  # 300 KB
    assert await wire.transaction(body + b".\r\n") == (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    )
    assert intake.accepted == []
    assert await wire.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q1"


async def test_a_message_exactly_at_the_limit_is_accepted(serve: Serve) -> None:
    intake = RecordingIntake()
    listener = await serve(intake, limits=Limits(max_message_size=1000))
    wire, _ = await ehlo(listener.port)
    body = b"x" * 998 + b"\r\n"
    assert await wire.transaction(body + b".\r\n") == "250 2.0.0 Ok: queued as Q1"
    assert await wire.transaction(b"y" + body + b".\r\n") == (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    )
    assert [a.data for a in intake.accepted] == [body]


async def test_too_many_recipients(serve: Serve) -> None:
    intake = RecordingIntake()
    listener = await serve(intake)  # max_recipients=3
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "250 2.1.0 Ok"
    for n in range(3):
        assert await wire.cmd(f"RCPT TO:<r{n}@example.org>") == "250 2.1.5 Ok"
    assert await wire.cmd("RCPT TO:<r3@example.org>") == "452 4.5.3 Too many recipients"
    assert await wire.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    await wire.send(MESSAGE + b".\r\n")
    assert await wire.reply() == "250 2.0.0 Ok: queued as Q1"
    assert intake.accepted[0].rcpt_tos == [f"r{n}@example.org" for n in range(3)]


async def test_lines_up_to_64_kib_are_accepted_longer_ones_refused(serve: Serve) -> None:
    """aiosmtpd alone refuses lines over 1001 bytes; legacy apps write long unwrapped lines."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    longest = b"Subject: long\r\n\r\n" + b"a" * 65536 + b"\r\n"
    assert await wire.transaction(longest + b".\r\n") == "250 2.0.0 Ok: queued as Q1"
    stuffed = b"." + b"b" * 65535 + b"\r\n"  # its transparent dot on the wire does not count
    assert await wire.transaction(b"." + stuffed + b".\r\n") == "250 2.0.0 Ok: queued as Q2"
    too_long = b"Subject: long\r\n\r\n" + b"a" * 65537 + b"\r\n"
    assert await wire.transaction(too_long + b".\r\n") == "500 5.5.2 Line too long"
    assert [a.data for a in intake.accepted] == [longest, stuffed]
    assert await wire.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q3"


async def test_a_huge_line_is_refused_without_keeping_it(serve: Serve) -> None:
    """A 300 KB line with no line break at all: still one clear reply after the dot."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    assert await wire.transaction(b"z" * 300_000 + b"\r\n.\r\n") == "500 5.5.2 Line too long"
    assert intake.accepted == []


async def test_a_large_message_arrives_intact(serve: Serve) -> None:
    """5 MB of 76-character lines, some starting with a dot, sent by aiosmtplib."""
    intake = RecordingIntake()
    listener = await serve(intake, limits=Limits(max_message_size=8 * 1024 * 1024))
    lines = [(b"." if n % 1000 == 0 else b"") + b"%075d\r\n" % n for n in range(65_000)]
    message = b"Subject: big\r\n\r\n" + b"".join(lines)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, start_tls=False) as c:
        await c.sendmail("app@contoso.com", ["ops@example.org"], message)
    assert intake.accepted[0].data == message


# -- line endings, the end of data, smuggling ------------------------------------------------


async def test_dot_stuffing_is_undone(serve: Serve) -> None:
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    assert await wire.transaction(b"..leading dot\r\n..\r\n...\r\nend\r\n.\r\n") == (
        "250 2.0.0 Ok: queued as Q1"
    )
    assert await wire.transaction(b".\r\n") == "250 2.0.0 Ok: queued as Q2"  # an empty message
    assert [a.data for a in intake.accepted] == [b".leading dot\r\n.\r\n..\r\nend\r\n", b""]


async def test_bare_lf_lines_are_stored_as_crlf(serve: Serve) -> None:
    """A client that ends lines with LF but the data with CRLF.CRLF: accepted, normalised."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    reply = await wire.transaction(b"Subject: unix\n\nline 1\nline 2\r\n.\r\n")
    assert reply == "250 2.0.0 Ok: queued as Q1"
    assert intake.accepted[0].data == b"Subject: unix\r\n\r\nline 1\r\nline 2\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: unix\n\nhello\n.\n",  # a client that writes bare LFs throughout
        b"Subject: mixed\r\n\r\nhello\r\n.\n",  # CRLF lines, a bare-LF end
        b".\n",  # an empty message, bare LF
    ],
)
async def test_a_bare_lf_end_of_data_gets_a_prompt_error(serve: Serve, data: bytes) -> None:
    """The client waits after `.\\n`; it hears 521 at once and the connection is closed."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    reply = await wire.transaction(data)
    assert reply == "521 5.5.2 Bare <LF> received; lines must end with <CR><LF>"
    assert await wire.closed()
    assert intake.accepted == []


SMUGGLED = b"MAIL FROM:<ceo@contoso.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n"


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n"])
async def test_smuggled_end_of_data_stays_inside_one_message(serve: Serve, fake_end: bytes) -> None:
    """One DATA carries a fake end and a second transaction: the intake gets one message."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    data = b"Subject: one\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\n"
    assert await wire.transaction(data) == "250 2.0.0 Ok: queued as Q1"
    assert await wire.cmd("NOOP") == "250 2.0.0 Ok"  # nothing else was queued up as commands
    [got] = intake.accepted
    assert b"MAIL FROM:<ceo@contoso.com>" in got.data and got.data.endswith(b"forged\r\n")
    assert [s for _, s in intake.senders] == ["a@contoso.com"]


async def test_smuggling_with_a_bare_lf_end_stores_nothing(serve: Serve) -> None:
    """`\\n.\\n` followed by a smuggled transaction: 521, closed, no message, no second MAIL."""
    intake = RecordingIntake()
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    reply = await wire.transaction(b"Subject: one\r\n\r\nbody\n.\n" + SMUGGLED + b".\r\n")
    assert reply == "521 5.5.2 Bare <LF> received; lines must end with <CR><LF>"
    assert await wire.closed()
    assert intake.accepted == []
    assert [s for _, s in intake.senders] == ["a@contoso.com"]


def _stuff(content: bytes) -> bytes:
    """What a client puts on the wire: a dot doubled at the start of every line."""
    out = content.replace(b"\n.", b"\n..")
    return b"." + out if out.startswith(b".") else out


def _normalised(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@given(
    content=st.lists(
        st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x" * 40]), max_size=30
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=4),
)
@settings(max_examples=150, deadline=None)
def test_content_survives_any_chunking(content: bytes, cuts: list[int]) -> None:
    """Any content, dot-stuffed and cut into arbitrary writes, is stored as sent (LF as CRLF)."""
    content = content if content.endswith(b"\r\n") else content + b"\r\n"
    wire = _stuff(content) + b".\r\n"

    async def run() -> bytes:
        intake = RecordingIntake()
        listener = Listener(
            ListenerConfig(host="127.0.0.1", port=0),
            limits=Limits(),
            users={},
            intake=intake,
            hostname=HOSTNAME,
        )
        await listener.start()
        client, _ = await ehlo(listener.port)
        assert await client.cmd("MAIL FROM:<a@contoso.com>") == "250 2.1.0 Ok"
        assert await client.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"
        assert await client.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        start = 0
        for cut in [*sorted(cuts), len(wire)]:
            await client.send(wire[start:cut])
            await asyncio.sleep(0)
            start = max(start, cut)
        assert await client.reply() == "250 2.0.0 Ok: queued as Q1"
        await client.aclose()
        await listener.stop(0)
        return intake.accepted[0].data

    assert asyncio.run(run()) == _normalised(content)


# -- AUTH ------------------------------------------------------------------------------------


async def test_auth_plain_with_smtplib(serve: Serve) -> None:
    """Loopback: smtplib logs in (PLAIN) and sends; the intake learns the user."""
    intake = RecordingIntake()
    listener = await serve(intake)

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", listener.port) as client:
            code, text = client.login("ultimo", PASSWORD)
            client.sendmail("app@contoso.com", ["ops@example.org"], MESSAGE)
            return code, text

    assert await asyncio.to_thread(send) == (235, b"2.7.0 Authentication successful")
    assert intake.accepted[0].client.user == "ultimo"


async def test_auth_login_with_aiosmtplib(serve: Serve) -> None:
    listener = await serve()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, start_tls=False) as c:
        await c.ehlo()
        response = await c.auth_login("ultimo", PASSWORD)
    assert (response.code, response.message) == (235, "2.7.0 Authentication successful")


async def test_auth_login_challenges_are_the_usual_ones(serve: Serve) -> None:
    listener = await serve()
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("AUTH LOGIN") == "334 " + base64.b64encode(b"Username:").decode()
    assert await wire.cmd(base64.b64encode(b"ultimo").decode()) == (
        "334 " + base64.b64encode(b"Password:").decode()
    )
    assert await wire.cmd(base64.b64encode(PASSWORD.encode()).decode()) == (
        "235 2.7.0 Authentication successful"
    )
    assert await wire.cmd(f"AUTH PLAIN {plain()}") == "503 5.5.1 Already authenticated"


async def test_failed_logins_are_logged_without_the_password(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    listener = await serve()
    wire, _ = await ehlo(listener.port)
    with caplog.at_level(logging.INFO, logger="relay.listener"):
        assert await wire.cmd(f"AUTH PLAIN {plain(password='hunter2')}") == (
            "535 5.7.8 Authentication credentials invalid"
        )
        assert await wire.cmd(f"AUTH PLAIN {plain(user='nobody', password='hunter3')}") == (
            "535 5.7.8 Authentication credentials invalid"
        )
    failures = [r.getMessage() for r in caplog.records if "AUTH failed" in r.getMessage()]
    assert len(failures) == 2
    assert "'ultimo' from 127.0.0.1 (1 of 3 in this session, 1 from this address)" in failures[0]
    assert "'nobody' from 127.0.0.1 (2 of 3 in this session, 2 from this address)" in failures[1]
    assert "hunter" not in caplog.text
    assert await wire.cmd(f"AUTH PLAIN {plain()}") == "235 2.7.0 Authentication successful"


async def test_a_client_that_keeps_failing_is_disconnected(serve: Serve) -> None:
    listener = await serve()
    wire, _ = await ehlo(listener.port)
    for _ in range(2):
        assert await wire.cmd(f"AUTH PLAIN {plain(password='guess')}") == (
            "535 5.7.8 Authentication credentials invalid"
        )
    assert await wire.cmd(f"AUTH PLAIN {plain(password='guess')}") == (
        "421 4.7.0 Too many failed authentication attempts"
    )
    assert await wire.closed()


def test_the_delay_after_a_failed_login_grows() -> None:
    assert 0 < auth_delay(1) < auth_delay(2) < auth_delay(3)
    assert auth_delay(1000) == MAX_AUTH_DELAY


async def test_an_address_that_keeps_failing_across_sessions_is_refused_auth(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Reconnecting after each lockout does not reset the count: after ten failures from one
    address within the window, even the right password gets 421 and the session ends."""
    listener = await serve()
    for _ in range(MAX_CLIENT_FAILURES // MAX_AUTH_FAILURES):
        wire, _ = await ehlo(listener.port)
        for _ in range(MAX_AUTH_FAILURES - 1):
            await wire.cmd(f"AUTH PLAIN {plain(password='guess')}")
        assert (await wire.cmd(f"AUTH PLAIN {plain(password='guess')}")).startswith("421 ")
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd(f"AUTH PLAIN {plain(password='guess')}") == (
        "421 4.7.0 Too many failed authentication attempts"
    )  # the tenth failure
    wire, _ = await ehlo(listener.port)
    with caplog.at_level(logging.WARNING, logger="relay.listener"):
        assert await wire.cmd(f"AUTH PLAIN {plain()}") == (
            "421 4.7.0 Too many failed authentication attempts"
        )
    assert await wire.closed()
    assert "AUTH refused for 127.0.0.1: 10 failed logins in 15 minutes" in caplog.text


def test_failed_logins_age_out_and_a_success_clears_them() -> None:
    now = [0.0]
    ledger = FailedLogins(clock=lambda: now[0])
    for _ in range(MAX_CLIENT_FAILURES):
        ledger.failed("192.0.2.7")
    assert ledger.blocked("192.0.2.7") and not ledger.blocked("192.0.2.8")
    assert repr(ledger) == "<FailedLogins clients=1 blocked=1>"
    now[0] = CLIENT_FAILURE_WINDOW + 1
    assert ledger.count("192.0.2.7") == 0 and not ledger.blocked("192.0.2.7")
    ledger.failed("192.0.2.7")
    ledger.succeeded("192.0.2.7")
    assert ledger.count("192.0.2.7") == 0


async def test_auth_grammar_errors(serve: Serve) -> None:
    listener = await serve()
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"
    assert await wire.cmd("AUTH PLAIN !!!") == "501 5.5.2 Can't decode base64"
    assert await wire.cmd("AUTH PLAIN " + base64.b64encode(b"no-nuls").decode()) == (
        "501 5.5.2 Can't split auth value"
    )
    assert await wire.cmd("AUTH PLAIN") == "334 "
    assert await wire.cmd("*") == "501 5.7.0 Auth aborted"
    assert await wire.cmd("AUTH") == "501 5.5.4 Not enough value"
    assert await wire.cmd("NOOP") == "250 2.0.0 Ok"  # none of these counted as a failure


async def test_auth_required_applies_to_clients_inside_networks(serve: Serve) -> None:
    intake = RecordingIntake()
    listener = await serve(intake, auth_required=True)
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "530 5.7.0 Authentication required"
    assert await wire.cmd(f"AUTH PLAIN {plain()}") == "235 2.7.0 Authentication successful"
    assert await wire.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q1"
    assert intake.accepted[0].client.user == "ultimo"


async def test_auth_required_without_users_is_a_clear_refusal(serve: Serve) -> None:
    listener = await serve(auth_required=True, users={})
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == (
        "550 5.7.1 Authentication required, but not possible here: there are no users"
    )


async def test_outside_networks_on_loopback_must_log_in(serve: Serve) -> None:
    """Networks exclude loopback, but AUTH is offered there: 530 until the client logs in."""
    listener = await serve(networks=("10.0.0.0/8",))
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "530 5.7.0 Authentication required"
    assert await wire.cmd(f"AUTH PLAIN {plain()}") == "235 2.7.0 Authentication successful"
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "250 2.1.0 Ok"


async def test_outside_networks_without_users_is_relaying_denied(serve: Serve) -> None:
    listener = await serve(networks=("10.0.0.0/8",), users={})
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == (
        "550 5.7.1 Relaying denied: 127.0.0.1 is not in the listener's networks"
    )


async def test_a_remote_client_without_tls_cannot_auth(serve: Serve, outside_ip: str) -> None:
    """Not loopback, no TLS: AUTH is not offered, refused if tried, and MAIL is denied."""
    listener = await serve(host=outside_ip)
    wire, reply = await ehlo(listener.port, outside_ip)
    assert "AUTH" not in reply
    assert await wire.cmd(f"AUTH PLAIN {plain()}") == (
        "538 5.7.11 Encryption required for requested authentication mechanism"
    )
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == (
        f"550 5.7.1 Relaying denied: {outside_ip} is not in the listener's networks"
    )


async def test_a_remote_client_logs_in_after_starttls(
    serve: Serve, outside_ip: str, pki: EmulatorPKI, tmp_path: Path
) -> None:
    intake = RecordingIntake()
    tls = tls_config(pki, tmp_path, TlsMode.STARTTLS, outside_ip)
    listener = await serve(intake, host=outside_ip, tls=tls)
    wire, reply = await ehlo(listener.port, outside_ip)
    assert reply.splitlines()[-2:] == ["250-ENHANCEDSTATUSCODES", "250 STARTTLS"]
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == (
        "530 5.7.0 Must issue a STARTTLS command first"
    )

    def send() -> None:
        with smtplib.SMTP(outside_ip, listener.port) as client:
            client.starttls(context=pki.client_context())
            client.ehlo()
            assert "starttls" not in client.esmtp_features
            assert client.esmtp_features["auth"] == " PLAIN LOGIN"
            client.login("ultimo", PASSWORD)
            client.sendmail("app@contoso.com", ["ops@example.org"], MESSAGE)

    await asyncio.to_thread(send)
    client = intake.accepted[0].client
    assert (client.address, client.user, client.tls) == (outside_ip, "ultimo", True)


# -- TLS -------------------------------------------------------------------------------------


async def test_starttls_with_aiosmtplib(serve: Serve, pki: EmulatorPKI, tmp_path: Path) -> None:
    intake = RecordingIntake()
    listener = await serve(intake, tls=tls_config(pki, tmp_path, TlsMode.STARTTLS))
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=listener.port, start_tls=True, tls_context=pki.client_context()
    ) as c:
        await c.ehlo()  # aiosmtplib does not say EHLO again after STARTTLS by itself
        await c.auth_plain("ultimo", PASSWORD)
        await c.sendmail("app@contoso.com", ["ops@example.org"], MESSAGE)
    assert intake.accepted[0].client.tls


async def test_implicit_tls(serve: Serve, pki: EmulatorPKI, tmp_path: Path) -> None:
    """SMTPS: TLS from the first byte, at least TLS 1.2, no STARTTLS offered."""
    intake = RecordingIntake()
    listener = await serve(intake, tls=tls_config(pki, tmp_path, TlsMode.IMPLICIT))
    wire, greeting = await Wire.open(listener.port, tls=pki.client_context())
    assert greeting == f"220 {HOSTNAME} ESMTP relay"
    version = wire.writer.get_extra_info("ssl_object").version()
    assert version in ("TLSv1.2", "TLSv1.3")
    reply = await wire.cmd("EHLO app.example")
    assert "STARTTLS" not in reply and "250 AUTH PLAIN LOGIN" in reply
    assert await wire.transaction(MESSAGE + b".\r\n") == "250 2.0.0 Ok: queued as Q1"
    assert intake.accepted[0].client.tls


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_below_1_2_is_refused(serve: Serve, pki: EmulatorPKI, tmp_path: Path) -> None:
    listener = await serve(tls=tls_config(pki, tmp_path, TlsMode.IMPLICIT))
    old = pki.client_context()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await Wire.open(listener.port, tls=old)


async def test_a_failed_starttls_handshake_ends_only_that_session(
    serve: Serve, pki: EmulatorPKI, tmp_path: Path
) -> None:
    listener = await serve(tls=tls_config(pki, tmp_path, TlsMode.STARTTLS))
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    await wire.send(b"this is not a TLS client hello\r\n" * 4)
    await wire.rest()  # perhaps a TLS alert, then the close
    other, _ = await ehlo(listener.port)
    assert await other.cmd("NOOP") == "250 2.0.0 Ok"


async def test_unreadable_tls_files_are_a_config_error(serve: Serve, tmp_path: Path) -> None:
    tls = TlsConfig(
        mode=TlsMode.STARTTLS, cert_file=tmp_path / "none.pem", key_file=tmp_path / "none.key"
    )
    listener = Listener(
        ListenerConfig(host="127.0.0.1", port=0, tls=tls),
        limits=Limits(),
        users={},
        intake=RecordingIntake(),
    )
    with pytest.raises(ConfigError, match=r"listener 127\.0\.0\.1:0: cannot load tls\.cert_file"):
        await listener.start()
    assert listener.state is ListenerState.STOPPED


# -- lifecycle -------------------------------------------------------------------------------


async def test_repr_and_a_second_start(serve: Serve) -> None:
    listener = await serve()
    assert repr(listener) == f"<Listener 127.0.0.1:{listener.port} serving sessions=0 in_data=0>"
    await ehlo(listener.port)
    assert repr(listener).endswith("serving sessions=1 in_data=0>")
    with pytest.raises(RuntimeError, match="is serving; a listener starts once"):
        await listener.start()
    await listener.stop(1)
    assert repr(listener) == f"<Listener 127.0.0.1:{listener.port} stopped sessions=0 in_data=0>"
    with pytest.raises(RuntimeError, match="is stopped; a listener starts once"):
        await listener.start()


async def test_stop_says_421_to_idle_sessions(serve: Serve) -> None:
    listener = await serve()
    wire, _ = await ehlo(listener.port)
    assert await wire.cmd("MAIL FROM:<a@contoso.com>") == "250 2.1.0 Ok"
    await listener.stop(5)
    assert await wire.reply() == "421 4.3.2 Service shutting down"
    assert await wire.closed()
    with pytest.raises(ConnectionRefusedError):
        await Wire.open(listener.port)


async def test_stop_lets_a_session_in_data_finish(serve: Serve) -> None:
    """A session in DATA (slow intake) gets its 250, then 421; meanwhile new clients hear 421."""
    intake = SlowIntake()
    listener = await serve(intake)
    busy, _ = await ehlo(listener.port)
    idle, _ = await ehlo(listener.port)
    reply = asyncio.create_task(busy.transaction(MESSAGE + b".\r\n", sender=SLOW))
    await intake.entered.wait()
    stopping = asyncio.create_task(listener.stop(30))
    assert await idle.reply() == "421 4.3.2 Service shutting down"
    assert await idle.closed()
    late, greeting = await Wire.open(listener.port)
    assert greeting == "421 4.3.2 Service shutting down"
    assert await late.closed()
    assert repr(listener).endswith("stopping sessions=1 in_data=1>")
    intake.release.set()
    assert await reply == "250 2.0.0 Ok: queued as Q1"
    assert await busy.reply() == "421 4.3.2 Service shutting down"
    assert await busy.closed()
    await stopping
    assert listener.state is ListenerState.STOPPED
    assert len(intake.accepted) == 1


async def test_stop_cuts_off_what_outlasts_the_grace_period(serve: Serve) -> None:
    intake = SlowIntake()  # never released
    listener = await serve(intake)
    wire, _ = await ehlo(listener.port)
    reply = asyncio.create_task(wire.transaction(MESSAGE + b".\r\n", sender=SLOW))
    await intake.entered.wait()
    await listener.stop(0.1)
    assert listener.state is ListenerState.STOPPED and listener.sessions == 0
    with pytest.raises(ConnectionError):
        await reply
    assert intake.accepted == []


async def test_a_connection_racing_the_stop_ends_with_421(serve: Serve) -> None:
    """Connected as stop() begins: greeted or not yet, the last thing it hears is the 421."""
    listener = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    wire = Wire(reader, writer)
    await listener.stop(1)
    assert (await wire.rest()).endswith(b"421 4.3.2 Service shutting down\r\n")


# -- policy functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "offer"),
    [
        ({"has_users": False, "tls": True, "starttls": False, "loopback": True}, "NO_USERS"),
        ({"has_users": True, "tls": True, "starttls": False, "loopback": False}, "OFFERED"),
        ({"has_users": True, "tls": False, "starttls": False, "loopback": True}, "OFFERED"),
        ({"has_users": True, "tls": False, "starttls": True, "loopback": False}, "AFTER_STARTTLS"),
        ({"has_users": True, "tls": False, "starttls": False, "loopback": False}, "NEEDS_TLS"),
    ],
)
def test_auth_offer(kw: dict[str, bool], offer: str) -> None:
    assert auth_offer(**kw) is AuthOffer[offer]


def test_mail_policy_for_a_trusted_client_inside_networks_needs_no_login() -> None:
    ip = ipaddress.ip_address("10.1.2.3")
    for offer in AuthOffer:
        assert (
            mail_policy(ip, trusted=True, authenticated=False, auth_required=False, offer=offer)
            is None
        )
    refusal = mail_policy(
        ip, trusted=True, authenticated=False, auth_required=True, offer=AuthOffer.NEEDS_TLS
    )
    assert str(refusal) == (
        "550 5.7.1 Authentication required, but not possible here: AUTH needs TLS or loopback"
    )


# -- message content, without sockets --------------------------------------------------------


def test_content_counts_lines_across_pieces() -> None:
    """A line split over many pieces is measured whole; a CR split from its LF is one ending."""
    content = _Content(max_size=10_000, max_line=10)
    for piece in [b"12345", b"67890\r", b"\n", b"abc\r", b"\nlast\r\n"]:
        content.feed(piece)
    assert content.error is None
    content.feed(b"12345678901\r\n")
    assert content.error == Reply(500, "5.5.2", "Line too long")


def test_content_keeps_a_bare_cr() -> None:
    content = _Content(max_size=100, max_line=100)
    content.feed(b"a\rb\r\n")
    assert asyncio.run(content.message()) == b"a\rb\r\n"
