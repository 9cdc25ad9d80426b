"""Helpers for the inbound tests: tokens from the emulator's issuer, an importer against the
running emulator, and the receivers the SMTP and HTTP sinks deliver to (real sockets, port 0,
with injectable refusals)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session
from relaykit import secret_account

from relay.config import AfterImport, InboundConfig
from relay.identity import GRAPH_SCOPE
from relay.inbound.importer import Importer, RoundReport
from relay.testing.directory import MAIL_READWRITE, MAIL_SEND
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.tokens import GRAPH_AUDIENCE


class IssuerTokens:
    """A TokenProvider that asks the emulator's TokenIssuer directly; `first` (e.g. an expired
    token) is handed out before any real one."""

    def __init__(
        self, emulator: Emulator, sample: SampleTenant, *, first: str | None = None
    ) -> None:
        self.emulator = emulator
        self.sample = sample
        self.cached = first
        self.invalidated = 0

    def issue(self, *, lifetime: float = 3600) -> str:
        return self.emulator.issuer.issue(
            audience=GRAPH_AUDIENCE,
            tenant_id=self.sample.tenant_id,
            app_id=self.sample.client_id,
            roles={MAIL_READWRITE, MAIL_SEND},
            object_id="00000000-0000-0000-0000-000000000001",
            lifetime=lifetime,
        )

    async def token(self, scope: str) -> str:
        assert scope == GRAPH_SCOPE
        if self.cached is None:
            self.cached = self.issue()
        return self.cached

    def invalidate(self, scope: str) -> None:
        assert scope == GRAPH_SCOPE
        self.invalidated += 1
        self.cached = None


def inbound(sample: SampleTenant, deliver: dict[str, object], **options: Any) -> InboundConfig:
    settings: dict[str, Any] = {
        "name": "helpdesk",
        "account": "contoso",
        "mailbox": sample.mailbox,
        "poll_interval": 3600.0,  # tests drive rounds with poll()
        "deliver": deliver,
        "after": AfterImport.MARK_READ,
        **options,
    }
    return InboundConfig(**settings)


def importer(
    emulator: Emulator,
    sample: SampleTenant,
    config: InboundConfig,
    state: Path,
    *,
    tokens: Any = None,
    **options: Any,
) -> Importer:
    settings: dict[str, Any] = {"retry_base": 0.0, **options}
    return Importer(
        config,
        account=secret_account(emulator, sample),
        tokens=tokens or IssuerTokens(emulator, sample),
        state_path=state,
        **settings,
    )


async def one_round(imp: Importer) -> RoundReport:
    """Start `imp`, run one poll round, stop it; the round's report."""
    await imp.start()
    try:
        return await imp.poll()
    finally:
        await imp.stop()


def mail(n: int, *, sender: str = "Ops <ops@example.org>", subject: str | None = None,
         body: str = "") -> bytes:  # fmt: skip
    """Message number `n` as Exchange keeps it: Received first, CRLF line ends, a unique
    Message-ID naming `n`."""
    message = EmailMessage()
    message["Received"] = "from app.example.org by EM1PR01MB0001.outlook.office365.com"
    message["From"] = sender
    message["To"] = "Helpdesk <relay@contoso.com>"
    message["Subject"] = subject if subject is not None else f"Ticket {n}"
    message["Date"] = "Mon, 02 Mar 2026 08:15:00 +0000"
    message["Message-ID"] = f"<ticket-{n}@app.example.org>"
    message.set_content(body or f"Pump {n} needs a look.\n")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def message_id(data: bytes) -> str:
    return str(BytesHeaderParser().parsebytes(data)["Message-ID"])


def maildir_files(root: Path) -> list[Path]:
    return sorted([*(root / "new").iterdir(), *(root / "cur").iterdir()])


# -- an SMTP server to deliver to -------------------------------------------------------------


@dataclass
class SmtpReceiver:
    """Takes messages (`received`: envelope sender, recipients, bytes) unless `refusals` holds
    replies for the next DATA commands, e.g. "451 4.3.0 Try later"."""

    port: int = 0
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refusals:
            return self.refusals.pop(0)
        assert isinstance(envelope.content, bytes)
        self.received.append(
            (str(envelope.mail_from), list(envelope.rcpt_tos), envelope.original_content or b"")
        )
        return "250 2.0.0 Ok: queued"


@asynccontextmanager
async def smtp_receiver() -> AsyncIterator[SmtpReceiver]:
    receiver = SmtpReceiver()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(receiver, decode_data=False, hostname="app.local"), "127.0.0.1", 0
    )
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()
        await server.wait_closed()


# -- an HTTP endpoint to deliver to -------------------------------------------------------------


@dataclass
class HttpReceiver:
    """Answers 204 and keeps each request (headers, body), unless `statuses` holds answers for
    the next requests."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None  # sent with those answers

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.statuses:
            status = self.statuses.pop(0)
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=status, text=f"answer {status}\nfrom the app",
                                headers=headers)  # fmt: skip
        self.received.append((dict(request.headers), body))
        return web.Response(status=204)


@asynccontextmanager
async def http_receiver() -> AsyncIterator[HttpReceiver]:
    receiver = HttpReceiver()
    app = web.Application()
    app.router.add_post("/mail", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/mail"
    try:
        yield receiver
    finally:
        await runner.cleanup()
