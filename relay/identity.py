"""Access tokens for accounts, from Microsoft's identity platform through MSAL.

Transports ask a `TokenProvider` for a token for a scope and tell it when the upstream refused
one; they never see MSAL. A token is served from MSAL's cache until less than five minutes of its
life remain, and concurrent askers share one request (1,000 messages cost one token request).

Failures are mapped here, at the boundary:
  * the identity platform unreachable, timing out, throttling (429) or failing (5xx)
    -> `TokenUnavailable` (temporary: mail is deferred);
  * a refusal of the credentials or the request (AADSTS errors: unknown tenant or app, wrong or
    expired secret, bad assertion, bad scope) -> `TokenRejected` (also temporary: the fix is the
    operator's, the mail waits), its text carrying the AADSTS code and Microsoft's first line.
MSAL itself is synchronous (requests); its calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol

import msal
import requests
from requests.adapters import HTTPAdapter

from relay.config import AccountConfig, CredentialKind
from relay.errors import TokenRejected, TokenUnavailable
from relay.reply import Reply
from relay.tls import client_context

log = logging.getLogger("relay.identity")

EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"

HTTP_TIMEOUT = 20.0  # seconds for one request to the identity platform

# OAuth error codes that say the request or the credentials are wrong (RFC 6749 §5.2 plus
# Entra's invalid_tenant): asking again will not help until an operator acts.
CREDENTIAL_REFUSALS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_tenant",
        "invalid_scope",
        "invalid_request",
        "invalid_grant",
        "unsupported_grant_type",
    }
)


class TokenProvider(Protocol):
    async def token(self, scope: str) -> str:
        """A valid access token for `scope`, from cache when it has enough life left."""
        ...

    def invalidate(self, scope: str) -> None:
        """Forget the cached token for `scope`: the upstream refused it."""
        ...


class _TLSAdapter(HTTPAdapter):
    """requests adapter verifying with our context (system CAs plus the account's ca_file)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


def _http_client(account: AccountConfig) -> requests.Session:
    session = requests.Session()
    session.mount("https://", _TLSAdapter(client_context(account.ca_file)))
    session.request = _with_timeout(session.request)  # type: ignore[method-assign]
    return session


def _with_timeout(request: Callable[..., requests.Response]) -> Callable[..., requests.Response]:
    def call(*args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return request(*args, **kwargs)

    return call


def msal_credential(account: AccountConfig) -> Any:
    """The `client_credential` MSAL takes for this account's credential kind."""
    cred = account.credential
    if cred.kind is CredentialKind.SECRET:
        assert cred.secret is not None
        return cred.secret.reveal()
    if cred.kind is CredentialKind.CERTIFICATE:
        passphrase = cred.passphrase.reveal() if cred.passphrase else None
        if cred.pfx_file is not None:
            out: dict[str, Any] = {
                "private_key_pfx_path": str(cred.pfx_file),
                "public_certificate": True,
            }
        else:
            assert cred.key_file is not None and cred.cert_file is not None
            out = {
                "private_key": cred.key_file.read_text(),
                "public_certificate": cred.cert_file.read_text(),
            }
        if passphrase:
            out["passphrase"] = passphrase
        return out
    assert cred.federated_token_file is not None
    token_file = cred.federated_token_file
    # Read afresh on every token request: Kubernetes rotates the projected token.
    return {"client_assertion": lambda: token_file.read_text().strip()}


def _refusal(result: dict[str, Any]) -> str:
    """Microsoft's error in one line: the error, the AADSTS code and its first sentence."""
    description = str(result.get("error_description", "")).split("\r\n")[0].split("\n")[0]
    return f"{result.get('error', 'error')}: {description}".strip()


class MsalTokenProvider:
    """Tokens for one account (client credentials flow)."""

    def __init__(self, account: AccountConfig) -> None:
        self.account = account
        self._app: msal.ConfidentialClientApplication | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.requests = 0  # token requests that reached the identity platform
        self.failures = 0  # token requests that got no token (refused, throttled, unreachable)
        self.last_error: str | None = None  # why the last request got no token; None after one did

    def __repr__(self) -> str:
        state = "ok" if self.last_error is None else f"failing ({self.last_error})"
        return f"<MsalTokenProvider account={self.account.name} requests={self.requests} {state}>"

    @property
    def authority(self) -> str:
        return f"{self.account.endpoints.authority.rstrip('/')}/{self.account.tenant_id}"

    def _application(self) -> msal.ConfidentialClientApplication:
        # Built lazily in the worker thread: MSAL fetches the discovery document in __init__.
        if self._app is None:
            self._app = msal.ConfidentialClientApplication(
                self.account.client_id,
                client_credential=msal_credential(self.account),
                authority=self.authority,
                instance_discovery=False,
                http_client=_http_client(self.account),
            )
        return self._app

    def _acquire(self, scope: str) -> dict[str, Any]:
        try:
            result = self._application().acquire_token_for_client(scopes=[scope])
        except requests.RequestException as exc:
            raise TokenUnavailable(
                Reply(451, "4.7.0", f"identity platform unreachable: {type(exc).__name__}")
            ) from None
        except msal.exceptions.MsalServiceError as exc:
            raise TokenUnavailable(Reply(451, "4.7.0", f"identity platform error: {exc}")) from None
        except ValueError as exc:
            # MSAL raises ValueError when discovery fails (unknown tenant, bad authority).
            raise TokenRejected(Reply(535, "5.7.3", f"identity platform: {exc}")) from None
        return result

    async def token(self, scope: str) -> str:
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:  # one request at a time per scope; the rest read MSAL's cache
            try:
                result = await asyncio.to_thread(self._acquire, scope)
            except (TokenUnavailable, TokenRejected) as exc:
                self.failures += 1
                self.last_error = exc.reply.text
                raise
        if result.get("token_source") == "identity_provider":
            self.requests += 1
        if "access_token" in result:
            self.last_error = None
            return str(result["access_token"])
        self.failures += 1
        self.last_error = _refusal(result)
        if result.get("error") not in CREDENTIAL_REFUSALS:
            # Throttling (429 bodies reach us as JSON) and anything unexpected: try later.
            raise TokenUnavailable(Reply(451, "4.7.0", f"identity platform: {self.last_error}"))
        log.error("account %s: token request refused: %s", self.account.name, self.last_error)
        raise TokenRejected(Reply(535, "5.7.3", f"identity platform: {self.last_error}"))

    def invalidate(self, scope: str) -> None:
        if self._app is not None:
            self._app.remove_tokens_for_client()
