"""A relay's trouble run, fleet-wide: since when it has failed transiently (refused, reset or
timed-out connections, 4xx that are not throttling) with no success in between. The failover
router (workers/engine/failover.py) sends a lane elsewhere once the run is older than the
relay's `failover_after`; what counts as transient is decided there.

One key per relay (`keys.for_relay(relay, keys.TROUBLE)`): the UNIX time the run began, set
with SET NX by the first failure of a run, its TTL renewed by later failures, deleted by a
success. The TTL ends a run that nothing renews: a relay that stopped failing (or stopped being
used) is not in trouble forever. Every process reads the key at most once per `max_age` (half a
second) per relay, however many messages ask, and writes it only when its view says it must.
Redis errors never reach the caller: a routing decision falls back to the last value seen.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import redis
import redis.asyncio as aioredis

from workers.state import keys

log = logging.getLogger("mailer.trouble")

#: Seconds between two warnings about an unreachable Redis (per process).
_WARN_EVERY = 10.0


class TroubleRuns:
    """Per relay: the start of its current trouble run (None: no run), cached per process."""

    def __init__(self, client: aioredis.Redis, *, ttl: float = 120.0, max_age: float = 0.5) -> None:
        if ttl <= 0 or max_age < 0:
            raise ValueError("ttl must be > 0 and max_age >= 0")
        self.redis = client
        self.ttl = ttl
        self.max_age = max_age
        self._seen: dict[str, tuple[float, float | None]] = {}  # relay -> (monotonic, since)
        self._reads: dict[str, asyncio.Future[float | None]] = {}
        self._renewed: dict[str, float] = {}  # relay -> monotonic time of our last write
        self._writing: set[str] = set()
        self._probed: dict[str, float] = {}
        self._warned = -math.inf

    @staticmethod
    def key(relay: str) -> str:
        return keys.for_relay(relay, keys.TROUBLE)

    @staticmethod
    def probe_key(relay: str) -> str:
        return keys.for_relay(relay, keys.TROUBLE_PROBE)

    def _fresh(self, relay: str, now: float) -> tuple[float, float | None] | None:
        seen = self._seen.get(relay)
        return seen if seen is not None and now - seen[0] < self.max_age else None

    async def since(self, relay: str) -> float | None:
        """The UNIX time `relay`'s current run began, or None. One GET per relay per process
        per `max_age` (concurrent callers share it); on a Redis error, the last value seen."""
        seen = self._fresh(relay, time.monotonic())
        if seen is not None:
            return seen[1]
        read = self._reads.get(relay)
        if read is None:
            read = self._reads[relay] = asyncio.ensure_future(self._read(relay))
            read.add_done_callback(lambda _: self._reads.pop(relay, None))
        return await asyncio.shield(read)

    async def _read(self, relay: str) -> float | None:
        try:
            raw = await self.redis.get(self.key(relay))
            since = None if raw is None else float(raw)
        except (redis.RedisError, OSError, ValueError) as exc:
            self._warn("read", exc)
            old = self._seen.get(relay)
            since = None if old is None else old[1]
        self._seen[relay] = (time.monotonic(), since)
        return since

    def known_clear(self, relay: str) -> bool:
        """This process saw no run of `relay` less than `max_age` ago (no Redis call)."""
        seen = self._fresh(relay, time.monotonic())
        return seen is not None and seen[1] is None

    def must_write(self, relay: str) -> bool:
        """Whether a failure of `relay` has anything to write: no run known, or ours is due
        for renewal (every quarter TTL per process), and no write of ours under way."""
        if relay in self._writing:
            return False
        now = time.monotonic()
        seen = self._fresh(relay, now)
        known = seen is not None and seen[1] is not None
        return not known or now - self._renewed.get(relay, -math.inf) >= self.ttl / 4

    async def failed(self, relay: str) -> None:
        """A transient failure of `relay`: begins its run (SET NX) or renews the run's TTL.
        Written once per run and then at most every quarter TTL by each process, not per
        failure (see `must_write`)."""
        if not self.must_write(relay):
            return
        self._writing.add(relay)
        try:
            key, ttl_ms = self.key(relay), int(self.ttl * 1000)
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(key, repr(time.time()), nx=True, px=ttl_ms)
            pipe.pexpire(key, ttl_ms)
            pipe.get(key)
            _, _, raw = await pipe.execute()
            since = None if raw is None else float(raw)
            done = time.monotonic()
            self._seen[relay] = (done, since)
            self._renewed[relay] = done
        except (redis.RedisError, OSError, ValueError) as exc:
            self._warn("write", exc)
        finally:
            self._writing.discard(relay)

    async def succeeded(self, relay: str) -> None:
        """A success of `relay` ends its run. Costs no Redis call while the (cached) view shows
        no run, which is nearly always."""
        if await self.since(relay) is None or relay in self._writing:
            return
        self._writing.add(relay)
        try:
            await self.redis.delete(self.key(relay))
            self._seen[relay] = (time.monotonic(), None)
            self._renewed.pop(relay, None)
        except (redis.RedisError, OSError) as exc:
            self._warn("write", exc)
        finally:
            self._writing.discard(relay)

    async def try_probe(self, relay: str, interval: float) -> bool:
        """True for one caller in the fleet per `interval` seconds (SET NX PX, as the circuit
        breaker's probe); each process asks Redis at most once per `max_age` per relay."""
        now = time.monotonic()
        if now - self._probed.get(relay, -math.inf) < self.max_age:
            return False
        self._probed[relay] = now
        try:
            return bool(
                await self.redis.set(self.probe_key(relay), "1", nx=True, px=int(interval * 1000))
            )
        except (redis.RedisError, OSError) as exc:
            self._warn("probe", exc)
            return False

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning(
                "trouble run %s failed (%s); routing uses what it saw last",
                what,
                type(exc).__name__,
            )
