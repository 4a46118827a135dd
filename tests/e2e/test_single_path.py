"""The single-message path made cheaper without losing anything: our per-message events stay,
Celery's per-task INFO lines are off by default and come back with MAILER_CELERY_TASK_LOGS=1,
and the producer's reused Redis client survives a broker restart."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

import mailer
from devkit.redis_server import RedisServer
from devkit.sink import SinkServer
from devkit.worker import WorkerProcess
from mailer.client import Mailer
from mailer.config import Settings
from mailer.publish import QUEUE, ProducerChannel
from tests.support.helpers import wait_until
from tests.support.relay import Relay
from workers.observe.logs import parse_events

RECEIVED = "] received"  # Celery: "Task mailer.send[<id>] received"
SUCCEEDED = "] succeeded in "  # Celery: "Task mailer.send[<id>] succeeded in 0.01s: ..."
FROM = "sender@example.com"


def _send_and_wait(worker: WorkerProcess, sink: SinkServer, n: int) -> list[str]:
    ids = [
        mailer.send(to=f"user{i}@example.com", subject=f"s {i}", text="body\n") for i in range(n)
    ]
    assert sink.wait_for(n, timeout=60), f"only {len(sink.received)} arrived"

    def all_logged() -> bool:
        sent = {e.get("message_id") for e in parse_events(worker.lines) if e["event"] == "sent"}
        return sent >= set(ids)

    assert wait_until(all_logged, timeout=30), "a `sent` event is missing"
    return ids


@pytest.mark.parametrize(
    ("switch", "args"), [("", ()), ("1", ()), ("", ("--loglevel", "DEBUG"))], ids=str
)
def test_sent_events_always_celery_task_lines_only_when_asked(
    switch: str,
    args: tuple[str, ...],
    relay: Callable[..., Relay],
    api_key: str,
    workers: Callable[..., WorkerProcess],
) -> None:
    extra = {"MAILER_CELERY_TASK_LOGS": switch} if switch else {}
    sink, env = relay(MAILER_WORKER_CONNECTIONS=4, **extra)
    worker = workers(env, args=args)

    ids = _send_and_wait(worker, sink, 5)

    for message_id in ids:
        sent = [e for e in parse_events(worker.lines) if e.get("message_id") == message_id]
        assert [e["event"] for e in sent] == ["sent"]
    celery_lines = [x for x in worker.lines if RECEIVED in x or SUCCEEDED in x]
    if switch or args:
        # Both lines for every task; the `sent` events above are there as well.
        assert len([x for x in celery_lines if RECEIVED in x]) >= len(ids)
        assert len([x for x in celery_lines if SUCCEEDED in x]) >= len(ids)
    else:
        assert celery_lines == []
    assert " ready." in worker.log  # Celery's other INFO lines are untouched
    assert api_key not in worker.log


def test_producer_reused_client_publishes_across_a_broker_restart() -> None:
    server = RedisServer().start()
    try:
        client = Mailer(Settings.from_env({"MAILER_BROKER_URL": server.url}))
        for i in range(3):
            client.send(to=f"user{i}@example.com", subject="before", text="body\n", from_addr=FROM)
        channel = client.publisher.app.connection_for_write().default_channel
        assert isinstance(channel, ProducerChannel)
        server.restart(down_for=0.5)
        for i in range(3):
            client.send(to=f"user{i}@example.com", subject="after", text="body\n", from_addr=FROM)
        client.close()
        assert redis.Redis.from_url(server.url).llen(QUEUE) == 6
    finally:
        server.close()
