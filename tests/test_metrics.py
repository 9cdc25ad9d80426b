"""Metric values after real traffic: SMTP into the relay, the relay into the emulator, then a
scrape of /metrics as Prometheus would do it."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from relaykit import relay_config, secret_account, wait_until

from relay.app import Relay
from relay.config import AdminConfig, Config
from relay.metrics import Metrics
from relay.reply import Reply
from relay.spool import State
from relay.testing import exchange_replies as ex
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.smtp import Fault, Phase, server_busy

ADMIN = AdminConfig(host="127.0.0.1", port=0)


def send(port: int, n: int, *, sender: str = "relay@contoso.com") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            sender,
            ["someone@example.org"],
            f"From: {sender or 'app@contoso.com'}\r\nTo: someone@example.org\r\n"
            f"Subject: metrics {n}\r\n\r\nbody {n}\r\n",
        )


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(relay: Relay) -> Samples:
    assert relay.admin is not None
    url = f"http://127.0.0.1:{relay.admin.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return parse(await response.text())


def idle(relay: Relay) -> bool:
    """Nothing waiting, in flight or being taken in: every attempt's outcome is recorded."""
    assert relay.spool is not None
    census = relay.spool.census()
    busy = (State.INCOMING, State.QUEUE, State.ACTIVE, State.DEFERRED)
    return all(census[state][0] == 0 for state in busy)


@pytest.fixture
def start(start: Callable[[Config], Awaitable[Relay]]) -> Callable[[Config], Awaitable[Relay]]:
    """conftest's `start`, with the admin server on (metrics are read from it)."""
    return lambda config: start(replace(config, admin=ADMIN))


async def test_delivered_mail_is_counted_per_route(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    relay = await start(relay_config(emulator, sample, tmp_path / "spool"))
    for n in range(3):
        await asyncio.to_thread(send, relay.listeners[0].port, n)
    await emulator.smtp.wait_for_messages(3)
    await wait_until(lambda: idle(relay))
    m = await scrape(relay)
    assert value(m, "relay_messages_received_total", route="default") == 3
    assert value(m, "relay_messages_delivered_total", route="default") == 3
    assert value(m, "relay_messages_deferred_total", route="default") is None
    assert value(m, "relay_messages_bounced_total", route="default") is None
    assert (
        value(
            m, "relay_upstream_replies_total", route="default", **{"class": "2xx"}, status="2.0.0"
        )
        == 3
    )
    assert value(m, "relay_delivery_latency_seconds_count", route="default") == 3
    assert value(m, "relay_delivery_latency_seconds_bucket", route="default", le="+Inf") == 3
    assert value(m, "relay_token_requests_total", account="contoso") == 1  # cached after that
    assert value(m, "relay_token_failures_total", account="contoso") == 0
    for state in State:
        assert value(m, "relay_queue_messages", state=state.value) == 0
        assert value(m, "relay_queue_oldest_age_seconds", state=state.value) == 0


async def test_a_transient_reply_counts_a_deferral_and_its_reply_class(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    emulator.smtp.inject(server_busy(Phase.DATA))
    relay = await start(relay_config(emulator, sample, tmp_path / "spool", retry=(0.1,)))
    await asyncio.to_thread(send, relay.listeners[0].port, 1)
    await emulator.smtp.wait_for_messages(1)
    await wait_until(lambda: idle(relay))
    m = await scrape(relay)
    assert value(m, "relay_messages_deferred_total", route="default") == 1
    assert value(m, "relay_messages_delivered_total", route="default") == 1
    replies = {"route": "default", "class": "4xx", "status": "4.7.500"}
    assert value(m, "relay_upstream_replies_total", **replies) == 1


async def test_a_permanent_reply_counts_a_bounce(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """The message bounces; its DSN is delivered through the same route (a delivery that was
    never received from a client)."""
    emulator.smtp.inject(Fault(Phase.DATA, reply=ex.SUBMISSION_QUOTA_EXCEEDED))
    relay = await start(relay_config(emulator, sample, tmp_path / "spool"))
    await asyncio.to_thread(send, relay.listeners[0].port, 1)
    await emulator.smtp.wait_for_messages(1)  # the DSN
    await wait_until(lambda: idle(relay))
    m = await scrape(relay)
    assert value(m, "relay_messages_received_total", route="default") == 1
    assert value(m, "relay_messages_bounced_total", route="default") == 1
    assert value(m, "relay_messages_delivered_total", route="default") == 1
    replies = {"route": "default", "class": "5xx", "status": "5.2.0"}
    assert value(m, "relay_upstream_replies_total", **replies) == 1
    assert value(m, "relay_queue_messages", state="dead") == 1


async def test_waiting_mail_shows_as_queue_depth_and_token_failures(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """A wrong secret: the message waits in deferred/, the token failure is counted, and the
    secret appears nowhere in the scrape."""
    wrong = "Wr0ng~secret.value-not.the.real.one"
    account = secret_account(emulator, sample, secret=wrong)
    relay = await start(
        relay_config(emulator, sample, tmp_path / "spool", account=account, retry=(60.0,))
    )
    await asyncio.to_thread(send, relay.listeners[0].port, 1)
    await wait_until(lambda: any(e.attempts for e in relay.spool.ready()))  # type: ignore[union-attr]
    assert relay.admin is not None
    url = f"http://127.0.0.1:{relay.admin.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    assert wrong not in text
    m = parse(text)
    assert value(m, "relay_queue_messages", state="deferred") == 1
    assert value(m, "relay_queue_messages", state="queue") == 0
    assert value(m, "relay_queue_oldest_age_seconds", state="deferred") > 0  # type: ignore[operator]
    assert value(m, "relay_token_failures_total", account="contoso") == 1
    assert value(m, "relay_messages_deferred_total", route="default") == 1
    token = {"route": "default", "class": "5xx", "status": "5.7.3"}  # TokenRejected's reply
    assert value(m, "relay_upstream_replies_total", **token) == 1


class FakeSpool:
    def census(self) -> dict[State, tuple[int, float | None]]:
        return {State.QUEUE: (2, 1000.0), State.DEFERRED: (1, 400.0), State.DEAD: (0, None)}


class FakeTokens:
    requests = 4
    failures = 1


def test_queue_age_is_read_at_scrape_time() -> None:
    now = [1060.0]
    metrics = Metrics(clock=lambda: now[0])
    metrics.watch(queue=FakeSpool(), tokens={"contoso": FakeTokens()})
    m = parse(metrics.exposition().decode())
    assert value(m, "relay_queue_messages", state="queue") == 2
    assert value(m, "relay_queue_oldest_age_seconds", state="queue") == 60
    assert value(m, "relay_queue_oldest_age_seconds", state="deferred") == 660
    assert value(m, "relay_queue_oldest_age_seconds", state="dead") == 0
    assert value(m, "relay_token_requests_total", account="contoso") == 4
    assert value(m, "relay_token_failures_total", account="contoso") == 1
    now[0] = 1100.0
    m = parse(metrics.exposition().decode())
    assert value(m, "relay_queue_oldest_age_seconds", state="queue") == 100


def test_inbound_imports_are_counted_per_mailbox() -> None:
    metrics = Metrics()
    metrics.imported("Helpdesk@contoso.com")
    metrics.imported("helpdesk@contoso.com")
    m = parse(metrics.exposition().decode())
    assert value(m, "relay_inbound_imported_total", mailbox="helpdesk@contoso.com") == 2


def test_two_relays_in_one_process_count_separately() -> None:
    """Each relay has its own registry: nothing goes to prometheus_client's global one."""
    first, second = Metrics(), Metrics()
    first.received("default")
    first.attempted("default", Reply(250, "2.0.0", "OK"))
    second.received("default")
    second.received("default")
    assert (
        value(parse(first.exposition().decode()), "relay_messages_received_total", route="default")
        == 1
    )
    assert (
        value(parse(second.exposition().decode()), "relay_messages_received_total", route="default")
        == 2
    )


def test_a_reply_without_enhanced_status_is_labelled_none() -> None:
    metrics = Metrics()
    metrics.attempted("default", Reply(421, "", "closing"))
    m = parse(metrics.exposition().decode())
    labels = {"route": "default", "class": "4xx", "status": "none"}
    assert value(m, "relay_upstream_replies_total", **labels) == 1
