"""Delegated sign-in: `relay login` (device code) against the emulated identity platform, the
silent refresh `relay serve` does from the token cache, and what happens when it fails.

The test plays the user at the browser: it reads the code from Microsoft's instruction and
approves it in the emulator (`identity.approve`). The emulator's polling interval is 0, so the
sign-in completes as soon as the user has approved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import smtplib
import stat
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest
from relaykit import emulator_endpoints, relay_command, relay_config, wait_until

from relay.app import Relay
from relay.config import (
    AccountConfig,
    Cloud,
    Config,
    Credential,
    CredentialKind,
    InboundConfig,
    RouteConfig,
    Transport,
)
from relay.errors import TokenRejected
from relay.identity import EXCHANGE_SCOPE, GRAPH_SCOPE, MsalTokenProvider, account_scopes
from relay.login import LoginFailed, login
from relay.testing import exchange_replies as ex
from relay.testing.directory import App
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.identity import (
    AUTHORIZATION_PENDING,
    DEVICE_LOGIN_URI,
    REFRESH_TOKEN_EXPIRED,
    SCOPE_INVALID,
    SCOPE_MANY_RESOURCES,
)
from relay.testing.smtp import Phase, shutdown
from relay.testing.tokens import EXCHANGE_DELEGATED_AUDIENCE, GRAPH_AUDIENCE

PUBLIC_CLIENT_ID = "9b3f6a2c-7d41-4e8a-b0c5-2f1e8d7a6c93"  # "Allow public client flows": Yes
SMTP_SEND = "https://outlook.office.com/SMTP.Send"


@pytest.fixture
def public_app(sample: SampleTenant, emulator: Emulator) -> App:
    """An app registration users sign in to; the emulator lets clients poll without waiting."""
    emulator.identity.device_code_interval = 0
    app = sample.directory.tenants[sample.tenant_id].add_app(PUBLIC_CLIENT_ID)
    app.public_client = True
    return app


def delegated_account(
    emulator: Emulator, sample: SampleTenant, spool: Path, *, client_id: str = PUBLIC_CLIENT_ID
) -> AccountConfig:
    """relay.yaml's `delegated_user: relay@contoso.com`, trusting the emulator's CA."""
    return AccountConfig(
        name="contoso",
        cloud=Cloud.GLOBAL,
        tenant_id=sample.tenant_id,
        client_id=client_id,
        credential=Credential(kind=CredentialKind.DELEGATED, user=sample.mailbox),
        endpoints=emulator_endpoints(emulator),
        ca_file=emulator.ca_file,
        token_cache=spool / "tokens" / "contoso.json",
    )


def user_code(message: str) -> str:
    return message.split("enter the code ")[1].split()[0]


def signs_in_as(emulator: Emulator, user: str) -> Callable[[str], None]:
    """A prompt at which `user` reads the code and signs in straight away."""
    return lambda message: emulator.identity.approve(user_code(message), user=user)


def grants(emulator: Emulator) -> list[str]:
    return [
        r.form["grant_type"]
        for r in emulator.identity.requests
        if r.path.endswith("/oauth2/v2.0/token")
    ]


async def signed_in(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> AccountConfig:
    account = delegated_account(emulator, sample, tmp_path / "spool")
    await login(account, [EXCHANGE_SCOPE], prompt=signs_in_as(emulator, sample.mailbox))
    return account


# --- relay login ------------------------------------------------------------------------------


async def test_sign_in_leaves_a_private_token_cache_that_serve_uses(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """The user signs in; the cache is 0600 in a 0700 directory, and the provider's first token
    comes from it, without asking the identity platform again."""
    account = delegated_account(emulator, sample, tmp_path / "spool")
    shown: list[str] = []

    def prompt(message: str) -> None:
        shown.append(message)
        emulator.identity.approve(user_code(message), user=sample.mailbox)

    assert await login(account, [EXCHANGE_SCOPE], prompt=prompt) == sample.mailbox
    (message,) = shown
    assert message == (
        f"To sign in, use a web browser to open the page {DEVICE_LOGIN_URI} and enter the code "
        f"{user_code(message)} to authenticate."
    )
    (start,) = [r for r in emulator.identity.requests if r.path.endswith("/devicecode")]
    assert sorted(start.form["scope"].split()) == [SMTP_SEND, "offline_access", "openid", "profile"]
    cache = account.token_cache
    assert cache is not None
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert "RefreshToken" in json.loads(cache.read_text())

    before = len(grants(emulator))
    token = await MsalTokenProvider(account).token(EXCHANGE_SCOPE)
    assert len(grants(emulator)) == before
    claims = emulator.issuer.validate(token, audience=EXCHANGE_DELEGATED_AUDIENCE)
    assert (claims.upn, claims.scopes, claims.roles) == (
        sample.mailbox,
        frozenset({"SMTP.Send"}),
        frozenset(),
    )


async def test_polling_waits_until_the_user_has_signed_in(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """Polls are answered `authorization_pending` until the user approves; then tokens come."""
    account = delegated_account(emulator, sample, tmp_path / "spool")
    codes: list[str] = []
    signing_in = asyncio.create_task(login(account, [EXCHANGE_SCOPE], prompt=codes.append))
    await wait_until(lambda: bool(codes))
    code = emulator.identity.device_codes[user_code(codes[0])]
    await code.polled.wait()
    emulator.identity.approve(code.user_code, user=sample.mailbox)
    assert await signing_in == sample.mailbox
    assert grants(emulator).count("urn:ietf:params:oauth:grant-type:device_code") >= 2


async def test_an_account_with_graph_routes_gets_graph_scopes_too(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """One sign-in: SMTP.Send first, then the refresh token opens Graph (Mail.Send,
    Mail.ReadWrite); both tokens are in the cache for `serve`."""
    account = delegated_account(emulator, sample, tmp_path / "spool")
    config = relay_config(emulator, sample, tmp_path / "spool", account=account)
    config = replace(
        config,
        routes=(
            *config.routes,
            RouteConfig(
                name="big", account="contoso", mailbox=sample.mailbox, transport=Transport.GRAPH
            ),
        ),
    )
    scopes = account_scopes(config, "contoso")
    assert scopes == [EXCHANGE_SCOPE, GRAPH_SCOPE]
    await login(account, scopes, prompt=signs_in_as(emulator, sample.mailbox))
    before = len(grants(emulator))
    graph = await MsalTokenProvider(account).token(GRAPH_SCOPE)
    assert len(grants(emulator)) == before
    claims = emulator.issuer.validate(graph, audience=GRAPH_AUDIENCE)
    assert claims.scopes == {"Mail.Send", "Mail.ReadWrite"} and claims.upn == sample.mailbox


def test_the_scopes_follow_the_routes_and_imports(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    config = relay_config(emulator, sample, tmp_path)
    graph_only = replace(
        config,
        routes=(replace(config.routes[0], transport=Transport.GRAPH),),
    )
    inbound = Config(
        listeners=(),
        accounts=config.accounts,
        routes=(),
        inbound=(
            InboundConfig(
                name="in", account="contoso", mailbox=sample.mailbox, deliver={"maildir": tmp_path}
            ),
        ),
    )
    unused = replace(config, routes=())
    assert account_scopes(config, "contoso") == [EXCHANGE_SCOPE]
    assert account_scopes(graph_only, "contoso") == [GRAPH_SCOPE]
    assert account_scopes(inbound, "contoso") == [GRAPH_SCOPE]
    assert account_scopes(unused, "contoso") == [EXCHANGE_SCOPE]


async def test_graph_permissions_not_granted_saves_nothing(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """The app has consent for SMTP.Send only: the sign-in works, Graph does not, and nothing
    half-done is kept."""
    public_app.delegated_permissions = {"SMTP.Send"}
    account = delegated_account(emulator, sample, tmp_path / "spool")
    with pytest.raises(LoginFailed) as failed:
        await login(
            account, [EXCHANGE_SCOPE, GRAPH_SCOPE], prompt=signs_in_as(emulator, sample.mailbox)
        )
    assert str(failed.value) == (
        "signed in, but no token for https://graph.microsoft.com/Mail.Send "
        "https://graph.microsoft.com/Mail.ReadWrite: invalid_grant: AADSTS65001: The user or "
        f"administrator has not consented to use the application with ID '{PUBLIC_CLIENT_ID}' "
        "named 'relay'. Send an interactive authorization request for this user and resource. "
        "(grant the app its delegated permissions: API permissions, Grant admin consent); "
        "nothing was saved"
    )
    assert account.token_cache is not None and not account.token_cache.exists()


async def test_an_expired_code_saves_nothing(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    account = delegated_account(emulator, sample, tmp_path / "spool")
    with pytest.raises(LoginFailed) as failed:
        await login(
            account,
            [EXCHANGE_SCOPE],
            prompt=lambda message: emulator.identity.expire_device_code(user_code(message)),
        )
    assert str(failed.value) == (
        "the sign-in failed: expired_token: AADSTS70019: Verification code expired. (run "
        "`relay login contoso` again and enter the code before it expires)"
    )
    assert account.token_cache is not None and not account.token_cache.exists()


async def test_another_user_signing_in_saves_nothing(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    account = delegated_account(emulator, sample, tmp_path / "spool")
    with pytest.raises(LoginFailed) as failed:
        await login(account, [EXCHANGE_SCOPE], prompt=signs_in_as(emulator, sample.shared_mailbox))
    assert str(failed.value) == (
        "signed in as shared@contoso.com, but account contoso is relay@contoso.com's "
        "(delegated_user); nothing was saved. Run `relay login contoso` again and sign in as "
        "relay@contoso.com"
    )
    assert account.token_cache is not None and not account.token_cache.exists()


async def test_an_app_without_public_client_flows_is_refused(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    public_app.public_client = False
    account = delegated_account(emulator, sample, tmp_path / "spool")
    with pytest.raises(LoginFailed) as failed:
        await login(account, [EXCHANGE_SCOPE], prompt=signs_in_as(emulator, sample.mailbox))
    assert str(failed.value) == (
        "the sign-in failed: invalid_client: AADSTS7000218: The request body must contain the "
        "following parameter: 'client_assertion' or 'client_secret'. (the app registration "
        'needs "Allow public client flows" set to Yes (Authentication page))'
    )


async def test_an_unknown_app_cannot_start_a_sign_in(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    client_id = "00000000-0000-4000-8000-000000000001"
    account = delegated_account(emulator, sample, tmp_path / "spool", client_id=client_id)
    with pytest.raises(LoginFailed) as failed:
        await login(account, [EXCHANGE_SCOPE], prompt=signs_in_as(emulator, sample.mailbox))
    assert str(failed.value).startswith(
        "the sign-in could not start: unauthorized_client: AADSTS700016: Application with "
        f"identifier '{client_id}' was not found in the directory '{sample.tenant_id}'."
    )


async def test_an_unreachable_identity_platform(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    account = delegated_account(emulator, sample, tmp_path / "spool")
    account = replace(
        account, endpoints=replace(account.endpoints, authority="https://127.0.0.1:9")
    )
    with pytest.raises(LoginFailed, match=r"^identity platform unreachable: ConnectionError$"):
        await login(account, [EXCHANGE_SCOPE], prompt=signs_in_as(emulator, sample.mailbox))


# --- serve: silent refresh and its failures ------------------------------------------------------


async def test_a_refused_token_is_renewed_silently_and_the_cache_rewritten(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """Exchange refused the token: the provider redeems the refresh token and saves the
    cache (still 0600)."""
    account = await signed_in(emulator, sample, tmp_path)
    assert account.token_cache is not None
    provider = MsalTokenProvider(account)
    first = await provider.token(EXCHANGE_SCOPE)
    before = account.token_cache.read_text()
    provider.invalidate(EXCHANGE_SCOPE)
    second = await provider.token(EXCHANGE_SCOPE)
    assert second != first
    assert grants(emulator)[-1] == "refresh_token"
    (refresh,) = [
        r for r in emulator.identity.requests if r.form.get("grant_type") == "refresh_token"
    ]
    assert SMTP_SEND in refresh.form["scope"].split()
    assert account.token_cache.read_text() != before
    assert stat.S_IMODE(account.token_cache.stat().st_mode) == 0o600


async def test_an_expired_refresh_token_says_run_relay_login(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path, caplog
) -> None:
    """AADSTS700082 (unused for 90 days): the token request is refused, and the operator is
    told what to do."""
    caplog.set_level(logging.ERROR, logger="relay")
    account = await signed_in(emulator, sample, tmp_path)
    provider = MsalTokenProvider(account)
    assert emulator.identity.expire_refresh_tokens() == 1
    provider.invalidate(EXCHANGE_SCOPE)
    with pytest.raises(TokenRejected) as refused:
        await provider.token(EXCHANGE_SCOPE)
    text = str(refused.value)
    assert text.startswith(
        "535 5.7.3 identity platform: invalid_grant: AADSTS700082: The refresh token has expired "
        "due to inactivity. The token was issued on "
    )
    assert text.endswith(
        "and was inactive for 90.00:00:00. (run `relay login contoso` to sign in again)"
    )
    assert (
        f"account contoso: token request refused: {text[10:].removeprefix('identity platform: ')}"
        in [r.getMessage() for r in caplog.records]
    )


async def test_not_signed_in(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> None:
    account = delegated_account(emulator, sample, tmp_path / "spool")
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(account).token(EXCHANGE_SCOPE)
    assert str(refused.value) == (
        "535 5.7.3 account contoso: relay@contoso.com is not signed in (no token in "
        f"{account.token_cache}); run `relay login contoso`"
    )


async def test_a_damaged_or_unreadable_cache(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    account = delegated_account(emulator, sample, tmp_path / "spool")
    assert account.token_cache is not None
    account.token_cache.parent.mkdir(parents=True)
    account.token_cache.write_text("{not json")
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(account).token(EXCHANGE_SCOPE)
    assert str(refused.value) == (
        f"535 5.7.3 account contoso: the token cache {account.token_cache} is damaged"
    )
    account.token_cache.unlink()
    account.token_cache.mkdir()  # reading it fails like a file of another user would
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(account).token(EXCHANGE_SCOPE)
    assert str(refused.value) == (
        f"535 5.7.3 account contoso: cannot read the token cache {account.token_cache}: "
        "Is a directory"
    )


async def test_a_cache_without_a_refresh_token(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """Signed in once, but the tokens were removed from the cache (by hand, or a revocation)."""
    account = await signed_in(emulator, sample, tmp_path)
    assert account.token_cache is not None
    cache = json.loads(account.token_cache.read_text())
    cache["RefreshToken"], cache["AccessToken"] = {}, {}
    account.token_cache.write_text(json.dumps(cache))
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(account).token(EXCHANGE_SCOPE)
    assert str(refused.value) == (
        f"535 5.7.3 account contoso: no refresh token for relay@contoso.com in "
        f"{account.token_cache}; run `relay login contoso`"
    )


async def test_renewed_tokens_that_cannot_be_saved_are_still_used(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path, caplog
) -> None:
    """A full disk or a read-only spool: the token still serves, and the log says why the
    cache was not rewritten (the old refresh token stays valid)."""
    caplog.set_level(logging.WARNING, logger="relay")
    account = await signed_in(emulator, sample, tmp_path)
    assert account.token_cache is not None
    before = account.token_cache.read_text()
    blocked = account.token_cache.with_name(f".{account.token_cache.name}.{os.getpid()}.tmp")
    blocked.mkdir()  # where the new cache would be written
    provider = MsalTokenProvider(account)
    provider.invalidate(EXCHANGE_SCOPE)
    assert await provider.token(EXCHANGE_SCOPE)
    assert account.token_cache.read_text() == before
    assert [r.getMessage() for r in caplog.records] == [
        f"account contoso: cannot save the renewed tokens to {account.token_cache}: Is a directory"
    ]


async def test_a_relay_defers_on_an_expired_sign_in_and_delivers_after_a_new_one(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path, caplog
) -> None:
    """Delivery as the signed-in user; the sign-in expires, mail waits with a clear line; the
    user signs in again while the relay runs, and the waiting mail goes out."""
    caplog.set_level(logging.INFO, logger="relay")
    emulator.identity.token_lifetime = 60  # under MSAL's 5 minutes: every send refreshes
    account = await signed_in(emulator, sample, tmp_path)
    relay = Relay(relay_config(emulator, sample, tmp_path / "spool", account=account))
    await relay.start()
    try:
        port = relay.listeners[0].port
        await asyncio.to_thread(send, port, 1)
        (first,) = await emulator.smtp.wait_for_messages(1)
        assert first.mailbox == sample.mailbox

        emulator.identity.expire_refresh_tokens()
        emulator.smtp.inject(shutdown(Phase.MAIL))  # the next message needs a new connection
        await asyncio.to_thread(send, port, 2)

        def refused() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if " deferred " in r.getMessage() and "AADSTS700082" in r.getMessage()
            ]

        await wait_until(lambda: bool(refused()))
        assert refused()[0].endswith(
            "reply=535 5.7.3 identity platform: invalid_grant: AADSTS700082: The refresh token "
            f"has expired due to inactivity. The token was issued on {issued_on(emulator)} and "
            "was inactive for 90.00:00:00. (run `relay login contoso` to sign in again)"
        )
        assert len(emulator.smtp.messages) == 1

        await login(account, [EXCHANGE_SCOPE], prompt=signs_in_as(emulator, sample.mailbox))
        await emulator.smtp.wait_for_messages(2)
    finally:
        await relay.stop(grace=2)


def issued_on(emulator: Emulator) -> str:
    """When the refresh token last presented was issued, as AADSTS700082 writes it."""
    presented = [
        r.form["refresh_token"] for r in emulator.identity.requests if "refresh_token" in r.form
    ]
    token = emulator.identity.refresh_tokens[presented[-1]]
    return datetime.fromtimestamp(token.issued_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def send(port: int, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            "relay@contoso.com",
            ["someone@example.org"],
            f"From: relay@contoso.com\r\nTo: someone@example.org\r\nSubject: {n}\r\n\r\nhi\r\n",
        )


# --- the emulated Exchange takes a user's token for the user's own mailbox ----------------------


async def test_exchange_takes_a_users_token_only_for_their_own_mailbox(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    token = await MsalTokenProvider(await signed_in(emulator, sample, tmp_path)).token(
        EXCHANGE_SCOPE
    )
    assert await xoauth2(emulator, sample.mailbox, token) == "235 2.7.0"
    refused = f"{ex.AUTH_UNSUCCESSFUL.code} {ex.AUTH_UNSUCCESSFUL.status}"
    assert await xoauth2(emulator, sample.shared_mailbox, token) == refused


async def xoauth2(emulator: Emulator, mailbox: str, token: str) -> str:
    """AUTH XOAUTH2 at the emulated Exchange: the reply's code and status."""
    client = aiosmtplib.SMTP(
        hostname=emulator.smtp_host,
        port=emulator.smtp_port,
        tls_context=emulator.pki.client_context(),
        timeout=10,
    )
    await client.connect()
    try:
        answer = await client.auth_xoauth2(mailbox, token)
        return f"{answer.code} {answer.message.split()[0]}"
    except aiosmtplib.SMTPAuthenticationError as refused:
        return f"{refused.code} {refused.message.split()[0]}"
    finally:
        client.close()


# --- the emulated identity platform's device code and refresh token answers --------------------


async def post(emulator: Emulator, path: str, form: dict[str, str]) -> tuple[int, dict]:
    connector = aiohttp.TCPConnector(ssl=emulator.pki.client_context())
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(f"{emulator.authority}{path}", data=form) as response,
    ):
        return response.status, await response.json()


async def test_device_code_protocol_as_microsoft_answers_it(
    emulator: Emulator, sample: SampleTenant, public_app: App
) -> None:
    tenant = sample.tenant_id
    status, started = await post(
        emulator,
        f"/{tenant}/oauth2/v2.0/devicecode",
        {"client_id": PUBLIC_CLIENT_ID, "scope": f"{SMTP_SEND} offline_access openid profile"},
    )
    assert status == 200
    assert set(started) == {
        "user_code",
        "device_code",
        "verification_uri",
        "expires_in",
        "interval",
        "message",
    }
    assert (started["verification_uri"], started["expires_in"]) == (DEVICE_LOGIN_URI, 900)
    poll = {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "client_id": PUBLIC_CLIENT_ID,
        "device_code": started["device_code"],
    }
    status, pending = await post(emulator, f"/{tenant}/oauth2/v2.0/token", poll)
    assert (status, pending["error"], pending["error_codes"]) == (
        400,
        "authorization_pending",
        [70016],
    )
    assert pending["error_description"].startswith(AUTHORIZATION_PENDING.describe() + "\r\n")
    emulator.identity.approve(started["user_code"], user=sample.mailbox)
    status, tokens = await post(emulator, f"/{tenant}/oauth2/v2.0/token", poll)
    assert status == 200
    assert tokens["scope"] == SMTP_SEND and tokens["token_type"] == "Bearer"
    assert {"access_token", "refresh_token", "id_token", "client_info"} <= set(tokens)
    status, reused = await post(emulator, f"/{tenant}/oauth2/v2.0/token", poll)
    assert (status, reused["error"], reused["error_codes"]) == (400, "invalid_grant", [70000])

    refresh = {
        "grant_type": "refresh_token",
        "client_id": PUBLIC_CLIENT_ID,
        "refresh_token": tokens["refresh_token"],
        "scope": "https://graph.microsoft.com/Mail.Send offline_access",
    }
    status, graph = await post(emulator, f"/{tenant}/oauth2/v2.0/token", refresh)
    assert status == 200 and graph["scope"] == "https://graph.microsoft.com/Mail.Send"
    emulator.identity.expire_refresh_tokens(sample.mailbox)
    status, expired = await post(emulator, f"/{tenant}/oauth2/v2.0/token", refresh)
    assert (status, expired["error"], expired["error_codes"]) == (400, "invalid_grant", [700082])
    first_line = expired["error_description"].split("\r\n")[0]
    prefix, _, issued = first_line.partition("The token was issued on ")
    assert prefix == "AADSTS700082: The refresh token has expired due to inactivity. "
    issued_at, _, inactive = issued.partition(" and was inactive for ")
    assert len(issued_at) == len("2026-01-02T03:04:05.0000000Z") and inactive == "90.00:00:00."
    assert REFRESH_TOKEN_EXPIRED.code == 700082


@pytest.mark.parametrize(
    ("scope", "error", "code"),
    [
        (f"{SMTP_SEND} https://graph.microsoft.com/Mail.Send", SCOPE_MANY_RESOURCES, 28000),
        ("https://outlook.office.com/SMTP.SendAsApp", SCOPE_INVALID, 70011),
        ("openid offline_access", SCOPE_INVALID, 70011),
    ],
)
async def test_a_users_scope_names_one_resource_and_its_permissions(
    emulator: Emulator, sample: SampleTenant, public_app: App, scope: str, error, code: int
) -> None:
    status, body = await post(
        emulator,
        f"/{sample.tenant_id}/oauth2/v2.0/devicecode",
        {"client_id": PUBLIC_CLIENT_ID, "scope": scope},
    )
    assert (status, body["error"], body["error_codes"]) == (400, error.error, [code])
    assert body["error_description"].startswith(error.describe(scope=scope) + "\r\n")


# --- the command ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, emulator: Emulator, sample: SampleTenant, credential: str) -> Path:
    endpoints = emulator.endpoints
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"""\
listen:
  - address: "127.0.0.1:0"
accounts:
  contoso:
    tenant_id: {sample.tenant_id}
    client_id: {PUBLIC_CLIENT_ID}
    {credential}
    endpoints: {{authority: "{endpoints["authority"]}", smtp: "{endpoints["smtp"]}"}}
    ca_file: {emulator.ca_file}
routes:
  - {{name: default, account: contoso, mailbox: {sample.mailbox}}}
spool: {{path: spool}}
"""
    )
    return path


async def test_relay_login_command(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """`relay login contoso`: the instruction on stdout, the user signs in, exit 0."""
    config = write_config(tmp_path, emulator, sample, f"delegated_user: {sample.mailbox}")
    proc = await relay_command(tmp_path, "login", "contoso", "-c", str(config))
    assert proc.stdout is not None
    instruction = (await proc.stdout.readline()).decode().strip()
    assert instruction.startswith(
        f"To sign in, use a web browser to open the page {DEVICE_LOGIN_URI}"
    )
    emulator.identity.approve(user_code(instruction), user=sample.mailbox)
    out, err = await proc.communicate()
    assert (proc.returncode, err.decode()) == (0, "")
    cache = tmp_path / "spool" / "tokens" / "contoso.json"
    assert out.decode() == (
        f"Signed in as relay@contoso.com. The tokens are in {cache} (readable only by this user); "
        "relay serve renews them by itself.\n"
    )
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("credential", "account", "status", "message"),
    [
        (
            "delegated_user: relay@contoso.com",
            "fabrikam",
            2,
            "relay login: no account 'fabrikam' in {config} (accounts: contoso)",
        ),
        (
            "client_secret: not-needed-here",
            "contoso",
            2,
            "relay login: account contoso has a client_secret: it gets its own tokens, no one "
            "signs in (relay login is for accounts with delegated_user)",
        ),
        (
            "delegated_user: relay",
            "contoso",
            2,
            "relay login: {config}:7: accounts.contoso.delegated_user: expected a mailbox address "
            "like relay@contoso.com, got 'relay'",
        ),
    ],
)
async def test_relay_login_refuses_what_it_cannot_sign_in(
    emulator: Emulator,
    sample: SampleTenant,
    tmp_path: Path,
    credential: str,
    account: str,
    status: int,
    message: str,
) -> None:
    config = write_config(tmp_path, emulator, sample, credential)
    proc = await relay_command(tmp_path, "login", account, "-c", str(config))
    out, err = await proc.communicate()
    assert (proc.returncode, out.decode()) == (status, "")
    assert err.decode() == message.format(config=config) + "\n"


async def test_an_unknown_resource_for_a_user(
    emulator: Emulator, sample: SampleTenant, public_app: App
) -> None:
    status, body = await post(
        emulator,
        f"/{sample.tenant_id}/oauth2/v2.0/devicecode",
        {"client_id": PUBLIC_CLIENT_ID, "scope": "https://example.com/User.Read openid"},
    )
    assert (status, body["error_codes"]) == (400, [500011])
    assert body["error_description"].startswith(
        "AADSTS500011: The resource principal named https://example.com was not found"
    )


async def test_a_refresh_token_works_only_for_its_app(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """A made-up refresh token, or a real one presented by another app: AADSTS9002313."""
    await signed_in(emulator, sample, tmp_path)
    (real,) = emulator.identity.refresh_tokens
    other = sample.directory.tenants[sample.tenant_id].add_app()
    other.public_client = True
    for client_id, token in ((PUBLIC_CLIENT_ID, "1.AQ-made-up"), (other.client_id, real)):
        status, body = await post(
            emulator,
            f"/{sample.tenant_id}/oauth2/v2.0/token",
            {
                "grant_type": "refresh_token",
                "client_id": client_id,
                "refresh_token": token,
                "scope": SMTP_SEND,
            },
        )
        assert (status, body["error"], body["error_codes"]) == (400, "invalid_grant", [9002313])


async def test_exchange_wants_smtp_send_in_a_users_token(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """A user's Exchange token for IMAP only does not open SMTP AUTH."""
    await signed_in(emulator, sample, tmp_path)
    (refresh,) = emulator.identity.refresh_tokens
    _, imap = await post(
        emulator,
        f"/{sample.tenant_id}/oauth2/v2.0/token",
        {
            "grant_type": "refresh_token",
            "client_id": PUBLIC_CLIENT_ID,
            "refresh_token": refresh,
            "scope": "https://outlook.office.com/IMAP.AccessAsUser.All",
        },
    )
    assert await xoauth2(emulator, sample.mailbox, imap["access_token"]) == "535 5.7.3"


async def test_only_a_mailbox_of_the_tenant_can_approve(
    emulator: Emulator, sample: SampleTenant, public_app: App
) -> None:
    """The test hook refuses what no user could do: an unknown code, or a user who is not a
    mailbox of the code's tenant."""
    with pytest.raises(KeyError):
        emulator.identity.approve("NOSUCHCOD", user=sample.mailbox)
    _, started = await post(
        emulator,
        f"/{sample.tenant_id}/oauth2/v2.0/devicecode",
        {"client_id": PUBLIC_CLIENT_ID, "scope": SMTP_SEND},
    )
    with pytest.raises(ValueError, match=r"^nobody@contoso\.com is no mailbox of tenant "):
        emulator.identity.approve(started["user_code"], user="nobody@contoso.com")


async def test_a_signed_in_user_sends_through_a_graph_route(
    emulator: Emulator, sample: SampleTenant, public_app: App, tmp_path: Path
) -> None:
    """Delegated Graph end to end: `relay login` once, then the relay delivers with the user's
    own token through sendMail (the emulated Graph accepts it only for that user's mailbox)."""
    account = delegated_account(emulator, sample, tmp_path / "spool")
    config = relay_config(
        emulator, sample, tmp_path / "spool", account=account, transport=Transport.GRAPH
    )
    await login(
        account, account_scopes(config, "contoso"), prompt=signs_in_as(emulator, sample.mailbox)
    )
    relay = Relay(config)
    await relay.start()
    try:
        await asyncio.to_thread(send, relay.listeners[0].port, 7)
        await wait_until(lambda: bool(emulator.graph.sent))
    finally:
        await relay.stop(grace=2)
    (sent,) = emulator.graph.sent
    assert sent.mailbox == sample.mailbox
