"""Every app credential kind and every cloud preset, from relay.yaml to a token (and a delivered
message) from the emulator, and each way a credential fails at run time.

Accounts are written as an operator writes them in relay.yaml, with `endpoints:` pointing at the
emulator; the assertions are on what the emulated identity platform received and issued.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from pathlib import Path

import jwt
import msal
import pytest
import requests
from credkit import other_certificate, write_certificate_files

from relay.app import Relay
from relay.config import CLOUD_ENDPOINTS, AccountConfig, Cloud, Config, Endpoints, loads
from relay.errors import TokenRejected
from relay.identity import (
    CLOUD_RESOURCES,
    EXCHANGE_SCOPE,
    GRAPH_SCOPE,
    CloudResources,
    MsalTokenProvider,
    requested_scopes,
)
from relay.testing.emulator import Emulator, SampleTenant
from relay.testing.identity import ASSERTION_EXPIRED, FEDERATION_NO_MATCH
from relay.testing.tokens import EXCHANGE_AUDIENCE, WorkloadIssuer

PASSPHRASE = "pfx-Passphrase-7Qe"
SUBJECT = "system:serviceaccount:mail:relay"  # the pod's service account


def relay_yaml(emulator: Emulator, sample: SampleTenant, client_id: str, credential: str) -> str:
    endpoints = emulator.endpoints
    return f"""\
listen:
  - address: "127.0.0.1:0"
accounts:
  contoso:
    tenant_id: {sample.tenant_id}
    client_id: {client_id}
    {credential}
    endpoints: {{authority: "{endpoints["authority"]}", smtp: "{endpoints["smtp"]}",
                graph: "{endpoints["graph"]}"}}
    ca_file: {emulator.ca_file}
routes:
  - {{name: default, account: contoso, mailbox: {sample.mailbox}}}
spool: {{path: spool, retry: [0.2s]}}
"""


def load_account(tmp_path: Path, text: str) -> AccountConfig:
    return config_of(tmp_path, text).accounts["contoso"]


def config_of(tmp_path: Path, text: str) -> Config:
    return loads(text, source=str(tmp_path / "relay.yaml"), environ={})


def token_requests(emulator: Emulator) -> list:
    return [r for r in emulator.identity.requests if r.path.endswith("/oauth2/v2.0/token")]


# --- app credentials ------------------------------------------------------------------------------


async def test_client_secret(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> None:
    text = relay_yaml(emulator, sample, sample.client_id, f"client_secret: {sample.client_secret}")
    token = await MsalTokenProvider(load_account(tmp_path, text)).token(EXCHANGE_SCOPE)
    claims = emulator.issuer.validate(token, audience=EXCHANGE_AUDIENCE)
    assert (claims.app_id, claims.roles) == (sample.client_id, frozenset(sample_roles(sample)))
    (request,) = token_requests(emulator)
    assert request.form["client_secret"] == sample.client_secret


async def test_client_secret_file(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(sample.client_secret + "\n")
    text = relay_yaml(emulator, sample, sample.client_id, "client_secret_file: secret")
    token = await MsalTokenProvider(load_account(tmp_path, text)).token(EXCHANGE_SCOPE)
    assert emulator.issuer.validate(token, audience=EXCHANGE_AUDIENCE).app_id == sample.client_id


@pytest.mark.parametrize(
    "certificate",
    [
        "{key_file: plain/app.key, cert_file: plain/app.pem}",
        f"{{key_file: app.key, cert_file: app.pem, passphrase: {PASSPHRASE}}}",
        f"{{pfx_file: app.pfx, passphrase: {PASSPHRASE}}}",
    ],
    ids=["pem", "encrypted pem", "pfx"],
)
async def test_certificate(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, certificate: str
) -> None:
    """A certificate-signed assertion: PS256 with the certificate's SHA-256 thumbprint and the
    certificate itself (x5c), the form MSAL uses when it has the certificate."""
    write_certificate_files(tmp_path, sample.cert_pem, sample.key_pem, passphrase=PASSPHRASE)
    write_certificate_files(tmp_path / "plain", sample.cert_pem, sample.key_pem)
    text = relay_yaml(emulator, sample, sample.cert_client_id, f"certificate: {certificate}")
    token = await MsalTokenProvider(load_account(tmp_path, text)).token(EXCHANGE_SCOPE)
    assert (
        emulator.issuer.validate(token, audience=EXCHANGE_AUDIENCE).app_id == sample.cert_client_id
    )
    (request,) = token_requests(emulator)
    header = jwt.get_unverified_header(request.form["client_assertion"])
    assert header["alg"] == "PS256" and {"x5t#S256", "x5c"} <= set(header)
    assert "client_secret" not in request.form


async def test_a_certificate_the_app_does_not_know(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    cert_pem, key_pem = other_certificate()
    write_certificate_files(tmp_path, cert_pem, key_pem)
    text = relay_yaml(emulator, sample, sample.cert_client_id, "certificate: {pfx_file: app.pfx}")
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(load_account(tmp_path, text)).token(EXCHANGE_SCOPE)
    assert str(refused.value).startswith(
        "535 5.7.3 identity platform: invalid_client: AADSTS700027: The certificate with "
        "identifier used to sign the client assertion is not registered on application."
    )


async def test_a_certificate_file_spoilt_after_loading(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """relay.yaml was valid, then the PFX was replaced: no token, and the reason."""
    files = write_certificate_files(
        tmp_path, sample.cert_pem, sample.key_pem, passphrase=PASSPHRASE
    )
    text = relay_yaml(
        emulator,
        sample,
        sample.cert_client_id,
        f"certificate: {{pfx_file: app.pfx, passphrase: {PASSPHRASE}}}",
    )
    account = load_account(tmp_path, text)
    files.pfx_file.write_bytes(b"not a pfx")
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(account).token(EXCHANGE_SCOPE)
    assert str(refused.value) == (
        f"535 5.7.3 account contoso: certificate: cannot open {files.pfx_file}: wrong passphrase, "
        "or not a PKCS#12 (.pfx) file"
    )
    assert token_requests(emulator) == []


@pytest.fixture
def cluster(sample: SampleTenant) -> WorkloadIssuer:
    """A Kubernetes cluster whose service account mail/relay is the app (federated credential)."""
    issuer = WorkloadIssuer()
    app = sample.directory.tenants[sample.tenant_id].apps[sample.client_id]
    app.add_federated_credential(issuer.url, SUBJECT, issuer.public_key_pem)
    return issuer


async def test_federated_token_file_is_read_for_every_token_request(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, cluster: WorkloadIssuer
) -> None:
    """Workload identity: the projected token is the client assertion, and the file is read
    again for the next token request, after the kubelet rotated it."""
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(cluster.token(SUBJECT) + "\n")
    text = relay_yaml(emulator, sample, sample.client_id, f"federated_token_file: {token_file}")
    provider = MsalTokenProvider(load_account(tmp_path, text))
    token = await provider.token(EXCHANGE_SCOPE)
    assert emulator.issuer.validate(token, audience=EXCHANGE_AUDIENCE).app_id == sample.client_id

    rotated = cluster.token(SUBJECT)
    token_file.write_text(rotated)
    provider.invalidate(EXCHANGE_SCOPE)
    await provider.token(EXCHANGE_SCOPE)
    first, second = token_requests(emulator)
    assert first.form["client_assertion"] != second.form["client_assertion"] == rotated
    assert second.form["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )


async def test_a_federated_token_of_another_service_account(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, cluster: WorkloadIssuer
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token("system:serviceaccount:default:other"))
    text = relay_yaml(emulator, sample, sample.client_id, f"federated_token_file: {token_file}")
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(load_account(tmp_path, text)).token(EXCHANGE_SCOPE)
    no_match = FEDERATION_NO_MATCH.describe(
        issuer=cluster.url,
        subject="system:serviceaccount:default:other",
        audience="api://AzureADTokenExchange",
    )
    assert str(refused.value) == f"535 5.7.3 identity platform: invalid_request: {no_match}"


async def test_a_federated_token_the_kubelet_stopped_renewing(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, cluster: WorkloadIssuer
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token(SUBJECT, issued_at=time.time() - 7200, lifetime=3600))
    text = relay_yaml(emulator, sample, sample.client_id, f"federated_token_file: {token_file}")
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(load_account(tmp_path, text)).token(EXCHANGE_SCOPE)
    expired = f"invalid_client: AADSTS{ASSERTION_EXPIRED.code}: Client assertion is not within"
    assert str(refused.value).startswith(f"535 5.7.3 identity platform: {expired}")


async def test_a_federated_token_signed_by_another_issuer_key(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, cluster: WorkloadIssuer
) -> None:
    impostor = WorkloadIssuer(cluster.url)  # same issuer URL, another key
    token_file = tmp_path / "token"
    token_file.write_text(impostor.token(SUBJECT))
    text = relay_yaml(emulator, sample, sample.client_id, f"federated_token_file: {token_file}")
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(load_account(tmp_path, text)).token(EXCHANGE_SCOPE)
    assert str(refused.value) == (
        "535 5.7.3 identity platform: invalid_client: AADSTS700027: Client assertion failed "
        "signature validation."
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read federated_token_file {path}: No such file or directory"),
        ("\n", "federated_token_file {path} is empty"),
    ],
    ids=["gone", "empty"],
)
async def test_a_federated_token_file_that_cannot_be_used(
    emulator: Emulator,
    sample: SampleTenant,
    tmp_path: Path,
    cluster: WorkloadIssuer,
    content: str | None,
    problem: str,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token(SUBJECT))
    text = relay_yaml(emulator, sample, sample.client_id, f"federated_token_file: {token_file}")
    account = load_account(tmp_path, text)
    if content is None:
        token_file.unlink()
    else:
        token_file.write_text(content)
    with pytest.raises(TokenRejected) as refused:
        await MsalTokenProvider(account).token(EXCHANGE_SCOPE)
    expected = problem.format(path=token_file)
    assert str(refused.value) == f"535 5.7.3 account contoso: {expected}"
    assert token_requests(emulator) == []


def sample_roles(sample: SampleTenant) -> set[str]:
    return sample.directory.tenants[sample.tenant_id].apps[sample.client_id].roles


# --- clouds ---------------------------------------------------------------------------------------


def test_cloud_presets_are_the_national_cloud_tables() -> None:
    """Hosts (reference §1.1; Microsoft Graph's national cloud deployments) and the resource
    identifiers tokens are asked for."""
    assert dict(CLOUD_ENDPOINTS) == {
        Cloud.GLOBAL: Endpoints(
            authority="https://login.microsoftonline.com",
            smtp_host="smtp.office365.com",
            smtp_port=587,
            graph="https://graph.microsoft.com/v1.0",
        ),
        Cloud.USGOV: Endpoints(
            authority="https://login.microsoftonline.us",
            smtp_host="smtp.office365.us",
            smtp_port=587,
            graph="https://graph.microsoft.us/v1.0",
        ),
        Cloud.USGOV_DOD: Endpoints(
            authority="https://login.microsoftonline.us",
            smtp_host="smtp.office365.us",
            smtp_port=587,
            graph="https://dod-graph.microsoft.us/v1.0",
        ),
        Cloud.CHINA: Endpoints(
            authority="https://login.chinacloudapi.cn",
            smtp_host="smtp.partner.outlook.cn",
            smtp_port=587,
            graph="https://microsoftgraph.chinacloudapi.cn/v1.0",
        ),
    }
    assert dict(CLOUD_RESOURCES) == {
        Cloud.GLOBAL: CloudResources(
            "https://outlook.office365.com",
            "https://outlook.office.com",
            "https://graph.microsoft.com",
        ),
        Cloud.USGOV: CloudResources(
            "https://outlook.office365.us",
            "https://outlook.office365.us",
            "https://graph.microsoft.us",
        ),
        Cloud.USGOV_DOD: CloudResources(
            "https://outlook-dod.office365.us",
            "https://outlook-dod.office365.us",
            "https://dod-graph.microsoft.us",
        ),
        Cloud.CHINA: CloudResources(
            "https://partner.outlook.cn",
            "https://partner.outlook.cn",
            "https://microsoftgraph.chinacloudapi.cn",
        ),
    }


@pytest.mark.parametrize("cloud", list(Cloud), ids=[c.value for c in Cloud])
async def test_each_cloud_end_to_end(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, cloud: Cloud
) -> None:
    """`cloud: X` with `endpoints:` at the emulator: the tokens are asked for X's resources,
    carry them as audience, and the emulated Exchange takes the message."""
    text = relay_yaml(emulator, sample, sample.client_id, f"client_secret: {sample.client_secret}")
    text = text.replace("  contoso:\n", f"  contoso:\n    cloud: {cloud.value}\n")
    config = config_of(tmp_path, text)
    account = config.accounts["contoso"]
    resources = CLOUD_RESOURCES[cloud]
    assert requested_scopes(account, EXCHANGE_SCOPE) == [f"{resources.exchange}/.default"]

    graph = await MsalTokenProvider(account).token(GRAPH_SCOPE)
    assert emulator.issuer.validate(graph, audience=resources.graph)
    relay = Relay(config)
    await relay.start()
    try:
        await asyncio.to_thread(send, relay.listeners[0].port)
        (message,) = await emulator.smtp.wait_for_messages(1)
    finally:
        await relay.stop(grace=2)
    assert message.mailbox == sample.mailbox
    scopes = [r.form["scope"] for r in token_requests(emulator)]
    assert scopes == [f"{resources.graph}/.default", f"{resources.exchange}/.default"]


def test_a_delegated_account_asks_for_the_users_permissions_in_its_cloud(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    for cloud in Cloud:
        text = relay_yaml(emulator, sample, sample.client_id, f"delegated_user: {sample.mailbox}")
        text = text.replace("  contoso:\n", f"  contoso:\n    cloud: {cloud.value}\n")
        account = load_account(tmp_path, text)
        resources = CLOUD_RESOURCES[cloud]
        assert requested_scopes(account, EXCHANGE_SCOPE) == [
            f"{resources.exchange_delegated}/SMTP.Send"
        ]
        assert requested_scopes(account, GRAPH_SCOPE) == [
            f"{resources.graph}/Mail.Send",
            f"{resources.graph}/Mail.ReadWrite",
        ]
    with pytest.raises(ValueError, match="no such scope"):
        requested_scopes(account, "https://example.com/.default")


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            "relay@contoso.com",
            ["someone@example.org"],
            "From: relay@contoso.com\r\nTo: someone@example.org\r\nSubject: cloud\r\n\r\nhi\r\n",
        )


# --- foreign exceptions ---------------------------------------------------------------------------


def test_every_msal_and_requests_exception_is_mapped() -> None:
    """The provider maps `msal.exceptions.MsalError` and `requests.RequestException` (and
    ValueError, for discovery); every exception class those libraries raise is one of them."""
    modules = (msal.exceptions, requests.exceptions)
    classes = {
        obj
        for module in modules
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__.startswith(("msal", "requests"))
    }
    assert classes, "nothing found: the modules moved"
    unmapped = [
        c.__name__
        for c in classes
        if not issubclass(c, (msal.exceptions.MsalError, requests.RequestException))
        and not issubclass(c, Warning)
    ]
    assert unmapped == []
