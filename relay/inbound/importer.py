"""Import mail from an Exchange Online mailbox folder through Microsoft Graph into a sink.

Takes an `inbound:` entry (`InboundConfig`); leaves each message of the folder in the sink once,
then applies `after:` in the mailbox (mark read, move to a folder made if missing, or delete).
What happened to each message is in the state (`relay.inbound.state`), under the spool path.

A round (at start, then every `poll_interval`, or at once on `poll()`):
  1. Messages the state says are due: pending ones are fetched and delivered again; delivered
     ones get their sink commit and `after:` action.
  2. The delta round (reference §7.1): GET the saved delta link, or start a full listing of the
     folder, and follow every `@odata.nextLink`. Each message with no row in the state that
     passes `match:` goes, up to `WORKERS` at a time (their Graph requests within the mailbox's
     limit of 4), through:
        GET …/messages/{id}/$value (at most max_size) -> checks -> sink.put
        -> state: delivered -> sink.commit -> after: action -> state: done
     Messages reported `@removed` are forgotten by the state.
  3. Once every message of the round has its row, the new `@odata.deltaLink` is saved. A round
     cut short (stop, crash, Graph failing) saves nothing: the next starts from the old link,
     and the state skips what is already done.

Each message once: a crash before the sink's `put` returned leaves no row, so the message is
listed and delivered again; a file sink rewrites the same temporary file, and a crash after the
`delivered` row is finished by `commit` (idempotent). The maildir and directory sinks thus never
hold a message twice. An SMTP or HTTP sink can get a message twice only when the process stops
between the receiver's "yes" and the `delivered` row (docs/inbound.md).

How it fails (nothing here ends the loop; each failure is logged with the message's ids):
  * Graph 429 / 503 / 5xx with a short Retry-After: waited out (`relay.graphapi`); a 401 gets
    one fresh token. What is left: the message is deferred (row `pending`, retried with
    backoff), or the listing ends the round (the next round starts from the saved link).
  * 404 for a message: removed meanwhile (row `gone`, or, for the `after:` action, already done).
  * 410 Gone or `syncStateNotFound` / `resyncRequired`: the delta link is dropped and the folder
    listed again in full; the state keeps that from importing anything twice.
  * Malformed (empty, no header fields), bigger than `max_size`, or refused by the SMTP sink
    with 5xx: quarantined (row `quarantined`, a warning), left untouched in the mailbox; the rest
    go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import quote

from yarl import URL

from relay.config import AccountConfig, AfterImport, Config, InboundConfig
from relay.errors import DeliveryError, PermanentFailure, TemporaryFailure
from relay.graphapi import Answer, AnswerTooLarge, GraphClient, retry_after_seconds
from relay.headerblock import HeaderBlock
from relay.identity import TokenProvider
from relay.inbound.sinks import Incoming, Sink, make_sink
from relay.inbound.state import ImportState, Record, Stage
from relay.metrics import Metrics
from relay.reply import Reply
from relay.tls import client_context

log = logging.getLogger("relay.inbound")

PAGE_SIZE = 100  # messages per delta page (Prefer: odata.maxpagesize)
WORKERS = 8  # messages in flight per import: enough to keep Graph's 4 requests busy
GRAPH_CONCURRENCY = 4  # Graph's limit of concurrent requests per app and mailbox (§7.4)
MAX_MESSAGE_SIZE = 150 * 1024 * 1024  # Exchange Online's largest message; the default max_size
MAX_RETRY_DELAY = 3600.0  # seconds; a deferred message is retried at least this often
SELECT = "id,internetMessageId,receivedDateTime,subject,from"
JSON = "application/json"
# Well-known folder names Graph takes in place of an id (reference §7.1).
WELL_KNOWN_FOLDERS = frozenset(
    {
        "inbox", "drafts", "sentitems", "deleteditems", "archive", "junkemail", "outbox",
        "msgfolderroot", "clutter", "conflicts", "conversationhistory", "localfailures",
        "scheduled", "searchfolders", "serverfailures", "syncissues",
        "recoverableitemsdeletions",
    }
)  # fmt: skip
DELTA_GONE_CODES = frozenset({"syncstatenotfound", "resyncrequired"})


class Outcome(Enum):
    IMPORTED = "imported"
    DEFERRED = "deferred"
    QUARANTINED = "quarantined"
    GONE = "gone"
    FILTERED = "filtered"


@dataclass
class RoundReport:
    """What one round did: counts per outcome, whether the folder was listed in full, and the
    failure that ended it early (None when it went to the end)."""

    counts: Counter[Outcome]
    full: bool = False
    error: str | None = None

    def __str__(self) -> str:
        counts = " ".join(f"{o.value}={self.counts[o]}" for o in Outcome)
        extra = " full" if self.full else ""
        return counts + extra + (f" error={self.error!r}" if self.error else "")


class ImporterState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


# -- pure functions --------------------------------------------------------------------------------


def incoming(item: Mapping[str, object]) -> Incoming | None:
    """A delta page's message entry as `Incoming`; None when it has no id."""
    message_id = item.get("id")
    if not isinstance(message_id, str) or not message_id:
        return None
    sender = item.get("from")
    address = sender.get("emailAddress") if isinstance(sender, dict) else None
    return Incoming(
        id=message_id,
        received=_text(item.get("receivedDateTime")),
        internet_message_id=_text(item.get("internetMessageId")),
        sender=_text(address.get("address")) if isinstance(address, dict) else "",
        subject=_text(item.get("subject")),
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def unwanted(config: InboundConfig, message: Incoming) -> str | None:
    """Why `match:` leaves this message out, or None to import it."""
    if config.senders and not _any_glob(config.senders, message.sender):
        return f"sender {message.sender or '(none)'} matches no match.sender"
    if config.subjects and not _any_glob(config.subjects, message.subject):
        return "subject matches no match.subject"
    return None


def _any_glob(patterns: tuple[str, ...], text: str) -> bool:
    return any(fnmatch.fnmatchcase(text.lower(), p.lower()) for p in patterns)


def malformed(mime: bytes) -> str | None:
    """What makes these bytes no message at all, or None."""
    if not mime.strip():
        return "empty message"
    if not HeaderBlock.parse(mime).fields:
        return "no header fields at the start"
    return None


def delta_gone(answer: Answer) -> bool:
    """Graph has lost the delta state: the folder must be listed again (reference §7.1)."""
    return answer.status == 410 or answer.code.lower() in DELTA_GONE_CODES


def retry_delay(base: float, attempts: int, retry_after: float | None) -> float:
    """Seconds until try `attempts + 1`: doubling from `base`, at most `MAX_RETRY_DELAY`, never
    before the upstream's Retry-After."""
    delay = min(MAX_RETRY_DELAY, base * 2 ** min(max(0, attempts - 1), 32))
    return max(delay, retry_after or 0.0)


def trouble(answer: Answer) -> TemporaryFailure:
    """An answer the importer cannot use, as a failure to try again later."""
    reply = Reply(451, "4.3.2" if answer.status == 429 else "4.3.0", answer.describe())
    return TemporaryFailure(reply, retry_after=retry_after_seconds(answer.retry_after))


def _label(message: Incoming) -> str:
    """How log lines name a message: its Message-ID, and the start of its Graph id."""
    return f"{message.internet_message_id or '(no Message-ID)'} (id {message.id[:24]}…)"


_Work = Callable[[], Awaitable[Outcome]]


class _Gone(Exception):
    """The message is no longer where its id says (404)."""


# -- the importer ------------------------------------------------------------------------------


class Importer:
    def __init__(
        self,
        config: InboundConfig,
        *,
        account: AccountConfig,
        tokens: TokenProvider,
        state_path: Path,
        sink: Sink | None = None,
        max_concurrency: int = GRAPH_CONCURRENCY,
        page_size: int = PAGE_SIZE,
        workers: int = WORKERS,
        retry_base: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.state = ImporterState.NEW
        self.rounds = 0
        self.last: RoundReport | None = None
        self.state_path = state_path
        self.max_concurrency = max_concurrency
        self._sink = sink or make_sink(config.deliver, inbound=config.name, mailbox=config.mailbox)
        self._graph = GraphClient(
            mailbox=config.mailbox,
            graph_url=account.endpoints.graph,
            tokens=tokens,
            ssl_context=client_context(account.ca_file),
            max_concurrency=max_concurrency,
        )
        self._origin = URL(account.endpoints.graph).origin()
        self._page_size = page_size
        self._workers = asyncio.Semaphore(workers)
        self._retry_base = config.poll_interval if retry_base is None else retry_base
        self._max_size = config.max_size or MAX_MESSAGE_SIZE
        self._metrics = metrics or Metrics()  # the relay's, or one nobody reads
        self._store: ImportState | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._waiters: list[asyncio.Future[RoundReport]] = []  # for the next round
        self._serving: list[asyncio.Future[RoundReport]] = []  # for the round in progress
        self._folders: dict[str, str] = {}  # folder path -> id, found or made this run
        self._folder_lock = asyncio.Lock()

    def __repr__(self) -> str:
        c = self.config
        last = f" last: {self.last}" if self.last else ""
        return (
            f"<Importer {c.name} {c.mailbox}/{c.folder} -> {self._sink.kind}"
            f" {self.state.value} rounds={self.rounds}{last}>"
        )

    @property
    def source(self) -> str:
        """What the state's delta link belongs to: Graph's host, the mailbox and the folder."""
        return f"{self._origin}/{self.config.mailbox.lower()}/{self.config.folder.lower()}"

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state and the sink (raising if they cannot be), then poll in the background."""
        if self.state is not ImporterState.NEW:
            raise RuntimeError(
                f"importer {self.config.name} is {self.state.value}; it starts only once"
            )
        self.state = ImporterState.RUNNING
        try:
            self._store = await ImportState.open(self.state_path, source=self.source)
            await self._sink.open()
        except BaseException:
            self.state = ImporterState.STOPPED
            await self._close()
            raise
        self._task = asyncio.create_task(self._loop(), name=f"inbound {self.config.name}")

    async def stop(self, grace: float = 30.0) -> None:
        """Finish the messages in flight (within `grace` seconds, then cancel them), start no
        others, and close. Safe to call again: a second call (after the first was cancelled,
        say) does what is left, with its own grace."""
        self.state = ImporterState.STOPPED
        self._stopping.set()
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=grace)
            if not task.done():
                log.warning(
                    "inbound %s: stopping: messages in flight cancelled; they are imported"
                    " on the next start",
                    self.config.name,
                )
                task.cancel()
                await asyncio.wait({task})
        for waiter in (*self._serving, *self._waiters):
            if not waiter.done():
                waiter.set_exception(RuntimeError(f"importer {self.config.name} stopped"))
        await self._close()

    async def _close(self) -> None:
        closers: list[Callable[[], Awaitable[None]]] = [self._sink.aclose, self._graph.aclose]
        if self._store is not None:
            closers.append(self._store.aclose)
        for close in closers:
            try:
                await close()
            except Exception:
                log.exception("inbound %s: error while closing; going on", self.config.name)

    def poll(self) -> asyncio.Future[RoundReport]:
        """Ask for a round now; the future gives the report of the first round that starts
        after this call (the one in progress, if any, is finished first)."""
        if self.state is not ImporterState.RUNNING:
            raise RuntimeError(f"importer {self.config.name} is {self.state.value}")
        waiter: asyncio.Future[RoundReport] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            self._serving, self._waiters = self._waiters, []
            self._wake.clear()
            report = await self._guarded_round()
            self.rounds += 1
            self.last = report
            for waiter in self._serving:
                if not waiter.done():
                    waiter.set_result(report)
            self._serving = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_interval):
                    await self._wake.wait()

    async def _guarded_round(self) -> RoundReport:
        report = RoundReport(Counter())
        try:
            await self._round(report)
        except DeliveryError as failed:
            report.error = failed.reply.one_line()
            log.warning("inbound %s: round ended early: %s", self.config.name, report.error)
        except Exception as exc:  # the loop must outlive any one round
            report.error = f"{type(exc).__name__}: {exc}"
            log.exception("inbound %s: round failed", self.config.name)
        if any(report.counts.values()) or report.error:
            log.info("inbound %s: round: %s", self.config.name, report)
        return report

    # -- a round ---------------------------------------------------------------------------------

    async def _round(self, report: RoundReport) -> None:
        store = self._require_store()
        synced: tuple[str, set[str] | None] | None = None
        failure: DeliveryError | None = None
        async with asyncio.TaskGroup() as tasks:

            async def spawn(work: _Work) -> None:
                await self._workers.acquire()
                if self._stopping.is_set():  # stopped while waiting for a worker
                    self._workers.release()
                    return
                tasks.create_task(self._counted(work, report))

            for record in await store.due(time.time()):
                if self._stopping.is_set():
                    break
                await spawn(functools.partial(self._retry, record))
            try:
                synced = await self._sync(spawn, report)
            except DeliveryError as failed:
                failure = failed  # raised once the messages in flight are done
        if failure is not None:
            raise failure
        if synced is None:
            return
        delta_link, listed = synced
        if listed is not None:
            await store.sweep(listed)
        await store.set_delta_link(delta_link)

    async def _counted(self, work: _Work, report: RoundReport) -> None:
        try:
            report.counts[await work()] += 1
        finally:
            self._workers.release()

    async def _sync(
        self, spawn: Callable[[_Work], Awaitable[None]], report: RoundReport
    ) -> tuple[str, set[str] | None] | None:
        """Walk the delta pages, handing new messages to `spawn`. Gives the new delta link and,
        after a full listing, every id listed; None when stopped halfway."""
        store = self._require_store()
        link = store.delta_link
        if link is None:
            link = await self._initial_link()
            report.full = True
        listed: set[str] = set()
        relisted = False
        while not self._stopping.is_set():
            answer = await self._graph.request(
                "GET", self._checked(link), headers={"Prefer": self._prefer}
            )
            if (delta_gone(answer) or answer.status == 404) and not relisted:
                # 404: the folder is gone, or was deleted and made again under a new id.
                log.warning(
                    "inbound %s: Graph lost the delta state (%s); listing the folder again",
                    self.config.name,
                    answer.describe(),
                )
                relisted = report.full = True
                listed.clear()
                self._folders.clear()
                link = await self._initial_link()
                continue
            if not answer.ok:
                raise trouble(answer)
            page = answer.json()
            items = page.get("value")
            if not isinstance(items, list):
                raise TemporaryFailure(Reply(451, "4.3.0", "Graph's delta page has no value"))
            await self._page(items, spawn, report, listed)
            if self._stopping.is_set():
                return None  # the page was cut short: its delta link must not be saved
            next_link, delta_link = page.get("@odata.nextLink"), page.get("@odata.deltaLink")
            if isinstance(next_link, str):
                link = next_link
            elif isinstance(delta_link, str):
                return delta_link, listed if report.full else None
            else:
                raise TemporaryFailure(
                    Reply(451, "4.3.0", "Graph's delta page has neither a next nor a delta link")
                )
        return None

    async def _page(
        self,
        items: list[object],
        spawn: Callable[[_Work], Awaitable[None]],
        report: RoundReport,
        listed: set[str],
    ) -> None:
        store = self._require_store()
        removed: list[str] = []
        found: list[Incoming] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            if "@removed" in item:
                removed.append(str(item.get("id", "")))
            elif (message := incoming(item)) is not None:
                found.append(message)
        await store.forget(removed)
        listed.update(m.id for m in found)
        known = await store.known([m.id for m in found])
        for message in found:
            if message.id in known:
                continue
            reason = unwanted(self.config, message)
            if reason is not None:
                report.counts[Outcome.FILTERED] += 1
                log.debug("inbound %s: left %s: %s", self.config.name, _label(message), reason)
                continue
            if self._stopping.is_set():
                return
            await spawn(functools.partial(self._import, message))

    # -- one message -------------------------------------------------------------------------------

    async def _retry(self, record: Record) -> Outcome:
        if record.stage is Stage.DELIVERED:
            return await self._finish(record.message, record.attempts)
        return await self._import(record.message, record.attempts)

    async def _import(self, message: Incoming, attempts: int = 0) -> Outcome:
        try:
            mime = await self._fetch(message)
        except _Gone:
            return await self._gone(message)
        except AnswerTooLarge as big:
            return await self._quarantine(
                message, f"larger than max_size ({big.size} > {big.limit} bytes)"
            )
        except DeliveryError as failed:
            return await self._defer(message, Stage.PENDING, attempts, failed)
        problem = malformed(mime)
        if problem is not None:
            return await self._quarantine(message, f"malformed: {problem}")
        try:
            await self._sink.put(message, mime)
        except PermanentFailure as refused:
            return await self._quarantine(message, f"refused: {refused.reply.one_line()}")
        except TemporaryFailure as failed:
            return await self._defer(message, Stage.PENDING, attempts, failed)
        await self._require_store().put(Record(message=message, stage=Stage.DELIVERED))
        return await self._finish(message, 0)

    async def _finish(self, message: Incoming, attempts: int) -> Outcome:
        try:
            await self._sink.commit(message)
            await self._after(message)
        except DeliveryError as failed:
            return await self._defer(message, Stage.DELIVERED, attempts, failed)
        await self._require_store().put(Record(message=message, stage=Stage.DONE))
        self._metrics.imported(self.config.mailbox)
        log.info(
            "inbound %s: imported %s from=<%s> into %s",
            self.config.name,
            _label(message),
            message.sender,
            self._sink.kind,
        )
        return Outcome.IMPORTED

    async def _fetch(self, message: Incoming) -> bytes:
        answer = await self._graph.request(
            "GET", self._message_url(message, "/$value"), max_body=self._max_size
        )
        if answer.status == 404:
            raise _Gone
        if not answer.ok:
            raise trouble(answer)
        return answer.body

    async def _after(self, message: Incoming) -> None:
        """The `after:` action; a message already gone (404) counts as done."""
        url = self._message_url(message)
        after = self.config.after
        if after is AfterImport.MARK_READ:
            answer = await self._graph.request("PATCH", url, b'{"isRead": true}', JSON)
        elif after is AfterImport.DELETE:
            answer = await self._graph.request("DELETE", url)
        else:
            assert self.config.move_to is not None
            destination = await self._folder_id(self.config.move_to, create=True)
            body = json.dumps({"destinationId": destination}).encode()
            answer = await self._graph.request("POST", url + "/move", body, JSON)
        if not answer.ok and answer.status != 404:
            raise trouble(answer)

    async def _defer(
        self, message: Incoming, stage: Stage, attempts: int, failed: DeliveryError
    ) -> Outcome:
        attempts += 1
        delay = retry_delay(self._retry_base, attempts, failed.retry_after)
        reason = failed.reply.one_line()
        await self._require_store().put(
            Record(
                message=message,
                stage=stage,
                attempts=attempts,
                next_try=time.time() + delay,
                reason=reason,
            )
        )
        step = "delivery" if stage is Stage.PENDING else "after: action"
        log.warning(
            "inbound %s: %s of %s deferred (attempt %d, next in %.0fs): %s",
            self.config.name,
            step,
            _label(message),
            attempts,
            delay,
            reason,
        )
        return Outcome.DEFERRED

    async def _quarantine(self, message: Incoming, reason: str) -> Outcome:
        await self._require_store().put(
            Record(message=message, stage=Stage.QUARANTINED, reason=reason)
        )
        log.warning(
            "inbound %s: quarantined %s from=<%s> subject=%r: %s; it stays in the mailbox",
            self.config.name,
            _label(message),
            message.sender,
            message.subject,
            reason,
        )
        return Outcome.QUARANTINED

    async def _gone(self, message: Incoming) -> Outcome:
        await self._require_store().put(Record(message=message, stage=Stage.GONE))
        log.info(
            "inbound %s: %s was removed from the folder before it was imported",
            self.config.name,
            _label(message),
        )
        return Outcome.GONE

    # -- Graph URLs and folders -----------------------------------------------------------------

    @property
    def _prefer(self) -> str:
        return f"odata.maxpagesize={self._page_size}"

    def _message_url(self, message: Incoming, suffix: str = "") -> str:
        return f"{self._graph.user_url}/messages/{quote(message.id, safe='')}{suffix}"

    def _checked(self, link: str) -> str:
        """A link Graph gave (next, delta) is followed verbatim, but only to Graph itself:
        the request carries the mailbox's token."""
        if URL(link).origin() != self._origin:
            raise TemporaryFailure(
                Reply(451, "4.3.0", f"Graph gave a link to another host: {URL(link).host}")
            )
        return link

    async def _initial_link(self) -> str:
        folder = await self._folder_id(self.config.folder, create=False)
        return (
            f"{self._graph.user_url}/mailFolders/{quote(folder, safe='')}/messages/delta"
            f"?$select={SELECT}"
        )

    async def _folder_id(self, path: str, *, create: bool) -> str:
        """A folder's id (or well-known name): `Inbox/Imported` is the child Imported of the
        top-level Inbox. With `create`, missing folders are made."""
        if path.lower() in WELL_KNOWN_FOLDERS:
            return path.lower()
        async with self._folder_lock:  # the first messages of a round all ask at once
            if path not in self._folders:
                parent = "msgfolderroot"
                for name in (p for p in path.split("/") if p):
                    parent = await self._child_folder(parent, name, create=create)
                self._folders[path] = parent
            return self._folders[path]

    async def _child_folder(self, parent: str, name: str, *, create: bool) -> str:
        url = f"{self._graph.user_url}/mailFolders/{quote(parent, safe='')}/childFolders"
        for _ in range(2):  # a folder someone else made meanwhile is found the second time
            query = "displayName eq '" + name.replace("'", "''") + "'"
            answer = await self._graph.request("GET", str(URL(url).with_query({"$filter": query})))
            if not answer.ok:
                raise trouble(answer)
            found = answer.json().get("value")
            if isinstance(found, list) and found and isinstance(found[0], dict):
                folder_id = found[0].get("id")
                if isinstance(folder_id, str):
                    return folder_id
            if not create:
                raise TemporaryFailure(
                    Reply(451, "4.3.0", f"no folder {name!r} in {self.config.mailbox}")
                )
            body = json.dumps({"displayName": name}).encode()
            made = await self._graph.request("POST", url, body, JSON)
            if made.ok:
                log.info("inbound %s: made folder %s", self.config.name, name)
                return made.field("id")
            if made.code != "ErrorFolderExists":
                raise trouble(made)
        raise TemporaryFailure(Reply(451, "4.3.0", f"folder {name!r} exists but cannot be found"))

    def _require_store(self) -> ImportState:
        if self._store is None:
            raise RuntimeError(f"importer {self.config.name} is not started")
        return self._store


def build_importers(
    config: Config,
    tokens: Mapping[str, TokenProvider],
    *,
    metrics: Metrics | None = None,
    state_dir: Path | None = None,
) -> list[Importer]:
    """One importer per `inbound:` entry, with its state in `state_dir` (default: the spool
    path's `inbound/`) as `NAME.sqlite3`, counting into `metrics`. Imports of one mailbox share
    Graph's 4 requests."""
    directory = state_dir if state_dir is not None else config.spool.path / "inbound"
    per_mailbox = Counter(entry.mailbox.lower() for entry in config.inbound)
    return [
        Importer(
            entry,
            account=config.accounts[entry.account],
            tokens=tokens[entry.account],
            state_path=directory / f"{entry.name}.sqlite3",
            max_concurrency=max(1, GRAPH_CONCURRENCY // per_mailbox[entry.mailbox.lower()]),
            metrics=metrics,
        )
        for entry in config.inbound
    ]
