"""The Celery app: `celery -A workers.app worker` (or `mailer worker`) starts a real worker.

Reliability defaults (docs/fetch.md says why): late acks and
requeue on a lost worker (at-least-once, made idempotent by the ledger), prefetch of one per
slot, a visibility timeout in all three places and longer than any retry countdown, task events
on for Flower, bounded publish retries, and a fetch that cannot lose a message to a killed worker
(workers/broker.py). Configuration errors surface here, at start-up.

Shutdown. SIGTERM is Celery's *warm* shutdown: stop consuming, end the lease waits of running
tasks (they go back to the queue without spending an attempt, see `_drain`), let transactions
in flight finish, cancel tasks reserved but not started, and on closing the broker channel kombu
pushes every unacknowledged message (reserved, or held in memory for a retry countdown) back to
the queue. Then `worker_shutdown` QUITs every session and releases every lease. SIGQUIT (or a
second Ctrl-C) is the *cold* shutdown: a soft phase of SOFT_SHUTDOWN_TIMEOUT seconds, even when
idle so that held countdown messages are restored, then running tasks are cancelled.

Per process, `worker_init` sets up metrics (MAILER_METRICS_PORT), the throughput counters of
`mailer status`, and Celery's logging is given structured events and a redacting filter keyed
on the API key. Celery's two INFO lines per task ("Task ... received", "... succeeded in") are
off by default: our events (`sent`, `retried`, ...) are the per-message audit trail, task events
still reach Flower, and those lines were most of the worker's logging time on the
single-message path (bench/README.md).
`MAILER_CELERY_TASK_LOGS=1` (or `--loglevel DEBUG`) brings them back; Celery's warnings and
errors about tasks are never lowered.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from celery import Celery, signals
from kombu import Queue

from mailer.config import Settings
from mailer.publish import celery_config
from mailer.wire import queue_for
from workers.compat.celery import IN_PROCESS_POOLS, TASK_LOGGERS

settings = Settings.from_env()

#: Cold shutdown (SIGQUIT) waits this long for running tasks before cancelling them.
SOFT_SHUTDOWN_TIMEOUT = 20.0
#: After Celery stopped its pool: the most the runtime waits for a straggling transaction
#: before it QUITs the sessions and releases the leases.
RUNTIME_CLOSE_TIMEOUT = 15.0

app = Celery("mailer", broker=settings.broker_url, include=["workers.tasks"])
app.conf.update(
    celery_config(settings),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    worker_enable_soft_shutdown_on_idle=True,
    worker_soft_shutdown_timeout=SOFT_SHUTDOWN_TIMEOUT,
    worker_hijack_root_logger=False,
    task_default_queue=queue_for(settings.default_lane),
    # Every lane's queue, so a plain `celery -A workers.app worker` serves them all too.
    task_queues=[Queue(queue_for(lane.name)) for lane in settings.lanes],
    task_ignore_result=True,
)
if settings.broker_url.startswith(("redis://", "rediss://")):
    # kombu's Redis transport with an atomic fetch (workers/broker.py): a killed worker loses
    # no message. TLS and ACL users come with celery_config (mailer/redisconn.py).
    app.conf.broker_transport = "workers.broker:Transport"
elif settings.broker_url.startswith("sentinel://"):
    app.conf.broker_transport = "workers.broker:SentinelTransport"

log = logging.getLogger("mailer.worker")


class _Process:
    """What the worker set up in this process and must tear down at shutdown."""

    throughput: Any = None
    exporter: Any = None
    releaser: Any = None  # the durable schedule's (workers/state/schedule.py)


_process = _Process()


def log_secrets() -> list[str]:
    """What no log line may contain: the API key (and its AUTH encodings), URL passwords."""
    from workers.observe.logs import secrets_of

    return secrets_of(
        settings.smtp_password.reveal(),
        settings.smtp_username,
        urls=(settings.broker_url, settings.redis_url),
    )


@signals.worker_ready.connect
@signals.worker_process_init.connect
def freeze_heap(**_: object) -> None:
    """Moves what start-up built (Celery, kombu, our modules) out of the
    cyclic GC's reach. A full collection walks every tracked object with the GIL held, stalling
    all of the process's sessions at once, for far less time once the start-up heap is frozen
    (bench/README.md). Refcounting still frees
    frozen objects; only cycles among them would stay, and start-up objects live as long as
    the process. In a prefork child this runs again after the fork."""
    gc.freeze()


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: object) -> None:
    """Fails the worker at start-up (not a task later) when the relay settings are unusable;
    then metrics and throughput counters, once per worker process."""
    settings.require_relay()
    from mailer import redisconn
    from workers.engine.runtime import occupancy
    from workers.observe import logs, metrics
    from workers.observe.status import Throughput

    in_process = _serves_in_process(getattr(sender, "pool_cls", None))
    _process.exporter = metrics.install(settings, in_process=in_process, probe=occupancy)
    client = redisconn.client(
        settings.redis_url, settings, socket_timeout=5, socket_connect_timeout=5, max_connections=4
    )
    _process.throughput = Throughput(client).start()
    logs.subscribe(_process.throughput.on_event)
    from workers.state.schedule import Releaser

    _process.releaser = Releaser(
        redisconn.client(settings.broker_url, settings, socket_timeout=10, max_connections=2)
    ).start()


def _serves_in_process(pool_cls: Any) -> bool:
    """True when tasks run in this process (threads or solo pool), so its metrics see them."""
    if pool_cls is None:
        return True
    from celery.concurrency import get_implementation

    cls = get_implementation(pool_cls)
    return getattr(cls, "__module__", "") in IN_PROCESS_POOLS


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _structured_logs(logger: logging.Logger | None = None, **_: object) -> None:
    from workers.observe import logs

    if logger is not None:
        logs.configure(logger, log_secrets())
    if not _celery_task_logs(logger):
        for name in TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _celery_task_logs(logger: logging.Logger | None) -> bool:
    """Whether Celery's per-task INFO lines stay: asked for, or the worker logs at DEBUG.
    Set before the worker builds its strategies and tracers, which read the level once."""
    if settings.celery_task_logs:
        return True
    return logger is not None and logger.getEffectiveLevel() <= logging.DEBUG


@signals.worker_shutting_down.connect
def _drain(**_: object) -> None:
    """Runs in the signal handler of SIGTERM/SIGINT/SIGQUIT: tasks still waiting for a lease
    give up now and go back to the queue, so the warm shutdown waits only for transactions."""
    from workers.engine import runtime

    rt = runtime.current()  # no lock in a signal handler; a stale read is harmless here
    if rt is not None:
        rt.drain()


@signals.worker_shutdown.connect
@signals.worker_process_shutdown.connect
def _close_sessions(**_: object) -> None:
    from workers.engine import runtime
    from workers.observe import logs

    rt = runtime.current()
    if rt is not None:
        logs.log_event("shutdown", open_sessions=rt.open_sessions, leases=rt.leases_held)
    runtime.shutdown_runtime(timeout=RUNTIME_CLOSE_TIMEOUT)
    if _process.releaser is not None:
        _process.releaser.stop()
        _process.releaser = None
    if _process.throughput is not None:
        logs.unsubscribe(_process.throughput.on_event)
        _process.throughput.stop()
        _process.throughput = None
