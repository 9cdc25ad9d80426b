"""Routes: which account and mailbox a message goes out through, and as whom.

The listener's intake asks the `Router` at each SMTP stage and gets either a decision or the
`Reply` that refuses the client, with text that says what did not match. Nothing here does I/O;
at DATA the router returns the `Split`s to spool (one per route and chunk of recipients, the
bytes already rewritten under the route's sender policy) and the intake spools them.

Matching (`routes[].match` in relay.yaml). Every criterion is optional, criteria combine with
AND, a list means any-of, and the first matching route wins:

* `sender` globs the envelope sender, `recipient` the recipient, `from` the From header address
  (every address of a From field must match). Globs are case-insensitive and only `*` (any run)
  and `?` (one character) are special, so `[` in a domain literal is literal. The null sender
  (`MAIL FROM:<>`, bounces) is the empty address: it matches only a pattern `""` or `"<>"`, never
  `*`; a route without a `sender` criterion takes it like any other sender.
* `client` is a list of networks (an IPv4-mapped IPv6 client also matches its IPv4 network),
  `user` the local users authenticated with AUTH (a route with `user` never takes anonymous mail).
* The From header is only known at DATA. At MAIL and RCPT, routes with a `from` criterion are
  candidates; the route that matches first is final at DATA, and a From that then matches no
  route refuses the message at the end of DATA.

Sender policy:

* `keep`: the envelope sender must be the route's mailbox or one of its `send_as` addresses, and
  so must every From header address and the Sender header address at DATA; otherwise the client
  gets `550 5.7.60` (Exchange's own wording for a send-as refusal, reference §1.5) naming the
  route and mailbox, at SMTP time instead of a bounce later. The null sender passes the envelope
  check (bounces must flow); its From header is checked like any other, so a DSN must be From
  the mailbox (as `relay.bounce` makes them), not from MAILER-DAEMON. A message without a From
  header passes unchanged; a From header without a readable address is refused.
* `rewrite`: the envelope sender becomes the mailbox (the null sender stays null, so a bounce can
  never bounce); From becomes the mailbox with its display name kept; the original From moves to
  Reply-To when there is none; a Sender header naming another address becomes the mailbox too
  (Exchange treats a foreign Sender as send-on-behalf). A missing From is added at the end of the
  header block. Every other header keeps its bytes and its place, and the body is untouched.

A message whose recipients take different routes is split into one transaction per route, each
recipient once (duplicates compare case-insensitively, the first spelling wins), then into chunks
of at most the route's `max_recipients`. A transaction is refused whole at DATA if any recipient
has no route or any route's policy refuses: SMTP cannot accept a message for part of them.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from typing import cast

from relay.config import IPNetwork, RouteConfig, SenderPolicy
from relay.errors import ConfigError
from relay.headerblock import Field, HeaderBlock, fold
from relay.reply import Reply

SEND_AS_DENIED = "SMTP; Client does not have permissions to send as this sender"  # reference §1.5
NULL_SENDER_PATTERNS = frozenset({"", "<>"})

_SHOWN_ROUTES = 3  # routes listed in a no-route reply before "N more"
_SHOWN_PATTERNS = 3  # patterns listed per criterion
_SHOWN_CHARS = 120  # client-supplied text quoted in a reply is cut here
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")
_QUOTED_RUN = 900  # longest run without spaces a quoted name may have and still fit a 998 line
_ENCODED_WORD_BYTES = 45  # 60 base64 chars: "=?utf-8?b?...?=" stays within RFC 2047's 75
_REGISTRY = HeaderRegistry()
# A field that is one plain address, bare or in angle brackets after a name of plain words: the
# usual From and Sender, read without CPython's header parser (which costs ~10x more); whatever
# this does not match fully goes to that parser.
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
PLAIN_ADDR_SPEC = rf"{_DOT_ATOM}@{_DOT_ATOM}"  # dot-atom@dot-atom, ASCII: parsers agree on it
_PLAIN_ADDRESS = re.compile(
    rf"(?:[A-Za-z0-9]+(?: +[A-Za-z0-9]+)* *)?<({PLAIN_ADDR_SPEC})>|({PLAIN_ADDR_SPEC})"
)


@dataclass(frozen=True)
class Split:
    """One transaction to spool: a route, its envelope and the bytes to send."""

    route: RouteConfig
    mail_from: str  # "" for the null sender
    rcpt_tos: tuple[str, ...]
    data: bytes

    def __repr__(self) -> str:
        return (
            f"Split(route={self.route.name!r}, mail_from={self.mail_from!r}, "
            f"rcpt_tos={len(self.rcpt_tos)}, data={len(self.data)} bytes)"
        )


def envelope_address(address: str) -> str:
    """The envelope address as the router sees it: "" for the null sender (aiosmtpd says "<>")."""
    return "" if address in NULL_SENDER_PATTERNS else address


def _show(text: str) -> str:
    """Client-supplied text made safe to quote in a reply or log: ASCII, no controls, short."""
    safe = "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode() for c in text)
    return safe if len(safe) <= _SHOWN_CHARS else safe[: _SHOWN_CHARS - 3] + "..."


def _listing(items: Sequence[str], limit: int, sep: str = " or ") -> str:
    shown = sep.join(items[:limit])
    return shown if len(items) <= limit else f"{shown}{sep}{len(items) - limit} more"


class _Glob:
    """A case-insensitive address glob where only `*` and `?` are special."""

    def __init__(self, pattern: str) -> None:
        self.null = pattern in NULL_SENDER_PATTERNS
        self.catch_all = pattern == "*"
        parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
        self._regex = re.compile("".join(parts), re.IGNORECASE | re.DOTALL)

    def matches(self, address: str) -> bool:
        if self.null or not address:
            return self.null and not address
        return self._regex.fullmatch(address) is not None


def _in_networks(client_ip: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c in net for c in candidates for net in networks)


@dataclass(frozen=True)
class _Stage:
    """What is known about the transaction when the router is asked; None = not known yet."""

    client_ip: str
    user: str | None
    sender: str
    rcpt: str | None = None
    from_addrs: tuple[str, ...] | None = None

    def describe(self) -> str:
        who = f"user {_show(self.user)}" if self.user else "not authenticated"
        return f"sender <{_show(self.sender)}> from client {_show(self.client_ip)} ({who})"


class _Matcher:
    def __init__(self, index: int, route: RouteConfig) -> None:
        self.index = index
        self.route = route
        self.senders = tuple(map(_Glob, route.match.senders))
        self.from_headers = tuple(map(_Glob, route.match.from_headers))
        self.recipients = tuple(map(_Glob, route.match.recipients))
        self.allowed = frozenset(a.lower() for a in (route.mailbox, *route.send_as))

    def mismatch(self, s: _Stage) -> str | None:
        """None when the route matches what is known, else what it wants instead."""
        m = self.route.match
        if self.senders and not any(g.matches(s.sender) for g in self.senders):
            return "sender " + _listing(m.senders, _SHOWN_PATTERNS)
        if m.clients and not _in_networks(s.client_ip, m.clients):
            return "client " + _listing([str(n) for n in m.clients], _SHOWN_PATTERNS)
        if m.users and s.user not in m.users:
            return "AUTH as user " + _listing(m.users, _SHOWN_PATTERNS)
        if (
            s.rcpt is not None
            and self.recipients
            and not any(g.matches(s.rcpt) for g in self.recipients)
        ):
            return "recipient " + _listing(m.recipients, _SHOWN_PATTERNS)
        if (
            s.from_addrs is not None
            and self.from_headers
            and not (
                s.from_addrs
                and all(any(g.matches(a) for g in self.from_headers) for a in s.from_addrs)
            )
        ):
            return "From header " + _listing(m.from_headers, _SHOWN_PATTERNS)
        return None

    def decides(self, s: _Stage) -> bool:
        """Whether a match now is final, whatever the criteria not known yet turn out to be."""
        rcpt_settled = (
            s.rcpt is not None or not self.recipients or any(g.catch_all for g in self.recipients)
        )
        return rcpt_settled and (s.from_addrs is not None or not self.from_headers)

    def may_send_as(self, address: str) -> bool:
        return self.route.sender is SenderPolicy.REWRITE or address.lower() in self.allowed

    def send_as_denied(self, what: str) -> Reply:
        r = self.route
        return Reply(
            550,
            "5.7.60",
            f"{SEND_AS_DENIED}: {what} is neither {r.mailbox} nor in send_as of route {r.name}"
            f" (routes[{self.index}] in relay.yaml: add it to send_as once Exchange grants"
            f" Send-As, or use sender: rewrite)",
        )


class Router:
    """Route decisions for the listener's intake, from `routes` in relay.yaml."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        for i, route in enumerate(routes):
            if route.max_recipients < 1:
                raise ConfigError(
                    f"max_recipients must be at least 1, not {route.max_recipients}",
                    path=f"routes[{i}].max_recipients",
                )
        self._matchers = tuple(_Matcher(i, r) for i, r in enumerate(routes))

    @property
    def routes(self) -> tuple[RouteConfig, ...]:
        return tuple(m.route for m in self._matchers)

    def __repr__(self) -> str:
        return f"<Router routes=[{', '.join(m.route.name for m in self._matchers)}]>"

    def at_mail(self, client_ip: str, user: str | None, mail_from: str) -> Reply | None:
        """At MAIL FROM: None to go on, or the refusal (no route for this sender at all, or
        every route that could take it keeps senders and may not send as this one)."""
        decision = self._decide(_Stage(client_ip, user, envelope_address(mail_from)))
        return decision if isinstance(decision, Reply) else None

    def at_rcpt(
        self, client_ip: str, user: str | None, mail_from: str, rcpt: str
    ) -> RouteConfig | Reply:
        """At RCPT TO: the route this recipient takes, or the refusal.

        When routes with a `from` criterion are in play the route is the first that can take the
        message; the From header at DATA may still send the recipient through a later one.
        """
        decision = self._decide(_Stage(client_ip, user, envelope_address(mail_from), rcpt=rcpt))
        return decision if isinstance(decision, Reply) else decision.route

    def at_data(
        self,
        client_ip: str,
        user: str | None,
        mail_from: str,
        rcpt_tos: Sequence[str],
        data: bytes,
    ) -> list[Split] | Reply:
        """After DATA: the transactions to spool, or the refusal for the whole message."""
        sender = envelope_address(mail_from)
        block = HeaderBlock.parse(data)
        froms = [(f, _addr_specs(f)) for f in block.get_all("from")]
        from_addrs = tuple(a for _, specs in froms for a in specs)
        groups: dict[int, tuple[_Matcher, list[str]]] = {}
        seen: set[str] = set()
        for rcpt in rcpt_tos:
            if rcpt.lower() in seen:
                continue
            seen.add(rcpt.lower())
            stage = _Stage(client_ip, user, sender, rcpt=rcpt, from_addrs=from_addrs)
            decision = self._decide(stage)
            if isinstance(decision, Reply):
                return decision
            groups.setdefault(decision.index, (decision, []))[1].append(rcpt)
        splits: list[Split] = []
        for matcher, rcpts in groups.values():
            route = matcher.route
            if route.sender is SenderPolicy.REWRITE:
                out, envelope = rewrite_sender(data, route.mailbox), sender and route.mailbox
            else:
                refusal = _check_headers(matcher, block, froms)
                if refusal is not None:
                    return refusal
                out, envelope = data, sender
            step = route.max_recipients
            splits.extend(
                Split(route, envelope, tuple(rcpts[i : i + step]), out)
                for i in range(0, len(rcpts), step)
            )
        return splits

    def _decide(self, stage: _Stage) -> _Matcher | Reply:
        """The first route that can take what is known so far and may send as its sender."""
        possible: list[_Matcher] = []
        wants: list[str] = []
        for m in self._matchers:
            why = m.mismatch(stage)
            if why is not None:
                wants.append(f"{m.route.name} wants {why}")
                continue
            possible.append(m)
            if m.decides(stage):
                break
        if not possible:
            return _no_route(stage, wants)
        for m in possible:
            if not stage.sender or m.may_send_as(stage.sender):  # the null sender: bounces
                return m
        return possible[0].send_as_denied(f"envelope sender <{_show(stage.sender)}>")


def _no_route(stage: _Stage, wants: list[str]) -> Reply:
    subject = stage.describe()
    if stage.rcpt is not None:
        subject = f"recipient <{_show(stage.rcpt)}> ({subject}"
        if stage.from_addrs is not None:
            shown = ", ".join(f"<{_show(a)}>" for a in stage.from_addrs) or "none"
            subject += f", From header {shown}"
        subject += ")"
    reason = _listing(wants, _SHOWN_ROUTES, "; ") if wants else "relay.yaml has no routes"
    text = f"No route for {subject}: {reason}; check routes[].match in relay.yaml"
    return Reply(550, "5.7.1", text)


def _parse(field: Field) -> tuple[tuple[Address, ...], tuple[str, ...]]:
    """The field's addresses and its group names; none when the parser gives up.

    CPython's header parser records most defects, but some hostile values make it raise
    (ValueError, TypeError and AttributeError turned up under fuzzing): such a field has
    no readable address, which the keep policy refuses and the rewrite policy replaces.
    """
    try:
        header = cast(AddressHeader, _REGISTRY(field.name, field.text()))
        return header.addresses, tuple(g.display_name for g in header.groups if g.display_name)
    except Exception:
        return (), ()


def _addr_specs(field: Field) -> tuple[str, ...]:
    text = field.text()
    if plain := _PLAIN_ADDRESS.fullmatch(text):
        return (plain[1] or plain[2],)
    return tuple(a.addr_spec for a in _parse(field)[0])


def _check_headers(
    matcher: _Matcher, block: HeaderBlock, froms: Sequence[tuple[Field, tuple[str, ...]]]
) -> Reply | None:
    """The keep policy at DATA: every From (`froms`, already parsed) and Sender address may be
    sent as."""
    senders = [(f, _addr_specs(f)) for f in block.get_all("sender")]
    for field, specs in (*froms, *senders):
        if not specs:
            return matcher.send_as_denied(f"{field.name.title()} header without an address")
        for spec in specs:
            if not matcher.may_send_as(spec):
                return matcher.send_as_denied(f"{field.name.title()} header <{_show(spec)}>")
    return None


# --- the rewrite policy ----------------------------------------------------------------------


def rewrite_sender(data: bytes, mailbox: str) -> bytes:
    """From (and a foreign Sender) -> `mailbox` keeping the display name, old From -> Reply-To.

    Works on the raw bytes: only the From, Sender and Reply-To fields can change, every other
    field keeps its bytes and place, and the body is returned byte for byte.
    """
    block = HeaderBlock.parse(data)
    froms = block.get_all("from")
    moves_to_reply_to = froms[0] if froms and not block.get_all("reply-to") else None
    fields: list[Field] = []
    for field in block.fields:
        if field.name not in ("from", "sender"):
            fields.append(field)
            continue
        new = _readdress(field, mailbox, block.eol)
        fields.append(new)
        if field is moves_to_reply_to and new != field and _parse(field)[0]:
            fields.append(Field(b"Reply-To:" + field.value))
    if not froms:
        fields.append(fold("From", mailbox, block.eol))
    return block.with_fields(fields).to_bytes()


def _readdress(field: Field, mailbox: str, eol: bytes) -> Field:
    """The field naming `mailbox` instead, with the display name kept."""
    addresses, groups = _parse(field)
    if [a.addr_spec.lower() for a in addresses] == [mailbox.lower()]:
        return field
    if len(addresses) == 1:
        spliced = _splice_angle_addr(field, addresses[0].addr_spec, mailbox)
        if spliced is not None:
            return spliced
    name = next((n for n in (*(a.display_name for a in addresses), *groups) if n), "")
    value = f"{_phrase(name)} <{mailbox}>" if name else mailbox
    header_name = field.raw[: field.raw.index(b":")].rstrip(b" \t").decode("ascii")
    return fold(header_name, value, field.eol or eol)


def _angle_spans(value: bytes) -> list[tuple[int, int]]:
    """Where the top-level `<...>` are, skipping quoted strings and comments."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    in_quote, depth, i = False, 0, 0
    while i < len(value):
        c = value[i : i + 1]
        if c == b"\\" and (in_quote or depth):
            i += 2
            continue
        if in_quote:
            in_quote = c != b'"'
        elif depth:
            depth += {b"(": 1, b")": -1}.get(c, 0)
        elif c == b'"':
            in_quote = True
        elif c == b"(":
            depth = 1
        elif c == b"<" and start is None:
            start = i
        elif c == b">" and start is not None:
            spans.append((start, i + 1))
            start = None
        i += 1
    return spans


def _splice_angle_addr(field: Field, addr_spec: str, mailbox: str) -> Field | None:
    """Swap only the `<addr>` of a `display name <addr>` field, keeping every other byte.

    None when the field is not that simple shape, or the bytes disagree with the parser (as in
    the malformed `printer@office <scan@contoso.com>` some devices send).
    """
    value = field.value
    spans = _angle_spans(value)
    if len(spans) != 1:
        return None
    start, end = spans[0]
    inside = re.sub(rb"\s+", b"", value[start + 1 : end - 1])
    if inside.lower() != addr_spec.encode("utf-8", "replace").lower():
        return None
    return field.with_value(value[:start] + b"<" + mailbox.encode("utf-8") + b">" + value[end:])


def _phrase(name: str) -> str:
    """A display name as an RFC 5322 phrase: atoms, a quoted string, or RFC 2047 encoded-words."""
    printable = all(" " <= c <= "~" for c in name)
    runs_fit = all(len(run) <= _QUOTED_RUN for run in name.split(" "))
    if printable and runs_fit:
        if _ATEXT.fullmatch(name) and "=?" not in name:
            return name
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    chunks = [b""]
    for char in name:  # never split a character across two encoded-words
        encoded = char.encode("utf-8", "replace")
        if len(chunks[-1]) + len(encoded) > _ENCODED_WORD_BYTES:
            chunks.append(b"")
        chunks[-1] += encoded
    return " ".join(f"=?utf-8?b?{base64.b64encode(c).decode()}?=" for c in chunks)
