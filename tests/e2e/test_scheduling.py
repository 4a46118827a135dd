"""Scheduled sends end to end: held durably in Redis (not in a worker's memory), released
when due by whichever worker runs, cancellable until the relay may have them; retries with a
countdown wait in the same schedule."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

import mailer
from devkit.sink import FaultPlan
from devkit.worker import WorkerProcess
from mailer.wire import SCHEDULE_DUE
from tests.support.helpers import ids_at, wait_until
from tests.support.relay import Relay


def test_scheduled_messages_arrive_when_due_survive_a_restart_and_cancel_wins(
    redis_url: str, relay: Callable[..., Relay], workers: Callable[..., WorkerProcess]
) -> None:
    sink, env = relay({"record_data": False}, MAILER_WORKER_CONNECTIONS=4)
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    soon = [
        mailer.send(to=f"s{i}@example.com", subject="soon", text="x", send_at=now + 2)
        for i in range(5)
    ]
    later = [
        mailer.send(to=f"l{i}@example.com", subject="later", text="x", send_at=now + 10)
        for i in range(5)
    ]
    week = mailer.send(to="w@example.com", subject="next week", text="x", send_at=now + 7 * 86400)
    called_off = mailer.send(to="c@example.com", subject="cancelled", text="x", send_at=now + 3)
    assert mailer.cancel(called_off)
    assert client.zcard(SCHEDULE_DUE) == 11  # nothing in a queue, nothing in a worker

    first = workers(env, name="w1")
    assert sink.wait_for(5, timeout=60)
    first.stop(timeout=30)  # a restart between scheduling and release loses nothing
    workers(env, name="w2")
    assert sink.wait_for(10, timeout=60)
    time.sleep(2.0)  # the cancelled one (due at +3 s) would have arrived by now

    arrived = {r.message_id.split("@")[0]: r.received_at for r in sink.received if r.message_id}
    assert set(arrived) == set(soon) | set(later)
    assert all(arrived[m] >= now + 2 for m in soon) and all(arrived[m] >= now + 10 for m in later)
    assert week not in arrived and called_off not in arrived
    assert client.zscore(SCHEDULE_DUE, week) is not None
    assert mailer.cancel(week) and client.zcard(SCHEDULE_DUE) == 0
    assert max(ids_at(sink).values()) == 1


def test_a_cancel_racing_the_release_never_sends(
    redis_url: str, relay: Callable[..., Relay], workers: Callable[..., WorkerProcess]
) -> None:
    sink, env = relay({"record_data": False}, MAILER_WORKER_CONNECTIONS=4)
    workers(env)
    due = time.time() + 1.5
    ids = [
        mailer.send(to=f"r{i}@example.com", subject="race", text="x", send_at=due)
        for i in range(40)
    ]
    while time.time() < due - 0.05:
        time.sleep(0.01)
    cancelled = {m for m in ids[::2] if mailer.cancel(m)}
    assert sink.wait_for(len(ids) - len(cancelled), timeout=60)
    time.sleep(2.0)
    arrived = set(ids_at(sink))
    assert not arrived & cancelled, "a cancelled message was sent"
    assert arrived == set(ids) - cancelled


def test_a_retry_waits_in_the_schedule_not_in_a_worker(
    redis_url: str, relay: Callable[..., Relay], workers: Callable[..., WorkerProcess]
) -> None:
    # Every first DATA is refused with a 451: each message is retried once, with a countdown.
    sink, env = relay(
        {"record_data": False, "faults": FaultPlan(seed=3, p_451_data=1.0, max_faults=20)}
    )
    client = redis.Redis.from_url(redis_url)
    worker = workers(env)
    ids = [mailer.send(to=f"t{i}@example.com", subject="retry", text="x") for i in range(20)]
    assert wait_until(lambda: client.zcard(SCHEDULE_DUE) > 0, timeout=60), worker.log[-2000:]
    assert client.hlen("unacked") == 0 or wait_until(lambda: client.hlen("unacked") == 0, 30)
    assert sink.wait_for(20, timeout=120), f"{len(sink.received)} of 20"
    assert set(ids_at(sink)) == set(ids)
