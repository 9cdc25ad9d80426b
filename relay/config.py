"""relay.yaml -> typed, validated, frozen configuration.

Takes a file path (and the environment for `${VAR}` interpolation); gives a `Config` or raises
`ConfigError` naming the file, the line and the YAML path of the first mistake, with a hint:

    relay.yaml:14: routes[0].account: unknown account 'contso' (did you mean 'contoso'?)

The loader stops at the first mistake, so each message stands alone and is exact; fix it and run
`relay check` again. Parsing has no side effects: it opens no sockets, configures no logging and
creates no directories. It reads only the files the config names: `*_file` secrets are read now;
an account's certificate is opened with its passphrase and its CA bundle loaded, to prove they
work; listener certificates and a federated token file (which rotates) are only opened.

Rules the loader applies everywhere:
  * unknown keys, duplicate keys and values of the wrong type are errors;
  * `${VAR}` and `${VAR:-default}` are replaced in every string value (`$${` is a literal `${`);
    an unquoted value is then read as YAML would read the result (`${PORT:-25}` is a number);
  * relative paths are relative to the directory of the config file;
  * sizes: `35MiB`, `35MB`, `10KiB`, bare bytes; durations: `30s`, `5m`, `1h30m`, `5d`, bare
    seconds; rates: `30/min`, `2/s`, `1000/h`, `10000/day`;
  * secrets (client secrets, passphrases, password hashes) become `Secret` objects and are never
    echoed in an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from relay.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MiB = 1024 * 1024


def format_address(host: str, port: int) -> str:
    """host:port as relay.yaml writes it, IPv6 in brackets: [::1]:25."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        return format_address(self.host, self.port)


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
    DELEGATED = "delegated_user"  # a user signs in with `relay login`; no app credential


@dataclass(frozen=True, kw_only=True)
class Credential:
    kind: CredentialKind
    secret: Secret | None = None  # client_secret (read from client_secret_file when given)
    key_file: Path | None = None  # certificate: PEM private key
    cert_file: Path | None = None  # certificate: PEM certificate
    pfx_file: Path | None = None  # certificate: PKCS#12 instead of the two PEM files
    passphrase: Secret | None = None  # for an encrypted key or PFX
    federated_token_file: Path | None = None  # read afresh on every token request
    user: str | None = None  # delegated: the user who signs in, and the only mailbox it sends as


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    name: str
    cloud: Cloud
    tenant_id: str
    client_id: str
    credential: Credential
    endpoints: Endpoints
    ca_file: Path | None = None  # extra trust anchors for the identity platform, SMTP, Graph
    token_cache: Path | None = None  # delegated: where `relay login` leaves the user's tokens


TOKEN_CACHE_DIR = "tokens"  # under the spool path: one MSAL token cache per delegated account


@dataclass(frozen=True, kw_only=True)
class CertificatePair:
    """A certificate credential as MSAL takes it: both halves in PEM, the key unencrypted."""

    key_pem: bytes = field(repr=False)
    cert_pem: bytes


class CertificateProblem(ValueError):
    """A certificate credential that cannot be used; `key` names the relay.yaml key at fault."""

    def __init__(self, key: str, message: str, hint: str = "") -> None:
        self.key = key
        self.message = message
        self.hint = hint
        super().__init__(message)


def read_certificate(credential: Credential) -> CertificatePair:
    """Open a certificate credential (PEM key + certificate, or a PFX) with its passphrase.

    Raises `CertificateProblem` saying which file is wrong and how; never with the passphrase.
    """
    passphrase = credential.passphrase.reveal().encode() if credential.passphrase else None
    if credential.pfx_file is not None:
        key, cert = _read_pfx(credential.pfx_file, passphrase)
    else:
        assert credential.key_file is not None and credential.cert_file is not None
        key = _read_key(credential.key_file, passphrase)
        cert = _read_cert(credential.cert_file)
        if _public(key.public_key()) != _public(cert.public_key()):
            raise CertificateProblem(
                "cert_file",
                f"{credential.cert_file} is not the certificate of key_file {credential.key_file}",
                hint="give the certificate made with this key, as uploaded to the app registration",
            )
    if not isinstance(key, rsa.RSAPrivateKey):
        where = "pfx_file" if credential.pfx_file is not None else "key_file"
        raise CertificateProblem(
            where,
            "the key is not an RSA key",
            hint="Entra ID signs app credentials with RSA certificates",
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return CertificatePair(key_pem=key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM))


def _read_bytes(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateProblem(key, f"cannot read {path}: {exc.strerror}") from None


def _read_pfx(path: Path, passphrase: bytes | None) -> tuple[Any, x509.Certificate]:
    try:
        key, cert, _ = pkcs12.load_key_and_certificates(_read_bytes(path, "pfx_file"), passphrase)
    except ValueError:
        if passphrase is None:
            raise CertificateProblem(
                "pfx_file",
                f"cannot open {path}: not a PKCS#12 (.pfx) file, or it needs a passphrase",
                hint="give passphrase or passphrase_file if the file has one",
            ) from None
        raise CertificateProblem(
            "pfx_file", f"cannot open {path}: wrong passphrase, or not a PKCS#12 (.pfx) file"
        ) from None
    if key is None or cert is None:
        missing = "private key" if key is None else "certificate"
        raise CertificateProblem(
            "pfx_file",
            f"{path} holds no {missing}",
            hint="export the certificate with its private key",
        )
    return key, cert


def _read_key(path: Path, passphrase: bytes | None) -> Any:
    data = _read_bytes(path, "key_file")
    try:
        return serialization.load_pem_private_key(data, passphrase)
    except TypeError:  # encrypted without a passphrase, or a passphrase for a plain key
        if passphrase is None:
            raise CertificateProblem(
                "key_file",
                f"{path} is encrypted",
                hint="give passphrase or passphrase_file",
            ) from None
        raise CertificateProblem(
            "passphrase", f"key_file {path} is not encrypted", hint="remove the passphrase"
        ) from None
    except ValueError:
        reason = "wrong passphrase, or not" if passphrase is not None else "not"
        raise CertificateProblem(
            "key_file", f"cannot open {path}: {reason} a PEM private key"
        ) from None


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_bytes(path, "cert_file"))
    except ValueError:
        raise CertificateProblem("cert_file", f"{path} is not a PEM certificate") from None


def _public(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


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
    # Exactly one sink -> its setting: {"maildir": Path} | {"directory": Path}
    # | {"smtp": (host, port)} | {"http": "https://..."}
    deliver: Mapping[str, object] = field(default_factory=dict)
    after: AfterImport = AfterImport.MARK_READ
    move_to: str | None = None
    # match: which messages to import (any-of within a list, case-insensitive globs; empty = any).
    senders: tuple[str, ...] = ()  # on the From address
    subjects: tuple[str, ...] = ()  # on the subject
    max_size: int | None = None  # bigger messages are quarantined (left in the mailbox)


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9025

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


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


SINK_KINDS = ("maildir", "directory", "smtp", "http")  # the keys of InboundConfig.deliver
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Exchange Online's limits that bound config values (reference: exchange-online.md §5).
EXCHANGE_MAX_CONNECTIONS = 3  # concurrent SMTP AUTH connections per mailbox
EXCHANGE_MAX_RECIPIENTS = 1000  # RecipientLimits can be raised to at most 1000


def load(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a relay.yaml; `environ` (default: os.environ) feeds `${VAR}`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", file=path) from None
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text", file=path) from None
    return loads(text, source=str(path), environ=environ)


def loads(
    text: str, *, source: str = "relay.yaml", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate relay.yaml text; `source` names it in errors and anchors relative paths."""
    src = _Source(
        file=source,
        base_dir=Path(source).absolute().parent,
        environ=os.environ if environ is None else environ,
    )
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, source) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            "YAML syntax error: a control character is not allowed here", file=source, line=line
        ) from None
    if root is None:
        raise ConfigError(
            "the file is empty", file=source, hint="start from the annotated sample relay.yaml"
        )
    return dataclasses.replace(_config(_At(root, "", src)), source=Path(source))


def _syntax_error(exc: yaml.MarkedYAMLError, source: str) -> ConfigError:
    # Built from the parser's own words and marks only: its snippet of the line could hold a
    # secret.
    mark = exc.problem_mark or exc.context_mark
    hint = exc.context or ""
    context = exc.context_mark
    if hint and context is not None and mark is not None and context.line != mark.line:
        hint = f"{hint} that starts on line {context.line + 1}"
    return ConfigError(
        f"YAML syntax error: {exc.problem or exc.context}",
        file=source,
        line=mark.line + 1 if mark is not None else None,
        hint=hint,
    )


# --- the located node --------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_KINDS = {
    "map": "a mapping",
    "seq": "a list",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "null": "nothing",
    "timestamp": "a date",
    "merge": "a merge key (<<)",
}
_RESOLVER = Resolver()
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

T = TypeVar("T")
E = TypeVar("E", bound=Enum)


@dataclass(frozen=True)
class _Source:
    file: str
    base_dir: Path
    environ: Mapping[str, str]


@dataclass(frozen=True)
class _At:
    """A YAML node and where it is: its YAML path, its line, the file it came from."""

    node: yaml.Node
    path: str
    src: _Source

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    @property
    def tag(self) -> str:
        return self.node.tag.removeprefix(_TAG)

    @property
    def kind(self) -> str:
        return _KINDS.get(self.tag, f"a value tagged {self.node.tag}")

    @property
    def is_null(self) -> bool:
        return self.tag == "null"

    def error(self, message: str, hint: str = "") -> ConfigError:
        return ConfigError(message, file=self.src.file, line=self.line, path=self.path, hint=hint)

    def child(self, node: yaml.Node, key: str | int) -> _At:
        if isinstance(key, int):
            return _At(node, f"{self.path}[{key}]", self.src)
        return _At(node, f"{self.path}.{key}" if self.path else key, self.src)

    # structure

    def mapping(self, keys: Sequence[str] | None) -> _Map:
        """The mapping here (nothing = empty); `keys` are the allowed ones (None: any name)."""
        if self.is_null:
            return _Map(self, {})
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {self.kind}")
        entries: dict[str, tuple[_At, _At]] = {}
        for key_node, value_node in self.node.value:
            key_at = _At(key_node, self.path, self.src)
            if not isinstance(key_node, yaml.ScalarNode) or key_at.tag != "str":
                raise key_at.error(f"expected a name as key, got {key_at.kind}")
            key = key_node.value
            key_at = self.child(key_node, key)
            if key in entries:
                first = entries[key][0].line
                raise key_at.error(f"duplicate key (first given on line {first})")
            if keys is not None and key not in keys:
                raise key_at.error("unknown key", hint=_suggest(key, keys))
            entries[key] = (key_at, self.child(value_node, key))
        return _Map(self, entries)

    def items(self) -> list[_At]:
        """The list here (nothing = empty)."""
        if self.is_null:
            return []
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {self.kind}")
        return [self.child(node, i) for i, node in enumerate(self.node.value)]

    def one_or_more(self, convert: Callable[[_At], T]) -> tuple[T, ...]:
        """A single value or a non-empty list of them."""
        if not isinstance(self.node, yaml.SequenceNode):
            return (convert(self),)
        items = self.items()
        if not items:
            raise self.error("empty list", hint="remove the key to match any")
        return tuple(convert(item) for item in items)

    # scalars

    def scalar(self, expected: str) -> tuple[str, str]:
        """(tag, text) of the scalar here, `${VAR}` replaced in strings."""
        node = self.node
        if not isinstance(node, yaml.ScalarNode) or self.is_null:
            raise self.error(f"expected {expected}, got {self.kind}")
        if self.tag != "str":
            return self.tag, node.value
        text = _REFERENCE.sub(self._substitute, node.value)
        if node.style is None and text != node.value:
            # Unquoted: read the result as YAML would have read it written there.
            resolved = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)).removeprefix(_TAG)
            return (resolved if resolved in ("bool", "int", "float") else "str"), text
        return "str", text

    def _substitute(self, match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        inner = match.group(1)
        if inner is None:
            raise self.error("unclosed ${", hint="write ${NAME} or ${NAME:-default}")
        name, has_default, default = inner.partition(":-")
        if not _VARIABLE.fullmatch(name):
            raise self.error(f"malformed ${{{inner}}}", hint="write ${NAME} or ${NAME:-default}")
        value = self.src.environ.get(name)
        if value:
            return value
        if has_default:
            return default
        state = "not set" if value is None else "set but empty"
        raise self.error(
            f"environment variable {name} is {state}",
            hint=f"set it, or give a default: ${{{name}:-...}}",
        )

    def value(self, tag: str, expected: str, hint: str = "") -> Any:
        """The scalar here as a Python value, when its tag is `tag`."""
        got, text = self.scalar(expected)
        if got != tag:
            raise self.error(f"expected {expected}, got {_KINDS[got]}", hint=hint)
        return SafeConstructor().construct_object(yaml.ScalarNode(_TAG + tag, text))

    def string(self) -> str:
        text: str = self.value("str", "a string", hint="put it in quotes")
        if not text.strip():
            raise self.error("must not be empty")
        return text

    def text(self, expected: str) -> str:
        """The scalar's text, for values with their own syntax (sizes, addresses, rates...)."""
        tag, text = self.scalar(expected)
        if tag not in ("str", "int", "float"):
            raise self.error(f"expected {expected}, got {_KINDS[tag]}")
        return text.strip()

    def boolean(self) -> bool:
        return bool(self.value("bool", "true or false"))

    def integer(self, low: int, high: int | None = None, hint: str = "") -> int:
        number: int = self.value("int", "an integer")
        if number < low or (high is not None and number > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise self.error(f"expected an integer {span}, got {number}", hint=hint)
        return number

    def choice(self, options: Sequence[str]) -> str:
        expected = "one of " + ", ".join(options)
        word = self.value("str", expected)
        if word not in options:
            raise self.error(f"{word!r} is not {expected}", hint=_did_you_mean(word, options))
        return str(word)

    def enum(self, kind: type[E], options: Sequence[E] | None = None) -> E:
        members = list(kind) if options is None else list(options)
        return kind(self.choice([m.value for m in members]))

    def secret(self) -> Secret:
        return Secret(self.string())

    def fs_path(self) -> Path:
        return self.src.base_dir / self.string()

    def readable_file(self) -> Path:
        """A path that must name a readable file (certificates, keys, CA bundles)."""
        path = self.fs_path()
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise self.error(f"cannot read {path}: {exc.strerror}") from None
        return path

    def secret_file(self) -> Secret:
        """The secret in a file: its text less one trailing newline."""
        path = self.fs_path()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise self.error(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise self.error(f"{path} is not UTF-8 text") from None
        text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
        if not text:
            raise self.error(f"{path} is empty")
        return Secret(text)


class _Map:
    """A YAML mapping whose keys were checked: allowed, unique, names."""

    def __init__(self, at: _At, entries: dict[str, tuple[_At, _At]]) -> None:
        self.at = at
        self._entries = entries

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, key: str) -> _At | None:
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def key(self, key: str) -> _At:
        """The key itself, for errors about its presence."""
        return self._entries[key][0]

    def require(self, key: str, hint: str = "") -> _At:
        entry = self._entries.get(key)
        if entry is None:
            raise self.at.error(f"missing {key}", hint=hint)
        return entry[1]

    def section(self, key: str) -> _At:
        """The value of `key`, or nothing (an empty section) located at this mapping."""
        at = self.get(key)
        if at is not None:
            return at
        null = yaml.ScalarNode(_TAG + "null", "", self.at.node.start_mark, self.at.node.end_mark)
        return self.at.child(null, key)

    def put(
        self, into: dict[str, Any], key: str, convert: Callable[[_At], Any], attr: str = ""
    ) -> None:
        """into[attr or key] = convert(value) when the key is given (else the default applies)."""
        at = self.get(key)
        if at is not None:
            into[attr or key] = convert(at)

    def named(self) -> list[tuple[str, _At]]:
        """The entries of a {name: settings} mapping, in file order."""
        return [(key, self._entries[key][1]) for key in self._entries]


def _suggest(word: str, options: Sequence[str]) -> str:
    return _did_you_mean(word, options) or "known keys here: " + ", ".join(options)


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = [o for o in options if o.lower() == word.lower()]
    return f"did you mean {close[0]!r}?" if close else ""


# --- value syntaxes ----------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_DURATION = re.compile(
    r"(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?"
    r"(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?"
)
DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_RATE = re.compile(r"(\d+)\s*/\s*([a-z]+)")
RATE_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_MAILBOX = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def _size(at: _At) -> int:
    expected = "a size like 35MiB"
    text = at.text(expected)
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        hint = "units: B, KB, MB, GB (1000) or KiB, MiB, GiB (1024); a bare number is bytes"
        if unit in ("k", "m", "g"):
            number, unit = match.group(1) if match else "35", unit.upper()
            hint = f"write {number}{unit}iB (1024-based) or {number}{unit}B (1000-based)"
        raise at.error(f"expected {expected}, got {text!r}", hint=hint)
    size = round(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise at.error(f"expected a size above zero, got {text!r}")
    return size


def _duration(at: _At) -> float:
    expected = "a duration like 30s, 5m, 1h30m or 5d"
    text = at.text(expected)
    match = _DURATION.fullmatch(text)
    if text.replace(".", "", 1).isdigit():
        seconds = float(text)
    elif match is not None and text:
        seconds = sum(float(v) * DURATION_UNITS[u] for u, v in match.groupdict().items() if v)
    else:
        raise at.error(f"expected {expected}, got {text!r}", hint="units: d, h, m, s")
    if seconds <= 0:
        raise at.error(f"expected a duration above zero, got {text!r}")
    return seconds


def _rate(at: _At) -> Rate:
    expected = "a rate like 30/min"
    text = at.text(expected)
    match = _RATE.fullmatch(text)
    if match is None or match.group(2) not in RATE_UNITS or int(match.group(1)) < 1:
        raise at.error(f"expected {expected}, got {text!r}", hint="per s, min, h or day")
    return Rate(count=int(match.group(1)), per=RATE_UNITS[match.group(2)])


def _network(at: _At) -> IPNetwork:
    text = at.text("a network like 10.0.0.0/8")
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        hint = "write an address or a network in CIDR form, like 10.0.0.0/8 or ::1/128"
        if "host bits set" in str(exc):
            hint = f"did you mean {ipaddress.ip_network(text, strict=False)}?"
        raise at.error(f"not a network: {text!r}", hint=hint) from None


def _host_port(at: _At, *, low_port: int) -> tuple[str, int]:
    """`host:port`, `[ipv6]:port`; port 0 (any free port) allowed where low_port is 0."""
    expected = "an address like 127.0.0.1:2525"
    if isinstance(at.node, yaml.SequenceNode):
        # [::1]:25 unquoted is a YAML list.
        raise at.error(f"expected {expected}, got a list", hint='quote IPv6 like "[::1]:25"')
    text = at.text(expected)
    bracketed = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text)
    if bracketed:
        host, port = bracketed.groups()
    else:
        host, _, port = text.rpartition(":")
    if ":" in host and not bracketed:
        raise at.error(f"expected {expected}, got {text!r}", hint='write IPv6 as "[::1]:25"')
    if not host or not port.isdigit():
        raise at.error(f"expected {expected}, got {text!r}", hint="host and port are both needed")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not _HOSTNAME.fullmatch(host):
            raise at.error(f"not a host name or IP address: {host!r}") from None
    else:
        if bracketed and ip.version != 6:
            raise at.error(f"only IPv6 addresses go in brackets, got {text!r}")
    if not low_port <= int(port) <= 65535:
        raise at.error(f"port {port} is out of range", hint=f"ports go from {low_port} to 65535")
    return host, int(port)


def _url(at: _At, schemes: Sequence[str]) -> str:
    expected = f"an {' or '.join(schemes)} URL"
    text = at.text(expected)
    parts = urlsplit(text)
    if parts.scheme not in schemes or not parts.hostname:
        raise at.error(f"expected {expected}, got {text!r}")
    return text.rstrip("/")


def _name(at: _At) -> str:
    name = at.string()
    _check_name(name, at)
    return name


def _check_name(name: str, at: _At) -> None:
    if not _NAME.fullmatch(name):
        raise at.error(
            f"not a valid name: {name!r}",
            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )


def _mailbox(at: _At) -> str:
    address = at.string()
    if not _MAILBOX.fullmatch(address):
        raise at.error(f"expected a mailbox address like relay@contoso.com, got {address!r}")
    return address


def _pattern(at: _At) -> str:
    pattern = at.string()
    if any(c.isspace() for c in pattern):
        raise at.error(f"a pattern has no spaces, got {pattern!r}", hint="like *@contoso.com")
    return pattern


def _reference(at: _At, defined: Mapping[str, object], what: str, section: str) -> str:
    name = at.string()
    if name in defined:
        return name
    if not defined:
        hint = f"no {what}s are defined; add one under {section}"
    else:
        hint = _did_you_mean(name, list(defined)) or "defined: " + ", ".join(defined)
    raise at.error(f"unknown {what} {name!r}", hint=hint)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# --- sections ----------------------------------------------------------------------------------

# Each top-level section's parser; it may ask for the sections it refers to.
_Get = Callable[[str], Any]
_SECTIONS: dict[str, Callable[[_At, _Get], Any]] = {
    "listen": lambda at, get: [(item, _listener(item, get("users"))) for item in at.items()],
    "limits": lambda at, get: _limits(at),
    "users": lambda at, get: _users(at),
    "spool": lambda at, get: _spool(at),
    "accounts": lambda at, get: _accounts(at, get("spool")),
    "routes": lambda at, get: _routes(at, get("accounts"), get("users")),
    "inbound": lambda at, get: _inbound(at, get("accounts")),
    "admin": lambda at, get: None if at.is_null else _admin(at),
    "log": lambda at, get: _log(at),
}


def _config(root: _At) -> Config:
    if not isinstance(root.node, yaml.MappingNode):
        raise root.error(
            f"expected a mapping of sections ({', '.join(_SECTIONS)}), got {root.kind}"
        )
    top = root.mapping(list(_SECTIONS))
    parsed: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in parsed:
            parsed[name] = _SECTIONS[name](top.section(name), get)
        return parsed[name]

    for name in (*top.keys(), *_SECTIONS):  # in file order, so the first error is the first
        get(name)
    listen: list[tuple[_At, ListenerConfig]] = parsed["listen"]
    listeners = tuple(listener for _, listener in listen)
    accounts, routes, admin = parsed["accounts"], parsed["routes"], parsed["admin"]
    if listeners and not routes:
        example = next(iter(accounts), "contoso")
        raise top.section("routes").error(
            "no routes: mail from the listeners would have nowhere to go",
            hint=f"add one, e.g. routes: [{{name: default, account: {example}, "
            "mailbox: relay@contoso.com}]",
        )
    if not listeners and not parsed["inbound"]:
        raise root.error(
            "nothing to do", hint="add a listener under listen or a mailbox under inbound"
        )
    _check_addresses([*listen, (top.section("admin"), admin)] if admin else listen)
    return Config(
        listeners=listeners,
        accounts=accounts,
        routes=routes,
        limits=parsed["limits"],
        users=parsed["users"],
        spool=parsed["spool"],
        inbound=parsed["inbound"],
        admin=admin,
        log=parsed["log"],
    )


def _check_addresses(bound: Sequence[tuple[_At, ListenerConfig | AdminConfig]]) -> None:
    """No two listeners (or a listener and admin) on one address; port 0 picks a free one."""
    seen: dict[tuple[str, int], str] = {}
    for at, item in bound:
        key = (item.host, item.port)
        if item.port and key in seen:
            where = at.mapping(None).get("address") or at
            raise where.error(f"{item.address} is already used by {seen[key]}")
        seen[key] = at.path


def _limits(at: _At) -> Limits:
    m = at.mapping(("max_message_size", "max_recipients", "max_line_length"))
    kw: dict[str, Any] = {}
    m.put(kw, "max_message_size", _size)
    m.put(kw, "max_recipients", lambda a: a.integer(1))
    m.put(kw, "max_line_length", _size)
    return Limits(**kw)


def _users(at: _At) -> Mapping[str, UserConfig]:
    users = {}
    for name, user_at in at.mapping(None).named():
        if any(c.isspace() for c in name):
            raise user_at.error("a user name has no spaces")
        m = user_at.mapping(("password_hash",))
        hint = "from `relay hash-password`"
        users[name] = UserConfig(
            name=name, password_hash=_password_hash(m.require("password_hash", hint=hint))
        )
    return MappingProxyType(users)


def _password_hash(at: _At) -> Secret:
    """A hash starts with its scheme (`scrypt$...`); a plain password does not. Never shown."""
    stored = at.secret()
    scheme, dollar, _ = stored.reveal().partition("$")
    if not (dollar and scheme.replace("_", "").isalnum()):
        raise at.error(
            "not a password hash (a plain password?)",
            hint="store the output of `relay hash-password`, like scrypt$16384$8$1$...",
        )
    return stored


def _spool(at: _At) -> SpoolConfig:
    m = at.mapping(("path", "retry", "max_age", "bounces"))
    kw: dict[str, Any] = {}
    # The default path, like a given one, is relative to the config file's directory.
    kw["path"] = at.src.base_dir / SpoolConfig().path
    m.put(kw, "path", _At.fs_path)
    m.put(kw, "retry", _retry)
    m.put(kw, "max_age", _duration)
    m.put(kw, "bounces", _At.boolean)
    return SpoolConfig(**kw)


def _retry(at: _At) -> tuple[float, ...]:
    if not isinstance(at.node, yaml.SequenceNode) or not at.node.value:
        raise at.error(
            f"expected a list of durations, got {at.kind}", hint="like [1m, 5m, 15m, 1h, 4h]"
        )
    return tuple(_duration(item) for item in at.items())


# accounts

_CREDENTIALS = (
    "client_secret",
    "client_secret_file",
    "certificate",
    "federated_token_file",
    "delegated_user",
)
_ACCOUNT_KEYS = ("cloud", "tenant_id", "client_id", *_CREDENTIALS, "endpoints", "ca_file")


def _accounts(at: _At, spool: SpoolConfig) -> Mapping[str, AccountConfig]:
    accounts = {}
    for name, account_at in at.mapping(None).named():
        _check_name(name, account_at)
        accounts[name] = _account(name, account_at, spool)
    return MappingProxyType(accounts)


def _account(name: str, at: _At, spool: SpoolConfig) -> AccountConfig:
    m = at.mapping(_ACCOUNT_KEYS)
    kw: dict[str, Any] = {}
    m.put(kw, "cloud", lambda a: a.enum(Cloud))
    m.put(kw, "ca_file", _ca_file)
    cloud = kw.setdefault("cloud", Cloud.GLOBAL)
    tenant_id = _tenant_id(
        m.require("tenant_id", hint="the directory (tenant) ID of your Entra tenant")
    )
    client_id = _client_id(
        m.require("client_id", hint="the application (client) ID of your app registration")
    )
    credential = _credential(at, m)
    if credential.kind is CredentialKind.DELEGATED:
        kw["token_cache"] = spool.path / TOKEN_CACHE_DIR / f"{name}.json"
    return AccountConfig(
        name=name,
        tenant_id=tenant_id,
        client_id=client_id,
        credential=credential,
        endpoints=_endpoints(m.section("endpoints"), CLOUD_ENDPOINTS[cloud]),
        **kw,
    )


def _ca_file(at: _At) -> Path:
    """Trust anchors in PEM, as TLS will load them for the identity platform, SMTP and Graph."""
    path = at.readable_file()
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, UnicodeDecodeError):
        raise at.error(
            f"{path} holds no PEM certificate",
            hint="give CA certificates in PEM (-----BEGIN CERTIFICATE-----), like the "
            "emulator's ca.pem",
        ) from None
    return path


def _tenant_id(at: _At) -> str:
    tenant = at.string()
    if tenant.lower() in ("common", "organizations", "consumers"):
        raise at.error(
            f"{tenant!r} cannot get app-only tokens", hint="give your tenant's ID or domain"
        )
    if not (_GUID.fullmatch(tenant) or _DOMAIN.fullmatch(tenant)):
        # Not echoed: a secret pasted into the wrong key must not end up in a log.
        raise at.error(
            "expected a tenant ID (a GUID) or a tenant domain like contoso.onmicrosoft.com"
        )
    return tenant


def _client_id(at: _At) -> str:
    client = at.string()
    if not _GUID.fullmatch(client):
        raise at.error(
            "expected an application (client) ID, a GUID like 00000000-0000-0000-0000-000000000000",
            hint="it is on the app registration's Overview page; not the secret's ID or value",
        )
    return client


def _credential(at: _At, m: _Map) -> Credential:
    given = [key for key in _CREDENTIALS if key in m]
    if not given:
        raise at.error(
            "no credential",
            hint="give one of client_secret, client_secret_file, certificate, "
            "federated_token_file or delegated_user",
        )
    if len(given) > 1:
        second = m.key(given[1])
        raise _At(second.node, at.path, at.src).error(
            f"two credentials, {given[0]} and {given[1]}", hint="give exactly one"
        )
    if given[0] == "certificate":
        return _certificate(m.require("certificate"))
    if given[0] == "federated_token_file":
        return Credential(
            kind=CredentialKind.FEDERATED,
            federated_token_file=m.require("federated_token_file").readable_file(),
        )
    if given[0] == "delegated_user":
        return Credential(kind=CredentialKind.DELEGATED, user=_mailbox(m.require("delegated_user")))
    return Credential(kind=CredentialKind.SECRET, secret=_secret(m, "client_secret"))


def _secret(m: _Map, key: str) -> Secret | None:
    """`key` (the secret) or `key_file` (a file holding it), at most one of them."""
    value, file = m.get(key), m.get(f"{key}_file")
    if value is not None and file is not None:
        raise file.error(f"{key} is also given", hint=f"give {key} or {key}_file, not both")
    if file is not None:
        return file.secret_file()
    return value.secret() if value is not None else None


def _certificate(at: _At) -> Credential:
    m = at.mapping(("key_file", "cert_file", "pfx_file", "passphrase", "passphrase_file"))
    passphrase = _secret(m, "passphrase")
    if "pfx_file" in m:
        pem = [key for key in ("key_file", "cert_file") if key in m]
        if pem:
            raise m.key(pem[0]).error(
                "pfx_file is also given", hint="give pfx_file, or key_file and cert_file"
            )
        credential = Credential(
            kind=CredentialKind.CERTIFICATE,
            pfx_file=m.require("pfx_file").readable_file(),
            passphrase=passphrase,
        )
    else:
        hint = "PEM key_file and cert_file, or a pfx_file"
        key_file, cert_file = m.require("key_file", hint=hint), m.require("cert_file", hint=hint)
        credential = Credential(
            kind=CredentialKind.CERTIFICATE,
            key_file=key_file.readable_file(),
            cert_file=cert_file.readable_file(),
            passphrase=passphrase,
        )
    try:
        read_certificate(credential)
    except CertificateProblem as problem:
        where = m.get(problem.key) or m.get(f"{problem.key}_file") or at
        raise where.error(problem.message, hint=problem.hint) from None
    return credential


def _endpoints(at: _At, preset: Endpoints) -> Endpoints:
    m = at.mapping(("authority", "smtp", "graph"))
    kw: dict[str, Any] = {}
    m.put(kw, "authority", lambda a: _url(a, ("https",)))
    m.put(kw, "graph", lambda a: _url(a, ("https",)))
    smtp = m.get("smtp")
    if smtp is not None:
        kw["smtp_host"], kw["smtp_port"] = _host_port(smtp, low_port=1)
    return dataclasses.replace(preset, **kw)


# listeners


def _listener(at: _At, users: Mapping[str, UserConfig]) -> ListenerConfig:
    m = at.mapping(("address", "networks", "tls", "auth"))
    kw: dict[str, Any] = {}
    address = m.require("address", hint='like "127.0.0.1:2525"')
    kw["host"], kw["port"] = _host_port(address, low_port=0)
    m.put(kw, "networks", _networks)
    kw["tls"] = _tls(m.section("tls"))
    auth = m.section("auth").mapping(("required",))
    auth_kw: dict[str, Any] = {}
    auth.put(auth_kw, "required", _At.boolean)
    kw["auth"] = ListenerAuth(**auth_kw)
    listener = ListenerConfig(**kw)
    if listener.networks and not listener.auth.required:
        return listener
    # Every client must log in: there must be users, and a way to offer AUTH.
    why = auth.require("required") if listener.auth.required else m.require("networks")
    if not users:
        raise why.error(
            "every client must log in, but there are no users",
            hint="add one under users, with a password_hash from `relay hash-password`",
        )
    if listener.tls.mode is TlsMode.NONE and not _is_loopback(listener.host):
        raise why.error(
            "every client must log in, and AUTH is offered only over TLS or on loopback",
            hint="set tls.mode to starttls or implicit, or listen on a loopback address",
        )
    return listener


def _networks(at: _At) -> tuple[IPNetwork, ...]:
    """A network or a list of them; an empty list means every client must log in."""
    if isinstance(at.node, yaml.SequenceNode):
        return tuple(_network(item) for item in at.items())
    return (_network(at),)


def _tls(at: _At) -> TlsConfig:
    m = at.mapping(("mode", "cert_file", "key_file"))
    kw: dict[str, Any] = {}
    m.put(kw, "mode", lambda a: a.enum(TlsMode))
    mode = kw.get("mode", TlsMode.NONE)
    files = [key for key in ("cert_file", "key_file") if key in m]
    if mode is TlsMode.NONE and files:
        raise m.key(files[0]).error("used only with mode starttls or implicit")
    if mode is not TlsMode.NONE:
        hint = f"mode {mode.value} needs a certificate and its key, in PEM files"
        cert_file, key_file = m.require("cert_file", hint=hint), m.require("key_file", hint=hint)
        kw["cert_file"], kw["key_file"] = cert_file.readable_file(), key_file.readable_file()
    return TlsConfig(**kw)


# routes

_ROUTE_KEYS = (
    "name",
    "match",
    "account",
    "mailbox",
    "transport",
    "sender",
    "send_as",
    "rate",
    "connections",
    "max_recipients",
    "save_to_sent_items",
)
_CONNECTIONS_HINT = (
    f"Exchange Online allows {EXCHANGE_MAX_CONNECTIONS} concurrent SMTP connections per mailbox "
    "and refuses more with 432 4.3.2 Concurrent connections limit exceeded"
)


def _routes(
    at: _At, accounts: Mapping[str, AccountConfig], users: Mapping[str, UserConfig]
) -> tuple[RouteConfig, ...]:
    routes: list[RouteConfig] = []
    names: dict[str, int] = {}
    for i, route_at in enumerate(at.items()):
        if routes and routes[-1].match == RouteMatch():
            raise route_at.error(
                f"never used: routes[{i - 1}] has no match, so it takes every message",
                hint=f"give routes[{i - 1}] a match, or move it last: the first match wins",
            )
        route = _route(route_at, accounts, users)
        if route.name in names:
            raise route_at.child(route_at.node, "name").error(
                f"route name {route.name!r} is already used by routes[{names[route.name]}]"
            )
        names[route.name] = i
        routes.append(route)
    return tuple(routes)


def _route(
    at: _At, accounts: Mapping[str, AccountConfig], users: Mapping[str, UserConfig]
) -> RouteConfig:
    m = at.mapping(_ROUTE_KEYS)
    kw: dict[str, Any] = {
        "name": _name(m.require("name", hint="used in logs and metrics")),
        "account": _reference(m.require("account"), accounts, "account", "accounts"),
        "mailbox": _mailbox(m.require("mailbox", hint="the Exchange mailbox that sends")),
    }
    m.put(kw, "match", lambda a: _match(a, users))
    m.put(kw, "transport", lambda a: a.enum(Transport))
    m.put(kw, "sender", lambda a: a.enum(SenderPolicy))
    m.put(kw, "send_as", lambda a: a.one_or_more(_mailbox))
    m.put(kw, "rate", _rate)
    m.put(kw, "connections", lambda a: a.integer(1, EXCHANGE_MAX_CONNECTIONS, _CONNECTIONS_HINT))
    m.put(
        kw,
        "max_recipients",
        lambda a: a.integer(
            1, EXCHANGE_MAX_RECIPIENTS, "Exchange's RecipientLimits: 500 by default, 1000 at most"
        ),
    )
    m.put(kw, "save_to_sent_items", _At.boolean)
    route = RouteConfig(**kw)
    _check_delegated(m.require("mailbox"), accounts[route.account], route.mailbox, "sends")
    if route.send_as and route.sender is SenderPolicy.REWRITE:
        raise m.key("send_as").error(
            "used only with sender: keep", hint="with rewrite, every message is sent as mailbox"
        )
    if "save_to_sent_items" in m and route.transport is not Transport.GRAPH:
        raise m.key("save_to_sent_items").error(
            "used only with transport: graph",
            hint="over SMTP, Exchange always saves a copy in Sent Items",
        )
    return route


def _match(at: _At, users: Mapping[str, UserConfig]) -> RouteMatch:
    m = at.mapping(("sender", "from", "recipient", "client", "user"))
    kw: dict[str, Any] = {}
    m.put(kw, "sender", lambda a: a.one_or_more(_pattern), "senders")
    m.put(kw, "from", lambda a: a.one_or_more(_pattern), "from_headers")
    m.put(kw, "recipient", lambda a: a.one_or_more(_pattern), "recipients")
    m.put(kw, "client", lambda a: a.one_or_more(_network), "clients")
    m.put(
        kw,
        "user",
        lambda a: a.one_or_more(lambda u: _reference(u, users, "user", "users")),
        "users",
    )
    return RouteMatch(**kw)


# inbound


def _inbound(at: _At, accounts: Mapping[str, AccountConfig]) -> tuple[InboundConfig, ...]:
    imports: list[InboundConfig] = []
    for item in at.items():
        config = _one_inbound(item, accounts)
        for j, other in enumerate(imports):
            if other.name == config.name:
                raise item.error(f"inbound name {config.name!r} is already used by inbound[{j}]")
            if (other.mailbox.lower(), other.folder.lower()) == (
                config.mailbox.lower(),
                config.folder.lower(),
            ):
                raise item.error(
                    f"{config.mailbox} folder {config.folder} is already imported by inbound[{j}]"
                )
        imports.append(config)
    return tuple(imports)


_INBOUND_KEYS = (
    "name",
    "account",
    "mailbox",
    "folder",
    "poll_interval",
    "deliver",
    "after",
    "match",
    "max_size",
)


def _one_inbound(at: _At, accounts: Mapping[str, AccountConfig]) -> InboundConfig:
    m = at.mapping(_INBOUND_KEYS)
    kw: dict[str, Any] = {
        "name": _name(m.require("name", hint="used in logs and for its state")),
        "account": _reference(m.require("account"), accounts, "account", "accounts"),
        "mailbox": _mailbox(m.require("mailbox", hint="the Exchange mailbox to import from")),
        "deliver": _deliver(
            m.require("deliver", hint="one of: " + ", ".join(f"{{{k}: ...}}" for k in SINK_KINDS))
        ),
    }
    m.put(kw, "folder", _At.string)
    m.put(kw, "poll_interval", _duration)
    m.put(kw, "max_size", _size)
    match = m.get("match")
    if match is not None:
        kw.update(_inbound_match(match))
    after = m.get("after")
    if after is not None:
        kw["after"], kw["move_to"] = _after(after)
    config = InboundConfig(**kw)
    _check_delegated(m.require("mailbox"), accounts[config.account], config.mailbox, "reads")
    if config.move_to is not None and config.move_to.lower() == config.folder.lower():
        raise m.require("after").error(
            f"move_to is the folder being imported ({config.folder})",
            hint="move messages to another folder, e.g. Imported",
        )
    return config


def _check_delegated(at: _At, account: AccountConfig, mailbox: str, does: str) -> None:
    """A signed-in user's tokens open that user's own mailbox only."""
    user = account.credential.user
    if user is not None and user.lower() != mailbox.lower():
        raise at.error(
            f"account {account.name} signs in as {user} (delegated_user) and {does} only "
            "that mailbox",
            hint=f"use mailbox {user}, or an account with app-only access for {mailbox}",
        )


def _inbound_match(at: _At) -> dict[str, tuple[str, ...]]:
    m = at.mapping(("sender", "subject"))
    kw: dict[str, tuple[str, ...]] = {}
    m.put(kw, "sender", lambda a: a.one_or_more(_pattern), "senders")
    m.put(kw, "subject", lambda a: a.one_or_more(_At.string), "subjects")
    return kw


def _deliver(at: _At) -> Mapping[str, object]:
    m = at.mapping(SINK_KINDS)
    kinds = m.keys()
    if len(kinds) != 1:
        raise at.error(
            "needs exactly one of " + ", ".join(SINK_KINDS),
            hint=f"got {' and '.join(kinds)}" if kinds else "like {maildir: ./inbox}",
        )
    kind = kinds[0]
    setting = m.require(kind)
    target: object
    if kind in ("maildir", "directory"):
        target = setting.fs_path()
    elif kind == "smtp":
        target = _host_port(setting, low_port=1)
    else:
        target = _url(setting, ("http", "https"))
    return MappingProxyType({kind: target})


def _after(at: _At) -> tuple[AfterImport, str | None]:
    if isinstance(at.node, yaml.MappingNode):
        m = at.mapping(("move_to",))
        return AfterImport.MOVE_TO, m.require("move_to", hint="the folder").string()
    if at.tag == "str" and at.node.value == AfterImport.MOVE_TO.value:
        raise at.error("move_to needs a folder", hint="after: {move_to: Imported}")
    choice = at.enum(AfterImport, [AfterImport.MARK_READ, AfterImport.DELETE])
    return choice, None


# admin, log


def _admin(at: _At) -> AdminConfig:
    m = at.mapping(("address",))
    kw: dict[str, Any] = {}
    address = m.get("address")
    if address is not None:
        kw["host"], kw["port"] = _host_port(address, low_port=0)
    return AdminConfig(**kw)


def _log(at: _At) -> LogConfig:
    m = at.mapping(("format", "level"))
    kw: dict[str, Any] = {}
    m.put(kw, "format", lambda a: a.enum(LogFormat))
    m.put(kw, "level", _log_level)
    return LogConfig(**kw)


def _log_level(at: _At) -> str:
    level = at.string().upper()  # `info` is as clear as `INFO`
    if level not in LOG_LEVELS:
        raise at.error(f"{at.string()!r} is not one of " + ", ".join(LOG_LEVELS))
    return level
