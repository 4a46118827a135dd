"""The idempotency ledger: what the relay already has, so a redelivered task never sends twice.

Celery on Redis is at-least-once (late acks, visibility-timeout redelivery, publish-then-ack
retries), so every attempt first *claims* its message id here (the id is derived from the
caller's `idempotency_key` when there is one, so the key is covered too). One key per message:

    claimed   an attempt is between MAIL and the DATA terminator (short TTL: if its worker
              dies, the claim lapses and a later attempt may send; nothing reached the relay)
    data      the DATA terminator is about to be written: from here the relay may have the
              message even if we never see its reply. A copy that finds `data` waits while
              the record's window (the attempt's longest wait for the reply) lasts
    sent      the relay answered 250
    uncertain no reply after the terminator (or found in `data` by a redelivered copy, whose
              sender died inside the ambiguous window); what happens next is
              MAILER_UNCERTAIN_POLICY: `hold` keeps it here, `retry` lets one attempt take over
    failed    permanently refused

Every transition is one Lua script that checks who owns the record, so two copies of a task
running at once (a redelivery racing the original) can never both get past `claimed`.
Records other than `claimed` live for MAILER_LEDGER_TTL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

PREFIX = "mailer:ledger:"

_LIB = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function record(state, owner, reply, window)
  local at = now()
  return cjson.encode({state=state, owner=owner, at=at, reply=reply, ['until']=at + window})
end
"""

# KEYS[1]; ARGV: owner, claim ttl ms, takeover ("1": take over `data`/`uncertain`), ledger ttl s,
# then released owners (earlier attempts of this task that ended certain the relay does not
# have the message: a leftover `claimed`/`data` record of any of them is free).
# nil when the claim is ours; otherwise the record that stands in the way. A `data` record
# still inside its window belongs to a live attempt waiting for the relay's reply: it stands.
# Past its window, its sender died after starting the terminator: without takeover it becomes
# `uncertain`.
_CLAIM = (
    _LIB
    + """
local cur = redis.call('GET', KEYS[1])
if cur then
  local rec = cjson.decode(cur)
  local mine = rec['state'] == 'claimed' and rec['owner'] == ARGV[1]
  local released = false
  if rec['state'] == 'claimed' or rec['state'] == 'data' then
    for i = 5, #ARGV do
      if rec['owner'] == ARGV[i] then released = true end
    end
  end
  if not mine and not released then
    if rec['state'] == 'data' and tonumber(rec['until'] or 0) > now() then return cur end
    local ambiguous = rec['state'] == 'data' or rec['state'] == 'uncertain'
    if not (ambiguous and ARGV[3] == '1') then
      if rec['state'] == 'data' then
        cur = record('uncertain', '', 'its sender died after starting the terminator', 0)
        redis.call('SET', KEYS[1], cur, 'EX', ARGV[4])
      end
      return cur
    end
  end
end
redis.call('SET', KEYS[1], record('claimed', ARGV[1], '', 0), 'PX', ARGV[2])
return nil
"""
)

# KEYS[1]; ARGV: owner, ledger ttl s, window s. 1 when `claimed` by owner (or lapsed and
# unclaimed) -> `data`, live for `window` seconds (the longest the attempt waits for the reply).
_DATA = (
    _LIB
    + """
local cur = redis.call('GET', KEYS[1])
if cur then
  local rec = cjson.decode(cur)
  if rec['state'] ~= 'claimed' or rec['owner'] ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], record('data', ARGV[1], '', tonumber(ARGV[3])), 'EX', ARGV[2])
return 1
"""
)

# KEYS[1]; ARGV: owner, state, reply, ledger ttl s. Records how our attempt ended, unless the
# record has meanwhile become someone else's (never overwrite another attempt's outcome).
_SETTLE = (
    _LIB
    + """
local cur = redis.call('GET', KEYS[1])
if cur and ARGV[2] ~= 'sent' then
  local rec = cjson.decode(cur)
  if rec['owner'] ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], record(ARGV[2], ARGV[1], ARGV[3], 0), 'EX', ARGV[4])
return 1
"""
)

# KEYS[1]; ARGV: owner. Deletes our own `claimed` or `data` record: the caller knows the relay
# does not have the message (it never got the terminator, or answered it with a 4xx/421).
_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local rec = cjson.decode(cur)
if (rec['state'] == 'claimed' or rec['state'] == 'data') and rec['owner'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Record:
    state: str
    owner: str = ""
    at: float = 0.0
    reply: str = ""
    until: float = 0.0  # `data`: the attempt is alive until then (Redis server time)

    @classmethod
    def parse(cls, raw: bytes | str) -> Record:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            state=str(data.get("state", "")),
            owner=str(data.get("owner", "")),
            at=float(data.get("at", 0)),
            reply=str(data.get("reply", "")),
            until=float(data.get("until", 0)),
        )


class Ledger:
    """Async ledger on the process's Redis client; every transition is one atomic script."""

    def __init__(self, redis: aioredis.Redis, *, ttl: int, claim_ttl: float) -> None:
        self.redis = redis
        self.ttl = ttl
        self.claim_ttl_ms = int(claim_ttl * 1000)
        self._claim = redis.register_script(_CLAIM)
        self._data = redis.register_script(_DATA)
        self._settle = redis.register_script(_SETTLE)
        self._release = redis.register_script(_RELEASE)

    @staticmethod
    def key(message_id: str) -> str:
        return PREFIX + message_id

    async def claim(
        self,
        message_id: str,
        owner: str,
        *,
        takeover: bool = False,
        released: Sequence[str] = (),
    ) -> Record | None:
        """Takes the message for this attempt; returns the blocking record if it can't.

        With `takeover` (policy `retry`) an ambiguous record is taken over; without it a
        stale `data` record is turned into `uncertain` and returned. `released` names the
        earlier attempts of this same task, known to have left nothing at the relay: all of
        them, because each failed write of ours may or may not have landed, so any of them
        may own the record."""
        raw = await self._claim(
            keys=[self.key(message_id)],
            args=[owner, self.claim_ttl_ms, "1" if takeover else "0", self.ttl, *released],
        )
        return None if raw is None else Record.parse(raw)

    async def begin_data(self, message_id: str, owner: str, window: float) -> bool:
        """`claimed` -> `data`, just before the terminator; False if the claim is not ours.

        `window`: the longest this attempt can wait for the final reply (plus a margin). Until
        then a copy that finds `data` waits (the attempt is alive); after it, the sender is
        known to have died inside the ambiguous window."""
        return bool(await self._data(keys=[self.key(message_id)], args=[owner, self.ttl, window]))

    async def settle(self, message_id: str, owner: str, state: str, reply: str = "") -> bool:
        """`sent` (always: the relay's 250 is the truth), `failed` or `uncertain` (if ours)."""
        return bool(
            await self._settle(
                keys=[self.key(message_id)], args=[owner, state, reply[:200], self.ttl]
            )
        )

    async def get(self, message_id: str) -> Record | None:
        raw = await self.redis.get(self.key(message_id))
        return None if raw is None else Record.parse(raw)

    async def release(self, message_id: str, owner: str) -> None:
        """Forgets our attempt when the relay certainly does not have the message (failed before
        the terminator, or a definite 4xx/421 reply to it), so a retry may send at once."""
        await self._release(keys=[self.key(message_id)], args=[owner])
