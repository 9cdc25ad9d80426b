"""The admin HTTP server (`admin.address`): /healthz, /readyz and /metrics for one `Relay`.

    GET /healthz   200 "ok": the process is alive and its event loop answers (liveness).
    GET /readyz    200 or 503 with JSON: every listener serving, the spool writable (a probe
                   file written and synced where intake writes), and each account's last token
                   result. A failing token makes the answer "degraded" but still 200: the relay
                   goes on accepting and queueing mail while an operator fixes the credential, and
                   taking it out of service would turn queued mail into refused mail.
    GET /metrics   Prometheus text format (`relay.metrics`).

It reads the relay's parts and never changes them; it takes nothing from and leaves nothing in
the spool but the probe file. Token errors in /readyz are Microsoft's first line (an AADSTS code
and text, or Exchange's reply), which carry no secret. `start()` raises `OSError` when the
address cannot be bound; a second `start()`, or one after `stop()`, raises `RuntimeError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from relay.config import AdminConfig, format_address
from relay.errors import SpoolError
from relay.listener import ListenerState
from relay.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from relay.app import Relay

log = logging.getLogger("relay.admin")


class TokenStatus(Protocol):
    requests: int
    failures: int
    last_error: str | None


class Readiness(Enum):
    READY = "ready"  # 200
    DEGRADED = "degraded"  # 200: mail is taken and queued, but an account cannot get tokens
    NOT_READY = "not ready"  # 503: a listener is down or the spool cannot be written


def account_status(tokens: TokenStatus) -> dict[str, Any]:
    """One account's last token result: ok true/false, or null before its first request."""
    ok = None if tokens.requests == 0 and tokens.failures == 0 else tokens.last_error is None
    return {
        "ok": ok,
        "requests": tokens.requests,
        "failures": tokens.failures,
        "last_error": tokens.last_error,
    }


def readiness(
    listeners: list[dict[str, Any]], spool: dict[str, Any], accounts: Mapping[str, dict[str, Any]]
) -> Readiness:
    if not all(lis["ok"] for lis in listeners) or not spool["ok"]:
        return Readiness.NOT_READY
    if any(acc["ok"] is False for acc in accounts.values()):
        return Readiness.DEGRADED
    return Readiness.READY


class AdminState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class AdminServer:
    def __init__(self, relay: Relay, config: AdminConfig) -> None:
        self._relay = relay
        self.config = config
        self.state = AdminState.NEW
        self._port: int | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    def __repr__(self) -> str:
        where = format_address(self.config.host, self._port or self.config.port)
        return f"<AdminServer {where} {self.state.value}>"

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one port 0 picked)."""
        if self._port is None:
            raise RuntimeError("AdminServer is not started")
        return self._port

    async def start(self) -> None:
        if self.state is not AdminState.NEW:
            raise RuntimeError(f"admin server is {self.state.value}; it starts once")
        self.state = AdminState.RUNNING
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        try:
            await site.start()
        except BaseException:
            self.state = AdminState.STOPPED
            await self._runner.cleanup()
            raise
        self._port = int(self._runner.addresses[0][1])
        where = format_address(self.config.host, self.port)
        log.info("admin: /healthz /readyz /metrics on %s", where)

    async def stop(self) -> None:
        """Stop answering; idempotent."""
        if self.state is AdminState.RUNNING:
            await self._runner.cleanup()
        self.state = AdminState.STOPPED

    # Handlers ------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        relay = self._relay
        listeners = [
            {
                "address": format_address(lis.config.host, lis.port),
                "ok": lis.state is ListenerState.SERVING,
                "state": lis.state.value,
            }
            for lis in relay.listeners
        ]
        spool: dict[str, Any] = {"path": str(relay.config.spool.path), "ok": False, "error": None}
        if relay.spool is None:
            spool["error"] = "not open"
        else:
            try:
                await relay.spool.check_writable()
                spool["ok"] = True
            except SpoolError as exc:
                spool["error"] = str(exc)
        accounts = {name: account_status(tokens) for name, tokens in relay.tokens.items()}
        status = readiness(listeners, spool, accounts)
        return web.json_response(
            {"status": status.value, "listeners": listeners, "spool": spool, "accounts": accounts},
            status=503 if status is Readiness.NOT_READY else 200,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._relay.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE}
        )
