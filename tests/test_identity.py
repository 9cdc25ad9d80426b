"""relay's token provider (MSAL) against the emulated identity platform."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from relaykit import certificate_account, secret_account

from relay.errors import TokenRejected, TokenUnavailable
from relay.identity import EXCHANGE_SCOPE, GRAPH_SCOPE, MsalTokenProvider
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.tokens import EXCHANGE_AUDIENCE, GRAPH_AUDIENCE


def token_requests(emulator: Emulator) -> int:
    return sum(1 for r in emulator.identity.requests if r.path.endswith("/oauth2/v2.0/token"))


async def test_secret_token_is_cached_and_shared_by_concurrent_askers(
    emulator: Emulator, sample: SampleTenant
) -> None:
    """Fifty concurrent askers, then fifty more: one token request in all."""
    provider = MsalTokenProvider(secret_account(emulator, sample))
    tokens = await asyncio.gather(*(provider.token(EXCHANGE_SCOPE) for _ in range(50)))
    tokens += await asyncio.gather(*(provider.token(EXCHANGE_SCOPE) for _ in range(50)))
    assert len(set(tokens)) == 1
    assert token_requests(emulator) == 1 and provider.requests == 1
    claims = emulator.issuer.validate(tokens[0], audience=EXCHANGE_AUDIENCE)
    assert claims.app_id == sample.client_id and claims.tenant_id == sample.tenant_id


async def test_each_scope_gets_its_own_token(emulator: Emulator, sample: SampleTenant) -> None:
    provider = MsalTokenProvider(secret_account(emulator, sample))
    graph = await provider.token(GRAPH_SCOPE)
    assert emulator.issuer.validate(graph, audience=GRAPH_AUDIENCE)
    await provider.token(EXCHANGE_SCOPE)
    assert token_requests(emulator) == 2


async def test_invalidate_forces_a_fresh_token(emulator: Emulator, sample: SampleTenant) -> None:
    provider = MsalTokenProvider(secret_account(emulator, sample))
    await provider.token(EXCHANGE_SCOPE)
    provider.invalidate(EXCHANGE_SCOPE)
    await provider.token(EXCHANGE_SCOPE)
    assert token_requests(emulator) == 2


async def test_certificate_credential(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    provider = MsalTokenProvider(certificate_account(emulator, sample, tmp_path))
    token = await provider.token(EXCHANGE_SCOPE)
    claims = emulator.issuer.validate(token, audience=EXCHANGE_AUDIENCE)
    assert claims.app_id == sample.cert_client_id


async def test_wrong_secret_is_rejected_with_the_aadsts_code(
    emulator: Emulator, sample: SampleTenant
) -> None:
    provider = MsalTokenProvider(secret_account(emulator, sample, secret="not-the-secret-42"))
    with pytest.raises(TokenRejected) as caught:
        await provider.token(EXCHANGE_SCOPE)
    text = str(caught.value)
    assert "invalid_client: AADSTS7000215: Invalid client secret provided." in text
    assert "not-the-secret-42" not in text and "not-the-secret-42" not in repr(provider)


async def test_throttled_token_endpoint_is_temporary(
    emulator: Emulator, sample: SampleTenant
) -> None:
    emulator.identity.faults.throttle(retry_after=1)
    provider = MsalTokenProvider(secret_account(emulator, sample))
    with pytest.raises(TokenUnavailable):
        await provider.token(EXCHANGE_SCOPE)


async def test_token_endpoint_503_is_temporary(emulator: Emulator, sample: SampleTenant) -> None:
    emulator.identity.faults.unavailable()
    provider = MsalTokenProvider(secret_account(emulator, sample))
    with pytest.raises(TokenUnavailable, match="identity platform"):
        await provider.token(EXCHANGE_SCOPE)


async def test_unreachable_identity_platform_is_temporary(
    emulator: Emulator, sample: SampleTenant
) -> None:
    account = secret_account(emulator, sample)
    dead = account.endpoints.__class__(
        authority="https://127.0.0.1:9",  # discard port: nothing listens
        smtp_host=account.endpoints.smtp_host,
        smtp_port=account.endpoints.smtp_port,
        graph=account.endpoints.graph,
    )
    provider = MsalTokenProvider(account.__class__(**{**account.__dict__, "endpoints": dead}))
    with pytest.raises(TokenUnavailable, match="unreachable"):
        await provider.token(EXCHANGE_SCOPE)


async def test_untrusted_certificate_is_not_accepted(
    emulator: Emulator, sample: SampleTenant
) -> None:
    """Without the emulator's CA the identity platform's certificate must not be trusted."""
    account = secret_account(emulator, sample)
    provider = MsalTokenProvider(account.__class__(**{**account.__dict__, "ca_file": None}))
    with pytest.raises(TokenUnavailable, match="SSLError"):
        await provider.token(EXCHANGE_SCOPE)
    assert token_requests(emulator) == 0
