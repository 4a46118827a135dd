"""The workers' fetch (workers/broker.py) against real consumer processes killed at the worst
moment: the message is off the queue and not yet recorded as unacknowledged. kombu's own
transport loses it there; ours must give it back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import redis

from tests.support.broker import OPTIONS, OURS, STOCK, bodies, publish, sweep
from tests.support.helpers import wait_until
from workers.state.keys import FETCH_CONSUMERS as CONSUMERS
from workers.state.keys import FETCH_INFLIGHT_PREFIX as INFLIGHT

# Runs in its own process: consumes from `queue` and dies (os._exit, as a SIGKILL would: no
# cleanup, no restore) inside QoS.append, before or after the message is recorded.
CONSUMER = """
import os, sys, json
from kombu import Connection, Consumer, Exchange, Queue
from kombu.transport import redis as kredis
from workers import broker

url, transport, queue, when = sys.argv[1:5]
qos = broker.QoS if transport.startswith("workers.") else kredis.QoS
recorded = qos.append

def append(self, message, tag):
    if when == "after":
        recorded(self, message, tag)
    os._exit(9)

qos.append = append
options = json.loads(sys.argv[5])
with Connection(url, transport=transport, transport_options=options) as conn:
    q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
    with Consumer(conn, [q], callbacks=[lambda body, message: None]):
        conn.drain_events(timeout=30)
sys.exit(3)  # never reached: the message always arrives
"""


def die_in_the_window(url: str, transport: str, queue: str, when: str) -> None:
    publish(url, queue, {"n": 1})
    proc = subprocess.run(
        [sys.executable, "-c", CONSUMER, url, transport, queue, when, json.dumps(OPTIONS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 9, proc.stderr


def test_kombus_own_fetch_loses_a_message_when_its_consumer_dies_in_the_window(
    redis_url: str,
) -> None:
    """The failure this module exists for, shown with kombu's transport: off the queue, never
    in `unacked`, gone."""
    client = redis.Redis.from_url(redis_url)
    die_in_the_window(redis_url, STOCK, "stock", "before")
    assert client.llen("stock") == 0
    assert not any(b'"stock"' in v for v in client.hvals("unacked"))


def test_a_consumer_that_dies_before_recording_the_message_gives_it_back(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    die_in_the_window(redis_url, OURS, "ours", "before")
    # The dead consumer's in-flight list holds it; nothing else does.
    lists = [k for k in client.scan_iter(INFLIGHT + "*") if client.llen(k)]
    assert len(lists) == 1 and client.llen("ours") == 0
    # Once the consumer has been silent for `inflight_dead_after`, any worker's sweep (run on
    # kombu's restore timer) puts it back on its queue, and it is consumed normally.
    assert wait_until(lambda: sweep(redis_url) == 1, timeout=10, interval=0.5)
    assert bodies(redis_url, "ours") == [{"n": 1}]
    assert client.zcard(CONSUMERS) == 0 or all(
        client.llen(INFLIGHT + m.decode()) == 0 for m in client.zrange(CONSUMERS, 0, -1)
    )


def test_a_consumer_that_dies_after_recording_leaves_it_to_the_unacked_restore(
    redis_url: str,
) -> None:
    """Recorded and taken off the in-flight list in one MULTI/EXEC: the sweep must not restore
    it a second time (kombu's visibility-timeout restore owns it now)."""
    client = redis.Redis.from_url(redis_url)
    die_in_the_window(redis_url, OURS, "recorded", "after")
    assert client.hlen("unacked") == 1
    assert all(client.llen(k) == 0 for k in client.scan_iter(INFLIGHT + "*"))
    time.sleep(1.5)
    assert sweep(redis_url) == 0
    assert client.llen("recorded") == 0
    client.delete("unacked", "unacked_index")
