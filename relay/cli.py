"""The `relay` command: the one place that parses arguments, runs the event loop and exits.

Subcommands: serve, check, login, demo, emulator, queue, doctor, hash-password. Each one's work
lives in its own module as an async function returning an exit status; this module only wires
them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from relay.queuecmd import add_arguments as add_queue_arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the relay (SIGTERM or Ctrl-C stops it)")
    serve.add_argument("--config", "-c", type=Path, default=Path("relay.yaml"))

    demo = sub.add_parser("demo", help="show the whole path against the built-in emulator")
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=Path("demo-state"),
        help="where the demo's spool, relay.yaml and CA go",
    )

    check = sub.add_parser("check", help="validate relay.yaml and show what it resolves to")
    check.add_argument("--config", "-c", type=Path, default=Path("relay.yaml"))
    check.add_argument("--online", action="store_true", help="also get a token per account")

    login = sub.add_parser(
        "login",
        help="sign in the user of a delegated_user account (device code); relay serve then "
        "renews the tokens by itself",
    )
    login.add_argument("account", help="the account's name under accounts: in relay.yaml")
    login.add_argument("--config", "-c", type=Path, default=Path("relay.yaml"))

    emu = sub.add_parser("emulator", help="run the Exchange Online emulator in the foreground")
    emu.add_argument("--config", "-c", type=Path, help="emulator YAML (tenants, apps, mailboxes)")
    emu.add_argument(
        "--state-dir",
        type=Path,
        default=Path("emulator-state"),
        help="where the CA certificate and received messages are written",
    )
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--smtp-port", type=int, default=2587)
    emu.add_argument(
        "--https-port",
        type=int,
        default=8443,
        help="identity platform port; Graph listens on the next port",
    )
    emu.add_argument(
        "--graph-port",
        type=int,
        help="Graph port (default: the one after --https-port, or any free port if that is 0)",
    )

    queue = sub.add_parser(
        "queue", help="list, show, retry, hold, delete or bounce queued mail (while serve runs)"
    )
    add_queue_arguments(queue)

    doctor = sub.add_parser(
        "doctor",
        help="check each account against Microsoft: token, SMTP AUTH, send-as, Graph "
        "permissions; say what to fix",
    )
    doctor.add_argument("--config", "-c", type=Path, default=Path("relay.yaml"))
    doctor.add_argument(
        "--send-test",
        metavar="ADDRESS",
        help="also send a test message to ADDRESS through each route (and each send_as address)",
    )

    sub.add_parser(
        "hash-password",
        help="read a password (twice at a terminal, one line from a pipe) and print its hash "
        "for relay.yaml users",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        status = asyncio.run(_dispatch(args))
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from relay.app import run_serve

        return await run_serve(args)
    if args.command == "demo":
        from relay.demo import run_demo

        return await run_demo(args)
    if args.command == "check":
        from relay.check import run_check

        return await run_check(args)
    if args.command == "login":
        from relay.login import run_login

        return await run_login(args)
    if args.command == "emulator":
        from relay.testing.run import run_emulator

        return await run_emulator(args)
    if args.command == "queue":
        from relay.queuecmd import run_queue

        return await run_queue(args)
    if args.command == "doctor":
        from relay.doctor import run_doctor

        return await run_doctor(args)
    if args.command == "hash-password":
        from relay.passwords import run_hash_password

        return await run_hash_password()
    raise AssertionError(args.command)
