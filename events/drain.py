"""Off the request path: the webhook answers once a verified batch is on a Redis list
(`mailer:events:inbox`, one LPUSH), and a drain thread of the same process applies what
accumulates there, many batches per round trip.

Why a Redis list rather than an in-memory queue or a thread pool: a batch SendGrid was told we
have (2xx) survives a crash or a restart of the webhook process, and any webhook process drains
any other's. A batch is moved to `mailer:events:processing` while it is applied and removed
after; a drain thread starting up puts back what a dead one left there. An event applied twice
that way changes nothing (`sg_event_id`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import redis

from events.ingest import BadBatch, Ingestor, from_inbox, parse
from events.store import EventStore
from events.sweep import Sweep
from workers.state import keys

log = logging.getLogger("mailer.events")

#: Batches (POST bodies) applied together at most.
MAX_BATCHES = 50


class Drainer:
    def __init__(
        self,
        client: redis.Redis,
        ingestor: Ingestor,
        store: EventStore | None = None,
        sweep: Sweep | None = None,
        sweep_interval: float = 30.0,
    ) -> None:
        self.redis = client
        self.ingestor = ingestor
        self.store = store
        self.sweep = sweep
        self.sweep_interval = sweep_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches applied by this drainer

    def start(self) -> Drainer:
        if self._thread is None:
            self.recover()
            self._thread = threading.Thread(target=self._run, name="mailer-events", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.store is not None:
            self.store.close()
        if self.sweep is not None:
            self.sweep.close()

    def recover(self) -> int:
        """Puts batches a stopped drainer was applying back on the inbox."""
        moved = 0
        while self.redis.lmove(keys.EVENT_PROCESSING, keys.EVENT_INBOX, "RIGHT", "RIGHT"):
            moved += 1
        return moved

    def _run(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            try:
                self.drain_once(block=1)
                if self.sweep is not None and time.monotonic() - last_sweep >= self.sweep_interval:
                    last_sweep = time.monotonic()
                    if self.sweep.due():
                        self.sweep.run()
            except (redis.RedisError, OSError) as exc:
                log.warning("event drain: Redis error (%s); retrying", type(exc).__name__)
                self._retry_later()
            except Exception:
                log.exception("event drain failed; retrying")
                self._retry_later()

    def _retry_later(self) -> None:
        """After a failure: wait, then put what was being applied back (applying it again
        changes nothing that was already applied)."""
        self._stop.wait(1.0)
        with contextlib.suppress(redis.RedisError, OSError):
            self.recover()

    def drain_once(self, block: int = 0) -> int:
        """Applies up to MAX_BATCHES waiting batches; returns how many (0: none waited)."""
        if block:
            first = self.redis.blmove(
                keys.EVENT_INBOX, keys.EVENT_PROCESSING, block, "RIGHT", "LEFT"
            )
        else:
            first = self.redis.lmove(keys.EVENT_INBOX, keys.EVENT_PROCESSING, "RIGHT", "LEFT")
        if first is None:
            return 0
        raws: list[bytes] = [first]  # type: ignore[list-item]
        pipe = self.redis.pipeline(transaction=False)
        for _ in range(MAX_BATCHES - 1):
            pipe.lmove(keys.EVENT_INBOX, keys.EVENT_PROCESSING, "RIGHT", "LEFT")
        raws += [r for r in pipe.execute() if r is not None]
        events: list[dict[str, Any]] = []
        relays: list[str] = []  # the relay each event was posted for
        for raw in raws:
            relay, body = from_inbox(raw)
            try:
                batch = parse(body)
            except BadBatch as exc:  # signed by SendGrid yet not events: kept out, logged
                log.error("dropping a verified webhook batch: %s", exc)
                continue
            events += batch
            relays += [relay] * len(batch)
        applied = self.ingestor.apply(events, relays)
        if self.store is not None:
            self.store.write(applied.rows)
        pipe = self.redis.pipeline(transaction=False)
        for raw in raws:
            pipe.lrem(keys.EVENT_PROCESSING, 1, raw)  # type: ignore[arg-type]
        pipe.execute()
        self.batches += len(raws)
        return len(raws)
