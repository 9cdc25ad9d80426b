"""JWT-shaped access tokens, issued by the emulated identity platform and checked by the
emulated SMTP and Graph services the way the real ones check theirs (audience, roles, expiry).

Tokens are RS256-signed with a key the emulator makes at start, and padded with the kind of
claims real Exchange Online app tokens carry, so they are of realistic size (about 2-3 KB):
clients that cannot send long AUTH lines fail here as they would against Microsoft.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import Enum

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

EXCHANGE_AUDIENCE = "https://outlook.office365.com"
GRAPH_AUDIENCE = "https://graph.microsoft.com"


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
    subject: str  # the service principal's object id (oid)


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
    ) -> str:
        now = issued_at if issued_at is not None else time.time()
        claims = {
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
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def validate(self, token: str, *, audience: str, now: float | None = None) -> Claims:
        """Check signature, audience and expiry; raise InvalidToken saying what is wrong."""
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
        if claims.get("aud") != audience:
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
        )
