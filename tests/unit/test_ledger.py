"""The ledger's coalesced script calls, against a real Redis: concurrent transitions share round
trips (and one script call per transition), yet every caller gets exactly the result or error a
call of its own would have got.

Round trips are counted two ways: the ledger's own count of pipelines, and Redis' count of
reads from its clients (`total_reads_processed`), which a pipeline costs once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from devkit.redis_server import RedisServer
from workers.state import ledger as ledger_module
from workers.state.ledger import Ledger, Record

Body = Callable[[Ledger, aioredis.Redis], Awaitable[Any]]


def client(url: str) -> aioredis.Redis:
    """Configured like the worker's ledger client (workers/engine/runtime.py)."""
    return aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=40, timeout=10.0, socket_timeout=5.0, socket_connect_timeout=2.0
        )
    )


def run(url: str, body: Body) -> Any:
    async def main() -> Any:
        r = client(url)
        try:
            result = await body(Ledger(r, ttl=600, claim_ttl=60), r)
            assert flushers() == [], "the flusher outlived its work"
            return result
        finally:
            await r.aclose()

    return asyncio.run(main())


def flushers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "ledger-flusher"]


async def stats(r: aioredis.Redis) -> dict[str, int]:
    """Reads Redis got from clients, and calls of the commands we care about."""
    info = await r.info("all")
    out = {"reads": int(info["total_reads_processed"])}
    for name in ("evalsha", "script|load", "script|exists", "eval"):
        out[name] = int(info.get(f"cmdstat_{name}", {}).get("calls", 0))
    return out


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()
    try:
        yield server
    finally:
        server.close()


async def pause_scripts(url: str) -> None:
    """Redis holds every script call (until unpaused): a pipeline stays in flight."""
    admin = aioredis.Redis.from_url(url)
    await admin.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
    await admin.aclose()


async def unpause(url: str) -> None:
    admin = aioredis.Redis.from_url(url)
    await admin.execute_command("CLIENT", "UNPAUSE")
    await admin.aclose()


async def in_flight(lg: Ledger, before: int) -> None:
    """Until the ledger has handed a pipeline to redis-py (its very next step, normally)."""
    for _ in range(1000):
        if lg.round_trips != before:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no pipeline was sent")


# ---- coalescing --------------------------------------------------------------------------


def test_calls_made_together_leave_in_one_round_trip(redis_url: str) -> None:
    async def body(lg: Ledger, r: aioredis.Redis) -> None:
        await lg.claim("warm", "w")  # scripts loaded
        before, trips = await stats(r), lg.round_trips
        n = 300
        results = await asyncio.gather(*(lg.claim(f"m{i}", f"o{i}") for i in range(n)))
        assert results == [None] * n
        assert lg.round_trips - trips == 1
        d = delta(await stats(r), before)
        assert d["evalsha"] == 1  # all 300 in one call; no SCRIPT EXISTS, no EVAL fallback
        assert d["script|exists"] == d["script|load"] == d["eval"] == 0
        assert d["reads"] <= 10, d  # one pipeline (a large write may take a few reads) + INFO
        for i in (0, 150, n - 1):
            record = await lg.get(f"m{i}")
            assert record is not None and record.state == "claimed" and record.owner == f"o{i}"

    run(redis_url, body)


def test_steady_load_batches_behind_the_round_trip_in_flight(redis_url: str) -> None:
    async def body(lg: Ledger, r: aioredis.Redis) -> None:
        await lg.claim("warm", "w")  # the three scripts loaded
        await lg.begin_data("warm", "w", 30)
        await lg.settle("warm", "w", "sent")
        before, trips = await stats(r), lg.round_trips
        sessions, each = 32, 40

        async def session(s: int) -> None:
            for i in range(each):
                key = f"s{s}-{i}"
                assert await lg.claim(key, "o") is None
                assert await lg.begin_data(key, "o", 30)
                assert await lg.settle(key, "o", "sent", "250 ok")

        await asyncio.gather(*(session(s) for s in range(sessions)))
        calls = sessions * each * 3
        trips = lg.round_trips - trips
        d = delta(await stats(r), before)
        assert d["evalsha"] <= 3 * trips  # at most one call per transition and round trip
        assert trips <= calls // 8, (trips, calls)
        assert d["reads"] <= calls // 8, (d, calls)
        record = await lg.get("s7-9")
        assert record is not None and (record.state, record.reply) == ("sent", "250 ok")

    run(redis_url, body)


# ---- results and errors, per caller ------------------------------------------------------


def test_each_caller_gets_its_own_result(redis_url: str) -> None:
    async def body(lg: Ledger, r: aioredis.Redis) -> None:
        for warm in (lg.claim("w", "w"), lg.begin_data("w", "w", 1), lg.settle("w", "w", "sent")):
            await warm  # scripts loaded: no call of a batch is retried after the others
        await lg.release("w", "w")
        owners = [f"o{i}" for i in range(50)]
        trips = lg.round_trips
        claims = await asyncio.gather(*(lg.claim("contested", o) for o in owners))
        # Calls run in the order they were made: the first caller wins, everyone else is told
        # who holds the message.
        assert claims[0] is None
        assert {(c.state, c.owner) for c in claims[1:] if c is not None} == {("claimed", "o0")}
        assert all(c is not None for c in claims[1:])
        data = await asyncio.gather(*(lg.begin_data("contested", o, 30) for o in owners))
        assert data == [True] + [False] * 49
        settled = await asyncio.gather(
            lg.settle("contested", "o3", "failed", "550 no"),  # not o3's: refused
            lg.settle("contested", "o0", "uncertain", "no reply"),
            lg.release("contested", "o0"),  # `uncertain` is not released
            lg.claim("contested", "o9"),
        )
        assert settled[:3] == [False, True, None]
        assert isinstance(settled[3], Record) and settled[3].state == "uncertain"
        assert lg.round_trips - trips == 3

    run(redis_url, body)


def test_results_match_calls_made_one_by_one(redis_url: str) -> None:
    """The same transitions through the ledger (coalesced, 20 messages at once) and through
    redis-py's own per-call scripts (each step alone, KEYS[1] and ARGV) give the same answers."""

    steps: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("claim", ("a",), {}),
        ("claim", ("a",), {}),
        ("claim", ("b",), {}),
        ("begin_data", ("b", 5), {}),
        ("begin_data", ("a", 5), {}),
        ("claim", ("b",), {}),
        ("claim", ("b",), {"takeover": True}),
        ("claim", ("c",), {"released": ("x", "a")}),
        ("settle", ("x", "failed", "550"), {}),
        ("settle", ("c", "uncertain", "no reply"), {}),
        ("claim", ("d",), {}),
        ("claim", ("d",), {"takeover": True}),
        ("begin_data", ("d", 5), {}),
        ("release", ("d",), {}),
        ("claim", ("e",), {}),
        ("settle", ("z", "sent", "250 " + "x" * 300), {}),
        ("claim", ("f",), {}),
        ("release", ("e",), {}),
    ]

    def comparable(value: Any) -> Any:
        if isinstance(value, Record):  # timestamps differ between the two runs
            return (value.state, value.owner, value.reply)
        return value

    async def body(lg: Ledger, r: aioredis.Redis) -> None:
        claim, data, settle, release = (
            r.register_script(s.single)
            for s in (
                ledger_module._CLAIM_SCRIPT,
                ledger_module._DATA_SCRIPT,
                ledger_module._SETTLE_SCRIPT,
                ledger_module._RELEASE_SCRIPT,
            )
        )

        async def one_by_one(message_id: str) -> list[Any]:
            key = Ledger.key(message_id)
            out: list[Any] = []
            for name, args, kw in steps:
                if name == "claim":
                    raw = await claim(
                        keys=[key],
                        args=[
                            args[0],
                            lg.claim_ttl_ms,
                            "1" if kw.get("takeover") else "0",
                            lg.ttl,
                            *kw.get("released", ()),
                        ],
                    )
                    out.append(None if raw is None else Record.parse(raw))
                elif name == "begin_data":
                    out.append(bool(await data(keys=[key], args=[args[0], lg.ttl, args[1]])))
                elif name == "settle":
                    owner, state, reply = args
                    out.append(
                        bool(await settle(keys=[key], args=[owner, state, reply[:200], lg.ttl]))
                    )
                else:
                    await release(keys=[key], args=[args[0]])  # `Ledger.release` returns None
                    out.append(None)
            return [comparable(v) for v in out]

        async def coalesced(message_id: str) -> list[Any]:
            out = []
            for name, args, kw in steps:
                out.append(await getattr(lg, name)(message_id, *args, **kw))
            return [comparable(v) for v in out]

        expected = await one_by_one("reference")
        assert expected[0] is None and expected[5] == ("data", "a", "")  # a meaningful script
        trips = lg.round_trips
        got = await asyncio.gather(*(coalesced(f"c{i}") for i in range(20)))
        assert got == [expected] * 20
        assert lg.round_trips - trips <= len(steps) + 1

    run(redis_url, body)


def test_an_error_fails_only_its_own_caller(redis_url: str) -> None:
    async def body(lg: Ledger, r: aioredis.Redis) -> None:
        await r.set(Ledger.key("garbled"), "not json")  # the claim script fails on it
        reference = r.register_script(ledger_module._CLAIM_SCRIPT.single)
        with pytest.raises(redis.ResponseError) as alone:
            await reference(keys=[Ledger.key("garbled")], args=["o", 60_000, "0", 600])
        trips = lg.round_trips
        results = await asyncio.gather(
            lg.claim("fine1", "o"),
            lg.claim("garbled", "o"),
            lg.claim("bad-arg", "o", released=(None,)),  # type: ignore[arg-type]
            lg.claim("fine2", "o"),
            return_exceptions=True,
        )
        assert results[0] is None and results[3] is None
        assert isinstance(results[1], redis.ResponseError)
        # The error a call of its own gets (the script's name aside)
        assert "Expected value but found invalid token" in str(alone.value)
        assert "Expected value but found invalid token" in str(results[1]), results[1]
        assert isinstance(results[2], redis.DataError)  # refused before it joined the pipeline
        assert lg.round_trips - trips == 1
        assert await lg.get("bad-arg") is None
        blocking = await lg.claim("fine1", "p")
        assert blocking is not None and (blocking.state, blocking.owner) == ("claimed", "o")

    run(redis_url, body)


# ---- NOSCRIPT, Redis down, cancellation --------------------------------------------------


def test_scripts_flushed_are_loaded_again_and_the_calls_retried_once(redis_url: str) -> None:
    async def body(lg: Ledger, r: aioredis.Redis) -> None:
        assert await lg.claim("k0", "a") is None
        assert await lg.begin_data("k0", "a", 30)
        await r.script_flush()
        before, trips = await stats(r), lg.round_trips
        results = await asyncio.gather(
            *(lg.claim(f"k{i}", "b") for i in range(1, 41)),
            lg.claim("k0", "b"),
            lg.settle("k0", "a", "sent", "250 ok"),
            lg.release("k1", "zzz"),
        )
        assert results[:40] == [None] * 40
        blocking = results[40]
        assert isinstance(blocking, Record) and (blocking.state, blocking.owner) == ("data", "a")
        assert results[41:] == [True, None]
        # One round trip found the scripts gone; one more loaded the three it needed and ran
        # those calls again (one script call per transition). No call ran twice.
        assert lg.round_trips - trips == 2
        d = delta(await stats(r), before)
        assert (d["script|load"], d["evalsha"]) == (3, 2 * 3)
        assert (await lg.get("k0")).state == "sent"  # type: ignore[union-attr]
        assert await r.script_exists(ledger_module._DATA_SCRIPT.sha) == [False]
        assert await lg.begin_data("k1", "b", 30)  # the one still missing: loaded when needed
        assert await r.script_exists(ledger_module._DATA_SCRIPT.sha) == [True]

    run(redis_url, body)


def test_redis_stopped_mid_pipeline_fails_every_caller_then_recovers() -> None:
    with private_redis() as server:

        async def body(lg: Ledger, r: aioredis.Redis) -> None:
            assert await lg.claim("before", "a") is None
            await pause_scripts(server.url)
            trips = lg.round_trips
            calls = [asyncio.ensure_future(lg.claim(f"m{i}", "a")) for i in range(20)]
            await in_flight(lg, trips)
            await asyncio.to_thread(server.stop)
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(e, redis.ConnectionError) for e in results), results
            assert len({id(e) for e in results}) == 20  # each caller raises its own
            assert flushers() == []
            # While Redis is down every call fails at once, alone or together.
            down = await asyncio.gather(
                *(lg.begin_data(f"m{i}", "a", 5) for i in range(5)), return_exceptions=True
            )
            assert all(isinstance(e, redis.ConnectionError) for e in down), down
            with pytest.raises(redis.ConnectionError):
                await lg.settle("m1", "a", "sent")
            # Back (without its scripts): the client reconnects, the scripts are loaded again.
            await asyncio.to_thread(server.start)
            after = await asyncio.gather(*(lg.claim(f"n{i}", "b") for i in range(20)))
            assert after == [None] * 20
            assert await lg.begin_data("n3", "b", 5)
            assert await lg.settle("n3", "b", "sent", "250 ok")
            assert (await lg.get("n3")).state == "sent"  # type: ignore[union-attr]

        run(server.url, body)


def test_a_cancelled_caller_leaves_the_others_and_the_flusher_alone() -> None:
    with private_redis() as server:

        async def body(lg: Ledger, r: aioredis.Redis) -> None:
            assert await lg.claim("warm", "w") is None
            # Cancelled before its call was sent: it is never sent.
            early = asyncio.ensure_future(lg.claim("never", "a"))
            others = [asyncio.ensure_future(lg.claim(f"q{i}", "a")) for i in range(5)]
            await asyncio.sleep(0)  # all six are queued, the flusher's first step comes next
            early.cancel()
            assert await asyncio.gather(*others) == [None] * 5
            assert early.cancelled()
            assert await lg.get("never") is None
            # Timed out while its pipeline is in flight (Redis holds the scripts).
            await pause_scripts(server.url)
            trips = lg.round_trips
            waiting = [asyncio.ensure_future(lg.claim(f"w{i}", "a")) for i in range(5)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(lg.claim("late", "a"), timeout=0.2)
            await in_flight(lg, trips)
            queued = [asyncio.ensure_future(lg.begin_data(f"w{i}", "a", 5)) for i in range(5)]
            await asyncio.sleep(0)
            queued[0].cancel()  # queued behind the pipeline in flight
            await unpause(server.url)
            assert await asyncio.gather(*waiting) == [None] * 5
            assert await asyncio.gather(*queued[1:]) == [True] * 4
            assert queued[0].cancelled()
            # The timed-out call reached Redis (as a single EVALSHA may have): it is claimed.
            record = await lg.get("late")
            assert record is not None and record.owner == "a"
            assert (await lg.get("w0")).state == "claimed"  # type: ignore[union-attr]
            assert await lg.claim("after", "a") is None

        run(server.url, body)


def test_a_cancelled_flusher_fails_its_callers_and_a_new_one_takes_over() -> None:
    """Only loop shutdown cancels the flusher; nobody may be left waiting, and nobody who was
    not cancelled sees a CancelledError: not knowing whether the script ran is a connection
    error."""
    with private_redis() as server:

        async def body(lg: Ledger, r: aioredis.Redis) -> None:
            await pause_scripts(server.url)
            trips = lg.round_trips
            calls = [asyncio.ensure_future(lg.claim(f"m{i}", "a")) for i in range(5)]
            await in_flight(lg, trips)
            queued = [asyncio.ensure_future(lg.claim(f"n{i}", "a")) for i in range(3)]
            await asyncio.sleep(0)
            (flusher,) = flushers()
            flusher.cancel()
            results = await asyncio.gather(*calls, *queued, return_exceptions=True)
            assert all(isinstance(e, redis.ConnectionError) for e in results), results
            await unpause(server.url)
            assert await lg.claim("n0", "a") is None  # never sent: free

        run(server.url, body)


def test_closing_lets_the_round_trip_in_flight_land_then_drops_its_connection(
    redis_url: str,
) -> None:
    """The coalescer keeps one connection of its own; `close` (at worker shutdown) waits for
    the calls already sent, closes it, and a later call opens another."""

    async def body(lg: Ledger, r: aioredis.Redis) -> None:
        await lg.claim("warm", "w")
        (conn,) = [c for c in [lg._calls._conn] if c is not None]
        pending = [asyncio.ensure_future(lg.claim(f"c{i}", "o")) for i in range(50)]
        await asyncio.sleep(0)  # the flusher takes them
        await lg.close()
        assert [await p for p in pending] == [None] * 50  # none cut off by the close
        assert lg._calls._conn is None and not conn.is_connected
        assert await lg.begin_data("c0", "o", 30) is True  # a new connection, same ledger
        record = await lg.get("c0")
        assert record is not None and (record.state, record.owner) == ("data", "o")

    run(redis_url, body)
