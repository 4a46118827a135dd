"""Operating the fleet, with real processes: metrics scraped over HTTP from a running worker,
`mailer status --json` as a subprocess, SIGTERM in the middle of a run, and the worker's logs.
Every figure is checked against what the SMTP test server or Redis actually hold."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

import mailer
from devkit.redis_server import free_port
from devkit.sink import FaultPlan
from devkit.worker import WorkerProcess
from mailer.wire import SCHEDULE_DUE, SCHEDULE_ITEMS
from tests.support.helpers import ids_at, wait_until
from tests.support.relay import Relay
from workers.engine.runtime import ATTEMPTS_PER_SESSION
from workers.observe import logs
from workers.state import deadletters, keys
from workers.state.circuit import Circuit
from workers.state.semaphore import Lease, LeaseSemaphore, Limit

ROOT = Path(__file__).resolve().parents[2]
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ---- helpers --------------------------------------------------------------------------------


def scrape(port: int) -> Metrics:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of `name`'s samples that carry `labels` (whatever else they carry: the relay)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in metrics.items() if n == name and wanted <= set(have))


def status(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "mailer", "status", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def enqueue(n: int, tag: str, countdown: float | None = None) -> list[str]:
    """Publishes n messages the way the app does; returns their ids."""
    from mailer.client import default_mailer

    client = default_mailer()
    ids = []
    for i in range(n):
        rendered = client.render(
            mailer.Message(to=f"{tag}{i}@example.com", subject=f"{tag} {i}", text=f"body {i}\n")
        )
        client.publisher.send(rendered.to_payload(), countdown=countdown)
        ids.append(rendered.id)
    return ids


def queued(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Message id -> {"headers", "kwargs"} of every task waiting in the queue, or in the durable
    schedule for its countdown."""
    out: dict[str, dict[str, Any]] = {}
    scheduled = [raw.split(b"\n", 1)[1] for raw in client.hvals(SCHEDULE_ITEMS)]
    for raw in [*client.lrange("mailer", 0, -1), *scheduled]:
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        message_id = str(args[0]["id"])
        assert message_id not in out, f"{message_id} is queued twice"
        out[message_id] = {"headers": envelope["headers"], "kwargs": kwargs}
    return out


def holders(client: redis.Redis) -> int:
    return sum(int(client.zcard(key)) for key in client.scan_iter(keys.lease_holders("*")))


def stop(worker: WorkerProcess, timeout: float = 90.0) -> int:
    """SIGTERM, then wait; a worker that overstays is killed and the test fails."""
    assert worker.proc is not None
    worker.signal(signal.SIGTERM)
    try:
        return worker.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise AssertionError(
            f"worker ignored SIGTERM for {timeout}s:\n{worker.log[-3000:]}"
        ) from None


def events(worker: WorkerProcess, name: str | None = None) -> list[dict[str, Any]]:
    found = logs.parse_events(worker.log.splitlines())
    return [e for e in found if name is None or e["event"] == name]


async def take_leases(redis_url: str, host: str, n: int, cap: int = 10000) -> list[Lease]:
    """Leases held by this test process, as if `host` ran n connections (5-minute TTL)."""
    client = aioredis.from_url(redis_url)
    semaphore = LeaseSemaphore(client, [Limit("smtp", cap)], ttl=300, host=host)
    try:
        taken = [await semaphore.acquire(time.monotonic() + 10) for _ in range(n)]
    finally:
        await semaphore.close()
        await client.aclose()
    leases = [lease for lease in taken if lease is not None]
    assert len(leases) == n
    return leases


async def release_lease(redis_url: str, lease: Lease) -> None:
    client = aioredis.from_url(redis_url)
    semaphore = LeaseSemaphore(client, [Limit("smtp", 1)], ttl=300, host="ops-test")
    try:
        await semaphore.release(lease)
    finally:
        await semaphore.close()
        await client.aclose()


# ---- metrics and status ---------------------------------------------------------------------


def test_metrics_scraped_after_a_send_match_what_the_server_received(
    redis_url: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    faults = FaultPlan(p_451_data=1.0, max_faults=3, reject_rcpt={"nobody@example.com"})
    port = free_port()
    sink, env = relay(
        {"faults": faults},
        MAILER_WORKER_CONNECTIONS=4,
        MAILER_MAX_MESSAGES_PER_CONNECTION=10,
        MAILER_METRICS_PORT=port,
        MAILER_METRICS_ADDR="127.0.0.1",
    )
    worker = workers(env)
    client = redis.Redis.from_url(redis_url)

    good = enqueue(50, "metrics")
    mailer.send(to="nobody@example.com", subject="refused", text="x")
    assert sink.wait_for(50, timeout=120), f"{len(sink.received)} of 50 arrived"
    assert wait_until(lambda: deadletters.DeadLetters(client).count() == 1)

    def settled() -> bool:
        m = scrape(port)
        return (
            value(m, "mailer_messages_total", outcome="sent") == 50
            and value(m, "mailer_messages_total", outcome="failed") == 1
            and value(m, "mailer_open_sessions") == sink.open_connections
            and value(m, "mailer_leases_held") == holders(client)
        )

    assert wait_until(settled, timeout=30), scrape(port)
    m = scrape(port)
    assert set(ids_at(sink)) == set(good) and len(sink.received) == 50
    assert value(m, "mailer_smtp_replies_total", code="250", phase="reply") == 50
    assert faults.injected["451_data"] == 3
    assert value(m, "mailer_smtp_replies_total", code="451", phase="reply") == 3
    assert value(m, "mailer_retries_total", kind="retry") == 3
    assert value(m, "mailer_messages_total", outcome="retried") == 3
    assert value(m, "mailer_smtp_replies_total", code="550", phase="rcpt") == 1
    assert value(m, "mailer_dead_lettered_total", kind="permanent") == 1
    assert value(m, "mailer_dead_letters_stored") == 1
    assert value(m, "mailer_messages_total", outcome="duplicate") == 0
    assert value(m, "mailer_messages_total", outcome="sent", relay="default") == 50
    assert value(m, "mailer_circuit_open") == 0
    assert value(m, "mailer_sessions_opened_total") == sink.total_connections
    rotated = [s for s in sink.sessions if s.mail_count == 10]
    assert rotated and all(s.quit for s in rotated)
    assert value(m, "mailer_session_rotations_total") == len(rotated)
    assert value(m, "mailer_worker_connections") == 4
    acquired = events(worker, "lease_acquired")
    assert value(m, "mailer_lease_wait_seconds_count") == len(acquired) >= 1

    # `mailer status --json`: the same worker's leases, and throughput from its counters.
    def throughput() -> dict[str, Any]:
        return dict(json.loads(status(env, "--json")))

    assert wait_until(lambda: throughput()["throughput"]["total"]["sent"] == 50, timeout=30)
    data = throughput()
    assert data["throughput"]["total"] == {
        "sent": 50,
        "duplicate": 0,
        "retried": 3,
        "failed": 1,
        "held": 0,
    }
    assert data["dead_letters"] == 1

    # Idle sessions may close (and give their leases back) between two reads: the three views
    # must agree when read together.
    def agree() -> bool:
        limit = json.loads(status(env, "--json"))["leases"]["limits"]["smtp"]
        return bool(limit["held"] == holders(client) == value(scrape(port), "mailer_leases_held"))

    assert wait_until(agree, timeout=30)
    smtp = json.loads(status(env, "--json"))["leases"]["limits"]["smtp"]
    here = f"{socket.gethostname()}:{worker.pid}"
    assert smtp["processes"] == ({here: smtp["held"]} if smtp["held"] else {})


def test_status_json_reflects_leases_and_dead_letters_the_test_created(
    redis_url: str, producer_env: Callable[[dict[str, str]], None]
) -> None:
    env = {"MAILER_BROKER_URL": redis_url, "MAILER_DEFAULT_FROM": "s@example.com"}
    producer_env(env)
    client = redis.Redis.from_url(redis_url)

    asyncio.run(take_leases(redis_url, "ops-host-a", 3))
    asyncio.run(take_leases(redis_url, "ops-host-b", 2))
    store = deadletters.DeadLetters(client)
    for i in range(2):
        payload = {"id": f"dead-{i}", "rcpt_to": [f"x{i}@example.com"], "meta": {"subject": "s"}}
        store.add(deadletters.record(payload, kind="permanent", code=550, text="no", attempts=1))
    enqueue(2, "waiting")
    Circuit(client).trip("auth at connect: 535 bad key")

    data = json.loads(status(env, "--json"))
    assert set(data) >= {  # new keys may be added (workers/observe/status.py), none removed
        "version",
        "broker",
        "queue",
        "lanes",
        "rate",
        "leases",
        "circuit",
        "dead_letters",
        "throughput",
        "memory",
    }
    assert data["version"] == 1
    assert data["queue"] == {"name": "mailer", "waiting": 2, "unacked": 0}
    smtp = data["leases"]["limits"]["smtp"]
    assert smtp["held"] == 5 and smtp["cap"] == 10000
    assert smtp["hosts"] == {"ops-host-a": 3, "ops-host-b": 2}
    assert smtp["processes"] == {f"ops-host-a:{os.getpid()}": 3, f"ops-host-b:{os.getpid()}": 2}
    assert data["dead_letters"] == 2
    assert data["circuit"]["open"] is True and "535" in data["circuit"]["reason"]
    tp = data["throughput"]
    assert tp["window_minutes"] == len(tp["per_minute"]) == 15
    assert tp["total"] == dict.fromkeys(("sent", "duplicate", "retried", "failed", "held"), 0)

    table = status(env)
    assert "dead letters  2" in table and "5/10000 held" in table
    assert "ops-host-a" in table and "OPEN: auth at connect: 535" in table


# ---- graceful shutdown ----------------------------------------------------------------------


def test_sigterm_mid_run_loses_nothing_and_leaves_no_lease(
    redis_url: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    sink, env = relay({"record_data": False, "mail_delay": 0.05}, MAILER_WORKER_CONNECTIONS=4)
    client = redis.Redis.from_url(redis_url)
    ids = enqueue(600, "term")
    worker = workers(env)
    assert sink.wait_for(100, timeout=120)

    assert stop(worker) == 0
    assert "Warm shutdown" in worker.log
    assert holders(client) == 0, "a lease outlived the worker"
    assert client.hlen("unacked") == 0, "a message is stuck unacknowledged"
    assert wait_until(lambda: sink.open_connections == 0, timeout=10)
    used = [s for s in sink.sessions if s.mail_count]
    assert used and all(s.quit for s in used), "a session was not closed with QUIT"
    assert sink.ambiguous == []
    arrived = ids_at(sink)
    waiting = queued(client)
    assert waiting, "SIGTERM came after the run: nothing was tested"
    assert set(arrived).isdisjoint(waiting)
    assert set(arrived) | set(waiting) == set(ids)
    (shutdown,) = events(worker, "shutdown")
    assert shutdown["leases"] == shutdown["open_sessions"]

    workers(env, name="w2")
    assert sink.wait_for(600, timeout=120), f"{len(sink.received)} of 600 arrived"
    time.sleep(0.5)
    assert set(ids_at(sink)) == set(ids) and max(ids_at(sink).values()) == 1
    assert deadletters.DeadLetters(client).count() == 0


def test_sigterm_while_the_relay_throttles_releases_every_lease_and_quits_every_session(
    redis_url: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    """Two workers under a relay that throttles (450 on MAIL above 40/s: sessions stay open,
    messages wait for the lowered rate), stopped with SIGTERM mid-run: no lease outlives them,
    every session that carried mail said QUIT, and a new worker delivers the rest once."""
    sink, env = relay(
        {
            "record_data": False,
            "throttle_rate": 40,
            "throttle_reply": "450 4.7.1 Error: too much mail from 127.0.0.1",
        },
        MAILER_WORKER_CONNECTIONS=6,
        MAILER_LEASE_TTL=60,  # a leaked lease would still be held when we look
    )
    client = redis.Redis.from_url(redis_url)
    ids = enqueue(800, "throttled-term")
    first = [workers(env, name="w1"), workers(env, name="w2")]
    assert sink.wait_for(120, timeout=120)
    assert wait_until(lambda: bool(sink.timestamps("refused")), timeout=60), "never throttled"

    assert [stop(w) for w in first] == [0, 0]
    assert holders(client) == 0, "a lease outlived its worker"
    assert wait_until(lambda: sink.open_connections == 0, timeout=10)
    used = [s for s in sink.sessions if s.mail_count]
    assert used and all(s.quit for s in used), "a session was cut without QUIT"
    assert sink.ambiguous == []
    waiting = queued(client)
    assert waiting, "SIGTERM came after the run: nothing was tested"

    workers(env, name="w3")
    assert sink.wait_for(800, timeout=240), f"{len(sink.received)} of 800 arrived"
    time.sleep(0.5)
    assert set(ids_at(sink)) == set(ids) and max(ids_at(sink).values()) == 1
    assert deadletters.DeadLetters(client).count() == 0


def test_sigterm_puts_reserved_messages_back_and_countdowns_stay_scheduled(
    redis_url: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    """Threads pool, one session, a prefetch of ten: five messages with a countdown, then ten
    to send now, of which the worker takes only two (it never holds more
    than twice the attempts it has sessions for: the rest stay for other workers). The warm
    shutdown restores what it holds to the queue, the one waiting for the session included;
    the countdowns wait in the durable schedule throughout."""
    sink, env = relay({"mail_delay": 0.5}, MAILER_WORKER_CONNECTIONS=1)
    client = redis.Redis.from_url(redis_url)
    later_ids = enqueue(5, "later", countdown=15)
    now_ids = enqueue(10, "now")
    worker = workers(env, args=("--prefetch-multiplier", "10"))
    assert wait_until(lambda: len(sink.received) >= 1, 30)
    assert wait_until(lambda: client.hlen("unacked") >= 1, 10)  # the now ones held
    assert client.llen("mailer") >= 6, "the worker took more than twice its sessions"
    # The countdowns never reach a worker: they wait in the durable schedule.
    assert all(client.zscore(SCHEDULE_DUE, i) is not None for i in later_ids)

    assert stop(worker) == 0
    assert client.hlen("unacked") == 0 and holders(client) == 0
    arrived = set(ids_at(sink))
    back = queued(client)
    assert arrived.isdisjoint(back) and arrived | set(back) == set(now_ids) | set(later_ids)
    assert set(later_ids) <= set(back), "a countdown message was lost"
    assert len(set(now_ids) & set(back)) >= 6

    workers(env, name="w2")
    assert sink.wait_for(15, timeout=90), f"{len(sink.received)} of 15 arrived"
    assert set(ids_at(sink)) == set(now_ids) | set(later_ids)
    assert max(ids_at(sink).values()) == 1


def test_sigterm_ends_lease_waits_and_requeues_them_without_spending_attempts(
    redis_url: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    """The fleet is at its cap (the test holds the only lease), so every task thread waits for
    a lease, here for up to 120 s: SIGTERM sends them back to the queue at once instead."""
    sink, env = relay(MAILER_WORKER_CONNECTIONS=4, MAILER_MAX_CONNECTIONS=1, MAILER_LEASE_WAIT=120)
    client = redis.Redis.from_url(redis_url)
    (held,) = asyncio.run(take_leases(redis_url, "ops-cap-holder", 1, cap=1))
    ids = enqueue(20, "cap")
    worker = workers(env)
    # Two attempts per session, four sessions: eight tasks claimed their message in the ledger
    # and are waiting for a lease now.
    claimed = ATTEMPTS_PER_SESSION * 4
    assert wait_until(lambda: len(list(client.scan_iter(keys.LEDGER_PREFIX + "*"))) == claimed, 30)
    time.sleep(0.5)

    assert stop(worker, timeout=60) == 0, "the shutdown waited for the lease wait to end"
    assert holders(client) == 1 and client.hlen("unacked") == 0  # only the test's lease
    retried = events(worker, "retried")
    assert len(retried) == claimed and {e["kind"] for e in retried} == {"no_lease"}
    assert sink.received == [] and sink.total_connections == 0
    back = queued(client)
    assert set(back) == set(ids)
    for event in retried:  # a lease wait is not an SMTP attempt: the count stays
        assert back[event["message_id"]]["kwargs"] == {"attempts": 0}

    asyncio.run(release_lease(redis_url, held))
    workers(env, name="w2")
    assert sink.wait_for(20, timeout=90), f"{len(sink.received)} of 20 arrived"
    assert set(ids_at(sink)) == set(ids) and max(ids_at(sink).values()) == 1


# ---- logs -----------------------------------------------------------------------------------


def test_logs_carry_one_structured_event_per_step_with_ids_and_never_the_key(
    redis_url: str,
    api_key: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
) -> None:
    faults = FaultPlan(p_451_data=1.0, max_faults=2, reject_rcpt={"nobody@example.com"})
    sink, env = relay(
        {"faults": faults}, MAILER_WORKER_CONNECTIONS=2, MAILER_MAX_MESSAGES_PER_CONNECTION=5
    )
    worker = workers(env)
    ids = enqueue(20, "logs")
    bad = mailer.send(to="nobody@example.com", subject="refused", text="x")
    assert sink.wait_for(20, timeout=90)
    assert wait_until(lambda: len(events(worker, "dead_lettered")) == 1, timeout=30)
    assert stop(worker) == 0

    sent = Counter(e["message_id"] for e in events(worker, "sent"))
    assert set(sent) == set(ids) and max(sent.values()) == 1
    retried = events(worker, "retried")
    assert len(retried) == 2 and all(e["message_id"] in ids for e in retried)
    assert {(e["kind"], e["code"]) for e in retried} == {("retry", 451)}
    (dead,) = events(worker, "dead_lettered")
    assert (dead["message_id"], dead["kind"], dead["code"]) == (bad, "permanent", 550)
    assert len(events(worker, "rotated")) >= 2
    acquired = {e["lease"] for e in events(worker, "lease_acquired")}
    released = {e["lease"] for e in events(worker, "lease_released")}
    assert acquired and acquired == released  # every lease taken was given back
    assert len(events(worker, "shutdown")) == 1
    for event in events(worker):
        assert event["ts"].endswith("Z") and event["level"] in ("info", "warning")

    forms = logs.secrets_of(api_key)
    assert len(forms) == 4
    for form in forms:
        assert form not in worker.log
    assert "[REDACTED]" not in worker.log  # nothing even tried to print it


def test_redacting_filter_keeps_the_key_out_of_every_part_of_a_line(api_key: str) -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.redaction")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s %(custom)s"))
    logger.handlers = [handler]
    logs.configure(logger, logs.secrets_of(api_key, urls=["redis://:hunter22@redis:6379/0"]))
    auth_plain = base64.b64encode(b"\0apikey\0" + api_key.encode()).decode()
    try:
        logger.warning("key %s in args", api_key, extra={"custom": f"extra {api_key}"})
        logger.warning(f"key {api_key} in the message", extra={"custom": ""})
        logger.warning("wire AUTH PLAIN %s", auth_plain, extra={"custom": ""})
        logger.warning("broker redis://:hunter22@redis:6379/0", extra={"custom": ""})
        event = {"event_name": "retried", "event_fields": {"reason": f"535 {api_key}", "n": 1}}
        logger.warning("retried", extra=event)  # an event line: its fields are what get cleaned
        try:
            raise RuntimeError(f"login failed for {api_key}")
        except RuntimeError:
            logger.exception("boom", extra={"custom": ""})
    finally:
        logger.handlers = []
    text = stream.getvalue()
    assert api_key not in text and auth_plain not in text and "hunter22" not in text
    assert text.count("[REDACTED]") == 7
    assert "RuntimeError: login failed for [REDACTED]" in text
    assert '"reason":"535 [REDACTED]","n":1' in text


def test_a_lease_wait_ends_at_shutdown_and_a_late_lease_is_never_stranded() -> None:
    """`_unless`, which lets SIGTERM end lease waits: a result, None once draining, and a lease
    that arrives as its waiter is cancelled is handed back (released), not lost."""
    from workers.engine.runtime import _unless

    async def scenario() -> None:
        stop = asyncio.Event()
        orphans: list[str] = []

        async def orphan(value: str) -> None:
            orphans.append(value)

        async def slow(value: str, delay: float) -> str:
            await asyncio.sleep(delay)
            return value

        assert await _unless(stop, slow("lease", 0), orphan) == "lease"

        cancelled = asyncio.Event()

        async def waits_forever() -> str:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "never"

        waiter = asyncio.ensure_future(_unless(stop, waits_forever(), orphan))
        await asyncio.sleep(0.01)
        stop.set()
        assert await waiter is None and cancelled.is_set()

        # Python 3.11's asyncio.wait_for (redis-py connects through it) can drop a cancel that
        # lands as its inner call completes: the wait still ends, the lease goes back.
        stop = asyncio.Event()

        async def drops_one_cancel() -> str:
            with contextlib.suppress(asyncio.CancelledError):  # as wait_for may, see above
                await asyncio.sleep(3600)
            await asyncio.sleep(3600)
            return "lease-despite-cancel"

        waiter = asyncio.ensure_future(_unless(stop, drops_one_cancel(), orphan))
        await asyncio.sleep(0.01)
        stop.set()
        async with asyncio.timeout(5):
            assert await waiter is None
        assert await _unless(stop, slow("not started", 0), orphan) is None

        async def dropped_then_granted() -> str:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
            return "late-lease-0"

        stop = asyncio.Event()
        waiter = asyncio.ensure_future(_unless(stop, dropped_then_granted(), orphan))
        await asyncio.sleep(0.01)
        stop.set()
        assert await waiter is None
        await asyncio.sleep(0.01)
        assert orphans == ["late-lease-0"]
        orphans.clear()

        ready = asyncio.Event()

        async def granted_then_abandoned() -> str:
            ready.set()
            return "late-lease"

        outer = asyncio.ensure_future(_unless(asyncio.Event(), granted_then_abandoned(), orphan))
        await ready.wait()  # the lease is granted; its waiter has not resumed yet
        outer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await outer
        await asyncio.sleep(0.01)
        assert orphans == ["late-lease"]

    asyncio.run(scenario())
