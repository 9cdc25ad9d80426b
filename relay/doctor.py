"""`relay doctor`: ask Microsoft, account by account, whether relay.yaml works, and say in plain
words what an administrator must change when it does not.

For each account in relay.yaml (through the relay's own token provider and transports):
  1. a token for each resource the account is used for: Exchange Online (smtp routes) and
     Microsoft Graph (graph routes, inbound imports); the token's application permissions
     (`roles`) and the enterprise application's object id (`oid`) are read from it when it is a
     readable JWT, to name the missing permission and fill in the admin commands;
  2. per smtp route's mailbox: STARTTLS and AUTH XOAUTH2 as that mailbox (nothing is sent);
  3. per graph route and inbound import: the permission it needs (Mail.Send, Mail.ReadWrite),
     and, when the app may read mail, a read of the mailbox folder (application access
     policies, unknown mailboxes and folders);
  4. with `--send-test ADDRESS`: one message to ADDRESS through each route from its mailbox,
     and one from each `send_as` address, because Exchange checks send-as only when a message
     is submitted.

Each failure becomes a `Finding`: Microsoft's answer, the cause in plain language and the admin
steps (Entra admin center, Exchange Online PowerShell) with this tenant's ids filled in; the
texts follow reference/exchange-online.md §1.4, §1.5, §2 and §3.5. Secrets and tokens are never
printed. Exit status: 0 when everything checked is in order, 1 when something is not, 2 when
relay.yaml is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from enum import Enum
from typing import Any
from urllib.parse import quote

import jwt

from relay.app import build_routes
from relay.config import (
    AccountConfig,
    Config,
    CredentialKind,
    InboundConfig,
    RouteConfig,
    SenderPolicy,
    load,
)
from relay.config import Transport as TransportKind
from relay.errors import ConfigError, DeliveryError, TokenRejected, TokenUnavailable
from relay.graphapi import AnswerTooLarge, GraphClient, error_of
from relay.identity import EXCHANGE_SCOPE, GRAPH_SCOPE, MsalTokenProvider
from relay.reply import Reply
from relay.scheduler import RouteRuntime
from relay.tls import client_context
from relay.transports import Delivered, OutgoingMessage
from relay.transports.smtp import SmtpTransport

SMTP_SEND_AS_APP = "SMTP.SendAsApp"  # application permission (app-only accounts)
SMTP_SEND = "SMTP.Send"  # delegated permission (delegated_user accounts)
MAIL_SEND = "Mail.Send"
MAIL_READ = "Mail.Read"
MAIL_READWRITE = "Mail.ReadWrite"
PROBE_TIMEOUT = 30.0  # seconds for one Graph read
MAX_PROBE_BODY = 1024 * 1024  # a folder's JSON is a few hundred bytes
PROPAGATION = (
    "Permission changes take 15-30 minutes (sometimes longer) to reach Exchange; run "
    "`relay doctor` again after that."
)
CONNECT_EXO = "In Exchange Online PowerShell (Install-Module ExchangeOnlineManagement; "
CONNECT_EXO += "Connect-ExchangeOnline as an Exchange administrator):"
_AADSTS = re.compile(r"AADSTS(\d+)")
_GRAPH_ANSWER = re.compile(r"^Graph (\d{3}) (\w+):")


class Outcome(Enum):
    OK = "ok"
    FAIL = "FAIL"
    NOTE = "note"  # not checked, or worth knowing; not a failure


@dataclass(frozen=True)
class Finding:
    check: str  # what was checked, e.g. "route default: SMTP AUTH as relay@contoso.com"
    outcome: Outcome
    answer: str = ""  # what Microsoft (or the network) said
    cause: str = ""  # the cause, in plain language
    steps: tuple[str, ...] = ()  # what an administrator does about it


@dataclass(frozen=True)
class Ids:
    """What the admin steps name: the tenant, the app and its enterprise application."""

    tenant_id: str
    client_id: str
    object_id: str | None = None  # the enterprise application's object id, from a token
    delegated: bool = False  # a delegated_user account: a user's token, delegated permissions
    account: str = ""  # the account's name in relay.yaml

    @property
    def smtp_permission(self) -> str:
        return SMTP_SEND if self.delegated else SMTP_SEND_AS_APP

    @property
    def kind(self) -> str:
        return "delegated" if self.delegated else "application"

    @property
    def sp(self) -> str:
        return self.object_id or "<OBJECT_ID>"


@dataclass
class Report:
    config: str
    sections: list[tuple[str, list[Finding]]] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return sum(f.outcome is Outcome.FAIL for _, findings in self.sections for f in findings)

    def render(self) -> str:
        lines = [f"relay doctor: {self.config}"]
        for title, findings in self.sections:
            lines += ["", title]
            for f in findings:
                lines.append(f"  {f.outcome.value:<4}  {f.check}")
                if f.answer:
                    lines.append(f"        answer: {f.answer}")
                if f.cause:
                    lines.append(f"        cause:  {f.cause}")
                if f.steps:
                    lines.append("        fix:")
                    lines += [f"          {step}" for step in f.steps]
        n = self.problems
        lines += [
            "",
            "Everything checked is in order."
            if not n
            else f"{n} problem{'s' if n != 1 else ''} found.",
        ]
        return "\n".join(lines)


# Diagnoses: pure functions from an answer to (cause, steps) -------------------------------


def _sp_steps(ids: Ids, mailbox: str) -> tuple[str, ...]:
    where = (
        f"(this app's is {ids.object_id}, read from its token)"
        if ids.object_id
        else "(Entra admin center > Enterprise applications > the app > Object ID; not the "
        "App registration's object id, which gives the same error)"
    )
    return (
        CONNECT_EXO,
        f"  New-ServicePrincipal -AppId {ids.client_id} -ObjectId {ids.sp} "
        f"-Organization {ids.tenant_id}",
        f"  ObjectId is the enterprise application's object id {where}.",
        f'  Add-MailboxPermission -Identity "{mailbox}" -User {ids.sp} -AccessRights FullAccess',
        PROPAGATION,
    )


def _consent_steps(ids: Ids, api: str, permissions: Sequence[str]) -> tuple[str, ...]:
    names = " and ".join(permissions)
    steps = (
        f"Entra admin center > App registrations > the app {ids.client_id} > API permissions >"
        f" Add a permission > {api} > {ids.kind.capitalize()} permissions > {names};",
        f"then 'Grant admin consent' for the tenant {ids.tenant_id}.",
    )
    if ids.delegated:
        steps += (f"Then sign in again: relay login {ids.account}",)
    return steps


def smtp_consent_steps(ids: Ids) -> tuple[str, ...]:
    # Delegated SMTP.Send is listed under Microsoft Graph; SMTP.SendAsApp under Exchange Online.
    api = (
        "Microsoft Graph"
        if ids.delegated
        else "APIs my organization uses > Office 365 Exchange Online"
    )
    return _consent_steps(ids, api, [ids.smtp_permission])


def graph_consent_steps(ids: Ids, permissions: Sequence[str]) -> tuple[str, ...]:
    return _consent_steps(ids, "Microsoft Graph", permissions)


def send_as_steps(mailbox: str, sender: str) -> tuple[str, ...]:
    return (
        CONNECT_EXO,
        f'  Add-RecipientPermission -Identity "{sender}" -Trustee "{mailbox}" -AccessRights SendAs',
        "or let the route rewrite the sender (sender: rewrite), so that every message is "
        f"From {mailbox}.",
        PROPAGATION,
    )


def diagnose_token(text: str, ids: Ids, account: AccountConfig) -> tuple[str, tuple[str, ...]]:
    """The identity platform refused a token request (`text` carries the AADSTS code)."""
    m = _AADSTS.search(text)
    code = int(m.group(1)) if m else None
    if "relay login" in text:
        return (
            "The account's user has not signed in, or must sign in again (a refresh token unused "
            "for 90 days expires).",
            (f"relay login {account.name} -c relay.yaml   (a device code; any browser will do)",),
        )
    app = f"Entra admin center > App registrations > the app {ids.client_id}"
    if code == 7000215:
        return (
            "The client secret in relay.yaml is not the app's secret value; often the secret's "
            "ID (a GUID) was copied instead of its Value.",
            (
                f"{app} > Certificates & secrets: copy the Value of the secret (shown only right "
                "after it is made; else add a new client secret),",
                f"and put it in accounts.{account.name}.client_secret (or client_secret_file).",
            ),
        )
    if code == 7000222:
        return (
            "The app's client secret has expired.",
            (
                f"{app} > Certificates & secrets > New client secret; put its Value in "
                f"accounts.{account.name}.client_secret (or client_secret_file).",
                "A certificate (accounts.*.certificate) lasts longer than a secret.",
            ),
        )
    if code == 700016:
        return (
            f"There is no application {ids.client_id} in the tenant {ids.tenant_id}.",
            (
                f"Check accounts.{account.name}.client_id and tenant_id against the app "
                "registration's Overview page (Application (client) ID, Directory (tenant) ID),",
                f"and accounts.{account.name}.cloud; a multi-tenant app needs an administrator "
                "of this tenant to consent to it first.",
            ),
        )
    if code in (90002, 900023) or "authority configuration" in text:  # MSAL: no discovery
        return (
            f"The tenant {ids.tenant_id} does not exist in this cloud.",
            (
                f"Check accounts.{account.name}.tenant_id (Entra admin center > Overview > "
                f"Tenant ID) and accounts.{account.name}.cloud ({account.cloud.value}).",
            ),
        )
    if code in (700027, 50027, 700021, 700023):
        return (
            "The identity platform does not accept the certificate the relay signs with: it is "
            "not registered on the app, or the key does not belong to it.",
            (
                f"{app} > Certificates & secrets > Certificates > Upload certificate: the "
                f"certificate from accounts.{account.name}.certificate (cert_file),",
                "and check that key_file is that certificate's private key.",
            ),
        )
    if code == 700024:
        return (
            "The client assertion is outside its valid time: the federated token file is stale "
            "or this machine's clock is wrong.",
            (
                "Check that the projected service account token in federated_token_file is "
                "refreshed (Kubernetes does it when the volume is projected),",
                "and that the clock is synchronised (NTP).",
            ),
        )
    if code == 70021:
        return (
            "No federated credential on the app matches the token in federated_token_file.",
            (
                f"{app} > Certificates & secrets > Federated credentials > Add: issuer = the "
                "cluster's OIDC issuer URL, subject = system:serviceaccount:NAMESPACE:NAME "
                "of the relay's service account.",
            ),
        )
    if code in (70011, 1002012, 500011):
        return (
            "The identity platform does not know the resource the relay asked a token for: "
            "the cloud or an endpoint override does not match the tenant.",
            (
                f"Check accounts.{account.name}.cloud and endpoints; remove endpoint overrides "
                "unless you need them.",
            ),
        )
    see = f" (https://login.microsoftonline.com/error?code={code})" if code else ""
    return (
        f"The identity platform refused the token request{see}.",
        ("Read Microsoft's text above; check the account's ids and credential in relay.yaml.",),
    )


def diagnose_unavailable(
    text: str, where: str, account: AccountConfig
) -> tuple[str, tuple[str, ...]]:
    """Network, TLS, throttling or service trouble talking to `where`."""
    if any(sign in text for sign in ("CERTIFICATE_VERIFY_FAILED", "SSL", "TLS", "4.7.5")):
        return (
            f"The relay does not trust the TLS certificate of {where}.",
            (
                "If a TLS-inspecting proxy is in the way, give its CA certificate as "
                f"accounts.{account.name}.ca_file; otherwise update the system's CA bundle.",
            ),
        )
    if "429" in text or "throttl" in text.lower() or "temporarily_unavailable" in text:
        return (
            f"{where} is busy or throttling; the relay retries by itself.",
            ("Run `relay doctor` again in a few minutes.",),
        )
    return (
        f"The relay could not reach {where}.",
        (
            "Check DNS, firewalls and proxies between this host and "
            f"{where} (outbound HTTPS 443; SMTP submission 587).",
        ),
    )


def diagnose_smtp(
    reply: Reply, ids: Ids, mailbox: str, *, sender: str, roles: frozenset[str] | None
) -> tuple[str, tuple[str, ...]]:
    """Exchange Online's SMTP answer (AUTH or end of DATA) to the relay."""
    text = reply.text
    if reply.status == "5.7.139" and "for the Tenant" in text:
        return (
            "SMTP AUTH is switched off for the whole organisation.",
            (
                CONNECT_EXO,
                f'  Set-CASMailbox -Identity "{mailbox}" -SmtpClientAuthenticationDisabled $false',
                "  (just this mailbox; or for the whole organisation: "
                "Set-TransportConfig -SmtpClientAuthenticationDisabled $false)",
                PROPAGATION,
            ),
        )
    if reply.status == "5.7.139":
        return (
            f"SMTP AUTH is switched off for the mailbox {mailbox}.",
            (
                CONNECT_EXO,
                f'  Set-CASMailbox -Identity "{mailbox}" -SmtpClientAuthenticationDisabled $false',
                PROPAGATION,
            ),
        )
    if reply.code == 535:
        if roles is not None and ids.smtp_permission not in roles:
            return (
                f"The app lacks the {ids.smtp_permission} {ids.kind} permission, so Exchange "
                "refuses its token.",
                (*smtp_consent_steps(ids), PROPAGATION),
            )
        if ids.delegated:
            return (
                f"Exchange does not let the signed-in user send as {mailbox}: the user is not that "
                "mailbox and has no FullAccess on it.",
                (
                    f"Sign in as the mailbox's own user (relay login {ids.account}), or:",
                    CONNECT_EXO,
                    f'  Add-MailboxPermission -Identity "{mailbox}" -User <the signed-in user> '
                    "-AccessRights FullAccess",
                    PROPAGATION,
                ),
            )
        return (
            f"Exchange does not let this app sign in as {mailbox}: its service principal is not "
            "registered in Exchange (or with the wrong object id), or it has no FullAccess on "
            "the mailbox.",
            _sp_steps(ids, mailbox),
        )
    if "SendAsDenied" in text or reply.status in ("5.2.252", "5.7.60"):
        return (
            f"{mailbox} may not send as {sender}.",
            send_as_steps(mailbox, sender),
        )
    if reply.code == 432 or reply.status == "4.3.2":
        return (
            f"More than 3 connections are signed in as {mailbox} (Exchange's limit per mailbox): "
            "other applications, or routes whose connections add up to more than 3.",
            (
                f"Lower `connections` on the routes through {mailbox}, or stop the other "
                "clients that use it.",
            ),
        )
    return (
        "Exchange refused; see its answer.",
        ("Look the status code up in Exchange Online's SMTP documentation.",),
    )


def diagnose_graph(
    status: int,
    code: str,
    message: str,
    ids: Ids,
    mailbox: str,
    *,
    need: Sequence[str],
    roles: frozenset[str] | None,
    sender: str = "",
) -> tuple[str, tuple[str, ...]]:
    """Graph's error answer for `mailbox`; `need` are the permissions the use needs."""
    if code == "ErrorSendAsDenied":
        return f"{mailbox} may not send as {sender}.", send_as_steps(mailbox, sender)
    if status == 403 or code == "ErrorAccessDenied":
        missing = [p for p in need if roles is not None and p not in roles]
        if missing:
            return (
                f"The app lacks the {' and '.join(missing)} {ids.kind} permission.",
                (*graph_consent_steps(ids, missing), PROPAGATION),
            )
        policy = (
            CONNECT_EXO,
            f'  Test-ApplicationAccessPolicy -Identity "{mailbox}" -AppId {ids.client_id}',
            "  and add the mailbox to the group the policy names (Add-DistributionGroupMember), "
            "or: New-ApplicationAccessPolicy -AppId "
            f"{ids.client_id} -PolicyScopeGroupId <group with {mailbox}> -AccessRight "
            "RestrictAccess",
            "Policy changes can take more than an hour to reach Graph.",
        )
        if roles is None:
            return (
                f"Graph denies the app access to {mailbox}: the app lacks "
                f"{' / '.join(need)} (with admin consent), or an application access policy "
                "(RBAC for Applications) keeps it out of this mailbox.",
                (*graph_consent_steps(ids, list(need)), *policy),
            )
        return (
            f"An application access policy (or RBAC for Applications) keeps the app out of "
            f"{mailbox}.",
            policy,
        )
    if code == "ErrorInvalidUser":
        return (
            f"{mailbox} is not a mailbox of the tenant {ids.tenant_id}.",
            ("Check the mailbox address in relay.yaml (its primary SMTP address or UPN).",),
        )
    if code == "MailboxNotEnabledForRESTAPI":
        return (
            f"{mailbox} has no Exchange Online mailbox Graph can use (no licence, or on-premises).",
            ("Give the user an Exchange Online licence, or use a cloud mailbox.",),
        )
    if code == "ErrorItemNotFound":
        return (
            f"The folder does not exist in {mailbox}.",
            (
                "Check `folder:` of the inbound import (a well-known name such as inbox, or the "
                "folder's display name path).",
            ),
        )
    if status == 401:
        return (
            "Graph refused the relay's token: it was issued for another cloud or resource.",
            ("Check the account's cloud and endpoints.graph in relay.yaml.",),
        )
    return "Graph refused; see its answer.", ("Read Graph's error code above.",)


# Checks -------------------------------------------------------------------------------------


def token_claims(token: str) -> dict[str, Any] | None:
    """The claims of a readable JWT, unverified (for diagnosis only); None if it is opaque."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    return claims if isinstance(claims, dict) else None


@dataclass
class _Token:
    ok: bool
    roles: frozenset[str] | None = None


class _Account:
    """Runs the checks for one account and collects their findings."""

    def __init__(self, config: Config, account: AccountConfig, send_test: str | None) -> None:
        self.config = config
        self.account = account
        self.send_test = send_test
        self.tokens = MsalTokenProvider(account)
        self.ids = Ids(
            account.tenant_id,
            account.client_id,
            delegated=account.credential.kind is CredentialKind.DELEGATED,
            account=account.name,
        )
        self.findings: list[Finding] = []
        self.roles: dict[str, frozenset[str] | None] = {}  # scope -> the token's permissions
        self.blocked: set[str] = set()  # routes a test message would only fail again
        self.routes = [r for r in config.routes if r.account == account.name]
        self.inbound = [i for i in config.inbound if i.account == account.name]

    @property
    def title(self) -> str:
        return (
            f"account {self.account.name}: tenant {self.account.tenant_id}, app "
            f"{self.account.client_id} ({self.account.credential.kind.value})"
        )

    def add(
        self,
        check: str,
        outcome: Outcome,
        answer: str = "",
        diagnosis: tuple[str, tuple[str, ...]] = ("", ()),
    ) -> None:
        self.findings.append(Finding(check, outcome, answer, *diagnosis))

    async def run(self, runtimes: dict[str, RouteRuntime]) -> None:
        smtp = [r for r in self.routes if r.transport is TransportKind.SMTP]
        graph = [r for r in self.routes if r.transport is TransportKind.GRAPH]
        exchange = graph_token = None
        if smtp or not (graph or self.inbound):  # an unused account: are its credentials good?
            role = self.ids.smtp_permission if smtp else None
            exchange = await self._token("Exchange Online (SMTP)", EXCHANGE_SCOPE, role)
        if graph or self.inbound:
            graph_token = await self._token("Microsoft Graph", GRAPH_SCOPE, None)
        for runtime, names in _by_transport(runtimes, smtp):
            await self._smtp_login(runtime, names, exchange)
        for route in graph:
            self._graph_permission(route, graph_token)
        for inbound in self.inbound:
            await self._inbound(inbound, graph_token)
        for route in self.routes:
            await self._send_as(route, runtimes[route.name])

    async def _token(self, what: str, scope: str, role: str | None) -> _Token:
        check = f"token for {what} ({scope})"
        try:
            token = await self.tokens.token(scope)
        except TokenRejected as exc:
            self.add(
                check,
                Outcome.FAIL,
                exc.reply.text,
                diagnose_token(exc.reply.text, self.ids, self.account),
            )
            return _Token(ok=False)
        except TokenUnavailable as exc:
            where = f"the identity platform ({self.account.endpoints.authority})"
            self.add(
                check,
                Outcome.FAIL,
                exc.reply.text,
                diagnose_unavailable(exc.reply.text, where, self.account),
            )
            return _Token(ok=False)
        claims = token_claims(token)
        roles = None
        if claims is not None:  # app tokens list `roles`, a user's token `scp`
            roles = frozenset(claims.get("roles") or ()) | frozenset(
                str(claims.get("scp", "")).split()
            )
        self.roles[scope] = roles
        if claims is not None and isinstance(claims.get("oid"), str):
            self.ids = replace(self.ids, object_id=None if self.ids.delegated else claims["oid"])
        if roles is None:
            self.add(check, Outcome.OK, "a token (not a readable JWT: permissions not listed)")
        elif role is not None and role not in roles:
            self.add(
                check,
                Outcome.FAIL,
                f"{self.ids.kind} permissions: " + (", ".join(sorted(roles)) or "none"),
                (
                    f"The app lacks the {role} {self.ids.kind} permission (or its admin consent).",
                    (*smtp_consent_steps(self.ids), PROPAGATION),
                ),
            )
        else:
            self.add(
                check,
                Outcome.OK,
                f"{self.ids.kind} permissions: " + (", ".join(sorted(roles)) or "none"),
            )
        return _Token(ok=True, roles=roles)

    async def _smtp_login(
        self, runtime: RouteRuntime, names: list[str], token: _Token | None
    ) -> None:
        transport = runtime.transport
        assert isinstance(transport, SmtpTransport)
        mailbox = transport.mailbox
        check = (
            f"{_routes(names)}: SMTP AUTH XOAUTH2 as {mailbox} at {transport.host}:{transport.port}"
        )
        if token is None or not token.ok:
            self.add(check, Outcome.NOTE, "not checked: no token")
            self.blocked.update(names)
            return
        try:
            await transport.check_login()
        except DeliveryError as exc:
            self.blocked.update(names)
            reply = exc.reply
            if reply.is_permanent or reply.code == 432:
                diagnosis = diagnose_smtp(
                    reply, self.ids, mailbox, sender=mailbox, roles=token.roles
                )
            else:
                diagnosis = diagnose_unavailable(
                    reply.one_line(), f"{transport.host}:{transport.port}", self.account
                )
            self.add(check, Outcome.FAIL, reply.one_line(), diagnosis)
            return
        self.add(check, Outcome.OK, "235 2.7.0 Authentication successful")

    def _graph_permission(self, route: RouteConfig, token: _Token | None) -> None:
        check = f"route {route.name}: Graph sendMail as {route.mailbox}"
        if (
            token is None
            or not token.ok
            or (token.roles is not None and MAIL_SEND not in token.roles)
        ):
            self.blocked.add(route.name)
        if token is None or not token.ok:
            self.add(check, Outcome.NOTE, "not checked: no token")
        elif token.roles is None:
            self.add(
                check,
                Outcome.NOTE,
                "permissions not readable from the token; --send-test checks sending",
            )
        elif MAIL_SEND not in token.roles:
            self.add(
                check,
                Outcome.FAIL,
                f"{self.ids.kind} permissions: " + (", ".join(sorted(token.roles)) or "none"),
                (
                    f"The app lacks the {MAIL_SEND} {self.ids.kind} permission (or its admin "
                    "consent).",
                    (*graph_consent_steps(self.ids, [MAIL_SEND]), PROPAGATION),
                ),
            )
        else:
            self.add(check, Outcome.OK, f"{MAIL_SEND} granted")
            if MAIL_READWRITE not in token.roles:
                self.add(
                    f"route {route.name}: messages over 3 MB through Graph",
                    Outcome.NOTE,
                    f"they go as a draft with uploads, which needs {MAIL_READWRITE} too",
                )

    async def _inbound(self, inbound: InboundConfig, token: _Token | None) -> None:
        check = f"inbound {inbound.name}: read {inbound.mailbox} folder {inbound.folder}"
        if token is None or not token.ok:
            self.add(check, Outcome.NOTE, "not checked: no token")
            return
        if token.roles is not None and MAIL_READWRITE not in token.roles:
            self.add(
                check,
                Outcome.FAIL,
                f"{self.ids.kind} permissions: " + (", ".join(sorted(token.roles)) or "none"),
                (
                    f"Importing (and then marking read, moving or deleting) needs the "
                    f"{MAIL_READWRITE} {self.ids.kind} permission.",
                    (*graph_consent_steps(self.ids, [MAIL_READWRITE]), PROPAGATION),
                ),
            )
            return
        client = GraphClient(
            mailbox=inbound.mailbox,
            graph_url=self.account.endpoints.graph,
            tokens=self.tokens,
            ssl_context=client_context(self.account.ca_file),
            timeout=PROBE_TIMEOUT,
        )
        try:
            url = f"{client.user_url}/mailFolders/{quote(inbound.folder, safe='')}"
            answer = await client.request("GET", url, max_body=MAX_PROBE_BODY)
        except (DeliveryError, AnswerTooLarge) as exc:
            text = exc.reply.one_line() if isinstance(exc, DeliveryError) else str(exc)
            where = f"Microsoft Graph ({self.account.endpoints.graph})"
            self.add(check, Outcome.FAIL, text, diagnose_unavailable(text, where, self.account))
            return
        finally:
            await client.aclose()
        if answer.ok:
            self.add(check, Outcome.OK, f"{answer.status} OK")
            return
        code, message = error_of(answer.body)
        self.add(
            check,
            Outcome.FAIL,
            f"Graph {answer.status} {code}: {message}",
            diagnose_graph(
                answer.status,
                code,
                message,
                self.ids,
                inbound.mailbox,
                need=[MAIL_READWRITE],
                roles=token.roles,
            ),
        )

    async def _send_as(self, route: RouteConfig, runtime: RouteRuntime) -> None:
        senders = [route.mailbox]
        if route.sender is SenderPolicy.KEEP:
            senders += [s for s in route.send_as if s.lower() != route.mailbox.lower()]
        if self.send_test is None:
            for sender in senders[1:]:
                self.add(
                    f"route {route.name}: send as {sender}",
                    Outcome.NOTE,
                    "checked only with --send-test ADDRESS: Exchange decides when a message is "
                    "submitted",
                )
            return
        if route.name in self.blocked:
            self.add(
                f"route {route.name}: test message to {self.send_test}",
                Outcome.NOTE,
                "not sent: fix the problem above first",
            )
            return
        for sender in senders:
            check = f"route {route.name}: test message from {sender} to {self.send_test}"
            message = probe_message(route, sender, self.send_test)
            try:
                delivered = await runtime.transport.send(message)
            except DeliveryError as exc:
                self.add(
                    check,
                    Outcome.FAIL,
                    exc.reply.one_line(),
                    self._send_diagnosis(route, sender, exc.reply),
                )
                continue
            self._sent(check, delivered)

    def _sent(self, check: str, delivered: Delivered) -> None:
        if delivered.refused:
            rcpt, reply = next(iter(delivered.refused.items()))
            self.add(
                check,
                Outcome.FAIL,
                f"{rcpt}: {reply.one_line()}",
                ("Exchange refused the test address.", ("Check the --send-test address.",)),
            )
        else:
            self.add(check, Outcome.OK, delivered.reply.one_line())

    def _send_diagnosis(
        self, route: RouteConfig, sender: str, reply: Reply
    ) -> tuple[str, tuple[str, ...]]:
        m = _GRAPH_ANSWER.match(reply.text)
        if m:
            return diagnose_graph(
                int(m.group(1)),
                m.group(2),
                reply.text[m.end() :].strip(),
                self.ids,
                route.mailbox,
                need=[MAIL_SEND],
                roles=self.roles.get(GRAPH_SCOPE),
                sender=sender,
            )
        if reply.status.startswith("4.4") or reply.status == "4.7.5":
            return diagnose_unavailable(reply.one_line(), "Exchange Online", self.account)
        roles = self.roles.get(EXCHANGE_SCOPE)
        return diagnose_smtp(reply, self.ids, route.mailbox, sender=sender, roles=roles)


def _by_transport(
    runtimes: dict[str, RouteRuntime], routes: Iterable[RouteConfig]
) -> list[tuple[RouteRuntime, list[str]]]:
    """Routes that share a mailbox share a transport: check each transport once."""
    groups: dict[int, tuple[RouteRuntime, list[str]]] = {}
    for route in routes:
        runtime = runtimes[route.name]
        groups.setdefault(id(runtime.transport), (runtime, []))[1].append(route.name)
    return list(groups.values())


def _routes(names: Sequence[str]) -> str:
    return ("route " if len(names) == 1 else "routes ") + ", ".join(names)


def probe_message(route: RouteConfig, sender: str, to: str) -> OutgoingMessage:
    """A short plain-text message that says where it came from."""
    now = datetime.now(UTC)
    host = socket.getfqdn()
    domain = sender.rpartition("@")[2] or "relay.invalid"
    text = (
        f"From: relay doctor <{sender}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: relay doctor: test through route {route.name}\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: {make_msgid('doctor', domain=domain)}\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"This message was sent by `relay doctor --send-test` on {host} through the route\r\n"
        f"{route.name} ({route.transport.value}, mailbox {route.mailbox}) as {sender}.\r\n"
        "If it reached you, this route works.\r\n"
    )
    return OutgoingMessage(qid="doctor", mail_from=sender, rcpt_tos=(to,), data=text.encode())


async def doctor(config: Config, *, send_test: str | None = None) -> Report:
    """Run every check for `config`; never raises for what Microsoft or the network answers."""
    report = Report(str(config.source or "relay.yaml"))
    checks = [_Account(config, account, send_test) for account in config.accounts.values()]
    runtimes = build_routes(config, {c.account.name: c.tokens for c in checks})
    try:
        for check in checks:
            await check.run(runtimes)
            report.sections.append((check.title, check.findings))
    finally:
        transports = {id(rt.transport): rt.transport for rt in runtimes.values()}
        await asyncio.gather(*(t.aclose() for t in transports.values()))
    return report


async def run_doctor(args: argparse.Namespace) -> int:
    """`relay doctor -c FILE [--send-test ADDRESS]`: 0 all in order, 1 problems, 2 bad config."""
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"relay doctor: {exc}", file=sys.stderr)
        return 2
    relay_log = logging.getLogger("relay")
    level = relay_log.level
    relay_log.setLevel(logging.CRITICAL)  # the report says it all, once
    try:
        report = await doctor(config, send_test=args.send_test)
    finally:
        relay_log.setLevel(level)
    print(report.render())
    return 1 if report.problems else 0
