"""The admin server of a running relay: /healthz, /readyz and /metrics over real HTTP.

Each test starts a relay with `admin: {address: 127.0.0.1:0}` against the emulator and asks what
a container runtime, Kubernetes or Prometheus would ask.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from relaykit import relay_config, secret_account, wait_until

from relay.admin import AdminServer, AdminState
from relay.app import Relay
from relay.config import AdminConfig
from relay.spool import QueueAdmin
from relay.testing.emulator import Emulator, SampleTenant

ADMIN = AdminConfig(host="127.0.0.1", port=0)


def send(port: int, n: int = 1) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            "relay@contoso.com",
            ["someone@example.org"],
            f"From: relay@contoso.com\r\nTo: someone@example.org\r\nSubject: admin {n}\r\n"
            "\r\nhi\r\n",
        )
        return client.noop()[1].decode()


async def get(relay: Relay, path: str) -> tuple[int, str, dict[str, str]]:
    assert relay.admin is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{relay.admin.port}{path}") as response,
    ):
        return response.status, await response.text(), dict(response.headers)


async def get_json(relay: Relay, path: str) -> tuple[int, Any]:
    status, text, _ = await get(relay, path)
    return status, json.loads(text)


async def test_healthz_answers_ok_while_the_process_runs(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    relay = await start(replace(relay_config(emulator, sample, tmp_path / "spool"), admin=ADMIN))
    status, text, headers = await get(relay, "/healthz")
    assert (status, text) == (200, "ok\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert repr(relay.admin) == f"<AdminServer 127.0.0.1:{relay.admin.port} running>"


async def test_readyz_reports_listeners_spool_and_each_account(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """Before any mail the account has no token result (null); after a delivery it is ok."""
    relay = await start(replace(relay_config(emulator, sample, tmp_path / "spool"), admin=ADMIN))
    status, body = await get_json(relay, "/readyz")
    port = relay.listeners[0].port
    assert status == 200
    assert body == {
        "status": "ready",
        "listeners": [{"address": f"127.0.0.1:{port}", "ok": True, "state": "serving"}],
        "spool": {"path": str(tmp_path / "spool"), "ok": True, "error": None},
        "accounts": {
            "contoso": {"ok": None, "requests": 0, "failures": 0, "last_error": None},
        },
    }
    await asyncio.to_thread(send, port)
    await emulator.smtp.wait_for_messages(1)
    status, body = await get_json(relay, "/readyz")
    assert status == 200 and body["status"] == "ready"
    assert body["accounts"]["contoso"] == {
        "ok": True,
        "requests": 1,
        "failures": 0,
        "last_error": None,
    }
    assert not list((tmp_path / "spool" / "incoming").glob("probe-*"))  # the probe cleans up


async def test_a_refused_secret_makes_readyz_degraded_but_still_200(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    """The relay keeps taking and queueing mail while the secret is wrong: still in service,
    with Microsoft's reason in the body and never the secret itself."""
    wrong = "Wr0ng~secret.value-not.the.real.one"
    account = secret_account(emulator, sample, secret=wrong)
    config = relay_config(emulator, sample, tmp_path / "spool", account=account, retry=(60.0,))
    relay = await start(replace(config, admin=ADMIN))
    await asyncio.to_thread(send, relay.listeners[0].port)
    await wait_until(lambda: relay.tokens["contoso"].failures > 0)
    status, text, _ = await get(relay, "/readyz")
    assert status == 200 and wrong not in text
    _, body = await get_json(relay, "/readyz")
    contoso = body["accounts"]["contoso"]
    assert body["status"] == "degraded"
    assert contoso["ok"] is False and contoso["failures"] == 1
    assert contoso["last_error"].startswith(
        "invalid_client: AADSTS7000215: Invalid client secret provided."
    )


async def test_a_spool_that_cannot_be_written_makes_readyz_503(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    spool = tmp_path / "spool"
    relay = await start(replace(relay_config(emulator, sample, spool), admin=ADMIN))
    incoming = spool / "incoming"
    incoming.rename(spool / "incoming.away")
    incoming.write_text("not a directory")  # root ignores file modes; this stops it for real
    try:
        status, body = await get_json(relay, "/readyz")
    finally:
        incoming.unlink()
        (spool / "incoming.away").rename(incoming)
    assert status == 503 and body["status"] == "not ready"
    assert body["spool"]["ok"] is False
    assert body["spool"]["error"].startswith("writing a probe file in incoming/: Not a directory")
    status, _ = await get_json(relay, "/readyz")
    assert status == 200


async def test_a_listener_that_stopped_serving_makes_readyz_503(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    relay = await start(replace(relay_config(emulator, sample, tmp_path / "spool"), admin=ADMIN))
    await relay.listeners[0].drain(0)
    status, body = await get_json(relay, "/readyz")
    assert status == 503
    assert body["listeners"][0]["ok"] is False
    assert body["listeners"][0]["state"] == "stopping"


async def test_metrics_is_prometheus_text(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    relay = await start(replace(relay_config(emulator, sample, tmp_path / "spool"), admin=ADMIN))
    status, text, headers = await get(relay, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE relay_messages_received_total counter" in text
    assert 'relay_queue_messages{state="queue"} 0.0' in text


async def test_without_admin_config_there_is_no_admin_server(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    relay = await start(relay_config(emulator, sample, tmp_path / "spool"))
    assert relay.admin is None


async def test_an_admin_address_in_use_stops_the_start_cleanly(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """The bind error reaches `relay serve` (which prints it and exits 1); listeners, scheduler
    and spool are stopped again, so the spool lock is free for the next try."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = AdminConfig(host="127.0.0.1", port=taken.getsockname()[1])
        spool = tmp_path / "spool"
        relay = Relay(replace(relay_config(emulator, sample, spool), admin=admin))
        with pytest.raises(OSError):
            await relay.start()
    assert relay.admin is not None and relay.admin.state is AdminState.STOPPED
    assert relay.listeners[0].state.value == "stopped"
    again = Relay(relay_config(emulator, sample, spool))
    await again.start()  # the spool lock was released
    await again.stop(grace=1)
    assert await QueueAdmin(spool).entries() == []


async def test_the_admin_server_starts_once(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, start
) -> None:
    relay = await start(replace(relay_config(emulator, sample, tmp_path / "spool"), admin=ADMIN))
    assert relay.admin is not None
    with pytest.raises(RuntimeError, match="admin server is running; it starts once"):
        await relay.admin.start()
    server = AdminServer(relay, ADMIN)
    await server.stop()
    assert server.state is AdminState.STOPPED
    with pytest.raises(RuntimeError, match="admin server is stopped; it starts once"):
        await server.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port


async def test_stopping_the_relay_stops_the_admin_server_first(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    relay = Relay(replace(relay_config(emulator, sample, tmp_path / "spool"), admin=ADMIN))
    await relay.start()
    port = relay.admin.port  # type: ignore[union-attr]
    await relay.stop(grace=1)
    assert relay.admin.state is AdminState.STOPPED  # type: ignore[union-attr]
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/healthz")
