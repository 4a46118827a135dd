"""Everything one worker process owns: its loop thread, Redis clients, lease keeper, session
pool, ledger, dead letters and circuit breaker. Built lazily, once per process (after fork),
and torn down on worker shutdown.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import redis

from mailer import redisconn
from mailer.config import Settings
from mailer.wire import group_of, ignores_suppressions, lane_of
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.loop import LoopThread
from workers.engine.pool import LeaseLike, PoolStats, SessionPool
from workers.engine.session import wire_body
from workers.engine.shaper import Shaper
from workers.observe import metrics
from workers.observe.logs import log_event
from workers.state.circuit import Circuit
from workers.state.deadletters import DeadLetters
from workers.state.keeper import LeaseKeeper
from workers.state.ledger import Ledger
from workers.state.lifecycle import StatusWriter
from workers.state.ratelimit import CONNECT_KEY, RateLimiter
from workers.state.semaphore import LeaseSemaphore, Limit
from workers.state.suppressions import SuppressionCheck

log = logging.getLogger("mailer.worker")
T = TypeVar("T")


@dataclass
class Result:
    """What became of one delivery attempt."""

    status: str  # sent | duplicate | held | failed | cancelled | suppressed | not_started
    reply: str = ""
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


_orphans: set[asyncio.Future[Any]] = set()


async def _unless(
    stop: asyncio.Event,
    coro: Coroutine[Any, Any, T | None],
    orphan: Callable[[T], Awaitable[Any]],
) -> T | None:
    """`coro`'s result, or None if `stop` is set first (then `coro` is cancelled). A result
    that arrives when nobody will use it (we were cancelled, or `stop` won) goes to `orphan`."""
    if stop.is_set():
        coro.close()
        return None
    task = asyncio.ensure_future(coro)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.add_done_callback(lambda done: _adopt(done, orphan))
        task.cancel()
        raise
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    await _cancel(task)
    _adopt(task, orphan)
    return None


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancels `task` and waits until it ends, cancelling again while it runs: Python 3.11's
    `asyncio.wait_for` (redis-py connects through it) drops a cancellation that lands just as
    what it waits for completes (CPython gh-86296), and one lost cancel would leave an acquire
    polling until its deadline."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)


def _adopt(done: asyncio.Future[T | None], orphan: Callable[[T], Awaitable[Any]]) -> None:
    result = None if done.cancelled() or done.exception() is not None else done.result()
    if result is None:
        return
    follow = asyncio.ensure_future(orphan(result))
    _orphans.add(follow)
    follow.add_done_callback(_orphans.discard)


def _outcome(result: object) -> Result | Failure:
    """An attempt's result or exception as an outcome: anything unexpected is a reconnect."""
    if isinstance(result, Result | Failure):
        return result
    name = type(result).__name__
    return Failure(Kind.RECONNECT, None, f"unexpected {name}", Phase.CONNECT)


def _unavailable(exc: BaseException, phase: Phase) -> Failure:
    """Our Redis (ledger) failed before anything reached the relay: wait, spend no attempt."""
    return Failure(Kind.UNAVAILABLE, None, f"ledger unavailable ({type(exc).__name__})", phase)


async def _quietly(step: Awaitable[Any]) -> bool:
    """A ledger write after the relay answered: never turn its outcome into an error."""
    try:
        await step
    except (redis.RedisError, OSError) as exc:
        log.warning(
            "ledger write failed (%s); the record will lapse or be resolved on redelivery",
            type(exc).__name__,
        )
        return False
    return True


class _Leases:
    """Adapts the semaphore to the pool: every lease handed out is renewed by the keeper."""

    def __init__(self, semaphore: LeaseSemaphore, keeper: LeaseKeeper) -> None:
        self.semaphore = semaphore
        self.keeper = keeper
        self.draining = asyncio.Event()  # set at shutdown: waiting for a lease is pointless

    async def acquire(self, deadline: float) -> LeaseLike | None:
        started = time.monotonic()
        try:
            lease = await _unless(self.draining, self.semaphore.acquire(deadline), self.release)
        except (redis.RedisError, OSError) as exc:  # fail closed: no lease without Redis
            log.warning("lease acquire failed: %s", type(exc).__name__)
            return None
        if lease is not None:
            self.keeper.add(lease)
            log_event("lease_acquired", lease=lease.id, waited_s=time.monotonic() - started)
        return lease

    @property
    def contended(self) -> bool:
        return self.semaphore.contended

    async def release(self, lease: LeaseLike) -> None:
        self.keeper.discard(lease)  # type: ignore[arg-type]
        log_event("lease_released", lease=lease.id)
        try:
            await self.semaphore.release(lease)  # type: ignore[arg-type]
        except (redis.RedisError, OSError):
            log.warning("lease release failed; it will expire by itself")


#: Attempts in flight per session of the process (see `Runtime.gate`).
ATTEMPTS_PER_SESSION = 2


class Gate:
    """A counting semaphore whose waiters are served by rank (a lane's priority: 0 first), then
    in arrival order: a transactional attempt takes the next free slot, not the one after every
    attempt of a bulk batch already waiting. A freed slot is handed to the waiter directly."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    def locked(self) -> bool:
        return self._free <= 0

    async def acquire(self, rank: int = 0) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            raise
        return True

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


#: A message the relay throttles waits for the fleet's rate again, in this process, this many
#: times before it goes back to the queue (still without spending an attempt).
THROTTLED_TRIES = 10


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings.require_relay()
        self.pid = os.getpid()
        self.sync_redis = redisconn.client(settings.redis_url, settings, socket_timeout=10)
        self.dead = DeadLetters(self.sync_redis)
        self.circuit = Circuit(
            self.sync_redis, settings.circuit_probe_interval, settings.quota_probe_interval
        )
        self.loop = LoopThread(kind=settings.event_loop)
        self._started: set[asyncio.Task[Result]] = set()  # the loop keeps only weak references
        #: Attempts of batch tasks started and not ended (running, or waiting for a session):
        #: part of what workers/strategy.py `room` counts; `on_room` runs as each one ends.
        self.backlog = 0
        self.on_room: Callable[[], None] | None = None
        self._ranks = {lane.name: rank for rank, lane in enumerate(settings.lanes)}
        self.loop.run(self._start())

    async def _start(self) -> None:
        s = self.settings
        # The ledger's client blocks rather than raising when busy (see the lease client below);
        # `adeliver` runs at most `worker_connections` attempts at once, each one call at a time.
        self.redis = redisconn.async_client(
            s.redis_url,
            s,
            max_connections=s.worker_connections + 8,
            timeout=10.0,
            socket_timeout=max(2.0, s.lease_ttl / 6),
            socket_connect_timeout=2.0,
        )
        limits = [Limit("smtp", s.max_connections)]
        if s.max_connections_per_host:
            limits.append(Limit(f"host:{s.hostname}", s.max_connections_per_host))
        # Leases get a client of their own, blocking rather than raising when busy: a burst of
        # ledger calls (redis-py's asyncio pool raises MaxConnectionsError past 100) must never
        # fail an acquire or delay a renewal. Lease commands take well under a millisecond, so a
        # few connections serve every acquire and release of the process (they queue), and a
        # fleet of hundreds of processes stays far below Redis' maxclients (10,000).
        self.lease_redis = redisconn.async_client(
            s.redis_url,
            s,
            max_connections=min(32, 2 * s.worker_connections + 4),
            timeout=5.0,
            socket_timeout=max(2.0, s.lease_ttl / 6),
            socket_connect_timeout=2.0,
        )
        self.semaphore = LeaseSemaphore(self.lease_redis, limits, s.lease_ttl, host=s.hostname)
        self.keeper = LeaseKeeper(self.semaphore, on_lost=self._on_lease_lost)
        self.leases = _Leases(self.semaphore, self.keeper)
        self.shaper = Shaper(s, RateLimiter(self.redis), RateLimiter(self.redis, CONNECT_KEY))
        self.pool = SessionPool(s, self.leases, self.shaper)
        self.ledger = Ledger(
            self.redis,
            ttl=s.ledger_ttl,
            claim_ttl=3 * s.smtp_timeout + 10,
            replicas=s.wait_replicas,
        )
        self.status = StatusWriter(self.redis, s.ledger_ttl)
        self.suppressions = SuppressionCheck(self.redis)
        self.keeper.start()
        self.pool.start()

    def drain(self) -> None:
        """Shutdown begins (safe from a signal handler): tasks waiting for a lease stop waiting
        and go back to the queue; transactions in flight carry on."""
        self.loop.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.leases.draining.set()
        self.shaper.close()

    def _on_lease_lost(self, lease: Any) -> Coroutine[Any, Any, None]:
        log_event("lease_lost", lease=lease.id, level=logging.WARNING)
        return self.pool.on_lease_lost(lease)  # aborts now; the returned release runs later

    def _attempt_budget(self) -> float:
        """The longest one attempt may take: the rate, a lease, a connection, the commands, the
        DATA reply."""
        s = self.settings
        return 2 * s.lease_wait + 4 * s.smtp_timeout + s.data_timeout

    async def _bounded(
        self,
        payload: Mapping[str, Any],
        released: str = "",
        *,
        stream: bool = False,
        attempts: int = 0,
    ) -> Result:
        """`adeliver` under the attempt budget. A cancelled transaction classifies itself by
        phase (after the terminator it is UNCERTAIN), so only the waits before it end here."""
        self.backlog += not stream
        try:
            async with asyncio.timeout(self._attempt_budget()):  # a timer, not a task per message
                if stream:
                    return await self._streamed(payload)
                return await self.adeliver(payload, released, attempts)
        except TimeoutError:
            raise Failure(Kind.RECONNECT, None, "attempt timed out", Phase.CONNECT) from None
        finally:
            self.backlog -= not stream
            if not stream and self.on_room is not None:
                self.on_room()

    def deliver(self, payload: Mapping[str, Any], released: str = "", attempts: int = 0) -> Result:
        """`attempts`: the message's SMTP attempts so far (for its `sent` event)."""
        try:
            return self.loop.run(
                self._bounded(payload, released, attempts=attempts),
                timeout=self._attempt_budget() + 30,
            )
        except TimeoutError:
            # The loop itself is stuck: the attempt may still be running. The ledger decides
            # what a later attempt may do, so wait rather than guess.
            raise Failure(Kind.IN_FLIGHT, None, "attempt still running", Phase.CONNECT) from None

    def deliver_many(self, payloads: Sequence[Mapping[str, Any]]) -> list[Result | Failure]:
        async def all_of() -> list[Result | Failure]:
            results = await asyncio.gather(
                *(self._bounded(p) for p in payloads), return_exceptions=True
            )
            return [_outcome(r) for r in results]

        try:
            return self.loop.run(all_of(), timeout=self._attempt_budget() + 30)
        except TimeoutError:
            stuck = Failure(Kind.IN_FLIGHT, None, "attempt still running", Phase.CONNECT)
            return [stuck for _ in payloads]

    def start_many(
        self,
        payloads: Sequence[Mapping[str, Any]],
        on_done: Callable[[int, Result | Failure], None],
    ) -> None:
        """Starts one attempt per payload without waiting for any (callable from any thread);
        `on_done(index, outcome)` runs on the loop thread as each one ends."""

        def start() -> None:
            for index, payload in enumerate(payloads):
                task = asyncio.ensure_future(self._bounded(payload, stream=True))
                self._started.add(task)
                task.add_done_callback(partial(self._ended, index, on_done))

        self.loop.loop.call_soon_threadsafe(start)

    def _ended(
        self,
        index: int,
        on_done: Callable[[int, Result | Failure], None],
        task: asyncio.Task[Result],
    ) -> None:
        self._started.discard(task)
        if task.cancelled():
            outcome = _outcome(asyncio.CancelledError())
        else:
            exc = task.exception()
            outcome = _outcome(exc if exc is not None else task.result())
        on_done(index, outcome)

    @property
    def gate(self) -> Gate:
        """At most `ATTEMPTS_PER_SESSION` attempts per session at once in this process: a batch
        of hundreds claims its messages only as sessions free up, so claims don't lapse while
        waiting. Two, not one: the next attempt's claim is made while the session is still
        busy, and a session freed goes straight to a claimed attempt (the pool's queue) instead
        of idling through a settle and a claim, two ledger round trips per message. Attempts of
        a higher lane go first (see `Gate`)."""
        gate: Gate | None = getattr(self, "_gate", None)
        if gate is None:
            gate = self._gate = Gate(ATTEMPTS_PER_SESSION * self.settings.worker_connections)
        return gate

    def _rank(self, payload: Mapping[str, Any]) -> int:
        return self._ranks.get(lane_of(payload), len(self._ranks))

    async def adeliver(
        self, payload: Mapping[str, Any], released: str = "", attempts: int = 0
    ) -> Result:
        """One delivery attempt of one message (see `_attempt`), when this process has room."""
        gate = self.gate
        await gate.acquire(self._rank(payload))
        try:
            return await self._admitted(payload, released, attempts)
        finally:
            gate.release()

    async def _streamed(self, payload: Mapping[str, Any]) -> Result:
        """`adeliver` for `start_many`: an attempt still waiting for room when shutdown begins
        does not start (`Result("not_started")`), as Celery gives back tasks reserved but not
        started."""
        gate, draining = self.gate, self.leases.draining
        if draining.is_set():
            return Result("not_started")
        rank = self._rank(payload)
        if gate.locked():

            async def room() -> bool:
                return await gate.acquire(rank)

            async def give_back(_: bool) -> None:
                gate.release()

            if await _unless(draining, room(), give_back) is None:
                return Result("not_started")
        else:
            await gate.acquire(rank)
        try:
            return await self._admitted(payload, "")
        finally:
            gate.release()

    async def _admitted(
        self, payload: Mapping[str, Any], released: str, attempts: int = 0
    ) -> Result:
        """`_attempt` once the fleet's rate admits it. A transaction the relay throttled goes
        back to wait for the rate (which the throttling just lowered), not to its retries."""
        lane = lane_of(payload)
        tokens = self.shaper.tokens_for(len(payload["rcpt_to"]))
        for tries in range(1, THROTTLED_TRIES + 1):
            deadline = time.monotonic() + self.settings.lease_wait
            slot = await self.shaper.admit(lane, tokens, deadline)

            async def on_session(slot: float | None = slot) -> None:
                if self.shaper.late(lane, slot):
                    await self.shaper.admit(
                        lane, tokens, time.monotonic() + self.settings.lease_wait
                    )

            try:
                return await self._attempt(payload, released, attempts, on_session)
            except Failure as failure:
                if failure.kind is not Kind.THROTTLED or tries == THROTTLED_TRIES:
                    raise
                if self.leases.draining.is_set():
                    raise
                if failure.attempt:
                    released = f"{released} {failure.attempt}".strip()
        raise AssertionError("unreachable")

    async def _attempt(
        self,
        payload: Mapping[str, Any],
        released: str,
        attempts: int = 0,
        on_session: Callable[[], Awaitable[None]] | None = None,
    ) -> Result:
        """One attempt, guarded by the ledger so a message the relay has is never sent again.

        Claim, mark `data` just before the terminator, `sent` on the 250. A Redis error before
        the terminator is UNAVAILABLE (nothing was sent: wait); after the 250 it is logged and
        the message still counts as sent. A copy that finds the message `data`/`uncertain`
        follows MAILER_UNCERTAIN_POLICY: `hold` returns "held", `retry` takes it over.
        """
        message_id = str(payload["id"])
        if not ignores_suppressions(payload):
            payload = await self._unsuppressed(payload)
            if not payload["rcpt_to"]:
                return Result("suppressed", "every recipient is suppressed")
        owner = os.urandom(16).hex()  # what uuid4().hex is, less the UUID object
        try:
            body = wire_body(str(payload["data"]).encode("ascii"))
        except UnicodeError:
            raise Failure(Kind.PERMANENT, None, "message is not 7-bit", Phase.DATA) from None
        takeover = self.settings.uncertain_policy == "retry"
        try:
            blocking = await self.ledger.claim(
                message_id, owner, takeover=takeover, released=released.split()
            )
        except (redis.RedisError, OSError) as exc:
            failure = _unavailable(exc, Phase.CONNECT)
            failure.attempt = owner  # the claim may have landed: our retry may take it back
            raise failure from None
        if blocking is not None:
            if blocking.state == "sent":
                return Result("duplicate", blocking.reply)
            if blocking.state == "failed":
                return Result("failed", blocking.reply)
            if blocking.state == "cancelled":  # `mailer.cancel`: never sent
                return Result("cancelled", blocking.reply)
            if blocking.state in ("claimed", "data"):  # `data` within its window: alive
                raise Failure(Kind.IN_FLIGHT, None, "another attempt holds it", Phase.CONNECT)
            return Result("held", blocking.reply or "a previous attempt may have reached the relay")

        window = self.settings.data_timeout + self.settings.smtp_timeout + 10

        async def before_body() -> None:
            try:
                ours = await self.ledger.begin_data(message_id, owner, window)
            except (redis.RedisError, OSError) as exc:
                raise _unavailable(exc, Phase.DATA) from None
            if not ours:
                raise Failure(Kind.IN_FLIGHT, None, "another attempt took it over", Phase.DATA)

        try:
            delivered = await self.pool.send(
                str(payload["mail_from"]),
                list(payload["rcpt_to"]),
                body,
                before_body,
                lane=lane_of(payload),
                on_session=on_session,
            )
        except Failure as failure:
            metrics.smtp_failure(failure)
            if failure.kind is Kind.THROTTLED and failure.code is not None:
                self.shaper.throttled(failure.reason)
            if failure.kind is Kind.UNCERTAIN:
                await _quietly(self.ledger.settle(message_id, owner, "uncertain", failure.reason))
            elif failure.kind is Kind.PERMANENT:
                await _quietly(self.ledger.settle(message_id, owner, "failed", failure.reason))
            elif not await _quietly(self.ledger.release(message_id, owner)):
                failure.attempt = owner  # nothing at the relay: the retry may reclaim the record
            raise
        except BaseException:
            await _quietly(self.ledger.release(message_id, owner))
            raise
        metrics.delivered(delivered.refused)
        self.status.note(message_id, "sent", reply=f"250 {delivered.reply}")  # never waits
        await _quietly(self.ledger.settle(message_id, owner, "sent", delivered.reply))
        # Its own time: a message of a batch is `sent` now, not when its whole batch settles.
        log_event("sent", message_id=message_id, attempts=attempts)
        return Result("sent", delivered.reply, delivered.refused)

    async def _unsuppressed(self, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        """`payload` without its suppressed recipients (docs/lifecycle.md); the status records
        who was left out and why, `suppressed` when nobody is left. A Redis error is
        UNAVAILABLE: nothing was sent, the message waits."""
        recipients = list(payload["rcpt_to"])
        try:
            found = await self.suppressions.suppressed(recipients, group_of(payload))
        except (redis.RedisError, OSError) as exc:
            raise _unavailable(exc, Phase.CONNECT) from None
        if not found:
            return payload
        left = [r for r in recipients if r not in found]
        reason = "; ".join(f"{r}: {why}" for r, why in found.items())
        marks = {r.lower(): "suppressed" for r in found}
        self.status.note(
            str(payload["id"]), "suppressed" if not left else "", reason=reason, recipients=marks
        )
        return {**payload, "rcpt_to": left}

    def close(self, timeout: float = 30.0) -> None:
        async def stop() -> None:
            self.shaper.close()
            await self.pool.close(timeout)
            await self.keeper.stop()
            await self.semaphore.close()
            await self.status.close()
            await self.ledger.close()
            await self.lease_redis.aclose()
            await self.redis.aclose()

        try:
            self.loop.run(stop(), timeout=timeout + 10)
        finally:
            self.loop.stop()
            self.sync_redis.close()


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    """The process's runtime, created on first use in this process (never inherited by fork)."""
    global _runtime
    rt = _runtime  # the lock only for creating it: every settled message asks for it
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime(Settings.from_env())
        return _runtime


def current() -> Runtime | None:
    """This process's runtime if one was built, never building one (metrics, signal handlers)."""
    rt = _runtime
    return rt if rt is not None and rt.pid == os.getpid() else None


def occupancy() -> tuple[int, int, PoolStats | None]:
    """(open sessions, leases held, pool counters) of this process: what /metrics reports."""
    rt = current()
    if rt is None:
        return 0, 0, None
    return rt.pool.open_sessions, len(rt.keeper.leases), rt.pool.stats


def shutdown_runtime(timeout: float = 30.0) -> None:
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is not None and rt.pid == os.getpid():
        rt.close(timeout)
