"""Messages we gave up on, kept in Redis with why, so an operator can list, read and replay them.

The stored payload is the task payload (rendered message and envelope, no credentials); it
lives only in Redis, never in Flower or logs. Kinds: `permanent` (a 5xx), `expired` (out of
attempts or older than MAILER_MAX_MESSAGE_AGE), `uncertain` (no reply after the DATA
terminator, policy `hold`: the relay may have it), `recipients` (the message went out but some
recipients were refused; the stored envelope holds only those, so a replay cannot resend to the
others). One record per message id: a later outcome replaces an earlier one. `relay` is the
relay the verdict came from (or the message was waiting for): `mailer failures list --relay`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis

from mailer.wire import DEFAULT_RELAY
from workers.state import keys


@dataclass
class DeadLetter:
    id: str
    kind: str  # permanent | expired | uncertain | recipients | invalid
    code: int | None
    text: str
    attempts: int
    first_at: float
    failed_at: float
    subject: str = ""
    rcpt_to: list[str] = field(default_factory=list)
    refused: dict[str, list[Any]] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)
    relay: str = DEFAULT_RELAY

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        """Records written before a field existed get its default; fields a newer writer
        added are ignored, so an older `mailer failures` still reads them."""
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("payload")
        return data


def record(
    payload: Mapping[str, Any],
    *,
    kind: str,
    code: int | None,
    text: str,
    attempts: int,
    refused: Mapping[str, tuple[int, str]] | None = None,
    relay: str | None = None,
) -> DeadLetter:
    """`relay`: the relay the verdict came from (default: the one the message names)."""
    meta = payload.get("meta", {})
    stored = dict(payload)
    if kind == "recipients" and refused:
        # The others accepted it: a replay (`mailer failures retry`) goes to the refused only.
        stored["rcpt_to"] = [r for r in payload.get("rcpt_to", []) if r in refused]
    return DeadLetter(
        id=str(payload["id"]),
        kind=kind,
        code=code,
        text=text,
        attempts=attempts,
        first_at=float(meta.get("created_at", time.time())),
        failed_at=time.time(),
        subject=str(meta.get("subject", "")),
        rcpt_to=list(payload.get("rcpt_to", [])),
        refused={k: list(v) for k, v in (refused or {}).items()},
        payload=stored,
        relay=relay or _relay_named(meta),
    )


def _relay_named(meta: Any) -> str:
    relay = meta.get("relay") if isinstance(meta, Mapping) else None
    return relay if isinstance(relay, str) and relay else DEFAULT_RELAY


def invalid(value: object, message_id: str, reason: str) -> DeadLetter:
    """A task the wire contract refused: kept as received (it came as JSON) for inspection;
    `mailer failures retry` refuses to replay it."""
    now = time.time()
    return DeadLetter(
        id=message_id,
        kind="invalid",
        code=None,
        text=reason,
        attempts=0,
        first_at=now,
        failed_at=now,
        payload=dict(value) if isinstance(value, Mapping) else {"received": value},
        relay=_relay_named(value.get("meta") if isinstance(value, Mapping) else None),
    )


class DeadLetters:
    """Synchronous store (used from tasks' threads and the CLI)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def add(self, letter: DeadLetter) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(keys.DEAD_LETTERS, letter.id, letter.to_json())
        pipe.zadd(keys.DEAD_LETTER_INDEX, {letter.id: letter.failed_at})
        pipe.execute()

    def count(self) -> int:
        return int(self.redis.zcard(keys.DEAD_LETTER_INDEX))

    def list(self, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        ids: list[bytes] = self.redis.zrevrange(keys.DEAD_LETTER_INDEX, offset, offset + limit - 1)  # type: ignore[assignment]
        if not ids:
            return []
        raws = self.redis.hmget(keys.DEAD_LETTERS, ids)
        return [DeadLetter.from_json(raw) for raw in raws if raw is not None]

    def get(self, message_id: str) -> DeadLetter | None:
        raw = self.redis.hget(keys.DEAD_LETTERS, message_id)
        return None if raw is None else DeadLetter.from_json(raw)

    def remove(self, message_id: str) -> bool:
        pipe = self.redis.pipeline()
        pipe.hdel(keys.DEAD_LETTERS, message_id)
        pipe.zrem(keys.DEAD_LETTER_INDEX, message_id)
        return bool(pipe.execute()[0])

    def purge(self) -> int:
        n = self.count()
        self.redis.delete(keys.DEAD_LETTERS, keys.DEAD_LETTER_INDEX)
        return n
