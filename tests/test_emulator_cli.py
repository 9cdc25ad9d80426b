"""`relay emulator` as a user runs it: a foreground process that prints where it listens and a
relay.yaml snippet, serves MSAL through those endpoints, and stops cleanly on Ctrl-C or SIGTERM.
Its YAML directory file is checked key by key.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msal
import pytest
import requests
import yaml

from relay.errors import ConfigError
from relay.testing.directory import MAIL_SEND, SMTP_SEND_AS_APP
from relay.testing.emulator import (
    SAMPLE_CERT_CLIENT_ID,
    SAMPLE_CLIENT_ID,
    SAMPLE_CLIENT_SECRET,
    SAMPLE_TENANT_ID,
    self_signed_certificate,
)
from relay.testing.run import KEY_PLACEHOLDER, load_emulator_config, stable_id

REPO = Path(__file__).resolve().parents[1]
READY = "Ctrl-C stops the emulator."
SNIPPET = "# relay.yaml accounts for this emulator:"
EXCHANGE_SCOPE = "https://outlook.office365.com/.default"


class Running:
    """`python -m relay emulator ...` in a subprocess, read up to its ready line."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        env = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay",
                "emulator",
                "--state-dir",
                str(tmp_path / "state"),
                *args,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []

    def banner(self) -> list[str]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.strip() == READY:
                return self.lines
        raise AssertionError(f"exited {self.proc.wait()} before ready:\n{self.stderr()}")

    def accounts(self) -> dict[str, dict[str, Any]]:
        lines = self.banner()
        start = lines.index(SNIPPET) + 1
        return yaml.safe_load("\n".join(lines[start : lines.index(READY)]))["accounts"]

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Any]:
    started: list[Running] = []

    def start(*args: str) -> Running:
        started.append(Running(tmp_path, *args))
        return started[-1]

    yield start
    for r in started:
        r.close()


def msal_token(account: dict[str, Any], credential: Any) -> dict[str, Any]:
    """A token through exactly the printed endpoints and CA file."""
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override `verify`
    session.verify = account["ca_file"]
    with session:
        app = msal.ConfidentialClientApplication(
            account["client_id"],
            client_credential=credential,
            authority=f"{account['endpoints']['authority']}/{account['tenant_id']}",
            instance_discovery=False,
            http_client=session,
        )
        return app.acquire_token_for_client(scopes=[EXCHANGE_SCOPE])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sample_emulator_serves_msal_and_stops_on_signal(
    run: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    """Start with the sample tenant on free ports; the printed snippet works; a signal stops it."""
    emulator = run("--smtp-port", "0", "--https-port", "0")
    accounts = emulator.accounts()

    secret_account = accounts["contoso"]
    assert secret_account["tenant_id"] == SAMPLE_TENANT_ID
    assert secret_account["client_id"] == SAMPLE_CLIENT_ID
    assert secret_account["client_secret"] == SAMPLE_CLIENT_SECRET
    assert secret_account["ca_file"] == str(tmp_path / "state" / "ca.pem")
    authority = secret_account["endpoints"]["authority"]
    assert authority.startswith("https://127.0.0.1:")
    assert secret_account["endpoints"]["smtp"].startswith("127.0.0.1:")
    assert f"  identity platform  {authority}/<tenant>" in emulator.lines
    assert "    mailbox          relay@contoso.com" in emulator.lines
    assert "token_source" in msal_token(secret_account, secret_account["client_secret"])

    cert_account = accounts["contoso-cert"]
    assert cert_account["client_id"] == SAMPLE_CERT_CLIENT_ID
    credential = {
        "private_key": Path(cert_account["certificate"]["key_file"]).read_text(),
        "public_certificate": Path(cert_account["certificate"]["cert_file"]).read_text(),
    }
    assert msal_token(cert_account, credential)["token_source"] == "identity_provider"
    assert (Path(cert_account["certificate"]["key_file"]).stat().st_mode & 0o077) == 0

    assert emulator.stop(sig) == 0
    assert "relay emulator: stopping" in emulator.stderr()


def test_emulator_from_a_config_file(run: Any, tmp_path: Path) -> None:
    cert_pem, key_pem = self_signed_certificate("fabrikam relay")
    (tmp_path / "app.pem").write_bytes(cert_pem)
    (tmp_path / "app.key").write_bytes(key_pem)
    (tmp_path / "emulator.yaml").write_text(
        """
tenants:
  - domain: fabrikam.com
    apps:
      - {name: fabrikam, secret: s3cret}
      - {name: fabrikam-cert, certificate: app.pem, key_file: app.key}
      - {name: fabrikam-nokey, certificate: app.pem}
    mailboxes:
      - {address: relay@fabrikam.com, full_access: [fabrikam, fabrikam-cert]}
"""
    )
    emulator = run("--config", "emulator.yaml", "--smtp-port", "0", "--https-port", "0")
    accounts = emulator.accounts()

    assert list(accounts) == ["fabrikam", "fabrikam-cert", "fabrikam-nokey"]
    assert accounts["fabrikam"]["tenant_id"] == stable_id("fabrikam.com")
    assert accounts["fabrikam"]["client_id"] == stable_id("fabrikam.com", "fabrikam")
    assert accounts["fabrikam-cert"]["certificate"] == {
        "key_file": str(tmp_path / "app.key"),
        "cert_file": str(tmp_path / "app.pem"),
    }
    assert accounts["fabrikam-nokey"]["certificate"]["key_file"] == KEY_PLACEHOLDER
    assert "access_token" in msal_token(accounts["fabrikam"], "s3cret")
    credential = {"private_key": key_pem.decode(), "public_certificate": cert_pem.decode()}
    assert "access_token" in msal_token(accounts["fabrikam-cert"], credential)
    assert emulator.stop(signal.SIGINT) == 0


def test_bad_config_exits_2_naming_the_key(run: Any, tmp_path: Path) -> None:
    (tmp_path / "emulator.yaml").write_text("tenants:\n  - domain: fabrikam.com\n    aps: []\n")
    emulator = run("--config", "emulator.yaml", "--smtp-port", "0", "--https-port", "0")
    assert emulator.proc.wait(timeout=30) == 2
    assert (
        emulator.stderr()
        .strip()
        .endswith(
            "emulator.yaml: tenants[0].aps: unknown key "
            "(known keys: apps, domain, mailboxes, tenant_id)"
        )
    )


def test_port_in_use_exits_1(run: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        emulator = run("--smtp-port", "0", "--https-port", str(port))
        assert emulator.proc.wait(timeout=30) == 1
    assert "relay emulator: cannot listen on 127.0.0.1: " in emulator.stderr()


# -- the YAML directory file ----------------------------------------------------------------


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "emulator.yaml"
    path.write_text(text)
    return load_emulator_config(path)


def test_config_builds_the_directory(tmp_path: Path) -> None:
    setup = load(
        tmp_path,
        """
tenants:
  - domain: Fabrikam.com
    tenant_id: 11111111-2222-3333-4444-555555555555
    apps:
      - name: relay
        client_id: 99999999-8888-7777-6666-555555555555
        secret: s3cret
        roles: [SMTP.SendAsApp]
      - {name: reader, secret: other}
    mailboxes:
      - address: Relay@fabrikam.com
        full_access: [relay]
        send_as: [Alerts@fabrikam.com]
      - address: shared@fabrikam.onmicrosoft.com
""",
    )
    tenant = setup.directory.tenant("fabrikam.com")
    assert tenant is not None and tenant.tenant_id == "11111111-2222-3333-4444-555555555555"
    app = tenant.apps["99999999-8888-7777-6666-555555555555"]
    assert app.roles == {SMTP_SEND_AS_APP}
    assert [s.value for s in app.secrets] == ["s3cret"]
    reader = tenant.apps[stable_id("fabrikam.com", "reader")]
    assert MAIL_SEND in reader.roles
    box = tenant.mailboxes["relay@fabrikam.com"]
    assert box.full_access == {app.client_id}
    assert box.may_send_as("alerts@fabrikam.com")
    assert [a.name for a in setup.accounts] == ["relay", "reader"]
    assert "s3cret" not in repr(setup.accounts)


def cert_file(tmp_path: Path) -> None:
    (tmp_path / "app.pem").write_bytes(self_signed_certificate("x")[0])


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("", "", "must be a mapping"),
        ("tenant: []", "tenant", "unknown key (known keys: tenants)"),
        ("{}", "tenants", "is required"),
        ("tenants: []", "tenants", "must list at least one tenant"),
        ("tenants: {}", "tenants", "must be a list"),
        ("tenants: [x]", "tenants[0]", "must be a mapping"),
        ("tenants: [{}]", "tenants[0].domain", "is required"),
        ("tenants: [{domain: ''}]", "tenants[0].domain", "must be a non-empty string"),
        ("tenants: [{domain: fabrikam}]", "tenants[0].domain", "'fabrikam' is not a domain name"),
        (
            "tenants: [{domain: a.com}, {domain: A.com}]",
            "tenants[1].domain",
            "'a.com' is already a tenant's domain",
        ),
        (
            "tenants: [{domain: a.com, tenant_id: nope}]",
            "tenants[0].tenant_id",
            "'nope' is not a GUID",
        ),
        (
            "tenants: [{domain: a.com, apps: [{secret: s}]}]",
            "tenants[0].apps[0].name",
            "is required",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r}]}]",
            "tenants[0].apps[0]",
            "has no credential (give `secret` or `certificate`)",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r, secret: s, client_id: 7}]}]",
            "tenants[0].apps[0].client_id",
            "must be a non-empty string",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r, certificate: missing.pem}]}]",
            "tenants[0].apps[0].certificate",
            "no such file: {dir}/missing.pem",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r, certificate: emulator.yaml}]}]",
            "tenants[0].apps[0].certificate",
            "is not a PEM certificate",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r, secret: s, key_file: app.pem}]}]",
            "tenants[0].apps[0].key_file",
            "needs `certificate` beside it",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r, certificate: app.pem, key_file: k}]}]",
            "tenants[0].apps[0].key_file",
            "no such file: {dir}/k",
        ),
        (
            "tenants: [{domain: a.com, apps: "
            "[{name: r, secret: s, roles: [Mail.Send, Mail.Read]}]}]",
            "tenants[0].apps[0].roles[1]",
            "unknown permission 'Mail.Read' (known: Mail.ReadWrite, Mail.Send, SMTP.SendAsApp)",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r, secret: s}]}, "
            "{domain: b.com, apps: [{name: r, secret: t}]}]",
            "tenants",
            "two apps are named 'r' (app names are unique)",
        ),
        (
            "tenants: [{domain: a.com, mailboxes: [{address: x@b.com}]}]",
            "tenants[0].mailboxes[0].address",
            "'x@b.com' is not an address in the tenant's domains "
            "(domains: a.com, a.onmicrosoft.com)",
        ),
        (
            "tenants: [{domain: a.com, mailboxes: [{address: x@a.com}, {address: X@a.com}]}]",
            "tenants[0].mailboxes[1].address",
            "'x@a.com' is listed twice",
        ),
        (
            "tenants: [{domain: a.com, apps: [{name: r, secret: s}], "
            "mailboxes: [{address: x@a.com, full_access: [q]}]}]",
            "tenants[0].mailboxes[0].full_access[0]",
            "no app named 'q' in this tenant (apps: r)",
        ),
        (
            "tenants: [{domain: a.com, mailboxes: [{address: x@a.com, full_access: [q]}]}]",
            "tenants[0].mailboxes[0].full_access[0]",
            "no app named 'q' in this tenant",
        ),
        (
            "tenants: [{domain: a.com, mailboxes: [{address: x@a.com, send_as: [nobody]}]}]",
            "tenants[0].mailboxes[0].send_as[0]",
            "'nobody' is not an address",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, where: str, message: str) -> None:
    cert_file(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    path = tmp_path / "emulator.yaml"
    assert caught.value.path == where
    assert str(caught.value) == (
        f"{path}: {where + ': ' if where else ''}{message.format(dir=tmp_path)}"
    )


def test_config_that_is_not_yaml_gives_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "tenants:\n  - domain: a.com\n  bad: [\n")
    assert caught.value.line == 3
    assert str(caught.value).startswith(f"{tmp_path / 'emulator.yaml'}:3: not valid YAML: ")


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_emulator_config(tmp_path / "absent.yaml")
    assert (
        str(caught.value) == f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory"
    )
