"""The emulator's tenant directory: tenants, app registrations, mailboxes and their grants.

One `Directory` is shared by every emulated service, as Entra ID and Exchange Online share one
tenant. Tests build it in code; `relay emulator` builds it from a small YAML file. Nothing here
does I/O.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

MiB = 1024 * 1024

# Exchange Online defaults (reference §5.1).
DEFAULT_MAX_SEND_SIZE = 35 * 1000 * 1000  # "35 MB" as the service counts it
DEFAULT_RECIPIENT_LIMIT = 500
DEFAULT_DAILY_RECIPIENTS = 10_000

# Application permissions as they appear in a token's `roles` claim.
SMTP_SEND_AS_APP = "SMTP.SendAsApp"
MAIL_SEND = "Mail.Send"
MAIL_READWRITE = "Mail.ReadWrite"
ALL_ROLES = frozenset({SMTP_SEND_AS_APP, MAIL_SEND, MAIL_READWRITE})


@dataclass
class Secret:
    value: str = field(repr=False)
    expires: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or datetime.now(UTC)) >= self.expires


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential (workload identity): tokens from `issuer` about `subject`
    for `audience` stand for the app. Entra fetches the issuer's signing keys from its OIDC
    discovery document; the emulator is given the key (`public_key_pem`) instead."""

    issuer: str
    subject: str
    public_key_pem: bytes = field(repr=False)
    audience: str = "api://AzureADTokenExchange"


@dataclass
class App:
    """An app registration with its enterprise application (service principal) in one tenant."""

    client_id: str
    display_name: str = "relay"
    secrets: list[Secret] = field(default_factory=list)
    certificates: list[bytes] = field(default_factory=list)  # PEM certificates
    federated_credentials: list[FederatedCredential] = field(default_factory=list)
    roles: set[str] = field(default_factory=lambda: set(ALL_ROLES))  # consented app permissions
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))  # service principal id
    public_client: bool = False  # "Allow public client flows": device-code sign-in without secret
    delegated_permissions: set[str] | None = None  # consented for users (scp); None: all of them

    def add_secret(self, value: str, *, expires: datetime | None = None) -> Secret:
        secret = Secret(value, expires)
        self.secrets.append(secret)
        return secret

    def add_certificate(self, cert_pem: bytes) -> None:
        self.certificates.append(cert_pem)

    def add_federated_credential(
        self, issuer: str, subject: str, public_key_pem: bytes
    ) -> FederatedCredential:
        credential = FederatedCredential(issuer, subject, public_key_pem)
        self.federated_credentials.append(credential)
        return credential


@dataclass
class Mailbox:
    address: str
    full_access: set[str] = field(default_factory=set)  # client ids (Add-MailboxPermission)
    send_as: set[str] = field(default_factory=set)  # other addresses it may send as
    smtp_auth_enabled: bool = True  # Set-CASMailbox -SmtpClientAuthenticationDisabled
    max_send_size: int = DEFAULT_MAX_SEND_SIZE
    recipient_limit: int = DEFAULT_RECIPIENT_LIMIT
    daily_recipient_limit: int = DEFAULT_DAILY_RECIPIENTS

    def may_send_as(self, address: str) -> bool:
        a = address.lower()
        return a == self.address.lower() or a in {s.lower() for s in self.send_as}


@dataclass
class Tenant:
    tenant_id: str
    domains: list[str]
    apps: dict[str, App] = field(default_factory=dict)
    mailboxes: dict[str, Mailbox] = field(default_factory=dict)  # lower-case address -> Mailbox
    smtp_auth_enabled: bool = True  # Set-TransportConfig -SmtpClientAuthenticationDisabled

    def add_app(
        self,
        client_id: str | None = None,
        *,
        secret: str | None = None,
        certificate: bytes | None = None,
        roles: set[str] | None = None,
    ) -> App:
        app = App(client_id or str(uuid.uuid4()))
        if secret is not None:
            app.add_secret(secret)
        if certificate is not None:
            app.add_certificate(certificate)
        if roles is not None:
            app.roles = set(roles)
        self.apps[app.client_id] = app
        return app

    def add_mailbox(
        self,
        address: str,
        *,
        full_access: list[App] | None = None,
        send_as: list[str] | None = None,
        **settings: object,
    ) -> Mailbox:
        box = Mailbox(address, **settings)  # type: ignore[arg-type]
        box.full_access = {a.client_id for a in full_access or []}
        box.send_as = set(send_as or [])
        self.mailboxes[address.lower()] = box
        return box


@dataclass
class Directory:
    tenants: dict[str, Tenant] = field(default_factory=dict)

    def add_tenant(self, tenant_id: str | None = None, *, domain: str = "contoso.com") -> Tenant:
        tenant = Tenant(
            tenant_id or str(uuid.uuid4()), [domain, domain.split(".")[0] + ".onmicrosoft.com"]
        )
        self.tenants[tenant.tenant_id] = tenant
        return tenant

    def tenant(self, id_or_domain: str) -> Tenant | None:
        """A tenant by GUID or by one of its verified domains, as the identity platform finds it."""
        key = id_or_domain.lower()
        for tenant in self.tenants.values():
            if tenant.tenant_id.lower() == key or key in (d.lower() for d in tenant.domains):
                return tenant
        return None

    def mailbox(self, address: str) -> tuple[Tenant, Mailbox] | None:
        key = address.lower()
        for tenant in self.tenants.values():
            box = tenant.mailboxes.get(key)
            if box is not None:
                return tenant, box
        return None
