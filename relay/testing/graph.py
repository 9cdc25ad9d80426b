"""Microsoft Graph (the mail part) in the emulator: an aiohttp application serving `/v1.0/...`.

    GraphService(directory, issuer).app   served over HTTPS by the emulator (or a test)

What it models (reference §6, §7): bearer tokens checked like Graph checks them (audience,
expiry, roles, the mailbox's tenant), sendMail in both forms, drafts with attachments and upload
sessions, folders, message lists with paging, delta rounds, `$value`, mark read, move (new id)
and delete, Graph's error JSON with its exact texts, the 4 MB request cap and the limit of 4
concurrent requests per mailbox. Each mailbox's contents live in a `MailStore`
(`relay.testing.mailstore`).

Tests seed and inspect through the service: `deliver()`, `folders()`, `messages()`, `sent`
(every message sent, with its MIME, recipients, route and saveToSentItems), `requests` (every
request with its answer), and inject trouble: `fail_next()` (any error for the next N requests
of a mailbox or path), `throttle()` (429 + Retry-After), `unavailable()` (503), `hold()`
(park a mailbox's requests to pin concurrency), `invalidate_delta_tokens()` (410 next round).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import json
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from enum import Enum
from urllib.parse import quote

from aiohttp import web
from yarl import URL

from relay.testing.directory import MAIL_READWRITE, MAIL_SEND, Directory, Mailbox, Tenant
from relay.testing.mailstore import (
    MESSAGE_PROPERTIES,
    Folder,
    FolderExists,
    FolderNotFound,
    InvalidMessageJson,
    ItemNotFound,
    MailStore,
    NewAttachment,
    Removal,
    StoredMessage,
    addressing,
    folder_json,
    graph_time,
    json_attachment,
    message_json,
    mime_from_json,
    new_id,
    parse_headers,
    parse_mime,
)
from relay.testing.tokens import GRAPH_AUDIENCE, Claims, InvalidToken, TokenIssuer, TokenProblem

MAIL_READ = "Mail.Read"  # read-only application permission (reference §2.3)

# -- limits (reference §6.1, §7.1, §7.4) ---------------------------------------------------------
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # "The maximum request length supported is 4MB."
CONCURRENCY_LIMIT = 4  # concurrent requests per app and mailbox; the 5th gets 429
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000
UPLOAD_SESSION_LIFETIME = timedelta(hours=6)

# -- Graph's wording (reference §6.2, §7.3); codes and texts are what clients see --------------
TOKEN_MESSAGES: Mapping[TokenProblem, str] = {
    TokenProblem.EXPIRED: "Lifetime validation failed, the token is expired.",
    TokenProblem.EMPTY: "Access token is empty.",
    TokenProblem.AUDIENCE: "Access token validation failure. Invalid audience.",
    TokenProblem.MALFORMED: "CompactToken parsing failed with error code: 80049217",
}
WWW_AUTHENTICATE = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize",'
    ' client_id="00000003-0000-0000-c000-000000000000"'
)
ACCESS_DENIED = "Access is denied. Check credentials and try again."
INVALID_USER = "The requested user '{upn}' is invalid."
ITEM_NOT_FOUND = "The specified object was not found in the store."
DEFAULT_FOLDER_NOT_FOUND = "Default folder {name} not found."
ID_MALFORMED = "Id is malformed."
INEFFICIENT_FILTER = "The restriction or sort order is too complex for this operation."
FOLDER_EXISTS = (
    "A folder with the specified name already exists., Could not create folder '{name}'."
)
THROTTLED_CONCURRENCY = "Application is over its MailboxConcurrency limit."
INVALID_BASE64 = "Invalid base64 string for MIME content."
# The reference gives this text without a code; the emulator answers ErrorMimeContentInvalid.
MIME_INCOMPLETE = (
    "MIME content does not contain all required information, malformed formatting, or empty."
)
SEND_AS_DENIED = (
    "The user account which was used to submit this request does not have the right to send mail"
    " on behalf of the specified sending account. Cannot submit message."
)
REQUEST_TOO_LARGE = "The maximum request length supported is 4MB."
# Not in the reference; Graph's usual wording for these cases.
NO_RECIPIENTS = "At least one recipient is required, but none were found."
INVALID_JSON = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is"
    " of valid JSON format."
)
UNKNOWN_PROPERTY = "Could not find a property named '{name}' on type 'microsoft.graph.message'."
# The reference names the code (syncStateNotFound) but gives no text.
DELTA_TOKEN_GONE = "The sync state is no longer available; start a new synchronization."


class GraphError(Exception):
    """An error reply: HTTP status, Graph error code and message, extra headers."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        super().__init__(f"{status} {code}: {message}")


def _bad_request(message: str) -> GraphError:
    """A refusal of a request outside what the emulator models; the text says so."""
    return GraphError(400, "BadRequest", f"relay emulator: {message}")


class Need(Enum):
    """What a request needs in the token's roles (app-only) or scopes (delegated)."""

    READ = frozenset({MAIL_READ, MAIL_READWRITE})
    WRITE = frozenset({MAIL_READWRITE})
    SEND = frozenset({MAIL_SEND})


class SendRoute(Enum):
    """How a message was sent."""

    SENDMAIL_MIME = "sendMail (MIME)"
    SENDMAIL_JSON = "sendMail (JSON)"
    DRAFT = "messages/{id}/send"


@dataclass(frozen=True, kw_only=True)
class SentMail:
    """One message Graph accepted for sending, with the MIME exactly as it was received
    (sendMail MIME form) or as Exchange built it (JSON form; drafts with their attachments)."""

    mailbox: str
    mime: bytes
    recipients: tuple[str, ...]  # To, Cc and Bcc addresses: whom Exchange sends it to
    route: SendRoute
    save_to_sent_items: bool
    sent_items_id: str | None  # the copy in Sent Items, if one was kept

    def parsed(self) -> EmailMessage:
        return parse_mime(self.mime)


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    method: str
    path: str
    query: str
    mailbox: str | None
    status: int
    authorization: bool  # whether an Authorization header came with it


@dataclass(kw_only=True)
class Fault:
    status: int
    code: str
    message: str
    retry_after: int | None
    mailbox: str | None
    path: str | None  # a glob on the request path, e.g. "*/sendMail"
    method: str | None
    remaining: int

    def matches(self, method: str, path: str, mailbox: str) -> bool:
        return (
            (self.mailbox is None or self.mailbox.lower() == mailbox)
            and (self.path is None or fnmatch.fnmatchcase(path, self.path))
            and (self.method is None or self.method.upper() == method)
        )


class Hold:
    """Parks a mailbox's admitted requests until `release()`; `arrived(n)` waits for n."""

    def __init__(self) -> None:
        self.waiting = 0
        self._released = asyncio.Event()
        self._changed = asyncio.Condition()

    def __repr__(self) -> str:
        state = "released" if self._released.is_set() else "holding"
        return f"<Hold {state} waiting={self.waiting}>"

    async def arrived(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.waiting >= count)

    def release(self) -> None:
        self._released.set()

    async def park(self) -> None:
        """Called by the service for each admitted request while the hold is in place."""
        async with self._changed:
            self.waiting += 1
            self._changed.notify_all()
        try:
            await self._released.wait()
        finally:
            self.waiting -= 1


@dataclass(frozen=True, kw_only=True)
class _Caller:
    """An authorized request: whose mailbox, with which token."""

    upn: str
    tenant: Tenant
    box: Mailbox
    store: MailStore
    claims: Claims

    @property
    def key(self) -> str:
        return self.box.address.lower()


@dataclass(frozen=True, kw_only=True)
class _UploadSession:
    id: str
    authtoken: str
    mailbox: str
    message_id: str
    name: str
    size: int
    content_type: str
    is_inline: bool
    content_id: str | None
    expires: datetime
    received: bytearray = field(default_factory=bytearray)


# -- query options: $select, $filter, $orderby -------------------------------------------------


@dataclass(frozen=True)
class Clause:
    prop: str
    op: str
    value: object

    def test(self, message: StoredMessage) -> bool:
        actual: object
        if self.prop == "receivedDateTime":
            actual = message.received
        elif self.prop == "isRead":
            actual = message.is_read
        else:
            actual = message.summary.internet_message_id
        return bool(_OPERATORS[self.op](actual, self.value))


_OPERATORS: Mapping[str, Callable[[object, object], object]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,  # type: ignore[operator]
    "ge": lambda a, b: a >= b,  # type: ignore[operator]
    "lt": lambda a, b: a < b,  # type: ignore[operator]
    "le": lambda a, b: a <= b,  # type: ignore[operator]
}
# Which operators the emulator models for each filterable property.
_FILTERABLE: Mapping[str, frozenset[str]] = {
    "receivedDateTime": frozenset({"eq", "gt", "ge", "lt", "le"}),
    "isRead": frozenset({"eq", "ne"}),
    "internetMessageId": frozenset({"eq"}),
}
_CLAUSE = re.compile(
    r"\s*(?P<prop>\w+)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+(?P<value>'(?:[^']|'')*'|[^\s']+)\s*"
    r"(?:\band\b|$)",
    re.IGNORECASE,
)


def _literal(prop: str, text: str) -> object:
    if prop == "receivedDateTime":
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise _bad_request(f"not a DateTimeOffset: {text}") from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if prop == "isRead":
        if text.lower() not in ("true", "false"):
            raise _bad_request(f"not a Boolean: {text}")
        return text.lower() == "true"
    if not (text.startswith("'") and text.endswith("'")):
        raise _bad_request(f"not a string literal: {text}")
    return text[1:-1].replace("''", "'")


def parse_filter(text: str) -> tuple[Clause, ...]:
    """The `$filter` subset the emulator models: clauses joined with `and`."""
    clauses: list[Clause] = []
    pos = 0
    while pos < len(text):
        m = _CLAUSE.match(text, pos)
        if m is None or m.end() == pos:
            raise GraphError(400, "BadRequest", "Invalid filter clause")
        prop, op = m["prop"], m["op"].lower()
        if op not in _FILTERABLE.get(prop, frozenset()):
            raise _bad_request(f"$filter with '{prop} {op}' is not modelled")
        clauses.append(Clause(prop, op, _literal(prop, m["value"])))
        pos = m.end()
    return tuple(clauses)


def parse_orderby(text: str) -> tuple[tuple[str, bool], ...]:
    """`$orderby` as (property, descending) pairs; only receivedDateTime is modelled."""
    out = []
    for item in text.split(","):
        prop, _, direction = item.strip().partition(" ")
        direction = direction.strip().lower() or "asc"
        if prop != "receivedDateTime" or direction not in ("asc", "desc"):
            raise _bad_request(f"$orderby '{item.strip()}' is not modelled")
        out.append((prop, direction == "desc"))
    return tuple(out)


def check_efficient(clauses: tuple[Clause, ...], order: tuple[tuple[str, bool], ...]) -> None:
    """Graph's rule (§7.1): properties in $orderby must come first in $filter, in that order."""
    if not clauses or not order:
        return
    leading = [c.prop for c in clauses[: len(order)]]
    if leading != [prop for prop, _ in order]:
        raise GraphError(400, "InefficientFilter", INEFFICIENT_FILTER)


def parse_select(text: str | None) -> frozenset[str] | None:
    if not text:
        return None
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    for name in sorted(names):
        if name not in MESSAGE_PROPERTIES:
            raise GraphError(400, "RequestBroker--ParseUri", UNKNOWN_PROPERTY.format(name=name))
    return names


def selected(item: dict[str, object], select: frozenset[str] | None) -> dict[str, object]:
    if select is None:
        return item
    return {k: v for k, v in item.items() if k in select or k in ("id", "@odata.etag")}


def _int_option(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise _bad_request(f"{name} must be between {low} and {high}")
    return value


_MAXPAGESIZE = re.compile(r"odata\.maxpagesize\s*=\s*(\d+)", re.IGNORECASE)


def _text_body_preferred(request: web.Request) -> bool:
    return 'outlook.body-content-type="text"' in request.headers.get("Prefer", "").lower()


# -- delta state ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _DeltaQuery:
    mailbox: str
    upn: str
    folder_id: str
    select: frozenset[str] | None
    clauses: tuple[Clause, ...]


@dataclass(frozen=True, kw_only=True)
class _DeltaRound:
    """One delta round's entries, fixed when the round starts, served page by page."""

    query: _DeltaQuery
    entries: tuple[str | Removal, ...]  # message ids, then removals
    watermark: int  # the change number the next round starts after


def _mime_from_base64(body: bytes) -> bytes:
    try:
        mime = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise GraphError(400, "ErrorMimeContentInvalidBase64String", INVALID_BASE64) from None
    if not mime.strip() or not parse_headers(mime).keys():
        raise GraphError(400, "ErrorMimeContentInvalid", MIME_INCOMPLETE)
    return mime


def _json(body: bytes) -> dict[str, object]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GraphError(400, "BadRequest", INVALID_JSON) from None
    if not isinstance(value, dict):
        raise GraphError(400, "BadRequest", INVALID_JSON)
    return value


def _respond(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _as_graph_error(refused: GraphError | web.HTTPException, request: web.Request) -> GraphError:
    """aiohttp's own refusals (no such route, method, body too big) in Graph's words."""
    if isinstance(refused, GraphError):
        return refused
    if isinstance(refused, web.HTTPRequestEntityTooLarge):
        return GraphError(400, "BadRequest", REQUEST_TOO_LARGE)
    if isinstance(refused, web.HTTPNotFound):
        segment = request.path.rstrip("/").rsplit("/", 1)[-1]
        return GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'.")
    if isinstance(refused, web.HTTPMethodNotAllowed):
        return GraphError(405, "BadRequest", f"The HTTP method '{request.method}' is not allowed.")
    return GraphError(refused.status, "BadRequest", refused.reason)


_MAILBOX = web.RequestKey("graph.mailbox", str)  # whose mailbox a request used, for the record

_Handler = Callable[[web.Request, _Caller], Awaitable[web.StreamResponse]]


class GraphService:
    def __init__(
        self,
        directory: Directory,
        issuer: TokenIssuer,
        *,
        concurrency_limit: int = CONCURRENCY_LIMIT,
        throttle_retry_after: int = 1,
    ) -> None:
        self._directory = directory
        self._issuer = issuer
        self.concurrency_limit = concurrency_limit
        self.throttle_retry_after = throttle_retry_after  # seconds, on concurrency 429s
        self.sent: list[SentMail] = []
        self.requests: list[RequestRecord] = []
        self._stores: dict[str, MailStore] = {}
        self._faults: list[Fault] = []
        self._in_flight: Counter[str] = Counter()
        self._holds: dict[str, Hold] = {}
        self._uploads: dict[str, _UploadSession] = {}
        self._delta_tokens: dict[str, tuple[_DeltaQuery, int]] = {}  # -> (query, watermark)
        self._skip_tokens: dict[str, tuple[_DeltaRound, int]] = {}
        self.app = web.Application(
            client_max_size=MAX_REQUEST_BYTES + 1, middlewares=[self._graph_replies]
        )
        self._add_routes()

    def __repr__(self) -> str:
        busy = {k: v for k, v in self._in_flight.items() if v}
        return (
            f"<GraphService mailboxes={len(self._stores)} sent={len(self.sent)} "
            f"in_flight={busy} faults={len(self._faults)}>"
        )

    # -- seeding and inspection -----------------------------------------------------------------

    def store(self, mailbox: str) -> MailStore:
        """The contents of `mailbox`, which must be in the directory."""
        if self._directory.mailbox(mailbox) is None:
            raise KeyError(f"{mailbox} is not a mailbox in the emulator's directory")
        key = mailbox.lower()
        if key not in self._stores:
            self._stores[key] = MailStore(mailbox)
        return self._stores[key]

    def deliver(
        self,
        mailbox: str,
        mime_bytes: bytes,
        folder: str = "inbox",
        *,
        received: datetime | None = None,
        is_read: bool = False,
    ) -> str:
        """Put a message in a folder (id or well-known name), as if it had arrived; its id."""
        store = self.store(mailbox)
        return store.add(store.folder(folder).id, mime_bytes, received=received, is_read=is_read).id

    def folders(self, mailbox: str) -> list[Folder]:
        return list(self.store(mailbox).folders.values())

    def messages(self, mailbox: str, folder: str | None = None) -> list[StoredMessage]:
        """The messages of a mailbox, or of one folder, oldest first."""
        store = self.store(mailbox)
        found = (
            store.in_folder(store.folder(folder).id) if folder else list(store.messages.values())
        )
        return sorted(found, key=lambda m: m.received)

    def fail_next(
        self,
        status: int,
        code: str,
        message: str = "",
        *,
        retry_after: int | None = None,
        mailbox: str | None = None,
        path: str | None = None,
        method: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` matching requests with this error instead."""
        self._faults.append(
            Fault(
                status=status,
                code=code,
                message=message,
                retry_after=retry_after,
                mailbox=mailbox,
                path=path,
                method=method,
                remaining=times,
            )
        )

    def throttle(
        self,
        *,
        retry_after: int = 1,
        mailbox: str | None = None,
        path: str | None = None,
        times: int = 1,
    ) -> None:
        self.fail_next(
            429,
            "ApplicationThrottled",
            THROTTLED_CONCURRENCY,
            retry_after=retry_after,
            mailbox=mailbox,
            path=path,
            times=times,
        )

    def unavailable(
        self,
        *,
        retry_after: int | None = None,
        mailbox: str | None = None,
        path: str | None = None,
        times: int = 1,
    ) -> None:
        self.fail_next(
            503,
            "ServiceUnavailable",
            "Service Unavailable",
            retry_after=retry_after,
            mailbox=mailbox,
            path=path,
            times=times,
        )

    def hold(self, mailbox: str) -> Hold:
        """Park the mailbox's admitted requests until the returned Hold is released."""
        hold = Hold()
        self._holds[mailbox.lower()] = hold
        return hold

    def invalidate_delta_tokens(self, mailbox: str | None = None) -> None:
        """Forget delta and skip tokens (of one mailbox): their next use gets 410 Gone."""

        def dead(query: _DeltaQuery) -> bool:
            return mailbox is None or query.mailbox == mailbox.lower()

        self._delta_tokens = {t: c for t, c in self._delta_tokens.items() if not dead(c[0])}
        self._skip_tokens = {t: p for t, p in self._skip_tokens.items() if not dead(p[0].query)}

    # -- the HTTP plumbing ---------------------------------------------------------------------

    def _add_routes(self) -> None:
        user = "/v1.0/users/{upn}"
        message = user + "/messages/{id}"
        folder = user + "/mailFolders/{folder}"
        g = self._guarded
        self.app.router.add_routes(
            [
                web.post(user + "/sendMail", g(Need.SEND, self._send_mail)),
                web.get(user + "/mailFolders", g(Need.READ, self._list_root_folders)),
                web.post(user + "/mailFolders", g(Need.WRITE, self._create_root_folder)),
                web.get(folder, g(Need.READ, self._get_folder)),
                web.get(folder + "/childFolders", g(Need.READ, self._list_child_folders)),
                web.post(folder + "/childFolders", g(Need.WRITE, self._create_child_folder)),
                web.get(folder + "/messages", g(Need.READ, self._list_messages)),
                web.get(folder + "/messages/delta", g(Need.READ, self._delta)),
                web.get(user + "/messages", g(Need.READ, self._list_messages)),
                web.post(user + "/messages", g(Need.WRITE, self._create_draft)),
                web.get(message, g(Need.READ, self._get_message)),
                web.patch(message, g(Need.WRITE, self._update_message)),
                web.delete(message, g(Need.WRITE, self._delete_message)),
                web.get(message + "/$value", g(Need.READ, self._message_mime)),
                web.post(message + "/move", g(Need.WRITE, self._move_message)),
                web.post(message + "/send", g(Need.SEND, self._send_draft)),
                web.post(message + "/attachments", g(Need.WRITE, self._add_attachment)),
                web.post(
                    message + "/attachments/createUploadSession",
                    g(Need.WRITE, self._create_upload_session),
                ),
                web.put("/api/v2.0/AttachmentSessions/{session}", self._upload_range),
            ]
        )

    @web.middleware
    async def _graph_replies(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Graph's error JSON for every refusal, and request ids on every answer."""
        request_id = str(uuid.uuid4())
        client_request_id = request.headers.get("client-request-id") or request_id
        try:
            if (request.content_length or 0) > MAX_REQUEST_BYTES:
                raise GraphError(400, "BadRequest", REQUEST_TOO_LARGE)
            response = await handler(request)
        except (GraphError, web.HTTPException) as refused:
            response = self._error(_as_graph_error(refused, request), request_id, client_request_id)
        response.headers["request-id"] = request_id
        response.headers["client-request-id"] = client_request_id
        self.requests.append(
            RequestRecord(
                method=request.method,
                path=request.path,
                query=request.query_string,
                mailbox=request.get(_MAILBOX),
                status=response.status,
                authorization="Authorization" in request.headers,
            )
        )
        return response

    @staticmethod
    def _error(error: GraphError, request_id: str, client_request_id: str) -> web.Response:
        body = {
            "error": {
                "code": error.code,
                "message": error.message,
                "innerError": {
                    "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": request_id,
                    "client-request-id": client_request_id,
                },
            }
        }
        return _respond(error.status, body, error.headers)

    def _guarded(
        self, need: Need, handler: _Handler
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            caller = self._authorize(request, need)
            return await self._admit(request, caller.key, lambda: handler(request, caller))

        return run

    def _authorize(self, request: web.Request, need: Need) -> _Caller:
        upn = request.match_info["upn"]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            claims = self._issuer.validate(
                token.strip() if scheme.lower() == "bearer" else "", audience=GRAPH_AUDIENCE
            )
        except InvalidToken as refused:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                TOKEN_MESSAGES[refused.problem],
                headers={"WWW-Authenticate": WWW_AUTHENTICATE},
            ) from None
        # App-only tokens carry application permissions (`roles`); a signed-in user's token
        # carries delegated ones (`scp`) and reaches only that user's own mailbox.
        granted = claims.scopes if claims.upn else claims.roles
        if not need.value & granted:
            raise GraphError(403, "ErrorAccessDenied", ACCESS_DENIED)
        found = self._directory.mailbox(upn)
        if found is None or found[0].tenant_id != claims.tenant_id:
            raise GraphError(404, "ErrorInvalidUser", INVALID_USER.format(upn=upn))
        tenant, box = found
        if claims.upn and claims.upn.lower() != box.address.lower():
            raise GraphError(403, "ErrorAccessDenied", ACCESS_DENIED)
        request[_MAILBOX] = box.address.lower()
        return _Caller(
            upn=upn, tenant=tenant, box=box, store=self.store(box.address), claims=claims
        )

    async def _admit(
        self,
        request: web.Request,
        mailbox: str,
        call: Callable[[], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Injected faults first, then the per-mailbox concurrency limit, then any hold."""
        for fault in self._faults:
            if fault.matches(request.method, request.path, mailbox):
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining]
                headers = (
                    {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                )
                raise GraphError(fault.status, fault.code, fault.message, headers=headers)
        if self._in_flight[mailbox] >= self.concurrency_limit:
            raise GraphError(
                429,
                "ApplicationThrottled",
                THROTTLED_CONCURRENCY,
                headers={"Retry-After": str(self.throttle_retry_after)},
            )
        self._in_flight[mailbox] += 1
        try:
            hold = self._holds.get(mailbox)
            if hold is not None:
                await hold.park()
            return await call()
        finally:
            self._in_flight[mailbox] -= 1

    # -- lookups -------------------------------------------------------------------------------

    @staticmethod
    def _folder(caller: _Caller, ref: str) -> Folder:
        try:
            return caller.store.folder(ref)
        except FolderNotFound as missing:
            if missing.well_known:
                raise GraphError(
                    404, "ErrorItemNotFound", DEFAULT_FOLDER_NOT_FOUND.format(name=ref)
                ) from None
            raise GraphError(404, "ErrorItemNotFound", ITEM_NOT_FOUND) from None

    @staticmethod
    def _message(caller: _Caller, message_id: str) -> StoredMessage:
        if not message_id.startswith("AAMk"):
            raise GraphError(400, "ErrorInvalidIdMalformed", ID_MALFORMED)
        try:
            return caller.store.get(message_id)
        except ItemNotFound:
            raise GraphError(404, "ErrorItemNotFound", ITEM_NOT_FOUND) from None

    @staticmethod
    def _base(request: web.Request) -> str:
        return f"{request.url.origin()}/v1.0"

    def _message_body(self, request: web.Request, message: StoredMessage) -> dict[str, object]:
        return message_json(message, text_body=_text_body_preferred(request))

    def _message_response(
        self, request: web.Request, caller: _Caller, message: StoredMessage, status: int = 200
    ) -> web.Response:
        body: dict[str, object] = {
            "@odata.context": f"{self._base(request)}/$metadata#users('{quote(caller.upn)}')"
            "/messages/$entity",
            **self._message_body(request, message),
        }
        headers = (
            {"Preference-Applied": 'outlook.body-content-type="text"'}
            if _text_body_preferred(request)
            else {}
        )
        return _respond(status, body, headers)

    # -- sending -------------------------------------------------------------------------------

    def _submit(self, caller: _Caller, mime: bytes, route: SendRoute, *, save: bool) -> None:
        """Check a message as Exchange does before the 202, then record it as sent."""
        sender, recipients = addressing(mime)
        if not recipients:
            raise GraphError(400, "ErrorInvalidRecipients", NO_RECIPIENTS)
        if sender is not None and not caller.box.may_send_as(sender.address):
            raise GraphError(403, "ErrorSendAsDenied", SEND_AS_DENIED)
        copy = None
        if save:
            store = caller.store
            copy = store.add(store.folder("sentitems").id, mime, is_read=True).id
        self.sent.append(
            SentMail(
                mailbox=caller.box.address,
                mime=mime,
                recipients=tuple(r.address for r in recipients),
                route=route,
                save_to_sent_items=save,
                sent_items_id=copy,
            )
        )

    async def _send_mail(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        body = await request.read()
        if request.content_type == "text/plain":
            # The MIME form has no place for saveToSentItems: always saved (§6.1).
            self._submit(caller, _mime_from_base64(body), SendRoute.SENDMAIL_MIME, save=True)
        elif request.content_type == "application/json":
            payload = _json(body)
            message, save = payload.get("message"), payload.get("saveToSentItems", True)
            if not isinstance(message, dict) or not isinstance(save, bool):
                raise GraphError(
                    400, "ErrorInvalidRequest", "Empty Payload. JSON content expected."
                )
            mime = self._mime_from_json(message, caller)
            self._submit(caller, mime, SendRoute.SENDMAIL_JSON, save=save)
        else:
            raise _bad_request(
                f"sendMail takes text/plain or application/json, not {request.content_type}"
            )
        return web.Response(status=202)

    @staticmethod
    def _mime_from_json(message: Mapping[str, object], caller: _Caller) -> bytes:
        try:
            return mime_from_json(message, mailbox=caller.box.address)
        except InvalidMessageJson as invalid:
            raise GraphError(400, "ErrorInvalidRequest", str(invalid)) from None

    async def _create_draft(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        body = await request.read()
        if request.content_type == "text/plain":
            mime = _mime_from_base64(body)
        else:
            mime = self._mime_from_json(_json(body), caller)
        store = caller.store
        draft = store.add(store.folder("drafts").id, mime, is_read=True, is_draft=True)
        return self._message_response(request, caller, draft, 201)

    async def _send_draft(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        draft = self._message(caller, request.match_info["id"])
        # A sent draft always lands in Sent Items: this action has no saveToSentItems.
        self._submit(caller, draft.mime, SendRoute.DRAFT, save=True)
        caller.store.remove(draft.id)
        return web.Response(status=202)

    async def _add_attachment(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        message = self._message(caller, request.match_info["id"])
        item = _json(await request.read())
        if item.get("@odata.type") != "#microsoft.graph.fileAttachment":
            raise _bad_request("only #microsoft.graph.fileAttachment is modelled")
        try:
            attachment = json_attachment(item)
        except InvalidMessageJson as invalid:
            raise GraphError(400, "ErrorInvalidRequest", str(invalid)) from None
        message.attach(attachment)
        caller.store.touch(message)
        attachment_id = new_id("AAMkAGAtt")
        return _respond(
            201,
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "id": attachment_id,
                "name": attachment.name,
                "contentType": attachment.content_type,
                "size": len(attachment.content),
                "isInline": attachment.is_inline,
                "contentId": attachment.content_id,
                "lastModifiedDateTime": graph_time(datetime.now(UTC)),
            },
        )

    async def _create_upload_session(
        self, request: web.Request, caller: _Caller
    ) -> web.StreamResponse:
        message = self._message(caller, request.match_info["id"])
        payload = _json(await request.read())
        item = payload.get("AttachmentItem") or payload.get("attachmentItem")
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem with a name is required.")
        size = item.get("size")
        if not isinstance(size, int) or size <= 0:
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem.size must be positive.")
        content_id = item.get("contentId")
        session = _UploadSession(
            id=new_id("AAMkAGUp"),
            authtoken=secrets.token_urlsafe(24),
            mailbox=caller.key,
            message_id=message.id,
            name=item["name"],
            size=size,
            content_type=str(item.get("contentType") or "application/octet-stream"),
            is_inline=bool(item.get("isInline", False)),
            content_id=str(content_id) if content_id else None,
            expires=datetime.now(UTC) + UPLOAD_SESSION_LIFETIME,
        )
        self._uploads[session.id] = session
        url = request.url.origin().with_path(f"/api/v2.0/AttachmentSessions/{session.id}")
        return _respond(
            201,
            {
                "@odata.context": f"{self._base(request)}/$metadata#microsoft.graph.uploadSession",
                "uploadUrl": str(url.with_query({"authtoken": session.authtoken})),
                "expirationDateTime": graph_time(session.expires),
                "nextExpectedRanges": ["0-"],
            },
        )

    async def _upload_range(self, request: web.Request) -> web.StreamResponse:
        """A PUT of one byte range to an upload URL, which is pre-authenticated (§6.1)."""
        session = self._uploads.get(request.match_info["session"])
        if session is None or request.query.get("authtoken") != session.authtoken:
            raise GraphError(404, "ErrorItemNotFound", ITEM_NOT_FOUND)
        request[_MAILBOX] = session.mailbox
        if "Authorization" in request.headers:
            raise _bad_request("an upload URL is pre-authenticated; send no Authorization header")
        return await self._admit(
            request, session.mailbox, lambda: self._store_range(request, session)
        )

    async def _store_range(
        self, request: web.Request, session: _UploadSession
    ) -> web.StreamResponse:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", request.headers.get("Content-Range", ""))
        if m is None:
            raise _bad_request("Content-Range: bytes start-end/total is required")
        start, end, total = (int(g) for g in m.groups())
        chunk = await request.read()
        if total != session.size or start != len(session.received) or end - start + 1 != len(chunk):
            raise _bad_request(
                f"expected bytes {len(session.received)}-…/{session.size} matching the body,"
                f" got {m.group(0)} with {len(chunk)} bytes"
            )
        session.received.extend(chunk)
        if len(session.received) < session.size:
            return _respond(
                200,
                {
                    "expirationDateTime": graph_time(session.expires),
                    "nextExpectedRanges": [f"{len(session.received)}-"],
                },
            )
        del self._uploads[session.id]
        store = self._stores[session.mailbox]
        try:
            message = store.get(session.message_id)
        except ItemNotFound:
            raise GraphError(404, "ErrorItemNotFound", ITEM_NOT_FOUND) from None
        attachment = NewAttachment(
            name=session.name,
            content_type=session.content_type,
            content=bytes(session.received),
            is_inline=session.is_inline,
            content_id=session.content_id,
        )
        message.attach(attachment)
        store.touch(message)
        location = request.url.origin().with_path(
            f"/v1.0/users('{store.address}')/messages('{message.id}')"
            f"/attachments('{new_id('AAMkAGAtt')}')"
        )
        return web.Response(status=201, headers={"Location": str(location)})

    # -- folders -------------------------------------------------------------------------------

    def _folder_list(
        self, request: web.Request, caller: _Caller, folders: list[Folder]
    ) -> web.Response:
        query = request.query
        wanted = query.get("$filter")
        if wanted:
            m = re.fullmatch(r"\s*displayName\s+eq\s+'((?:[^']|'')*)'\s*", wanted)
            if m is None:
                raise _bad_request("childFolders $filter models only displayName eq '…'")
            name = m.group(1).replace("''", "'")
            folders = [f for f in folders if f.display_name.lower() == name.lower()]
        return self._page(request, [folder_json(caller.store, f) for f in folders], "mailFolders")

    async def _list_root_folders(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        root = caller.store.folder("msgfolderroot")
        return self._folder_list(request, caller, caller.store.children(root.id))

    async def _list_child_folders(
        self, request: web.Request, caller: _Caller
    ) -> web.StreamResponse:
        parent = self._folder(caller, request.match_info["folder"])
        return self._folder_list(request, caller, caller.store.children(parent.id))

    async def _get_folder(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        folder = self._folder(caller, request.match_info["folder"])
        return _respond(200, folder_json(caller.store, folder))

    async def _create_folder(
        self, request: web.Request, caller: _Caller, parent: Folder
    ) -> web.Response:
        payload = _json(await request.read())
        name = payload.get("displayName")
        if not isinstance(name, str) or not name.strip():
            raise GraphError(400, "ErrorInvalidRequest", "displayName is required.")
        try:
            folder = caller.store.create_folder(
                parent.id, name, hidden=bool(payload.get("isHidden"))
            )
        except FolderExists:
            raise GraphError(409, "ErrorFolderExists", FOLDER_EXISTS.format(name=name)) from None
        return _respond(201, folder_json(caller.store, folder))

    async def _create_root_folder(
        self, request: web.Request, caller: _Caller
    ) -> web.StreamResponse:
        return await self._create_folder(request, caller, caller.store.folder("msgfolderroot"))

    async def _create_child_folder(
        self, request: web.Request, caller: _Caller
    ) -> web.StreamResponse:
        parent = self._folder(caller, request.match_info["folder"])
        return await self._create_folder(request, caller, parent)

    # -- messages ------------------------------------------------------------------------------

    def _page(
        self, request: web.Request, items: list[dict[str, object]], what: str
    ) -> web.Response:
        """One page of `items` per $top/$skip, with an absolute nextLink when more remain."""
        top = _int_option(request.query, "$top", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        skip = _int_option(request.query, "$skip", 0, 0, 2**31)
        body: dict[str, object] = {
            "@odata.context": f"{self._base(request)}/$metadata#{what}",
            "value": items[skip : skip + top],
        }
        if skip + top < len(items):
            body["@odata.nextLink"] = str(request.url.update_query({"$skip": str(skip + top)}))
        return _respond(200, body)

    async def _list_messages(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        query = request.query
        ref = request.match_info.get("folder")
        found = (
            caller.store.in_folder(self._folder(caller, ref).id)
            if ref
            else list(caller.store.messages.values())
        )
        select = parse_select(query.get("$select"))
        clauses = parse_filter(query.get("$filter", ""))
        order = parse_orderby(query["$orderby"]) if "$orderby" in query else ()
        check_efficient(clauses, order)
        found = [m for m in found if all(c.test(m) for c in clauses)]
        found.sort(key=lambda m: m.received, reverse=order[0][1] if order else True)
        items = [selected(self._message_body(request, m), select) for m in found]
        return self._page(request, items, "messages")

    async def _get_message(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        message = self._message(caller, request.match_info["id"])
        select = parse_select(request.query.get("$select"))
        return _respond(200, selected(self._message_body(request, message), select))

    async def _message_mime(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        message = self._message(caller, request.match_info["id"])
        return web.Response(body=message.mime, content_type="text/plain")

    async def _update_message(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        message = self._message(caller, request.match_info["id"])
        changes = _json(await request.read())
        unknown = sorted(set(changes) - {"isRead"})
        if unknown:
            raise _bad_request(f"PATCH of {', '.join(unknown)} is not modelled; only isRead")
        if "isRead" in changes:
            if not isinstance(changes["isRead"], bool):
                raise GraphError(400, "ErrorInvalidRequest", "isRead must be a Boolean.")
            message.is_read = changes["isRead"]
            caller.store.touch(message)
        return self._message_response(request, caller, message)

    async def _move_message(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        message = self._message(caller, request.match_info["id"])
        destination = _json(await request.read()).get("destinationId")
        if not isinstance(destination, str):
            raise GraphError(400, "ErrorInvalidRequest", "destinationId is required.")
        folder = self._folder(caller, destination)
        moved = caller.store.move(message.id, folder.id)
        return self._message_response(request, caller, moved, 201)

    async def _delete_message(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        message = self._message(caller, request.match_info["id"])
        caller.store.remove(message.id)
        return web.Response(status=204)

    # -- delta ---------------------------------------------------------------------------------

    async def _delta(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        query = request.query
        folder = self._folder(caller, request.match_info["folder"])
        fresh = request.url.origin().with_path(
            f"/v1.0/users/{caller.upn}/mailFolders/{folder.id}/messages/delta"
        )
        gone = GraphError(
            410, "syncStateNotFound", DELTA_TOKEN_GONE, headers={"Location": str(fresh)}
        )
        if "$skiptoken" in query:
            found = self._skip_tokens.get(query["$skiptoken"])
            if found is None or found[0].query.folder_id != folder.id:
                raise gone
            delta_round, offset = found
        elif "$deltatoken" in query:
            cursor = self._delta_tokens.get(query["$deltatoken"])
            if cursor is None or cursor[0].folder_id != folder.id:
                raise gone
            previous, since = cursor
            changed, removed = caller.store.changes(folder.id, since)
            changed = [m for m in changed if all(c.test(m) for c in previous.clauses)]
            delta_round = _DeltaRound(
                query=previous,
                entries=(*removed, *(m.id for m in changed)),
                watermark=caller.store.seq,
            )
            offset = 0
        else:
            clauses = parse_filter(query.get("$filter", ""))
            if any(c.prop != "receivedDateTime" or c.op not in ("ge", "gt") for c in clauses):
                raise _bad_request("delta $filter takes only receivedDateTime ge|gt (§7.1)")
            order = parse_orderby(query["$orderby"]) if "$orderby" in query else None
            if order not in (None, (("receivedDateTime", True),)):
                raise _bad_request("delta $orderby takes only receivedDateTime desc (§7.1)")
            delta_query = _DeltaQuery(
                mailbox=caller.key,
                upn=caller.upn,
                folder_id=folder.id,
                select=parse_select(query.get("$select")),
                clauses=clauses,
            )
            contents = [
                m for m in caller.store.in_folder(folder.id) if all(c.test(m) for c in clauses)
            ]
            contents.sort(key=lambda m: m.received, reverse=True)
            delta_round = _DeltaRound(
                query=delta_query, entries=tuple(m.id for m in contents), watermark=caller.store.seq
            )
            offset = 0
        return self._delta_page(request, caller, fresh, delta_round, offset)

    def _delta_page(
        self,
        request: web.Request,
        caller: _Caller,
        fresh: URL,
        delta_round: _DeltaRound,
        offset: int,
    ) -> web.Response:
        prefer = _MAXPAGESIZE.search(request.headers.get("Prefer", ""))
        size = (
            int(prefer.group(1))
            if prefer
            else _int_option(request.query, "$top", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        )
        size = max(1, min(size, MAX_PAGE_SIZE))
        value: list[dict[str, object]] = []
        for entry in delta_round.entries[offset : offset + size]:
            if isinstance(entry, Removal):
                value.append(
                    {
                        "@odata.type": "#microsoft.graph.message",
                        "id": entry.id,
                        "@removed": {"reason": "deleted"},
                    }
                )
                continue
            message = caller.store.messages.get(entry)
            if message is None or message.folder_id != delta_round.query.folder_id:
                continue  # gone since the round began; the next round reports it
            item = selected(self._message_body(request, message), delta_round.query.select)
            value.append({"@odata.type": "#microsoft.graph.message", **item})
        body: dict[str, object] = {
            "@odata.context": f"{self._base(request)}/$metadata#Collection(message)",
            "value": value,
        }
        token = secrets.token_urlsafe(32)
        if offset + size < len(delta_round.entries):
            self._skip_tokens[token] = (delta_round, offset + size)
            body["@odata.nextLink"] = f"{fresh}?$skiptoken={token}"
        else:
            self._delta_tokens[token] = (delta_round.query, delta_round.watermark)
            body["@odata.deltaLink"] = f"{fresh}?$deltatoken={token}"
        headers = {"Preference-Applied": f"odata.maxpagesize={size}"} if prefer else {}
        return _respond(200, body, headers)
