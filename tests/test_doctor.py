"""`relay doctor` against the emulator's failure modes: each misconfiguration an administrator
makes in Entra ID or Exchange Online, the answer Microsoft gives, and the advice the doctor
prints for it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opskit import run, write_config
from relaykit import relay_config, secret_account

from relay.config import (
    AccountConfig,
    Cloud,
    Config,
    Credential,
    CredentialKind,
    Endpoints,
    InboundConfig,
    Secret,
    Transport,
)
from relay.doctor import Finding, Ids, Outcome, Report, diagnose_smtp, diagnose_token, doctor
from relay.reply import Reply
from relay.testing.directory import MAIL_SEND, SMTP_SEND_AS_APP, App, Tenant
from relay.testing.emulator import Emulator, SampleTenant

WRONG_SECRET = "Wr0ng~secret.value-not.the.real.one"


def tenant(sample: SampleTenant) -> Tenant:
    found = sample.directory.tenant(sample.tenant_id)
    assert found is not None
    return found


def app(sample: SampleTenant) -> App:
    return tenant(sample).apps[sample.client_id]


def findings(report: Report) -> dict[str, Finding]:
    """Findings by the start of their check text (the part before any address or port)."""
    ((_, found),) = report.sections
    return {f.check: f for f in found}


def one(report: Report, start: str) -> Finding:
    (found,) = [f for c, f in findings(report).items() if c.startswith(start)]
    return found


def config(emulator: Emulator, sample: SampleTenant, tmp_path: Path, **route: object) -> Config:
    return relay_config(emulator, sample, tmp_path / "spool", **route)


async def test_a_working_setup_is_in_order(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    report = await doctor(config(emulator, sample, tmp_path, send_as=(sample.send_as,)))
    assert report.problems == 0
    token = one(report, "token for Exchange Online (SMTP)")
    assert token.outcome is Outcome.OK
    assert token.answer == "application permissions: Mail.ReadWrite, Mail.Send, SMTP.SendAsApp"
    login = one(report, "route default: SMTP AUTH XOAUTH2 as relay@contoso.com at 127.0.0.1:")
    assert (login.outcome, login.answer) == (Outcome.OK, "235 2.7.0 Authentication successful")
    note = one(report, "route default: send as alerts@contoso.com")
    assert note.outcome is Outcome.NOTE and note.answer.startswith("checked only with --send-test")
    assert not emulator.smtp.messages  # nothing is sent without --send-test
    assert report.render().endswith("\n\nEverything checked is in order.")


async def test_send_test_sends_through_each_route_from_the_mailbox_and_each_send_as_address(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    cfg = config(emulator, sample, tmp_path, send_as=(sample.send_as,))
    report = await doctor(cfg, send_test="someone@example.org")
    assert report.problems == 0
    sent = await emulator.smtp.wait_for_messages(2)
    assert [(m.mail_from, m.rcpt_tos) for m in sent] == [
        ("relay@contoso.com", ("someone@example.org",)),
        ("alerts@contoso.com", ("someone@example.org",)),
    ]
    assert b"Subject: relay doctor: test through route default\r\n" in sent[0].data
    ok = one(report, "route default: test message from alerts@contoso.com to someone@example.org")
    assert ok.outcome is Outcome.OK and ok.answer.startswith("250 2.0.0 OK <")


async def test_a_wrong_secret_gets_the_secret_value_advice(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    account = secret_account(emulator, sample, secret=WRONG_SECRET)
    report = await doctor(config(emulator, sample, tmp_path, account=account))
    token = one(report, "token for Exchange Online (SMTP)")
    assert token.outcome is Outcome.FAIL
    assert token.answer.startswith(
        "identity platform: invalid_client: AADSTS7000215: Invalid client secret provided."
    )
    assert token.cause.startswith("The client secret in relay.yaml is not the app's secret value")
    assert token.steps[0].endswith(
        "copy the Value of the secret (shown only right after it is "
        "made; else add a new client secret),"
    )
    login = one(report, "route default: SMTP AUTH")
    assert (login.outcome, login.answer) == (Outcome.NOTE, "not checked: no token")
    assert WRONG_SECRET not in report.render()
    assert report.problems == 1


async def test_an_expired_secret(emulator: Emulator, sample: SampleTenant, tmp_path: Path) -> None:
    app(sample).secrets[0].expires = datetime.now(UTC) - timedelta(days=1)
    report = await doctor(config(emulator, sample, tmp_path))
    token = one(report, "token for Exchange Online (SMTP)")
    assert "AADSTS7000222" in token.answer
    assert token.cause == "The app's client secret has expired."


async def test_an_unknown_app_and_an_unknown_tenant(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    account = secret_account(emulator, sample)
    stranger = "11111111-2222-3333-4444-555555555555"
    report = await doctor(
        config(emulator, sample, tmp_path, account=replace(account, client_id=stranger))
    )
    token = one(report, "token for Exchange Online (SMTP)")
    assert "AADSTS700016" in token.answer
    assert token.cause == f"There is no application {stranger} in the tenant {sample.tenant_id}."
    report = await doctor(
        config(emulator, sample, tmp_path, account=replace(account, tenant_id=stranger))
    )
    token = one(report, "token for Exchange Online (SMTP)")
    assert token.answer.startswith("identity platform: Unable to get authority configuration")
    assert token.cause == f"The tenant {stranger} does not exist in this cloud."


async def test_no_full_access_gets_new_service_principal_and_add_mailbox_permission(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """535 5.7.3: the steps name the enterprise application's object id, read from the token."""
    tenant(sample).mailboxes["relay@contoso.com"].full_access.discard(sample.client_id)
    report = await doctor(config(emulator, sample, tmp_path))
    login = one(report, "route default: SMTP AUTH")
    assert login.outcome is Outcome.FAIL
    assert login.answer.startswith("535 5.7.3 Authentication unsuccessful [")
    assert "no FullAccess on the mailbox" in login.cause
    oid = app(sample).object_id
    assert (
        f"  New-ServicePrincipal -AppId {sample.client_id} -ObjectId {oid} "
        f"-Organization {sample.tenant_id}"
    ) in login.steps
    add = f'  Add-MailboxPermission -Identity "relay@contoso.com" -User {oid} -AccessRights'
    assert f"{add} FullAccess" in login.steps


async def test_a_missing_smtp_permission_gets_the_consent_steps(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    app(sample).roles = {MAIL_SEND}
    report = await doctor(config(emulator, sample, tmp_path))
    token = one(report, "token for Exchange Online (SMTP)")
    assert (token.outcome, token.answer) == (Outcome.FAIL, "application permissions: Mail.Send")
    assert (
        token.cause
        == "The app lacks the SMTP.SendAsApp application permission (or its admin consent)."
    )
    assert token.steps[0].endswith(
        "Add a permission > APIs my organization uses > Office 365 Exchange Online > Application "
        "permissions > SMTP.SendAsApp;"
    )
    login = one(report, "route default: SMTP AUTH")
    assert login.answer.startswith("535 5.7.3")
    assert login.cause.startswith("The app lacks the SMTP.SendAsApp application permission")


@pytest.mark.parametrize(
    ("switch", "cause", "step"),
    [
        (
            "mailbox",
            "SMTP AUTH is switched off for the mailbox relay@contoso.com.",
            '  Set-CASMailbox -Identity "relay@contoso.com" '
            "-SmtpClientAuthenticationDisabled $false",
        ),
        (
            "tenant",
            "SMTP AUTH is switched off for the whole organisation.",
            "  (just this mailbox; or for the whole organisation: "
            "Set-TransportConfig -SmtpClientAuthenticationDisabled $false)",
        ),
    ],
)
async def test_smtp_auth_switched_off(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path, switch: str, cause: str, step: str
) -> None:
    if switch == "tenant":
        tenant(sample).smtp_auth_enabled = False
    else:
        tenant(sample).mailboxes["relay@contoso.com"].smtp_auth_enabled = False
    report = await doctor(config(emulator, sample, tmp_path))
    login = one(report, "route default: SMTP AUTH")
    assert login.answer.startswith(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication"
    )
    assert login.cause == cause
    assert step in login.steps


async def test_send_as_denied_gets_add_recipient_permission(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    cfg = config(emulator, sample, tmp_path, send_as=("other@contoso.com",))
    report = await doctor(cfg, send_test="someone@example.org")
    mailbox = one(report, "route default: test message from relay@contoso.com")
    assert mailbox.outcome is Outcome.OK
    other = one(report, "route default: test message from other@contoso.com")
    assert other.outcome is Outcome.FAIL
    assert other.answer.startswith(
        "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as other@contoso.com;"
    )
    assert other.cause == "relay@contoso.com may not send as other@contoso.com."
    assert (
        '  Add-RecipientPermission -Identity "other@contoso.com" -Trustee "relay@contoso.com" '
        "-AccessRights SendAs"
    ) in other.steps


async def test_graph_route_without_mail_send(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    app(sample).roles = {SMTP_SEND_AS_APP}
    report = await doctor(
        config(emulator, sample, tmp_path, transport=Transport.GRAPH), send_test="x@example.org"
    )
    graph = one(report, "route default: Graph sendMail as relay@contoso.com")
    assert graph.outcome is Outcome.FAIL
    assert (
        graph.cause == "The app lacks the Mail.Send application permission (or its admin consent)."
    )
    assert graph.steps[0].endswith(
        "Add a permission > Microsoft Graph > Application permissions > Mail.Send;"
    )
    skipped = one(report, "route default: test message to x@example.org")
    assert (skipped.outcome, skipped.answer) == (
        Outcome.NOTE,
        "not sent: fix the problem above first",
    )


async def test_graph_access_policy_denial_on_send(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    """The app has Mail.Send, yet Graph answers 403 ErrorAccessDenied: an application access
    policy keeps it out of the mailbox."""
    emulator.graph.fail_next(403, "ErrorAccessDenied", "Access to OData is disabled.", times=2)
    report = await doctor(
        config(emulator, sample, tmp_path, transport=Transport.GRAPH), send_test="x@example.org"
    )
    sent = one(report, "route default: test message from relay@contoso.com")
    assert sent.outcome is Outcome.FAIL
    assert sent.answer == "454 4.7.0 Graph 403 ErrorAccessDenied: Access to OData is disabled."
    assert sent.cause.startswith("An application access policy (or RBAC for Applications)")
    assert (
        f'  Test-ApplicationAccessPolicy -Identity "relay@contoso.com" -AppId {sample.client_id}'
        in sent.steps
    )


async def test_graph_send_as_denied(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    cfg = config(
        emulator, sample, tmp_path, transport=Transport.GRAPH, send_as=("other@contoso.com",)
    )
    report = await doctor(cfg, send_test="x@example.org")
    other = one(report, "route default: test message from other@contoso.com")
    assert other.answer.startswith("554 5.7.1 Graph 403 ErrorSendAsDenied:")
    assert other.cause == "relay@contoso.com may not send as other@contoso.com."


def inbound(cfg: Config, tmp_path: Path, folder: str = "inbox") -> Config:
    return replace(
        cfg,
        routes=(),
        inbound=(
            InboundConfig(
                name="helpdesk",
                account="contoso",
                mailbox="shared@contoso.com",
                folder=folder,
                deliver={"maildir": tmp_path / "inbox"},
            ),
        ),
    )


async def test_inbound_import_reads_the_folder(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    report = await doctor(inbound(config(emulator, sample, tmp_path), tmp_path))
    assert report.problems == 0
    assert one(report, "inbound helpdesk: read shared@contoso.com folder inbox").answer == "200 OK"
    assert one(report, "token for Microsoft Graph").outcome is Outcome.OK


async def test_inbound_import_without_mail_readwrite(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    app(sample).roles = {SMTP_SEND_AS_APP, MAIL_SEND}
    report = await doctor(inbound(config(emulator, sample, tmp_path), tmp_path))
    found = one(report, "inbound helpdesk")
    assert found.outcome is Outcome.FAIL
    assert found.steps[0].endswith("Microsoft Graph > Application permissions > Mail.ReadWrite;")


async def test_inbound_import_kept_out_by_a_policy_or_a_missing_folder(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    emulator.graph.fail_next(403, "ErrorAccessDenied", "Access to OData is disabled.")
    report = await doctor(inbound(config(emulator, sample, tmp_path), tmp_path))
    found = one(report, "inbound helpdesk")
    assert found.answer == "Graph 403 ErrorAccessDenied: Access to OData is disabled."
    assert found.cause.startswith("An application access policy")
    report = await doctor(inbound(config(emulator, sample, tmp_path), tmp_path, folder="Nope"))
    found = one(report, "inbound helpdesk")
    assert (
        found.answer
        == "Graph 404 ErrorItemNotFound: The specified object was not found in the store."
    )
    assert found.cause == "The folder does not exist in shared@contoso.com."


async def test_an_unreachable_smtp_endpoint(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    account = secret_account(emulator, sample)
    dead = replace(account, endpoints=replace(account.endpoints, smtp_port=9))
    report = await doctor(config(emulator, sample, tmp_path, account=dead))
    login = one(report, "route default: SMTP AUTH XOAUTH2 as relay@contoso.com at 127.0.0.1:9")
    assert login.answer.startswith("451 4.4.1 upstream unreachable")
    assert login.cause == "The relay could not reach 127.0.0.1:9."


async def test_an_untrusted_identity_platform_certificate(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    account = replace(secret_account(emulator, sample), ca_file=None)
    report = await doctor(config(emulator, sample, tmp_path, account=account))
    token = one(report, "token for Exchange Online (SMTP)")
    assert token.outcome is Outcome.FAIL
    assert token.cause.startswith(
        "The relay does not trust the TLS certificate of the identity platform"
    )
    assert "ca_file" in token.steps[0]


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (700027, "The identity platform does not accept the certificate the relay signs with"),
        (700024, "The client assertion is outside its valid time"),
        (70021, "No federated credential on the app matches the token"),
        (70011, "The identity platform does not know the resource"),
        (
            4242,
            "The identity platform refused the token request "
            "(https://login.microsoftonline.com/error?code=4242).",
        ),
    ],
)
def test_other_aadsts_codes(code: int, cause: str, offline_account: AccountConfig) -> None:
    text = f"invalid_client: AADSTS{code}: text"
    got, steps = diagnose_token(text, Ids("t", "c"), offline_account)
    assert got.startswith(cause) and steps


@pytest.fixture
def offline_account() -> AccountConfig:
    """An account that is never asked: for the diagnoses the emulator does not produce."""
    return AccountConfig(
        name="contoso",
        cloud=Cloud.GLOBAL,
        tenant_id="t",
        client_id="c",
        credential=Credential(kind=CredentialKind.SECRET, secret=Secret("s")),
        endpoints=Endpoints(authority="https://a", smtp_host="h", smtp_port=587, graph="https://g"),
    )


async def test_the_command_line_exits_0_1_or_2(
    emulator: Emulator, sample: SampleTenant, tmp_path: Path
) -> None:
    good = write_config(emulator, sample, tmp_path)
    status, out, err = await run("doctor", "-c", str(good))
    assert (status, err) == (0, "")
    assert out.startswith(f"relay doctor: {good}\n\naccount contoso: tenant {sample.tenant_id}")
    bad = tmp_path / "bad"
    bad.mkdir()
    wrong = write_config(emulator, sample, bad, secret=WRONG_SECRET)
    status, out, _ = await run("doctor", "-c", str(wrong))
    assert status == 1 and out.endswith("1 problem found.\n") and WRONG_SECRET not in out
    assert (
        "  FAIL  token for Exchange Online (SMTP) (https://outlook.office365.com/.default)" in out
    )
    assert "        cause:  The client secret in relay.yaml is not the app's secret value" in out
    status, _, err = await run("doctor", "-c", str(tmp_path / "missing.yaml"))
    assert status == 2 and err.startswith("relay doctor: ")


def test_a_delegated_account_that_is_not_signed_in(offline_account: AccountConfig) -> None:
    text = "account contoso: no user has signed in; run `relay login contoso`"
    cause, steps = diagnose_token(text, Ids("t", "c", delegated=True), offline_account)
    assert cause.startswith("The account's user has not signed in, or must sign in again")
    assert steps == ("relay login contoso -c relay.yaml   (a device code; any browser will do)",)


def test_a_delegated_token_refused_by_exchange() -> None:
    ids = Ids("t", "c", delegated=True, account="contoso")
    refused = Reply(535, "5.7.3", "Authentication unsuccessful")
    cause, steps = diagnose_smtp(
        refused, ids, "relay@contoso.com", sender="relay@contoso.com", roles=frozenset({MAIL_SEND})
    )
    assert (
        cause == "The app lacks the SMTP.Send delegated permission, so Exchange refuses its token."
    )
    assert steps[0].endswith(
        "Add a permission > Microsoft Graph > Delegated permissions > SMTP.Send;"
    )
    assert "Then sign in again: relay login contoso" in steps
    cause, steps = diagnose_smtp(
        refused,
        ids,
        "relay@contoso.com",
        sender="relay@contoso.com",
        roles=frozenset({"SMTP.Send"}),
    )
    assert cause.startswith("Exchange does not let the signed-in user send as relay@contoso.com")
    assert steps[0] == "Sign in as the mailbox's own user (relay login contoso), or:"
