"""Prometheus metrics for one worker process, served on MAILER_METRICS_PORT (unset: off).

`mailer worker` runs Celery's threads pool: one process holds the event loop, the session pool,
the leases and every task thread, so a plain in-process registry is complete and correct (no
multiprocess mode). The server starts once, in `worker_init`, never in a producer.

Most figures are read at scrape time from state the runtime already keeps (the pool's
`PoolStats`, its open sessions, the lease keeper's leases); counters exist only for events
that leave no state behind (message outcomes, SMTP replies, retries, dead letters, lost
leases), fed by the event stream of `workers.observe.logs` and two hooks in the delivery path.

Series (all prefixed `mailer_`):

    messages_total{outcome}          sent | duplicate | retried | failed | held
    smtp_replies_total{code,phase}   the reply that decided each transaction (250 on the
                                     terminator, refused RCPTs, error replies on any phase)
    retries_total{kind}              reconnect | retry | no_lease | auth | tls | circuit | ...
    dead_lettered_total{kind}        permanent | expired | uncertain | recipients
    leases_lost_total                leases this worker lost (its connection was fenced)
    lease_wait_seconds               histogram: time to acquire a lease for a new session
    open_sessions, leases_held       gauges, this process
    worker_connections               gauge: the most sessions this process may open
    sessions_opened_total, session_rotations_total, sessions_closed_idle_total,
    lease_timeouts_total, sessions_fenced_total      from PoolStats
    circuit_open                     gauge 0/1, fleet-wide (same value from every worker)
    dead_letters_stored              gauge, fleet-wide count in Redis
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailer.config import Settings
from workers.observe import logs

log = logging.getLogger("mailer.metrics")

MESSAGES = Counter("mailer_messages", "Messages by outcome", ["outcome"])
SMTP_REPLIES = Counter(
    "mailer_smtp_replies", "SMTP replies that decided a transaction, by code", ["code", "phase"]
)
RETRIES = Counter("mailer_retries", "Messages sent back to the queue, by failure kind", ["kind"])
DEAD_LETTERED = Counter("mailer_dead_lettered", "Messages dead-lettered, by kind", ["kind"])
LEASES_LOST = Counter("mailer_leases_lost", "Leases lost (connection fenced)")
LEASE_WAIT = Histogram(
    "mailer_lease_wait_seconds",
    "Time to acquire a connection lease",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def smtp_reply(code: int | None, phase: str) -> None:
    if code is not None:
        SMTP_REPLIES.labels(str(code), phase).inc()


def delivered(refused: Mapping[str, tuple[int, str]]) -> None:
    """A transaction the relay accepted: its 250, and any recipients it refused."""
    smtp_reply(250, "reply")
    for code, _ in refused.values():
        smtp_reply(code, "rcpt")


def smtp_failure(failure: Any) -> None:
    """A classified Failure from the pool; those without a reply (timeouts, drops) have none."""
    phase = getattr(failure, "phase", None)
    smtp_reply(getattr(failure, "code", None), str(getattr(phase, "value", phase)))


def on_event(event: str, fields: Mapping[str, Any]) -> None:
    outcome = logs.outcome_of(event, fields)
    if outcome is not None:
        MESSAGES.labels(outcome).inc()
    if event == "retried":
        RETRIES.labels(str(fields.get("kind"))).inc()
    elif event == "dead_lettered":
        DEAD_LETTERED.labels(str(fields.get("kind"))).inc()
    elif event == "lease_lost":
        LEASES_LOST.inc()
    elif event == "lease_acquired":
        waited = fields.get("waited_s")
        if isinstance(waited, int | float):
            LEASE_WAIT.observe(max(0.0, float(waited)))


#: (open sessions, leases held, the pool's counters or None) of this process, read at scrape
#: time; the counters are read by attribute name (workers/engine/pool.py `PoolStats`).
Probe = Callable[[], tuple[int, int, object | None]]


def _idle() -> tuple[int, int, object | None]:
    return 0, 0, None


class RuntimeCollector(Collector):
    """Reads the process's runtime at scrape time (without creating one) and two fleet-wide
    figures from Redis. Reads of ints and lengths are safe from the scrape thread."""

    def __init__(self, settings: Settings, probe: Probe = _idle) -> None:
        self.settings = settings
        self.probe = probe
        self._redis: redis.Redis | None = None

    def collect(self) -> Iterator[Metric]:
        sessions, held, stats = self.probe()
        yield GaugeMetricFamily("mailer_open_sessions", "Open SMTP sessions", value=sessions)
        yield GaugeMetricFamily("mailer_leases_held", "Leases this process holds", value=held)
        yield GaugeMetricFamily(
            "mailer_worker_connections",
            "Most sessions this process may open",
            value=self.settings.worker_connections,
        )
        for name, attr, text in (
            ("mailer_sessions_opened", "opened", "Sessions opened (TLS + AUTH)"),
            ("mailer_session_rotations", "rotations", "Sessions QUIT at their limit or age"),
            ("mailer_sessions_closed_idle", "closed_idle", "Idle sessions closed"),
            ("mailer_lease_timeouts", "lease_waits", "Lease waits that reached the deadline"),
            ("mailer_sessions_fenced", "fenced", "Sessions aborted because their lease was lost"),
        ):
            yield CounterMetricFamily(name, text, value=getattr(stats, attr, 0) if stats else 0)
        yield from self._fleet()

    def _fleet(self) -> Iterator[Metric]:
        from workers.state.circuit import Circuit
        from workers.state.deadletters import DeadLetters
        from workers.state.ratelimit import peek_ceiling

        try:
            if self._redis is None:
                from mailer import redisconn

                self._redis = redisconn.client(
                    self.settings.redis_url,
                    self.settings,
                    socket_timeout=2,
                    socket_connect_timeout=2,
                    max_connections=2,
                )
            circuit = Circuit(self._redis).state(max_age=0)
            stored = DeadLetters(self._redis).count()
            ceiling = peek_ceiling(self._redis)
        except (redis.RedisError, OSError) as exc:
            log.debug("metrics: Redis unavailable (%s)", type(exc).__name__)
            return
        yield GaugeMetricFamily(
            "mailer_circuit_open", "1 while the fleet-wide breaker is open", value=int(circuit.open)
        )
        yield GaugeMetricFamily(
            "mailer_quota_exhausted",
            "1 while the relay says the account's quota is spent (sending stopped)",
            value=int(circuit.open and circuit.kind == "quota"),
        )
        configured = min((w.per_second for w in self.settings.rate_limits), default=0.0)
        yield GaugeMetricFamily(
            "mailer_rate_configured_per_second",
            "The tightest configured MAILER_RATE_LIMIT window, per second (0: none)",
            value=configured,
        )
        yield GaugeMetricFamily(
            "mailer_rate_effective_per_second",
            "The adaptive ceiling the relay's throttling set (0: none in force)",
            value=ceiling.rate or 0.0,
        )
        yield GaugeMetricFamily(
            "mailer_dead_letters_stored", "Dead letters in Redis (fleet-wide)", value=stored
        )


class Exporter:
    """What `install` set up in this process: the collector and, if a port is set, the server."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry = REGISTRY,
        probe: Probe = _idle,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.collector = RuntimeCollector(settings, probe)
        self.server: Any = None
        registry.register(self.collector)
        logs.subscribe(on_event)

    def serve(self) -> bool:
        port = self.settings.metrics_port
        if not port:
            return False
        addr = self.settings.metrics_addr
        try:
            self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%s (%s); not served", addr, port, exc)
            return False
        log.info("metrics: serving on http://%s:%s/metrics", addr, port)
        return True

    def close(self) -> None:
        logs.unsubscribe(on_event)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with contextlib.suppress(KeyError):
            self.registry.unregister(self.collector)


_exporter: Exporter | None = None


def install(settings: Settings, in_process: bool = True, probe: Probe = _idle) -> Exporter | None:
    """Once per worker process: count events and serve /metrics if MAILER_METRICS_PORT is set.
    `in_process`: tasks run in this process (threads or solo pool), so its registry sees them.
    `probe` reads the process's sessions and leases at scrape time, without building anything."""
    global _exporter
    if _exporter is not None:
        return _exporter
    if not in_process:
        log.warning(
            "metrics: tasks run in pool children here, not in this process; run `mailer worker` "
            "(threads pool) for metrics. Not serving."
        )
        return None
    disable_created_metrics()  # `_created` series double the output and nobody graphs them
    _exporter = Exporter(settings, probe=probe)
    _exporter.serve()
    return _exporter
