"""relay.yaml -> typed, validated, frozen configuration.

Takes a file path (and the environment for `${VAR}` interpolation); gives a `Config` or raises
`ConfigError` naming the file, line and YAML path of the first mistake with a hint. Parsing has
no side effects: it opens no sockets, configures no logging and creates no directories.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MiB = 1024 * 1024


class Secret:
    """A secret value that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


class TlsMode(Enum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    mode: TlsMode = TlsMode.NONE
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ListenerAuth:
    required: bool = False


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    host: str
    port: int
    networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: ListenerAuth = field(default_factory=ListenerAuth)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_message_size: int = 35 * MiB
    max_recipients: int = 500
    max_line_length: int = 64 * 1024  # legacy apps emit long unwrapped lines


@dataclass(frozen=True, kw_only=True)
class UserConfig:
    name: str
    password_hash: Secret


@dataclass(frozen=True, kw_only=True)
class SpoolConfig:
    path: Path = Path("spool")
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0, 14400.0)  # the last one repeats
    max_age: float = 5 * 86400.0
    bounces: bool = True


class Cloud(Enum):
    GLOBAL = "global"
    USGOV = "usgov"
    USGOV_DOD = "usgov-dod"
    CHINA = "china"


@dataclass(frozen=True, kw_only=True)
class Endpoints:
    authority: str  # e.g. https://login.microsoftonline.com (the tenant is appended)
    smtp_host: str  # e.g. smtp.office365.com
    smtp_port: int  # 587
    graph: str  # e.g. https://graph.microsoft.com/v1.0


CLOUD_ENDPOINTS: Mapping[Cloud, Endpoints] = {
    Cloud.GLOBAL: Endpoints(
        authority="https://login.microsoftonline.com",
        smtp_host="smtp.office365.com",
        smtp_port=587,
        graph="https://graph.microsoft.com/v1.0",
    ),
    Cloud.USGOV: Endpoints(
        authority="https://login.microsoftonline.us",
        smtp_host="smtp.office365.us",
        smtp_port=587,
        graph="https://graph.microsoft.us/v1.0",
    ),
    Cloud.USGOV_DOD: Endpoints(
        authority="https://login.microsoftonline.us",
        smtp_host="smtp.office365.us",
        smtp_port=587,
        graph="https://dod-graph.microsoft.us/v1.0",
    ),
    Cloud.CHINA: Endpoints(
        authority="https://login.chinacloudapi.cn",
        smtp_host="smtp.partner.outlook.cn",
        smtp_port=587,
        graph="https://microsoftgraph.chinacloudapi.cn/v1.0",
    ),
}


class CredentialKind(Enum):
    SECRET = "client_secret"
    CERTIFICATE = "certificate"
    FEDERATED = "federated_token_file"


@dataclass(frozen=True, kw_only=True)
class Credential:
    kind: CredentialKind
    secret: Secret | None = None  # client_secret (read from client_secret_file when given)
    key_file: Path | None = None  # certificate: PEM private key
    cert_file: Path | None = None  # certificate: PEM certificate
    pfx_file: Path | None = None  # certificate: PKCS#12 instead of the two PEM files
    passphrase: Secret | None = None  # for an encrypted key or PFX
    federated_token_file: Path | None = None  # read afresh on every token request


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    name: str
    cloud: Cloud
    tenant_id: str
    client_id: str
    credential: Credential
    endpoints: Endpoints
    ca_file: Path | None = None  # extra trust anchors for the identity platform, SMTP, Graph


class Transport(Enum):
    SMTP = "smtp"
    GRAPH = "graph"


class SenderPolicy(Enum):
    KEEP = "keep"
    REWRITE = "rewrite"


@dataclass(frozen=True, kw_only=True)
class Rate:
    count: int
    per: float  # seconds

    @property
    def interval(self) -> float:
        """Seconds between two sends at this rate."""
        return self.per / self.count


@dataclass(frozen=True, kw_only=True)
class RouteMatch:
    """Every criterion is optional (empty = any); criteria combine with AND, lists mean any-of."""

    senders: tuple[str, ...] = ()  # globs on the envelope sender
    from_headers: tuple[str, ...] = ()  # globs on the From header address
    recipients: tuple[str, ...] = ()  # globs
    clients: tuple[IPNetwork, ...] = ()
    users: tuple[str, ...] = ()  # authenticated local users


@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    name: str
    account: str
    mailbox: str
    match: RouteMatch = field(default_factory=RouteMatch)
    transport: Transport = Transport.SMTP
    sender: SenderPolicy = SenderPolicy.KEEP
    send_as: tuple[str, ...] = ()
    rate: Rate = field(default_factory=lambda: Rate(count=30, per=60.0))
    connections: int = 3
    max_recipients: int = 500  # per upstream transaction (Exchange's RecipientLimits)
    save_to_sent_items: bool = True


class AfterImport(Enum):
    MARK_READ = "mark_read"
    MOVE_TO = "move_to"
    DELETE = "delete"


@dataclass(frozen=True, kw_only=True)
class InboundConfig:
    name: str
    account: str
    mailbox: str
    folder: str = "inbox"
    poll_interval: float = 30.0
    deliver: Mapping[str, object] = field(default_factory=dict)  # one sink kind -> its settings
    after: AfterImport = AfterImport.MARK_READ
    move_to: str | None = None


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9025


class LogFormat(Enum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    format: LogFormat = LogFormat.TEXT
    level: str = "INFO"


@dataclass(frozen=True, kw_only=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    accounts: Mapping[str, AccountConfig]
    routes: tuple[RouteConfig, ...]
    limits: Limits = field(default_factory=Limits)
    users: Mapping[str, UserConfig] = field(default_factory=dict)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    inbound: tuple[InboundConfig, ...] = ()
    admin: AdminConfig | None = None
    log: LogConfig = field(default_factory=LogConfig)
    source: Path | None = None  # the file it came from
