"""RFC 3464 delivery status notifications: the message that tells a sender their mail failed.

The scheduler calls `make_bounce` when recipients failed for good (a permanent reply, or
`max_age` reached) and spools the result with the null envelope sender, through the route the
original took: the DSN is From that route's mailbox, which every sender policy accepts. Nothing
here does I/O, and the original message is quoted from its raw bytes, never re-serialised.

The DSN is `multipart/report; report-type=delivery-status` (RFC 6522) with three parts:
a plain-language text part, the `message/delivery-status` fields, and the original headers as
`text/rfc822-headers` (or the whole original as `message/rfc822`). Every line ends in CRLF and
none is longer than 998 octets: original headers with 8-bit bytes or long lines are sent
quoted-printable, and a whole original with a line too long to carry falls back to its headers.

`make_bounce` returns None for a null sender (a bounce is never bounced) and raises ValueError
for a call it cannot honour (no failed recipient, naive datetimes).
"""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

from relay.config import RouteConfig
from relay.headerblock import CRLF, MAX_LINE, HeaderBlock, fold
from relay.reply import Reply
from relay.routing import envelope_address
from relay.spool import Envelope, QueueEntry

SUBJECT = "Undelivered Mail Returned to Sender"
FROM_NAME = "Mail Delivery System"

# What a failure's RFC 3463 subject says, in words a sender can act on.
_SUBJECTS = {
    "1": "The address was refused: it may not exist, or it is mistyped.",
    "2": "The mailbox could not take the message: it is full, disabled or over a limit.",
    "3": "The mail system could not take the message, for example because it is too large.",
    "4": "The mail server could not be reached, or it did not answer in time.",
    "5": "The mail server and the relay did not understand each other.",
    "6": "The content of the message was refused.",
    "7": "The message was refused by a security or permission rule, such as send-as rights.",
}
_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
_LINE_BREAKS = re.compile(rb"\r\n|\r|\n")
_WIDTH = 76


def make_bounce(
    *,
    original: bytes,
    qid: str,
    mail_from: str,
    failed: Mapping[str, Reply],
    reporting_mta: str,
    mailbox: str,
    arrival: datetime,
    reason: str | None = None,
    headers_only: bool = True,
    now: datetime | None = None,
) -> bytes | None:
    """The DSN for `failed` recipients (each with the reply that failed it), or None.

    `mail_from` is the original envelope sender, who gets the DSN; `mailbox` the route's mailbox
    it comes from; `reason` an optional sentence for everyone (e.g. "It was in the queue for 5
    days."). `headers_only=False` attaches the whole original instead of its headers.
    """
    if not envelope_address(mail_from):
        return None
    if not failed:
        raise ValueError("a bounce needs at least one failed recipient")
    now = now or datetime.now(UTC)
    if arrival.tzinfo is None or now.tzinfo is None:
        raise ValueError("arrival and now must be timezone-aware datetimes")

    block = HeaderBlock.parse(original)
    whole = _crlf(original)
    attach_whole = not headers_only and all(len(line) <= MAX_LINE for line in whole.split(CRLF))
    boundary = f"relay-{secrets.token_hex(16)}"
    headers = [
        fold("From", f"{FROM_NAME} <{_safe(mailbox)}>"),
        fold("To", f"<{_safe(mail_from)}>"),
        fold("Subject", SUBJECT),
        fold("Date", format_datetime(now)),
        fold("Message-ID", make_msgid(_token(f"bounce.{qid}"), _token(reporting_mta))),
        fold("Auto-Submitted", "auto-replied"),
        fold("MIME-Version", "1.0"),
        fold(
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ),
    ]
    if attach_whole:
        attachment = "Your message is attached."
    elif headers_only:
        attachment = "The headers of your message are attached."
    else:
        attachment = (
            "The headers of your message are attached; the message itself has lines too long"
            " to send back whole."
        )
    text = _human(
        qid=qid,
        failed=failed,
        reporting_mta=reporting_mta,
        arrival=arrival,
        reason=reason,
        attachment=attachment,
    )
    parts = [
        _text_part("text/plain", _crlf(text.encode("utf-8"))),
        _part(
            "message/delivery-status",
            "7bit",
            _status(qid=qid, failed=failed, reporting_mta=reporting_mta, arrival=arrival, now=now),
        ),
        _part("message/rfc822", _cte(whole), whole)
        if attach_whole
        else _text_part("text/rfc822-headers", _crlf(block.header_bytes())),
    ]
    out = b"".join(f.raw for f in headers) + CRLF
    for part in parts:
        out += b"--" + boundary.encode() + CRLF + part + CRLF
    return out + b"--" + boundary.encode() + b"--" + CRLF


def status_of(reply: Reply) -> str:
    """The RFC 3463 status a failed recipient reports: the reply's own, else 4.0.0 or 5.0.0."""
    if _STATUS.fullmatch(reply.status):
        return reply.status
    return "4.0.0" if 400 <= reply.code < 500 else "5.0.0"


def _human(
    *,
    qid: str,
    failed: Mapping[str, Reply],
    reporting_mta: str,
    arrival: datetime,
    reason: str | None,
    attachment: str,
) -> str:
    def para(text: str, indent: str = "") -> str:
        return textwrap.fill(
            text,
            _WIDTH,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )

    count = "1 recipient" if len(failed) == 1 else f"{len(failed)} recipients"
    out = [
        para(f"This is the mail relay at {_safe(reporting_mta)}."),
        para(
            f"Your message could not be delivered to {count}. The relay has stopped trying "
            "and will not send it to them again." + (f" {_safe(reason)}" if reason else "")
        ),
    ]
    for rcpt, reply in failed.items():
        status = status_of(reply)
        lines = [f"<{_safe(rcpt)}>", para(f"The answer was: {_safe(_diagnostic(reply))}", "    ")]
        explained = [_SUBJECTS.get(status.split(".")[1], "")]
        if status.startswith("4"):
            explained.append("The trouble looked temporary, but it lasted until the relay gave up.")
        if any(explained):
            lines.append(para(" ".join(e for e in explained if e), "    "))
        out.append("\n".join(lines))
    out.append(f"Queue id: {_safe(qid)}\nArrived: {format_datetime(arrival)}")
    out.append(para(attachment))
    return "\n\n".join(out) + "\n"


def _status(
    *,
    qid: str,
    failed: Mapping[str, Reply],
    reporting_mta: str,
    arrival: datetime,
    now: datetime,
) -> bytes:
    groups = [
        [
            fold("Reporting-MTA", f"dns; {_safe(reporting_mta, ascii_only=True)}"),
            fold("X-Relay-Queue-ID", _safe(qid, ascii_only=True)),
            fold("Arrival-Date", format_datetime(arrival)),
        ]
    ]
    for rcpt, reply in failed.items():
        groups.append(
            [
                fold("Final-Recipient", _final_recipient(rcpt)),
                fold("Action", "failed"),
                fold("Status", status_of(reply)),
                fold("Diagnostic-Code", f"smtp; {_safe(_diagnostic(reply), ascii_only=True)}"),
                fold("Last-Attempt-Date", format_datetime(now)),
            ]
        )
    return CRLF.join(b"".join(f.raw for f in group) for group in groups)


def _final_recipient(rcpt: str) -> str:
    """`rfc822; addr`, or RFC 6533's `utf-8; addr` (non-ASCII as \\x{HEX}) for SMTPUTF8."""
    rcpt = _safe(rcpt)
    if rcpt.isascii():
        return f"rfc822; {rcpt}"
    return "utf-8; " + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in rcpt)


def _diagnostic(reply: Reply) -> str:
    """The reply on one line: code, status, text."""
    return " ".join(str(x) for x in (reply.code, reply.status, *reply.text.split()) if x)


def _text_part(content_type: str, body: bytes) -> bytes:
    """A text/* part: 7bit when it can be, else quoted-printable (8-bit bytes or long lines)."""
    if _cte(body) == "7bit":
        return _part(content_type, "7bit", body)
    try:
        body.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"  # RFC 1428: 8-bit text of no known charset
    encoded = quopri.encodestring(body.replace(CRLF, b"\n")).replace(b"\n", CRLF)
    return _part(f"{content_type}; charset={charset}", "quoted-printable", encoded)


def _part(content_type: str, cte: str, body: bytes) -> bytes:
    head = fold("Content-Type", content_type).raw + fold("Content-Transfer-Encoding", cte).raw
    return head + CRLF + body


def _cte(body: bytes) -> str:
    """7bit for short-lined ASCII, 8bit otherwise (callers make sure no line is too long)."""
    if body.isascii() and all(len(line) <= MAX_LINE for line in body.split(CRLF)):
        return "7bit"
    return "8bit"


def _crlf(data: bytes) -> bytes:
    return _LINE_BREAKS.sub(CRLF, data)


def _safe(text: str, *, ascii_only: bool = False) -> str:
    """Text from elsewhere (replies, addresses, ids) without controls, so it cannot break a line."""
    return "".join(
        "?" if c < " " or c == "\x7f" or (ascii_only and not c.isascii()) else c for c in text
    )


def _token(text: str) -> str:
    """Only what a Message-ID part may hold."""
    return re.sub(r"[^A-Za-z0-9.\-]", "", text) or "relay"


def bounce_for(
    entry: QueueEntry,
    *,
    original: bytes,
    failed: Mapping[str, Reply],
    route: RouteConfig,
    reporting_mta: str,
    reason: str | None = None,
) -> tuple[Envelope, bytes] | None:
    """The DSN for a spooled message and the envelope to queue it with: from the null sender to
    the original sender, through the same route (its mailbox sends it). None when there is
    nobody to tell (the original came from the null sender)."""
    dsn = make_bounce(
        original=original,
        qid=entry.qid,
        mail_from=entry.envelope.mail_from,
        failed=failed,
        reporting_mta=reporting_mta,
        mailbox=route.mailbox,
        arrival=datetime.fromtimestamp(entry.envelope.received_at, UTC),
        reason=reason,
    )
    if dsn is None:
        return None
    envelope = Envelope(
        mail_from="", rcpt_tos=(entry.envelope.mail_from,), route=route.name, client="127.0.0.1"
    )
    return envelope, dsn
