"""Test helpers that point relay's own parts at a running emulator."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.config import (
    AccountConfig,
    Cloud,
    Config,
    Credential,
    CredentialKind,
    Endpoints,
    ListenerConfig,
    Rate,
    RouteConfig,
    Secret,
    SpoolConfig,
)
from relay.testing.emulator import Emulator, SampleTenant


def emulator_endpoints(emulator: Emulator) -> Endpoints:
    return Endpoints(
        authority=emulator.authority,
        smtp_host=emulator.smtp_host,
        smtp_port=emulator.smtp_port,
        graph=emulator.graph_url,
    )


def secret_account(
    emulator: Emulator, sample: SampleTenant, *, secret: str | None = None, name: str = "contoso"
) -> AccountConfig:
    """The sample tenant's secret app, as relay.yaml would give it, trusting the emulator's CA."""
    return AccountConfig(
        name=name,
        cloud=Cloud.GLOBAL,
        tenant_id=sample.tenant_id,
        client_id=sample.client_id,
        credential=Credential(
            kind=CredentialKind.SECRET, secret=Secret(secret or sample.client_secret)
        ),
        endpoints=emulator_endpoints(emulator),
        ca_file=emulator.ca_file,
    )


def certificate_account(emulator: Emulator, sample: SampleTenant, tmp: Path) -> AccountConfig:
    key, cert = tmp / "app.key", tmp / "app.pem"
    key.write_bytes(sample.key_pem)
    cert.write_bytes(sample.cert_pem)
    return AccountConfig(
        name="contoso-cert",
        cloud=Cloud.GLOBAL,
        tenant_id=sample.tenant_id,
        client_id=sample.cert_client_id,
        credential=Credential(kind=CredentialKind.CERTIFICATE, key_file=key, cert_file=cert),
        endpoints=emulator_endpoints(emulator),
        ca_file=emulator.ca_file,
    )


def relay_config(
    emulator: Emulator,
    sample: SampleTenant,
    spool: Path,
    *,
    account: AccountConfig | None = None,
    retry: tuple[float, ...] = (0.2, 0.5),
    max_age: float = 3600.0,
    rate: Rate | None = None,
    **route: Any,
) -> Config:
    """One loopback listener (port 0), the sample account, one catch-all route to relay@."""
    return Config(
        listeners=(ListenerConfig(host="127.0.0.1", port=0),),
        accounts={"contoso": account or secret_account(emulator, sample)},
        routes=(
            RouteConfig(
                name="default",
                account="contoso",
                mailbox=sample.mailbox,
                rate=rate or Rate(count=1000, per=1.0),
                **route,
            ),
        ),
        spool=SpoolConfig(path=spool, retry=retry, max_age=max_age),
    )


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll state that has no event to wait on (files, log records, another process), within
    `limit` seconds."""
    async with asyncio.timeout(limit):
        while True:
            got = predicate()
            if inspect.isawaitable(got):
                got = await got
            if got:
                return
            await asyncio.sleep(0.02)


REPO = Path(__file__).resolve().parents[1]


async def relay_command(cwd: Path, *args: str) -> asyncio.subprocess.Process:
    """`python -m relay ARGS` from this checkout, in `cwd`, output piped, no standard input."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    }
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", *args),
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
