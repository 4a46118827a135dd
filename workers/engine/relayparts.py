"""Per relay, what a worker process sends through it with: its sessions, leases, rate and
login state, built on the relay's first message and dropped when it falls quiet.

A worker serves every relay (mailer/relays.py). What must not leak from one relay to another
lives in its `RelayParts`: the session pool (its own key and login gate), the lease semaphore
(the fleet-wide `smtp` cap and the relay's own `relay:<name>` cap, both held), the lease keeper,
the shaper (its own rate windows, adaptive ceiling and session-open rate, on
`keys.for_relay(name, ...)`). The circuit breaker is per relay too, but lives with the task
threads (workers/state/circuit.py `Circuits`). What the relays of a process share: the Redis
clients, one lease wake-up subscription, the session budget (MAILER_WORKER_CONNECTIONS for all
of them, workers/engine/budget.py), the attempts gate and the ledger.

The `default` relay (the single-relay environment) is built at start and never dropped, with
exactly the keys and limits a single-relay worker always had. Another relay's parts are built
on its first message, rebuilt when its spec changes (the source's version moved and the
relay differs: the old pool closes gracefully, its transactions in flight finish), and
dropped once it has had no traffic and no session for `PARTS_IDLE` seconds: 1,000 configured
tenants with ten active cost ten relays' sessions, leases and tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis

from mailer.config import Settings
from mailer.relays import DEFAULT_RELAY, Relay, default_relay
from workers.engine.budget import SessionBudget
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.pool import LeaseLike, SessionPool
from workers.engine.shaper import Shaper
from workers.engine.unless import unless
from workers.observe.logs import log_event
from workers.state import keys
from workers.state.keeper import LeaseKeeper
from workers.state.ratelimit import RateLimiter
from workers.state.semaphore import GLOBAL_LIMIT, LeaseSemaphore, Limit, ReleaseWakeups

log = logging.getLogger("mailer.worker")

#: A relay's parts are dropped this long after its last attempt, once no session is open.
PARTS_IDLE = 30.0
#: The relay source is refreshed this often (cheap: it re-reads only when its version moved).
REFRESH_EVERY = 2.0


class RelaySource(Protocol):
    """Where named relays come from (mailer/relays.py `RelayTable`, or `StaticRelays`)."""

    @property
    def version(self) -> int:
        """Moves whenever any relay is added, changed or removed."""
        ...

    async def refresh(self) -> None: ...

    async def get(self, name: str) -> Relay | None:
        """None: not configured, or unusable on this host (see `unusable`)."""
        ...

    def unusable(self, name: str) -> str | None:
        """Why a configured relay cannot be used here (its secret does not resolve)."""
        ...


class StaticRelays:
    """A fixed set of relays: a worker that knows only the environment's `default` relay, and
    tests. `put`, `remove` and `mark_unusable` change it as a reload would (the version moves)."""

    def __init__(self, relays: Iterable[Relay] = ()) -> None:
        self._relays = {relay.name: relay for relay in relays}
        self._unusable: dict[str, str] = {}
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    async def refresh(self) -> None:
        return None

    async def get(self, name: str) -> Relay | None:
        return None if name in self._unusable else self._relays.get(name)

    def unusable(self, name: str) -> str | None:
        return self._unusable.get(name)

    def put(self, relay: Relay) -> None:
        self._relays[relay.name] = relay
        self._unusable.pop(relay.name, None)
        self._version += 1

    def remove(self, name: str) -> None:
        self._relays.pop(name, None)
        self._version += 1

    def mark_unusable(self, name: str, why: str) -> None:
        self._unusable[name] = why
        self._version += 1


@dataclass(eq=False)
class Shared:
    """What every relay's parts share in one process."""

    settings: Settings
    redis: aioredis.Redis  # rate limiters (and the ledger, elsewhere)
    lease_redis: aioredis.Redis
    wakeups: ReleaseWakeups
    budget: SessionBudget
    draining: asyncio.Event  # set at shutdown: waiting for a lease is pointless


class RelayLeases:
    """Adapts a relay's semaphore to its pool: every lease handed out is renewed by the keeper."""

    def __init__(
        self, semaphore: LeaseSemaphore, keeper: LeaseKeeper, draining: asyncio.Event, relay: str
    ) -> None:
        self.semaphore = semaphore
        self.keeper = keeper
        self.draining = draining
        self.relay = relay

    async def acquire(self, deadline: float) -> LeaseLike | None:
        started = time.monotonic()
        try:
            lease = await unless(self.draining, self.semaphore.acquire(deadline), self.release)
        except (redis.RedisError, OSError) as exc:  # fail closed: no lease without Redis
            log.warning("lease acquire failed: %s", type(exc).__name__)
            return None
        if lease is not None:
            self.keeper.add(lease)
            log_event(
                "lease_acquired",
                lease=lease.id,
                waited_s=time.monotonic() - started,
                relay=self.relay,
            )
        return lease

    @property
    def contended(self) -> bool:
        return self.semaphore.contended

    async def release(self, lease: LeaseLike) -> None:
        self.keeper.discard(lease)  # type: ignore[arg-type]
        log_event("lease_released", lease=lease.id, relay=self.relay)
        try:
            await self.semaphore.release(lease)  # type: ignore[arg-type]
        except (redis.RedisError, OSError):
            log.warning("lease release failed; it will expire by itself")


def limits_for(relay: Relay, settings: Settings) -> list[Limit]:
    """The fleet-wide cap, the relay's own (every named relay has one: its `max_connections`,
    else the fleet's, so `mailer status` can count its leases), the per-host cap. The default
    relay keeps a single-relay worker's limits unless it names a cap of its own."""
    limits = [Limit(GLOBAL_LIMIT, settings.max_connections)]
    if relay.name != DEFAULT_RELAY or relay.max_connections:
        cap = relay.max_connections or settings.max_connections
        limits.append(Limit.for_relay(relay.name, cap))
    if settings.max_connections_per_host:
        limits.append(Limit.for_host(settings.hostname, settings.max_connections_per_host))
    return limits


class RelayParts:
    """One relay's pool, semaphore, keeper and shaper in this process."""

    def __init__(self, relay: Relay, shared: Shared) -> None:
        base = shared.settings
        self.relay = relay
        self.name = relay.name
        #: The worker's settings seen through this relay (the default relay: the environment).
        self.settings = base if relay.name == DEFAULT_RELAY else relay.settings(base)
        self.semaphore = LeaseSemaphore(
            shared.lease_redis,
            limits_for(relay, base),
            base.lease_ttl,
            host=base.hostname,
            wakeups=shared.wakeups,
        )
        self.keeper = LeaseKeeper(self.semaphore, on_lost=self._on_lease_lost)
        self.leases = RelayLeases(self.semaphore, self.keeper, shared.draining, relay.name)
        self.shaper = Shaper(
            self.settings,
            RateLimiter(shared.redis, keys.for_relay(relay.name, keys.RATE)),
            RateLimiter(shared.redis, keys.for_relay(relay.name, keys.RATE_CONNECT)),
            relay=relay.name,
        )
        self.pool = SessionPool(
            self.settings, self.leases, self.shaper, budget=shared.budget, relay=relay.name
        )
        #: Attempts using these parts right now (they are never dropped under one).
        self.active = 0
        self.last_used = time.monotonic()
        #: The most attempts of this relay that may wait here at once: twice what its own cap
        #: could carry (None: no cap of its own). More would only hold the process's room while
        #: waiting for the relay's leases, starving the other relays' messages behind them.
        cap = relay.max_connections
        self.crowd = None if cap is None else 2 * min(cap, base.worker_connections)

    def crowded(self) -> bool:
        return self.crowd is not None and self.active >= self.crowd

    def start(self) -> None:
        """On the loop: renewals and the idle sweep begin."""
        self.keeper.start()
        self.pool.start()

    def _on_lease_lost(self, lease: Any) -> Any:
        log_event("lease_lost", lease=lease.id, relay=self.name, level=logging.WARNING)
        return self.pool.on_lease_lost(lease)  # aborts now; the returned release runs later

    def idle_for(self, now: float) -> float | None:
        """Seconds since its last attempt, once nothing is in flight, open or held; else None."""
        if self.active or not self.pool.quiet or self.keeper.leases:
            return None
        return now - self.last_used

    async def close(self, timeout: float = 30.0, *, retiring: str = "") -> None:
        """Lets transactions in flight finish (up to `timeout`), QUITs the sessions, releases
        the leases. `retiring`: the worker goes on (see `SessionPool.close`)."""
        self.shaper.close(retiring or "worker is shutting down")
        await self.pool.close(timeout, retiring=retiring)
        await self.keeper.stop()
        await self.semaphore.close()


class PartsRegistry:
    """This process's `RelayParts`, by relay name (see the module docstring)."""

    def __init__(self, shared: Shared, source: RelaySource, *, close_timeout: float = 30.0) -> None:
        self.shared = shared
        self.source = source
        self.default = RelayParts(default_relay(shared.settings), shared)
        self._parts: dict[str, RelayParts] = {DEFAULT_RELAY: self.default}
        self._version = source.version
        self._complained: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.close_timeout = close_timeout
        self.idle_after = PARTS_IDLE
        self.refresh_every = REFRESH_EVERY
        #: Called on every sweep (the runtime forgets the breakers of relays gone quiet).
        self.on_sweep: Callable[[], None] | None = None

    def start(self) -> None:
        self.default.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def all(self) -> list[RelayParts]:
        """Every relay's parts now (a copy: safe to read from another thread)."""
        return list(self._parts.values())

    def get_nowait(self, name: str) -> RelayParts | None:
        return self._parts.get(name)

    async def parts_for(self, name: str) -> RelayParts:
        """The parts of relay `name`, built on its first message. A relay that is not
        configured or unusable on this host is a NO_RELAY failure: the message waits (as for
        a circuit), it is never sent through another relay."""
        parts = self._parts.get(name)
        if parts is not None:
            # Used now: the sweep keeps them even if the caller awaits before marking them
            # active (a router that looks at several relays).
            parts.last_used = time.monotonic()
            return parts
        try:
            relay = await self.source.get(name)
        except (redis.RedisError, OSError) as exc:
            raise Failure(
                Kind.UNAVAILABLE, None, f"relays unavailable ({type(exc).__name__})", Phase.CONNECT
            ) from None
        parts = self._parts.get(name)  # another attempt built them meanwhile
        if parts is not None:
            return parts
        if relay is None:
            raise self._no_relay(name)
        parts = RelayParts(relay, self.shared)
        parts.start()
        self._parts[name] = parts
        return parts

    def _no_relay(self, name: str) -> Failure:
        why = self.source.unusable(name)
        text = (
            f"relay {name} is unusable on this host: {why}"
            if why
            else (f"relay {name} is not configured")
        )
        now = time.monotonic()
        interval = self.shared.settings.circuit_probe_interval
        if now - self._complained.get(name, -interval) >= interval:
            self._complained[name] = now
            log_event("relay_unavailable", relay=name, reason=text, level=logging.WARNING)
        return Failure(Kind.NO_RELAY, None, text, Phase.CONNECT, relay=name)

    async def _sweep(self) -> None:
        """Refreshes the relay source, rebuilds what changed, drops what fell idle."""
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.refresh_every, self.idle_after / 2))
            now = time.monotonic()
            if now - refreshed >= self.refresh_every:
                refreshed = now
                with contextlib.suppress(redis.RedisError, OSError):
                    await self.source.refresh()
            if self.source.version != self._version:
                self._version = self.source.version
                await self._check_specs()
            for name, parts in list(self._parts.items()):
                idle = parts.idle_for(now)
                if name != DEFAULT_RELAY and idle is not None and idle >= self.idle_after:
                    self._retire(parts, "relay idle")
            interval = self.shared.settings.circuit_probe_interval
            for name, at in list(self._complained.items()):
                if now - at > interval:
                    del self._complained[name]
            if self.on_sweep is not None:
                self.on_sweep()

    async def _check_specs(self) -> None:
        for name, parts in list(self._parts.items()):
            if name == DEFAULT_RELAY:
                continue
            try:
                relay = await self.source.get(name)
            except (redis.RedisError, OSError):
                continue
            if relay is None:
                self._retire(parts, f"relay {name} was removed or is unusable on this host")
            elif relay != parts.relay:
                self._retire(parts, f"relay {name} was reconfigured")

    def _retire(self, parts: RelayParts, why: str) -> None:
        """Out of the registry now (the next message builds fresh parts); closed in the
        background, letting transactions in flight finish."""
        if self._parts.get(parts.name) is parts:
            del self._parts[parts.name]
        log_event("relay_parts_closed", relay=parts.name, reason=why)
        task = asyncio.get_running_loop().create_task(parts.close(self.close_timeout, retiring=why))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, timeout: float = 30.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        parts, self._parts = list(self._parts.values()), {}
        await asyncio.gather(*(p.close(timeout) for p in parts), return_exceptions=True)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=timeout)

    def shapers_close(self) -> None:
        """Shutdown begins: nobody waits for tokens any more."""
        for parts in self.all():
            parts.shaper.close()
