"""The decision after a delivery attempt, one rule per test."""

from __future__ import annotations

import pytest

from relay.errors import (
    PermanentFailure,
    TemporaryFailure,
    TokenRejected,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from relay.reply import Reply
from relay.retry import decide, retry_delay
from relay.transports import Delivered

SCHEDULE = (60.0, 300.0, 900.0)
OK = Reply(250, "2.0.0", "OK <id@x> [Hostname=X]")
BUSY = Reply(451, "4.7.500", "Server busy. Please try again later from [127.0.0.1]. (AS1)")
DENIED = Reply(554, "5.2.252", "SendAsDenied; a@x not allowed to send as b@x")


def run(outcome, *, pending=("a@x", "b@x"), attempts=1, age=10.0, rand=0.5, max_age=3600.0):
    return decide(
        outcome,
        pending=list(pending),
        attempts=attempts,
        received_at=1000.0,
        now=1000.0 + age,
        schedule=SCHEDULE,
        max_age=max_age,
        rand=lambda: rand,
    )


def test_all_accepted_is_done() -> None:
    d = run(Delivered(reply=OK, accepted=("a@x", "b@x")))
    assert d.delivered == ("a@x", "b@x") and not d.failed and not d.pending
    assert d.next_attempt is None and d.reply == OK


def test_refused_recipients_split_by_class() -> None:
    unknown = Reply(550, "5.1.1", "User unknown")
    full = Reply(452, "4.2.2", "Mailbox full")
    d = run(
        Delivered(reply=OK, accepted=("a@x",), refused={"b@x": unknown, "c@x": full}),
        pending=("a@x", "b@x", "c@x"),
    )
    assert d.delivered == ("a@x",)
    assert d.failed == {"b@x": unknown}
    assert d.pending == ("c@x",) and d.reply == full
    assert d.next_attempt == 1010.0 + 60.0


def test_permanent_failure_fails_every_pending_recipient() -> None:
    d = run(PermanentFailure(DENIED))
    assert d.failed == {"a@x": DENIED, "b@x": DENIED} and not d.pending


@pytest.mark.parametrize(
    ("error", "trouble"),
    [
        (TemporaryFailure(BUSY), False),
        (UpstreamUnavailable(Reply(451, "4.4.1", "refused")), True),
        (UpstreamTimeout(Reply(451, "4.4.2", "timed out")), True),
        (TokenUnavailable(Reply(451, "4.7.0", "503")), True),
        (TokenRejected(Reply(535, "5.7.3", "Authentication unsuccessful")), True),
    ],
)
def test_temporary_trouble_defers_on_schedule(error, trouble) -> None:
    d = run(error, attempts=2)
    assert d.pending == ("a@x", "b@x") and not d.failed
    assert d.next_attempt == 1010.0 + 300.0
    assert d.route_trouble is trouble


def test_last_interval_repeats_and_jitter_is_bounded() -> None:
    assert retry_delay(7, SCHEDULE, lambda: 0.5) == 900.0
    assert retry_delay(1, SCHEDULE, lambda: 0.0) == pytest.approx(54.0)
    assert retry_delay(1, SCHEDULE, lambda: 1.0) == pytest.approx(66.0)


def test_retry_after_wins_when_later() -> None:
    d = run(TemporaryFailure(BUSY, retry_after=120.0))
    assert d.next_attempt == 1010.0 + 120.0


def test_past_max_age_fails_with_the_last_reply() -> None:
    d = run(TemporaryFailure(BUSY), age=4000.0)
    assert not d.pending
    assert set(d.failed) == {"a@x", "b@x"}
    reply = d.failed["a@x"]
    assert (reply.code, reply.status) == (451, "4.7.500")
    assert "gave up after 1.1 hours in the queue; last reply: 451 4.7.500 Server busy" in reply.text
