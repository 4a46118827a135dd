"""First attempts of `mailer.send`, streamed to the loop without Celery's per-task machinery.

Around a one-message task Celery spends about a millisecond of CPU (a Request, three events
published one by one, a hand-off to a pool thread that then blocks on the loop, the tracer),
more than the message's own work costs (bench/README.md). So the
consumer hands each plain first attempt (no retries, ETA, expiry, kwargs or callbacks) straight
to the process's loop, and two threads of our own do the rest:

- *dispatch* checks each relay's circuit breaker (cached) and starts the attempts on the loop;
  a relay whose breaker is open hands its messages back at once (see `wait_for_circuit`);
- *settle* finishes each one as it ends exactly as the task body would (dead letter, a
  `mailer.send` retry with the same task id and `retries=1`, so Flower shows the task going to
  RETRY and every later attempt runs as a normal Celery task), then acknowledges it.

Nothing about the guarantees changes: the message stays unacknowledged (and counted against
the prefetch limit) until it is settled; a settle that fails requeues it; a killed worker's
messages come back like any other (workers/broker.py) and the ledger stops a second send.
Flower still gets task-received and task-succeeded/failed/retried events for each message.
What does change: `celery inspect active` does not list these attempts, and Celery's
`task_prerun`/`task_postrun` signals do not fire for them. A prefork or solo pool, or Celery's
per-task log lines (MAILER_CELERY_TASK_LOGS=1), turn this off: every attempt is a Celery task.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, TypeVar

import redis
from celery import bootsteps
from celery.concurrency.thread import TaskPool as ThreadPool
from celery.utils.saferepr import saferepr
from celery.worker.strategy import default as default_strategy

from mailer import wire
from workers import broker
from workers.app import settings
from workers.compat.celery import STRATEGY_LOGGER, TASKS_STEP, flush_events
from workers.compat.kombu import mark_acked, set_decoded
from workers.engine import runtime as runtime_module
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.runtime import Result, runtime
from workers.settle import (
    REQUEUE_PAUSE,
    HeldForReview,
    PermanentFailure,
    close_circuit,
    relay_for,
    settle_one,
    unexpected,
    wait_for_circuit,
)

log = logging.getLogger("mailer.worker")
T = TypeVar("T")
CELERY_TASK_LOG = logging.getLogger(STRATEGY_LOGGER)  # "Task ... received"

#: The most attempts one dispatch starts at once (the prefetch limit bounds them anyway).
DISPATCH_MAX = 256
#: Task events go to Flower in groups: at most this many, at least this often (seconds).
EVENT_GROUP = 500
EVENT_FLUSH_EVERY = 0.1
#: At shutdown: the most the consumer waits for streamed attempts to settle before it closes
#: the channel (kombu then puts back whatever is still unacknowledged).
DRAIN_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity
class Job:
    message: Any  # kombu Message: acknowledged once settled
    task_id: str
    payload: dict[str, Any]
    started: float
    top: bool = False  # of the highest lane (see `top_room`)


def plain_first_attempt(message: Any) -> dict[str, Any] | None:
    """The payload when `message` is a first attempt this module may take, else None (Celery
    runs it). Anything unusual goes to Celery: it knows what to do with it."""
    headers = message.headers
    if (
        headers.get("task") != wire.SEND_TASK
        or headers.get("retries")
        or headers.get("eta")
        or headers.get("expires")
        or any(headers.get("timelimit") or ())
    ):
        return None
    if message.content_type == "application/json" and message.content_encoding == "utf-8":
        body = set_decoded(message, broker.loads(message.body))
    else:
        body = message.decode()  # kombu checks the content type against `accept`
    if not isinstance(body, list | tuple) or len(body) != 3:
        return None
    args, kwargs, embed = body
    if kwargs or not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], dict):
        return None
    if embed and any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
        return None
    try:
        wire.from_payload(args[0])
    except wire.InvalidPayload:
        return None  # the task path dead-letters it as `invalid`, with the reason
    return args[0]


class Stream:
    """The two threads and two queues of one worker process (see the module docstring)."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        #: (job, outcome, waited): `waited` when the outcome is the circuit breaker's wait, which
        #: must not trip the breaker again (see `decide`).
        self.ended: queue.SimpleQueue[tuple[Job, Result | Failure, bool]] = queue.SimpleQueue()
        self.eventer: Any = None
        self.hub: Any = None  # the consumer's kombu event loop
        self._pending = 0
        self.pending_top = 0  # of `_pending`, jobs of the highest lane
        self._idle = threading.Condition()
        self._threads = [
            threading.Thread(target=self._dispatch, name="mailer-dispatch", daemon=True),
            threading.Thread(target=self._settle, name="mailer-settle", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def put(self, job: Job) -> None:
        with self._idle:
            self._pending += 1
            self.pending_top += job.top
        self.inbox.put(job)

    @property
    def pending(self) -> int:
        """Jobs put and not settled yet."""
        return self._pending

    def drain(self, timeout: float) -> int:
        """Waits until every job put so far is settled; returns how many are left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            return self._pending

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            jobs = _ready(self.inbox, DISPATCH_MAX)
            try:
                self._start(jobs)
            except Exception as exc:  # whatever it was, the jobs are retried as usual
                log.exception("could not start %d attempts", len(jobs))
                for job in jobs:
                    self.ended.put((job, unexpected(exc), False))

    def _start(self, jobs: list[Job]) -> None:
        by_relay: dict[tuple[str, str], list[Job]] = {}
        for job in jobs:
            key = (wire.relay_of(job.payload), wire.lane_of(job.payload))
            by_relay.setdefault(key, []).append(job)
        # The default relay's wait may hold this thread only when no other relay is here.
        hold = None if len(by_relay) == 1 else 0.0
        for (relay, lane), group in by_relay.items():
            self._start_relay(relay, lane, group, hold)

    def _start_relay(self, relay: str, lane: str, jobs: list[Job], hold: float | None) -> None:
        waiting = wait_for_circuit(relay, hold, lane=lane)
        if (
            waiting is None
            and len(jobs) > 1
            and _probing(relay)
            and not runtime().fails_over(relay, lane)
        ):
            # This group won the fleet's one probe of the interval: one message is the probe,
            # as in the task path; the others wait like every other message.
            waiting = Failure(Kind.AUTH, None, "circuit open: probing", Phase.CONNECT, relay=relay)
            for job in jobs[1:]:
                self.ended.put((job, waiting, True))
            jobs, waiting = jobs[:1], None
        if waiting is not None:
            for job in jobs:
                self.ended.put((job, waiting, True))
            return
        runtime().start_many([job.payload for job in jobs], partial(self._ended, jobs))

    def _ended(self, jobs: list[Job], index: int, outcome: Result | Failure) -> None:
        self.ended.put((jobs[index], outcome, False))

    # -- settle --------------------------------------------------------------------------------

    def _settle(self) -> None:
        while True:
            batch = _ready(self.ended, DISPATCH_MAX)
            try:
                statuses = {job: self._settle_one(job, outcome, w) for job, outcome, w in batch}
                _ack_all([job.message for job, status in statuses.items() if status])
                sent_through = {
                    relay_for(job.payload, outcome)
                    for job, outcome, _ in batch
                    if statuses.get(job) == "sent"
                }
                for relay in sent_through:
                    close_circuit(relay)
            except Exception:  # never stop settling: unacknowledged, they come back anyway
                log.exception("settling %d messages failed", len(batch))
            finally:
                with self._idle:
                    self._pending -= len(batch)
                    self.pending_top -= sum(job.top for job, _, _ in batch)
                    if not self._pending:
                        self._idle.notify_all()
            if self.hub is not None:
                # The acks freed prefetch slots, but a consumer whose slots were all taken has
                # no fetch outstanding and sleeps in its poll for up to a second: wake it.
                self.hub.call_soon(_nothing)

    def _settle_one(self, job: Job, outcome: Result | Failure, waited: bool) -> str | None:
        """The message's status once settled (then it is to be acknowledged), or None when it
        went back to the queue instead."""
        if isinstance(outcome, Result) and outcome.status == "not_started":
            _quietly(job.message.reject, requeue=True)  # shutdown: back to the queue, untouched
            return None
        try:
            status = settle_one(job.payload, outcome, task_id=job.task_id, trip=not waited)
        except Exception as exc:
            log.error("could not settle %s (%s); requeueing it", job.task_id, type(exc).__name__)
            time.sleep(REQUEUE_PAUSE)
            _quietly(job.message.reject, requeue=True)
            return None
        runtime_s = time.monotonic() - job.started
        if status in ("sent", "duplicate", "failed", "cancelled", "suppressed"):
            self._event("task-succeeded", job, result=_result_repr(status), runtime=runtime_s)
        elif status == "retry":
            self._event("task-retried", job, exception=saferepr(outcome), traceback="")
        else:
            reason = outcome.reason if isinstance(outcome, Failure) else outcome.reply
            error = HeldForReview(reason) if status == "held" else PermanentFailure(reason)
            self._event("task-failed", job, exception=saferepr(error), traceback="")
        return status

    def _event(self, kind: str, job: Job, **fields: Any) -> None:
        eventer = self.eventer
        if eventer is not None and eventer.enabled:
            _quietly(eventer.send, kind, uuid=job.task_id, **fields)


def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """An ack, reject or event on a channel that went away: kombu restores the message, the
    ledger acknowledges it without sending; nothing to do here but say so."""
    try:
        call(*args, **kwargs)
    except Exception as exc:
        log.warning("%s failed: %s", getattr(call, "__name__", "call"), type(exc).__name__)


@lru_cache(maxsize=8)
def _result_repr(status: str) -> str:
    """A task-succeeded event's `result` as Celery writes it (`saferepr`, not cheap), once per
    status rather than once per message."""
    return saferepr({"status": status})


def _ready(source: queue.SimpleQueue[T], most: int) -> list[T]:
    """The next item of `source` (waiting for it) and whatever else it holds, up to `most`."""
    items = [source.get()]
    while len(items) < most:
        try:
            items.append(source.get_nowait())
        except queue.Empty:
            break
    return items


def _ack_all(messages: list[Any]) -> None:
    """Acknowledges settled messages, one round trip per channel when it is ours
    (workers/broker.py `QoS.ack_many`), else one by one."""
    by_channel: dict[int, list[Any]] = {}
    for message in messages:
        by_channel.setdefault(id(message.channel), []).append(message)
    for group in by_channel.values():
        ack_many = getattr(group[0].channel.qos, "ack_many", None)
        if ack_many is None:
            for message in group:
                _quietly(message.ack)
            continue
        try:
            ack_many([m.delivery_tag for m in group])
        except Exception as exc:
            log.warning("ack failed: %s", type(exc).__name__)
            continue
        for message in group:
            mark_acked(message)


def _probing(relay: str) -> bool:
    """After `wait_for_circuit` let a group through: whether the relay's breaker is open (the
    group holds the probe) rather than closed. A Redis error counts as closed, as there."""
    try:
        return runtime().circuits.get(relay).state().open
    except (redis.RedisError, OSError):
        return False


def _room(stream: Stream, limit: int) -> int:
    """workers/broker.py `room`: the process holds at most `limit` messages it has not
    finished (streamed ones, and attempts of batch tasks), twice what its sessions can carry at
    once; a batch task's runtime wakes the consumer as its attempts end."""
    rt = runtime_module.current()
    batches = 0
    if rt is not None:
        batches = rt.backlog
        if rt.on_room is None and stream.hub is not None:
            rt.on_room = partial(stream.hub.call_soon, _nothing)
    return limit - stream.pending - batches


def _top_room(stream: Stream, limit: int) -> int:
    """workers/broker.py `top_room`: the highest lane's own room, so that a process whose room
    is full of lower-lane work still fetches the next message of the highest lane."""
    return limit - stream.pending_top


def _nothing() -> None:
    pass


def _group_events(consumer: Any) -> None:
    """Task events leave in groups of up to EVENT_GROUP every EVENT_FLUSH_EVERY seconds.

    Celery buffers them already (one PUBLISH of a list, which Flower's receiver takes apart)
    but flushes after every turn of the consumer's loop and at 24 events: a PUBLISH, a
    declare check and a serialization per dozen messages, a visible share of its CPU. A
    tenth of a second is nothing to someone watching Flower."""
    eventer = consumer.event_dispatcher
    eventer.buffer_limit = EVENT_GROUP
    eventer.on_send_buffered = None  # no flush per loop turn: the timer below flushes
    hub = consumer.hub
    if getattr(hub, "_mailer_event_timer", None) is None:
        hub._mailer_event_timer = hub.call_repeatedly(EVENT_FLUSH_EVERY, flush_events(consumer))


_stream: Stream | None = None
_stream_lock = threading.Lock()


def stream() -> Stream:
    global _stream
    with _stream_lock:
        if _stream is None:
            _stream = Stream()
        return _stream


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's task-strategy hook for `mailer.send` (`Task.Strategy`)."""
    celery_handler = default_strategy(task, app, consumer, **kwargs)
    if not isinstance(consumer.pool, ThreadPool) or CELERY_TASK_LOG.isEnabledFor(logging.INFO):
        # Prefork/solo: the sessions live in the pool's processes, not in the consumer's. And
        # whoever asked for Celery's per-task log lines (MAILER_CELERY_TASK_LOGS=1) gets them.
        return celery_handler
    revoked = consumer.controller.state.revoked
    eventer = consumer.event_dispatcher
    events = bool(eventer and eventer.enabled and task.send_events)
    streamed = stream()
    streamed.eventer = eventer if events else None
    streamed.hub = consumer.hub
    if events and consumer.hub is not None:
        _group_events(consumer)
    broker.room = partial(_room, streamed, 2 * settings.worker_connections)
    top = wire.queue_for(settings.lanes[0].name) if len(settings.lanes) > 1 else None
    if top is not None:
        # Twice the others' room: the highest lane's messages wait in this process (at the
        # attempts gate, ranked first) rather than in Redis, where no worker sees them
        # (bench/README.md, "Probes instead of the floor": lanes).
        broker.top_room = partial(_top_room, streamed, 4 * settings.worker_connections)

    def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        payload = None if callbacks else plain_first_attempt(message)
        task_id = message.headers.get("id")
        if payload is None or task_id in revoked:
            return celery_handler(message, body, ack, reject, callbacks, **kw)
        if events:
            headers = message.headers
            eventer.send(
                "task-received",
                uuid=task_id,
                name=task.name,
                args=headers.get("argsrepr"),
                kwargs=headers.get("kwargsrepr"),
                root_id=headers.get("root_id"),
                parent_id=headers.get("parent_id"),
                retries=0,
                eta=None,
                expires=None,
            )
        on_top = top is not None and message.delivery_info.get("routing_key") == top
        streamed.put(Job(message, task_id, payload, time.monotonic(), on_top))
        return None

    return handle


class DrainStream(bootsteps.StartStopStep):
    """At a warm shutdown, after Celery stops consuming: let streamed attempts settle."""

    requires = (TASKS_STEP,)

    def stop(self, c: Any) -> None:
        if _stream is None:
            return
        if c.task_consumer is not None:
            _quietly(c.task_consumer.cancel)  # stop fetching first (Celery's Tasks step does
            # this next; cancelling twice is harmless)
        left = _stream.drain(DRAIN_TIMEOUT)
        if left:
            log.warning(
                "%d streamed attempts unsettled at shutdown; the broker redelivers them", left
            )
        _flush_events(c)

    def shutdown(self, c: Any) -> None:
        _flush_events(c)  # and those of tasks that ended since


def _flush_events(consumer: Any) -> None:
    """The task events still grouped (see `_group_events`), before the dispatcher closes."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is not None and dispatcher.enabled:
        _quietly(dispatcher.flush)
