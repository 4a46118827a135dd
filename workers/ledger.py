"""The idempotency ledger: what the relay already has, so a redelivered task never sends twice.

Celery on Redis is at-least-once (late acks, visibility-timeout redelivery, publish-then-ack
retries), so every attempt first *claims* its message id here. One key per message id:

    claimed   an attempt is between MAIL and the DATA terminator (short TTL: if its worker
              dies, the claim lapses and a later attempt may send; nothing reached the relay)
    data      the DATA terminator is about to be written: from here the relay may have the
              message even if we never see its reply
    sent      the relay answered 250 (kept for the ledger TTL)
    uncertain no reply after the terminator; what happens next is the configured policy
    failed    permanently refused

A redelivered attempt that finds `data` knows the previous holder died inside the ambiguous
window and records it as `uncertain` rather than guessing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

PREFIX = "mailer:ledger:"

# KEYS[1] ledger key; ARGV: owner, claim ttl ms. Returns the current record when the
# message is not ours to send, or nil when the claim was taken.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local rec = cjson.decode(cur)
  if rec['state'] ~= 'claimed' or rec['owner'] ~= ARGV[1] then return cur end
end
local t = redis.call('TIME')
local rec = cjson.encode({state='claimed', owner=ARGV[1], at=tonumber(t[1])})
redis.call('SET', KEYS[1], rec, 'PX', ARGV[2])
return nil
"""


@dataclass(frozen=True)
class Record:
    state: str
    owner: str = ""
    at: float = 0.0
    reply: str = ""

    @classmethod
    def parse(cls, raw: bytes | str) -> Record:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            state=str(data.get("state", "")),
            owner=str(data.get("owner", "")),
            at=float(data.get("at", 0)),
            reply=str(data.get("reply", "")),
        )


class Ledger:
    """Async ledger on the process's Redis client; all writes are single commands."""

    def __init__(self, redis: aioredis.Redis, *, ttl: int, claim_ttl: float) -> None:
        self.redis = redis
        self.ttl = ttl
        self.claim_ttl_ms = int(claim_ttl * 1000)
        self._claim = redis.register_script(_CLAIM)

    @staticmethod
    def key(message_id: str) -> str:
        return PREFIX + message_id

    async def claim(self, message_id: str, owner: str) -> Record | None:
        """Takes the message for this attempt; returns the blocking record if it can't."""
        raw = await self._claim(keys=[self.key(message_id)], args=[owner, self.claim_ttl_ms])
        return None if raw is None else Record.parse(raw)

    async def get(self, message_id: str) -> Record | None:
        raw = await self.redis.get(self.key(message_id))
        return None if raw is None else Record.parse(raw)

    async def mark(self, message_id: str, state: str, *, owner: str = "", reply: str = "") -> None:
        rec = json.dumps({"state": state, "owner": owner, "at": time.time(), "reply": reply[:200]})
        await self.redis.set(self.key(message_id), rec, ex=self.ttl)

    async def release(self, message_id: str, owner: str) -> None:
        """Drops our claim when nothing reached the relay, so a retry may send at once."""
        rec = await self.get(message_id)
        if rec is not None and rec.state == "claimed" and rec.owner == owner:
            await self.redis.delete(self.key(message_id))
