"""The Celery app: `celery -A workers.app worker` (or `mailer worker`) starts a real worker.

Reliability defaults (see ../shared/reference/celery-redis-aiosmtplib.md §1): late acks and
requeue on a lost worker (at-least-once, made idempotent by the ledger), prefetch of one per
slot, a visibility timeout in all three places and longer than any retry countdown, task events
on for Flower, bounded publish retries. Configuration errors surface here, at start-up.
"""

from __future__ import annotations

import logging

from celery import Celery, signals

from mailer.config import Settings
from mailer.publish import QUEUE, celery_config

settings = Settings.from_env()

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
    worker_soft_shutdown_timeout=20.0,
    worker_hijack_root_logger=False,
    task_default_queue=QUEUE,
    task_ignore_result=True,
)

log = logging.getLogger("mailer.worker")


@signals.worker_init.connect
def _check_relay_settings(**_: object) -> None:
    """Fails the worker at start-up (not a task later) when the relay settings are unusable."""
    settings.require_relay()


@signals.worker_shutdown.connect
@signals.worker_process_shutdown.connect
def _close_sessions(**_: object) -> None:
    from workers.runtime import shutdown_runtime

    shutdown_runtime(timeout=15.0)
