"""`relay check` as an operator runs it, offline and `--online` against the emulator: what it
prints for each account, and its exit status (0 fine, 1 a token request failed, 2 bad file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from credkit import write_certificate_files
from relaykit import relay_command

from relay.config import load
from relay.identity import EXCHANGE_SCOPE
from relay.login import login
from relay.testing.emulator import Emulator, SampleTenant

WRONG_SECRET = "Wr0ng~secret.for-check-online"


def write_config(
    tmp_path: Path,
    emulator: Emulator,
    sample: SampleTenant,
    *,
    secret: str,
    authority: str | None = None,
    extra_accounts: str = "",
    extra: str = "",
) -> Path:
    """Two accounts: contoso (secret; an SMTP route) and fabrikam (certificate; a Graph route
    and an inbound import)."""
    write_certificate_files(tmp_path, sample.cert_pem, sample.key_pem)
    endpoints = emulator.endpoints
    where = (
        f'endpoints: {{authority: "{authority or endpoints["authority"]}", '
        f'smtp: "{endpoints["smtp"]}", graph: "{endpoints["graph"]}"}}\n'
        f"    ca_file: {emulator.ca_file}"
    )
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"""\
listen:
  - address: "127.0.0.1:0"
accounts:
  contoso:
    tenant_id: {sample.tenant_id}
    client_id: {sample.client_id}
    client_secret: "{secret}"
    {where}
  fabrikam:
    tenant_id: {sample.domain}
    client_id: {sample.cert_client_id}
    certificate: {{key_file: app.key, cert_file: app.pem}}
    {where}
{extra_accounts}routes:
  - {{name: big, account: fabrikam, mailbox: {sample.shared_mailbox}, transport: graph,
     match: {{sender: big@contoso.com}}}}
  - {{name: default, account: contoso, mailbox: {sample.mailbox}}}
inbound:
  - {{name: helpdesk, account: fabrikam, mailbox: {sample.shared_mailbox},
     deliver: {{maildir: inbox}}}}
{extra}"""
    )
    return path


async def relay_check(tmp_path: Path, config: Path, *args: str) -> tuple[int, str, str]:
    proc = await relay_command(tmp_path, "check", "-c", str(config), *args)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def tokens_section(out: str) -> list[str]:
    lines = out.splitlines()
    return lines[lines.index("tokens:") :]


OK_LINES = [
    "tokens:",
    "  contoso, smtp (https://outlook.office365.com/.default): ok",
    "  fabrikam, graph (https://graph.microsoft.com/.default): ok",
]


async def test_offline_check_asks_nobody(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    config = write_config(tmp_path, emulator, sample, secret=sample.client_secret)
    status, out, err = await relay_check(tmp_path, config)
    assert (status, err) == (0, "")
    assert out.startswith(f"{config}: valid\n")
    assert "    credential: client_secret ********\n" in out
    assert "tokens:" not in out
    assert emulator.identity.requests == []


async def test_online_check_gets_a_token_per_account_and_use(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    config = write_config(tmp_path, emulator, sample, secret=sample.client_secret)
    status, out, err = await relay_check(tmp_path, config, "--online")
    assert (status, err) == (0, "")
    assert tokens_section(out) == OK_LINES
    assert len([r for r in emulator.identity.requests if r.method == "POST"]) == 2


async def test_online_check_reports_a_wrong_secret_with_its_aadsts_code(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    config = write_config(tmp_path, emulator, sample, secret=WRONG_SECRET)
    status, out, err = await relay_check(tmp_path, config, "--online")
    refusal = (
        "identity platform: invalid_client: AADSTS7000215: Invalid client secret provided. "
        "Ensure the secret being sent in the request is the client secret value, not the client "
        f"secret ID, for a secret added to app '{sample.client_id}'."
    )
    assert status == 1
    assert tokens_section(out) == [
        "tokens:",
        f"  contoso, smtp (https://outlook.office365.com/.default): FAILED: {refusal}",
        OK_LINES[2],
    ]
    assert err.splitlines()[-1] == "relay check: 1 of 2 token requests failed"
    assert WRONG_SECRET not in out + err


async def test_online_check_of_a_delegated_account_not_signed_in(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """The sign-in is checked too: without `relay login` there is no token, and it says so."""
    extra_account = (
        "  frontdesk:\n"
        f"    tenant_id: {sample.tenant_id}\n"
        f"    client_id: {sample.client_id}\n"
        f"    delegated_user: {sample.send_as}\n"
        f'    endpoints: {{authority: "{emulator.authority}"}}\n'
        f"    ca_file: {emulator.ca_file}\n"
    )
    config = write_config(
        tmp_path, emulator, sample, secret=sample.client_secret, extra_accounts=extra_account
    )
    status, out, _ = await relay_check(tmp_path, config, "--online")
    cache = tmp_path / "spool" / "tokens" / "frontdesk.json"
    assert status == 1
    assert tokens_section(out) == [
        *OK_LINES,
        "  frontdesk, smtp (https://outlook.office.com/SMTP.Send): FAILED: account frontdesk: "
        f"alerts@contoso.com is not signed in (no token in {cache}); run `relay login frontdesk`",
    ]


async def test_online_check_of_a_signed_in_account_leaves_its_cache_alone(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """The sign-in works (its refresh token is redeemed), and the cache file is not rewritten:
    check may run as root, serve as another user who must still read the file."""
    emulator.identity.device_code_interval = 0
    emulator.identity.token_lifetime = 60  # under MSAL's 5 minutes: the check must refresh
    app = sample.directory.tenants[sample.tenant_id].add_app()
    app.public_client = True
    extra_account = (
        "  frontdesk:\n"
        f"    tenant_id: {sample.tenant_id}\n"
        f"    client_id: {app.client_id}\n"
        f"    delegated_user: {sample.mailbox}\n"
        f'    endpoints: {{authority: "{emulator.authority}"}}\n'
        f"    ca_file: {emulator.ca_file}\n"
    )
    config = write_config(
        tmp_path, emulator, sample, secret=sample.client_secret, extra_accounts=extra_account
    )
    account = load(config).accounts["frontdesk"]
    await login(
        account,
        [EXCHANGE_SCOPE],
        prompt=lambda message: emulator.identity.approve(
            message.split("enter the code ")[1].split()[0], user=sample.mailbox
        ),
    )
    assert account.token_cache is not None
    before = account.token_cache.read_bytes()
    status, out, err = await relay_check(tmp_path, config, "--online")
    assert (status, err) == (0, "")
    assert tokens_section(out)[-1] == (
        "  frontdesk, smtp (https://outlook.office.com/SMTP.Send): ok"
    )
    grants = [r.form.get("grant_type") for r in emulator.identity.requests]
    assert grants.count("refresh_token") == 1
    assert account.token_cache.read_bytes() == before


async def test_online_check_of_an_unreachable_identity_platform(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, emulator, sample, secret=sample.client_secret, authority="https://127.0.0.1:9"
    )
    status, out, err = await relay_check(tmp_path, config, "--online")
    unreachable = "FAILED: identity platform unreachable: ConnectionError"
    assert status == 1
    assert tokens_section(out) == [
        "tokens:",
        f"  contoso, smtp (https://outlook.office365.com/.default): {unreachable}",
        f"  fabrikam, graph (https://graph.microsoft.com/.default): {unreachable}",
    ]
    assert err.splitlines()[-1] == "relay check: 2 of 2 token requests failed"


@pytest.mark.parametrize("online", [(), ("--online",)], ids=["offline", "online"])
async def test_an_invalid_file_exits_2_before_any_token_request(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, online: tuple[str, ...]
) -> None:
    config = write_config(
        tmp_path,
        emulator,
        sample,
        secret=sample.client_secret,
        extra="limits: {max_recipients: 0}\n",
    )
    status, out, err = await relay_check(tmp_path, config, *online)
    assert (status, out) == (2, "")
    assert err == (
        f"{config}:23: limits.max_recipients: expected an integer of at least 1, got 0\n"
    )
    assert emulator.identity.requests == []
