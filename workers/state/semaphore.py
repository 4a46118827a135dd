"""A fleet-wide counting semaphore of expiring leases in Redis (one lease = one SMTP connection).

Why it is shaped this way (docs/semaphore.md has the whole design):

- Every operation is one Lua script that reads the clock with `redis.call('TIME')`, so host clocks
  never matter and no two acquirers can both see a free slot.
- A lease is a ZSET member scored by its expiry; a crashed holder's leases simply expire.
- A holder fences itself: it stamps `t0 = time.monotonic()` before sending an acquire or renew and
  trusts the lease only until `t0 + ttl - margin`. The server's expiry is measured from a moment
  after `t0`, so the holder stops before the server can give the slot to anyone else.
- `{prefix}epoch` is a random token written once; if it vanishes or changes (Redis came back empty)
  every lease taken under the old token is lost, even if its id still looks alive.
- A Redis that persists nothing (no AOF) forgets every lease when it restarts, while their holders
  may still be connected until their next renewal. So when the epoch must be created on such a
  Redis less than a TTL after it started, nothing is granted until a TTL after its start
  (`{prefix}quarantine`): by then every forgotten lease has lapsed at its holder. With AOF the
  epoch survives restarts and there is no pause (a fresh AOF Redis is a first start).
- Fail closed: without Redis there is no lease.
- What no lease can fence: a frozen holder (SIGSTOP, a paused VM) cannot close its sockets, and
  the relay counts them until its own idle timeout drops them. For a hard cap that timeout must
  be shorter than `ttl - renew_interval` (tests/e2e/test_fleet_cap.py shows both cases), or the cap
  needs headroom for such zombies.

Keys, per named limit (`smtp` for the fleet, `host:{hostname}` for an optional per-host cap):
`{prefix}{name}:holders` ZSET lease id -> expiry (ms, Redis time); `{prefix}{name}:meta` HASH
lease id -> JSON {host, pid, acquired_ms}; plus `{prefix}epoch` (STRING) and the pub/sub channel
`{prefix}released` ("<slots freed> <processes waiting>") that wakes waiters; `{prefix}quarantine`
(STRING with an expiry) while a restart of a non-persistent Redis holds back new leases;
`{prefix}{name}:wanted` (STRING, expires after a TTL) set whenever someone found the limit full,
so holders give idle connections back early; `{prefix}waiting` (ZSET "host:pid" -> last failed
acquire, ms) so that a release wakes a few waiting processes rather than all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("mailer.semaphore")

GLOBAL_LIMIT = "smtp"
DEFAULT_PREFIX = "mailer:sem:"
MIN_TTL = 2.0
BACKOFF_START = 0.02
BACKOFF_CAP = 1.0
# While the wake-up subscription is up, every release reaches the waiters and the expiry hint
# covers crashed holders, so polling is only a safety net: with thousands of waiters a 1 s poll
# would be most of the lease traffic in Redis (bench/lease_scale.py).
BACKOFF_CAP_SUBSCRIBED = 5.0
# A freed slot wakes a waiter in about this many of the processes waiting (not in all of them:
# with N waiting processes every release cost N acquire attempts, all but one in vain).
WAKE_FANOUT = 3
WAITING_MEMORY_MS = 10_000  # a process that failed to acquire counts as waiting this long
MIN_CALL_TIMEOUT = 0.5  # even a "try once" acquire gets this long to hear Redis' answer
LISTENER_LINGER = 5.0  # keep the wake-up subscription this long after the last waiter left

# Errors after which Redis may come back (restart, failover, network blip): retry, never hand out.
_TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    TimeoutError,
    OSError,
)

# Shared prologue: server time in ms.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: holders_1, meta_1, ..., holders_n, meta_n, wanted_1..wanted_n, epoch, quarantine,
# waiting. ARGV: id, ttl_ms, host, pid, new_epoch, grace_ms, cap_1..cap_n. Returns
# {1, ttl_ms, epoch} on success, else {0, ms until the earliest expiry among the full limits or
# the end of the quarantine (-1 if unknown), epoch}. A full limit is marked wanted for a TTL,
# which renewals report to holders so they stop keeping idle connections (see
# LeaseSemaphore.contended), and the process is noted in `waiting` (see _RELEASE).
_ACQUIRE = (
    _NOW
    + """
local n = (#KEYS - 3) / 3
local id = ARGV[1]
local expiry = now + tonumber(ARGV[2])
local ekey, qkey = KEYS[#KEYS - 2], KEYS[#KEYS - 1]
local quarantine = redis.call('PTTL', qkey)
if quarantine > 0 then
  return {0, quarantine, redis.call('GET', ekey) or ''}
end
local epoch = redis.call('GET', ekey)
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', ekey, epoch)
  local grace = tonumber(ARGV[6])
  if grace > 0 then
    -- No epoch: a first start, or a restart that lost everything. Without AOF, and started
    -- less than grace ago, holders of forgotten leases may still be connected: wait them out.
    local info = redis.call('INFO', 'persistence') .. redis.call('INFO', 'server')
    local aof = string.match(info, 'aof_enabled:(%d)')
    local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
    if aof == '0' and up and up * 1000 < grace then
      local wait = grace - up * 1000
      redis.call('SET', qkey, epoch, 'PX', wait)
      return {0, wait, epoch}
    end
  end
end
for i = 1, n do
  local h, m = KEYS[2 * i - 1], KEYS[2 * i]
  local expired = redis.call('ZRANGEBYSCORE', h, '-inf', now)
  if #expired > 0 then
    for j = 1, #expired, 1000 do
      redis.call('HDEL', m, unpack(expired, j, math.min(j + 999, #expired)))
    end
    redis.call('ZREMRANGEBYSCORE', h, '-inf', now)
  end
end
-- A retry of an attempt whose reply was lost: the lease is already ours, just extend it.
if redis.call('ZSCORE', KEYS[1], id) then
  for i = 1, n do
    redis.call('ZADD', KEYS[2 * i - 1], 'XX', 'GT', expiry, id)
  end
  return {1, tonumber(ARGV[2]), epoch}
end
local wait = -1
local full = false
for i = 1, n do
  local h = KEYS[2 * i - 1]
  if redis.call('ZCARD', h) >= tonumber(ARGV[6 + i]) then
    full = true
    redis.call('SET', KEYS[2 * n + i], now, 'PX', ARGV[2])
    local first = redis.call('ZRANGE', h, 0, 0, 'WITHSCORES')
    if #first > 0 then
      wait = math.max(wait, tonumber(first[2]) - now)
    end
  end
end
if full then
  redis.call('ZADD', KEYS[#KEYS], now, ARGV[3] .. ':' .. ARGV[4])
  return {0, wait, epoch}
end
local meta = cjson.encode({host = ARGV[3], pid = tonumber(ARGV[4]), acquired_ms = now})
for i = 1, n do
  redis.call('ZADD', KEYS[2 * i - 1], expiry, id)
  redis.call('HSET', KEYS[2 * i], id, meta)
end
return {1, tonumber(ARGV[2]), epoch}
"""
)

# KEYS: holders/meta pairs, wanted_1..wanted_n, epoch. ARGV: ttl_ms, id_1, epoch_1, id_2, ...
# Returns {current epoch or false, ms the fleet stays contended (<= 0: not), lost ids...}.
# A lease is extended only if it is still unexpired in every limit and its epoch is current:
# an expired lease may already belong to someone else, so it is never resurrected.
_RENEW = (
    _NOW
    + """
local n = (#KEYS - 1) / 3
local expiry = now + tonumber(ARGV[1])
local epoch = redis.call('GET', KEYS[#KEYS])
local wanted = -2
for i = 1, n do
  wanted = math.max(wanted, redis.call('PTTL', KEYS[2 * n + i]))
end
local out = {epoch, wanted}
for j = 2, #ARGV, 2 do
  local id = ARGV[j]
  local alive = epoch and epoch == ARGV[j + 1]
  if alive then
    for i = 1, n do
      local s = redis.call('ZSCORE', KEYS[2 * i - 1], id)
      if not s or tonumber(s) <= now then
        alive = false
        break
      end
    end
  end
  if alive then
    for i = 1, n do
      redis.call('ZADD', KEYS[2 * i - 1], 'XX', 'GT', expiry, id)
    end
  else
    out[#out + 1] = id
  end
end
return out
"""
)

# KEYS: holders/meta pairs, waiting. ARGV: channel, memory_ms, ids... Idempotent. Publishes
# "<slots freed> <processes waiting>" (processes that failed to acquire within memory_ms), so
# that each waiting process wakes a waiter for a freed slot only with probability ~FANOUT/N.
_RELEASE = (
    _NOW
    + """
local removed = 0
for i = 1, #KEYS - 1, 2 do
  local r = redis.call('ZREM', KEYS[i], unpack(ARGV, 3))
  redis.call('HDEL', KEYS[i + 1], unpack(ARGV, 3))
  if r > removed then removed = r end
end
if removed > 0 then
  local waiting = KEYS[#KEYS]
  redis.call('ZREMRANGEBYSCORE', waiting, '-inf', now - tonumber(ARGV[2]))
  redis.call('PUBLISH', ARGV[1], removed .. ' ' .. redis.call('ZCARD', waiting))
end
return removed
"""
)


class SemaphoreUnavailable(RedisConnectionError):
    """Redis could not be reached before the deadline: no lease is handed out (fail closed).

    A `redis.exceptions.ConnectionError` (hence a `RedisError`), so callers that already treat
    Redis outages as retryable need nothing new.
    """


@dataclass(frozen=True)
class Limit:
    """A named cap on concurrent leases. The same name must carry the same cap fleet-wide."""

    name: str
    cap: int

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"bad limit name {self.name!r}")
        if self.cap < 0:
            raise ValueError(f"limit {self.name!r}: cap must be >= 0")

    @classmethod
    def for_host(cls, hostname: str, cap: int) -> Limit:
        """The optional per-host cap (`MAILER_MAX_CONNECTIONS_PER_HOST`)."""
        return cls(f"host:{hostname}", cap)


@dataclass(eq=False)
class Lease:
    """One slot. Use its connection only while `time.monotonic() < valid_until`.

    `valid_until` is moved forward by every successful renewal and set to 0 when the lease is
    found lost or is released, so a stale reference can never look valid.
    """

    id: str
    valid_until: float
    epoch: str = ""
    released: bool = field(default=False, repr=False)

    def remaining(self, now: float | None = None) -> float:
        """Seconds this holder may still use the connection (<= 0: stop now)."""
        return self.valid_until - (time.monotonic() if now is None else now)

    @property
    def valid(self) -> bool:
        return self.remaining() > 0


def parse_lease_id(lease_id: str) -> tuple[str, str]:
    """`host:pid:hex` -> (host, "host:pid"), for grouping in status output."""
    parts = lease_id.rsplit(":", 2)
    if len(parts) < 3:
        return lease_id, f"{lease_id}:?"
    return parts[0], f"{parts[0]}:{parts[1]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LeaseSemaphore:
    """Acquire, renew and release leases on all `limits` at once (asyncio; one event loop).

    The Redis client is borrowed: `close()` stops only the wake-up subscription this object
    may have started, never the client. `restart_grace` (on by default) holds back new leases
    for up to a TTL after a non-persistent Redis restarted empty (see the module docstring);
    use the same TTL fleet-wide.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        limits: Sequence[Limit],
        ttl: float,
        *,
        host: str,
        prefix: str = DEFAULT_PREFIX,
        op_timeout: float = 5.0,
        restart_grace: bool = True,
    ) -> None:
        if not limits:
            raise ValueError("at least one limit is required")
        if len({lim.name for lim in limits}) != len(limits):
            raise ValueError("limit names must be distinct")
        if ttl < MIN_TTL:
            raise ValueError(f"ttl must be >= {MIN_TTL} s (the fencing margin alone is 1 s)")
        if not host or ":" in host or any(c.isspace() for c in host):
            raise ValueError(f"bad host name {host!r}")
        self.redis = redis
        self.limits: tuple[Limit, ...] = tuple(limits)
        self.ttl = float(ttl)
        self.host = host
        self.prefix = prefix
        self.op_timeout = op_timeout
        self.margin = max(1.0, 0.1 * self.ttl)
        # Renew often enough that a lease acquired right after a round is renewed well in time.
        self.renew_interval = min(self.ttl / 3, (self.ttl - self.margin) / 2)
        self.channel = f"{prefix}released"
        self.epoch_key = f"{prefix}epoch"
        self.quarantine_key = f"{prefix}quarantine"
        self._grace_ms = int(self.ttl * 1000) if restart_grace else 0
        self._limit_keys: list[str] = []
        for lim in self.limits:
            self._limit_keys += [f"{prefix}{lim.name}:holders", f"{prefix}{lim.name}:meta"]
        wanted = [f"{prefix}{lim.name}:wanted" for lim in self.limits]
        self._keys = [*self._limit_keys, *wanted, self.epoch_key]  # for renew
        self.waiting_key = f"{prefix}waiting"
        self._acquire_keys = [*self._keys, self.quarantine_key, self.waiting_key]
        self._release_keys = [*self._limit_keys, self.waiting_key]
        self._contended_until = 0.0
        self._ttl_ms = int(self.ttl * 1000)
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._renew_script = redis.register_script(_RENEW)
        self._release_script = redis.register_script(_RELEASE)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = False  # the wake-up subscription is up: waiters may poll rarely
        self._background: set[asyncio.Task[Any]] = set()

    # -- acquire -----------------------------------------------------------------------------

    async def acquire(self, deadline: float) -> Lease | None:
        """A lease on every limit, waiting until `deadline` (a `time.monotonic()` value).

        Returns None if the limits stayed full until the deadline; raises `SemaphoreUnavailable`
        if Redis could not be reached by then. Waits with jittered exponential backoff (from
        20 ms to 1 s; from 1 s to 5 s while the wake-up subscription is up), never past the
        earliest expiry in Redis, and wakes early when someone releases.
        """
        lease_id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        backoff = BACKOFF_START
        last_error: BaseException | None = None
        in_doubt = False  # an attempt may have taken the lease without us hearing the reply
        waiter: asyncio.Future[None] | None = None
        try:
            while True:
                t0 = time.monotonic()
                hint: float | None = None
                try:
                    async with asyncio.timeout(self._call_timeout(deadline - t0)):
                        in_doubt = True
                        reply = await self._acquire_script(
                            keys=self._acquire_keys,
                            args=[
                                lease_id,
                                self._ttl_ms,
                                self.host,
                                os.getpid(),
                                uuid.uuid4().hex,
                                self._grace_ms,
                                *(lim.cap for lim in self.limits),
                            ],
                        )
                except _TRANSIENT as exc:
                    (log.debug if last_error else log.warning)(
                        "lease acquire: Redis unavailable (%s); retrying", type(exc).__name__
                    )
                    last_error = exc
                else:
                    in_doubt = False
                    last_error = None
                    ok, value, epoch = int(reply[0]), int(reply[1]), _text(reply[2])
                    if ok:
                        return Lease(lease_id, t0 + self.ttl - self.margin, epoch)
                    hint = value / 1000 if value >= 0 else None
                    self._contended_until = max(self._contended_until, t0 + self.ttl)
                now = time.monotonic()
                if now >= deadline:
                    break
                cap = BACKOFF_CAP_SUBSCRIBED if self._subscribed else BACKOFF_CAP
                if self._subscribed:  # releases wake us: polling starts slow
                    backoff = max(backoff, BACKOFF_CAP)
                delay = min(min(backoff, cap) * random.uniform(0.5, 1.0), deadline - now)
                if hint is not None:
                    delay = min(delay, hint + 0.002)
                backoff = min(backoff * 2, cap)
                if last_error is not None:
                    await asyncio.sleep(delay)
                    continue
                if waiter is None:
                    waiter = self._add_waiter()
                await asyncio.wait([waiter], timeout=delay)
                if waiter.done():  # woken: re-register before the next attempt, not after it
                    waiter = self._add_waiter()
        except BaseException:
            if in_doubt:
                self._spawn(self._forget(lease_id))
            raise
        finally:
            if waiter is not None:
                self._remove_waiter(waiter)
        if in_doubt:
            await self._forget(lease_id)
        if last_error is not None:
            raise SemaphoreUnavailable(
                f"no lease: Redis unreachable until the deadline ({type(last_error).__name__})"
            ) from last_error
        return None

    def _call_timeout(self, remaining: float) -> float:
        return min(self.op_timeout, max(remaining, MIN_CALL_TIMEOUT))

    async def _forget(self, lease_id: str) -> None:
        """Best effort: give back a lease an unanswered acquire may have taken (else it expires)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.op_timeout):
                await self._release_script(
                    keys=self._release_keys, args=[self.channel, WAITING_MEMORY_MS, lease_id]
                )

    # -- release / renew -----------------------------------------------------------------------

    async def release(self, lease: Lease) -> None:
        """Give the slot back, after the connection's socket is closed. Idempotent.

        The lease is invalidated locally first. Redis errors propagate (the slot then frees
        itself at expiry).
        """
        lease.released = True
        lease.valid_until = 0.0
        async with asyncio.timeout(self.op_timeout):
            await self._release_script(
                keys=self._release_keys, args=[self.channel, WAITING_MEMORY_MS, lease.id]
            )

    async def renew(self, leases: Iterable[Lease]) -> set[str]:
        """Extend all `leases` in one call; returns the ids that are lost.

        Survivors get `valid_until = t0 + ttl - margin`; lost leases get 0. A lease is lost if
        it expired (it is never resurrected), was released, or the epoch changed. Redis errors
        propagate and change nothing.
        """
        batch = list(leases)
        if not batch:
            return set()
        args: list[str | int] = [self._ttl_ms]
        for lease in batch:
            args += [lease.id, lease.epoch]
        t0 = time.monotonic()
        async with asyncio.timeout(self.op_timeout):
            reply = await self._renew_script(keys=self._keys, args=args)
        epoch = None if reply[0] is None else _text(reply[0])
        if int(reply[1]) > 0:
            self._contended_until = max(self._contended_until, t0 + int(reply[1]) / 1000)
        lost = {_text(x) for x in reply[2:]}
        if any(lease.epoch != epoch for lease in batch):
            log.warning("lease epoch changed (Redis lost its data?): treating leases as lost")
        valid_until = t0 + self.ttl - self.margin
        for lease in batch:
            if lease.released or lease.id in lost:
                lease.valid_until = 0.0
            else:
                lease.valid_until = max(lease.valid_until, valid_until)
        return lost

    @property
    def contended(self) -> bool:
        """Someone in the fleet (or this process) found a limit of ours full within the last
        TTL, as of our last renewal or acquire: idle connections should give their leases back
        now rather than at the idle timeout."""
        return time.monotonic() < self._contended_until

    # -- status ------------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """What `mailer status` shows, read atomically with Redis' own clock.

        `{"epoch": str | None, "ttl_s": float, "quarantine_s": float, "limits": {name: {"cap",
        "held", "hosts": {host: n}, "processes": {"host:pid": n}, "oldest_age_s": float |
        None}}}`; `quarantine_s` > 0 while no lease is granted after an empty restart.
        Expired-but-unpruned entries are not counted.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.time()
            pipe.get(self.epoch_key)
            pipe.pttl(self.quarantine_key)
            for i in range(len(self.limits)):
                pipe.zrange(self._limit_keys[2 * i], 0, -1, withscores=True)
                pipe.hgetall(self._limit_keys[2 * i + 1])
            async with asyncio.timeout(self.op_timeout):
                res = await pipe.execute()
        sec, usec = res[0]
        now_ms = int(sec) * 1000 + int(usec) // 1000
        limits: dict[str, Any] = {}
        for i, lim in enumerate(self.limits):
            members, meta_raw = res[3 + 2 * i], res[4 + 2 * i]
            meta = {_text(k): v for k, v in meta_raw.items()}
            hosts: Counter[str] = Counter()
            procs: Counter[str] = Counter()
            oldest: int | None = None
            held = 0
            for member, score in members:
                if score <= now_ms:
                    continue
                held += 1
                lease_id = _text(member)
                host, proc = parse_lease_id(lease_id)
                info = _meta(meta.get(lease_id))
                if info:
                    host = str(info.get("host", host))
                    proc = f"{host}:{info.get('pid', proc.rsplit(':', 1)[-1])}"
                    acquired = info.get("acquired_ms")
                    if isinstance(acquired, int | float):
                        oldest = int(acquired) if oldest is None else min(oldest, int(acquired))
                hosts[host] += 1
                procs[proc] += 1
            limits[lim.name] = {
                "cap": lim.cap,
                "held": held,
                "hosts": dict(hosts),
                "processes": dict(procs),
                "oldest_age_s": None if oldest is None else max(0, now_ms - oldest) / 1000,
            }
        epoch = None if res[1] is None else _text(res[1])
        quarantine = max(0, int(res[2])) / 1000
        return {"epoch": epoch, "ttl_s": self.ttl, "quarantine_s": quarantine, "limits": limits}

    # -- wake-ups ------------------------------------------------------------------------------

    def _add_waiter(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name=f"lease-wakeups:{self.channel}"
            )
        return fut

    def _remove_waiter(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def _wake(self, freed: int, processes: int = 1) -> None:
        """Wake local waiters (FIFO) for `freed` slots: one per slot if few processes wait,
        else each slot with probability WAKE_FANOUT / processes (every process hears every
        release). A slot nobody takes is found by the waiters' polling."""
        share = min(1.0, WAKE_FANOUT / max(1, processes))
        count = sum(1 for _ in range(freed) if share >= 1.0 or random.random() < share)
        while count > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                count -= 1

    async def _listen(self) -> None:
        """Relay `released` messages to waiters while any exist; backoff covers lost messages."""
        pause = 0.05
        idle_since: float | None = None
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed = True
                pause = 0.05
                while True:
                    if self._waiters:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > LISTENER_LINGER:
                        self._listener_exiting()
                        return
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self._wake(*_release_notice(msg.get("data")))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._subscribed = False
                log.debug("lease wake-up subscription failed (%s)", type(exc).__name__)
                if not self._waiters:
                    self._listener_exiting()
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[attr-defined,unused-ignore]

    def _listener_exiting(self) -> None:
        # Forget this task synchronously so a waiter arriving now starts a fresh listener.
        self._subscribed = False
        if self._listener is asyncio.current_task():
            self._listener = None

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop the wake-up subscription (if any) and pending clean-ups. The client stays open."""
        tasks = [t for t in (self._listener, *self._background) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._listener = None


def _release_notice(data: Any) -> tuple[int, int]:
    """Parses a release notice, "<freed> <processes waiting>" (older: "<freed>")."""
    try:
        parts = [int(x) for x in _text(data).split()]
    except (TypeError, ValueError):
        return 1, 1
    return max(1, parts[0] if parts else 1), max(1, parts[1] if len(parts) > 1 else 1)


def _meta(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


OnLost = Callable[[Lease], Awaitable[None] | None]


class LeaseKeeper:
    """Keeps this process's leases alive from its event loop, and says when one is gone.

    Every `renew_interval` (<= ttl/3) all live leases are renewed in one call. A lease is lost
    when Redis says so (expired, released elsewhere, epoch changed) or when its `valid_until`
    passes without a successful renewal (Redis unreachable or slow). Then it is dropped from
    the keeper and `on_lost(lease)` is called exactly once. `on_lost` may be a plain function
    (keep it quick: abort the socket) or return an awaitable, which runs as its own task so a
    slow close never delays other renewals. The owner should still `release()` the lease once
    its socket is closed, which frees the slot early if Redis still holds it.
    Redis errors never stop the keeper: they are logged and the renewal is retried.
    """

    def __init__(
        self, semaphore: LeaseSemaphore, on_lost: OnLost, *, interval: float | None = None
    ) -> None:
        self.semaphore = semaphore
        self.on_lost = on_lost
        self.interval = semaphore.renew_interval if interval is None else interval
        self._leases: dict[str, Lease] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._callbacks: set[asyncio.Task[Any]] = set()

    @property
    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def add(self, lease: Lease) -> None:
        self._leases[lease.id] = lease
        self._wake.set()

    def discard(self, lease: Lease) -> None:
        """Stop renewing (call before `release`); no `on_lost` will follow for this lease."""
        self._leases.pop(lease.id, None)

    def start(self) -> None:
        """Start renewing; call from within the owning event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="lease-keeper")

    async def stop(self) -> None:
        """Stop renewing (leases are not released: their owners close and release them)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._callbacks:
            await asyncio.gather(*self._callbacks, return_exceptions=True)

    async def _run(self) -> None:
        next_renew = time.monotonic() + self.interval
        retry = BACKOFF_START * 5
        while True:
            now = time.monotonic()
            for lease in [le for le in self._leases.values() if le.valid_until <= now]:
                log.warning("lease %s not renewed in time: fencing its connection", lease.id)
                self._lose(lease)
            if now >= next_renew:
                if await self._renew_once():
                    next_renew = time.monotonic() + self.interval
                    retry = BACKOFF_START * 5
                else:
                    next_renew = time.monotonic() + min(retry, self.interval)
                    retry = min(retry * 2, self.interval)
                continue
            earliest = min((le.valid_until for le in self._leases.values()), default=math.inf)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(next_renew, earliest) - now)):
                    await self._wake.wait()

    async def _renew_once(self) -> bool:
        batch = list(self._leases.values())
        if not batch:
            return True
        # Give up on the call by the time the first lease would lapse, so fencing is never late.
        budget = min(le.valid_until for le in batch) - time.monotonic()
        try:
            async with asyncio.timeout(max(0.05, budget)):
                lost = await self.semaphore.renew(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("lease renewal failed (%s: %s); retrying", type(exc).__name__, exc)
            return False
        for lease in batch:
            if lease.id in lost and self._leases.get(lease.id) is lease:
                log.warning("lease %s lost: fencing its connection", lease.id)
                self._lose(lease)
        return True

    def _lose(self, lease: Lease) -> None:
        self._leases.pop(lease.id, None)
        lease.valid_until = 0.0
        try:
            result = self.on_lost(lease)
        except Exception:
            log.exception("on_lost failed for lease %s", lease.id)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._callbacks.add(task)
            task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._callbacks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_lost failed: %s", type(task.exception()).__name__)
