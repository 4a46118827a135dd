"""Prometheus metrics for one worker process, served on MAILER_METRICS_PORT (unset: off).

`mailer worker` runs Celery's threads pool: one process holds the event loop, the session pool,
the leases and every task thread, so a plain in-process registry is complete and correct (no
multiprocess mode). The server starts once, in `worker_init`, never in a producer.

Most figures are read at scrape time from state the runtime already keeps (the pool's
`PoolStats`, its open sessions, the lease keeper's leases); counters exist only for events
that leave no state behind (message outcomes, SMTP replies, retries, dead letters, lost
leases), fed by the event stream of `workers.observe.logs` and two hooks in the delivery path.

Series (all prefixed `mailer_`). What is per relay carries a `relay` label (`default` for the
single-relay environment); a relay appears once this process has seen a message for it, and
its gauges and pool counters go when its parts are dropped (workers/engine/relayparts.py):

    messages_total{outcome,relay}    sent | duplicate | retried | failed | held
    smtp_replies_total{code,phase,relay}  the reply that decided each transaction (250 on the
                                     terminator, refused RCPTs, error replies on any phase)
    retries_total{kind,relay}        reconnect | retry | no_lease | auth | tls | no_relay | ...
    dead_lettered_total{kind,relay}  permanent | expired | uncertain | recipients
    leases_lost_total{relay}         leases this worker lost (its connection was fenced)
    lease_wait_seconds               histogram: time to acquire a lease for a new session
    open_sessions{relay}, leases_held{relay}   gauges, this process
    worker_connections               gauge: the most sessions this process may open (all relays)
    sessions_opened_total, session_rotations_total, sessions_closed_idle_total,
    sessions_reclaimed_total, lease_timeouts_total, sessions_fenced_total   {relay}, PoolStats
    circuit_open{relay}, quota_exhausted{relay}   gauges 0/1, fleet-wide (same from every worker)
    rate_configured_per_second{relay}, rate_effective_per_second{relay}
    dead_letters_stored              gauge, fleet-wide count in Redis
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

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
from mailer.wire import DEFAULT_RELAY
from workers.observe import logs

log = logging.getLogger("mailer.metrics")

MESSAGES = Counter("mailer_messages", "Messages by outcome", ["outcome", "relay"])
SMTP_REPLIES = Counter(
    "mailer_smtp_replies",
    "SMTP replies that decided a transaction, by code",
    ["code", "phase", "relay"],
)
RETRIES = Counter(
    "mailer_retries", "Messages sent back to the queue, by failure kind", ["kind", "relay"]
)
DEAD_LETTERED = Counter(
    "mailer_dead_lettered", "Messages dead-lettered, by kind", ["kind", "relay"]
)
LEASES_LOST = Counter("mailer_leases_lost", "Leases lost (connection fenced)", ["relay"])
LEASE_WAIT = Histogram(
    "mailer_lease_wait_seconds",
    "Time to acquire a connection lease",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def smtp_reply(code: int | None, phase: str, relay: str = DEFAULT_RELAY) -> None:
    if code is not None:
        SMTP_REPLIES.labels(str(code), phase, relay).inc()


def delivered(refused: Mapping[str, tuple[int, str]], relay: str = DEFAULT_RELAY) -> None:
    """A transaction the relay accepted: its 250, and any recipients it refused."""
    smtp_reply(250, "reply", relay)
    for code, _ in refused.values():
        smtp_reply(code, "rcpt", relay)


def smtp_failure(failure: Any, relay: str = DEFAULT_RELAY) -> None:
    """A classified Failure from the pool; those without a reply (timeouts, drops) have none."""
    phase = getattr(failure, "phase", None)
    smtp_reply(getattr(failure, "code", None), str(getattr(phase, "value", phase)), relay)


def on_event(event: str, fields: Mapping[str, Any]) -> None:
    relay = str(fields.get("relay") or DEFAULT_RELAY)
    outcome = logs.outcome_of(event, fields)
    if outcome is not None:
        MESSAGES.labels(outcome, relay).inc()
    if event == "retried":
        RETRIES.labels(str(fields.get("kind")), relay).inc()
    elif event == "dead_lettered":
        DEAD_LETTERED.labels(str(fields.get("kind")), relay).inc()
    elif event == "lease_lost":
        LEASES_LOST.labels(relay).inc()
    elif event == "lease_acquired":
        waited = fields.get("waited_s")
        if isinstance(waited, int | float):
            LEASE_WAIT.observe(max(0.0, float(waited)))


class RelayOccupancy(NamedTuple):
    """One relay in this process, read at scrape time: open sessions, leases held, the pool's
    counters (read by attribute name: workers/engine/pool.py `PoolStats`) or None, and the
    tightest configured rate window per second (None: none, or unknown here)."""

    sessions: int = 0
    leases: int = 0
    stats: object | None = None
    rate_configured: float | None = None


#: The relays of this process by name (never building a runtime).
Probe = Callable[[], Mapping[str, RelayOccupancy]]


def _idle() -> Mapping[str, RelayOccupancy]:
    return {}


#: PoolStats counters exported per relay: (series, attribute, help).
POOL_COUNTERS = (
    ("mailer_sessions_opened", "opened", "Sessions opened (TLS + AUTH)"),
    ("mailer_session_rotations", "rotations", "Sessions QUIT at their limit or age"),
    ("mailer_sessions_closed_idle", "closed_idle", "Idle sessions closed"),
    (
        "mailer_sessions_reclaimed",
        "reclaimed",
        "Sessions closed to make room for another relay's (the process's session budget)",
    ),
    ("mailer_lease_timeouts", "lease_waits", "Lease waits that reached the deadline"),
    ("mailer_sessions_fenced", "fenced", "Sessions aborted because their lease was lost"),
)


class RuntimeCollector(Collector):
    """Reads the process's runtime at scrape time (without creating one) and two fleet-wide
    figures from Redis. Reads of ints and lengths are safe from the scrape thread."""

    def __init__(self, settings: Settings, probe: Probe = _idle) -> None:
        self.settings = settings
        self.probe = probe
        self._redis: redis.Redis | None = None

    def collect(self) -> Iterator[Metric]:
        relays = dict(self.probe())
        relays.setdefault(
            DEFAULT_RELAY,
            RelayOccupancy(rate_configured=_tightest(self.settings)),
        )
        per_relay = ["relay"]
        sessions = GaugeMetricFamily("mailer_open_sessions", "Open SMTP sessions", labels=per_relay)
        held = GaugeMetricFamily(
            "mailer_leases_held", "Leases this process holds", labels=per_relay
        )
        counters = [
            CounterMetricFamily(name, text, labels=["relay"]) for name, _, text in POOL_COUNTERS
        ]
        for name, occupancy in sorted(relays.items()):
            sessions.add_metric([name], occupancy.sessions)
            held.add_metric([name], occupancy.leases)
            for family, (_, attr, _) in zip(counters, POOL_COUNTERS, strict=True):
                stats = occupancy.stats
                family.add_metric([name], getattr(stats, attr, 0) if stats else 0)
        yield sessions
        yield held
        yield GaugeMetricFamily(
            "mailer_worker_connections",
            "Most sessions this process may open (all relays together)",
            value=self.settings.worker_connections,
        )
        yield from counters
        yield from self._fleet(relays)

    def _fleet(self, relays: Mapping[str, RelayOccupancy]) -> Iterator[Metric]:
        from workers.state import keys
        from workers.state.circuit import read_circuits
        from workers.state.deadletters import DeadLetters
        from workers.state.ratelimit import peek_ceilings

        names = sorted(relays)
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
            circuits = read_circuits(self._redis, names)
            stored = DeadLetters(self._redis).count()
            ceilings = peek_ceilings(self._redis, [keys.for_relay(n, keys.RATE) for n in names])
        except (redis.RedisError, OSError) as exc:
            log.debug("metrics: Redis unavailable (%s)", type(exc).__name__)
            return
        families = {
            "open": GaugeMetricFamily(
                "mailer_circuit_open", "1 while the relay's breaker is open", labels=["relay"]
            ),
            "quota": GaugeMetricFamily(
                "mailer_quota_exhausted",
                "1 while the relay says the account's quota is spent (sending stopped)",
                labels=["relay"],
            ),
            "configured": GaugeMetricFamily(
                "mailer_rate_configured_per_second",
                "The relay's tightest configured rate window, per second (0: none)",
                labels=["relay"],
            ),
            "effective": GaugeMetricFamily(
                "mailer_rate_effective_per_second",
                "The adaptive ceiling the relay's throttling set (0: none in force)",
                labels=["relay"],
            ),
        }
        for name, circuit, ceiling in zip(names, circuits, ceilings, strict=True):
            families["open"].add_metric([name], int(circuit.open))
            families["quota"].add_metric([name], int(circuit.open and circuit.kind == "quota"))
            configured = relays[name].rate_configured
            if configured is not None or name == DEFAULT_RELAY:
                families["configured"].add_metric([name], configured or 0.0)
            families["effective"].add_metric([name], ceiling.rate or 0.0)
        yield from families.values()
        yield GaugeMetricFamily(
            "mailer_dead_letters_stored", "Dead letters in Redis (fleet-wide)", value=stored
        )


def _tightest(settings: Settings) -> float:
    return min((w.per_second for w in settings.rate_limits), default=0.0)


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
