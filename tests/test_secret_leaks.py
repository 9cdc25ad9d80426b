"""No secret in any output: the suite's scenarios run with distinctive secrets (a client secret,
a wrong one, a PFX passphrase, a local user's password and a wrong one), and everything they
produce is searched for them, as they are and as they travel (base64 in SMTP AUTH, URL-encoded in
forms): logs of every logger at DEBUG (relay, msal, urllib3, aiosmtpd), the stdout and stderr of
`relay check`, `relay check --online`, `relay serve` and `relay login`, exception texts and
tracebacks, reprs, and the spool's files. The refresh tokens a sign-in got must not show either.
`relay emulator` is left out: it prints its own sample secret, by design.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import signal
import smtplib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

import pytest
from credkit import write_certificate_files
from relaykit import relay_command, wait_until

from relay.app import Relay
from relay.config import AccountConfig, load, loads
from relay.errors import ConfigError, TokenRejected
from relay.identity import EXCHANGE_SCOPE, GRAPH_SCOPE, MsalTokenProvider
from relay.passwords import hash_password
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.identity import CLIENT_SECRET_INVALID

CLIENT_SECRET = "Cs~LEAKCANARY.client-secret-4Qz"
WRONG_SECRET = "Ws~LEAKCANARY.wrong-secret-8Kd"
PASSPHRASE = "Pp-LEAKCANARY-pfx-passphrase-2Rm"
PASSWORD = "Up-LEAKCANARY-user-password-6Tn"
WRONG_PASSWORD = "Wp-LEAKCANARY-wrong-password-1Lb"
SECRETS = (CLIENT_SECRET, WRONG_SECRET, PASSPHRASE, PASSWORD, WRONG_PASSWORD)
USER = "ultimo"
PUBLIC_CLIENT_ID = "3d8e1f52-6a7b-4c90-8d1e-5f2a3b4c6d7e"


def disguises(secret: str) -> set[str]:
    """A secret as it is, and as it travels: URL-encoded, base64 alone and in AUTH PLAIN."""
    return {
        secret,
        quote_plus(secret),
        base64.b64encode(secret.encode()).decode(),
        base64.b64encode(f"\0{USER}\0{secret}".encode()).decode(),
    }


@dataclass
class Outputs:
    """Everything the scenarios produced, by where it came from."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    forbidden: set[str] = field(default_factory=lambda: set().union(*map(disguises, SECRETS)))

    def add(self, where: str, text: str) -> None:
        assert text, f"{where}: nothing captured; the scenario did not run as meant"
        self.seen.append((where, text))

    def add_exception(self, where: str, exc: BaseException) -> None:
        self.add(f"{where}: str", str(exc))
        self.add(f"{where}: repr", repr(exc))
        self.add(f"{where}: traceback", "".join(traceback.format_exception(exc)))

    def check(self) -> None:
        leaks = [
            (where, secret)
            for where, text in self.seen
            for secret in self.forbidden
            if secret in text
        ]
        assert leaks == []


@pytest.fixture
def outputs() -> Iterator[Outputs]:
    found = Outputs()
    yield found
    found.check()


@pytest.fixture
def world(sample: SampleTenant, emulator: Emulator, tmp_path: Path) -> Path:
    """The sample tenant's apps take CLIENT_SECRET and a certificate (as a PFX under
    PASSPHRASE); relay.yaml has both accounts, a user with PASSWORD, and a route per account."""
    tenant = sample.directory.tenants[sample.tenant_id]
    tenant.apps[sample.client_id].add_secret(CLIENT_SECRET)
    write_certificate_files(tmp_path, sample.cert_pem, sample.key_pem, passphrase=PASSPHRASE)
    return write_config(tmp_path, emulator, sample, secret=CLIENT_SECRET)


def write_config(
    tmp_path: Path,
    emulator: Emulator,
    sample: SampleTenant,
    *,
    secret: str,
    listen: str = "127.0.0.1:0",
    level: str = "DEBUG",
) -> Path:
    endpoints = emulator.endpoints
    where = (
        f'endpoints: {{authority: "{endpoints["authority"]}", smtp: "{endpoints["smtp"]}", '
        f'graph: "{endpoints["graph"]}"}}\n    ca_file: {emulator.ca_file}'
    )
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"""\
listen:
  - address: "{listen}"
users:
  {USER}: {{password_hash: "{hash_password(PASSWORD)}"}}
accounts:
  contoso:
    tenant_id: {sample.tenant_id}
    client_id: {sample.client_id}
    client_secret: "{secret}"
    {where}
  fabrikam:
    tenant_id: {sample.tenant_id}
    client_id: {sample.cert_client_id}
    certificate: {{pfx_file: app.pfx, passphrase: "{PASSPHRASE}"}}
    {where}
routes:
  - {{name: shared, account: fabrikam, mailbox: {sample.shared_mailbox},
     match: {{sender: shared@contoso.com}}}}
  - {{name: default, account: contoso, mailbox: {sample.mailbox}, match: {{user: {USER}}}}}
spool: {{path: spool, retry: [0.2s]}}
log: {{level: {level}}}
"""
    )
    return path


async def run(tmp_path: Path, outputs: Outputs, *args: str) -> int:
    proc = await relay_command(tmp_path, *args)
    out, err = await proc.communicate()
    name = "relay " + " ".join(a for a in args if not a.startswith("/"))
    outputs.add(f"{name}: stdout+stderr", out.decode() + err.decode())
    assert proc.returncode is not None
    return proc.returncode


def send(port: int, password: str, sender: str = "relay@contoso.com") -> None:
    """An application that logs in as USER and sends one message."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login(USER, password)
        client.sendmail(
            sender,
            ["someone@example.org"],
            f"From: {sender}\r\nTo: someone@example.org\r\nSubject: leak test\r\n\r\nhi\r\n",
        )


def wrong_login(port: int) -> str:
    """One AUTH PLAIN with WRONG_PASSWORD (smtplib's login() would try LOGIN too)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.user, client.password = USER, WRONG_PASSWORD
        try:
            client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as refused:
            return f"{refused.smtp_code} {refused.smtp_error.decode()}"
    raise AssertionError("a wrong password was taken")


# --- relay check ---------------------------------------------------------------------------------


async def test_relay_check_offline_and_online(
    emulator: Emulator, sample: SampleTenant, world: Path, tmp_path: Path, outputs: Outputs
) -> None:
    assert await run(tmp_path, outputs, "check", "-c", str(world)) == 0
    assert await run(tmp_path, outputs, "check", "-c", str(world), "--online") == 0
    write_config(tmp_path, emulator, sample, secret=WRONG_SECRET)
    assert await run(tmp_path, outputs, "check", "-c", str(world), "--online") == 1
    assert "AADSTS7000215" in outputs.seen[-1][1]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("tenant_id: {tenant}", f"tenant_id: {CLIENT_SECRET}", id="secret as tenant"),
        pytest.param("client_id: {client}", f"client_id: {CLIENT_SECRET}", id="secret as client"),
        pytest.param(f'"{PASSPHRASE}"', f'"{WRONG_SECRET}"', id="wrong pfx passphrase"),
        pytest.param(
            'password_hash: "scrypt', f'password_hash: "{PASSWORD}', id="password as hash"
        ),
        pytest.param(f'"{CLIENT_SECRET}"', f'"{CLIENT_SECRET}', id="unclosed quote"),
        pytest.param(f'"{CLIENT_SECRET}"', f"[{CLIENT_SECRET}]", id="secret of the wrong type"),
    ],
)
async def test_config_errors_name_the_key_never_the_secret(
    sample: SampleTenant, world: Path, tmp_path: Path, outputs: Outputs, old: str, new: str
) -> None:
    edit(world, old.format(tenant=sample.tenant_id, client=sample.client_id), new)
    assert await run(tmp_path, outputs, "check", "-c", str(world)) == 2
    with pytest.raises(ConfigError) as caught:
        load(world)
    outputs.add_exception("ConfigError", caught.value)


# --- a relay at work -----------------------------------------------------------------------------


async def test_a_relay_with_token_failures_logs_no_secret(
    emulator: Emulator,
    sample: SampleTenant,
    world: Path,
    tmp_path: Path,
    outputs: Outputs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every logger at DEBUG: the token endpoint refuses, then fails, then gives a token; an
    application logs in wrongly, then rightly; mail goes through both accounts."""
    caplog.set_level(logging.DEBUG)
    identity = emulator.identity
    identity.faults.push(CLIENT_SECRET_INVALID, tenant=sample.tenant_id, app_id=sample.client_id)
    identity.faults.unavailable(retry_after=0)  # MSAL would replay a 503 for 5 s otherwise
    config = load(world)
    relay = Relay(config)
    await relay.start()
    try:
        port = relay.listeners[0].port
        assert (await asyncio.to_thread(wrong_login, port)).startswith("535 5.7.8")
        await asyncio.to_thread(send, port, PASSWORD)
        await asyncio.to_thread(send, port, PASSWORD, "shared@contoso.com")
        await emulator.smtp.wait_for_messages(2)
        outputs.add("relay repr", repr(relay) + repr(config) + repr(relay.tokens))
    finally:
        await relay.stop(grace=2)

    refused = MsalTokenProvider(account_with(tmp_path / "other", emulator, sample, WRONG_SECRET))
    with pytest.raises(TokenRejected) as caught:
        await refused.token(GRAPH_SCOPE)
    outputs.add_exception("TokenRejected", caught.value)
    outputs.add("provider", repr(refused) + str(refused.last_error))

    assert any(r.name.startswith("msal") for r in caplog.records)
    assert any(r.name.startswith("urllib3") for r in caplog.records)
    assert any("AADSTS7000215" in r.getMessage() for r in caplog.records)
    outputs.add("logs", caplog.text)
    outputs.add("log records", "\n".join(str(vars(r)) for r in caplog.records))


def account_with(
    directory: Path, emulator: Emulator, sample: SampleTenant, secret: str
) -> AccountConfig:
    write_certificate_files(directory, sample.cert_pem, sample.key_pem, passphrase=PASSPHRASE)
    path = write_config(directory, emulator, sample, secret=secret)
    return loads(path.read_text(), source=str(path), environ={}).accounts["contoso"]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


async def test_relay_serve_prints_no_secret(
    emulator: Emulator, sample: SampleTenant, world: Path, tmp_path: Path, outputs: Outputs
) -> None:
    """`relay serve` at DEBUG: one account's secret is wrong (its mail waits), the other
    delivers; a wrong and a right login; then SIGTERM. Its whole stderr and stdout are searched."""
    edit(world, f'"{CLIENT_SECRET}"', f'"{WRONG_SECRET}"')
    proc = await relay_command(tmp_path, "serve", "-c", str(world))
    assert proc.stderr is not None and proc.stdout is not None
    lines: list[str] = []

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            lines.append(line.decode())

    reader = asyncio.create_task(read_stderr())
    try:
        await wait_until(lambda: any("listening on" in line for line in lines))
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert listening is not None
        port = int(listening.group(1))
        await asyncio.to_thread(wrong_login, port)
        await asyncio.to_thread(send, port, PASSWORD, "shared@contoso.com")
        await asyncio.to_thread(send, port, PASSWORD)
        await emulator.smtp.wait_for_messages(1)
        await wait_until(lambda: any("AADSTS7000215" in line for line in lines))
    finally:
        proc.send_signal(signal.SIGTERM)
        out = await proc.stdout.read()
        await proc.wait()
        await reader
    assert proc.returncode == 0
    outputs.add("relay serve: stderr", "".join(lines))
    outputs.add("relay serve: stdout", out.decode() or "(empty)")
    assert any(line.startswith(("DEBUG", "20")) and "urllib3" in line for line in lines)
    spool = spool_text(tmp_path / "spool")
    assert "AADSTS7000215" in spool  # the waiting message's last reply
    outputs.add("spool", spool)


def spool_text(spool: Path) -> str:
    files = [p for p in spool.rglob("*") if p.is_file()]
    return "\n".join(p.read_bytes().decode("latin-1") for p in files)


# --- relay login ---------------------------------------------------------------------------------


async def test_relay_login_shows_no_token(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, outputs: Outputs
) -> None:
    """A delegated sign-in and a silent refresh: the refresh tokens stay in the cache file."""
    emulator.identity.device_code_interval = 0
    app = sample.directory.tenants[sample.tenant_id].add_app(PUBLIC_CLIENT_ID)
    app.public_client = True
    config = tmp_path / "relay.yaml"
    config.write_text(
        f"""\
listen:
  - address: "127.0.0.1:0"
accounts:
  contoso:
    tenant_id: {sample.tenant_id}
    client_id: {PUBLIC_CLIENT_ID}
    delegated_user: {sample.mailbox}
    endpoints: {{authority: "{emulator.authority}"}}
    ca_file: {emulator.ca_file}
routes:
  - {{name: default, account: contoso, mailbox: {sample.mailbox}}}
"""
    )
    proc = await relay_command(tmp_path, "login", "contoso", "-c", str(config))
    assert proc.stdout is not None
    instruction = (await proc.stdout.readline()).decode()
    emulator.identity.approve(
        instruction.split("enter the code ")[1].split()[0], user=sample.mailbox
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0
    outputs.add("relay login", instruction + out.decode() + err.decode())

    provider = MsalTokenProvider(load(config).accounts["contoso"])
    provider.invalidate(EXCHANGE_SCOPE)
    await provider.token(EXCHANGE_SCOPE)
    emulator.identity.expire_refresh_tokens()
    provider.invalidate(EXCHANGE_SCOPE)
    with pytest.raises(TokenRejected) as caught:
        await provider.token(EXCHANGE_SCOPE)
    outputs.add_exception("expired sign-in", caught.value)
    outputs.forbidden |= set(emulator.identity.refresh_tokens)
    assert len(emulator.identity.refresh_tokens) == 2


def test_the_search_finds_a_secret_in_any_disguise() -> None:
    for text in (f"x {PASSPHRASE} y", base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()):
        found = Outputs()
        found.add("somewhere", text)
        with pytest.raises(AssertionError):
            found.check()
