"""HTTPS requests to Microsoft Graph for one mailbox, shared by the graph transport (sendMail)
and the inbound importer (delta, `$value`, mark read, move, delete).

    GraphClient(mailbox=..., graph_url=..., tokens=..., ssl_context=...)
        .request(method, url, body, content_type) -> Answer     (any status; see below)

Inside one `request`: a 401 is retried once with a fresh token (`tokens.invalidate`), and a 429,
5xx or 408 whose Retry-After is at most `MAX_RETRY_WAIT` is waited out up to `THROTTLE_RETRIES`
times; whatever answer is left (2xx or not) goes back to the caller, which decides what it means
for its message. At most `max_concurrency` requests are in flight per client, that is per
mailbox (Graph allows 4; the 5th gets 429, reference §7.4).

Failures: what aiohttp (and the socket under it) raises becomes `UpstreamTimeout` or
`UpstreamUnavailable` through `map_http_error`, the one mapping of those exceptions; a token that
cannot be had raises the provider's `TokenUnavailable` / `TokenRejected`; a body bigger than the
caller's `max_body` raises `AnswerTooLarge` without reading the rest.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from aiohttp import http_exceptions, http_websocket, streams
from yarl import URL

from relay.errors import DeliveryError, TemporaryFailure, UpstreamTimeout, UpstreamUnavailable
from relay.identity import GRAPH_SCOPE, TokenProvider
from relay.reply import Reply

log = logging.getLogger("relay.graph")

THROTTLE_RETRIES = 3  # 429/503 waited out within one request
MAX_RETRY_WAIT = 30.0  # seconds; a longer Retry-After goes back to the caller
MAX_ERROR_TEXT = 300  # characters of Graph's error message kept in a reply
TIMEOUT = 120.0  # seconds waiting for an answer to one request
CONNECT_TIMEOUT = 30.0  # seconds to connect (TCP and TLS)
MAX_REQUEST_TIME = 600.0  # seconds for one whole request (≤ 4 MB): a stalled upload ends
READ_CHUNK = 256 * 1024  # bytes read at a time from a body with a size limit

# Foreign exceptions, mapped at the boundary: the first row whose class matches decides. The
# text names the peer: Graph, or the HTTP endpoint an inbound import delivers to.
_TLS = "TLS with {peer} failed"
_UNREACHABLE = "{peer} unreachable"
EXCEPTION_MAP: tuple[tuple[type[BaseException], type[DeliveryError], str, str], ...] = (
    (TimeoutError, UpstreamTimeout, "4.4.2", "{peer} timed out"),
    (aiohttp.ClientSSLError, UpstreamUnavailable, "4.7.5", _TLS),
    (ssl.SSLError, UpstreamUnavailable, "4.7.5", _TLS),
    (aiohttp.ClientError, UpstreamUnavailable, "4.4.1", _UNREACHABLE),
    (OSError, UpstreamUnavailable, "4.4.1", _UNREACHABLE),
    (http_exceptions.HttpProcessingError, UpstreamUnavailable, "4.4.1", _UNREACHABLE),
    (streams.EofStream, UpstreamUnavailable, "4.4.1", _UNREACHABLE),
    (http_websocket.WebSocketError, UpstreamUnavailable, "4.4.1", _UNREACHABLE),
    (http_websocket.WSHandshakeError, UpstreamUnavailable, "4.4.1", _UNREACHABLE),
    (aiohttp.WSMessageTypeError, UpstreamUnavailable, "4.4.1", _UNREACHABLE),
)
MAPPED_EXCEPTIONS = tuple(row[0] for row in EXCEPTION_MAP)


def scrub(text: str) -> str:
    """No query strings in replies and logs: an upload URL carries its own credential."""
    return re.sub(r"\?[^\s'\"]*", "?…", text)


def mapping_for(
    kind: type[BaseException],
) -> tuple[type[BaseException], type[DeliveryError], str, str] | None:
    return next((row for row in EXCEPTION_MAP if issubclass(kind, row[0])), None)


def map_http_error(exc: BaseException, peer: str = "Graph") -> DeliveryError:
    """The one mapping from what aiohttp (and the socket under it) raises to our tree."""
    if isinstance(exc, DeliveryError):
        return exc
    row = mapping_for(type(exc))
    if row is None:
        raise exc
    _, error, status, what = row
    text = f"{what.format(peer=peer)}: {type(exc).__name__}: {exc}"
    return error(Reply(451, status, scrub(text)))


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds (Graph sends an integer), None when absent or unreadable."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def is_retryable(status: int) -> bool:
    """Statuses that mean "not now": timeout, throttling, any server error."""
    return status in (408, 429) or status >= 500


def error_of(body: bytes) -> tuple[str, str]:
    """(code, message) of Graph's error JSON; ("", "") for any other body (a proxy's page)."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        return "", ""


def user_url(graph_url: str, mailbox: str) -> str:
    """`{graph}/users/{mailbox}`: where a mailbox's resources are."""
    return f"{graph_url.rstrip('/')}/users/{quote(mailbox, safe='@')}"


class AnswerTooLarge(Exception):
    """The answer's body is bigger than the caller allowed; `size` is at least how big."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{size} bytes, more than the limit of {limit}")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    retry_after: str | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def code(self) -> str:
        """Graph's error code ("" for a success or a body that is not Graph's error JSON)."""
        return error_of(self.body)[0]

    def describe(self) -> str:
        """`Graph 404 ErrorItemNotFound: The specified object was not found in the store.`"""
        code, message = error_of(self.body)
        return (
            f"Graph {self.status} {code}: {message[:MAX_ERROR_TEXT]}"
            if code
            else (f"Graph {self.status}")
        )

    def json(self) -> dict[str, object]:
        """The JSON object of a success answer, or a temporary failure saying it is not one."""
        try:
            value = json.loads(self.body)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise TemporaryFailure(
                Reply(451, "4.3.0", f"Graph answered {self.status} without a JSON object")
            )
        return value

    def field(self, name: str) -> str:
        """A string property of a JSON answer, or a temporary failure naming what is missing."""
        try:
            value = json.loads(self.body)[name]
        except (ValueError, TypeError, KeyError):
            value = None
        if not isinstance(value, str):
            raise TemporaryFailure(
                Reply(451, "4.3.0", f"Graph answered {self.status} without {name!r}")
            )
        return value


class GraphClient:
    def __init__(
        self,
        *,
        mailbox: str,
        graph_url: str,
        tokens: TokenProvider,
        ssl_context: ssl.SSLContext | None,
        max_concurrency: int = 4,
        session: aiohttp.ClientSession | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.mailbox = mailbox
        self.graph_url = graph_url.rstrip("/")
        self.user_url = user_url(graph_url, mailbox)
        self.limit = max_concurrency
        self.in_flight = 0
        self._tokens = tokens
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._slots = asyncio.Semaphore(max_concurrency)
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(
            total=MAX_REQUEST_TIME, sock_connect=min(CONNECT_TIMEOUT, timeout), sock_read=timeout
        )

    def __repr__(self) -> str:
        return f"<GraphClient {self.mailbox} in_flight={self.in_flight}/{self.limit}>"

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        content_type: str | None = None,
        *,
        authorized: bool = True,
        headers: Mapping[str, str] | None = None,
        max_body: int | None = None,
    ) -> Answer:
        """One Graph request, with the retries described in the module docstring."""
        refreshed = False
        waits = 0
        while True:
            answer = await self.once(
                method,
                url,
                body,
                content_type,
                authorized=authorized,
                headers=headers or {},
                max_body=max_body,
            )
            if answer.status == 401 and authorized and not refreshed:
                self._tokens.invalidate(GRAPH_SCOPE)
                refreshed = True
                continue
            wait = retry_after_seconds(answer.retry_after)
            if (
                is_retryable(answer.status)
                and wait is not None
                and wait <= MAX_RETRY_WAIT
                and waits < THROTTLE_RETRIES
            ):
                waits += 1
                log.info(
                    "graph %s: %s %s answered %d, retrying in %gs",
                    self.mailbox,
                    method,
                    URL(url).path,
                    answer.status,
                    wait,
                )
                await asyncio.sleep(wait)
                continue
            return answer

    async def once(
        self,
        method: str,
        url: str,
        body: bytes,
        content_type: str | None,
        *,
        authorized: bool = True,
        headers: Mapping[str, str] | None = None,
        max_body: int | None = None,
    ) -> Answer:
        """One request, no retries."""
        request_headers = dict(headers or {})
        if content_type is not None:
            request_headers["Content-Type"] = content_type
        if authorized:
            request_headers["Authorization"] = f"Bearer {await self._tokens.token(GRAPH_SCOPE)}"
        session = self._session_for_requests()
        async with self._slots:
            self.in_flight += 1
            try:
                async with session.request(
                    method,
                    url,
                    data=io.BytesIO(body) if body else None,  # aiohttp warns on big raw bytes
                    headers=request_headers,
                    ssl=self._ssl,
                    timeout=self._timeout,
                ) as response:
                    content = await _read(response, max_body)
                    return Answer(response.status, content, response.headers.get("Retry-After"))
            except MAPPED_EXCEPTIONS as exc:
                raise map_http_error(exc) from exc
            finally:
                self.in_flight -= 1

    def _session_for_requests(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session


async def _read(response: aiohttp.ClientResponse, limit: int | None) -> bytes:
    """The whole body, or `AnswerTooLarge` as soon as it is known to exceed `limit`."""
    if limit is None or response.status >= 300:
        return await response.read()
    if response.content_length is not None and response.content_length > limit:
        raise AnswerTooLarge(response.content_length, limit)
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(len(body), limit)
    return bytes(body)
