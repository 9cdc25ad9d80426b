"""The emulated Graph, as a client sees it over HTTPS: every behaviour the relay and the importer
rely on, with Graph's codes and texts from the reference (§6, §7)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import pytest
from graphkit import FOREIGN, MAILBOX, OTHER, SEND_AS, GraphKit, graph_kit, issuer, mime

from relay.testing.directory import MAIL_READWRITE, MAIL_SEND
from relay.testing.graph import (
    ACCESS_DENIED,
    DELTA_TOKEN_GONE,
    FOLDER_EXISTS,
    ID_MALFORMED,
    INEFFICIENT_FILTER,
    INVALID_BASE64,
    ITEM_NOT_FOUND,
    MAIL_READ,
    REQUEST_TOO_LARGE,
    SEND_AS_DENIED,
    THROTTLED_CONCURRENCY,
    SendRoute,
)
from relay.testing.tokens import EXCHANGE_AUDIENCE, GRAPH_AUDIENCE, User

USER = f"/users/{MAILBOX}"
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
async def kit() -> AsyncIterator[GraphKit]:
    async with graph_kit() as k:
        yield k


async def call(
    kit: GraphKit,
    method: str,
    path: str,
    *,
    json: object = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One request, with a full-rights token unless `token` is given: (status, body, headers)."""
    url = path if path.startswith("https://") else kit.url(path)
    hdrs = {**(kit.auth() if token is None else token), **(headers or {})}
    stream = io.BytesIO(data) if data is not None else None  # aiohttp warns on big raw bytes
    async with kit.http.request(method, url, json=json, data=stream, headers=hdrs) as r:
        raw = await r.read()
        body = await r.json() if raw and r.content_type == "application/json" else raw
        return r.status, body, dict(r.headers)


def error(body: Any) -> tuple[str, str]:
    return body["error"]["code"], body["error"]["message"]


# -- authentication and authorization ----------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "Access token is empty."),
        ("Bearer ", "Access token is empty."),
        ("Basic cm9ib3Q6cGFzcw==", "Access token is empty."),
        ("Bearer not-a-jwt", "CompactToken parsing failed with error code: 80049217"),
        ("expired", "Lifetime validation failed, the token is expired."),
        ("exchange", "Access token validation failure. Invalid audience."),
    ],
)
async def test_bad_tokens_get_401_with_graphs_texts(
    kit: GraphKit, token: str | None, message: str
) -> None:
    """A request without a usable bearer token: 401 InvalidAuthenticationToken, the exact
    message for the problem, and a WWW-Authenticate: Bearer challenge."""
    if token == "expired":
        header = kit.auth(lifetime=-60)
    elif token == "exchange":
        header = kit.auth(audience=EXCHANGE_AUDIENCE)
    else:
        header = {} if token is None else {"Authorization": token}
    status, body, headers = await call(kit, "GET", USER + "/messages", token=header)
    assert status == 401
    assert error(body) == ("InvalidAuthenticationToken", message)
    assert headers["WWW-Authenticate"].startswith("Bearer ")


async def test_error_json_has_inner_error_and_request_ids(kit: GraphKit) -> None:
    """Errors carry {code, message, innerError{date, request-id, client-request-id}}; the ids
    are also response headers, and a client-request-id sent by the client comes back."""
    status, body, headers = await call(
        kit, "GET", USER + "/messages", token={}, headers={"client-request-id": "abc-123"}
    )
    assert status == 401
    inner = body["error"]["innerError"]
    assert set(body["error"]) == {"code", "message", "innerError"}
    assert set(inner) == {"date", "request-id", "client-request-id"}
    assert inner["request-id"] == headers["request-id"]
    assert inner["client-request-id"] == headers["client-request-id"] == "abc-123"
    datetime.strptime(inner["date"], "%Y-%m-%dT%H:%M:%S")


@pytest.mark.parametrize(
    ("method", "path", "roles", "allowed"),
    [
        ("GET", USER + "/messages", {MAIL_READ}, True),
        ("GET", USER + "/messages", {MAIL_READWRITE}, True),
        ("GET", USER + "/messages", {MAIL_SEND}, False),
        ("POST", USER + "/mailFolders/inbox/childFolders", {MAIL_READ}, False),
        ("POST", USER + "/mailFolders/inbox/childFolders", {MAIL_READWRITE}, True),
        ("POST", USER + "/sendMail", {MAIL_READWRITE}, False),
        ("POST", USER + "/sendMail", {MAIL_SEND}, True),
    ],
)
async def test_roles_decide_access(
    kit: GraphKit, method: str, path: str, roles: set[str], allowed: bool
) -> None:
    """Mail.Send sends; Mail.ReadWrite reads and writes; Mail.Read only reads. Without the
    role: 403 ErrorAccessDenied "Access is denied. Check credentials and try again."."""
    payload: dict[str, object] = (
        {"message": {"subject": "x", "toRecipients": [{"emailAddress": {"address": "a@b.c"}}]}}
        if path.endswith("sendMail")
        else {"displayName": "Imported"}
    )
    status, body, _ = await call(kit, method, path, json=payload, token=kit.auth(roles=roles))
    if allowed:
        assert status in (200, 201, 202)
    else:
        assert status == 403
        assert error(body) == ("ErrorAccessDenied", ACCESS_DENIED)


@pytest.mark.parametrize("upn", ["nobody@contoso.com", FOREIGN])
async def test_unknown_user_or_other_tenant_gets_404_invalid_user(kit: GraphKit, upn: str) -> None:
    """A mailbox that does not exist, or one in another tenant than the token's, is invalid."""
    status, body, _ = await call(kit, "GET", f"/users/{upn}/messages")
    assert status == 404
    assert error(body) == ("ErrorInvalidUser", f"The requested user '{upn}' is invalid.")


async def test_unknown_segment_is_a_graph_bad_request(kit: GraphKit) -> None:
    status, body, _ = await call(kit, "GET", USER + "/calendars")
    assert status == 400
    assert error(body) == ("BadRequest", "Resource not found for the segment 'calendars'.")


# -- folders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inbox", "Inbox", "INBOX"])
async def test_well_known_folder_names_are_case_insensitive(kit: GraphKit, name: str) -> None:
    inbox = next(f for f in kit.service.folders(MAILBOX) if f.well_known == "inbox")
    status, body, _ = await call(kit, "GET", f"{USER}/mailFolders/{name}")
    assert status == 200
    assert body["id"] == inbox.id
    assert body["displayName"] == "Inbox"
    status, by_id, _ = await call(kit, "GET", f"{USER}/mailFolders/{inbox.id}")
    assert (status, by_id["displayName"]) == (200, "Inbox")


async def test_top_level_folders_are_listed(kit: GraphKit) -> None:
    status, body, _ = await call(kit, "GET", f"{USER}/mailFolders?$top=50")
    assert status == 200
    names = {f["displayName"] for f in body["value"]}
    assert {"Inbox", "Drafts", "Sent Items", "Deleted Items", "Archive"} <= names


async def test_child_folder_create_list_and_duplicate(kit: GraphKit) -> None:
    """POST childFolders makes a folder (201); the same name again (any case) is
    ErrorFolderExists; $filter=displayName eq '…' finds it."""
    path = f"{USER}/mailFolders/inbox/childFolders"
    status, made, _ = await call(kit, "POST", path, json={"displayName": "Imported"})
    assert status == 201
    assert made["displayName"] == "Imported"
    assert made["totalItemCount"] == 0
    inbox = next(f for f in kit.service.folders(MAILBOX) if f.well_known == "inbox")
    assert made["parentFolderId"] == inbox.id

    status, body, _ = await call(kit, "POST", path, json={"displayName": "imported"})
    assert status == 409
    assert error(body) == ("ErrorFolderExists", FOLDER_EXISTS.format(name="imported"))
    assert error(body)[1] == (
        "A folder with the specified name already exists., Could not create folder 'imported'."
    )

    await call(kit, "POST", path, json={"displayName": "Other"})
    status, found, _ = await call(kit, "GET", path + "?$filter=displayName eq 'Imported'")
    assert status == 200
    assert [f["id"] for f in found["value"]] == [made["id"]]
    status, nested, _ = await call(kit, "GET", f"{USER}/mailFolders/{made['id']}")
    assert (status, nested["displayName"]) == (200, "Imported")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("AAMkADnosuchfolder", ITEM_NOT_FOUND),
        ("clutter", "Default folder clutter not found."),
    ],
)
async def test_missing_folder_is_item_not_found(kit: GraphKit, ref: str, message: str) -> None:
    status, body, _ = await call(kit, "GET", f"{USER}/mailFolders/{ref}/messages")
    assert status == 404
    assert error(body) == ("ErrorItemNotFound", message)


# -- messages ----------------------------------------------------------------------------------


def rich_message() -> bytes:
    message = EmailMessage(policy=SMTP)
    message["From"] = "Jürgen Müller <juergen@example.de>"
    message["To"] = "Robot <robot@contoso.com>, Ops <ops@contoso.com>"
    message["Cc"] = "Ana <ana@example.org>"
    message["Subject"] = "Störung an Pumpe 7"
    message["Message-ID"] = "<m1@example.de>"
    message["Date"] = "Sun, 01 Mar 2026 07:59:00 +0000"
    message.set_content("Die Pumpe 7 meldet zu niedrigen Druck.\n")
    message.add_attachment(b"%PDF-1.4 ...", maintype="application", subtype="pdf", filename="r.pdf")
    return message.as_bytes()


async def test_message_json_is_derived_from_the_mime(kit: GraphKit) -> None:
    mid = kit.service.deliver(MAILBOX, rich_message(), received=T0)
    inbox = next(f for f in kit.service.folders(MAILBOX) if f.well_known == "inbox")
    status, m, _ = await call(kit, "GET", f"{USER}/messages/{mid}")
    assert status == 200
    assert m["id"] == mid
    assert m["subject"] == "Störung an Pumpe 7"
    assert m["from"] == {"emailAddress": {"name": "Jürgen Müller", "address": "juergen@example.de"}}
    assert [r["emailAddress"]["address"] for r in m["toRecipients"]] == [
        "robot@contoso.com",
        "ops@contoso.com",
    ]
    assert m["ccRecipients"] == [{"emailAddress": {"name": "Ana", "address": "ana@example.org"}}]
    assert m["internetMessageId"] == "<m1@example.de>"
    assert m["receivedDateTime"] == "2026-03-01T08:00:00Z"
    assert m["sentDateTime"] == "2026-03-01T07:59:00Z"
    assert m["isRead"] is False
    assert m["isDraft"] is False
    assert m["parentFolderId"] == inbox.id
    assert m["hasAttachments"] is True
    assert m["bodyPreview"] == "Die Pumpe 7 meldet zu niedrigen Druck."
    assert m["@odata.etag"] == f'W/"{m["changeKey"]}"'


async def test_body_is_html_unless_text_is_preferred(kit: GraphKit) -> None:
    mid = kit.service.deliver(MAILBOX, mime(body="a < b\n"))
    _, html_body, _ = await call(kit, "GET", f"{USER}/messages/{mid}?$select=body")
    assert html_body["body"]["contentType"] == "html"
    assert "a &lt; b" in html_body["body"]["content"]
    prefer = {"Prefer": 'outlook.body-content-type="text"'}
    _, text_body, _ = await call(kit, "GET", f"{USER}/messages/{mid}?$select=body", headers=prefer)
    assert text_body["body"] == {"contentType": "text", "content": "a < b\r\n"}


async def test_value_is_the_exact_mime_as_text_plain(kit: GraphKit) -> None:
    raw = rich_message()
    mid = kit.service.deliver(MAILBOX, raw)
    status, body, headers = await call(kit, "GET", f"{USER}/messages/{mid}/$value")
    assert status == 200
    assert body == raw
    assert headers["Content-Type"] == "text/plain"


async def test_list_pages_with_absolute_next_links_followed_verbatim(kit: GraphKit) -> None:
    """25 messages, $top=10: pages of 10, 10, 5; each nextLink is an absolute URL carrying the
    query; the last page has none. $select keeps id and @odata.etag."""
    for i in range(25):
        kit.service.deliver(MAILBOX, mime(subject=f"m{i}"), received=T0 + timedelta(minutes=i))
    url: str | None = f"{USER}/mailFolders/inbox/messages?$select=subject&$top=10"
    pages = []
    while url:
        status, body, _ = await call(kit, "GET", url)
        assert status == 200
        pages.append([m["subject"] for m in body["value"]])
        assert all(set(m) == {"@odata.etag", "id", "subject"} for m in body["value"])
        url = body.get("@odata.nextLink")
        if url:
            assert url.startswith(kit.base + USER + "/mailFolders/inbox/messages?")
    assert [len(p) for p in pages] == [10, 10, 5]
    assert pages[0][0] == "m24"  # newest first by default
    subjects = [s for page in pages for s in page]
    assert sorted(subjects, key=lambda s: int(s[1:])) == [f"m{i}" for i in range(25)]


async def test_default_page_is_ten_and_top_is_bounded(kit: GraphKit) -> None:
    for i in range(12):
        kit.service.deliver(MAILBOX, mime(subject=f"m{i}"))
    _, body, _ = await call(kit, "GET", f"{USER}/messages")
    assert len(body["value"]) == 10
    assert "@odata.nextLink" in body
    status, _, _ = await call(kit, "GET", f"{USER}/messages?$top=1000")
    assert status == 200
    status, body, _ = await call(kit, "GET", f"{USER}/messages?$top=1001")
    assert status == 400


async def test_filter_and_orderby_subset(kit: GraphKit) -> None:
    """receivedDateTime ge/lt, isRead eq and internetMessageId eq filter; $orderby sorts."""
    ids = [
        kit.service.deliver(
            MAILBOX,
            mime(subject=f"m{i}", Message_ID=f"<n{i}@x>"),
            received=T0 + timedelta(hours=i),
            is_read=i % 2 == 0,
        )
        for i in range(6)
    ]
    since = (T0 + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    until = (T0 + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, body, _ = await call(
        kit,
        "GET",
        f"{USER}/mailFolders/inbox/messages?$filter=receivedDateTime ge {since} and "
        f"receivedDateTime lt {until} and isRead eq false&$orderby=receivedDateTime asc",
    )
    assert status == 200
    assert [m["id"] for m in body["value"]] == [ids[3]]

    status, body, _ = await call(
        kit, "GET", f"{USER}/messages?$filter=internetMessageId eq '<n4@x>'&$select=id"
    )
    assert [m["id"] for m in body["value"]] == [ids[4]]

    status, body, _ = await call(
        kit,
        "GET",
        f"{USER}/messages?$filter=receivedDateTime gt {since}&$orderby=receivedDateTime asc",
    )
    assert [m["id"] for m in body["value"]] == ids[3:]


@pytest.mark.parametrize(
    "query",
    [
        "$filter=isRead eq false&$orderby=receivedDateTime asc",
        "$filter=isRead eq false and receivedDateTime ge 2026-01-01T00:00:00Z"
        "&$orderby=receivedDateTime desc",
    ],
)
async def test_orderby_not_leading_the_filter_is_inefficient(kit: GraphKit, query: str) -> None:
    """§7.1: $orderby properties must come first in $filter, else 400 InefficientFilter."""
    status, body, _ = await call(kit, "GET", f"{USER}/mailFolders/inbox/messages?{query}")
    assert status == 400
    assert error(body) == ("InefficientFilter", INEFFICIENT_FILTER)
    assert error(body)[1] == "The restriction or sort order is too complex for this operation."


async def test_unknown_select_and_bad_filter_are_refused(kit: GraphKit) -> None:
    status, body, _ = await call(kit, "GET", f"{USER}/messages?$select=id,colour")
    assert status == 400
    assert error(body) == (
        "RequestBroker--ParseUri",
        "Could not find a property named 'colour' on type 'microsoft.graph.message'.",
    )
    status, body, _ = await call(kit, "GET", f"{USER}/messages?$filter=isRead eq")
    assert (status, error(body)) == (400, ("BadRequest", "Invalid filter clause"))


async def test_mark_read_returns_the_updated_message(kit: GraphKit) -> None:
    mid = kit.service.deliver(MAILBOX, mime())
    status, body, _ = await call(kit, "PATCH", f"{USER}/messages/{mid}", json={"isRead": True})
    assert status == 200
    assert body["isRead"] is True
    assert kit.service.messages(MAILBOX, "inbox")[0].is_read is True


async def test_move_gives_a_new_id_and_the_old_one_is_gone(kit: GraphKit) -> None:
    """POST move → 201 with the message in its new folder under a new id; the old id → 404."""
    mid = kit.service.deliver(MAILBOX, mime())
    _, folder, _ = await call(
        kit, "POST", f"{USER}/mailFolders/inbox/childFolders", json={"displayName": "Imported"}
    )
    status, moved, _ = await call(
        kit, "POST", f"{USER}/messages/{mid}/move", json={"destinationId": folder["id"]}
    )
    assert status == 201
    assert moved["id"] != mid
    assert moved["parentFolderId"] == folder["id"]
    status, body, _ = await call(kit, "GET", f"{USER}/messages/{mid}")
    assert status == 404
    assert error(body) == ("ErrorItemNotFound", ITEM_NOT_FOUND)
    status, again, _ = await call(
        kit, "POST", f"{USER}/messages/{moved['id']}/move", json={"destinationId": "Archive"}
    )
    assert status == 201
    assert [m.id for m in kit.service.messages(MAILBOX, "archive")] == [again["id"]]


async def test_delete_then_not_found(kit: GraphKit) -> None:
    mid = kit.service.deliver(MAILBOX, mime())
    status, body, _ = await call(kit, "DELETE", f"{USER}/messages/{mid}")
    assert (status, body) == (204, b"")
    status, body, _ = await call(kit, "DELETE", f"{USER}/messages/{mid}")
    assert (status, error(body)) == (404, ("ErrorItemNotFound", ITEM_NOT_FOUND))


async def test_malformed_id(kit: GraphKit) -> None:
    status, body, _ = await call(kit, "GET", f"{USER}/messages/12345")
    assert (status, error(body)) == (400, ("ErrorInvalidIdMalformed", ID_MALFORMED))


# -- delta -------------------------------------------------------------------------------------


async def delta_round(
    kit: GraphKit, url: str, page_size: int = 2
) -> tuple[list[dict[str, Any]], str, int]:
    """Follow nextLinks to the deltaLink: (items, deltaLink, pages)."""
    items: list[dict[str, Any]] = []
    pages = 0
    while True:
        status, body, headers = await call(
            kit, "GET", url, headers={"Prefer": f"odata.maxpagesize={page_size}"}
        )
        assert status == 200, body
        assert headers["Preference-Applied"] == f"odata.maxpagesize={page_size}"
        assert len(body["value"]) <= page_size
        items += body["value"]
        pages += 1
        if "@odata.deltaLink" in body:
            assert "$deltatoken=" in body["@odata.deltaLink"]
            return items, body["@odata.deltaLink"], pages
        assert "$skiptoken=" in body["@odata.nextLink"]
        url = body["@odata.nextLink"]


async def test_delta_rounds_report_changes_and_removals(kit: GraphKit) -> None:
    """Round 1 pages through the folder and ends with a deltaLink. Round 2, after one message
    is marked read, one moved out, one deleted and one delivered, returns just those: the read
    and the new message in full, the moved and deleted ones as @removed. Round 3 is empty."""
    ids = [kit.service.deliver(MAILBOX, mime(subject=f"m{i}")) for i in range(5)]
    first, link, pages = await delta_round(
        kit, f"{USER}/mailFolders/inbox/messages/delta?$select=subject,isRead"
    )
    assert pages == 3
    assert sorted(m["id"] for m in first) == sorted(ids)
    assert all(set(m) == {"@odata.type", "@odata.etag", "id", "subject", "isRead"} for m in first)

    await call(kit, "PATCH", f"{USER}/messages/{ids[0]}", json={"isRead": True})
    await call(kit, "POST", f"{USER}/messages/{ids[1]}/move", json={"destinationId": "archive"})
    await call(kit, "DELETE", f"{USER}/messages/{ids[2]}")
    new = kit.service.deliver(MAILBOX, mime(subject="new"))

    second, link, _ = await delta_round(kit, link)
    removed = {m["id"]: m["@removed"] for m in second if "@removed" in m}
    present = {m["id"]: m for m in second if "@removed" not in m}
    assert removed == {ids[1]: {"reason": "deleted"}, ids[2]: {"reason": "deleted"}}
    assert set(present) == {ids[0], new}
    assert present[ids[0]]["isRead"] is True
    assert all(m["@odata.type"] == "#microsoft.graph.message" for m in second)

    third, _, pages = await delta_round(kit, link)
    assert (third, pages) == ([], 1)


async def test_delta_filter_on_received_time(kit: GraphKit) -> None:
    kit.service.deliver(MAILBOX, mime(subject="old"), received=T0)
    kit.service.deliver(MAILBOX, mime(subject="new"), received=T0 + timedelta(days=1))
    items, _, _ = await delta_round(
        kit,
        f"{USER}/mailFolders/inbox/messages/delta?$select=subject"
        f"&$filter=receivedDateTime ge {(T0 + timedelta(hours=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}",
    )
    assert [m["subject"] for m in items] == ["new"]
    status, _, _ = await call(
        kit, "GET", f"{USER}/mailFolders/inbox/messages/delta?$filter=isRead eq false"
    )
    assert status == 400


async def test_dead_delta_token_is_410_sync_state_not_found(kit: GraphKit) -> None:
    """After the tokens are invalidated, the saved deltaLink (and any skiptoken) gets 410 with
    code syncStateNotFound and a Location to start over from."""
    for i in range(3):
        kit.service.deliver(MAILBOX, mime(subject=f"m{i}"))
    url = f"{USER}/mailFolders/inbox/messages/delta"
    _, page, _ = await call(kit, "GET", url, headers={"Prefer": "odata.maxpagesize=2"})
    _, link, _ = await delta_round(kit, url, page_size=5)
    kit.service.invalidate_delta_tokens(MAILBOX)
    for dead in (link, page["@odata.nextLink"]):
        status, body, headers = await call(kit, "GET", dead)
        assert status == 410
        assert error(body) == ("syncStateNotFound", DELTA_TOKEN_GONE)
        assert headers["Location"].endswith("/messages/delta")
    items, _, _ = await delta_round(kit, headers["Location"], page_size=5)
    assert len(items) == 3


# -- sendMail ----------------------------------------------------------------------------------


async def test_sendmail_mime_is_recorded_exactly_and_saved(kit: GraphKit) -> None:
    """POST sendMail, text/plain base64 (with line breaks): 202, empty body. The exact MIME is
    recorded with its recipients (Bcc included) and a copy lands in Sent Items."""
    raw = mime(Bcc="hidden@example.org", Cc="cc@example.org")
    encoded = base64.encodebytes(raw)  # 76-character lines
    status, body, _ = await call(
        kit, "POST", f"{USER}/sendMail", data=encoded, headers={"Content-Type": "text/plain"}
    )
    assert (status, body) == (202, b"")
    [sent] = kit.service.sent
    assert sent.mime == raw
    assert sent.route is SendRoute.SENDMAIL_MIME
    assert sent.save_to_sent_items is True
    assert sent.recipients == ("ops@example.org", "cc@example.org", "hidden@example.org")
    [copy] = kit.service.messages(MAILBOX, "sentitems")
    assert copy.id == sent.sent_items_id
    assert copy.mime == raw


async def test_sendmail_json_with_save_false_and_attachment(kit: GraphKit) -> None:
    payload = {
        "message": {
            "subject": "Bericht für März",
            "body": {"contentType": "text", "content": "See attached."},
            "toRecipients": [{"emailAddress": {"name": "Zoë", "address": "zoe@example.org"}}],
            "bccRecipients": [{"emailAddress": {"address": "audit@example.org"}}],
            "internetMessageHeaders": [{"name": "X-Ticket", "value": "42"}],
            "attachments": [
                {
                    "@odata.type": "#microsoft.graph.fileAttachment",
                    "name": "r.csv",
                    "contentType": "text/csv",
                    "contentBytes": base64.b64encode(b"a,b\n1,2\n").decode(),
                }
            ],
        },
        "saveToSentItems": False,
    }
    status, body, _ = await call(kit, "POST", f"{USER}/sendMail", json=payload)
    assert (status, body) == (202, b"")
    [sent] = kit.service.sent
    assert sent.route is SendRoute.SENDMAIL_JSON
    assert (sent.save_to_sent_items, sent.sent_items_id) == (False, None)
    assert kit.service.messages(MAILBOX, "sentitems") == []
    assert sent.recipients == ("zoe@example.org", "audit@example.org")
    parsed = sent.parsed()
    assert parsed["Subject"] == "Bericht für März"
    assert parsed["From"].addresses[0].addr_spec == MAILBOX
    assert parsed["X-Ticket"] == "42"
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "r.csv"
    assert attachment.get_payload(decode=True) == b"a,b\n1,2\n"


async def test_sendmail_invalid_base64(kit: GraphKit) -> None:
    status, body, _ = await call(
        kit, "POST", f"{USER}/sendMail", data=b"not base64!", headers={"Content-Type": "text/plain"}
    )
    assert status == 400
    assert error(body) == ("ErrorMimeContentInvalidBase64String", INVALID_BASE64)
    assert error(body)[1] == "Invalid base64 string for MIME content."
    assert kit.service.sent == []


async def test_sendmail_without_recipients(kit: GraphKit) -> None:
    raw = base64.b64encode(b"From: robot@contoso.com\r\nSubject: x\r\n\r\nhi\r\n")
    status, body, _ = await call(
        kit, "POST", f"{USER}/sendMail", data=raw, headers={"Content-Type": "text/plain"}
    )
    assert (status, error(body)[0]) == (400, "ErrorInvalidRecipients")


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        (f"Robot <{MAILBOX}>", True),
        (f"Alerts <{SEND_AS}>", True),
        ("Boss <boss@contoso.com>", False),
    ],
)
async def test_send_as(kit: GraphKit, sender: str, allowed: bool) -> None:
    """From must be the mailbox or one it may send as; otherwise 403 ErrorSendAsDenied."""
    raw = base64.b64encode(mime(sender=sender))
    status, body, _ = await call(
        kit, "POST", f"{USER}/sendMail", data=raw, headers={"Content-Type": "text/plain"}
    )
    if allowed:
        assert status == 202
    else:
        assert status == 403
        assert error(body) == ("ErrorSendAsDenied", SEND_AS_DENIED)
        assert error(body)[1] == (
            "The user account which was used to submit this request does not have the right to"
            " send mail on behalf of the specified sending account. Cannot submit message."
        )


async def test_request_over_4mb_is_refused(kit: GraphKit) -> None:
    """Graph caps request bodies at 4 MB: 400 BadRequest "The maximum request length supported
    is 4MB." (the emulator pins this form of the two the reference lists)."""
    raw = base64.b64encode(mime(body="x" * (3 * 1024 * 1024 + 200)))
    assert len(raw) > 4 * 1024 * 1024
    status, body, _ = await call(
        kit, "POST", f"{USER}/sendMail", data=raw, headers={"Content-Type": "text/plain"}
    )
    assert status == 400
    assert error(body) == ("BadRequest", REQUEST_TOO_LARGE)
    assert error(body)[1] == "The maximum request length supported is 4MB."
    assert kit.service.sent == []


# -- drafts, attachments, upload sessions --------------------------------------------------------


async def upload(
    kit: GraphKit, url: str, data: bytes, chunk: int
) -> list[tuple[int, Any, dict[str, str]]]:
    answers = []
    for start in range(0, len(data), chunk):
        part = data[start : start + chunk]
        end = start + len(part) - 1
        answers.append(
            await call(
                kit,
                "PUT",
                url,
                data=part,
                token={},
                headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"},
            )
        )
    return answers


async def test_draft_upload_session_and_send(kit: GraphKit) -> None:
    """A MIME draft (201, isDraft) gets a 9 MB attachment through an upload session (PUTs of
    ≤ 4 MB without Authorization: 200 with nextExpectedRanges, the last 201 with Location)
    and a small inline image through POST attachments; send → 202. The recorded MIME has both
    attachments intact, the draft is gone and a copy is in Sent Items."""
    draft_mime = mime(subject="Große Datei", Bcc="audit@example.org")
    status, draft, _ = await call(
        kit,
        "POST",
        f"{USER}/messages",
        data=base64.b64encode(draft_mime),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 201
    assert draft["isDraft"] is True
    assert draft["subject"] == "Große Datei"
    drafts = next(f for f in kit.service.folders(MAILBOX) if f.well_known == "drafts")
    assert draft["parentFolderId"] == drafts.id

    big = bytes(range(256)) * (9 * 4096)  # 9 MiB
    status, session, _ = await call(
        kit,
        "POST",
        f"{USER}/messages/{draft['id']}/attachments/createUploadSession",
        json={"AttachmentItem": {"attachmentType": "file", "name": "dump.bin", "size": len(big)}},
    )
    assert status == 201
    assert session["nextExpectedRanges"] == ["0-"]
    answers = await upload(kit, session["uploadUrl"], big, 4 * 1024 * 1024)
    assert [a[0] for a in answers] == [200, 200, 201]
    assert answers[0][1]["nextExpectedRanges"] == [f"{4 * 1024 * 1024}-"]
    assert "/attachments('" in answers[-1][2]["Location"]
    puts = [r for r in kit.service.requests if r.method == "PUT"]
    assert [r.authorization for r in puts] == [False, False, False]

    image = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    status, attachment, _ = await call(
        kit,
        "POST",
        f"{USER}/messages/{draft['id']}/attachments",
        json={
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": "logo.png",
            "contentType": "image/png",
            "contentBytes": base64.b64encode(image).decode(),
            "isInline": True,
            "contentId": "logo@relay",
        },
    )
    assert (status, attachment["isInline"], attachment["size"]) == (201, True, len(image))

    status, body, _ = await call(kit, "POST", f"{USER}/messages/{draft['id']}/send")
    assert (status, body) == (202, b"")
    [sent] = kit.service.sent
    assert sent.route is SendRoute.DRAFT
    assert sent.recipients == ("ops@example.org", "audit@example.org")
    parsed = sent.parsed()
    assert parsed["Subject"] == "Große Datei"
    parts = {p.get_filename(): p for p in parsed.walk() if p.get_filename()}
    assert parts["dump.bin"].get_payload(decode=True) == big
    assert parts["logo.png"].get_payload(decode=True) == image
    assert parts["logo.png"]["Content-ID"] == "<logo@relay>"
    assert parts["logo.png"].get_content_disposition() == "inline"
    status, _, _ = await call(kit, "GET", f"{USER}/messages/{draft['id']}")
    assert status == 404
    assert [m.id for m in kit.service.messages(MAILBOX, "sentitems")] == [sent.sent_items_id]


async def test_json_draft_then_send(kit: GraphKit) -> None:
    status, draft, _ = await call(
        kit,
        "POST",
        f"{USER}/messages",
        json={
            "subject": "From JSON",
            "body": {"contentType": "html", "content": "<p>Hi</p>"},
            "toRecipients": [{"emailAddress": {"address": "ops@example.org"}}],
        },
    )
    assert (status, draft["isDraft"], draft["subject"]) == (201, True, "From JSON")
    status, _, _ = await call(kit, "POST", f"{USER}/messages/{draft['id']}/send")
    assert status == 202
    assert kit.service.sent[0].parsed().get_body(("html",)).get_content() == "<p>Hi</p>\r\n"


async def test_upload_session_refuses_misuse(kit: GraphKit) -> None:
    """An upload URL refuses an Authorization header, a range that does not continue where the
    last one ended, and a chunk over 4 MB; an unknown session is ErrorItemNotFound."""
    _, draft, _ = await call(
        kit,
        "POST",
        f"{USER}/messages",
        data=base64.b64encode(mime()),
        headers={"Content-Type": "text/plain"},
    )
    size = 5 * 1024 * 1024
    _, session, _ = await call(
        kit,
        "POST",
        f"{USER}/messages/{draft['id']}/attachments/createUploadSession",
        json={"AttachmentItem": {"attachmentType": "file", "name": "x.bin", "size": size}},
    )
    url = session["uploadUrl"]
    status, _, _ = await call(
        kit, "PUT", url, data=b"x" * 10, headers={"Content-Range": f"bytes 0-9/{size}"}
    )
    assert status == 400
    status, _, _ = await call(
        kit, "PUT", url, data=b"x" * 10, token={}, headers={"Content-Range": f"bytes 5-14/{size}"}
    )
    assert status == 400
    status, body, _ = await call(
        kit,
        "PUT",
        url,
        data=b"x" * size,
        token={},
        headers={"Content-Range": f"bytes 0-{size - 1}/{size}"},
    )
    assert (status, error(body)) == (400, ("BadRequest", REQUEST_TOO_LARGE))
    status, body, _ = await call(
        kit,
        "PUT",
        url.replace("authtoken=", "authtoken=x"),
        data=b"x",
        token={},
        headers={"Content-Range": f"bytes 0-0/{size}"},
    )
    assert (status, error(body)[0]) == (404, "ErrorItemNotFound")


# -- throttling and injected faults --------------------------------------------------------------


async def test_fifth_concurrent_request_of_a_mailbox_is_throttled(kit: GraphKit) -> None:
    """Four requests to one mailbox are in flight (parked by a hold); the fifth gets 429
    ApplicationThrottled with Retry-After, while another mailbox is unaffected. Once released,
    the four complete."""
    hold = kit.service.hold(MAILBOX)
    parked = [asyncio.create_task(call(kit, "GET", f"{USER}/messages")) for _ in range(4)]
    await hold.arrived(4)
    status, body, headers = await call(kit, "GET", f"{USER}/messages")
    assert status == 429
    assert error(body) == ("ApplicationThrottled", THROTTLED_CONCURRENCY)
    assert error(body)[1] == "Application is over its MailboxConcurrency limit."
    assert headers["Retry-After"] == "1"
    status, _, _ = await call(kit, "GET", f"/users/{OTHER}/messages")
    assert status == 200
    hold.release()
    assert [r[0] for r in await asyncio.gather(*parked)] == [200, 200, 200, 200]
    status, _, _ = await call(kit, "GET", f"{USER}/messages")
    assert status == 200


async def test_injected_faults_hit_the_next_matching_requests(kit: GraphKit) -> None:
    """throttle() and unavailable() answer the next N requests of a mailbox or path; other
    requests pass; then the service answers normally again."""
    kit.service.throttle(retry_after=7, mailbox=MAILBOX, times=2)
    kit.service.unavailable(retry_after=3, path="*/sendMail")
    assert (await call(kit, "GET", f"/users/{OTHER}/messages"))[0] == 200
    for _ in range(2):
        status, body, headers = await call(kit, "GET", f"{USER}/messages")
        assert (status, headers["Retry-After"]) == (429, "7")
        assert error(body) == ("ApplicationThrottled", THROTTLED_CONCURRENCY)
    assert (await call(kit, "GET", f"{USER}/messages"))[0] == 200
    send = {"data": base64.b64encode(mime(sender=OTHER)), "headers": {"Content-Type": "text/plain"}}
    status, body, headers = await call(kit, "POST", f"/users/{OTHER}/sendMail", **send)  # type: ignore[arg-type]
    assert (status, error(body)[0], headers["Retry-After"]) == (503, "ServiceUnavailable", "3")
    assert (await call(kit, "POST", f"/users/{OTHER}/sendMail", **send))[0] == 202  # type: ignore[arg-type]


async def test_any_error_can_be_injected(kit: GraphKit) -> None:
    kit.service.fail_next(
        404,
        "MailboxNotEnabledForRESTAPI",
        "REST API is not yet supported for this mailbox.",
        method="GET",
    )
    status, body, headers = await call(kit, "GET", f"{USER}/messages")
    assert status == 404
    assert error(body) == (
        "MailboxNotEnabledForRESTAPI",
        "REST API is not yet supported for this mailbox.",
    )
    assert "Retry-After" not in headers
    assert kit.service.requests[-1].status == 404
    assert kit.service.requests[-1].mailbox == MAILBOX


# -- requests Graph refuses ----------------------------------------------------------------------

TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "data", "headers", "status", "code"),
    [
        ("GET", "/messages?$filter=subject eq 'x'", None, {}, 400, "BadRequest"),
        ("GET", "/messages?$filter=receivedDateTime ge yesterday", None, {}, 400, "BadRequest"),
        ("GET", "/messages?$filter=isRead eq maybe", None, {}, 400, "BadRequest"),
        ("GET", "/messages?$filter=internetMessageId eq <a@b>", None, {}, 400, "BadRequest"),
        ("GET", "/messages?$orderby=subject", None, {}, 400, "BadRequest"),
        ("GET", "/messages?$top=ten", None, {}, 400, "BadRequest"),
        ("GET", "/messages?$skip=-1", None, {}, 400, "BadRequest"),
        ("GET", "/mailFolders/inbox/childFolders?$filter=id eq 'x'", None, {}, 400, "BadRequest"),
        ("GET", "/mailFolders/inbox/messages/delta?$orderby=receivedDateTime asc", None, {}, 400,
         "BadRequest"),
        ("PUT", "/messages/{id}", b"{}", JSON, 405, "BadRequest"),
        ("PATCH", "/messages/{id}", b'{"subject": "x"}', JSON, 400, "BadRequest"),
        ("PATCH", "/messages/{id}", b'{"isRead": "yes"}', JSON, 400, "ErrorInvalidRequest"),
        ("PATCH", "/messages/{id}", b"isRead=true", JSON, 400, "BadRequest"),
        ("PATCH", "/messages/{id}", b"[]", JSON, 400, "BadRequest"),
        ("POST", "/messages/{id}/move", b"{}", JSON, 400, "ErrorInvalidRequest"),
        ("POST", "/messages/{id}/move", b'{"destinationId": "AAMkADx"}', JSON, 404,
         "ErrorItemNotFound"),
        ("POST", "/mailFolders/inbox/childFolders", b'{"displayName": " "}', JSON, 400,
         "ErrorInvalidRequest"),
        ("POST", "/sendMail", b"", TEXT, 400, "ErrorMimeContentInvalid"),
        ("POST", "/sendMail", b"{}", JSON, 400, "ErrorInvalidRequest"),
        ("POST", "/sendMail", b'{"message": {}, "saveToSentItems": "no"}', JSON, 400,
         "ErrorInvalidRequest"),
        ("POST", "/sendMail", b'{"message": {"toRecipients": [{"address": "a@b"}]}}', JSON, 400,
         "ErrorInvalidRequest"),
        ("POST", "/sendMail", b'{"message": {"toRecipients": {}}}', JSON, 400,
         "ErrorInvalidRequest"),
        ("POST", "/sendMail", b'{"message": {"body": "hi"}}', JSON, 400, "ErrorInvalidRequest"),
        ("POST", "/sendMail", b'{"message": {"internetMessageHeaders": [{"name": "Sender"}]}}',
         JSON, 400, "ErrorInvalidRequest"),
        ("POST", "/sendMail", b'{"message": {"attachments": "a.pdf"}}', JSON, 400,
         "ErrorInvalidRequest"),
        ("POST", "/sendMail", b"<message/>", {"Content-Type": "application/xml"}, 400,
         "BadRequest"),
        ("POST", "/messages/{id}/attachments",
         b'{"@odata.type": "#microsoft.graph.itemAttachment"}', JSON, 400, "BadRequest"),
        ("POST", "/messages/{id}/attachments",
         b'{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a", "contentBytes": "!"}',
         JSON, 400, "ErrorInvalidRequest"),
        ("POST", "/messages/{id}/attachments",
         b'{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a"}', JSON, 400,
         "ErrorInvalidRequest"),
        ("POST", "/messages/{id}/attachments/createUploadSession", b"{}", JSON, 400,
         "ErrorInvalidRequest"),
        ("POST", "/messages/{id}/attachments/createUploadSession",
         b'{"AttachmentItem": {"name": "a", "size": 0}}', JSON, 400, "ErrorInvalidRequest"),
    ],
)  # fmt: skip
async def test_malformed_requests_are_refused(
    kit: GraphKit,
    method: str,
    path: str,
    data: bytes | None,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """Each malformed request gets a Graph error and changes nothing."""
    mid = kit.service.deliver(MAILBOX, mime())
    got, body, _ = await call(kit, method, USER + path.format(id=mid), data=data, headers=headers)
    assert (got, error(body)[0]) == (status, code)
    assert kit.service.sent == []
    assert [m.id for m in kit.service.messages(MAILBOX)] == [mid]


async def test_empty_mime_message_text(kit: GraphKit) -> None:
    status, body, _ = await call(kit, "POST", f"{USER}/sendMail", data=b"", headers=TEXT)
    assert (status, error(body)[1]) == (
        400,
        "MIME content does not contain all required information, malformed formatting, or empty.",
    )


async def test_upload_to_a_deleted_draft_is_item_not_found(kit: GraphKit) -> None:
    """The draft goes away before the last range: that PUT is ErrorItemNotFound."""
    _, draft, _ = await call(
        kit, "POST", f"{USER}/messages", data=base64.b64encode(mime()), headers=TEXT
    )
    _, session, _ = await call(
        kit,
        "POST",
        f"{USER}/messages/{draft['id']}/attachments/createUploadSession",
        json={"AttachmentItem": {"attachmentType": "file", "name": "x.bin", "size": 10}},
    )
    await call(kit, "DELETE", f"{USER}/messages/{draft['id']}")
    [(status, body, _)] = await upload(kit, session["uploadUrl"], b"0123456789", 10)
    assert (status, error(body)) == (404, ("ErrorItemNotFound", ITEM_NOT_FOUND))


@pytest.mark.parametrize(
    ("upn", "scopes", "status"),
    [
        (MAILBOX, {MAIL_SEND}, 202),  # the signed-in user sends as themself
        (MAILBOX, {MAIL_READWRITE}, 403),  # without the delegated Mail.Send
        (OTHER, {MAIL_SEND}, 403),  # another user's mailbox
    ],
)
async def test_delegated_tokens_reach_only_the_signed_in_users_mailbox(
    kit: GraphKit, upn: str, scopes: set[str], status: int
) -> None:
    """A user's token carries delegated permissions (`scp`), not roles, and opens only that
    user's own mailbox; anything else is 403 ErrorAccessDenied."""
    token = issuer().issue(
        audience=GRAPH_AUDIENCE,
        tenant_id=kit.tenant_id,
        app_id=kit.app.client_id,
        roles=set(),
        object_id=kit.app.object_id,
        lifetime=3600,
        user=User(upn=MAILBOX, object_id="u-1", tenant_id=kit.tenant_id),
        scopes=scopes,
    )
    payload = {
        "message": {"subject": "x", "toRecipients": [{"emailAddress": {"address": "a@b.c"}}]}
    }
    got, body, _ = await call(
        kit,
        "POST",
        f"/users/{upn}/sendMail",
        json=payload,
        token={"Authorization": f"Bearer {token}"},
    )
    assert got == status
    if status == 403:
        assert error(body) == ("ErrorAccessDenied", ACCESS_DENIED)
