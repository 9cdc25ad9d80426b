"""Shared fixtures: the sample tenant and a running emulator on loopback (port 0) in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay.app import Relay
from relay.config import Config
from relay.testing.emulator import Emulator, SampleTenant, sample_tenant


@pytest.fixture
def sample() -> SampleTenant:
    """A fresh sample directory (contoso.com) and the credentials that work against it."""
    return sample_tenant()


@pytest.fixture
async def emulator(sample: SampleTenant, tmp_path: Path) -> AsyncIterator[Emulator]:
    """The emulator serving `sample.directory`; its CA is at `emulator.ca_file`."""
    async with Emulator(sample.directory, state_dir=tmp_path / "emulator") as emu:
        yield emu


@pytest.fixture
async def start() -> AsyncIterator[Callable[[Config], Awaitable[Relay]]]:
    """Start a `Relay` for a config; every relay started is stopped when the test ends."""
    relays: list[Relay] = []

    async def starter(config: Config) -> Relay:
        relay = Relay(config)
        await relay.start()
        relays.append(relay)
        return relay

    yield starter
    for relay in relays:
        await relay.stop(grace=2)
