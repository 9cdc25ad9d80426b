"""Test helpers for the operators' commands: a relay.yaml pointing at a running emulator, and a
way to run `relay ...` in this process against a relay serving in the same event loop."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from relay.cli import _dispatch, _parser
from relay.testing.emulator import Emulator, SampleTenant


def write_config(
    emulator: Emulator,
    sample: SampleTenant,
    directory: Path,
    *,
    secret: str | None = None,
    routes: Sequence[dict[str, Any]] | None = None,
    inbound: Sequence[dict[str, Any]] = (),
    **top: Any,
) -> Path:
    """A relay.yaml for the sample tenant's secret app (unless `routes` is given: one catch-all
    route through relay@, which may also send as alerts@); `top` adds or replaces sections."""
    config: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0"}],
        "spool": {"path": str(directory / "spool"), "retry": ["1m"]},
        "accounts": {
            "contoso": {
                "tenant_id": sample.tenant_id,
                "client_id": sample.client_id,
                "client_secret": secret or sample.client_secret,
                "endpoints": emulator.endpoints,
                "ca_file": str(emulator.ca_file),
            }
        },
        "routes": list(
            routes
            or [
                {
                    "name": "default",
                    "account": "contoso",
                    "mailbox": sample.mailbox,
                    "send_as": [sample.send_as],
                    "rate": "600/min",
                }
            ]
        ),
        **({"inbound": list(inbound)} if inbound else {}),
        **top,
    }
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def run(*argv: str) -> tuple[int, str, str]:
    """`relay ARGV...` in this process: (exit status, stdout, stderr)."""
    args: argparse.Namespace = _parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = await _dispatch(args)
    return status, out.getvalue(), err.getvalue()
