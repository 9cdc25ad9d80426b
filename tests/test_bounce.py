"""Delivery status notifications, read back with the `email` package as a sender's client would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.bounce import SUBJECT, make_bounce, status_of
from relay.config import RouteConfig
from relay.reply import Reply
from relay.routing import Router, Split

ARRIVAL = datetime(2026, 11, 27, 13, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 12, 2, 13, 0, 0, tzinfo=UTC)
MAILBOX = "maintenance@contoso.com"
NOT_FOUND = Reply(
    550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)
BUSY = Reply(451, "", "Server busy")
ORIGINAL = (
    "Received: by ultimo\r\n"
    "From: Ultimo <ultimo@contoso.com>\r\n"
    "To: bob@example.com, amy@example.com\r\n"
    "Subject: Werkorder 42, Grüße\r\n"
    "Message-ID: <wo42@ultimo>\r\n"
    "\r\n"
    "Confidential body text.\r\n"
).encode()


def bounce(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "original": ORIGINAL,
        "qid": "7F3A2B",
        "mail_from": "ultimo@contoso.com",
        "failed": {"bob@example.com": NOT_FOUND, "amy@example.com": BUSY},
        "reporting_mta": "relay.contoso.com",
        "mailbox": MAILBOX,
        "arrival": ARRIVAL,
        "now": NOW,
    } | overrides
    out = make_bounce(**args)
    assert out is not None
    return out


def parse(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def text_of(part: EmailMessage) -> str:
    """A text part's content; `email` keeps the CRLF line endings of the wire."""
    return part.get_content().replace("\r\n", "\n")


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def test_envelope_headers() -> None:
    msg = parse(bounce())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    [sender] = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Mail Delivery System", MAILBOX)
    assert [a.addr_spec for a in msg["To"].addresses] == ["ultimo@contoso.com"]
    assert msg["Subject"] == SUBJECT == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@relay.contoso.com>")
    assert ".bounce.7F3A2B@" in msg["Message-ID"]
    assert parse(bounce())["Message-ID"] != msg["Message-ID"]  # fresh each time
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_human_readable_part() -> None:
    text = text_of(parts(parse(bounce(reason="It was in the queue for 5 days.")))[0])
    assert text == (
        "This is the mail relay at relay.contoso.com.\n"
        "\n"
        "Your message could not be delivered to 2 recipients. The relay has stopped\n"
        "trying and will not send it to them again. It was in the queue for 5 days.\n"
        "\n"
        "<bob@example.com>\n"
        "    The answer was: 550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not\n"
        "    found by SMTP address lookup\n"
        "    The address was refused: it may not exist, or it is mistyped.\n"
        "\n"
        "<amy@example.com>\n"
        "    The answer was: 451 Server busy\n"
        "    The trouble looked temporary, but it lasted until the relay gave up.\n"
        "\n"
        "Queue id: 7F3A2B\n"
        "Arrived: Fri, 27 Nov 2026 13:00:00 +0000\n"
        "\n"
        "The headers of your message are attached.\n"
    )


def test_delivery_status_fields() -> None:
    status = parts(parse(bounce()))[1].get_payload()
    assert isinstance(status, list)
    per_message, bob, amy = status
    assert dict(per_message.items()) == {
        "Reporting-MTA": "dns; relay.contoso.com",
        "X-Relay-Queue-ID": "7F3A2B",
        "Arrival-Date": "Fri, 27 Nov 2026 13:00:00 +0000",
    }
    assert dict(bob.items()) == {
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.10",
        "Diagnostic-Code": "smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not "
        "found by SMTP address lookup",
        "Last-Attempt-Date": "Wed, 02 Dec 2026 13:00:00 +0000",
    }
    assert dict(amy.items()) == {
        "Final-Recipient": "rfc822; amy@example.com",
        "Action": "failed",
        "Status": "4.0.0",
        "Diagnostic-Code": "smtp; 451 Server busy",
        "Last-Attempt-Date": "Wed, 02 Dec 2026 13:00:00 +0000",
    }


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply(550, "5.7.60", "SMTP; Client does not have permissions"), "5.7.60"),
        (Reply(432, "4.3.2", "Concurrent connections limit exceeded."), "4.3.2"),
        (Reply(554, "", "Transaction failed"), "5.0.0"),
        (Reply(421, "", "Service not available"), "4.0.0"),
        (Reply(550, "2.0.0", "nonsense status for a failure"), "5.0.0"),
        (Reply(550, "5.1", "truncated status"), "5.0.0"),
    ],
)
def test_status_comes_from_the_reply_or_its_class(reply: Reply, status: str) -> None:
    assert status_of(reply) == status
    [_, rcpt] = parts(parse(bounce(failed={"bob@example.com": reply})))[1].get_payload()
    assert rcpt["Status"] == status


def test_original_headers_without_body_and_with_non_ascii() -> None:
    """8-bit headers travel quoted-printable, so the DSN itself stays 7-bit."""
    data = bounce()
    assert data.isascii()
    assert b"Confidential" not in data
    headers = parts(parse(data))[2]
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers.get_content_charset() == "utf-8"
    assert headers.get_payload(decode=True) == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert "Subject: Werkorder 42, Grüße" in headers.get_content()


def test_ascii_headers_travel_as_7bit() -> None:
    original = b"From: a@contoso.com\r\nSubject: plain\r\n\r\nbody\r\n"
    headers = parts(parse(bounce(original=original)))[2]
    assert headers["Content-Transfer-Encoding"] == "7bit"
    assert headers.get_payload() == "From: a@contoso.com\r\nSubject: plain\r\n"


def test_latin1_headers_are_unknown_8bit() -> None:
    original = "Subject: Grüße\n\nbody\n".encode("latin-1")
    headers = parts(parse(bounce(original=original)))[2]
    assert headers.get_content_charset() == "unknown-8bit"
    assert headers.get_payload(decode=True) == "Subject: Grüße\r\n".encode("latin-1")


def test_whole_message_when_asked() -> None:
    data = bounce(headers_only=False)
    msg = parse(data)
    text, _, attached = parts(msg)
    assert text_of(text).endswith("\nYour message is attached.\n")
    assert attached.get_content_type() == "message/rfc822"
    assert attached["Content-Transfer-Encoding"] == "8bit"  # the original has 8-bit headers
    [inner] = attached.get_payload()
    assert isinstance(inner, Message)
    assert inner["Message-ID"] == "<wo42@ultimo>"
    assert inner.get_payload() == "Confidential body text.\r\n"


def test_whole_message_with_lines_too_long_falls_back_to_headers() -> None:
    original = b"Subject: long\n\n" + b"x" * 5000 + b"\n"
    text, _, attached = parts(parse(bounce(original=original, headers_only=False)))
    assert attached.get_content_type() == "text/rfc822-headers"
    assert text_of(text).endswith(
        "\nThe headers of your message are attached; the message itself has lines too\n"
        "long to send back whole.\n"
    )


def test_long_original_header_lines_are_wrapped_by_quoted_printable() -> None:
    original = b"X-Legacy: " + b"y" * 3000 + b"\r\n\r\nbody"
    headers = parts(parse(bounce(original=original)))[2]
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert max(len(line) for line in headers.get_payload().split("\r\n")) <= 76
    assert headers.get_payload(decode=True) == b"X-Legacy: " + b"y" * 3000 + b"\r\n"


def test_smtputf8_recipient_and_sender() -> None:
    data = bounce(mail_from="jürgen@münchen.example", failed={"zoë@example.com": NOT_FOUND})
    assert "\r\nTo: <jürgen@münchen.example>\r\n".encode() in data  # RFC 6532: raw UTF-8
    msg = parse(data)
    [_, rcpt] = parts(msg)[1].get_payload()
    assert rcpt["Final-Recipient"] == "utf-8; zo\\x{EB}@example.com"
    assert "<zoë@example.com>" in text_of(parts(msg)[0])


def test_line_breaks_in_replies_and_ids_cannot_inject_headers() -> None:
    evil = Reply(550, "5.0.0", "first line\r\nBcc: victim@example.com\nsecond")
    data = bounce(qid="Q1\r\nBcc: x@y", failed={"bob@example.com": evil}, reason="a\r\nb")
    msg = parse(data)
    assert "Bcc" not in msg
    [per_message, rcpt] = parts(msg)[1].get_payload()
    assert per_message["X-Relay-Queue-ID"] == "Q1??Bcc: x@y"
    assert "Bcc" not in rcpt
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.0.0 first line Bcc: victim@example.com second"


def test_null_sender_is_never_bounced() -> None:
    for null in ("", "<>"):
        assert (
            make_bounce(
                original=ORIGINAL,
                qid="Q",
                mail_from=null,
                failed={"bob@example.com": NOT_FOUND},
                reporting_mta="relay.contoso.com",
                mailbox=MAILBOX,
                arrival=ARRIVAL,
            )
            is None
        )


def test_refuses_calls_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="at least one failed recipient"):
        bounce(failed={})
    with pytest.raises(ValueError, match="timezone-aware"):
        bounce(arrival=datetime(2026, 11, 27, 13, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        bounce(now=datetime(2026, 12, 2, 13, 0))


def test_default_now_and_other_time_zones() -> None:
    cet = timezone(timedelta(hours=1))
    msg = parse(bounce(now=None, arrival=ARRIVAL.astimezone(cet)))
    [per_message, rcpt, _] = parts(msg)[1].get_payload()
    assert per_message["Arrival-Date"] == "Fri, 27 Nov 2026 14:00:00 +0100"
    assert rcpt["Last-Attempt-Date"] == msg["Date"]
    assert msg["Date"].datetime.tzinfo is not None


def test_a_bounce_passes_the_keep_route_of_its_mailbox() -> None:
    """Spooled with the null sender through the original's route, a DSN is not refused."""
    route = RouteConfig(name="maintenance", account="contoso", mailbox=MAILBOX)
    router = Router([route])
    data = bounce()
    assert router.at_data("127.0.0.1", None, "", ["ultimo@contoso.com"], data) == [
        Split(route, "", ("ultimo@contoso.com",), data)
    ]


@given(
    original=st.binary(max_size=3000),
    text=st.text(max_size=300),
    code=st.sampled_from([421, 450, 451, 550, 552, 554]),
    rcpt=st.text(min_size=1, max_size=40),
    headers_only=st.booleans(),
)
def test_every_line_ends_in_crlf_and_fits(
    original: bytes, text: str, code: int, rcpt: str, headers_only: bool
) -> None:
    data = bounce(
        original=original,
        failed={rcpt: Reply(code, "", text)},
        headers_only=headers_only,
    )
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert all(len(line) <= 998 for line in lines)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert len(parts(msg)) == 3
