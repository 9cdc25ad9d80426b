"""The durable queue: every accepted message on local disk until it leaves for good.

Takes from the listener an `Envelope` and the message bytes (`Spool.enqueue`) and returns a queue
id only once both are on disk and synced. Gives the scheduler claimable messages (`ready`,
`on_ready`, `claim`, `read`) and records each attempt's outcome (`delivered`, `defer`, `dead`).
`QueueAdmin` is the operators' side (`relay queue list|show|retry|hold|delete|bounce`); it works
on the files directly and is safe while `relay serve` runs. The spool knows nothing about Exchange.

Layout: a state is a directory, and a transition is one atomic rename.

    PATH/lock                   flock'ed by the one process serving this spool
    PATH/incoming/N.journal     intake journal segments (and ID.tmp files being materialised)
    PATH/queue/ID               ready for delivery now
    PATH/active/ID              claimed by a delivery attempt
    PATH/deferred/ID            waiting for its next attempt
    PATH/hold/ID                parked by an operator
    PATH/dead/ID                given up on, with the reason
    PATH/corrupt/NAME           unreadable; kept for a human, never delivered

Intake (group commit). `enqueue` puts the message on a list and waits. One committer task takes
everything on the list, appends it to the current journal segment as checksummed frames in one
write, and calls fdatasync once for the whole batch; only then do the callers' `enqueue` calls
return. While one batch is being synced, the next one gathers, so the cost of a sync is shared by
every session that is waiting (about 3,000 syncs/s on the reference machine, against 600-770
for a file per message with a synced rename). The journal belongs to the event loop: the write
goes to the page cache from the loop, and on Linux the fdatasync runs in the kernel through AIO
(`relay.fdsync`) and reports back on an eventfd, so no thread and no GIL hand-off stands between
the sync and the 250s. Elsewhere, and for `Disk` test doubles, write and sync run on a spool
thread. Appends and checkpoints take turns; a new segment, deleting old segments and cutting a
failed write run on the spool's threads.

Large messages skip the journal. A client message of DIRECT_BYTES or more gets its own file(s)
at once, the way materialisation writes them (incoming/ID.tmp, sync, rename into queue/, sync
queue/), on a spool thread, before its 250. Its bytes are written once instead of twice, and its
sync never sits in front of the group commits that small messages wait for. If the client goes
away before the 250, the files are removed again once written.

Materialisation, off the critical path. A second task writes each committed message to its own
file (incoming/ID.tmp), makes a chunk of such files durable with one batch sync (`Disk.sync_batch`:
syncfs(2) on Linux, one journal commit instead of one per file), renames them into queue/ (so a
file in queue/ is never torn), syncs queue/ once per batch, then appends a checkpoint frame naming
those ids to the journal and syncs it. Only then does the message become claimable (`on_ready`).
It works a chunk at a time and holds each chunk back while a burst of intake goes on (until
INTAKE_QUIET passes without a commit, the oldest waiting message is MATERIALISE_DELAY old, or
half of `max_backlog` is used): its file creations and syncs would otherwise compete with the
journal syncs that the 250s wait for, and the journal holds the mail meanwhile. So under
sustained intake a message becomes claimable up to MATERIALISE_DELAY after its 250.

The checkpoint is what keeps a journal that is replayed after a crash from bringing back a
message that was already delivered and removed: recovery replays only records that no
checkpoint names and whose file exists in no state. A segment is deleted (and
incoming/ synced) once every intake record in it is checkpointed and all older segments are gone.
If an `enqueue` is cancelled after its batch was written (the client went away before a 250),
the record is checkpointed without being materialised, so the message is never delivered.

Message file. One file per message, made of frames. Each frame is
`magic "RLY1", kind, header length, data length, crc32(data), crc32(everything before + header)`,
then a JSON header, then the data. The first frame (kind M) holds the id, the envelope and the
message bytes, exactly as it was journaled. Each later frame (kind R) is the whole per-message
record: attempts, next attempt, last reply, per-recipient outcomes, and the reason for dead
ones; the last valid one wins, and a torn one at the end is ignored (and cut off when the file is
next written). A journal segment is a run of M frames and C (checkpoint) frames; reading stops
at the first frame that is short or fails its checksum, so a torn tail is never handed out. A new
segment is filled with zeros first (where no frame can start), so that appending a batch
overwrites blocks the file system has already allocated and its fdatasync commits no metadata.

Recovery, a startup step of `Spool.open` (which also takes the lock): leftover .tmp files are
removed (each is an incomplete copy of a journal record); un-checkpointed journal records are
materialised into queue/ and the old segments deleted; files in active/ go back to queue/; files
that cannot be read (bad name, bad frame, bad header) go to corrupt/; torn record tails are cut.
At open a message file's structure and header checksums are verified; its data checksum is
verified whenever the message is read, and a mismatch moves it to corrupt/ too.

Operators and the running server. `QueueAdmin` renames files between queue/, deferred/, hold/
and dead/ (and unlinks them), records a held message's end in it before moving it to dead/, and
writes new messages (bounces) into queue/ the way materialisation does; it refuses to touch
active/ files, the only ones the server writes. The server learns of such changes by a periodic
`rescan` (every `rescan_interval` seconds, only directory listings unless something changed),
and `claim` follows a message an operator moved from deferred/ to queue/. A message in queue/
is due now; one in deferred/ at `next_attempt`.

Ids: 14 hex digits of microseconds since the epoch and 8 random hex digits, so they sort by
arrival and do not repeat across restarts. Every id is checked (`check_id`) before it becomes
part of a path.

Failures: no space or quota (ENOSPC, EDQUOT) raises `SpoolFull`, any other I/O problem or an
unreadable message `SpoolError`. A failed journal write is cut off again (ftruncate + fdatasync)
before the next batch, so its messages are never delivered. A failed materialisation is retried
with backoff while the journal keeps the messages; enqueue waits while more than `max_backlog`
bytes are journaled but not materialised, and raises the materialisation's error instead while
that keeps failing. Blocking file I/O runs in worker threads; `Disk` is the seam for the calls
that write (tests pass one that fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import random
import re
import secrets
import struct
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import IO, Any, TypeVar

from relay.errors import SpoolError, SpoolFull
from relay.fdsync import LoopSync

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SEGMENT_BYTES = 4 * MiB  # start a new journal segment after this many bytes
MAX_BACKLOG = 64 * MiB  # enqueue waits while this much is journaled but not yet materialised
RESCAN_INTERVAL = 5.0  # seconds between looks for operators' changes
INTAKE_QUIET = 0.02  # seconds without a commit that end a burst of intake
MATERIALISE_DELAY = 5.0  # the longest a burst holds back materialisation (and so delivery)
MATERIALISE_CHUNK = 256  # files written (and open) before one batch sync covers them
IO_THREADS = 4  # the spool's own threads for file work (commits, materialising, claims)
LOOP_WRITE_MAX = 256 * 1024  # larger intake batches are framed and written on a spool thread
DIRECT_BYTES = MiB  # a client message this big skips the journal: its own files at once

T = TypeVar("T")

_QID = re.compile(r"[0-9A-F]{22}")
_SEGMENT = re.compile(r"([0-9]{12})\.journal")
_MAGIC = b"RLY1"
_PREFIX = struct.Struct(">4scIQI")  # magic, kind, header length, data length, crc32(data)
_HCRC = struct.Struct(">I")  # crc32(prefix + header)
_HEAD = _PREFIX.size + _HCRC.size
_MAX_HEADER = 16 * MiB
_MESSAGE, _RECORD, _CHECKPOINT = b"M", b"R", b"C"


class State(Enum):
    INCOMING = "incoming"
    QUEUE = "queue"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    DEAD = "dead"
    CORRUPT = "corrupt"


_FILE_STATES = (State.QUEUE, State.ACTIVE, State.DEFERRED, State.HOLD, State.DEAD)
_WATCHED = (State.QUEUE, State.DEFERRED, State.HOLD, State.DEAD)  # what operators may change
_CLAIMABLE = (State.QUEUE, State.DEFERRED)


class Outcome(Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Envelope:
    """What the listener decided about one message."""

    mail_from: str  # "" for the null sender
    rcpt_tos: tuple[str, ...]
    route: str  # route name
    client: str  # client IP
    user: str | None = None  # authenticated local user
    smtputf8: bool = False
    received_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Recipient:
    address: str
    outcome: Outcome = Outcome.PENDING
    reply: str = ""  # the upstream's reply for a failed recipient


@dataclass(frozen=True, kw_only=True)
class QueueEntry:
    """One message's envelope and record, in the state it was last seen in."""

    qid: str
    state: State
    envelope: Envelope
    size: int  # bytes of the message
    recipients: tuple[Recipient, ...]  # one per distinct envelope recipient, in order
    attempts: int = 0  # attempts that ended in `defer` or `dead`
    next_attempt: float = 0.0  # when it is due; for a message in queue/, its arrival (now)
    last_reply: str = ""
    reason: str = ""  # why a dead message is dead

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.outcome is Outcome.PENDING)

    def to_json(self) -> dict[str, Any]:
        """The form `relay queue list|show` prints, one JSON object per message."""
        return {
            "qid": self.qid,
            "state": self.state.value,
            "size": self.size,
            **asdict(self.envelope),
            **_record_json(self),
        }


class Disk:
    """The system calls that put bytes on disk. Tests pass a subclass that fails (ENOSPC, EIO)."""

    # Whether the journal may sync through Linux AIO in the loop (relay.fdsync) instead of
    # calling `datasync` on a spool thread. A subclass that intercepts the calls (and may block
    # in them) turns it off, and then gets every journal write and sync on a thread.
    loop_sync = True

    def open(self, path: Path, flags: int) -> int:
        return os.open(path, flags, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def sync(self, fd: int) -> None:
        os.fsync(fd)

    def datasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def sync_batch(self, fds: Sequence[int]) -> None:
        """Make every file in `fds` durable (all on one filesystem).

        Where the platform has syncfs(2), one call does it: a single journal commit for the
        whole batch instead of one per file (about 4x cheaper for 2 KB files on ext4). It
        reports write-back errors since Linux 5.8. Elsewhere, one fsync per file.
        """
        if _SYNCFS is None:
            for fd in fds:
                self.sync(fd)
        elif fds and _SYNCFS(fds[0]) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs  # a CDLL call releases the GIL
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


_SYNCFS = _load_syncfs() if sys.platform == "linux" else None
# An id's random part keeps ids apart across restarts (a clock set back); it needs to be
# unpredictable to nobody, so a generator seeded once from os.urandom does, without the system
# call per message that `secrets` makes.
_RANDOM = random.Random()


def _make_id(us: int) -> str:
    """A queue id for a message that arrived `us` microseconds after the epoch."""
    return f"{us:014X}{_RANDOM.getrandbits(32):08X}"


def check_id(qid: object) -> str:
    """Return `qid` if it is a well-formed queue id, else raise SpoolError (before any path)."""
    if not isinstance(qid, str) or not _QID.fullmatch(qid):
        raise SpoolError(f"not a queue id: {qid!r}")
    return qid


class _Unreadable(SpoolError):
    """A message or journal file that does not parse; it goes to corrupt/."""


@contextlib.contextmanager
def _io(doing: str) -> Iterator[None]:
    """Map OSError to SpoolFull (no space, quota) or SpoolError, saying what failed."""
    try:
        yield
    except OSError as exc:
        kind = SpoolFull if exc.errno in (errno.ENOSPC, errno.EDQUOT) else SpoolError
        raise kind(f"{doing}: {exc.strerror or exc}") from exc


# Frames ------------------------------------------------------------------------------------


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps makes one per call


def _json(header: Mapping[str, Any]) -> bytes:
    return _ENCODE(header).encode()


def _frame(kind: bytes, head: bytes, data: bytes = b"") -> bytes:
    prefix = _PREFIX.pack(_MAGIC, kind, len(head), len(data), zlib.crc32(data))
    return b"".join((prefix, _HCRC.pack(zlib.crc32(head, zlib.crc32(prefix))), head, data))


@dataclass(frozen=True)
class _Frame:
    kind: bytes
    header: dict[str, Any]
    start: int
    data_start: int
    end: int
    data_crc: int


def _crc(f: IO[bytes], size: int) -> int:
    crc = 0
    while size > 0:
        chunk = f.read(min(size, MiB))
        if not chunk:
            return -1
        crc = zlib.crc32(chunk, crc)
        size -= len(chunk)
    return crc


def _scan(f: IO[bytes], *, check_data: bool) -> tuple[list[_Frame], int]:
    """The frames of `f` up to the first short or damaged one, and where the good part ends."""
    size = os.fstat(f.fileno()).st_size
    frames: list[_Frame] = []
    pos = 0
    while True:
        f.seek(pos)
        head = f.read(_HEAD)
        if len(head) < _HEAD:
            break
        magic, kind, hlen, dlen, dcrc = _PREFIX.unpack_from(head)
        (hcrc,) = _HCRC.unpack_from(head, _PREFIX.size)
        if magic != _MAGIC or hlen > _MAX_HEADER:
            break
        raw = f.read(hlen)
        if len(raw) < hlen or zlib.crc32(raw, zlib.crc32(head[: _PREFIX.size])) != hcrc:
            break
        start = pos + _HEAD + hlen
        if start + dlen > size or (check_data and _crc(f, dlen) != dcrc):
            break
        try:
            header = json.loads(raw)
        except ValueError:
            break
        if not isinstance(header, dict):
            break
        frames.append(_Frame(kind, header, pos, start, start + dlen, dcrc))
        pos = start + dlen
    return frames, pos


def _zeros(f: IO[bytes], start: int, end: int) -> bool:
    """Whether bytes start..end of `f` are all zero."""
    f.seek(start)
    while start < end:
        chunk = f.read(min(end - start, MiB))
        if not chunk or chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True


# Records -----------------------------------------------------------------------------------


def _message_header(qid: str, envelope: Envelope) -> dict[str, Any]:
    return {"id": qid, "envelope": envelope.__dict__}  # asdict's deep copy is not needed here


def _record_json(entry: QueueEntry) -> dict[str, Any]:
    return {
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "last_reply": entry.last_reply,
        "recipients": [
            {"address": r.address, "outcome": r.outcome.value, "reply": r.reply}
            for r in entry.recipients
        ],
        "reason": entry.reason,
    }


def _new_entry(qid: str, state: State, envelope: Envelope, size: int) -> QueueEntry:
    return QueueEntry(
        qid=qid,
        state=state,
        envelope=envelope,
        size=size,
        recipients=tuple(Recipient(a) for a in dict.fromkeys(envelope.rcpt_tos)),
        next_attempt=envelope.received_at,
    )


def _decode_entry(qid: str, state: State, frames: Sequence[_Frame]) -> QueueEntry:
    """The entry a message file's frames describe; _Unreadable if they do not make one."""
    first = frames[0] if frames else None
    if first is None or first.kind != _MESSAGE or first.header.get("id") != qid:
        raise _Unreadable(f"{state.value}/{qid}: not a message file")
    try:
        env = first.header["envelope"]
        envelope = Envelope(
            mail_from=str(env["mail_from"]),
            rcpt_tos=tuple(str(r) for r in env["rcpt_tos"]),
            route=str(env["route"]),
            client=str(env["client"]),
            user=None if env["user"] is None else str(env["user"]),
            smtputf8=bool(env["smtputf8"]),
            received_at=float(env["received_at"]),
        )
        entry = _new_entry(qid, state, envelope, first.end - first.data_start)
        records = [f.header for f in frames[1:] if f.kind == _RECORD]
        if not records:
            return entry
        rec = records[-1]
        return replace(
            entry,
            attempts=int(rec["attempts"]),
            # A message in queue/ is due now, even if an operator moved it there from deferred/.
            next_attempt=entry.next_attempt if state is State.QUEUE else float(rec["next_attempt"]),
            last_reply=str(rec["last_reply"]),
            recipients=tuple(
                Recipient(str(r["address"]), Outcome(r["outcome"]), str(r["reply"]))
                for r in rec["recipients"]
            ),
            reason=str(rec["reason"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _Unreadable(f"{state.value}/{qid}: bad record ({exc})") from exc


def _with_outcomes(
    entry: QueueEntry, *, delivered: Iterable[str] = (), failed: Mapping[str, str] | None = None
) -> QueueEntry:
    done, failed = set(delivered), dict(failed or {})
    unknown = (done | failed.keys()) - {r.address for r in entry.recipients}
    if unknown:
        raise ValueError(f"not recipients of {entry.qid}: {sorted(unknown)}")
    return replace(
        entry,
        recipients=tuple(
            Recipient(r.address, Outcome.DELIVERED)
            if r.address in done
            else Recipient(r.address, Outcome.FAILED, failed[r.address])
            if r.address in failed
            else r
            for r in entry.recipients
        ),
    )


# Files -------------------------------------------------------------------------------------


class _Files:
    """Blocking operations on one spool directory, called from worker threads."""

    def __init__(self, root: Path, disk: Disk) -> None:
        self.root = root
        self.disk = disk

    def dir(self, state: State) -> Path:
        return self.root / state.value

    def path(self, state: State, qid: str) -> Path:
        return self.dir(state) / check_id(qid)

    def sync_dir(self, state: State) -> None:
        fd = self.disk.open(self.dir(state), os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.disk.sync(fd)
        finally:
            os.close(fd)

    def make_dirs(self) -> None:
        with _io(f"creating spool directories under {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)
            for state in State:
                self.dir(state).mkdir(exist_ok=True)

    def lock(self) -> int:
        with _io(f"locking spool {self.root}"):
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"spool {self.root} is in use by another relay process") from exc
        return fd

    def write_new(self, path: Path, data: bytes) -> None:
        """Write `data` to a fresh file at `path` and fsync it; remove it again on failure."""
        fd = self.disk.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self.disk.write(fd, data)
            self.disk.sync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        finally:
            os.close(fd)

    def probe(self) -> None:
        """Write, sync and remove a file where intake writes (a crash leaves a .tmp: removed at
        the next start)."""
        path = self.dir(State.INCOMING) / f"probe-{secrets.token_hex(4)}.tmp"  # probes may overlap
        with _io("writing a probe file in incoming/"):
            self.write_new(path, b"probe\n")
            path.unlink()

    def materialise(self, frames: Sequence[tuple[str, bytes]]) -> None:
        """Give each journaled message its own file in queue/, durably: write every file of
        a chunk, make them durable with one batch sync, then rename them into queue/ (so a
        file in queue/ is never torn) and sync queue/ once."""
        with _io("writing messages to queue/"):
            for start in range(0, len(frames), MATERIALISE_CHUNK):
                self._materialise_chunk(frames[start : start + MATERIALISE_CHUNK])
            self.sync_dir(State.QUEUE)

    def _materialise_chunk(self, frames: Sequence[tuple[str, bytes]]) -> None:
        written: list[tuple[str, Path, int]] = []
        try:
            for qid, frame in frames:
                tmp = self.dir(State.INCOMING) / f"{check_id(qid)}.tmp"
                fd = self.disk.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                written.append((qid, tmp, fd))
                self.disk.write(fd, frame)
            self.disk.sync_batch([fd for _, _, fd in written])
        except OSError:
            for _, tmp, _ in written:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise
        finally:
            for _, _, fd in written:
                os.close(fd)
        for qid, tmp, _ in written:
            tmp.rename(self.path(State.QUEUE, qid))

    def load(self, state: State, qid: str) -> tuple[QueueEntry, int, int]:
        """The entry in state/qid, where its good frames end, and its size."""
        with self.path(state, qid).open("rb") as f:
            frames, end = _scan(f, check_data=False)
            size = os.fstat(f.fileno()).st_size
        return _decode_entry(qid, state, frames), end, size

    def find(self, qid: str, states: Sequence[State]) -> QueueEntry | None:
        for state in states:
            with _io(f"reading {state.value}/{qid}"), contextlib.suppress(FileNotFoundError):
                return self.load(state, qid)[0]
        return None

    def read(self, state: State, qid: str) -> bytes:
        with _io(f"reading {state.value}/{qid}"), self.path(state, qid).open("rb") as f:
            frames, _ = _scan(f, check_data=False)
            if frames and frames[0].kind == _MESSAGE:
                f.seek(frames[0].data_start)
                data = f.read(frames[0].end - frames[0].data_start)
                if zlib.crc32(data) == frames[0].data_crc:
                    return data
        self.set_aside(self.path(state, qid))
        raise _Unreadable(f"{state.value}/{qid}: the message does not match its checksum")

    def append_record(self, state: State, entry: QueueEntry) -> None:
        """Append `entry`'s record to its file and sync it, first cutting off a torn tail."""
        frame = _frame(_RECORD, _json(_record_json(entry)))
        with _io(f"updating {state.value}/{entry.qid}"):
            _, end, size = self.load(state, entry.qid)
            fd = self.disk.open(self.path(state, entry.qid), os.O_WRONLY)
            try:
                if size > end:
                    os.ftruncate(fd, end)
                os.lseek(fd, end, os.SEEK_SET)
                self.disk.write(fd, frame)
                self.disk.datasync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
            finally:
                os.close(fd)

    def move(self, qid: str, sources: Sequence[State], dest: State, *, sync: bool) -> State | None:
        """Rename qid from the first of `sources` that has it into `dest`; the state it left."""
        for state in sources:
            with _io(f"moving {state.value}/{qid} to {dest.value}/"):
                try:
                    self.path(state, qid).rename(self.path(dest, qid))
                except FileNotFoundError:
                    continue
                if sync:
                    self.sync_dir(dest)
            return state
        return None

    def remove(self, state: State, qid: str) -> None:
        with _io(f"removing {state.value}/{qid}"):
            self.path(state, qid).unlink()
            self.sync_dir(state)

    def set_aside(self, path: Path) -> None:
        """Move an unreadable file to corrupt/ under a name not yet taken there."""
        target = self.dir(State.CORRUPT) / path.name
        n = 0
        while target.exists():
            n += 1
            target = self.dir(State.CORRUPT) / f"{path.name}.{n}"
        with _io(f"moving {path.name} to corrupt/"):
            path.rename(target)
            self.sync_dir(State.CORRUPT)
        log.warning(
            "spool: %s/%s is unreadable; kept as corrupt/%s",
            path.parent.name,
            path.name,
            target.name,
        )

    def names(self, state: State) -> list[str]:
        with _io(f"listing {state.value}/"):
            return [p.name for p in self.dir(state).iterdir()]

    def listing(self) -> tuple[dict[str, State], int]:
        """Where each message in the operators' states is, and how many files are corrupt."""
        found = {q: s for s in _WATCHED for q in self.names(s) if _QID.fullmatch(q)}
        return found, len(self.names(State.CORRUPT))

    def load_all(self, wanted: Iterable[tuple[str, State]]) -> list[QueueEntry]:
        """Entries for `wanted`, skipping any that moved meanwhile or cannot be read."""
        entries = []
        for qid, state in wanted:
            try:
                entries.append(self.load(state, qid)[0])
            except FileNotFoundError:
                continue
            except _Unreadable as exc:
                log.warning("spool: %s (left for the next start to set aside)", exc)
            except OSError as exc:
                log.warning("spool: cannot read %s/%s: %s", state.value, qid, exc.strerror)
        return entries

    # Recovery ------------------------------------------------------------------------------

    def recover(self) -> tuple[dict[str, QueueEntry], int, int]:
        """Startup: replay the journal, return claimed mail to the queue, set aside the rest.

        Returns the entries by id, the number of corrupt files, and the next segment number.
        """
        with _io(f"recovering spool {self.root}"):
            segments = []
            for name in self.names(State.INCOMING):
                path = self.dir(State.INCOMING) / name
                if name.endswith(".tmp"):
                    path.unlink()
                elif m := _SEGMENT.fullmatch(name):
                    segments.append(int(m.group(1)))
                else:
                    self.set_aside(path)
            segments.sort()
            existing = {n.split(".")[0] for n in self.names(State.CORRUPT)}
            for state in _FILE_STATES:
                for name in self.names(state):
                    if _QID.fullmatch(name):
                        existing.add(name)
                    else:
                        self.set_aside(self.dir(state) / name)
            self._replay(segments, existing)
            for seq in segments:
                self.segment(seq).unlink()
            if segments:
                self.sync_dir(State.INCOMING)
            returned = self.names(State.ACTIVE)
            for qid in returned:
                self.move(qid, (State.ACTIVE,), State.QUEUE, sync=False)
            if returned:
                self.sync_dir(State.QUEUE)
                self.sync_dir(State.ACTIVE)
            entries = {}
            for state in _WATCHED:
                for qid in self.names(state):
                    entry = self._recover_file(state, qid)
                    if entry:
                        entries[qid] = entry
            return entries, len(self.names(State.CORRUPT)), (segments or [0])[-1] + 1

    def segment(self, seq: int) -> Path:
        return self.dir(State.INCOMING) / f"{seq:012d}.journal"

    def _replay(self, segments: Sequence[int], existing: set[str]) -> None:
        checkpointed: set[str] = set()
        todo: dict[int, list[_Frame]] = {}
        for seq in segments:
            with self.segment(seq).open("rb") as f:
                frames, end = _scan(f, check_data=True)
                size = os.fstat(f.fileno()).st_size
                unused = _zeros(f, end, size)  # the part of a segment written in advance
            if end < size and not unused:
                log.warning(
                    "spool: journal segment %s ends in %d bytes of an unfinished write; "
                    "ignored (no enqueue returned for them)",
                    self.segment(seq).name,
                    size - end,
                )
            for frame in frames:
                if frame.kind == _CHECKPOINT:
                    checkpointed.update(str(q) for q in frame.header.get("ids", ()))
                elif frame.kind == _MESSAGE:
                    todo.setdefault(seq, []).append(frame)
        replayed = 0
        for seq, frames in todo.items():  # one segment's worth in memory at a time
            copies = []
            with self.segment(seq).open("rb") as f:
                for frame in frames:
                    qid = frame.header.get("id")
                    if not isinstance(qid, str) or not _QID.fullmatch(qid):
                        continue
                    if qid in checkpointed or qid in existing:
                        continue
                    f.seek(frame.start)
                    copies.append((qid, f.read(frame.end - frame.start)))
                    existing.add(qid)
            if copies:
                self.materialise(copies)
                replayed += len(copies)
        if replayed:
            log.info("spool: recovered %d messages from the intake journal", replayed)

    def _recover_file(self, state: State, qid: str) -> QueueEntry | None:
        path = self.path(state, qid)
        try:
            entry, end, size = self.load(state, qid)
        except _Unreadable:
            self.set_aside(path)
            return None
        if size > end:
            log.warning(
                "spool: %s/%s: cut %d bytes of an unfinished update", state.value, qid, size - end
            )
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, end)
                self.disk.datasync(fd)
            finally:
                os.close(fd)
        return entry


class _Journal:
    """The intake journal: append-only segments in incoming/.

    Owned by the event loop: appends and checkpoints take turns there. Its blocking steps (a
    new segment, deleting old ones, cutting a failed write) run on the spool's threads. The
    batch write and its fdatasync run in the loop with Linux AIO (`relay.fdsync`) where there
    is one, else on a spool thread too.
    """

    def __init__(
        self,
        files: _Files,
        *,
        segment_bytes: int,
        first_seq: int,
        offload: Callable[..., asyncio.Future[Any]],
    ) -> None:
        self._files = files
        self._segment_bytes = segment_bytes
        self._offload = offload
        self._sync: LoopSync | None = None
        self._turn: asyncio.Lock | None = None
        self._seq = first_seq - 1
        self._fd = -1
        self._size = 0
        self._open: dict[int, int] = {}  # segment -> intake records not yet checkpointed
        self._where: dict[str, int] = {}  # qid -> its segment

    def start(self) -> None:
        """Create the first segment (blocking: before the loop uses the journal)."""
        with _io("creating an intake journal segment"):
            self._rotate()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start serving `loop`; sync through Linux AIO when the disk allows it."""
        self._turn = asyncio.Lock()
        self._sync = LoopSync.open(loop) if self._files.disk.loop_sync else None

    async def append(self, frames: Sequence[bytes], ids: Sequence[str]) -> None:
        """Write `frames` (messages `ids`) durably, or not at all."""
        async with self._take_turn():
            await self._write(b"".join(frames))
            self._open[self._seq] += len(ids)
            self._where.update(dict.fromkeys(ids, self._seq))

    async def checkpoint(self, ids: Sequence[str]) -> None:
        """Record durably that `ids` have their own files; drop segments no longer needed."""
        async with self._take_turn():
            await self._write(_frame(_CHECKPOINT, _json({"ids": list(ids)})))
            for qid in ids:
                self._open[self._where.pop(qid)] -= 1
            done = self._finished(keep_current=True)
        if done:
            failed = await self._offload(self._delete, done)
            self._open.update(dict.fromkeys(failed, 0))  # tried again at the next checkpoint

    def detach(self) -> None:
        """Stop serving the loop (in the loop, once nothing is in flight)."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def close(self) -> None:
        """Close the current segment, and delete all segments if nothing in them is pending
        (blocking: after `detach`)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._delete(self._finished(keep_current=False))

    def _take_turn(self) -> asyncio.Lock:
        assert self._turn is not None, "Spool.open() attaches the journal"
        return self._turn

    async def _write(self, data: bytes) -> None:
        with _io("writing the intake journal"):
            if self._fd < 0 or self._size >= self._segment_bytes:
                await self._offload(self._rotate)
            try:
                sync_on_thread = self._sync is None
                if sync_on_thread or len(data) > LOOP_WRITE_MAX:  # the loop must not stall
                    await self._offload(self._write_at, self._fd, data, self._size, sync_on_thread)
                else:
                    self._write_at(self._fd, data, self._size, False)
                if not sync_on_thread:
                    await self._datasync_in_loop()
            except Exception:  # not a cancellation: that only comes at teardown, like a crash
                await self._offload(self._cut)
                raise
        self._size += len(data)

    async def _datasync_in_loop(self) -> None:
        assert self._sync is not None
        try:
            done = self._sync.datasync(self._fd)
        except OSError as exc:  # the kernel refused the request itself: not a disk error
            log.warning(
                "spool: Linux AIO refused the journal's sync (%s); syncing on a thread from now on",
                exc.strerror,
            )
            self.detach()
            await self._offload(self._files.disk.datasync, self._fd)
            return
        await done

    def _write_at(self, fd: int, data: bytes, at: int, sync: bool) -> None:
        os.lseek(fd, at, os.SEEK_SET)
        self._files.disk.write(fd, data)
        if sync:
            self._files.disk.datasync(fd)

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._seq += 1  # a fresh number for every try, so a failed one is never reused
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fd = self._files.disk.open(self._files.segment(self._seq), flags)
        try:
            # Zeros written in advance (not synced: the first datasync flushes them with the
            # first batch) make each later batch an overwrite of allocated blocks, so its
            # fdatasync needs no file-system journal commit (about 2x faster on ext4). Readers
            # stop at the zeros: they are not a frame.
            os.pwrite(fd, bytes(self._segment_bytes), 0)
            self._files.sync_dir(State.INCOMING)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, 0
        self._open[self._seq] = 0

    def _cut(self) -> None:
        """After a failed write: remove what it may have left, or stop using the segment."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, self._size)  # the zeros beyond go too: later batches append
            self._files.disk.datasync(self._fd)
        except OSError as exc:
            log.error(
                "spool: cannot cut a failed write from journal segment %d (%s); "
                "messages refused in it may be delivered after a restart",
                self._seq,
                exc.strerror,
            )
            os.close(self._fd)
            self._fd = -1

    def _finished(self, *, keep_current: bool) -> list[int]:
        """Take the oldest segments whose records are all checkpointed off the books."""
        done = []
        for seq in sorted(self._open):
            if self._open[seq] or (keep_current and seq == self._seq):
                break
            done.append(seq)
            del self._open[seq]
        return done

    def _delete(self, segments: Sequence[int]) -> list[int]:
        """Delete `segments`, oldest first; the ones left when a deletion fails."""
        for i, seq in enumerate(segments):
            try:
                self._files.segment(seq).unlink(missing_ok=True)
                self._files.sync_dir(State.INCOMING)
            except OSError as exc:
                log.warning("spool: cannot delete journal segment %d: %s", seq, exc.strerror)
                return list(segments[i:])
        return []


# The spool ---------------------------------------------------------------------------------


class _Life(Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(eq=False)
class _Intake:
    qid: str
    envelope: Envelope
    head: bytes  # the JSON header of its M frame
    size: int
    data: bytes
    future: asyncio.Future[None]
    frame: bytes = b""
    committed_at: float = 0.0  # loop time its batch was written


ReadyCallback = Callable[[QueueEntry], None]


class Spool:
    """The queue on local disk. Make one with `await Spool.open(path)`; close with `aclose()`."""

    def __init__(
        self,
        path: Path,
        *,
        disk: Disk,
        segment_bytes: int,
        rescan_interval: float | None,
        max_backlog: int,
    ) -> None:
        self._path = Path(path)
        self._files = _Files(self._path, disk)
        self._segment_bytes = segment_bytes
        self._rescan_interval = rescan_interval
        self._max_backlog = max_backlog
        self._life = _Life.OPEN
        self._journal: _Journal | None = None
        self._lock_fd = -1
        self._index: dict[str, QueueEntry] = {}
        self._corrupt = 0
        self._last_us = 0
        self._pending: list[_Intake] = []  # waiting for the committer
        self._intake: dict[str, _Intake] = {}  # enqueued, not yet claimable
        self._backlog = 0  # bytes in _intake
        self._room = asyncio.Event()  # enqueue may go on: room in the backlog, or trouble to report
        self._room.set()
        self._trouble: SpoolError | None = None  # why materialisation is failing, if it is
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._committed: asyncio.Queue[list[_Intake] | None] = asyncio.Queue()
        self._last_commit = 0.0  # loop time of the last intake batch written
        self._busy: set[str] = set()  # ids in a transition right now
        self._stamps: dict[str, int] = {}  # id -> tick of its last in-process change
        self._tick = 0
        self._rescanning = asyncio.Lock()
        self._callbacks: list[ReadyCallback] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._direct: set[asyncio.Future[None]] = set()  # large messages being stored
        # Our own threads for disk work: a busy default executor (MSAL calls, an embedding
        # application's blocking code) must never hold up the 250s.
        self._executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="spool")

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        disk: Disk | None = None,
        segment_bytes: int = SEGMENT_BYTES,
        rescan_interval: float | None = RESCAN_INTERVAL,
        max_backlog: int = MAX_BACKLOG,
    ) -> Spool:
        """Create the directories if needed, take the lock, recover, and start serving.

        `rescan_interval=None` turns the periodic rescan off (call `rescan()` yourself).
        """
        spool = cls(
            path,
            disk=disk or Disk(),
            segment_bytes=segment_bytes,
            rescan_interval=rescan_interval,
            max_backlog=max_backlog,
        )
        await spool._offload(spool._recover)
        spool._require_journal().attach(asyncio.get_running_loop())
        spool._tasks = [
            asyncio.create_task(spool._commit_loop(), name="spool-commit"),
            asyncio.create_task(spool._materialise_loop(), name="spool-materialise"),
        ]
        if rescan_interval is not None:
            spool._tasks.append(asyncio.create_task(spool._rescan_loop(), name="spool-rescan"))
        return spool

    async def __aenter__(self) -> Spool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        counts = {s: 0 for s in State}
        for entry in self._index.values():
            counts[entry.state] += 1
        counts[State.INCOMING] = len(self._intake)
        counts[State.CORRUPT] = self._corrupt
        listed = " ".join(f"{s.value}={n}" for s, n in counts.items())
        return f"<Spool {self._path} {self._life.value} {listed}>"

    async def check_writable(self) -> None:
        """Raise SpoolError (SpoolFull) unless a file can be written and synced where intake
        writes; for readiness probes."""
        self._require_open()
        await self._offload(self._files.probe)

    def census(self) -> dict[State, tuple[int, float | None]]:
        """Per state: how many messages, and when the oldest arrived (None: none, or unknown
        as for corrupt/ files). From memory, for metrics; changes by `relay queue` show after
        the next rescan."""
        found: dict[State, list[float]] = {s: [] for s in State}
        for entry in self._index.values():
            found[entry.state].append(entry.envelope.received_at)
        found[State.INCOMING] = [i.envelope.received_at for i in self._intake.values()]
        out = {s: (len(times), min(times, default=None)) for s, times in found.items()}
        out[State.CORRUPT] = (self._corrupt, None)
        return out

    # Intake --------------------------------------------------------------------------------

    async def enqueue(self, envelope: Envelope, data: bytes) -> str:
        """Store the message durably and return its queue id.

        Raises SpoolFull (no space) or SpoolError (any other write error, or the spool is
        closed); then nothing of the message will be delivered.
        """
        [qid] = await self.enqueue_many([(envelope, data)])
        return qid

    async def enqueue_many(self, messages: Sequence[tuple[Envelope, bytes]]) -> list[str]:
        """Store several messages (one client message split by route) in one commit.

        They share one journal write and sync: all are stored or, on an error, none is.
        """
        if not all(envelope.rcpt_tos for envelope, _ in messages):
            raise ValueError("an envelope needs at least one recipient")
        self._require_open()
        await self._room.wait()
        self._require_open()
        if self._trouble is not None and self._backlog > self._max_backlog:
            raise type(self._trouble)(str(self._trouble))
        loop = asyncio.get_running_loop()
        items = []
        for envelope, data in messages:
            qid = self._next_id()
            head = _json(_message_header(qid, envelope))  # a bad envelope fails here, alone
            items.append(_Intake(qid, envelope, head, len(data), data, loop.create_future()))
        for item in items:  # no await in between: the committer takes them in one batch
            self._intake[item.qid] = item
            self._account(item.size)
        if sum(item.size for item in items) >= DIRECT_BYTES:
            await self._store_direct(items)
            return [item.qid for item in items]
        self._pending.extend(items)
        self._wake.set()
        try:
            if len(items) == 1:
                await items[0].future  # the common case: no gather, one loop iteration less
            else:
                await asyncio.gather(*(item.future for item in items))
        except BaseException:
            for item in items:
                if item in self._pending:  # the committer has not taken it: it is simply gone
                    self._pending.remove(item)
                    self._forget(item)
                    item.future.cancel()
            raise
        return [item.qid for item in items]

    async def _store_direct(self, items: list[_Intake]) -> None:
        """A large message gets its own files in queue/ at once, written and synced once on a
        spool thread, instead of a journal record and a file later: its sync never holds up
        the group commits that small messages wait for, and its bytes are written once."""
        store = self._offload(self._store_direct_job, items)
        self._direct.add(store)
        try:
            await asyncio.shield(store)
        except asyncio.CancelledError:  # the client went away before its 250: never deliver it
            with contextlib.suppress(SpoolError):
                await asyncio.wait([store])
                if store.exception() is None:
                    for item in items:
                        await self._offload(self._files.remove, State.QUEUE, item.qid)
            raise
        finally:
            self._direct.discard(store)
            for item in items:
                self._forget(item)
        self._admit(items)

    def _store_direct_job(self, items: Sequence[_Intake]) -> None:
        self._frame_batch(items)
        self._files.materialise([(i.qid, i.frame) for i in items])

    def _admit(self, items: Iterable[_Intake]) -> None:
        """Messages that have their files in queue/: claimable now."""
        for item in items:
            entry = _new_entry(item.qid, State.QUEUE, item.envelope, item.size)
            self._index[item.qid] = entry
            self._touch(item.qid)
            self._notify(entry)

    def _next_id(self) -> str:
        us = max(time.time_ns() // 1000, self._last_us + 1)
        self._last_us = us
        return _make_id(us)

    def _account(self, delta: int) -> None:
        self._backlog += delta
        self._update_room()

    def _update_room(self) -> None:
        over = self._backlog > self._max_backlog
        if over and self._life is _Life.OPEN and self._trouble is None:
            self._room.clear()
        else:
            self._room.set()

    def _forget(self, item: _Intake) -> None:
        del self._intake[item.qid]
        self._account(-item.size)

    async def _commit_loop(self) -> None:
        journal = self._require_journal()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = [i for i in self._pending if not i.future.done()]
            self._pending.clear()
            if batch:
                # In a task of its own: a cancelled committer must still see its batch finished.
                await asyncio.shield(self._commit(journal, batch))
            if self._life is not _Life.OPEN and not self._pending:
                return

    async def _commit(self, journal: _Journal, batch: list[_Intake]) -> None:
        """Append `batch` to the journal, then answer its waiters."""
        error: SpoolError | None = None
        try:
            if sum(i.size for i in batch) <= LOOP_WRITE_MAX:
                self._frame_batch(batch)
            else:  # checksums and copies of a large message: not on the loop
                await self._offload(self._frame_batch, batch)
            await journal.append([i.frame for i in batch], [i.qid for i in batch])
        except SpoolError as exc:
            error = exc
        except Exception as exc:  # a bug: refuse the batch rather than hang its waiters
            error = SpoolError(f"intake commit failed: {exc!r}")
        if error is not None:
            for item in batch:
                self._forget(item)
                if not item.future.done():
                    item.future.set_exception(error)
            return
        self._last_commit = asyncio.get_running_loop().time()
        for item in batch:
            item.committed_at = self._last_commit
            if not item.future.done():
                item.future.set_result(None)
        self._committed.put_nowait(batch)

    @staticmethod
    def _frame_batch(batch: Sequence[_Intake]) -> None:
        for item in batch:
            item.frame = _frame(_MESSAGE, item.head, item.data)
            item.data = b""

    async def _materialise_loop(self) -> None:
        """Materialise committed messages a chunk at a time, each chunk after `_settle`."""
        journal = self._require_journal()
        waiting: list[_Intake] = []
        last = False

        def take(batch: list[_Intake] | None) -> None:
            nonlocal last
            if batch is None:
                last = True
            else:
                waiting.extend(batch)

        while waiting or not last:
            if not waiting:
                take(await self._committed.get())
            if waiting:
                await self._settle(waiting[0].committed_at + MATERIALISE_DELAY)
            while not self._committed.empty():
                take(self._committed.get_nowait())
            chunk = waiting[:MATERIALISE_CHUNK]
            del waiting[:MATERIALISE_CHUNK]
            if chunk and not await self._materialise(journal, chunk):
                return

    async def _settle(self, deadline: float) -> None:
        """Hold materialisation back while a burst of intake goes on, so its file creations
        and syncs do not compete with the journal syncs that the 250s wait for (the messages
        are safe in the journal): until no batch has been committed for INTAKE_QUIET, the
        oldest waiting message was committed MATERIALISE_DELAY ago, half the backlog is used,
        or the spool is closing."""
        loop = asyncio.get_running_loop()
        while self._life is _Life.OPEN and self._backlog <= self._max_backlog // 2:
            wake = min(self._last_commit + INTAKE_QUIET, deadline)
            if loop.time() >= wake:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), wake - loop.time())

    async def _materialise(self, journal: _Journal, batch: Sequence[_Intake]) -> bool:
        """Give the batch its files and make it claimable; False if closing stopped it."""
        keep = [i for i in batch if not i.future.cancelled()]
        delay = 0.1
        while True:
            try:
                await self._offload(self._files.materialise, [(i.qid, i.frame) for i in keep])
                await journal.checkpoint([i.qid for i in batch])
                break
            except SpoolError as exc:
                log.error(
                    "spool: cannot move %d journaled messages to queue/ (%s); retrying; "
                    "they are safe in the journal",
                    len(keep),
                    exc,
                )
                self._trouble = exc
                self._update_room()
                if self._life is not _Life.OPEN:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, 30.0)
        self._trouble = None
        for item in batch:
            self._forget(item)
        self._admit(keep)
        return True

    # Scheduler side ------------------------------------------------------------------------

    def ready(self) -> list[QueueEntry]:
        """Messages in queue/ and deferred/, soonest due first."""
        entries = [e for e in self._index.values() if e.state in _CLAIMABLE]
        return sorted(entries, key=lambda e: (e.next_attempt, e.qid))

    def on_ready(self, callback: ReadyCallback) -> None:
        """Call `callback(entry)` (in the event loop) for each message that becomes claimable
        from now on: new mail, and mail an operator retried or released. Call `ready()` once
        after registering for what was there before."""
        self._callbacks.append(callback)

    async def claim(self, qid: str) -> QueueEntry | None:
        """Move a message from queue/ or deferred/ to active/ for a delivery attempt.

        Returns None if it is not there (delivered, held or deleted meanwhile, or claimed).
        """
        check_id(qid)
        self._require_open()
        if qid in self._intake or qid in self._busy:
            return None
        known = self._index.get(qid)
        first = known.state if known and known.state in _CLAIMABLE else State.QUEUE
        sources = (first, *(s for s in _CLAIMABLE if s is not first))
        async with self._transition(qid):
            try:
                entry = await self._offload(self._claim_job, qid, sources)
            except _Unreadable:
                self._index.pop(qid, None)
                self._corrupt += 1
                return None
        if entry is None:
            if known and known.state in _CLAIMABLE:
                del self._index[qid]  # an operator moved it; the next rescan finds it
            return None
        self._index[qid] = entry
        return entry

    def _claim_job(self, qid: str, sources: Sequence[State]) -> QueueEntry | None:
        # No sync: if the rename is lost in a crash, recovery would have undone it anyway.
        if self._files.move(qid, sources, State.ACTIVE, sync=False) is None:
            return None
        try:
            with _io(f"reading active/{qid}"):
                return self._files.load(State.ACTIVE, qid)[0]
        except _Unreadable:
            self._files.set_aside(self._files.path(State.ACTIVE, qid))
            raise

    async def read(self, qid: str) -> bytes:
        """The message's bytes, checked against their checksum (else it goes to corrupt/)."""
        entry = self._known(qid)
        try:
            return await self._offload(self._files.read, entry.state, qid)
        except _Unreadable:
            self._index.pop(qid, None)
            self._touch(qid)
            self._corrupt += 1
            raise

    async def delivered(self, qid: str, recipients: Iterable[str]) -> QueueEntry | None:
        """Mark `recipients` of a claimed message delivered.

        When every recipient is delivered the message is removed and None returned; otherwise
        it stays claimed (call `defer` or `dead` next) and the updated entry is returned.
        """
        entry = _with_outcomes(self._claimed(qid), delivered=recipients)
        done = all(r.outcome is Outcome.DELIVERED for r in entry.recipients)
        async with self._transition(qid):
            if done:
                await self._offload(self._files.remove, State.ACTIVE, qid)
            else:
                await self._offload(self._files.append_record, State.ACTIVE, entry)
        if done:
            self._index.pop(qid, None)
            return None
        self._index[qid] = entry
        return entry

    async def defer(
        self,
        qid: str,
        *,
        reply: str,
        next_attempt: float,
        failed: Mapping[str, str] | None = None,
        delivered: Iterable[str] = (),
    ) -> QueueEntry:
        """Record a temporary failure (and any per-recipient outcomes); move to deferred/."""
        entry = _with_outcomes(self._claimed(qid), delivered=delivered, failed=failed)
        entry = replace(
            entry,
            state=State.DEFERRED,
            attempts=entry.attempts + 1,
            next_attempt=next_attempt,
            last_reply=reply,
        )
        return await self._store(entry)

    async def dead(
        self,
        qid: str,
        *,
        reason: str,
        failed: Mapping[str, str] | None = None,
        delivered: Iterable[str] = (),
    ) -> QueueEntry:
        """Give up on a claimed message: move it to dead/ with `reason` kept in its record."""
        entry = _with_outcomes(self._claimed(qid), delivered=delivered, failed=failed)
        entry = replace(entry, state=State.DEAD, attempts=entry.attempts + 1, reason=reason)
        return await self._store(entry)

    async def _store(self, entry: QueueEntry) -> QueueEntry:
        async with self._transition(entry.qid):
            await self._offload(self._store_job, entry)
        self._index[entry.qid] = entry
        return entry

    def _store_job(self, entry: QueueEntry) -> None:
        self._files.append_record(State.ACTIVE, entry)
        self._files.move(entry.qid, (State.ACTIVE,), entry.state, sync=True)

    # Operators' changes --------------------------------------------------------------------

    async def rescan(self) -> None:
        """Catch up with changes another process (`relay queue ...`) made to the files."""
        self._require_open()
        async with self._rescanning:
            start = self._tick
            found, self._corrupt = await self._offload(self._files.listing)

            def settled(qid: str) -> bool:
                return (
                    qid not in self._busy
                    and qid not in self._intake
                    and self._stamps.get(qid, 0) <= start
                )

            for qid, entry in list(self._index.items()):
                if entry.state in _WATCHED and qid not in found and settled(qid):
                    del self._index[qid]
            changed = [
                (qid, state)
                for qid, state in found.items()
                if settled(qid) and (qid not in self._index or self._index[qid].state is not state)
            ]
            for entry in await self._offload(self._files.load_all, changed):
                if settled(entry.qid):
                    self._index[entry.qid] = entry
                    if entry.state in _CLAIMABLE:
                        self._notify(entry)
            self._stamps = {q: t for q, t in self._stamps.items() if t > start}

    async def _rescan_loop(self) -> None:
        assert self._rescan_interval is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._rescan_interval)
            if self._life is not _Life.OPEN:
                return
            try:
                await self.rescan()
            except SpoolError as exc:
                log.error("spool: rescan failed: %s", exc)

    # Lifecycle -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop taking mail, commit and materialise what was taken, release the lock.

        Idempotent. Messages that cannot be materialised now stay in the journal for the next
        `open`.
        """
        if self._life is not _Life.OPEN:
            await self._closed.wait()
            return
        self._life = _Life.CLOSING
        self._closing.set()
        self._room.set()
        self._wake.set()
        if self._direct:
            await asyncio.wait(self._direct)
        commit, materialise, *rest = self._tasks
        await commit
        self._committed.put_nowait(None)
        await asyncio.gather(materialise, *rest)
        journal = self._require_journal()
        journal.detach()
        try:
            await self._offload(journal.close)
        finally:
            os.close(self._lock_fd)
            self._executor.shutdown(wait=False)
            self._life = _Life.CLOSED
            self._closed.set()

    def _offload(self, job: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run blocking file work on the spool's own threads."""
        return asyncio.get_running_loop().run_in_executor(self._executor, job, *args)

    def _recover(self) -> None:
        self._files.make_dirs()
        self._lock_fd = self._files.lock()
        try:
            self._index, self._corrupt, first_seq = self._files.recover()
            journal = _Journal(
                self._files,
                segment_bytes=self._segment_bytes,
                first_seq=first_seq,
                offload=self._offload,
            )
            journal.start()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._journal = journal

    # Helpers -------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._life is not _Life.OPEN:
            raise SpoolError(f"spool {self._path} is {self._life.value}")

    def _require_journal(self) -> _Journal:
        assert self._journal is not None, "Spool.open() starts the spool"
        return self._journal

    def _known(self, qid: str) -> QueueEntry:
        check_id(qid)
        self._require_open()
        entry = self._index.get(qid)
        if entry is None:
            raise SpoolError(f"no message {qid} in spool {self._path}")
        return entry

    def _claimed(self, qid: str) -> QueueEntry:
        entry = self._known(qid)
        if entry.state is not State.ACTIVE or qid in self._busy:
            raise SpoolError(f"message {qid} is not claimed (it is in {entry.state.value}/)")
        return entry

    def _touch(self, qid: str) -> None:
        self._tick += 1
        self._stamps[qid] = self._tick

    @contextlib.asynccontextmanager
    async def _transition(self, qid: str) -> AsyncIterator[None]:
        self._busy.add(qid)
        self._touch(qid)
        try:
            yield
        finally:
            self._busy.discard(qid)
            self._touch(qid)

    def _notify(self, entry: QueueEntry) -> None:
        for callback in self._callbacks:
            try:
                callback(entry)
            except Exception:
                log.exception("spool: on_ready callback failed for %s", entry.qid)


class QueueAdmin:
    """Operators' actions on a spool's files; safe while another process serves the spool.

    It never touches active/ (the server's), and each change is one rename (or unlink) that
    either happens or finds the message gone; the server notices at its next rescan.
    """

    def __init__(self, path: Path, *, disk: Disk | None = None) -> None:
        self._files = _Files(Path(path), disk or Disk())

    async def entries(self, states: Iterable[State] = _FILE_STATES) -> list[QueueEntry]:
        """Messages in `states`, oldest first (mail still only in the journal is not listed)."""
        return await asyncio.to_thread(self._entries, tuple(states))

    async def show(self, qid: str) -> QueueEntry:
        return await asyncio.to_thread(self._find, check_id(qid))

    async def retry(self, qid: str) -> QueueEntry:
        """deferred/, hold/ or dead/ -> queue/, to be tried now. A dead message's failed
        recipients are pending again."""
        return await asyncio.to_thread(self._retry, check_id(qid))

    async def hold(self, qid: str) -> QueueEntry:
        """queue/ or deferred/ -> hold/: not delivered until retried."""
        return await asyncio.to_thread(self._hold, check_id(qid))

    async def delete(self, qid: str) -> QueueEntry:
        """Remove a message that is not being delivered; returns what it was."""
        return await asyncio.to_thread(self._delete, check_id(qid))

    async def read(self, qid: str) -> bytes:
        """The bytes of a message that is not being delivered, checked against their checksum."""
        return await asyncio.to_thread(self._read, check_id(qid))

    async def submit(self, envelope: Envelope, data: bytes) -> str:
        """Queue a new message (an operator's bounce) straight into queue/, durably; its id.

        The server takes it at its next rescan, as any message an operator released."""
        if not envelope.rcpt_tos:
            raise ValueError("an envelope needs at least one recipient")
        qid = _make_id(time.time_ns() // 1000)
        frame = _frame(_MESSAGE, _json(_message_header(qid, envelope)), data)
        await asyncio.to_thread(self._files.materialise, [(qid, frame)])
        return qid

    async def dead(self, qid: str, *, reason: str, failed: Mapping[str, str]) -> QueueEntry:
        """hold/ -> dead/ with `reason`, and `failed` recipients (address -> reply) recorded.

        Only a held message: hold it first, so the server cannot claim it meanwhile."""
        return await asyncio.to_thread(self._dead, check_id(qid), reason, dict(failed))

    def _entries(self, states: Sequence[State]) -> list[QueueEntry]:
        wanted = [(q, s) for s in states for q in self._files.names(s) if _QID.fullmatch(q)]
        return sorted(self._files.load_all(wanted), key=lambda e: e.qid)

    def _find(self, qid: str) -> QueueEntry:
        entry = self._files.find(qid, _FILE_STATES)
        if entry is None:
            raise SpoolError(f"no message {qid} in spool {self._files.root}")
        return entry

    def _change(self, qid: str, sources: Sequence[State], dest: State) -> QueueEntry:
        if self._files.move(qid, sources, dest, sync=True) is None:
            entry = self._find(qid)
            if entry.state is not dest:
                raise SpoolError(f"message {qid} is in {entry.state.value}/; cannot move it")
        return self._find(qid)

    def _retry(self, qid: str) -> QueueEntry:
        entry = self._find(qid)
        if entry.state is State.DEAD:
            revived = replace(
                entry,
                reason="",
                recipients=tuple(
                    Recipient(r.address) if r.outcome is Outcome.FAILED else r
                    for r in entry.recipients
                ),
            )
            self._files.append_record(State.DEAD, revived)
        return self._change(qid, (State.DEFERRED, State.HOLD, State.DEAD), State.QUEUE)

    def _hold(self, qid: str) -> QueueEntry:
        return self._change(qid, _CLAIMABLE, State.HOLD)

    def _read(self, qid: str) -> bytes:
        entry = self._find(qid)
        if entry.state is State.ACTIVE:
            raise SpoolError(f"message {qid} is being delivered; try again when it is not")
        return self._files.read(entry.state, qid)

    def _dead(self, qid: str, reason: str, failed: dict[str, str]) -> QueueEntry:
        entry = self._find(qid)
        if entry.state is not State.HOLD:
            raise SpoolError(f"message {qid} is in {entry.state.value}/, not hold/")
        entry = replace(_with_outcomes(entry, failed=failed), state=State.DEAD, reason=reason)
        self._files.append_record(State.HOLD, entry)
        return self._change(qid, (State.HOLD,), State.DEAD)

    def _delete(self, qid: str) -> QueueEntry:
        entry = self._find(qid)
        if entry.state is State.ACTIVE:
            raise SpoolError(f"message {qid} is being delivered; try again when it is not")
        self._files.remove(entry.state, qid)
        return entry
