"""Prometheus metrics for one relay: what the admin server's `/metrics` serves.

Each `Relay` owns a `Metrics` with its own `CollectorRegistry`, never the process-wide one, so
several relays in one process (tests, the demo) do not count into each other. The parts that see
an event call one small method on it: the intake `received`, the scheduler `attempted`,
`delivered`, `deferred` and `bounced`, the inbound importer `imported`. What is state rather
than an event (the queue's depth and oldest message, each account's token requests and
failures) is read from the spool and the token providers when Prometheus scrapes (`watch`), so
nothing has to be kept in step.

Label values come from relay.yaml (route, account and mailbox names) or from small fixed sets
(spool states, reply classes, RFC 3463 codes): never from what a client sent, never a secret.
Nothing here does I/O or raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relay.reply import Reply
from relay.spool import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format 0.0.4

# Seconds from arrival to the upstream's acceptance: a healthy relay delivers in well under a
# second, a deferred message after minutes or hours, and nothing stays longer than max_age (5d).
LATENCY_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
    5 * 86400.0,
)


class QueueCensus(Protocol):
    def census(self) -> Mapping[State, tuple[int, float | None]]:
        """Per spool state: how many messages, and when the oldest arrived (None: not known)."""
        ...


class TokenCounts(Protocol):
    requests: int  # token requests that reached the identity platform
    failures: int  # token requests that got no token


def reply_class(reply: Reply) -> str:
    """`2xx`, `4xx` or `5xx`."""
    return f"{reply.code // 100}xx"


class Metrics:
    """The relay's counters and the collectors that read its state at scrape time."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        r = self.registry
        self._received = Counter(
            "relay_messages_received",
            "Messages accepted from clients and stored in the spool (one per route split)",
            ["route"],
            registry=r,
        )
        self._delivered = Counter(
            "relay_messages_delivered",
            "Delivery attempts after which the upstream had taken the message for recipients",
            ["route"],
            registry=r,
        )
        self._deferred = Counter(
            "relay_messages_deferred",
            "Delivery attempts that left recipients waiting for a retry",
            ["route"],
            registry=r,
        )
        self._bounced = Counter(
            "relay_messages_bounced",
            "Messages given up on for some recipients (bounced and dead-lettered)",
            ["route"],
            registry=r,
        )
        self._replies = Counter(
            "relay_upstream_replies",
            "Outcomes of delivery attempts by reply class and RFC 3463 status (network, TLS and"
            " token trouble count as the relay's own 451 4.x.x)",
            ["route", "class", "status"],
            registry=r,
        )
        self._latency = Histogram(
            "relay_delivery_latency_seconds",
            "Seconds from a message's arrival to the upstream taking it",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._imported = Counter(
            "relay_inbound_imported",
            "Messages imported from an Exchange mailbox and handed to the inbound sink",
            ["mailbox"],
            registry=r,
        )

    def __repr__(self) -> str:
        return f"<Metrics {len(list(self.registry.collect()))} families>"

    # Events --------------------------------------------------------------------------------

    def received(self, route: str) -> None:
        self._received.labels(route).inc()

    def attempted(self, route: str, reply: Reply) -> None:
        """One delivery attempt ended with `reply` (the upstream's, or the relay's own)."""
        self._replies.labels(route, reply_class(reply), reply.status or "none").inc()

    def delivered(self, route: str, latency: float) -> None:
        self._delivered.labels(route).inc()
        self._latency.labels(route).observe(max(0.0, latency))

    def deferred(self, route: str) -> None:
        self._deferred.labels(route).inc()

    def bounced(self, route: str) -> None:
        self._bounced.labels(route).inc()

    def imported(self, mailbox: str) -> None:
        self._imported.labels(mailbox.lower()).inc()

    # State, read at scrape time ------------------------------------------------------------

    def watch(self, *, queue: QueueCensus, tokens: Mapping[str, TokenCounts]) -> None:
        """Report `queue`'s depth and age, and each account's token counts, on every scrape."""
        self.registry.register(_StateCollector(queue, tokens, self._clock))

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


class _StateCollector:
    """Reads the spool and the token providers on each scrape."""

    def __init__(
        self, queue: QueueCensus, tokens: Mapping[str, TokenCounts], clock: Callable[[], float]
    ) -> None:
        self._queue = queue
        self._tokens = tokens
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "relay_queue_messages", "Messages in the spool, by state", labels=["state"]
        )
        age = GaugeMetricFamily(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest message in each spool state (0 when there is none)",
            labels=["state"],
        )
        now = self._clock()
        for state, (count, oldest) in self._queue.census().items():
            depth.add_metric([state.value], count)
            age.add_metric([state.value], max(0.0, now - oldest) if oldest is not None else 0.0)
        requests = CounterMetricFamily(
            "relay_token_requests",
            "Token requests that reached the identity platform, per account",
            labels=["account"],
        )
        failures = CounterMetricFamily(
            "relay_token_failures",
            "Token requests that got no token (refused, throttled, unreachable), per account",
            labels=["account"],
        )
        for account, counts in self._tokens.items():
            requests.add_metric([account], counts.requests)
            failures.add_metric([account], counts.failures)
        yield from (depth, age, requests, failures)
