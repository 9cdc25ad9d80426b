"""Does one large message hold up everyone else? Small-message latency while a big one uploads.

Starts a server in a child process (so clients and server do not share a GIL): either relay's
Listener or a stock aiosmtpd SMTP (its line-by-line DATA loop, aio-libs/aiosmtpd#293), both
with an intake that only counts. Then, from this process:

  * baseline: one client sends small messages over one connection for --seconds;
  * under load: the same, while --big-clients other connections each send one --big-mb message
    (76-character lines, like base64), repeatedly until the small client is done.

Prints per mode: small-message latency p50 / p99 / max and count, and the big messages' MB/s.

    .venv/bin/python bench/listener_large.py [--mode relay|stock|both] [--big-mb 35] [--seconds 6]

Recorded (2 vCPU VM, Python 3.11.7, aiosmtpd 1.4.6, load average 2-3 from other work;
`--seconds 8`, big messages sent back to back):

    small-message latency      baseline        with 1 x 35 MB         with 2 x 35 MB
    relay Listener             p50 0.3 ms      p50 1.6 / p99 6.6 /    p50 2.5 / p99 7.2 /
                                               max 31 ms, 233 MB/s    max 21 ms, 132 MB/s each
    stock aiosmtpd             p50 0.3 ms      p50 8.6 / p99 85 /     p50 17 / p99 96 /
                                               max 92 ms, 53 MB/s     max 167 ms, 27 MB/s each

Small messages done while one big one uploads: relay 5,622 in 8 s, stock 828.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import threading
import time

HEAD = b"From: a@contoso.com\r\nTo: b@example.org\r\nSubject: small\r\n\r\n"
SMALL = HEAD + (b"x" * 76 + b"\r\n") * 26  # about 2 KB


# -- server (child process) ------------------------------------------------------------------


class _CountingIntake:
    def __init__(self) -> None:
        self.count = 0

    def check_sender(self, client: object, mail_from: str) -> None:
        return None

    def check_recipient(self, client: object, mail_from: str, rcpt: str) -> None:
        return None

    async def accept(
        self, client: object, mail_from: str, rcpt_tos: list[str], data: bytes, *, smtputf8: bool
    ) -> str:
        self.count += 1
        return f"B{self.count}"


async def _serve(mode: str, size_limit: int) -> None:
    loop = asyncio.get_running_loop()
    if mode == "relay":
        from relay.config import Limits, ListenerConfig
        from relay.listener import Listener

        listener = Listener(
            ListenerConfig(host="127.0.0.1", port=0),
            limits=Limits(max_message_size=size_limit),
            users={},
            intake=_CountingIntake(),
            hostname="bench",
        )
        await listener.start()
        port = listener.port
    else:
        from aiosmtpd.smtp import SMTP

        class Sink:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                return "250 OK"

        server = await loop.create_server(
            lambda: SMTP(Sink(), data_size_limit=size_limit, hostname="bench", loop=loop),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin


# -- clients (this process, plain sockets) ---------------------------------------------------


class _Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # two writes per message
        self.file = self.sock.makefile("rb")
        self.reply()
        self.command(b"EHLO bench")

    def reply(self) -> bytes:
        while True:
            line = self.file.readline()
            if line[3:4] != b"-":
                return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def send(self, data: bytes) -> None:
        """One transaction; `data` ends with CRLF and has no line starting with a dot."""
        self.sock.sendall(b"MAIL FROM:<a@contoso.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        for _ in range(3):
            code = self.reply()[:3]
            if code not in (b"250", b"354"):
                raise RuntimeError(f"refused: {code!r}")
        self.sock.sendall(data)  # no data + b".": a 35 MB copy would hold the client's GIL
        self.sock.sendall(b".\r\n")
        if not self.reply().startswith(b"250"):
            raise RuntimeError("message not accepted")


def _small_latencies(port: int, seconds: float, stop: threading.Event | None) -> list[float]:
    client = _Client(port)
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        client.send(SMALL)
        latencies.append(time.perf_counter() - t)
    if stop is not None:
        stop.set()
    return latencies


def _big_sender(port: int, data: bytes, stop: threading.Event, done: list[float]) -> None:
    client = _Client(port)
    while not stop.is_set():
        t = time.perf_counter()
        client.send(data)
        done.append(time.perf_counter() - t)


def _summary(name: str, latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{name}: small messages n={len(ms)} p50={statistics.median(ms):.1f} ms "
        f"p99={p99:.1f} ms max={ms[-1]:.1f} ms"
    )


def _measure(mode: str, big_mb: int, big_clients: int, seconds: float) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--big-mb", str(big_mb)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        print(_summary(f"{mode} baseline", _small_latencies(port, seconds, None)))
        line = b"A" * 76 + b"\r\n"
        big = line * (big_mb * 1024 * 1024 // len(line))
        stop = threading.Event()
        durations: list[float] = []
        senders = [
            threading.Thread(target=_big_sender, args=(port, big, stop, durations))
            for _ in range(big_clients)
        ]
        for t in senders:
            t.start()
        latencies = _small_latencies(port, seconds, stop)
        for t in senders:
            t.join()
        print(_summary(f"{mode} with {big_clients} x {big_mb} MB uploading", latencies))
        rate = [len(big) / 1e6 / d for d in durations]
        print(
            f"{mode}: {len(durations)} big messages, "
            f"{statistics.median(rate):.0f} MB/s each (median), "
            f"{statistics.median(durations):.2f} s each"
        )
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["relay", "stock", "both"], default="both")
    p.add_argument("--big-mb", type=int, default=35)
    p.add_argument("--big-clients", type=int, default=1)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--serve", choices=["relay", "stock"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, (args.big_mb + 5) * 1024 * 1024))
        return
    for mode in ["relay", "stock"] if args.mode == "both" else [args.mode]:
        _measure(mode, args.big_mb, args.big_clients, args.seconds)


if __name__ == "__main__":
    main()
