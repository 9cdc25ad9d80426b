"""The router: which route a message takes at MAIL, RCPT and DATA, and the bytes it spools."""

from __future__ import annotations

import ipaddress
import string
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import RouteConfig, RouteMatch, SenderPolicy
from relay.errors import ConfigError
from relay.headerblock import HeaderBlock
from relay.reply import Reply
from relay.routing import PLAIN_ADDR_SPEC, Router, Split, _addr_specs, rewrite_sender

KEEP, REWRITE = SenderPolicy.KEEP, SenderPolicy.REWRITE
LOCAL = "127.0.0.1"
SEND_AS = "550 5.7.60 SMTP; Client does not have permissions to send as this sender: "


def route(
    name: str,
    mailbox: str = "maintenance@contoso.com",
    *,
    sender: SenderPolicy = KEEP,
    send_as: tuple[str, ...] = (),
    max_recipients: int = 500,
    senders: tuple[str, ...] = (),
    from_headers: tuple[str, ...] = (),
    recipients: tuple[str, ...] = (),
    clients: tuple[str, ...] = (),
    users: tuple[str, ...] = (),
) -> RouteConfig:
    match = RouteMatch(
        senders=senders,
        from_headers=from_headers,
        recipients=recipients,
        clients=tuple(ipaddress.ip_network(c) for c in clients),
        users=users,
    )
    return RouteConfig(
        name=name,
        account="contoso",
        mailbox=mailbox,
        match=match,
        sender=sender,
        send_as=send_as,
        max_recipients=max_recipients,
    )


def message(*headers: str, body: bytes = b"Hello.\r\n") -> bytes:
    return b"".join(h.encode() + b"\r\n" for h in headers) + b"\r\n" + body


# --- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "address", "matches"),
    [
        ("*@contoso.com", "App@Contoso.COM", True),
        ("*@contoso.com", "app@contoso.com.evil", False),
        ("app?@contoso.com", "app1@contoso.com", True),
        ("app?@contoso.com", "app@contoso.com", False),
        ("a.b@x", "aXb@x", False),  # '.' is literal, not a regex
        ("u@[10.0.0.1]", "u@[10.0.0.1]", True),  # '[' is literal, not a character class
        ("u@[10.0.0.1]", "u@1", False),
        ("*", "anyone@anywhere", True),
        ("*", "", False),  # '*' is any address; the null sender is none
        ("<>", "", True),
        ("", "", True),
        ("<>", "a@b", False),
    ],
)
def test_sender_globs(pattern: str, address: str, matches: bool) -> None:
    router = Router([route("r", sender=REWRITE, senders=(pattern,))])
    assert (router.at_mail(LOCAL, None, address or "<>") is None) is matches


def test_route_without_sender_criterion_takes_the_null_sender() -> None:
    """aiosmtpd reports MAIL FROM:<> as "<>"; both spellings are the null sender."""
    router = Router([route("r", sender=REWRITE)])
    assert router.at_mail(LOCAL, None, "<>") is None
    assert router.at_mail(LOCAL, None, "") is None


@pytest.mark.parametrize(
    ("client", "matches"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # IPv4-mapped IPv6 matches its IPv4 network
        ("fd00::1", True),
        ("192.168.1.1", False),
        ("::1", False),
        ("not-an-ip", False),
    ],
)
def test_client_networks(client: str, matches: bool) -> None:
    router = Router([route("r", sender=REWRITE, clients=("10.0.0.0/8", "fd00::/8"))])
    assert (router.at_mail(client, None, "a@contoso.com") is None) is matches


def test_user_criterion_needs_that_authenticated_user() -> None:
    router = Router([route("r", sender=REWRITE, users=("ultimo", "erp"))])
    assert router.at_mail(LOCAL, "erp", "a@contoso.com") is None
    assert router.at_mail(LOCAL, None, "a@contoso.com") == Reply(
        550,
        "5.7.1",
        "No route for sender <a@contoso.com> from client 127.0.0.1 (not authenticated): "
        "r wants AUTH as user ultimo or erp; check routes[].match in relay.yaml",
    )


def test_criteria_combine_with_and_first_match_wins() -> None:
    """Route `a` needs both its sender and client; otherwise `b` (any sender) takes the mail."""
    router = Router(
        [
            route("a", "a@contoso.com", senders=("a@contoso.com",), clients=("10.0.0.0/8",)),
            route("b", "b@contoso.com", sender=REWRITE),
        ]
    )
    rcpt = "bob@example.com"
    assert router.at_rcpt("10.0.0.1", None, "a@contoso.com", rcpt).name == "a"
    assert router.at_rcpt("192.0.2.1", None, "a@contoso.com", rcpt).name == "b"
    assert router.at_rcpt("10.0.0.1", None, "x@contoso.com", rcpt).name == "b"


# --- refusals at MAIL and RCPT -----------------------------------------------------------------


def test_no_route_at_mail_names_each_route_and_what_it_wants() -> None:
    router = Router(
        [
            route("maintenance", senders=("*@contoso.com",), clients=("10.0.0.0/8",)),
            route("erp", users=("ultimo",)),
        ]
    )
    assert str(router.at_mail("10.1.2.3", None, "app@fabrikam.com")) == (
        "550 5.7.1 No route for sender <app@fabrikam.com> from client 10.1.2.3 "
        "(not authenticated): maintenance wants sender *@contoso.com; "
        "erp wants AUTH as user ultimo; check routes[].match in relay.yaml"
    )
    assert str(router.at_mail("192.0.2.7", "ultimo2", "app@contoso.com")) == (
        "550 5.7.1 No route for sender <app@contoso.com> from client 192.0.2.7 "
        "(user ultimo2): maintenance wants client 10.0.0.0/8; "
        "erp wants AUTH as user ultimo; check routes[].match in relay.yaml"
    )


def test_no_route_lists_three_routes_and_patterns_then_counts() -> None:
    pats = ("*@a.com", "*@b.com", "*@c.com", "*@d.com")
    router = Router([route(f"r{i}", senders=pats) for i in range(5)])
    want = "wants sender *@a.com or *@b.com or *@c.com or 1 more"
    assert router.at_mail(LOCAL, None, "x@y.com") == Reply(
        550,
        "5.7.1",
        "No route for sender <x@y.com> from client 127.0.0.1 (not authenticated): "
        f"r0 {want}; r1 {want}; r2 {want}; 2 more; check routes[].match in relay.yaml",
    )


def test_no_routes_at_all() -> None:
    assert Router([]).at_mail(LOCAL, None, "a@b") == Reply(
        550,
        "5.7.1",
        "No route for sender <a@b> from client 127.0.0.1 (not authenticated): "
        "relay.yaml has no routes; check routes[].match in relay.yaml",
    )


def test_client_text_in_replies_is_escaped_and_cut() -> None:
    """A UTF-8 or very long address cannot put raw bytes or an endless line into a reply."""
    router = Router([route("r", senders=("*@contoso.com",))])
    reply = router.at_mail(LOCAL, None, "jürgen@" + "x" * 300)
    assert isinstance(reply, Reply)
    assert reply.text.startswith("No route for sender <j\\xfcrgen@xxx")
    assert "...>" in reply.text
    assert reply.text.isascii()
    assert len(str(reply)) < 512


def test_no_route_at_rcpt_names_the_recipient() -> None:
    router = Router([route("internal", recipients=("*@contoso.com",))])
    assert router.at_rcpt(LOCAL, None, "app@contoso.com", "bob@example.com") == Reply(
        550,
        "5.7.1",
        "No route for recipient <bob@example.com> (sender <app@contoso.com> from client "
        "127.0.0.1 (not authenticated)): internal wants recipient *@contoso.com; "
        "check routes[].match in relay.yaml",
    )


# --- keep: who may send as whom ---------------------------------------------------------------


def test_keep_refuses_a_foreign_envelope_sender_at_mail() -> None:
    """Refused at SMTP time with Exchange's wording, instead of queued and bounced later."""
    router = Router([route("maintenance", send_as=("alerts@contoso.com",))])
    assert router.at_mail(LOCAL, None, "Alerts@Contoso.com") is None
    assert router.at_mail(LOCAL, None, "MAINTENANCE@contoso.com") is None
    assert str(router.at_mail(LOCAL, None, "printer@contoso.com")) == (
        SEND_AS + "envelope sender <printer@contoso.com> is neither maintenance@contoso.com "
        "nor in send_as of route maintenance (routes[0] in relay.yaml: add it to send_as once "
        "Exchange grants Send-As, or use sender: rewrite)"
    )


def test_keep_lets_the_null_sender_through() -> None:
    router = Router([route("maintenance")])
    assert router.at_mail(LOCAL, None, "<>") is None
    assert router.at_rcpt(LOCAL, None, "<>", "bob@example.com") == router.routes[0]


def test_keep_at_mail_waits_for_rcpt_when_another_route_may_take_the_sender() -> None:
    """MAIL is only refused when every route the sender could take would refuse it."""
    router = Router(
        [
            route("internal", recipients=("*@contoso.com",)),
            route("external", "noreply@contoso.com", sender=REWRITE),
        ]
    )
    assert router.at_mail(LOCAL, None, "printer@contoso.com") is None
    rcpt = router.at_rcpt(LOCAL, None, "printer@contoso.com", "bob@contoso.com")
    assert isinstance(rcpt, Reply)
    assert str(rcpt).startswith(SEND_AS + "envelope sender <printer@contoso.com>")
    assert "route internal (routes[0]" in rcpt.text
    assert (
        router.at_rcpt(LOCAL, None, "printer@contoso.com", "bob@example.com") == (router.routes[1])
    )


def test_keep_at_mail_refuses_when_a_catch_all_keep_route_comes_first() -> None:
    """A keep route that takes every recipient shadows the routes after it."""
    router = Router(
        [
            route("first", recipients=("*",)),
            route("never", "noreply@contoso.com", sender=REWRITE),
        ]
    )
    reply = router.at_mail(LOCAL, None, "printer@contoso.com")
    assert isinstance(reply, Reply)
    assert (reply.code, reply.status) == (550, "5.7.60")
    assert "route first (routes[0]" in reply.text


# --- the From criterion is settled at DATA ----------------------------------------------------


FROM_ROUTES = [
    route(
        "billing", "billing@contoso.com", from_headers=("*@billing.contoso.com",), sender=REWRITE
    ),
    route("alerts", "alerts@contoso.com", from_headers=("alerts@contoso.com",)),
]


def test_from_routes_are_candidates_until_data() -> None:
    router = Router(FROM_ROUTES)
    assert router.at_mail(LOCAL, None, "app@contoso.com") is None
    # the keep route refuses app@ as envelope sender, so only billing can take it
    assert router.at_rcpt(LOCAL, None, "app@contoso.com", "bob@example.com").name == "billing"
    assert router.at_rcpt(LOCAL, None, "alerts@contoso.com", "bob@example.com").name == "billing"


def test_from_header_picks_the_route_at_data() -> None:
    router = Router(FROM_ROUTES)
    data = message("From: Invoices <invoices@billing.contoso.com>", "Subject: x")
    [split] = router.at_data(LOCAL, None, "app@contoso.com", ["bob@example.com"], data)
    assert split.route.name == "billing"
    data = message("From: alerts@contoso.com", "Subject: x")
    [split] = router.at_data(LOCAL, None, "alerts@contoso.com", ["bob@example.com"], data)
    assert (split.route.name, split.data) == ("alerts", data)


def test_from_criterion_needs_every_from_address() -> None:
    router = Router([*FROM_ROUTES, route("rest", "rest@contoso.com", sender=REWRITE)])
    data = message("From: a@billing.contoso.com, b@elsewhere.com", "Sender: a@billing.contoso.com")
    [split] = router.at_data(LOCAL, None, "app@contoso.com", ["bob@example.com"], data)
    assert split.route.name == "rest"


def test_from_header_that_matches_no_route_refuses_at_data() -> None:
    router = Router(FROM_ROUTES)
    data = message("From: someone@example.com", "Subject: x")
    assert router.at_data(LOCAL, None, "app@contoso.com", ["bob@example.com"], data) == Reply(
        550,
        "5.7.1",
        "No route for recipient <bob@example.com> (sender <app@contoso.com> from client "
        "127.0.0.1 (not authenticated), From header <someone@example.com>): billing wants "
        "From header *@billing.contoso.com; alerts wants From header alerts@contoso.com; "
        "check routes[].match in relay.yaml",
    )
    no_from = router.at_data(LOCAL, None, "app@contoso.com", ["bob@example.com"], message("X: y"))
    assert isinstance(no_from, Reply)
    assert "From header none)" in no_from.text


# --- keep at DATA: From and Sender headers ----------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        (("From: Printer <printer@contoso.com>",), "From header <printer@contoso.com>"),
        (
            ("From: maintenance@contoso.com", "Sender: x@contoso.com"),
            "Sender header <x@contoso.com>",
        ),
        (("From: undisclosed-recipients:;",), "From header without an address"),
        # a device's malformed From: the parser reads printer@office, as Exchange would refuse it
        (("From: printer@office <maintenance@contoso.com>",), "From header <printer@office>"),
    ],
)
def test_keep_refuses_foreign_from_or_sender_at_data(headers: tuple[str, ...], what: str) -> None:
    router = Router([route("maintenance", send_as=("alerts@contoso.com",))])
    reply = router.at_data(LOCAL, None, "alerts@contoso.com", ["b@x.com"], message(*headers))
    assert isinstance(reply, Reply)
    assert str(reply) == (
        SEND_AS + f"{what} is neither maintenance@contoso.com nor in send_as of route "
        "maintenance (routes[0] in relay.yaml: add it to send_as once Exchange grants "
        "Send-As, or use sender: rewrite)"
    )


def test_keep_at_data_refuses_a_foreign_envelope_sender_too() -> None:
    """at_data does not trust that MAIL was checked."""
    router = Router([route("maintenance")])
    reply = router.at_data(LOCAL, None, "x@contoso.com", ["b@x.com"], message("X: y"))
    assert isinstance(reply, Reply)
    assert reply.text.endswith("or use sender: rewrite)")


@pytest.mark.parametrize(
    "headers",
    [
        ("From: Maintenance <MAINTENANCE@contoso.com>", "Sender: alerts@contoso.com"),
        ("From: alerts@contoso.com, maintenance@contoso.com",),
        ("Subject: no From at all",),  # nothing to check; Exchange decides
    ],
)
def test_keep_passes_allowed_headers_unchanged(headers: tuple[str, ...]) -> None:
    router = Router([route("maintenance", send_as=("alerts@contoso.com",))])
    data = message(*headers)
    assert router.at_data(LOCAL, None, "maintenance@contoso.com", ["b@x.com"], data) == [
        Split(router.routes[0], "maintenance@contoso.com", ("b@x.com",), data)
    ]


def test_keep_null_sender_needs_a_from_the_mailbox_may_send_as() -> None:
    """A DSN from relay.bounce (From: the mailbox) passes; one from MAILER-DAEMON does not."""
    router = Router([route("maintenance")])
    dsn = message("From: Mail Delivery System <maintenance@contoso.com>", "Subject: x")
    assert router.at_data(LOCAL, None, "<>", ["a@b.com"], dsn) == [
        Split(router.routes[0], "", ("a@b.com",), dsn)
    ]
    daemon = message("From: MAILER-DAEMON@contoso.com", "Subject: x")
    reply = router.at_data(LOCAL, None, "<>", ["a@b.com"], daemon)
    assert isinstance(reply, Reply)
    assert "From header <MAILER-DAEMON@contoso.com>" in reply.text


# --- splitting --------------------------------------------------------------------------------


def test_recipients_split_per_route_and_chunk() -> None:
    router = Router(
        [
            route("internal", "int@contoso.com", recipients=("*@contoso.com",), max_recipients=2),
            route("external", "ext@contoso.com", sender=REWRITE, max_recipients=500),
        ]
    )
    rcpts = ["a@contoso.com", "x@example.com", "b@contoso.com", "A@CONTOSO.COM", "c@contoso.com"]
    data = message("From: int@contoso.com", "Subject: x")
    splits = router.at_data(LOCAL, None, "int@contoso.com", rcpts, data)
    assert isinstance(splits, list)
    assert [(s.route.name, s.mail_from, s.rcpt_tos) for s in splits] == [
        ("internal", "int@contoso.com", ("a@contoso.com", "b@contoso.com")),
        ("internal", "int@contoso.com", ("c@contoso.com",)),
        ("external", "ext@contoso.com", ("x@example.com",)),
    ]
    assert splits[0].data is data  # keep: the client's bytes as they came
    assert b"Reply-To: int@contoso.com\r\n" in splits[2].data


def test_one_refused_recipient_refuses_the_whole_message() -> None:
    router = Router([route("internal", recipients=("*@contoso.com",))])
    reply = router.at_data(
        LOCAL, None, "maintenance@contoso.com", ["a@contoso.com", "x@example.com"], message()
    )
    assert isinstance(reply, Reply)
    assert reply.text.startswith("No route for recipient <x@example.com>")


def test_rewrite_keeps_the_null_sender_null() -> None:
    router = Router([route("r", "noreply@contoso.com", sender=REWRITE)])
    [split] = router.at_data(LOCAL, None, "<>", ["a@b.com"], message("From: MAILER-DAEMON@x"))
    assert split.mail_from == ""
    assert split.data.startswith(b"From: noreply@contoso.com\r\nReply-To: MAILER-DAEMON@x\r\n")


def test_max_recipients_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        Router([route("ok"), route("bad", max_recipients=0)])
    assert str(err.value) == "routes[1].max_recipients: max_recipients must be at least 1, not 0"


def test_reprs_are_one_line() -> None:
    router = Router([route("maintenance"), route("erp")])
    assert repr(router) == "<Router routes=[maintenance, erp]>"
    split = Split(router.routes[0], "a@b", ("c@d", "e@f"), b"x" * 10)
    assert repr(split) == "Split(route='maintenance', mail_from='a@b', rcpt_tos=2, data=10 bytes)"


# --- rewrite: the bytes -----------------------------------------------------------------------

MAILBOX = "noreply@contoso.com"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param(
            b'From: "Doe, John" <john@example.com>\r\n',
            b'From: "Doe, John" <noreply@contoso.com>\r\n'
            b'Reply-To: "Doe, John" <john@example.com>\r\n',
            id="quoted-name",
        ),
        pytest.param(
            b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\n",
            b"From: =?utf-8?q?J=C3=BCrgen?= <noreply@contoso.com>\r\n"
            b"Reply-To: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\n",
            id="encoded-word-kept-as-is",
        ),
        pytest.param(
            "From: Jürgen Müller <j@example.com>\r\n".encode(),
            "From: Jürgen Müller <noreply@contoso.com>\r\n"
            "Reply-To: Jürgen Müller <j@example.com>\r\n".encode(),
            id="utf8-name-bytes-kept",
        ),
        pytest.param(
            "From: Jürgen <j@example.com>\r\n".encode("latin-1"),
            "From: Jürgen <noreply@contoso.com>\r\nReply-To: Jürgen <j@example.com>\r\n".encode(
                "latin-1"
            ),
            id="latin1-name-bytes-kept",
        ),
        pytest.param(
            b'From: "Ops \\"<night>\\"" (shift (a) \\) <x>) <x@example.com>\r\n',
            b'From: "Ops \\"<night>\\"" (shift (a) \\) <x>) <noreply@contoso.com>\r\n'
            b'Reply-To: "Ops \\"<night>\\"" (shift (a) \\) <x>) <x@example.com>\r\n',
            id="angles-in-quotes-and-nested-comments",
        ),
        pytest.param(
            b"From: Ops <x@example.com> <y@example.com>\r\n",
            b"From: Ops <noreply@contoso.com>\r\nReply-To: Ops <x@example.com> <y@example.com>\r\n",
            id="two-angle-addrs-rebuilt",
        ),
        pytest.param(
            b"From: app@example.com\r\n",
            b"From: noreply@contoso.com\r\nReply-To: app@example.com\r\n",
            id="bare-address",
        ),
        pytest.param(
            b"From: app@example.com (Ultimo)\r\n",
            b"From: noreply@contoso.com\r\nReply-To: app@example.com (Ultimo)\r\n",
            id="comment-is-no-display-name",
        ),
        pytest.param(
            b"FROM:  Ultimo\r\n  <app@example.com>  (prod)\r\n",
            b"FROM:  Ultimo\r\n  <noreply@contoso.com>  (prod)\r\n"
            b"Reply-To:  Ultimo\r\n  <app@example.com>  (prod)\r\n",
            id="folding-and-comment-kept",
        ),
        pytest.param(
            b"From: Team: a@example.com, Bob <b@example.com>;\r\n",
            b"From: Bob <noreply@contoso.com>\r\n"
            b"Reply-To: Team: a@example.com, Bob <b@example.com>;\r\n",
            id="group-first-display-name",
        ),
        pytest.param(
            b"From: Team: a@example.com;\r\n",
            b"From: Team <noreply@contoso.com>\r\nReply-To: Team: a@example.com;\r\n",
            id="group-name",
        ),
        pytest.param(
            b"From: a@example.com, b@example.com\r\nSender: a@example.com\r\n",
            b"From: noreply@contoso.com\r\nReply-To: a@example.com, b@example.com\r\n"
            b"Sender: noreply@contoso.com\r\n",
            id="several-authors-and-sender",
        ),
        pytest.param(
            b"From: printer@office <scan@example.com>\r\n",
            b"From: noreply@contoso.com\r\nReply-To: printer@office <scan@example.com>\r\n",
            id="malformed-device-from",
        ),
        pytest.param(
            b"From: undisclosed-recipients:;\r\n",
            b"From: undisclosed-recipients <noreply@contoso.com>\r\n",
            id="empty-group-moves-nothing",
        ),
        pytest.param(
            b"From: John Q. Public <j@example.com>\r\nReply-To: desk@example.com\r\n",
            b"From: John Q. Public <noreply@contoso.com>\r\nReply-To: desk@example.com\r\n",
            id="existing-reply-to-stays",
        ),
        pytest.param(
            b"From: The Relay <NoReply@Contoso.com>\r\nSender: noreply@contoso.com\r\n",
            b"From: The Relay <NoReply@Contoso.com>\r\nSender: noreply@contoso.com\r\n",
            id="already-the-mailbox",
        ),
        pytest.param(
            b'From: "a\\"b" <x@example.com>, "c" <y@example.com>\r\n',
            b'From: "a\\"b" <noreply@contoso.com>\r\n'
            b'Reply-To: "a\\"b" <x@example.com>, "c" <y@example.com>\r\n',
            id="escaped-quote-rebuilt",
        ),
    ],
)
def test_rewrite_from(before: bytes, after: bytes) -> None:
    data = b"Received: by app\r\n" + before + b"Subject: hi\r\n\r\nbody\r\n"
    assert rewrite_sender(data, MAILBOX) == (
        b"Received: by app\r\n" + after + b"Subject: hi\r\n\r\nbody\r\n"
    )


def test_rewrite_adds_a_missing_from_at_the_end_of_the_header_block() -> None:
    data = b"Subject: hi\nTo: a@b\n\nbody\n"
    assert (
        rewrite_sender(data, MAILBOX)
        == b"Subject: hi\nTo: a@b\nFrom: noreply@contoso.com\n\nbody\n"
    )


def test_rewrite_of_a_headers_only_message_without_final_line_ending() -> None:
    assert rewrite_sender(b"To: x@y\r\nFrom: a@b", MAILBOX) == (
        b"To: x@y\r\nFrom: noreply@contoso.com\r\nReply-To: a@b"
    )


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("Ultimo (prod)", '"Ultimo (prod)"'),
        ('say "hi" \\ bye', '"say \\"hi\\" \\\\ bye"'),
        ("=?not?an?=", '"=?not?an?="'),
        ("Jürgen", "=?utf-8?b?SsO8cmdlbg==?="),
        ("bell\x07", "=?utf-8?b?YmVsbAc=?="),
    ],
)
def test_rebuilt_display_names_are_quoted_or_encoded(name: str, phrase: str) -> None:
    """The rebuild path (several authors) writes the first display name back safely."""
    before = message(f"From: =?utf-8?b?{_b64(name)}?= <a@example.com>, b@example.com")
    out = rewrite_sender(before, MAILBOX)
    assert out.startswith(f"From: {phrase} <noreply@contoso.com>\r\n".encode())
    assert _from_header(out) == (name, MAILBOX)


def test_long_display_names_fold_and_stay_readable() -> None:
    for name in ("Maintenance " * 30, "Müller " * 40):
        before = message(f"From: =?utf-8?b?{_b64(name.strip())}?= <a@x>, b@x")
        out = rewrite_sender(before, MAILBOX)
        [from_field] = HeaderBlock.parse(out).get_all("from")
        assert all(len(line) <= 78 for line in from_field.raw.split(b"\r\n"))
        assert _from_header(out) == (name.strip(), MAILBOX)


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _from_header(data: bytes) -> tuple[str, str]:
    """(display name, address) of the From header, decoded as RFC 2047 §6.2 says.

    CPython's address parser keeps the space between adjacent encoded-words of a phrase (which
    RFC 2047 says to drop), so encoded-words are decoded with email.header instead.
    """
    [field] = HeaderBlock.parse(data).get_all("from")
    [address] = HeaderRegistry()("from", field.text()).addresses
    phrase = field.text().rpartition(" <")[0]
    if phrase.startswith('"'):
        return address.display_name, address.addr_spec
    return str(make_header(decode_header(phrase))), address.addr_spec


# --- properties -------------------------------------------------------------------------------

_ADDR = st.from_regex(r"[a-z0-9.]{1,8}@[a-z]{1,6}\.(com|org)", fullmatch=True)
_NAME = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30)


@st.composite
def _from_values(draw: st.DrawFn) -> str:
    addr = draw(_ADDR)
    name = draw(_NAME)
    return draw(
        st.sampled_from(
            [
                addr,
                f"{name} <{addr}>",
                '"' + name.replace("\\", "").replace('"', "") + f'" <{addr}>',
                f"=?utf-8?b?{_b64(name)}?= <{addr}>",
                f"Group: {addr}, {draw(_ADDR)};",
                f"{addr}, {draw(_ADDR)}",
                f"{addr} ({name.replace('(', '').replace(')', '')})",
                name,
            ]
        )
    )


_OTHER = st.tuples(
    st.sampled_from(["Subject", "To", "Received", "X-Mailer", "Message-ID", "fROM-x", "Date"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=40),
)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    fields: list[tuple[str, str]] = draw(st.lists(_OTHER, max_size=6))
    for name in ("From", "Sender", "Reply-To"):
        if draw(st.booleans()):
            fields.insert(draw(st.integers(0, len(fields))), (name, draw(_from_values())))
    lines = []
    for name, value in fields:
        folded = value.replace(" ", (eol + b" ").decode(), 1) if draw(st.booleans()) else value
        lines.append(f"{name}: {folded}".encode() + eol)
    body = draw(st.binary(max_size=200))
    return b"".join(lines) + eol + body


_UNTOUCHED = {"from", "sender", "reply-to"}


@given(_messages())
def test_rewrite_never_changes_the_body_or_other_headers(data: bytes) -> None:
    before = HeaderBlock.parse(data)
    out = rewrite_sender(data, MAILBOX)
    after = HeaderBlock.parse(out)
    assert out.endswith(before.separator + before.body)
    assert (after.separator, after.body) == (before.separator, before.body)
    assert [f.raw for f in after.fields if f.name not in _UNTOUCHED] == [
        f.raw for f in before.fields if f.name not in _UNTOUCHED
    ]


@given(_messages())
def test_rewritten_messages_pass_the_keep_rule_for_the_mailbox(data: bytes) -> None:
    """What rewrite makes, a keep route for the same mailbox accepts."""
    out = rewrite_sender(data, MAILBOX)
    keep = Router([route("k", MAILBOX)])
    assert keep.at_data(LOCAL, None, MAILBOX, ["a@b.com"], out) == [
        Split(keep.routes[0], MAILBOX, ("a@b.com",), out)
    ]
    registry = HeaderRegistry()
    [from_field] = HeaderBlock.parse(out).get_all("from")
    [address] = registry("from", from_field.text()).addresses
    assert address.addr_spec.lower() == MAILBOX


_RCPT = st.builds(
    lambda local, domain, upper: f"{local}@{domain}".upper() if upper else f"{local}@{domain}",
    st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=3),
    st.sampled_from(["contoso.com", "example.com", "fabrikam.com"]),
    st.booleans(),
)


@given(
    st.lists(_RCPT, max_size=40),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_splitting_keeps_every_recipient_exactly_once(
    rcpts: list[str], internal_max: int, other_max: int
) -> None:
    router = Router(
        [
            route("internal", recipients=("*@contoso.com",), max_recipients=internal_max),
            route("fab", "f@contoso.com", sender=REWRITE, recipients=("*@fabrikam.com",)),
            route("other", "o@contoso.com", sender=REWRITE, max_recipients=other_max),
        ]
    )
    data = message("From: maintenance@contoso.com")
    splits = router.at_data(LOCAL, None, "maintenance@contoso.com", rcpts, data)
    assert isinstance(splits, list)
    out = [r.lower() for s in splits for r in s.rcpt_tos]
    assert sorted(out) == sorted({r.lower() for r in rcpts})
    for split in splits:
        assert 1 <= len(split.rcpt_tos) <= split.route.max_recipients
        for rcpt in split.rcpt_tos:
            assert router.at_rcpt(LOCAL, None, "maintenance@contoso.com", rcpt) == split.route


_SLOW = HeaderRegistry()


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(rf"([A-Za-z0-9 ]* *<{PLAIN_ADDR_SPEC}>|{PLAIN_ADDR_SPEC})", fullmatch=True)
    | st.text(alphabet='ab@.<> "()\\,;:[]', max_size=20)
)
def test_plain_from_addresses_read_as_the_header_parser_reads_them(text: str) -> None:
    """The fast path for a From of one plain address agrees with CPython's header parser."""
    [field] = HeaderBlock.parse(f"From: {text}\r\n\r\n".encode()).fields
    try:
        expected = tuple(a.addr_spec for a in _SLOW("from", field.text()).addresses)
    except Exception:
        expected = ()
    assert _addr_specs(field) == expected
