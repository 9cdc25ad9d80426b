"""The graph transport against the emulated Graph over HTTPS: each way a message goes, each
answer Graph can give and what it becomes, and every aiohttp exception mapped."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from email.policy import SMTP
from types import ModuleType

import aiohttp
import pytest
from aiohttp import http_exceptions, http_websocket, streams
from graphkit import MAILBOX, GraphKit, graph_kit, mime, pki

from relay.config import RouteConfig, Transport
from relay.errors import (
    PermanentFailure,
    TemporaryFailure,
    TokenRejected,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from relay.graphapi import MAPPED_EXCEPTIONS, map_http_error, mapping_for
from relay.identity import GRAPH_SCOPE
from relay.reply import Reply
from relay.testing.directory import MAIL_READWRITE
from relay.testing.graph import SendRoute
from relay.testing.tokens import EXCHANGE_AUDIENCE
from relay.transports import OutgoingMessage
from relay.transports.graph import (
    MAX_REQUEST_BYTES,
    GraphTransport,
    graph_failure,
    graph_save_to_sent_items_note,
    plan_draft,
    with_envelope_bcc,
)

MiB = 1024 * 1024


class IssuerTokens:
    """A TokenProvider that asks the emulator's TokenIssuer directly, caching one token.

    `first` is handed out before any real token (e.g. an expired one); `always` makes every
    token come from that function (e.g. one for the wrong audience).
    """

    def __init__(self, kit: GraphKit, *, first: str | None = None, **token_options: object):
        self.kit = kit
        self.cached = first
        self.options = token_options
        self.invalidated = 0

    async def token(self, scope: str) -> str:
        assert scope == GRAPH_SCOPE
        if self.cached is None:
            self.cached = self.kit.token(**self.options)  # type: ignore[arg-type]
        return self.cached

    def invalidate(self, scope: str) -> None:
        assert scope == GRAPH_SCOPE
        self.invalidated += 1
        self.cached = None


@pytest.fixture
async def kit() -> AsyncIterator[GraphKit]:
    async with graph_kit() as k:
        yield k


def transport(
    kit: GraphKit, tokens: IssuerTokens | None = None, **options: object
) -> GraphTransport:
    settings: dict[str, object] = {
        "mailbox": MAILBOX,
        "graph_url": kit.base,
        "tokens": tokens or IssuerTokens(kit),
        "ssl_context": pki().client_context(),
        "save_to_sent_items": True,
        **options,
    }
    return GraphTransport(**settings)  # type: ignore[arg-type]


def outgoing(data: bytes, *rcpt: str) -> OutgoingMessage:
    return OutgoingMessage(
        qid="Q1", mail_from=MAILBOX, rcpt_tos=rcpt or ("ops@example.org",), data=data
    )


def sends(kit: GraphKit, path_end: str = "/sendMail") -> int:
    return sum(1 for r in kit.service.requests if r.path.endswith(path_end))


# -- the small path ----------------------------------------------------------------------------


async def test_small_message_goes_as_mime_exactly(kit: GraphKit) -> None:
    """A message whose envelope matches its headers is sent as base64 MIME, byte for byte; the
    reply says Graph accepted it, for every envelope recipient."""
    raw = mime()
    async with transport(kit) as graph:
        delivered = await graph.send(outgoing(raw))
    assert delivered.reply == Reply(250, "2.0.0", "Graph 202 Accepted (sendMail)")
    assert delivered.accepted == ("ops@example.org",)
    [sent] = kit.service.sent
    assert (sent.mime, sent.route, sent.save_to_sent_items) == (raw, SendRoute.SENDMAIL_MIME, True)
    assert sent.sent_items_id is not None


async def test_envelope_recipients_missing_from_headers_are_added_as_bcc(kit: GraphKit) -> None:
    """Graph sends to the MIME's recipients; envelope recipients not named in To/Cc/Bcc are
    added as Bcc so every one of them gets the message, and the body bytes do not change."""
    raw = mime(Cc="Ana <ana@example.org>")
    async with transport(kit) as graph:
        await graph.send(outgoing(raw, "OPS@example.org", "ana@example.org", "audit@example.org",
                                  "hidden@example.net"))  # fmt: skip
    [sent] = kit.service.sent
    assert set(sent.recipients) == {
        "ops@example.org", "ana@example.org", "audit@example.org", "hidden@example.net"
    }  # fmt: skip
    head, body = sent.mime.split(b"\r\n\r\n", 1)
    assert body == raw.split(b"\r\n\r\n", 1)[1]
    assert head == raw.split(b"\r\n\r\n", 1)[0] + b"\r\nBcc: audit@example.org, hidden@example.net"


@pytest.mark.parametrize(
    ("data", "rcpt", "expected"),
    [
        (b"To: a@x\r\nSubject: s\r\n\r\nbody\r\n", ("a@x",),
         b"To: a@x\r\nSubject: s\r\n\r\nbody\r\n"),
        (b"To: a@x\r\nBcc: b@x\r\nSubject: s\r\n\r\nbody\r\n", ("a@x", "c@x"),
         b"To: a@x\r\nBcc: b@x, c@x\r\nSubject: s\r\n\r\nbody\r\n"),
        (b"To: a@x,\n b@x\nSubject: s\n\nbody\n", ("b@x", "c@x", "c@x"),
         b"To: a@x,\n b@x\nSubject: s\nBcc: c@x\n\nbody\n"),
        (b"no headers at all\r\n", ("a@x",), b"Bcc: a@x\r\n\r\nno headers at all\r\n"),
    ],
)  # fmt: skip
def test_with_envelope_bcc(data: bytes, rcpt: tuple[str, ...], expected: bytes) -> None:
    """Only the Bcc field changes: an existing one takes the new addresses, folded To fields
    count, duplicates collapse, line endings follow the message."""
    assert with_envelope_bcc(data, rcpt) == expected


# -- the large path ------------------------------------------------------------------------------


def big_message(attachment: bytes, image: bytes, report: bytes) -> bytes:
    """An HTML mail with two inline images (one small, one large), a 25 MB attachment and a
    2.5 MB one, with non-ASCII subject and display names and a custom header."""
    message = EmailMessage(policy=SMTP)
    message["From"] = "Jürgen Müller <robot@contoso.com>"
    message["To"] = "Zoë Ökonom <zoe@example.org>"
    message["Subject"] = "Wartungsbericht für Halle 3: Übersicht (250 €)"
    message["Message-ID"] = "<big-1@ultimo.example>"
    message["X-Work-Order"] = "WO-4711"
    message.set_content("Siehe Anhang.\n")
    message.add_alternative(
        '<p>Siehe Anhang.<img src="cid:logo@ultimo"><img src="cid:plan@ultimo"></p>\n',
        subtype="html",
    )
    html = message.get_payload()[1]
    html.add_related(b"\x89PNG small", maintype="image", subtype="png", cid="<logo@ultimo>")
    html.add_related(image, maintype="image", subtype="png", cid="<plan@ultimo>",
                     filename="plan.png", disposition="inline")  # fmt: skip
    message.add_attachment(attachment, maintype="application", subtype="octet-stream",
                           filename="messdaten.bin")  # fmt: skip
    message.add_attachment(report, maintype="application", subtype="pdf",
                           filename="Prüfbericht.pdf")  # fmt: skip
    return message.as_bytes()


async def test_large_message_goes_through_a_draft_and_arrives_intact(kit: GraphKit) -> None:
    """A ~31 MB message: a MIME draft without its big parts, the 25 MB attachment and the 3.5 MB
    inline image through upload sessions (PUTs without Authorization), the 2.5 MB report by
    POST attachments, then send. What Exchange sends has the same subject, names, custom
    header and Message-ID, both inline images with their Content-IDs, and every attachment's
    bytes; the draft is gone and a copy is in Sent Items."""
    attachment, image, report = (
        os.urandom(25 * MiB),
        os.urandom(3 * MiB + MiB // 2),
        os.urandom(5 * MiB // 2),
    )
    raw = big_message(attachment, image, report)
    async with transport(kit) as graph:
        delivered = await graph.send(outgoing(raw, "zoe@example.org", "audit@example.org"))
    assert delivered.reply.text == "Graph 202 Accepted (draft with 3 attachment(s) added)"
    assert sends(kit, "/createUploadSession") == 2
    assert sends(kit, "/attachments") == 1
    puts = [r for r in kit.service.requests if r.method == "PUT"]
    assert len(puts) == 9 + 2  # 25 MiB and 3.5 MiB in 3 MiB ranges
    assert not any(r.authorization for r in puts)

    [sent] = kit.service.sent
    assert sent.route is SendRoute.DRAFT
    assert set(sent.recipients) == {"zoe@example.org", "audit@example.org"}
    parsed = sent.parsed()
    assert parsed["Subject"] == "Wartungsbericht für Halle 3: Übersicht (250 €)"
    assert parsed["From"].addresses[0].display_name == "Jürgen Müller"
    assert parsed["To"].addresses[0].display_name == "Zoë Ökonom"
    assert parsed["X-Work-Order"] == "WO-4711"
    assert parsed["Message-ID"] == "<big-1@ultimo.example>"
    by_cid = {p["Content-ID"]: p for p in parsed.walk() if p["Content-ID"]}
    assert by_cid["<logo@ultimo>"].get_payload(decode=True) == b"\x89PNG small"
    assert by_cid["<plan@ultimo>"].get_payload(decode=True) == image
    assert by_cid["<plan@ultimo>"].get_content_disposition() == "inline"
    files = {
        p.get_filename(): p for p in parsed.walk() if p.get_content_disposition() == "attachment"
    }
    assert files["messdaten.bin"].get_payload(decode=True) == attachment
    assert files["Prüfbericht.pdf"].get_payload(decode=True) == report
    assert kit.service.messages(MAILBOX, "drafts") == []
    assert [m.id for m in kit.service.messages(MAILBOX, "sentitems")] == [sent.sent_items_id]


def test_plan_draft_takes_out_the_largest_attachments_only() -> None:
    message = EmailMessage(policy=SMTP)
    message["Subject"] = "x"
    message.set_content("text\n")
    for name, size in (("a", 2 * MiB), ("b", 5 * MiB), ("c", 100)):
        message.add_attachment(b"z" * size, maintype="application", subtype="x", filename=name)
    plan = plan_draft(message.as_bytes())
    assert [a.name for a in plan.attachments] == ["b"]
    assert len(plan.mime) * 4 // 3 <= MAX_REQUEST_BYTES
    assert b'filename="a"' in plan.mime and b'filename="c"' in plan.mime


def test_plan_draft_refuses_a_text_too_big_for_one_request() -> None:
    raw = mime(body="x" * (4 * MiB))
    with pytest.raises(PermanentFailure) as caught:
        plan_draft(raw)
    assert caught.value.reply == Reply(
        552, "5.3.4", "message text too large for Graph: over 3 MB without attachments"
    )


# -- save_to_sent_items ------------------------------------------------------------------------


async def test_save_to_sent_items_false_uses_the_json_form(kit: GraphKit) -> None:
    """With save_to_sent_items false, sendMail's JSON form says so: nothing in Sent Items. The
    message keeps subject, names, body, inline image (Content-ID) and attachment; the
    envelope's extra recipient gets it as Bcc."""
    raw = big_message(b"data", b"\x89PNG plan", b"%PDF report")
    async with transport(kit, save_to_sent_items=False) as graph:
        delivered = await graph.send(outgoing(raw, "zoe@example.org", "audit@example.org"))
    assert delivered.reply.text == "Graph 202 Accepted (sendMail, JSON)"
    [sent] = kit.service.sent
    assert (sent.route, sent.save_to_sent_items, sent.sent_items_id) == (
        SendRoute.SENDMAIL_JSON, False, None
    )  # fmt: skip
    assert kit.service.messages(MAILBOX, "sentitems") == []
    assert set(sent.recipients) == {"zoe@example.org", "audit@example.org"}
    parsed = sent.parsed()
    assert parsed["Subject"] == "Wartungsbericht für Halle 3: Übersicht (250 €)"
    assert parsed["From"].addresses[0].display_name == "Jürgen Müller"
    assert 'src="cid:plan@ultimo"' in parsed.get_body(("html",)).get_content()
    by_cid = {p["Content-ID"]: p for p in parsed.walk() if p["Content-ID"]}
    assert by_cid["<plan@ultimo>"].get_payload(decode=True) == b"\x89PNG plan"
    assert by_cid["<plan@ultimo>"].get_content_disposition() == "inline"
    files = {
        p.get_filename(): p for p in parsed.walk() if p.get_content_disposition() == "attachment"
    }
    assert files["Prüfbericht.pdf"].get_payload(decode=True) == b"%PDF report"


async def test_save_to_sent_items_false_cannot_keep_a_big_message_out(kit: GraphKit) -> None:
    """Too big for one request, the message goes as a draft, which Exchange keeps in Sent
    Items whatever the route says; the note `relay check` prints says so."""
    raw = big_message(b"data", b"\x89PNG plan", os.urandom(3 * MiB))
    async with transport(kit, save_to_sent_items=False) as graph:
        await graph.send(outgoing(raw))
    [sent] = kit.service.sent
    assert (sent.route, sent.save_to_sent_items) == (SendRoute.DRAFT, True)


def test_note_for_relay_check() -> None:
    graph_false = RouteConfig(name="alerts", account="contoso", mailbox=MAILBOX,
                              transport=Transport.GRAPH, save_to_sent_items=False)  # fmt: skip
    note = graph_save_to_sent_items_note(graph_false)
    assert note is not None
    assert note.startswith("route alerts: save_to_sent_items: false makes relay use Graph's JSON")
    assert "Exchange keeps those in Sent Items regardless" in note
    for route in (
        RouteConfig(name="a", account="c", mailbox=MAILBOX, transport=Transport.GRAPH),
        RouteConfig(name="b", account="c", mailbox=MAILBOX, save_to_sent_items=False),
    ):
        assert graph_save_to_sent_items_note(route) is None


# -- Graph's answers -----------------------------------------------------------------------------


async def test_throttling_with_a_short_retry_after_is_waited_out(kit: GraphKit) -> None:
    """Two 429s and a 503 with Retry-After: 0 are waited out inside the attempt."""
    kit.service.throttle(retry_after=0, times=2)
    kit.service.unavailable(retry_after=0)
    async with transport(kit) as graph:
        await graph.send(outgoing(mime()))
    assert len(kit.service.sent) == 1
    assert sends(kit) == 4


async def test_a_long_retry_after_goes_back_to_the_scheduler(kit: GraphKit) -> None:
    kit.service.throttle(retry_after=120)
    async with transport(kit) as graph:
        with pytest.raises(TemporaryFailure) as caught:
            await graph.send(outgoing(mime()))
    assert caught.value.retry_after == 120
    assert caught.value.reply == Reply(
        451,
        "4.3.2",
        "Graph 429 ApplicationThrottled: Application is over its MailboxConcurrency limit.",
    )
    assert sends(kit) == 1


async def test_throttling_that_persists_ends_the_attempt(kit: GraphKit) -> None:
    kit.service.throttle(retry_after=0, times=4)
    async with transport(kit) as graph:
        with pytest.raises(TemporaryFailure) as caught:
            await graph.send(outgoing(mime()))
    assert (caught.value.retry_after, sends(kit)) == (0, 4)


async def test_503_without_retry_after_defers_at_once(kit: GraphKit) -> None:
    kit.service.unavailable()
    async with transport(kit) as graph:
        with pytest.raises(TemporaryFailure) as caught:
            await graph.send(outgoing(mime()))
    assert caught.value.retry_after is None
    assert caught.value.reply == Reply(
        451, "4.3.0", "Graph 503 ServiceUnavailable: Service Unavailable"
    )


async def test_401_is_retried_once_with_a_fresh_token(kit: GraphKit) -> None:
    tokens = IssuerTokens(kit, first=kit.token(lifetime=-60))
    async with transport(kit, tokens) as graph:
        await graph.send(outgoing(mime()))
    assert tokens.invalidated == 1
    assert len(kit.service.sent) == 1


async def test_a_token_graph_keeps_refusing_is_token_rejected(kit: GraphKit) -> None:
    """A token for the wrong audience twice: TokenRejected (the mail waits for an operator)."""
    tokens = IssuerTokens(kit, audience=EXCHANGE_AUDIENCE)
    async with transport(kit, tokens) as graph:
        with pytest.raises(TokenRejected) as caught:
            await graph.send(outgoing(mime()))
    assert tokens.invalidated == 1
    assert caught.value.reply == Reply(
        454,
        "4.7.0",
        "Graph 401 InvalidAuthenticationToken: Access token validation failure. Invalid audience.",
    )


async def test_missing_permission_is_token_rejected(kit: GraphKit) -> None:
    tokens = IssuerTokens(kit, roles={MAIL_READWRITE})
    async with transport(kit, tokens) as graph:
        with pytest.raises(TokenRejected) as caught:
            await graph.send(outgoing(mime()))
    assert caught.value.reply == Reply(
        454,
        "4.7.0",
        "Graph 403 ErrorAccessDenied: Access is denied. Check credentials and try again.",
    )


async def test_send_as_denied_is_permanent(kit: GraphKit) -> None:
    async with transport(kit) as graph:
        with pytest.raises(PermanentFailure) as caught:
            await graph.send(outgoing(mime(sender="Boss <boss@contoso.com>")))
    assert caught.value.reply == Reply(
        554,
        "5.7.1",
        "Graph 403 ErrorSendAsDenied: The user account which was used to submit this request does"
        " not have the right to send mail on behalf of the specified sending account. Cannot"
        " submit message.",
    )


async def test_unknown_mailbox_waits(kit: GraphKit) -> None:
    async with transport(kit, mailbox="gone@contoso.com") as graph:
        with pytest.raises(TemporaryFailure) as caught:
            await graph.send(outgoing(mime(sender="gone@contoso.com")))
    assert caught.value.reply == Reply(
        451,
        "4.3.0",
        "Graph 404 ErrorInvalidUser: The requested user 'gone@contoso.com' is invalid.",
    )


@pytest.mark.parametrize(
    ("status", "code", "message", "kind", "reply"),
    [
        (400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.",
         PermanentFailure, (554, "5.6.0")),
        (400, "BadRequest", "The maximum request length supported is 4MB.", PermanentFailure,
         (552, "5.3.4")),
        (413, "RequestEntityTooLarge", "", PermanentFailure, (552, "5.3.4")),
        (400, "ErrorInvalidRecipients", "At least one recipient is required, but none were found.",
         PermanentFailure, (554, "5.1.3")),
        (409, "ErrorSomethingNew", "Conflict.", PermanentFailure, (554, "5.0.0")),
        (404, "MailboxNotEnabledForRESTAPI", "REST API is not yet supported for this mailbox.",
         TemporaryFailure, (451, "4.3.0")),
        (500, "InternalServerError", "Boom.", TemporaryFailure, (451, "4.3.0")),
        (504, "GatewayTimeout", "", TemporaryFailure, (451, "4.3.0")),
    ],
)  # fmt: skip
async def test_graph_answers_become_failures(
    kit: GraphKit,
    status: int,
    code: str,
    message: str,
    kind: type[Exception],
    reply: tuple[int, str],
) -> None:
    kit.service.fail_next(status, code, message)
    async with transport(kit) as graph:
        with pytest.raises(kind) as caught:
            await graph.send(outgoing(mime()))
    assert type(caught.value) is kind
    assert caught.value.reply == Reply(*reply, f"Graph {status} {code}: {message}")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (
            {"status": 400, "code": "BadRequest", "message": "No.", "path": "*/send"},
            PermanentFailure,
        ),
        ({"status": 503, "code": "ServiceUnavailable", "method": "PUT"}, TemporaryFailure),
        ({"status": 400, "code": "BadRequest", "path": "*/attachments"}, PermanentFailure),
    ],
)
async def test_a_failed_draft_is_deleted(
    kit: GraphKit, fault: dict[str, object], kind: type[Exception]
) -> None:
    """Whatever step of the draft path fails, the attempt fails and leaves no draft behind."""
    kit.service.fail_next(**fault)  # type: ignore[arg-type]
    raw = big_message(os.urandom(4 * MiB), b"\x89PNG", os.urandom(5 * MiB // 2))
    async with transport(kit) as graph:
        with pytest.raises(kind):
            await graph.send(outgoing(raw, "zoe@example.org"))
    assert kit.service.sent == []
    assert kit.service.messages(MAILBOX, "drafts") == []
    assert sends(kit, "/messages") == 1  # the draft was made


# -- concurrency -------------------------------------------------------------------------------


async def test_at_most_max_concurrency_requests_per_mailbox(kit: GraphKit) -> None:
    """Six messages at once with max_concurrency=4: four requests reach Graph (parked there),
    the transport holds back the other two; Graph never has a fifth, so never answers 429."""
    hold = kit.service.hold(MAILBOX)
    async with transport(kit, max_concurrency=4) as graph:
        sending = [asyncio.create_task(graph.send(outgoing(mime()))) for _ in range(6)]
        await hold.arrived(4)
        assert "in_flight=4/4" in repr(graph)
        hold.release()
        await asyncio.gather(*sending)
    assert len(kit.service.sent) == 6
    assert [r.status for r in kit.service.requests] == [202] * 6


# -- network trouble and the exception boundary ----------------------------------------------------


async def test_nothing_listening_is_upstream_unavailable(kit: GraphKit) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with transport(kit, graph_url=f"https://127.0.0.1:{port}/v1.0") as graph:
        with pytest.raises(UpstreamUnavailable) as caught:
            await graph.send(outgoing(mime()))
    assert isinstance(caught.value, ConnectionError)
    assert caught.value.reply.status == "4.4.1"
    assert caught.value.reply.text.startswith("Graph unreachable: ClientConnectorError: ")


async def test_untrusted_certificate_is_a_tls_failure(kit: GraphKit) -> None:
    async with transport(kit, ssl_context=None) as graph:
        with pytest.raises(UpstreamUnavailable) as caught:
            await graph.send(outgoing(mime()))
    assert caught.value.reply.status == "4.7.5"
    assert caught.value.reply.text.startswith(
        "TLS with Graph failed: ClientConnectorCertificateError"
    )
    assert kit.service.requests == []


async def test_a_silent_server_is_upstream_timeout(kit: GraphKit) -> None:
    """A server that accepts the connection and never answers: UpstreamTimeout."""
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with transport(kit, graph_url=f"http://127.0.0.1:{port}/v1.0", timeout=0.2) as graph:
            with pytest.raises(UpstreamTimeout) as caught:
                await graph.send(outgoing(mime()))
    finally:
        server.close()
        await server.wait_closed()
    assert connected.is_set()
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.reply.text.startswith("Graph timed out: ")


def exception_classes(*modules: ModuleType) -> Iterator[type[BaseException]]:
    """Every exception class these modules define or export, except warnings (issued, never
    raised)."""
    for module in modules:
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and not issubclass(value, Warning):
                yield value


def test_every_aiohttp_exception_is_mapped() -> None:
    """Each exception class of aiohttp (client, HTTP parser, streams, websockets) is caught at
    the boundary and becomes UpstreamTimeout (timeouts) or UpstreamUnavailable."""
    classes = set(
        exception_classes(
            aiohttp, aiohttp.client_exceptions, http_exceptions, streams, http_websocket
        )
    )
    classes -= {BaseException, Exception, TimeoutError, OSError, ValueError, TypeError}
    classes = {c for c in classes if c.__module__.startswith("aiohttp")}
    assert len(classes) > 40
    for cls in classes:
        assert issubclass(cls, MAPPED_EXCEPTIONS), cls
        row = mapping_for(cls)
        assert row is not None, cls
        expected = UpstreamTimeout if issubclass(cls, TimeoutError) else UpstreamUnavailable
        assert row[1] is expected, cls


def test_mapped_errors_carry_no_query_strings() -> None:
    """An upload URL carries a credential in its query: it never reaches a reply text."""
    failure = map_http_error(aiohttp.InvalidURL("https://up.example/s/1?authtoken=SECRET"))
    assert isinstance(failure, UpstreamUnavailable)
    assert "SECRET" not in failure.reply.text
    assert failure.reply.text == "Graph unreachable: InvalidURL: https://up.example/s/1?…"
    with pytest.raises(KeyError):
        map_http_error(KeyError("not ours"))


# -- lifecycle -----------------------------------------------------------------------------------


async def test_closed_transport_refuses_and_leaves_a_given_session_open(kit: GraphKit) -> None:
    graph = transport(kit, session=kit.http)
    await graph.send(outgoing(mime()))
    await graph.aclose()
    await graph.aclose()
    assert repr(graph) == (
        f"<GraphTransport {MAILBOX} in_flight=0/4 save_to_sent_items=True closed>"
    )
    with pytest.raises(RuntimeError, match="is closed"):
        await graph.send(outgoing(mime()))
    assert not kit.http.closed


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "kind", "reply", "wait"),
    [
        (502, b"<html>Bad gateway</html>", None, TemporaryFailure, (451, "4.3.0", "Graph 502"),
         None),
        (429, b"", "soon", TemporaryFailure, (451, "4.3.2", "Graph 429"), None),
        (408, b"", "2", TemporaryFailure, (451, "4.3.0", "Graph 408"), 2.0),
        (304, b"", None, TemporaryFailure, (451, "4.3.0", "Graph answered 304 unexpectedly"), None),
        (400, b'{"error": "flat"}', None, PermanentFailure, (554, "5.0.0", "Graph 400"), None),
    ],
)  # fmt: skip
def test_answers_without_graph_error_json(
    status: int,
    body: bytes,
    retry_after: str | None,
    kind: type[Exception],
    reply: tuple[int, str, str],
    wait: float | None,
) -> None:
    """A proxy's HTML page, an empty body or an odd status still gets a clear reply."""
    failure = graph_failure(status, body, retry_after)
    assert type(failure) is kind
    assert (failure.reply, failure.retry_after) == (Reply(*reply), wait)


async def test_a_success_answer_without_an_id_defers(kit: GraphKit) -> None:
    """Graph answers the draft creation 201 but without the draft's id: try again later."""
    kit.service.fail_next(201, "Odd", "no id here", method="POST", path="*/messages")
    async with transport(kit) as graph:
        with pytest.raises(TemporaryFailure) as caught:
            await graph.send(outgoing(big_message(b"data", b"\x89PNG", os.urandom(3 * MiB))))
    assert caught.value.reply == Reply(451, "4.3.0", "Graph answered 201 without 'id'")


class FailingAfter(IssuerTokens):
    """Hands out `calls` tokens, then the identity platform is down."""

    def __init__(self, kit: GraphKit, calls: int) -> None:
        super().__init__(kit)
        self.calls = calls

    async def token(self, scope: str) -> str:
        self.calls -= 1
        if self.calls < 0:
            raise TokenUnavailable(Reply(451, "4.4.3", "identity platform unreachable"))
        return await super().token(scope)


@pytest.mark.parametrize("tokens_left", [None, 3])
async def test_a_draft_that_cannot_be_deleted_is_logged(
    kit: GraphKit, caplog: pytest.LogCaptureFixture, tokens_left: int | None
) -> None:
    """The send step fails and so does deleting the draft (Graph answers 500, or no token can
    be had): the attempt fails with the send step's reply and the leftover draft is logged."""
    kit.service.fail_next(400, "BadRequest", "No.", path="*/send")
    if tokens_left is None:
        kit.service.fail_next(500, "InternalServerError", "Boom.", method="DELETE")
        tokens = IssuerTokens(kit)
        logged = "deleting an unsent draft answered 500"
    else:  # create the draft, add the attachment, send: then no more tokens
        tokens = FailingAfter(kit, tokens_left)
        logged = "could not delete an unsent draft: 451 4.4.3 identity platform unreachable"
    raw = big_message(b"data", b"\x89PNG", os.urandom(3 * MiB))
    async with transport(kit, tokens) as graph:
        with pytest.raises(PermanentFailure) as caught:
            await graph.send(outgoing(raw, "zoe@example.org"))
    assert caught.value.reply.text == "Graph 400 BadRequest: No."
    assert len(kit.service.messages(MAILBOX, "drafts")) == 1
    assert f"graph {MAILBOX}: {logged}" in caplog.messages
