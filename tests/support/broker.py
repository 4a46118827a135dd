"""kombu-level helpers for the tests of the workers' fetch (workers/broker.py)."""

from __future__ import annotations

import time
from typing import Any

from kombu import Connection, Consumer, Exchange, Producer, Queue

from workers.broker import Channel

OURS = "workers.broker:Transport"
STOCK = "redis"
OPTIONS: dict[str, Any] = {"priority_steps": [0], "inflight_dead_after": 1}


def publish(url: str, queue: str, body: dict[str, Any]) -> None:
    with Connection(url, transport_options=OPTIONS) as conn:
        q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
        Producer(conn).publish(body, exchange=q.exchange, routing_key=queue, declare=[q])


def bodies(url: str, queue: str, timeout: float = 5.0) -> list[Any]:
    """Consumes whatever the queue holds, with our transport."""
    got: list[Any] = []
    with Connection(url, transport=OURS, transport_options=OPTIONS) as conn:
        q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        with Consumer(conn, [q], callbacks=[on_message]):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    if got:
                        break
    return got


def sweep(url: str) -> int:
    with Connection(url, transport=OURS, transport_options=OPTIONS) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        return channel.sweep()
