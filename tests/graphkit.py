"""The emulated Graph on HTTPS loopback (port 0) with a client that trusts the emulator's CA.

Shared by the Graph emulator tests and the graph transport tests: a tenant (contoso.com) with
one app holding every Graph role, the mailbox `robot@contoso.com` (which may send as
`alerts@contoso.com`) and `other@contoso.com`, and a second tenant with `someone@fabrikam.com`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiohttp
from aiohttp import web

from relay.testing.directory import MAIL_READWRITE, MAIL_SEND, App, Directory
from relay.testing.graph import GraphService
from relay.testing.pki import EmulatorPKI
from relay.testing.tokens import GRAPH_AUDIENCE, TokenIssuer

MAILBOX = "robot@contoso.com"
OTHER = "other@contoso.com"
SEND_AS = "alerts@contoso.com"
FOREIGN = "someone@fabrikam.com"
ALL_GRAPH_ROLES = frozenset({MAIL_SEND, MAIL_READWRITE})


@functools.cache
def pki() -> EmulatorPKI:
    return EmulatorPKI()


@functools.cache
def issuer() -> TokenIssuer:
    return TokenIssuer()


@dataclass
class GraphKit:
    service: GraphService
    directory: Directory
    app: App
    tenant_id: str
    base: str  # https://127.0.0.1:<port>/v1.0
    http: aiohttp.ClientSession

    def token(
        self,
        *,
        roles: frozenset[str] | set[str] = ALL_GRAPH_ROLES,
        lifetime: float = 3600,
        audience: str = GRAPH_AUDIENCE,
        tenant_id: str | None = None,
    ) -> str:
        return issuer().issue(
            audience=audience,
            tenant_id=tenant_id or self.tenant_id,
            app_id=self.app.client_id,
            roles=roles,
            object_id=self.app.object_id,
            lifetime=lifetime,
        )

    def auth(self, **token_options: object) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**token_options)}"}  # type: ignore[arg-type]

    def url(self, path: str) -> str:
        """`path` under /v1.0, e.g. "/users/robot@contoso.com/messages"."""
        return self.base + path


@asynccontextmanager
async def graph_kit(**service_options: int) -> AsyncIterator[GraphKit]:
    directory = Directory()
    tenant = directory.add_tenant(domain="contoso.com")
    app = tenant.add_app(secret="s3cret")
    tenant.add_mailbox(MAILBOX, full_access=[app], send_as=[SEND_AS])
    tenant.add_mailbox(OTHER, full_access=[app])
    directory.add_tenant(domain="fabrikam.com").add_mailbox(FOREIGN)
    service = GraphService(directory, issuer(), **service_options)
    runner = web.AppRunner(service.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki().server_context())
    await site.start()
    port = runner.addresses[0][1]
    connector = aiohttp.TCPConnector(ssl=pki().client_context())
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            yield GraphKit(
                service=service,
                directory=directory,
                app=app,
                tenant_id=tenant.tenant_id,
                base=f"https://127.0.0.1:{port}/v1.0",
                http=http,
            )
    finally:
        await runner.cleanup()


def mime(
    *,
    subject: str = "Pump 7 pressure low",
    sender: str = f"Robot <{MAILBOX}>",
    to: str = "Ops <ops@example.org>",
    body: str = "Check pump 7.\n",
    **headers: str,
) -> bytes:
    """A small RFC 5322 message (CRLF) as an application would send it."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate()
    message["Message-ID"] = make_msgid(domain="app.example.org")
    for name, value in headers.items():
        del message[name.replace("_", "-")]
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
