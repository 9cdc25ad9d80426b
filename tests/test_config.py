"""relay.yaml: every key parses to its typed value, and every mistake gets one exact line.

The messages asserted here are the ones an operator sees from `relay check`: the file, the line,
the YAML path, what is wrong and a hint. A distinctive secret sits in every config these tests
load; no error, repr or description may show it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from credkit import app_certificate, other_certificate, write_certificate_files
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from relay.check import describe, format_duration, format_size
from relay.config import (
    CLOUD_ENDPOINTS,
    AfterImport,
    Cloud,
    Config,
    CredentialKind,
    Endpoints,
    LogFormat,
    Rate,
    RouteMatch,
    Secret,
    SenderPolicy,
    TlsMode,
    Transport,
    load,
    loads,
    read_certificate,
)
from relay.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECRET = "Zq7-never-print-me-4Kx"  # must appear in no error, repr or description
CLIENT_ID = "0b5d4f7a-1c2e-4a3b-9d8e-6f7a8b9c0d1e"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
HASH = (
    "scrypt$16384$8$1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo"  # the shape `relay hash-password` writes
)

# 11 lines; cases append to the route (4-space indent, from line 12) or add sections.
BASE = f"""\
listen:
  - address: "127.0.0.1:2525"
accounts:
  contoso:
    tenant_id: contoso.onmicrosoft.com
    client_id: {CLIENT_ID}
    client_secret: "{SECRET}"
routes:
  - name: default
    account: contoso
    mailbox: relay@contoso.com
"""


def parse(text: str, environ: dict[str, str] | None = None) -> Config:
    return loads(text, environ=environ or {})


def error(text: str, environ: dict[str, str] | None = None, source: str = "relay.yaml") -> str:
    """The one-line error for `text`; it never contains the secret."""
    with pytest.raises(ConfigError) as caught:
        loads(text, source=source, environ=environ or {})
    message = str(caught.value)
    assert SECRET not in message
    assert SECRET not in repr(caught.value.args)
    return message


def write(path: Path, content: str | bytes = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# --- the sample --------------------------------------------------------------------------------

SAMPLE_ENV = {
    "AZURE_TENANT_ID": TENANT_ID,
    "AZURE_CLIENT_ID": CLIENT_ID,
    "AZURE_CLIENT_SECRET": SECRET,
    "ULTIMO_PASSWORD_HASH": HASH,
}


def test_the_sample_relay_yaml_is_valid_and_says_what_the_design_says() -> None:
    """Load the annotated sample with a fake environment: it resolves to the documented values."""
    config = load(REPO / "relay.yaml", environ=SAMPLE_ENV)

    (listener,) = config.listeners
    assert (listener.host, listener.port, listener.tls.mode) == ("127.0.0.1", 2525, TlsMode.NONE)
    assert [str(n) for n in listener.networks] == ["127.0.0.0/8", "::1/128"]
    assert config.limits.max_message_size == 35 * 1024 * 1024
    assert config.users["ultimo"].password_hash.reveal() == SAMPLE_ENV["ULTIMO_PASSWORD_HASH"]
    assert config.spool.path == REPO / "spool"
    assert config.spool.retry == (60, 300, 900, 3600, 14400)
    assert config.spool.max_age == 5 * 86400
    account = config.accounts["contoso"]
    assert (account.tenant_id, account.client_id) == (TENANT_ID, CLIENT_ID)
    assert account.credential.secret == Secret(SECRET)
    assert account.endpoints == CLOUD_ENDPOINTS[Cloud.GLOBAL]
    maintenance, default = config.routes
    assert maintenance.match.users == ("ultimo",)
    assert maintenance.rate == Rate(count=30, per=60.0)
    assert maintenance.send_as == ("alerts@contoso.com",)
    assert default.match == RouteMatch()
    assert (default.transport, default.sender) == (Transport.GRAPH, SenderPolicy.REWRITE)
    assert default.save_to_sent_items is False
    (helpdesk,) = config.inbound
    assert helpdesk.deliver == {"maildir": REPO / "inbox" / "helpdesk"}
    assert (helpdesk.after, helpdesk.move_to) == (AfterImport.MOVE_TO, "Imported")
    assert config.admin is not None and config.admin.port == 9025
    assert config.source == REPO / "relay.yaml"


def test_the_sample_names_every_key_the_loader_knows() -> None:
    """Every key the loader accepts appears in the sample, set or commented out."""
    from relay.config import _ACCOUNT_KEYS, _ROUTE_KEYS, _SECTIONS, SINK_KINDS

    sample = (REPO / "relay.yaml").read_text()
    keys = [
        *_SECTIONS,
        *_ACCOUNT_KEYS,
        *_ROUTE_KEYS,
        *SINK_KINDS,
        *("address", "networks", "mode", "cert_file", "key_file", "auth", "required"),
        *("max_message_size", "max_recipients", "max_line_length", "password_hash"),
        *("path", "retry", "max_age", "bounces", "authority", "smtp", "graph"),
        *("pfx_file", "passphrase", "passphrase_file", "sender", "from", "recipient", "client"),
        *("user", "folder", "poll_interval", "deliver", "after", "move_to", "format", "level"),
        *("mark_read", "delete", "match", "subject", "max_size"),
    ]
    assert [key for key in keys if not re.search(rf"\b{key}\b", sample)] == []


# --- each key ----------------------------------------------------------------------------------


def test_defaults_fill_what_the_file_leaves_out() -> None:
    config = parse(BASE)
    (route,) = config.routes
    assert (route.transport, route.sender, route.connections) == (
        Transport.SMTP,
        SenderPolicy.KEEP,
        3,
    )
    assert (route.rate, route.max_recipients, route.save_to_sent_items) == (
        Rate(count=30, per=60.0),
        500,
        True,
    )
    assert config.limits.max_message_size == 35 * 1024 * 1024
    assert config.spool.path == Path.cwd() / "spool"
    assert config.users == {} and config.inbound == () and config.admin is None
    assert (config.log.format, config.log.level) == (LogFormat.TEXT, "INFO")
    assert config.accounts["contoso"].endpoints == CLOUD_ENDPOINTS[Cloud.GLOBAL]


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ('"127.0.0.1:2525"', "127.0.0.1", 2525),
        ('"[::1]:25"', "::1", 25),
        ("localhost:2525", "localhost", 2525),
        ('"0.0.0.0:0"', "0.0.0.0", 0),
    ],
)
def test_listener_address(address: str, host: str, port: int) -> None:
    config = parse(BASE.replace('"127.0.0.1:2525"', address))
    assert (config.listeners[0].host, config.listeners[0].port) == (host, port)
    assert config.listeners[0].address == address.strip('"')


def test_listener_networks_tls_and_auth(tmp_path: Path) -> None:
    """A second listener on the LAN: one network, STARTTLS with files beside the config, AUTH."""
    write(tmp_path / "tls" / "relay.crt")
    write(tmp_path / "tls" / "relay.key")
    text = BASE.replace(
        "accounts:",
        """\
  - address: "0.0.0.0:587"
    networks: 10.0.0.0/8
    tls: {mode: starttls, cert_file: tls/relay.crt, key_file: tls/relay.key}
    auth: {required: true}
  - address: "127.0.0.1:465"
    networks: []
    tls: {mode: implicit, cert_file: tls/relay.crt, key_file: tls/relay.key}
users:
  ultimo: {password_hash: "scrypt$abc"}
accounts:""",
    )
    config = loads(text, source=str(tmp_path / "relay.yaml"), environ={})
    _, lan, implicit = config.listeners
    assert lan.networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert lan.tls.mode is TlsMode.STARTTLS
    assert lan.tls.cert_file == tmp_path / "tls" / "relay.crt"
    assert lan.tls.key_file == tmp_path / "tls" / "relay.key"
    assert lan.auth.required is True
    assert implicit.networks == () and implicit.tls.mode is TlsMode.IMPLICIT


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("35MiB", 35 * 1024 * 1024),
        ("35MB", 35_000_000),
        ("36700160", 36_700_160),
        ("10KiB", 10_240),
        ("1GiB", 1024**3),
        ("512B", 512),
        ("1.5KiB", 1536),
        ("35mib", 35 * 1024 * 1024),
    ],
)
def test_sizes(size: str, expected: int) -> None:
    config = parse(BASE + f"limits: {{max_message_size: {size}, max_line_length: {size}}}\n")
    assert config.limits.max_message_size == expected == config.limits.max_line_length


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("5d", 432_000.0),
        ("1h30m", 5400.0),
        ("1d12h", 129_600.0),
        ("45", 45.0),
        ("0.5", 0.5),
        ("1.5h", 5400.0),
    ],
)
def test_durations(duration: str, seconds: float) -> None:
    config = parse(BASE + f"spool: {{max_age: {duration}, retry: [{duration}, 1m]}}\n")
    assert config.spool.max_age == seconds
    assert config.spool.retry == (seconds, 60.0)


def test_users_spool_admin_log_and_limits(tmp_path: Path) -> None:
    text = BASE + (
        "users:\n"
        "  ultimo: {password_hash: 'scrypt$abc'}\n"
        "  printer: {password_hash: 'pbkdf2_sha256$def'}\n"
        "spool: {path: data/spool, bounces: false}\n"
        "limits: {max_recipients: 50}\n"
        "admin: {address: '[::1]:9025'}\n"
        "log: {format: json, level: debug}\n"
    )
    config = loads(text, source=str(tmp_path / "etc" / "relay.yaml"), environ={})
    assert list(config.users) == ["ultimo", "printer"]
    assert config.users["printer"].password_hash.reveal() == "pbkdf2_sha256$def"
    assert config.spool.path == tmp_path / "etc" / "data" / "spool"
    assert config.spool.bounces is False
    assert config.limits.max_recipients == 50
    assert config.admin is not None and (config.admin.host, config.admin.port) == ("::1", 9025)
    assert (config.log.format, config.log.level) == (LogFormat.JSON, "DEBUG")


def test_an_absolute_spool_path_stays_as_written(tmp_path: Path) -> None:
    config = parse(BASE + f"spool: {{path: {tmp_path / 'q'}}}\n")
    assert config.spool.path == tmp_path / "q"


@pytest.mark.parametrize("cloud", list(Cloud))
def test_cloud_presets(cloud: Cloud) -> None:
    config = parse(BASE.replace("  contoso:\n", f"  contoso:\n    cloud: {cloud.value}\n"))
    assert config.accounts["contoso"].cloud is cloud
    assert config.accounts["contoso"].endpoints == CLOUD_ENDPOINTS[cloud]


def test_endpoint_overrides_replace_only_what_they_name(tmp_path: Path) -> None:
    write(tmp_path / "ca.pem", app_certificate()[0])
    text = BASE.replace(
        "  contoso:\n",
        "  contoso:\n"
        "    cloud: usgov\n"
        "    endpoints: {smtp: '127.0.0.1:2587', graph: 'https://127.0.0.1:8444/v1.0/'}\n"
        "    ca_file: ca.pem\n",
    )
    account = loads(text, source=str(tmp_path / "relay.yaml"), environ={}).accounts["contoso"]
    assert account.endpoints == Endpoints(
        authority="https://login.microsoftonline.us",
        smtp_host="127.0.0.1",
        smtp_port=2587,
        graph="https://127.0.0.1:8444/v1.0",
    )
    assert account.ca_file == tmp_path / "ca.pem"


def _with_credential(credential: str) -> str:
    return BASE.replace(f'    client_secret: "{SECRET}"\n', credential)


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        (f"{SECRET}\n", SECRET),
        (f"{SECRET}\r\n", SECRET),
        (f"{SECRET}", SECRET),
        (f"{SECRET}\n\n", f"{SECRET}\n"),  # only one trailing newline goes
    ],
)
def test_client_secret_file_is_read_at_load(tmp_path: Path, content: str, secret: str) -> None:
    write(tmp_path / "secrets" / "contoso", content)
    text = _with_credential("    client_secret_file: secrets/contoso\n")
    credential = (
        loads(text, source=str(tmp_path / "relay.yaml"), environ={}).accounts["contoso"].credential
    )
    assert credential.kind is CredentialKind.SECRET
    assert credential.secret == Secret(secret)


def test_certificate_credentials(tmp_path: Path) -> None:
    """The files are opened with the passphrase: a credential that loads is one MSAL can use."""
    cert_pem, key_pem = app_certificate()
    write_certificate_files(tmp_path, cert_pem, key_pem, passphrase=SECRET)
    write_certificate_files(tmp_path / "plain", cert_pem, key_pem)
    write(tmp_path / "pass", f"{SECRET}\n")
    source = str(tmp_path / "relay.yaml")
    pem = _with_credential(
        "    certificate: {key_file: app.key, cert_file: app.pem, passphrase_file: pass}\n"
    )
    pfx = _with_credential(f"    certificate: {{pfx_file: app.pfx, passphrase: '{SECRET}'}}\n")
    bare = _with_credential("    certificate: {key_file: plain/app.key, cert_file: app.pem}\n")

    credential = loads(pem, source=source, environ={}).accounts["contoso"].credential
    assert credential.kind is CredentialKind.CERTIFICATE
    assert (credential.key_file, credential.cert_file) == (
        tmp_path / "app.key",
        tmp_path / "app.pem",
    )
    assert credential.passphrase == Secret(SECRET)
    assert read_certificate(credential).cert_pem == cert_pem
    credential = loads(pfx, source=source, environ={}).accounts["contoso"].credential
    assert (credential.pfx_file, credential.passphrase) == (tmp_path / "app.pfx", Secret(SECRET))
    assert read_certificate(credential).cert_pem == cert_pem
    assert loads(bare, source=source, environ={}).accounts["contoso"].credential.passphrase is None


@pytest.mark.parametrize(
    ("certificate", "message"),
    [
        pytest.param(
            "{pfx_file: app.pfx, passphrase: wrong-passphrase}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.pfx_file: cannot open {dir}/app.pfx: "
            "wrong passphrase, or not a PKCS#12 (.pfx) file",
            id="pfx wrong passphrase",
        ),
        pytest.param(
            "{pfx_file: app.pfx}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.pfx_file: cannot open {dir}/app.pfx: "
            "not a PKCS#12 (.pfx) file, or it needs a passphrase (give passphrase or "
            "passphrase_file if the file has one)",
            id="pfx without its passphrase",
        ),
        pytest.param(
            f"{{pfx_file: app.pem, passphrase: '{SECRET}'}}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.pfx_file: cannot open {dir}/app.pem: "
            "wrong passphrase, or not a PKCS#12 (.pfx) file",
            id="pem given as pfx",
        ),
        pytest.param(
            "{pfx_file: cert-only.pfx}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.pfx_file: "
            "{dir}/cert-only.pfx holds no private key (export the certificate with its private "
            "key)",
            id="pfx without a key",
        ),
        pytest.param(
            "{key_file: app.key, cert_file: app.pem}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.key_file: {dir}/app.key is encrypted "
            "(give passphrase or passphrase_file)",
            id="encrypted key without passphrase",
        ),
        pytest.param(
            "{key_file: app.key, cert_file: app.pem, passphrase: wrong-passphrase}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.key_file: cannot open {dir}/app.key: "
            "wrong passphrase, or not a PEM private key",
            id="key wrong passphrase",
        ),
        pytest.param(
            f"{{key_file: plain/app.key, cert_file: app.pem, passphrase: '{SECRET}'}}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.passphrase: key_file "
            "{dir}/plain/app.key is not encrypted (remove the passphrase)",
            id="passphrase for a plain key",
        ),
        pytest.param(
            "{key_file: app.pem, cert_file: app.pem}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.key_file: cannot open {dir}/app.pem: "
            "not a PEM private key",
            id="certificate given as key",
        ),
        pytest.param(
            "{key_file: plain/app.key, cert_file: plain/app.key}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.cert_file: "
            "{dir}/plain/app.key is not a PEM certificate",
            id="key given as certificate",
        ),
        pytest.param(
            "{key_file: plain/app.key, cert_file: other.pem}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.cert_file: "
            "{dir}/other.pem is not the certificate of key_file {dir}/plain/app.key (give the "
            "certificate made with this key, as uploaded to the app registration)",
            id="key and certificate of different pairs",
        ),
        pytest.param(
            "{key_file: ec.key, cert_file: ec.pem}",
            "{dir}/relay.yaml:7: accounts.contoso.certificate.key_file: the key is not an RSA key "
            "(Entra ID signs app credentials with RSA certificates)",
            id="not RSA",
        ),
    ],
)
def test_certificate_errors(tmp_path: Path, certificate: str, message: str) -> None:
    """A certificate that cannot sign an assertion is a config error, found by `relay check`."""
    _certificate_files(tmp_path)
    text = _with_credential(f"    certificate: {certificate}\n")
    assert error(text, source=str(tmp_path / "relay.yaml")) == message.format(dir=tmp_path)


def _certificate_files(directory: Path) -> None:
    """Right and wrong certificate files: app.* (encrypted with SECRET), plain/app.* (not
    encrypted), other.pem (another key's certificate), cert-only.pfx, ec.key + ec.pem."""
    cert_pem, key_pem = app_certificate()
    write_certificate_files(directory, cert_pem, key_pem, passphrase=SECRET)
    write_certificate_files(directory / "plain", cert_pem, key_pem)
    write(directory / "other.pem", other_certificate()[0])
    cert = x509.load_pem_x509_certificate(cert_pem)
    no_key = pkcs12.serialize_key_and_certificates(
        b"cert", None, cert, None, serialization.NoEncryption()
    )
    write(directory / "cert-only.pfx", no_key)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    ec_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .sign(ec_key, hashes.SHA256())
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    write(
        directory / "ec.key",
        ec_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()),
    )
    write(directory / "ec.pem", ec_cert.public_bytes(serialization.Encoding.PEM))


def test_federated_token_file_is_checked_but_not_read(tmp_path: Path) -> None:
    """The token rotates; identity reads it per request. The loader only proves it is readable."""
    write(tmp_path / "token", "eyJ...")
    text = _with_credential("    federated_token_file: token\n")
    credential = (
        loads(text, source=str(tmp_path / "relay.yaml"), environ={}).accounts["contoso"].credential
    )
    assert credential.kind is CredentialKind.FEDERATED
    assert credential.federated_token_file == tmp_path / "token"
    assert credential.secret is None


DELEGATED = _with_credential("    delegated_user: relay@contoso.com\n")


def test_delegated_user_has_a_token_cache_in_the_spool(tmp_path: Path) -> None:
    """No secret in relay.yaml: `relay login` leaves the user's tokens under the spool path."""
    config = loads(
        DELEGATED + "spool: {path: var/spool}\n", source=str(tmp_path / "relay.yaml"), environ={}
    )
    account = config.accounts["contoso"]
    assert account.credential.kind is CredentialKind.DELEGATED
    assert (account.credential.user, account.credential.secret) == ("relay@contoso.com", None)
    assert account.token_cache == tmp_path / "var/spool/tokens/contoso.json"
    assert parse(BASE).accounts["contoso"].token_cache is None
    shown = describe(config)
    assert (
        "    credential: delegated_user relay@contoso.com (signs in with `relay login contoso`; "
        f"token cache {tmp_path / 'var/spool/tokens/contoso.json'})"
    ) in shown


def test_a_route_with_every_key() -> None:
    text = BASE.replace("  - name: default\n", "  - name: maintenance\n") + (
        "    match:\n"
        "      sender: ['*@contoso.com', '*@fabrikam.com']\n"
        "      from: '*@contoso.com'\n"
        "      recipient: '*'\n"
        "      client: [10.0.0.0/8, 192.168.1.7]\n"
        "      user: ultimo\n"
        "    transport: graph\n"
        "    sender: keep\n"
        "    send_as: alerts@contoso.com\n"
        "    rate: 2/s\n"
        "    connections: 1\n"
        "    max_recipients: 1000\n"
        "    save_to_sent_items: false\n"
        "users: {ultimo: {password_hash: scrypt$x}}\n"
    )
    (route,) = parse(text).routes
    assert route.match == RouteMatch(
        senders=("*@contoso.com", "*@fabrikam.com"),
        from_headers=("*@contoso.com",),
        recipients=("*",),
        clients=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.7/32")),
        users=("ultimo",),
    )
    assert (route.name, route.account, route.mailbox) == (
        "maintenance",
        "contoso",
        "relay@contoso.com",
    )
    assert (route.transport, route.sender, route.send_as) == (
        Transport.GRAPH,
        SenderPolicy.KEEP,
        ("alerts@contoso.com",),
    )
    assert (route.rate, route.connections, route.max_recipients) == (
        Rate(count=2, per=1.0),
        1,
        1000,
    )
    assert route.save_to_sent_items is False


@pytest.mark.parametrize(
    ("rate", "count", "per"),
    [
        ("30/min", 30, 60.0),
        ("2/s", 2, 1.0),
        ("1000/h", 1000, 3600.0),
        ("10000/day", 10000, 86400.0),
    ],
)
def test_rates(rate: str, count: int, per: float) -> None:
    (route,) = parse(BASE + f"    rate: {rate}\n").routes
    assert route.rate == Rate(count=count, per=per)


def test_routes_keep_their_order() -> None:
    text = BASE.replace("  - name: default\n", "  - name: first\n    match: {sender: a@b.com}\n")
    text += "  - {name: second, account: contoso, mailbox: other@contoso.com}\n"
    assert [route.name for route in parse(text).routes] == ["first", "second"]


@pytest.mark.parametrize(
    ("deliver", "kind", "target"),
    [
        ("{maildir: inbox/helpdesk}", "maildir", "inbox/helpdesk"),
        ("{directory: drop}", "directory", "drop"),
        ("{smtp: '127.0.0.1:25'}", "smtp", ("127.0.0.1", 25)),
        ("{http: 'https://app.example.com/mail'}", "http", "https://app.example.com/mail"),
    ],
)
def test_inbound_sinks(tmp_path: Path, deliver: str, kind: str, target: object) -> None:
    text = BASE + (
        "inbound:\n"
        "  - {name: helpdesk, account: contoso, mailbox: helpdesk@contoso.com,\n"
        f"     deliver: {deliver}}}\n"
    )
    (inbound,) = loads(text, source=str(tmp_path / "relay.yaml"), environ={}).inbound
    expected = tmp_path / target if kind in ("maildir", "directory") else target
    assert dict(inbound.deliver) == {kind: expected}
    assert (inbound.folder, inbound.poll_interval) == ("inbox", 30.0)
    assert (inbound.after, inbound.move_to) == (AfterImport.MARK_READ, None)


@pytest.mark.parametrize(
    ("after", "expected", "folder"),
    [
        ("mark_read", AfterImport.MARK_READ, None),
        ("delete", AfterImport.DELETE, None),
        ("{move_to: Imported}", AfterImport.MOVE_TO, "Imported"),
    ],
)
def test_inbound_after(after: str, expected: AfterImport, folder: str | None) -> None:
    text = BASE + (
        "inbound:\n"
        "  - name: helpdesk\n"
        "    account: contoso\n"
        "    mailbox: helpdesk@contoso.com\n"
        "    folder: Support\n"
        "    poll_interval: 2m\n"
        "    deliver: {directory: drop}\n"
        f"    after: {after}\n"
    )
    (inbound,) = parse(text).inbound
    assert (inbound.after, inbound.move_to) == (expected, folder)
    assert (inbound.folder, inbound.poll_interval) == ("Support", 120.0)


def test_inbound_match_and_max_size() -> None:
    text = BASE + (
        "inbound:\n"
        "  - name: helpdesk\n"
        "    account: contoso\n"
        "    mailbox: helpdesk@contoso.com\n"
        "    deliver: {directory: drop}\n"
        "    match:\n"
        '      sender: ["*@plant.contoso.com", alerts@contoso.com]\n'
        "      subject: Ticket *\n"
        "    max_size: 10MiB\n"
    )
    (inbound,) = parse(text).inbound
    assert inbound.senders == ("*@plant.contoso.com", "alerts@contoso.com")
    assert inbound.subjects == ("Ticket *",)
    assert inbound.max_size == 10 * 1024 * 1024


def test_inbound_without_match_takes_everything() -> None:
    text = BASE + (
        "inbound:\n"
        "  - {name: helpdesk, account: contoso, mailbox: h@contoso.com, deliver: {maildir: m},\n"
        "     match: {}}\n"
    )
    (inbound,) = parse(text).inbound
    assert (inbound.senders, inbound.subjects, inbound.max_size) == ((), (), None)


def test_inbound_only_needs_no_listener_or_route() -> None:
    text = BASE.split("routes:")[0].replace('listen:\n  - address: "127.0.0.1:2525"\n', "") + (
        "inbound:\n"
        "  - {name: helpdesk, account: contoso, mailbox: h@contoso.com, deliver: {maildir: m}}\n"
    )
    config = parse(text)
    assert (config.listeners, config.routes, len(config.inbound)) == ((), (), 1)


def test_empty_sections_mean_their_defaults() -> None:
    """`users:` with every entry commented out is an empty section, not an error."""
    config = parse(BASE + "users:\ninbound:\nlimits:\n")
    assert (config.users, config.inbound, config.limits.max_recipients) == ({}, (), 500)


# --- ${VAR} -------------------------------------------------------------------------------------


def test_environment_interpolation() -> None:
    text = BASE.replace("contoso.onmicrosoft.com", "${TENANT}").replace(
        "relay@contoso.com", "${MAILBOX:-relay@contoso.com}"
    ) + (
        "    max_recipients: ${MAX_RCPT}\n"
        "    save_to_sent_items: ${SAVE:-true}\n"
        "    transport: graph\n"
        "    send_as: ['${PREFIX:-}alerts@contoso.com', '$${literal}@contoso.com']\n"
    )
    (route,) = parse(text, {"TENANT": TENANT_ID, "MAX_RCPT": "100", "MAILBOX": ""}).routes
    assert route.mailbox == "relay@contoso.com"  # empty counts as unset for :-
    assert route.max_recipients == 100  # unquoted: read as YAML reads 100
    assert route.save_to_sent_items is True
    assert route.send_as == ("alerts@contoso.com", "${literal}@contoso.com")


def test_a_quoted_interpolation_stays_a_string() -> None:
    assert error(BASE + '    connections: "${N}"\n', {"N": "2"}) == (
        "relay.yaml:12: routes[0].connections: expected an integer, got a string"
    )


def test_an_empty_variable_without_default_is_an_error() -> None:
    text = BASE.replace("contoso.onmicrosoft.com", "${TENANT}")
    assert error(text, {"TENANT": ""}) == (
        "relay.yaml:5: accounts.contoso.tenant_id: environment variable TENANT is set but empty "
        "(set it, or give a default: ${TENANT:-...})"
    )


def test_the_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_MAILBOX", "env@contoso.com")
    text = BASE.replace("relay@contoso.com", "${RELAY_TEST_MAILBOX}")
    assert loads(text).routes[0].mailbox == "env@contoso.com"


# --- no side effects, frozen, secrets ----------------------------------------------------------


def test_loading_has_no_side_effects(tmp_path: Path) -> None:
    before = (list(logging.getLogger().handlers), logging.getLogger().level)
    config = loads(BASE + "spool: {path: spool}\n", source=str(tmp_path / "relay.yaml"), environ={})
    assert config.spool.path == tmp_path / "spool"
    assert list(tmp_path.iterdir()) == []
    assert (list(logging.getLogger().handlers), logging.getLogger().level) == before


def test_config_is_frozen() -> None:
    config = parse(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].mailbox = "x@y.com"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.accounts["fabrikam"] = config.accounts["contoso"]  # type: ignore[index]


def test_secrets_are_masked_everywhere(tmp_path: Path) -> None:
    """The secret, a passphrase and a password hash never show in repr, str or describe()."""
    write_certificate_files(tmp_path, *app_certificate(), passphrase=SECRET)
    text = BASE.replace(
        "routes:",
        "  fabrikam:\n"
        f"    tenant_id: {TENANT_ID}\n"
        f"    client_id: {CLIENT_ID}\n"
        f"    certificate: {{key_file: app.key, cert_file: app.pem, passphrase: '{SECRET}'}}\n"
        f"users: {{ultimo: {{password_hash: 'scrypt${SECRET}'}}}}\n"
        "routes:",
    )
    config = loads(text, source=str(tmp_path / "relay.yaml"), environ={})
    shown = describe(config)
    for rendering in (repr(config), str(config), shown):
        assert SECRET not in rendering
    assert "credential: client_secret ********" in shown
    assert "passphrase ********" in shown
    assert "users: ultimo (password_hash ********)" in shown
    assert config.accounts["fabrikam"].credential.passphrase == Secret(SECRET)


# --- errors -------------------------------------------------------------------------------------

ROUTE_AT_12 = "relay.yaml:12: routes[0]"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            BASE + "    mailbx: other@contoso.com\n",
            f"{ROUTE_AT_12}.mailbx: unknown key (did you mean 'mailbox'?)",
            id="unknown key with suggestion",
        ),
        pytest.param(
            BASE + "colour: blue\n",
            "relay.yaml:12: colour: unknown key (known keys here: listen, limits, users, spool, "
            "accounts, routes, inbound, admin, log)",
            id="unknown key without a close one",
        ),
        pytest.param(
            BASE.replace("account: contoso", "account: contso"),
            "relay.yaml:10: routes[0].account: unknown account 'contso' (did you mean 'contoso'?)",
            id="unknown account with suggestion",
        ),
        pytest.param(
            BASE.replace("account: contoso", "account: fabrikam"),
            "relay.yaml:10: routes[0].account: unknown account 'fabrikam' (defined: contoso)",
            id="unknown account",
        ),
        pytest.param(
            BASE + "limits: {max_message_size: lots}\n",
            "relay.yaml:12: limits.max_message_size: expected a size like 35MiB, got 'lots' "
            "(units: B, KB, MB, GB (1000) or KiB, MiB, GiB (1024); a bare number is bytes)",
            id="bad size",
        ),
        pytest.param(
            BASE + "limits: {max_message_size: 35M}\n",
            "relay.yaml:12: limits.max_message_size: expected a size like 35MiB, got '35M' "
            "(write 35MiB (1024-based) or 35MB (1000-based))",
            id="ambiguous size",
        ),
        pytest.param(
            BASE + "limits: {max_message_size: 0}\n",
            "relay.yaml:12: limits.max_message_size: expected a size above zero, got '0'",
            id="zero size",
        ),
        pytest.param(
            BASE + "spool: {max_age: 5 days}\n",
            "relay.yaml:12: spool.max_age: expected a duration like 30s, 5m, 1h30m or 5d, "
            "got '5 days' (units: d, h, m, s)",
            id="bad duration",
        ),
        pytest.param(
            BASE + "spool: {retry: [1m, 0s]}\n",
            "relay.yaml:12: spool.retry[1]: expected a duration above zero, got '0s'",
            id="zero duration",
        ),
        pytest.param(
            BASE + "spool: {retry: 5m}\n",
            "relay.yaml:12: spool.retry: expected a list of durations, got a string "
            "(like [1m, 5m, 15m, 1h, 4h])",
            id="retry not a list",
        ),
        pytest.param(
            BASE + "    rate: 30/minute\n",
            f"{ROUTE_AT_12}.rate: expected a rate like 30/min, got '30/minute' "
            "(per s, min, h or day)",
            id="bad rate",
        ),
        pytest.param(
            BASE + "    rate: 0/s\n",
            f"{ROUTE_AT_12}.rate: expected a rate like 30/min, got '0/s' (per s, min, h or day)",
            id="zero rate",
        ),
        pytest.param(
            BASE + "    match: {client: 10.0.0.1/8}\n",
            f"{ROUTE_AT_12}.match.client: not a network: '10.0.0.1/8' (did you mean 10.0.0.0/8?)",
            id="CIDR with host bits",
        ),
        pytest.param(
            BASE.replace("  - address", '  - networks: ["10.0.0/8"]\n    address'),
            "relay.yaml:2: listen[0].networks[0]: not a network: '10.0.0/8' "
            "(write an address or a network in CIDR form, like 10.0.0.0/8 or ::1/128)",
            id="bad CIDR",
        ),
        pytest.param(
            BASE.replace('"127.0.0.1:2525"', "::1:25"),
            "relay.yaml:2: listen[0].address: expected an address like 127.0.0.1:2525, "
            "got '::1:25' (write IPv6 as \"[::1]:25\")",
            id="IPv6 without brackets",
        ),
        pytest.param(
            BASE.replace('"127.0.0.1:2525"', "127.0.0.1"),
            "relay.yaml:2: listen[0].address: expected an address like 127.0.0.1:2525, "
            "got '127.0.0.1' (host and port are both needed)",
            id="address without port",
        ),
        pytest.param(
            BASE.replace('"127.0.0.1:2525"', '"127.0.0.1:70000"'),
            "relay.yaml:2: listen[0].address: port 70000 is out of range "
            "(ports go from 0 to 65535)",
            id="port out of range",
        ),
        pytest.param(
            BASE.replace('"127.0.0.1:2525"', '"[127.0.0.1]:25"'),
            "relay.yaml:2: listen[0].address: only IPv6 addresses go in brackets, "
            "got '[127.0.0.1]:25'",
            id="IPv4 in brackets",
        ),
        pytest.param(
            BASE.replace('"127.0.0.1:2525"', '"bad_host!:25"'),
            "relay.yaml:2: listen[0].address: not a host name or IP address: 'bad_host!'",
            id="bad host",
        ),
        pytest.param(
            BASE.replace('"127.0.0.1:2525"', '["::1"]'),
            "relay.yaml:2: listen[0].address: expected an address like 127.0.0.1:2525, got a "
            'list (quote IPv6 like "[::1]:25")',
            id="address as a list",
        ),
        pytest.param(
            _with_credential(""),
            "relay.yaml:5: accounts.contoso: no credential (give one of client_secret, "
            "client_secret_file, certificate, federated_token_file or delegated_user)",
            id="missing credential",
        ),
        pytest.param(
            _with_credential(
                f'    client_secret: "{SECRET}"\n    federated_token_file: /run/token\n'
            ),
            "relay.yaml:8: accounts.contoso: two credentials, client_secret and "
            "federated_token_file (give exactly one)",
            id="two credentials",
        ),
        pytest.param(
            _with_credential(f'    client_secret: "{SECRET}"\n    delegated_user: a@contoso.com\n'),
            "relay.yaml:8: accounts.contoso: two credentials, client_secret and "
            "delegated_user (give exactly one)",
            id="secret and delegated user",
        ),
        pytest.param(
            _with_credential("    delegated_user: relay\n"),
            "relay.yaml:7: accounts.contoso.delegated_user: expected a mailbox address like "
            "relay@contoso.com, got 'relay'",
            id="delegated user not an address",
        ),
        pytest.param(
            DELEGATED.replace("mailbox: relay@contoso.com", "mailbox: shared@contoso.com"),
            "relay.yaml:11: routes[0].mailbox: account contoso signs in as relay@contoso.com "
            "(delegated_user) and sends only that mailbox (use mailbox relay@contoso.com, or an "
            "account with app-only access for shared@contoso.com)",
            id="delegated account sending from another mailbox",
        ),
        pytest.param(
            DELEGATED
            + "inbound:\n"
            + "  - {name: helpdesk, account: contoso, mailbox: helpdesk@contoso.com,\n"
            + "     deliver: {maildir: m}}\n",
            "relay.yaml:13: inbound[0].mailbox: account contoso signs in as relay@contoso.com "
            "(delegated_user) and reads only that mailbox (use mailbox relay@contoso.com, or an "
            "account with app-only access for helpdesk@contoso.com)",
            id="delegated account importing another mailbox",
        ),
        pytest.param(
            _with_credential(f'    client_secret: "{SECRET}"\n    client_secret_file: s.txt\n'),
            "relay.yaml:8: accounts.contoso: two credentials, client_secret and "
            "client_secret_file (give exactly one)",
            id="secret and secret file",
        ),
        pytest.param(
            _with_credential(
                f"    certificate: {{pfx_file: a.pfx, passphrase: '{SECRET}', "
                "passphrase_file: p}\n"
            ),
            "relay.yaml:7: accounts.contoso.certificate.passphrase_file: passphrase is also "
            "given (give passphrase or passphrase_file, not both)",
            id="passphrase twice",
        ),
        pytest.param(
            _with_credential("    certificate: {key_file: key.pem}\n"),
            "relay.yaml:7: accounts.contoso.certificate: missing cert_file "
            "(PEM key_file and cert_file, or a pfx_file)",
            id="certificate without cert_file",
        ),
        pytest.param(
            _with_credential("    certificate: {pfx_file: a.pfx, key_file: key.pem}\n"),
            "relay.yaml:7: accounts.contoso.certificate.key_file: pfx_file is also given "
            "(give pfx_file, or key_file and cert_file)",
            id="pfx and pem",
        ),
        pytest.param(
            BASE.replace(f'"{SECRET}"', "${AZURE_CLIENT_SECRET}"),
            "relay.yaml:7: accounts.contoso.client_secret: environment variable "
            "AZURE_CLIENT_SECRET is not set (set it, or give a default: "
            "${AZURE_CLIENT_SECRET:-...})",
            id="missing env var",
        ),
        pytest.param(
            BASE.replace("relay@contoso.com", "${MAIL-BOX}"),
            "relay.yaml:11: routes[0].mailbox: malformed ${MAIL-BOX} "
            "(write ${NAME} or ${NAME:-default})",
            id="malformed reference",
        ),
        pytest.param(
            BASE.replace("relay@contoso.com", "'${MAILBOX'"),
            "relay.yaml:11: routes[0].mailbox: unclosed ${ (write ${NAME} or ${NAME:-default})",
            id="unclosed reference",
        ),
        pytest.param(
            BASE.replace(
                'address: "127.0.0.1:2525"', 'address: "127.0.0.1:2525"\n    tls: {mode: starttls}'
            ),
            "relay.yaml:3: listen[0].tls: missing cert_file (mode starttls needs a certificate "
            "and its key, in PEM files)",
            id="tls mode without cert",
        ),
        pytest.param(
            BASE.replace(
                'address: "127.0.0.1:2525"',
                'address: "127.0.0.1:2525"\n    tls: {cert_file: a.pem}',
            ),
            "relay.yaml:3: listen[0].tls.cert_file: used only with mode starttls or implicit",
            id="cert without tls mode",
        ),
        pytest.param(
            BASE + "    transport: graph\n    transport: smtp\n",
            "relay.yaml:13: routes[0].transport: duplicate key (first given on line 12)",
            id="duplicate key",
        ),
        pytest.param(
            BASE + "accounts: {}\n",
            "relay.yaml:12: accounts: duplicate key (first given on line 3)",
            id="duplicate section",
        ),
        pytest.param(
            BASE + "    send_as: [a@contoso.com\n",
            "relay.yaml:13: YAML syntax error: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence that starts on line 12)",
            id="YAML syntax error",
        ),
        pytest.param(
            BASE.replace(f'client_secret: "{SECRET}"', f'client_secret: "{SECRET}\n  x: :'),
            "relay.yaml:13: YAML syntax error: found unexpected end of stream "
            "(while scanning a quoted scalar that starts on line 7)",
            id="syntax error on the secret's line",
        ),
        pytest.param(
            BASE + "\t- tab\n",
            "relay.yaml:12: YAML syntax error: found character '\\t' that cannot start any token "
            "(while scanning for the next token)",
            id="tab",
        ),
        pytest.param(
            BASE + "log: {level: \x07}\n",
            "relay.yaml:12: YAML syntax error: a control character is not allowed here",
            id="control character",
        ),
        pytest.param(
            BASE + "    mailbox2: 42\n",
            f"{ROUTE_AT_12}.mailbox2: unknown key (did you mean 'mailbox'?)",
            id="near-miss key",
        ),
        pytest.param(
            BASE.replace("relay@contoso.com", "42"),
            "relay.yaml:11: routes[0].mailbox: expected a string, got an integer "
            "(put it in quotes)",
            id="string expected, integer given",
        ),
        pytest.param(
            BASE + "    connections: three\n",
            f"{ROUTE_AT_12}.connections: expected an integer, got a string",
            id="integer expected, string given",
        ),
        pytest.param(
            BASE + "spool: {bounces: 'yes'}\n",
            "relay.yaml:12: spool.bounces: expected true or false, got a string",
            id="boolean expected, string given",
        ),
        pytest.param(
            BASE + "limits: [max_recipients]\n",
            "relay.yaml:12: limits: expected a mapping, got a list",
            id="mapping expected, list given",
        ),
        pytest.param(
            BASE + "inbound: {name: x}\n",
            "relay.yaml:12: inbound: expected a list, got a mapping",
            id="list expected, mapping given",
        ),
        pytest.param(
            BASE + "    mailbox_: \n",
            f"{ROUTE_AT_12}.mailbox_: unknown key (did you mean 'mailbox'?)",
            id="unknown key with no value",
        ),
        pytest.param(
            BASE.replace("relay@contoso.com", ""),
            "relay.yaml:11: routes[0].mailbox: expected a string, got nothing",
            id="no value",
        ),
        pytest.param(
            BASE + "    connections: 4\n",
            f"{ROUTE_AT_12}.connections: expected an integer from 1 to 3, got 4 (Exchange Online "
            "allows 3 concurrent SMTP connections per mailbox and refuses more with 432 4.3.2 "
            "Concurrent connections limit exceeded)",
            id="too many connections",
        ),
        pytest.param(
            BASE + "    max_recipients: 2000\n",
            f"{ROUTE_AT_12}.max_recipients: expected an integer from 1 to 1000, got 2000 "
            "(Exchange's RecipientLimits: 500 by default, 1000 at most)",
            id="too many recipients",
        ),
        pytest.param(
            BASE + "limits: {max_recipients: 0}\n",
            "relay.yaml:12: limits.max_recipients: expected an integer of at least 1, got 0",
            id="zero recipients",
        ),
        pytest.param(
            BASE + "    transport: grpah\n",
            f"{ROUTE_AT_12}.transport: 'grpah' is not one of smtp, graph (did you mean 'graph'?)",
            id="enum with suggestion",
        ),
        pytest.param(
            BASE.replace("  contoso:\n", "  contoso:\n    cloud: GCC\n"),
            "relay.yaml:5: accounts.contoso.cloud: 'GCC' is not one of global, usgov, "
            "usgov-dod, china",
            id="enum without suggestion",
        ),
        pytest.param(
            BASE + "    sender: rewrite\n    send_as: [a@contoso.com]\n",
            "relay.yaml:13: routes[0].send_as: used only with sender: keep "
            "(with rewrite, every message is sent as mailbox)",
            id="send_as with rewrite",
        ),
        pytest.param(
            BASE + "    save_to_sent_items: false\n",
            f"{ROUTE_AT_12}.save_to_sent_items: used only with transport: graph "
            "(over SMTP, Exchange always saves a copy in Sent Items)",
            id="save_to_sent_items with smtp",
        ),
        pytest.param(
            BASE.replace("relay@contoso.com", "relay"),
            "relay.yaml:11: routes[0].mailbox: expected a mailbox address like "
            "relay@contoso.com, got 'relay'",
            id="bad mailbox",
        ),
        pytest.param(
            BASE + "    match: {sender: []}\n",
            f"{ROUTE_AT_12}.match.sender: empty list (remove the key to match any)",
            id="empty match list",
        ),
        pytest.param(
            BASE + "    match: {sender: 'a b@contoso.com'}\n",
            f"{ROUTE_AT_12}.match.sender: a pattern has no spaces, got 'a b@contoso.com' "
            "(like *@contoso.com)",
            id="pattern with a space",
        ),
        pytest.param(
            BASE + "    match: {user: ultimo}\nusers: {ultmo: {password_hash: scrypt$x}}\n",
            f"{ROUTE_AT_12}.match.user: unknown user 'ultimo' (did you mean 'ultmo'?)",
            id="unknown user",
        ),
        pytest.param(
            BASE + "    match: {user: ultimo}\n",
            f"{ROUTE_AT_12}.match.user: unknown user 'ultimo' "
            "(no users are defined; add one under users)",
            id="no users",
        ),
        pytest.param(
            BASE + "  - {name: default, account: contoso, mailbox: other@contoso.com}\n",
            "relay.yaml:12: routes[1]: never used: routes[0] has no match, so it takes every "
            "message (give routes[0] a match, or move it last: the first match wins)",
            id="route after a catch-all",
        ),
        pytest.param(
            BASE.replace("  - name: default\n", "  - name: default\n    match: {user: u}\n")
            + "  - {name: default, account: contoso, mailbox: other@contoso.com}\n"
            + "users: {u: {password_hash: scrypt$x}}\n",
            "relay.yaml:13: routes[1].name: route name 'default' is already used by routes[0]",
            id="duplicate route name",
        ),
        pytest.param(
            BASE.replace("name: default", "name: my route"),
            "relay.yaml:9: routes[0].name: not a valid name: 'my route' "
            "(use letters, digits, '.', '_' and '-', starting with a letter or digit)",
            id="bad route name",
        ),
        pytest.param(
            BASE.split("routes:")[0] + "routes:\n",
            "relay.yaml:8: routes: no routes: mail from the listeners would have nowhere to go "
            "(add one, e.g. routes: [{name: default, account: contoso, "
            "mailbox: relay@contoso.com}])",
            id="no routes",
        ),
        pytest.param(
            BASE.split("routes:")[0].replace('listen:\n  - address: "127.0.0.1:2525"\n', ""),
            "relay.yaml:1: nothing to do (add a listener under listen or a mailbox under inbound)",
            id="nothing to do",
        ),
        pytest.param(
            BASE.replace("  - address", '  - address: "127.0.0.1:2525"\n  - address'),
            "relay.yaml:3: listen[1].address: 127.0.0.1:2525 is already used by listen[0]",
            id="duplicate listener address",
        ),
        pytest.param(
            BASE + "admin: {address: '127.0.0.1:2525'}\n",
            "relay.yaml:12: admin.address: 127.0.0.1:2525 is already used by listen[0]",
            id="admin on a listener's address",
        ),
        pytest.param(
            BASE.replace("  - address", "  - auth: {required: true}\n    address"),
            "relay.yaml:2: listen[0].auth.required: every client must log in, but there are no "
            "users (add one under users, with a password_hash from `relay hash-password`)",
            id="auth required without users",
        ),
        pytest.param(
            BASE.replace('"127.0.0.1:2525"', '"0.0.0.0:2525"\n    networks: []')
            + "users: {u: {password_hash: scrypt$x}}\n",
            "relay.yaml:3: listen[0].networks: every client must log in, and AUTH is offered "
            "only over TLS or on loopback (set tls.mode to starttls or implicit, or listen on a "
            "loopback address)",
            id="login without TLS off loopback",
        ),
        pytest.param(
            BASE.replace(CLIENT_ID, SECRET),
            "relay.yaml:6: accounts.contoso.client_id: expected an application (client) ID, a "
            "GUID like 00000000-0000-0000-0000-000000000000 (it is on the app registration's "
            "Overview page; not the secret's ID or value)",
            id="secret pasted as client_id",
        ),
        pytest.param(
            BASE.replace("contoso.onmicrosoft.com", "common"),
            "relay.yaml:5: accounts.contoso.tenant_id: 'common' cannot get app-only tokens "
            "(give your tenant's ID or domain)",
            id="common tenant",
        ),
        pytest.param(
            BASE.replace("contoso.onmicrosoft.com", SECRET),
            "relay.yaml:5: accounts.contoso.tenant_id: expected a tenant ID (a GUID) or a tenant "
            "domain like contoso.onmicrosoft.com",
            id="secret pasted as tenant_id",
        ),
        pytest.param(
            BASE.replace("    tenant_id: contoso.onmicrosoft.com\n", ""),
            "relay.yaml:5: accounts.contoso: missing tenant_id "
            "(the directory (tenant) ID of your Entra tenant)",
            id="missing tenant_id",
        ),
        pytest.param(
            BASE.replace("  contoso:\n", "  contoso:\n    endpoints: {authority: 'http://x'}\n"),
            "relay.yaml:5: accounts.contoso.endpoints.authority: expected an https URL, "
            "got 'http://x'",
            id="authority not https",
        ),
        pytest.param(
            BASE.replace("  contoso:\n", "  contoso:\n    endpoints: {smtp: smtp.office365.us}\n"),
            "relay.yaml:5: accounts.contoso.endpoints.smtp: expected an address like "
            "127.0.0.1:2525, got 'smtp.office365.us' (host and port are both needed)",
            id="smtp endpoint without port",
        ),
        pytest.param(
            BASE.replace("  contoso:\n", "  con toso:\n"),
            "relay.yaml:5: accounts.con toso: not a valid name: 'con toso' "
            "(use letters, digits, '.', '_' and '-', starting with a letter or digit)",
            id="bad account name",
        ),
        pytest.param(
            BASE + "users: {ultimo: {}}\n",
            "relay.yaml:12: users.ultimo: missing password_hash (from `relay hash-password`)",
            id="user without hash",
        ),
        pytest.param(
            BASE + f"users: {{ultimo: {{password_hash: '{SECRET}'}}}}\n",
            "relay.yaml:12: users.ultimo.password_hash: not a password hash (a plain password?) "
            "(store the output of `relay hash-password`, like scrypt$16384$8$1$...)",
            id="plain password as hash",
        ),
        pytest.param(
            BASE + "users: {8080: {password_hash: scrypt$x}}\n",
            "relay.yaml:12: users: expected a name as key, got an integer",
            id="key not a name",
        ),
        pytest.param(
            BASE + "x: &a {level: INFO}\nlog:\n  <<: *a\n",
            "relay.yaml:12: x: unknown key (known keys here: listen, limits, users, spool, "
            "accounts, routes, inbound, admin, log)",
            id="anchors are fine, unknown keys are not",
        ),
        pytest.param(
            BASE + "log:\n  <<: {level: INFO}\n",
            "relay.yaml:13: log: expected a name as key, got a merge key (<<)",
            id="merge key",
        ),
        pytest.param(
            BASE + "log: {level: verbose}\n",
            "relay.yaml:12: log.level: 'verbose' is not one of DEBUG, INFO, WARNING, ERROR, "
            "CRITICAL",
            id="bad log level",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com}\n",
            "relay.yaml:13: inbound[0]: missing deliver (one of: {maildir: ...}, "
            "{directory: ...}, {smtp: ...}, {http: ...})",
            id="inbound without deliver",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m, http: 'https://x'}}\n",
            "relay.yaml:13: inbound[0].deliver: needs exactly one of maildir, directory, smtp, "
            "http (got maildir and http)",
            id="two sinks",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {http: 'ftp://x'}}\n",
            "relay.yaml:13: inbound[0].deliver.http: expected an http or https URL, got 'ftp://x'",
            id="bad http sink",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, after: move_to}\n",
            "relay.yaml:13: inbound[0].after: move_to needs a folder (after: {move_to: Imported})",
            id="move_to without folder",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, after: archive}\n",
            "relay.yaml:13: inbound[0].after: 'archive' is not one of mark_read, delete",
            id="bad after",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, after: {move_to: Inbox}}\n",
            "relay.yaml:13: inbound[0].after: move_to is the folder being imported (inbox) "
            "(move messages to another folder, e.g. Imported)",
            id="move_to the same folder",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, match: {sendr: '*@x.com'}}\n",
            "relay.yaml:13: inbound[0].match.sendr: unknown key (did you mean 'sender'?)",
            id="inbound match typo",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, match: {sender: 'ops team@x.com'}}\n",
            "relay.yaml:13: inbound[0].match.sender: a pattern has no spaces, got "
            "'ops team@x.com' (like *@contoso.com)",
            id="inbound sender pattern with a space",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, match: {subject: []}}\n",
            "relay.yaml:13: inbound[0].match.subject: empty list (remove the key to match any)",
            id="inbound empty subject list",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, match: {subject: ''}}\n",
            "relay.yaml:13: inbound[0].match.subject: must not be empty",
            id="inbound empty subject",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, match: '*@x.com'}\n",
            "relay.yaml:13: inbound[0].match: expected a mapping, got a string",
            id="inbound match not a mapping",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contoso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}, max_size: 10M}\n",
            "relay.yaml:13: inbound[0].max_size: expected a size like 35MiB, got '10M' "
            "(write 10MiB (1024-based) or 10MB (1000-based))",
            id="inbound max_size",
        ),
        pytest.param(
            BASE + "inbound:\n  - {name: a, account: contso, mailbox: a@contoso.com, "
            "deliver: {maildir: m}}\n",
            "relay.yaml:13: inbound[0].account: unknown account 'contso' (did you mean 'contoso'?)",
            id="inbound unknown account",
        ),
        pytest.param(
            BASE + "inbound:\n"
            "  - {name: a, account: contoso, mailbox: a@contoso.com, deliver: {maildir: m}}\n"
            "  - {name: a, account: contoso, mailbox: b@contoso.com, deliver: {maildir: n}}\n",
            "relay.yaml:14: inbound[1]: inbound name 'a' is already used by inbound[0]",
            id="duplicate inbound name",
        ),
        pytest.param(
            BASE + "inbound:\n"
            "  - {name: a, account: contoso, mailbox: a@contoso.com, deliver: {maildir: m}}\n"
            "  - {name: b, account: contoso, mailbox: A@contoso.com, deliver: {maildir: n}}\n",
            "relay.yaml:14: inbound[1]: A@contoso.com folder inbox is already imported by "
            "inbound[0]",
            id="same folder imported twice",
        ),
        pytest.param(
            "- listen\n",
            "relay.yaml:1: expected a mapping of sections (listen, limits, users, spool, "
            "accounts, routes, inbound, admin, log), got a list",
            id="not a mapping",
        ),
        pytest.param(
            "# nothing here\n",
            "relay.yaml: the file is empty (start from the annotated sample relay.yaml)",
            id="empty file",
        ),
    ],
)
def test_errors(text: str, message: str) -> None:
    assert error(text) == message


def test_errors_come_in_file_order() -> None:
    """Two mistakes: the one higher up in the file is reported, whatever the section order."""
    text = "log: {level: loud}\n" + BASE.replace("account: contoso", "account: contso")
    assert error(text).startswith("relay.yaml:1: log.level:")


def test_errors_carry_file_line_path_and_hint() -> None:
    with pytest.raises(ConfigError) as caught:
        loads(BASE.replace("account: contoso", "account: contso"), source="etc/relay.yaml")
    exc = caught.value
    assert (exc.file, exc.line, exc.path) == ("etc/relay.yaml", 10, "routes[0].account")
    assert (exc.message, exc.hint) == ("unknown account 'contso'", "did you mean 'contoso'?")


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    source = str(tmp_path / "relay.yaml")
    text = _with_credential("    client_secret_file: secrets/missing\n")
    assert error(text, source=source) == (
        f"{source}:7: accounts.contoso.client_secret_file: cannot read "
        f"{tmp_path / 'secrets' / 'missing'}: No such file or directory"
    )
    write(tmp_path / "empty", "\n")
    text = _with_credential("    client_secret_file: empty\n")
    assert error(text, source=source) == (
        f"{source}:7: accounts.contoso.client_secret_file: {tmp_path / 'empty'} is empty"
    )
    write(tmp_path / "latin1", b"\xe9t\xe9\n")
    text = _with_credential("    client_secret_file: latin1\n")
    assert error(text, source=source) == (
        f"{source}:7: accounts.contoso.client_secret_file: {tmp_path / 'latin1'} is not UTF-8 text"
    )
    text = BASE.replace("  contoso:\n", "  contoso:\n    ca_file: ca\n")
    (tmp_path / "ca").mkdir()
    assert error(text, source=source) == (
        f"{source}:5: accounts.contoso.ca_file: cannot read {tmp_path / 'ca'}: Is a directory"
    )
    write(tmp_path / "not-a-ca.pem", "-----BEGIN NOTHING-----\n")
    text = BASE.replace("  contoso:\n", "  contoso:\n    ca_file: not-a-ca.pem\n")
    assert error(text, source=source) == (
        f"{source}:5: accounts.contoso.ca_file: {tmp_path / 'not-a-ca.pem'} holds no PEM "
        "certificate (give CA certificates in PEM (-----BEGIN CERTIFICATE-----), like the "
        "emulator's ca.pem)"
    )
    text = _with_credential("    certificate: {key_file: key.pem, cert_file: cert.pem}\n")
    assert error(text, source=source) == (
        f"{source}:7: accounts.contoso.certificate.key_file: cannot read "
        f"{tmp_path / 'key.pem'}: No such file or directory"
    )
    text = _with_credential("    certificate: {pfx_file: app.pfx, passphrase_file: pass}\n")
    assert error(text, source=source) == (
        f"{source}:7: accounts.contoso.certificate.passphrase_file: cannot read "
        f"{tmp_path / 'pass'}: No such file or directory"
    )
    text = _with_credential("    federated_token_file: /nonexistent/token\n")
    assert error(text, source=source) == (
        f"{source}:7: accounts.contoso.federated_token_file: cannot read /nonexistent/token: "
        "No such file or directory"
    )


def test_a_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "relay.yaml")
    assert str(caught.value) == (
        f"{tmp_path / 'relay.yaml'}: cannot read the file: No such file or directory"
    )
    write(tmp_path / "latin1.yaml", b"log: {level: \xe9}\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "latin1.yaml")
    assert str(caught.value) == f"{tmp_path / 'latin1.yaml'}: the file is not UTF-8 text"


def test_secret_file_contents_never_reach_an_error(tmp_path: Path) -> None:
    """A secret file read fine, then a later mistake: the message holds no secret."""
    write(tmp_path / "secret", f"{SECRET}\n")
    text = _with_credential("    client_secret_file: secret\n") + "    rate: fast\n"
    assert error(text, source=str(tmp_path / "relay.yaml")).endswith(
        "got 'fast' (per s, min, h or day)"
    )


# --- describe() and `relay check` --------------------------------------------------------------


def test_describe_shows_the_resolved_config(tmp_path: Path) -> None:
    text = BASE.replace('"127.0.0.1:2525"', '"[::1]:2525"') + (
        "    match: {sender: '*@contoso.com', client: 10.0.0.0/8}\n"
        "    transport: graph\n"
        "    send_as: [alerts@contoso.com]\n"
        "    rate: 1000/h\n"
        "    connections: 2\n"
        "inbound:\n"
        "  - {name: helpdesk, account: contoso, mailbox: h@contoso.com, poll_interval: 90,\n"
        "     deliver: {smtp: '[::1]:25'}, after: delete}\n"
    )
    shown = describe(loads(text, source=str(tmp_path / "relay.yaml"), environ={}))
    assert shown.splitlines() == [
        f"{tmp_path / 'relay.yaml'}: valid",
        "",
        "listen:",
        "  [::1]:2525: tls none; no login needed from 127.0.0.0/8, ::1/128; others must log in",
        "limits: max_message_size 35MiB, max_recipients 500, max_line_length 64KiB",
        "users: none",
        "routes (the first match wins):",
        "  default:",
        "    match: sender *@contoso.com; client 10.0.0.0/8",
        "    send: account contoso, mailbox relay@contoso.com, transport graph",
        "    sender: keep, may also send as alerts@contoso.com",
        "    pacing: rate 1000/h, connections 2, max_recipients 500",
        "    save_to_sent_items: true",
        "accounts:",
        "  contoso:",
        "    cloud: global",
        "    tenant_id: contoso.onmicrosoft.com",
        f"    client_id: {CLIENT_ID}",
        "    credential: client_secret ********",
        "    authority: https://login.microsoftonline.com",
        "    smtp: smtp.office365.com:587",
        "    graph: https://graph.microsoft.com/v1.0",
        "    ca_file: none (system trust store)",
        "spool:",
        f"  path: {tmp_path / 'spool'}",
        "  retry: 1m, 5m, 15m, 1h, 4h (the last repeats)",
        "  max_age: 5d, then bounce to the sender",
        "inbound:",
        "  helpdesk:",
        "    from: account contoso, mailbox h@contoso.com, folder inbox, every 1m30s",
        "    deliver: smtp [::1]:25",
        "    after: delete",
        "admin: off",
        "log: text, INFO",
    ]


def test_describe_says_when_graph_cannot_keep_the_message_as_sent(tmp_path: Path) -> None:
    """save_to_sent_items: false needs Graph's JSON sendMail, which rebuilds the message:
    `relay check` says so."""
    text = BASE + "    transport: graph\n    save_to_sent_items: false\n"
    shown = describe(loads(text, source=str(tmp_path / "relay.yaml"), environ={}))
    notes = " ".join(
        line.removeprefix("    note: ") for line in shown.splitlines() if "note:" in line
    )
    assert notes.startswith("route default: save_to_sent_items: false makes relay use Graph's")
    assert "Exchange keeps those in Sent Items regardless." in notes


@pytest.mark.parametrize(
    ("seconds", "text"), [(90, "1m30s"), (432_000, "5d"), (0.5, "0.5s"), (3600, "1h")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [(36_700_160, "35MiB"), (35_000_000, "35MB"), (10_240, "10KiB"), (1234, "1234")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def _relay_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "check", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_relay_check_on_a_good_file() -> None:
    """`relay check -c relay.yaml` prints the resolved config, masks the secret, exits 0."""
    done = _relay_check("-c", "relay.yaml", env=SAMPLE_ENV)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[0] == "relay.yaml: valid"
    assert "    credential: client_secret ********" in done.stdout
    assert SECRET not in done.stdout


def test_relay_check_on_a_bad_file(tmp_path: Path) -> None:
    """A mistake: exit status 2, nothing on stdout, the one-line error on stderr."""
    path = write(tmp_path / "relay.yaml", BASE.replace("account: contoso", "account: contso"))
    done = _relay_check("--config", str(path))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"{path}:10: routes[0].account: unknown account 'contso' (did you mean 'contoso'?)\n"
    )


def test_relay_check_without_the_file(tmp_path: Path) -> None:
    done = _relay_check("-c", str(tmp_path / "nope.yaml"))
    assert (done.returncode, done.stdout) == (2, "")
    assert (
        done.stderr
        == f"{tmp_path / 'nope.yaml'}: cannot read the file: No such file or directory\n"
    )
