"""Failover (workers/engine/failover.py) and the fleet-wide trouble runs it reads
(workers/state/trouble.py), on a real Redis; the failures that start a run come from real
sessions against the fault-injecting sink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from devkit.redis_server import free_port
from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from mailer.config import Secret, Settings
from mailer.message import Message
from mailer.relays import Relay
from tests.support.helpers import run_async as run
from tests.support.helpers import sink_settings
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.failover import Route, Router, transient
from workers.engine.session import Session, wire_body
from workers.state import keys
from workers.state.trouble import TroubleRuns

T = TypeVar("T")
KEY = "SG.failover-test-key"


def calls(client: redis.Redis, command: str) -> int:
    """How many times Redis ran `command` since the last CONFIG RESETSTAT."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def relay(name: str, **fields: Any) -> Relay:
    return Relay(name, "localhost", 2525, "starttls", "apikey", Secret("k"), **fields)


PRIMARY = relay("primary", fallback="backup", fallback_lanes=("transactional",), failover_after=5)
BACKUP = relay("backup", failover_after=5)
SES = relay("ses-backup", profile="ses", configuration_set="failover")


def registry(*relays: Relay) -> Callable[[str], Relay | None]:
    by_name = {r.name: r for r in relays}
    return by_name.get


def closed(names: set[str]) -> Callable[[str], bool]:
    return lambda name: name in names


# ---- the trouble run ------------------------------------------------------------------------


def test_a_run_begins_at_the_first_failure_and_a_success_ends_it(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def body(client: aioredis.Redis) -> None:
        runs = TroubleRuns(client, ttl=60, max_age=0)
        assert runs.key("tenant-7") == "mailer:relay:tenant-7:trouble"
        assert runs.key("default") == keys.TROUBLE == "mailer:trouble"  # the historical style
        assert await runs.since("tenant-7") is None
        before = time.time()
        await runs.failed("tenant-7")
        since = await runs.since("tenant-7")
        assert since is not None and before <= since <= time.time()
        assert 0 < sync.pttl(runs.key("tenant-7")) <= 60_000
        await runs.failed("tenant-7")  # SET NX: a later failure keeps the run's start
        assert await runs.since("tenant-7") == since
        assert await runs.since("default") is None  # relays have runs of their own
        await runs.succeeded("tenant-7")
        assert await runs.since("tenant-7") is None and not sync.exists(runs.key("tenant-7"))

    run(redis_url, body)


def test_reads_and_writes_are_per_process_not_per_message(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def body(client: aioredis.Redis) -> None:
        runs = TroubleRuns(client, ttl=120, max_age=3600)  # nothing goes stale in this test
        sync.config_resetstat()
        await asyncio.gather(*(runs.since("r1") for _ in range(200)))
        await asyncio.gather(*(runs.succeeded("r1") for _ in range(200)))
        assert (calls(sync, "get"), calls(sync, "del")) == (1, 0)  # one shared read, no write
        sync.set(runs.key("r1"), "1.0")  # another process's run: seen at the next read
        assert await runs.since("r1") is None

        await asyncio.gather(*(runs.failed("r2") for _ in range(200)))
        await asyncio.gather(*(runs.failed("r2") for _ in range(200)))
        assert (calls(sync, "set"), calls(sync, "pexpire")) == (2, 1)  # ours once, plus r1's
        assert await runs.since("r2") is not None and calls(sync, "get") == 2

    run(redis_url, body)


def test_the_routers_hooks_write_only_when_due(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    lost = Failure(Kind.RECONNECT, None, "connection lost (SMTPConnectError)", Phase.CONNECT)

    async def body(client: aioredis.Redis) -> None:
        runs = TroubleRuns(client, max_age=3600)
        router = Router(runs, registry(PRIMARY, BACKUP), closed(set()))
        assert await runs.since("primary") is None  # this process's view: no run
        sync.config_resetstat()
        for _ in range(500):
            router.record_success("primary")  # a healthy relay: nothing to do, not even a task
        assert not router._pending
        for _ in range(500):
            router.record_failure("primary", lost)
        await router.settle()
        assert (calls(sync, "set"), calls(sync, "get")) == (1, 1)  # one pipeline for the run
        for _ in range(500):
            router.record_success("primary")
        await router.settle()
        assert calls(sync, "del") == 1 and not sync.exists(runs.key("primary"))

    run(redis_url, body)


def test_redis_down_never_reaches_the_caller() -> None:
    async def body() -> None:
        client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
        try:
            runs = TroubleRuns(client, max_age=0)
            assert await runs.since("r") is None
            await runs.failed("r")
            await runs.succeeded("r")
            assert await runs.try_probe("r", 10) is False
            router = Router(runs, registry(PRIMARY, BACKUP), closed(set()))
            assert await router.route(PRIMARY, "transactional", False) == Route("primary")
        finally:
            await client.aclose()

    asyncio.run(body())


# ---- routing --------------------------------------------------------------------------------


def test_only_the_fallback_lanes_of_a_relay_with_a_fallback_fail_over(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        router = Router(TroubleRuns(client), registry(PRIMARY, BACKUP), closed(set()))
        alone = relay("alone")
        assert await router.route(alone, "transactional", True) == Route("alone")
        assert await router.route(PRIMARY, "bulk", True) == Route("primary")
        assert await router.route(PRIMARY, "transactional", False) == Route("primary")

    run(redis_url, body)


def test_an_open_circuit_fails_over_and_one_message_per_interval_probes(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def body(client: aioredis.Redis) -> None:
        router = Router(TroubleRuns(client, max_age=0), registry(PRIMARY, BACKUP), closed(set()))
        routes = [await router.route(PRIMARY, "transactional", True) for _ in range(5)]
        assert routes[0] == Route("primary", "probe: primary circuit open", "probe")
        assert routes[1:] == [Route("backup", "primary circuit open", "fallback")] * 4
        probe = keys.for_relay("primary", keys.TROUBLE_PROBE)
        assert 0 < sync.pttl(probe) <= 10_000  # fleet-wide, for one probe interval
        sync.delete(probe)  # the interval is over
        assert (await router.route(PRIMARY, "transactional", True)).kind == "probe"

    run(redis_url, body)


def test_a_trouble_run_older_than_failover_after_fails_over_until_a_success(
    redis_url: str,
) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.set(keys.for_relay("primary", keys.TROUBLE_PROBE), "1")  # this test is not about probes

    async def body(client: aioredis.Redis) -> None:
        router = Router(TroubleRuns(client, max_age=0), registry(PRIMARY, BACKUP), closed(set()))
        key = keys.for_relay("primary", keys.TROUBLE)
        sync.set(key, repr(time.time() - 1))  # a young run: not yet
        assert await router.route(PRIMARY, "transactional", False) == Route("primary")
        sync.set(key, repr(time.time() - 42))
        route = await router.route(PRIMARY, "transactional", False)
        assert route.relay_name == "backup" and route.kind == "fallback"
        assert route.reason.startswith("primary failing for 4")
        router.record_success("primary")  # the probe went through: traffic returns
        await router.settle()
        assert await router.route(PRIMARY, "transactional", False) == Route("primary")

    run(redis_url, body)


def test_a_fallback_that_is_down_or_missing_keeps_the_message_home(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def body(client: aioredis.Redis) -> None:
        runs = TroubleRuns(client, max_age=0)
        router = Router(runs, registry(PRIMARY, BACKUP), closed({"backup"}))
        route = await router.route(PRIMARY, "transactional", True)
        assert route == Route("primary", "primary circuit open; fallback backup circuit open too")

        async def is_open(name: str) -> bool:  # the circuit state may be awaitable too
            return False

        router = Router(runs, registry(PRIMARY, BACKUP), is_open)
        sync.set(keys.for_relay("backup", keys.TROUBLE), repr(time.time() - 60))
        route = await router.route(PRIMARY, "transactional", True)
        assert route.relay_name == "primary"
        assert route.reason.startswith("primary circuit open; fallback backup failing for 6")

        router = Router(runs, registry(PRIMARY), closed(set()))
        route = await router.route(PRIMARY, "transactional", True)
        assert route == Route("primary", "primary circuit open; fallback backup is not configured")

    run(redis_url, body)


def test_a_message_only_sendgrid_can_send_stays_off_other_profiles(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.set(keys.for_relay("primary", keys.TROUBLE_PROBE), "1")
    fan_out = (
        Message(
            to="a@example.com",
            subject="s",
            text="Hi -name-",
            from_addr="s@example.com",
            smtpapi={"to": ["a@example.com", "b@example.com"], "sub": {"-name-": ["A", "B"]}},
        )
        .render()
        .data.decode()
    )
    plain = Message(to="a@example.com", subject="s", text="t", from_addr="s@example.com")
    data = plain.render().data.decode()

    async def body(client: aioredis.Redis) -> None:
        to_ses = relay("primary", fallback="ses-backup", fallback_lanes=("transactional",))
        router = Router(TroubleRuns(client), registry(to_ses, SES), closed(set()))
        route = await router.route(to_ses, "transactional", True, fan_out)
        assert route == Route(
            "primary",
            "primary circuit open; X-SMTPAPI to, sub cannot go through ses-backup (ses)",
        )
        assert await router.route(to_ses, "transactional", True, data) == Route(
            "ses-backup", "primary circuit open", "fallback"
        )
        router = Router(TroubleRuns(client), registry(PRIMARY, BACKUP), closed(set()))
        route = await router.route(PRIMARY, "transactional", True, fan_out)
        assert route.relay_name == "backup"  # a SendGrid fallback reads X-SMTPAPI itself

    run(redis_url, body)


def test_the_probe_interval_must_fit_the_runs_ttl(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        with pytest.raises(ValueError, match="three probe intervals"):
            Router(TroubleRuns(client, ttl=20), registry(), closed(set()), probe_interval=10)

    run(redis_url, body)


# ---- which failures are the relay's trouble: real sessions against the sink ------------------


def _settings(sink: SinkServer, tls: TLSMaterial, key: str = KEY) -> Settings:
    return sink_settings(sink, tls, key)


async def _attempt(settings: Settings, rcpt: str = "a@example.com") -> Failure:
    async def before_body() -> None:
        return None

    message = b"From: s@example.com\r\nTo: a@example.com\r\nSubject: t\r\n\r\nhello\r\n"
    session = Session(settings)
    try:
        await session.open()
        await session.transaction("s@example.com", [rcpt], wire_body(message), before_body)
    except Failure as failure:
        return failure
    finally:
        session.abort()
    raise AssertionError("the attempt went through")


@pytest.mark.parametrize(
    ("sink_options", "rcpt", "kind", "counts"),
    [
        ({"faults": FaultPlan(p_451_data=1.0)}, "a@example.com", Kind.RETRY, True),
        ({"faults": FaultPlan(p_421_mail=1.0)}, "a@example.com", Kind.RECONNECT, True),
        ({"faults": FaultPlan(p_drop_rcpt=1.0)}, "a@example.com", Kind.RECONNECT, True),
        ({"throttle_rate": 0}, "a@example.com", Kind.THROTTLED, False),
        ({"faults": FaultPlan(defer_rcpt={"a@example.com"})}, "a@example.com", Kind.RETRY, False),
        (
            {"faults": FaultPlan(reject_rcpt={"a@example.com"})},
            "a@example.com",
            Kind.PERMANENT,
            False,
        ),
    ],
)
def test_transient_failures_from_a_real_relay(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    sink_options: dict[str, Any],
    rcpt: str,
    kind: Kind,
    counts: bool,
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", KEY), **sink_options)
    failure = asyncio.run(_attempt(_settings(sink, tls_material), rcpt))
    assert failure.kind is kind, failure
    assert transient(failure) is counts


def test_a_refused_connection_counts_a_revoked_key_or_spent_quota_does_not(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, redis_url: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", KEY))
    sink.refuse_connections()
    refused = asyncio.run(_attempt(_settings(sink, tls_material)))
    assert refused.kind is Kind.RECONNECT and transient(refused)
    sink.accept_connections()
    revoked = asyncio.run(_attempt(_settings(sink, tls_material, key="SG.revoked")))
    assert revoked.kind is Kind.AUTH and not transient(revoked)  # the circuit's, not ours
    sink.start_quota()
    quota = asyncio.run(_attempt(_settings(sink, tls_material)))
    assert quota.kind is Kind.QUOTA and not transient(quota)
    for ours in ("attempt timed out", "lease expired while connecting", "worker is shutting down"):
        assert not transient(Failure(Kind.RECONNECT, None, ours, Phase.CONNECT))

    async def body(client: aioredis.Redis) -> None:
        runs = TroubleRuns(client, max_age=0)
        router = Router(runs, registry(PRIMARY, BACKUP), closed(set()))
        for failure in (revoked, quota):
            router.record_failure("primary", failure)
        await router.settle()
        assert await runs.since("primary") is None
        router.record_failure("primary", refused)
        await router.settle()
        assert await runs.since("primary") is not None

    run(redis_url, body)
