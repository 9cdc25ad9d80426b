"""The SMTP listener: where applications hand their mail to the relay.

Takes SMTP from clients (aiosmtpd, served from our own event loop with `loop.create_server`) and
enforces the listener's own policy: networks, AUTH against the local `users`, TLS, and the size,
recipient and line limits. It asks the `Intake` about the sender at MAIL and about each recipient
at RCPT, and after DATA hands it the message; the intake routes and spools it, and only then does
the client hear `250 2.0.0 Ok: queued as ID`. The listener never talks to Exchange and never
touches the spool.

Failures: every reply carries an RFC 3463 status (aiosmtpd's own replies get one on the way out,
see `_with_status`). An unexpected exception in a session answers `451 4.3.0 Internal error, try
again later` and is logged with the session id, never echoed to the client. `start()` raises
ConfigError when the TLS certificate or key cannot be loaded, OSError when it cannot bind.

Decisions a reader should know:

* End of data is `<CR><LF>.<CR><LF>` and nothing else (RFC 5321 4.1.1.4; the SMTP smuggling
  fix). A dot line ended by a bare LF (`\\n.\\n`, `\\r\\n.\\n`) is how a client that writes bare
  LFs ends its message; rather than leave it waiting for a terminator that will never come, we
  answer at once `521 5.5.2 ...` and close the connection, so none of its bytes are read as
  commands. Any other odd dot line (`\\n.\\r\\n`, `\\r.\\r\\n`) is content: one client
  transaction stays one message. Bare LFs inside content are stored as CRLF, so the stored
  message has one kind of line ending (the transports dot-stuff it on the way out).
* DATA is read in large blocks (`StreamReader.readuntil(b"\\n.")`, which searches in C and
  consumes everything up to the next line that starts with a dot), not line by line as aiosmtpd
  does: a 35 MB message then costs a few hundred reads instead of ~450,000, and small messages
  from other clients are not held up (aio-libs/aiosmtpd#293; figures in bench/listener_large.py).
  Size and line length are enforced as the blocks arrive; over a limit we keep reading to the
  end of data and answer then, and nothing is kept in memory.
* AUTH PLAIN and LOGIN are offered over TLS or on a loopback connection, and only when there are
  users. The password check (scrypt, ~40 ms) runs in a thread, so it is done in our auth_PLAIN /
  auth_LOGIN rather than through aiosmtpd's synchronous `authenticator=`. A failed login waits
  AUTH_FAILURE_DELAY times the failure count (the session's, or the client address's over the
  last 15 minutes, whichever is larger; at most 30 s) before its 535; the third failure in a
  session ends it with 421 4.7.0, and an address with ten recent failures is refused AUTH
  outright until they age out. Unknown users cost the same hash check as known ones.
* stop(grace): the listening socket stays open while sessions drain and answers new connections
  `421 4.3.2 Service shutting down` (a clear answer beats a refused connection); idle sessions get
  the same 421 at once; a session in DATA finishes its transaction, hears its reply, then the
  421. Whatever is left when the grace period ends is cut off.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, NoReturn

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from relay.config import Limits, ListenerConfig, TlsMode, UserConfig
from relay.errors import ConfigError, IntakeRefused
from relay.intake import Client, Intake
from relay.passwords import hash_password, verify_password
from relay.reply import Reply
from relay.routing import PLAIN_ADDR_SPEC

log = logging.getLogger("relay.listener")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_LOCKOUT = Reply(421, "4.7.0", "Too many failed authentication attempts")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available: this relay has no users")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LF = Reply(521, "5.5.2", "Bare <LF> received; lines must end with <CR><LF>")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")

MAX_AUTH_FAILURES = 3  # per session; the last one ends it
AUTH_FAILURE_DELAY = 1.0  # seconds, times the failure count (the session's or the client's)
MAX_CLIENT_FAILURES = 10  # per client address within CLIENT_FAILURE_WINDOW: then AUTH is refused
CLIENT_FAILURE_WINDOW = 900.0  # seconds a failed login counts against its client address
MAX_AUTH_DELAY = 30.0  # seconds; the delay stops growing here
IDLE_TIMEOUT = 300.0  # seconds without a command before a session is closed (RFC 5321 4.5.3.2)
PASSWORD_CHECKS = 2  # concurrent hash checks per listener, so a login flood cannot fill the pool
YIELD_EVERY_DOTS = 64  # lines that start with a dot cost a few reads each; let others run
JOIN_IN_THREAD = 1024 * 1024  # joining a 35 MB message takes ~17 ms: not in the event loop


_ANGLE_ADDR = re.compile(rf" *<({PLAIN_ADDR_SPEC})>(?: +|$)(?![ \t(])")  # then the parameters


class ListenerState(Enum):
    NEW = "new"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class AuthOffer(Enum):
    """Whether this connection may AUTH now, and if not, why."""

    OFFERED = "offered"
    AFTER_STARTTLS = "after STARTTLS"
    NEEDS_TLS = "needs TLS"  # neither TLS nor loopback, and no STARTTLS on this listener
    NO_USERS = "no users"


# -- policy as plain functions ---------------------------------------------------------------


def client_ip(peer: Any) -> IPAddress:
    """The client's address from a peername tuple; IPv4-mapped IPv6 counts as IPv4."""
    ip = ipaddress.ip_address(peer[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def auth_offer(*, has_users: bool, tls: bool, starttls: bool, loopback: bool) -> AuthOffer:
    if not has_users:
        return AuthOffer.NO_USERS
    if tls or loopback:
        return AuthOffer.OFFERED
    return AuthOffer.AFTER_STARTTLS if starttls else AuthOffer.NEEDS_TLS


def mail_policy(
    ip: IPAddress, *, trusted: bool, authenticated: bool, auth_required: bool, offer: AuthOffer
) -> Reply | None:
    """At MAIL: None when this client may send, else the refusal.

    `trusted` means the client is inside the listener's networks.
    """
    if authenticated or (trusted and not auth_required):
        return None
    if offer is AuthOffer.OFFERED:
        return AUTH_REQUIRED
    if offer is AuthOffer.AFTER_STARTTLS:
        return STARTTLS_FIRST
    if not trusted:
        return Reply(550, "5.7.1", f"Relaying denied: {ip} is not in the listener's networks")
    why = "there are no users" if offer is AuthOffer.NO_USERS else "AUTH needs TLS or loopback"
    return Reply(550, "5.7.1", f"Authentication required, but not possible here: {why}")


_DOMAIN = re.compile(r'[^\s@<>()\[\]\\,;:"]+|\[[^\s\[\]\\]+\]')


def address_refusal(address: str, *, smtputf8: bool, recipient: bool) -> Reply | None:
    """A mailbox is local@domain (a recipient may be a bare `postmaster`, RFC 5321 4.5.1); a
    non-ASCII one needs SMTPUTF8 (RFC 6531) and valid UTF-8."""
    status = "5.1.3" if recipient else "5.1.7"  # bad destination / sender address syntax
    if not address.isascii():
        if not smtputf8:
            return Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        try:
            address.encode("utf-8")  # aiosmtpd decodes with surrogateescape: bad bytes stay lone
        except UnicodeEncodeError:
            return Reply(553, status, "Malformed address: not valid UTF-8")
    local, _, domain = address.rpartition("@")
    if (local and _DOMAIN.fullmatch(domain)) or (recipient and address.lower() == "postmaster"):
        return None
    return Reply(553, status, f"Malformed address: <{address}>")


def plain_angle_addr(arg: str) -> tuple[str, str] | None:
    """`<local@domain> PARAMS` as (address, params) when both parts are plain ASCII (a
    dot-atom address, no comments): what the stdlib's parser would give, at a tenth of its
    cost. None for anything else, which aiosmtpd's parser then reads."""
    plain = _ANGLE_ADDR.match(arg)
    return (plain[1], arg[plain.end() :]) if plain else None


def auth_delay(failures: int, base: float = AUTH_FAILURE_DELAY) -> float:
    """Seconds to wait before answering a failed login: grows with each failure."""
    return min(base * failures, MAX_AUTH_DELAY)


class FailedLogins:
    """Failed logins per client address over a sliding window, across sessions: a client that
    reconnects after each lockout still slows down, and after MAX_CLIENT_FAILURES it is refused
    AUTH until its failures age out. A successful login clears its address."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._times: dict[str, collections.deque[float]] = {}

    def __repr__(self) -> str:
        blocked = sum(map(self.blocked, list(self._times)))
        return f"<FailedLogins clients={len(self._times)} blocked={blocked}>"

    def count(self, client: str) -> int:
        times = self._times.get(client)
        if times is None:
            return 0
        horizon = self._clock() - CLIENT_FAILURE_WINDOW
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._times[client]
            return 0
        return len(times)

    def blocked(self, client: str) -> bool:
        return self.count(client) >= MAX_CLIENT_FAILURES

    def failed(self, client: str) -> int:
        """Record a failure; return the client's failures within the window."""
        self._times.setdefault(client, collections.deque()).append(self._clock())
        return self.count(client)

    def succeeded(self, client: str) -> None:
        self._times.pop(client, None)


# aiosmtpd's own replies, given an RFC 3463 status on the way out. Exact texts first; other
# 4xx/5xx replies without a status get the usual one for their code. 2xx/3xx lines not listed
# (the greeting, EHLO lines, 354, 334 challenges) carry none by RFC 2034.
_AIOSMTPD_REPLIES = {
    "250 OK": "250 2.0.0 Ok",
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
    ),
    "552 Error: message size exceeds fixed maximum message size": str(MESSAGE_TOO_BIG),
}
_STATUS_FOR_CODE = {
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "554": "5.7.0",
    "555": "5.5.4",
}


def _with_status(line: str) -> str:
    if line in _AIOSMTPD_REPLIES:
        return _AIOSMTPD_REPLIES[line]
    code, sep, text = line[:3], line[3:4], line[4:]
    status = _STATUS_FOR_CODE.get(code)
    if status is None or sep != " " or Reply.parse(int(code), text).status:
        return line
    return f"{code} {status} {text}"


# -- message content -------------------------------------------------------------------------


class _End(Enum):
    DATA = "<CR><LF>.<CR><LF>"
    BARE_LF = "a dot line ended by a bare <LF>"


class _At(Enum):
    """Where the DATA reader is in the client's bytes."""

    LINE_START = "line start"
    DOT = "after a dot at a line start"
    TEXT = "inside a line"


class _Content:
    """Message content as it arrives after 354, with the transparent dots already removed.

    Pure: no I/O. Stores lines with CRLF endings, counts the size, checks line lengths (the text
    of a line, without its ending and its transparent dot), and keeps nothing once a limit is
    broken (`error` says which, the first one wins).
    """

    def __init__(self, *, max_size: int, max_line: int) -> None:
        self._max_size = max_size
        self._max_line = max_line
        self._parts: list[bytes] = []
        self._size = 0
        self._line = 0  # length of the current, unfinished line
        self._held_cr = False  # a CR ended the last piece; its LF may be next
        self._tail = b"\r\n"  # the last two bytes fed: DATA begins at the start of a line
        self.error: Reply | None = None

    @property
    def after_crlf(self) -> bool:
        """The previous line ended with CRLF (true at the start of the data)."""
        return self._tail == b"\r\n"

    def feed(self, data: bytes) -> None:
        if self._held_cr:
            data = b"\r" + data
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        if not data:
            return
        self._tail = (self._tail + data)[-2:]
        *complete, partial = lines = data.split(b"\n")
        if self._line + max(map(len, lines)) > self._max_line:  # a cheap bound, then exactly
            lengths = [len(line) - line.endswith(b"\r") for line in complete] + [len(partial)]
            lengths[0] += self._line
            if max(lengths) > self._max_line:
                self._fail(LINE_TOO_LONG)
        self._line = len(partial) + (self._line if not complete else 0)
        if data.count(b"\r\n") != len(complete):  # bare LFs: store them as CRLF
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._size += len(data)
        if self._size > self._max_size:
            self._fail(MESSAGE_TOO_BIG)
        if self.error is None:
            self._parts.append(data)

    async def message(self) -> bytes:
        if self._size < JOIN_IN_THREAD:
            return b"".join(self._parts)
        return await asyncio.to_thread(b"".join, self._parts)  # the copy releases the GIL

    def _fail(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply
            self._parts.clear()


# -- the SMTP grammar: a small aiosmtpd subclass ---------------------------------------------


class _Session(Session):
    # aiosmtpd's login_data property logs a deprecation warning each time smtp_AUTH sets it,
    # that is on every successful login; a plain attribute keeps the log clean.
    login_data: Any = None


@functools.cache
def _names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of `cls` that aiosmtpd looks for: those with one of `prefixes`."""
    return [name for name in dir(cls) if name.startswith(prefixes)]


class _SMTP(SMTP):
    """aiosmtpd's SMTP with streaming DATA, async password checks, replies with statuses,
    and the session bookkeeping the listener needs for stop(grace)."""

    AuthLoginUsernameChallenge = "Username:"  # what Postfix and Exchange send; some clients look
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, handler: _Policy, *, listener: Listener, **kwargs: Any) -> None:
        # aiosmtpd keeps these per class and clears them on every new connection; per session
        # they stay right when sessions overlap.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        self.event_handler: _Policy = handler
        self._listener = listener
        self.session_id = secrets.token_hex(5)
        self.client: IPAddress  # set once connected
        self.failed_logins = 0
        self.in_data = False
        self._deadline = 0.0  # loop time at which an idle session is closed

    def __dir__(self) -> list[str]:
        # SMTP.__init__ runs inspect.getmembers(self) and dir(self) on every connection to find
        # the auth_* and smtp_* methods, about half of its cost; those names are fixed per class.
        return _names(type(self), ("auth_", "smtp_"))

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates its idle timer for every command (a heap entry and a
        # cancelled one each time). One timer that re-arms itself when it finds activity since
        # costs a float per command; it is re-made only when the new deadline is earlier.
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline:  # active since the timer was set
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
        else:
            super()._timeout_cb()

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The usual `<local@domain> PARAMS` without the stdlib's header parser (and without the
        # class aiosmtpd defines on every call); anything else goes the long way.
        plain = plain_angle_addr(arg)
        if plain and not self.local_part_limit:
            return plain
        try:
            return super()._getaddr(arg)
        except AttributeError:  # the stdlib parser trips over some broken domain literals
            return None, None

    # -- connection facts the policy asks for

    @property
    def tls(self) -> bool:
        return (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None
        )

    @property
    def starttls_available(self) -> bool:
        return self.tls_context is not None and not self.tls

    # -- lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again with the TLS transport
        super().connection_made(transport)
        if first:
            self.client = client_ip(transport.get_extra_info("peername"))
            assert self._handler_coroutine is not None
            self._listener._session_started(self, self._handler_coroutine)
            if self._listener.state is not ListenerState.SERVING:
                self.shut_down()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._listener._session_ended(self)

    def shut_down(self) -> None:
        """Listener stopping: an idle session hears 421 now; one in DATA after its reply."""
        if not self.in_data and self.transport is not None:
            self._writer.write(f"{SHUTTING_DOWN}\r\n".encode())
            self.transport.close()
            assert self._handler_coroutine is not None
            self._handler_coroutine.cancel()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def hang_up(self, reply: Reply) -> NoReturn:
        """Say `reply`, close, and end the session's task from inside.

        Raising, rather than Task.cancel(): a cancel lands only at the next suspension, and
        pipelined bytes already buffered (a smuggled MAIL FROM) would be read as commands first.
        """
        await self.push(str(reply))
        assert self.transport is not None
        self.transport.close()
        raise asyncio.CancelledError

    # -- replies

    async def push(self, status: str | bytes) -> None:
        await super().push(_with_status(status) if isinstance(status, str) else status)

    async def handle_exception(self, error: Exception) -> str:
        # Overrides SMTP.handle_exception rather than being a handler hook: aiosmtpd passes the
        # handler's hook the error only, and the log line needs the session.
        if isinstance(error, TLSSetupException):
            log.info(
                "session %s: TLS handshake with %s failed: %s",
                self.session_id,
                self.client,
                error.__cause__,
            )
        else:
            log.error("session %s: internal error", self.session_id, exc_info=error)
        return str(INTERNAL_ERROR)

    # -- AUTH: aiosmtpd parses PLAIN and LOGIN, we check the password in a thread

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # aiosmtpd's PLAIN and LOGIN grammar ends in this synchronous call; pass the credentials
        # on to auth_PLAIN / auth_LOGIN below, which can await the check.
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._check_login(await super().auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._check_login(await super().auth_LOGIN(server, args))

    async def _check_login(self, parsed: AuthResult) -> AuthResult:
        credentials = parsed.auth_data
        if not isinstance(credentials, LoginPassword):
            return parsed  # bad base64, '*' or the like: aiosmtpd has answered already
        return await self.event_handler.check_login(self, credentials.login, credentials.password)

    # -- DATA, read in blocks

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None
        if await self.check_helo_needed():
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.in_data = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            limits = self._listener.limits
            content = _Content(max_size=limits.max_message_size, max_line=limits.max_line_length)
            if await self._receive(content) is _End.BARE_LF:
                log.info("session %s: %s ended DATA with a bare LF", self.session_id, self.client)
                await self.hang_up(BARE_LF)
            if content.error is not None:
                log.info("session %s: message refused: %s", self.session_id, content.error)
                await self.push(str(content.error))
                return
            self.envelope.content = self.envelope.original_content = await content.message()
            try:
                status = await self._call_handler_hook("DATA")
            except Exception as e:  # answered here, so the stop check below still runs
                status = await self.handle_exception(e)
            await self.push(status)
        finally:
            self._set_post_data_state()
            self.in_data = False
        if self._listener.state is not ListenerState.SERVING:
            await self.hang_up(SHUTTING_DOWN)

    async def _receive(self, content: _Content) -> _End:
        """Feed `content` until the end of data; never reads past it (pipelined commands wait).

        Blocks come from readuntil(b"\\n."): everything up to the next line that starts with a
        dot. When a block exceeds the reader's limit, LimitOverrunError says how much of it
        holds no such line, and we take that much. The bytes after a dot are read one by one.
        """
        reader = self._reader
        at = _At.LINE_START
        dots = 0
        while True:
            if at is _At.LINE_START:
                byte = await reader.readexactly(1)
                if byte == b".":
                    at = _At.DOT
                    continue
                content.feed(byte)
                at = _At.LINE_START if byte == b"\n" else _At.TEXT
            elif at is _At.DOT:  # a line began with a dot, which is gone
                dots += 1
                if dots % YIELD_EVERY_DOTS == 0:  # buffered reads do not yield by themselves
                    await asyncio.sleep(0)
                after = await reader.readexactly(1)
                if after == b"\n":
                    return _End.BARE_LF
                if after == b"\r":
                    after += await reader.readexactly(1)
                    if after == b"\r\n" and content.after_crlf:
                        return _End.DATA
                content.feed(after)  # a transparent dot, or a lone one after a bare LF
                at = _At.LINE_START if after.endswith(b"\n") else _At.TEXT
            else:
                self._reset_timeout()  # a long upload is activity, not an idle client
                try:
                    block = await reader.readuntil(b"\n.")
                except asyncio.LimitOverrunError as e:
                    content.feed(await reader.readexactly(e.consumed))
                else:
                    content.feed(block[:-1])
                    at = _At.DOT


# -- the policy: aiosmtpd handler hooks ------------------------------------------------------


class _Policy:
    """Hooks for MAIL, RCPT, DATA, EHLO and AUTH; one per listener, shared by its sessions.

    No attribute here may start with `auth_`: aiosmtpd would offer it as a mechanism.
    """

    def __init__(
        self,
        listener: Listener,
        *,
        intake: Intake,
        users: Mapping[str, UserConfig],
        auth_failure_delay: float,
    ) -> None:
        self._listener = listener
        self._intake = intake
        self._users = users
        self._failure_delay = auth_failure_delay
        self._checks = asyncio.Semaphore(PASSWORD_CHECKS)
        self.failed_logins = FailedLogins()

    def __dir__(self) -> list[str]:
        # aiosmtpd's SMTP.__init__ runs inspect.getmembers(handler) and dir(handler) on every
        # connection, looking only for auth_* and handle_* names (about 12 % of the loop's
        # time with a new connection per message); those names are fixed per class.
        return _names(type(self), ("auth_", "handle_"))

    def reconfigure(self, *, intake: Intake, users: Mapping[str, UserConfig]) -> None:
        self._intake = intake
        self._users = users

    def _offer(self, server: _SMTP) -> AuthOffer:
        return auth_offer(
            has_users=bool(self._users),
            tls=server.tls,
            starttls=server.starttls_available,
            loopback=server.client.is_loopback,
        )

    def _client(self, server: _SMTP, session: Session) -> Client:
        return Client(
            address=str(server.client),
            listener=self._listener.config.address,
            helo=session.host_name,
            user=session.auth_data if session.authenticated else None,
            tls=server.tls,
        )

    async def handle_EHLO(
        self,
        server: _SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        keywords = [
            server.hostname,
            f"SIZE {self._listener.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if server.starttls_available:
            keywords.append("STARTTLS")
        if self._offer(server) is AuthOffer.OFFERED:
            keywords.append("AUTH PLAIN LOGIN")
        *first, last = keywords
        return ["\r\n".join([*(f"250-{k}" for k in first), f"250 {last}"])]  # one write

    async def handle_AUTH(
        self, server: _SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        offer = self._offer(server)
        if offer is AuthOffer.OFFERED:
            return MISSING  # go on to auth_PLAIN / auth_LOGIN
        return str(AUTH_UNAVAILABLE if offer is AuthOffer.NO_USERS else AUTH_NEEDS_TLS)

    async def check_login(self, server: _SMTP, login: bytes, password: bytes) -> AuthResult:
        name = login.decode("utf-8", "replace")
        client = str(server.client)
        if self.failed_logins.blocked(client):
            log.warning(
                "session %s: AUTH refused for %s: %d failed logins in %.0f minutes",
                server.session_id,
                client,
                self.failed_logins.count(client),
                CLIENT_FAILURE_WINDOW / 60,
            )
            await server.hang_up(AUTH_LOCKOUT)
        user = self._users.get(name)
        async with self._checks:
            # An unknown user costs the same hash check as a known one: no timing tells them apart.
            stored = user.password_hash.reveal() if user else await asyncio.to_thread(_decoy_hash)
            matches = await asyncio.to_thread(verify_password, password, stored)
        if matches and user is not None:
            log.info("session %s: %s logged in as %r", server.session_id, server.client, name)
            self.failed_logins.succeeded(client)
            return AuthResult(success=True, auth_data=name, message=str(AUTH_SUCCEEDED))
        server.failed_logins += 1
        failures = server.failed_logins
        recent = self.failed_logins.failed(client)
        log.warning(
            "session %s: AUTH failed for user %r from %s (%d of %d in this session, "
            "%d from this address)",
            server.session_id,
            name,
            server.client,
            failures,
            MAX_AUTH_FAILURES,
            recent,
        )
        await asyncio.sleep(auth_delay(max(failures, recent), self._failure_delay))
        if failures >= MAX_AUTH_FAILURES or recent >= MAX_CLIENT_FAILURES:
            await server.hang_up(AUTH_LOCKOUT)
        return AuthResult(success=False, handled=False, message=str(AUTH_FAILED))

    async def handle_MAIL(
        self,
        server: _SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        config = self._listener.config
        ip = server.client
        refusal = mail_policy(
            ip,
            trusted=any(ip in net for net in config.networks),
            authenticated=bool(session.authenticated),
            auth_required=config.auth.required,
            offer=self._offer(server),
        )
        sender = "" if address == "<>" else address  # the intake's null sender is ""
        if sender:
            refusal = refusal or address_refusal(
                sender, smtputf8=envelope.smtp_utf8, recipient=False
            )
        refusal = refusal or self._intake.check_sender(self._client(server, session), sender)
        if refusal is not None:
            log.info(
                "session %s: MAIL FROM:<%s> from %s refused: %s",
                server.session_id,
                sender,
                ip,
                refusal.one_line(),
            )
            return str(refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(SENDER_OK)

    async def handle_RCPT(
        self,
        server: _SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        assert envelope.mail_from is not None
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        if len(envelope.rcpt_tos) >= self._listener.limits.max_recipients:
            refusal: Reply | None = TOO_MANY_RECIPIENTS
        else:
            refusal = address_refusal(address, smtputf8=envelope.smtp_utf8, recipient=True)
        refusal = refusal or self._intake.check_recipient(
            self._client(server, session), sender, address
        )
        if refusal is not None:
            log.info(
                "session %s: RCPT TO:<%s> refused: %s",
                server.session_id,
                address,
                refusal.one_line(),
            )
            return str(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(RECIPIENT_OK)

    async def handle_DATA(self, server: _SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.mail_from is not None and isinstance(envelope.content, bytes)
        try:
            queue_id = await self._intake.accept(
                self._client(server, session),
                "" if envelope.mail_from == "<>" else envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.content,
                smtputf8=envelope.smtp_utf8,
            )
        except IntakeRefused as e:
            log.info("session %s: message refused: %s", server.session_id, e.reply.one_line())
            return str(e.reply)
        return str(Reply(250, "2.0.0", f"Ok: queued as {queue_id}"))


# aiosmtpd also calls inspect.signature(handler.handle_EHLO) on every connection (about 9 % of
# the loop's time with a new connection per message); a precomputed __signature__ answers it.
_Policy.handle_EHLO.__signature__ = inspect.signature(_Policy.handle_EHLO)  # type: ignore[attr-defined]


# -- the listener ----------------------------------------------------------------------------


class _Refuse(asyncio.Protocol):
    """A connection that arrives while the listener drains: 421, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(f"{SHUTTING_DOWN}\r\n".encode())
        transport.close()


class Listener:
    """One configured `listen:` entry: an SMTP server in the running event loop."""

    def __init__(
        self,
        config: ListenerConfig,
        *,
        limits: Limits,
        users: Mapping[str, UserConfig],
        intake: Intake,
        hostname: str | None = None,
        auth_failure_delay: float = AUTH_FAILURE_DELAY,
    ) -> None:
        self.config = config
        self.limits = limits
        self.state = ListenerState.NEW
        self._hostname = hostname
        self._policy = _Policy(
            self, intake=intake, users=users, auth_failure_delay=auth_failure_delay
        )
        self._server: asyncio.Server | None = None
        self._port = config.port
        self._sessions: set[_SMTP] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def reconfigure(
        self,
        config: ListenerConfig,
        *,
        limits: Limits,
        users: Mapping[str, UserConfig],
        intake: Intake,
    ) -> None:
        """A reloaded configuration for this listener (same address and TLS): new sessions and
        new transactions use it; the socket stays open."""
        self.config = config
        self.limits = limits
        self._policy.reconfigure(intake=intake, users=users)

    def __repr__(self) -> str:
        busy = sum(s.in_data for s in self._sessions)
        return (
            f"<Listener {self.config.host}:{self.port} {self.state.value} "
            f"sessions={len(self._sessions)} in_data={busy}>"
        )

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        return self._port

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        if self.state is not ListenerState.NEW:
            raise RuntimeError(
                f"listener {self.config.address} is {self.state.value}; a listener starts once"
            )
        self.state = ListenerState.SERVING
        try:
            await self._start()
        except BaseException:
            self.state = ListenerState.STOPPED
            raise

    async def _start(self) -> None:
        tls = self.config.tls
        context = _server_context(self.config) if tls.mode is not TlsMode.NONE else None
        hostname = self._hostname or await asyncio.to_thread(socket.getfqdn)
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            if self.state is not ListenerState.SERVING:
                return _Refuse()
            return _SMTP(
                self._policy,
                listener=self,
                data_size_limit=self.limits.max_message_size,
                enable_SMTPUTF8=True,
                hostname=hostname,
                ident="ESMTP relay",
                tls_context=context if tls.mode is TlsMode.STARTTLS else None,
                auth_require_tls=False,  # _Policy decides: TLS or loopback
                timeout=IDLE_TIMEOUT,
                loop=loop,
            )

        self._server = await loop.create_server(
            protocol,
            self.config.host,
            self.config.port,
            ssl=context if tls.mode is TlsMode.IMPLICIT else None,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info("listening on %s:%d (tls %s)", self.config.host, self.port, tls.mode.value)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let sessions in DATA finish within `grace` seconds, close the rest."""
        await self.drain(grace)
        await self.close()

    async def close(self) -> None:
        """Close the listening socket (after `drain`, which answers newcomers 421 meanwhile)."""
        if self.state is ListenerState.STOPPED:
            return
        await self.drain(0)
        self.state = ListenerState.STOPPED
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        log.info("listener %s stopped", self.config.address)

    async def drain(self, grace: float) -> None:
        """Answer new connections `421 4.3.2`, end idle sessions, let sessions in DATA finish
        within `grace` seconds and cut the rest. The socket stays open until `close`, so
        clients hear why rather than find the port closed while the relay finishes its work."""
        if self.state in (ListenerState.STOPPING, ListenerState.STOPPED):
            return
        if self._server is None:
            self.state = ListenerState.STOPPED
            return
        self.state = ListenerState.STOPPING
        busy = sum(s.in_data for s in self._sessions)
        log.info(
            "listener %s:%d stopping: %d sessions, %d in DATA",
            self.config.host,
            self.port,
            len(self._sessions),
            busy,
        )
        for session in list(self._sessions):
            session.shut_down()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.warning(
                    "listener %s:%d: %d sessions still open after %.1fs, closing them",
                    self.config.host,
                    self.port,
                    len(pending),
                    grace,
                )
                for session in list(self._sessions):
                    session.abort()
                await asyncio.wait(set(self._tasks))

    # sessions tell us when they come and go

    def _session_started(self, session: _SMTP, task: asyncio.Task[None]) -> None:
        self._sessions.add(session)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session_ended(self, session: _SMTP) -> None:
        self._sessions.discard(session)


@functools.cache
def _decoy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def _server_context(config: ListenerConfig) -> ssl.SSLContext:
    tls = config.tls
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"listener {config.address}: cannot load tls.cert_file {tls.cert_file} "
            f"and tls.key_file {tls.key_file}: {e}",
            hint="both PEM files, the key unencrypted",
        ) from None
    return ctx
