"""Writes a message's status record (read by `mailer/lifecycle.py`; docs/lifecycle.md).

The worker records `sent` at each message's own 250, with the relay's reply and its queue id
("250 Ok: queued as <id>": events that lack our `mailer_id` are matched through it), and
`suppressed` when every recipient is on a suppression list. Those writes never delay a message:
`StatusWriter.note` only queues, and what the attempts of one loop iteration queued leaves as one
pipeline (one EVALSHA per message of `status_note.lua`). A write that fails is logged and
dropped: the ledger still says `sent`, and the reader merges the two.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from workers.state import keys, scripts

log = logging.getLogger("mailer.lifecycle")

NOTE_SOURCE = scripts.source("status_lib", "status_note")
EVENT_SOURCE = scripts.source("status_lib", "event_apply")
#: The queue id in the relay's 250 ("250 Ok: queued as Yo60h6C5ScGPeP5fUWU3Kw").
_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9_-]+)", re.IGNORECASE)
#: Notes one pipeline carries at most.
MAX_BATCH = 1000


def queue_id(reply: str) -> str:
    """The relay's queue id in its 250 reply, or ""."""
    match = _QUEUED_AS.search(reply)
    return match.group(1) if match else ""


def note_call(
    message_id: str,
    state: str,
    ttl: int,
    *,
    reply: str = "",
    reason: str = "",
    recipients: Mapping[str, str] | None = None,
) -> tuple[list[str], list[Any]]:
    """(keys, args) of one `status_note.lua` call."""
    relay = queue_id(reply) if state == "sent" else ""
    names = [keys.status(message_id)] + ([keys.relay_id(relay)] if relay else [])
    args = [message_id, state, reply[:200], relay, ttl, reason[:200]]
    return names, [*args, json.dumps(dict(recipients or {}))]


def note(
    client: redis.Redis,
    message_id: str,
    state: str,
    ttl: int,
    *,
    reply: str = "",
    reason: str = "",
    recipients: Mapping[str, str] | None = None,
) -> None:
    """One transition, synchronously (the CLI, the uncertain sweep)."""
    names, args = note_call(
        message_id, state, ttl, reply=reply, reason=reason, recipients=recipients
    )
    client.register_script(NOTE_SOURCE)(keys=names, args=args)


class StatusWriter:
    """The worker's status writes: queued without waiting, sent together once per loop
    iteration (and whatever queued meanwhile right after), never raising into an attempt."""

    def __init__(self, client: aioredis.Redis, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl
        self._script = client.register_script(NOTE_SOURCE)
        self._queue: list[tuple[list[str], list[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.dropped = 0  # notes lost to a Redis error (the ledger still has the outcome)

    def note(
        self,
        message_id: str,
        state: str,
        *,
        reply: str = "",
        reason: str = "",
        recipients: Mapping[str, str] | None = None,
    ) -> None:
        """Queues one transition (call on the loop thread)."""
        self._queue.append(
            note_call(
                message_id, state, self.ttl, reply=reply, reason=reason, recipients=recipients
            )
        )
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                pipe = self.redis.pipeline(transaction=False)
                for names, args in batch:
                    await self._script(keys=names, args=args, client=pipe)
                await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                self.dropped += len(batch)
                log.warning(
                    "%d status writes dropped (%s); the ledger keeps the outcome",
                    len(batch),
                    type(exc).__name__,
                )

    async def close(self) -> None:
        """Sends what is still queued (shutdown)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.wait([flusher], timeout=5.0)
        if self._queue:
            await self._flush()


def event_counts(client: redis.Redis, minutes: int = 60, now: float | None = None) -> Counter[str]:
    """Events by type over the last `minutes` minutes (by the events' own time)."""
    current = int((time.time() if now is None else now) // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(keys.event_counts(minute))
    total: Counter[str] = Counter()
    for bucket in pipe.execute():
        for kind, n in bucket.items():
            total[kind.decode() if isinstance(kind, bytes) else str(kind)] += int(n)
    return total
