"""Uncertain holds the relay's events did not resolve in time (docs/lifecycle.md).

A message held as `uncertain` (dead letter kind `uncertain`) is normally ended by an event of
the relay (`event_apply.lua`). The sweep handles the rest, once per MAILER_UNCERTAIN_SWEEP_INTERVAL
fleet-wide (a Redis lock), in the webhook process: it is the process that sees the events, so it
is the one that knows none came; the workers stay free of it.

- a hold whose ledger already says `sent` (the event came while the attempt was still waiting
  for its reply, and the attempt dead-lettered it afterwards) is removed;
- a hold older than MAILER_UNCERTAIN_RESOLVE_AFTER with no event follows
  MAILER_UNCERTAIN_RESOLVE_POLICY: `hold` leaves it for an operator, `retry` sends it again the
  way `mailer failures retry` does (forget the ledger record, publish, remove the dead letter).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from events import metrics
from mailer.config import Settings, WebhookSettings
from workers.state import keys, lifecycle
from workers.state.deadletters import DeadLetters

log = logging.getLogger("mailer.events")

#: Holds looked at per sweep (the oldest first).
PER_SWEEP = 1000


class Sweep:
    def __init__(self, client: redis.Redis, settings: Settings, webhook: WebhookSettings) -> None:
        self.redis = client
        self.settings = settings
        self.webhook = webhook
        self.dead = DeadLetters(client)
        self._publisher: Any = None

    def due(self) -> bool:
        """True for the one process that sweeps this interval."""
        ttl = max(1, int(self.webhook.sweep_interval))
        return bool(self.redis.set(keys.EVENT_SWEEP, "1", nx=True, ex=ttl))

    def run(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        done = {"cleared": 0, "retried": 0, "held": 0}
        found = self.redis.zrangebyscore(
            keys.DEAD_LETTER_INDEX, "-inf", now, start=0, num=PER_SWEEP
        )
        ids = [_text(i) for i in found]  # type: ignore[arg-type]
        if not ids:
            return done
        letters = self.redis.hmget(keys.DEAD_LETTERS, ids)
        ledgers = self.redis.mget([keys.ledger(i) for i in ids])
        for message_id, raw, ledger in zip(ids, letters, ledgers, strict=True):
            if raw is None:
                continue
            letter = json.loads(raw)
            if letter.get("kind") != "uncertain":
                continue
            state = json.loads(ledger).get("state") if ledger else None
            if state == "sent":
                self.dead.remove(message_id)
                done["cleared"] += 1
            elif now - float(letter.get("failed_at", now)) < self.webhook.resolve_after:
                continue
            elif self.webhook.resolve_policy == "retry":
                self._retry(message_id, letter, now)
                done["retried"] += 1
            else:
                done["held"] += 1
        metrics.RESOLVED.labels("retry").inc(done["retried"])
        return done

    def _retry(self, message_id: str, letter: dict[str, Any], now: float) -> None:
        from mailer.publish import Publisher  # only this path needs the broker

        if self._publisher is None:
            self._publisher = Publisher(self.settings)
        payload = dict(letter["payload"])
        payload["meta"] = {**payload.get("meta", {}), "created_at": now}
        self.redis.delete(keys.ledger(message_id))
        self._publisher.send(payload)
        self.dead.remove(message_id)
        after = int(self.webhook.resolve_after)
        lifecycle.note(
            self.redis,
            message_id,
            "queued",
            self.settings.ledger_ttl,
            reason=f"no relay event {after} s after the hold: sent again (policy retry)",
        )
        log.info("uncertain hold %s sent again: no relay event in %d s", message_id, after)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
