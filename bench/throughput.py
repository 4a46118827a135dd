"""The measurements: ours (single and bulk), the two peers, smtp-source, RSS per open session
and the enqueue rate. `bench/run.py` composes them into one run and prints the table.

A delivery run is timed end to end: from the first enqueue to the moment the sink has counted
the last message (its 250 reply to the final "."), watched from a thread that starts before the
producer. CPU seconds come from /proc (utime + stime of every process of the system under test,
prefork children included), the producer's from its own thread's CPU clock.
"""

from __future__ import annotations

import importlib
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

from bench.common import (
    BODY,
    ENVELOPE_FROM,
    FROM_ADDR,
    PYTHON,
    SUBJECT,
    Service,
    Sink,
    Watch,
    established_to,
    machine_busy,
    proc_cpu,
    recipient,
    smtp_source_binary,
    start_all,
    stop_all,
    tree_cpu,
    vm_rss_kib,
)
from devkit.redis_server import RedisServer

# Redis databases: one per system, so queues and Celery's bookkeeping never mix.
DB_OURS, DB_NAIVE, DB_DJCE, DB_RSS, DB_ENQUEUE = 0, 1, 2, 3, 9  # RSS: 3 to 6

PEERS = {
    "naive": ("bench.peers.naive_celery", "naive", DB_NAIVE),
    "djce": ("bench.peers.django_celery_email_style", "djce", DB_DJCE),
}
PEER_LABELS = {"naive": "naive Celery", "djce": "django-celery-email style"}

_RETRIED = re.compile(r'"event": ?"retried"')
_DEAD = re.compile(r'"event": ?"dead_lettered"')


@dataclass
class Run:
    """One timed delivery run."""

    regime: str
    system: str
    messages: int
    delivered: int
    elapsed_s: float | None
    enqueue_s: float | None
    cpu_s: dict[str, float]
    other_load: float = 0.0  # share of the machine's CPUs used by processes not in this run
    steady_rate: float | None = None  # msg/s between 10% and 90% delivered
    peak_sessions: int = 0  # most SMTP sessions open at the sink at once
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def complete(self) -> bool:
        return self.delivered >= self.messages and self.elapsed_s is not None

    @property
    def rate(self) -> float | None:
        if not self.elapsed_s:
            return None
        return self.delivered / self.elapsed_s

    @property
    def enqueue_rate(self) -> float | None:
        return self.messages / self.enqueue_s if self.enqueue_s else None

    def cpu_per_1k(self, part: str) -> float | None:
        value = self.cpu_s.get(part)
        if value is None or not self.delivered:
            return None
        return value * 1000 / self.delivered

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            complete=self.complete,
            rate_per_s=self.rate,
            enqueue_rate_per_s=self.enqueue_rate,
            cpu_s_per_1000={k: self.cpu_per_1k(k) for k in self.cpu_s},
        )
        return data


class Bench:
    """Owns the run's Redis, its work directory, and the timing of every delivery run."""

    def __init__(self, workdir: Path, redis_server: RedisServer, *, log: Callable[[str], None]):
        self.workdir = workdir
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.redis = redis_server
        self.say = log
        self._offset = 0  # distinct recipients across runs

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{db}"

    def flush(self, db: int) -> None:
        client = redis.Redis.from_url(self.url(db))
        client.flushdb()
        client.close()

    def take(self, n: int) -> int:
        offset, self._offset = self._offset, self._offset + n
        return offset

    # ---- timing

    def timed(
        self,
        regime: str,
        system: str,
        sink: Sink,
        n: int,
        produce: Callable[[int, int], None],
        services: Sequence[Service],
        *,
        timeout: float,
        config: dict[str, Any] | None = None,
        extra_cpu: Callable[[], float] | None = None,
    ) -> Run:
        offset = self.take(n)
        base = sink.count()
        logs_before = [len(s.log()) for s in services]
        pids = [s.pid for s in services]
        cpu0 = self._cpu(pids, sink)
        machine0, bench0 = machine_busy(), time.process_time()
        watch = Watch(sink, base + n, timeout)
        started = time.monotonic()
        thread0 = time.thread_time()
        produce(n, offset)
        enqueue = time.monotonic() - started
        producer_cpu = time.thread_time() - thread0
        done = watch.result()
        cpu1 = self._cpu(pids, sink)
        machine, bench = machine_busy() - machine0, time.process_time() - bench0
        delivered = min(n, sink.count() - base)
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        cpu["producer"] = producer_cpu
        if extra_cpu is not None:
            cpu["worker"] = cpu.get("worker", 0.0) + extra_cpu()
        # Whatever else ran on the machine meanwhile (other people's tests): noise to report.
        ours = cpu["worker"] + cpu.get("redis", 0.0) + cpu.get("sink", 0.0) + bench
        wall = (done or time.monotonic()) - started
        other_load = max(0.0, machine - ours) / (wall * (os.cpu_count() or 1))
        retried = dead = 0
        for s, before in zip(services, logs_before, strict=True):
            text = s.log()[before:]
            retried += len(_RETRIED.findall(text))
            dead += len(_DEAD.findall(text))
        notes = []
        steady = watch.steady_rate(n)
        if steady is not None:
            notes.append(f"steady {steady:,.0f}/s")
        if watch.timeline:
            notes.append(f"peak {watch.peak_sessions()} sessions")
        if retried or dead:
            notes.append(f"retried={retried} dead_lettered={dead}")
        if done is None:
            notes.append(f"timed out after {timeout:.0f}s with {delivered}/{n}")
        run = Run(
            regime=regime,
            system=system,
            messages=n,
            delivered=delivered,
            elapsed_s=(done - started) if done is not None else None,
            enqueue_s=enqueue,
            cpu_s=cpu,
            other_load=other_load,
            steady_rate=steady,
            peak_sessions=watch.peak_sessions(),
            timeline=[(round(t, 3), c, k) for t, c, k in watch.timeline],
            config=dict(config or {}),
            notes="; ".join(notes),
        )
        rate = f"{run.rate:,.0f} msg/s" if run.rate else "incomplete"
        self.say(f"  {regime:<8} {system:<28} {n:>6} messages  {rate}")
        return run

    def _cpu(self, pids: Sequence[int], sink: Sink) -> dict[str, float]:
        out = {"worker": tree_cpu(pids) if pids else 0.0}
        if self.redis.proc is not None:
            out["redis"] = proc_cpu(self.redis.proc.pid)
        if sink.pid is not None:
            out["sink"] = proc_cpu(sink.pid)
        return out

    # ---- ours

    def ours_env(
        self, sink: Sink, *, connections: int, max_connections: int, db: int = DB_OURS
    ) -> dict[str, str]:
        """Our worker against the plain sink: no TLS, no AUTH (smtp-sink cannot do AUTH)."""
        return {
            "MAILER_BROKER_URL": self.url(db),
            "MAILER_SMTP_HOST": "127.0.0.1",
            "MAILER_SMTP_PORT": str(sink.port),
            "MAILER_SMTP_TLS": "none",
            "MAILER_SMTP_ALLOW_INSECURE": "1",
            "MAILER_SMTP_NO_AUTH": "1",
            "MAILER_SMTP_PASSWORD": "bench-not-a-key",
            "MAILER_DEFAULT_FROM": FROM_ADDR,
            "MAILER_WORKER_CONNECTIONS": str(connections),
            "MAILER_MAX_CONNECTIONS": str(max_connections),
        }

    def ours_workers(
        self, tag: str, env: dict[str, str], processes: int, args: Sequence[str] = ()
    ) -> list[Service]:
        return [
            Service(
                f"ours-{tag}-{i}",
                [PYTHON, "-m", "mailer", "worker", "--hostname", f"{tag}{i}@%h", *args],
                env,
                self.logdir,
            )
            for i in range(processes)
        ]

    @contextmanager
    def ours_producer(self, db: int = DB_OURS) -> Iterator[None]:
        """Points `mailer.send` / `mailer.send_many` (the module functions) at this run."""
        import mailer

        saved = {k: os.environ.get(k) for k in ("MAILER_BROKER_URL", "MAILER_DEFAULT_FROM")}
        os.environ["MAILER_BROKER_URL"] = self.url(db)
        os.environ["MAILER_DEFAULT_FROM"] = FROM_ADDR
        mailer.reset_default_mailer()
        try:
            yield
        finally:
            mailer.reset_default_mailer()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @staticmethod
    def produce_single(n: int, offset: int) -> None:
        import mailer

        for i in range(offset, offset + n):
            mailer.send(to=recipient(i), subject=SUBJECT, text=BODY, from_addr=FROM_ADDR)

    @staticmethod
    def produce_bulk(chunk: int) -> Callable[[int, int], None]:
        def produce(n: int, offset: int) -> None:
            import mailer

            end = offset + n
            for start in range(offset, end, chunk):
                mailer.send_many(
                    [
                        {
                            "to": recipient(i),
                            "subject": SUBJECT,
                            "text": BODY,
                            "from_addr": FROM_ADDR,
                        }
                        for i in range(start, min(start + chunk, end))
                    ]
                )

        return produce

    # ---- peers

    def peer_module(self, key: str) -> ModuleType:
        module_name, _, db = PEERS[key]
        os.environ["BENCH_BROKER_URL"] = self.url(db)  # read when the module is first imported
        return importlib.import_module(module_name)

    def peer_worker(self, key: str, tag: str, sink: Sink) -> Service:
        module_name, queue, db = PEERS[key]
        env = {
            "BENCH_BROKER_URL": self.url(db),
            "BENCH_SMTP_HOST": "127.0.0.1",
            "BENCH_SMTP_PORT": str(sink.port),
        }
        argv = [
            PYTHON, "-m", "celery", "-A", module_name, "worker",
            "--pool", "prefork", "--concurrency", "2", "--queues", queue,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "--hostname", f"{key}-{tag}@%h",
        ]  # fmt: skip
        return Service(f"{key}-{tag}", argv, env, self.logdir)

    # ---- smtp-source

    def smtp_source(self, regime: str, sink: Sink, n: int, sessions: int) -> Run | None:
        """Postfix's SMTP client against the same sink, sending our rendered message."""
        binary = smtp_source_binary()
        if binary is None:
            self.say("  (smtp-source not installed: no reference)")
            return None
        import mailer

        message = mailer.Message(
            to=recipient(0), subject=SUBJECT, text=BODY, from_addr=FROM_ADDR
        ).render()
        path = self.workdir / "message.eml"
        path.write_bytes(message.data.replace(b"\r\n", b"\n"))  # smtp-source adds the CRs
        argv = [
            binary, "-d", "-s", str(sessions), "-m", str(n), "-F", str(path),
            "-f", ENVELOPE_FROM, "-t", recipient(0), f"127.0.0.1:{sink.port}",
        ]  # fmt: skip
        client_cpu = 0.0

        def produce(count: int, offset: int) -> None:
            nonlocal client_cpu
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            client_cpu = usage.ru_utime + usage.ru_stime
            if proc.returncode:
                assert proc.stderr is not None
                self.say(f"  smtp-source failed: {proc.stderr.read().decode(errors='replace')}")

        run = self.timed(
            regime,
            "smtp-source",
            sink,
            n,
            produce,
            [],
            timeout=120 + n / 10,
            config={"sessions": sessions, "argv": " ".join(argv[1:-1]) + " HOST:PORT"},
            extra_cpu=lambda: client_cpu,
        )
        run.enqueue_s = None  # the client's run is the delivery itself
        run.cpu_s.pop("producer", None)
        return run

    # ---- RSS per open session

    def rss_per_session(
        self, *, many: int, few: int, think: float, tls_dir: Path
    ) -> list[dict[str, Any]]:
        """Per open session, plain and TLS: RSS of a worker holding `many` idle sessions minus
        that of one holding `few`, after the same work.

        Each worker gets one batch of `many` messages from a sink that thinks `think` s per
        MAIL (so sessions overlap); the two differ only in MAILER_WORKER_CONNECTIONS, hence in
        how many sessions they open. Task threads are fixed at 2 in both. Sessions are counted
        from the worker's own sockets (/proc). All four workers run at once (own databases).
        """
        from devkit.sink import SinkServer, make_tls_material
        from mailer.client import Mailer
        from mailer.config import Settings

        material = make_tls_material(tls_dir)
        key = "SG." + secrets.token_urlsafe(16)[:22] + "." + secrets.token_urlsafe(32)[:43]
        sinks = {
            tls: SinkServer(
                tls="starttls" if tls else "none",
                auth=("apikey", key),
                tls_material=material,
                record_data=False,
                mail_delay=think,
            ).start()
            for tls in (False, True)
        }
        probes = [(tls, cap) for tls in (False, True) for cap in (few, many)]
        envs: dict[tuple[bool, int], dict[str, str]] = {}
        services: dict[tuple[bool, int], Service] = {}
        for db, (tls, cap) in enumerate(probes, start=DB_RSS):
            self.flush(db)
            env = {
                "MAILER_BROKER_URL": self.url(db),
                "MAILER_SMTP_HOST": "localhost",
                "MAILER_SMTP_PORT": str(sinks[tls].port),
                "MAILER_SMTP_TLS": "starttls" if tls else "none",
                "MAILER_SMTP_CA_FILE": str(material.ca_file),
                "MAILER_SMTP_PASSWORD": key,
                "MAILER_DEFAULT_FROM": FROM_ADDR,
                "MAILER_WORKER_CONNECTIONS": str(cap),
                "MAILER_SESSION_IDLE_TIMEOUT": "600",
                "MAILER_LEASE_WAIT": "120",
            }
            if not tls:
                env["MAILER_SMTP_ALLOW_INSECURE"] = "1"
            envs[(tls, cap)] = env
            label = f"rss-{'tls' if tls else 'plain'}-{cap}"
            services[(tls, cap)] = self.ours_workers(label, env, 1, ["--concurrency", "2"])[0]
        readings: dict[tuple[bool, int], dict[str, int]] = {}
        start_all(list(services.values()))
        try:
            bases = {tls: len(sink.received) for tls, sink in sinks.items()}
            for env in envs.values():
                producer = Mailer(Settings.from_env(env))
                offset = self.take(many)
                producer.send_many(
                    [
                        {"to": recipient(i), "subject": SUBJECT, "text": BODY}
                        for i in range(offset, offset + many)
                    ],
                    batch_size=many,
                )
                producer.close()
            timeout = 60 + many * think / few * 2
            for tls, sink in sinks.items():
                if not sink.wait_for(bases[tls] + 2 * many, timeout=timeout):
                    raise RuntimeError(f"RSS run ({'tls' if tls else 'plain'}) did not deliver")
            time.sleep(1.0)  # last replies read, sessions back in their pools
            for (tls, cap), service in services.items():
                readings[(tls, cap)] = {
                    "connections": cap,
                    "sessions": established_to(service.pid, sinks[tls].port),
                    "rss_kib": vm_rss_kib(service.pid),
                }
        finally:
            stop_all(list(services.values()))
            for sink in sinks.values():
                sink.stop()
            for db in range(DB_RSS, DB_RSS + len(probes)):
                self.flush(db)
        out = []
        for tls in (False, True):
            lo, hi = readings[(tls, few)], readings[(tls, many)]
            more = hi["sessions"] - lo["sessions"]
            per = (hi["rss_kib"] - lo["rss_kib"]) / more if more > 0 else None
            label = "tls" if tls else "plain"
            self.say(
                f"  rss      {label:<5} {lo['sessions']} sessions {lo['rss_kib']:,} KiB -> "
                f"{hi['sessions']} sessions {hi['rss_kib']:,} KiB: "
                + (f"{per:.1f} KiB per session" if per is not None else "no more sessions")
            )
            out.append({"tls": tls, "few": lo, "many": hi, "kib_per_session": per})
        return out

    # ---- enqueue rate, nobody consuming

    def enqueue_rate(self, n_single: int, n_bulk: int, chunk: int) -> dict[str, Any]:
        """`mailer.send` and `mailer.send_many` into a queue no worker reads (producer only)."""
        out: dict[str, Any] = {}
        self.flush(DB_ENQUEUE)
        with self.ours_producer(DB_ENQUEUE):
            self.produce_single(10, self.take(10))  # connect, import, warm caches
            for name, n, produce in (
                ("send", n_single, self.produce_single),
                ("send_many", n_bulk, self.produce_bulk(chunk)),
            ):
                offset = self.take(n)
                started, cpu0 = time.monotonic(), time.thread_time()
                produce(n, offset)
                elapsed, cpu = time.monotonic() - started, time.thread_time() - cpu0
                out[name] = {
                    "messages": n,
                    "elapsed_s": elapsed,
                    "rate_per_s": n / elapsed,
                    "cpu_s_per_1000": cpu * 1000 / n,
                }
                self.say(f"  enqueue  {name:<10} {n:>6} messages  {n / elapsed:,.0f} msg/s")
        self.flush(DB_ENQUEUE)
        return out
