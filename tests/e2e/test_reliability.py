"""Never lose, never double-send: real worker processes, a real Redis, the recording SMTP server
with injected faults. Nothing under test is mocked; waits are generous and assertions are on
counts, never on timings. Each test prints what it measured (run with `-s` to see it).

Kombu (5.7) restores a dead worker's unacknowledged messages in `restore_visible`, which runs
once when a worker starts polling and then on a timer (`unacked_restore_interval` x
`unacked_restore_throttle`; we configure 10 s x 1 in mailer/publish.py). A message returns to
the queue only once it has been unacknowledged for the visibility timeout, counted from its
delivery to the dead worker, so with MAILER_VISIBILITY_TIMEOUT=60 (the minimum) the survivors
see a killed worker's messages 60-70 s after the kill.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

import mailer
from devkit.redis_server import RedisServer
from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from devkit.worker import WorkerProcess
from mailer.client import default_mailer
from mailer.wire import SCHEDULE_DUE
from tests.support.helpers import fate, ids_at, wait_until
from tests.support.relay import relay_env
from workers.observe.logs import parse_events
from workers.state.deadletters import DeadLetters
from workers.state.keys import CIRCUIT as CIRCUIT_KEY
from workers.state.keys import FETCH_INFLIGHT_PREFIX as INFLIGHT
from workers.state.keys import LEDGER_PREFIX

Workers = Callable[..., WorkerProcess]


# ---- helpers ------------------------------------------------------------------------------


def publish(n: int, tag: str, *, to: Callable[[int], Any] | None = None) -> list[str]:
    """Enqueues n `mailer.send` tasks (small bodies); returns their ids in order."""
    client = default_mailer()
    ids = []
    for i in range(n):
        rendered = client.render(
            mailer.Message(
                to=to(i) if to else f"user{i}@example.com", subject=f"{tag} {i}", text=f"b{i}\n"
            )
        )
        client.publisher.send(rendered.to_payload())
        ids.append(rendered.id)
    return ids


def drained(client: redis.Redis) -> bool:
    """Nothing waiting (in the queue, or in the durable schedule for a retry's countdown),
    nothing delivered-but-unacknowledged."""
    return (
        client.llen("mailer") == 0
        and client.hlen("unacked") == 0
        and client.zcard(SCHEDULE_DUE) == 0
    )


def ledger_states(client: redis.Redis) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in client.scan_iter(match=LEDGER_PREFIX + "*", count=1000):
        raw = client.get(key)
        if raw is not None:
            out[key.decode()[len(LEDGER_PREFIX) :]] = json.loads(raw)["state"]
    return out


def broker_tasks(client: redis.Redis) -> list[dict[str, Any]]:
    """Every `mailer.send` task in the broker (queued or unacked): headers, args and kwargs."""
    raws: list[bytes] = list(client.lrange("mailer", 0, -1))
    raws += [json.dumps(json.loads(v)[0]).encode() for v in client.hvals("unacked")]
    tasks = []
    for raw in raws:
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        tasks.append({"headers": message["headers"], "args": args, "kwargs": kwargs})
    return [t for t in tasks if t["headers"].get("task") == "mailer.send"]


def letters(client: redis.Redis) -> dict[str, Any]:
    return {d.id: d for d in DeadLetters(client).list(limit=100_000)}


def authenticating_connections(sink: SinkServer) -> int:
    return sum(1 for s in sink.sessions if s.auth_attempts)


# ---- 1. kill -9 in the middle of 2,000 messages -------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_run_loses_nothing_and_resends_nothing_the_relay_had(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Workers,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    # A small delay before each reply keeps several transactions inside the ambiguous window
    # (terminator written, 250 not yet read) at any moment, as on a real relay.
    sink = make_sink(
        tls="starttls", auth=("apikey", api_key), record_data=False, faults=FaultPlan(delay=0.004)
    )
    env = relay_env(
        redis_url,
        sink,
        tls_material,
        api_key,
        MAILER_WORKER_CONNECTIONS=8,
        MAILER_VISIBILITY_TIMEOUT=60,
    )
    producer_env(env)
    client = redis.Redis.from_url(redis_url)
    first = workers(env, name="doomed")
    ids = publish(2000, "kill")
    assert sink.wait_for(700, timeout=120), sink.summary()

    first.kill()  # SIGKILL: no warm shutdown, nothing acknowledged or restored
    time.sleep(1.0)  # bytes already on the wire reach the server
    accepted_before = set(ids_at(sink))
    states = ledger_states(client)
    unacked_ids = {
        json.loads(base64.b64decode(json.loads(v)[0]["body"]))[0][0]["id"]
        for v in client.hvals("unacked")
    }
    by_state = Counter(states.get(i, "none") for i in unacked_ids)
    # Fetched but not yet recorded as unacknowledged: kombu's own BRPOP would have lost these.
    fetched = sum(int(client.llen(k)) for k in client.scan_iter(INFLIGHT + "*"))
    data_at_kill = {i for i, s in states.items() if s == "data"}
    print(
        f"\nat kill: accepted={len(accepted_before)} unacked={len(unacked_ids)} "
        f"fetched-not-recorded={fetched} "
        f"(ledger of those: {dict(by_state)}) ledger states={dict(Counter(states.values()))}"
    )

    survivor = workers(env, name="survivor")

    def held() -> set[str]:
        return {i for i, d in letters(client).items() if d.kind == "uncertain"}

    # Every message arrives, or is held for review because the dead worker had marked it `data`.
    assert wait_until(lambda: set(ids) <= set(ids_at(sink)) | held(), timeout=240), (
        f"{fate(set(ids) - set(ids_at(sink)) - held(), redis_url, [first, survivor])}\n"
        f"{sink.summary()}"
    )
    # The killed worker's messages come back after the visibility timeout: wait for them too.
    assert wait_until(lambda: drained(client), timeout=150, interval=1.0), "broker never drained"
    time.sleep(1.0)

    counts = ids_at(sink)
    dead = letters(client)
    uncertain = held()
    final = ledger_states(client)
    duplicates_of_accepted = [i for i in accepted_before if counts[i] > 1]
    never_written = data_at_kill - accepted_before
    print(
        f"delivered={len(set(counts) & set(ids))}/{len(ids)} "
        f"duplicates of messages accepted before the kill={len(duplicates_of_accepted)} "
        f"duplicates overall={sum(1 for n in counts.values() if n > 1)} "
        f"in 'data' at kill={len(data_at_kill)} (of which the server never got "
        f"{len(never_written)}) held as uncertain={len(uncertain)} "
        f"unacked at kill: sent-but-unacked={by_state.get('sent', 0)} "
        f"resent after restore={by_state.get('claimed', 0) + by_state.get('none', 0)}"
    )
    assert set(counts) | uncertain == set(ids), "a message was lost"
    assert duplicates_of_accepted == []
    assert max(counts.values()) == 1
    # A message in `data` at the kill may have left (its terminator written, the reply never
    # read) or not (killed after Redis recorded `data`, before the bytes left): nobody can
    # tell, so the policy (hold) dead-letters it as uncertain instead of risking a duplicate.
    # Only those: every other message arrived.
    assert uncertain == data_at_kill
    assert set(ids) - set(counts) <= data_at_kill
    assert set(dead) == uncertain
    assert Counter(final.values()) == Counter(
        {"sent": len(ids) - len(uncertain), "uncertain": len(uncertain)}
    )
    # Every message the dead worker held unacknowledged came back and was settled.
    assert all(final[i] in ("sent", "uncertain") for i in unacked_ids)


# ---- 2. faults over 1,000 messages ----------------------------------------------------------


@pytest.mark.slow
def test_faults_over_a_thousand_messages(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Workers,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    rejected = {f"nobody{i}@example.com" for i in range(10)}
    plan = FaultPlan(
        seed=7,
        p_421_mail=0.03,
        p_drop_rcpt=0.03,
        p_drop_after_data=0.01,
        p_451_data=0.03,
        reject_rcpt=rejected,
    )
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, faults=plan)
    env = relay_env(
        redis_url,
        sink,
        tls_material,
        api_key,
        MAILER_WORKER_CONNECTIONS=8,
        MAILER_VISIBILITY_TIMEOUT=60,
    )
    producer_env(env)
    client = redis.Redis.from_url(redis_url)
    worker = workers(env)

    def to(i: int) -> str:
        return f"nobody{i // 50}@example.com" if i % 50 == 0 and i < 500 else f"u{i}@example.com"

    single = publish(500, "faults", to=to)  # 10 of these go to a refused recipient
    many = mailer.send_many(  # the batch path: per-message retries become their own tasks
        [{"to": f"b{i}@example.com", "subject": f"batch {i}", "text": "x"} for i in range(500)]
    )
    ids = single + many
    refused_ids = {single[i] for i in range(0, 500, 50)}
    assert len(refused_ids) == 10
    assert wait_until(lambda: drained(client), timeout=240, interval=0.5), sink.summary()
    assert wait_until(lambda: len(letters(client)) >= 10, timeout=30)
    time.sleep(1.0)

    counts = ids_at(sink)
    ambiguous = {(r.message_id or "").split("@")[0] for r in sink.ambiguous}
    dead = letters(client)
    events = parse_events(worker.lines)
    by_kind: dict[str, set[str]] = {}
    for d in dead.values():
        by_kind.setdefault(d.kind, set()).add(d.id)
    print(
        f"\ninjected={dict(plan.injected)} delivered={len(set(counts))} "
        f"ambiguous={len(ambiguous)} dead letters={ {k: len(v) for k, v in by_kind.items()} } "
        f"retried by kind={dict(Counter(e.get('kind') for e in events if e['event'] == 'retried'))}"
    )
    assert plan.injected["421_mail"] and plan.injected["drop_rcpt"]
    assert plan.injected["451_data"] and plan.injected["drop_after_data"]
    # Everything but the refused arrived, each exactly once: with policy `hold` an ambiguous
    # message is never sent again (the server did record it: it was delivered once).
    assert set(counts) == set(ids) - refused_ids
    assert max(counts.values()) == 1
    assert ambiguous == by_kind.get("uncertain", set())
    assert by_kind.get("permanent") == refused_ids
    assert all(dead[i].code == 550 and "550" in dead[i].text for i in refused_ids)
    assert set(by_kind) <= {"permanent", "uncertain"}, by_kind
    assert api_key not in worker.log

    # One message, three recipients, one refused: the others get it once, the refusal is kept
    # per recipient, and a redelivered copy (we publish the same payload again) sends nothing.
    sink.faults = FaultPlan(reject_rcpt={"nobody@example.com"})
    client_ = default_mailer()
    rendered = client_.render(
        mailer.Message(
            to=["ann@example.com", "nobody@example.com"],
            cc="cy@example.com",
            subject="mixed",
            text="x",
        )
    )
    payload = rendered.to_payload()
    client_.publisher.send(payload)
    assert wait_until(lambda: rendered.id in letters(client), timeout=30)
    client_.publisher.send(payload)  # as if redelivered
    assert wait_until(lambda: drained(client), timeout=30)
    time.sleep(0.5)
    got = [r for r in sink.received if (r.message_id or "").startswith(rendered.id)]
    assert [r.rcpt_tos for r in got] == [("ann@example.com", "cy@example.com")]
    letter = letters(client)[rendered.id]
    assert letter.kind == "recipients"
    assert letter.refused == {"nobody@example.com": [550, "5.1.1 User unknown"]}
    assert letter.payload["rcpt_to"] == ["nobody@example.com"]  # a replay goes to them only


def test_uncertain_policy_retry_resends_the_ambiguous_ones(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Workers,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """The other documented policy: at-least-once. The ambiguous ones arrive twice."""
    plan = FaultPlan(p_drop_after_data=1.0, max_faults=3)
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, faults=plan)
    env = relay_env(redis_url, sink, tls_material, api_key, MAILER_UNCERTAIN_POLICY="retry")
    producer_env(env)
    client = redis.Redis.from_url(redis_url)
    workers(env)
    ids = publish(20, "policy")
    assert wait_until(lambda: set(ids_at(sink)) == set(ids) and drained(client), timeout=90)
    time.sleep(0.5)
    counts = ids_at(sink)
    ambiguous = {(r.message_id or "").split("@")[0] for r in sink.ambiguous}
    assert len(ambiguous) == 3
    assert {i for i, n in counts.items() if n == 2} == ambiguous
    assert letters(client) == {}


# ---- 3. a wrong key: the circuit breaker ----------------------------------------------------


@pytest.mark.slow
def test_wrong_key_opens_the_circuit_and_queued_messages_keep_their_attempts(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Workers,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False)
    wrong = "SG." + "w" * 22 + "." + "x" * 43
    probe = 2.0
    env = relay_env(
        redis_url,
        sink,
        tls_material,
        wrong,
        MAILER_WORKER_CONNECTIONS=4,
        MAILER_CIRCUIT_PROBE_INTERVAL=probe,
        MAILER_VISIBILITY_TIMEOUT=60,
    )
    producer_env(env)
    client = redis.Redis.from_url(redis_url)
    worker = workers(env)
    ids = publish(60, "wrong key")
    assert wait_until(lambda: client.exists(CIRCUIT_KEY), timeout=30), worker.log[-3000:]
    opened_at = time.monotonic()
    state = json.loads(client.get(CIRCUIT_KEY))
    assert "535" in state["reason"] and wrong not in state["reason"]
    first_burst = authenticating_connections(sink)

    time.sleep(12.0)
    elapsed = time.monotonic() - opened_at
    auth_conns = authenticating_connections(sink)
    tasks = broker_tasks(client)
    attempts = Counter(t["kwargs"].get("attempts", 0) for t in tasks)
    reprs = [t["headers"].get("kwargsrepr") for t in tasks if t["headers"].get("retries")]
    print(
        f"\ncircuit open for {elapsed:.0f}s: connections that tried AUTH={auth_conns} "
        f"(first burst {first_burst}, probe interval {probe}s), tasks in broker={len(tasks)} "
        f"attempts={dict(attempts)} retried reprs={Counter(reprs)}"
    )
    assert sink.received == []
    # Roughly one probe per interval fleet-wide (plus the first in-flight burst), not one per
    # message: 60 queued messages would have meant 60+ connections.
    assert auth_conns <= first_burst + elapsed / probe + 3
    assert set(attempts) == {0}, "a queued message spent an attempt while the circuit was open"
    assert all(r == "{'attempts': 0}" for r in reprs)
    assert letters(client) == {}
    status = subprocess.run(
        [sys.executable, "-m", "mailer", "status", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    circuit = json.loads(status.stdout)["circuit"]
    assert circuit["open"] and "535" in circuit["reason"] and wrong not in status.stdout
    assert wrong not in worker.log and api_key not in worker.log
    worker.stop()

    fixed = relay_env(redis_url, sink, tls_material, api_key, MAILER_CIRCUIT_PROBE_INTERVAL=probe)
    workers(fixed, name="fixed")
    assert wait_until(lambda: set(ids_at(sink)) == set(ids), timeout=120), sink.summary()
    assert wait_until(lambda: not client.exists(CIRCUIT_KEY), timeout=30)
    assert max(ids_at(sink).values()) == 1
    assert letters(client) == {}


# ---- 5. broker blips ------------------------------------------------------------------------


def test_publish_to_a_dead_broker_raises_a_clear_error_without_the_password(
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    server = RedisServer().start()
    server.stop()
    url = f"redis://:hunter2-broker-pw@127.0.0.1:{server.port}/0"
    producer_env({"MAILER_BROKER_URL": url, "MAILER_DEFAULT_FROM": "s@example.com"})
    started = time.monotonic()
    with pytest.raises(mailer.PublishError) as info:
        mailer.send(to="a@example.com", subject="s", text="x")
    took = time.monotonic() - started
    text = str(info.value)
    print(f"\nPublishError after {took:.1f}s: {text}")
    assert f"127.0.0.1:{server.port}" in text
    assert "hunter2-broker-pw" not in text and "hunter2-broker-pw" not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert took < 120  # bounded: the publish retry policy gives up
    server.close()


@pytest.mark.slow
def test_workers_reconnect_by_themselves_after_a_redis_restart(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Workers,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    server = RedisServer().start()  # our own: the restart must not disturb other tests
    try:
        sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False)
        env = relay_env(server.url, sink, tls_material, api_key, MAILER_VISIBILITY_TIMEOUT=60)
        producer_env(env)
        worker = workers(env)
        before = publish(20, "before")
        assert wait_until(lambda: set(ids_at(sink)) >= set(before), timeout=60)

        server.restart(down_for=2.0)
        after = publish(20, "after")  # the producer reconnects too
        assert wait_until(lambda: set(ids_at(sink)) >= set(after), timeout=120), worker.log[-3000:]
        counts = ids_at(sink)
        print(
            f"\nafter a Redis restart: {len(counts)} delivered, max copies {max(counts.values())}"
        )
        assert set(counts) == set(before) | set(after)
        assert max(counts.values()) == 1
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        server.close()


@pytest.mark.slow
def test_a_broker_restart_mid_run_loses_nothing_and_sends_nothing_twice(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Workers,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """Redis (broker, ledger and leases, AOF on) restarts while batches and single tasks are
    being fetched, run and acknowledged. Fetch replies and acks are lost with the connections:
    every message must still arrive, once (or be held as uncertain if its outcome was lost)."""
    server = RedisServer().start()
    try:
        faults = FaultPlan(delay=0.004)
        sink = make_sink(tls="starttls", auth=("apikey", api_key), record_data=False, faults=faults)
        env = relay_env(
            server.url,
            sink,
            tls_material,
            api_key,
            MAILER_VISIBILITY_TIMEOUT=60,
            MAILER_WORKER_CONNECTIONS=8,
        )
        producer_env(env)
        worker = workers(env)
        client = redis.Redis.from_url(server.url)
        batch = [
            mailer.Message(to=f"bulk{i}@example.com", subject=f"restart {i}", text=f"b{i}\n")
            for i in range(600)
        ]
        ids = default_mailer().send_many(batch, batch_size=25) + publish(200, "restart single")
        assert wait_until(lambda: len(ids_at(sink)) >= 250, timeout=120), sink.summary()
        server.restart(down_for=2.0)

        def held() -> set[str]:
            return {i for i, d in letters(client).items() if d.kind == "uncertain"}

        assert wait_until(lambda: set(ids) <= set(ids_at(sink)) | held(), timeout=240), (
            f"{fate(set(ids) - set(ids_at(sink)) - held(), server.url, [worker])}\n{sink.summary()}"
        )
        counts = ids_at(sink)
        uncertain = held()
        print(
            f"\nbroker restart mid-run: delivered {len(set(counts) & set(ids))}/{len(ids)}, "
            f"max copies {max(counts.values())}, held as uncertain {len(uncertain)} "
            f"(of which delivered {len(uncertain & set(counts))})"
        )
        assert max(counts.values()) == 1
        assert set(ids) - set(counts) <= uncertain
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        server.close()


# ---- duplicates of one task: what redelivery and publish-then-ack retries produce ---------------


def test_copies_of_the_same_task_send_the_message_once(
    redis_url: str,
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    workers: Workers,
    producer_env: Callable[[dict[str, str]], None],
) -> None:
    """Each payload published three times, as a redelivery or a retry published just before its
    worker died would: concurrent copies wait for the one in flight, later ones are
    acknowledged without sending."""
    sink = make_sink(
        tls="starttls", auth=("apikey", api_key), record_data=False, faults=FaultPlan(delay=0.01)
    )
    env = relay_env(redis_url, sink, tls_material, api_key, MAILER_WORKER_CONNECTIONS=8)
    producer_env(env)
    client = redis.Redis.from_url(redis_url)
    worker = workers(env)
    mailer_ = default_mailer()
    payloads = [
        mailer_.render(
            mailer.Message(to=f"d{i}@example.com", subject=f"copies {i}", text="x")
        ).to_payload()
        for i in range(40)
    ]
    for payload in payloads:  # adjacent copies run at the same time on different threads
        for _ in range(3):
            mailer_.publisher.send(payload)
    assert wait_until(lambda: drained(client), timeout=120, interval=0.5)
    time.sleep(0.5)
    counts = ids_at(sink)
    events = Counter(
        e["event"] + (f":{e['kind']}" if "kind" in e else "") for e in parse_events(worker.lines)
    )
    print(f"\n120 tasks for 40 messages: server got {sum(counts.values())}; events {dict(events)}")
    assert set(counts) == {p["id"] for p in payloads}
    assert max(counts.values()) == 1
    assert letters(client) == {}


# ---- unit level: the ledger's transitions, the probe slot, requeue on a failed retry ----------


@pytest.fixture
def ledger(redis_url: str) -> Any:
    import redis.asyncio as aioredis

    from workers.state.ledger import Ledger

    def run(body: Callable[[Ledger], Any]) -> Any:
        async def main() -> Any:
            r = aioredis.from_url(redis_url)
            try:
                return await body(Ledger(r, ttl=600, claim_ttl=0.3))
            finally:
                await r.aclose()

        return asyncio.run(main())

    return run


def test_ledger_claim_is_exclusive_and_lapses(ledger: Any) -> None:
    async def body(lg: Any) -> None:
        assert await lg.claim("m1", "a") is None
        assert await lg.claim("m1", "a") is None  # our own claim: renewed
        blocking = await lg.claim("m1", "b")
        assert blocking.state == "claimed" and blocking.owner == "a"
        assert not await lg.begin_data("m1", "b", 5)  # not b's to send
        await asyncio.sleep(0.5)  # a's worker died before the terminator: the claim lapses
        assert await lg.claim("m1", "b") is None
        assert not await lg.begin_data("m1", "a", 5)  # a woke up: it must not write the body
        assert await lg.begin_data("m1", "b", 5)
        await lg.settle("m1", "b", "sent", "250 ok")
        assert (await lg.claim("m1", "c")).state == "sent"

    ledger(body)


def test_ledger_ambiguous_window(ledger: Any) -> None:
    async def body(lg: Any) -> None:
        # While the sender may still be waiting for the reply, copies wait (even under `retry`).
        assert await lg.claim("m2", "a") is None and await lg.begin_data("m2", "a", 0.3)
        assert (await lg.claim("m2", "b")).state == "data"
        assert (await lg.claim("m2", "b", takeover=True)).state == "data"
        # Past its window the sender is dead: a copy under `hold` finds it uncertain, stays out.
        await asyncio.sleep(0.4)
        held = await lg.claim("m2", "b")
        assert held.state == "uncertain"
        assert (await lg.claim("m2", "c")).state == "uncertain"
        # Under `retry` one copy takes it over; a second copy waits for that one.
        assert await lg.claim("m2", "d", takeover=True) is None
        assert (await lg.claim("m2", "e", takeover=True)).state == "claimed"
        # A definite 4xx after the terminator: the relay does not have it, forget the attempt.
        assert await lg.begin_data("m2", "d", 5)
        await lg.release("m2", "d")
        assert await lg.get("m2") is None
        # An attempt whose cleanup was lost (Redis went down after `data` was written, before
        # the body): its own retry names it and may claim; anyone else still waits.
        assert await lg.claim("m4", "a") is None and await lg.begin_data("m4", "a", 60)
        assert (await lg.claim("m4", "b", released=("x",))).state == "data"
        assert await lg.claim("m4", "b", released=("a",)) is None
        # A chain of such attempts: `a` wrote `data`, then the next attempt's claim was lost
        # too (Redis down). Its retry names both, since either may own the record.
        assert await lg.claim("m5", "a") is None and await lg.begin_data("m5", "a", 60)
        assert (await lg.claim("m5", "c", released=("b",))).state == "data"
        assert await lg.claim("m5", "c", released=("a", "b")) is None
        # Outcomes are written only by their attempt (except `sent`: the relay said so).
        assert await lg.claim("m3", "a") is None and await lg.begin_data("m3", "a", 5)
        assert not await lg.settle("m3", "x", "failed", "550")
        assert await lg.settle("m3", "a", "uncertain", "no reply")
        assert await lg.settle("m3", "z", "sent", "250")
        assert (await lg.get("m3")).state == "sent"

    ledger(body)


def test_a_retry_remembers_every_attempt_that_left_nothing_at_the_relay() -> None:
    from workers.settle import RELEASED_KEPT, retry_kwargs

    assert retry_kwargs(1, "") == {"attempts": 1}
    assert retry_kwargs(1, "", "a") == {"attempts": 1, "released": "a"}
    assert retry_kwargs(2, "a") == {"attempts": 2, "released": "a"}  # e.g. waited in flight
    assert retry_kwargs(2, "a", "b") == {"attempts": 2, "released": "a b"}
    many = " ".join(f"o{i}" for i in range(RELEASED_KEPT))
    assert retry_kwargs(3, many, "new")["released"].split() == [
        *many.split()[1:],
        "new",
    ]


def test_one_probe_per_interval_fleet_wide(redis_url: str) -> None:
    from workers.state.circuit import Circuit

    circuits = [Circuit(redis.Redis.from_url(redis_url), probe_interval=1.0) for _ in range(20)]
    circuits[0].trip("auth at connect: 535 Authentication failed")
    assert all(c.state(max_age=0).open for c in circuits)
    wins: list[int] = []
    barrier = threading.Barrier(len(circuits))

    def contend(i: int) -> None:
        barrier.wait()
        for _ in range(50):  # 20 threads x 50 tries over ~1.5 s
            if circuits[i].try_probe():
                wins.append(i)
            time.sleep(0.03)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(circuits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Tripping took the first interval's slot; over ~1.5 s at most one or two more probes.
    assert 1 <= len(wins) <= 2, wins
    circuits[5].reset()
    assert not circuits[0].state(max_age=0).open


def test_a_retry_that_cannot_be_published_requeues_instead_of_dropping() -> None:
    from celery.exceptions import Reject

    from workers.engine.classify import Failure, Kind, Phase
    from workers.tasks import _republish

    class BrokerDown:
        def retry(self, **_: Any) -> Exception:
            raise Reject(ConnectionError("broker down"), requeue=False)  # what Celery does

    failure = Failure(Kind.RETRY, 451, "later", Phase.REPLY)
    with pytest.raises(Reject) as info:
        _republish(BrokerDown(), 1.0, failure, lane="default", args=(), kwargs={})  # type: ignore[arg-type]
    assert info.value.requeue is True
