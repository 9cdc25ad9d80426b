"""The seam between the SMTP listener and the rest of the relay.

The listener speaks SMTP and enforces the listener's own policy (networks, AUTH, TLS, limits);
everything it cannot know (which route a sender or recipient takes, whether a route may send as
that sender, where the message is stored) it asks an `Intake`. The relay's intake routes and
spools; tests pass in their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from relay.reply import Reply


@dataclass(frozen=True, kw_only=True)
class Client:
    """What the listener knows about the client when it asks."""

    address: str  # client IP
    listener: str  # the listener's configured address, e.g. "127.0.0.1:2525"
    helo: str | None = None
    user: str | None = None  # authenticated local user, if any
    tls: bool = False


class Intake(Protocol):
    def check_sender(self, client: Client, mail_from: str) -> Reply | None:
        """At MAIL FROM: None to accept, or the refusal to send back."""
        ...

    def check_recipient(self, client: Client, mail_from: str, rcpt: str) -> Reply | None:
        """At RCPT TO: None to accept, or the refusal to send back."""
        ...

    async def accept(
        self, client: Client, mail_from: str, rcpt_tos: list[str], data: bytes, *, smtputf8: bool
    ) -> str:
        """After DATA: store the message durably and return its queue id.

        Raises `IntakeRefused` with the reply for the client (e.g. a sender policy refusal
        found in the headers, `452 4.3.1` when the spool is full, `451 4.3.0` on write errors).
        """
        ...
