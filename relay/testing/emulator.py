"""All emulated Exchange Online services together, over real sockets: the identity platform
(HTTPS) and SMTP submission (STARTTLS), sharing one directory, one token issuer and one CA.

Takes a `Directory` (or builds the sample tenant with `sample_tenant()`); leaves the CA
certificate in `state_dir/ca.pem` for clients to trust. `start()` binds every port (port 0 picks
a free one) or raises the bind error with everything already started shut down again; a second
`start()`, or one after `aclose()`, raises `RuntimeError`. `aclose()` stops every service even
if one of them fails to stop.
"""

from __future__ import annotations

import datetime
import functools
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from relay.testing.directory import Directory
from relay.testing.graph import GraphService
from relay.testing.identity import IdentityPlatform
from relay.testing.pki import EmulatorPKI
from relay.testing.smtp import SmtpSubmission
from relay.testing.tokens import TokenIssuer

# The sample tenant (`relay emulator` without --config, `relay demo`, tests): fixed ids, so a
# relay.yaml written against one run keeps working against the next.
SAMPLE_DOMAIN = "contoso.com"
SAMPLE_TENANT_ID = "6f3b9c2e-41d7-4a58-9c0e-2d7f5b1a8e34"
SAMPLE_CLIENT_ID = "0e8f4a6d-93b2-4c71-a5d8-7b1e2f9c3a60"  # the app with a client secret
SAMPLE_CLIENT_SECRET = "Qx48Q~emulator.sample.secret-not.for.production"
SAMPLE_CERT_CLIENT_ID = "4c2d7e91-5a6b-4f38-8e0d-1b9a3c6f7e25"  # the app with a certificate
SAMPLE_MAILBOX = "relay@contoso.com"
SAMPLE_SHARED_MAILBOX = "shared@contoso.com"
SAMPLE_SEND_AS = "alerts@contoso.com"  # relay@ may also send as this address

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class SampleTenant:
    """A ready directory and the credentials that work against it."""

    directory: Directory = field(repr=False)  # its App.secrets would show the secret
    tenant_id: str
    domain: str
    client_id: str
    client_secret: str = field(repr=False)
    cert_client_id: str
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    mailbox: str
    shared_mailbox: str
    send_as: str


def sample_tenant() -> SampleTenant:
    """A fresh directory with tenant contoso.com, two apps and two mailboxes granted to both.

    `relay@contoso.com` may also send as `alerts@contoso.com`; `shared@contoso.com` is a shared
    mailbox. Every app holds all app permissions (SMTP.SendAsApp, Mail.Send, Mail.ReadWrite).
    """
    cert_pem, key_pem = _sample_certificate()
    directory = Directory()
    tenant = directory.add_tenant(SAMPLE_TENANT_ID, domain=SAMPLE_DOMAIN)
    secret_app = tenant.add_app(SAMPLE_CLIENT_ID, secret=SAMPLE_CLIENT_SECRET)
    cert_app = tenant.add_app(SAMPLE_CERT_CLIENT_ID, certificate=cert_pem)
    apps = [secret_app, cert_app]
    tenant.add_mailbox(SAMPLE_MAILBOX, full_access=apps, send_as=[SAMPLE_SEND_AS])
    tenant.add_mailbox(SAMPLE_SHARED_MAILBOX, full_access=apps)
    return SampleTenant(
        directory=directory,
        tenant_id=SAMPLE_TENANT_ID,
        domain=SAMPLE_DOMAIN,
        client_id=SAMPLE_CLIENT_ID,
        client_secret=SAMPLE_CLIENT_SECRET,
        cert_client_id=SAMPLE_CERT_CLIENT_ID,
        cert_pem=cert_pem,
        key_pem=key_pem,
        mailbox=SAMPLE_MAILBOX,
        shared_mailbox=SAMPLE_SHARED_MAILBOX,
        send_as=SAMPLE_SEND_AS,
    )


def self_signed_certificate(common_name: str) -> tuple[bytes, bytes]:
    """A (certificate PEM, unencrypted private key PEM) pair, as an app registration uses.

    RSA 2048, valid from an hour ago for a year: what `New-SelfSignedCertificate` or openssl
    would make for an app credential.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@functools.cache
def _sample_certificate() -> tuple[bytes, bytes]:
    # One key per process: RSA key generation is the slow part of building a sample tenant.
    return self_signed_certificate("relay emulator sample app")


class HttpsServer:
    """An aiohttp application on a TLS socket (the identity platform, Graph).

    `aclose()` cuts open connections rather than waiting for clients to finish a TLS shutdown:
    a service that goes away resets its connections, and a client that keeps one open (a relay
    under test) must not hold the emulator's stop.
    """

    def __init__(self, app: web.Application, *, ssl_context: ssl.SSLContext) -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._ssl_context = ssl_context
        self._port: int | None = None

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self._port = int(self._runner.addresses[0][1])

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("HttpsServer is not started")
        return self._port

    async def aclose(self) -> None:
        server = self._runner.server
        for handler in server.connections if server is not None else ():
            if handler.transport is not None:
                handler.transport.abort()
        await self._runner.cleanup()


class EmulatorState(Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class Emulator:
    def __init__(
        self,
        directory: Directory | None = None,
        *,
        state_dir: Path,
        host: str = "127.0.0.1",
        smtp_port: int = 0,
        identity_port: int = 0,
        graph_port: int = 0,
        token_lifetime: float = 3599,
        refresh_in: float | None = None,
    ) -> None:
        self.directory = directory if directory is not None else Directory()
        self.state_dir = state_dir
        self.host = host
        self._graph_port = graph_port  # 0: any free port
        self._smtp_port = smtp_port
        self._identity_port = identity_port  # 0: any free port
        self._url_host = "127.0.0.1" if host in _WILDCARD_HOSTS else host
        self.pki = EmulatorPKI(*dict.fromkeys(("127.0.0.1", "localhost", self._url_host)))
        self.issuer = TokenIssuer()
        self.identity = IdentityPlatform(
            self.directory, self.issuer, token_lifetime=token_lifetime, refresh_in=refresh_in
        )
        self._identity_server = HttpsServer(
            self.identity.app, ssl_context=self.pki.server_context()
        )
        self.smtp = SmtpSubmission(
            self.directory, self.issuer, tls_context=self.pki.server_context()
        )
        self.graph = GraphService(self.directory, self.issuer)
        self._graph_server = HttpsServer(self.graph.app, ssl_context=self.pki.server_context())
        self.ca_file = state_dir / "ca.pem"
        self.state = EmulatorState.NEW
        self._stack = AsyncExitStack()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not EmulatorState.NEW:
            raise RuntimeError(f"Emulator is {self.state.value}; an emulator starts only once")
        self.state = EmulatorState.CLOSED  # until every service is up: a failed start is final
        async with AsyncExitStack() as stack:
            self.pki.write_ca(self.ca_file)
            await self._identity_server.start(self.host, self._identity_port)
            stack.push_async_callback(self._identity_server.aclose)
            await self.smtp.start(self.host, self._smtp_port)
            stack.push_async_callback(self.smtp.aclose)
            await self._graph_server.start(self.host, self._graph_port)
            stack.push_async_callback(self._graph_server.aclose)
            self._stack = stack.pop_all()
        self.state = EmulatorState.RUNNING

    async def aclose(self) -> None:
        if self.state is EmulatorState.CLOSED:
            return
        self.state = EmulatorState.CLOSED
        await self._stack.aclose()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        if self.state is not EmulatorState.RUNNING:
            return f"<Emulator {self.state.value}>"
        return f"<Emulator running authority={self.authority} smtp={self.endpoints['smtp']}>"

    # -- where clients connect -----------------------------------------------------------------

    @property
    def authority(self) -> str:
        """The identity platform's base URL; clients append the tenant (`authority_for`)."""
        self._require_running()
        return f"https://{_url_netloc(self._url_host, self._identity_server.port)}"

    def authority_for(self, tenant: str) -> str:
        """The MSAL authority for `tenant` (id or domain)."""
        return f"{self.authority}/{tenant}"

    @property
    def smtp_host(self) -> str:
        self._require_running()
        return self._url_host

    @property
    def smtp_port(self) -> int:
        self._require_running()
        return self.smtp.port

    @property
    def endpoints(self) -> dict[str, str]:
        """The running endpoints under relay.yaml's `endpoints:` keys."""
        return {
            "authority": self.authority,
            "smtp": _url_netloc(self.smtp_host, self.smtp_port),
            "graph": self.graph_url,
        }

    @property
    def graph_port(self) -> int:
        self._require_running()
        return self._graph_server.port

    @property
    def graph_url(self) -> str:
        """Graph's v1.0 base URL (where `https://graph.microsoft.com/v1.0` is for real)."""
        return f"https://{_url_netloc(self._url_host, self.graph_port)}/v1.0"

    def _require_running(self) -> None:
        if self.state is not EmulatorState.RUNNING:
            raise RuntimeError(f"Emulator is {self.state.value}; its endpoints exist while running")


def _url_netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
