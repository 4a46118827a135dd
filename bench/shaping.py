#!/usr/bin/env python
"""Traffic shaping (issue 18) measured at the relay: fleet-wide rate limits, adaptive
throttling, a wrong key, a spent quota, priority lanes and a cold start.

    python bench/shaping.py                      # every scenario (~20 minutes on 2 shared cores)
    python bench/shaping.py --only rate,lanes    # some of them
    python bench/shaping.py --no-compare         # skip the feature-off runs
    python bench/shaping.py --tree main          # also another commit's workers, same run

Each scenario starts its own redis-server, our aiosmtpd sink (STARTTLS + AUTH, in this
process: it records every session, AUTH and MAIL with its time) and real `mailer worker`
processes, sends with `mailer.send` / `mailer.send_many`, and prints what the sink saw.
Where meaningful the same scenario runs first with the feature off (no rate limit, no lanes,
no connect rate) so each figure has its comparison from the same run. Figures are printed,
never asserted. See bench/README.md ("Traffic shaping") for how to read them.

The sink stamps an event when its loop gets to it, which on a busy machine is later than the
worker sent it; the workers therefore also record, on their side, when each MAIL command and
each session open left (bench/clienttrace), and the rate, adaptive and cold-start figures are
given at both ends. `--tree REF` runs the feature-on runs of those scenarios a second time with
the workers of another commit (exported with `git archive`), right after this checkout's, so
the two are compared under the same load. `SHAPING_KEEP_TRACE=1` keeps those records (a
`shaping-trace-*` folder in the temp dir) for a closer look.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import secrets
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from bench.postfix_throttle import Tree, export_tree  # noqa: E402
from devkit.redis_server import RedisServer  # noqa: E402
from devkit.sink import SeriesKind, SinkServer, TLSMaterial, make_tls_material  # noqa: E402
from devkit.worker import WorkerProcess  # noqa: E402
from workers.state import keys  # noqa: E402

SCENARIOS = ("rate", "minute", "adaptive", "wrongkey", "quota", "lanes", "coldstart")
FROM_ADDR = "Bench <bench@example.com>"
RATE_PREFIX = keys.RATE  # the limiter's keys: mailer:rate, mailer:rate:connect
RETRIED = re.compile(r'"event": ?"retried"')
TRACE_HOOK = REPO / "bench" / "clienttrace"
Say = Callable[[str], None]
THIS = Tree("this checkout", REPO)


def new_key() -> str:
    return "SG." + secrets.token_urlsafe(16)[:22] + "." + secrets.token_urlsafe(32)[:43]


def known(variable: str) -> bool:
    """Whether this checkout reads `variable` (the feature exists) or would ignore it."""
    return any(
        variable in path.read_text()
        for pkg in ("mailer", "workers")
        for path in (REPO / pkg).rglob("*.py")
    )


def feature_note(variable: str) -> str:
    return "" if known(variable) else f"  [{variable} unknown to this checkout: feature-off run]"


# ---- one scenario's stack: Redis, sink, workers, producer -------------------------------------


class Fleet:
    """A private redis-server, the sink and worker processes; the producer (this process) is
    pointed at them for as long as the fleet is open."""

    def __init__(
        self,
        material: TLSMaterial,
        *,
        env: dict[str, str] | None = None,
        sink: dict[str, Any] | None = None,
        worker_key: str | None = None,
        tree: Tree = THIS,
    ) -> None:
        self.key = new_key()
        self.tree = tree
        self.trace = Path(tempfile.mkdtemp(prefix="shaping-trace-"))
        self.redis = RedisServer().start()
        self.sink = SinkServer(
            tls="starttls",
            auth=("apikey", self.key),
            tls_material=material,
            record_data=False,
            **(sink or {}),
        ).start()
        self.env = {
            "MAILER_BROKER_URL": self.redis.url,
            "MAILER_SMTP_HOST": "localhost",
            "MAILER_SMTP_PORT": str(self.sink.port),
            "MAILER_SMTP_TLS": "starttls",
            "MAILER_SMTP_CA_FILE": str(material.ca_file),
            "MAILER_SMTP_PASSWORD": worker_key or self.key,
            "MAILER_DEFAULT_FROM": FROM_ADDR,
            **(env or {}),
        }
        # The workers' side of the figures (bench/clienttrace): not the producer's.
        self.worker_env = {
            **self.env,
            "PYTHONPATH": os.pathsep.join((str(tree.path), str(TRACE_HOOK))),
            "MAILER_BENCH_TRACE": str(self.trace),
        }
        self.workers: list[WorkerProcess] = []
        self.client = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        import mailer

        mailer.reset_default_mailer()

    def start_workers(self, n: int, tag: str = "w") -> list[WorkerProcess]:
        """Starts `n` worker processes at once (each imports Celery for seconds)."""
        fresh = [
            WorkerProcess(self.worker_env, name=f"{tag}{len(self.workers) + i}") for i in range(n)
        ]
        self.workers += fresh
        # `python -m mailer` puts the cwd first on sys.path: the tree's own package loads.
        with contextlib.chdir(self.tree.path), ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda w: w.start(timeout=120), fresh))
        return fresh

    def close(self) -> None:
        import mailer

        with ThreadPoolExecutor(max(1, len(self.workers))) as pool:
            list(pool.map(lambda w: w.stop(timeout=30), self.workers))
        mailer.reset_default_mailer()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.client.close()
        self.sink.stop()
        self.redis.close()
        if not os.environ.get("SHAPING_KEEP_TRACE"):
            shutil.rmtree(self.trace, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- readings

    def delivered(self) -> int:
        return len(self.sink.message_ids())

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.sink.message_ids().values() if n > 1)

    def dead_letters(self) -> int:
        from workers.state.deadletters import DeadLetters

        return DeadLetters(self.client).count()

    def retried(self) -> int:
        """`retried` events in the workers' logs (a message sent back to its retry budget)."""
        return sum(1 for w in self.workers for line in w.lines if RETRIED.search(line))

    def key_in_logs(self) -> bool:
        return any(
            self.key in line or self.env["MAILER_SMTP_PASSWORD"] in line
            for w in self.workers
            for line in w.lines
        )

    def wait_delivered(self, n: int, timeout: float) -> float | None:
        """Waits until `n` distinct messages arrived; the wall-clock time it happened, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.delivered() >= n:
                return time.time()
            time.sleep(0.1)
        return None

    def pid_names(self) -> dict[int, str]:
        return {w.pid: w.name for w in self.workers}

    def client_events(self, kind: str) -> list[list[str]]:
        """The workers' own records of `kind` (bench/clienttrace): time first, sorted."""
        events: list[list[str]] = []
        for path in self.trace.iterdir():
            for line in path.read_text().splitlines():
                name, *fields = line.split()
                if name == kind:
                    events.append(fields)
        return sorted(events, key=lambda e: float(e[0]))

    def client_times(self, kind: str) -> list[float]:
        """Sorted wall-clock times at which the workers wrote `kind` (mail, open) themselves."""
        return [float(e[0]) for e in self.client_events(kind)]

    def token_note(self, key: str, used: int) -> str:
        """Tokens the workers were granted against those used: the difference went unused."""
        grants = [int(e[1]) for e in self.client_events("grant") if e[2] == key]
        granted = sum(grants)
        late = len(self.client_events("late"))
        return (
            f"tokens granted {granted:,} in {len(grants):,} calls ({grants.count(0):,} refused),"
            f" used {used:,}, unused {granted - used:,}; attempts re-admitted late {late:,}"
        )

    def check_note(self) -> str:
        """How far from its token's time each metered attempt got its session."""
        checks = self.client_events("check")
        if not checks:
            return "no metered attempt checked its token"
        offsets = sorted(float(e[1]) for e in checks)
        leads = sorted(float(e[2]) for e in checks)
        cuts = " ".join(f"p{p} {percentile(offsets, p) * 1000:+.0f}" for p in (10, 50, 90, 99))
        late = sum(1 for x in offsets if x > 0.01)
        return (
            f"session got, ms after the token's time: {cuts}; over 10 ms late {late:,} of"
            f" {len(offsets):,}; lead p50 {percentile(leads, 50) * 1000:.0f} ms"
        )

    def accepted_mail_times(self) -> list[float]:
        """When the sink answered 250 to each MAIL (not the 250 after the body)."""
        return sorted(m.at for m in self.sink.mail_replies if m.accepted)


class Ceilings:
    """Samples the fleet's adaptive ceiling (`mailer status`'s reading) every 0.25 s."""

    def __init__(self, fleet: Fleet) -> None:
        self.client = fleet.client
        self.samples: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from workers.state.ratelimit import peek_ceiling

        while not self._stop.wait(0.25):
            with contextlib.suppress(redis.RedisError):
                self.samples.append((time.time(), peek_ceiling(self.client).rate))

    def series(self, start: float) -> str:
        """The ceiling at the end of each second from `start` (- when none was in force)."""
        last: dict[int, float | None] = {}
        for at, rate in self.samples:
            last[int(at - start)] = rate
        shown = [last.get(i) for i in range(max(last, default=-1) + 1)]
        return series([f"{r:.0f}" if r is not None else "-" for r in shown], limit=60)

    def __enter__(self) -> Ceilings:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def produce(n: int, tag: str, chunk: int = 1000, **fields: Any) -> list[str]:
    """`n` messages through `mailer.send_many` in chunks; their ids in order."""
    import mailer

    ids: list[str] = []
    for start in range(0, n, chunk):
        ids += mailer.send_many(
            [
                {
                    "to": f"{tag}{i}@example.com",
                    "subject": f"{tag} {i}",
                    "text": "shaping bench\n",
                    **fields,
                }
                for i in range(start, min(start + chunk, n))
            ]
        )
    return ids


class Arrivals:
    """Our id -> when the sink first answered 250 to it, read incrementally: the sink's loop
    runs in this process, and copying 100,000 records every 0.1 s held it up for its GIL."""

    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink
        self.read = 0
        self.ids: dict[str, float] = {}

    def update(self) -> dict[str, float]:
        new = self.sink.received_since(self.read)
        self.read += len(new)
        for r in new:
            if r.message_id is not None:
                self.ids.setdefault(r.message_id.split("@", 1)[0], r.received_at)
        return self.ids


#: The transactional burst runs in its own process, as an application's would: in this one,
#: 1,000 `mailer.send` calls in a loop took the GIL from the sink's loop thread, which then
#: stamped the 250s late.
BURST = """
import json, sys, time, mailer
n, lane = int(sys.argv[1]), sys.argv[2]
extra = {"lane": lane} if lane else {}
out = {}
for i in range(n):
    at = time.time()
    out[mailer.send(to=f"tx{i}@example.com", subject=f"tx {i}", text="hi\\n", **extra)] = at
print(json.dumps(out))
"""


def burst(env: dict[str, str], n: int, lane: str) -> dict[str, float]:
    """`n` transactional `mailer.send` calls from another process: id -> enqueue time."""
    done = subprocess.run(
        [sys.executable, "-c", BURST, str(n), lane],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return {str(k): float(v) for k, v in json.loads(done.stdout).items()}


def stages(fleet: Fleet, enqueued: dict[str, float], arrived: dict[str, float]) -> str:
    """Where a transactional message's time went (p50/p99, ms), from the workers' own records:
    enqueue -> the worker's engine (broker, Celery), -> past its attempts gate, -> its MAIL
    written (tokens, session), -> the sink's 250 (the transaction, the sink's loop)."""
    by_tx: dict[str, dict[str, float]] = {}
    for kind in ("fetched", "dispatched", "engine", "arrive", "mail"):
        for event in fleet.client_events(kind):
            if len(event) > 1:
                by_tx.setdefault(event[1], {}).setdefault(kind, float(event[0]))
    spans: dict[str, list[float]] = {
        "fetched": [], "dispatched": [], "engine": [], "gate": [], "mail": [], "250": []
    }  # fmt: skip
    tx_of = {mid: i for i, mid in enumerate(enqueued)}  # the burst sent tx0, tx1, ... in order
    for mid, at in enqueued.items():
        times = by_tx.get(f"tx{tx_of[mid]}", {})
        if {"fetched", "dispatched", "engine", "arrive", "mail"} <= times.keys() and mid in arrived:
            spans["fetched"].append(times["fetched"] - at)
            spans["dispatched"].append(times["dispatched"] - times["fetched"])
            spans["engine"].append(times["engine"] - times["dispatched"])
            spans["gate"].append(times["arrive"] - times["engine"])
            spans["mail"].append(times["mail"] - times["arrive"])
            spans["250"].append(arrived[mid] - times["mail"])
    if not spans["engine"]:
        return "stages: no worker records (bench/clienttrace)"
    return "stages, ms p50/p99: " + ", ".join(
        f"{name} {percentile(v, 50) * 1000:.0f}/{percentile(v, 99) * 1000:.0f}"
        for name, v in (
            ("enqueue->Celery's handler", spans["fetched"]),
            ("->dispatch thread", spans["dispatched"]),
            ("->engine", spans["engine"]),
            ("->past the gate", spans["gate"]),
            ("->MAIL", spans["mail"]),
            ("->250", spans["250"]),
        )
    )


def local_ids(sink: SinkServer) -> dict[str, float]:
    """Our id (the Message-ID's local part) -> when the sink first answered 250 to it."""
    out: dict[str, float] = {}
    for r in sink.received:
        if r.message_id is not None:
            out.setdefault(r.message_id.split("@", 1)[0], r.received_at)
    return out


# ---- Redis command accounting ------------------------------------------------------------------


def commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})


class _Counts:
    """What `Monitor` counts, in the monitoring process."""

    def __init__(self) -> None:
        self.rate_commands: Counter[str] = Counter()  # sent by clients, by command name
        self.rate_in_scripts = 0  # run by scripts
        self.evalsha: Counter[str] = Counter()
        self.evalsha_by_key: Counter[str] = Counter()  # by the area of the script's first key
        self.rate_scripts: set[str] = set()

    def count(self, line: bytes) -> None:
        parts = line.split(b'"')
        command = parts[1].lower() if len(parts) > 1 else b""
        rate = RATE_PREFIX.encode() in line
        if rate and parts[0].endswith(b" lua] "):
            self.rate_in_scripts += 1
            return
        if rate:
            self.rate_commands[command.decode(errors="replace")] += 1
        if command == b"evalsha" and len(parts) > 3:
            sha = parts[3].decode()
            self.evalsha[sha] += 1
            first_key = parts[7].decode(errors="replace") if len(parts) > 7 else "-"
            self.evalsha_by_key[":".join(first_key.split(":")[:2])] += 1
            if rate:
                self.rate_scripts.add(sha)


def _monitor(port: int, control: Any) -> None:
    """The monitoring process: reads MONITOR until told to stop, then sends its counts."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"MONITOR\r\n")
    counts, buffer = _Counts(), b""
    control.send("ready")
    while True:
        readable, _, _ = select.select([sock, control], [], [])
        if control in readable:
            break
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\r\n")
        for line in lines:
            counts.count(line)
    sock.close()
    control.send(vars(counts))  # plain types: the class is __mp_main__'s here


class Monitor:
    """Counts, through MONITOR, the commands that name a rate-limit key (`mailer:rate*`) and
    the EVALSHA calls per script: the limiter's own cost, told apart from the ledger's.
    MONITOR also lists the commands a script runs (client `lua`): counted apart, they are work
    inside Redis, not round trips. It reads in a process of its own: parsing thousands of
    lines a second in the bench process would hold up the sink's loop (same interpreter lock)
    and bunch the timestamps it takes."""

    def __init__(self, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(target=_monitor, args=(port, child), daemon=True)
        self._process.start()
        self._control.recv()  # MONITOR is on before the run starts
        self.counts = _Counts()

    def stop(self) -> None:
        self._control.send("stop")
        if self._control.poll(30):
            self.counts.__dict__.update(self._control.recv())
        self._process.join(10)

    @property
    def rate_commands(self) -> Counter[str]:
        return self.counts.rate_commands

    @property
    def rate_in_scripts(self) -> int:
        return self.counts.rate_in_scripts

    @property
    def evalsha(self) -> Counter[str]:
        return self.counts.evalsha

    @property
    def evalsha_by_key(self) -> Counter[str]:
        return self.counts.evalsha_by_key

    @property
    def rate_scripts(self) -> set[str]:
        return self.counts.rate_scripts


# ---- figures -----------------------------------------------------------------------------------


def steady_rate(times: Sequence[float]) -> float | None:
    """Messages per second between 10% and 90% delivered (no ramp-up, no tail)."""
    if len(times) < 10:
        return None
    lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
    return (len(times) * 8 // 10) / (hi - lo) if hi > lo else None


def stall_note(sink: SinkServer, start: float, end: float) -> str:
    """How long the sink's own loop was held up meanwhile (its timestamps bunch after that)."""
    stalls = [lag for _, lag in sink.stalls(start, end)]
    over = sum(1 for lag in stalls if lag > 0.1)
    return (
        f"sink loop held up > 100 ms {over} times, longest {max(stalls, default=0) * 1000:.0f} ms"
    )


def series(counts: Sequence[object], limit: int = 40) -> str:
    shown = " ".join(str(c) for c in counts[:limit])
    return shown + (f" ... ({len(counts)} s)" if len(counts) > limit else "")


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def fmt(value: float | None, spec: str = ",.0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


# ---- scenarios ---------------------------------------------------------------------------------


def scenario_rate(args: argparse.Namespace, material: TLSMaterial, say: Say) -> None:
    limit = args.rate_limit
    per_second = parse_rate(limit)
    n = int(per_second * args.rate_seconds)
    note = feature_note("MAILER_RATE_LIMIT")
    say(f"rate: {args.rate_workers} workers, {n:,} messages (send_many){note}")
    runs = [("off", None, THIS)] if args.compare else []
    runs += [(f"{limit} [{tree.label}]", limit, tree) for tree in args.trees]
    for label, value, tree in runs:
        env: dict[str, str] = {"MAILER_RATE_LIMIT": value} if value else {}
        with Fleet(material, env=env, tree=tree) as fleet:
            fleet.start_workers(args.rate_workers)
            monitor = Monitor(fleet.redis.port)
            before = commandstats(fleet.client)
            started = time.time()
            produce(n, "rate")
            done = fleet.wait_delivered(n, timeout=n / per_second * 3 + 120)
            calls = commandstats(fleet.client) - before
            monitor.stop()
            sink = fleet.sink
            steady = steady_rate(sink.timestamps("accepted"))
            share = steady and 100 * steady / per_second
            took = done and done - started
            rate_scripts = sum(monitor.evalsha[s] for s in monitor.rate_scripts)
            say(f"  {label}")
            say(
                f"    delivered {fleet.delivered():,}/{n:,} in {fmt(took, '.1f', ' s')};"
                f" steady {fmt(steady)}/s = {fmt(share, '.1f', '%')} of {per_second:,.0f}/s"
            )
            ends(
                say,
                "messages",
                sink.timestamps("accepted"),
                fleet.accepted_mail_times(),
                fleet.client_times("mail"),
                per_second,
            )
            say(
                f"    Redis per message: {sum(calls.values()) / n:.2f} commands,"
                f" EVALSHA {calls['evalsha'] / n:.3f} (all scripts),"
                f" naming {RATE_PREFIX}* {monitor.rate_commands.total() / n:.3f}"
                f" ({by_command(monitor.rate_commands, n)}), of which the limiter's script"
                f" {rate_scripts / n:.3f} (running {monitor.rate_in_scripts / n:.2f} commands)"
            )
            say(
                f"    EVALSHA per message by the script's first key:"
                f" {by_command(monitor.evalsha_by_key, n)}"
            )
            say(
                f"    dead letters {fleet.dead_letters()}, duplicates {fleet.duplicates()};"
                f" {stall_note(sink, started, time.time())}"
            )
            say(f"    accepted/s: {series(sink.per_second('accepted', start=started))}")
            mails = per_second_of(fleet.client_times("mail"), started)
            say(f"    workers' MAIL/s: {series(mails)}")
            chained = per_second_of(fleet.client_times("chained"), started)
            say(f"    of which written behind the previous body: {series(chained)}")
            say(f"    {fleet.token_note(keys.RATE, n)}")
            say(f"    {fleet.check_note()}")


def ends(
    say: Say,
    what: str,
    sink_end: Sequence[float],
    sink_start: Sequence[float] | None,
    client: Sequence[float],
    per_second: float,
) -> None:
    """The most `what` in any 1 s window and in any wall-clock second, at each end: the sink's
    stamp of the transaction's end (the issue's figure) and of its MAIL, and the workers' own
    stamp of the MAIL they wrote (what the pacing decides; the sink's add its loop's delays)."""
    parts = [("sink, 250 after the body" if sink_start is not None else "sink", sink_end)]
    if sink_start is not None:
        parts.append(("sink, 250 to MAIL", sink_start))
    parts.append(("workers, MAIL written" if sink_start is not None else "workers", client))
    figures = "; ".join(
        f"{name} {window_max(times, 1.0):,} ({wall_max(times):,})" for name, times in parts
    )
    say(f"    most {what} in any 1 s window (wall-clock second), limit {per_second:,.0f}:")
    say(f"      {figures}")


def window_max(times: Sequence[float], window: float) -> int:
    ordered = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ordered):
        while ordered[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def wall_max(times: Sequence[float]) -> int:
    return max(Counter(int(t) for t in times).values(), default=0)


def per_second_of(times: Sequence[float], start: float) -> list[int]:
    if not times:
        return []
    out = [0] * (int(max(times)) - int(start) + 1)
    for t in times:
        if t >= int(start):
            out[int(t) - int(start)] += 1
    return out


def scenario_minute(args: argparse.Namespace, material: TLSMaterial, say: Say) -> None:
    limit = args.minute_limit
    per_second = parse_rate(limit)
    window = window_seconds(limit)
    n = int(per_second * args.minute_seconds)
    note = feature_note("MAILER_RATE_LIMIT")
    say(
        f"minute: {args.rate_workers} workers, {limit} ({window:.0f} s window), {n:,} messages"
        f" over ~{args.minute_seconds:.0f} s (feature-off: see rate){note}"
    )
    with Fleet(material, env={"MAILER_RATE_LIMIT": limit}) as fleet:
        fleet.start_workers(args.rate_workers)
        started = time.time()
        produce(n, "minute")
        done = fleet.wait_delivered(n, timeout=args.minute_seconds * 3 + 120)
        sink = fleet.sink
        steady = steady_rate(sink.timestamps("accepted"))
        share = steady and 100 * steady / per_second
        took = done and done - started
        say(
            f"  delivered {fleet.delivered():,}/{n:,} in {fmt(took, '.1f', ' s')};"
            f" max in any {window:.0f} s window {sink.max_in_window('accepted', window):,}"
            f" (limit {per_second * window:,.0f}); max in any 1 s"
            f" {sink.max_in_window('accepted', 1.0):,}; steady {fmt(steady)}/s"
            f" = {fmt(share, '.1f', '%')}; dead letters {fleet.dead_letters()}"
        )
        say(f"  {stall_note(sink, started, time.time())}")


def scenario_adaptive(args: argparse.Namespace, material: TLSMaterial, say: Say) -> None:
    cap = args.adaptive_throttle
    throttled_s = args.adaptive_seconds
    n = int(cap * throttled_s + args.adaptive_lifted_messages)
    say(
        f"adaptive: the sink answers 421 to every MAIL above {cap}/s for {throttled_s:.0f} s,"
        f" then lifts it; {args.rate_workers} workers, {n:,} messages, no MAILER_RATE_LIMIT"
    )
    for tree in args.trees:
        adaptive_run(args, material, say, tree, n)


def adaptive_run(
    args: argparse.Namespace, material: TLSMaterial, say: Say, tree: Tree, n: int
) -> None:
    cap = args.adaptive_throttle
    throttled_s, lifted_s = args.adaptive_seconds, args.adaptive_lifted_seconds
    say(f"  [{tree.label}]")
    with Fleet(material, sink={"throttle_rate": cap}, tree=tree) as fleet:
        fleet.start_workers(args.rate_workers)
        started = time.time()
        with Ceilings(fleet) as ceilings:
            produce(n, "adaptive")
            time.sleep(max(0.0, started + throttled_s - time.time()))
            lifted = time.time()
            fleet.sink.throttle_rate = None
            time.sleep(lifted_s)
            done = fleet.wait_delivered(n, timeout=args.drain_timeout)
        sink = fleet.sink
        during = sink.per_second("accepted", start=started, end=lifted - 1)
        settled = next(
            (i for i in range(len(during)) if all(abs(c - cap) <= cap / 10 for c in during[i:])),
            None,
        )
        settled_rate = statistics.mean(during[settled:]) if settled is not None else None

        def phase(kind: SeriesKind) -> int:
            return sum(1 for t in sink.timestamps(kind) if started <= t < lifted)

        accepted, refused = phase("accepted"), phase("refused")
        tail = during[10:]
        within = sum(1 for c in tail if abs(c - cap) <= cap / 10)
        say(
            f"  from 10 s on: {within} of {len(tail)} seconds within 10% of {cap}/s, mean"
            f" {fmt(statistics.mean(tail) if tail else None)}/s (a second the sink's loop was"
            f" held up reads low, the next high)"
        )
        say(
            f"  settled within 10% of {cap}/s after"
            f" {'never' if settled is None else f'{settled} s'};"
            f" settled rate {fmt(settled_rate)}/s; throttled phase: {accepted:,} accepted,"
            f" {refused:,} MAILs refused ({fmt(100 * refused / max(1, accepted), '.1f', '%')}"
            f" of accepted), {phase('sessions'):,} sessions opened"
        )
        say(f"  accepted/s throttled: {series(during)}; {stall_note(sink, started, lifted)}")
        mails = per_second_of([t for t in fleet.client_times("mail") if t < lifted], started)
        say(f"  workers' MAIL/s throttled: {series(mails)}")
        say(f"  ceiling (msg/s) each second: {ceilings.series(started)}")
        after = sink.per_second("accepted", start=lifted, end=done or time.time())
        back = next((i for i, c in enumerate(after) if c >= cap), None)
        say(f"  accepted/s lifted:    {series(after)}")
        say(f"  back at {cap}/s or more {'never' if back is None else f'{back} s'} after the lift")
        outcome = f"yes, {done - started:.1f} s after the first enqueue" if done else "no"
        say(
            f"  all {n:,} delivered: {outcome} ({fleet.delivered():,}); dead letters"
            f" {fleet.dead_letters()}, duplicates {fleet.duplicates()},"
            f" retried events {fleet.retried():,}"
        )


def scenario_wrongkey(args: argparse.Namespace, material: TLSMaterial, say: Say) -> None:
    probe = args.probe_interval
    say(
        f"wrong key: {args.rate_workers} workers with a key the sink does not accept,"
        f" {args.wrongkey_messages} messages, watched {args.wrongkey_seconds:.0f} s,"
        f" MAILER_CIRCUIT_PROBE_INTERVAL={probe:g}"
    )
    env = {"MAILER_CIRCUIT_PROBE_INTERVAL": str(probe)}
    with Fleet(material, env=env, sink={"peer_pids": True}, worker_key=new_key()) as fleet:
        fleet.start_workers(args.rate_workers)
        started = time.time()
        produce(args.wrongkey_messages, "wrongkey")
        time.sleep(args.wrongkey_seconds)
        failures = [a for a in fleet.sink.auth_failures() if a.at >= started]
        names = fleet.pid_names()
        per_process = Counter(names.get(a.peer_pid or 0, f"pid {a.peer_pid}") for a in failures)
        first_2s = sum(1 for a in failures if a.at < started + 2)
        sessions = {s.id: s for s in fleet.sink.sessions}
        failed_sessions = {a.session_id for a in failures}
        no_quit = sum(1 for i in failed_sessions if not sessions[i].quit)
        say(
            f"  failed AUTHs: {len(failures)} in {args.wrongkey_seconds:.0f} s, {first_2s} in the"
            f" first 2 s; per worker process {dict(sorted(per_process.items()))}"
            f" (max {max(per_process.values(), default=0)}); gaps between them (s):"
            f" {gaps([a.at for a in failures])}"
        )
        offsets = ", ".join(
            f"{names.get(a.peer_pid or 0, a.peer_pid)} +{a.at - started:.1f}s"
            for a in failures[:12]
        )
        say(f"  failed AUTHs at: {offsets}")
        say(
            f"  mechanisms {dict(Counter(a.mechanism for a in failures))},"
            f" replies {dict(Counter(a.code for a in failures))},"
            f" sessions closed without QUIT {no_quit}/{len(failed_sessions)};"
            f" key in worker logs: {fleet.key_in_logs()}"
        )
        fleet.sink.auth = ("apikey", fleet.env["MAILER_SMTP_PASSWORD"])  # the key is fixed
        restored = time.time()
        done = fleet.wait_delivered(args.wrongkey_messages, timeout=probe * 3 + 60)
        first = next((t for t in fleet.sink.timestamps("accepted") if t >= restored), None)
        say(
            f"  key restored: first message {fmt(first and first - restored, '.1f', ' s')} later,"
            f" all delivered: {'yes' if done else 'no'}; dead letters {fleet.dead_letters()},"
            f" duplicates {fleet.duplicates()}"
        )


def scenario_quota(args: argparse.Namespace, material: TLSMaterial, say: Say) -> None:
    probe = args.probe_interval
    n = args.quota_messages
    note = feature_note("MAILER_QUOTA_PROBE_INTERVAL")
    say(
        f"quota: AUTH answered '451 ... Maximum credits exceeded' for {args.quota_seconds:.0f} s,"
        f" {args.rate_workers} workers, {n} messages, MAILER_QUOTA_PROBE_INTERVAL={probe:g}{note}"
    )
    env = {"MAILER_QUOTA_PROBE_INTERVAL": str(probe), "MAILER_CIRCUIT_PROBE_INTERVAL": str(probe)}
    with Fleet(material, env=env, sink={"peer_pids": True}) as fleet:
        fleet.start_workers(args.rate_workers)
        fleet.sink.start_quota(args.quota_seconds)
        started = time.time()
        produce(n, "quota")
        ends = started + args.quota_seconds
        time.sleep(max(0.0, ends - time.time()))
        done = fleet.wait_delivered(n, timeout=probe * 3 + args.drain_timeout)
        sink = fleet.sink
        attempts = [a for a in sink.auth_attempts if started <= a.at < ends]
        quota = [a.at for a in attempts if a.code == 451]
        accepted = sum(1 for t in sink.timestamps("accepted") if started <= t < ends)
        first = next((t for t in sink.timestamps("accepted") if t >= ends), None)
        offsets = ", ".join(f"+{t - started:.1f}s" for t in quota[:12])
        say(
            f"  during the quota: {len(quota)} AUTHs answered 451 (at {offsets}; gaps (s):"
            f" {gaps(quota)}), {len(attempts) - len(quota)} other AUTH replies, {accepted}"
            f" messages accepted (on sessions authenticated before)"
        )
        say(
            f"  quota ended: first message {fmt(first and first - ends, '.1f', ' s')} later;"
            f" all {n} delivered: {'yes' if done else f'no ({fleet.delivered()})'};"
            f" dead letters {fleet.dead_letters()}; duplicates {fleet.duplicates()};"
            f" key in worker logs: {fleet.key_in_logs()}"
        )


def scenario_lanes(args: argparse.Namespace, material: TLSMaterial, say: Say) -> None:

    bulk_n, tx_n = args.lanes_bulk, args.lanes_transactional
    note = feature_note("MAILER_LANES")
    say(
        f"lanes: {args.rate_workers} workers, a bulk backlog of {bulk_n:,} (send_many), then"
        f" {tx_n:,} transactional (mailer.send, one by one); MAILER_LANES={args.lanes}{note}"
    )
    runs: list[tuple[str, str | None]] = [("off", None)] if args.compare else []
    if known("MAILER_LANES"):
        runs.append(("lanes", args.lanes))
    for label, lanes in runs:
        env: dict[str, str] = (
            {"MAILER_LANES": lanes, "MAILER_DEFAULT_LANE": "bulk"} if lanes else {}
        )
        with Fleet(material, env=env) as fleet:
            fleet.start_workers(args.rate_workers)
            bulk_ids = set(produce(bulk_n, "bulk"))
            time.sleep(args.lanes_warm)
            sink = fleet.sink
            arrivals = Arrivals(sink)
            if len(bulk_ids & arrivals.update().keys()) >= bulk_n:
                say(f"  {label:<10} the bulk backlog drained before the burst: raise --lanes-bulk")
                continue
            started = time.time()
            enqueued = burst(fleet.env, tx_n, "transactional" if lanes else "")
            deadline = time.monotonic() + args.drain_timeout + bulk_n / 100
            while time.monotonic() < deadline and not enqueued.keys() <= arrivals.update().keys():
                time.sleep(0.1)
            time.sleep(5)  # the "5 s after" window
            arrived = arrivals.update()
            latencies = [arrived[i] - at for i, at in enqueued.items() if i in arrived]
            tx_done = max((arrived[i] for i in enqueued if i in arrived), default=time.time())
            bulk_times = sorted(t for i, t in arrived.items() if i in bulk_ids)
            bulk_left = bulk_n - sum(1 for t in bulk_times if t <= tx_done)
            burst_at = min(enqueued.values(), default=started)
            before = rate_between(bulk_times, burst_at - 5, burst_at)
            during = rate_between(bulk_times, burst_at, tx_done)
            share = 100 * during / before if before else None
            total = during + len(latencies) / (tx_done - burst_at) if tx_done > burst_at else None
            after = rate_between(bulk_times, tx_done, tx_done + 5)
            p50 = percentile(latencies, 50) if latencies else None
            p99 = percentile(latencies, 99) if latencies else None
            say(
                f"  {label:<10} transactional: {len(latencies):,}/{tx_n:,} delivered,"
                f" enqueue->250 p50 {fmt(p50, '.3f', ' s')}, p99 {fmt(p99, '.3f', ' s')},"
                f" max {fmt(max(latencies, default=None), '.3f', ' s')};"
                f" bulk still queued when the last one arrived: {bulk_left:,}"
            )
            span = max(enqueued.values(), default=burst_at) - burst_at
            floor = tx_n / before - span if before else None
            say(
                f"  {'':<10} enqueued in {span:.2f} s; at the fleet's rate before the burst"
                f" ({before:,.0f} msg/s) the last one cannot arrive less than"
                f" {fmt(floor, '.2f', ' s')} after its enqueue even with all of it"
            )
            say(
                f"  {'':<10} bulk msg/s: before {before:,.0f}, during the transactional burst"
                f" {during:,.0f} ({fmt(share, '.0f', '%')} of before; with the transactional"
                f" ones {fmt(total)}), 5 s after {after:,.0f};"
                f" duplicates {fleet.duplicates()}, dead letters {fleet.dead_letters()}"
            )
            say(f"  {'':<10} {stall_note(sink, burst_at - 5, tx_done + 5)}")
            say(f"  {'':<10} {stages(fleet, enqueued, arrived)}")


def scenario_coldstart(args: argparse.Namespace, material: TLSMaterial, say: Say) -> None:
    n = args.coldstart_messages
    note = feature_note("MAILER_CONNECT_RATE")
    say(f"cold start: {args.coldstart_workers} workers started at once on a backlog of {n:,}{note}")
    runs: list[tuple[str, int | None, Tree]] = [("off", None, THIS)] if args.compare else []
    runs += [(f"{args.connect_rate}/s [{t.label}]", args.connect_rate, t) for t in args.trees]
    for label, rate, tree in runs:
        env = {"MAILER_CONNECT_RATE": str(rate)} if rate else {}
        with Fleet(material, env=env, tree=tree) as fleet:
            produce(n, "cold")
            started = time.time()
            fleet.start_workers(args.coldstart_workers)
            ready = time.time()
            done = fleet.wait_delivered(n, timeout=args.drain_timeout)
            sink = fleet.sink
            outcome = f"all, {done - started:.1f} s after start" if done else fleet.delivered()
            say(
                f"  {label:<10} sessions opened {len(sink.sessions):,}, most in any 1 s window"
                f" {sink.max_in_window('sessions', 1.0)}, peak open {sink.peak_connections};"
                f" workers all ready {ready - started:.1f} s after start; delivered {outcome}"
            )
            opens = fleet.client_times("open")
            ends(say, "new sessions", sink.timestamps("sessions"), None, opens, rate or 0)
            say(
                f"  {'':<10} sessions/s: {series(sink.per_second('sessions', start=started))};"
                f" {stall_note(sink, started, time.time())}"
            )
            say(f"  {'':<10} workers' opens/s: {series(per_second_of(opens, started))}")
            say(f"  {'':<10} {fleet.token_note(keys.RATE_CONNECT, len(opens))}")


def rate_between(times: Sequence[float], a: float, b: float) -> float:
    return sum(1 for t in times if a <= t < b) / (b - a) if b > a else 0.0


def by_command(counts: Counter[str], n: int) -> str:
    return ", ".join(f"{name} {count / n:.3f}" for name, count in counts.most_common(5)) or "-"


def gaps(times: Sequence[float]) -> str:
    """Seconds between consecutive events: at most one per probe interval reads as gaps of at
    least the interval (after the first attempts, which processes may make at once)."""
    ordered = sorted(times)
    return " ".join(f"{b - a:.1f}" for a, b in pairwise(ordered)) or "-"


UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def window_seconds(limit: str) -> float:
    unit = limit.split(",")[0].split("/", 1)[1].split(":", 1)[0]
    if unit not in UNITS:
        raise argparse.ArgumentTypeError(f"unknown unit {unit!r} in {limit!r} (s, min, h, d)")
    return UNITS[unit]


def parse_rate(limit: str) -> float:
    """Messages per second of a `N/unit[:burst]` window (the first of a list)."""
    count, _, _ = limit.split(",")[0].partition("/")
    try:
        return int(count) / window_seconds(limit)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a rate like 300/s: {limit!r}") from None


RUNNERS = {
    "rate": scenario_rate,
    "minute": scenario_minute,
    "adaptive": scenario_adaptive,
    "wrongkey": scenario_wrongkey,
    "quota": scenario_quota,
    "lanes": scenario_lanes,
    "coldstart": scenario_coldstart,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the feature-off comparison runs",
    )
    parser.add_argument("--rate-limit", default="300/s")
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="run length at the limit")
    parser.add_argument("--rate-workers", type=int, default=4)
    parser.add_argument("--minute-limit", default="18000/min")
    parser.add_argument("--minute-seconds", type=float, default=75.0)
    parser.add_argument("--adaptive-throttle", type=int, default=200)
    parser.add_argument("--adaptive-seconds", type=float, default=30.0)
    parser.add_argument("--adaptive-lifted-seconds", type=float, default=10.0)
    parser.add_argument("--adaptive-lifted-messages", type=int, default=10_000)
    parser.add_argument("--probe-interval", type=float, default=10.0)
    parser.add_argument("--wrongkey-messages", type=int, default=100)
    parser.add_argument("--wrongkey-seconds", type=float, default=35.0)
    parser.add_argument("--quota-seconds", type=float, default=30.0)
    parser.add_argument("--quota-messages", type=int, default=200)
    parser.add_argument("--lanes", default="transactional:20%,bulk")
    parser.add_argument("--lanes-bulk", type=int, default=100_000)
    parser.add_argument("--lanes-transactional", type=int, default=1_000)
    parser.add_argument(
        "--lanes-warm",
        type=float,
        default=5.0,
        help="seconds the bulk lane runs saturated before the burst",
    )
    parser.add_argument("--connect-rate", type=int, default=50)
    parser.add_argument("--coldstart-workers", type=int, default=8)
    parser.add_argument("--coldstart-messages", type=int, default=4_000)
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument(
        "--tree",
        default="",
        help="also run the rate, adaptive and cold-start runs with this git ref's workers",
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    for flag in ("rate_limit", "minute_limit"):
        try:
            parse_rate(getattr(args, flag))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--{flag.replace('_', '-')}: {exc}")

    def say(line: str) -> None:
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="shaping-bench-") as tmp:
        material = make_tls_material(Path(tmp))
        args.trees = [THIS]
        if args.tree:
            args.trees.append(export_tree(args.tree, Path(tmp) / "tree"))
        say(
            f"shaping bench: {', '.join(chosen)}; {os.cpu_count()} CPUs, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        for name in chosen:
            began = time.monotonic()
            RUNNERS[name](args, material, say)
            say(f"  ({name}: {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
