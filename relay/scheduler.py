"""Delivery loop: takes queued messages from the spool and hands them to route transports.

Takes from the spool the messages that are due (new ones as soon as they are durable, deferred
ones when their time comes), claims each one, sends it through its route's transport and leaves
the result in the spool: recipients delivered, deferred with a next attempt, or failed — then a
bounce (RFC 3464) to the envelope sender is queued through the same route and the message goes
to the dead-letter area with its reason.

Per route (one mailbox): at most `connections` deliveries at once and at most `rate` sends,
new and deferred mail alternate, and while the route's upstream or token endpoint is down the
whole route backs off (one probe at a time) instead of spending every message's attempts.
Decisions are made by `relay.retry.decide` (pure); this module does the I/O around them.

Stopping: no new claims; deliveries in flight get a grace period, then are cancelled; their
messages stay in the spool and are delivered after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from relay.bounce import bounce_for
from relay.config import RouteConfig, SpoolConfig
from relay.errors import DeliveryError, SpoolError
from relay.metrics import Metrics
from relay.reply import Reply
from relay.retry import Decision, decide
from relay.spool import QueueEntry, Spool
from relay.transports import Delivered, OutgoingMessage, Transport

log = logging.getLogger("relay.scheduler")

ROUTE_BACKOFF_START = 1.0  # seconds; doubles while the route keeps failing, up to retry[0]


class Pacer:
    """At most one send per `interval` seconds, shared by a route's workers."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = 0.0

    def reserve(self) -> float:
        """Reserve the next slot; return how long to wait for it."""
        now = self._clock()
        slot = max(now, self._next)
        self._next = slot + self.interval
        return slot - now

    def __repr__(self) -> str:
        return (
            f"<Pacer every {self.interval:g}s next in {max(0.0, self._next - self._clock()):.2f}s>"
        )


@dataclass
class RouteRuntime:
    """What the scheduler needs to deliver through one route."""

    config: RouteConfig
    transport: Transport
    pacer: Pacer  # shared by the routes that send as one mailbox


class _RouteQueue:
    """In-memory order of one route's messages: new ones FIFO, deferred ones by due time."""

    def __init__(self, runtime: RouteRuntime) -> None:
        self.runtime = runtime
        self.new: deque[tuple[float, str]] = deque()  # due now when added: (due, qid)
        self.deferred: list[tuple[float, str]] = []  # heap of (wall-clock due time, qid)
        self.due: dict[str, float] = {}  # the one live due time per queued qid
        self.changed = asyncio.Event()
        self.pacer = runtime.pacer
        self.paused_until = 0.0
        self.backoff = 0.0
        self.prefer_deferred = False
        self.in_flight = 0

    def __repr__(self) -> str:
        return (
            f"<route {self.runtime.config.name} queued={len(self.due)} "
            f"in_flight={self.in_flight} paused={max(0.0, self.paused_until - time.time()):.0f}s>"
        )

    def add(self, qid: str, due: float) -> None:
        """Queue `qid` for `due`; a later notice for the same qid replaces an earlier one."""
        if self.due.get(qid) == due:
            return  # the spool told us again (a rescan): nothing new
        self.due[qid] = due
        if due <= time.time():
            self.new.append((due, qid))
        else:
            heapq.heappush(self.deferred, (due, qid))
        self.changed.set()

    def take(self, now: float) -> str | float | None:
        """A qid to deliver now, or how long to wait (None: nothing queued at all)."""
        self._drop_stale()
        if now < self.paused_until:
            return self.paused_until - now
        due_deferred = bool(self.deferred) and self.deferred[0][0] <= now
        if self.new and (not due_deferred or not self.prefer_deferred):
            self.prefer_deferred = True
            qid = self.new.popleft()[1]
        elif due_deferred:
            self.prefer_deferred = False
            qid = heapq.heappop(self.deferred)[1]
        elif self.deferred:
            return self.deferred[0][0] - now
        else:
            return None
        del self.due[qid]
        return qid

    def _drop_stale(self) -> None:
        """Forget superseded notices at the heads of both queues."""
        while self.new and self.due.get(self.new[0][1]) != self.new[0][0]:
            self.new.popleft()
        while self.deferred and self.due.get(self.deferred[0][1]) != self.deferred[0][0]:
            heapq.heappop(self.deferred)

    def trouble(self, retry_first: float) -> None:
        self.backoff = min(max(ROUTE_BACKOFF_START, self.backoff * 2), retry_first)
        self.paused_until = time.time() + self.backoff

    def healthy(self) -> None:
        self.backoff = 0.0
        self.paused_until = 0.0


class Scheduler:
    def __init__(
        self,
        *,
        spool: Spool,
        routes: Mapping[str, RouteRuntime],
        policy: SpoolConfig,
        hostname: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._spool = spool
        self._policy = policy
        self._hostname = hostname or socket.getfqdn()
        self._metrics = metrics or Metrics()  # the relay's, or one nobody reads
        self._queues = {name: _RouteQueue(rt) for name, rt in routes.items()}
        self._workers: list[asyncio.Task[None]] = []
        self._delivering: set[asyncio.Task[None]] = set()  # workers inside a delivery
        self._stopping = False
        self._started = False

    def __repr__(self) -> str:
        state = "stopping" if self._stopping else ("running" if self._started else "idle")
        return f"<Scheduler {state} routes={list(self._queues.values())!r}>"

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("Scheduler already started")
        self._started = True
        for entry in self._spool.ready():
            self.submit(entry)
        for queue in self._queues.values():
            for n in range(queue.runtime.config.connections):
                name = f"deliver-{queue.runtime.config.name}-{n}"
                self._workers.append(asyncio.create_task(self._work(queue), name=name))

    def submit(self, entry: QueueEntry) -> None:
        """Learn of a message that is (or will be) due (the owner forwards the spool's
        `on_ready` notices here; `start` reads what was already there)."""
        queue = self._queues.get(entry.envelope.route)
        if queue is None:
            log.error(
                "%s: route %r is not in the configuration; the message stays queued",
                entry.qid,
                entry.envelope.route,
            )
            return
        queue.add(entry.qid, entry.next_attempt)

    async def stop(self, grace: float) -> None:
        """Stop claiming; let deliveries in flight finish within `grace`, then cancel them."""
        self._stopping = True
        for queue in self._queues.values():
            queue.changed.set()
        if not self._workers:
            return
        for task in self._workers:
            if task not in self._delivering:
                task.cancel()  # waiting for mail or for its pacing slot: nothing to finish
        _, pending = await asyncio.wait(self._workers, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning(
                "stopped with %d deliveries cancelled; their mail stays queued", len(pending)
            )
        self._workers.clear()

    async def _work(self, queue: _RouteQueue) -> None:
        while not self._stopping:
            got = queue.take(time.time())
            if not isinstance(got, str):
                queue.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.changed.wait(), timeout=got)
                continue
            wait = queue.pacer.reserve()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.in_flight += 1
            task = asyncio.current_task()
            assert task is not None
            self._delivering.add(task)
            try:
                await self._deliver(queue, got)
            except asyncio.CancelledError:
                await asyncio.shield(self._release(got))
                raise
            except SpoolError:
                log.exception("%s: spool error during delivery; retrying later", got)
                queue.add(got, time.time() + self._policy.retry[0])
            except Exception:
                # A bug must not take the route's worker with it, nor leave the mail in active/.
                log.exception("%s: unexpected error during delivery; retrying later", got)
                await self._release(got, delay=self._policy.retry[0])
                queue.add(got, time.time() + self._policy.retry[0])
            finally:
                queue.in_flight -= 1
                self._delivering.discard(task)

    async def _release(self, qid: str, *, delay: float = 0.0) -> None:
        """A delivery cut off (by stop, reload or an error of ours): make the message due again
        after `delay`, so that it does not sit in active/ until the next start. Best effort: it
        may be gone already."""
        with contextlib.suppress(SpoolError):
            await self._spool.defer(
                qid,
                reply="451 4.3.0 delivery interrupted (relay stopping, reloading or failing)",
                next_attempt=time.time() + delay,
            )

    async def _deliver(self, queue: _RouteQueue, qid: str) -> None:
        entry = await self._spool.claim(qid)
        if entry is None:
            return  # delivered, held or deleted meanwhile
        data = await self._spool.read(qid)
        message = OutgoingMessage(
            qid=qid,
            mail_from=entry.envelope.mail_from,
            rcpt_tos=entry.pending,
            data=data,
            smtputf8=entry.envelope.smtputf8,
        )
        started = time.time()
        outcome: Delivered | DeliveryError
        try:
            outcome = await queue.runtime.transport.send(message)
        except DeliveryError as exc:
            outcome = exc
        now = time.time()
        self._metrics.attempted(queue.runtime.config.name, outcome.reply)
        decision = decide(
            outcome,
            pending=entry.pending,
            attempts=entry.attempts + 1,
            received_at=entry.envelope.received_at,
            now=now,
            schedule=self._policy.retry,
            max_age=self._policy.max_age,
        )
        if decision.route_trouble:
            queue.trouble(self._policy.retry[0])
        else:
            queue.healthy()
        await self._apply(queue, entry, data, decision, took=now - started)

    async def _apply(
        self, queue: _RouteQueue, entry: QueueEntry, data: bytes, d: Decision, *, took: float
    ) -> None:
        route = queue.runtime.config
        delay = time.time() - entry.envelope.received_at
        where = f"{entry.qid}: route={route.name} mailbox={route.mailbox}"
        if d.delivered:
            log.info(
                "%s delivered to=%s delay=%.1fs attempt=%.1fs reply=%s",
                where,
                ",".join(d.delivered),
                delay,
                took,
                d.reply.one_line(),
            )
            self._metrics.delivered(route.name, delay)
        failed = dict(d.failed)
        pending = list(d.pending)
        if failed and not await self._bounce(queue, entry, data, failed):
            # No bounce could be queued: keep those recipients pending rather than lose them.
            pending += list(failed)
            failed = {}
        if failed:
            self._metrics.bounced(route.name)
        if pending:
            next_attempt = d.next_attempt or time.time() + self._policy.retry[0]
            entry = await self._spool.defer(
                entry.qid,
                reply=d.reply.one_line(),
                next_attempt=next_attempt,
                delivered=d.delivered,
                failed={r: rep.one_line() for r, rep in failed.items()},
            )
            log.info(
                "%s deferred to=%s delay=%.1fs next_in=%.0fs reply=%s",
                where,
                ",".join(pending),
                delay,
                next_attempt - time.time(),
                d.reply.one_line(),
            )
            self._metrics.deferred(route.name)
            queue.add(entry.qid, next_attempt)
            return
        if not failed:
            await self._spool.delivered(entry.qid, d.delivered)
            return
        await self._spool.dead(
            entry.qid,
            reason="; ".join(f"{r}: {rep.one_line()}" for r, rep in failed.items()),
            failed={r: rep.one_line() for r, rep in failed.items()},
            delivered=d.delivered,
        )

    async def _bounce(
        self, queue: _RouteQueue, entry: QueueEntry, data: bytes, failed: Mapping[str, Reply]
    ) -> bool:
        """Queue the DSN for `failed`; False when one was due but could not be queued."""
        route = queue.runtime.config
        where = f"{entry.qid}: route={route.name} mailbox={route.mailbox}"
        for rcpt, reply in failed.items():
            log.warning("%s bounced to=%s reply=%s", where, rcpt, reply.one_line())
        if not self._policy.bounces or not entry.envelope.mail_from:
            return True
        bounce = bounce_for(
            entry, original=data, failed=failed, route=route, reporting_mta=self._hostname
        )
        if bounce is None:
            return True
        try:
            qid = await self._spool.enqueue(*bounce)
        except SpoolError:
            log.exception("%s: could not queue the bounce; deferring instead", where)
            return False
        log.info("%s bounce queued as %s to=%s", where, qid, entry.envelope.mail_from)
        return True
