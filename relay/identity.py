"""Access tokens for accounts, from Microsoft's identity platform through MSAL.

Transports ask a `TokenProvider` for a token for a scope and tell it when the upstream refused
one; they never see MSAL. A token is served from MSAL's cache until less than five minutes of its
life remain, and concurrent askers share one request (1,000 messages cost one token request).

Scopes. Transports ask by the global cloud's app-only names, `EXCHANGE_SCOPE` and `GRAPH_SCOPE`;
the provider asks for what the account needs (`requested_scopes`): the resource of the account's
cloud (`CLOUD_RESOURCES`; `endpoints:` moves hosts, not resource identifiers), with `/.default`
(the app's consented application permissions) for an app, or the delegated permissions
(`SMTP.Send`; `Mail.Send Mail.ReadWrite`) for a signed-in user.

Flows. An app credential (client_secret, certificate, federated_token_file) uses the client
credentials flow; a federated token file is read afresh for every token request, as Kubernetes
rotates it. A `delegated_user` account uses the tokens `relay login` left in its token cache
file: MSAL serves the access token from the cache and redeems the refresh token silently when it
runs out. The file is rewritten (0600, atomically) when MSAL changed the cache, and read again
when another process (`relay login`) replaced it, so a new sign-in needs no restart.

Failures are mapped here, at the boundary:
  * the identity platform unreachable, timing out, throttling (429) or failing (5xx)
    -> `TokenUnavailable` (temporary: mail is deferred);
  * a refusal of the credentials or the request (AADSTS errors: unknown tenant or app, wrong or
    expired secret, bad assertion, bad scope) -> `TokenRejected` (also temporary: the fix is the
    operator's, the mail waits), its text carrying the AADSTS code and Microsoft's first line;
  * a credential that cannot be read (certificate, federated token file, token cache), a
    delegated account not signed in, or a refresh the identity platform refused (AADSTS700082:
    unused for 90 days) -> `TokenRejected`, saying what to do (for a user: run `relay login`).
MSAL itself is synchronous (requests); its calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msal
import requests
from requests.adapters import HTTPAdapter

from relay.config import (
    AccountConfig,
    CertificateProblem,
    Cloud,
    Config,
    CredentialKind,
    Transport,
    read_certificate,
)
from relay.errors import TokenRejected, TokenUnavailable
from relay.reply import Reply
from relay.tls import client_context

log = logging.getLogger("relay.identity")

EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"

HTTP_TIMEOUT = 20.0  # seconds for one request to the identity platform
CACHE_MODE = 0o600  # a token cache holds refresh tokens: for the owner's eyes only
CACHE_DIR_MODE = 0o700

# OAuth error codes that say the request, the credentials or the user's grant are wrong (RFC 6749
# §5.2, Entra's invalid_tenant, OIDC's interaction_required): asking again will not help until
# someone acts.
CREDENTIAL_REFUSALS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_tenant",
        "invalid_scope",
        "invalid_request",
        "invalid_grant",
        "unsupported_grant_type",
        "interaction_required",
    }
)


@dataclass(frozen=True)
class CloudResources:
    """A cloud's resource identifiers: the audiences of its tokens, not network addresses."""

    exchange: str  # app-only SMTP: {exchange}/.default
    exchange_delegated: str  # a signed-in user's SMTP: {exchange_delegated}/SMTP.Send
    graph: str


# Reference §1.1, §2 and the national-cloud tables of peers.md.
CLOUD_RESOURCES: Mapping[Cloud, CloudResources] = {
    Cloud.GLOBAL: CloudResources(
        "https://outlook.office365.com", "https://outlook.office.com", "https://graph.microsoft.com"
    ),
    Cloud.USGOV: CloudResources(
        "https://outlook.office365.us", "https://outlook.office365.us", "https://graph.microsoft.us"
    ),
    Cloud.USGOV_DOD: CloudResources(
        "https://outlook-dod.office365.us",
        "https://outlook-dod.office365.us",
        "https://dod-graph.microsoft.us",
    ),
    Cloud.CHINA: CloudResources(
        "https://partner.outlook.cn",
        "https://partner.outlook.cn",
        "https://microsoftgraph.chinacloudapi.cn",
    ),
}
SMTP_PERMISSIONS = ("SMTP.Send",)
GRAPH_PERMISSIONS = ("Mail.Send", "Mail.ReadWrite")  # sendMail; import, drafts, upload sessions


def requested_scopes(account: AccountConfig, scope: str) -> list[str]:
    """The scopes asked of the identity platform when a transport asks `account` for `scope`."""
    resources = CLOUD_RESOURCES[account.cloud]
    delegated = account.credential.kind is CredentialKind.DELEGATED
    if scope == EXCHANGE_SCOPE:
        if delegated:
            return [f"{resources.exchange_delegated}/{p}" for p in SMTP_PERMISSIONS]
        return [f"{resources.exchange}/.default"]
    if scope == GRAPH_SCOPE:
        if delegated:
            return [f"{resources.graph}/{p}" for p in GRAPH_PERMISSIONS]
        return [f"{resources.graph}/.default"]
    raise ValueError(f"no such scope: {scope!r} (ask for EXCHANGE_SCOPE or GRAPH_SCOPE)")


def account_scopes(config: Config, name: str) -> list[str]:
    """The transport scopes an account serves: Exchange for SMTP routes, Graph for Graph routes
    and inbound imports (Exchange when it serves nothing yet)."""
    transports = {route.transport for route in config.routes if route.account == name}
    graph = Transport.GRAPH in transports or any(i.account == name for i in config.inbound)
    scopes = [EXCHANGE_SCOPE] if Transport.SMTP in transports or not graph else []
    return [*scopes, GRAPH_SCOPE] if graph else scopes


class TokenProvider(Protocol):
    async def token(self, scope: str) -> str:
        """A valid access token for `scope`, from cache when it has enough life left."""
        ...

    def invalidate(self, scope: str) -> None:
        """Forget the cached token for `scope`: the upstream refused it."""
        ...


class CredentialUnusable(Exception):
    """A credential (or a user's sign-in) cannot be used; the text says which, why and what to
    do, never its content."""


class _TLSAdapter(HTTPAdapter):
    """requests adapter verifying with our context (system CAs plus the account's ca_file)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


def http_client(account: AccountConfig) -> requests.Session:
    """The HTTP session MSAL uses for `account`: our TLS trust, a timeout on every request."""
    session = requests.Session()
    session.mount("https://", _TLSAdapter(client_context(account.ca_file)))
    session.request = _with_timeout(session.request)  # type: ignore[method-assign]
    return session


def _with_timeout(request: Callable[..., requests.Response]) -> Callable[..., requests.Response]:
    def call(*args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return request(*args, **kwargs)

    return call


def authority(account: AccountConfig) -> str:
    return f"{account.endpoints.authority.rstrip('/')}/{account.tenant_id}"


class FederatedToken:
    """The client assertion of workload identity: the token file's content, read at each call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> str:
        try:
            token = self.path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not text"
            raise CredentialUnusable(
                f"cannot read federated_token_file {self.path}: {why}"
            ) from None
        if not token:
            raise CredentialUnusable(f"federated_token_file {self.path} is empty")
        return token


def msal_credential(account: AccountConfig) -> Any:
    """The `client_credential` MSAL takes for this account's app credential."""
    cred = account.credential
    if cred.kind is CredentialKind.SECRET:
        assert cred.secret is not None
        return cred.secret.reveal()
    if cred.kind is CredentialKind.CERTIFICATE:
        try:
            pair = read_certificate(cred)
        except CertificateProblem as problem:
            raise CredentialUnusable(f"certificate: {problem.message}") from None
        # With the certificate, MSAL signs PS256 and sends x5t#S256 and x5c (reference §3.3).
        return {
            "private_key": pair.key_pem.decode(),
            "public_certificate": pair.cert_pem.decode(),
        }
    assert cred.federated_token_file is not None
    return {"client_assertion": FederatedToken(cred.federated_token_file)}


class TokenCacheFile:
    """An MSAL token cache in a file only its owner may read, replaced atomically on change.

    `load()` reads the file when it is not what this process last read or wrote (another
    process, `relay login`, replaced it); `save()` writes it when MSAL changed the cache.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache = msal.SerializableTokenCache()
        self._seen: tuple[int, int, int] | None = None

    def load(self) -> None:
        try:
            st = self.path.stat()
            if _signature(st) == self._seen:
                return
            text = self.path.read_text(encoding="utf-8")
            self.cache.deserialize(text)
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not text"
            raise CredentialUnusable(f"cannot read the token cache {self.path}: {why}") from None
        except ValueError:
            raise CredentialUnusable(f"the token cache {self.path} is damaged") from None
        self._seen = _signature(st)

    def save(self) -> None:
        if not self.cache.has_state_changed:
            return
        self.path.parent.mkdir(mode=CACHE_DIR_MODE, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CACHE_MODE)
        try:
            os.fchmod(fd, CACHE_MODE)  # a leftover temporary file may have had another mode
            with os.fdopen(fd, "wb", closefd=False) as out:
                out.write(self.cache.serialize().encode())
            os.fsync(fd)
            tmp.replace(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        _fsync_directory(self.path.parent)
        self._seen = _signature(self.path.stat())
        self.cache.has_state_changed = False


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def public_application(
    account: AccountConfig, cache: msal.SerializableTokenCache
) -> msal.PublicClientApplication:
    """The MSAL app a user signs in to (no app credential: "Allow public client flows")."""
    return msal.PublicClientApplication(
        account.client_id,
        authority=authority(account),
        instance_discovery=False,
        http_client=http_client(account),
        token_cache=cache,
    )


class _Flow(Protocol):
    """How one account gets tokens; synchronous (MSAL), run in a worker thread."""

    remedy: str  # what the operator does about a refusal, appended to its text

    def acquire(self, scopes: list[str]) -> dict[str, Any]: ...

    def forget(self, scopes: list[str]) -> None: ...


class _ClientCredentials:
    """An app's own tokens (client credentials flow)."""

    remedy = ""

    def __init__(self, account: AccountConfig) -> None:
        self._account = account
        self._app: msal.ConfidentialClientApplication | None = None

    def acquire(self, scopes: list[str]) -> dict[str, Any]:
        if self._app is None:  # built here, in the worker: MSAL fetches discovery in __init__
            self._app = msal.ConfidentialClientApplication(
                self._account.client_id,
                client_credential=msal_credential(self._account),
                authority=authority(self._account),
                instance_discovery=False,
                http_client=http_client(self._account),
            )
        result: dict[str, Any] = self._app.acquire_token_for_client(scopes=scopes)
        return result

    def forget(self, scopes: list[str]) -> None:
        if self._app is not None:
            self._app.remove_tokens_for_client()


class _SignedInUser:
    """A user's tokens from the cache `relay login` left; refreshed silently, saved back unless
    `read_only` (the old refresh token stays valid, so not saving loses nothing)."""

    def __init__(self, account: AccountConfig, *, read_only: bool) -> None:
        assert account.token_cache is not None and account.credential.user is not None
        self._account = account
        self._read_only = read_only
        self._user = account.credential.user
        self._file = TokenCacheFile(account.token_cache)
        self._app: msal.PublicClientApplication | None = None
        self._stale: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()  # the Exchange and Graph scopes share one cache file
        self.remedy = f" (run `relay login {account.name}` to sign in again)"

    def acquire(self, scopes: list[str]) -> dict[str, Any]:
        with self._lock:
            return self._acquire(scopes)

    def _acquire(self, scopes: list[str]) -> dict[str, Any]:
        self._file.load()
        if self._app is None:
            self._app = public_application(self._account, self._file.cache)
        signed_in = self._app.get_accounts(username=self._user)
        if not signed_in:
            raise CredentialUnusable(
                f"{self._user} is not signed in (no token in {self._file.path}); run "
                f"`relay login {self._account.name}`"
            )
        key = tuple(scopes)
        result = self._app.acquire_token_silent_with_error(
            scopes, signed_in[0], force_refresh=key in self._stale
        )
        self._stale.discard(key)
        try:
            if not self._read_only:
                self._file.save()
        except OSError as exc:  # the old refresh token stays valid: keep going, say so
            log.warning(
                "account %s: cannot save the renewed tokens to %s: %s",
                self._account.name,
                self._file.path,
                exc.strerror,
            )
        if result is None:  # signed in once, but no refresh token left
            raise CredentialUnusable(
                f"no refresh token for {self._user} in {self._file.path}; run "
                f"`relay login {self._account.name}`"
            )
        return dict(result)

    def forget(self, scopes: list[str]) -> None:
        self._stale.add(tuple(scopes))


def refusal_text(result: Mapping[str, Any]) -> str:
    """Microsoft's error in one line: the error, the AADSTS code and its first sentence."""
    description = str(result.get("error_description", "")).split("\r\n")[0].split("\n")[0]
    return f"{result.get('error', 'error')}: {description}".strip()


class MsalTokenProvider:
    """Tokens for one account: an app's (client credentials), or a signed-in user's.

    `read_only` leaves a signed-in user's token cache file as it is: for commands that may run
    as another operating-system user than `relay serve` (`relay check --online`), which would
    otherwise leave the file owned by them and unreadable to serve.
    """

    def __init__(self, account: AccountConfig, *, read_only: bool = False) -> None:
        self.account = account
        self._flow: _Flow = (
            _SignedInUser(account, read_only=read_only)
            if account.credential.kind is CredentialKind.DELEGATED
            else _ClientCredentials(account)
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self.requests = 0  # token requests that reached the identity platform
        self.failures = 0  # token requests that got no token (refused, throttled, unreachable)
        self.last_error: str | None = None  # why the last request got no token; None after one did

    def __repr__(self) -> str:
        state = "ok" if self.last_error is None else f"failing ({self.last_error})"
        return f"<MsalTokenProvider account={self.account.name} requests={self.requests} {state}>"

    @property
    def authority(self) -> str:
        return authority(self.account)

    def _acquire(self, scope: str) -> dict[str, Any]:
        scopes = requested_scopes(self.account, scope)
        try:
            return self._flow.acquire(scopes)
        except requests.RequestException as exc:
            raise TokenUnavailable(
                Reply(451, "4.7.0", f"identity platform unreachable: {type(exc).__name__}")
            ) from None
        except msal.exceptions.MsalError as exc:  # MsalServiceError: the token endpoint's 5xx
            raise TokenUnavailable(Reply(451, "4.7.0", f"identity platform error: {exc}")) from None
        except CredentialUnusable as exc:
            log.error("account %s: %s", self.account.name, exc)
            raise TokenRejected(
                Reply(535, "5.7.3", f"account {self.account.name}: {exc}")
            ) from None
        except ValueError as exc:
            # MSAL raises ValueError when discovery fails (unknown tenant, bad authority).
            raise TokenRejected(Reply(535, "5.7.3", f"identity platform: {exc}")) from None

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
        self.last_error = refusal_text(result)
        if result.get("error") not in CREDENTIAL_REFUSALS:
            # Throttling (429 bodies reach us as JSON) and anything unexpected: try later.
            raise TokenUnavailable(Reply(451, "4.7.0", f"identity platform: {self.last_error}"))
        self.last_error += self._flow.remedy
        log.error("account %s: token request refused: %s", self.account.name, self.last_error)
        raise TokenRejected(Reply(535, "5.7.3", f"identity platform: {self.last_error}"))

    def invalidate(self, scope: str) -> None:
        self._flow.forget(requested_scopes(self.account, scope))
