"""The workers' fetch (workers/broker.py) against a real Redis, in this process: fetch records,
batches, acks, the room a busy worker leaves, a closing channel and a lost reply.
tests/e2e/test_broker_processes.py kills real consumer processes in the loss window.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import redis
from kombu import Connection, Consumer, Exchange, Queue

from tests.support.broker import OPTIONS, OURS, bodies, publish
from tests.support.helpers import wait_until
from workers.broker import Channel
from workers.state.keys import FETCH_QUEUES as QUEUES


def test_a_closing_channel_puts_back_what_it_fetched_and_never_read(redis_url: str) -> None:
    """As in a warm shutdown with a fetched reply still unread: back on the queue at close."""
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport=OURS, transport_options=OPTIONS) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        channel._heartbeat("closing")
        raw = json.dumps({"body": "x", "properties": {"delivery_tag": "t1"}})
        client.lpush(channel.inflight_key, raw)
        channel.close()
        assert client.lrange("closing", 0, -1) == [raw.encode()]
        assert client.llen(channel.inflight_key) == 0
        # Still registered until a sweep finds it silent: a fetch that lands late is caught.
        assert client.hget(QUEUES, channel.consumer_id) == b"closing"


def test_a_fetch_whose_reply_is_lost_with_the_connection_is_fetched_again(redis_url: str) -> None:
    """A broker restart or a dropped connection between the BLMOVE and reading its reply: the
    message is on our list and nobody would deliver it while we live. The next fetch first puts
    it back (kombu's BRPOP would have lost it)."""
    client = redis.Redis.from_url(redis_url)
    got: list[Any] = []
    with Connection(redis_url, transport=OURS, transport_options=OPTIONS) as conn:
        q = Queue("dropped", Exchange("dropped", type="direct"), routing_key="dropped")

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        with Consumer(conn, [q], callbacks=[on_message]):
            channel = conn.default_channel
            assert isinstance(channel, Channel)
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.3)  # empty: leaves a BLMOVE outstanding
            assert channel._unread
            publish(redis_url, "dropped", {"n": 2})
            assert wait_until(lambda: client.llen(channel.inflight_key) == 1, timeout=10)
            channel.client.connection.disconnect()  # the reply goes with the connection
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
    assert got == [{"n": 2}]
    assert client.llen("dropped") == 0
    assert client.llen(channel.inflight_key) == 0


@contextlib.contextmanager
def holding(
    url: str, queue: str, n: int, prefetch: int | None = None
) -> Iterator[tuple[Connection, list[Any]]]:
    """`n` messages published to `queue`, and a consumer with our transport that keeps every
    message it gets unacknowledged in the yielded list (closing it restores what is left)."""
    for i in range(n):
        publish(url, queue, {"n": i})
    got: list[Any] = []
    with Connection(url, transport=OURS, transport_options=OPTIONS) as conn:
        if prefetch is not None:
            conn.default_channel.basic_qos(0, prefetch, False)
        q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
        with Consumer(conn, [q], callbacks=[lambda body, message: got.append(message)]):
            yield conn, got


def pump(conn: Connection, times: int, timeout: float = 0.3) -> None:
    """Runs the consumer `times` rounds (or until a round gets nothing)."""
    with contextlib.suppress(TimeoutError):
        for _ in range(times):
            conn.drain_events(timeout=timeout)


def test_a_fetch_takes_the_backlog_up_to_the_prefetch_recorded_as_kombu_records_it(
    redis_url: str,
) -> None:
    """One BLMOVE, then `_TAKE` for the rest of the prefetch room: every message taken is in
    `unacked` exactly as kombu's own `QoS.append` writes it, and is restored like one."""
    client = redis.Redis.from_url(redis_url)
    with holding(redis_url, "backlog", 50, prefetch=10) as (conn, got):
        pump(conn, 20, timeout=0.5)
        assert [m.payload for m in got] == [{"n": n} for n in range(10)]
        assert client.llen("backlog") == 40 and client.hlen("unacked") == 10
        assert client.zcard("unacked_index") == 10
        for message in got:
            raw, exchange, routing_key = json.loads(client.hget("unacked", message.delivery_tag))
            # What kombu's QoS.append stores: the message as fetched, exchange, routing key.
            assert raw == message._raw
            assert (exchange, routing_key) == ("backlog", "backlog")
        # Closing without acknowledging: kombu restores all ten.
    assert client.hlen("unacked") == 0 and client.llen("backlog") == 50
    assert sorted(b["n"] for b in bodies(redis_url, "backlog")) == list(range(50))


def test_ack_many_acknowledges_a_group_in_one_call_and_frees_the_prefetch(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with holding(redis_url, "group", 12, prefetch=5) as (conn, got):
        qos = conn.default_channel.qos
        pump(conn, 10)
        assert len(got) == 5 and client.hlen("unacked") == 5
        assert not qos.can_consume()
        qos.ack_many([])  # nothing to acknowledge: no call, no error
        qos.ack_many([m.delivery_tag for m in got])
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        assert qos.can_consume()
        pump(conn, 10)
        assert len(got) == 10
    assert client.llen("group") + client.hlen("unacked") == 7  # five more restored on close


def test_a_busy_worker_leaves_the_queue_to_others(redis_url: str) -> None:
    """`broker.room` at 0 (the worker holds twice the messages it has sessions for) stops
    fetching without touching the prefetch; the queue stays whole for other workers."""
    from workers import broker

    client = redis.Redis.from_url(redis_url)
    limit = 0  # messages the worker may hold unfinished
    try:
        with holding(redis_url, "busy", 3) as (conn, got):
            broker.room = lambda: limit - len(got)
            pump(conn, 3)
            assert got == [] and client.llen("busy") == 3
            limit = 2
            pump(conn, 5)
            assert [m.payload for m in got] == [{"n": n} for n in range(2)]
            for message in got:
                message.ack()
    finally:
        broker.room = None


def test_loads_matches_kombu_and_leaves_tagged_values_to_it() -> None:
    """`broker.loads` skips kombu's per-object hook only when nothing in the text needs it."""
    import datetime
    import uuid as uuid_module

    from kombu.utils.json import dumps
    from kombu.utils.json import loads as kombu_loads

    from workers.broker import loads

    plain = dumps({"headers": {"task": "mailer.send", "eta": None}, "body": ["a", 1, 2.5, True]})
    tagged = dumps({"when": datetime.datetime(2026, 11, 29, 7, 0), "id": uuid_module.uuid4()})
    quoted = dumps({"text": 'a value that says "__type__"'})  # escaped: not a tag
    for text in (plain, tagged, quoted):
        for form in (text, text.encode()):
            assert loads(form) == kombu_loads(form)
    assert isinstance(loads(tagged)["when"], datetime.datetime)
