"""Mailbox contents behind the emulated Graph API: folders, messages with their MIME, and the
change log that delta queries read.

One `MailStore` per mailbox. Messages keep the exact MIME they were delivered or sent with;
the JSON fields Graph shows (subject, from, recipients, preview...) are derived from it. Every
change (new, updated, moved, deleted) takes the next number of the mailbox's change sequence, so
a delta round is "everything in this folder changed after number N" plus the removals after N.

Nothing here does I/O. Lookups raise `ItemNotFound`, `FolderNotFound` or `FolderExists`; the
HTTP layer (`relay.testing.graph`) turns them into Graph's error replies.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import format_datetime, make_msgid

# Parse and write MIME with CRLF, never refolding headers that came from the source.
MIME_POLICY = policy.SMTP.clone(refold_source="none")

# The folders every Exchange Online mailbox has, by well-known name (reference §7.1).
DEFAULT_FOLDERS: Mapping[str, str] = {
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "archive": "Archive",
    "junkemail": "Junk Email",
    "outbox": "Outbox",
    "conversationhistory": "Conversation History",
}
ROOT = "msgfolderroot"
# Names Graph accepts for /mailFolders/{name} and destinationId, case-insensitively (§7.1).
WELL_KNOWN_NAMES = frozenset(
    {
        ROOT,
        *DEFAULT_FOLDERS,
        "clutter",
        "conflicts",
        "localfailures",
        "scheduled",
        "searchfolders",
        "serverfailures",
        "syncissues",
        "recoverableitemsdeletions",
    }
)

PREVIEW_LENGTH = 255  # bodyPreview is the first 255 characters of the body text


class ItemNotFound(Exception):
    """No message with that id in this mailbox."""


class FolderNotFound(Exception):
    """No folder with that id, or a well-known folder this mailbox does not have."""

    def __init__(self, ref: str, *, well_known: bool) -> None:
        self.ref = ref
        self.well_known = well_known
        super().__init__(ref)


class FolderExists(Exception):
    """A sibling folder already has that display name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)


def new_id(prefix: str = "AAMkAG") -> str:
    """An opaque id in the shape of Exchange's (URL-safe base64 with padding)."""
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(45)).decode()


def graph_time(when: datetime) -> str:
    """Graph's DateTimeOffset form: UTC, seconds, `Z`."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Folder:
    id: str
    display_name: str
    parent_id: str  # "" for the root
    well_known: str | None = None
    is_hidden: bool = False


@dataclass(frozen=True, kw_only=True)
class Recipient:
    name: str
    address: str

    def json(self) -> dict[str, object]:
        return {"emailAddress": {"name": self.name or self.address, "address": self.address}}


@dataclass(frozen=True, kw_only=True)
class MimeSummary:
    """What Graph shows of a message, read from its MIME once."""

    subject: str
    sender: Recipient | None
    to: tuple[Recipient, ...]
    cc: tuple[Recipient, ...]
    bcc: tuple[Recipient, ...]
    reply_to: tuple[Recipient, ...]
    internet_message_id: str
    sent: datetime | None
    has_attachments: bool
    text: str | None
    html: str | None
    importance: str

    @property
    def recipients(self) -> tuple[Recipient, ...]:
        return self.to + self.cc + self.bcc


class StoredMessage:
    """A message in a mailbox: its MIME, where it is, and its state.

    Attachments added to a draft wait in `pending` and join the MIME when it is next read (at
    send, or a `$value`), so a 25 MB upload is composed once rather than on every addition; the
    JSON view (`summary`) is parsed from the MIME on first use.
    """

    def __init__(
        self,
        *,
        folder_id: str,
        mime: bytes,
        received: datetime,
        is_read: bool,
        is_draft: bool,
        seq: int,  # change-sequence number of the last change
        created: datetime | None = None,
    ) -> None:
        self.id = new_id()
        self.folder_id = folder_id
        self._mime = mime
        self.pending: list[NewAttachment] = []
        self.received = received
        self.is_read = is_read
        self.is_draft = is_draft
        self.seq = seq
        self.created = created or datetime.now(UTC)
        self.modified = datetime.now(UTC)
        self.change_key = new_id("CQAAABYAAA")
        self._summary: MimeSummary | None = None

    def __repr__(self) -> str:
        return f"<StoredMessage {self.id[:16]}… folder={self.folder_id[:16]}… seq={self.seq}>"

    @property
    def mime(self) -> bytes:
        if self.pending:
            self._mime = with_attachments(self._mime, self.pending)
            self.pending = []
        return self._mime

    @property
    def summary(self) -> MimeSummary:
        if self._summary is None:
            self._summary = summarize(self.mime)
        return self._summary

    def attach(self, attachment: NewAttachment) -> None:
        self.pending.append(attachment)
        self._summary = None


@dataclass(frozen=True)
class Removal:
    """A message left `folder_id` (deleted, or moved out under a new id) at change `seq`."""

    id: str
    folder_id: str
    seq: int


class MailStore:
    def __init__(self, address: str) -> None:
        self.address = address
        self.seq = 0
        self.folders: dict[str, Folder] = {}
        self.messages: dict[str, StoredMessage] = {}
        self.removals: list[Removal] = []
        root = Folder(new_id("AAMkAD"), "Top of Information Store", "", ROOT)
        self.folders[root.id] = root
        for name, display in DEFAULT_FOLDERS.items():
            folder = Folder(new_id("AAMkAD"), display, root.id, name)
            self.folders[folder.id] = folder

    def __repr__(self) -> str:
        return (
            f"<MailStore {self.address} folders={len(self.folders)} messages={len(self.messages)}>"
        )

    # -- folders -----------------------------------------------------------------------------

    def folder(self, ref: str) -> Folder:
        """A folder by id or by well-known name (any case)."""
        if ref.lower() in WELL_KNOWN_NAMES:
            for folder in self.folders.values():
                if folder.well_known == ref.lower():
                    return folder
            raise FolderNotFound(ref, well_known=True)
        try:
            return self.folders[ref]
        except KeyError:
            raise FolderNotFound(ref, well_known=False) from None

    def children(self, folder_id: str) -> list[Folder]:
        return [f for f in self.folders.values() if f.parent_id == folder_id]

    def create_folder(self, parent_id: str, name: str, *, hidden: bool = False) -> Folder:
        if any(f.display_name.lower() == name.lower() for f in self.children(parent_id)):
            raise FolderExists(name)
        folder = Folder(new_id("AAMkAD"), name, parent_id, is_hidden=hidden)
        self.folders[folder.id] = folder
        return folder

    def in_folder(self, folder_id: str) -> list[StoredMessage]:
        return [m for m in self.messages.values() if m.folder_id == folder_id]

    # -- messages ----------------------------------------------------------------------------

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def add(
        self,
        folder_id: str,
        mime: bytes,
        *,
        received: datetime | None = None,
        is_read: bool = False,
        is_draft: bool = False,
    ) -> StoredMessage:
        message = StoredMessage(
            folder_id=folder_id,
            mime=mime,
            received=received or datetime.now(UTC),
            is_read=is_read,
            is_draft=is_draft,
            seq=self._next(),
        )
        self.messages[message.id] = message
        return message

    def get(self, message_id: str) -> StoredMessage:
        try:
            return self.messages[message_id]
        except KeyError:
            raise ItemNotFound(message_id) from None

    def touch(self, message: StoredMessage) -> None:
        """Record a change to `message` (read state, attachments)."""
        message.seq = self._next()
        message.modified = datetime.now(UTC)
        message.change_key = new_id("CQAAABYAAA")

    def move(self, message_id: str, folder_id: str) -> StoredMessage:
        """Move as Exchange does without immutable ids: a copy with a new id, then a delete."""
        old = self.remove(message_id)
        moved = StoredMessage(
            folder_id=folder_id,
            mime=old.mime,
            received=old.received,
            is_read=old.is_read,
            is_draft=old.is_draft,
            seq=self._next(),
            created=old.created,
        )
        self.messages[moved.id] = moved
        return moved

    def remove(self, message_id: str) -> StoredMessage:
        message = self.get(message_id)
        del self.messages[message_id]
        self.removals.append(Removal(message_id, message.folder_id, self._next()))
        return message

    def changes(self, folder_id: str, since: int) -> tuple[list[StoredMessage], list[Removal]]:
        """What changed in `folder_id` after change number `since`."""
        changed = [m for m in self.in_folder(folder_id) if m.seq > since]
        removed = [r for r in self.removals if r.folder_id == folder_id and r.seq > since]
        return changed, removed


# -- MIME -> what Graph shows ------------------------------------------------------------------


def parse_mime(mime: bytes) -> EmailMessage:
    message = BytesParser(policy=MIME_POLICY).parsebytes(mime)
    assert isinstance(message, EmailMessage)
    return message


def parse_headers(mime: bytes) -> EmailMessage:
    """Only the header block: enough for addresses, cheap for a 30 MB message."""
    message = BytesParser(policy=MIME_POLICY).parsebytes(mime, headersonly=True)
    assert isinstance(message, EmailMessage)
    return message


def addressing(mime: bytes) -> tuple[Recipient | None, tuple[Recipient, ...]]:
    """The sender (first From address) and every To, Cc and Bcc recipient."""
    headers = parse_headers(mime)
    senders = _addresses(headers, "from")
    recipients = _addresses(headers, "to") + _addresses(headers, "cc") + _addresses(headers, "bcc")
    return (senders[0] if senders else None), recipients


def _addresses(message: Message, name: str) -> tuple[Recipient, ...]:
    out: list[Recipient] = []
    for header in message.get_all(name, []):
        try:
            found: Iterable[Address] = header.addresses
        except (AttributeError, ValueError):
            continue
        out.extend(Recipient(name=a.display_name, address=a.addr_spec) for a in found)
    return tuple(out)


def _text_of(part: Message | None) -> str | None:
    if part is None:
        return None
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, ValueError, KeyError):
        raw = part.get_payload(decode=True)
        content = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    return content if isinstance(content, str) else None


def _importance(message: Message) -> str:
    value = str(message.get("importance", "")).strip().lower()
    if value in ("high", "low", "normal"):
        return value
    priority = str(message.get("x-priority", "")).strip()[:1]
    return {"1": "high", "2": "high", "4": "low", "5": "low"}.get(priority, "normal")


def summarize(mime: bytes) -> MimeSummary:
    message = parse_mime(mime)
    senders = _addresses(message, "from")
    sent = None
    date = message.get("date")
    if date is not None:
        sent = getattr(date, "datetime", None)
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    message_id = str(message.get("message-id", "")).strip()
    return MimeSummary(
        subject=str(message.get("subject", "")),
        sender=senders[0] if senders else None,
        to=_addresses(message, "to"),
        cc=_addresses(message, "cc"),
        bcc=_addresses(message, "bcc"),
        reply_to=_addresses(message, "reply-to"),
        # Exchange gives every message a Message-ID; one without gets a stable stand-in.
        internet_message_id=message_id
        or f"<{hashlib.sha256(mime).hexdigest()[:32]}@emulator.invalid>",
        sent=sent if isinstance(sent, datetime) else None,
        has_attachments=any(p.get_content_disposition() == "attachment" for p in message.walk()),
        text=_text_of(text_part),
        html=_text_of(html_part),
        importance=_importance(message),
    )


_TAG = re.compile(r"<[^>]*>")


def body_text(summary: MimeSummary) -> str:
    if summary.text is not None:
        return summary.text
    return html.unescape(_TAG.sub(" ", summary.html or ""))


def body_html(summary: MimeSummary) -> str:
    if summary.html is not None:
        return summary.html
    escaped = html.escape(summary.text or "")
    return f"<html><body><pre>{escaped}</pre></body></html>"


def preview(summary: MimeSummary) -> str:
    return " ".join(body_text(summary).split())[:PREVIEW_LENGTH]


def message_json(
    message: StoredMessage, *, text_body: bool, web_base: str = "https://outlook.office365.com"
) -> dict[str, object]:
    """Every property the emulator models, in Graph's names (reference §7.1)."""
    s = message.summary
    sender = s.sender.json() if s.sender else None
    conversation = hashlib.sha256(s.subject.removeprefix("Re: ").encode()).digest()[:16]
    return {
        "@odata.etag": f'W/"{message.change_key}"',
        "id": message.id,
        "createdDateTime": graph_time(message.created),
        "lastModifiedDateTime": graph_time(message.modified),
        "changeKey": message.change_key,
        "categories": [],
        "receivedDateTime": graph_time(message.received),
        "sentDateTime": graph_time(s.sent or message.received),
        "hasAttachments": s.has_attachments,
        "internetMessageId": s.internet_message_id,
        "subject": s.subject,
        "bodyPreview": preview(s),
        "importance": s.importance,
        "parentFolderId": message.folder_id,
        "conversationId": "AAQkAG" + base64.urlsafe_b64encode(conversation).decode(),
        "isDeliveryReceiptRequested": False,
        "isReadReceiptRequested": False,
        "isRead": message.is_read,
        "isDraft": message.is_draft,
        "webLink": f"{web_base}/owa/?ItemID={message.id}&exvsurl=1&viewmodel=ReadMessageItem",
        "inferenceClassification": "focused",
        "body": {
            "contentType": "text" if text_body else "html",
            "content": body_text(s) if text_body else body_html(s),
        },
        "sender": sender,
        "from": sender,
        "toRecipients": [r.json() for r in s.to],
        "ccRecipients": [r.json() for r in s.cc],
        "bccRecipients": [r.json() for r in s.bcc],
        "replyTo": [r.json() for r in s.reply_to],
        "flag": {"flagStatus": "notFlagged"},
    }


# The properties `message_json` gives, which `$select` may name.
MESSAGE_PROPERTIES = frozenset(
    {
        "id", "createdDateTime", "lastModifiedDateTime", "changeKey", "categories",
        "receivedDateTime", "sentDateTime", "hasAttachments", "internetMessageId", "subject",
        "bodyPreview", "importance", "parentFolderId", "conversationId",
        "isDeliveryReceiptRequested", "isReadReceiptRequested", "isRead", "isDraft", "webLink",
        "inferenceClassification", "body", "sender", "from", "toRecipients", "ccRecipients",
        "bccRecipients", "replyTo", "flag",
    }
)  # fmt: skip


def folder_json(store: MailStore, folder: Folder) -> dict[str, object]:
    contents = store.in_folder(folder.id)
    return {
        "id": folder.id,
        "displayName": folder.display_name,
        "parentFolderId": folder.parent_id,
        "childFolderCount": len(store.children(folder.id)),
        "unreadItemCount": sum(not m.is_read for m in contents),
        "totalItemCount": len(contents),
        "isHidden": folder.is_hidden,
    }


# -- what Graph builds: JSON messages and attachments -> MIME ----------------------------------


@dataclass(frozen=True, kw_only=True)
class NewAttachment:
    name: str
    content_type: str
    content: bytes
    is_inline: bool = False
    content_id: str | None = None


class InvalidMessageJson(ValueError):
    """A JSON message Graph would refuse; the text says why."""


def _json_addresses(value: object) -> list[Address]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidMessageJson("recipients must be a list")
    out = []
    for item in value:
        email = item.get("emailAddress") if isinstance(item, dict) else None
        if not isinstance(email, dict) or not isinstance(email.get("address"), str):
            raise InvalidMessageJson("a recipient needs emailAddress.address")
        out.append(Address(display_name=str(email.get("name") or ""), addr_spec=email["address"]))
    return out


def json_attachment(item: Mapping[str, object]) -> NewAttachment:
    """A `#microsoft.graph.fileAttachment` as posted to sendMail, a draft or /attachments."""
    name, raw = item.get("name"), item.get("contentBytes")
    if not isinstance(name, str) or not isinstance(raw, str):
        raise InvalidMessageJson("a file attachment needs name and contentBytes")
    try:
        content = base64.b64decode(raw, validate=True)
    except ValueError:
        raise InvalidMessageJson("contentBytes is not base64") from None
    content_id = item.get("contentId")
    return NewAttachment(
        name=name,
        content_type=str(item.get("contentType") or "application/octet-stream"),
        content=content,
        is_inline=bool(item.get("isInline", False)),
        content_id=str(content_id) if content_id else None,
    )


def mime_from_json(message: Mapping[str, object], *, mailbox: str) -> bytes:
    """The MIME Exchange would make of a JSON message (sendMail JSON form, JSON drafts)."""
    out = EmailMessage(policy=MIME_POLICY)
    sender = _json_addresses([message["from"]]) if message.get("from") else []
    out["From"] = sender[0] if sender else Address(addr_spec=mailbox)
    for header, key in (
        ("To", "toRecipients"),
        ("Cc", "ccRecipients"),
        ("Bcc", "bccRecipients"),
        ("Reply-To", "replyTo"),
    ):
        found = _json_addresses(message.get(key))
        if found:
            out[header] = found
    out["Subject"] = str(message.get("subject") or "")
    out["Date"] = format_datetime(datetime.now(UTC))
    out["Message-ID"] = make_msgid(domain="emulator.prod.outlook.com")
    out["MIME-Version"] = "1.0"
    for item in message.get("internetMessageHeaders") or []:  # type: ignore[attr-defined]
        if not isinstance(item, dict) or not str(item.get("name", "")).lower().startswith("x-"):
            raise InvalidMessageJson("only custom headers starting with 'x-' may be set")
        out[str(item["name"])] = str(item.get("value", ""))
    if str(message.get("importance", "normal")).lower() in ("high", "low"):
        out["Importance"] = str(message["importance"]).lower()
    body = message.get("body") or {}
    if not isinstance(body, dict):
        raise InvalidMessageJson("body must be an object")
    subtype = "html" if str(body.get("contentType", "text")).lower() == "html" else "plain"
    out.set_content(str(body.get("content") or ""), subtype=subtype)
    attachments = message.get("attachments") or []
    if not isinstance(attachments, list):
        raise InvalidMessageJson("attachments must be a list")
    mime = out.as_bytes()
    return (
        with_attachments(mime, [json_attachment(a) for a in attachments]) if attachments else mime
    )


def _attachment_part(attachment: NewAttachment) -> EmailMessage:
    part = EmailMessage(policy=MIME_POLICY)
    maintype, _, subtype = attachment.content_type.partition("/")
    part.set_content(
        attachment.content,
        maintype=maintype or "application",
        subtype=subtype or "octet-stream",
        disposition="inline" if attachment.is_inline else "attachment",
        filename=attachment.name,
        cid=f"<{attachment.content_id}>" if attachment.content_id else None,
    )
    return part


def _first(message: Message, content_type: str) -> Message | None:
    return next((p for p in message.walk() if p.get_content_type() == content_type), None)


def _wrap_in_mixed(message: EmailMessage) -> None:
    """Turn `message` into multipart/mixed whose first part is its old content."""
    inner = EmailMessage(policy=MIME_POLICY)
    for name, value in message.items():
        if name.lower().startswith("content-"):
            inner[name] = value
    inner.set_payload(message.get_payload())
    for name in {n for n in message if n.lower().startswith("content-")}:
        del message[name]
    message["Content-Type"] = 'multipart/mixed; boundary="' + uuid.uuid4().hex + '"'
    message.set_payload([inner])


def with_attachments(mime: bytes, attachments: Sequence[NewAttachment]) -> bytes:
    """`mime` with attachments added as Exchange does when it sends: inline ones into the
    multipart/related (when there is one), the others into a multipart/mixed."""
    message = parse_mime(mime)
    for attachment in attachments:
        container = _first(message, "multipart/related") if attachment.is_inline else None
        if container is None:
            if message.get_content_type() != "multipart/mixed":
                _wrap_in_mixed(message)
            container = message
        container.attach(_attachment_part(attachment))
    return message.as_bytes()
