"""Applies verified event batches: each event once (its `sg_event_id`), to its message's
status, the suppression lists, the per-minute counts and, for an event that proves the relay has
the message, to an uncertain hold (docs/lifecycle.md).

An event names our message by the `mailer_id` unique arg (a top-level key); one without it (an
asynchronous bounce) by its `sg_message_id`, whose part before the first dot is the queue id of
the relay's 250, which the worker recorded (`mailer:relayid:<queue id>`). A batch costs two
round trips: one MGET for those lookups, one pipeline of `event_apply.lua` calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from events import metrics
from workers.state import keys
from workers.state.lifecycle import EVENT_SOURCE

log = logging.getLogger("mailer.events")

#: An event type -> the message state it stands for ("": none, such as opens and clicks).
STATES = {
    "processed": "sent",
    "delivered": "delivered",
    "deferred": "deferred",
    "bounce": "bounced",  # "blocked" when the event's type says so
    "dropped": "dropped",
    "spamreport": "spamreport",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}
#: Events that prove the relay has the message: they end an uncertain hold.
PROOF = frozenset({"processed", "delivered", "deferred", "bounce"})
#: Kept in the status record's recent events (the rest goes to PostgreSQL when configured).
SUMMARY_FIELDS = (
    "event",
    "email",
    "timestamp",
    "sg_event_id",
    "sg_message_id",
    "reason",
    "response",
    "type",
    "status",
    "attempt",
    "asm_group_id",
    "bounce_classification",
)
SEEN_TTL = 3 * 86400  # SendGrid retries for 24 hours
COUNTS_TTL = 3 * 3600
_ID = re.compile(r"^[0-9a-f]{32}$")


class BadBatch(ValueError):
    """A body that is not a JSON array of event objects."""


def parse(body: bytes) -> list[dict[str, Any]]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadBatch("body is not JSON") from None
    if not isinstance(data, list):
        raise BadBatch("body is not a JSON array of events")
    return [e for e in data if isinstance(e, dict)]


def event_id(event: Mapping[str, Any]) -> str:
    """`sg_event_id`, or a digest of the event for one without (never seen from SendGrid)."""
    given = event.get("sg_event_id")
    if isinstance(given, str) and given:
        return given[:200]
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"))
    return "sha1:" + hashlib.sha1(canonical.encode()).hexdigest()


def state_of(event: Mapping[str, Any]) -> str:
    kind = str(event.get("event", ""))
    if kind == "bounce" and event.get("type") == "blocked":
        return "blocked"
    return STATES.get(kind, "")


def suppression_of(event: Mapping[str, Any]) -> tuple[str, str]:
    """(the suppression list's key, directive: '' none, 'add:<reason>' or 'remove')."""
    kind = str(event.get("event", ""))
    group = event.get("asm_group_id")
    if kind == "bounce":
        return keys.SUPPRESS_GLOBAL, "add:" + (
            "blocked" if event.get("type") == "blocked" else "bounce"
        )
    if kind in ("spamreport", "unsubscribe"):
        return keys.SUPPRESS_GLOBAL, "add:" + kind
    if kind in ("group_unsubscribe", "group_resubscribe") and isinstance(group, int):
        directive = "add:group_unsubscribe" if kind == "group_unsubscribe" else "remove"
        return keys.suppress_group(group), directive
    return keys.SUPPRESS_GLOBAL, ""


def timestamp_of(event: Mapping[str, Any]) -> float:
    value = event.get("timestamp")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


@dataclass
class Applied:
    """What one call of `Ingestor.apply` did."""

    applied: int = 0
    duplicates: int = 0
    unmatched: int = 0  # applied, but to no message of ours (counted, suppressions kept)
    resolved: int = 0  # uncertain holds that became sent
    by_type: Counter[str] = field(default_factory=Counter)
    rows: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


class Ingestor:
    def __init__(self, client: redis.Redis, status_ttl: int) -> None:
        self.redis = client
        self.status_ttl = status_ttl
        # Sent as a plain EVALSHA per event (the script is loaded up front and again after a
        # NOSCRIPT): redis-py's Script wrapper costs more per call than the script runs.
        self._sha = str(client.script_load(EVENT_SOURCE))

    def correlate(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Our message id of each event ("" when unknown), one MGET for the fallbacks."""
        found: list[str] = []
        lookups: dict[int, str] = {}
        for index, event in enumerate(events):
            mid = event.get("mailer_id")
            if isinstance(mid, str) and _ID.match(mid):
                found.append(mid)
                continue
            found.append("")
            sg = event.get("sg_message_id")
            if isinstance(sg, str) and sg:
                lookups[index] = sg.split(".", 1)[0]
        if lookups:
            values = self.redis.mget([keys.relay_id(q) for q in lookups.values()])
            for index, value in zip(lookups, values, strict=True):
                if value is not None:
                    found[index] = value.decode() if isinstance(value, bytes) else str(value)
        return found

    def apply(self, events: Sequence[Mapping[str, Any]]) -> Applied:
        done = Applied()
        if not events:
            return done
        ids = self.correlate(events)
        calls = [self._call(event, mid) for event, mid in zip(events, ids, strict=True)]
        try:
            results = self._run(calls)
        except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts
            self._sha = str(self.redis.script_load(EVENT_SOURCE))
            results = self._run(calls)
        for event, mid, result in zip(events, ids, results, strict=True):
            kind = str(event.get("event", ""))
            done.rows.append((event_id(event), mid, dict(event)))
            if int(result) == 0:
                done.duplicates += 1
                continue
            done.applied += 1
            done.by_type[kind] += 1
            done.unmatched += not mid
            done.resolved += int(result) == 2
        metrics.record(done.by_type, done.duplicates, done.unmatched, done.resolved)
        return done

    def _run(self, calls: list[list[Any]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", self._sha, 7, *call)
        return list(pipe.execute())

    def _call(self, event: Mapping[str, Any], mid: str) -> list[Any]:
        """The 7 keys and the arguments of one `event_apply.lua` call."""
        ident = event_id(event)
        at = timestamp_of(event)
        email = str(event.get("email", "")).strip().lower()
        suppress_key, directive = suppression_of(event)
        if not email:
            directive = ""
        summary = {k: event[k] for k in SUMMARY_FIELDS if k in event}
        kind = str(event.get("event", ""))
        names = [
            keys.event_seen(ident),
            keys.status(mid) if mid else keys.event_seen(ident),
            keys.event_counts(int(at // 60)),
            suppress_key,
            keys.ledger(mid) if mid else keys.event_seen(ident),
            keys.DEAD_LETTERS,
            keys.DEAD_LETTER_INDEX,
        ]
        args: list[str | int | float] = [
            SEEN_TTL,
            self.status_ttl,
            kind or "unknown",
            state_of(event),
            at,
            json.dumps(summary, separators=(",", ":")),
            email,
            directive,
            "1" if kind in PROOF else "0",
            COUNTS_TTL,
            "1" if mid else "0",
            mid,
        ]
        return [*names, *args]


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
