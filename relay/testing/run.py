"""`relay emulator`: run the Exchange Online emulator in the foreground for users' own trials.

Takes the directory from a small YAML file (`--config`) or builds the sample tenant; prints the
endpoints, the CA file and a relay.yaml `accounts:` snippet that works against them, then serves
until SIGINT or SIGTERM (the handlers only set an event; the main task shuts down).

A config mistake is a `ConfigError` naming the file and the YAML path (exit status 2); a port
that cannot be bound exits 1.

    tenants:
      - domain: contoso.com          # required
        tenant_id: <guid>            # optional: a stable id derived from the domain otherwise
        apps:
          - name: relay              # required: names the account in the printed relay.yaml
            client_id: <guid>        # optional: a stable id derived from the name otherwise
            secret: "..."            # a client secret, and/or
            certificate: app.pem     # a PEM certificate file (relative to this file)
            key_file: app.key        # optional: its private key, for the printed relay.yaml
            roles: [SMTP.SendAsApp, Mail.Send, Mail.ReadWrite]   # optional: default all
        mailboxes:
          - address: relay@contoso.com
            full_access: [relay]     # names of apps granted FullAccess
            send_as: [alerts@contoso.com]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509

from relay.config import LogConfig
from relay.errors import ConfigError
from relay.logs import configure as configure_logging
from relay.testing.directory import ALL_ROLES, Directory, Tenant
from relay.testing.emulator import Emulator, sample_tenant

KEY_PLACEHOLDER = "<the app's private key file>"


@dataclass(frozen=True)
class EmulatorAccount:
    """What a relay.yaml account needs to use one app of the emulator's directory."""

    name: str
    tenant_id: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class EmulatorSetup:
    directory: Directory
    accounts: tuple[EmulatorAccount, ...]


def stable_id(*names: str) -> str:
    """A GUID that stays the same for the same names (ids the config leaves out)."""
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, "relay-emulator:" + "/".join(n.lower() for n in names))
    )


def sample_setup(state_dir: Path) -> EmulatorSetup:
    """The sample tenant, with its certificate app's key and certificate written to state_dir."""
    sample = sample_tenant()
    state_dir.mkdir(parents=True, exist_ok=True)
    cert_file = state_dir / "sample-app.pem"
    key_file = state_dir / "sample-app.key"
    cert_file.write_bytes(sample.cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(sample.key_pem)
    stem = sample.domain.split(".")[0]
    return EmulatorSetup(
        sample.directory,
        (
            EmulatorAccount(
                stem, sample.tenant_id, sample.client_id, client_secret=sample.client_secret
            ),
            EmulatorAccount(
                f"{stem}-cert",
                sample.tenant_id,
                sample.cert_client_id,
                cert_file=cert_file,
                key_file=key_file,
            ),
        ),
    )


def load_emulator_config(path: Path) -> EmulatorSetup:
    """Read an emulator YAML file into a directory and the accounts it offers."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"not valid YAML: {exc}", file=path, line=line) from None
    return _Loader(path).setup(doc)


class _Loader:
    """Walks the YAML document; every error names the path of the key at fault."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, where: str, message: str, hint: str = "") -> ConfigError:
        return ConfigError(message, file=self.path, path=where, hint=hint)

    def mapping(
        self, value: object, where: str, keys: set[str], required: set[str]
    ) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.error(where, "must be a mapping")
        for key in value:
            if key not in keys:
                raise self.error(
                    f"{where}.{key}" if where else str(key),
                    "unknown key",
                    hint="known keys: " + ", ".join(sorted(keys)),
                )
        for key in sorted(required - value.keys()):
            raise self.error(f"{where}.{key}" if where else key, "is required")
        return value

    def items(self, value: object, where: str) -> list[object]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(where, "must be a list")
        return value

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, "must be a non-empty string")
        return value.strip()

    def guid(self, value: object, where: str) -> str:
        text = self.text(value, where)
        try:
            return str(uuid.UUID(text))
        except ValueError:
            raise self.error(where, f"{text!r} is not a GUID") from None

    def setup(self, doc: object) -> EmulatorSetup:
        doc = self.mapping(doc, "", {"tenants"}, {"tenants"})
        directory = Directory()
        accounts: list[EmulatorAccount] = []
        tenants = self.items(doc["tenants"], "tenants")
        if not tenants:
            raise self.error("tenants", "must list at least one tenant")
        for i, entry in enumerate(tenants):
            accounts += self.tenant(directory, entry, f"tenants[{i}]")
        names = [a.name for a in accounts]
        for name in names:
            if names.count(name) > 1:
                raise self.error("tenants", f"two apps are named {name!r}", "app names are unique")
        return EmulatorSetup(directory, tuple(accounts))

    def tenant(self, directory: Directory, entry: object, where: str) -> list[EmulatorAccount]:
        entry = self.mapping(entry, where, {"domain", "tenant_id", "apps", "mailboxes"}, {"domain"})
        domain = self.text(entry["domain"], f"{where}.domain").lower()
        if "." not in domain:
            raise self.error(f"{where}.domain", f"{domain!r} is not a domain name")
        if directory.tenant(domain) is not None:
            raise self.error(f"{where}.domain", f"{domain!r} is already a tenant's domain")
        tenant_id = (
            self.guid(entry["tenant_id"], f"{where}.tenant_id")
            if "tenant_id" in entry
            else stable_id(domain)
        )
        tenant = directory.add_tenant(tenant_id, domain=domain)
        apps: dict[str, str] = {}  # name -> client id
        accounts = []
        for i, app_entry in enumerate(self.items(entry.get("apps"), f"{where}.apps")):
            account = self.app(tenant_id, domain, app_entry, f"{where}.apps[{i}]")
            app = tenant.add_app(account.client_id, secret=account.client_secret)
            if account.cert_file is not None:
                app.add_certificate(account.cert_file.read_bytes())
            app.roles = self.roles(app_entry, f"{where}.apps[{i}]")
            apps[account.name] = account.client_id
            accounts.append(account)
        for i, box in enumerate(self.items(entry.get("mailboxes"), f"{where}.mailboxes")):
            self.mailbox(tenant, apps, box, f"{where}.mailboxes[{i}]")
        return accounts

    def app(self, tenant_id: str, domain: str, entry: object, where: str) -> EmulatorAccount:
        keys = {"name", "client_id", "secret", "certificate", "key_file", "roles"}
        entry = self.mapping(entry, where, keys, {"name"})
        name = self.text(entry["name"], f"{where}.name")
        client_id = (
            self.guid(entry["client_id"], f"{where}.client_id")
            if "client_id" in entry
            else stable_id(domain, name)
        )
        secret = self.text(entry["secret"], f"{where}.secret") if "secret" in entry else None
        cert_file = key_file = None
        if "certificate" in entry:
            cert_file = self.file(entry["certificate"], f"{where}.certificate")
            try:
                x509.load_pem_x509_certificate(cert_file.read_bytes())
            except ValueError:
                raise self.error(f"{where}.certificate", "is not a PEM certificate") from None
        if "key_file" in entry:
            if cert_file is None:
                raise self.error(f"{where}.key_file", "needs `certificate` beside it")
            key_file = self.file(entry["key_file"], f"{where}.key_file")
        if secret is None and cert_file is None:
            raise self.error(where, "has no credential", "give `secret` or `certificate`")
        return EmulatorAccount(name, tenant_id, client_id, secret, cert_file, key_file)

    def roles(self, entry: Mapping[str, object], where: str) -> set[str]:
        if "roles" not in entry:
            return set(ALL_ROLES)
        roles = set()
        for i, role in enumerate(self.items(entry["roles"], f"{where}.roles")):
            role = self.text(role, f"{where}.roles[{i}]")
            if role not in ALL_ROLES:
                raise self.error(
                    f"{where}.roles[{i}]",
                    f"unknown permission {role!r}",
                    "known: " + ", ".join(sorted(ALL_ROLES)),
                )
            roles.add(role)
        return roles

    def file(self, value: object, where: str) -> Path:
        path = Path(self.text(value, where))
        if not path.is_absolute():
            path = self.path.parent / path
        if not path.is_file():
            raise self.error(where, f"no such file: {path}")
        return path

    def mailbox(self, tenant: Tenant, apps: Mapping[str, str], entry: object, where: str) -> None:
        entry = self.mapping(entry, where, {"address", "full_access", "send_as"}, {"address"})
        address = self.text(entry["address"], f"{where}.address").lower()
        local, _, domain = address.partition("@")
        if not local or domain not in tenant.domains:
            raise self.error(
                f"{where}.address",
                f"{address!r} is not an address in the tenant's domains",
                "domains: " + ", ".join(tenant.domains),
            )
        if address in tenant.mailboxes:
            raise self.error(f"{where}.address", f"{address!r} is listed twice")
        box = tenant.add_mailbox(address)
        for i, name in enumerate(self.items(entry.get("full_access"), f"{where}.full_access")):
            name = self.text(name, f"{where}.full_access[{i}]")
            if name not in apps:
                raise self.error(
                    f"{where}.full_access[{i}]",
                    f"no app named {name!r} in this tenant",
                    "apps: " + ", ".join(apps) if apps else "",
                )
            box.full_access.add(apps[name])
        for i, other in enumerate(self.items(entry.get("send_as"), f"{where}.send_as")):
            other = self.text(other, f"{where}.send_as[{i}]").lower()
            if "@" not in other:
                raise self.error(f"{where}.send_as[{i}]", f"{other!r} is not an address")
            box.send_as.add(other)


def accounts_snippet(
    accounts: Sequence[EmulatorAccount], endpoints: Mapping[str, str], ca_file: Path
) -> str:
    """The relay.yaml `accounts:` section for these accounts against these endpoints."""
    section: dict[str, dict[str, object]] = {}
    for account in accounts:
        entry: dict[str, object] = {
            "tenant_id": account.tenant_id,
            "client_id": account.client_id,
        }
        if account.client_secret is not None:
            entry["client_secret"] = account.client_secret
        else:
            entry["certificate"] = {
                "key_file": str(account.key_file) if account.key_file else KEY_PLACEHOLDER,
                "cert_file": str(account.cert_file),
            }
        entry["endpoints"] = dict(endpoints)
        entry["ca_file"] = str(ca_file)
        section[account.name] = entry
    return yaml.safe_dump({"accounts": section}, sort_keys=False, default_flow_style=False)


def banner(emulator: Emulator, accounts: Sequence[EmulatorAccount]) -> str:
    lines = [
        "relay emulator: a local stand-in for Exchange Online (not Microsoft), for trials",
        f"  identity platform  {emulator.authority}/<tenant>",
        f"  SMTP submission    {emulator.endpoints['smtp']} (STARTTLS, then AUTH XOAUTH2)",
        f"  CA certificate     {emulator.ca_file}",
    ]
    for tenant in emulator.directory.tenants.values():
        lines.append(f"  tenant             {tenant.domains[0]} ({tenant.tenant_id})")
        for box in tenant.mailboxes.values():
            lines.append(f"    mailbox          {box.address}")
    lines += [
        "",
        "# relay.yaml accounts for this emulator:",
        accounts_snippet(accounts, emulator.endpoints, emulator.ca_file),
        "Ctrl-C stops the emulator.",
    ]
    return "\n".join(lines)


def _prepare(args: argparse.Namespace) -> tuple[Emulator, EmulatorSetup]:
    """Startup before any task runs (so blocking file I/O is fine): config, then the emulator."""
    state_dir = Path(args.state_dir).resolve()
    if args.config:
        setup = load_emulator_config(Path(args.config).resolve())
    else:
        setup = sample_setup(state_dir)
    graph_port = args.graph_port
    if graph_port is None:
        graph_port = args.https_port + 1 if args.https_port else 0
    emulator = Emulator(
        setup.directory,
        state_dir=state_dir,
        host=args.host,
        smtp_port=args.smtp_port,
        identity_port=args.https_port,
        graph_port=graph_port,
    )
    return emulator, setup


async def run_emulator(args: argparse.Namespace) -> int:
    configure_logging(LogConfig())
    try:
        emulator, setup = _prepare(args)
    except ConfigError as exc:
        print(f"relay emulator: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with emulator:
            print(banner(emulator, setup.accounts), flush=True)
            await stop.wait()
            print("relay emulator: stopping", file=sys.stderr, flush=True)
    except OSError as exc:
        print(f"relay emulator: cannot listen on {args.host}: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
