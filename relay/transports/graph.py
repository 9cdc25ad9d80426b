"""Microsoft Graph sendMail to Exchange Online: one HTTPS request per message, or a draft with
its attachments uploaded for a message too big for one request.

Takes an `OutgoingMessage` (envelope + bytes) and gives back `Delivered` for every envelope
recipient (Graph takes or refuses a message as a whole, `202 Accepted`), or raises:

  * `TemporaryFailure` for throttling (429) and service trouble (5xx), with `retry_after` from
    Graph's Retry-After; `UpstreamUnavailable` / `UpstreamTimeout` for network errors and
    timeouts (every aiohttp exception is mapped by `relay.graphapi.map_http_error`, and by
    nothing else);
  * `TokenRejected` when Graph refuses the token twice (401) or the app lacks the permission
    (403 ErrorAccessDenied), and `TemporaryFailure` when the mailbox itself is unknown: the fix
    is an operator's, so the mail waits;
  * `PermanentFailure` for the other 4xx answers, which are about the message (send-as denied,
    malformed MIME, too big): `Reply(554, "5.7.1", "Graph 403 ErrorSendAsDenied: …")`.

How a message goes (reference §6.1):
  1. Graph sends to the recipients named in the MIME headers, not to an envelope. Envelope
     recipients missing from To/Cc/Bcc are added as a Bcc header; the body bytes are untouched.
     (Header recipients that are not in the envelope still get the message: Graph has no way to
     leave them out, so a route should not split a message's recipients across transactions.)
  2. With `save_to_sent_items` (the default): sendMail with the base64 MIME when the request
     fits in 4 MB. With `save_to_sent_items: false`: sendMail's JSON form, the only one that can
     say saveToSentItems=false; it rebuilds the message from its parts (see
     `graph_save_to_sent_items_note`, which `relay check` prints).
  3. Bigger: a draft from the MIME without its largest attachments, those attachments added
     (`POST …/attachments` under 3 MB, an upload session of ≤ 4 MB ranges above), then
     `POST …/messages/{id}/send`. Exchange keeps a sent draft in Sent Items whatever the route
     says. A draft left by a failed attempt is deleted (best effort).

Inside one attempt (`relay.graphapi.GraphClient`): a 401 is retried once with a fresh token, and
a 429 or 503 whose Retry-After is at most `MAX_RETRY_WAIT` is waited out up to
`THROTTLE_RETRIES` times (so a draft is not abandoned halfway for a short wait); a longer or
repeated one ends the attempt with `TemporaryFailure(retry_after=…)` for the scheduler. At most
`max_concurrency` requests are in flight per transport, that is per mailbox (Graph allows 4; the
5th gets 429).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses
from enum import Enum
from urllib.parse import quote

import aiohttp

from relay.config import RouteConfig
from relay.config import Transport as TransportKind
from relay.errors import DeliveryError, PermanentFailure, TemporaryFailure, TokenRejected
from relay.graphapi import TIMEOUT, Answer, GraphClient, error_of, is_retryable, retry_after_seconds
from relay.headerblock import HeaderBlock, fold
from relay.identity import TokenProvider
from relay.reply import Reply
from relay.transports import Delivered, OutgoingMessage

log = logging.getLogger("relay.transports.graph")

MAX_REQUEST_BYTES = 4_000_000  # Graph refuses request bodies over "4MB" (§6.1); kept decimal
UPLOAD_SESSION_MIN = 3_000_000  # attachments this big go through an upload session (§6.1)
UPLOAD_CHUNK = 3 * 1024 * 1024  # bytes per PUT to an upload URL; Graph takes up to 4 MB

# MIME parsed and written back with CRLF and without refolding the headers it came with.
_MIME_POLICY = policy.SMTP.clone(refold_source="none")

# Graph codes meaning the message cannot be sent as it is, with their RFC 3463 status.
_PERMANENT_STATUS: Mapping[str, str] = {
    "ErrorSendAsDenied": "5.7.1",
    "ErrorMimeContentInvalidBase64String": "5.6.0",
    "ErrorMimeContentInvalid": "5.6.0",
    "ErrorInvalidRecipients": "5.1.3",
    "RequestEntityTooLarge": "5.3.4",
}
# Graph codes about the mailbox or account, not the message: the mail waits for an operator.
_MAILBOX_PROBLEMS = frozenset({"ErrorInvalidUser", "MailboxNotEnabledForRESTAPI"})


def graph_failure(status: int, body: bytes, retry_after: str | None) -> DeliveryError:
    """What a non-2xx Graph answer means for the message (see the module docstring)."""
    code, message = error_of(body)
    text = Answer(status, body, retry_after).describe()
    if is_retryable(status):
        reply = Reply(451, "4.3.2" if status == 429 else "4.3.0", text)
        return TemporaryFailure(reply, retry_after=retry_after_seconds(retry_after))
    if status == 401 or code == "ErrorAccessDenied":
        return TokenRejected(Reply(454, "4.7.0", text))
    if code in _MAILBOX_PROBLEMS or code == "ErrorItemNotFound":
        # ErrorItemNotFound can only be our own draft vanishing mid-attempt: try again.
        return TemporaryFailure(Reply(451, "4.3.0", text))
    if status == 413 or "maximum request length" in message:
        return PermanentFailure(Reply(552, "5.3.4", text))
    if 400 <= status < 500:
        return PermanentFailure(Reply(554, _PERMANENT_STATUS.get(code, "5.0.0"), text))
    return TemporaryFailure(Reply(451, "4.3.0", f"Graph answered {status} unexpectedly"))


# -- the message: pure functions ---------------------------------------------------------------


def with_envelope_bcc(data: bytes, rcpt_tos: Sequence[str]) -> bytes:
    """`data` with the envelope recipients missing from To/Cc/Bcc added to Bcc.

    Only the header block changes (the Bcc field is added, or rewritten to hold the new
    addresses as well); every other field and the body keep their bytes.
    """
    block = HeaderBlock.parse(data)
    named = {
        address.lower()
        for f in block.fields
        if f.name in ("to", "cc", "bcc")
        for _, address in getaddresses([f.text()])
    }
    missing = list(dict.fromkeys(r for r in rcpt_tos if r.lower() not in named))
    if not missing:
        return data
    old = block.get_all("bcc")
    value = ", ".join([*(f.text() for f in old if f.text()), *missing])
    bcc = fold("Bcc", value, block.eol)
    fields = [f for f in block.fields if f.name != "bcc"]
    if old:
        fields.insert(block.fields.index(old[0]), bcc)
    else:
        fields.append(bcc)
    block = dataclasses.replace(block.with_fields(fields), separator=block.separator or block.eol)
    return block.to_bytes()


def _parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=_MIME_POLICY).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def _is_attachment(part: Message) -> bool:
    """A leaf that is not body text: a file, an inline image, anything not text."""
    return (
        part.get_content_disposition() == "attachment"
        or part.get_filename() is not None
        or part.get("content-id") is not None
        or part.get_content_maintype() != "text"
    )


def _attachment_parts(message: Message) -> list[Message]:
    return [p for p in message.walk() if not p.is_multipart() and _is_attachment(p)]


def _text(part: Message) -> str:
    """A text part's content; undecodable bytes (an unknown charset) become U+FFFD."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, ValueError):
        raw = part.get_payload(decode=True)
        content = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    return content if isinstance(content, str) else ""


@dataclass(frozen=True, kw_only=True)
class Attachment:
    """An attachment as Graph takes it (a `fileAttachment` / an upload session's item)."""

    name: str
    content_type: str
    content: bytes
    is_inline: bool
    content_id: str | None

    @classmethod
    def of(cls, part: Message) -> Attachment:
        content = part.get_payload(decode=True)
        content_id = str(part.get("content-id", "")).strip().strip("<>") or None
        return cls(
            name=part.get_filename() or "attachment",
            content_type=part.get_content_type(),
            content=content if isinstance(content, bytes) else b"",
            is_inline=part.get_content_disposition() != "attachment" and content_id is not None,
            content_id=content_id,
        )

    def item(self) -> dict[str, object]:
        """The properties Graph takes for an attachment, without its bytes."""
        out: dict[str, object] = {
            "name": self.name,
            "contentType": self.content_type,
            "isInline": self.is_inline,
        }
        if self.content_id:
            out["contentId"] = self.content_id
        return out

    def file_attachment(self) -> dict[str, object]:
        return {
            "@odata.type": "#microsoft.graph.fileAttachment",
            **self.item(),
            "contentBytes": base64.b64encode(self.content).decode("ascii"),
        }


def _recipients(message: Message, name: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for header in message.get_all(name, []):
        try:
            addresses = header.addresses
        except (AttributeError, ValueError):
            continue
        out += [
            {"emailAddress": {"name": a.display_name, "address": a.addr_spec}}
            for a in addresses
            if a.addr_spec
        ]
    return out


def graph_json_message(data: bytes) -> dict[str, object]:
    """The message in Graph's JSON form: subject, addresses, importance, one body (HTML when
    there is one) and every attachment. Other headers have no place in it."""
    message = _parse(data)
    body = message.get_body(preferencelist=("html", "plain"))
    out: dict[str, object] = {
        "subject": str(message.get("subject", "")),
        "body": {
            "contentType": "html"
            if body is not None and body.get_content_subtype() == "html"
            else "text",
            "content": _text(body) if body is not None else "",
        },
        "toRecipients": _recipients(message, "to"),
        "ccRecipients": _recipients(message, "cc"),
        "bccRecipients": _recipients(message, "bcc"),
        "replyTo": _recipients(message, "reply-to"),
        "attachments": [
            Attachment.of(p).file_attachment() for p in _attachment_parts(message) if p is not body
        ],
    }
    sender = _recipients(message, "from")
    if sender:
        out["from"] = sender[0]
    importance = str(message.get("importance", "")).strip().lower()
    if importance in ("high", "low"):
        out["importance"] = importance
    return out


@dataclass(frozen=True, kw_only=True)
class DraftPlan:
    mime: bytes  # the message without `attachments`, small enough for one request
    attachments: tuple[Attachment, ...]


def plan_draft(data: bytes) -> DraftPlan:
    """Take the largest attachments out of the MIME until its base64 fits in one request."""
    message = _parse(data)
    parts = [p for p in _attachment_parts(message) if p is not message]
    parts.sort(key=lambda p: len(str(p.get_payload())), reverse=True)  # encoded size
    taken: list[Attachment] = []
    mime = data
    for part in parts:
        if len(mime) * 4 // 3 + 4 <= MAX_REQUEST_BYTES:
            break
        taken.append(Attachment.of(part))
        for container in message.walk():
            payload = container.get_payload() if container.is_multipart() else None
            if isinstance(payload, list) and any(p is part for p in payload):
                container.set_payload([p for p in payload if p is not part])
                break
        mime = message.as_bytes()
    if len(mime) * 4 // 3 + 4 > MAX_REQUEST_BYTES:
        raise PermanentFailure(
            Reply(552, "5.3.4", "message text too large for Graph: over 3 MB without attachments")
        )
    return DraftPlan(mime=mime, attachments=tuple(taken))


def graph_save_to_sent_items_note(route: RouteConfig) -> str | None:
    """What `relay check` tells about a graph route's save_to_sent_items, or None."""
    if route.transport is not TransportKind.GRAPH or route.save_to_sent_items:
        return None
    return (
        f"route {route.name}: save_to_sent_items: false makes relay use Graph's JSON sendMail,"
        " which rebuilds the message from its parts: subject, addresses, importance, one body"
        " (HTML when there is one) and the attachments go through; other headers (Message-ID,"
        " References, X-...) and a plain-text alternative do not. A message too big for one request"
        " (about 3 MB) is sent as a draft, and Exchange keeps those in Sent Items regardless."
    )


# -- the transport -----------------------------------------------------------------------------


class TransportState(Enum):
    OPEN = "open"
    CLOSED = "closed"


JSON = "application/json"
TEXT = "text/plain"


class GraphTransport:
    def __init__(
        self,
        *,
        mailbox: str,
        graph_url: str,
        tokens: TokenProvider,
        ssl_context: ssl.SSLContext | None,
        save_to_sent_items: bool,
        max_concurrency: int = 4,
        session: aiohttp.ClientSession | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.mailbox = mailbox
        self.save_to_sent_items = save_to_sent_items
        self._graph = GraphClient(
            mailbox=mailbox,
            graph_url=graph_url,
            tokens=tokens,
            ssl_context=ssl_context,
            max_concurrency=max_concurrency,
            session=session,
            timeout=timeout,
        )
        self.state = TransportState.OPEN

    def __repr__(self) -> str:
        return (
            f"<GraphTransport {self.mailbox} in_flight={self._graph.in_flight}/{self._graph.limit}"
            f" save_to_sent_items={self.save_to_sent_items} {self.state.value}>"
        )

    async def __aenter__(self) -> GraphTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.state = TransportState.CLOSED
        await self._graph.aclose()

    async def send(self, message: OutgoingMessage) -> Delivered:
        if self.state is TransportState.CLOSED:
            raise RuntimeError(f"GraphTransport for {self.mailbox} is closed")
        data = with_envelope_bcc(message.data, message.rcpt_tos)
        how = await self._deliver(data)
        log.debug("graph %s: %s sent by %s", self.mailbox, message.qid, how)
        return Delivered(
            reply=Reply(250, "2.0.0", f"Graph 202 Accepted ({how})"), accepted=message.rcpt_tos
        )

    async def _deliver(self, data: bytes) -> str:
        fits = len(data) * 4 // 3 + 4 <= MAX_REQUEST_BYTES
        if fits and not self.save_to_sent_items:
            request = {"message": graph_json_message(data), "saveToSentItems": False}
            payload = json.dumps(request).encode()
            if len(payload) <= MAX_REQUEST_BYTES:
                await self._call("POST", self._url("/sendMail"), payload, JSON)
                return "sendMail, JSON"
        if fits:
            await self._call("POST", self._url("/sendMail"), base64.b64encode(data), TEXT)
            return "sendMail"
        plan = await asyncio.to_thread(plan_draft, data)  # parsing 30 MB would stall the loop
        await self._send_draft(plan)
        return f"draft with {len(plan.attachments)} attachment(s) added"

    async def _send_draft(self, plan: DraftPlan) -> None:
        created = await self._call(
            "POST", self._url("/messages"), base64.b64encode(plan.mime), TEXT
        )
        draft = self._url(f"/messages/{quote(created.field('id'), safe='')}")
        try:
            for attachment in plan.attachments:
                if len(attachment.content) >= UPLOAD_SESSION_MIN:
                    await self._upload(draft, attachment)
                else:
                    body = json.dumps(attachment.file_attachment()).encode()
                    await self._call("POST", f"{draft}/attachments", body, JSON)
            await self._call("POST", f"{draft}/send", b"", None)
        except BaseException:
            await asyncio.shield(self._discard(draft))
            raise

    async def _upload(self, draft: str, attachment: Attachment) -> None:
        size = len(attachment.content)
        item = {"attachmentType": "file", **attachment.item(), "size": size}
        request = json.dumps({"AttachmentItem": item}).encode()
        upload_url = (
            await self._call("POST", f"{draft}/attachments/createUploadSession", request, JSON)
        ).field("uploadUrl")
        for start in range(0, size, UPLOAD_CHUNK):
            chunk = attachment.content[start : start + UPLOAD_CHUNK]
            end = start + len(chunk) - 1
            await self._call(
                "PUT",
                upload_url,
                chunk,
                "application/octet-stream",
                authorized=False,  # the upload URL is pre-authenticated (§6.1)
                headers={"Content-Range": f"bytes {start}-{end}/{size}"},
            )

    async def _discard(self, draft: str) -> None:
        try:
            answer = await self._graph.once("DELETE", draft, b"", None)
        except DeliveryError as failed:
            log.warning("graph %s: could not delete an unsent draft: %s", self.mailbox, failed)
            return
        if answer.status not in (204, 404):  # 404: it was sent after all, or is gone
            log.warning(
                "graph %s: deleting an unsent draft answered %d", self.mailbox, answer.status
            )

    def _url(self, path: str) -> str:
        return self._graph.user_url + path

    async def _call(
        self,
        method: str,
        url: str,
        body: bytes,
        content_type: str | None,
        *,
        authorized: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One Graph request (with the client's retries); a refusal raises what it means."""
        answer = await self._graph.request(
            method, url, body, content_type, authorized=authorized, headers=headers
        )
        if answer.status >= 300:
            raise graph_failure(answer.status, answer.body, answer.retry_after)
        return answer
