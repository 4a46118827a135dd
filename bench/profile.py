#!/usr/bin/env python
"""Where our time goes in the zero-latency regime: pyinstrument on the producer, py-spy on the
workers, for `mailer.send` (single) and `mailer.send_many` (bulk), each measured alone.

    python bench/profile.py                    # 10,000 messages per mode, a few minutes
    python bench/profile.py --count 3000 --modes bulk

Producer: enqueues into a queue nobody reads (rate and CPU first, then under pyinstrument).
Workers: the queue is filled first, then 2 worker processes x 32 connections (as in the
zero-latency rows of bench/run.py) drain it into smtp-sink; the first half is timed with
nothing attached, py-spy records the second half. Writes the raw py-spy stacks (collapsed
format: speedscope.app opens them), the producer's pyinstrument reports and a summary (JSON and
text) under bench/results/profile-<time>/. Shares, not rates, are what the samplers are for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import CLK_TCK, Sink, make_sink, start_all, stop_all, tree_cpu  # noqa: E402
from bench.throughput import DB_ENQUEUE, Bench  # noqa: E402
from devkit.redis_server import RedisServer  # noqa: E402

RESULTS = REPO / "bench" / "results"

#: Leaf-frame file -> what it is (first match wins).
CATEGORIES = [
    ("aiosmtplib/", "aiosmtplib"),
    ("celery/", "celery"),
    ("kombu/", "kombu"),
    ("billiard/", "billiard"),
    ("redis/", "redis-py"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("asyncio/", "asyncio"),
    ("ssl.py", "ssl"),
    ("selectors.py", "socket/select"),
    ("socket.py", "socket/select"),
    ("email/", "email (stdlib)"),
    ("uuid.py", "uuid"),
    ("threading.py", "threading/futures"),
    ("concurrent/", "threading/futures"),
    ("queue.py", "threading/futures"),
    ("workers/", "ours: workers/"),
    ("mailer/", "ours: mailer/"),
    ("vine/", "vine (celery promises)"),
]

#: Frames whose inclusive share answers a question the brief asks.
MARKERS = [
    ("Session.transaction (the SMTP commands)", "transaction (workers/engine/session.py"),
    ("Session.open (connect, EHLO)", "open (workers/engine/session.py"),
    ("aiosmtplib execute_command", "execute_command (aiosmtplib/"),
    ("aiosmtplib read_response", "read_response (aiosmtplib/"),
    ("ledger claim", "claim (workers/state/ledger.py"),
    ("ledger begin_data", "begin_data (workers/state/ledger.py"),
    ("ledger settle", "settle (workers/state/ledger.py"),
    ("lease acquire", "acquire (workers/state/semaphore.py"),
    ("redis-py (any call)", "redis/"),
    ("structured log events (log_event)", "log_event (workers/observe/logs.py"),
    ("logging (any)", "logging/"),
    ("json (any)", "json/"),
    ("celery task tracer (around the task body)", "trace_task (celery/app/trace.py"),
    ("our task bodies (send/send_batch)", "(workers/tasks.py"),
    ("task thread waiting on the loop (Runtime.deliver*)", "Runtime.deliver"),
    ("Redis Lua scripts (EVALSHA: ledger, leases)", "AsyncScript.__call__"),
    ("asyncio timeouts (wait_for, timeout)", "asyncio/timeouts.py"),
    ("celery task events (dispatcher)", "celery/events/dispatcher.py"),
    ("circuit breaker checks (sync Redis)", "(workers/state/circuit.py"),
    ("metrics (prometheus)", "(workers/observe/metrics.py"),
    ("kombu redis transport (consume, ack)", "kombu/transport/redis.py"),
    ("kombu publish (events, retries)", "publish (kombu/"),
    ("kombu ack", "basic_ack"),
    ("message render (producer)", "render (mailer/message.py"),
    ("celery send_task (producer)", "send_task (celery/"),
]


def kind_of(name: str) -> str:
    if name == "mailer-loop":
        return "asyncio loop thread (SMTP, Redis)"
    if name.startswith("ThreadPoolExecutor"):
        return "celery task threads (pool=threads)"
    if name == "MainThread":
        return "celery main thread (consumer, events, acks)"
    return f"other threads ({name or '?'})"


def thread_kind(stack: tuple[str, ...]) -> str:
    """py-spy --threads puts "thread (tid): name" first."""
    head = stack[0] if stack and stack[0].startswith("thread (") else ""
    return kind_of(head.split(": ", 1)[1] if ": " in head else "")


_DUMP_THREAD = re.compile(r'^Thread (\w+) \(([^)]*)\): "(.*)"', re.M)  # (idle), (active+gil)


def thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (Python does not name OS threads)."""
    text = subprocess.run(
        [py_spy(), "dump", "--pid", str(pid), "--nonblocking"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {int(tid, 0): name for tid, _state, name in _DUMP_THREAD.findall(text)}


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """tid -> (user, system) CPU seconds, from /proc/<pid>/task/<tid>/stat."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2 :].split()
        out[int(task.name)] = (int(f[11]) / CLK_TCK, int(f[12]) / CLK_TCK)
    return out


def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def category(frame: str) -> str:
    for needle, name in CATEGORIES:
        if needle in frame:
            return name
    return "other"


def parse_raw(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    if not path.exists():
        return stacks
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(f for f in stack.split(";") if f)] += int(count)
    return stacks


def summarize(stacks: Counter[tuple[str, ...]], top: int = 25) -> dict[str, Any]:
    total = sum(stacks.values()) or 1
    threads: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    selfs: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    markers: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = [f for f in stack if not f.startswith(("thread (", "process "))]
        threads[thread_kind(stack)] += n
        if frames:
            selfs[frames[-1]] += n
            categories[category(frames[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n
        text = ";".join(frames)
        for label, needle in MARKERS:
            if needle in text:
                markers[label] += n

    def share(counter: Counter[str], limit: int | None = None) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in counter.most_common(limit)]

    return {
        "samples": total,
        "threads": share(threads),
        "self_by_category": share(categories),
        "markers": [(label, markers[label] / total) for label, _ in MARKERS if markers[label]],
        "top_self": share(selfs, top),
        "top_inclusive": share(inclusive, top),
    }


def render_summary(title: str, s: dict[str, Any]) -> str:
    out = [f"== {title}"]
    out.append("-- CPU by thread while py-spy ran (/proc; ms per message: user + system)")
    out += [
        f"  {u + sy:6.2f} ms  ({u:.2f} + {sy:.2f})  {k}"
        for k, u, sy in s.get("cpu_ms_per_message_by_thread", [])
    ]
    out.append(f"-- py-spy --gil: {s['samples']} samples of the thread holding the GIL")
    for key, heading in (
        ("threads", "GIL held, by thread"),
        ("self_by_category", "self time by library (leaf frame)"),
        ("markers", "inclusive share of what the brief asks about"),
        ("top_self", "top functions, self"),
        ("top_inclusive", "top functions, inclusive"),
    ):
        out.append(f"-- {heading}")
        out += [f"  {v:6.1%}  {k}" for k, v in s[key]]
    return "\n".join(out)


class Spy:
    """py-spy record on one pid until stopped (SIGINT makes it write its output)."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        argv += ["--nonblocking", "--threads", "--gil", "-o", str(out)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def profile_producer(
    bench: Bench, out: Path, mode: str, produce: Callable[[int, int], None], n: int
) -> dict[str, Any]:
    """The producer alone (a queue nobody reads): first plain (rate, CPU), then pyinstrument."""
    from pyinstrument import Profiler

    bench.flush(DB_ENQUEUE)
    with bench.ours_producer(DB_ENQUEUE):
        produce(50, bench.take(50))
        started, cpu0 = time.monotonic(), time.thread_time()
        produce(n, bench.take(n))
        wall, cpu = time.monotonic() - started, time.thread_time() - cpu0
        profiler = Profiler(interval=0.0005)
        profiler.start()
        produce(n, bench.take(n))
        profiler.stop()
    bench.flush(DB_ENQUEUE)
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    (out / f"{mode}-producer.txt").write_text(text)
    (out / f"{mode}-producer.html").write_text(profiler.output_html())
    return {
        "messages": n,
        "rate_per_s": n / wall,
        "wall_ms_per_message": wall * 1000 / n,
        "cpu_ms_per_message": cpu * 1000 / n,
    }


def profile_workers(
    bench: Bench,
    sink: Sink,
    out: Path,
    mode: str,
    produce: Callable[[int, int], None],
    n: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The workers alone: the queue is filled first, then the workers start and drain it.

    The first half is drained with nothing attached (rate, CPU per message from /proc); py-spy
    then records the second half.
    """
    bench.flush(0)
    env = bench.ours_env(
        sink, connections=args.connections, max_connections=args.workers * args.connections
    )
    with bench.ours_producer():
        produce(n, bench.take(n))
    base = sink.count()
    workers = start_all(bench.ours_workers(f"prof-{mode}", env, args.workers))
    try:
        t0, c0, cpu0 = time.monotonic(), sink.count(), tree_cpu([w.pid for w in workers])
        half = sink.wait_for(base + n // 2, 600)
        t1, c1, cpu1 = time.monotonic(), sink.count(), tree_cpu([w.pid for w in workers])
        names = {w.pid: thread_names(w.pid) for w in workers}
        threads0 = {w.pid: thread_cpu(w.pid) for w in workers}
        spies = [
            Spy(w.pid, out / f"{mode}-worker{i}.raw.txt", args.rate) for i, w in enumerate(workers)
        ]
        done = sink.wait_for(base + n, 600)
        t2, c2 = time.monotonic(), sink.count()
        threads1 = {w.pid: thread_cpu(w.pid) for w in workers}
        for w in workers:  # and the threads started while py-spy ran
            names[w.pid] = {**thread_names(w.pid), **names[w.pid]}
        for spy in spies:
            spy.stop()
    finally:
        stop_all(workers)
    if half is None or done is None:
        raise RuntimeError(
            f"{mode}: the workers did not drain the queue ({sink.count() - base}/{n})"
        )
    stacks: Counter[tuple[str, ...]] = Counter()
    for i in range(len(workers)):
        stacks.update(parse_raw(out / f"{mode}-worker{i}.raw.txt"))
    summary = summarize(stacks)
    per_thread: dict[str, list[float]] = {}
    for pid, after in threads1.items():
        for tid, (user, system) in after.items():
            u0, s0 = threads0[pid].get(tid, (0.0, 0.0))
            kind = kind_of(names[pid].get(tid, ""))
            acc = per_thread.setdefault(kind, [0.0, 0.0])
            acc[0] += user - u0
            acc[1] += system - s0
    sent = max(1, c2 - c1)
    summary["cpu_ms_per_message_by_thread"] = sorted(
        ((k, u * 1000 / sent, sy * 1000 / sent) for k, (u, sy) in per_thread.items()),
        key=lambda x: -(x[1] + x[2]),
    )
    summary.update(
        messages=n,
        drain_rate_per_s=(c1 - c0) / (t1 - t0),
        drain_rate_under_py_spy_per_s=(c2 - c1) / (t2 - t1),
        worker_cpu_ms_per_message=(cpu1 - cpu0) * 1000 / max(1, c1 - c0),
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="messages per worker mode")
    parser.add_argument("--producer-count", type=int, default=3_000)
    parser.add_argument("--modes", default="single,bulk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--bulk-chunk", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"profile-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailer-profile-"))
    server = RedisServer().start()
    bench = Bench(workdir, server, log=print)
    sink = make_sink("auto", workdir)
    produces: dict[str, Callable[[int, int], None]] = {
        "single": bench.produce_single,
        "bulk": bench.produce_bulk(args.bulk_chunk),
    }
    summary: dict[str, Any] = {"args": vars(args) | {"out": str(out)}, "load": os.getloadavg()}
    texts: list[str] = []
    try:
        for mode in [m for m in args.modes.split(",") if m]:
            p = profile_producer(bench, out, mode, produces[mode], args.producer_count)
            w = profile_workers(bench, sink, out, mode, produces[mode], args.count, args)
            summary[mode] = {"producer": p, "workers": w}
            title = (
                f"{mode}: producer alone {p['rate_per_s']:,.0f} msg/s "
                f"({p['cpu_ms_per_message']:.2f} ms CPU per message); workers alone (queue "
                f"pre-filled) {w['drain_rate_per_s']:,.0f} msg/s, "
                f"{w['worker_cpu_ms_per_message']:.2f} ms worker CPU per message "
                f"({w['drain_rate_under_py_spy_per_s']:,.0f} msg/s under py-spy)"
            )
            texts.append(render_summary(title, w))
            print(texts[-1], flush=True)
    finally:
        sink.stop()
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.txt").write_text("\n\n".join(texts) + "\n")
    print(f"profiles: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
