"""Upstream transports: how a spooled message reaches Exchange Online.

    Transport.send(OutgoingMessage) -> Delivered      or raises DeliveryError
                                                        (TemporaryFailure / PermanentFailure)

A transport never parses client SMTP and never touches the spool; it gets the bytes and the
envelope, a token provider, and its limits, and reports what the upstream said.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from relay.reply import Reply


@dataclass(frozen=True, kw_only=True)
class OutgoingMessage:
    qid: str
    mail_from: str  # "" for the null sender
    rcpt_tos: tuple[str, ...]
    data: bytes
    smtputf8: bool = False


@dataclass(frozen=True, kw_only=True)
class Delivered:
    """The upstream took the message for `accepted`; `refused` recipients got a reply each."""

    reply: Reply
    accepted: tuple[str, ...]
    refused: Mapping[str, Reply] = field(default_factory=dict)


class Transport(Protocol):
    async def send(self, message: OutgoingMessage) -> Delivered:
        """Deliver one message; raise TemporaryFailure or PermanentFailure when it was not."""
        ...

    async def aclose(self) -> None:
        """Close pooled connections; idempotent."""
        ...
