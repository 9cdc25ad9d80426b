"""Where imported messages go: a Maildir, a drop directory, a local SMTP server, an HTTP endpoint.

The importer hands a sink one message at a time, in two steps:

    await sink.put(message, mime)   the sink holds the message: a file sink has it in a temporary
                                    file, written and fsync'ed; a network sink's receiver said yes
    await sink.commit(message)      a file sink renames the temporary file into place and syncs the
                                    directory; idempotent (nothing to do when already renamed).
                                    A network sink has nothing left to do.

Between the two the importer records the message as delivered, so a crash at any point neither
loses it nor makes a second file: `put` again only rewrites the temporary file, and `commit`
again finds nothing to rename. File names come from the message's Graph id (`Incoming.key`),
so the same message always gets the same name.

How a sink fails: `TemporaryFailure` (try again later: disk full, the SMTP server said 4xx or
could not be reached, the HTTP endpoint answered anything but 2xx) or `PermanentFailure` (the
SMTP server refused the message with 5xx: the importer quarantines it).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import aiohttp
import aiosmtplib

from relay.errors import TemporaryFailure
from relay.graphapi import MAPPED_EXCEPTIONS, map_http_error, retry_after_seconds
from relay.reply import Reply
from relay.tls import client_context
from relay.transports.smtp import map_smtp_error

SMTP_TIMEOUT = 60.0  # seconds for one command to the local SMTP server, DATA included
HTTP_TIMEOUT = 120.0  # seconds for the HTTP endpoint to take one message
MAX_ANSWER_TEXT = 200  # characters of an HTTP endpoint's refusal kept for the log
FILE_MODE = 0o666  # before the umask, as any mail delivery agent creates files
STAGING_DIR = ".relay-tmp"  # the directory sink's temporary files, beside the delivered ones


@dataclass(frozen=True, kw_only=True)
class Incoming:
    """What the importer knows of a message before it has its bytes (from the delta page)."""

    id: str  # Graph's id; changes when the message moves
    received: str  # receivedDateTime, as Graph gives it
    internet_message_id: str  # the Message-ID, "" when Graph gives none
    sender: str  # the From address, "" when there is none
    subject: str

    @property
    def key(self) -> str:
        """A short stable name for the message: 32 hex digits of the SHA-256 of its Graph id."""
        return hashlib.sha256(self.id.encode()).hexdigest()[:32]

    @property
    def received_at(self) -> datetime:
        """receivedDateTime as a datetime; the epoch when Graph gave none that parses."""
        try:
            when = datetime.fromisoformat(self.received)
        except ValueError:
            return datetime.fromtimestamp(0, UTC)
        return when if when.tzinfo else when.replace(tzinfo=UTC)


class Sink(Protocol):
    kind: str

    async def open(self) -> None:
        """Check or create what the sink needs (directories); raise `OSError` when it cannot."""
        ...

    async def put(self, message: Incoming, mime: bytes) -> None:
        """Hold the message (see the module docstring)."""
        ...

    async def commit(self, message: Incoming) -> None:
        """Finish a `put` (see the module docstring)."""
        ...

    async def aclose(self) -> None: ...


# -- file sinks ------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_trouble(exc: OSError, path: Path) -> TemporaryFailure:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    status = "4.3.1" if full else "4.3.0"
    return TemporaryFailure(Reply(451, status, f"cannot write {path}: {exc.strerror}"))


class FileSink(ABC):
    """One file per message, written in `staging`, renamed into `delivered` on commit."""

    kind = "file"

    def __init__(self, *, staging: Path, delivered: Path) -> None:
        self.staging = staging
        self.delivered = delivered

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.delivered}>"

    @abstractmethod
    def name(self, message: Incoming) -> str:
        """The file's name, the same in `staging` and `delivered`."""

    async def open(self) -> None:
        await asyncio.to_thread(self._make_dirs)

    def _make_dirs(self) -> None:
        for path in (self.staging, self.delivered):
            path.mkdir(parents=True, exist_ok=True)

    async def put(self, message: Incoming, mime: bytes) -> None:
        path = self.staging / self.name(message)
        try:
            await asyncio.to_thread(_write_synced, path, mime)
        except OSError as exc:
            raise _disk_trouble(exc, path) from None

    async def commit(self, message: Incoming) -> None:
        name = self.name(message)
        try:
            await asyncio.to_thread(self._move, self.staging / name, self.delivered / name)
        except OSError as exc:
            raise _disk_trouble(exc, self.delivered / name) from None

    def _move(self, staged: Path, final: Path) -> None:
        try:
            staged.rename(final)
        except FileNotFoundError:
            if staged.exists() or not final.parent.is_dir():
                raise
            # Renamed already, by a commit that crashed before the importer noted it.
        _fsync_dir(final.parent)
        if staged.parent != final.parent:
            _fsync_dir(staged.parent)

    async def aclose(self) -> None:
        return None


class MaildirSink(FileSink):
    """A Maildir: written in tmp/, renamed into new/ (cur/ is the reader's)."""

    kind = "maildir"

    def __init__(self, root: Path) -> None:
        super().__init__(staging=root / "tmp", delivered=root / "new")
        self.root = root

    def name(self, message: Incoming) -> str:
        """`<received, seconds since the epoch>.<key>.relay`: unique, and sorted by arrival."""
        return f"{int(message.received_at.timestamp())}.{message.key}.relay"

    def _make_dirs(self) -> None:
        super()._make_dirs()
        (self.root / "cur").mkdir(exist_ok=True)


class DirectorySink(FileSink):
    """A drop directory: `<received>-<key>.eml`, written in .relay-tmp/ beside it."""

    kind = "directory"

    def __init__(self, root: Path) -> None:
        super().__init__(staging=root / STAGING_DIR, delivered=root)

    def name(self, message: Incoming) -> str:
        return f"{message.received_at.strftime('%Y%m%dT%H%M%SZ')}-{message.key}.eml"


# -- network sinks -----------------------------------------------------------------------------


class SmtpSink:
    """Hands each message to a local SMTP server: MAIL FROM the message's From address (the
    null sender when it has none), RCPT TO the mailbox it was imported from; plain SMTP, no
    AUTH (a server on this host or a trusted network)."""

    kind = "smtp"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        mailbox: str,
        timeout: float = SMTP_TIMEOUT,
        local_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.mailbox = mailbox
        self._timeout = timeout
        self._local_hostname = local_hostname

    def __repr__(self) -> str:
        return f"<SmtpSink {self.host}:{self.port} rcpt={self.mailbox}>"

    async def open(self) -> None:
        return None

    async def put(self, message: Incoming, mime: bytes) -> None:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            start_tls=False,
            local_hostname=self._local_hostname,
            timeout=self._timeout,
        )
        try:
            await client.connect()
            options = (
                ["BODY=8BITMIME"]
                if any(b > 127 for b in mime) and client.supports_extension("8bitmime")
                else []
            )
            await client.mail(message.sender, options=options)
            await client.rcpt(self.mailbox)
            await client.data(mime)
        except Exception as exc:
            raise map_smtp_error(exc) from None
        finally:
            await _quit(client)

    async def commit(self, message: Incoming) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def _quit(client: aiosmtplib.SMTP) -> None:
    """QUIT politely if the connection is usable; never raise (a cleanup path)."""
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), timeout=5)
    except Exception:  # best effort; the connection is dropped either way
        client.close()


class HttpSink:
    """POSTs each message as `message/rfc822`; any 2xx answer confirms it.

    Each request carries `Idempotency-Key: <key>` (the same for every attempt and after a
    restart, see `Incoming.key`) and `X-Relay-Inbound: <name>`; an endpoint that remembers the
    keys it took sees each message once even when relay sends it twice.
    """

    kind = "http"

    def __init__(
        self,
        *,
        url: str,
        inbound: str,
        session: aiohttp.ClientSession | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> None:
        self.url = url
        self.inbound = inbound
        self._session = session
        self._owns_session = session is None
        self._ssl = ssl_context if ssl_context is not None else client_context()
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:
        return f"<HttpSink {self.url}>"

    async def open(self) -> None:
        return None

    async def put(self, message: Incoming, mime: bytes) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers: Mapping[str, str] = {
            "Content-Type": "message/rfc822",
            "Idempotency-Key": message.key,
            "X-Relay-Inbound": self.inbound,
        }
        try:
            async with self._session.post(
                self.url,
                data=io.BytesIO(mime),  # aiohttp warns on big raw bytes
                headers=headers,
                ssl=self._ssl,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return
                text = " ".join((await response.text(errors="replace")).split())
        except MAPPED_EXCEPTIONS as exc:
            raise map_http_error(exc, peer="HTTP endpoint") from None
        answer = f"HTTP endpoint answered {response.status} {response.reason or ''}".rstrip()
        if text:
            answer += f": {text[:MAX_ANSWER_TEXT]}"
        raise TemporaryFailure(
            Reply(451, "4.3.0", answer),
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )

    async def commit(self, message: Incoming) -> None:
        return None

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None


def make_sink(deliver: Mapping[str, object], *, inbound: str, mailbox: str) -> Sink:
    """The sink an `inbound:` entry's `deliver:` names."""
    ((kind, target),) = deliver.items()
    if kind == "maildir":
        assert isinstance(target, Path)
        return MaildirSink(target)
    if kind == "directory":
        assert isinstance(target, Path)
        return DirectorySink(target)
    if kind == "smtp":
        assert isinstance(target, tuple)
        host, port = target
        return SmtpSink(host=host, port=port, mailbox=mailbox)
    if kind == "http":
        assert isinstance(target, str)
        return HttpSink(url=target, inbound=inbound)
    raise ValueError(f"unknown sink {kind!r}")
