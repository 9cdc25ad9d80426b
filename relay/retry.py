"""What happens after a delivery attempt: the one function from outcome to decision.

`decide()` is pure: given the recipients still pending, the attempt's outcome (a `Delivered` or
a `DeliveryError`), the message's age and attempt count, and the retry policy, it says which
recipients are done, which failed for good (to bounce), which wait, and until when. The
scheduler then does the I/O. Rules (after Postfix's smtp_trouble.c):

  * an accepted recipient is done;
  * a recipient refused with 5xx, or a 5xx / PermanentFailure for the whole message, fails;
  * 4xx, network, TLS, timeouts and token trouble leave the recipients pending, retried on the
    `retry` schedule (the last interval repeats) with +-10% jitter, or at the upstream's
    Retry-After when that is later;
  * a pending recipient older than `max_age` fails with the last temporary reply.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from relay.errors import (
    DeliveryError,
    PermanentFailure,
    TokenRejected,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from relay.reply import Reply
from relay.transports import Delivered

JITTER = 0.1


@dataclass(frozen=True, kw_only=True)
class Decision:
    reply: Reply  # the reply that decided, for logs and the spool record
    delivered: tuple[str, ...] = ()
    failed: Mapping[str, Reply] = field(default_factory=dict)
    pending: tuple[str, ...] = ()
    next_attempt: float | None = None  # set when something is pending
    route_trouble: bool = False  # the upstream or token endpoint is down: back off the route


def retry_delay(attempts: int, schedule: Sequence[float], rand: Callable[[], float]) -> float:
    """Delay after the `attempts`-th failed attempt (1-based); the last interval repeats."""
    base = schedule[min(attempts, len(schedule)) - 1]
    return base * (1 + JITTER * (2 * rand() - 1))


def decide(
    outcome: Delivered | DeliveryError,
    *,
    pending: Sequence[str],
    attempts: int,
    received_at: float,
    now: float,
    schedule: Sequence[float],
    max_age: float,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """Decide after attempt number `attempts` (1-based) for the `pending` recipients."""
    if isinstance(outcome, Delivered):
        failed = {r: rep for r, rep in outcome.refused.items() if rep.is_permanent}
        waiting = tuple(r for r in pending if r in outcome.refused and r not in failed)
        delivered = tuple(r for r in pending if r in outcome.accepted)
        reply = outcome.refused[waiting[0]] if waiting else outcome.reply
        trouble = False
    elif isinstance(outcome, PermanentFailure):
        return Decision(reply=outcome.reply, failed=dict.fromkeys(pending, outcome.reply))
    else:
        delivered, failed, waiting, reply = (), {}, tuple(pending), outcome.reply
        trouble = isinstance(
            outcome, UpstreamUnavailable | UpstreamTimeout | TokenUnavailable | TokenRejected
        )
    if not waiting:
        return Decision(reply=reply, delivered=delivered, failed=failed)
    if now - received_at >= max_age:
        expired = Reply(
            reply.code,
            reply.status or "4.4.7",
            f"gave up after {_age(now - received_at)} in the queue; last reply: {reply.one_line()}",
        )
        return Decision(
            reply=expired, delivered=delivered, failed={**failed, **dict.fromkeys(waiting, expired)}
        )
    delay = retry_delay(attempts, schedule, rand)
    retry_after = getattr(outcome, "retry_after", None)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return Decision(
        reply=reply,
        delivered=delivered,
        failed=failed,
        pending=waiting,
        next_attempt=now + delay,
        route_trouble=trouble,
    )


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"
