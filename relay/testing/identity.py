"""The emulated Microsoft identity platform v2.0: OIDC discovery, the token endpoint (client
credentials, device code, refresh token) and the device authorization endpoint, served by aiohttp
(the `Emulator` puts it behind TLS).

Takes tenants and app registrations from the shared `Directory`; gives access tokens made by the
`TokenIssuer`, whose audience is the requested resource and whose `roles` are the app's consented
permissions, in Microsoft's response shape (reference §3.4).

App credentials: a client secret, a certificate's signed assertion, or a federated one (workload
identity): a JWT from an issuer registered on the app (`App.add_federated_credential`), whose
`iss`, `sub` and `aud` must match the registration and whose signature is checked with the key
registered with it (Entra reads the issuer's published keys; the emulator is given them).

Users (delegated tokens): the mailboxes of a tenant sign in. `/devicecode` starts a sign-in and
the test plays the user with `approve(user_code, user=...)`; until then a poll is answered
`authorization_pending`, and `expire_device_code` makes the next one `expired_token`. A device
code or refresh token grant needs "Allow public client flows" on the app (`App.public_client`)
or an app credential. It answers with an access token for the user (`scp`, `upn`), a refresh
token, an ID token and `client_info`; a refresh token can be redeemed for any resource the
emulator knows. `expire_refresh_tokens` makes the tokens issued so far fail as after 90 days of
inactivity (`invalid_grant`, AADSTS700082). Consent is what the tenant recorded for the app
(`App.delegated_permissions`; None grants every permission the resource defines); a token for
more gets AADSTS65001. The browser's consent prompt is not modelled.

Fails as Microsoft does: a JSON body `{error, error_description "AADSTSnnn: …\\r\\nTrace ID: …",
error_codes, timestamp, trace_id, correlation_id, error_uri}` with 400 (401 for `invalid_client`),
worded as in the named `AadError` constants below (reference §3.5). Tests queue 429/503 or any
catalogue error in `.faults`; each token request consumes at most one. Every request is kept in
`.requests`, and secrets and assertions in it never show in a repr.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from relay.testing.directory import App, Directory, Tenant
from relay.testing.tokens import (
    EXCHANGE_AUDIENCES,
    GRAPH_AUDIENCE,
    GRAPH_AUDIENCES,
    TokenIssuer,
    User,
)

log = logging.getLogger(__name__)

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_REFRESH_TOKEN = "refresh_token"
ASSERTION_TYPE_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPE_SUFFIX = "/.default"
# Resources a token can be asked for, as the `aud` they get (reference §2), in every cloud.
RESOURCES = tuple(sorted(EXCHANGE_AUDIENCES | GRAPH_AUDIENCES))
# Delegated permissions each resource defines (the emulator grants them all: no consent model).
EXCHANGE_PERMISSIONS = frozenset(
    {"SMTP.Send", "IMAP.AccessAsUser.All", "POP.AccessAsUser.All", "EWS.AccessAsUser.All"}
)
GRAPH_PERMISSIONS = frozenset({"Mail.Send", "Mail.ReadWrite", "Mail.Read", "User.Read"})
# OpenID Connect scopes MSAL adds to every user sign-in; they name no resource.
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})
DEVICE_LOGIN_URI = "https://microsoft.com/devicelogin"
DEVICE_CODE_LIFETIME = 900  # seconds, as Microsoft's /devicecode answers
DEVICE_CODE_INTERVAL = 5  # seconds between polls, as Microsoft's /devicecode answers
USER_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
REFRESH_TOKEN_MAX_INACTIVE = "90.00:00:00"  # days.hh:mm:ss, as AADSTS700082 writes it
# Algorithms MSAL signs client assertions with: RS256 (+x5t) or PS256 (+x5t#S256), §3.3.
ASSERTION_ALGORITHMS = ("RS256", "PS256")
ERROR_URI = "https://login.microsoftonline.com/error?code={code}"
CERT_DOCS = "https://learn.microsoft.com/entra/identity-platform/certificate-credentials"

# Headers Microsoft sends with every token endpoint answer (reference §3.4).
RESPONSE_HEADERS: Mapping[str, str] = {
    "Cache-Control": "no-store, no-cache",
    "Pragma": "no-cache",
    "Expires": "-1",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
}

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$", re.I)
_SENSITIVE = frozenset(
    {"client_secret", "client_assertion", "authorization", "refresh_token", "device_code"}
)
_MASK = "********"


@dataclass(frozen=True)
class AadError:
    """One entry of the AADSTS catalogue: code, OAuth `error`, HTTP status and Microsoft's text.

    `text` may hold `{placeholders}` that are filled per request (tenant, app_id, scope...).
    """

    code: int
    error: str
    status: int
    text: str

    def describe(self, **fields: object) -> str:
        """The first line of `error_description`: `AADSTSnnn: text`."""
        return f"AADSTS{self.code}: {self.text.format(**fields)}"


# Microsoft's wording. [H] = reference §3.5 / Microsoft's error-code table, [M] = transcripts and
# Azure SDK troubleshooting guides, [L] = inferred (the exact text is not published).
TENANT_NOT_FOUND = AadError(  # [H]
    90002,
    "invalid_request",
    400,
    "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
    "signing into the correct cloud. Check with your subscription administrator, this may happen "
    "if there are no active subscriptions for the tenant.",
)
TENANT_NOT_FOUND_DISCOVERY = AadError(  # [H] the same, as the discovery document answers it
    TENANT_NOT_FOUND.code, "invalid_tenant", TENANT_NOT_FOUND.status, TENANT_NOT_FOUND.text
)
TENANT_INVALID = AadError(  # [M]
    900023,
    "invalid_request",
    400,
    "Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid external "
    "domain.",
)
PARAMETER_MISSING = AadError(  # [H]
    900144,
    "invalid_request",
    400,
    "The request body must contain the following parameter: '{name}'.",
)
GRANT_TYPE_UNSUPPORTED = AadError(  # [L] code and error [H]; the text is inferred
    70003,
    "unsupported_grant_type",
    400,
    "The app requested an unsupported grant type '{grant_type}'.",
)
SCOPE_INVALID = AadError(  # [H]
    70011,
    "invalid_scope",
    400,
    "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not "
    "valid.",
)
SCOPE_NOT_DEFAULT = AadError(  # [M]
    1002012,
    "invalid_scope",
    400,
    "The provided value for scope {scope} is not valid. Client credential flows must have a scope "
    "value with /.default suffixed to the resource identifier (application ID URI).",
)
RESOURCE_NOT_FOUND = AadError(  # [H]
    500011,
    "invalid_resource",
    400,
    "The resource principal named {resource} was not found in the tenant named {tenant}. This can "
    "happen if the application has not been installed by the administrator of the tenant or "
    "consented to by any user in the tenant. You might have sent your authentication request to "
    "the wrong tenant.",
)
APP_NOT_FOUND = AadError(  # [H]
    700016,
    "unauthorized_client",
    400,
    "Application with identifier '{app_id}' was not found in the directory '{tenant}'. This can "
    "happen if the application has not been installed by the administrator of the tenant or "
    "consented to by any user in the tenant. You may have sent your authentication request to the "
    "wrong tenant.",
)
CREDENTIAL_MISSING = AadError(  # [H]
    7000218,
    "invalid_client",
    401,
    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
)
CLIENT_SECRET_INVALID = AadError(  # [H]
    7000215,
    "invalid_client",
    401,
    "Invalid client secret provided. Ensure the secret being sent in the request is the client "
    "secret value, not the client secret ID, for a secret added to app '{app_id}'.",
)
CLIENT_SECRET_EXPIRED = AadError(  # [H]
    7000222,
    "invalid_client",
    401,
    "The provided client secret keys for app '{app_id}' are expired. Visit the Azure portal to "
    "create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate "
    "credentials for added security: https://aka.ms/certCreds.",
)
ASSERTION_MALFORMED = AadError(  # [M]
    50027, "invalid_request", 400, "JWT token is invalid or malformed."
)
ASSERTION_SIGNATURE_INVALID = AadError(  # [M]
    700027, "invalid_client", 401, "Client assertion failed signature validation."
)
ASSERTION_KEY_NOT_FOUND = AadError(  # [M]
    700027,
    "invalid_client",
    401,
    "The certificate with identifier used to sign the client assertion is not registered on "
    "application. [Reason - The key was not found., Thumbprint of key used by client: "
    "'{thumbprint}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see "
    "configured keys for app Id '{app_id}'.]",
)
ASSERTION_CLIENT_MISMATCH = AadError(  # [M]
    700021,
    "invalid_client",
    401,
    "Client assertion application identifier doesn't match 'client_id' parameter. Review the "
    f"documentation at {CERT_DOCS}",
)
ASSERTION_AUDIENCE_MISMATCH = AadError(  # [M]
    700023,
    "invalid_client",
    401,
    f"Client assertion audience claim does not match Realm issuer. Review the documentation at "
    f"{CERT_DOCS}.",
)
FEDERATION_NO_MATCH = AadError(  # [M] (workload identity troubleshooting guides)
    70021,
    "invalid_request",
    400,
    "No matching federated identity record found for presented assertion. Assertion Issuer: "
    "'{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{audience}'.",
)
AUTHORIZATION_PENDING = AadError(  # [M] (a 2026 capture; older ones word it differently)
    70016,
    "authorization_pending",
    400,
    "The provided request has not yet been authorized by the user. The user must input their code.",
)
DEVICE_CODE_EXPIRED = AadError(  # [L] code and error [M]; RFC 8628 names the error
    70019, "expired_token", 400, "Verification code expired."
)
DEVICE_CODE_INVALID = AadError(  # [L]
    70000,
    "invalid_grant",
    400,
    "The provided value for the input parameter 'device_code' is not valid.",
)
REFRESH_TOKEN_EXPIRED = AadError(  # [M] (real captures, e.g. sasl-xoauth2 #30)
    700082,
    "invalid_grant",
    400,
    "The refresh token has expired due to inactivity. The token was issued on {issued} and was "
    "inactive for {inactive}.",
)
CONSENT_MISSING = AadError(  # [M]
    65001,
    "invalid_grant",
    400,
    "The user or administrator has not consented to use the application with ID '{app_id}' "
    "named '{name}'. Send an interactive authorization request for this user and resource.",
)
REFRESH_TOKEN_INVALID = AadError(  # [M]
    9002313, "invalid_grant", 400, "Invalid request. Request is malformed or invalid."
)
SCOPE_MANY_RESOURCES = AadError(  # [M]
    28000,
    "invalid_scope",
    400,
    "Provided value for the input parameter scope is not valid because it contains more than one "
    "resource. Scope {scope} is not valid.",
)
ASSERTION_EXPIRED = AadError(  # [M]
    700024,
    "invalid_client",
    401,
    "Client assertion is not within its valid time range. Current time: {now}, assertion valid "
    "from {valid_from}, expiry time of assertion {expires}. Review the documentation at "
    f"{CERT_DOCS}.",
)
THROTTLED = AadError(  # [L] Entra publishes no token-endpoint throttling body; 429 + Retry-After
    90055,
    "temporarily_unavailable",
    429,
    "There are too many incoming requests. Please try again later.",
)
UNAVAILABLE = AadError(  # [L]
    90006,
    "temporarily_unavailable",
    503,
    "The service is temporarily unavailable. Please try again later.",
)


class Redacted(Mapping[str, str]):
    """A recorded form or header set: readable by key, but its repr masks secrets."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        shown = {k: _MASK if k.lower() in _SENSITIVE else v for k, v in self._data.items()}
        return repr(shown)

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class RecordedRequest:
    """One request as the identity platform saw it; header names are lower-case."""

    method: str
    path: str
    headers: Redacted
    form: Redacted

    def __repr__(self) -> str:
        return f"<RecordedRequest {self.method} {self.path} form={self.form!r}>"


@dataclass(frozen=True)
class Fault:
    """An answer queued by a test, given instead of the real one to the next token request."""

    error: AadError
    text: str  # `error.describe(...)`, filled in when queued
    retry_after: int | None = None


class Faults:
    """Per-tenant and global queues of injected token-endpoint answers.

    A token request takes the first fault queued for its tenant, or else the first global one.
    """

    def __init__(self, directory: Directory) -> None:
        self._directory = directory
        self._queues: dict[str | None, deque[Fault]] = {}

    def push(
        self,
        error: AadError,
        *,
        tenant: str | None = None,
        retry_after: int | None = None,
        **fields: object,
    ) -> None:
        """Queue `error` (its text filled with `fields`) for `tenant` (id or domain) or for all."""
        key = self._tenant_key(tenant) if tenant is not None else None
        fault = Fault(error, error.describe(**fields), retry_after)
        self._queues.setdefault(key, deque()).append(fault)

    def throttle(self, retry_after: int = 5, *, tenant: str | None = None) -> None:
        """Queue a 429 with `Retry-After: retry_after`."""
        self.push(THROTTLED, tenant=tenant, retry_after=retry_after)

    def unavailable(self, *, retry_after: int | None = None, tenant: str | None = None) -> None:
        """Queue a 503 (with `Retry-After` when given)."""
        self.push(UNAVAILABLE, tenant=tenant, retry_after=retry_after)

    def take(self, tenant_id: str | None) -> Fault | None:
        for key in (tenant_id, None):
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
        return None

    def clear(self) -> None:
        self._queues.clear()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __repr__(self) -> str:
        return f"<Faults pending={len(self)}>"

    def _tenant_key(self, tenant: str) -> str:
        found = self._directory.tenant(tenant)
        if found is None:
            raise KeyError(f"no tenant {tenant!r} in the directory")
        return found.tenant_id


@dataclass(eq=False)
class DeviceCode:
    """A device-code sign-in in progress, as the user sees it (`user_code`) and the app polls
    it (`device_code`). `polled` is set when a poll is answered `authorization_pending`."""

    user_code: str
    device_code: str = field(repr=False)
    tenant_id: str
    client_id: str
    resource: str
    permissions: frozenset[str]
    expires_at: float
    user: User | None = None  # who approved it
    redeemed: bool = False
    polled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


@dataclass(eq=False)
class RefreshToken:
    """A user's refresh token: redeemable for any resource until it is expired."""

    value: str = field(repr=False)
    tenant_id: str
    client_id: str
    user: User
    issued_at: float
    expired: bool = False


class _Refusal(Exception):
    """Raised inside the token handler; becomes Microsoft's JSON error answer."""

    def __init__(self, error: AadError, **fields: object) -> None:
        self.error = error
        self.text = error.describe(**fields)
        super().__init__(self.text)


class IdentityPlatform:
    """The aiohttp app (`.app`) of discovery and token endpoints for every tenant in `directory`.

    Tokens live `token_lifetime` seconds (`expires_in`); `refresh_in`, when set, is sent too.
    `device_code_interval` and `device_code_lifetime` are what `/devicecode` answers (tests set
    the interval to 0 so that a client polls without waiting).
    """

    def __init__(
        self,
        directory: Directory,
        issuer: TokenIssuer,
        *,
        token_lifetime: float = 3599,
        refresh_in: float | None = None,
    ) -> None:
        self.directory = directory
        self.issuer = issuer
        self.token_lifetime = token_lifetime
        self.refresh_in = refresh_in
        self.device_code_interval = DEVICE_CODE_INTERVAL
        self.device_code_lifetime = DEVICE_CODE_LIFETIME
        self.requests: list[RecordedRequest] = []
        self.faults = Faults(directory)
        self.device_codes: dict[str, DeviceCode] = {}  # by user code
        self.refresh_tokens: dict[str, RefreshToken] = {}  # by value
        self.app = web.Application(middlewares=[self._record])
        self.app.router.add_get(
            "/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration
        )
        self.app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        self.app.router.add_post("/{tenant}/oauth2/v2.0/devicecode", self._devicecode)

    # -- the test plays the user ---------------------------------------------------------------

    def approve(self, user_code: str, *, user: str) -> None:
        """`user` (a mailbox of the code's tenant) signs in with `user_code` and consents."""
        code = self.device_codes[user_code]
        tenant = self.directory.tenants[code.tenant_id]
        box = tenant.mailboxes.get(user.lower())
        if box is None:
            raise ValueError(f"{user} is no mailbox of tenant {code.tenant_id}")
        code.user = _user(tenant, box.address)

    def expire_device_code(self, user_code: str) -> None:
        """The user did not sign in in time: the next poll gets `expired_token`."""
        self.device_codes[user_code].expires_at = 0.0

    def expire_refresh_tokens(self, user: str | None = None) -> int:
        """Every refresh token issued so far (to `user`, or to anyone) has been unused for 90
        days: redeeming it gets AADSTS700082. Returns how many were expired."""
        expired = [
            t
            for t in self.refresh_tokens.values()
            if user is None or t.user.upn.lower() == user.lower()
        ]
        for token in expired:
            token.expired = True
        return len(expired)

    def __repr__(self) -> str:
        return (
            f"<IdentityPlatform tenants={len(self.directory.tenants)} "
            f"requests={len(self.requests)} faults={len(self.faults)}>"
        )

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        form = await request.post() if request.method == "POST" else {}
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers=Redacted({k.lower(): v for k, v in request.headers.items()}),
                form=Redacted({k: v for k, v in form.items() if isinstance(v, str)}),
            )
        )
        return await handler(request)

    # -- discovery ---------------------------------------------------------------------------

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        requested = request.match_info["tenant"]
        try:
            tenant = self._find_tenant(requested, TENANT_NOT_FOUND_DISCOVERY)
        except _Refusal as refusal:
            return _error_response(refusal.error, refusal.text, request)
        return _json_response(openid_configuration(_base_url(request), tenant.tenant_id))

    # -- token ---------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        requested = request.match_info["tenant"]
        found = self.directory.tenant(requested)
        fault = self.faults.take(found.tenant_id if found else None)
        if fault is not None:
            log.info("token request answered by an injected fault: AADSTS%d", fault.error.code)
            return _error_response(fault.error, fault.text, request, retry_after=fault.retry_after)
        form = await request.post()
        params = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            tenant = self._find_tenant(requested, TENANT_NOT_FOUND)
            grant_type = _required(params, "grant_type")
            if grant_type == GRANT_CLIENT_CREDENTIALS:
                body = self._client_credentials(request, tenant, params)
            elif grant_type == GRANT_DEVICE_CODE:
                body = self._device_code_grant(request, tenant, params)
            elif grant_type == GRANT_REFRESH_TOKEN:
                body = self._refresh_token_grant(request, tenant, params)
            else:
                raise _Refusal(GRANT_TYPE_UNSUPPORTED, grant_type=grant_type)
        except _Refusal as refusal:
            log.info(
                "token refused: tenant=%s client_id=%s AADSTS%d",
                requested,
                params.get("client_id", "-"),
                refusal.error.code,
            )
            return _error_response(refusal.error, refusal.text, request)
        return _json_response(body)

    def _client_credentials(
        self, request: web.Request, tenant: Tenant, params: dict[str, str]
    ) -> dict[str, object]:
        client_id = _client_id(request, params)
        resource = _resource(_required(params, "scope"))
        app = _app(request, tenant, client_id)
        self._authenticate(request, tenant, app, params)
        audience = _audience(request, resource)
        token = self.issuer.issue(
            audience=audience,
            tenant_id=tenant.tenant_id,
            app_id=app.client_id,
            roles=app.roles,
            object_id=app.object_id,
            lifetime=self.token_lifetime,
        )
        log.info(
            "token issued: tenant=%s client_id=%s aud=%s", tenant.tenant_id, app.client_id, audience
        )
        body: dict[str, object] = {
            "token_type": "Bearer",
            "expires_in": int(self.token_lifetime),
            "ext_expires_in": int(self.token_lifetime),
        }
        if self.refresh_in is not None:
            body["refresh_in"] = int(self.refresh_in)
        body["access_token"] = token
        return body

    def _authenticate(
        self, request: web.Request, tenant: Tenant, app: App, params: Mapping[str, str]
    ) -> None:
        """Check the app's credential: an assertion (certificate or federated) or a secret."""
        if "client_assertion" in params or "client_assertion_type" in params:
            _check_assertion(app, params, _token_urls(request, tenant))
        else:
            basic = _basic_auth(request)
            _check_secret(app, params.get("client_secret") or (basic[1] if basic else ""))

    def _authenticate_public(
        self, request: web.Request, tenant: Tenant, app: App, params: Mapping[str, str]
    ) -> None:
        """A user's grant: a public client needs no credential, a confidential one gives it."""
        credentials = ("client_secret", "client_assertion", "client_assertion_type")
        if app.public_client and not any(k in params for k in credentials):
            return
        self._authenticate(request, tenant, app, params)

    # -- users: device code and refresh token --------------------------------------------------

    async def _devicecode(self, request: web.Request) -> web.Response:
        form = await request.post()
        params = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            tenant = self._find_tenant(request.match_info["tenant"], TENANT_NOT_FOUND)
            client_id = _client_id(request, params)
            resource, permissions = _delegated_scope(request, _required(params, "scope"))
            _app(request, tenant, client_id)
        except _Refusal as refusal:
            return _error_response(refusal.error, refusal.text, request)
        user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(9))
        code = DeviceCode(
            user_code=user_code,
            device_code=secrets.token_urlsafe(48),
            tenant_id=tenant.tenant_id,
            client_id=client_id,
            resource=resource,
            permissions=permissions,
            expires_at=time.time() + self.device_code_lifetime,
        )
        self.device_codes[user_code] = code
        log.info("device code issued: tenant=%s client_id=%s", tenant.tenant_id, client_id)
        return _json_response(
            {
                "user_code": user_code,
                "device_code": code.device_code,
                "verification_uri": DEVICE_LOGIN_URI,
                "expires_in": int(self.device_code_lifetime),
                "interval": int(self.device_code_interval),
                "message": f"To sign in, use a web browser to open the page {DEVICE_LOGIN_URI} "
                f"and enter the code {user_code} to authenticate.",
            }
        )

    def _device_code_grant(
        self, request: web.Request, tenant: Tenant, params: dict[str, str]
    ) -> dict[str, object]:
        client_id = _client_id(request, params)
        presented = _required(params, "device_code")
        app = _app(request, tenant, client_id)
        self._authenticate_public(request, tenant, app, params)
        code = next(
            (
                c
                for c in self.device_codes.values()
                if hmac.compare_digest(c.device_code, presented)
                and c.client_id == client_id
                and c.tenant_id == tenant.tenant_id
                and not c.redeemed
            ),
            None,
        )
        if code is None:
            raise _Refusal(DEVICE_CODE_INVALID)
        if code.expires_at <= time.time():
            raise _Refusal(DEVICE_CODE_EXPIRED)
        if code.user is None:
            code.polled.set()
            raise _Refusal(AUTHORIZATION_PENDING)
        code.redeemed = True
        return self._user_tokens(request, app, code.user, code.resource, code.permissions)

    def _refresh_token_grant(
        self, request: web.Request, tenant: Tenant, params: dict[str, str]
    ) -> dict[str, object]:
        client_id = _client_id(request, params)
        presented = _required(params, "refresh_token")
        resource, permissions = _delegated_scope(request, _required(params, "scope"))
        app = _app(request, tenant, client_id)
        self._authenticate_public(request, tenant, app, params)
        token = self.refresh_tokens.get(presented)
        if token is None or token.client_id != client_id or token.tenant_id != tenant.tenant_id:
            raise _Refusal(REFRESH_TOKEN_INVALID)
        if token.expired:
            raise _Refusal(
                REFRESH_TOKEN_EXPIRED,
                issued=_ests_time(token.issued_at),
                inactive=REFRESH_TOKEN_MAX_INACTIVE,
            )
        return self._user_tokens(request, app, token.user, resource, permissions)

    def _user_tokens(
        self,
        request: web.Request,
        app: App,
        user: User,
        resource: str,
        permissions: frozenset[str],
    ) -> dict[str, object]:
        """Microsoft's answer to a user's grant: access, refresh and ID tokens, client_info."""
        consented = app.delegated_permissions
        if consented is not None and not permissions <= consented:
            raise _Refusal(CONSENT_MISSING, app_id=app.client_id, name=app.display_name)
        access_token = self.issuer.issue(
            audience=resource,
            tenant_id=user.tenant_id,
            app_id=app.client_id,
            roles=frozenset(),
            object_id=user.object_id,
            lifetime=self.token_lifetime,
            user=user,
            scopes=permissions,
        )
        refresh = RefreshToken(
            value="1.AQ" + secrets.token_urlsafe(96),
            tenant_id=user.tenant_id,
            client_id=app.client_id,
            user=user,
            issued_at=time.time(),
        )
        self.refresh_tokens[refresh.value] = refresh
        client_info = json.dumps({"uid": user.object_id, "utid": user.tenant_id})
        log.info(
            "user token issued: tenant=%s client_id=%s user=%s aud=%s",
            user.tenant_id,
            app.client_id,
            user.upn,
            resource,
        )
        return {
            "token_type": "Bearer",
            "scope": " ".join(f"{resource}/{p}" for p in sorted(permissions)),
            "expires_in": int(self.token_lifetime),
            "ext_expires_in": int(self.token_lifetime),
            "access_token": access_token,
            "refresh_token": refresh.value,
            "id_token": self.issuer.id_token(
                issuer=f"{_base_url(request)}/{user.tenant_id}/v2.0",
                client_id=app.client_id,
                user=user,
                lifetime=self.token_lifetime,
            ),
            "client_info": base64.urlsafe_b64encode(client_info.encode()).decode().rstrip("="),
        }

    def _find_tenant(self, requested: str, not_found: AadError) -> Tenant:
        tenant = self.directory.tenant(requested)
        if tenant is not None:
            return tenant
        if not (_GUID.match(requested) or _DNS_NAME.match(requested)):
            raise _Refusal(TENANT_INVALID, tenant=requested)
        raise _Refusal(not_found, tenant=requested)


def openid_configuration(base_url: str, tenant_id: str) -> dict[str, object]:
    """The v2.0 discovery document of a tenant, with the endpoints under `base_url` (§3.2)."""
    root = f"{base_url}/{tenant_id}"
    return {
        "token_endpoint": f"{root}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post",
            "private_key_jwt",
            "client_secret_basic",
        ],
        "jwks_uri": f"{root}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{root}/v2.0",
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
        "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
        "claims_supported": [
            "sub",
            "iss",
            "cloud_instance_name",
            "cloud_instance_host_name",
            "cloud_graph_host_name",
            "msgraph_host",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "acr",
            "nonce",
            "preferred_username",
            "name",
            "tid",
            "ver",
            "at_hash",
            "c_hash",
            "email",
        ],
        "kerberos_endpoint": f"{root}/kerberos",
        "tenant_region_scope": "EU",
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    }


def error_body(
    error: AadError, text: str, *, correlation_id: str, trace_id: str, now: datetime
) -> dict[str, object]:
    """Microsoft's JSON error body for `text` (an `AadError.describe()` line)."""
    timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    return {
        "error": error.error,
        "error_description": (
            f"{text}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}"
            f"\r\nTimestamp: {timestamp}"
        ),
        "error_codes": [error.code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": ERROR_URI.format(code=error.code),
    }


def _error_response(
    error: AadError, text: str, request: web.Request, *, retry_after: int | None = None
) -> web.Response:
    trace_id = str(uuid.uuid4())
    body = error_body(
        error,
        text,
        correlation_id=_correlation_id(request),
        trace_id=trace_id,
        now=datetime.now(UTC),
    )
    response = _json_response(body, status=error.status)
    response.headers["x-ms-request-id"] = trace_id
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _json_response(body: Mapping[str, object], *, status: int = 200) -> web.Response:
    response = web.Response(
        text=json.dumps(body, separators=(",", ":")),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )
    response.headers.update(RESPONSE_HEADERS)
    return response


def _correlation_id(request: web.Request) -> str:
    """Microsoft echoes the client's `client-request-id` (MSAL sends one) as the correlation id."""
    sent = request.headers.get("client-request-id", "")
    return sent if _GUID.match(sent) else str(uuid.uuid4())


def _base_url(request: web.Request) -> str:
    return f"https://{request.host}"


def _token_urls(request: web.Request, tenant: Tenant) -> set[str]:
    """The token endpoint URLs a client assertion's `aud` may name: by tenant id or any domain."""
    base = _base_url(request).lower()
    names = [tenant.tenant_id, *tenant.domains, request.match_info["tenant"]]
    return {f"{base}/{name.lower()}/oauth2/v2.0/token" for name in names}


def _client_id(request: web.Request, params: Mapping[str, str]) -> str:
    basic = _basic_auth(request)
    client_id = params.get("client_id") or (basic[0] if basic else "")
    if not client_id:
        raise _Refusal(PARAMETER_MISSING, name="client_id")
    return client_id


def _app(request: web.Request, tenant: Tenant, client_id: str) -> App:
    app = tenant.apps.get(client_id)
    if app is None:
        raise _Refusal(APP_NOT_FOUND, app_id=client_id, tenant=request.match_info["tenant"])
    return app


def _audience(request: web.Request, resource: str) -> str:
    """The `aud` of a token for `resource`, as the resource spells its identifier."""
    audience = next((r for r in RESOURCES if r.lower() == resource.lower()), None)
    if audience is None:
        raise _Refusal(RESOURCE_NOT_FOUND, resource=resource, tenant=request.match_info["tenant"])
    return audience


def _delegated_scope(request: web.Request, scope: str) -> tuple[str, frozenset[str]]:
    """A user's scope: one resource's permissions (or its `/.default`), plus OIDC scopes.

    A permission without a resource (`Mail.Send`) is Graph's, as Microsoft reads it.
    """
    named = [s for s in scope.split() if s.lower() not in RESERVED_SCOPES]
    if not named:
        raise _Refusal(SCOPE_INVALID, scope=scope)
    resources, permissions = set(), set()
    for item in named:
        resource, slash, permission = item.rpartition("/")
        resources.add((resource if slash else GRAPH_AUDIENCE).lower())
        permissions.add(permission)
    if len(resources) > 1:
        raise _Refusal(SCOPE_MANY_RESOURCES, scope=scope)
    audience = _audience(request, resources.pop())
    known = EXCHANGE_PERMISSIONS if audience in EXCHANGE_AUDIENCES else GRAPH_PERMISSIONS
    if ".default" in permissions:
        return audience, known
    if not permissions <= known:
        raise _Refusal(SCOPE_INVALID, scope=scope)
    return audience, frozenset(permissions)


def _user(tenant: Tenant, address: str) -> User:
    """A mailbox's owner as the identity platform knows them; the object id is stable."""
    object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant.tenant_id}/{address.lower()}"))
    return User(upn=address, object_id=object_id, tenant_id=tenant.tenant_id)


def _required(params: Mapping[str, str], name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise _Refusal(PARAMETER_MISSING, name=name)
    return value


def _resource(scope: str) -> str:
    """The resource of a client-credentials scope: exactly one `<resource>/.default`."""
    scopes = scope.split()
    if len(scopes) != 1:
        raise _Refusal(SCOPE_INVALID, scope=scope)
    if not scopes[0].endswith(DEFAULT_SCOPE_SUFFIX):
        raise _Refusal(SCOPE_NOT_DEFAULT, scope=scope)
    return scopes[0].removesuffix(DEFAULT_SCOPE_SUFFIX)


def _basic_auth(request: web.Request) -> tuple[str, str] | None:
    """HTTP Basic client authentication: (client id, secret), both form-urlencoded (RFC 6749
    §2.3.1); None when absent or unreadable."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if colon else None


def _check_secret(app: App, presented: str) -> None:
    if not presented:
        raise _Refusal(CREDENTIAL_MISSING)
    for secret in app.secrets:
        if hmac.compare_digest(secret.value.encode(), presented.encode()):
            if secret.expired():
                raise _Refusal(CLIENT_SECRET_EXPIRED, app_id=app.client_id)
            return
    raise _Refusal(CLIENT_SECRET_INVALID, app_id=app.client_id)


def _check_assertion(app: App, params: Mapping[str, str], token_urls: set[str]) -> None:
    """Verify a client assertion as the identity platform does: signed with the app's
    certificate (its thumbprint in the header, reference §3.3), or else a token of an external
    issuer registered as a federated credential (workload identity)."""
    assertion = params.get("client_assertion", "")
    if params.get("client_assertion_type") != ASSERTION_TYPE_JWT_BEARER or not assertion:
        raise _Refusal(CREDENTIAL_MISSING)
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise _Refusal(ASSERTION_MALFORMED) from None
    if "x5t" not in header and "x5t#S256" not in header:
        _check_federated(app, header, unverified, assertion)
        return
    thumbprint = _b64url_decode(str(header.get("x5t#S256") or header.get("x5t") or ""))
    certificate = _registered_certificate(app, thumbprint)
    if certificate is None:
        raise _Refusal(
            ASSERTION_KEY_NOT_FOUND, thumbprint=thumbprint.hex().upper(), app_id=app.client_id
        )
    if header.get("alg") not in ASSERTION_ALGORITHMS:
        raise _Refusal(ASSERTION_SIGNATURE_INVALID)
    try:
        claims = jwt.decode(
            assertion,
            certificate.public_key(),  # type: ignore[arg-type]
            algorithms=[str(header["alg"])],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False},
        )
    except jwt.InvalidSignatureError:
        raise _Refusal(ASSERTION_SIGNATURE_INVALID) from None
    except jwt.InvalidTokenError:
        raise _Refusal(ASSERTION_MALFORMED) from None
    if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
        raise _Refusal(ASSERTION_CLIENT_MISMATCH)
    if str(claims.get("aud", "")).lower() not in token_urls:
        raise _Refusal(ASSERTION_AUDIENCE_MISMATCH)
    _check_lifetime(claims)


def _check_federated(
    app: App, header: Mapping[str, object], unverified: Mapping[str, object], assertion: str
) -> None:
    """A workload identity token: a registered (issuer, subject, audience), a valid signature by
    that issuer's key, and not expired."""
    audiences = unverified.get("aud")
    audience_list = audiences if isinstance(audiences, list) else [audiences]
    issuer, subject = unverified.get("iss"), unverified.get("sub")
    credential = next(
        (
            c
            for c in app.federated_credentials
            if c.issuer == issuer and c.subject == subject and c.audience in audience_list
        ),
        None,
    )
    if credential is None:
        raise _Refusal(
            FEDERATION_NO_MATCH,
            issuer=issuer,
            subject=subject,
            audience=",".join(str(a) for a in audience_list),
        )
    if header.get("alg") != "RS256":
        raise _Refusal(ASSERTION_SIGNATURE_INVALID)
    try:
        jwt.decode(
            assertion,
            serialization.load_pem_public_key(credential.public_key_pem),  # type: ignore[arg-type]
            algorithms=["RS256"],
            options={
                "verify_aud": False,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise _Refusal(ASSERTION_SIGNATURE_INVALID) from None
    except jwt.InvalidTokenError:
        raise _Refusal(ASSERTION_MALFORMED) from None
    _check_lifetime(unverified)


def _check_lifetime(claims: Mapping[str, object]) -> None:
    now = time.time()
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or expires <= now:
        valid_from = claims.get("nbf", claims.get("iat"))
        raise _Refusal(
            ASSERTION_EXPIRED,
            now=_ests_time(now),
            valid_from=_ests_time(valid_from) if isinstance(valid_from, int | float) else "",
            expires=_ests_time(expires) if isinstance(expires, int | float) else "",
        )


def _registered_certificate(app: App, thumbprint: bytes) -> x509.Certificate | None:
    """The app's certificate whose SHA-1 (x5t) or SHA-256 (x5t#S256) thumbprint is `thumbprint`."""
    if not thumbprint:
        return None
    for pem in app.certificates:
        cert = x509.load_pem_x509_certificate(pem)
        der = cert.public_bytes(Encoding.DER)
        if thumbprint in (hashlib.sha1(der).digest(), hashlib.sha256(der).digest()):
            return cert
    return None


def _b64url_decode(value: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return b""


def _ests_time(epoch: float) -> str:
    """A time as AADSTS700024 writes it: `2024-05-02T21:44:46.0000000Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")
