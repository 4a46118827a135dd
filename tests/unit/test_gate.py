"""The process's attempts gate (workers/engine/runtime.py `Gate`): lanes ranked, and the
highest lane's reserve, which keeps a transactional attempt from waiting for a slot that every
bulk attempt in the middle of its transaction holds."""

from __future__ import annotations

import asyncio

from workers.engine.runtime import Gate


def test_waiters_are_served_by_rank_then_arrival() -> None:
    async def body() -> list[str]:
        gate = Gate(1)
        assert await gate.acquire(1) is False
        order: list[str] = []

        async def one(name: str, rank: int) -> None:
            reserved = await gate.acquire(rank)
            order.append(name)
            gate.release(reserved)

        waiting = [asyncio.ensure_future(one(f"bulk{i}", 1)) for i in range(3)]
        await asyncio.sleep(0)
        waiting.append(asyncio.ensure_future(one("tx", 0)))
        await asyncio.sleep(0)
        gate.release()
        await asyncio.gather(*waiting)
        return order

    assert asyncio.run(body()) == ["tx", "bulk0", "bulk1", "bulk2"]


def test_the_reserve_is_for_the_highest_rank_alone_and_comes_back() -> None:
    async def body() -> tuple[bool, bool, bool, bool]:
        gate = Gate(2, reserve=1)
        held = [await gate.acquire(1), await gate.acquire(1)]  # every slot held by bulk
        assert held == [False, False] and gate.locked()
        bulk = asyncio.ensure_future(gate.acquire(1))
        await asyncio.sleep(0)
        bulk_waits = not bulk.done()  # a lower rank never takes the reserve
        reserved = await gate.acquire(0)  # at once: the reserve
        second = asyncio.ensure_future(gate.acquire(0))  # the reserve is spent: it waits
        await asyncio.sleep(0)
        second_waits = not second.done()
        gate.release(reserved)  # a reserve slot goes to the rank-0 waiter, not to bulk
        handed = await second
        still_bulk_waits = not bulk.done()
        gate.release(handed)  # no rank-0 waiter: back to the reserve
        assert not bulk.done()
        gate.release(False)  # a normal slot: to the bulk waiter
        assert await bulk is False
        return bulk_waits, second_waits, handed, still_bulk_waits

    assert asyncio.run(body()) == (True, True, True, True)


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def body() -> bool:
        gate = Gate(1, reserve=1)
        first = await gate.acquire(0)
        spare = await gate.acquire(0)  # both the slot and the reserve held
        assert (first, spare) == (False, True)
        waiter = asyncio.ensure_future(gate.acquire(0))
        after = asyncio.ensure_future(gate.acquire(0))
        await asyncio.sleep(0)
        gate.release(spare)  # handed to `waiter`...
        waiter.cancel()  # ... which is cancelled before it runs: `after` gets it instead
        await asyncio.gather(waiter, return_exceptions=True)
        got = await asyncio.wait_for(after, 1)
        gate.release(got)
        gate.release(first)
        # Everything back: one normal slot and the reserve.
        return (await gate.acquire(1)) is False and (await gate.acquire(0)) is True

    assert asyncio.run(body())
