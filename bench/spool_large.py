"""The whole intake path with a large message: small-message latency through `relay serve`
(listener, router, durable spool) while one 35 MB message is accepted.

bench/listener_large.py measures the listener alone with an intake that only counts; this one
runs the real relay, so the large message is also journaled, synced and given its own file.
Per round: one client sends small messages for --seconds over one connection; after half a
second another connection sends one --big-mb message. Then the relay gets time to write it out
before the next round.

    python bench/spool_large.py [--rounds 3] [--big-mb 35] [--seconds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intake_bench import free_port, start_relay
from listener_large import _Client, _small_latencies

LIMITS = """limits:
  max_message_size: {mb}MiB
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--big-mb", type=int, default=35)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    line = b"x" * 76 + b"\r\n"
    big = line * (a.big_mb * 1024 * 1024 // len(line))
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        relay = start_relay(port, Path(tmp), extra=LIMITS.format(mb=a.big_mb + 1))
        try:
            print(f"{'round':<6} {'big s':>6} {'small n':>8} {'p50':>8} {'p99':>8} {'max':>8}")
            for n in range(1, a.rounds + 1):
                latencies: list[float] = []
                small = threading.Thread(
                    target=lambda out=latencies: out.extend(_small_latencies(port, a.seconds, None))
                )
                small.start()
                time.sleep(0.5)
                client = _Client(port)
                start = time.perf_counter()
                client.send(big)
                took = time.perf_counter() - start
                small.join()
                q = statistics.quantiles(latencies, n=100)
                print(
                    f"{n:<6} {took:>6.2f} {len(latencies):>8} {q[49] * 1e3:>6.1f}ms "
                    f"{q[98] * 1e3:>6.1f}ms {max(latencies) * 1e3:>6.0f}ms"
                )
                time.sleep(6)  # the relay writes the big message's own file meanwhile
        finally:
            relay.terminate()
            relay.wait(timeout=30)


if __name__ == "__main__":
    main()
