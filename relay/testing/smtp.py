"""Emulated Exchange Online SMTP submission (smtp.office365.com:587), built on aiosmtpd.

It takes client submissions over STARTTLS + AUTH XOAUTH2 and answers them as Exchange Online
does, with Exchange's reply texts (`relay.testing.exchange_replies`); it keeps every accepted
message in memory (`SmtpSubmission.messages`) and delivers nothing. Tokens come from the
emulated identity platform (`TokenIssuer`); tenants, apps, mailboxes and grants from the shared
`Directory`, read at each decision, so a test may change them between two commands.

How a submission is judged (reference/exchange-online.md §1, §2.1, §5.1):

* AUTH XOAUTH2 (with or without an initial response, mechanism in any case): the token must be
  valid for Exchange Online (`https://outlook.office365.com`, or its other identifiers and those
  of the national clouds) and either carry the role `SMTP.SendAsApp` with its app holding
  FullAccess on the `user=` mailbox of the token's tenant (app-only), or carry the delegated
  scope `SMTP.Send` of the user who owns that mailbox; otherwise `535 5.7.3`. SMTP AUTH
  switched off for the tenant or the mailbox gives the `535 5.7.139` texts. Exchange was seen to
  close the connection after a 535, and so does the emulator. A fourth connection holding an
  AUTH for one mailbox gets `432 4.3.2` (decided at AUTH; a slot frees when its connection
  ends). AUTH LOGIN is basic auth: `550 5.7.30` (retired). Other mechanisms: `504 5.7.4`.
* MAIL before AUTH: `530 5.7.57`. `SIZE=` over the service limit: `552 5.3.4`. The null
  reverse-path `MAIL FROM:<>` is taken (RFC 5321); then only the From: header is checked.
* RCPT beyond the mailbox's recipient limit: Exchange's in-session answer was never captured
  (only its NDR), so the emulator gives RFC 5321's `452 4.5.3 Too many recipients`, which tells
  the client to send the remaining recipients in another transaction.
* After the final dot, in this order: over the mailbox's MaxSendSize -> `554 5.2.0
  …MaxSubmissionExceeded`; MAIL FROM or a From: address the mailbox may not send as -> `554
  5.2.252 SendAsDenied`; over the mailbox's recipients per rolling 24 h -> `554 5.2.0
  …SubmissionQuotaExceededException`; else `250 2.0.0 OK <message-id> [Hostname=…]`.

Faults: `SmtpSubmission.inject(Fault(...), mailbox=..., headers=..., times=...)` queues a fault
for a phase (connect, AUTH, MAIL, RCPT, end of DATA); the first pending fault that matches is
used up. A fault may answer with any reply, wait first, close the connection after its reply,
or drop the connection without one. `gmail_style_challenge` switches a bad token's answer to
Gmail's `334 <base64 JSON>` then `535 5.7.8`, for clients' handling of that branch.

Not modelled: BDAT (CHUNKING and BINARYMIME are advertised, as Exchange does, but BDAT is an
unknown command), DSN parameters on MAIL/RCPT, the 30 messages/minute pacing, TLS 1.0/1.1.

Nothing here raises to the client: every refusal is a reply. `start()` raises `OSError` when the
address cannot be bound and `RuntimeError` when started twice or after `aclose()`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import enum
import re
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses
from typing import Any, AnyStr, NoReturn

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.reply import Reply
from relay.testing import exchange_replies as ex
from relay.testing.directory import SMTP_SEND_AS_APP, Directory, Mailbox, Tenant
from relay.testing.tokens import EXCHANGE_AUDIENCES, InvalidToken, TokenIssuer

# Front-end and mailbox server names shaped like Exchange Online's (§1.2), "EM" for emulator.
DEFAULT_HOSTNAME = "EM1PR01CA0001.outlook.office365.com"
DEFAULT_MAILBOX_SERVER = "EM1PR01MB0001.EURPRD01.PROD.OUTLOOK.COM"
# Concurrent SMTP AUTH connections per mailbox (§5.1).
CONNECTIONS_PER_MAILBOX = 3
# The daily recipient limit is counted over a rolling 24 hours (§5.1).
RECIPIENT_WINDOW = 24 * 3600.0
# How the null reverse-path `MAIL FROM:<>` is kept in aiosmtpd's envelope.
NULL_PATH = "<>"
# The delegated permission for SMTP AUTH as the signed-in user (`scp`, reference §2.2).
SMTP_SEND = "SMTP.Send"
# RFC 4954 allows AUTH lines of 12 288 octets; app tokens make 2-4 KB lines (§1.3, §1.7).
AUTH_LINE_LIMIT = 16_384


# --- pure functions -------------------------------------------------------------------------


def parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """`user=U\\x01auth=Bearer T\\x01\\x01` -> (U, T); None when the blob is not of that shape."""
    try:
        text = blob.decode()
    except UnicodeDecodeError:
        return None
    if not text.endswith("\x01\x01"):
        return None
    fields: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        key, sep, value = item.partition("=")
        if not sep:
            return None
        fields[key] = value
    scheme, _, token = fields.get("auth", "").partition(" ")
    user = fields.get("user", "")
    if scheme.lower() != "bearer" or not user or not token.strip():
        return None
    return user, token.strip()


def decode_sasl(line: bytes) -> bytes | Reply:
    """A SASL client answer (RFC 4954): the decoded bytes, or the reply refusing it."""
    line = line.strip()
    if line == b"*":
        return ex.AUTH_ABORTED
    if line == b"=":  # an empty initial response
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except binascii.Error:
        return ex.BAD_BASE64


def ehlo_lines(hostname: str, client_ip: str, *, tls: bool, size: int) -> list[str]:
    """Exchange's EHLO answer: the same keywords in the same order, AUTH instead of STARTTLS."""
    keywords = ex.EHLO_KEYWORDS_AFTER_TLS if tls else ex.EHLO_KEYWORDS_BEFORE_TLS
    lines = [
        f"{hostname} Hello [{client_ip}]",
        *(f"SIZE {size}" if k.startswith("SIZE ") else k for k in keywords),
    ]
    return [f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)]


_DOMAIN = re.compile(
    r"^(?:\[(?:IPv6:)?[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?)$"
)


def valid_helo_domain(name: str) -> bool:
    return bool(_DOMAIN.match(name))


# aiosmtpd's fixed replies, and how Exchange words them.
_AIOSMTPD_WORDING: dict[str, Reply] = {
    "220 Ready to start TLS": ex.STARTTLS_READY,
    "530 Must issue a STARTTLS command first": ex.MUST_STARTTLS,
    "503 Already authenticated": ex.ALREADY_AUTHENTICATED,
    "504 5.5.4 Unrecognized authentication type": ex.UNRECOGNIZED_AUTH_TYPE,
    "354 End data with <CR><LF>.<CR><LF>": ex.START_MAIL_INPUT,
    "552 Error: message size exceeds fixed maximum message size": ex.MESSAGE_TOO_BIG,
    "552 Error: Too much mail data": ex.MESSAGE_TOO_BIG,
    "503 Error: need MAIL command": ex.NEED_MAIL,
    "503 Error: need RCPT command": ex.NEED_RCPT,
    "503 Error: nested MAIL command": ex.SENDER_ALREADY_SPECIFIED,
    "503 Error: send HELO first": ex.SEND_HELLO_FIRST,
    "503 Error: send EHLO first": ex.SEND_HELLO_FIRST,
}
_UNKNOWN_COMMAND = re.compile(r'^500 Error: command "(.*)" not recognized$')


def exchange_wording(line: str) -> str:
    """Translate one of aiosmtpd's own reply lines into Exchange's; others pass unchanged."""
    reply = _AIOSMTPD_WORDING.get(line)
    if reply is not None:
        return str(reply)
    m = _UNKNOWN_COMMAND.match(line)
    return str(ex.unrecognized_command(m.group(1))) if m else line


@dataclass(frozen=True)
class Grant:
    """What a successful AUTH established: the app may submit as this mailbox."""

    tenant: Tenant
    mailbox: Mailbox
    app_id: str


class Denial(enum.Enum):
    TOKEN = "token"  # 535 5.7.3: bad token, wrong audience, no role, no FullAccess, unknown box
    TENANT_DISABLED = "tenant"  # 535 5.7.139 ... for the Tenant
    MAILBOX_DISABLED = "mailbox"  # 535 5.7.139 ... for the Mailbox


_DENIAL_REPLY = {
    Denial.TOKEN: ex.AUTH_UNSUCCESSFUL,
    Denial.TENANT_DISABLED: ex.AUTH_DISABLED_TENANT,
    Denial.MAILBOX_DISABLED: ex.AUTH_DISABLED_MAILBOX,
}


def authorize(
    directory: Directory, issuer: TokenIssuer, user: str, token: str, *, now: float
) -> Grant | Denial:
    """Exchange's XOAUTH2 check: token, permission, app, switches, then the mailbox: FullAccess
    for an app-only token (§2.1), the signed-in user's own mailbox for a delegated one (§2.2)."""
    try:
        claims = issuer.validate(token, audience=EXCHANGE_AUDIENCES, now=now)
    except InvalidToken:
        return Denial.TOKEN
    tenant = directory.tenant(claims.tenant_id)
    delegated = claims.upn is not None
    permitted = SMTP_SEND in claims.scopes if delegated else SMTP_SEND_AS_APP in claims.roles
    if not permitted or tenant is None:
        return Denial.TOKEN
    if claims.app_id not in tenant.apps:
        return Denial.TOKEN
    if not tenant.smtp_auth_enabled:
        return Denial.TENANT_DISABLED
    found = directory.mailbox(user)
    if found is None or found[0] is not tenant:
        return Denial.TOKEN
    box = found[1]
    if not box.smtp_auth_enabled:
        return Denial.MAILBOX_DISABLED
    if delegated:
        owner = (claims.upn or "").lower() == box.address.lower()
        return Grant(tenant, box, claims.app_id) if owner else Denial.TOKEN
    if claims.app_id not in box.full_access:
        return Denial.TOKEN
    return Grant(tenant, box, claims.app_id)


def header_senders(headers: Message) -> list[str]:
    """The addresses in the message's From: header(s)."""
    values = [str(v) for v in headers.get_all("From", [])]
    return [addr for _, addr in getaddresses(values) if addr]


def refusal(
    box: Mailbox, *, mail_from: str, senders: list[str], size: int, recipients: int, sent: int
) -> Reply | None:
    """Exchange's end-of-DATA verdict on a message, or None to accept it.

    `mail_from` is "" for the null reverse-path: then only the From: addresses are checked
    ([L]: Exchange's handling of `MAIL FROM:<>` on submission was not captured).
    `sent` is how many recipients the mailbox already had in the rolling 24 hours.
    """
    if size > box.max_send_size:
        return ex.MAX_SUBMISSION_EXCEEDED
    for sender in ([mail_from] if mail_from else []) + senders:
        if not box.may_send_as(sender):
            return ex.send_as_denied(box.address, sender)
    if sent + recipients > box.daily_recipient_limit:
        return ex.SUBMISSION_QUOTA_EXCEEDED
    return None


# --- faults ---------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    CONNECT = "connect"  # instead of the 220 greeting
    AUTH = "auth"  # the answer to AUTH XOAUTH2, once the client's token is in
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the answer after the final dot


@dataclass(frozen=True)
class SessionInfo:
    """What a fault's reply may quote about the session it ends up in."""

    client_ip: str
    session_id: str
    stamp: str  # "HOST ISO-time SESSIONID", as in Exchange's `[...]` suffixes


ReplySource = Reply | Callable[[SessionInfo], Reply]


@dataclass(frozen=True)
class Fault:
    """What happens instead of the normal answer at `phase`.

    `reply`: the answer to give (or a function of the session making it); None keeps the normal
    answer. `delay`: seconds to wait before answering. `close`: end the connection after the
    reply, or, without a reply, drop it without a word.
    """

    phase: Phase
    _: KW_ONLY
    reply: ReplySource | None = None
    close: bool = False
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.reply is None and not self.close and not self.delay:
            raise ValueError("a fault must reply, close or delay")
        if isinstance(self.reply, Reply) and self.reply.code < 400:
            raise ValueError(f"a fault replies with a failure, not {self.reply.code}")
        if self.phase is Phase.CONNECT and self.reply is not None and not self.close:
            raise ValueError("a reply instead of the greeting ends the connection: close=True")
        if self.delay < 0:
            raise ValueError("delay must not be negative")


def shutdown(phase: Phase) -> Fault:
    """`421 4.3.2 Service not available…`, then the connection closes."""
    return Fault(phase, reply=ex.SERVICE_NOT_AVAILABLE, close=True)


def server_busy(phase: Phase) -> Fault:
    """`451 4.7.500 Server busy. Please try again later from [client IP]. (AS761)`."""
    return Fault(phase, reply=lambda s: ex.server_busy(s.client_ip))


def delayed(phase: Phase, seconds: float) -> Fault:
    """The normal answer, `seconds` late."""
    return Fault(phase, delay=seconds)


def dropped(phase: Phase) -> Fault:
    """The connection is dropped instead of answering."""
    return Fault(phase, close=True)


def smtp_auth_disabled(*, tenant: bool) -> Fault:
    """AUTH gets the `535 5.7.139` text for the tenant (or the mailbox), whatever the switches."""
    text = ex.AUTH_DISABLED_TENANT if tenant else ex.AUTH_DISABLED_MAILBOX
    return Fault(Phase.AUTH, reply=lambda s: ex.stamped(text, s.stamp))


def daily_quota_exceeded() -> Fault:
    """End of DATA gets `554 5.2.0 …SubmissionQuotaExceededException`."""
    return Fault(Phase.DATA, reply=ex.SUBMISSION_QUOTA_EXCEEDED)


@dataclass
class _Pending:
    fault: Fault
    mailbox: str | None
    headers: dict[str, str]
    remaining: int

    def matches(self, phase: Phase, mailbox: str | None, headers: Message | None) -> bool:
        if phase is not self.fault.phase:
            return False
        if self.mailbox is not None and self.mailbox != (mailbox or "").lower():
            return False
        if not self.headers:
            return True
        return headers is not None and all(
            str(headers.get(k, "")).strip() == v for k, v in self.headers.items()
        )


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Login:
    """One AUTH attempt, as decided."""

    session_id: str
    mechanism: str
    user: str | None  # the `user=` (XOAUTH2) or user name (LOGIN) the client gave
    app_id: str | None  # the token's app, when the token was good
    reply: Reply
    at: datetime

    @property
    def succeeded(self) -> bool:
        return self.reply.code == 235


@dataclass(frozen=True, kw_only=True)
class Submission:
    """One message as it reached the end of DATA, and Exchange's answer to it."""

    session_id: str
    mailbox: str  # the authenticated mailbox
    app_id: str
    tenant_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    data: bytes  # exactly what the client sent between DATA and the final dot, unstuffed
    at: datetime
    reply: Reply

    @property
    def accepted(self) -> bool:
        return self.reply.code == 250


# --- the service ----------------------------------------------------------------------------


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class SmtpSubmission:
    """The emulated submission endpoint; one per emulator, any number of connections."""

    def __init__(
        self,
        directory: Directory,
        issuer: TokenIssuer,
        *,
        tls_context: ssl.SSLContext,
        hostname: str = DEFAULT_HOSTNAME,
        mailbox_server: str = DEFAULT_MAILBOX_SERVER,
        service_max_size: int = ex.SERVICE_MAX_SIZE,
        gmail_style_challenge: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.issuer = issuer
        self.hostname = hostname
        self.mailbox_server = mailbox_server
        self.service_max_size = service_max_size
        self.gmail_style_challenge = gmail_style_challenge  # may be switched at any time
        self.messages: list[Submission] = []  # accepted, in order
        self.refused: list[Submission] = []  # refused at the end of DATA, in order
        self.logins: list[Login] = []
        self.connections = 0  # TCP connections accepted so far
        self._tls_context = tls_context
        self._clock = clock
        self._state = State.NEW
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._live: set[_ExchangeSMTP] = set()
        self._faults: list[_Pending] = []
        self._slots: collections.Counter[str] = collections.Counter()
        self._sent: dict[str, collections.deque[tuple[float, int]]] = collections.defaultdict(
            collections.deque
        )
        self._changed = asyncio.Event()

    # lifecycle

    async def start(self, host: str, port: int) -> None:
        if self._state is not State.NEW:
            raise RuntimeError(f"SmtpSubmission is {self._state.value}; it starts only once")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: self._accept(loop), host, port)
        self._address = self._server.sockets[0].getsockname()[:2]
        self._state = State.RUNNING

    @property
    def port(self) -> int:
        if self._address is None:
            raise RuntimeError("SmtpSubmission is not started")
        return int(self._address[1])

    async def aclose(self) -> None:
        """Stop listening and cut every open connection; idempotent."""
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSED
        if self._server is None:
            return
        self._server.close()
        tasks = [task for proto in self._live if (task := proto.task()) is not None]
        for proto in list(self._live):
            proto.abort()
        if tasks:
            await asyncio.wait(tasks)
        await self._server.wait_closed()

    async def __aenter__(self) -> SmtpSubmission:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        where = f" {self._address[0]}:{self._address[1]}" if self._address else ""
        return (
            f"<SmtpSubmission {self._state.value}{where} connections={len(self._live)} "
            f"messages={len(self.messages)} faults={sum(p.remaining for p in self._faults)}>"
        )

    # faults

    def inject(
        self,
        fault: Fault,
        *,
        mailbox: str | None = None,
        headers: Mapping[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Queue `fault` for its next `times` matching occasions.

        `mailbox`: only in sessions authenticated as it (at AUTH: the `user=` given).
        `headers`: only for messages whose headers have these values (end of DATA only).
        Faults are used in the order they were injected.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        if headers and fault.phase is not Phase.DATA:
            raise ValueError("headers are known only at the end of DATA")
        if mailbox is not None and fault.phase is Phase.CONNECT:
            raise ValueError("the mailbox is not known when a client connects")
        self._faults.append(
            _Pending(fault, mailbox.lower() if mailbox else None, dict(headers or {}), times)
        )

    @property
    def pending_faults(self) -> list[Fault]:
        """The faults not used yet, in the order they will be used."""
        return [p.fault for p in self._faults for _ in range(p.remaining)]

    # what tests look at

    def authenticated_connections(self, mailbox: str) -> int:
        """Connections now holding an AUTH as `mailbox` (at most CONNECTIONS_PER_MAILBOX)."""
        return self._slots[mailbox.lower()]

    def recipients_sent(self, mailbox: str) -> int:
        """Recipients of `mailbox`'s accepted messages in the rolling 24 hours."""
        return self._recipients_in_window(mailbox.lower(), self._clock())

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; it is checked whenever the records change."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_messages(self, count: int) -> list[Submission]:
        """Return the accepted messages once there are at least `count`."""
        await self.wait_for(lambda: len(self.messages) >= count)
        return list(self.messages)

    # inside: used by the connections

    def _accept(self, loop: asyncio.AbstractEventLoop) -> _ExchangeSMTP:
        session_id = secrets.token_hex(8).upper()
        proto = _ExchangeSMTP(
            _Connection(self, session_id),
            hostname=self.hostname,
            ident=(
                "Microsoft ESMTP MAIL Service ready at "
                f"{format_datetime(self._now())} [{session_id}]"
            ),
            tls_context=self._tls_context,
            require_starttls=True,
            auth_require_tls=True,
            auth_exclude_mechanism=["PLAIN"],
            data_size_limit=self.service_max_size,
            enable_SMTPUTF8=True,
            loop=loop,
        )
        self._live.add(proto)
        self.connections += 1
        self._notify()
        return proto

    def _disconnected(self, proto: _ExchangeSMTP) -> None:
        self._live.discard(proto)
        grant = proto.conn.grant
        if grant is not None:
            self._slots[grant.mailbox.address.lower()] -= 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _stamp(self, session_id: str) -> str:
        iso = self._now().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return f"{self.hostname} {iso} {session_id}"

    def _take_fault(
        self, phase: Phase, mailbox: str | None, headers: Message | None = None
    ) -> Fault | None:
        for pending in self._faults:
            if pending.matches(phase, mailbox, headers):
                pending.remaining -= 1
                if not pending.remaining:
                    self._faults.remove(pending)
                return pending.fault
        return None

    def _claim_slot(self, mailbox: Mailbox) -> bool:
        key = mailbox.address.lower()
        if self._slots[key] >= CONNECTIONS_PER_MAILBOX:
            return False
        self._slots[key] += 1
        return True

    def _recipients_in_window(self, key: str, now: float) -> int:
        sent = self._sent[key]
        while sent and sent[0][0] <= now - RECIPIENT_WINDOW:
            sent.popleft()
        return sum(n for _, n in sent)

    def _record_login(self, login: Login) -> None:
        self.logins.append(login)
        self._notify()

    def _submit(
        self,
        session_id: str,
        grant: Grant,
        envelope: Envelope,
        headers: Message,
        injected: Reply | None,
    ) -> Reply:
        """Decide on a message at the end of DATA, record it, and return the answer."""
        data = envelope.original_content or b""
        mail_from = "" if envelope.mail_from == NULL_PATH else envelope.mail_from or ""
        key = grant.mailbox.address.lower()
        now = self._clock()
        reply = injected or refusal(
            grant.mailbox,
            mail_from=mail_from,
            senders=header_senders(headers),
            size=len(data),
            recipients=len(envelope.rcpt_tos),
            sent=self._recipients_in_window(key, now),
        )
        if reply is None:
            message_id = str(headers.get("Message-ID", "")).strip()
            reply = ex.queued(
                message_id or f"<{uuid.uuid4().hex.upper()}@{self.mailbox_server}>",
                self.mailbox_server,
            )
            self._sent[key].append((now, len(envelope.rcpt_tos)))
        record = Submission(
            session_id=session_id,
            mailbox=grant.mailbox.address,
            app_id=grant.app_id,
            tenant_id=grant.tenant.tenant_id,
            mail_from=mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            data=data,
            at=self._now(),
            reply=reply,
        )
        (self.messages if record.accepted else self.refused).append(record)
        self._notify()
        return reply


class _Session(Session):
    # aiosmtpd sets this deprecated property on every AUTH, and its setter logs a warning each
    # time; a plain attribute keeps the log quiet.
    login_data = None


class _ExchangeSMTP(SMTP):
    """aiosmtpd's SMTP with Exchange's limits and wording; the decisions are `_Connection`'s."""

    line_length_limit = AUTH_LINE_LIMIT  # the reader's limit: long AUTH answers and DATA lines
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, conn: _Connection, **kwargs: Any) -> None:
        super().__init__(conn, authenticator=conn.basic_auth, **kwargs)
        self.conn = conn
        # An instance dict: the class-level one is shared and falls back to 512 (§1.7).
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": AUTH_LINE_LIMIT}
        )
        # aiosmtpd makes a mechanism of every `auth_*` attribute; catch a stray one early.
        assert set(self._auth_methods) == {"LOGIN", "XOAUTH2"}, sorted(self._auth_methods)

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd refuses the null reverse-path; RFC 5321 §4.5.5 wants it taken. `<>` stands
        # for it in the envelope (aiosmtpd needs a non-empty sender there) and in the hooks.
        if arg.startswith("<>"):
            return NULL_PATH, arg[2:]
        return super()._getaddr(arg)

    async def push(self, status: AnyStr) -> None:
        await super().push(exchange_wording(status) if isinstance(status, str) else status)

    async def smtp_AUTH(self, arg: str) -> None:
        if arg:  # Exchange takes the mechanism in any case (§1.2)
            mechanism, sep, rest = arg.partition(" ")
            arg = mechanism.upper() + sep + rest
        await super().smtp_AUTH(arg)

    async def _handle_client(self) -> None:
        assert self.session is not None
        if self.conn.service._state is State.CLOSED:  # accepted while the service was closing
            self.abort()
            return
        peer = self.session.peer
        self.conn.client_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        await self.conn.fault(self, Phase.CONNECT)
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.conn.service._disconnected(self)

    async def sasl_answer(self, challenge: str) -> bytes:
        """Send `334 challenge` and return the client's answer line (never logged)."""
        await self.push(f"334 {challenge}")
        return await self._reader.readline()

    async def hang_up(self, reply: Reply | None) -> NoReturn:
        """Close after `reply`, or drop the connection without one; never returns.

        The connection's end cancels the task running this (aiosmtpd's client handler).
        """
        if self.transport is not None:
            if reply is not None:
                await self.push(str(reply))
                self.transport.close()
            else:
                self.transport.abort()
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def task(self) -> asyncio.Task[None] | None:
        """The task serving the client; None until the connection is made."""
        return self._handler_coroutine


class _Connection:
    """The aiosmtpd handler of one client connection: Exchange's answers to its commands.

    aiosmtpd turns every handler attribute whose name starts with `auth_` into an AUTH
    mechanism, so `auth_XOAUTH2` is the only one here.
    """

    def __init__(self, service: SmtpSubmission, session_id: str) -> None:
        self.service = service
        self.session_id = session_id
        self.client_ip = ""
        self.grant: Grant | None = None

    def _stamped(self, reply: Reply) -> Reply:
        return ex.stamped(reply, self.service._stamp(self.session_id))

    @property
    def mailbox(self) -> str | None:
        return self.grant.mailbox.address if self.grant else None

    async def fault(
        self,
        server: _ExchangeSMTP,
        phase: Phase,
        *,
        mailbox: str | None = None,
        headers: Message | None = None,
    ) -> Reply | None:
        """Apply the next matching fault: its reply, None for the normal one; or hang up."""
        fault = self.service._take_fault(phase, mailbox, headers)
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        reply = fault.reply
        if reply is not None and not isinstance(reply, Reply):
            reply = reply(
                SessionInfo(self.client_ip, self.session_id, self.service._stamp(self.session_id))
            )
        if fault.close:
            await server.hang_up(reply)
        return reply

    # session

    async def handle_EHLO(
        self,
        server: _ExchangeSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if not valid_helo_domain(hostname):
            return [str(self._stamped(ex.INVALID_DOMAIN))]
        session.host_name = hostname
        return ehlo_lines(
            self.service.hostname,
            self.client_ip,
            tls=session.ssl is not None,
            size=self.service.service_max_size,
        )

    async def handle_HELO(
        self, server: _ExchangeSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        if not valid_helo_domain(hostname):
            return str(self._stamped(ex.INVALID_DOMAIN))
        session.host_name = hostname
        return f"250 {self.service.hostname} Hello [{self.client_ip}]"

    async def handle_NOOP(
        self, server: _ExchangeSMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        return str(ex.OK)

    async def handle_RSET(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        return str(ex.RESETTING)

    async def handle_QUIT(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        return str(ex.CLOSING)

    # AUTH

    async def auth_XOAUTH2(self, server: _ExchangeSMTP, args: list[str]) -> AuthResult:
        line = args[1].encode() if len(args) > 1 else await server.sasl_answer("")
        blob = decode_sasl(line)
        if isinstance(blob, Reply):
            return await self._auth_result(server, "XOAUTH2", None, None, blob)
        parsed = parse_xoauth2(blob)
        user = parsed[0] if parsed else None
        reply, app_id = await self.fault(server, Phase.AUTH, mailbox=user), None
        if reply is None:
            reply, app_id = await self._authorize(server, parsed)
        return await self._auth_result(server, "XOAUTH2", user, app_id, reply)

    async def _authorize(
        self, server: _ExchangeSMTP, parsed: tuple[str, str] | None
    ) -> tuple[Reply, str | None]:
        """The answer to a well-formed AUTH XOAUTH2, and the token's app when it was good."""
        decision = Denial.TOKEN
        if parsed is not None:
            user, token = parsed
            decision = authorize(
                self.service.directory, self.service.issuer, user, token, now=self.service._clock()
            )
        if isinstance(decision, Grant):
            if not self.service._claim_slot(decision.mailbox):
                return ex.CONCURRENT_CONNECTIONS, decision.app_id
            self.grant = decision
            return ex.AUTH_SUCCESSFUL, decision.app_id
        if decision is Denial.TOKEN and self.service.gmail_style_challenge:
            await server.sasl_answer(ex.GMAIL_ERROR_CHALLENGE)  # the client answers empty
            return ex.GMAIL_BAD_CREDENTIALS, None
        return self._stamped(_DENIAL_REPLY[decision]), None

    def basic_auth(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: LoginPassword,
    ) -> AuthResult:
        """aiosmtpd's `authenticator` for AUTH LOGIN: basic auth is retired (§5.2)."""
        user = auth_data.login.decode(errors="replace")
        self._record("LOGIN", user, None, ex.BASIC_AUTH_RETIRED)
        return AuthResult(success=False, handled=False, message=str(ex.BASIC_AUTH_RETIRED))

    async def _auth_result(
        self,
        server: _ExchangeSMTP,
        mechanism: str,
        user: str | None,
        app_id: str | None,
        reply: Reply,
    ) -> AuthResult:
        self._record(mechanism, user, app_id, reply)
        if reply.code == 535:  # Exchange closes the connection after a failed AUTH (§1.4)
            await server.hang_up(reply)
        return AuthResult(
            success=reply.code == 235, handled=False, message=str(reply), auth_data=user
        )

    def _record(self, mechanism: str, user: str | None, app_id: str | None, reply: Reply) -> None:
        self.service._record_login(
            Login(
                session_id=self.session_id,
                mechanism=mechanism,
                user=user,
                app_id=app_id,
                reply=reply,
                at=self.service._now(),
            )
        )

    # transaction

    async def handle_MAIL(
        self,
        server: _ExchangeSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = await self.fault(server, Phase.MAIL, mailbox=self.mailbox)
        if reply is None and self.grant is None:
            reply = self._stamped(ex.NOT_AUTHENTICATED)
        if reply is None:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            reply = ex.SENDER_OK
        return str(reply)

    async def handle_RCPT(
        self,
        server: _ExchangeSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = await self.fault(server, Phase.RCPT, mailbox=self.mailbox)
        assert self.grant is not None  # MAIL succeeded, so AUTH did
        if reply is None and address == NULL_PATH:
            reply = ex.INVALID_ADDRESS
        if reply is None and len(envelope.rcpt_tos) >= self.grant.mailbox.recipient_limit:
            reply = ex.TOO_MANY_RECIPIENTS
        if reply is None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            reply = ex.RECIPIENT_OK
        return str(reply)

    async def handle_DATA(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        assert self.grant is not None
        headers = BytesHeaderParser().parsebytes(envelope.original_content or b"")
        injected = await self.fault(server, Phase.DATA, mailbox=self.mailbox, headers=headers)
        return str(self.service._submit(self.session_id, self.grant, envelope, headers, injected))
