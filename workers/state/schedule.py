"""The durable schedule, the workers' side: released into the queues when due.

Scheduled messages (`mailer.send(send_at=...)`) and every retry with a countdown wait here, in
Redis, not in a worker's memory as Celery ETA tasks (which Redis redelivers when they outlive
the visibility timeout). Every worker process runs a `Releaser`; one atomic script moves what
is due onto its queue, so there is no leader and nothing is released twice. docs/scheduling.md.
"""

from __future__ import annotations

import logging
import random
import threading

import redis

from workers.state import keys, scripts

log = logging.getLogger("mailer.schedule")

#: How often a releaser looks (with jitter): a due message waits at most about this long.
EVERY = 0.5
#: The most one call releases; a longer backlog is released in consecutive calls.
BATCH = 1000


def release_due(client: redis.Redis, most: int = BATCH) -> int:
    """Moves up to `most` due items onto their queues; returns how many were due."""
    script = client.register_script(scripts.source("schedule_release"))
    return int(script(keys=[keys.SCHEDULE_DUE, keys.SCHEDULE_ITEMS], args=[most]))


def pending(client: redis.Redis) -> int:
    return int(client.zcard(keys.SCHEDULE_DUE))


class Releaser:
    """A daemon thread of one worker process: releases due items every EVERY seconds."""

    def __init__(self, client: redis.Redis) -> None:
        """`client`: the broker's (mailer/redisconn.py builds it: TLS, ACL user, Sentinel)."""
        self.client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailer-schedule", daemon=True)

    def start(self) -> Releaser:
        self._thread.start()
        return self

    def _run(self) -> None:
        script = self.client.register_script(scripts.source("schedule_release"))
        failing = False
        while not self._stop.is_set():
            try:
                released = int(script(keys=[keys.SCHEDULE_DUE, keys.SCHEDULE_ITEMS], args=[BATCH]))
                failing = False
            except (redis.RedisError, OSError) as exc:
                if not failing:
                    log.warning("schedule: Redis unavailable (%s)", type(exc).__name__)
                failing, released = True, 0
            if released < BATCH:
                self._stop.wait(EVERY * random.uniform(0.5, 1.0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()
