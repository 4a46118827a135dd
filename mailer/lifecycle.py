"""A message's life after `mailer.send`: `mailer.status(message_id)` and `mailer show ID`.

Two records in the state Redis say what became of a message, both kept for MAILER_LEDGER_TTL:

- the idempotency ledger (`mailer:ledger:<id>`, written by the workers): how far our own attempt
  got (`claimed`/`data` while it runs, `sent` with the relay's 250, `failed`, `uncertain`);
- the status record (`mailer:status:<id>`, JSON, written by the workers at the 250 and by the
  Event Webhook, `events/`): every state the message entered and when, the relay's replies,
  its queue id, the latest state of each recipient, and its most recent events.

This module is the reader (and the one place that names the record's keys and states, as
`mailer/wire.py` does for the payload): the workers and the webhook write what it reads. The
record is merged with the ledger, so a message whose status write was lost still reads as what
the ledger says. docs/lifecycle.md has the states, the correlation and the rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from mailer import redisconn
from mailer.config import Settings
from mailer.message import message_id_for

__all__ = [
    "RANK",
    "STATES",
    "MessageStatus",
    "read",
    "status",
]

#: + message id: the status record (JSON).
STATUS_PREFIX = "mailer:status:"
#: + the relay's queue id (from "250 Ok: queued as <id>"): our message id.
RELAY_ID_PREFIX = "mailer:relayid:"
#: The ledger's key prefix (workers/state/keys.py owns it; tests check the two agree).
LEDGER_PREFIX = "mailer:ledger:"

#: Every state, and its rank: the current state is the highest-ranked one the message entered
#: (the latest of equal rank), because events arrive out of order (a `delivered` may come before
#: its `processed`) and a message's news only gets further: a bounce is not undone by a late
#: `deferred`. Our own ends (held, failed, suppressed, cancelled) rank below anything the relay
#: says, so a hold the relay's events resolve reads as what the relay says.
RANK: dict[str, int] = {
    "scheduled": 0,
    "queued": 0,
    "held": 1,
    "failed": 1,
    "suppressed": 1,
    "cancelled": 1,
    "sent": 2,
    "deferred": 3,
    "delivered": 4,
    "bounced": 5,
    "dropped": 5,
    "blocked": 5,
    "spamreport": 6,
    "unsubscribed": 6,
}
STATES = tuple(RANK)

#: The ledger's states as message states (`claimed`/`data`: an attempt is under way).
_LEDGER_STATES = {
    "claimed": "queued",
    "data": "queued",
    "sent": "sent",
    "failed": "failed",
    "uncertain": "held",
    "cancelled": "cancelled",
}


@dataclass(frozen=True)
class Transition:
    state: str
    at: float  # Unix seconds (Redis server time for ours, SendGrid's for events)


@dataclass(frozen=True)
class MessageStatus:
    """What is known about one message. `recorded` is False when Redis holds nothing about it
    yet: it is still in the queue before its first attempt (or the id is not one of ours, or
    it was forgotten after MAILER_LEDGER_TTL)."""

    message_id: str
    state: str
    transitions: tuple[Transition, ...] = ()
    replies: tuple[str, ...] = ()
    events: tuple[dict[str, Any], ...] = ()
    recipients: Mapping[str, str] = field(default_factory=dict)
    relay_id: str = ""
    reason: str = ""
    recorded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "state": self.state,
            "recorded": self.recorded,
            "reason": self.reason,
            "relay_id": self.relay_id,
            "transitions": [{"state": t.state, "at": t.at} for t in self.transitions],
            "replies": list(self.replies),
            "recipients": dict(self.recipients),
            "events": list(self.events),
        }


def _list(value: Any) -> list[Any]:
    """A JSON list as Redis' Lua (cjson) writes it: an empty one comes back as `{}`."""
    return value if isinstance(value, list) else []


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def merge(message_id: str, record: str | None, ledger: str | None) -> MessageStatus:
    """The status of `message_id` from its status record and its ledger record (raw JSON)."""
    data: dict[str, Any] = json.loads(record) if record else {}
    transitions = {str(s): float(at) for s, at in _list(data.get("transitions"))}
    replies = [str(r) for r in _list(data.get("replies"))]
    state = str(data.get("state") or "")
    if ledger:
        led = json.loads(ledger)
        mine = _LEDGER_STATES.get(str(led.get("state")), "")
        if mine and mine not in transitions:
            transitions[mine] = float(led.get("at") or 0)
            if led.get("reply") and str(led["reply"]) not in replies:
                replies.insert(0, str(led["reply"]))
        if mine and (not state or RANK[mine] > RANK.get(state, -1)):
            state = mine
    # SendGrid's times are whole seconds: within one second, the state further along is later.
    ordered = tuple(
        Transition(s, t)
        for s, t in sorted(transitions.items(), key=lambda i: (int(i[1]), RANK.get(i[0], 0)))
    )
    recipients = data.get("recipients")
    return MessageStatus(
        message_id=message_id,
        state=state or "queued",
        transitions=ordered,
        replies=tuple(replies),
        events=tuple(e for e in _list(data.get("events")) if isinstance(e, dict)),
        recipients=dict(recipients) if isinstance(recipients, dict) else {},
        relay_id=str(data.get("relay_id") or ""),
        reason=str(data.get("reason") or ""),
        recorded=bool(record or ledger),
    )


def read(client: redis.Redis, message_id: str) -> MessageStatus:
    """The status of one message, in one round trip (MGET of its two records)."""
    record, ledger = client.mget([STATUS_PREFIX + message_id, LEDGER_PREFIX + message_id])
    return merge(message_id, _text(record), _text(ledger))


def status(
    message_id: str | None = None,
    *,
    idempotency_key: str | None = None,
    settings: Settings | None = None,
) -> MessageStatus:
    """The status of a message by its id, or by the idempotency key it was sent with (the id is
    derived from the key, `mailer/message.py`). Reads the state Redis (MAILER_REDIS_URL)."""
    if (message_id is None) == (idempotency_key is None):
        raise ValueError("give a message id or an idempotency_key, not both")
    if message_id is None:
        message_id = message_id_for(idempotency_key)
    message_id = message_id.strip().lower()
    if len(message_id) != 32 or any(c not in "0123456789abcdef" for c in message_id):
        raise ValueError(f"not a message id (32 hex digits): {message_id!r}")
    settings = settings or Settings.from_env()
    client = redisconn.client(settings.redis_url, settings, max_connections=2)
    try:
        return read(client, message_id)
    finally:
        client.close()


def render(st: MessageStatus) -> str:
    """`mailer show ID`: the status as text."""
    lines = [f"message   {st.message_id}", f"state     {st.state}"]
    if not st.recorded:
        lines.append("          (nothing recorded yet: not attempted so far, or not an id we know)")
    if st.reason:
        lines.append(f"reason    {st.reason}")
    if st.relay_id:
        lines.append(f"relay id  {st.relay_id}")
    for t in st.transitions:
        lines.append(f"  {_when(t.at)}  {t.state}")
    for reply in st.replies:
        lines.append(f"reply     {reply}")
    for address, state in sorted(st.recipients.items()):
        lines.append(f"recipient {address}: {state}")
    for event in st.events:
        detail = event.get("reason") or event.get("response") or ""
        lines.append(
            f"event     {_when(float(event.get('timestamp') or 0))}  {event.get('event')}  "
            f"{event.get('email', '')}  {detail}".rstrip()
        )
    return "\n".join(lines)


def _when(at: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + "Z"
