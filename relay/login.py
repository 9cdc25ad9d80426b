"""`relay login ACCOUNT`: the user of a `delegated_user` account signs in, with a device code.

For mailboxes where app-only access is not allowed: the user signs in once, in a browser on any
machine, and relay keeps the user's tokens. Takes relay.yaml and the account's name; leaves the
tokens in the account's token cache (`<spool path>/tokens/<account>.json`, mode 0600), from which
`relay serve` gets access tokens and redeems the refresh token silently (`relay.identity`). A
running `relay serve` picks up a new sign-in without a restart.

The sign-in asks for what the account's routes and imports need (`account_scopes`): SMTP.Send
for SMTP routes, Mail.Send and Mail.ReadWrite for Graph routes and inbound imports, each of the
account's cloud. Microsoft's instruction (open https://microsoft.com/devicelogin, enter the code)
is printed; the identity platform is polled at the interval it asks for until the user signed
in, refused, or the code expired (15 minutes). Only the configured user's sign-in is kept.

Exit status: 0 signed in; 1 the sign-in failed (`LoginFailed`: the identity platform's refusal
with its AADSTS code, an expired code, another user, unreachable); 2 relay.yaml is invalid or the
account is not a delegated one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msal
import requests

from relay.config import AccountConfig, CredentialKind, load
from relay.errors import ConfigError, RelayError
from relay.identity import (
    TokenCacheFile,
    account_scopes,
    public_application,
    refusal_text,
    requested_scopes,
)

# The identity platform's answers to a device code poll that mean "poll again" (RFC 8628 §3.5).
KEEP_POLLING = frozenset({"authorization_pending", "slow_down"})
# What the operator does about a failed sign-in, by OAuth error or AADSTS code.
_REMEDIES: dict[str | int, str] = {
    "expired_token": "run `relay login {name}` again and enter the code before it expires",
    7000218: 'the app registration needs "Allow public client flows" set to Yes '
    "(Authentication page)",
    65001: "grant the app its delegated permissions: API permissions, Grant admin consent",
}


class LoginFailed(RelayError):
    """The sign-in did not give the configured user's tokens; the text says why."""


async def login(
    account: AccountConfig, scopes: Sequence[str], *, prompt: Callable[[str], None]
) -> str:
    """Sign the account's user in for `scopes` (transport scopes); return who signed in.

    `prompt` shows Microsoft's instruction to the user. The token cache is written only when
    the configured user signed in and every scope got a token.
    """
    try:
        return await _login(account, scopes, prompt)
    except requests.RequestException as exc:
        raise LoginFailed(f"identity platform unreachable: {type(exc).__name__}") from None
    except msal.exceptions.MsalError as exc:
        raise LoginFailed(f"identity platform error: {exc}") from None
    except ValueError as exc:  # MSAL: discovery failed (unknown tenant, bad authority)
        raise LoginFailed(f"identity platform: {exc}") from None


async def _login(
    account: AccountConfig, scopes: Sequence[str], prompt: Callable[[str], None]
) -> str:
    assert account.token_cache is not None and account.credential.user is not None
    user = account.credential.user
    cache = TokenCacheFile(account.token_cache)  # a new sign-in replaces the old one
    app = await asyncio.to_thread(public_application, account, cache.cache)
    first, *others = [requested_scopes(account, scope) for scope in scopes]
    flow = await asyncio.to_thread(app.initiate_device_flow, scopes=first)
    if "user_code" not in flow:
        raise LoginFailed(f"the sign-in could not start: {_failure(account, flow)}")
    prompt(str(flow["message"]))
    result = await _poll(app, flow)
    if "access_token" not in result:
        raise LoginFailed(f"the sign-in failed: {_failure(account, result)}")
    signed_in = str(result.get("id_token_claims", {}).get("preferred_username", ""))
    if signed_in.lower() != user.lower():
        raise LoginFailed(
            f"signed in as {signed_in or 'an unknown user'}, but account {account.name} is "
            f"{user}'s (delegated_user); nothing was saved. Run `relay login {account.name}` "
            f"again and sign in as {user}"
        )
    (signed_in_account,) = await asyncio.to_thread(app.get_accounts, username=signed_in)
    for more in others:  # the refresh token also opens the account's other resource
        got = await asyncio.to_thread(app.acquire_token_silent_with_error, more, signed_in_account)
        if not got or "access_token" not in got:
            raise LoginFailed(
                f"signed in, but no token for {' '.join(more)}: "
                f"{_failure(account, got or {})}; nothing was saved"
            )
    await asyncio.to_thread(cache.save)
    return signed_in


async def _poll(app: msal.PublicClientApplication, flow: dict[str, Any]) -> dict[str, Any]:
    """Ask once per interval until the user has signed in, refused, or the code expired."""
    while True:
        result: dict[str, Any] = await asyncio.to_thread(
            app.acquire_token_by_device_flow, flow, exit_condition=lambda flow: True
        )
        if result.get("error") not in KEEP_POLLING:
            return result
        await asyncio.sleep(flow.get("interval", 5))


def _failure(account: AccountConfig, result: dict[str, Any]) -> str:
    """The identity platform's refusal of a sign-in, and what to do about it."""
    codes = result.get("error_codes") or [0]
    remedy = _REMEDIES.get(result.get("error", "")) or _REMEDIES.get(codes[0], "")
    return refusal_text(result) + (f" ({remedy.format(name=account.name)})" if remedy else "")


async def run_login(args: argparse.Namespace) -> int:
    """`relay login ACCOUNT -c FILE`: 0 signed in, 1 the sign-in failed, 2 nothing to sign in."""
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"relay login: {exc}", file=sys.stderr)
        return 2
    account = config.accounts.get(args.account)
    if account is None:
        known = ", ".join(config.accounts) or "none"
        print(
            f"relay login: no account {args.account!r} in {config.source} (accounts: {known})",
            file=sys.stderr,
        )
        return 2
    if account.credential.kind is not CredentialKind.DELEGATED:
        print(
            f"relay login: account {account.name} has a {account.credential.kind.value}: it gets "
            "its own tokens, no one signs in (relay login is for accounts with delegated_user)",
            file=sys.stderr,
        )
        return 2
    try:
        user = await login(
            account,
            account_scopes(config, account.name),
            prompt=lambda message: print(message, flush=True),
        )
    except LoginFailed as exc:
        print(f"relay login: {exc}", file=sys.stderr)
        return 1
    print(
        f"Signed in as {user}. The tokens are in {account.token_cache} (readable only by this "
        "user); relay serve renews them by itself.",
        flush=True,
    )
    return 0
