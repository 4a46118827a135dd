"""Everything one worker process owns: its loop thread, Redis clients, the parts of each relay
it sends through (session pool, leases, shaper: workers/engine/relayparts.py), the ledger, dead
letters and the relays' circuit breakers. Built lazily, once per process (after fork), and torn
down on worker shutdown.

An attempt picks its relay's parts in one place, `Runtime.route` (the failover router's hook);
everything after that is the relay's own.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from mailer import redisconn
from mailer.config import Settings
from mailer.profiles import Unportable, adapt
from mailer.relays import Relay, RelayTable
from mailer.wire import DEFAULT_RELAY, group_of, ignores_suppressions, lane_of, relay_of
from workers.engine.budget import SessionBudget
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.failover import Router
from workers.engine.loop import LoopThread
from workers.engine.pool import SessionPool
from workers.engine.relayparts import PartsRegistry, RelayParts, RelaySource, Shared, StaticRelays
from workers.engine.session import wire_body
from workers.engine.shaper import Shaper
from workers.engine.unless import cancel as _cancel  # noqa: F401  (tests reach it here)
from workers.engine.unless import unless as _unless
from workers.observe import metrics
from workers.observe.logs import log_event
from workers.state import keys
from workers.state.circuit import Circuit, Circuits, CircuitState
from workers.state.deadletters import DeadLetters
from workers.state.ledger import Ledger
from workers.state.lifecycle import StatusWriter
from workers.state.semaphore import ReleaseWakeups
from workers.state.suppressions import SuppressionCheck
from workers.state.trouble import TroubleRuns

log = logging.getLogger("mailer.worker")
T = TypeVar("T")


@dataclass
class Result:
    """What became of one delivery attempt."""

    status: str  # sent | duplicate | held | failed | cancelled | suppressed | not_started
    reply: str = ""
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    relay: str = ""  # the relay the attempt went through ("" when it never picked one)


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


#: Attempts in flight per session of the process (see `Runtime.gate`).
ATTEMPTS_PER_SESSION = 2


class Gate:
    """A counting semaphore whose waiters are served by rank (a lane's priority: 0 first), then
    in arrival order: a transactional attempt takes the next free slot, not the one after every
    attempt of a bulk batch already waiting. A freed slot is handed to the waiter directly.

    `reserve`: slots only rank 0 may take once the others are spent. Every slot may be held by
    a bulk attempt in the middle of its transaction, and a transactional one would then wait
    for one of them to end (0.3 s at the median in bench/shaping.py's lanes run); the pool
    gives it the next free session anyway."""

    def __init__(self, size: int, reserve: int = 0) -> None:
        self._free = size
        self._reserve = reserve
        self._waiters: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._arrivals = itertools.count()

    def locked(self) -> bool:
        return self._free <= 0

    async def acquire(self, rank: int = 0) -> bool:
        """Returns whether the slot is one of the reserve's (give it back with `release`)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return False
        if rank == 0 and self._reserve > 0:
            self._reserve -= 1
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._arrivals), future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())  # handed a slot as we were cancelled: pass it on
            raise

    def release(self, reserved: bool = False) -> None:
        while self._waiters and (not reserved or self._waiters[0][0] == 0):
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(reserved)
                return
        if reserved:
            self._reserve += 1
        else:
            self._free += 1


#: A message the relay throttles waits for the fleet's rate again, in this process, this many
#: times before it goes back to the queue (still without spending an attempt).
THROTTLED_TRIES = 10


#: Builds the process's relay source once its Redis client exists (mailer/relays.py
#: `RelayTable`); None: only the environment's `default` relay.
SourceFactory = Callable[[Settings, aioredis.Redis], RelaySource]


class Runtime:
    def __init__(self, settings: Settings, relays: SourceFactory | None = None) -> None:
        self.settings = settings.require_relay()
        self.pid = os.getpid()
        self.sync_redis = redisconn.client(settings.redis_url, settings, socket_timeout=10)
        self.dead = DeadLetters(self.sync_redis)
        #: Each relay's breaker (the task threads check them before an attempt).
        self.circuits = Circuits(
            self.sync_redis, settings.circuit_probe_interval, settings.quota_probe_interval
        )
        self._source_factory = relays
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
        # One wake-up subscription for every relay's semaphore: one pub/sub connection.
        self.wakeups = ReleaseWakeups(self.lease_redis, keys.lease_released())
        self.draining = asyncio.Event()  # set at shutdown: waiting for a lease is pointless
        self.budget = SessionBudget(s.worker_connections)
        shared = Shared(s, self.redis, self.lease_redis, self.wakeups, self.budget, self.draining)
        factory = self._source_factory
        source = factory(s, self.redis) if factory is not None else StaticRelays()
        self.relays = PartsRegistry(shared, source)
        self.relays.on_sweep = self.circuits.forget_idle
        self.ledger = Ledger(
            self.redis,
            ttl=s.ledger_ttl,
            claim_ttl=3 * s.smtp_timeout + 10,
            replicas=s.wait_replicas,
        )
        self.status = StatusWriter(self.redis, s.ledger_ttl)
        self.suppressions = SuppressionCheck(self.redis)
        # Only probes renew a failed-over relay's trouble run: it outlives several intervals.
        trouble = TroubleRuns(self.redis, ttl=max(120.0, 4 * s.circuit_probe_interval))
        self.router = Router(
            trouble, self._relay_named, self._circuit_open, probe_interval=s.circuit_probe_interval
        )
        #: Set once a relay with a fallback was routed here: from then on every attempt's
        #: outcome feeds the trouble runs (a single-relay worker never pays for them).
        self.failing_over = False
        self.relays.start()

    # -- the default relay's parts, as a single-relay worker had them -----------------------------

    @property
    def pool(self) -> SessionPool:
        return self.relays.default.pool

    @property
    def shaper(self) -> Shaper:
        return self.relays.default.shaper

    @property
    def circuit(self) -> Circuit:
        return self.circuits.get(DEFAULT_RELAY)

    @property
    def open_sessions(self) -> int:
        return sum(p.pool.open_sessions for p in self.relays.all())

    @property
    def leases_held(self) -> int:
        return sum(len(p.keeper.leases) for p in self.relays.all())

    # -- which relay ------------------------------------------------------------------------------

    async def parts_for(self, relay: str) -> RelayParts:
        """Relay `relay`'s parts (NO_RELAY when it is not configured or unusable here)."""
        return await self.relays.parts_for(relay)

    async def route(self, payload: Mapping[str, Any]) -> RelayParts:
        """The one place an attempt picks the relay it goes through: the relay the message
        names, or its fallback while that relay is down (workers/engine/failover.py) for the
        lanes that fail over. The attempt then runs wholly on what this returns, and its
        outcome names that relay."""
        parts = await self.relays.parts_for(relay_of(payload))
        relay = parts.relay
        if relay.fallback is None:
            return parts
        lane = lane_of(payload)
        if lane not in relay.fallback_lanes:
            return parts
        return await self._failover(parts, payload, lane)

    async def _failover(
        self, parts: RelayParts, payload: Mapping[str, Any], lane: str
    ) -> RelayParts:
        self.failing_over = True
        relay = parts.relay
        state = self._circuit_state(relay.name)
        route = await self.router.route(relay, lane, state.open, str(payload["data"]))
        if route.reason:
            self.status.note(str(payload["id"]), "", reason=route.reason)  # never waits
        if route.kind == "fallback":
            chosen = await self.relays.parts_for(route.relay_name)
            log_event(
                "failover",
                message_id=payload.get("id"),
                relay=relay.name,
                to=chosen.name,
                reason=route.reason,
            )
            return chosen
        if state.open and route.kind == "primary":
            # Staying home while its breaker is open (the fallback is down too, or cannot send
            # this message): it waits for the breaker, as without a fallback.
            kind = Kind.QUOTA if state.kind == "quota" else Kind.AUTH
            text = f"circuit of relay {relay.name} open: {state.reason}; {route.reason}"
            raise Failure(kind, None, text, Phase.CONNECT, relay=relay.name)
        return parts  # its own relay, or this message is the fleet's probe of it

    @staticmethod
    def _uncrowded(parts: RelayParts) -> RelayParts:
        """`parts`, unless that relay already has as many attempts waiting here as its own cap
        can use: then this message goes back to wait in the schedule (NO_LEASE, free), leaving
        the process's room to the other relays' messages."""
        if parts.crowded():
            text = (
                f"relay {parts.name} at its own connection cap "
                f"({parts.active} attempts already here)"
            )
            raise Failure(Kind.NO_LEASE, None, text, Phase.CONNECT, relay=parts.name)
        return parts

    def fails_over(self, relay: str, lane: str) -> bool:
        """Whether messages of `lane` through `relay` have a fallback (from a task thread: a
        message that may fail over does not wait for its relay's breaker)."""
        parts = self.relays.get_nowait(relay)
        if parts is None:
            try:
                parts = self.loop.run(self.relays.parts_for(relay), timeout=10)
            except (Failure, TimeoutError):
                return False
        return parts.relay.fallback is not None and lane in parts.relay.fallback_lanes

    async def _relay_named(self, name: str) -> Relay | None:
        if name == DEFAULT_RELAY:
            return self.relays.default.relay
        try:
            return await self.relays.source.get(name)
        except (redis.RedisError, OSError):
            return None

    def _circuit_state(self, relay: str) -> CircuitState:
        try:
            return self.circuits.get(relay).state()
        except (redis.RedisError, OSError):
            return CircuitState(False)  # as the task path: the ledger then fails fast

    def _circuit_open(self, relay: str) -> bool:
        return self._circuit_state(relay).open

    def holds_for_circuit(self, relay: str) -> bool:
        """Whether a message waiting for `relay`'s breaker may hold its task thread (see
        workers/settle.py `wait_for_circuit`): only the default relay's, and only while no
        other relay is in use here, or the wait would stall the other relays' traffic."""
        return relay == DEFAULT_RELAY and all(
            name == DEFAULT_RELAY for name in self.circuits.in_use()
        )

    def drain(self) -> None:
        """Shutdown begins (safe from a signal handler): tasks waiting for a lease stop waiting
        and go back to the queue; transactions in flight carry on."""
        self.loop.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.draining.set()
        self.relays.shapers_close()

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
            size = ATTEMPTS_PER_SESSION * self.settings.worker_connections
            reserve = self.settings.worker_connections if len(self._ranks) > 1 else 0
            gate = self._gate = Gate(size, reserve)
        return gate

    def _rank(self, payload: Mapping[str, Any]) -> int:
        return self._ranks.get(lane_of(payload), len(self._ranks))

    async def adeliver(
        self, payload: Mapping[str, Any], released: str = "", attempts: int = 0
    ) -> Result:
        """One delivery attempt of one message (see `_attempt`), when this process has room."""
        parts = self._uncrowded(await self.route(payload))
        parts.active += 1  # no await since `route` returned: the sweep cannot drop them first
        gate = self.gate
        try:
            reserved = await gate.acquire(self._rank(payload))
            try:
                result = await self._admitted(parts, payload, released, attempts)
            finally:
                gate.release(reserved)
        except Failure as failure:
            failure.relay = failure.relay or parts.name
            raise
        finally:
            parts.active -= 1
            parts.last_used = time.monotonic()
        result.relay = parts.name
        return result

    async def _streamed(self, payload: Mapping[str, Any]) -> Result:
        """`adeliver` for `start_many`: an attempt still waiting for room when shutdown begins
        does not start (`Result("not_started")`), as Celery gives back tasks reserved but not
        started."""
        gate, draining = self.gate, self.draining
        if draining.is_set():
            return Result("not_started")
        parts = self._uncrowded(await self.route(payload))
        parts.active += 1
        rank = self._rank(payload)
        try:
            if gate.locked():

                async def room() -> bool:
                    return await gate.acquire(rank)

                async def give_back(reserved: bool) -> None:
                    gate.release(reserved)

                got = await _unless(draining, room(), give_back)
                if got is None:
                    return Result("not_started")
                reserved = got
            else:
                reserved = await gate.acquire(rank)
            try:
                result = await self._admitted(parts, payload, "")
            finally:
                gate.release(reserved)
        except Failure as failure:
            failure.relay = failure.relay or parts.name
            raise
        finally:
            parts.active -= 1
            parts.last_used = time.monotonic()
        result.relay = parts.name
        return result

    async def _admitted(
        self, parts: RelayParts, payload: Mapping[str, Any], released: str, attempts: int = 0
    ) -> Result:
        """`_attempt` once the relay's rate admits it. A transaction the relay throttled goes
        back to wait for the rate (which the throttling just lowered), not to its retries."""
        lane = lane_of(payload)
        shaper = parts.shaper
        tokens = shaper.tokens_for(len(payload["rcpt_to"]))
        for tries in range(1, THROTTLED_TRIES + 1):
            deadline = time.monotonic() + self.settings.lease_wait
            slot = await shaper.admit(lane, tokens, deadline)

            async def on_session(slot: float | None = slot) -> None:
                if shaper.late(lane, slot):
                    wait = time.monotonic() + self.settings.lease_wait
                    await shaper.admit(lane, tokens, wait, holding=True)

            try:
                result = await self._attempt(parts, payload, released, attempts, on_session)
            except Failure as failure:
                if failure.kind is not Kind.THROTTLED or tries == THROTTLED_TRIES:
                    raise
                if self.draining.is_set():
                    raise
                if failure.attempt:
                    released = f"{released} {failure.attempt}".strip()
            else:
                if result.status == "sent":
                    shaper.accepted(slot)
                return result
        raise AssertionError("unreachable")

    async def _attempt(
        self,
        parts: RelayParts,
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
        data = str(payload["data"])
        relay = parts.relay
        if relay.profile != "sendgrid":
            try:
                adapted = adapt(data, relay.profile, relay.configuration_set)
            except Unportable as exc:
                text = f"relay {relay.name}: {exc}"
                raise Failure(Kind.PERMANENT, None, text, Phase.CONNECT) from None
            data = adapted.data
            if adapted.note:
                self.status.note(message_id, "", reason=adapted.note)
        try:
            body = wire_body(data.encode("ascii"))
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
            delivered = await parts.pool.send(
                str(payload["mail_from"]),
                list(payload["rcpt_to"]),
                body,
                before_body,
                lane=lane_of(payload),
                on_session=on_session,
            )
        except Failure as failure:
            metrics.smtp_failure(failure, parts.name)
            if self.failing_over:
                self.router.record_failure(parts.name, failure)
            if failure.kind is Kind.THROTTLED and failure.code is not None:
                parts.shaper.throttled(failure.reason)
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
        metrics.delivered(delivered.refused, parts.name)
        if self.failing_over:
            self.router.record_success(parts.name)
        self.status.note(message_id, "sent", reply=f"250 {delivered.reply}")  # never waits
        await _quietly(self.ledger.settle(message_id, owner, "sent", delivered.reply))
        # Its own time: a message of a batch is `sent` now, not when its whole batch settles.
        log_event("sent", message_id=message_id, attempts=attempts, relay=parts.name)
        return Result("sent", delivered.reply, delivered.refused)

    async def _unsuppressed(self, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        """`payload` without its suppressed recipients (docs/lifecycle.md); the status records
        who was left out and why, `suppressed` when nobody is left. The lists are those of the
        message's own relay, even when it goes through a fallback: the recipient left that
        tenant's mail. A Redis error is UNAVAILABLE: nothing was sent, the message waits."""
        recipients = list(payload["rcpt_to"])
        try:
            found = await self.suppressions.suppressed(
                recipients, group_of(payload), relay_of(payload)
            )
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
            self.relays.shapers_close()
            await self.relays.close(timeout)
            await self.router.settle()
            await self.wakeups.close()
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
    """The process's runtime, created on first use in this process (never inherited by fork).
    Its relays: the environment's `default`, and the registry's (mailer/relays.py)."""
    global _runtime
    rt = _runtime  # the lock only for creating it: every settled message asks for it
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime(Settings.from_env(), relays=RelayTable)
        return _runtime


def current() -> Runtime | None:
    """This process's runtime if one was built, never building one (metrics, signal handlers)."""
    rt = _runtime
    return rt if rt is not None and rt.pid == os.getpid() else None


def occupancy() -> dict[str, metrics.RelayOccupancy]:
    """Each relay of this process (with parts, or asked about lately): what /metrics reports."""
    rt = current()
    if rt is None:
        return {}
    out = {name: metrics.RelayOccupancy() for name in rt.circuits.in_use()}
    for parts in rt.relays.all():
        out[parts.name] = metrics.RelayOccupancy(
            parts.pool.open_sessions,
            len(parts.keeper.leases),
            parts.pool.stats,
            parts.shaper.configured_rate,
        )
    return out


def shutdown_runtime(timeout: float = 30.0) -> None:
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is not None and rt.pid == os.getpid():
        rt.close(timeout)
