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

The scripts are `workers/state/lua/lease_*.lua`; renewal and fencing are `LeaseKeeper`'s
(workers/state/keeper.py); the keys are listed in workers/state/keys.py and docs/redis-keys.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers.state import keys, scripts

log = logging.getLogger("mailer.semaphore")

GLOBAL_LIMIT = "smtp"
#: + relay name: the limit of a named relay's own cap (`Limit.for_relay`).
RELAY_LIMIT_PREFIX = "relay:"
DEFAULT_PREFIX = keys.LEASE_PREFIX
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

    @classmethod
    def for_relay(cls, relay: str, cap: int) -> Limit:
        """A named relay's own cap, held together with the fleet-wide one."""
        return cls(f"{RELAY_LIMIT_PREFIX}{relay}", cap)


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
    use the same TTL fleet-wide. `wakeups`: a subscription shared with the process's other
    semaphores on the same prefix (one per relay: one pub/sub connection for all of them).
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
        wakeups: ReleaseWakeups | None = None,
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
        self.channel = keys.lease_released(prefix)
        self.epoch_key = keys.lease_epoch(prefix)
        self.quarantine_key = keys.lease_quarantine(prefix)
        self._grace_ms = int(self.ttl * 1000) if restart_grace else 0
        self._limit_keys: list[str] = []
        for lim in self.limits:
            self._limit_keys += [
                keys.lease_holders(lim.name, prefix),
                keys.lease_meta(lim.name, prefix),
            ]
        wanted = [keys.lease_wanted(lim.name, prefix) for lim in self.limits]
        self._keys = [*self._limit_keys, *wanted, self.epoch_key]  # for renew
        self.waiting_key = keys.lease_waiting(prefix)
        self._acquire_keys = [*self._keys, self.quarantine_key, self.waiting_key]
        self._release_keys = [*self._limit_keys, self.waiting_key]
        self._contended_until = 0.0
        self._ttl_ms = int(self.ttl * 1000)
        self._acquire_script = redis.register_script(scripts.source("lease_acquire"))
        self._renew_script = redis.register_script(scripts.source("lease_renew"))
        self._release_script = redis.register_script(scripts.source("lease_release"))
        if wakeups is not None and wakeups.channel != self.channel:
            raise ValueError("shared wake-ups must listen on this prefix's channel")
        self._owns_wakeups = wakeups is None
        self.wakeups = wakeups if wakeups is not None else ReleaseWakeups(redis, self.channel)
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
                subscribed = self.wakeups.subscribed
                cap = BACKOFF_CAP_SUBSCRIBED if subscribed else BACKOFF_CAP
                if subscribed:  # releases wake us: polling starts slow
                    backoff = max(backoff, BACKOFF_CAP)
                delay = min(min(backoff, cap) * random.uniform(0.5, 1.0), deadline - now)
                if hint is not None:
                    delay = min(delay, hint + 0.002)
                backoff = min(backoff * 2, cap)
                if last_error is not None:
                    await asyncio.sleep(delay)
                    continue
                if waiter is None:
                    waiter = self.wakeups.add(self)
                await asyncio.wait([waiter], timeout=delay)
                if waiter.done():  # woken: re-register before the next attempt, not after it
                    waiter = self.wakeups.add(self)
        except BaseException:
            if in_doubt:
                self._spawn(self._forget(lease_id))
            raise
        finally:
            if waiter is not None:
                self.wakeups.remove(self, waiter)
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

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop pending clean-ups and the wake-up subscription if it is this semaphore's own
        (a shared one is closed by its owner). The client stays open."""
        tasks = [t for t in self._background if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_wakeups:
            await self.wakeups.close()


class ReleaseWakeups:
    """The wake-up subscription of one process to release notices (`{prefix}released`),
    shared by every semaphore on that prefix: a worker with a semaphore per relay holds one
    pub/sub connection, not one per relay, and only while someone waits.

    A notice does not say which limit freed a slot, so each semaphore with waiters wakes its
    own (one per freed slot, with probability WAKE_FANOUT / processes): a relay at its own cap
    may wake for another relay's release and find nothing, at the cost of one acquire call;
    never the other way round (a slot freed for it is always heard)."""

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self._waiters: dict[object, deque[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = False  # the subscription is up: waiters may poll rarely

    def add(self, owner: object) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(owner, deque()).append(fut)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name=f"lease-wakeups:{self.channel}"
            )
        return fut

    def remove(self, owner: object, fut: asyncio.Future[None]) -> None:
        queue = self._waiters.get(owner)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(fut)
        if not queue:
            del self._waiters[owner]

    @property
    def waiting_semaphores(self) -> int:
        """How many semaphores have a waiter now."""
        return sum(1 for queue in list(self._waiters.values()) if queue)

    def wake(self, freed: int, processes: int = 1) -> None:
        """Wake local waiters (FIFO per semaphore) for `freed` slots: one per slot if few
        processes wait, else each slot with probability WAKE_FANOUT / processes (every process
        hears every release). A slot nobody takes is found by the waiters' polling."""
        share = min(1.0, WAKE_FANOUT / max(1, processes))
        for owner, queue in list(self._waiters.items()):
            count = sum(1 for _ in range(freed) if share >= 1.0 or random.random() < share)
            while count > 0 and queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)
                    count -= 1
            if not queue:
                del self._waiters[owner]

    async def _listen(self) -> None:
        """Relay `released` messages to waiters while any exist; backoff covers lost messages."""
        pause = 0.05
        idle_since: float | None = None
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed = True
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
                        self.wake(*_release_notice(msg.get("data")))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed = False
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
        self.subscribed = False
        if self._listener is asyncio.current_task():
            self._listener = None

    async def close(self) -> None:
        """Stop the subscription (if any)."""
        task, self._listener = self._listener, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.subscribed = False


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
