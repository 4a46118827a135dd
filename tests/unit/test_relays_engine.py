"""Per-relay isolation inside one worker process (workers/engine/relayparts.py, budget.py),
against a real redis-server and real TLS+AUTH sinks, one per relay, each with its own key.

The runtime is the one a worker builds, with a static relay source in place of the registry
(`StaticRelays`); the task path is played by the real settle functions of workers/settle.py
(`wait_for_circuit`, `decide`, `finish`), the way `mailer.send`'s body calls them.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import pytest
import redis

from devkit.sink import SinkServer, TLSMaterial
from mailer.config import Secret, Settings
from mailer.message import Message
from mailer.relays import Relay, default_relay
from mailer.wire import relay_of, to_payload
from tests.support.helpers import wait_until
from workers import settle
from workers.engine import runtime as runtime_module
from workers.engine.classify import Failure, Kind
from workers.engine.relayparts import StaticRelays, limits_for
from workers.engine.runtime import Result, Runtime
from workers.observe import logs, metrics
from workers.observe.status import Throughput, collect
from workers.state import keys
from workers.state.semaphore import Limit


def new_key() -> str:
    return "SG." + secrets.token_urlsafe(16)[:22] + "." + secrets.token_urlsafe(32)[:43]


def base_settings(
    redis_url: str, sink: SinkServer, tls: TLSMaterial, key: str, **extra: Any
) -> Settings:
    """The worker's environment: its `default` relay is `sink`."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "broker_url": redis_url,
        "smtp_host": "localhost",
        "smtp_port": sink.port,
        "smtp_tls": "starttls",
        "smtp_password": Secret(key),
        "smtp_ca_file": str(tls.ca_file),
        "smtp_timeout": 10.0,
        "data_timeout": 10.0,
        "lease_ttl": 10.0,
        "lease_wait": 20.0,
        "circuit_probe_interval": 0.5,
        **extra,
    }
    return Settings(**values)


def relay_on(name: str, sink: SinkServer, tls: TLSMaterial, key: str, **extra: Any) -> Relay:
    return Relay(
        name=name,
        host="localhost",
        port=sink.port,
        tls="starttls",
        username="apikey",
        password=Secret(key),
        ca_file=str(tls.ca_file),
        **extra,
    )


class Tenants(NamedTuple):
    """A worker whose `default` relay is one sink, and two named relays on two more."""

    settings: Settings
    a: Relay
    b: Relay
    sink_a: SinkServer
    sink_b: SinkServer


def tenants(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls: TLSMaterial,
    delays: tuple[float, float] = (0.0, 0.0),
    caps: tuple[int | None, int | None] = (None, None),
    **settings_extra: Any,
) -> Tenants:
    keys_ = [new_key() for _ in range(3)]
    default = make_sink(tls="starttls", auth=("apikey", keys_[0]))
    sink_a = make_sink(tls="starttls", auth=("apikey", keys_[1]), mail_delay=delays[0])
    sink_b = make_sink(tls="starttls", auth=("apikey", keys_[2]), mail_delay=delays[1])
    settings = base_settings(redis_url, default, tls, keys_[0], **settings_extra)
    a = relay_on("tenant-a", sink_a, tls, keys_[1], max_connections=caps[0])
    b = relay_on("tenant-b", sink_b, tls, keys_[2], max_connections=caps[1])
    return Tenants(settings, a, b, sink_a, sink_b)


class OneTenant(NamedTuple):
    """A worker whose `default` relay is one sink, and the relay `tenant-b` on another."""

    settings: Settings
    b: Relay
    default: SinkServer
    sink_b: SinkServer
    key_b: str


def one_tenant(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls: TLSMaterial,
    cap: int | None = None,
    **settings_extra: Any,
) -> OneTenant:
    key_default, key_b = new_key(), new_key()
    default = make_sink(tls="starttls", auth=("apikey", key_default))
    sink_b = make_sink(tls="starttls", auth=("apikey", key_b))
    settings = base_settings(redis_url, default, tls, key_default, **settings_extra)
    b = relay_on("tenant-b", sink_b, tls, key_b, max_connections=cap)
    return OneTenant(settings, b, default, sink_b, key_b)


def message(relay: str | None = None, n: int = 0) -> dict[str, Any]:
    payload: dict[str, Any] = dict(
        to_payload(
            Message(
                to=f"r{n}@example.com", subject=f"m{n}", text="hi", from_addr="s@example.com"
            ).render()
        )
    )
    if relay is not None:
        payload["meta"]["relay"] = relay
    return payload


def attempt(payload: dict[str, Any], attempts: int = 0) -> tuple[str, Result | Failure]:
    """What `mailer.send`'s body does with one message: the relay's breaker, the attempt, the
    verdict (workers/tasks.py `send`, less Celery)."""
    waiting = settle.wait_for_circuit(relay_of(payload))
    if waiting is not None:
        return settle.decide(payload, attempts, waiting, trip=False)[0], waiting
    try:
        result = runtime_module.runtime().deliver(payload)
    except Failure as failure:
        return settle.decide(payload, attempts, failure)[0], failure
    return str(settle.finish(payload, result, attempts)["status"]), result


def peak_together(*sinks: SinkServer) -> int:
    """Most sessions open at once across `sinks`, from their records."""
    edges: list[tuple[float, int]] = []
    for sink in sinks:
        for record in sink.sessions:
            edges.append((record.opened_at, 1))
            edges.append((record.closed_at if record.closed_at else float("inf"), -1))
    peak = now = 0
    for _, step in sorted(edges):  # a close sorts before an open at the same instant
        now += step
        peak = max(peak, now)
    return peak


Build = Callable[..., tuple[Runtime, StaticRelays]]


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Build]:
    """Builds the process's runtime with a static relay source, and makes it the process's
    runtime for workers/settle.py (which also reads the worker's settings)."""
    built: list[Runtime] = []

    def build(settings: Settings, relays: tuple[Relay, ...] = ()) -> tuple[Runtime, StaticRelays]:
        source = StaticRelays(relays)
        rt = Runtime(settings, relays=lambda _settings, _redis: source)
        built.append(rt)
        monkeypatch.setattr(runtime_module, "_runtime", rt)
        monkeypatch.setattr(settle, "settings", settings)
        return rt, source

    yield build
    for rt in built:
        rt.close(10)


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def listen(event: str, fields: Any) -> None:
        seen.append((event, dict(fields)))

    logs.subscribe(listen)
    yield seen
    logs.unsubscribe(listen)


# ---- the default relay is a single-relay worker, unchanged -----------------------------------


def test_the_default_relay_keeps_a_single_relay_workers_keys_limits_and_hold(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    key = new_key()
    sink = make_sink(tls="starttls", auth=("apikey", key))
    settings = base_settings(redis_url, sink, tls_material, key, max_connections_per_host=7)
    assert limits_for(default_relay(settings), settings) == [
        Limit("smtp", settings.max_connections),
        Limit(f"host:{settings.hostname}", 7),
    ]
    rt, _ = engine(settings)
    for n in range(3):
        assert attempt(message(n=n))[0] == "sent"
    assert len(sink.received) == 3
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(keys.lease_holders("smtp")) == 1
    assert client.zcard(keys.lease_holders(f"host:{settings.hostname}")) == 1
    assert wait_until(lambda: client.exists(keys.RATE) == 1, timeout=10)  # the unmetered count
    ours = {k.decode() for k in client.scan_iter("mailer:*")}
    assert not any(k.startswith((keys.RELAY_PREFIX, "mailer:sem:relay:")) for k in ours), ours
    # Alone, the default relay's messages hold their thread for an open breaker, as before.
    assert rt.holds_for_circuit("default")
    assert settle.wait_for_circuit("default", hold=0) is None
    rt.circuit.trip("535 bad key")
    assert client.exists(keys.CIRCUIT) == 1
    sent = [fields for event, fields in events if event == "sent"]
    assert len(sent) == 3 and {f["relay"] for f in sent} == {"default"}


# ---- one relay's revoked key opens its own circuit only --------------------------------------


def test_a_revoked_key_opens_that_relays_circuit_only_and_the_others_keep_sending(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    keys_ = {name: new_key() for name in ("default", "tenant-a", "tenant-b")}
    sinks = {name: make_sink(tls="starttls", auth=("apikey", k)) for name, k in keys_.items()}
    settings = base_settings(redis_url, sinks["default"], tls_material, keys_["default"])
    # tenant-a logs in for every message, so a revoked key shows at its next message.
    a = relay_on(
        "tenant-a",
        sinks["tenant-a"],
        tls_material,
        keys_["tenant-a"],
        max_messages_per_connection=1,
    )
    b = relay_on("tenant-b", sinks["tenant-b"], tls_material, keys_["tenant-b"])
    rt, _ = engine(settings, (a, b))
    names = ("default", "tenant-a", "tenant-b")
    client = redis.Redis.from_url(redis_url)

    def send_all(payloads: list[dict[str, Any]]) -> list[tuple[str, Result | Failure]]:
        with ThreadPoolExecutor(8) as pool:  # as a worker's task threads
            return list(pool.map(attempt, payloads))

    warm = send_all([message(name, n) for name in names for n in range(3)])
    assert [verdict for verdict, _ in warm] == ["sent"] * 9

    sinks["tenant-a"].auth = ("apikey", new_key())  # revoked at the relay
    held = [message("tenant-a", 10 + n) for n in range(10)]
    others = [message(name, 10 + n) for name in ("default", "tenant-b") for n in range(10)]
    outcomes = send_all(held + others)
    for payload, (verdict, outcome) in zip(held + others, outcomes, strict=True):
        if relay_of(payload) == "tenant-a":
            # Waiting for its own breaker: retried later, no attempt spent.
            assert verdict == "retry" and isinstance(outcome, Failure), outcome
            assert outcome.kind is Kind.AUTH and outcome.relay == "tenant-a"
            assert settle.decide(payload, 0, outcome, trip=False)[1] == 0
        else:
            assert verdict == "sent", (payload["meta"], outcome)
    assert client.exists(keys.for_relay("tenant-a", keys.CIRCUIT)) == 1
    assert client.exists(keys.CIRCUIT) == 0
    assert client.exists(keys.for_relay("tenant-b", keys.CIRCUIT)) == 0
    assert sinks["tenant-a"].auth_failures()
    assert not sinks["default"].auth_failures() and not sinks["tenant-b"].auth_failures()
    # Still open after the other relays' messages all went: they never waited for it.
    assert rt.circuits.get("tenant-a").state(max_age=0).open
    opened = [f for e, f in events if e == "circuit_opened"]
    assert [f["relay"] for f in opened] == ["tenant-a"]
    # Another relay's message never holds its thread for a breaker, nor the default relay's
    # once other relays are in use here.
    assert not rt.holds_for_circuit("tenant-a") and not rt.holds_for_circuit("default")

    # The relay's metrics carry its name; the breaker's gauge is the relay's own.
    families = {
        (s.name, s.labels.get("relay")): s.value
        for family in metrics.RuntimeCollector(settings, runtime_module.occupancy).collect()
        for s in family.samples
    }
    assert families[("mailer_circuit_open", "tenant-a")] == 1
    assert families[("mailer_circuit_open", "tenant-b")] == 0
    assert families[("mailer_circuit_open", "default")] == 0
    assert families[("mailer_open_sessions", "tenant-b")] >= 1

    # `mailer status` (the relays as the registry stores them): the one in trouble first.
    client.hset(keys.RELAYS, mapping={"tenant-a": "{}", "tenant-b": "{}"})
    relays = collect(settings)["relays"]
    assert relays["shown"][0]["name"] == "tenant-a" and relays["shown"][0]["circuit"]["open"]

    sinks["tenant-a"].auth = ("apikey", keys_["tenant-a"])  # restored
    pending = list(held)

    def delivered() -> bool:
        for payload in list(pending):
            if attempt(payload)[0] == "sent":
                pending.remove(payload)
        return not pending

    assert wait_until(delivered, timeout=60), [p["id"] for p in pending]
    assert client.exists(keys.for_relay("tenant-a", keys.CIRCUIT)) == 0
    for name, sink in sinks.items():
        counts = sink.message_ids()
        assert len(counts) == 13 and set(counts.values()) == {1}, name


# ---- leases: the relay's cap and the fleet's both hold ---------------------------------------


def test_a_relays_own_cap_and_the_fleet_cap_both_hold(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
) -> None:
    settings, a, b, sink_a, sink_b = tenants(
        redis_url,
        make_sink,
        tls_material,
        delays=(0.2, 0.2),
        caps=(2, None),
        max_connections=3,
        worker_connections=8,
    )
    assert [lim.name for lim in limits_for(a, settings)] == ["smtp", "relay:tenant-a"]
    assert limits_for(b, settings)[1] == Limit("relay:tenant-b", 3)  # the fleet's, counted
    rt, _ = engine(settings, (a, b))
    payloads = [message(name, n) for n in range(12) for name in ("tenant-a", "tenant-b")]
    outcomes = rt.deliver_many(payloads)
    # Tenant A may keep twice its own cap waiting here; the rest of its messages go back to
    # the schedule at once (a free wait) instead of holding the room tenant B's messages need.
    parked = [p for p, o in zip(payloads, outcomes, strict=True) if isinstance(o, Failure)]
    assert all(
        isinstance(o, Failure) and o.kind is Kind.NO_LEASE and "own connection cap" in o.text
        for o in outcomes
        if not isinstance(o, Result)
    ), outcomes
    assert {relay_of(p) for p in parked} == {"tenant-a"} and len(parked) == 12 - 4
    assert len(sink_b.received) == 12
    for start in range(0, len(parked), 4):  # their retries, as the schedule releases them
        again = rt.deliver_many(parked[start : start + 4])
        assert all(isinstance(o, Result) and o.status == "sent" for o in again), again
    assert len(sink_a.received) == 12
    assert sink_a.peak_connections <= 2
    assert peak_together(sink_a, sink_b) <= 3
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(keys.lease_holders("relay:tenant-a")) <= 2
    assert client.zcard(keys.lease_holders("smtp")) <= 3


# ---- the process's session budget across relays -----------------------------------------------


def test_a_relay_at_the_budget_retires_another_relays_least_recently_used_idle_session(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
) -> None:
    settings, a, b, sink_a, sink_b = tenants(
        redis_url, make_sink, tls_material, delays=(0.3, 0.0), worker_connections=2
    )
    rt, _ = engine(settings, (a, b))
    assert all(
        isinstance(o, Result) for o in rt.deliver_many([message("tenant-a", n) for n in (1, 2)])
    )
    parts_a = rt.relays.get_nowait("tenant-a")
    assert parts_a is not None and parts_a.pool.open_sessions == 2  # the whole budget, idle

    assert attempt(message("tenant-b"))[0] == "sent"
    assert parts_a.pool.stats.reclaimed == 1 and parts_a.pool.open_sessions == 1
    [retired] = [s for s in sink_a.sessions if s.closed_at is not None]
    assert retired.quit  # closed with QUIT, not dropped
    [opened] = sink_b.sessions
    assert retired.closed_at is not None and retired.closed_at <= opened.opened_at
    assert rt.open_sessions == 2 == rt.budget.used


def test_a_relay_waiting_at_the_budget_gets_a_session_from_a_busy_relay_over_its_share(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
) -> None:
    settings, a, b, sink_a, sink_b = tenants(
        redis_url, make_sink, tls_material, delays=(0.5, 0.0), worker_connections=2
    )
    rt, _ = engine(settings, (a, b))
    outcomes: dict[int, Result | Failure] = {}
    done = threading.Event()

    def ended(index: int, outcome: Result | Failure) -> None:
        outcomes[index] = outcome
        if len(outcomes) == 7:
            done.set()

    busy = [message("tenant-a", n) for n in range(6)]
    rt.start_many(busy, ended)

    def a_full() -> bool:
        parts = rt.relays.get_nowait("tenant-a")
        return parts is not None and parts.pool.open_sessions == 2 and parts.pool.waiting > 0

    assert wait_until(a_full, timeout=30, interval=0.01)
    rt.start_many([message("tenant-b")], lambda _, outcome: ended(6, outcome))
    assert done.wait(60), outcomes
    bad = {i: o for i, o in outcomes.items() if not (isinstance(o, Result) and o.status == "sent")}
    assert not bad, bad
    assert len(sink_a.received) == 6 and len(sink_b.received) == 1
    parts_a = rt.relays.get_nowait("tenant-a")
    assert parts_a is not None and parts_a.pool.stats.reclaimed >= 1
    retired = [s for s in sink_a.sessions if s.closed_at is not None]
    [opened] = sink_b.sessions
    assert any(s.quit and s.closed_at <= opened.opened_at for s in retired if s.closed_at)
    assert peak_together(sink_a, sink_b) <= 2


# ---- a relay's parts: dropped when idle, rebuilt when its spec changes -----------------------


def test_idle_relay_parts_are_dropped_and_a_changed_spec_gets_fresh_parts(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    settings, b, _, sink_b, key_b = one_tenant(
        redis_url, make_sink, tls_material, cap=4, session_idle_timeout=0.3
    )
    rt, source = engine(settings, (b,))
    rt.relays.idle_after = 0.2
    client = redis.Redis.from_url(redis_url)

    assert attempt(message("tenant-b", 1))[0] == "sent"
    first = rt.relays.get_nowait("tenant-b")
    assert first is not None
    assert wait_until(lambda: rt.relays.get_nowait("tenant-b") is None, timeout=30)
    assert rt.relays.get_nowait("default") is rt.relays.default  # never dropped
    assert sink_b.open_connections == 0 and all(s.quit for s in sink_b.sessions)
    assert client.zcard(keys.lease_holders("relay:tenant-b")) == 0
    assert any(e == "relay_parts_closed" and f["relay"] == "tenant-b" for e, f in events)

    assert attempt(message("tenant-b", 2))[0] == "sent"  # built again on its next message
    second = rt.relays.get_nowait("tenant-b")
    assert second is not None and second is not first
    rt.relays.idle_after = 3600.0

    changed = relay_on("tenant-b", sink_b, tls_material, key_b, max_connections=2)
    source.put(changed)  # what a reload does: the version moves, the spec differs
    assert wait_until(lambda: rt.relays.get_nowait("tenant-b") is not second, timeout=30)
    assert attempt(message("tenant-b", 3))[0] == "sent"
    third = rt.relays.get_nowait("tenant-b")
    assert third is not None and third.relay == changed
    assert [lim.cap for lim in third.semaphore.limits] == [settings.max_connections, 2]
    assert wait_until(lambda: second.pool.quiet, timeout=30)  # the old pool closed its sessions
    assert len(sink_b.received) == 3


def test_relays_waiting_for_leases_share_one_wakeup_subscription(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
) -> None:
    settings, a, b, sink_a, sink_b = tenants(
        redis_url, make_sink, tls_material, delays=(0.5, 0.5), caps=(1, 1)
    )
    rt, _ = engine(settings, (a, b))
    finished = threading.Semaphore(0)
    # Two each: what a relay with a cap of one may keep waiting here (Runtime._uncrowded).
    payloads = [message(name, n) for n in range(2) for name in ("tenant-a", "tenant-b")]
    rt.start_many(payloads, lambda _i, _o: finished.release())
    assert wait_until(lambda: rt.wakeups.waiting_semaphores == 2, timeout=30, interval=0.01)
    client = redis.Redis.from_url(redis_url)
    [(_, subscribers)] = client.pubsub_numsub(keys.lease_released())
    assert subscribers == 1
    for _ in payloads:
        assert finished.acquire(timeout=60)
    assert len(sink_a.received) == len(sink_b.received) == 2
    assert sink_a.peak_connections == sink_b.peak_connections == 1


# ---- a relay that is not configured, or unusable here ----------------------------------------


def test_a_message_for_a_relay_not_configured_or_unusable_waits_and_expires_naming_it(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    engine: Build,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    settings, b, default, sink_b, _ = one_tenant(
        redis_url, make_sink, tls_material, circuit_probe_interval=60.0
    )
    rt, source = engine(settings, (b,))

    ghost = message("ghost")
    for _ in range(3):
        verdict, outcome = attempt(ghost)
        assert verdict == "retry" and isinstance(outcome, Failure)
        assert outcome.kind is Kind.NO_RELAY and outcome.reason.endswith(
            "relay ghost is not configured"
        )
        _, attempts, countdown = settle.decide(ghost, 0, outcome)
        assert attempts == 0 and 30.0 <= countdown <= 90.0  # about a probe interval
    warned = [f for e, f in events if e == "relay_unavailable"]
    assert len(warned) == 1 and warned[0]["relay"] == "ghost"  # once per interval

    source.mark_unusable("tenant-b", "MAILER_RELAY_SECRETS_DIR/tenant-b is missing")
    verdict, outcome = attempt(message("tenant-b"))
    assert verdict == "retry" and isinstance(outcome, Failure) and outcome.kind is Kind.NO_RELAY
    assert "tenant-b is unusable on this host: MAILER_RELAY_SECRETS_DIR" in outcome.reason
    assert not sink_b.received and not default.received  # never through another relay

    old = message("ghost")
    old["meta"]["created_at"] = time.time() - settings.max_message_age - 1
    verdict, outcome = attempt(old)
    assert verdict == "expired" and isinstance(outcome, Failure)
    settle.dead_letter(old, "expired", outcome, 0)
    letter = rt.dead.get(str(old["id"]))
    assert letter is not None and letter.relay == "ghost" and "relay ghost" in letter.text


# ---- mailer status and mailer failures, per relay --------------------------------------------


def test_status_lists_the_relays_with_activity_or_trouble_and_counts_the_quiet_ones(
    redis_url: str,
) -> None:
    settings = Settings(redis_url=redis_url, broker_url=redis_url, smtp_password=Secret("x"))
    client = redis.Redis.from_url(redis_url)
    client.hset(
        keys.RELAYS,
        mapping={f"tenant-{n:04}": json.dumps({"max_connections": 5}) for n in range(1000)},
    )
    counts = Throughput(client)
    for n in range(10):
        counts.add("sent", n + 1, relay=f"tenant-{n:04}")
    counts.flush()
    client.set(keys.for_relay("tenant-0500", keys.CIRCUIT), json.dumps({"reason": "535 revoked"}))

    relays = collect(settings)["relays"]
    assert relays["known"] == 1001 and not relays["all"]
    names = [r["name"] for r in relays["shown"]]
    assert names[0] == "tenant-0500"  # trouble first
    assert names[1:] == [f"tenant-{n:04}" for n in reversed(range(10))]  # then the busiest
    assert relays["quiet"] == 1001 - 11
    assert relays["shown"][1]["throughput"]["sent"] == 10
    assert relays["shown"][1]["leases"]["cap"] == 5

    everything = collect(settings, relays="all")["relays"]
    assert len(everything["shown"]) == 1001 and everything["quiet"] == 0


def test_failures_list_shows_and_filters_the_relay(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailer.cli import main
    from workers.state.deadletters import DeadLetters, record

    monkeypatch.setenv("MAILER_BROKER_URL", redis_url)
    store = DeadLetters(redis.Redis.from_url(redis_url))
    mine, other = message("tenant-a", 1), message(None, 2)
    store.add(record(mine, kind="permanent", code=550, text="550 no", attempts=1))
    store.add(record(other, kind="permanent", code=550, text="550 no", attempts=1))
    assert main(["failures", "list", "--relay", "tenant-a"]) == 0
    out = capsys.readouterr().out
    assert str(mine["id"]) in out and "relay=tenant-a" in out and str(other["id"]) not in out
    assert main(["failures", "list", "--json"]) == 0
    listed = {d["id"]: d["relay"] for d in json.loads(capsys.readouterr().out)}
    assert listed == {str(mine["id"]): "tenant-a", str(other["id"]): "default"}
