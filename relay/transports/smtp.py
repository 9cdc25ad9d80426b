"""SMTP submission to Exchange Online: STARTTLS, SASL XOAUTH2, connection reuse.

Takes an `OutgoingMessage` (envelope + bytes) and gives back `Delivered` (which recipients the
upstream took, which it refused and with what reply) or raises a `DeliveryError`:

  * `TemporaryFailure` for 4xx, dropped connections (`UpstreamUnavailable`), timeouts
    (`UpstreamTimeout`), TLS failures, and the token being unobtainable (`TokenUnavailable`);
  * `TokenRejected` when Exchange refuses the token or SMTP AUTH for the mailbox (after one retry
    with a fresh token on `535 5.7.3`): a configuration problem, so the mail waits;
  * `PermanentFailure` for 5xx answers about the message.

Connections are pooled per transport (one transport per route and mailbox): at most
`connections` at once (Exchange allows 3 per mailbox), reused for several messages, dropped after
`MAX_CONNECTION_AGE` so a refreshed token gets a new session. aiosmtplib's exceptions are mapped
by `map_smtp_error` and by nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from relay.errors import (
    DeliveryError,
    PermanentFailure,
    TemporaryFailure,
    TokenRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from relay.identity import EXCHANGE_SCOPE, TokenProvider
from relay.reply import Reply
from relay.transports import Delivered, OutgoingMessage

log = logging.getLogger("relay.transports.smtp")

TIMEOUT = 60.0  # seconds for one SMTP command, DATA included (RFC 5321 §4.5.3.2 suggests more)
MAX_CONNECTION_AGE = 300.0  # seconds; tokens live ~60 min, MSAL refreshes with 5 min left
IDLE_TIMEOUT = 30.0  # seconds an unused connection is kept


def reply_of(exc: aiosmtplib.SMTPResponseException) -> Reply:
    return Reply.parse(exc.code, exc.message)


def map_smtp_error(exc: BaseException) -> DeliveryError:
    """The one mapping from what aiosmtplib (and the socket under it) raises to our tree."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return TokenRejected(reply_of(exc))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = reply_of(exc)
        if reply.is_permanent:
            return PermanentFailure(reply)
        return (UpstreamUnavailable if exc.code == 421 else TemporaryFailure)(reply)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # Every recipient refused, each with a transient reply (see _transact): quote the first.
        first = exc.recipients[0] if exc.recipients else None
        return TemporaryFailure(
            reply_of(first) if first else Reply(451, "4.0.0", "all recipients refused for now")
        )
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return PermanentFailure(Reply(554, "5.6.7", f"upstream cannot take it: {exc}"))
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(Reply(451, "4.4.2", f"upstream timed out: {exc}"))
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return UpstreamUnavailable(Reply(451, "4.7.5", f"TLS with upstream failed: {exc}"))
    if isinstance(exc, ConnectionError | OSError):
        return UpstreamUnavailable(Reply(451, "4.4.1", f"upstream unreachable: {exc}"))
    if isinstance(exc, aiosmtplib.SMTPException):
        return TemporaryFailure(Reply(451, "4.3.0", f"upstream SMTP error: {exc}"))
    if isinstance(exc, ValueError):
        # aiosmtplib refuses addresses that cannot be sent safely (CR/LF, non-ASCII w/o UTF8).
        return PermanentFailure(Reply(553, "5.1.3", f"address cannot be sent: {exc}"))
    raise exc


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    opened: float
    last_used: float
    messages: int = 0

    def fresh(self, now: float) -> bool:
        return (
            self.client.is_connected
            and now - self.opened < MAX_CONNECTION_AGE
            and now - self.last_used < IDLE_TIMEOUT
        )


class SmtpTransport:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        mailbox: str,
        tokens: TokenProvider,
        tls_context: ssl.SSLContext,
        connections: int = 3,
        local_hostname: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.mailbox = mailbox
        self._tokens = tokens
        self._tls = tls_context
        self._slots = asyncio.Semaphore(connections)
        self._limit = connections
        self._idle: list[_Connection] = []
        self._local_hostname = local_hostname
        self._timeout = timeout
        self._closed = False
        self.logins = 0  # successful AUTHs, for tests and metrics

    def __repr__(self) -> str:
        busy = self._limit - self._slots._value
        return (
            f"<SmtpTransport {self.mailbox} via {self.host}:{self.port} "
            f"busy={busy}/{self._limit} idle={len(self._idle)}>"
        )

    async def send(self, message: OutgoingMessage) -> Delivered:
        if self._closed:
            raise RuntimeError("SmtpTransport is closed")
        async with self._slots:
            conn = self._take_idle()
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self._connect()
                try:
                    delivered = await self._transact(conn, message)
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # An idle connection the server had already dropped: one fresh try.
                    await _quietly_close(conn)
                    conn = await self._connect()
                    delivered = await self._transact(conn, message)
            except BaseException as exc:
                if conn is not None:
                    await _quietly_close(conn)
                if isinstance(exc, Exception):
                    raise map_smtp_error(exc) from None
                raise
            conn.last_used = time.monotonic()
            conn.messages += 1
            self._idle.append(conn)
            return delivered

    async def check_login(self) -> None:
        """Connect, STARTTLS and AUTH as the mailbox, then QUIT, sending nothing (`relay
        doctor`). Raises what `send` raises for the same trouble."""
        async with self._slots:
            try:
                conn = await self._connect()
            except Exception as exc:
                raise map_smtp_error(exc) from None
            await _quietly_close(conn)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.fresh(now):
                return conn
            conn.client.close()  # stale: the server has likely forgotten it already
        return None

    async def _connect(self) -> _Connection:
        """Connect, STARTTLS, AUTH XOAUTH2; on 535 5.7.3 retry once with a fresh token."""
        for attempt in (1, 2):
            client = aiosmtplib.SMTP(
                hostname=self.host,
                port=self.port,
                start_tls=True,
                tls_context=self._tls,
                local_hostname=self._local_hostname,
                timeout=self._timeout,
            )
            await client.connect()
            try:
                token = await self._tokens.token(EXCHANGE_SCOPE)
                await client.auth_xoauth2(self.mailbox, token)
            except aiosmtplib.SMTPAuthenticationError as exc:
                await _quietly_close(_Connection(client, 0, 0))
                reply = reply_of(exc)
                if attempt == 1 and reply.code == 535 and reply.status == "5.7.3":
                    log.warning(
                        "mailbox %s: token refused (%s); retrying once with a fresh token",
                        self.mailbox,
                        reply.one_line(),
                    )
                    self._tokens.invalidate(EXCHANGE_SCOPE)
                    continue
                raise
            except BaseException:
                await _quietly_close(_Connection(client, 0, 0))
                raise
            self.logins += 1
            now = time.monotonic()
            return _Connection(client, now, now)
        raise AssertionError("unreachable")

    async def _transact(self, conn: _Connection, message: OutgoingMessage) -> Delivered:
        options = []
        if message.smtputf8:
            options.append("SMTPUTF8")
        if any(b > 127 for b in message.data) and conn.client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        try:
            errors, text = await conn.client.sendmail(
                message.mail_from, list(message.rcpt_tos), message.data, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = {r.recipient: reply_of(r) for r in exc.recipients}
            if all(reply.is_transient for reply in refused.values()):
                raise
            return Delivered(reply=next(iter(refused.values())), accepted=(), refused=refused)
        refused = {rcpt: Reply.parse(resp.code, resp.message) for rcpt, resp in errors.items()}
        accepted = tuple(r for r in message.rcpt_tos if r not in refused)
        return Delivered(reply=Reply.parse(250, text), accepted=accepted, refused=refused)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quietly_close(c) for c in idle))


async def _quietly_close(conn: _Connection) -> None:
    """QUIT politely if the connection is usable; never raise (used on cleanup paths)."""
    try:
        if conn.client.is_connected:
            await asyncio.wait_for(conn.client.quit(), timeout=5)
    except Exception:  # best-effort cleanup; the connection is discarded anyway
        conn.client.close()
