"""Everything one worker process owns: its loop thread, Redis clients, lease keeper, session
pool, ledger, dead letters and circuit breaker. Built lazily, once per process (after fork),
and torn down on worker shutdown.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from mailer.config import Settings
from workers.circuit import Circuit
from workers.classify import Failure, Kind, Phase
from workers.deadletters import DeadLetters
from workers.ledger import Ledger
from workers.loop import LoopThread
from workers.pool import LeaseLike, SessionPool
from workers.semaphore import LeaseKeeper, LeaseSemaphore, Limit
from workers.session import wire_body

log = logging.getLogger("mailer.worker")


@dataclass
class Result:
    """What became of one delivery attempt."""

    status: str  # sent | duplicate | held | failed | in_flight
    reply: str = ""
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class _Leases:
    """Adapts the semaphore to the pool: every lease handed out is renewed by the keeper."""

    def __init__(self, semaphore: LeaseSemaphore, keeper: LeaseKeeper) -> None:
        self.semaphore = semaphore
        self.keeper = keeper

    async def acquire(self, deadline: float) -> LeaseLike | None:
        try:
            lease = await self.semaphore.acquire(deadline)
        except (redis.RedisError, OSError) as exc:  # fail closed: no lease without Redis
            log.warning("lease acquire failed: %s", type(exc).__name__)
            return None
        if lease is not None:
            self.keeper.add(lease)
        return lease

    async def release(self, lease: LeaseLike) -> None:
        self.keeper.discard(lease)  # type: ignore[arg-type]
        try:
            await self.semaphore.release(lease)  # type: ignore[arg-type]
        except (redis.RedisError, OSError):
            log.warning("lease release failed; it will expire by itself")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings.require_relay()
        self.pid = os.getpid()
        self.sync_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self.dead = DeadLetters(self.sync_redis)
        self.circuit = Circuit(self.sync_redis, settings.circuit_probe_interval)
        self.loop = LoopThread()
        self.loop.run(self._start())

    async def _start(self) -> None:
        s = self.settings
        self.redis = aioredis.from_url(
            s.redis_url, socket_timeout=max(2.0, s.lease_ttl / 6), socket_connect_timeout=2.0
        )
        limits = [Limit("smtp", s.max_connections)]
        if s.max_connections_per_host:
            limits.append(Limit(f"host:{s.hostname}", s.max_connections_per_host))
        self.semaphore = LeaseSemaphore(self.redis, limits, s.lease_ttl, host=s.hostname)
        self.keeper = LeaseKeeper(self.semaphore, on_lost=self._on_lease_lost)
        self.pool = SessionPool(s, _Leases(self.semaphore, self.keeper))
        self.ledger = Ledger(self.redis, ttl=s.ledger_ttl, claim_ttl=3 * s.smtp_timeout + 10)
        self.keeper.start()
        self.pool.start()

    def _on_lease_lost(self, lease: Any) -> None:
        self.pool.fence(lease.id)

    def deliver(self, payload: Mapping[str, Any]) -> Result:
        timeout = (
            self.settings.lease_wait + 4 * self.settings.smtp_timeout + self.settings.data_timeout
        )
        return self.loop.run(self.adeliver(payload), timeout=timeout)

    def deliver_many(self, payloads: Sequence[Mapping[str, Any]]) -> list[Result | Failure]:
        import asyncio

        async def all_of() -> list[Result | Failure]:
            results = await asyncio.gather(
                *(self.adeliver(p) for p in payloads), return_exceptions=True
            )
            out: list[Result | Failure] = []
            for r in results:
                if isinstance(r, Result | Failure):
                    out.append(r)
                else:
                    out.append(Failure(Kind.RECONNECT, None, f"{type(r).__name__}", Phase.CONNECT))
            return out

        timeout = (
            self.settings.lease_wait + 4 * self.settings.smtp_timeout + self.settings.data_timeout
        )
        return self.loop.run(all_of(), timeout=timeout + 30)

    async def adeliver(self, payload: Mapping[str, Any]) -> Result:
        """One attempt, guarded by the ledger so a message the relay has is never sent again."""
        message_id = str(payload["id"])
        owner = uuid.uuid4().hex
        blocking = await self.ledger.claim(message_id, owner)
        if blocking is not None:
            if blocking.state == "sent":
                return Result("duplicate", blocking.reply)
            if blocking.state == "failed":
                return Result("failed", blocking.reply)
            if blocking.state == "claimed":
                raise Failure(Kind.RETRY, None, "another attempt is in flight", Phase.CONNECT)
            # "data" (its sender died inside the ambiguous window) or "uncertain"
            if self.settings.uncertain_policy != "retry":
                await self.ledger.mark(message_id, "uncertain", reply=blocking.reply)
                return Result("held", "previous attempt may have reached the relay")
            await self.ledger.mark(message_id, "claimed", owner=owner)

        async def before_body() -> None:
            await self.ledger.mark(message_id, "data", owner=owner)

        try:
            delivered = await self.pool.send(
                str(payload["mail_from"]),
                list(payload["rcpt_to"]),
                wire_body(str(payload["data"]).encode("ascii")),
                before_body,
            )
        except Failure as failure:
            if failure.kind is Kind.UNCERTAIN:
                await self.ledger.mark(message_id, "uncertain", reply=failure.reason)
            elif failure.kind is Kind.PERMANENT:
                await self.ledger.mark(message_id, "failed", reply=failure.reason)
            else:
                await self.ledger.release(message_id, owner)
            raise
        except BaseException:
            await self.ledger.release(message_id, owner)
            raise
        await self.ledger.mark(message_id, "sent", reply=delivered.reply)
        return Result("sent", delivered.reply, delivered.refused)

    def close(self, timeout: float = 30.0) -> None:
        async def stop() -> None:
            await self.pool.close(timeout)
            await self.keeper.stop()
            await self.semaphore.close()
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
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime(Settings.from_env())
        return _runtime


def shutdown_runtime(timeout: float = 30.0) -> None:
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is not None and rt.pid == os.getpid():
        rt.close(timeout)
