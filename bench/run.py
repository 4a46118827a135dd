#!/usr/bin/env python
"""The benchmark suite in one command: ours against the peers and smtp-source, in one run.

    python bench/run.py            # the full run (~2.5 minutes on 2 cores); also `make bench`,
                                   # `mailer bench` from a checkout
    python bench/run.py --smoke    # seconds: every part once with tiny counts (tests use it)

Everything is local (127.0.0.1, free ports): a private redis-server, Postfix's smtp-sink (our
aiosmtpd sink when Postfix is missing: figures then not comparable), worker processes started
the way users start them. Prints a table and writes bench/results/bench-<time>.json.
Figures are printed, never asserted. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import Service, Sink, make_sink, start_all, stop_all  # noqa: E402
from bench.throughput import PEER_LABELS, Bench, Run  # noqa: E402
from devkit.redis_server import RedisServer  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run sends (the full run must stay under ~10 minutes)."""

    zero_ours: int = 20_000
    zero_peer: int = 3_000
    zero_source: int = 20_000
    source_repeats: int = 3
    zero_workers: int = 2
    zero_connections: int = 32
    # 30 s at the ideal 500/s: the first reply alone takes the 1 s think time, so a short run
    # measures start-up as much as throughput (smtp-source reaches 87% of ideal over 5 s).
    lat_ours: int = 15_000
    lat_peer: int = 20
    lat_source: int = 2_500
    lat_workers: int = 2
    lat_connections: int = 250
    lat_cap: int = 500
    think: int = 1
    bulk_chunk: int = 1_000
    # Warm-ups open every session a system has in steady state (ours: 2 x 32 sessions in the
    # zero regime, 500 in the latency one; the naive peer: one per child) before the clock starts.
    warm: int = 200
    lat_warm: int = 500
    peer_lat_warm: int = 2
    rss_many: int = 200
    rss_few: int = 20
    rss_think: float = 1.0
    enqueue_single: int = 5_000
    enqueue_bulk: int = 20_000


SMOKE = Sizes(
    zero_ours=200,
    zero_peer=30,
    zero_source=500,
    source_repeats=1,
    zero_workers=1,
    zero_connections=8,
    lat_ours=40,
    lat_peer=2,
    lat_source=40,
    lat_workers=2,
    lat_connections=10,
    lat_cap=20,
    bulk_chunk=100,
    warm=10,
    lat_warm=20,
    peer_lat_warm=0,
    rss_many=6,
    rss_few=2,
    rss_think=0.2,
    enqueue_single=100,
    enqueue_bulk=200,
)

ALL_PARTS = ("zero", "latency", "rss", "enqueue")
ALL_SYSTEMS = ("source", "ours", "naive", "djce")


def warm(bench: Bench, sink: Sink, n: int, produce: Callable[[int, int], None]) -> None:
    """Not timed: boots each worker's runtime and sessions, as in any long-running deployment."""
    if n <= 0:
        return
    base = sink.count()
    produce(n, bench.take(n))
    if sink.wait_for(base + n, timeout=120) is None:
        raise RuntimeError(f"warm-up did not deliver ({sink.count() - base}/{n})")


def regime(
    bench: Bench, name: str, sizes: Sizes, sink_kind: str, systems: tuple[str, ...]
) -> list[Run]:
    """One sink, every system in turn against it."""
    zero = name == "zero"
    think = 0 if zero else sizes.think
    workers = sizes.zero_workers if zero else sizes.lat_workers
    connections = sizes.zero_connections if zero else sizes.lat_connections
    cap = workers * connections if zero else sizes.lat_cap
    n_ours = sizes.zero_ours if zero else sizes.lat_ours
    n_peer = sizes.zero_peer if zero else sizes.lat_peer
    sink = make_sink(sink_kind, bench.workdir, think=think, max_sessions=max(2048, 2 * cap))
    bench.say(f"{name}: {sink.name} on port {sink.port}" + (f", -W mail:{think}" if think else ""))
    runs: list[Run] = []
    try:
        if "source" in systems:
            repeats = sizes.source_repeats if zero else 1
            sessions = 16 if zero else cap
            n = sizes.zero_source if zero else sizes.lat_source
            for _ in range(repeats):
                run = bench.smtp_source(name, sink, n, sessions)
                if run is not None:
                    runs.append(run)
        ours: list[Service] = []
        if "ours" in systems:
            env = bench.ours_env(sink, connections=connections, max_connections=cap)
            ours = bench.ours_workers(name, env, workers)
        peers = {k: bench.peer_worker(k, name, sink) for k in ("naive", "djce") if k in systems}
        services = [*ours, *peers.values()]
        start_all(services)
        try:
            if ours:
                config = {
                    "worker_processes": workers,
                    "MAILER_WORKER_CONNECTIONS": connections,
                    "MAILER_MAX_CONNECTIONS": cap,
                    "pool": "mailer worker default (threads, -c = connections)",
                }
                timeout = 120 + n_ours / 20
                with bench.ours_producer():
                    warm(bench, sink, sizes.warm if zero else sizes.lat_warm, bench.produce_single)
                    runs.append(
                        bench.timed(
                            name, "ours single", sink, n_ours, bench.produce_single, ours,
                            timeout=timeout, config={**config, "api": "mailer.send per message"},
                        )
                    )  # fmt: skip
                    runs.append(
                        bench.timed(
                            name, "ours bulk", sink, n_ours, bench.produce_bulk(sizes.bulk_chunk),
                            ours, timeout=timeout,
                            config={
                                **config,
                                "api": f"mailer.send_many, {sizes.bulk_chunk} messages per call",
                            },
                        )
                    )  # fmt: skip
                for service in ours:
                    service.terminate()
            for key, service in peers.items():
                module = bench.peer_module(key)
                warm(bench, sink, min(10, n_peer) if zero else sizes.peer_lat_warm, module.produce)
                runs.append(
                    bench.timed(
                        name, PEER_LABELS[key], sink, n_peer, module.produce, [service],
                        timeout=(120 + n_peer / 20) if zero else (60 + 2 * n_peer * think),
                        config={"pool": "prefork", "concurrency": 2, "module": module.__name__},
                    )
                )  # fmt: skip
                service.terminate()  # its warm shutdown overlaps the next run; waited for below
        finally:
            stop_all(services)
            for db in (0, 1, 2):
                bench.flush(db)
    finally:
        sink.stop()
    return runs


# ---- the report ---------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(runs: list[Run]) -> str:
    head = (
        f"{'regime':<8} {'system':<26} {'messages':>8} {'elapsed s':>9} {'msg/s':>8} "
        f"{'enqueue/s':>9} {'CPU s per 1,000 msgs: worker':>28} {'producer':>8} {'redis':>6} "
        f"{'sink':>5} {'other load':>10}  notes"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r.regime:<8} {r.system:<26} {r.messages:>8,} {_f(r.elapsed_s, '.2f'):>9} "
            f"{_f(r.rate, ',.0f'):>8} {_f(r.enqueue_rate, ',.0f'):>9} "
            f"{_f(r.cpu_per_1k('worker'), '.3f'):>28} {_f(r.cpu_per_1k('producer'), '.3f'):>8} "
            f"{_f(r.cpu_per_1k('redis'), '.3f'):>6} {_f(r.cpu_per_1k('sink'), '.3f'):>5} "
            f"{r.other_load:>10.0%}  " + (r.notes or "") + ("" if r.complete else " INCOMPLETE")
        )
    return "\n".join(lines)


def _rate(runs: list[Run], regime: str, system: str) -> float | None:
    rates = [r.rate for r in runs if r.regime == regime and r.system == system and r.complete]
    return statistics.median([x for x in rates if x is not None]) if rates else None


def ratios(runs: list[Run], rss: list[dict[str, Any]], sizes: Sizes) -> list[dict[str, Any]]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    bulk, single = _rate(runs, "zero", "ours bulk"), _rate(runs, "zero", "ours single")
    source = _rate(runs, "zero", "smtp-source")
    naive = _rate(runs, "zero", PEER_LABELS["naive"])
    djce = _rate(runs, "zero", PEER_LABELS["djce"])
    ideal = sizes.lat_cap / sizes.think
    lat_bulk, lat_single = (
        _rate(runs, "latency", "ours bulk"),
        _rate(runs, "latency", "ours single"),
    )
    lat_source = _rate(runs, "latency", "smtp-source")
    lat_naive = _rate(runs, "latency", PEER_LABELS["naive"])
    out = [
        ("zero: ours bulk / naive Celery", ratio(bulk, naive), ">=", 8.0, "x"),
        ("zero: ours single / naive Celery", ratio(single, naive), ">=", 3.0, "x"),
        ("zero: ours bulk / smtp-source", ratio(bulk, source), ">=", 0.15, "x"),
        ("zero: ours single / smtp-source", ratio(single, source), "", None, "x"),
        ("zero: ours bulk / django-celery-email style", ratio(bulk, djce), "", None, "x"),
        ("zero: naive Celery / smtp-source", ratio(naive, source), "", None, "x"),
        (f"latency: ours bulk / ideal ({ideal:.0f}/s)", ratio(lat_bulk, ideal), ">=", 0.9, "%"),
        (f"latency: ours single / ideal ({ideal:.0f}/s)", ratio(lat_single, ideal), ">=", 0.9, "%"),
        (
            f"latency: smtp-source -s {sizes.lat_cap} / ideal",
            ratio(lat_source, ideal),
            "",
            None,
            "%",
        ),
        ("latency: naive Celery, msg/s", lat_naive, "", None, "/s"),
    ]
    for item in rss:
        out.append(
            (
                f"RSS per open {'TLS' if item['tls'] else 'plain'} session, KiB",
                item["kib_per_session"],
                "<=" if item["tls"] else "",
                64.0 if item["tls"] else None,
                "KiB",
            )
        )
    result = []
    for label, value, op, target, unit in out:
        met = None
        if value is not None and target is not None:
            met = value >= target if op == ">=" else value <= target
        result.append(
            {"ratio": label, "value": value, "op": op, "target": target, "unit": unit, "met": met}
        )
    return result


def ratio_table(items: list[dict[str, Any]]) -> str:
    def show(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        if unit == "%":
            return f"{value:.0%}"
        if unit == "x":
            return f"{value:.2f}x"
        if unit == "/s":
            return f"{value:.1f}/s"
        return f"{value:.1f} {unit}"

    lines = [f"{'ratio (same run)':<46} {'value':>10}  {'target':<10} met"]
    for it in items:
        target = "" if it["target"] is None else f"{it['op']} {show(it['target'], it['unit'])}"
        met = {None: "", True: "yes", False: "NO"}[it["met"]]
        lines.append(f"{it['ratio']:<46} {show(it['value'], it['unit']):>10}  {target:<10} {met}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import aiosmtplib
    import celery
    import kombu
    import redis as redis_py

    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout.strip()
        except OSError:
            return ""

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "aiosmtplib": aiosmtplib.__version__,
        "redis-py": redis_py.__version__,
        "redis-server": version(["redis-server", "--version"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: a check, not figures")
    parser.add_argument("--only", default=",".join(ALL_PARTS), help="parts: " + ",".join(ALL_PARTS))
    parser.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help="systems: " + ",".join(ALL_SYSTEMS)
    )
    parser.add_argument("--sink", choices=["auto", "postfix", "aiosmtpd"], default="auto")
    parser.add_argument(
        "--json", type=Path, help="where to write the results (default: bench/results/)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (worker logs)")
    for f in Sizes.__dataclass_fields__:
        parser.add_argument(f"--{f.replace('_', '-')}", type=float, default=None, help="override")
    args = parser.parse_args(argv)

    sizes = SMOKE if args.smoke else Sizes()
    overrides = {}
    for f, spec in Sizes.__dataclass_fields__.items():
        value = getattr(args, f)
        if value is not None:
            overrides[f] = value if spec.type == "float" else int(value)
    sizes = replace(sizes, **overrides)
    parts = tuple(p for p in args.only.split(",") if p)
    systems = tuple(s for s in args.systems.split(",") if s)

    workdir = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
    started = time.time()
    lines: list[str] = []

    def say(text: str) -> None:
        text = f"[{time.time() - started:5.1f}s] {text}"
        lines.append(text)
        print(text, flush=True)

    load = os.getloadavg()
    say(f"load average before the run: {' '.join(f'{x:.2f}' for x in load)}, {os.cpu_count()} CPUs")
    if load[0] > 0.5:
        say("  (the machine is busy: the 'other load' column says how much each row shared it)")
    server = RedisServer().start()
    bench = Bench(workdir, server, log=say)
    runs: list[Run] = []
    rss: list[dict[str, Any]] = []
    enqueue: dict[str, Any] = {}
    try:
        for part in ("zero", "latency"):
            if part in parts:
                runs += regime(bench, part, sizes, args.sink, systems)
        if "rss" in parts:
            rss = bench.rss_per_session(
                many=sizes.rss_many,
                few=sizes.rss_few,
                think=sizes.rss_think,
                tls_dir=workdir / "tls",
            )
        if "enqueue" in parts:
            enqueue = bench.enqueue_rate(sizes.enqueue_single, sizes.enqueue_bulk, sizes.bulk_chunk)
    finally:
        server.close()

    items = ratios(runs, rss, sizes)
    report = "\n\n".join([table(runs), ratio_table(items)])
    if enqueue:
        report += "\n\nenqueue rate, producer alone (nobody consuming): " + ", ".join(
            f"{k} {v['rate_per_s']:,.0f} msg/s ({v['cpu_s_per_1000']:.3f} CPU s per 1,000)"
            for k, v in enqueue.items()
        )
    elapsed = time.time() - started
    print()
    print(report)
    print(f"\n(total {elapsed:.0f} s; {'smoke run: not figures' if args.smoke else 'full run'})")

    data = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": elapsed,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "smoke": args.smoke,
        "sink": args.sink,
        "sizes": sizes.__dict__,
        "machine": machine(),
        "runs": [r.to_json() for r in runs],
        "ratios": items,
        "rss": rss,
        "enqueue": enqueue,
        "table": report,
        "log": lines,
        "workdir": str(workdir) if args.keep else None,
    }
    out = args.json
    if out is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))
    print(f"results: {out}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work dir (logs): {workdir}")
    return 0 if all(r.complete for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
