"""Enqueue rate: N messages through `send_many` versus N `send` calls, in the same run.

Producer only: a private redis-server (AOF on, like production) that no worker reads, so the
figures are what app code pays to hand messages to the broker (validate + render + publish).
Also measured: rendering alone, to show how much of each path is the broker round trip.

    python bench/enqueue.py                    # 100,000 each
    python bench/enqueue.py --count 10000      # smaller
    python bench/enqueue.py --single 20000 --bulk 100000

Prints a table and writes bench/results/enqueue.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devkit.redis_server import RedisServer  # noqa: E402
from mailer.client import BATCH_SIZE, Mailer  # noqa: E402
from mailer.config import Settings  # noqa: E402
from mailer.message import Message  # noqa: E402

FROM = "Bench <bench@example.com>"
BODY = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n") * 1  # ~900 bytes


def message(i: int) -> Message:
    return Message(
        to=f"user{i}@example.com", subject=f"Enqueue bench {i}", text=BODY, from_addr=FROM
    )


def timed(fn: Callable[[], int]) -> dict[str, float]:
    started, cpu0 = time.perf_counter(), time.process_time()
    n = fn()
    seconds = time.perf_counter() - started
    return {
        "messages": n,
        "seconds": round(seconds, 3),
        "rate_per_s": round(n / seconds, 1),
        "producer_cpu_s": round(time.process_time() - cpu0, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages for each path")
    parser.add_argument("--single", type=int, help="messages through send (default --count)")
    parser.add_argument("--bulk", type=int, help="messages through send_many (default --count)")
    parser.add_argument("--chunk", type=int, default=1000, help="messages per send_many call")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="messages per task")
    parser.add_argument(
        "--render-sample", type=int, default=10_000, help="messages rendered without publishing"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "enqueue.json"))
    args = parser.parse_args()
    n_single = args.single or args.count
    n_bulk = args.bulk or args.count

    server = RedisServer().start()
    try:
        import redis

        r = redis.Redis.from_url(server.url)
        settings = Settings.from_env({"MAILER_BROKER_URL": server.url})
        client = Mailer(settings)
        client.send_many([message(-i) for i in range(1, 201)], batch_size=args.batch_size)
        for i in range(50):
            client.send_message(message(-1000 - i))  # connect, import, warm caches
        r.flushall()

        def render_only() -> int:
            for i in range(args.render_sample):
                client.render(message(i))
            return int(args.render_sample)

        def singles() -> int:
            for i in range(n_single):
                client.send_message(message(i))
            return n_single

        def bulk() -> int:
            done = 0
            while done < n_bulk:
                size = min(args.chunk, n_bulk - done)
                client.send_many(
                    [message(done + j) for j in range(size)], batch_size=args.batch_size
                )
                done += size
            return done

        results: dict[str, Any] = {}
        results["render_only"] = timed(render_only)
        print(f"render only: {results['render_only']}", file=sys.stderr)
        results["send"] = timed(singles)
        results["send"]["tasks_queued"] = int(r.llen("mailer"))
        print(f"send: {results['send']}", file=sys.stderr)
        r.flushall()
        results["send_many"] = timed(bulk)
        results["send_many"]["tasks_queued"] = int(r.llen("mailer"))
        print(f"send_many: {results['send_many']}", file=sys.stderr)
        redis_info = r.info("cpu")
        client.close()
        r.close()
    finally:
        server.close()

    ratio = results["send_many"]["rate_per_s"] / results["send"]["rate_per_s"]
    report = {
        "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "chunk": args.chunk,
        "batch_size": args.batch_size,
        "results": results,
        "send_many_over_send": round(ratio, 2),
        "redis_cpu_s": {k: redis_info.get(k) for k in ("used_cpu_sys", "used_cpu_user")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'path':<12} {'messages':>9} {'seconds':>8} {'msg/s':>9} {'CPU s':>7} {'tasks':>7}")
    for name in ("send", "send_many", "render_only"):
        row = results[name]
        print(
            f"{name:<12} {row['messages']:>9,} {row['seconds']:>8.1f} {row['rate_per_s']:>9,.0f} "
            f"{row['producer_cpu_s']:>7.1f} {row.get('tasks_queued', '-'):>7}"
        )
    print(f"send_many / send: {ratio:.1f}x   (written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
