"""The project's exception tree.

    RelayError
    ├── ConfigError            relay.yaml is wrong: file, line, YAML path and a hint
    ├── IntakeRefused          the listener refuses a client transaction (carries a Reply)
    ├── SpoolError             the spool cannot store or read (I/O, corruption)
    │   └── SpoolFull          no space left: clients get 452 4.3.1
    └── DeliveryError          one delivery attempt failed (carries a Reply)
        ├── TemporaryFailure   retry later: 4xx, network, TLS, token endpoint trouble
        │   ├── UpstreamUnavailable (also ConnectionError)
        │   ├── UpstreamTimeout     (also TimeoutError)
        │   ├── TokenUnavailable    the identity platform could not give a token now
        │   └── TokenRejected       the identity platform or Exchange refused the account's
        │                           credentials or token (an operator must act; the mail
        │                           waits rather than bounces)
        └── PermanentFailure   5xx or a definite "no" about this message: bounce and dead-letter

Foreign exceptions (aiosmtplib, aiohttp, msal, OSError) are mapped into this tree at the
boundary where they arise; nothing above a transport sees them.
"""

from __future__ import annotations

from pathlib import Path

from relay.reply import Reply


class RelayError(Exception):
    """Base of every error relay raises on purpose."""


class ConfigError(RelayError):
    """A configuration problem, located in the file that has it."""

    def __init__(
        self,
        message: str,
        *,
        file: Path | str | None = None,
        line: int | None = None,
        path: str = "",
        hint: str = "",
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.path = path
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        path = f"{self.path}: " if self.path else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{path}{self.message}{hint}"


class IntakeRefused(RelayError):
    """The listener refuses what the client sent; `reply` goes back on the wire."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class SpoolError(RelayError):
    """The spool could not store or read a message."""


class SpoolFull(SpoolError):
    """The spool's file system has no room (ENOSPC / EDQUOT)."""


class DeliveryError(RelayError):
    """One delivery attempt failed; `reply` says how, in SMTP terms, for logs and bounces."""

    def __init__(self, reply: Reply, *, retry_after: float | None = None) -> None:
        self.reply = reply
        self.retry_after = retry_after
        super().__init__(reply.one_line())


class TemporaryFailure(DeliveryError):
    """Try again later."""


class UpstreamUnavailable(TemporaryFailure, ConnectionError):
    """The upstream could not be reached, or dropped the connection."""


class UpstreamTimeout(TemporaryFailure, TimeoutError):
    """The upstream did not answer in time."""


class TokenUnavailable(TemporaryFailure):
    """No token now: the identity platform is down, throttling, or unreachable."""


class TokenRejected(TemporaryFailure):
    """The account's credentials or token were refused (bad secret, unknown app, no
    FullAccess on the mailbox, SMTP AUTH disabled...).

    Temporary on purpose: the fault is the configuration, not the message, so mail waits in the
    spool (until `max_age`) while an operator fixes the secret.
    """


class PermanentFailure(DeliveryError):
    """This message cannot be delivered as it is: bounce it."""
