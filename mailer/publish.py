"""Publishing to the broker by task name: the only wire between app code and the workers.

The payload is small JSON (id, envelope, the rendered message, display metadata) and never a
credential. Task reprs, which Flower and logs show, carry id, recipients and subject only.

It holds both ways of publishing (the hand-packed round trip and Celery's `send_task` for
what it does not cover) because they must write the same messages and change together.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu.exceptions import OperationalError
from kombu.transport import redis as kredis
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

from mailer import redisconn
from mailer.config import Settings
from mailer.config import redact_url as redact_url  # re-exported: workers/observe/status.py
from mailer.errors import PublishError
from mailer.wire import (
    BATCH_TASK,
    QUEUE,
    SCHEDULE_DUE,
    SCHEDULE_ITEMS,
    SEND_TASK,
    lane_of,
    queue_for,
)

PUBLISH_RETRY_POLICY = {
    "max_retries": 5,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2.0,
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings both sides must agree on (the visibility timeout goes in all three places)."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # kombu >= 5.7 sweeps unacked messages every interval x throttle (default 10 x 10 s):
        # scan every 10 s, so a killed worker's messages return ~visibility_timeout after it.
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "socket_keepalive": True,
        "health_check_interval": 25,
        "retry_on_timeout": True,
        # One list per queue (we never publish with a priority): lets the workers fetch with an
        # atomic BLMOVE (workers/broker.py) instead of kombu's BRPOP over four lists.
        "priority_steps": [0],
        # The lanes' queues, highest priority first: the order workers/broker.py fetches in.
        "queue_order": [queue_for(lane.name) for lane in settings.lanes],
    }
    # TLS (verified), ACL users and Sentinel as mailer/redisconn.py builds them, for kombu too.
    transport.update(redisconn.kombu_transport_options(settings.broker_url, settings))
    tls = redisconn.kombu_ssl(settings.broker_url, settings)
    return {
        "broker_transport_options": transport,
        "broker_use_ssl": tls,
        "redis_backend_use_ssl": tls,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "visibility_timeout": settings.visibility_timeout,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
    }


def describe(payload: Mapping[str, Any]) -> str:
    """The repr Flower and logs show: never the body, never a secret."""
    meta = payload.get("meta", {})
    to = list(meta.get("to") or payload.get("rcpt_to", []))
    shown = to[:5] + ([f"... +{len(to) - 5}"] if len(to) > 5 else [])
    subject = str(meta.get("subject", ""))[:80]
    lane = f", 'lane': {meta['lane']!r}" if "lane" in meta else ""
    relay = f", 'relay': {meta['relay']!r}" if "relay" in meta else ""
    return f"{{'id': {payload.get('id')!r}, 'to': {shown!r}, 'subject': {subject!r}{lane}{relay}}}"


def describe_batch(payloads: Sequence[Mapping[str, Any]]) -> str:
    ids = [str(p.get("id")) for p in payloads]
    return f"{{'batch': {len(ids)}, 'ids': {ids[:3]!r}{' ...' if len(ids) > 3 else ''}}}"


class ReusedClient:
    """Channel mixin: kombu (5.7) builds a new `redis.Redis` for every publish, ack and
    unacked-record it makes without a client in hand (in the profiles: two per `send` on the
    producer, the task and its sent event; five per task on a worker, three task events, the
    ack and the fetch record). Building one costs more than the command it sends. This keeps
    one per channel over the channel's own connection pool (a `redis.Redis` is thread-safe: each
    command checks a connection out of the pool), rebuilt when kombu replaces the pool."""

    _reused: tuple[Any, redis.Redis] | None = None

    @contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        if client:
            yield client
            return
        this: Any = self
        if this._pool is None and this.connection.client is None:
            # kombu already closed the connection (a broker outage) and a new pool cannot be
            # built from nothing: say so with the error kombu and Celery handle here (a close
            # then leaves unacknowledged messages to the visibility-timeout restore), not with
            # an AttributeError that Celery treats as unrecoverable and shuts the worker down.
            raise redis.ConnectionError("the broker connection is closed")
        pool, reused = self._reused or (None, None)
        if reused is None or pool is not this.pool:
            reused = this._create_client()
            self._reused = (this.pool, reused)
        yield reused


class ProducerChannel(ReusedClient, kredis.Channel):
    """kombu's Redis channel, one client per channel."""


class ProducerTransport(kredis.Transport):
    """kombu's Redis transport for publishing, one client per channel."""

    Channel = ProducerChannel


class ProducerSentinelChannel(ReusedClient, kredis.SentinelChannel):
    """kombu's Sentinel channel, one client per channel."""


class ProducerSentinelTransport(kredis.SentinelTransport):
    """kombu's Sentinel transport for publishing, one client per channel."""

    Channel = ProducerSentinelChannel


#: A task as the publisher sends it: task name, positional args, the repr Flower shows, queue.
Task = tuple[str, tuple[Any, ...], str, str]


@dataclass(frozen=True)
class Retry:
    """What makes a published task a retry of an earlier one (see `RedisPublisher._messages`)."""

    task_id: str
    retries: int
    kwargs: Mapping[str, Any]
    kwargsrepr: str = "{}"
    root_id: str | None = None
    parent_id: str | None = None


#: What a lost or refused broker connection raises (redis-py, the socket, kombu connecting).
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, OperationalError)

_NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _envelope(body: Any, headers: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """kombu's Redis message: the JSON body, base64-encoded (the channel's body_encoding)."""
    return {
        "body": base64.b64encode(dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
_LPUSH = b"*3\r\n$5\r\nLPUSH\r\n"  # then the key and the value as bulk strings
_HSET = b"*4\r\n$4\r\nHSET\r\n"
_ZADD = b"*4\r\n$4\r\nZADD\r\n"
_PUBLISH = b"*3\r\n$7\r\nPUBLISH\r\n"


#: How long one WAIT for replicas blocks (ms); `publish` retries within MAILER_PUBLISH_RETRY_FOR.
WAIT_TIMEOUT_MS = 1000


def _wait(replicas: int, timeout_ms: int) -> bytes:
    return b"*3\r\n$4\r\nWAIT\r\n" + _bulk(str(replicas)) + _bulk(str(timeout_ms))


def _bulk(text: str) -> bytes:
    """A RESP bulk string."""
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


class RedisPublisher:
    """Writes the broker messages Celery's `send_task` writes for our calls, all of one call in
    one MULTI/EXEC round trip over a redis-py connection: each task's LPUSH (Celery protocol 2
    in kombu's Redis envelope) and its task-sent event (kombu's fanout PUBLISH on the event
    exchange).

    Celery spends far more producer CPU per task on this (`as_task_v2`, kombu's publish and
    its retry wrapper, a second round trip for the event). It covers what `Publisher` sends: no
    countdown, queue `mailer` on the anonymous exchange, JSON, `celery_config`'s transport
    options; tests/test_publish.py checks it against what Celery writes. The transaction keeps
    a call's messages all-or-nothing, so a retry after a lost connection never half-repeats it.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._lock = threading.Lock()
        self._pool: redis.ConnectionPool | None = None  # makes and closes connections
        #: Connections not in use. A list, not the pool's queue: `pop` and `append` are atomic,
        #: and the pool's checkout (a locked queue, a readiness probe of the socket, metrics)
        #: is a visible share of `mailer.send`. There are as many as threads ever published at once.
        self._idle: list[redis.Connection] = []
        self._pid = os.getpid()
        self._queue_keys: dict[str, bytes] = {}  # RESP bulk strings, packed once per queue
        self._event_topic = b""
        self._event_exchange = app.conf.event_exchange

    def publish(
        self,
        tasks: Sequence[Task],
        due: Sequence[tuple[str, float]] = (),
        retry: Retry | None = None,
    ) -> None:
        """Queues all of `tasks` or none of them. A lost broker (a restart, a Sentinel failover,
        a primary demoted to a read-only replica) is retried for `publish_retry_for` seconds;
        a certificate or login that no retry fixes fails at once. With
        `due` ((id, UNIX time) per task), they go to the durable schedule instead, which the
        workers release into their queues when due (workers/state/schedule.py). `retry`: the
        one task is a retry of an earlier one (see `_messages`)."""
        messages = [self._messages(*task, retry=retry) for task in tasks]
        deadline = time.monotonic() + self.settings.publish_retry_for
        interval = PUBLISH_RETRY_POLICY["interval_start"]
        while True:
            try:
                self._push(messages, due)
                return
            except (*CONNECTION_ERRORS, redis.ReadOnlyError) as exc:
                unusable = redisconn.explain(exc, self.settings.broker_url, "MAILER_BROKER_URL")
                if unusable is not None:
                    raise PublishError(str(unusable)) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(interval, left))
                interval = min(
                    interval + PUBLISH_RETRY_POLICY["interval_step"],
                    PUBLISH_RETRY_POLICY["interval_max"],
                )

    def _messages(
        self,
        name: str,
        args: tuple[Any, ...],
        argsrepr: str,
        queue: str,
        retry: Retry | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The task message (what celery's `amqp.as_task_v2` and `send_task_message` build for
        our call) and its task-sent event (what `events.Dispatcher.publish` builds). `retry`:
        the same task again (its id, retry count and keyword arguments), as Celery's
        `Task.retry` would publish it, less the ETA (the schedule holds it instead)."""
        task_id = retry.task_id if retry else uuid()
        kwargs = dict(retry.kwargs) if retry else {}
        kwargsrepr = retry.kwargsrepr if retry else "{}"
        retries = retry.retries if retry else 0
        root_id = (retry.root_id or task_id) if retry else task_id
        parent_id = retry.parent_id if retry else None
        origin = anon_nodename()
        headers = {
            "lang": "py",
            "task": name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": root_id,
            "parent_id": parent_id,
            "argsrepr": argsrepr,
            "kwargsrepr": kwargsrepr,
            "origin": origin,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        properties = {
            "correlation_id": task_id,
            "reply_to": self.app.thread_oid,
            "argsrepr": argsrepr,  # send_task passes its extra options on as properties
            "kwargsrepr": kwargsrepr,
            "delivery_mode": 2,  # persistent
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": None,  # set per attempt in _push
        }
        message = _envelope((args, kwargs, _NO_EMBED), headers, properties)
        event = {
            "hostname": origin,
            "utcoffset": utcoffset(),
            "pid": os.getpid(),
            "clock": self.app.clock.forward(),
            "uuid": task_id,
            "root_id": root_id,
            "parent_id": parent_id,
            "name": name,
            "args": argsrepr,
            "kwargs": kwargsrepr,
            "retries": retries,
            "eta": None,
            "expires": None,
            "queue": queue,
            "exchange": "",
            "routing_key": queue,
            "timestamp": time.time(),
            "type": "task-sent",
        }
        event_properties = {
            "delivery_mode": 1,
            "delivery_info": {"exchange": self._event_exchange, "routing_key": "task.sent"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": None,
        }
        return message, _envelope(event, {"hostname": origin}, event_properties)

    def _push(
        self,
        messages: list[tuple[dict[str, Any], dict[str, Any]]],
        due: Sequence[tuple[str, float]] = (),
    ) -> None:
        """One MULTI/EXEC round trip, packed by hand: redis-py's pipeline spends a large share of
        what `mailer.send` costs its caller building and packing commands."""
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            pool = self._connect()  # also packs the queue and topic keys, once per process
        packed = [_MULTI]
        commands = 0
        for index, (message, event) in enumerate(messages):
            # A fresh delivery tag per attempt, as kombu gives each publish it retries.
            message["properties"]["delivery_tag"] = uuid()
            event["properties"]["delivery_tag"] = uuid()
            queue = message["properties"]["delivery_info"]["routing_key"]
            if due:
                item, at = due[index]
                entry = _bulk(f"{queue}\n{dumps(message)}")
                packed += (_HSET, _bulk(SCHEDULE_ITEMS), _bulk(item), entry)
                packed += (_ZADD, _bulk(SCHEDULE_DUE), _bulk(repr(float(at))), _bulk(item))
                commands += 2
            else:
                key = self._queue_keys.get(queue) or self._queue_keys.setdefault(
                    queue, _bulk(queue)
                )
                packed += (_LPUSH, key, _bulk(dumps(message)))
                commands += 1
            packed += (_PUBLISH, self._event_topic, _bulk(dumps(event)))
            commands += 1
        packed.append(_EXEC)
        replicas = self.settings.wait_replicas
        if replicas:
            # Told "queued" only once a replica has it too: a failover cannot lose it then.
            packed.append(_wait(replicas, WAIT_TIMEOUT_MS))
        idle = self._idle  # `close` replaces it: a connection in use then is not handed back
        try:
            conn = idle.pop()
        except IndexError:
            conn = pool.make_connection()  # type: ignore[assignment]  # connects when used
        try:
            # Connected through `connect`, which a Sentinel-managed connection overrides to ask
            # the sentinels for the primary (sending on an unconnected one would skip that).
            conn.connect()
            conn.send_packed_command([b"".join(packed)])
            for _ in range(commands + 1):  # +OK, then +QUEUED per command
                conn.read_response()
            replies = conn.read_response()
            errors = [reply for reply in replies if isinstance(reply, Exception)]
            if errors:
                raise errors[0]
            if replicas and int(conn.read_response()) < replicas:
                # Queued on the primary only: retried (the same message ids, which the ledger
                # delivers once) until a replica confirms or the retry time runs out.
                raise redis.ConnectionError(f"no {replicas} replica(s) confirmed the write")
        except BaseException:
            # Replies may be left unread: never reuse it mid-stream. Closed, it reconnects on
            # its next command (a broker that restarted costs one failed attempt, retried).
            conn.disconnect()
            raise
        finally:
            idle.append(conn)

    def _connect(self) -> redis.ConnectionPool:
        """A pool of our own (mailer/redisconn.py: TLS verified, ACL user, Sentinel) makes and
        closes the connections. kombu declares the queue once (the exchange binding a Celery
        producer records on its first publish) and names the queue and event keys."""
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the parent's sockets are not ours to use, or to close.
                self._pool, self._idle, self._pid = None, [], os.getpid()
            if self._pool is None:
                # max_retries=0: fail at once; `publish` retries as the policy says.
                options = {"max_retries": 0}
                with self.app.connection_for_write(transport_options=options) as conn:
                    channel = conn.default_channel
                    self.app.amqp.default_queue(channel).declare()
                    self._queue_keys[QUEUE] = _bulk(channel._q_for_pri(QUEUE, 0))
                    self._event_topic = _bulk(
                        channel._get_publish_topic(self._event_exchange, "task.sent")
                    )
                    self._pool = redisconn.pool(
                        self.settings.broker_url,
                        self.settings,
                        socket_timeout=30,
                        socket_connect_timeout=10,
                        socket_keepalive=True,
                        health_check_interval=25,
                    )
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._idle = []
                self._pool.disconnect()
                self._pool = None


class Publisher:
    """A producer-side Celery app that knows tasks only by name (no worker code imported).
    On a Redis broker, tasks without a countdown go through `RedisPublisher`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("mailer-producer", broker=settings.broker_url, set_as_current=False)
        self.app.conf.update(celery_config(settings))
        self.fast: RedisPublisher | None = None
        if settings.broker_url.startswith(("redis://", "rediss://")):
            self.app.conf.broker_transport = "mailer.publish:ProducerTransport"
            self.fast = RedisPublisher(self.app, settings)
        elif settings.broker_url.startswith("sentinel://"):
            self.app.conf.broker_transport = "mailer.publish:ProducerSentinelTransport"
            self.fast = RedisPublisher(self.app, settings)

    def send(
        self,
        payload: Mapping[str, Any],
        *,
        countdown: float | None = None,
        send_at: float | None = None,
    ) -> None:
        """Queues one message; `send_at` (UNIX time) holds it in the durable schedule until
        then, `countdown` (seconds) the same from now."""
        queue = queue_for(lane_of(payload))
        task = (SEND_TASK, (dict(payload),), describe(payload), queue)
        if countdown and send_at is None:
            send_at = time.time() + countdown
        if self.fast is None:
            self._publish(*task, None if send_at is None else max(0.0, send_at - time.time()))
            return
        with self._errors(SEND_TASK):
            if send_at is None:
                self.fast.publish([task])
            else:
                self.fast.publish([task], due=[(str(payload["id"]), send_at)])

    def send_batch(self, payloads: Sequence[Mapping[str, Any]]) -> None:
        self.send_batches([payloads])

    def send_batches(
        self, batches: Iterable[Sequence[Mapping[str, Any]]], *, send_at: float | None = None
    ) -> None:
        """One `mailer.send_batch` task per batch, all in one round trip; with `send_at`
        (UNIX time) they wait in the durable schedule until then."""
        tasks = [
            (
                BATCH_TASK,
                ([dict(p) for p in batch],),
                describe_batch(batch),
                queue_for(lane_of(batch[0])),  # one lane per batch (see Mailer.publish_rendered)
            )
            for batch in batches
        ]
        if self.fast is not None:
            due = [(uuid(), send_at) for _ in tasks] if send_at is not None else []
            with self._errors(BATCH_TASK):
                self.fast.publish(tasks, due=due)
            return
        countdown = None if send_at is None else max(0.0, send_at - time.time())
        with self.app.producer_or_acquire() as producer:
            for task in tasks:
                self._publish(*task, countdown, producer)

    def _publish(
        self,
        name: str,
        args: tuple[Any, ...],
        argsrepr: str,
        queue: str,
        countdown: float | None,
        producer: Any = None,
    ) -> None:
        with self._errors(name):
            self.app.send_task(
                name,
                args=args,
                queue=queue,
                countdown=countdown,
                argsrepr=argsrepr,
                kwargsrepr="{}",
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
                producer=producer,
                ignore_result=True,
            )

    @contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        try:
            yield
        except redis.ReadOnlyError:
            # Still read-only when the retries ran out: the failover did not finish in time.
            raise PublishError(
                f"the broker at {redact_url(self.settings.broker_url)} stayed read-only (a "
                f"replica) for {self.settings.publish_retry_for:g} s; the message was not queued"
            ) from None
        except redis.ResponseError as exc:
            # Redis refused the commands (out of memory, the queue's key of another type):
            # retrying would not help. Its reply names no credential.
            raise PublishError(
                f"the broker at {redact_url(self.settings.broker_url)} refused {name}: {exc}; "
                "the message was not queued"
            ) from None
        except CONNECTION_ERRORS as exc:
            # The exception text may carry the broker URL and its password: name the type only.
            raise PublishError(
                f"could not publish {name} to the broker at {redact_url(self.settings.broker_url)} "
                f"within {self.settings.publish_retry_for:g} s ({type(exc).__name__}); "
                "the message was not queued"
            ) from None

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        self.app.close()
