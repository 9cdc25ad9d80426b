"""`relay queue ...`: the operators' view of the spool and their actions on it (as Postfix's
mailq, postqueue -f and postsuper), safe to use while `relay serve` runs.

    relay queue list [--json]            messages waiting: queue/, active/, deferred/, hold/
    relay queue show ID [--json]         envelope, recipients, attempts, last reply, next attempt
    relay queue retry ID | --all         deferred/hold/dead -> queue/ (--all: every deferred one)
    relay queue hold ID                  park a message until it is retried
    relay queue delete ID                remove a message for good
    relay queue bounce ID                give up now: a DSN to the sender, the message to dead/
    relay queue dead-letter list [--json]
    relay queue dead-letter requeue ID   a dead message back to queue/, failed recipients pending

Each command takes the spool from `-c relay.yaml` (`spool.path`) or `--spool DIR`; `bounce` needs
the config, because the DSN is sent from the route's mailbox. It acts on the files through
`QueueAdmin` (`relay.spool`), one rename at a time, and never touches a message being
delivered; the running server notices at its next rescan (`RESCAN_INTERVAL`).

`bounce`: the message is first moved to hold/ (so the server cannot claim it meanwhile), the DSN
(`relay.bounce.make_bounce`, from the route's mailbox, null sender) is written as a new message
into queue/, and only then is the message moved to dead/ with its reason. Interrupted half-way,
the message is left in hold/ (said on stderr); run the command again, or `retry` it.

Output: text for people; with `--json` one JSON object per message and line (`QueueEntry.to_json`).
Exit status: 0 done; 1 the spool refused (no such message, being delivered, I/O error); 2 a usage
or configuration problem (a malformed id, an invalid relay.yaml). Ids are checked before any path
is built from them.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from relay.bounce import bounce_for
from relay.config import Config, load
from relay.errors import ConfigError, SpoolError
from relay.reply import Reply
from relay.spool import RESCAN_INTERVAL, QueueAdmin, QueueEntry, State, check_id

WAITING = (State.QUEUE, State.ACTIVE, State.DEFERRED, State.HOLD)
OPERATOR_BOUNCE = Reply(550, "5.0.0", "delivery cancelled by the relay's operator")
BOUNCE_REASON = "An operator of the relay stopped the delivery."


class UsageError(Exception):
    """Exit status 2: the command line or relay.yaml is wrong."""


def add_arguments(queue: argparse.ArgumentParser) -> None:
    """The `relay queue` subcommands, on the parser cli.py made for `queue`."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", type=Path, help="relay.yaml (default: ./relay.yaml)")
    where.add_argument("--spool", type=Path, help="the spool directory, instead of -c")
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="messages waiting for delivery")
    for name, text in (
        ("show", "one message: envelope, attempts, last reply, next attempt"),
        ("hold", "park a message until it is retried"),
        ("delete", "remove a message for good"),
        ("bounce", "give up now: a bounce to the sender, the message to dead-letter"),
    ):
        actions.add_parser(name, parents=[common], help=text).add_argument("qid", metavar="ID")
    retry = actions.add_parser(
        "retry", parents=[common], help="deliver now (deferred, held or dead messages)"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("qid", metavar="ID", nargs="?")
    which.add_argument("--all", action="store_true", help="every deferred message")
    dead = actions.add_parser("dead-letter", help="messages given up on").add_subparsers(
        dest="dead_action", required=True, metavar="ACTION"
    )
    dead.add_parser("list", parents=[common], help="messages in dead-letter, with the reason")
    dead.add_parser("requeue", parents=[common], help="deliver a dead message again").add_argument(
        "qid", metavar="ID"
    )


async def run_queue(args: argparse.Namespace) -> int:
    try:
        return await _run(args)
    except UsageError as exc:
        print(f"relay queue: {exc}", file=sys.stderr)
        return 2
    except SpoolError as exc:
        print(f"relay queue: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace) -> int:
    config = None if args.spool else _config(args.config or Path("relay.yaml"))
    admin = QueueAdmin(args.spool or config.spool.path)  # type: ignore[union-attr]
    qid = _qid(args.qid) if getattr(args, "qid", None) else None
    action = args.dead_action if args.action == "dead-letter" else args.action
    if args.action == "dead-letter" and action == "list":
        _print(await admin.entries((State.DEAD,)), args.json, empty="dead-letter is empty")
    elif action == "list":
        _print(await admin.entries(WAITING), args.json, empty="queue is empty")
    elif action == "show":
        entry = await admin.show(_need(qid))
        print(json.dumps(entry.to_json()) if args.json else describe(entry))
    elif action == "retry" and args.all:
        entries = [await admin.retry(e.qid) for e in await admin.entries((State.DEFERRED,))]
        _done(entries, args.json, "queued for delivery now")
    elif action in ("retry", "requeue"):
        if action == "requeue" and (await admin.show(_need(qid))).state is not State.DEAD:
            raise SpoolError(f"message {qid} is not in dead-letter; use `relay queue retry`")
        _done([await admin.retry(_need(qid))], args.json, "queued for delivery now")
    elif action == "hold":
        _done([await admin.hold(_need(qid))], args.json, "held")
    elif action == "delete":
        _done([await admin.delete(_need(qid))], args.json, "deleted")
    elif action == "bounce":
        if config is None:
            raise UsageError(
                "bounce needs -c relay.yaml: the bounce is sent from the route's mailbox"
            )
        return await _bounce(admin, config, _need(qid), as_json=args.json)
    return 0


async def _bounce(admin: QueueAdmin, config: Config, qid: str, *, as_json: bool) -> int:
    entry = await admin.show(qid)
    if entry.state is State.DEAD:
        raise SpoolError(f"message {qid} is already in dead-letter")
    if entry.state is State.ACTIVE:
        raise SpoolError(f"message {qid} is being delivered; try again when it is not")
    route = next((r for r in config.routes if r.name == entry.envelope.route), None)
    if route is None:
        raise SpoolError(
            f"message {qid} came by route {entry.envelope.route!r}, which relay.yaml no longer "
            "has; a bounce cannot be sent through it (`relay queue delete` removes the message)"
        )
    failed = dict.fromkeys(entry.pending, OPERATOR_BOUNCE)
    if not failed:
        raise SpoolError(f"message {qid} has no recipient left to bounce")
    entry = await admin.hold(qid)
    try:
        dsn_qid = None
        if config.spool.bounces and entry.envelope.mail_from:
            bounce = bounce_for(
                entry,
                original=await admin.read(qid),
                failed=failed,
                route=route,
                reporting_mta=socket.getfqdn(),
                reason=BOUNCE_REASON,
            )
            if bounce is not None:
                dsn_qid = await admin.submit(*bounce)
        entry = await admin.dead(
            qid,
            reason="; ".join(f"{r}: {OPERATOR_BOUNCE.one_line()}" for r in failed),
            failed={r: reply.one_line() for r, reply in failed.items()},
        )
    except SpoolError:
        print(
            f"relay queue: {qid} is left in hold/; run the bounce again, or "
            f"`relay queue retry {qid}` to deliver it after all",
            file=sys.stderr,
        )
        raise
    if as_json:
        print(json.dumps({**entry.to_json(), "bounce": dsn_qid}))
    elif dsn_qid:
        print(
            f"{qid}: moved to dead-letter; bounce to <{entry.envelope.mail_from}> queued as "
            f"{dsn_qid} (sent within {RESCAN_INTERVAL:g}s by a running relay)"
        )
    else:
        why = "the sender is empty" if not entry.envelope.mail_from else "spool.bounces is off"
        print(f"{qid}: moved to dead-letter; no bounce ({why})")
    return 0


def _config(path: Path) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _qid(text: str) -> str:
    try:
        return check_id(text.upper())
    except SpoolError:
        raise UsageError(f"not a queue id: {text!r} (22 hexadecimal digits)") from None


def _need(qid: str | None) -> str:
    assert qid is not None, "argparse requires ID for this action"
    return qid


def _print(entries: list[QueueEntry], as_json: bool, *, empty: str) -> None:
    if as_json:
        for entry in entries:
            print(json.dumps(entry.to_json()))
        return
    if not entries:
        print(empty)
        return
    for entry in entries:
        print(summary(entry))
    size = sum(e.size for e in entries)
    print(f"-- {len(entries)} message{'s' if len(entries) != 1 else ''}, {size} bytes")


def _done(entries: Iterable[QueueEntry], as_json: bool, what: str) -> None:
    for entry in entries:
        print(json.dumps(entry.to_json()) if as_json else f"{entry.qid}: {what}")


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def summary(entry: QueueEntry) -> str:
    """Two lines or more per message, as `mailq` prints them."""
    env = entry.envelope
    lines = [
        f"{entry.qid}  {entry.state.value:<8}  {entry.size:>9} bytes  {_when(env.received_at)}  "
        f"route={env.route}  attempts={entry.attempts}",
        f"  from <{env.mail_from}> to {', '.join(entry.pending) or '(none pending)'}",
    ]
    if entry.state is State.DEAD:
        lines.append(f"  reason: {entry.reason}")
    elif entry.last_reply:
        lines.append(f"  last reply: {entry.last_reply}")
    if entry.state is State.DEFERRED:
        lines.append(f"  next attempt: {_when(entry.next_attempt)}")
    return "\n".join(lines)


def describe(entry: QueueEntry) -> str:
    """Everything the spool knows about one message."""
    env = entry.envelope
    due = {
        State.QUEUE: "now",
        State.ACTIVE: "being delivered",
        State.DEFERRED: _when(entry.next_attempt),
        State.HOLD: "held: not until `relay queue retry`",
        State.DEAD: "none: given up",
    }[entry.state]
    lines = [
        f"queue id:      {entry.qid}",
        f"state:         {entry.state.value}",
        f"arrived:       {_when(env.received_at)} from {env.client}"
        + (f" (user {env.user})" if env.user else ""),
        f"route:         {env.route}",
        f"size:          {entry.size} bytes" + (" (SMTPUTF8)" if env.smtputf8 else ""),
        f"sender:        <{env.mail_from}>",
        "recipients:",
        *(
            f"  {r.address}  {r.outcome.value}" + (f"  {r.reply}" if r.reply else "")
            for r in entry.recipients
        ),
        f"attempts:      {entry.attempts}",
        f"last reply:    {entry.last_reply or '-'}",
        f"next attempt:  {due}",
    ]
    if entry.reason:
        lines.append(f"reason:        {entry.reason}")
    return "\n".join(lines)
