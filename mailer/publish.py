"""Publishing to the broker by task name: the only wire between app code and the workers.

The payload is small JSON (id, envelope, the rendered message, display metadata) and never a
credential. Task reprs, which Flower and logs show, carry id, recipients and subject only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.transport import redis as kredis

from mailer.config import Settings
from mailer.errors import PublishError

QUEUE = "mailer"
SEND_TASK = "mailer.send"
BATCH_TASK = "mailer.send_batch"

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
    }
    return {
        "broker_transport_options": transport,
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


def redact_url(url: str) -> str:
    """redis://user:secret@host:6379/0 -> redis://user:***@host:6379/0"""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def describe(payload: Mapping[str, Any]) -> str:
    """The repr Flower and logs show: never the body, never a secret."""
    meta = payload.get("meta", {})
    to = list(meta.get("to") or payload.get("rcpt_to", []))
    shown = to[:5] + ([f"... +{len(to) - 5}"] if len(to) > 5 else [])
    subject = str(meta.get("subject", ""))[:80]
    return f"{{'id': {payload.get('id')!r}, 'to': {shown!r}, 'subject': {subject!r}}}"


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


class Publisher:
    """A producer-side Celery app that knows tasks only by name (no worker code imported)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("mailer-producer", broker=settings.broker_url, set_as_current=False)
        self.app.conf.update(celery_config(settings))
        if settings.broker_url.startswith(("redis://", "rediss://")):
            self.app.conf.broker_transport = "mailer.publish:ProducerTransport"
        self._lock = threading.Lock()

    def send(self, payload: Mapping[str, Any], *, countdown: float | None = None) -> None:
        self._publish(SEND_TASK, (dict(payload),), describe(payload), countdown)

    def send_batch(self, payloads: Sequence[Mapping[str, Any]]) -> None:
        self._publish(BATCH_TASK, ([dict(p) for p in payloads],), describe_batch(payloads), None)

    def send_batches(self, batches: Iterable[Sequence[Mapping[str, Any]]]) -> None:
        with self.app.producer_or_acquire() as producer:
            for batch in batches:
                self._publish(
                    BATCH_TASK, ([dict(p) for p in batch],), describe_batch(batch), None, producer
                )

    def _publish(
        self,
        name: str,
        args: tuple[Any, ...],
        argsrepr: str,
        countdown: float | None,
        producer: Any = None,
    ) -> None:
        try:
            self.app.send_task(
                name,
                args=args,
                queue=QUEUE,
                countdown=countdown,
                argsrepr=argsrepr,
                kwargsrepr="{}",
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
                producer=producer,
                ignore_result=True,
            )
        except (OperationalError, OSError, ConnectionError) as exc:
            # The exception text may carry the broker URL and its password: name the type only.
            raise PublishError(
                f"could not publish {name} to the broker at {redact_url(self.settings.broker_url)} "
                f"after {PUBLISH_RETRY_POLICY['max_retries']} retries ({type(exc).__name__}); "
                "the message was not queued"
            ) from None

    def close(self) -> None:
        self.app.close()
