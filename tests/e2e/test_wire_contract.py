"""The worker reads every task through the wire contract (mailer/wire.py): a malformed payload
put on the queue directly, with Celery's `send_task` or a raw LPUSH of a task message, is
dead-lettered as `invalid` with the reason, and nothing reaches the SMTP server."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

import mailer
from devkit.worker import WorkerProcess
from mailer.wire import BATCH_TASK, QUEUE, SEND_TASK
from tests.support.helpers import wait_until
from tests.support.relay import Relay
from workers.state.deadletters import DeadLetters


def _good_payload() -> dict[str, Any]:
    from mailer.client import default_mailer

    client = default_mailer()
    return dict(
        client.render(mailer.Message(to="ok@example.com", subject="ok", text="ok")).to_payload()
    )


def _raw_task(task: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    """A Celery protocol-2 message as kombu's Redis transport stores it, built by hand."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args, kwargs or {}, {"callbacks": None, "errbacks": None}]).encode()
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
        },
    }
    return json.dumps(message).encode()


def test_malformed_payloads_are_dead_lettered_as_invalid_and_never_sent(
    redis_url: str, relay: Callable[..., Relay], workers: Callable[..., WorkerProcess]
) -> None:
    sink, env = relay(MAILER_WORKER_CONNECTIONS=4)
    workers(env)
    good = _good_payload()
    wrong_version = {**good, "v": 99, "id": "a" * 32}
    missing_field = {k: v for k, v in good.items() if k != "rcpt_to"} | {"id": "b" * 32}
    injected = {**good, "id": "f" * 32, "data": "Bcc: x@evil.example\r\n" + good["data"]}
    app = Celery(broker=redis_url)
    app.send_task(SEND_TASK, args=[wrong_version], queue=QUEUE)
    app.send_task(SEND_TASK, args=[missing_field], queue=QUEUE)
    app.send_task(SEND_TASK, args=[], queue=QUEUE)  # no payload at all
    app.send_task(SEND_TASK, args=[injected], queue=QUEUE)  # a header render never writes
    app.send_task(
        BATCH_TASK,
        args=[[{**good, "id": "c" * 32, "v": 0}, {**good, "id": "d" * 32, "meta": "x"}]],
        queue=QUEUE,
    )
    client = redis.Redis.from_url(redis_url)
    client.lpush(QUEUE, _raw_task(SEND_TASK, [{**good, "id": "e" * 32, "mail_from": "no at"}]))
    client.lpush(QUEUE, _raw_task(SEND_TASK, ["just a string"]))
    mailer.send(to="real@example.com", subject="real", text="the one valid message")

    store = DeadLetters(client)
    assert wait_until(lambda: store.count() >= 8, timeout=60), [
        (d.id, d.kind, d.text) for d in store.list()
    ]
    assert sink.wait_for(1, timeout=60)
    time.sleep(1.0)  # anything wrongly sent would arrive now
    letters = {d.id: d for d in store.list()}
    assert all(d.kind == "invalid" for d in letters.values())
    assert "version" in letters["a" * 32].text
    assert "rcpt_to" in letters["b" * 32].text
    assert "meta" in letters["d" * 32].text
    assert "mail_from" in letters["e" * 32].text
    assert "data" in letters["f" * 32].text and "bcc" in letters["f" * 32].text.lower()
    assert len(sink.received) == 1, "an invalid payload reached the SMTP server"
    assert sink.received[0].rcpt_tos == ("real@example.com",)
    client.close()
