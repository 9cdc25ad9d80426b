"""`relay check`: load relay.yaml and show what it resolves to; `--online`, also get tokens.

Takes the config file's path; leaves nothing anywhere (no spool, no sockets). Prints the
resolved listeners, routes, accounts, spool and inbound imports on stdout and returns 0, or
prints the first `ConfigError` (file:line: YAML path: message (hint)) on stderr and returns 2.
Secrets show as `********`.

`--online` then asks the identity platform for a token per account and use (Exchange for its
SMTP routes, Graph for its Graph routes and imports), as `relay serve` would, and prints `ok` or
the refusal with its AADSTS code; it returns 1 when any failed. A delegated account's token comes
from the cache `relay login` left, so this also says whether its sign-in still works; the cache
file is left as it is (check may run as another user than serve). No mail is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from dataclasses import dataclass

from relay.config import (
    DURATION_UNITS,
    RATE_UNITS,
    AccountConfig,
    AfterImport,
    Config,
    CredentialKind,
    InboundConfig,
    ListenerConfig,
    Rate,
    RouteConfig,
    RouteMatch,
    Transport,
    format_address,
    load,
)
from relay.errors import ConfigError, TokenRejected, TokenUnavailable
from relay.identity import (
    EXCHANGE_SCOPE,
    GRAPH_SCOPE,
    MsalTokenProvider,
    account_scopes,
    requested_scopes,
)
from relay.transports.graph import graph_save_to_sent_items_note

MASK = "********"

_SIZES = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("MB", 1000**2), ("KB", 1000))
_PER = {seconds: unit for unit, seconds in RATE_UNITS.items()}


async def run_check(args: argparse.Namespace) -> int:
    """`relay check -c FILE [--online]`: 0 when the file is valid (and every token came), 1 when
    a token request failed, 2 when the file is not valid."""
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(describe(config))
    if not args.online:
        return 0
    results = await check_tokens(config)
    print("tokens:" if results else "tokens: no accounts")
    for result in results:
        print(f"  {result}")
    failed = sum(1 for result in results if result.error is not None)
    if failed:
        print(f"relay check: {failed} of {len(results)} token requests failed", file=sys.stderr)
        return 1
    return 0


@dataclass(frozen=True)
class TokenCheck:
    """One account's token for one use, and what went wrong (None: the token came)."""

    account: str
    use: str  # smtp | graph
    scopes: tuple[str, ...]
    error: str | None

    def __str__(self) -> str:
        outcome = "ok" if self.error is None else f"FAILED: {self.error}"
        return f"{self.account}, {self.use} ({' '.join(self.scopes)}): {outcome}"


_USES = {EXCHANGE_SCOPE: "smtp", GRAPH_SCOPE: "graph"}


async def check_tokens(config: Config) -> list[TokenCheck]:
    """A token for each account and each use it has, accounts side by side."""

    async def one(account: AccountConfig) -> list[TokenCheck]:
        provider = MsalTokenProvider(account, read_only=True)
        checks = []
        for scope in account_scopes(config, account.name):
            error: str | None = None
            try:
                await provider.token(scope)
            except (TokenRejected, TokenUnavailable) as exc:
                error = exc.reply.text
            scopes = tuple(requested_scopes(account, scope))
            checks.append(TokenCheck(account.name, _USES[scope], scopes, error))
        return checks

    per_account = await asyncio.gather(*(one(a) for a in config.accounts.values()))
    return [check for checks in per_account for check in checks]


def describe(config: Config) -> str:
    """What the config resolves to, section by section, with every secret masked."""
    lines = [f"{config.source or 'relay.yaml'}: valid", ""]
    lines.append("listen:" if config.listeners else "listen: none (no SMTP intake)")
    lines += [f"  {_listener(listener)}" for listener in config.listeners]
    limits = config.limits
    lines.append(
        f"limits: max_message_size {format_size(limits.max_message_size)}, max_recipients "
        f"{limits.max_recipients}, max_line_length {format_size(limits.max_line_length)}"
    )
    users = ", ".join(f"{name} (password_hash {MASK})" for name in config.users)
    lines.append(f"users: {users or 'none'}")
    lines.append("routes (the first match wins):" if config.routes else "routes: none")
    for route in config.routes:
        lines += _route(route)
    lines.append("accounts:" if config.accounts else "accounts: none")
    for account in config.accounts.values():
        lines += _account(account)
    spool = config.spool
    lines += [
        "spool:",
        f"  path: {spool.path}",
        f"  retry: {', '.join(map(format_duration, spool.retry))} (the last repeats)",
        f"  max_age: {format_duration(spool.max_age)}, then "
        + ("bounce to the sender" if spool.bounces else "dead-letter without a bounce"),
    ]
    lines.append("inbound:" if config.inbound else "inbound: none")
    for inbound in config.inbound:
        lines += _inbound(inbound)
    admin = config.admin
    lines.append(f"admin: {admin.address}" if admin else "admin: off")
    lines.append(f"log: {config.log.format.value}, {config.log.level}")
    return "\n".join(lines)


def _listener(listener: ListenerConfig) -> str:
    networks = ", ".join(str(n) for n in listener.networks)
    if listener.auth.required or not networks:
        login = "every client must log in"
    else:
        login = f"no login needed from {networks}; others must log in"
    tls = listener.tls
    files = f" (cert_file {tls.cert_file}, key_file {tls.key_file})" if tls.cert_file else ""
    return f"{listener.address}: tls {tls.mode.value}{files}; {login}"


def _route(route: RouteConfig) -> list[str]:
    sender = route.sender.value
    if route.send_as:
        sender += f", may also send as {', '.join(route.send_as)}"
    pacing = (
        f"rate {format_rate(route.rate)}, connections {route.connections}, "
        f"max_recipients {route.max_recipients}"
    )
    lines = [
        f"  {route.name}:",
        f"    match: {_match(route.match)}",
        f"    send: account {route.account}, mailbox {route.mailbox}, "
        f"transport {route.transport.value}",
        f"    sender: {sender}",
        f"    pacing: {pacing}",
    ]
    if route.transport is Transport.GRAPH:
        lines.append(f"    save_to_sent_items: {str(route.save_to_sent_items).lower()}")
        note = graph_save_to_sent_items_note(route)
        if note:
            lines += [f"    note: {line}" for line in textwrap.wrap(note, 88)]
    return lines


def _match(match: RouteMatch) -> str:
    parts = [
        (label, ", ".join(map(str, values)))
        for label, values in (
            ("sender", match.senders),
            ("from", match.from_headers),
            ("recipient", match.recipients),
            ("client", match.clients),
            ("user", match.users),
        )
        if values
    ]
    return "; ".join(f"{label} {values}" for label, values in parts) or "every message"


def _account(account: AccountConfig) -> list[str]:
    endpoints = account.endpoints
    return [
        f"  {account.name}:",
        f"    cloud: {account.cloud.value}",
        f"    tenant_id: {account.tenant_id}",
        f"    client_id: {account.client_id}",
        f"    credential: {_credential(account)}",
        f"    authority: {endpoints.authority}",
        f"    smtp: {format_address(endpoints.smtp_host, endpoints.smtp_port)}",
        f"    graph: {endpoints.graph}",
        f"    ca_file: {account.ca_file or 'none (system trust store)'}",
    ]


def _credential(account: AccountConfig) -> str:
    credential = account.credential
    if credential.kind is CredentialKind.SECRET:
        return f"client_secret {MASK}"
    if credential.kind is CredentialKind.FEDERATED:
        return f"federated_token_file {credential.federated_token_file}"
    if credential.kind is CredentialKind.DELEGATED:
        return (
            f"delegated_user {credential.user} (signs in with `relay login {account.name}`; "
            f"token cache {account.token_cache})"
        )
    if credential.pfx_file is not None:
        files = f"pfx_file {credential.pfx_file}"
    else:
        files = f"key_file {credential.key_file}, cert_file {credential.cert_file}"
    passphrase = f", passphrase {MASK}" if credential.passphrase else ""
    return f"certificate {files}{passphrase}"


def _inbound(inbound: InboundConfig) -> list[str]:
    ((kind, target),) = inbound.deliver.items()
    if isinstance(target, tuple):  # smtp: (host, port)
        target = format_address(*target)
    after = inbound.after.value
    if inbound.after is AfterImport.MOVE_TO:
        after = f"move_to {inbound.move_to}"
    return [
        f"  {inbound.name}:",
        f"    from: account {inbound.account}, mailbox {inbound.mailbox}, folder "
        f"{inbound.folder}, every {format_duration(inbound.poll_interval)}",
        f"    deliver: {kind} {target}",
        f"    after: {after}",
    ]


def format_duration(seconds: float) -> str:
    """The config's own spelling: 90 -> 1m30s, 432000 -> 5d, 0.5 -> 0.5s."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    left, parts = int(seconds), []
    for unit, size in DURATION_UNITS.items():  # largest first
        if left >= size:
            parts.append(f"{left // int(size)}{unit}")
            left %= int(size)
    return "".join(parts)


def format_size(size: int) -> str:
    """The config's own spelling: 36700160 -> 35MiB, 10000 -> 10KB, 1234 -> 1234."""
    for unit, factor in _SIZES:
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_rate(rate: Rate) -> str:
    return f"{rate.count}/{_PER.get(rate.per) or format_duration(rate.per)}"
