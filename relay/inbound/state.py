"""What one inbound import remembers: its folder's delta link and what became of each message.

One SQLite database per `inbound:` entry, under the spool path (`inbound/NAME.sqlite3`), in WAL
mode with `synchronous=FULL`: a write has returned only once it is on disk.

    meta(key, value)             "delta_link": where the next delta round starts;
                                 "source": the Graph host, mailbox and folder the link
                                 belongs to (another one drops the link)
    messages(id, stage, ...)     one row per message that needs remembering, by Graph id

Stages of a row (a message without a row is new, or was filtered out):

    pending      the sink did not take it yet (Graph or the sink failed for now): retried at
                 `next_try`, with the message fetched again
    delivered    the sink holds it; the sink's commit and the `after:` action are still to do
    done         delivered and the `after:` action applied (or the message was gone by then)
    quarantined  malformed, too big, or refused for good by the sink: left in the mailbox,
                 never tried again
    gone         removed from the folder before it could be imported

Rows of the last three stages are forgotten when the message leaves the folder (a delta round
reports it removed, or a full resync no longer lists it).

Writes are group-committed: callers queue their writes and wait; one committer runs everything
queued in one transaction in the database's own thread, so concurrent messages share a sync.
A write whose caller was cancelled still happens. SQLite errors become `SpoolError`.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

from relay.errors import SpoolError
from relay.inbound.sinks import Incoming

T = TypeVar("T")

SCHEMA = """
create table if not exists meta (key text primary key, value text not null);
create table if not exists messages (
    id text primary key,
    stage text not null,
    received text not null,
    internet_message_id text not null,
    sender text not null,
    subject text not null,
    attempts integer not null,
    next_try real not null,
    reason text not null,
    updated real not null
);
create index if not exists messages_stage on messages (stage, next_try);
"""


class Stage(Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DONE = "done"
    QUARANTINED = "quarantined"
    GONE = "gone"


FINAL = frozenset({Stage.DONE, Stage.QUARANTINED, Stage.GONE})
_FINAL_VALUES = tuple(s.value for s in FINAL)


@dataclass(frozen=True, kw_only=True)
class Record:
    message: Incoming
    stage: Stage
    attempts: int = 0  # failed tries so far
    next_try: float = 0.0  # seconds since the epoch
    reason: str = ""  # the last failure, or why it was quarantined


_Write = Callable[[sqlite3.Connection], None]


class ImportState:
    def __init__(self, path: Path, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self.delta_link: str | None = None
        self._executor = executor
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[_Write, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        link = "set" if self.delta_link else "none"
        return f"<ImportState {self.path.name} delta_link={link} queued={len(self._queue)}>"

    @classmethod
    async def open(cls, path: Path, *, source: str) -> ImportState:
        """Open (or create) the database; a delta link of another `source` is dropped."""
        state = cls(path, ThreadPoolExecutor(1, thread_name_prefix=f"inbound-{path.stem}"))
        try:
            await state._run(lambda: state._open(source))
        except BaseException:
            state._executor.shutdown(wait=False)
            raise
        return state

    def _open(self, source: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("pragma journal_mode=wal")
            db.execute("pragma synchronous=full")
            db.executescript(SCHEMA)
            meta = dict(db.execute("select key, value from meta").fetchall())
            if meta.get("source") != source:
                db.execute("begin immediate")
                db.execute("delete from meta where key = 'delta_link'")
                db.execute("insert or replace into meta values ('source', ?)", (source,))
                db.execute("commit")
                meta.pop("delta_link", None)
        except BaseException:
            db.close()
            raise
        self._db = db
        self.delta_link = meta.get("delta_link")

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._committer is not None:
            await asyncio.shield(self._committer)
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._closed = True
        self._executor.shutdown(wait=False)

    # -- reads ---------------------------------------------------------------------------------

    async def known(self, ids: Collection[str]) -> set[str]:
        """Which of `ids` have a row."""
        if not ids:
            return set()

        def read() -> set[str]:
            marks = ",".join("?" * len(ids))
            rows = self._conn().execute(f"select id from messages where id in ({marks})", [*ids])
            return {row[0] for row in rows}

        return await self._run(read)

    async def due(self, now: float) -> list[Record]:
        """Pending and delivered rows whose next try has come, oldest first."""

        def read() -> list[Record]:
            rows = self._conn().execute(
                "select id, stage, received, internet_message_id, sender, subject, attempts,"
                " next_try, reason from messages where stage in (?, ?) and next_try <= ?"
                " order by received",
                (Stage.PENDING.value, Stage.DELIVERED.value, now),
            )
            return [_record(row) for row in rows]

        return await self._run(read)

    async def counts(self) -> dict[Stage, int]:
        def read() -> dict[Stage, int]:
            rows = self._conn().execute("select stage, count(*) from messages group by stage")
            return {Stage(stage): n for stage, n in rows}

        return await self._run(read)

    async def record(self, id: str) -> Record | None:
        def read() -> Record | None:
            row = (
                self._conn()
                .execute(
                    "select id, stage, received, internet_message_id, sender, subject, attempts,"
                    " next_try, reason from messages where id = ?",
                    (id,),
                )
                .fetchone()
            )
            return _record(row) if row else None

        return await self._run(read)

    # -- writes (group-committed) --------------------------------------------------------------

    async def put(self, record: Record) -> None:
        m = record.message
        row = (m.id, record.stage.value, m.received, m.internet_message_id, m.sender, m.subject,
               record.attempts, record.next_try, record.reason, time.time())  # fmt: skip
        await self._write(
            lambda db: db.execute(
                "insert or replace into messages values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
            )
        )

    async def set_delta_link(self, link: str | None) -> None:
        def write(db: sqlite3.Connection) -> None:
            if link is None:
                db.execute("delete from meta where key = 'delta_link'")
            else:
                db.execute("insert or replace into meta values ('delta_link', ?)", (link,))

        await self._write(write)
        self.delta_link = link

    async def forget(self, ids: Iterable[str]) -> None:
        """Drop the final rows of messages that left the folder (pending ones find out alone)."""
        gone = [(i,) for i in ids]
        if gone:
            await self._write(
                lambda db: db.executemany(
                    "delete from messages where id = ? and stage in (?, ?, ?)",
                    [(*g, *_FINAL_VALUES) for g in gone],
                )
            )

    async def sweep(self, listed: Collection[str]) -> int:
        """After a full listing of the folder: drop the final rows of messages not in it."""
        rows = await self._run(
            lambda: (
                self._conn()
                .execute("select id from messages where stage in (?, ?, ?)", _FINAL_VALUES)
                .fetchall()
            )
        )
        stale = [row[0] for row in rows if row[0] not in listed]
        await self.forget(stale)
        return len(stale)

    async def _write(self, write: _Write) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit())
        await future

    async def _commit(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self._run(functools.partial(self._apply, [w for w, _ in batch]))
                except Exception as failed:  # each waiting writer gets the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failed)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._committer = None

    def _apply(self, writes: list[_Write]) -> None:
        db = self._conn()
        db.execute("begin immediate")
        try:
            for write in writes:
                write(db)
        except BaseException:
            db.execute("rollback")
            raise
        db.execute("commit")

    # -- the thread ----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "opened in open()"
        return self._db

    async def _run(self, call: Callable[[], T]) -> T:
        """`call` in the database's thread; SQLite's errors as SpoolError."""
        if self._closed:
            raise SpoolError(f"inbound state {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as exc:
            raise SpoolError(f"inbound state {self.path}: {exc}") from None
        except OSError as exc:
            raise SpoolError(f"inbound state {self.path}: {exc.strerror}") from None


def _record(row: tuple[str, str, str, str, str, str, int, float, str]) -> Record:
    id, stage, received, imid, sender, subject, attempts, next_try, reason = row
    return Record(
        message=Incoming(
            id=id, received=received, internet_message_id=imid, sender=sender, subject=subject
        ),
        stage=Stage(stage),
        attempts=attempts,
        next_try=next_try,
        reason=reason,
    )
