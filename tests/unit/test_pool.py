"""The session pool's queue, against the real aiosmtpd sink: a freed session goes to the
checkout that has waited longest (a newcomer never takes it past them), a waiter that gives
up just as it is handed a session passes it on instead of stranding it, and a busy session
carries the next message's commands behind its body without either message paying for the
other's failure.

Leases are a stand-in here (the pool only needs an id and a validity); workers/state/semaphore.py
and tests/test_fleet_cap.py cover the real ones."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from devkit.sink import FaultPlan, SinkServer, TLSMaterial
from mailer.config import Settings
from tests.support.helpers import sink_settings
from workers.engine.classify import Failure, Kind, Phase
from workers.engine.pool import SessionPool
from workers.engine.session import Delivered, Session, wire_body

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
    extra = {"smtp_timeout": 10.0, "worker_connections": 1, **settings}
    return SessionPool(sink_settings(sink, tls, key, **extra), Leases())


async def queued(pool: SessionPool, n: int) -> None:
    """Until `n` checkouts wait in the pool's queue."""
    for _ in range(1000):
        if pool.waiting == n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{pool.waiting} waiting, not {n}")


def test_a_freed_session_goes_to_the_longest_waiter_not_a_newcomer(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first = await pool.checkout()
        waiting = asyncio.ensure_future(pool.checkout())
        await queued(pool, 1)
        await pool.checkin(first)
        newcomer = asyncio.ensure_future(pool.checkout())  # arrives as the session frees
        assert await waiting is first
        await queued(pool, 1)
        assert not newcomer.done()  # it queued behind, it did not take the session
        await pool.checkin(first)
        assert await newcomer is first
        await pool.checkin(first)
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
        first = await pool.checkout()
        quitter = asyncio.ensure_future(pool.checkout())
        patient = asyncio.ensure_future(pool.checkout())
        await queued(pool, 2)
        await pool.checkin(first)  # handed to `quitter`, which is cancelled before it runs
        quitter.cancel()
        assert await patient is first
        assert quitter.cancelled()
        await pool.checkin(first)
        assert pool.open_sessions == 1 and not pool.waiting
        await pool.close(5)

    asyncio.run(scenario())


def test_a_waiter_out_of_time_fails_as_no_free_session_and_leaves_the_pool_whole(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key, lease_wait=0.2)
        pool.start()
        first = await pool.checkout()
        with pytest.raises(Failure) as info:
            await pool.checkout()
        assert info.value.kind is Kind.NO_LEASE and "no free session" in info.value.reason
        assert not pool.waiting
        await pool.checkin(first)
        assert await pool.checkout() is first  # still the one session, reused
        await pool.checkin(first)
        await pool.close(5)

    asyncio.run(scenario())


def test_a_session_closing_lets_the_first_waiter_open_another(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first: Session = await pool.checkout()
        waiting = asyncio.ensure_future(pool.checkout())
        await queued(pool, 1)
        first.abort()  # broken: retired at check-in, which makes room for a new one
        await pool.checkin(first)
        second = await waiting
        assert second is not first and second.connected
        await pool.checkin(second)
        assert pool.stats.opened == 2 and pool.open_sessions == 1
        await pool.close(5)

    asyncio.run(scenario())


def _body(n: int) -> bytes:
    return wire_body(f"Message-ID: <m{n}@example.com>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode())


async def _send(pool: SessionPool, n: int, **kw: object) -> Delivered | Failure:
    try:
        return await pool.send("s@example.com", [f"r{n}@example.com"], _body(n), **kw)  # type: ignore[arg-type]
    except Failure as failure:
        return failure


def test_a_busy_session_carries_the_next_message_behind_its_body(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    """One session, six messages at once: each one's MAIL, RCPT and DATA leave behind the body
    before it, every message arrives whole and in order, on the one connection."""
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        results = await asyncio.gather(*(_send(pool, n) for n in range(6)))
        assert all(isinstance(r, Delivered) for r in results), results
        assert pool.stats.chained == 5 and pool.stats.opened == 1
        await pool.close(5)

    asyncio.run(scenario())
    received = sink.received
    assert [r.message_id for r in received] == [f"m{n}@example.com" for n in range(6)]
    assert [r.rcpt_tos for r in received] == [(f"r{n}@example.com",) for n in range(6)]
    assert len({r.session_id for r in received}) == 1


def test_a_refused_body_does_not_stop_the_message_behind_it(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    sink = make_sink(
        tls="starttls", auth=("apikey", api_key), faults=FaultPlan(p_451_data=1.0, max_faults=1)
    )

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first, second = await asyncio.gather(_send(pool, 1), _send(pool, 2))
        assert isinstance(first, Failure) and (first.kind, first.code) == (Kind.RETRY, 451)
        assert isinstance(second, Delivered)
        assert pool.stats.chained == 1 and pool.stats.opened == 1
        await pool.close(5)

    asyncio.run(scenario())
    assert [r.message_id for r in sink.received] == ["m2@example.com"]


def test_a_message_behind_a_lost_connection_fails_before_any_of_it_is_delivered(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str
) -> None:
    """The relay takes the first body and hangs up before its 250: that one is ambiguous, the
    one whose commands rode behind it is a plain reconnect (no body of it ever left), and the
    pool opens a new session for the next message."""
    sink = make_sink(
        tls="starttls",
        auth=("apikey", api_key),
        faults=FaultPlan(p_drop_after_data=1.0, max_faults=1),
    )

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first, second = await asyncio.gather(_send(pool, 1), _send(pool, 2))
        assert isinstance(first, Failure) and first.kind is Kind.UNCERTAIN
        assert isinstance(second, Failure) and second.kind is Kind.RECONNECT
        assert second.phase is Phase.MAIL
        assert pool.stats.chained == 1
        assert isinstance(await _send(pool, 3), Delivered)
        assert pool.stats.opened == 2
        await pool.close(5)

    asyncio.run(scenario())
    assert [r.message_id for r in sink.received] == ["m1@example.com", "m3@example.com"]


@pytest.mark.parametrize("when", ["handed", "waiting its turn"])
def test_a_chained_message_cancelled_before_its_turn_never_cuts_off_the_one_ahead(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, when: str
) -> None:
    """The second message is cancelled while the first still waits for its 250 (slow relay),
    as the session is handed to it or once it waits for its turn: the first gets its reply all
    the same, the session (whose relay now waits for a body that never comes) is closed and
    its lease given back, and the next message opens a new one."""
    sink = make_sink(tls="starttls", auth=("apikey", api_key), faults=FaultPlan(delay=0.3))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key)
        pool.start()
        first = asyncio.ensure_future(_send(pool, 1))
        second = asyncio.ensure_future(_send(pool, 2))
        if when == "handed":  # before it runs again: its checkout gives the session up
            chain = pool._chain

            def chain_then_cancel(session: Session) -> tuple[bytes, int] | None:
                chained = chain(session)
                if chained is not None:
                    second.cancel()
                return chained

            pool._chain = chain_then_cancel  # type: ignore[method-assign]
        for _ in range(500):
            if pool.stats.chained:
                break
            await asyncio.sleep(0.01)
        assert pool.stats.chained == 1
        second.cancel()
        assert isinstance(await first, Delivered)
        with pytest.raises(asyncio.CancelledError):
            await second
        assert isinstance(await _send(pool, 3), Delivered)
        assert pool.stats.opened == 2 and pool.open_sessions == 1
        leases = pool.leases
        await pool.close(5)
        assert isinstance(leases, Leases) and leases.granted == leases.released == 2

    asyncio.run(scenario())
    assert [r.message_id for r in sink.received] == ["m1@example.com", "m3@example.com"]


def test_the_heap_is_trimmed_once_sessions_stop_opening(
    make_sink: Callable[..., SinkServer],
    tls_material: TLSMaterial,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a burst of TLS handshakes the sweeper gives glibc's freed heap back to the OS
    (`trim_heap`, here the real `malloc_trim`), once per burst, not on every sweep."""
    from workers.engine import pool as pool_module

    trim = pool_module.trim_heap
    assert trim() in (0, 1)  # glibc's malloc_trim: 1 if memory was released
    calls: list[float] = []

    def counted() -> object:
        calls.append(time.monotonic())
        return trim()

    monkeypatch.setattr(pool_module, "trim_heap", counted)
    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        pool = pool_for(sink, tls_material, api_key, worker_connections=3, session_idle_timeout=0.4)
        pool.start()
        sessions = [await pool.checkout() for _ in range(3)]
        for session in sessions:
            await pool.checkin(session)
        await asyncio.sleep(0.35)  # sweeps every 0.1 s here
        assert len(calls) == 1
        await pool.close(5)

    asyncio.run(scenario())


def test_a_paced_fleet_never_writes_a_message_behind_another_ones_body(
    make_sink: Callable[..., SinkServer], tls_material: TLSMaterial, api_key: str, redis_url: str
) -> None:
    """With a message rate, a message's commands leave when its token allows (the runtime
    checks it when the message gets its session); writing them early behind the previous body
    would skip that check, so a paced pool hands a busy session over only after its reply."""
    import redis.asyncio as aioredis

    from mailer.config import parse_rates
    from workers.engine.shaper import Shaper
    from workers.state.ratelimit import RateLimiter

    sink = make_sink(tls="starttls", auth=("apikey", api_key))

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        rates = parse_rates("MAILER_RATE_LIMIT", "1000/s")
        shaper = Shaper(Settings(rate_limits=rates), RateLimiter(client))
        assert shaper.paced and not shaper.cautious
        pool = pool_for(sink, tls_material, api_key)
        pool.shaper = shaper
        pool.start()
        results = await asyncio.gather(*(_send(pool, n) for n in range(4)))
        assert all(isinstance(r, Delivered) for r in results), results
        assert pool.stats.chained == 0 and pool.stats.opened == 1
        await pool.close(5)
        shaper.close()
        await client.aclose()

    asyncio.run(scenario())
    assert len(sink.received) == 4
