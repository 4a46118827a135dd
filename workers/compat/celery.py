"""Celery's private parts (5.7.x) that the consumer's streaming (workers/strategy.py), the tasks
(workers/tasks.py), the app (workers/app.py) and the producer (mailer/publish.py) rely on.

tests/unit/test_private_api.py checks every entry of `PRIVATE` against the installed Celery.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.concurrency import solo, thread
from celery.events.dispatcher import EventDispatcher
from celery.utils import nodenames
from celery.utils import time as celery_time
from celery.worker import state, strategy
from celery.worker.consumer.consumer import Consumer
from celery.worker.consumer.tasks import Tasks
from celery.worker.request import Request

from workers.compat import Private

__all__ = [
    "IN_PROCESS_POOLS",
    "PRIVATE",
    "STRATEGY_LOGGER",
    "TASKS_STEP",
    "TASK_LOGGERS",
    "flush_events",
]

#: Celery's loggers of the per-task INFO lines (received; succeeded, retry, ignored).
STRATEGY_LOGGER = strategy.logger.name
TASK_LOGGERS = (STRATEGY_LOGGER, "celery.app.trace")
#: The consumer bootstep that starts and stops task consumption (a `requires` name).
TASKS_STEP = f"{Tasks.__module__}:{Tasks.__name__}"
#: Celery pools whose tasks run in the worker process itself (which serves the metrics).
IN_PROCESS_POOLS = (thread.__name__, solo.__name__)

PRIVATE: tuple[Private, ...] = (
    Private(Consumer, "_flush_events", "flushes the grouped task events on our timer"),
    Private(EventDispatcher, "buffer_limit", "raised: events leave in groups", instance=True),
    Private(EventDispatcher, "on_send_buffered", "cleared: no flush per loop turn", instance=True),
    Private(EventDispatcher, "__init__", "the two above", ("buffer_limit", "on_send_buffered")),
    Private(state, "revoked", "`consumer.controller.state.revoked`: streamed ids checked there"),
    Private(strategy, "default", "wrapped by our strategy", ("task", "app", "consumer")),
    Private(strategy, "logger", "the 'Task received' line, off unless asked for"),
    Private(Request, "__init__", "DecodedRequest passes the decoded body", ("body", "decoded")),
    # mailer/publish.py (listed, not routed: the producer imports nothing from `workers`):
    # RedisPublisher writes the messages `send_task` would.
    Private(Celery, "thread_oid", "`reply_to` of the messages RedisPublisher writes"),
    Private(nodenames, "anon_nodename", "the `origin` header and the event's hostname"),
    Private(celery_time, "utcoffset", "the task-sent event's `utcoffset`"),
    Private(Tasks, "stop", "DrainStream runs before it (TASKS_STEP)", ("c",)),
)


def flush_events(consumer: Any) -> Any:
    """The consumer's flush of its buffered task events (a bound method, for a timer)."""
    return consumer._flush_events
