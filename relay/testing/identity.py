"""The emulated Microsoft identity platform v2.0: OIDC discovery and the client-credentials token
endpoint, served by aiohttp (the `Emulator` puts it behind TLS).

Takes tenants and app registrations from the shared `Directory`; gives access tokens made by the
`TokenIssuer`, whose audience is the requested resource and whose `roles` are the app's consented
permissions, in Microsoft's response shape (reference §3.4).

Fails as Microsoft does: a JSON body `{error, error_description "AADSTSnnn: …\\r\\nTrace ID: …",
error_codes, timestamp, trace_id, correlation_id, error_uri}` with 400 (401 for `invalid_client`),
worded as in the named `AadError` constants below (reference §3.5). Tests queue 429/503 or any
catalogue error in `.faults`; each token request consumes at most one. Every request is kept in
`.requests`, and secrets and assertions in it never show in a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from relay.testing.directory import App, Directory, Tenant
from relay.testing.tokens import EXCHANGE_AUDIENCE, GRAPH_AUDIENCE, TokenIssuer

log = logging.getLogger(__name__)

GRANT_CLIENT_CREDENTIALS = "client_credentials"
ASSERTION_TYPE_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPE_SUFFIX = "/.default"
# Resources an app-only token can be asked for, as the `aud` they get (reference §2).
RESOURCES = (EXCHANGE_AUDIENCE, GRAPH_AUDIENCE)
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
_SENSITIVE = frozenset({"client_secret", "client_assertion", "authorization"})
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


class _Refusal(Exception):
    """Raised inside the token handler; becomes Microsoft's JSON error answer."""

    def __init__(self, error: AadError, **fields: object) -> None:
        self.error = error
        self.text = error.describe(**fields)
        super().__init__(self.text)


class IdentityPlatform:
    """The aiohttp app (`.app`) of discovery and token endpoints for every tenant in `directory`.

    Tokens live `token_lifetime` seconds (`expires_in`); `refresh_in`, when set, is sent too.
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
        self.requests: list[RecordedRequest] = []
        self.faults = Faults(directory)
        self.app = web.Application(middlewares=[self._record])
        self.app.router.add_get(
            "/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration
        )
        self.app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)

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
            body = self._client_credentials(request, tenant, params)
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
        grant_type = _required(params, "grant_type")
        if grant_type != GRANT_CLIENT_CREDENTIALS:
            raise _Refusal(GRANT_TYPE_UNSUPPORTED, grant_type=grant_type)
        basic = _basic_auth(request)
        client_id = params.get("client_id") or (basic[0] if basic else "")
        if not client_id:
            raise _Refusal(PARAMETER_MISSING, name="client_id")
        resource = _resource(_required(params, "scope"))
        app = tenant.apps.get(client_id)
        if app is None:
            raise _Refusal(APP_NOT_FOUND, app_id=client_id, tenant=request.match_info["tenant"])
        if "client_assertion" in params or "client_assertion_type" in params:
            _check_assertion(app, params, _token_urls(request, tenant))
        else:
            _check_secret(app, params.get("client_secret") or (basic[1] if basic else ""))
        audience = next((r for r in RESOURCES if r.lower() == resource.lower()), None)
        if audience is None:
            raise _Refusal(
                RESOURCE_NOT_FOUND, resource=resource, tenant=request.match_info["tenant"]
            )
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
    """Verify a certificate client assertion as the identity platform does (reference §3.3)."""
    assertion = params.get("client_assertion", "")
    if params.get("client_assertion_type") != ASSERTION_TYPE_JWT_BEARER or not assertion:
        raise _Refusal(CREDENTIAL_MISSING)
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError:
        raise _Refusal(ASSERTION_MALFORMED) from None
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
