"""Renewal and fencing: keeps a process's leases alive, and fences a connection whose lease is gone.

A holder may use its connection only while its lease is valid by its *own* clock
(`Lease.valid_until`, see docs/semaphore.md), so the keeper does two things from the process's
event loop: renew every live lease in one call (at most every ttl/3), and the moment a lease is
lost (Redis says so, or `valid_until` passes without a successful renewal) tell its owner, who
aborts the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from workers.state.semaphore import BACKOFF_START, Lease, LeaseSemaphore

log = logging.getLogger("mailer.semaphore")

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
