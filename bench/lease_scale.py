"""The lease semaphore at SendGrid scale: cap 10,000, more demand than that, a real SMTP sink.

Not a CI test (figures are printed, never asserted). What runs, all on this machine:

- a private `redis-server` (AOF on, like production) holding the leases;
- Postfix's `smtp-sink` on a free port of 127.0.0.1, allowed more sessions than the cap (`-m`) so
  that only the leases can keep the count down;
- `--processes` plain Python processes (24 by default), each one asyncio loop with one
  `LeaseSemaphore` + `LeaseKeeper` and `--per-process` connection slots (500: demand 12,000).
  Slots start spread over `--ramp` s, then loop: acquire a lease (waiting up to `--wait` s) ->
  connect (plain SMTP) -> send `--messages` messages spread over a hold time drawn from `--hold`
  (keep it under smtp-sink's 100 s idle timeout) -> QUIT, wait for the sink to hang up ->
  release. A connection given up any other way (connect or greeting timeout, a lease the keeper
  reports lost) is reset (SO_LINGER 0) before its lease is released, so that its server end is
  gone too. smtp-sink and Redis run at a higher priority: they stand in for other machines.

Measured:
- sink side, every 100 ms: established (and close-wait) TCP connections on the sink's port
  (`ss`; its walk is not atomic, see SinkSampler), and the sockets smtp-sink itself holds
  open (its fd table): both peaks must stay <= the cap;
- lease acquire latency (call to grant), p50/p99, split into grants on the first script call
  (the Redis round trip, plus the client's own scheduling delay: 24 processes on 2 cores wait
  for the CPU, shown as "loop lag") and grants that had to wait for a slot (queueing: demand
  exceeds the cap on purpose, so some waits reach the `--wait` deadline and start over);
- Redis commands per second spent on leases over the steady window: EVALSHA calls (one per
  acquire attempt, batched renewal or release) from INFO commandstats, the commands those
  scripts ran, and PUBLISH fan-out; plus the clients' own count of each operation.

    python bench/lease_scale.py                 # ~3 minutes on 2 cores
    python bench/lease_scale.py --processes 20 --per-process 600 --duration 90

Writes bench/results/lease_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import random
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import PostfixSink, proc_cpu, sessions_at  # noqa: E402
from devkit.redis_server import RedisServer  # noqa: E402
from workers.state import keys  # noqa: E402

RESULTS = REPO / "bench" / "results" / "lease_scale.json"
MESSAGE = (
    b"From: bench@example.com\r\nTo: user@example.com\r\nSubject: lease scale\r\n\r\n"
    + b"x" * 512
    + b"\r\n"
)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---- one client process --------------------------------------------------------------------

_attempts: contextvars.ContextVar[list[int]] = contextvars.ContextVar("attempts")


class _Counted:
    """Wraps a registered script to count calls (and, per acquire, its attempts)."""

    def __init__(self, script: Callable[..., Awaitable[Any]], name: str, calls: Counter[str]):
        self.script, self.name, self.calls = script, name, calls

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.name] += 1
        box = _attempts.get(None)
        if box is not None:
            box[0] += 1
        return await self.script(*args, **kwargs)


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    import aiosmtplib
    import redis.asyncio as aioredis

    from workers.state.keeper import LeaseKeeper
    from workers.state.semaphore import Lease, LeaseSemaphore, Limit

    client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            args.redis_url,
            max_connections=32,  # as a worker's lease client (workers/engine/runtime.py)
            timeout=30,
            socket_timeout=10,
            socket_connect_timeout=5,
        )
    )
    sem = LeaseSemaphore(client, [Limit("smtp", args.cap)], args.ttl, host=f"bench{args.index}")
    calls: Counter[str] = Counter()
    sem._acquire_script = _Counted(sem._acquire_script, "acquire", calls)  # type: ignore[assignment]
    sem._renew_script = _Counted(sem._renew_script, "renew", calls)  # type: ignore[assignment]
    sem._release_script = _Counted(sem._release_script, "release", calls)  # type: ignore[assignment]
    conns: dict[str, aiosmtplib.SMTP] = {}
    stats: Counter[str] = Counter()
    acquired: list[tuple[float, float, int]] = []  # (s since start, ms, script calls)
    # Wall-clock (connect called, socket closed) of every connection: always inside its lease.
    spans: list[tuple[float, float]] = []
    open_now = [0, 0]  # current, peak

    def on_lost(lease: Lease) -> None:
        smtp = conns.pop(lease.id, None)
        stats["fenced"] += 1
        if smtp is not None and smtp.transport is not None:
            smtp.transport.abort()  # type: ignore[attr-defined]

    keeper = LeaseKeeper(sem, on_lost)
    keeper.start()
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    stop = time.monotonic() + (args.stop_at - time.time())
    began = time.monotonic()

    async def close(smtp: aiosmtplib.SMTP) -> None:
        """QUIT, then wait (up to 2 s) for the sink to hang up before the slot is freed."""
        protocol = smtp.protocol
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.execute_command(b"QUIT", timeout=10)
            deadline = time.monotonic() + 2
            while not getattr(protocol, "_connection_lost", True) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        smtp.close()

    lags: list[float] = []

    async def watch_lag() -> None:
        """How late the loop wakes up: when it is CPU-starved, renewals are late too."""
        while time.monotonic() < stop:
            t = time.monotonic()
            await asyncio.sleep(0.1)
            lags.append((time.monotonic() - t - 0.1) * 1000)

    async def slot(i: int) -> None:
        rng = random.Random(args.index * 1_000_003 + i)
        box = [0]
        _attempts.set(box)
        await asyncio.sleep(rng.uniform(0, args.ramp))  # no 10,000-connect stampede at t=0
        while time.monotonic() < stop:
            box[0] = 0
            t0 = time.monotonic()
            try:
                lease = await sem.acquire(min(stop, t0 + args.wait))
            except Exception:  # Redis unreachable: fail closed, try again
                stats["acquire_errors"] += 1
                await asyncio.sleep(0.5)
                continue
            if lease is None:
                stats["acquire_timeouts" if time.monotonic() < stop else "stopped_waiting"] += 1
                continue
            took_ms = (time.monotonic() - t0) * 1000
            acquired.append((round(t0 - began, 3), round(took_ms, 3), box[0]))
            keeper.add(lease)
            # Our own socket with SO_LINGER 0: whenever we give a connection up without a
            # completed QUIT (connect or greeting timeout, fencing), closing it sends a RST, which
            # tears the server's end down at once, even in its accept queue. A FIN would leave it
            # in CLOSE-WAIT there, still counted, after our lease was released.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            smtp = aiosmtplib.SMTP(sock=sock, use_tls=False, start_tls=False, timeout=30)
            connected = False
            opened = time.time()
            try:
                async with asyncio.timeout(30):
                    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", args.port))
                await smtp.connect()
                connected = True
                conns[lease.id] = smtp
                open_now[0] += 1
                open_now[1] = max(open_now[1], open_now[0])
                stats["connections"] += 1
                until = min(stop, time.monotonic() + rng.uniform(*args.hold))
                times = sorted(rng.uniform(time.monotonic(), until) for _ in range(args.messages))
                for at in times:
                    await asyncio.sleep(max(0.0, at - time.monotonic()))
                    if not lease.valid or lease.id not in conns:
                        break  # fenced: never write again
                    await smtp.sendmail("bench@example.com", [f"u{i}@example.com"], MESSAGE)
                    stats["messages"] += 1
                await asyncio.sleep(max(0.0, until - time.monotonic()))
                if lease.valid and conns.pop(lease.id, None) is not None:
                    await close(smtp)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                stats[f"smtp_{type(exc).__name__}"] += 1
            finally:
                conns.pop(lease.id, None)
                if smtp.is_connected and smtp.transport is not None:
                    smtp.transport.abort()  # type: ignore[attr-defined]
                sock.close()  # RST if still open (linger 0); no-op after the transport closed it
                await asyncio.sleep(0.01)  # the RST leaves before the slot is freed
                spans.append((opened, time.time()))
                if connected:
                    open_now[0] -= 1
                keeper.discard(lease)
                with contextlib.suppress(Exception):
                    await sem.release(lease)

    await asyncio.gather(watch_lag(), *(slot(i) for i in range(args.per_process)))
    await keeper.stop()
    await sem.close()
    await client.aclose()
    return {
        "index": args.index,
        "pid": os.getpid(),
        "acquired": acquired,
        "spans": spans,
        "loop_lag_ms": {"p50": pct(lags, 50), "p99": pct(lags, 99), "max": max(lags, default=0)},
        "calls": dict(calls),
        "stats": dict(stats),
        "peak_open": open_now[1],
    }


def client_main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    result = asyncio.run(_client(args))
    Path(args.out).write_text(json.dumps(result))
    return 0


# ---- the orchestrating process -------------------------------------------------------------


class SinkSampler:
    """Counts the sink's open connections every `every` seconds, two ways.

    `ss`: the kernel's established/close-wait sockets on the sink's port. Its netlink walk is
    not atomic: a socket closed during the walk and one opened after it may both be counted.
    `fds`: the sockets smtp-sink itself holds (its fd table minus those it had before any client
    came). fds are allocated lowest-first, so a close followed by an open is not counted twice;
    this count also includes sockets the kernel has closed but smtp-sink has not yet noticed.
    """

    def __init__(self, port: int, pid: int, every: float = 0.1) -> None:
        self.port, self.pid, self.every = port, pid, every
        self.samples: list[tuple[float, int]] = []
        self.fd_samples: list[tuple[float, int]] = []
        self.walk_s: list[float] = []
        self.ss = shutil.which("ss")
        nice = shutil.which("nice")
        self.nice = [nice, "-n", "-10"] if nice and os.geteuid() == 0 else []
        self.fd_base = self.fds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        if self.ss is None:
            return sessions_at(self.port)
        # Raised priority: the slower the walk, the more it can miscount (see the docstring).
        out = subprocess.run(
            [
                *self.nice,
                self.ss,
                "-Htn",
                "state",
                "established",
                "state",
                "close-wait",
                f"( sport = :{self.port} )",
            ],
            capture_output=True,
            check=False,
        ).stdout
        return out.count(b"\n")

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.samples.append((time.time(), self.count()))
            self.walk_s.append(time.monotonic() - started)
            self.fd_samples.append((time.time(), self.fds() - self.fd_base))
            self._stop.wait(max(0.0, self.every - (time.monotonic() - started)))

    def start(self) -> SinkSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def commandstats(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        raw = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in raw.items()}


def held(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        sec, usec = client.time()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        return int(client.zcount(keys.lease_holders("smtp"), f"({now_ms}", "+inf"))
    finally:
        client.close()


def overlap_peak(spans: list[tuple[float, ...]]) -> int:
    """Most (start, end) spans open at one instant; an end sorts before a start at a tie."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=24)
    parser.add_argument("--per-process", type=int, default=500)
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of load")
    parser.add_argument("--ramp", type=float, default=30.0, help="slots start within this")
    parser.add_argument("--warmup", type=float, default=45.0, help="excluded from the rates")
    parser.add_argument("--ttl", type=float, default=30.0)
    parser.add_argument("--wait", type=float, default=30.0, help="acquire deadline, seconds")
    parser.add_argument("--hold", type=float, nargs=2, default=(30.0, 90.0))
    parser.add_argument("--messages", type=int, default=1, help="per connection")
    parser.add_argument("--out", type=Path, default=RESULTS)
    # client mode (internal)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args)

    fds = raise_fd_limit()
    demand = args.processes * args.per_process
    if fds < args.cap + 4096:
        print(f"warning: open-files limit {fds} is low for {args.cap} sink sessions")
    workdir = Path(tempfile.mkdtemp(prefix="lease-scale-"))
    redis_server = RedisServer().start()
    sink = PostfixSink(workdir, max_sessions=min(fds - 256, demand + 1000)).start()
    # The sink and Redis stand in for other machines: don't let 24 busy clients starve them.
    for pid in (sink.pid, redis_server.proc.pid if redis_server.proc else None):
        if pid is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, pid, -10)
    sampler = SinkSampler(sink.port, sink.pid or 0)
    procs: list[subprocess.Popen[bytes]] = []
    outputs = [workdir / f"client-{i}.json" for i in range(args.processes)]
    try:
        start_at = time.time() + 5 + 0.5 * args.processes  # every client imported by then
        stop_at = start_at + args.duration
        for i, out in enumerate(outputs):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        "--index",
                        str(i),
                        "--redis-url",
                        redis_server.url,
                        "--port",
                        str(sink.port),
                        "--start-at",
                        str(start_at),
                        "--stop-at",
                        str(stop_at),
                        "--out",
                        str(out),
                        "--cap",
                        str(args.cap),
                        "--per-process",
                        str(args.per_process),
                        "--ttl",
                        str(args.ttl),
                        "--wait",
                        str(args.wait),
                        "--hold",
                        *map(str, args.hold),
                        "--ramp",
                        str(args.ramp),
                        "--messages",
                        str(args.messages),
                    ],
                    cwd=REPO,
                    stderr=open(workdir / f"client-{i}.log", "wb"),  # noqa: SIM115
                )
            )
        print(
            f"{args.processes} processes x {args.per_process} slots = demand {demand}, "
            f"cap {args.cap}, sink smtp-sink :{sink.port} (-m {sink.max_sessions}), "
            f"{args.duration:.0f}s of load from "
            f"{time.strftime('%H:%M:%S', time.localtime(start_at))}"
        )
        sampler.start()
        time.sleep(max(0.0, start_at + args.warmup - time.time()))
        redis_pid = redis_server.proc.pid if redis_server.proc else 0
        steady_from, stats_from = time.time(), commandstats(redis_server.url)
        cpu_from = (proc_cpu(redis_pid), proc_cpu(sink.pid or 0))
        held_samples: list[int] = []
        while time.time() < stop_at - 5:
            held_samples.append(held(redis_server.url))
            time.sleep(1.0)
        steady_to, stats_to = time.time(), commandstats(redis_server.url)
        cpu_to = (proc_cpu(redis_pid), proc_cpu(sink.pid or 0))
        for proc in procs:
            proc.wait(timeout=args.wait + 60)
        time.sleep(0.5)
    finally:
        sampler.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        sink.stop()
        redis_server.close()

    clients = [json.loads(out.read_text()) for out in outputs if out.exists()]
    grants = [g for c in clients for g in c["acquired"]]
    steady = [g for g in grants if g[0] >= args.warmup]
    every = [ms for _, ms, _ in grants]
    ramp_first = [ms for t, ms, n in grants if t < args.warmup and n == 1]
    first = [ms for _, ms, n in steady if n == 1]
    waited = [ms for _, ms, n in steady if n > 1]
    calls: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    for c in clients:
        calls.update(c["calls"])
        stats.update(c["stats"])
    window = steady_to - steady_from
    delta = {k: stats_to.get(k, 0) - stats_from.get(k, 0) for k in stats_to}
    in_scripts = sum(
        v
        for k, v in delta.items()
        if k not in ("evalsha", "eval", "info", "time", "zcount", "subscribe", "ping")
    )
    peak = max((n for _, n in sampler.samples), default=0)
    overlap = overlap_peak([tuple(x) for c in clients for x in c["spans"]])
    fd_peak = max((n for _, n in sampler.fd_samples), default=0)
    steady_samples = [n for t, n in sampler.samples if steady_from <= t <= steady_to]
    result = {
        "config": {
            k: v
            for k, v in vars(args).items()
            if k not in ("client", "index", "redis_url", "port", "start_at", "stop_at", "out")
        }
        | {"demand": demand, "open_files_limit": fds, "cpus": os.cpu_count()},
        "clients_reported": len(clients),
        "sink_peak_connections": peak,
        "sink_peak_sockets_held_by_smtp_sink": fd_peak,
        "connections_overlap_peak_client_timestamps": overlap,
        "ss_walk_ms": {
            "p50": pct([w * 1000 for w in sampler.walk_s], 50),
            "max": max(sampler.walk_s, default=0) * 1000,
        },
        "sink_connections_steady_mean": statistics.fmean(steady_samples) if steady_samples else 0,
        "sink_samples": len(sampler.samples),
        "leases_held_steady_mean": statistics.fmean(held_samples) if held_samples else 0,
        "leases_held_max": max(held_samples, default=0),
        "acquire_ms": {
            "all": {"n": len(every), "p50": pct(every, 50), "p99": pct(every, 99)},
            "ramp_up_first_try": {
                "n": len(ramp_first),
                "p50": pct(ramp_first, 50),
                "p99": pct(ramp_first, 99),
            },
            "steady_first_try": {"n": len(first), "p50": pct(first, 50), "p99": pct(first, 99)},
            "steady_waited": {
                "n": len(waited),
                "p50": pct(waited, 50),
                "p99": pct(waited, 99),
                "max": max(waited, default=None),
            },
        },
        "redis_steady_per_s": {
            "window_s": window,
            "evalsha": delta.get("evalsha", 0) / window,
            "commands_run_by_scripts": in_scripts / window,
            "publish": delta.get("publish", 0) / window,
            "redis_cpu_percent_of_a_core": 100 * (cpu_to[0] - cpu_from[0]) / window,
            "sink_cpu_percent_of_a_core": 100 * (cpu_to[1] - cpu_from[1]) / window,
            "top_commands": dict(sorted(delta.items(), key=lambda kv: -kv[1])[:8]),
        },
        "client_calls_total": dict(calls),
        "client_stats_total": dict(stats),
        "client_peak_open_sum": sum(c["peak_open"] for c in clients),
        "client_loop_lag_ms_worst": {
            "p99": max((c["loop_lag_ms"]["p99"] or 0 for c in clients), default=0),
            "max": max((c["loop_lag_ms"]["max"] for c in clients), default=0),
        },
        "sampler_interval_s": statistics.fmean(
            b[0] - a[0] for a, b in zip(sampler.samples, sampler.samples[1:], strict=False)
        )
        if len(sampler.samples) > 1
        else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    def f(value: float | None, fmt: str = ".1f") -> str:
        return "-" if value is None else format(value, fmt)

    acq = result["acquire_ms"]
    rs = result["redis_steady_per_s"]
    rows = [
        ("cap / demand", f"{args.cap} / {demand} ({args.processes} processes)"),
        ("sink peak, kernel (ss)", f"{peak}  (<= cap: {peak <= args.cap})"),
        ("sink peak, sockets smtp-sink holds", f"{fd_peak}  (<= cap: {fd_peak <= args.cap})"),
        ("most connections open at once (exact)", f"{overlap}  (<= cap: {overlap <= args.cap})"),
        (
            "ss walk p50 / max (ms)",
            f"{f(result['ss_walk_ms']['p50'])} / {f(result['ss_walk_ms']['max'])}",
        ),
        ("sink connections, steady mean", f(result["sink_connections_steady_mean"])),
        (
            "leases held, steady mean / max",
            f"{f(result['leases_held_steady_mean'])} / {result['leases_held_max']}",
        ),
        *(
            (label, f"{f(acq[key]['p50'])} / {f(acq[key]['p99'])}  n={acq[key]['n']}")
            for label, key in (
                ("acquire p50 / p99 (ms), every grant", "all"),
                ("  ramp-up, granted on first call", "ramp_up_first_try"),
                ("  steady, granted on first call", "steady_first_try"),
                ("  steady, waited for a slot", "steady_waited"),
            )
        ),
        ("Redis EVALSHA/s on leases (steady)", f(rs["evalsha"], ".0f")),
        ("  commands run by those scripts/s", f(rs["commands_run_by_scripts"], ".0f")),
        ("  PUBLISH/s (wake-ups)", f(rs["publish"], ".0f")),
        ("  redis-server CPU (% of one core)", f(rs["redis_cpu_percent_of_a_core"])),
        (
            "client calls (acquire/renew/release)",
            f"{calls['acquire']} / {calls['renew']} / {calls['release']}",
        ),
        (
            "connections / messages / fenced",
            f"{stats['connections']} / {stats['messages']} / {stats['fenced']}",
        ),
        ("acquire timeouts / errors", f"{stats['acquire_timeouts']} / {stats['acquire_errors']}"),
        (
            "client loop lag p99 / max, worst (ms)",
            f"{f(result['client_loop_lag_ms_worst']['p99'])} / "
            f"{f(result['client_loop_lag_ms_worst']['max'])}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    other = {k: v for k, v in stats.items() if k.startswith("smtp_")}
    if other:
        print(f"SMTP errors: {other}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
