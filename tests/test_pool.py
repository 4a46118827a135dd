"""The session pool's queue, against the real aiosmtpd sink: a freed session goes to the
checkout that has waited longest (a newcomer never takes it past them), and a waiter that gives
up just as it is handed a session passes it on instead of stranding it.

Leases are a stand-in here (the pool only needs an id and a validity); workers/semaphore.py
and tests/test_fleet_cap.py cover the real ones."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mailer.config import Secret, Settings
from workers.classify import Failure, Kind
from workers.pool import SessionPool
from workers.session import Session
from workers.sink import SinkServer, TLSMaterial

_ids = itertools.count()


@dataclass
class Lease:
    valid_until: float
    id: str = field(default_factory=lambda: f"lease-{next(_ids)}")


class Leases:
    """Always grants, counts what it gave and got back."""

    def __init__(self) -> None:
        self.granted = 0
        self.released = 0

    async def acquire(self, deadline: float) -> Lease:
        self.granted += 1
        return Lease(time.monotonic() + 3600)

    async def release(self, lease: Lease) -> None:
        self.released += 1

    @property
    def contended(self) -> bool:
        return False


def pool_for(sink: SinkServer, tls: TLSMaterial, key: str, **settings: object) -> SessionPool:
    return SessionPool(
        Settings(
            smtp_host="localhost",
            smtp_port=sink.port,
            smtp_tls="starttls",
            smtp_password=Secret(key),
            smtp_ca_file=str(tls.ca_file),
            smtp_timeout=10.0,
            worker_connections=1,
            **settings,  # type: ignore[arg-type]
        ),
        Leases(),
    )


async def queued(pool: SessionPool, n: int) -> None:
    """Until `n` checkouts wait in the pool's queue."""
    for _ in range(1000):
        if len(pool._waiters) == n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{len(pool._waiters)} waiting, not {n}")


def test_a_freed_session_goes_to_the_longest_waiter_not_a_newcomer(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first = await pool._checkout()
        waiting = asyncio.ensure_future(pool._checkout())
        await queued(pool, 1)
        await pool._checkin(first)
        newcomer = asyncio.ensure_future(pool._checkout())  # arrives as the session frees
        assert await waiting is first
        await queued(pool, 1)
        assert not newcomer.done()  # it queued behind, it did not take the session
        await pool._checkin(first)
        assert await newcomer is first
        await pool._checkin(first)
        assert pool.stats.opened == 1 and pool.open_sessions == 1
        await pool.close(5)

    asyncio.run(scenario())


def test_a_waiter_handed_a_session_as_it_gives_up_passes_it_on(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first = await pool._checkout()
        quitter = asyncio.ensure_future(pool._checkout())
        patient = asyncio.ensure_future(pool._checkout())
        await queued(pool, 2)
        await pool._checkin(first)  # handed to `quitter`, which is cancelled before it runs
        quitter.cancel()
        assert await patient is first
        assert quitter.cancelled()
        await pool._checkin(first)
        assert pool.open_sessions == 1 and not pool._waiters
        await pool.close(5)

    asyncio.run(scenario())


def test_a_waiter_out_of_time_fails_as_no_free_session_and_leaves_the_pool_whole(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key, lease_wait=0.2)
        pool.start()
        first = await pool._checkout()
        with pytest.raises(Failure) as info:
            await pool._checkout()
        assert info.value.kind is Kind.NO_LEASE and "no free session" in info.value.reason
        assert not pool._waiters
        await pool._checkin(first)
        assert await pool._checkout() is first  # still the one session, reused
        await pool._checkin(first)
        await pool.close(5)

    asyncio.run(scenario())


def test_a_session_closing_lets_the_first_waiter_open_another(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first: Session = await pool._checkout()
        waiting = asyncio.ensure_future(pool._checkout())
        await queued(pool, 1)
        first.abort()  # broken: retired at check-in, which makes room for a new one
        await pool._checkin(first)
        second = await waiting
        assert second is not first and second.connected
        await pool._checkin(second)
        assert pool.stats.opened == 2 and pool.open_sessions == 1
        await pool.close(5)

    asyncio.run(scenario())
