"""`Relay(config)`: the runtime that `relay serve` starts, waits on and stops.

Start order: spool (recovery) -> token providers -> transports -> scheduler -> importers ->
listeners -> admin server (/healthz, /readyz, /metrics; when `admin:` is configured).
Stop order is the reverse, each step within the grace period, one failure not skipping the rest:
  0. the admin server stops answering;
  1. listeners drain: new connections get 421, idle sessions end, sessions in DATA finish;
  2. the scheduler stops claiming; deliveries in flight finish or are cancelled (their mail stays
     queued); meanwhile the listeners go on answering 421; importers finish their messages;
  3. listeners close, transports close, then the spool (pending commits flushed).
SIGHUP (`reload`) swaps in a validated configuration: see `Relay.reload`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from enum import Enum
from pathlib import Path

from relay.admin import AdminServer
from relay.config import Config, RouteConfig, Transport, load
from relay.errors import ConfigError, IntakeRefused, SpoolError, SpoolFull
from relay.identity import MsalTokenProvider, TokenProvider
from relay.inbound import Importer, build_importers
from relay.intake import Client
from relay.listener import Listener
from relay.logs import configure as configure_logging
from relay.metrics import Metrics
from relay.reply import Reply
from relay.routing import Router
from relay.scheduler import Pacer, RouteRuntime, Scheduler
from relay.spool import Envelope, QueueEntry, Spool
from relay.tls import client_context
from relay.transports import Transport as TransportType
from relay.transports.graph import GraphTransport
from relay.transports.smtp import SmtpTransport

log = logging.getLogger("relay")

SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SPOOL_FAILED = Reply(451, "4.3.0", "Temporary failure storing the message, try again later")


class RelayIntake:
    """The relay's answer to the listener: route with the router, store in the spool."""

    def __init__(self, router: Router, spool: Spool, metrics: Metrics | None = None) -> None:
        self._router = router
        self._spool = spool
        self._metrics = metrics or Metrics()  # the relay's, or one nobody reads

    def check_sender(self, client: Client, mail_from: str) -> Reply | None:
        return self._router.at_mail(client.address, client.user, mail_from)

    def check_recipient(self, client: Client, mail_from: str, rcpt: str) -> Reply | None:
        got = self._router.at_rcpt(client.address, client.user, mail_from, rcpt)
        return got if isinstance(got, Reply) else None

    async def accept(
        self, client: Client, mail_from: str, rcpt_tos: list[str], data: bytes, *, smtputf8: bool
    ) -> str:
        splits = self._router.at_data(client.address, client.user, mail_from, rcpt_tos, data)
        if isinstance(splits, Reply):
            raise IntakeRefused(splits)
        items = [
            (
                Envelope(
                    mail_from=s.mail_from,
                    rcpt_tos=s.rcpt_tos,
                    route=s.route.name,
                    client=client.address,
                    user=client.user,
                    smtputf8=smtputf8,
                ),
                s.data,
            )
            for s in splits
        ]
        try:
            qids = await self._spool.enqueue_many(items)
        except SpoolFull:
            log.error("spool full: refusing a message from %s", client.address)
            raise IntakeRefused(SPOOL_FULL) from None
        except SpoolError:
            log.exception("spool write failed: refusing a message from %s", client.address)
            raise IntakeRefused(SPOOL_FAILED) from None
        for qid, split, (envelope, blob) in zip(qids, splits, items, strict=True):
            log.info(
                "%s: route=%s mailbox=%s received from=<%s> to=%s client=%s%s size=%d",
                qid,
                envelope.route,
                split.route.mailbox,
                envelope.mail_from,
                ",".join(envelope.rcpt_tos),
                client.address,
                f" user={client.user}" if client.user else "",
                len(blob),
            )
            self._metrics.received(envelope.route)
        return " ".join(qids)


def build_routes(config: Config, tokens: Mapping[str, TokenProvider]) -> dict[str, RouteRuntime]:
    """One runtime per route; routes sending as the same mailbox share its transport and pacer.

    Exchange's limits are per mailbox (3 connections, 30 messages a minute, 4 concurrent Graph
    requests), so two routes through one mailbox must not each get a full set. The shared pacer
    takes the strictest rate of those routes, the transport the largest `connections`.
    """
    groups: dict[tuple[object, ...], list[RouteConfig]] = {}
    for route in config.routes:
        key: tuple[object, ...] = (route.account, route.mailbox.lower(), route.transport)
        if route.transport is Transport.GRAPH:
            key += (route.save_to_sent_items,)
        groups.setdefault(key, []).append(route)
    runtimes: dict[str, RouteRuntime] = {}
    for routes in groups.values():
        first = routes[0]
        account = config.accounts[first.account]
        tls = client_context(account.ca_file)
        transport: TransportType
        if first.transport is Transport.GRAPH:
            transport = GraphTransport(
                mailbox=first.mailbox,
                graph_url=account.endpoints.graph,
                tokens=tokens[first.account],
                ssl_context=tls,
                save_to_sent_items=first.save_to_sent_items,
            )
        else:
            transport = SmtpTransport(
                host=account.endpoints.smtp_host,
                port=account.endpoints.smtp_port,
                mailbox=first.mailbox,
                tokens=tokens[first.account],
                tls_context=tls,
                connections=max(r.connections for r in routes),
            )
        pacer = Pacer(max(r.rate.interval for r in routes))  # the strictest rate
        for route in routes:
            runtimes[route.name] = RouteRuntime(config=route, transport=transport, pacer=pacer)
    return runtimes


class State(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Relay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = State.NEW
        self.spool: Spool | None = None
        self.tokens: dict[str, MsalTokenProvider] = {}  # updated in place: metrics read it
        self.routes: dict[str, RouteRuntime] = {}
        self.scheduler: Scheduler | None = None
        self.listeners: list[Listener] = []
        self.importers: list[Importer] = []
        self.metrics = Metrics()
        self.admin: AdminServer | None = None
        self._steps: list[Callable[[float], Awaitable[None]]] | None = None  # left to stop

    def __repr__(self) -> str:
        return (
            f"<Relay {self.state.value} listeners={len(self.listeners)} routes={len(self.routes)}>"
        )

    async def start(self) -> None:
        if self.state is not State.NEW:
            raise RuntimeError(f"Relay cannot start: it is {self.state.value}")
        self.state = State.RUNNING
        cfg = self.config
        try:
            self.spool = await Spool.open(cfg.spool.path)
            self.spool.on_ready(self._submit)
            self.tokens.update({name: MsalTokenProvider(acc) for name, acc in cfg.accounts.items()})
            self.metrics.watch(queue=self.spool, tokens=self.tokens)
            await self._start_delivery(cfg)
            await self._start_importers(cfg)
            intake = RelayIntake(Router(cfg.routes), self.spool, self.metrics)
            for listen in cfg.listeners:
                listener = Listener(listen, limits=cfg.limits, users=cfg.users, intake=intake)
                await listener.start()
                self.listeners.append(listener)
            if cfg.admin is not None:
                self.admin = AdminServer(self, cfg.admin)
                await self.admin.start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start_delivery(self, cfg: Config) -> None:
        assert self.spool is not None
        self.routes = build_routes(cfg, self.tokens)
        self.scheduler = Scheduler(
            spool=self.spool, routes=self.routes, policy=cfg.spool, metrics=self.metrics
        )
        await self.scheduler.start()

    async def _start_importers(self, cfg: Config) -> None:
        self.importers = build_importers(cfg, self.tokens, metrics=self.metrics)
        for importer in self.importers:
            await importer.start()

    async def _stop_importers(self, grace: float) -> None:
        importers, self.importers = self.importers, []
        for importer in importers:
            await importer.stop(grace)

    def _submit(self, entry: QueueEntry) -> None:
        if self.scheduler is not None:
            self.scheduler.submit(entry)

    async def reload(self, config: Config, grace: float = 30.0) -> list[str]:
        """Apply a validated new configuration; return what it could not apply (restart needed).

        New sessions and new delivery attempts use the new configuration; deliveries in flight
        finish on the old one (within `grace`), and queued mail stays queued throughout.
        Listener addresses and TLS settings and the spool path need a restart.
        """
        if self.state is not State.RUNNING or self.spool is None:
            raise RuntimeError(f"Relay cannot reload: it is {self.state.value}")
        kept: list[str] = []
        if config.spool.path != self.config.spool.path:
            kept.append(f"spool.path stays {self.config.spool.path} until a restart")
            config = replace(config, spool=replace(config.spool, path=self.config.spool.path))
        old = {(lc.host, lc.port, lc.tls) for lc in self.config.listeners}
        if {(lc.host, lc.port, lc.tls) for lc in config.listeners} != old:
            kept.append("listen addresses and TLS settings apply after a restart")
        router = Router(config.routes)  # may raise ConfigError: then nothing has changed
        intake = RelayIntake(router, self.spool, self.metrics)
        for listener in self.listeners:
            same = next(
                (
                    lc
                    for lc in config.listeners
                    if (lc.host, lc.port, lc.tls)
                    == (listener.config.host, listener.config.port, listener.config.tls)
                ),
                listener.config,
            )
            listener.reconfigure(same, limits=config.limits, users=config.users, intake=intake)
        # Delivery: let the old scheduler finish what it holds, then start afresh.
        old_scheduler, old_routes = self.scheduler, self.routes
        self.scheduler = None
        if old_scheduler is not None:
            await old_scheduler.stop(grace)
        for transport in {id(rt.transport): rt.transport for rt in old_routes.values()}.values():
            await transport.aclose()
        await self._stop_importers(grace)
        self.tokens.clear()
        self.tokens.update({n: MsalTokenProvider(acc) for n, acc in config.accounts.items()})
        self.config = config
        await self._start_delivery(config)
        try:
            await self._start_importers(config)
        except (OSError, SpoolError) as exc:
            # Outbound mail keeps flowing; the import waits for a fix and the next reload.
            log.error("inbound import not started after reload: %s", exc)
            kept.append("inbound import not running (see the error above)")
        log.info(
            "configuration reloaded: %d routes, %d accounts%s",
            len(config.routes),
            len(config.accounts),
            "".join(f"; {note}" for note in kept),
        )
        return kept

    async def stop(self, grace: float = 30.0) -> None:
        """Stop in reverse order of start; one failing step does not skip the rest.

        Safe to call again: a second call (e.g. after the first was cancelled by a forced stop)
        runs whatever steps are left, with its own grace.
        """
        if self.state is State.NEW:
            self.state = State.STOPPED
        if self._steps is None:
            self.state = State.STOPPED
            steps: list[Callable[[float], Awaitable[None]]] = []
            if self.admin is not None:
                steps.append(_ignore_grace(self.admin.stop))
            # Listeners keep answering 421 until the scheduler has finished its deliveries.
            steps += [lis.drain for lis in self.listeners]
            if self.scheduler is not None:
                steps.append(self.scheduler.stop)
            steps.append(self._stop_importers)
            steps += [_ignore_grace(lis.close) for lis in self.listeners]
            transports = {id(rt.transport): rt.transport for rt in self.routes.values()}
            steps += [_ignore_grace(t.aclose) for t in transports.values()]
            if self.spool is not None:
                steps.append(_ignore_grace(self.spool.aclose))
            self._steps = steps
        while self._steps:
            step = self._steps.pop(0)
            try:
                await step(grace)
            except Exception:
                log.exception("error while stopping; going on with the rest")
        log.info("stopped")


def _ignore_grace(close: Callable[[], Awaitable[None]]) -> Callable[[float], Awaitable[None]]:
    async def step(grace: float) -> None:
        await close()

    return step


STOP_GRACE = 30.0  # seconds deliveries and DATA sessions get to finish on SIGTERM


async def _reload(relay: Relay, path: Path) -> None:
    """SIGHUP: read the file again; a bad one is logged and the running configuration stays."""
    try:
        config = await asyncio.to_thread(load, path)
        await relay.reload(config, STOP_GRACE)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)


async def run_serve(args: argparse.Namespace) -> int:
    """`relay serve`: run until SIGTERM or SIGINT; a second SIGINT stops without waiting."""
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log)
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:  # only records; the main task acts
        (force if stop.is_set() and signum == signal.SIGINT else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    relay = Relay(config)
    try:
        await relay.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    log.info("relay started (%s); SIGTERM or Ctrl-C stops it, SIGHUP reloads", config.source)
    reload = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    while not stop.is_set():
        waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(reload.wait())}
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if reload.is_set() and not stop.is_set():
            reload.clear()
            await _reload(relay, args.config)
    log.info("stopping: finishing deliveries and DATA sessions (up to %.0fs)", STOP_GRACE)
    stopping = asyncio.create_task(relay.stop(STOP_GRACE))
    forced = asyncio.create_task(force.wait())
    await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        log.warning("second interrupt: stopping now")
        stopping.cancel()
        await relay.stop(0)
    forced.cancel()
    return 0
