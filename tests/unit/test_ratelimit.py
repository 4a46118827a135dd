"""The fleet's rate (workers/state/ratelimit.py, lua/ratelimit.lua) on a real Redis: the
schedule a grant carries is what makes batching exact, so these check the schedule itself
(computed from Redis time, not from how fast this machine runs the test)."""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from mailer.config import RateWindow, Settings, parse_rates
from tests.support.helpers import run_async as run
from workers.engine.classify import Failure, Kind
from workers.engine.shaper import Shaper
from workers.state.ratelimit import RATE_KEY, RateLimiter, peek_ceiling


def most_in_any(times: list[float], width: float) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + width) - i for i, t in enumerate(times))


def test_concurrent_batches_never_exceed_a_window_plus_its_burst(redis_url: str) -> None:
    (window,) = parse_rates("MAILER_RATE_LIMIT", "300/s")
    assert window.burst == 30

    async def body(client: aioredis.Redis) -> list[float]:
        limiters = [RateLimiter(client) for _ in range(4)]
        used: list[float] = []

        async def taker(limiter: RateLimiter) -> None:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                grant = await limiter.take(40, (window,), horizon=0.25, burst=0.1)
                used.extend(grant.at(j) for j in range(1, grant.count + 1))
                await asyncio.sleep(0 if grant.count else min(grant.wait, 0.05))

        await asyncio.gather(*(taker(x) for x in limiters))
        return used

    used = run(redis_url, body)
    assert len(used) > 300, "the limiter granted far too little"
    # A token's time is when it may be used: in any second at most limit + burst of them
    # (the 1e-6 absorbs float rounding of the schedule).
    assert most_in_any(used, 1.0 - 1e-6) <= 300 + 30


def test_every_window_holds_and_a_grant_is_a_slice_of_the_schedule(redis_url: str) -> None:
    windows = parse_rates("MAILER_RATE_LIMIT", "1000/s:5,60/min:2")

    async def body(client: aioredis.Redis) -> tuple[int, int]:
        limiter = RateLimiter(client)
        first = await limiter.take(500, windows, horizon=0.25, burst=0.1)
        second = await limiter.take(500, windows, horizon=0.25, burst=0.1)
        return first.count, second.count

    first, second = run(redis_url, body)
    # 60/min paces at one a second with a burst of 2: within a quarter second of horizon only
    # the burst fits, whatever the 1000/s window would allow.
    assert 1 <= first <= 3 and second == 0


def test_throttling_lowers_the_shared_ceiling_which_then_recovers(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> tuple[float | None, float | None, float | None]:
        limiter = RateLimiter(client)
        assert await limiter.count(0) is None  # nothing in force yet
        args = {"floor": 1.0, "cooldown": 1.0, "recovery": 0.5, "cap": 0.0, "reason": "421 x"}
        # Without a measure of what the fleet sends, a throttling reply only counts.
        assert await limiter.throttle(5, **args) is None
        await limiter.count(50)  # what the workers report sending
        first = await limiter.throttle(5, **args)
        again = await limiter.throttle(50, **args)  # within the cooldown: counted, no decrease
        await asyncio.sleep(0.3)
        later = await limiter.count(0)
        return first, again, later

    first, again, later = run(redis_url, body)
    assert first is not None and first >= 1.0
    assert again is not None and again >= first  # one decrease per cooldown, however many replies
    assert later is not None and later > first  # additive recovery
    ceiling = peek_ceiling(redis.Redis.from_url(redis_url))
    assert ceiling.rate is not None and ceiling.reason == "421 x"


def test_the_ceiling_falls_to_what_the_relay_accepted(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    sec = int(client.time()[0])
    # Last full second: 1,000 granted, 800 throttled: the relay accepted 200, and the ceiling
    # may fall at most to 0.6 of the rate it falls from (1,000 here).
    client.hset(RATE_KEY, mapping={"gs": sec, "gc": 0, "gp": 1000, "ts": sec, "tc": 0, "tp": 800})

    async def body(aclient: aioredis.Redis) -> float | None:
        return await RateLimiter(aclient).throttle(
            1, floor=1.0, cooldown=1.0, recovery=0.0, cap=0.0, reason="throttled"
        )

    rate = run(redis_url, body)
    assert rate is not None and 599 <= rate <= 601
    client.hset(RATE_KEY, mapping={"gs": sec, "gp": 300, "tp": 20, "d": 0})
    rate = run(redis_url, body)
    # 300 granted under a ceiling of 600, 20 refused: the relay took 280. The decrease is
    # measured from what the fleet sends (300), not from a ceiling it does not reach (0.6 of
    # 600 would not slow it at all).
    assert rate is not None and 279 <= rate <= 281


def test_a_relay_that_refuses_nearly_everything_is_probed_then_restored(
    redis_url: str,
) -> None:
    """A relay that accepted under a tenth of what it was granted (Postfix's anvil refuses
    every MAIL once its window is spent) says nothing of its rate: the ceiling falls at once to
    a trickle of probes, and the first probe delivered restores it, to the rate measured before
    when the refusals were short."""
    client = redis.Redis.from_url(redis_url)
    sec = int(client.time()[0])
    client.hset(RATE_KEY, mapping={"gs": sec, "gc": 0, "gp": 1000, "ts": sec, "tc": 0, "tp": 960})
    args = {"floor": 1.0, "cooldown": 1.0, "recovery": 0.1, "cap": 0.0, "reason": "450 x"}

    async def body(aclient: aioredis.Redis) -> tuple[Any, ...]:
        limiter = RateLimiter(aclient)
        probing = await limiter.throttle(1, **args, probe=0.05, long=2.0, probe_max=50)
        first = await limiter.take(5, (), horizon=0.25, burst=0.1)
        await asyncio.sleep(0.3)
        still = await limiter.take(5, (), horizon=0.25, burst=0.1)  # no news is no news
        restored = await limiter.accept()  # a probe delivered
        after = await limiter.take(5, (), horizon=0.25, burst=0.1)
        return probing, first, still, restored, after

    probing, first, still, restored, after = run(redis_url, body)
    # 1,000 granted, 40 accepted: the rate it would fall to is 0.6 x 1,000; probes at 5%.
    assert probing is not None and 29 <= probing <= 31
    assert first.probing and first.count >= 1 and first.ceiling is not None
    assert first.ceiling <= 31 and still.probing and still.ceiling <= 31
    assert restored is not None and 590 <= restored <= 620
    assert not after.probing and after.ceiling is not None and after.ceiling >= 590
    assert client.hget(RATE_KEY, "pd") is None


def test_a_probe_refused_for_long_restores_the_cycles_long_run_rate(redis_url: str) -> None:
    """A budget spent early in its window (per minute, per hour) refuses for much longer than
    a second: the ceiling comes back to what the relay accepted over the whole cycle, not to
    the rate that spent the budget in a burst."""
    client = redis.Redis.from_url(redis_url)
    now = float(client.time()[0])
    # A cycle that began 60 s ago with 600 accepted; a probe that began 5 s ago, at 0.5/s now.
    client.hset(
        RATE_KEY,
        mapping={
            "cs": now - 60, "ca": 600, "pd": now - 5, "rr": 600, "pl": 2.0, "pr": 0.1,
            "c0": 0.5, "t0": now - 5, "step": 0, "cmax": 2000,
        },
    )  # fmt: skip

    async def body(aclient: aioredis.Redis) -> Any:
        return await RateLimiter(aclient).accept()

    rate = run(redis_url, body)
    assert rate is not None and 9 <= rate <= 11  # 600 over ~60 s, not 600/s
    assert client.hget(RATE_KEY, "pd") is None and float(client.hget(RATE_KEY, "ca") or 0) <= 5


def test_a_wait_past_its_deadline_is_a_free_throttled_wait(redis_url: str) -> None:
    settings = Settings(rate_limits=(RateWindow(1.0, 60.0, 1, "1/60s:1"),))

    async def body(client: aioredis.Redis) -> Failure | None:
        shaper = Shaper(settings, RateLimiter(client))
        await shaper.admit("default", 1, time.monotonic() + 5)  # the burst
        try:
            await shaper.admit("default", 1, time.monotonic() + 0.3)
        except Failure as failure:
            return failure
        finally:
            shaper.close()
        return None

    failure = run(redis_url, body)
    assert failure is not None and failure.kind is Kind.THROTTLED


def test_a_higher_lane_is_served_first_in_a_process(redis_url: str) -> None:
    settings = Settings(
        rate_limits=parse_rates("MAILER_RATE_LIMIT", "20/s:1"),
        lanes=(
            Settings().lanes[0].__class__("transactional"),
            Settings().lanes[0].__class__("bulk"),
        ),
        default_lane="bulk",
    )

    async def body(client: aioredis.Redis) -> list[str]:
        shaper = Shaper(settings, RateLimiter(client))
        order: list[str] = []

        async def one(lane: str) -> None:
            await shaper.admit(lane, 1, time.monotonic() + 30)
            order.append(lane)

        bulk = [asyncio.ensure_future(one("bulk")) for _ in range(6)]
        await asyncio.sleep(0)  # queued first
        urgent = [asyncio.ensure_future(one("transactional")) for _ in range(3)]
        await asyncio.gather(*bulk, *urgent)
        shaper.close()
        return order

    order = run(redis_url, body)
    assert order.count("transactional") == 3
    # Once transactional waiters exist, bulk waiters wait behind them: between the first and
    # the last transactional admission at most the one bulk waiter already holding its token.
    first = order.index("transactional")
    last = max(i for i, lane in enumerate(order) if lane == "transactional")
    assert order[first : last + 1].count("bulk") <= 1, order


def test_rate_settings_are_checked_at_start_up() -> None:
    import pytest

    from mailer.errors import ConfigError

    for bad in ("300", "300/week", "0/s", "abc/s", "300/s:x"):
        with pytest.raises(ConfigError, match="MAILER_RATE_LIMIT"):
            Settings.from_env({"MAILER_RATE_LIMIT": bad})
    for bad in ("transactional:120%", "bulk!", "a,a", "a:60%,b:50%", "9lane"):
        with pytest.raises(ConfigError, match="MAILER_LANES"):
            Settings.from_env({"MAILER_LANES": bad})
    with pytest.raises(ConfigError, match="MAILER_DEFAULT_LANE"):
        Settings.from_env({"MAILER_LANES": "a,b", "MAILER_DEFAULT_LANE": "c"})
    s = Settings.from_env({"MAILER_LANES": "transactional:20%,bulk", "MAILER_RATE_LIMIT": "10/s"})
    assert s.default_lane == "bulk" and s.lane_share("bulk") == 0.8


def test_tokens_used_up_to_their_lateness_allowance_still_keep_the_window(
    redis_url: str,
) -> None:
    """A grant told that tokens may be used `late` seconds after their time takes that much
    less burst: even with every other token used as late as allowed (late ones bunching with
    punctual ones), no second holds more than the window's limit plus its burst."""
    (window,) = parse_rates("MAILER_RATE_LIMIT", "300/s")
    late = 0.08

    async def body(client: aioredis.Redis) -> list[float]:
        limiters = [RateLimiter(client) for _ in range(4)]
        used: list[float] = []

        async def taker(limiter: RateLimiter) -> None:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                grant = await limiter.take(40, (window,), horizon=0.25, burst=0.1, late=late)
                used.extend(
                    grant.at(j) + (late if j % 2 else 0.0) for j in range(1, grant.count + 1)
                )
                await asyncio.sleep(0 if grant.count else min(grant.wait, 0.05))

        await asyncio.gather(*(taker(x) for x in limiters))
        return used

    used = run(redis_url, body)
    assert len(used) > 300, "the limiter granted far too little"
    assert most_in_any(used, 1.0 - 1e-6) <= 300 + 30


def test_slow_start_begins_once_grows_with_use_and_ends_at_the_first_throttling_reply(
    redis_url: str,
) -> None:
    slow = (20.0, 1.0, 2000.0, 60.0)

    async def body(client: aioredis.Redis) -> tuple[Any, ...]:
        limiter = RateLimiter(client)
        first = await limiter.take(50, (), horizon=0.25, burst=0.1, slow_start=slow)
        await asyncio.sleep(0.3)
        second = await limiter.take(50, (), horizon=0.25, burst=0.1, slow_start=slow)
        reached = float(await client.hget(RATE_KEY, "ss") or 0)
        after = await limiter.throttle(
            3, reason="450 4.7.1 too much mail", floor=0.1, cooldown=1.0, recovery=0.0, cap=0.0
        )
        third = await limiter.take(50, (), horizon=0.25, burst=0.1, slow_start=slow)
        return first, second, reached, after, third

    first, second, reached, after, third = run(redis_url, body)
    # Nothing known of the relay: paced from the start rate, a few tokens per grant.
    assert first.slow and first.ceiling == 20.0 and 1 <= first.count < 20
    # The ceiling grows by the gain per token granted, to at most twice the granted rate.
    assert second.slow and 20.0 <= second.ceiling <= 20.0 + first.count
    # The first throttling reply ends it: at most half the rate reached, and for good.
    assert after is not None and after <= reached / 2
    assert not third.slow and third.ceiling is not None
    assert peek_ceiling(redis.Redis.from_url(redis_url)).reason == "450 4.7.1 too much mail"


def test_slow_start_that_reached_its_end_never_comes_back(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> list[Any]:
        limiter = RateLimiter(client)
        grants = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # a fleet using every token as it falls due
            grant = await limiter.take(
                100, (), horizon=0.25, burst=0.1, slow_start=(20.0, 5.0, 60.0, 60.0)
            )
            grants.append(grant)
            if not grant.slow:
                break
            due = grant.at(grant.count) if grant.count else time.monotonic() + grant.wait
            await asyncio.sleep(max(0.001, due - time.monotonic()))
        return grants

    grants = run(redis_url, body)
    assert grants[0].slow
    # 5 msg/s per token, the fleet using what it is granted: past 60/s, nothing paces.
    assert not grants[-1].slow and grants[-1].ceiling is None and grants[-1].count == 100
    assert redis.Redis.from_url(redis_url).hget(RATE_KEY, "sd") == b"1"


def test_slow_start_ends_after_its_time_without_a_throttling_reply(redis_url: str) -> None:
    """A fleet that cannot reach the end rate (a single relay, a few sessions) is not paced
    for ever: slow start is over once it has lasted its time."""

    async def body(client: aioredis.Redis) -> tuple[Any, Any]:
        limiter = RateLimiter(client)
        first = await limiter.take(
            5, (), horizon=0.25, burst=0.1, slow_start=(20.0, 1.0, 2000.0, 0.3)
        )
        await asyncio.sleep(0.4)
        later = await limiter.take(
            5, (), horizon=0.25, burst=0.1, slow_start=(20.0, 1.0, 2000.0, 0.3)
        )
        return first, later

    first, later = run(redis_url, body)
    assert first.slow
    assert not later.slow and later.ceiling is None and later.count == 5
    assert redis.Redis.from_url(redis_url).hget(RATE_KEY, "sd") == b"1"


def test_a_shaper_without_a_configured_rate_is_paced_by_slow_start_until_it_ends(
    redis_url: str,
) -> None:
    async def body(client: aioredis.Redis) -> tuple[bool, bool, bool, bool]:
        shaper = Shaper(Settings(), RateLimiter(client))
        slot = await shaper.admit("default", 1, time.monotonic() + 5)
        during = (slot is not None, shaper.slow, shaper.cautious)
        await client.hset(RATE_KEY, mapping={"sd": 1})  # what reaching SLOW_START_END leaves
        await client.hdel(RATE_KEY, "ss")
        for _ in range(50):  # until a grant tells the shaper
            if await shaper.admit("default", 1, time.monotonic() + 5) is None:
                break
        after = shaper.ceiling is None and not shaper.paced
        shaper.close()
        return (*during, after)

    metered, slow, cautious, free_after = run(redis_url, body)
    # Metered from the first message (a relay nobody has measured), still pipelining.
    assert metered and slow and not cautious
    assert free_after
