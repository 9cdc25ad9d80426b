"""The emulated identity platform, through MSAL and raw HTTPS, as an operator's relay meets it.

Each scenario builds a fresh MSAL app: MSAL memoizes 400s for 60 s and 429/5xx for Retry-After
seconds per app instance (reference §4.1). MSAL is synchronous, so it runs in a worker thread while
the emulator serves on this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from requests.structures import CaseInsensitiveDict

from relay.testing import identity
from relay.testing.directory import ALL_ROLES, SMTP_SEND_AS_APP
from relay.testing.emulator import (
    Emulator,
    EmulatorState,
    SampleTenant,
    sample_tenant,
    self_signed_certificate,
)
from relay.testing.identity import (
    APP_NOT_FOUND,
    ASSERTION_AUDIENCE_MISMATCH,
    ASSERTION_CLIENT_MISMATCH,
    ASSERTION_EXPIRED,
    ASSERTION_KEY_NOT_FOUND,
    ASSERTION_MALFORMED,
    ASSERTION_SIGNATURE_INVALID,
    ASSERTION_TYPE_JWT_BEARER,
    CLIENT_SECRET_EXPIRED,
    CLIENT_SECRET_INVALID,
    CREDENTIAL_MISSING,
    GRANT_TYPE_UNSUPPORTED,
    PARAMETER_MISSING,
    RESOURCE_NOT_FOUND,
    RESPONSE_HEADERS,
    SCOPE_INVALID,
    SCOPE_NOT_DEFAULT,
    TENANT_INVALID,
    TENANT_NOT_FOUND,
    TENANT_NOT_FOUND_DISCOVERY,
    THROTTLED,
    UNAVAILABLE,
    AadError,
)
from relay.testing.tokens import EXCHANGE_AUDIENCE, GRAPH_AUDIENCE

EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"


@dataclass(frozen=True)
class Seen:
    """An HTTP response MSAL got (a copy: a kept `requests.Response` would hold its socket)."""

    status_code: int
    headers: Mapping[str, str]
    text: str
    request_headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.text)


class Msal:
    """MSAL pointed only at the emulator, keeping a copy of every HTTP response it got."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override `verify`
        self.session.verify = str(emulator.ca_file)
        self.responses: list[Seen] = []
        self.session.hooks["response"].append(self._seen)

    def _seen(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.responses.append(
            Seen(
                response.status_code,
                CaseInsensitiveDict(response.headers),
                response.text,
                CaseInsensitiveDict(response.request.headers),
            )
        )

    async def app(
        self, client_id: str, credential: Any, *, tenant: str | None = None
    ) -> msal.ConfidentialClientApplication:
        authority = self.emulator.authority_for(
            tenant or next(iter(self.emulator.directory.tenants))
        )
        return await asyncio.to_thread(
            msal.ConfidentialClientApplication,
            client_id,
            client_credential=credential,
            authority=authority,
            instance_discovery=False,
            http_client=self.session,
        )

    async def token(
        self, client_id: str, credential: Any, scope: str = EXCHANGE_SCOPE, **kw: Any
    ) -> dict[str, Any]:
        """A fresh app's first acquire_token_for_client result."""
        app = await self.app(client_id, credential, **kw)
        return await asyncio.to_thread(app.acquire_token_for_client, scopes=[scope])

    @property
    def last(self) -> Seen:
        return self.responses[-1]


@pytest.fixture
def client(emulator: Emulator) -> Iterator[Msal]:
    c = Msal(emulator)
    yield c
    c.session.close()


@pytest.fixture
async def http(emulator: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    """A raw HTTPS client trusting only the emulator's CA, with the identity platform as base."""
    connector = aiohttp.TCPConnector(ssl=emulator.pki.client_context())
    async with aiohttp.ClientSession(emulator.authority, connector=connector) as session:
        yield session


def assert_aad_error(body: dict[str, Any], error: AadError, **fields: object) -> None:
    """`body` is Microsoft's error shape (reference §3.5) for `error` with these fields."""
    ts, trace, corr = body.get("timestamp"), body.get("trace_id"), body.get("correlation_id")
    assert body == {
        "error": error.error,
        "error_description": f"AADSTS{error.code}: {error.text.format(**fields)}\r\n"
        f"Trace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {ts}",
        "error_codes": [error.code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": f"https://login.microsoftonline.com/error?code={error.code}",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", str(ts))
    uuid.UUID(str(trace))
    uuid.UUID(str(corr))


def token_url(tenant: str) -> str:
    return f"/{tenant}/oauth2/v2.0/token"


def thumbprint(cert_pem: bytes, algorithm: str = "sha1") -> bytes:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    return hashlib.new(algorithm, der).digest()


def assertion(key_pem: bytes, cert_pem: bytes, **claims: Any) -> str:
    """A client assertion as MSAL makes it (RS256, x5t), with `claims` overriding."""
    x5t = base64.urlsafe_b64encode(thumbprint(cert_pem)).decode()
    return jwt.encode(claims, key_pem, algorithm="RS256", headers={"x5t": x5t})


def good_claims(emulator: Emulator, sample: SampleTenant) -> dict[str, Any]:
    now = int(time.time())
    return {
        "aud": f"{emulator.authority}/{sample.tenant_id}/oauth2/v2.0/token",
        "iss": sample.cert_client_id,
        "sub": sample.cert_client_id,
        "iat": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
    }


# -- success paths --------------------------------------------------------------------------


async def test_secret_gets_a_token_and_the_second_call_is_served_from_cache(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """MSAL with the sample secret: one POST gives an Exchange token; the next call uses cache."""
    app = await client.app(sample.client_id, sample.client_secret)
    first = await asyncio.to_thread(app.acquire_token_for_client, scopes=[EXCHANGE_SCOPE])
    second = await asyncio.to_thread(app.acquire_token_for_client, scopes=[EXCHANGE_SCOPE])

    assert first["token_source"] == "identity_provider"
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]
    posts = [r for r in emulator.identity.requests if r.method == "POST"]
    assert len(posts) == 1
    assert posts[0].form["client_secret"] == sample.client_secret
    assert posts[0].form["grant_type"] == "client_credentials"
    assert posts[0].headers["x-client-sku"] == "MSAL.Python"

    claims = emulator.issuer.validate(first["access_token"], audience=EXCHANGE_AUDIENCE)
    assert claims.tenant_id == sample.tenant_id
    assert claims.app_id == sample.client_id
    assert claims.roles == ALL_ROLES
    assert (
        claims.subject
        == sample.directory.tenants[sample.tenant_id].apps[sample.client_id].object_id
    )
    assert claims.expires > time.time() + 3000


async def test_success_response_is_microsofts_shape(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """The body is token_type, expires_in, ext_expires_in, access_token; §3.4's headers."""
    await client.token(sample.client_id, sample.client_secret)
    response = client.last
    assert response.status_code == 200
    assert list(response.json()) == ["token_type", "expires_in", "ext_expires_in", "access_token"]
    assert response.json()["token_type"] == "Bearer"
    assert response.json()["expires_in"] == response.json()["ext_expires_in"] == 3599
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    for name, value in RESPONSE_HEADERS.items():
        assert response.headers[name] == value
    assert response.text.startswith('{"token_type":"Bearer","expires_in":3599,')


async def test_graph_scope_gives_a_graph_token(
    sample: SampleTenant, emulator: Emulator, client: Msal
) -> None:
    result = await client.token(sample.client_id, sample.client_secret, GRAPH_SCOPE)
    claims = emulator.issuer.validate(result["access_token"], audience=GRAPH_AUDIENCE)
    assert claims.app_id == sample.client_id


async def test_token_roles_are_the_apps_consented_permissions(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    app = sample.directory.tenants[sample.tenant_id].apps[sample.client_id]
    app.roles = {SMTP_SEND_AS_APP}
    result = await client.token(sample.client_id, sample.client_secret)
    claims = emulator.issuer.validate(result["access_token"], audience=EXCHANGE_AUDIENCE)
    assert claims.roles == {SMTP_SEND_AS_APP}


async def test_domain_authority_discovers_the_tenant_id(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """An authority by domain works; discovery answers with the tenant's GUID endpoints."""
    result = await client.token(sample.client_id, sample.client_secret, tenant=sample.domain)
    assert "access_token" in result
    post = next(r for r in emulator.identity.requests if r.method == "POST")
    assert post.path == token_url(sample.tenant_id)


async def test_certificate_thumbprint_signs_rs256_with_x5t(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """The `thumbprint` credential form: RS256 assertion with x5t = SHA-1, accepted."""
    credential = {"private_key": sample.key_pem, "thumbprint": thumbprint(sample.cert_pem).hex()}
    result = await client.token(sample.cert_client_id, credential)

    claims = emulator.issuer.validate(result["access_token"], audience=EXCHANGE_AUDIENCE)
    assert claims.app_id == sample.cert_client_id
    form = next(r for r in emulator.identity.requests if r.method == "POST").form
    assert form["client_assertion_type"] == ASSERTION_TYPE_JWT_BEARER
    header = jwt.get_unverified_header(form["client_assertion"])
    assert header["alg"] == "RS256" and "x5t" in header


async def test_certificate_public_certificate_signs_ps256_with_x5t_s256(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """The `public_certificate` form: PS256 assertion with x5t#S256 = SHA-256, accepted."""
    credential = {"private_key": sample.key_pem, "public_certificate": sample.cert_pem.decode()}
    result = await client.token(sample.cert_client_id, credential, GRAPH_SCOPE)

    claims = emulator.issuer.validate(result["access_token"], audience=GRAPH_AUDIENCE)
    assert claims.app_id == sample.cert_client_id
    form = next(r for r in emulator.identity.requests if r.method == "POST").form
    header = jwt.get_unverified_header(form["client_assertion"])
    assert header["alg"] == "PS256" and "x5t#S256" in header


async def test_secret_in_http_basic_is_accepted(
    emulator: Emulator, sample: SampleTenant, http: aiohttp.ClientSession
) -> None:
    """RFC 6749 §2.3.1: client id and secret in an Authorization: Basic header."""
    pair = f"{quote_plus(sample.client_id)}:{quote_plus(sample.client_secret)}"
    headers = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    data = {"grant_type": "client_credentials", "scope": EXCHANGE_SCOPE}
    async with http.post(token_url(sample.tenant_id), data=data, headers=headers) as response:
        assert response.status == 200
        body = await response.json()
    emulator.issuer.validate(body["access_token"], audience=EXCHANGE_AUDIENCE)
    recorded = emulator.identity.requests[-1]
    assert recorded.headers["authorization"].startswith("Basic ")
    assert "Basic" not in repr(recorded) and sample.client_secret not in repr(recorded)


async def test_refresh_in_and_lifetime_are_configurable(
    sample: SampleTenant, tmp_path: Path
) -> None:
    """token_lifetime sets expires_in (MSAL refetches under 5 min); refresh_in reaches MSAL."""
    async with Emulator(
        sample.directory, state_dir=tmp_path, token_lifetime=120, refresh_in=60
    ) as emulator:
        client = Msal(emulator)
        app = await client.app(sample.client_id, sample.client_secret)
        first = await asyncio.to_thread(app.acquire_token_for_client, scopes=[EXCHANGE_SCOPE])
        second = await asyncio.to_thread(app.acquire_token_for_client, scopes=[EXCHANGE_SCOPE])
        client.session.close()
    assert list(client.responses[-1].json()) == [
        "token_type",
        "expires_in",
        "ext_expires_in",
        "refresh_in",
        "access_token",
    ]
    assert client.responses[-1].json()["expires_in"] == 120
    assert client.responses[-1].json()["refresh_in"] == 60
    assert "refresh_on" in first
    assert second["token_source"] == "identity_provider"


# -- discovery ------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tenant_id", "domain"])
async def test_discovery_document(
    emulator: Emulator, sample: SampleTenant, http: aiohttp.ClientSession, by: str
) -> None:
    """The document MSAL reads, with realistic extras, under this run's host and port."""
    tenant = getattr(sample, by)
    async with http.get(f"/{tenant}/v2.0/.well-known/openid-configuration") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        doc = await response.json()
    root = f"{emulator.authority}/{sample.tenant_id}"
    assert doc["token_endpoint"] == f"{root}/oauth2/v2.0/token"
    assert doc["authorization_endpoint"] == f"{root}/oauth2/v2.0/authorize"
    assert doc["device_authorization_endpoint"] == f"{root}/oauth2/v2.0/devicecode"
    assert doc["issuer"] == f"{root}/v2.0"
    assert doc["jwks_uri"] == f"{root}/discovery/v2.0/keys"
    assert "private_key_jwt" in doc["token_endpoint_auth_methods_supported"]
    assert doc["cloud_instance_name"] == "microsoftonline.com"


async def test_unknown_tenant_fails_discovery(
    emulator: Emulator, sample: SampleTenant, http: aiohttp.ClientSession, client: Msal
) -> None:
    """400 invalid_tenant AADSTS90002; MSAL refuses to build the app."""
    async with http.get("/fabrikam.com/v2.0/.well-known/openid-configuration") as response:
        assert response.status == 400
        assert_aad_error(await response.json(), TENANT_NOT_FOUND_DISCOVERY, tenant="fabrikam.com")
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        await client.app(sample.client_id, sample.client_secret, tenant="fabrikam.com")


async def test_tenant_that_is_no_dns_name_nor_guid(http: aiohttp.ClientSession) -> None:
    """AADSTS900023, on discovery and on the token endpoint."""
    async with http.get("/contoso/v2.0/.well-known/openid-configuration") as response:
        assert response.status == 400
        assert_aad_error(await response.json(), TENANT_INVALID, tenant="contoso")
    async with http.post(token_url("contoso"), data={"grant_type": "client_credentials"}) as r:
        assert r.status == 400
        assert_aad_error(await r.json(), TENANT_INVALID, tenant="contoso")


# -- refusals -------------------------------------------------------------------------------


async def test_unknown_tenant_at_the_token_endpoint(
    sample: SampleTenant, http: aiohttp.ClientSession
) -> None:
    data = {"grant_type": "client_credentials", "client_id": sample.client_id}
    async with http.post(token_url("fabrikam.com"), data=data) as response:
        assert response.status == 400
        assert_aad_error(await response.json(), TENANT_NOT_FOUND, tenant="fabrikam.com")


async def test_unknown_app(sample: SampleTenant, client: Msal) -> None:
    stranger = str(uuid.uuid4())
    result = await client.token(stranger, sample.client_secret)
    assert client.last.status_code == 400
    assert_aad_error(client.last.json(), APP_NOT_FOUND, app_id=stranger, tenant=sample.tenant_id)
    assert result["error"] == "unauthorized_client"


async def test_wrong_secret(sample: SampleTenant, client: Msal) -> None:
    result = await client.token(sample.client_id, "not-the-secret")
    assert client.last.status_code == 401
    assert_aad_error(client.last.json(), CLIENT_SECRET_INVALID, app_id=sample.client_id)
    assert result["error_codes"] == [7000215]


async def test_expired_secret(sample: SampleTenant, client: Msal) -> None:
    app = sample.directory.tenants[sample.tenant_id].apps[sample.client_id]
    app.add_secret("old-secret", expires=datetime.now(UTC) - timedelta(days=1))
    await client.token(sample.client_id, "old-secret")
    assert client.last.status_code == 401
    assert_aad_error(client.last.json(), CLIENT_SECRET_EXPIRED, app_id=sample.client_id)


async def test_certificate_app_sending_a_secret(sample: SampleTenant, client: Msal) -> None:
    await client.token(sample.cert_client_id, "a-guess")
    assert client.last.status_code == 401
    assert_aad_error(client.last.json(), CLIENT_SECRET_INVALID, app_id=sample.cert_client_id)


async def test_assertion_signed_with_another_key(sample: SampleTenant, client: Msal) -> None:
    """The registered certificate's thumbprint, but a different private key: 700027."""
    _, other_key = self_signed_certificate("intruder")
    credential = {"private_key": other_key, "thumbprint": thumbprint(sample.cert_pem).hex()}
    await client.token(sample.cert_client_id, credential)
    assert client.last.status_code == 401
    assert_aad_error(client.last.json(), ASSERTION_SIGNATURE_INVALID)


async def test_assertion_with_an_unregistered_certificate(
    sample: SampleTenant, client: Msal
) -> None:
    other_cert, other_key = self_signed_certificate("not registered")
    credential = {"private_key": other_key, "public_certificate": other_cert.decode()}
    await client.token(sample.cert_client_id, credential)
    assert client.last.status_code == 401
    assert_aad_error(
        client.last.json(),
        ASSERTION_KEY_NOT_FOUND,
        thumbprint=thumbprint(other_cert, "sha256").hex().upper(),
        app_id=sample.cert_client_id,
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"aud": "https://login.microsoftonline.com/x/oauth2/v2.0/token"},
            ASSERTION_AUDIENCE_MISMATCH,
        ),
        ({"iss": "someone-else"}, ASSERTION_CLIENT_MISMATCH),
        ({"sub": "someone-else"}, ASSERTION_CLIENT_MISMATCH),
    ],
)
async def test_assertion_claims_are_checked(
    emulator: Emulator, sample: SampleTenant, client: Msal, change: dict[str, str], error: AadError
) -> None:
    claims = good_claims(emulator, sample) | change
    signed = assertion(sample.key_pem, sample.cert_pem, **claims)
    await client.token(sample.cert_client_id, {"client_assertion": lambda: signed})
    assert client.last.status_code == 401
    assert_aad_error(client.last.json(), error)


async def test_expired_assertion(emulator: Emulator, sample: SampleTenant, client: Msal) -> None:
    claims = good_claims(emulator, sample) | {"iat": 1_700_000_000, "exp": 1_700_000_600}
    signed = assertion(sample.key_pem, sample.cert_pem, **claims)
    await client.token(sample.cert_client_id, {"client_assertion": lambda: signed})
    body = client.last.json()
    assert client.last.status_code == 401
    now = re.search(r"Current time: (\S+),", body["error_description"])
    assert now is not None
    assert_aad_error(
        body,
        ASSERTION_EXPIRED,
        now=now.group(1),
        valid_from="2023-11-14T22:13:20.0000000Z",
        expires="2023-11-14T22:23:20.0000000Z",
    )


async def test_malformed_assertion(sample: SampleTenant, client: Msal) -> None:
    await client.token(sample.cert_client_id, {"client_assertion": lambda: "not.a.jwt"})
    assert client.last.status_code == 400
    assert_aad_error(client.last.json(), ASSERTION_MALFORMED)


async def test_assertion_with_a_weak_algorithm(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """A registered thumbprint on an HS256 assertion is not a certificate signature: 700027."""
    x5t = base64.urlsafe_b64encode(thumbprint(sample.cert_pem)).decode()
    signed = jwt.encode(
        good_claims(emulator, sample), "k" * 32, algorithm="HS256", headers={"x5t": x5t}
    )
    await client.token(sample.cert_client_id, {"client_assertion": lambda: signed})
    assert_aad_error(client.last.json(), ASSERTION_SIGNATURE_INVALID)


@pytest.mark.parametrize(
    ("scope", "error"),
    [
        ("https://outlook.office365.com/SMTP.Send", SCOPE_NOT_DEFAULT),
        (
            "https://outlook.office365.com/.default https://graph.microsoft.com/.default",
            SCOPE_INVALID,
        ),
    ],
)
async def test_scope_must_be_one_resource_default(
    sample: SampleTenant, http: aiohttp.ClientSession, scope: str, error: AadError
) -> None:
    data = {
        "grant_type": "client_credentials",
        "client_id": sample.client_id,
        "client_secret": sample.client_secret,
        "scope": scope,
    }
    async with http.post(token_url(sample.tenant_id), data=data) as response:
        assert response.status == 400
        assert_aad_error(await response.json(), error, scope=scope)


async def test_scope_refusal_through_msal(sample: SampleTenant, client: Msal) -> None:
    result = await client.token(
        sample.client_id, sample.client_secret, "https://outlook.office365.com/SMTP.Send"
    )
    assert result["error"] == "invalid_scope"
    assert result["error_codes"] == [1002012]


async def test_unknown_resource(sample: SampleTenant, client: Msal) -> None:
    await client.token(sample.client_id, sample.client_secret, "https://example.com/.default")
    assert client.last.status_code == 400
    assert_aad_error(
        client.last.json(),
        RESOURCE_NOT_FOUND,
        resource="https://example.com",
        tenant=sample.tenant_id,
    )


@pytest.mark.parametrize(
    ("drop", "change", "error", "fields"),
    [
        ("grant_type", {}, PARAMETER_MISSING, {"name": "grant_type"}),
        ("", {"grant_type": "password"}, GRANT_TYPE_UNSUPPORTED, {"grant_type": "password"}),
        ("client_id", {}, PARAMETER_MISSING, {"name": "client_id"}),
        ("scope", {}, PARAMETER_MISSING, {"name": "scope"}),
        ("client_secret", {}, CREDENTIAL_MISSING, {}),
        ("", {"client_assertion_type": "urn:example:other"}, CREDENTIAL_MISSING, {}),
    ],
)
async def test_incomplete_requests(
    sample: SampleTenant,
    http: aiohttp.ClientSession,
    drop: str,
    change: dict[str, str],
    error: AadError,
    fields: dict[str, str],
) -> None:
    data = {
        "grant_type": "client_credentials",
        "client_id": sample.client_id,
        "client_secret": sample.client_secret,
        "scope": EXCHANGE_SCOPE,
    } | change
    data.pop(drop, None)
    async with http.post(token_url(sample.tenant_id), data=data) as response:
        assert response.status == error.status
        assert_aad_error(await response.json(), error, **fields)
        for name, value in RESPONSE_HEADERS.items():
            assert response.headers[name] == value


async def test_malformed_basic_header_counts_as_no_client(
    sample: SampleTenant, http: aiohttp.ClientSession
) -> None:
    data = {"grant_type": "client_credentials", "scope": EXCHANGE_SCOPE}
    headers = {"Authorization": "Basic !!!not-base64"}
    async with http.post(token_url(sample.tenant_id), data=data, headers=headers) as response:
        assert_aad_error(await response.json(), PARAMETER_MISSING, name="client_id")


async def test_correlation_id_is_the_clients_request_id(sample: SampleTenant, client: Msal) -> None:
    """MSAL sends client-request-id; Microsoft reports it back as the correlation id."""
    await client.token(sample.client_id, "wrong")
    sent = client.last.request_headers["client-request-id"]
    assert client.last.json()["correlation_id"] == sent


# -- fault injection ------------------------------------------------------------------------


async def test_injected_429_has_retry_after_and_is_consumed_once(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    emulator.identity.faults.throttle(retry_after=7)
    throttled = await client.token(sample.client_id, sample.client_secret)
    assert client.last.status_code == 429
    assert client.last.headers["Retry-After"] == "7"
    assert_aad_error(client.last.json(), THROTTLED)
    assert throttled["error"] == "temporarily_unavailable"

    after = await client.token(sample.client_id, sample.client_secret)
    assert after["token_source"] == "identity_provider"
    assert len(emulator.identity.faults) == 0


async def test_injected_503_raises_in_msal(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    emulator.identity.faults.unavailable(retry_after=3)
    with pytest.raises(msal.exceptions.MsalServiceError, match="HTTP Error: 503"):
        await client.token(sample.client_id, sample.client_secret)
    assert client.last.status_code == 503
    assert client.last.headers["Retry-After"] == "3"
    assert_aad_error(client.last.json(), UNAVAILABLE)


async def test_fault_for_one_tenant_spares_the_others(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """A tenant's own fault comes before a global one; other tenants get only the global one."""
    fabrikam = sample.directory.add_tenant(domain="fabrikam.com")
    other = fabrikam.add_app(secret="fabrikam-secret")
    emulator.identity.faults.throttle(retry_after=1)
    emulator.identity.faults.unavailable(tenant="fabrikam.com")

    with pytest.raises(msal.exceptions.MsalServiceError, match="HTTP Error: 503"):
        await client.token(other.client_id, "fabrikam-secret", tenant=fabrikam.tenant_id)
    throttled = await client.token(sample.client_id, sample.client_secret)
    assert client.last.status_code == 429 and "access_token" not in throttled
    ok = await client.token(sample.client_id, sample.client_secret)
    assert ok["token_source"] == "identity_provider"


async def test_any_catalogue_error_can_be_injected(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    """E.g. an expiry on a good secret, to see how the relay reports it."""
    emulator.identity.faults.push(CLIENT_SECRET_EXPIRED, app_id=sample.client_id)
    await client.token(sample.client_id, sample.client_secret)
    assert client.last.status_code == 401
    assert_aad_error(client.last.json(), CLIENT_SECRET_EXPIRED, app_id=sample.client_id)
    assert "Retry-After" not in client.last.headers


def test_fault_for_an_unknown_tenant_is_a_test_error(
    sample: SampleTenant, emulator: Emulator
) -> None:
    with pytest.raises(KeyError, match=r"fabrikam\.com"):
        emulator.identity.faults.throttle(tenant="fabrikam.com")


async def test_global_fault_applies_before_tenant_lookup(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    """A global fault answers even a request for a tenant that does not exist."""
    emulator.identity.faults.throttle(retry_after=1)
    async with http.post(token_url("fabrikam.com"), data={}) as response:
        assert response.status == 429
    emulator.identity.faults.throttle()
    emulator.identity.faults.clear()
    assert repr(emulator.identity.faults) == "<Faults pending=0>"


# -- the request log ------------------------------------------------------------------------


async def test_request_log_never_shows_secrets(
    emulator: Emulator, sample: SampleTenant, client: Msal
) -> None:
    await client.token(sample.client_id, sample.client_secret)
    credential = {"private_key": sample.key_pem, "thumbprint": thumbprint(sample.cert_pem).hex()}
    await client.token(sample.cert_client_id, credential)

    shown = repr(emulator.identity.requests) + str(emulator.identity.requests[-1].form)
    posts = [r for r in emulator.identity.requests if r.method == "POST"]
    assert sample.client_secret not in shown
    assert posts[1].form["client_assertion"] not in shown
    assert "'client_secret': '********'" in shown
    assert "'client_assertion': '********'" in shown
    assert repr(emulator.identity).startswith("<IdentityPlatform tenants=1 requests=4 faults=0>")


# -- the facade -----------------------------------------------------------------------------


async def test_emulator_lifecycle(sample: SampleTenant, tmp_path: Path) -> None:
    """Endpoints exist only while running; a second start and a restart are refused."""
    emulator = Emulator(sample.directory, state_dir=tmp_path / "state")
    assert repr(emulator) == "<Emulator new>"
    with pytest.raises(RuntimeError, match="Emulator is new; its endpoints exist while running"):
        _ = emulator.authority

    await emulator.start()
    try:
        assert emulator.state is EmulatorState.RUNNING
        assert re.fullmatch(r"https://127\.0\.0\.1:\d+", emulator.authority)
        assert emulator.authority_for("contoso.com") == f"{emulator.authority}/contoso.com"
        assert emulator.smtp_host == "127.0.0.1" and emulator.smtp_port > 0
        assert emulator.endpoints == {
            "authority": emulator.authority,
            "smtp": f"127.0.0.1:{emulator.smtp_port}",
            "graph": f"https://127.0.0.1:{emulator.graph_port}/v1.0",
        }
        assert emulator.graph_port not in (emulator.smtp_port, 0)
        assert repr(emulator) == (
            f"<Emulator running authority={emulator.authority} smtp=127.0.0.1:{emulator.smtp_port}>"
        )
        assert emulator.ca_file == tmp_path / "state" / "ca.pem"
        assert emulator.ca_file.read_bytes() == emulator.pki.ca_pem
        with pytest.raises(RuntimeError, match="Emulator is running; an emulator starts only once"):
            await emulator.start()
    finally:
        await emulator.aclose()
    await emulator.aclose()  # a second close is harmless
    assert repr(emulator) == "<Emulator closed>"
    with pytest.raises(RuntimeError, match="Emulator is closed; an emulator starts only once"):
        await emulator.start()


async def test_port_in_use_fails_start_and_leaves_nothing_running(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    taken = int(emulator.authority.rsplit(":", 1)[1])
    second = Emulator(sample.directory, state_dir=tmp_path / "second", identity_port=taken)
    with pytest.raises(OSError):
        await second.start()
    with pytest.raises(RuntimeError, match="Emulator is closed; an emulator starts only once"):
        await second.start()
    await second.aclose()

    third = Emulator(sample.directory, state_dir=tmp_path / "third", smtp_port=emulator.smtp_port)
    with pytest.raises(OSError):
        await third.start()
    await third.aclose()


async def test_wildcard_host_advertises_loopback(sample: SampleTenant, tmp_path: Path) -> None:
    async with Emulator(sample.directory, state_dir=tmp_path, host="0.0.0.0") as emulator:
        assert emulator.authority.startswith("https://127.0.0.1:")
        client = Msal(emulator)
        result = await client.token(sample.client_id, sample.client_secret)
        client.session.close()
    assert "access_token" in result


def test_sample_tenant_hides_its_secrets() -> None:
    sample = sample_tenant()
    shown = repr(sample)
    assert sample.client_secret not in shown and "PRIVATE KEY" not in shown
    tenant = sample.directory.tenant("contoso.com")
    assert tenant is not None and tenant.tenant_id == sample.tenant_id
    relay_box = tenant.mailboxes[sample.mailbox]
    assert relay_box.full_access == {sample.client_id, sample.cert_client_id}
    assert relay_box.may_send_as(sample.send_as)
    assert tenant.mailboxes[sample.shared_mailbox].full_access == relay_box.full_access


def test_error_catalogue_statuses_follow_the_error_class() -> None:
    """invalid_client answers 401, throttling 429, unavailability 503, the rest 400 (§3.5)."""
    errors = [v for v in vars(identity).values() if isinstance(v, AadError)]
    assert len(errors) >= 20
    for error in errors:
        expected = {"invalid_client": 401}.get(error.error, 400)
        if error in (THROTTLED, UNAVAILABLE):
            expected = error.status
        assert error.status == expected, error
