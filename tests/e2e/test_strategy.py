"""First attempts of `mailer.send` streamed past Celery's per-task machinery (workers/strategy.py):
a real worker, a real sink with faults, and the task events Flower would see, read off the
broker. Every outcome must look to Flower as it would from a Celery task, and every later attempt
must run as a Celery task."""

from __future__ import annotations

import base64
import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from kombu import Connection

import mailer
from devkit.sink import FaultPlan
from devkit.worker import WorkerProcess
from mailer.config import Settings
from tests.support.helpers import ids_at, wait_until
from tests.support.relay import Relay
from workers.app import app
from workers.state.deadletters import DeadLetters
from workers.strategy import plain_first_attempt
from workers.tasks import DecodedRequest, send_batch


class EventTap:
    """Every Celery event published on the broker, by task id (kombu's fanout is a Redis
    PUBLISH; a worker sends its task events in `task.multi` lists)."""

    def __init__(self, url: str) -> None:
        self.by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("*celeryev*")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            raw = self._pubsub.get_message(timeout=0.2)
            if raw is None:
                continue
            envelope = json.loads(raw["data"])
            body = json.loads(base64.b64decode(envelope["body"]))
            for event in body if isinstance(body, list) else [body]:
                if "uuid" in event:
                    self.by_task[event["uuid"]].append(event)

    def task_of(self, message_id: str) -> str:
        (task,) = {
            uuid
            for uuid, events in list(self.by_task.items())
            if any(message_id in str(e.get("args")) for e in events)
        }
        return task

    def types(self, task: str) -> list[str]:
        return [e["type"] for e in self.by_task[task]]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


@pytest.fixture
def tap(redis_url: str) -> Iterator[EventTap]:
    tap = EventTap(redis_url)
    yield tap
    tap.close()


def test_streamed_first_attempts_report_every_outcome_and_retries_run_as_celery_tasks(
    redis_url: str,
    relay: Callable[..., Relay],
    workers: Callable[..., WorkerProcess],
    tap: EventTap,
) -> None:
    sink, env = relay(MAILER_WORKER_CONNECTIONS=4, MAILER_VISIBILITY_TIMEOUT=60)
    worker = workers(env)
    warm = mailer.send(to="warm@example.com", subject="warm", text="warm\n")
    assert sink.wait_for(1, timeout=60), worker.log[-3000:]

    sink.faults = FaultPlan(p_451_data=1.0, max_faults=2, reject_rcpt={"nobody@example.com"})
    good = [mailer.send(to=f"u{i}@example.com", subject=f"s{i}", text="hi\n") for i in range(20)]
    bad = mailer.send(to="nobody@example.com", subject="refused", text="never\n")
    client = redis.Redis.from_url(redis_url)
    assert sink.wait_for(21, timeout=90), f"{len(sink.received)} of 21 arrived"
    assert wait_until(lambda: DeadLetters(client).get(bad) is not None, timeout=30)
    arrived = ids_at(sink)
    assert {m.split("@")[0] for m in arrived} == {warm, *good}
    assert max(arrived.values()) == 1

    def settled() -> bool:
        return all(
            {"task-succeeded", "task-failed"} & set(tap.types(tap.task_of(m))) for m in [*good, bad]
        )

    assert wait_until(settled, timeout=30), dict(tap.by_task)
    tasks = {m: tap.task_of(m) for m in good}
    retried = [m for m, t in tasks.items() if "task-retried" in tap.types(t)]
    print(f"\nretried: {len(retried)}; events of one: {tap.types(tasks[retried[0]])}")
    assert len(retried) == 2, {m: tap.types(t) for m, t in tasks.items()}
    for message_id, task in tasks.items():
        events = tap.by_task[task]
        types = [e["type"] for e in events]
        assert types[0] == "task-sent" and "task-received" in types
        if message_id in retried:
            # The first attempt was streamed; the retry, with the same task id, ran in Celery.
            (retry,) = [e for e in events if e["type"] == "task-retried"]
            assert "451" in retry["exception"] and "Try again later" in retry["exception"]
            after = types[types.index("task-retried") :]
            assert "task-started" in after and after[-1] == "task-succeeded"
            assert max(int(e.get("retries") or 0) for e in events) == 1
        else:
            # Streamed: received, then succeeded; Celery's tracer (task-started) never ran it.
            assert types == ["task-sent", "task-received", "task-succeeded"], types
            assert "'sent'" in events[-1]["result"]
    failed = tap.by_task[tap.task_of(bad)]
    assert [e["type"] for e in failed][-1] == "task-failed"
    assert "PermanentFailure" in failed[-1]["exception"] and "550" in failed[-1]["exception"]
    assert client.hlen("unacked") == 0 or wait_until(lambda: client.hlen("unacked") == 0, 10)


#: A payload as the producer makes it (the stream takes only what the wire contract accepts).
REAL = dict(
    mailer.Message(to="a@example.com", subject="s", text="t", from_addr="f@example.com")
    .render()
    .to_payload()
)


@dataclass
class _Message:
    """What `plain_first_attempt` reads of a kombu message; not JSON, so it calls `decode()`."""

    headers: dict[str, Any]
    body: Any = field(default_factory=lambda: [[REAL], {}, {"callbacks": None}])
    content_type: str = "application/data"
    content_encoding: str = "binary"

    def decode(self) -> Any:
        return self.body


PLAIN = {"task": "mailer.send", "retries": 0, "eta": None, "expires": None}


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({**PLAIN, "retries": 1}, None),
        ({**PLAIN, "eta": "2026-01-01T00:00:00"}, None),
        ({**PLAIN, "expires": "2026-01-01T00:00:00"}, None),
        ({**PLAIN, "timelimit": [10, None]}, None),
        ({**PLAIN, "task": "mailer.send_batch"}, None),
        (PLAIN, [[REAL], {"attempts": 1}, {}]),  # our retries carry kwargs
        (PLAIN, [[REAL, 2], {}, {}]),
        (PLAIN, [["not a payload"], {}, {}]),
        (PLAIN, [[{"id": "x"}], {}, {}]),  # the wire contract refuses it: Celery's path
        (PLAIN, [[REAL], {}, {"callbacks": [{"task": "other"}]}]),
    ],
    ids=str,
)
def test_anything_but_a_plain_first_attempt_is_left_to_celery(
    headers: dict[str, Any], body: Any
) -> None:
    message = _Message(headers, body) if body is not None else _Message(headers)
    assert plain_first_attempt(message) is None


def test_a_plain_first_attempt_is_taken_with_its_payload() -> None:
    assert plain_first_attempt(_Message({**PLAIN, "timelimit": [None, None]})) == REAL


def test_a_worker_reserves_two_messages_per_session_so_a_freed_session_never_waits_for_a_fetch(
    redis_url: str, relay: Callable[..., Relay], workers: Callable[..., WorkerProcess]
) -> None:
    """`mailer worker` reserves `ATTEMPTS_PER_SESSION` messages per session (its prefetch): while
    every session is busy, as many more are held, claimed and waiting for the first session
    that frees up; the rest stays in the queue for other workers. With Celery's default of one
    per thread, a session's next message is only fetched once its last one is acknowledged."""
    sink, env = relay(sink={"mail_delay": 1.0}, MAILER_WORKER_CONNECTIONS=3)
    worker = workers(env)
    ids = [mailer.send(to=f"r{i}@example.com", subject="held", text="hi\n") for i in range(20)]
    client = redis.Redis.from_url(redis_url)
    held: list[int] = []

    def all_arrived() -> bool:
        held.append(client.hlen("unacked"))
        return len(sink.received) == 20

    assert wait_until(all_arrived, timeout=120, interval=0.05), worker.log[-3000:]
    assert {m.split("@")[0] for m in ids_at(sink)} == set(ids)
    assert max(held) == 6, held  # two per session: never more, and reached


def test_a_batch_reaches_the_pool_decoded_once(redis_url: str) -> None:
    """Celery's strategy decodes a message's body in the consumer (to tell protocol 1 from 2);
    `mailer.send_batch`'s Request hands the pool that decoded body, so the pool thread does not
    parse the ~150 KB of JSON a second time. Read back here: a real batch published by the
    producer, fetched by kombu from a real Redis."""
    assert send_batch.Request is DecodedRequest
    payloads = [{"id": f"{n:032x}", "data": "x"} for n in range(3)]
    publisher = mailer.Mailer(Settings.from_env({"MAILER_BROKER_URL": redis_url}))
    publisher.publisher.send_batch(payloads)
    with Connection(redis_url) as conn:
        message = conn.SimpleQueue("mailer", no_ack=True).get(timeout=5)
    request = DecodedRequest(message, app=app, task=send_batch, hostname="test")
    assert request.content_type is None  # fast_trace_task then unpacks the body as it is
    assert request.body is message.payload  # the consumer's decode, not a second one
    assert request.body[0] == [payloads]
    publisher.close()


def test_a_published_send_is_decoded_once_and_as_kombu_would(redis_url: str) -> None:
    """A real `mailer.send` message, published by the producer and fetched by kombu: the
    stream decodes its JSON body itself (no kombu hook per object) into the message's own
    cache, so whoever calls `decode()` later gets that same object."""
    from kombu.utils.json import loads as kombu_loads

    payload = REAL
    publisher = mailer.Mailer(Settings.from_env({"MAILER_BROKER_URL": redis_url}))
    publisher.publisher.send(payload)
    with Connection(redis_url) as conn:
        message = conn.SimpleQueue("mailer", no_ack=True).get(timeout=5)
    assert plain_first_attempt(message) == payload
    assert message.decode() is message._decoded_cache
    assert message.decode() == kombu_loads(message.body)
    publisher.close()
