"""Exchange Online's SMTP submission wording (smtp.office365.com:587), as named replies.

The emulator speaks these and tests assert on them, so a reply text lives in exactly one place.
Sources are `reference/exchange-online.md` §1.2 (transcript), §1.4 (failed XOAUTH2), §1.5 (reply
catalogue) and §5 (limits, basic-auth retirement); the confidence the reference gives is noted
where it is below "seen in captures". A trailing `[HOST ISO-time SESSIONID]` is not part of these
texts: the emulator appends it (`stamped`) where Exchange does.
"""

from __future__ import annotations

import base64
import json

from relay.reply import Reply

# The service-wide size limit advertised in EHLO (150 MiB); a mailbox's own limit is lower.
SERVICE_MAX_SIZE = 157_286_400

# Exchange's EHLO keywords, in Exchange's order (§1.2): AUTH takes STARTTLS's place after TLS.
EHLO_KEYWORDS_BEFORE_TLS = (
    f"SIZE {SERVICE_MAX_SIZE}",
    "PIPELINING",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "8BITMIME",
    "BINARYMIME",
    "CHUNKING",
    "SMTPUTF8",
)
EHLO_KEYWORDS_AFTER_TLS = tuple(
    "AUTH LOGIN XOAUTH2" if k == "STARTTLS" else k for k in EHLO_KEYWORDS_BEFORE_TLS
)

# --- session --------------------------------------------------------------------------------
STARTTLS_READY = Reply(220, "2.0.0", "SMTP server ready")
OK = Reply(250, "2.0.0", "OK")  # NOOP
RESETTING = Reply(250, "2.0.0", "Resetting")
CLOSING = Reply(221, "2.0.0", "Service closing transmission channel")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_MAIL_INPUT = Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>")
INVALID_DOMAIN = Reply(501, "5.5.4", "Invalid domain name")  # stamped
# [L] Exchange Server's wording; not captured from Exchange Online.
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
SEND_HELLO_FIRST = Reply(503, "5.5.2", "Send hello first")
NEED_MAIL = Reply(503, "5.5.2", "Need mail command")
NEED_RCPT = Reply(503, "5.5.2", "Need rcpt command")
SENDER_ALREADY_SPECIFIED = Reply(503, "5.5.2", "Sender already specified")
ALREADY_AUTHENTICATED = Reply(503, "5.5.2", "Already authenticated")  # RFC 4954: 503
INVALID_ADDRESS = Reply(501, "5.1.3", "Invalid address")


def unrecognized_command(command: str) -> Reply:
    """[L] per the reference."""
    return Reply(500, "5.3.3", f"Unrecognized command '{command}'")


# --- AUTH -----------------------------------------------------------------------------------
AUTH_SUCCESSFUL = Reply(235, "2.7.0", "Authentication successful")
AUTH_UNSUCCESSFUL = Reply(535, "5.7.3", "Authentication unsuccessful")  # stamped
AUTH_DISABLED_TENANT = Reply(
    535,
    "5.7.139",
    "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
    "Visit https://aka.ms/smtp_auth_disabled for more information.",
)  # stamped
AUTH_DISABLED_MAILBOX = Reply(
    535,
    "5.7.139",
    "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
    "Visit https://aka.ms/smtp_auth_disabled for more information.",
)  # stamped
BASIC_AUTH_RETIRED = Reply(
    550, "5.7.30", "Basic authentication is not supported for Client Submission."
)
UNRECOGNIZED_AUTH_TYPE = Reply(504, "5.7.4", "Unrecognized authentication type")
CONCURRENT_CONNECTIONS = Reply(432, "4.3.2", "Concurrent connections limit exceeded.")
# [L] aiosmtpd's wording for a SASL answer that is not base64, or `*` (RFC 4954 cancel).
BAD_BASE64 = Reply(501, "5.5.2", "Can't decode base64")
AUTH_ABORTED = Reply(501, "5.7.0", "Auth aborted")

# Gmail, not Exchange (§1.4): a bad token gets a 334 JSON challenge, then 535 5.7.8 after the
# client's empty line. The emulator says this only when told to, so clients can test that branch.
GMAIL_ERROR_CHALLENGE = base64.b64encode(
    json.dumps(
        {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"},
        separators=(",", ":"),
    ).encode()
).decode()
GMAIL_BAD_CREDENTIALS = Reply(
    535,
    "5.7.8",
    "Username and Password not accepted. For more information, go to\n"
    " https://support.google.com/mail/?p=BadCredentials",
)

# --- MAIL / RCPT ----------------------------------------------------------------------------
NOT_AUTHENTICATED = Reply(530, "5.7.57", "Client not authenticated to send mail.")  # stamped
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# [L] in session: Exchange's NDR says `550 5.5.3 RESOLVER.ADR.RecipLimit`; this is RFC 5321's
# answer, which tells the client to send the remaining recipients in another transaction.
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")

# --- end of DATA ----------------------------------------------------------------------------
SUBMISSION_QUOTA_EXCEEDED = Reply(
    554, "5.2.0", "STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
)
MAX_SUBMISSION_EXCEEDED = Reply(
    554,
    "5.2.0",
    "MapiExceptionMaxSubmissionExceeded; Message size exceeds maximum size limit.; "
    "STOREDRV.Submission.Exception:MessageSubmissionExceededException."
    "MapiExceptionMaxSubmissionExceeded; Failed to process message due to a permanent exception "
    "with message [BeginDiagnosticData]Cannot save changes made to an item to store.",
)


def send_as_denied(mailbox: str, sender: str) -> Reply:
    return Reply(
        554,
        "5.2.252",
        f"SendAsDenied; {mailbox} not allowed to send as {sender}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
        "Failed to process message due to a permanent exception with message "
        "[BeginDiagnosticData]Cannot submit message.",
    )


def queued(message_id: str, mailbox_server: str) -> Reply:
    return Reply(250, "2.0.0", f"OK {message_id} [Hostname={mailbox_server}]")


# --- any phase (for fault injection) --------------------------------------------------------
# [L] Exchange Server's wording when a front end shuts a session down.
SERVICE_NOT_AVAILABLE = Reply(421, "4.3.2", "Service not available, closing transmission channel")


def server_busy(client_ip: str) -> Reply:
    """Seen on EOP (port 25), not confirmed on submission: a generic transient (§1.5)."""
    return Reply(451, "4.7.500", f"Server busy. Please try again later from [{client_ip}]. (AS761)")


def stamped(reply: Reply, stamp: str) -> Reply:
    """`reply` with Exchange's `[HOST ISO-time SESSIONID]` suffix."""
    return Reply(reply.code, reply.status, f"{reply.text} [{stamp}]")
