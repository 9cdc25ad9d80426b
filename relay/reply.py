"""SMTP replies as values.

`Reply(code, status, text)` is the one reply type of the project: the listener answers clients
with it, transports turn upstream answers into it, bounces quote it and the emulator speaks it.
The RFC 3463 enhanced status is its own field because retry and bounce decisions depend on it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


class Reply(NamedTuple):
    code: int
    status: str
    text: str

    def __str__(self) -> str:
        """The wire form without the final CRLF; multi-line texts get `NNN-` continuations."""
        lines = self.text.splitlines() or [""]
        prefix = f"{self.status} " if self.status else ""
        out = [
            f"{self.code}{'-' if i < len(lines) - 1 else ' '}{prefix}{line}"
            for i, line in enumerate(lines)
        ]
        return "\r\n".join(out)

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Split an upstream reply's message into enhanced status and text.

        `message` is what a client library hands back (continuation lines joined by newlines);
        every line may repeat the status, as Exchange's multi-line replies do.
        """
        lines = message.splitlines() or [""]
        status = ""
        texts = []
        for line in lines:
            m = _STATUS.match(line)
            if m and str(code)[0] == m.group(1):
                status = status or line[: m.end()].strip()
                line = line[m.end() :]
            texts.append(line)
        return cls(code, status, "\n".join(texts).strip())

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def one_line(self) -> str:
        """For logs and records: the reply on a single line."""
        return str(self).replace("\r\n", " / ")
