"""Applies verified event batches: each event once (its `sg_event_id`), to its message's
status, the suppression lists, the per-minute counts and, for an event that proves the relay has
the message, to an uncertain hold (docs/lifecycle.md).

An event names our message by the `mailer_id` unique arg (a top-level key); one without it (an
asynchronous bounce) by its `sg_message_id`, whose part before the first dot is the queue id of
the relay's 250, which the worker recorded (`mailer:relayid:<queue id>`). A batch costs two
round trips: one MGET for those lookups, one pipeline of `event_apply.lua` calls, each carrying
the events of several messages grouped by message, so that a message's status record is decoded
and written once for all its events of the batch, and Redis runs one script per PER_CALL events
rather than one per event.

Suppressions go to the lists of the relay the batch was posted for (`/webhooks/sendgrid/<relay>`:
each SendGrid subuser posts its own events to its own URL), which the inbox keeps with the body
(`inbox_entry`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis

from events import metrics
from mailer.wire import DEFAULT_RELAY
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
#: Events one script call applies at most (a call blocks Redis while it runs).
PER_CALL = 50
_ID = re.compile(r"^[0-9a-f]{32}$")
_encode = json.JSONEncoder(separators=(",", ":")).encode


class BadBatch(ValueError):
    """A body that is not a JSON array of event objects."""


#: Starts an inbox entry posted for a named relay: `relay=<name>\n<body>` (no JSON body starts
#: so); the `default` relay's entries are the bare body, as before relays.
_RELAY_MARK = b"relay="


def inbox_entry(relay: str, body: bytes) -> bytes:
    """What the webhook puts on the inbox for a verified `body` posted for `relay`."""
    if relay == DEFAULT_RELAY:
        return body
    return _RELAY_MARK + relay.encode() + b"\n" + body


def from_inbox(raw: bytes) -> tuple[str, bytes]:
    """(relay, body) of an inbox entry."""
    if not raw.startswith(_RELAY_MARK):
        return DEFAULT_RELAY, raw
    head, _, body = raw.partition(b"\n")
    return head[len(_RELAY_MARK) :].decode(), body


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


def suppression_of(event: Mapping[str, Any], relay: str = DEFAULT_RELAY) -> tuple[str, str]:
    """(relay `relay`'s suppression list's key, directive: '' none, 'add:<reason>' or
    'remove')."""
    kind = str(event.get("event", ""))
    group = event.get("asm_group_id")
    general = keys.suppress_global(relay)
    if kind == "bounce":
        return general, "add:" + ("blocked" if event.get("type") == "blocked" else "bounce")
    if kind in ("spamreport", "unsubscribe"):
        return general, "add:" + kind
    if kind in ("group_unsubscribe", "group_resubscribe") and isinstance(group, int):
        directive = "add:group_unsubscribe" if kind == "group_unsubscribe" else "remove"
        return keys.suppress_group(group, relay), directive
    return general, ""


def timestamp_of(event: Mapping[str, Any]) -> float:
    value = event.get("timestamp")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


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
    def __init__(self, client: redis.Redis, status_ttl: int, *, keep_rows: bool = False) -> None:
        self.redis = client
        self.status_ttl = status_ttl
        self.keep_rows = keep_rows  # the events themselves, for the PostgreSQL history
        # Sent as a plain EVALSHA (the script is loaded up front and again after a NOSCRIPT):
        # redis-py's Script wrapper costs more per call than the script runs.
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

    def apply(
        self, events: Sequence[Mapping[str, Any]], relays: Sequence[str] | None = None
    ) -> Applied:
        """Applies a batch in one pipeline of `event_apply.lua` calls: each call carries up to
        PER_CALL events, grouped by message, each message's in the batch's order. `relays`:
        the relay each event was posted for (its suppressions go to that relay's lists);
        None: all the `default` relay's."""
        done = Applied()
        if not events:
            return done
        ids = self.correlate(events)
        # Grouping moves a message's later events ahead of other messages' earlier ones. That
        # is harmless but for a resubscribe, which must stay after what came before it and
        # before what came after it (it removes a suppression an earlier event may add): it
        # starts a new segment, and groups never span segments.
        groups: dict[tuple[int, str], list[int]] = {}
        segment = 0
        for index, mid in enumerate(ids):
            if events[index].get("event") == "group_resubscribe":
                segment += 1
            groups.setdefault((segment, mid), []).append(index)
        idents = [event_id(event) for event in events]
        calls: list[_Call] = []
        call = _Call()
        for (_, mid), indexes in groups.items():
            for part in chunks(indexes, PER_CALL):
                if call.size + len(part) > PER_CALL:
                    calls.append(call)
                    call = _Call()
                call.add(
                    mid,
                    [
                        (i, idents[i], events[i], DEFAULT_RELAY if relays is None else relays[i])
                        for i in part
                    ],
                )
        calls.append(call)
        try:
            results = self._run(calls)
        except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts
            self._sha = str(self.redis.script_load(EVENT_SOURCE))
            results = self._run(calls)
        for c, codes in zip(calls, results, strict=True):
            for index, code in zip(c.indexes, codes, strict=True):
                if code == 0:
                    done.duplicates += 1
                    continue
                done.applied += 1
                done.by_type[str(events[index].get("event", ""))] += 1
                done.unmatched += not ids[index]
                done.resolved += code == 2
        if self.keep_rows:
            done.rows = [
                (ident, mid, dict(event))
                for ident, mid, event in zip(idents, ids, events, strict=True)
            ]
        metrics.record(done.by_type, done.duplicates, done.unmatched, done.resolved)
        return done

    def _run(self, calls: Sequence[_Call]) -> list[Any]:
        """Runs the calls in order on one connection, as a pipeline does, but sends each call
        as soon as it is built and reads the replies at the end, so that Redis applies the
        first calls while this thread builds the rest. Packed by hiredis (a dependency):
        redis-py's own packing costs more than building the call."""
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            for call in calls:
                command = ("EVALSHA", self._sha, *call.command(self.status_ttl))
                conn.send_packed_command([hiredis.pack_command(command)])
            results: list[Any] = []
            error: redis.exceptions.ResponseError | None = None
            for _ in calls:
                try:
                    results.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:  # read every reply first
                    error = error or exc
            if error is not None:
                raise error
            return results
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse it mid-stream
            raise
        finally:
            pool.release(conn)


#: An event of a call: its batch index, event id, the event, the relay it was posted for.
_Event = tuple[int, str, Mapping[str, Any], str]


class _Call:
    """One `event_apply.lua` call (its header has the layout): whole messages' events, up to
    PER_CALL, built into keys and one JSON argument only when sent."""

    def __init__(self) -> None:
        self.indexes: list[int] = []  # the batch's index of each event, in the call's order
        self.size = 0
        self._groups: list[tuple[str, Sequence[_Event]]] = []

    def add(self, mid: str, events: Sequence[_Event]) -> None:
        """Adds a message's events (batch index, event id, event, relay posted for)."""
        self._groups.append((mid, events))
        self.indexes += [index for index, _, _, _ in events]
        self.size += len(events)

    def command(self, status_ttl: int) -> list[Any]:
        """numkeys, keys, arguments."""
        names: list[str] = [keys.DEAD_LETTERS, keys.DEAD_LETTER_INDEX]
        seen: list[str] = []
        shared: dict[str, int] = {}  # counts and suppression keys -> their place after `seen`
        groups: list[list[Any]] = []
        for mid, events in self._groups:
            unused = keys.DEAD_LETTERS  # a group naming no message has no records
            names += [keys.status(mid), keys.ledger(mid)] if mid else [unused, unused]
            packed: list[list[Any]] = []
            for _, ident, event, relay in events:
                at = timestamp_of(event)
                email = str(event.get("email", "")).strip().lower()
                suppress_key, directive = suppression_of(event, relay)
                kind = str(event.get("event", ""))
                seen.append(keys.event_seen(ident))
                packed.append(
                    [
                        kind or "unknown",
                        state_of(event),
                        at,
                        email,
                        directive if email else "",
                        1 if kind in PROOF else 0,
                        shared.setdefault(keys.event_counts(int(at // 60)), len(shared) + 1),
                        shared.setdefault(suppress_key, len(shared) + 1),
                        {k: event[k] for k in SUMMARY_FIELDS if k in event},
                    ]
                )
            groups.append([mid, packed])
        names += seen
        names += shared
        return [len(names), *names, SEEN_TTL, status_ttl, COUNTS_TTL, _encode(groups)]


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
