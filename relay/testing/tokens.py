"""JWT-shaped access tokens, issued by the emulated identity platform and checked by the
emulated SMTP and Graph services the way the real ones check theirs (audience, roles or scopes,
expiry).

Tokens are RS256-signed with a key the emulator makes at start, and padded with the kind of
claims real Exchange Online app tokens carry, so they are of realistic size (about 2-3 KB):
clients that cannot send long AUTH lines fail here as they would against Microsoft. An app-only
token carries the app's `roles`; a delegated one (a signed-in user) carries `scp` and the user's
`upn` instead, and the ID token of a sign-in says who signed in.

`WorkloadIssuer` stands in for a Kubernetes cluster's service-account token issuer: the emulator's
federated credentials name it, and a test writes its tokens where relay reads them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

EXCHANGE_AUDIENCE = "https://outlook.office365.com"
GRAPH_AUDIENCE = "https://graph.microsoft.com"
# Exchange Online answers to two identifiers in the global cloud; delegated scopes are usually
# written with the second (https://outlook.office.com/SMTP.Send, reference §2.2).
EXCHANGE_DELEGATED_AUDIENCE = "https://outlook.office.com"
# The same resources in the national clouds: GCC High, DoD, 21Vianet. The emulator answers for
# every cloud at once, so a relay.yaml with any `cloud:` can be pointed at it.
EXCHANGE_AUDIENCES = frozenset(
    {
        EXCHANGE_AUDIENCE,
        EXCHANGE_DELEGATED_AUDIENCE,
        "https://outlook.office365.us",
        "https://outlook-dod.office365.us",
        "https://partner.outlook.cn",
    }
)
GRAPH_AUDIENCES = frozenset(
    {
        GRAPH_AUDIENCE,
        "https://graph.microsoft.us",
        "https://dod-graph.microsoft.us",
        "https://microsoftgraph.chinacloudapi.cn",
    }
)
# What a Kubernetes projected token for Entra workload identity is issued for.
WORKLOAD_AUDIENCE = "api://AzureADTokenExchange"


class TokenProblem(Enum):
    """Why a bearer token is refused; each service maps these to its own reply texts."""

    EMPTY = "empty"
    MALFORMED = "malformed"
    EXPIRED = "expired"
    AUDIENCE = "audience"


class InvalidToken(Exception):
    def __init__(self, problem: TokenProblem) -> None:
        self.problem = problem
        super().__init__(problem.value)


@dataclass(frozen=True)
class Claims:
    audience: str
    tenant_id: str
    app_id: str
    roles: frozenset[str]
    expires: float
    subject: str  # the service principal's object id (oid), or the signed-in user's
    scopes: frozenset[str] = frozenset()  # delegated permissions (`scp`)
    upn: str | None = None  # the signed-in user; None for an app-only token


@dataclass(frozen=True)
class User:
    """Who signs in for a delegated token: a mailbox owner of a tenant."""

    upn: str
    object_id: str
    tenant_id: str


class TokenIssuer:
    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public = self._key.public_key()
        self.kid = uuid.uuid4().hex

    def issue(
        self,
        *,
        audience: str,
        tenant_id: str,
        app_id: str,
        roles: set[str] | frozenset[str],
        object_id: str,
        lifetime: float,
        issued_at: float | None = None,
        user: User | None = None,
        scopes: Collection[str] = (),
    ) -> str:
        """An access token: app-only (`roles`), or for `user` with delegated `scopes`."""
        now = issued_at if issued_at is not None else time.time()
        claims: dict[str, object] = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{tenant_id}/",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "aio": uuid.uuid4().hex * 3,
            "app_displayname": "relay",
            "appid": app_id,
            "appidacr": "1",
            "idp": f"https://sts.windows.net/{tenant_id}/",
            "idtyp": "app",
            "oid": object_id,
            "rh": "0." + uuid.uuid4().hex * 4,
            "roles": sorted(roles),
            "sid": str(uuid.uuid4()),
            "sub": object_id,
            "tid": tenant_id,
            "uti": uuid.uuid4().hex[:22],
            "ver": "1.0",
            "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"],
            "xms_ftd": uuid.uuid4().hex * 2,
            "xms_idrel": "7 28",
            # Real app tokens carry long opaque claims; this one brings the size to ~2.5 KB.
            "xms_pftexp": uuid.uuid4().hex * 12,
        }
        if user is not None:  # a user's token: who, and what the app may do on their behalf
            del claims["roles"]
            claims.update(
                appidacr="0",  # a public client: no app credential
                idtyp="user",
                oid=user.object_id,
                sub=user.object_id,
                scp=" ".join(sorted(scopes)),
                upn=user.upn,
                unique_name=user.upn,
            )
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def id_token(self, *, issuer: str, client_id: str, user: User, lifetime: float) -> str:
        """The OpenID Connect ID token of a sign-in (v2.0): who signed in, for which app."""
        now = int(time.time())
        claims = {
            "aud": client_id,
            "iss": issuer,
            "iat": now,
            "nbf": now,
            "exp": int(now + lifetime),
            "name": user.upn.split("@")[0],
            "oid": user.object_id,
            "preferred_username": user.upn,
            "sub": user.object_id,
            "tid": user.tenant_id,
            "ver": "2.0",
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def validate(
        self, token: str, *, audience: str | Collection[str], now: float | None = None
    ) -> Claims:
        """Check signature, audience (one, or any of several) and expiry; raise InvalidToken
        saying what is wrong."""
        if not token.strip():
            raise InvalidToken(TokenProblem.EMPTY)
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=["RS256"],
                options={"verify_exp": False, "verify_aud": False, "verify_nbf": False},
            )
        except jwt.InvalidTokenError:
            raise InvalidToken(TokenProblem.MALFORMED) from None
        audiences = {audience} if isinstance(audience, str) else set(audience)
        if claims.get("aud") not in audiences:
            raise InvalidToken(TokenProblem.AUDIENCE)
        if float(claims.get("exp", 0)) <= (now if now is not None else time.time()):
            raise InvalidToken(TokenProblem.EXPIRED)
        return Claims(
            audience=claims["aud"],
            tenant_id=claims["tid"],
            app_id=claims["appid"],
            roles=frozenset(claims.get("roles", [])),
            expires=float(claims["exp"]),
            subject=claims["oid"],
            scopes=frozenset(claims.get("scp", "").split()),
            upn=claims.get("upn"),
        )


class WorkloadIssuer:
    """A Kubernetes service-account token issuer (the cluster's OIDC issuer URL and its key).

    Register it on an app with `App.add_federated_credential(issuer.url, subject,
    issuer.public_key_pem)`; `token(subject)` is what the kubelet projects into the pod.
    """

    def __init__(self, url: str = "https://oidc.cluster.example/relay") -> None:
        self.url = url
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex

    @property
    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        subject: str,
        *,
        audience: str = WORKLOAD_AUDIENCE,
        lifetime: float = 3600,
        issued_at: float | None = None,
    ) -> str:
        now = issued_at if issued_at is not None else time.time()
        claims = {
            "aud": [audience],
            "iss": self.url,
            "sub": subject,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
