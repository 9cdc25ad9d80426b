"""Durable intake throughput: relay (listener + spool, fsync before 250) beside a bare aiosmtpd
sink that keeps nothing, measured in one run on this machine.

Each server runs in its own process; the load generator (bench/smtpload.py) in this one.
2 KB messages, 8 concurrent clients, a fixed number of messages per cell (fsync-bound work
wants a count, not a time), alternating sink and relay so that machine noise hits both.

The relay's rate is to the last 250 (the message is in the fdatasync'ed journal). Its spool then
gives each message its own file in queue/, held back while intake is busy; "drained" is the rate
until that is done too, and the next cell starts only after it, so the sink is never measured
while the relay catches up.

    python bench/intake_bench.py [--messages 250] [--rounds 3]

Prints a table and the median ratio relay/sink per connection mode.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smtpload import run as load

SINK = textwrap.dedent(
    """
    import asyncio, sys
    from aiosmtpd.smtp import SMTP

    class Sink:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok"

    async def main(port):
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Sink()), "127.0.0.1", port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(int(sys.argv[1])))
    """
)

RELAY_YAML = """
listen:
  - address: "127.0.0.1:{port}"
spool:
  path: {spool}
accounts:
  bench:
    tenant_id: 00000000-0000-4000-8000-000000000001
    client_id: 00000000-0000-4000-8000-000000000002
    client_secret: not-used
    endpoints: {{authority: "https://127.0.0.1:9", smtp: "127.0.0.1:9"}}
routes:
  - name: hold
    account: bench
    mailbox: app@contoso.com   # the load generator's sender
    send_as: [a@contoso.com]   # bench/listener_large.py's sender
    rate: 1/h        # intake only: the scheduler stays idle while we measure
{extra}log:
  level: WARNING
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def start_sink(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", SINK, str(port)], stdout=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc


def start_relay(port: int, workdir: Path, *, extra: str = "") -> subprocess.Popen[bytes]:
    """`relay serve` with RELAY_YAML; `extra` adds top-level keys (YAML text)."""
    config = workdir / "relay.yaml"
    config.write_text(RELAY_YAML.format(port=port, spool=workdir / "spool", extra=extra))
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(config)])
    wait_port(port, proc)
    return proc


def measure(port: int, messages: int, reuse: bool) -> dict:
    return asyncio.run(load("127.0.0.1", port, 8, messages, 2048, reuse))


def spooled(spool: Path) -> int:
    """Messages with their own file in the spool (the scheduler may have claimed one)."""
    states = ("queue", "active", "deferred", "hold", "dead")
    return sum(1 for s in states if (spool / s).is_dir() for _ in (spool / s).iterdir())


def measure_relay(port: int, messages: int, reuse: bool, spool: Path) -> dict:
    """Rate to the last 250, and "drained": until every message also has its file."""
    before = spooled(spool)
    start = time.perf_counter()
    result = measure(port, messages, reuse)
    deadline = time.monotonic() + 120
    while spooled(spool) < before + result["messages"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the relay did not materialise the messages within 120 s")
        time.sleep(0.005)
    result["drained"] = result["messages"] / (time.perf_counter() - start)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=250, help="per client and cell")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sink_port, relay_port = free_port(), free_port()
        sink = start_sink(sink_port)
        relay = start_relay(relay_port, Path(tmp))
        try:
            for reuse in (False, True):
                for _ in range(a.rounds):
                    s = measure(sink_port, a.messages, reuse)
                    r = measure_relay(relay_port, a.messages, reuse, Path(tmp) / "spool")
                    rows.append((reuse, s, r))
        finally:
            for proc in (sink, relay):
                proc.terminate()
                proc.wait(timeout=30)
    print(
        f"{'connection':<12} {'sink msg/s':>10} {'relay msg/s':>11} {'ratio':>6} "
        f"{'sink p50':>9} {'relay p50':>10} {'relay p99':>10} {'drained msg/s':>14}"
    )
    for reuse, s, r in rows:
        print(
            f"{'reused' if reuse else 'new each':<12} {s['rate']:>10.0f} {r['rate']:>11.0f} "
            f"{r['rate'] / s['rate']:>6.2f} {s['p50_ms']:>7.1f}ms {r['p50_ms']:>8.1f}ms "
            f"{r['p99_ms']:>8.1f}ms {r['drained']:>14.0f}"
        )
    for reuse in (False, True):
        ratios = [r["rate"] / s["rate"] for ru, s, r in rows if ru is reuse]
        print(
            f"median ratio relay/sink, {'reused' if reuse else 'new'} connections: "
            f"{statistics.median(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
